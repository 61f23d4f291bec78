"""Steady-state calls allocate nothing: traced memory and RSS stay flat over 1000 calls of every algorithm."""
from __future__ import annotations

import resource
import tracemalloc

import numpy as np

import collective as col
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
CALLS = 1000
nbytes = 256 << 10
x = np.ones(nbytes // 4, np.float32)
y = np.empty_like(x)
g = comm.alloc(x.size, np.float32)

for alg in ["native", "ring", "tree", "star", "shm", "auto", "window"]:
    def case() -> None:
        def call() -> None:
            if alg == "window":
                g[:] = 1
                comm.allreduce(g, out=g, algorithm="shm")
            else:
                comm.allreduce(x, out=y, algorithm=alg)
        for _ in range(20):  # warm-up: plans compiled, scratch grown, arenas created
            call()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(CALLS):
            call()
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # A single per-call buffer would show as >= 256 KiB of peak; allow small Python objects.
        assert peak - base < 32 << 10, f"{alg}: traced peak grew by {(peak - base) >> 10} KiB over {CALLS} calls"
        assert cur - base < 16 << 10, f"{alg}: traced memory grew by {(cur - base) >> 10} KiB over {CALLS} calls"
        assert rss1 - rss0 < 4 << 10, f"{alg}: max RSS grew by {rss1 - rss0} KiB over {CALLS} calls"
        if R == 0:
            print(f"{alg}: {CALLS} calls of {nbytes >> 10} KiB: traced peak +{(peak - base) / 1024:.1f} KiB, "
                  f"current +{(cur - base) / 1024:.1f} KiB, max RSS +{rss1 - rss0} KiB", flush=True)
    cases.run(f"memory flat: {alg}", case)
cases.finish()
