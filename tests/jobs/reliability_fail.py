"""One failure scenario that must end the whole job (non-zero exit, a message naming the rank and op, no orphans).

Usage: mpiexec -n P python reliability_fail.py SCENARIO [--algorithm A] [--async] [--marker TOKEN]

Every rank runs a few good collectives, then rank 1 (the *victim*) misbehaves
while the others enter an allreduce with algorithm A:

  sigkill   the victim SIGKILLs itself in the middle of a large allreduce
  exit1     the victim calls os._exit(1) in the middle of a large allreduce
  raise     the victim dies of an uncaught exception (plain python, no -m mpi4py)
  sysexit   the victim calls sys.exit(0)
  nojoin    the victim never joins (sleeps for an hour)
  mismatch  every rank raises CollectiveMismatchError and nobody catches it
  midcall   the victim's allreduce fails on it alone after the check (MemoryError moving the data); it catches
            the error and calls again: that call raises at once (the communicator is broken), and the others,
            still in the first call, end the job at their deadline
  queued    as midcall, but the victim's calls are async and the second one was queued before the first failed:
            it raises at once too, and never stands in for the call the others are still in

``--marker`` is ignored: tests pass a unique token so they can look for orphans.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import numpy as np

import collective as col

ap = argparse.ArgumentParser()
ap.add_argument("scenario", choices=["sigkill", "exit1", "raise", "sysexit", "nojoin", "mismatch", "midcall", "queued"])
ap.add_argument("--algorithm", default="ring")
ap.add_argument("--async", dest="use_async", action="store_true", help="the waiting ranks use allreduce_async().wait()")
ap.add_argument("--marker", default="")
args = ap.parse_args()

comm = col.init()
R, P = comm.rank, comm.size
VICTIM = 1
alg = args.algorithm

for i in range(3):  # a little history for the flight recorder
    comm.allreduce(np.full(8, i, np.float32), algorithm=alg)
comm.barrier()
print(f"rank {R}: ready for scenario {args.scenario} with algorithm {alg} at {time.time():.3f}", flush=True)


def allreduce(x: np.ndarray) -> np.ndarray:
    if args.use_async:
        return comm.allreduce_async(x, algorithm=alg).wait()
    return comm.allreduce(x, algorithm=alg)


if args.scenario in ("sigkill", "exit1"):
    big = np.ones(1 << 20, np.float32)  # 4 MiB: the victim dies while the data is moving
    if R == VICTIM:
        def die() -> None:
            rec = comm.sequencer.recorder.current
            what = rec.describe() if rec is not None else "between ops"
            print(f"rank {R}: dying ({args.scenario}) during {what}", flush=True)
            if args.scenario == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(1)

        threading.Timer(0.3, die).start()
    while True:
        allreduce(big)

small, blocks = np.ones(8, np.float32), np.ones(2 * P, np.float32)
if args.scenario == "midcall":  # repeated calls that take the repeat paths (one shm phase, a kept plan) from now on
    for _ in range(3):
        comm.allreduce(small, algorithm="shm", out=small)
        comm.alltoall(blocks, algorithm="shm")
x = np.ones(1000, np.float32)
if args.scenario in ("midcall", "queued") and alg == "shm":
    x = np.ones(3 << 20, np.float32)  # 12 MiB: the copy-in path, three 4 MiB chunks, a phase each
if R != VICTIM:
    if args.scenario == "mismatch":
        allreduce(x)
    else:
        allreduce(x)
        print(f"rank {R}: FAIL the allreduce finished without rank {VICTIM}", flush=True)
        sys.exit(3)
elif args.scenario == "raise":
    raise RuntimeError("boom: an uncaught exception on purpose")
elif args.scenario == "sysexit":
    print(f"rank {R}: sys.exit(0) while the others wait", flush=True)
    sys.exit(0)
elif args.scenario == "nojoin":
    time.sleep(3600)
elif args.scenario == "mismatch":
    allreduce(np.ones(1001, np.float64))
elif args.scenario in ("midcall", "queued"):
    delay = 0.5 if args.scenario == "queued" else 0.0  # the second async call is queued before the first fails
    if alg == "shm":  # inside the data movement: at the phase after the first chunk's
        arena = comm.node_arena()
        phase = arena.phase

        def fail_once(*a, **kw):
            arena.phase = phase
            time.sleep(delay)
            raise MemoryError("injected: no memory for the result")
    else:  # after the check, before any data moves
        engine = comm.sequencer.engine
        execute = engine.execute

        def fail_once(c, first, seq):
            engine.execute = execute
            time.sleep(delay)
            raise MemoryError("injected: no memory for the result")
    if alg == "shm":
        arena.phase = fail_once
    else:
        engine.execute = fail_once
    if args.scenario == "queued":
        x2 = x * 2
        first, second = comm.allreduce_async(x, algorithm=alg), comm.allreduce_async(x2, algorithm=alg)
        try:
            first.wait()
        except MemoryError as exc:
            print(f"rank {R}: the first call raised MemoryError ({exc})", flush=True)
        t0 = time.monotonic()
        try:
            got = second.wait()
            print(f"rank {R}: FAIL the queued call ran on the broken communicator: {np.unique(got)[:4]}", flush=True)
        except col.CollectiveError as exc:
            print(f"rank {R}: the queued call raised {type(exc).__name__} at once ({time.monotonic() - t0:.3f} s): "
                  f"{exc}; broken: {comm.broken is not None}", flush=True)
            time.sleep(3600)  # the others end the job at their deadline
        sys.exit(3)
    try:
        allreduce(x)
    except MemoryError as exc:
        print(f"rank {R}: the first call raised MemoryError ({exc})", flush=True)
    t0 = time.monotonic()
    try:
        allreduce(x * 2)
    except col.CollectiveError as exc:
        print(f"rank {R}: the next call raised {type(exc).__name__} at once ({time.monotonic() - t0:.3f} s): "
              f"{exc}; broken: {comm.broken is not None}", flush=True)
        for what, call in (("the repeated small allreduce", lambda: comm.allreduce(small, algorithm="shm", out=small)),
                           ("the repeated alltoall", lambda: comm.alltoall(blocks, algorithm="shm"))):
            try:
                call()
                print(f"rank {R}: FAIL {what} ran on the broken communicator", flush=True)
            except col.CollectiveError:
                print(f"rank {R}: {what} raised at once", flush=True)
        time.sleep(3600)  # the others end the job at their deadline
print(f"rank {R}: FAIL reached the end", flush=True)
sys.exit(3)
