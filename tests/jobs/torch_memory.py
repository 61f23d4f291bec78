"""The torch wrapper's malloc setting: a step's fresh gradients must not fault their pages in again every step.

Usage: mpiexec -n 2 python torch_memory.py KEEP   (KEEP 1: the default, 0: glibc's defaults)
Prints the minor page faults of each backward; run in a process of its own, since malloc settings are process-wide.
"""
from __future__ import annotations

import resource
import sys

import torch

import collective as col
from collective.trainer.torch import DistributedDataParallel

torch.set_num_threads(1)
comm = col.init()
keep = sys.argv[1] == "1"
torch.manual_seed(0)
sizes = (784, 2048, 2048, 2048, 10)  # the benchmark's 40 MB model: three 16 MB gradients
layers: list[torch.nn.Module] = []
for a, b in zip(sizes[:-1], sizes[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
model = DistributedDataParallel(torch.nn.Sequential(*layers[:-1]), comm, keep_memory=keep)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
g = torch.Generator().manual_seed(1 + comm.rank)
x, y = torch.randn(64, sizes[0], generator=g), torch.randint(0, sizes[-1], (64,), generator=g)
faults = []
for step in range(12):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss.backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    opt.step()
print(f"rank {comm.rank} keep={int(keep)} FAULTS {' '.join(map(str, faults))}", flush=True)
