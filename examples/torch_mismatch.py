"""A bug every rank must agree on, side by side: gloo against the backend "collective".

Each rank makes one torch.distributed call whose arguments differ between
ranks, as a bug in a training script does, and prints what happened to it:
the result it got, or the error it raised and after how long.

    collective-run -n 2 -- python examples/torch_mismatch.py --backend gloo --case size
    collective-run -n 2 -- python examples/torch_mismatch.py --backend collective --case size

Cases: ``size`` (all_reduce of 4 elements on rank 0, 6 on the others),
``dtype`` (float32 on rank 0, float64 elsewhere), ``op`` (SUM on rank 0, MAX
elsewhere), ``collective`` (rank 0 calls all_reduce, the others broadcast).
Both groups get a 10 s timeout, so a call that waits forever ends (gloo
needs torchrun's environment, which collective-run sets after ``--``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

CASES = ("size", "dtype", "op", "collective")


def call(case: str, rank: int) -> torch.Tensor:
    """The call of ``case`` as rank ``rank`` makes it; the tensor it reduced."""
    first = rank == 0
    if case == "size":
        t = torch.ones(4 if first else 6)
        dist.all_reduce(t)
    elif case == "dtype":
        t = torch.ones(4, dtype=torch.float32 if first else torch.float64)
        dist.all_reduce(t)
    elif case == "op":
        t = torch.full((4,), float(rank + 1))
        dist.all_reduce(t, op=dist.ReduceOp.SUM if first else dist.ReduceOp.MAX)
    else:
        t = torch.full((4,), float(rank + 1))
        if first:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, src=0)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "collective"), required=True)
    p.add_argument("--case", choices=(*CASES, "all"), required=True,
                   help="all: every case in turn (a group of gloo cannot go on after the first)")
    a = p.parse_args()
    if a.backend == "collective":
        import collective.torch  # noqa: F401  (registers the backend)
    torch.set_num_threads(1)
    # Under collective-run (or torchrun) env:// finds everything it needs in the environment.
    dist.init_process_group(a.backend, timeout=datetime.timedelta(seconds=10))
    rank = dist.get_rank()
    for case in CASES if a.case == "all" else (a.case,):
        t0 = time.monotonic()
        try:
            t = call(case, rank)
        except Exception as exc:  # noqa: BLE001 - what happened is the point of the demo
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"rank {rank}: {case}: {a.backend} raised {type(exc).__name__} after "
                  f"{time.monotonic() - t0:.1f} s: {first[:400]}", flush=True)
            if a.backend == "gloo":
                os._exit(3)  # the group is unusable after a failed collective: leave without its teardown
            continue  # collective sent no data: the group goes on
        print(f"rank {rank}: {case}: {a.backend} returned {t.tolist()} ({t.dtype}) after "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
