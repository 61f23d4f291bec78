"""torch's default group on gloo, a new_group on backend "collective": made of torch's ranks, which must be MPI's.

Usage: python torch_gloo_world.py PORT same|reversed
(``reversed``: the gloo group numbers the processes opposite to MPI.) Prints "OK" per rank when the group's
broadcast and all_reduce are right, "REFUSED" with the error when new_group refuses.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

import collective as col
import collective.torch  # noqa: F401  (registers the backend)

port, mode = sys.argv[1], sys.argv[2]
r, n = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
me = r if mode == "same" else n - 1 - r
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=me, world_size=n,
                        timeout=datetime.timedelta(seconds=60))
try:
    g = dist.new_group(backend="collective")
except col.CollectiveValueError as exc:
    print(f"REFUSED {me}: {exc}", flush=True)
else:
    t = torch.full((2,), float(me))
    dist.broadcast(t, src=n - 1, group=g)
    assert t.tolist() == [n - 1.0] * 2, t
    t = torch.full((2,), float(me + 1))
    dist.all_reduce(t, group=g)
    assert t.tolist() == [n * (n + 1) / 2] * 2, t
    print(f"OK {me}", flush=True)
dist.destroy_process_group()
