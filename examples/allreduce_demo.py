"""Every algorithm's allreduce on this job: result check and time per call. Run: collective-run -n 4 python examples/allreduce_demo.py"""
from __future__ import annotations

import time

import numpy as np

import collective as col

comm = col.init()
P, R = comm.size, comm.rank
if R == 0:
    print(f"{comm!r}\n{'algorithm':>12} {'bytes':>10} {'us/call':>10}  check")
for nbytes in (4 << 10, 1 << 20, 16 << 20):
    n = nbytes // 4
    x = np.full(n, R + 1, np.float32)
    want = P * (P + 1) / 2
    for alg in col.ALGORITHMS:
        y = comm.allreduce(x, algorithm=alg)  # warm-up, and the result to check
        ok = bool((y == want).all())
        comm.barrier()
        reps = 20 if nbytes < (1 << 20) else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            comm.allreduce(x, algorithm=alg, out=y)
        dt = (time.perf_counter() - t0) / reps
        oks = comm.allgather(np.array([ok]).astype(np.uint8))
        if R == 0:
            print(f"{alg:>12} {nbytes:>10} {dt * 1e6:>10.1f}  {'ok' if oks.all() else 'WRONG'}", flush=True)
