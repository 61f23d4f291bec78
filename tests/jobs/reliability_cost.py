"""Cost of the per-call fingerprint check: one 4 KiB allreduce with COLLECTIVE_CHECK on vs off, interleaved in one run.

Usage: mpiexec -n P python reliability_cost.py [--iters N] [--reps R] [--bytes B]
Prints, on rank 0, the median time per call of each variant and their difference.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--iters", type=int, default=500)
ap.add_argument("--reps", type=int, default=41)
ap.add_argument("--bytes", type=int, default=4096)
ap.add_argument("--algorithms", default="native,ring")
args = ap.parse_args()

os.environ["COLLECTIVE_CHECK"] = "1"
import collective as col  # noqa: E402
from collective.ops import OPS  # noqa: E402
from collective.threads import thread_tag  # noqa: E402

on = col.Communicator()
os.environ["COLLECTIVE_CHECK"] = "0"
off = col.Communicator()
assert on.checking or on.size == 1
assert not off.checking
R, P = on.rank, on.size
x = np.ones(args.bytes // 4, np.float32)
out = np.empty_like(x)
mpi = on.mpi_comm


def timed(fn) -> float:
    mpi.Barrier()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn()
    return (time.perf_counter() - t0) / args.iters * 1e6


def report(label: str, samples: dict[str, list[float]]) -> None:
    # The machine is shared: the fastest round is the least disturbed one; the median shows the spread.
    if R == 0:
        a, b = list(samples)
        lo = {k: float(np.min(v)) for k, v in samples.items()}
        med = {k: float(np.median(v)) for k, v in samples.items()}
        print(f"P={P} {label}: {a} {lo[a]:.2f} us, {b} {lo[b]:.2f} us (fastest rounds), difference {lo[a] - lo[b]:+.2f} us; "
              f"medians {med[a]:.2f} vs {med[b]:.2f} us", flush=True)


for alg in args.algorithms.split(","):
    s: dict[str, list[float]] = {"check on": [], "check off": []}
    for _ in range(args.reps):  # interleaved, so drift hits both alike
        s["check on"].append(timed(lambda: on.allreduce(x, out=out, algorithm=alg)))
        s["check off"].append(timed(lambda: off.allreduce(x, out=out, algorithm=alg)))
    report(f"allreduce {args.bytes} B {alg}", s)

if P > 1:
    fp = on.sequencer.check.fingerprints
    seq = [0]
    dt = np.dtype(np.float32)
    tag = thread_tag()

    def one_check() -> None:
        seq[0] += 1
        fp.check(seq[0], "allreduce", "native", OPS["sum"], dt, (1024,), None, thread=tag)

    two = np.zeros(2, np.int64)
    two_r = np.zeros(2, np.int64)
    from mpi4py import MPI
    s = {"check alone": [], "raw Allreduce of 2 int64": []}
    for _ in range(args.reps):
        s["check alone"].append(timed(one_check))
        s["raw Allreduce of 2 int64"].append(timed(lambda: mpi.Allreduce([two, MPI.INT64_T], [two_r, MPI.INT64_T], MPI.MAX)))
    report("the check itself", s)
on.close()
off.close()
