"""comm.alloc arrays: the in-window allreduce, mixed with ordinary shm calls, several chunk counts and dtypes."""
from __future__ import annotations

import numpy as np

import collective as col
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)

for dtype in (np.float32, np.int64, np.float16):
    for n in (0, 1, P + 1, 1000, 300_001):
        def case() -> None:
            g = comm.alloc(n, dtype)
            assert g.shape == (n,) and g.dtype == dtype
            for rep in range(3):
                g[:] = (np.arange(n) % 7 + R + rep).astype(dtype)
                y = comm.allreduce(g, out=g, algorithm="shm")
                assert y is g
                want = (P * (np.arange(n) % 7 + rep) + P * (P - 1) // 2).astype(dtype)
                assert np.array_equal(g, want), f"rep {rep}: {g[:5]} vs {want[:5]}"
                # an ordinary shm call in between keeps tickets aligned
                z = comm.allreduce(np.full(3, R, dtype), algorithm="shm")
                assert np.array_equal(z, np.full(3, P * (P - 1) // 2, dtype))
            a = comm.allreduce(g, op="avg", algorithm="auto")  # out-of-place on an alloc'd array
            assert a.shape == g.shape
        cases.run(f"alloc {np.dtype(dtype)} n={n}", case)

def twod() -> None:
    m = comm.alloc((4, 5), np.float64)
    m[:] = R
    comm.allreduce(m, out=m, algorithm="shm")
    assert (m == P * (P - 1) / 2).all()
cases.run("alloc 2-D", twod)
cases.finish()
