"""Images per second of a CNN trained on fixed random data, written against Horovod's PyTorch API.

The script uses Horovod's calls and nothing else of collective: with
``import horovod.torch as hvd`` it runs on Horovod, with the line below on
collective.

Run:  collective-run -np 2 python examples/horovod_synthetic_benchmark.py --model resnet18 --batch-size 8
      (a small ResNet of this file when torchvision is not installed, or with ``--model small_resnet``;
      ``--image-size 64`` and fewer batches for a quick look)

Every rank trains the same model on its own random batch; hvd.DistributedOptimizer
averages the gradients, hvd.SyncBatchNorm computes the batch statistics over
every rank's batch. Rank 0 prints images/s per rank and in total.
"""
from __future__ import annotations

import argparse
import timeit

import numpy as np
import torch
import torch.nn.functional as F

import collective.horovod.torch as hvd  # with Horovod: import horovod.torch as hvd


class BasicBlock(torch.nn.Module):
    """Two 3x3 convolutions with a shortcut (a 1x1 convolution where the shape changes), as in ResNet-18."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: type) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(torch.nn.Module):
    """A ResNet of four stages, one block each, 16 to 128 channels (about 0.44 M parameters with 1000 classes).

    It takes ``norm_layer`` like torchvision's models, so the benchmark runs the
    same way with or without torchvision.
    """

    def __init__(self, num_classes: int = 1000, norm_layer: type = torch.nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1, bias=False), norm_layer(16),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        widths = [16, 32, 64, 128]
        self.stages = torch.nn.Sequential(*[BasicBlock(widths[max(i - 1, 0)], w, 1 if i == 0 else 2, norm_layer)
                                            for i, w in enumerate(widths)])
        self.fc = torch.nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, norm_layer: type) -> tuple[str, torch.nn.Module]:
    """(the model's name, the model): ``small_resnet``, any torchvision model that takes ``norm_layer``, or ``auto``.

    ``auto`` is torchvision's resnet18 when torchvision can be imported, else ``small_resnet``.
    """
    if name == "auto":
        try:
            import torchvision  # noqa: F401
        except ImportError:
            name = "small_resnet"
        else:
            name = "resnet18"
    if name == "small_resnet":
        return name, SmallResNet(norm_layer=norm_layer)
    try:
        from torchvision import models
    except ImportError as exc:
        raise SystemExit(f"--model {name} needs torchvision ({exc}); --model small_resnet runs without it") from None
    if not hasattr(models, name):
        raise SystemExit(f"--model {name}: torchvision.models has no such model")
    return name, getattr(models, name)(norm_layer=norm_layer)


def main() -> None:
    """Parse options, benchmark, print the figures on rank 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--fp16-allreduce", action="store_true", help="send gradients as float16 (hvd.Compression.fp16)")
    ap.add_argument("--model", default="auto",
                    help="small_resnet, a torchvision model taking norm_layer (resnet18, resnet50, mobilenet_v2, ...), "
                         "or auto (resnet18 with torchvision, else small_resnet)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    ap.add_argument("--image-size", type=int, default=224, help="height and width of the random images")
    ap.add_argument("--num-warmup-batches", type=int, default=10, help="steps before timing starts")
    ap.add_argument("--num-batches-per-iter", type=int, default=10, help="steps per timed iteration")
    ap.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    ap.add_argument("--num-threads", type=int, default=0, help="torch threads per rank (0: torch's default)")
    ap.add_argument("--no-cuda", action="store_true", help="train on the CPU even when a GPU is there")
    args = ap.parse_args()
    cuda = not args.no_cuda and torch.cuda.is_available()

    hvd.init()
    if cuda:
        torch.cuda.set_device(hvd.local_rank())  # one GPU per rank of the node
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    name, model = build_model(args.model, hvd.SyncBatchNorm)
    if cuda:
        model.cuda()
    # Gradients are averaged over hvd.size() ranks: the global batch grew by that much, so does the step.
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average)
    # Every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    data = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    target = torch.randint(0, 1000, (args.batch_size,))
    if cuda:
        data, target = data.cuda(), target.cuda()

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(data), target).backward()
        optimizer.step()

    def log(text: str) -> None:
        if hvd.rank() == 0:
            print(text, flush=True)

    device = "GPU" if cuda else "CPU"
    log(f"Model: {name}")
    log(f"Batch size: {args.batch_size}, image size: {args.image_size}")
    log(f"Number of {device}s: {hvd.size()}")
    log("Running warmup...")
    timeit.timeit(step, number=args.num_warmup_batches)
    log("Running benchmark...")
    rates = []
    for i in range(args.num_iters):
        seconds = timeit.timeit(step, number=args.num_batches_per_iter)
        rates.append(args.batch_size * args.num_batches_per_iter / seconds)
        log(f"Iter #{i}: {rates[-1]:.1f} img/sec per {device}")
    mean, conf = float(np.mean(rates)), 1.96 * float(np.std(rates))
    log(f"Img/sec per {device}: {mean:.1f} +-{conf:.1f}")
    log(f"Total img/sec on {hvd.size()} {device}(s): {hvd.size() * mean:.1f} +-{hvd.size() * conf:.1f}")


if __name__ == "__main__":
    main()
