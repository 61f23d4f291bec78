"""A script written for torchrun: reads torchrun's environment, then init_process_group(BACKEND) and all_reduce.

Usage: python torchrun_script.py collective|gloo
Prints one line per rank, "TORCHRUN-ENV rank=... " with what it read, and "OK rank R" when the sum is right.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

backend = sys.argv[1]
if backend == "collective":
    import collective.torch  # noqa: F401  (registers the backend)

names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "GROUP_WORLD_SIZE",
         "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
seen = {k: os.environ.get(k) for k in names}
print("TORCHRUN-ENV " + " ".join(f"{k}={v}" for k, v in seen.items()), flush=True)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group(backend)  # torch's default init_method, env://
assert dist.get_rank() == rank and dist.get_world_size() == world, (dist.get_rank(), rank)
if backend == "collective":  # the node-local numbering agrees with collective's own
    assert dist.group.WORLD.communicator.local_rank == int(os.environ["LOCAL_RANK"])
t = torch.full((5,), float(rank + 1))
dist.all_reduce(t)
assert t.tolist() == [world * (world + 1) / 2] * 5, t
print(f"OK rank {rank} of {world} on {dist.get_backend()}", flush=True)
dist.destroy_process_group()
