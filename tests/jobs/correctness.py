"""Every algorithm x collective x op x a spread of dtypes x sizes x roots, checked exactly, on one mpiexec job.

Inputs are small integers chosen per (rank, element), so every summation order
gives the exact answer and each rank can compute the expected result itself.
Usage: mpiexec -n P python correctness.py [--large] [--small-only]
"""
from __future__ import annotations

import argparse
import zlib

import numpy as np

import collective as col
from collective.bench.core import _reduce_all as exact_reduction
from collective.bench.core import values  # small integers whose reduction is exact in every dtype and order
from harness import Cases

ap = argparse.ArgumentParser()
ap.add_argument("--large", action="store_true", help="also 1 MiB and 16 MiB float32 for every algorithm/collective")
ap.add_argument("--algorithms", default="native,ring,tree,star,hierarchical,pipeline,shm,auto")
ap.add_argument("--dtypes", default="int8,uint8,int32,int64,uint64,float16,float32,float64,complex64")
ap.add_argument("--bitwise-sizes", default="P+1,1009,65537",
                help="sizes of the bitwise-identity cases (a job forcing tiny segments leaves out the largest)")
args = ap.parse_args()
if "bfloat16" in args.dtypes:
    import ml_dtypes  # noqa: F401  (registers the bfloat16 dtype name with NumPy)

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
ALGS = args.algorithms.split(",")
DTYPES = [np.dtype(d) for d in args.dtypes.split(",")]
OPS = ["sum", "avg", "prod", "min", "max"]


def reduce_all(n: int, dtype: np.dtype, op: str) -> np.ndarray:
    """The exact reduction over all P ranks' inputs (``values``: small integers, exact in any order)."""
    return exact_reduction(n, dtype, op, P)


def same(got, want, what: str) -> None:
    if got is None or want is None:
        if got is not want:
            raise AssertionError(f"{what}: got {type(got).__name__}, expected {type(want).__name__}")
        return
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{what}: got shape {got.shape} {got.dtype}, expected {want.shape} {want.dtype}")
    # Values, not bytes: complex products may differ in the sign of a zero imaginary part with
    # the order of multiplication. Bitwise identity across ranks is checked separately.
    if not np.array_equal(got, want):
        bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        k = int(bad[0]) if bad.size else 0
        raise AssertionError(f"{what}: element {k} is {got.reshape(-1)[k]}, expected {want.reshape(-1)[k]} "
                             f"({bad.size} wrong of {got.size})")


def ops_for(dtype: np.dtype) -> list[str]:
    return [o for o in OPS if not (dtype.kind == "c" and o in ("min", "max"))]


def check_collective(alg: str, name: str, n: int, dtype: np.dtype, op: str, root: int) -> None:
    x = values(R, n, dtype, op)
    x0 = x.copy()
    kw = {"algorithm": alg}
    if name == "allreduce":
        want = reduce_all(n, dtype, op)
        y = comm.allreduce(x, op=op, **kw)
        same(x, x0, "input modified")
        same(y, want, "out-of-place")
        z = x.copy()
        r = comm.allreduce(z, op=op, out=z, **kw)
        assert r is z, "in-place call must return out"
        same(z, y, "in-place vs out-of-place")
    elif name == "reduce":
        want = reduce_all(n, dtype, op) if R == root else None
        y = comm.reduce(x, root=root, op=op, **kw)
        same(x, x0, "input modified")
        same(y, want, "out-of-place")
        z = x.copy()
        comm.reduce(z, root=root, op=op, out=z, **kw)
        if R == root:
            same(z, y, "in-place vs out-of-place")
        else:
            same(z, x0, "non-root out was written")
    elif name == "broadcast":
        want = values(root, n, dtype, op)
        y = comm.broadcast(x, root=root, **kw)
        same(x, x0, "input modified")
        same(y, want, "out-of-place")
        z = x.copy()
        comm.broadcast(z, root=root, out=z, **kw)
        same(z, want, "in-place")
    elif name == "reduce_scatter":
        full = reduce_all(n, dtype, op)
        parts = np.array_split(full, P)
        y = comm.reduce_scatter(x, op=op, **kw)
        same(x, x0, "input modified")
        same(y, parts[R], "out-of-place")
        o = np.empty_like(parts[R])
        comm.reduce_scatter(x, op=op, out=o, **kw)
        same(o, y, "with out")
    elif name == "allgather":
        want = np.concatenate([values(r, n, dtype, op) for r in range(P)])
        y = comm.allgather(x, **kw)
        same(x, x0, "input modified")
        same(y, want, "out-of-place")
        o = np.empty_like(want)
        comm.allgather(x, out=o, **kw)
        same(o, want, "with out")


def sizes() -> list[int]:
    return sorted({0, 1, max(P - 1, 0), P, P + 1, 97, 1009})


# 1. The full cross product on small sizes (roots: every root for one dtype/op, the last rank otherwise).
for alg in ALGS:
    for name in col.COLLECTIVE_NAMES:
        for dtype in DTYPES:
            for op in (ops_for(dtype) if name in ("allreduce", "reduce", "reduce_scatter") else ["sum"]):
                for n in sizes():
                    roots = [P - 1] if name in ("reduce", "broadcast") else [0]
                    if name in ("reduce", "broadcast") and dtype == np.int32 and op == "sum":
                        roots = list(range(P))
                    for root in roots:
                        cases.run(f"{alg} {name} {dtype} {op} n={n} root={root}",
                                  lambda: check_collective(alg, name, n, dtype, op, root))

# 1b. bool moves (broadcast, allgather) by every algorithm; it is never reduced (see 5), and a rank passing bool
# where another passes uint8 (the same bytes) is a mismatch on every rank. A byte a value, as int8 and uint8 above.
BOOL = np.dtype(bool)
for alg in ALGS:
    for n in (0, 1, P + 1, 1009):
        cases.run(f"{alg} broadcast bool n={n}", lambda: check_collective(alg, "broadcast", n, BOOL, "sum", P - 1))
        cases.run(f"{alg} allgather bool n={n}", lambda: check_collective(alg, "allgather", n, BOOL, "sum", 0))


def bool_against_uint8() -> None:
    if P == 1:
        return
    x = np.ones(7, bool if R == 0 else np.uint8)
    for fn in (lambda: comm.broadcast(x, root=0), lambda: comm.allgather(x)):
        try:
            fn()
        except col.CollectiveMismatchError as exc:
            assert "bool" in str(exc) and "uint8" in str(exc), str(exc)
        else:
            raise AssertionError("bool on rank 0 against uint8 elsewhere did not raise")
    same(comm.allreduce(np.ones(4, np.int32)), np.full(4, P, np.int32), "after the mismatch")


cases.run("bool against uint8", bool_against_uint8)

# 2. Shapes: 2-D and 0-d inputs, non-contiguous input, the result shape.
for alg in ALGS:
    def shapes_case() -> None:
        x = (np.arange(24, dtype=np.float64).reshape(4, 6) + R)
        y = comm.allreduce(x, algorithm=alg)
        same(y, np.arange(24, dtype=np.float64).reshape(4, 6) * P + P * (P - 1) / 2, "2-D")
        s = comm.allreduce(np.float32(R), algorithm=alg)
        assert s.shape == () and float(s) == P * (P - 1) / 2, f"0-d: {s!r}"
        nc = x[:, ::2]
        y2 = comm.allreduce(nc, algorithm=alg)
        same(y2, y[:, ::2].copy(), "non-contiguous input")
        g = comm.allgather(np.float64(R), algorithm=alg)
        same(g, np.arange(P, dtype=np.float64), "0-d allgather")
        rows = np.ones((2 * P + 1, 3), np.int32)
        rs = comm.reduce_scatter(rows, algorithm=alg)
        want_rows = len(np.array_split(np.arange(2 * P + 1), P)[R])
        assert rs.shape == (want_rows, 3) and (rs == P).all(), f"reduce_scatter rows: {rs.shape}"
    cases.run(f"{alg} shapes", shapes_case)

# 3. Bitwise identical on every rank, with random floats (summation order matters here).
for alg in ALGS:
    for dtype in (np.float32, np.float64, np.float16):
        for n in [P + 1 if v == "P+1" else int(v) for v in args.bitwise_sizes.split(",")]:
            def bitwise_case() -> None:
                rng = np.random.default_rng(1000 + R)
                x = rng.standard_normal(n).astype(dtype)
                y = comm.allreduce(x, algorithm=alg)
                crc = np.array([zlib.crc32(y.tobytes())], np.int64)
                allc = comm.allgather(crc, algorithm="native")
                assert (allc == allc[0]).all(), f"results differ between ranks: crc32 per rank {allc.tolist()}"
                z = x.copy()
                comm.allreduce(z, out=z, algorithm=alg)
                same(z, y, "in-place vs out-of-place (random)")
            cases.run(f"{alg} bitwise {np.dtype(dtype)} n={n}", bitwise_case)

# 4. Async forms and the module-level calls.
for alg in ALGS:
    def async_case() -> None:
        xs = [values(R, n, np.dtype(np.float32), "sum") for n in (5, 1000, 40000)]
        ws = [comm.allreduce_async(x, out=x, algorithm=alg) for x in xs]
        sync = comm.allreduce(values(R, 33, np.dtype(np.int64), "sum"), algorithm=alg)  # queued behind the async ones
        same(sync, reduce_all(33, np.dtype(np.int64), "sum"), "sync after async")
        for w, x, n in zip(ws, xs, (5, 1000, 40000)):
            r = w.wait()
            assert w.done()
            assert r is x
            same(x, reduce_all(n, np.dtype(np.float32), "sum"), f"async n={n}")
        b = comm.broadcast_async(np.full(7, R, np.int32), root=P - 1, algorithm=alg).wait()
        same(b, np.full(7, P - 1, np.int32), "broadcast_async")
        rd = comm.reduce_async(np.ones(9, np.int64), root=0, algorithm=alg).wait()
        same(rd, np.full(9, P, np.int64) if R == 0 else None, "reduce_async")
        rs = comm.reduce_scatter_async(np.ones(P * 2, np.int64), algorithm=alg).wait()
        same(rs, np.full(2, P, np.int64), "reduce_scatter_async")
        ag = comm.allgather_async(np.array([R]), algorithm=alg).wait()
        same(ag, np.arange(P), "allgather_async")
        comm.barrier()
        m = col.allreduce(np.ones(3, np.int32), algorithm=alg)
        same(m, np.full(3, P, np.int32), "module-level allreduce")
    cases.run(f"{alg} async", async_case)

# 5. Bad arguments raise on every rank before any message: no hang, the job goes on.
def bad_args_case() -> None:
    x = np.ones(10, np.float32)
    expect = [
        (lambda: comm.allreduce(x, op="median"), col.CollectiveValueError, "unknown op"),
        (lambda: comm.allreduce(x, algorithm="bogus"), col.CollectiveValueError, "unknown algorithm"),
        (lambda: comm.allreduce(np.ones(3, bool)), col.CollectiveTypeError, "bool"),
        (lambda: comm.allreduce(np.array([object()] * 3)), col.CollectiveTypeError, "object"),
        (lambda: comm.broadcast(x, root=P), col.CollectiveValueError, "root"),
        (lambda: comm.reduce(x, root=-1), col.CollectiveValueError, "root"),
        (lambda: comm.allreduce(x, out=np.ones(20, np.float32)[::2]), col.CollectiveValueError, "contiguous"),
        (lambda: comm.allreduce(x, out=np.ones(11, np.float32)), col.CollectiveValueError, "shape"),
        (lambda: comm.allreduce(x, out=np.ones(10, np.float64)), col.CollectiveTypeError, "dtype"),
        (lambda: comm.allreduce(np.ones(3, np.complex64), op="max"), col.CollectiveTypeError, "complex"),
        (lambda: comm.allreduce("not an array"), col.CollectiveTypeError, "str"),
    ]
    ro = np.ones(10, np.float32)
    ro.flags.writeable = False
    expect.append((lambda: comm.allreduce(x, out=ro), col.CollectiveValueError, "read-only"))
    for fn, cls, word in expect:
        try:
            fn()
        except cls as exc:
            msg = str(exc)
            assert word in msg, f"message {msg!r} lacks {word!r}"
            assert f"rank {R}" in msg, f"message {msg!r} lacks the rank"
        else:
            raise AssertionError(f"no {cls.__name__} for case {word!r}")
    # And the communicator still works afterwards.
    same(comm.allreduce(np.ones(4, np.int32)), np.full(4, P, np.int32), "after bad args")
cases.run("bad arguments", bad_args_case)

# 6. Large messages: 1 MiB and 16 MiB of float32 for every algorithm and collective.
if args.large:
    big = {n: values(R, n, np.dtype(np.float32), "sum") for n in (1 << 18, 1 << 22)}
    # The expected results of these sizes are computed once: at 16 MiB on P oversubscribed ranks, recomputing
    # them in every case would cost more than the collectives under test.
    big_sum = {n: reduce_all(n, np.dtype(np.float32), "sum") for n in big}
    big_rank = {n: [values(r, n, np.dtype(np.float32), "sum") for r in range(P)] for n in big}
    for alg in ALGS:
        for name in col.COLLECTIVE_NAMES:
            for n in big:
                def large_case() -> None:
                    x = big[n]
                    if name == "allreduce":
                        want = big_sum[n]
                        same(comm.allreduce(x, algorithm=alg), want, "out-of-place")
                        z = x.copy()
                        comm.allreduce(z, out=z, algorithm=alg)
                        same(z, want, "in-place")
                    elif name == "reduce_scatter":
                        same(comm.reduce_scatter(x, algorithm=alg), np.array_split(big_sum[n], P)[R], "rs")
                    elif name == "allgather":
                        y = comm.allgather(x[: n // P], algorithm=alg)
                        same(y, np.concatenate([v[: n // P] for v in big_rank[n]]), "ag")
                    elif name == "reduce":
                        y = comm.reduce(x, root=P - 1, algorithm=alg)
                        same(y, big_sum[n] if R == P - 1 else None, "reduce")
                    else:
                        same(comm.broadcast(x, root=P // 2, algorithm=alg), big_rank[n][P // 2], "bcast")
                cases.run(f"{alg} {name} float32 n={n} (large)", large_case)

cases.finish()
