"""A small CNN trained data-parallel on scikit-learn's bundled 8x8 digits, written against Horovod's PyTorch API.

The script uses Horovod's calls and nothing else of collective: with
``import horovod.torch as hvd`` it runs on Horovod, with the line below on
collective. Nothing is downloaded.

Run:  collective-run -np 2 python examples/horovod_digits.py [--epochs 10] [--save-params DIR]

Each rank trains on its own shard of the training set (DistributedSampler),
hvd.DistributedOptimizer averages the gradients, and the test loss and
accuracy are averaged over the ranks' test shards with hvd.allreduce. At the
end rank 0 prints whether every rank holds the same parameters.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import collective.horovod.torch as hvd  # with Horovod: import horovod.torch as hvd


class Net(torch.nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, two linear layers and dropout, for 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.drop2d = torch.nn.Dropout2d(0.1)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(self.drop2d(F.relu(self.conv2(x))), 2)
        x = F.dropout(F.relu(self.fc1(torch.flatten(x, 1))), 0.2, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): the 1797 digits scaled to [0, 1] as 1x8x8 images, split 80/20 the same way on every rank."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) * 4 // 5
    tr, te = perm[:cut], perm[cut:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def main() -> None:
    """Parse options, train, test after every epoch, check the ranks agree."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32, help="training images per rank per step")
    ap.add_argument("--test-batch-size", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of one rank (scaled by hvd.size())")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log-interval", type=int, default=10, help="steps between loss lines (0: none)")
    ap.add_argument("--fp16-allreduce", action="store_true", help="send gradients as float16")
    ap.add_argument("--gradient-predivide-factor", type=float, default=1.0,
                    help="divide gradients by this before the sum and by size/this after")
    ap.add_argument("--save-params", metavar="DIR", help="every rank writes its parameters to DIR/rank<R>.npz")
    args = ap.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one process per core: torch's own threads would compete with the other ranks

    train_set, test_set = digits(args.seed)
    # Each rank reads its own part of the data; the sampler pads so every rank takes as many steps.
    train_sampler: DistributedSampler = DistributedSampler(train_set, num_replicas=hvd.size(), rank=hvd.rank(),
                                                           seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler)
    test_sampler: DistributedSampler = DistributedSampler(test_set, num_replicas=hvd.size(), rank=hvd.rank(),
                                                          shuffle=False)
    test_loader = DataLoader(test_set, batch_size=args.test_batch_size, sampler=test_sampler)

    model = Net()
    # The global batch is hvd.size() times one rank's, so is the learning rate.
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(),
                                                       momentum=args.momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average,
                                         gradient_predivide_factor=args.gradient_predivide_factor)

    def metric_average(value: float, name: str) -> float:
        return hvd.allreduce(torch.tensor(value), name=name).item()

    def train(epoch: int) -> None:
        model.train()
        train_sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for i, (data, target) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
            if args.log_interval and i % args.log_interval == 0 and hvd.rank() == 0:
                print(f"Train Epoch: {epoch} [{i * len(data)}/{len(train_sampler)} "
                      f"({100.0 * i / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}", flush=True)

    def test() -> float:
        model.eval()
        loss, correct = 0.0, 0.0
        with torch.no_grad():
            for data, target in test_loader:
                out = model(data)
                loss += F.nll_loss(out, target, reduction="sum").item()
                correct += (out.argmax(1) == target).sum().item()
        loss = metric_average(loss / len(test_sampler), "avg_loss")
        accuracy = metric_average(correct / len(test_sampler), "avg_accuracy")
        if hvd.rank() == 0:
            print(f"Test set: Average loss: {loss:.4f}, Accuracy: {100.0 * accuracy:.2f}%", flush=True)
        return accuracy

    for epoch in range(1, args.epochs + 1):
        train(epoch)
        test()

    flat = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values() if p.is_floating_point()])
    every = hvd.allgather(flat.unsqueeze(0), name="final_parameters")
    same = all(torch.equal(every[0], every[r]) for r in range(hvd.size()))
    if hvd.rank() == 0:
        print(f"parameters identical on all {hvd.size()} ranks: {same}", flush=True)
    if args.save_params:
        os.makedirs(args.save_params, exist_ok=True)
        np.savez(os.path.join(args.save_params, f"rank{hvd.rank()}.npz"),
                 **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    hvd.shutdown()


if __name__ == "__main__":
    main()
