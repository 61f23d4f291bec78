"""Train a PyTorch MLP data-parallel with collective's DDP adapter.

Run: collective-run -n 2 python examples/train_torch.py [--epochs 8] [--batch 64] [--shard]

Every rank builds the same model, wraps it in trainer.torch.DistributedDataParallel
(which gives every rank rank 0's parameters), and takes its own slice of each
global batch; backward averages the gradients over the ranks, overlapped with
backward, so the ranks stay bitwise identical. Data: scikit-learn's bundled
8x8 digits (nothing is downloaded), or a synthetic task without scikit-learn.
"""
from __future__ import annotations

import argparse
import time
import zlib

import numpy as np
import torch

import collective as col
from collective.trainer.torch import DistributedDataParallel


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(train x, train y, test x, test y, classes), the same on every rank."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    except ImportError:  # a synthetic task: the class is the argmax of a fixed linear map
        g = np.random.default_rng(seed)
        x = g.standard_normal((2000, 64)).astype(np.float32)
        y = (x @ g.standard_normal((64, 10))).argmax(1).astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    cut = len(x) * 4 // 5
    t = torch.from_numpy
    return t(x[:cut]), t(y[:cut]), t(x[cut:]), t(y[cut:]), int(y.max()) + 1


def main() -> None:
    """Parse options, train, and print per-epoch loss and test accuracy on rank 0."""
    ap = argparse.ArgumentParser(description="data-parallel PyTorch training over collective")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--shard", action="store_true",
                    help="model.shard_optimizer: one copy of the parameters per node, each rank updates its share")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    comm = col.init()
    P, R = comm.size, comm.rank
    xtr, ytr, xte, yte, classes = load_data(args.seed)
    if args.batch % P:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of ranks ({P})")
    per_rank = args.batch // P

    torch.manual_seed(args.seed + R)  # different on purpose: the wrapper broadcasts rank 0's parameters
    net = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, classes))
    model = DistributedDataParallel(net, comm)
    if args.shard:
        opt = model.shard_optimizer(torch.optim.SGD, lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    if R == 0:
        print(f"{P} ranks, {len(xtr)} training samples, global batch {args.batch}, buckets "
              f"{[round(b / 1e6, 2) for b in model.bucket_sizes]} MB", flush=True)

    steps = len(xtr) // args.batch
    for epoch in range(args.epochs):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        t0, total = time.perf_counter(), 0.0
        model.train()
        for s in range(steps):
            idx = order[s * args.batch + R * per_rank:s * args.batch + (R + 1) * per_rank]  # this rank's slice
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()  # returns once the gradients are averaged over the ranks
            opt.step()
            total += loss.item()
        mean_loss = float(comm.allreduce(torch.tensor([total / steps]), op="avg")[0])
        model.eval()
        with torch.no_grad():
            acc = float((model(xte).argmax(1) == yte).float().mean())
        if R == 0:
            print(f"epoch {epoch + 1}: loss {mean_loss:.4f}  test accuracy {acc:.3f}  "
                  f"({(time.perf_counter() - t0) / steps * 1e3:.1f} ms/step)", flush=True)

    crc = 0
    for p in model.parameters():
        crc = zlib.crc32(p.detach().numpy().tobytes(), crc)
    every = comm.allgather(np.array([crc], np.int64))
    same = len(set(every.tolist())) == 1
    if R == 0:
        print(f"parameters identical on all {P} ranks: {same}", flush=True)
    if not same:
        raise SystemExit(f"rank {R}: parameters differ across ranks: {every.tolist()}")


if __name__ == "__main__":
    main()
