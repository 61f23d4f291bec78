"""comm.alloc arrays: the in-window allreduce (256 KiB and up) and the copy-in path below it, mixed with ordinary shm calls."""
from __future__ import annotations

import numpy as np

import collective as col
from collective.shm import WINDOW_MIN_BYTES as _WINDOW_MIN_BYTES
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)

for dtype in (np.float32, np.int64, np.float16):
    for n in (0, 1, P + 1, 1000, 16383, 16384, 300_001):
        def case() -> None:
            g = comm.alloc(n, dtype)
            assert g.shape == (n,) and g.dtype == dtype
            for rep in range(3):
                g[:] = (np.arange(n) % 7 + R + rep).astype(dtype)
                y = comm.allreduce(g, out=g, algorithm="shm")
                assert y is g
                want = (P * (np.arange(n) % 7 + rep) + P * (P - 1) // 2).astype(dtype)
                assert np.array_equal(g, want), f"rep {rep}: {g[:5]} vs {want[:5]}"
                # an ordinary shm call in between: the two paths share the arena's regions and counters
                z = comm.allreduce(np.full(3, R, dtype), algorithm="shm")
                assert np.array_equal(z, np.full(3, P * (P - 1) // 2, dtype))
            a = comm.allreduce(g, op="avg", algorithm="auto")  # out-of-place on an alloc'd array
            want = g.copy()  # every rank holds the same g now: their average is g
            assert a.shape == g.shape and np.array_equal(a, want), f"avg {a[:4]} vs {want[:4]}"
        cases.run(f"alloc {np.dtype(dtype)} n={n}", case)

def twod() -> None:
    m = comm.alloc((4, 5), np.float64)
    m[:] = R
    comm.allreduce(m, out=m, algorithm="shm")
    assert (m == P * (P - 1) / 2).all()
cases.run("alloc 2-D", twod)


def ops_inplace() -> None:
    """avg/max/min/prod in place, and random floats: every rank ends with the same bits."""
    import zlib
    rng = np.random.default_rng(1234 + R)
    n = 300_001
    for dtype, op in ((np.float64, "avg"), (np.int32, "avg"), (np.float32, "max"), (np.int16, "min"),
                      (np.float64, "prod"), (np.float32, "sum")):
        g = comm.alloc(n, dtype)
        src = (rng.standard_normal(n) * 50).astype(dtype)
        g[:] = src
        every = np.empty((P, n), dtype)
        comm.mpi_comm.Allgather(src, every)  # the inputs of all ranks, to compute the answer here
        comm.allreduce(g, op=op, out=g, algorithm="shm")
        if op == "avg":
            want = every.sum(axis=0, dtype=dtype)
            want = want // P if np.dtype(dtype).kind == "i" else want / P
            close = np.allclose(g, want, rtol=1e-12, atol=1e-9) if np.dtype(dtype).kind == "f" else np.array_equal(g, want)
        else:
            want = {"max": every.max(axis=0), "min": every.min(axis=0), "prod": every.prod(axis=0),
                    "sum": every.sum(axis=0)}[op].astype(dtype)
            close = np.allclose(g, want, rtol=1e-5, atol=1e-3) if np.dtype(dtype).kind == "f" else np.array_equal(g, want)
        assert close, f"{op} {np.dtype(dtype)}: {g[:4]} vs {want[:4]}"
        crcs = comm.mpi_comm.allgather(zlib.crc32(g.tobytes()))
        assert len(set(crcs)) == 1, f"{op} {np.dtype(dtype)}: ranks differ {crcs}"
        plain = comm.allreduce(src, op=op, algorithm="shm")  # the copy-in path reduces in rank order too
        assert plain.tobytes() == g.tobytes(), f"{op} {np.dtype(dtype)}: window and copy-in paths differ"


cases.run("alloc ops in place, bitwise equal", ops_inplace)


def late_ranks() -> None:
    """Ranks arriving late, by turns: nobody reads a region or an array before its owner wrote it."""
    import time

    g = comm.alloc(100_000, np.float32)  # the window path
    small = np.empty(5000, np.float32)  # the one-phase copy-in path
    big = np.empty(1_200_000, np.float32)  # two chunks of the two-phase path
    for it in range(12):
        if it % P == R:
            time.sleep(0.01)
        for a in (g, small, big):
            a[:] = it * 10 + R
            comm.allreduce(a, out=a, algorithm="shm")
            want = P * it * 10 + P * (P - 1) // 2
            assert (a == want).all(), f"iteration {it}, {a.size} elements: {a[:3]} vs {want}"
cases.run("late ranks", late_ranks)


def repeated_call_changes() -> None:
    """Repeated in-place calls on one alloc'd array reuse the prepared call: whatever changed in between counts."""
    g = comm.alloc(100_000, np.float32)
    for op, want in (("sum", P * (P - 1) / 2), ("max", P - 1), ("min", 0), ("sum", P * (P - 1) / 2)):
        g[:] = R
        comm.allreduce(g, op=op, out=g, algorithm="shm")
        assert (g == want).all(), f"{op}: {g[:3]} vs {want}"
    g[:] = R
    g.shape = (4, 25_000)  # the same array object, another shape: the result keeps it
    y = comm.allreduce(g, out=g, algorithm="shm")
    assert y is g and g.shape == (4, 25_000) and (g == P * (P - 1) / 2).all()
    g.shape = (100_000,)
    g.flags.writeable = False
    try:
        comm.allreduce(g, out=g, algorithm="shm")
    except col.CollectiveValueError as exc:
        assert "read-only" in str(exc), exc
    else:
        raise AssertionError("a read-only alloc'd array was written in place")
    finally:
        g.flags.writeable = True
    g[:] = R + 1
    comm.allreduce(g, out=g, algorithm="shm")
    assert (g == P * (P + 1) / 2).all()
cases.run("repeated calls on one array", repeated_call_changes)


def quick_path_edges() -> None:
    """Repeated allreduces of plain arrays reuse a prepared template: each call's own arrays are still checked."""
    import gc
    import weakref

    for alg in ("native", "shm", "ring", None):
        base = np.zeros(40_000, np.float32)
        x, o = base[:20_000], base[20_000:]  # views of one array that do not overlap
        for rep in range(3):
            x[:] = R + rep
            y = comm.allreduce(x, algorithm=alg)  # out=None: a new array each call
            assert y is not x and (y == P * rep + P * (P - 1) / 2).all(), (alg, rep, y[:3])
            r = comm.allreduce(x, out=o, algorithm=alg)
            assert r is o and (o == P * rep + P * (P - 1) / 2).all(), (alg, rep, o[:3])
            r = comm.allreduce(x, out=x, algorithm=alg)
            assert r is x and (x == P * rep + P * (P - 1) / 2).all(), (alg, rep, x[:3])
        # out overlapping x partly: refused as on the first call, before anything moves
        try:
            comm.allreduce(x, out=base[10_000:30_000], algorithm=alg)
        except col.CollectiveValueError as exc:
            assert "overlaps" in str(exc), exc
        else:
            raise AssertionError(f"{alg}: a partly overlapping out was accepted")
        ro = np.empty_like(x)
        ro.flags.writeable = False
        try:
            comm.allreduce(x, out=ro, algorithm=alg)
        except col.CollectiveValueError as exc:
            assert "read-only" in str(exc), exc
        else:
            raise AssertionError(f"{alg}: a read-only out was written")
        strided = np.full(40_000, R, np.float32)[::2]  # not contiguous: the full path copies it
        y = comm.allreduce(strided, algorithm=alg)
        assert (y == P * (P - 1) / 2).all()
        # the template keeps no user array alive
        z = np.full(20_000, R, np.float32)
        comm.allreduce(z, out=z, algorithm=alg)
        ref = weakref.ref(z)
        del z
        gc.collect()
        assert ref() is None, f"{alg}: a reduced array outlived its last reference"
    # a plain array's template must not catch an alloc'd array reduced in place: that is the window path
    a = comm.alloc(70_000, np.float32)
    a[:] = R
    comm.allreduce(a, out=a, algorithm="shm")
    assert comm.trace()[-1].algorithm.startswith("shm-window#") and (a == P * (P - 1) / 2).all()
    v = a[:]  # a view of the alloc'd array, not the array itself
    v[:] = R
    comm.allreduce(v, out=v, algorithm="shm")
    assert comm.trace()[-1].algorithm.startswith("shm-window#") and (v == P * (P - 1) / 2).all()
    # nor one alloc'd array reduced into another (the out-of-place window path)
    big = np.zeros(70_000, np.float32)
    comm.allreduce(big, out=np.empty_like(big), algorithm="shm")  # a plain template for this signature
    b = comm.alloc(70_000, np.float32)
    a[:] = R
    comm.allreduce(a, out=b, algorithm="shm")
    assert "->#" in comm.trace()[-1].algorithm and (b == P * (P - 1) / 2).all() and (a == R).all()
cases.run("quick path edges", quick_path_edges)


def window_out_of_place() -> None:
    """One alloc'd array reduced into another: in the window from 256 KiB, the same bits as the other paths."""
    import zlib
    rng = np.random.default_rng(99 + R)
    for n in (0, 3, 1000, 16_384, 300_001):
        for dtype, op in ((np.float32, "sum"), (np.float64, "avg"), (np.int32, "max"), (np.int64, "avg")):
            x, out = comm.alloc(n, dtype), comm.alloc(n, dtype)
            src = (rng.standard_normal(n) * 50).astype(dtype)
            x[:] = src
            out[:] = -7
            every = np.empty((P, n), dtype)
            comm.mpi_comm.Allgather(src, every)
            y = comm.allreduce(x, op=op, out=out, algorithm="shm")
            window = x.nbytes >= _WINDOW_MIN_BYTES
            alg = comm.trace()[-1].algorithm
            assert y is out and (("->#" in alg) == window), (n, alg)
            assert np.array_equal(x, src), f"n={n} {op}: the input was modified"
            plain = comm.allreduce(src, op=op, algorithm="shm")  # copy-in path: the same operations, same bits
            assert plain.tobytes() == out.tobytes(), f"n={n} {np.dtype(dtype)} {op}: window and copy-in differ"
            if op == "max":
                assert np.array_equal(out, every.max(axis=0))
            elif op == "sum":
                assert np.allclose(out, every.sum(axis=0), rtol=1e-5, atol=1e-3)
            crcs = comm.mpi_comm.allgather(zlib.crc32(out.tobytes()))
            assert len(set(crcs)) == 1, f"n={n} {op}: ranks differ {crcs}"
            # repeated (auto is shm on one node from 16 KiB, and below too with the check on; MPI's own order,
            # which auto may pick below 16 KiB with the check off, may round differently)
            again = comm.allreduce(x, op=op, out=out, algorithm="auto" if x.nbytes >= 16 << 10 else "shm")
            assert again.tobytes() == plain.tobytes()
    # ranks with different histories: a plain template for this signature under "shm" on rank 0, under "auto"
    # (which resolves to shm) elsewhere, so rank 0 meets the alloc'd arrays in the quick path, the others not
    x, out = comm.alloc(70_000, np.float32), comm.alloc(70_000, np.float32)
    comm.allreduce(np.zeros(70_000, np.float32), out=np.empty(70_000, np.float32), algorithm="shm" if R == 0 else "auto")
    x[:] = R
    comm.allreduce(x, out=out, algorithm="shm" if R == 0 else "auto")
    assert "->#" in comm.trace()[-1].algorithm and (out == P * (P - 1) / 2).all()
    # a repeated call reuses the prepared one; what changed in between still counts
    for op, want in (("sum", P * (P - 1) / 2), ("max", P - 1), ("sum", P * (P - 1) / 2)):
        out[:] = -1
        assert comm.allreduce(x, op=op, out=out, algorithm="shm") is out and (out == want).all(), (op, out[:3])
    out.shape = (2, 35_000)
    try:
        comm.allreduce(x, out=out, algorithm="shm")  # every rank refuses it before anything moves
    except col.CollectiveValueError as exc:
        assert "shape" in str(exc), exc
    else:
        raise AssertionError("an out of another shape was accepted")
    out.shape = (70_000,)
    # a leading slice of one window into another window's
    x, out = comm.alloc(90_000, np.float32), comm.alloc(100_000, np.float32)
    x[:] = R
    comm.allreduce(x[:80_000], out=out[:80_000], algorithm="shm")
    assert "->#" in comm.trace()[-1].algorithm and (out[:80_000] == P * (P - 1) / 2).all() and (out[80_000:] == 0).all()
    # into a plain array: the copy-in path
    plain = np.empty(90_000, np.float32)
    comm.allreduce(x, out=plain, algorithm="shm")
    assert comm.trace()[-1].algorithm == "shm" and (plain == P * (P - 1) / 2).all()
cases.run("alloc'd into alloc'd (out of place)", window_out_of_place)


def after_close() -> None:
    """Calls on a closed communicator raise; the quick paths kept nothing that points into its freed windows."""
    c2 = col.Communicator()
    g = c2.alloc(_WINDOW_MIN_BYTES // 4, np.float32)
    small = np.ones(100, np.float32)
    for _ in range(4):  # both quick paths armed
        g[:] = 1
        c2.allreduce(g, out=g, algorithm="shm")
        c2.allreduce(small, out=small, algorithm="shm")
    if c2.sequencer.check.quick_arena is not None:  # the quick paths run with the fingerprint check (not with it off)
        assert c2.sequencer.prep.hot_calls() and any(t.quick for t in c2.sequencer.prep.templates.values())
    c2.close()
    for call in (lambda: c2.allreduce(g, out=g, algorithm="shm"), lambda: c2.allreduce(small, out=small, algorithm="shm")):
        try:
            call()
        except Exception:  # noqa: BLE001 - MPI's own error for the freed communicator
            pass
        else:
            raise AssertionError("a call on a closed communicator returned")
cases.run("calls after close raise", after_close)
cases.finish()
