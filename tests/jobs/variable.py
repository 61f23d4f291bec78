"""alltoall, gather, scatter and allgather with uneven first dims: exact answers for every algorithm, dtype, size and
root; bad input raising on every rank before any data moves; async forms."""
from __future__ import annotations

import argparse
import os
import zlib

import numpy as np

import collective as col
from collective.errors import CollectiveError, CollectiveMismatchError
from harness import Cases

ap = argparse.ArgumentParser()
ap.add_argument("--large", action="store_true")
args = ap.parse_args()

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
mpi = comm.mpi_comm
DTYPES = ["float32", "float64", "float16", "int8", "complex64", "uint8"]


def block(src: int, dst: int, rows: int, dt: str, rs: tuple = (3,)) -> np.ndarray:
    """What rank ``src`` sends rank ``dst``: deterministic, distinct per (src, dst, row)."""
    n = rows * int(np.prod(rs))
    v = (np.arange(n) + 1000 * src + 37 * dst) % 101
    return v.astype(dt).reshape(rows, *rs)


def same_everywhere(a: np.ndarray, what: str) -> None:
    mine = np.array([zlib.crc32(np.ascontiguousarray(a).tobytes())], np.int64)
    every = np.empty(P, np.int64)
    mpi.Allgather(mine, every)
    assert (every == every[0]).all(), f"{what}: ranks' results differ"


def raises_everywhere(what: str, fn, cls=CollectiveError) -> None:
    try:
        fn()
    except cls:
        return
    raise AssertionError(f"rank {R}: {what} did not raise {cls.__name__}")


def splits_of(src: int, scale: int) -> list[int]:
    return [((src + 2 * d) % 3) * scale for d in range(P)]


def alltoall_case(alg: str, dt: str, scale: int, even: bool) -> None:
    if even:
        sp = [scale] * P
    else:
        sp = splits_of(R, scale)
    x = np.concatenate([block(R, d, sp[d], dt) for d in range(P)]) if P else None
    want_rows = [scale] * P if even else [splits_of(s, scale)[R] for s in range(P)]
    want = np.concatenate([block(s, R, want_rows[s], dt) for s in range(P)])
    y, got = comm.alltoall(x, splits=None if even else sp, return_splits=True, algorithm=alg)
    assert got == want_rows, (got, want_rows)
    assert y.dtype == want.dtype and y.shape == want.shape and (y == want).all(), f"alltoall {alg} {dt} {scale}"
    out = np.empty_like(want)
    r = comm.alltoall(x, splits=None if even else sp, algorithm=alg, out=out)
    assert r is out and (out == want).all()


def gather_case(alg: str, dt: str, scale: int, root: int) -> None:
    rows = (R % 3) * scale
    x = block(R, root, rows, dt)
    y = comm.gather(x, root=root, algorithm=alg)
    if R == root:
        want = np.concatenate([block(s, root, (s % 3) * scale, dt) for s in range(P)])
        assert y.shape == want.shape and (y == want).all(), f"gather {alg} {dt} {scale} root {root}"
    else:
        assert y is None


def scatter_case(alg: str, dt: str, scale: int, root: int, explicit: bool) -> None:
    sp = splits_of(root, scale) if explicit else None
    total = sum(sp) if explicit else scale * P + (scale % P)
    full = block(root, 0, total, dt)
    if explicit:
        full = full[: sum(sp)]
    y = comm.scatter(full if R == root else None, root=root, splits=sp if R == root else None, algorithm=alg)
    parts = np.split(full, np.cumsum(sp)[:-1]) if explicit else np.array_split(full, P)
    assert y.dtype == full.dtype and y.shape == parts[R].shape and (y == parts[R]).all(), f"scatter {alg} {dt}"


def allgatherv_case(alg: str, dt: str, scale: int) -> None:
    rows = ((R * 2) % 3) * scale
    x = block(R, 0, rows, dt)
    y = comm.allgather(x, algorithm=alg)
    want = np.concatenate([block(s, 0, ((s * 2) % 3) * scale, dt) for s in range(P)])
    assert y.shape == want.shape and (y == want).all(), f"allgatherv {alg} {dt} {scale}"
    same_everywhere(y, "allgatherv")
    e = comm.allgather(block(R, 0, scale, dt), algorithm=alg if alg != "ring" or True else alg)  # equal: fixed path
    assert e.shape == (P * scale, 3)


scales = [0, 1, 5] + ([40_000] if args.large else [])
for dt in DTYPES:
    for scale in scales:
        for alg in ("auto", "native", "pairwise", "bruck", "shm"):
            for even in (True, False):
                cases.run(f"alltoall {alg} {dt} {scale} {even}", lambda: alltoall_case(alg, dt, scale, even))
        for alg in ("auto", "native", "tree", "shm"):
            for root in sorted({0, P - 1, P // 2}):
                cases.run(f"gather {alg} {dt} {scale} {root}", lambda: gather_case(alg, dt, scale, root))
                for explicit in (False, True):
                    cases.run(f"scatter {alg} {dt} {scale} {root} {explicit}",
                              lambda: scatter_case(alg, dt, scale, root, explicit))
        for alg in ("auto", "native", "ring", "shm"):
            cases.run(f"allgatherv {alg} {dt} {scale}", lambda: allgatherv_case(alg, dt, scale))


# bool moves through every variable-size collective and algorithm (it is never reduced).
for alg in ("auto", "native", "pairwise", "bruck", "shm"):
    for even in (True, False):
        cases.run(f"alltoall {alg} bool {even}", lambda: alltoall_case(alg, "bool", 5, even))
for alg in ("auto", "native", "tree", "shm"):
    cases.run(f"gather {alg} bool", lambda: gather_case(alg, "bool", 5, P - 1))
    cases.run(f"scatter {alg} bool", lambda: scatter_case(alg, "bool", 5, P - 1, False))
for alg in ("auto", "native", "ring", "shm"):
    cases.run(f"allgatherv {alg} bool", lambda: allgatherv_case(alg, "bool", 5))


def bfloat16_scatter() -> None:
    """The root's dtype travels in the header: bfloat16 (an extension dtype) must arrive as bfloat16."""
    import ml_dtypes

    full = np.arange(3 * P, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(P, 3)
    y = comm.scatter(full if R == 0 else None, root=0, algorithm="native")
    assert y.dtype == full.dtype and (y.astype(np.float32) == full[R].astype(np.float32)).all()


cases.run("bfloat16 scatter", bfloat16_scatter)


def async_forms() -> None:
    x = block(R, 0, 2 * P, "float32")
    w1 = comm.alltoall_async(x)
    w2 = comm.gather_async(x, root=0)
    w3 = comm.scatter_async(x if R == 0 else None, root=0)
    w4 = comm.allgather_async(block(R, 0, R + 1, "float32"))
    y1, y2, y3, y4 = w1.wait(), w2.wait(), w3.wait(), w4.wait()
    assert y1.shape == (2 * P, 3) and (y2 is None) == (R != 0) and y3.shape == (2, 3)
    assert y4.shape == (P * (P + 1) // 2, 3)


def zero_d() -> None:
    y = comm.allgather(np.float32(R))
    assert y.shape == (P,) and (y == np.arange(P)).all()


def bad_input() -> None:
    if P == 1:
        return
    x = np.ones((P, 3), np.float32)
    # A rank whose call differs: dtype, row shape, root.
    raises_everywhere("dtype mismatch", lambda: comm.alltoall(x.astype(np.float64) if R == 1 else x),
                      CollectiveMismatchError)
    raises_everywhere("row shape mismatch", lambda: comm.allgather(np.ones((2, 4 if R == 1 else 3))),
                      CollectiveMismatchError)
    raises_everywhere("root mismatch", lambda: comm.gather(x, root=1 if R == 1 else 0), CollectiveMismatchError)
    # Bad local arguments: the rank raises its own error, the others the mismatch naming it.
    raises_everywhere("splits of the wrong length", lambda: comm.alltoall(x, splits=[P] if R == 0 else None))
    raises_everywhere("negative split", lambda: comm.alltoall(x, splits=[-1, P + 1] + [0] * (P - 2) if R == 0
                                                               else None))
    raises_everywhere("splits not adding up", lambda: comm.alltoall(x, splits=[1] * (P - 1) + [2] if R == 0 else None))
    raises_everywhere("rows not divisible", lambda: comm.alltoall(np.ones((P + 1 if R == 0 else P, 3))))
    raises_everywhere("root out of range", lambda: comm.gather(x, root=P if R == 0 else 0))
    raises_everywhere("scatter data off the root", lambda: comm.scatter(x, root=0))
    # out of the wrong size: found after the counts are known, on every rank.
    raises_everywhere("out of the wrong size", lambda: comm.allgather(
        x, out=np.empty((P * P + (R == P - 1), 3), np.float32)))
    raises_everywhere("scatter out of the wrong dtype", lambda: comm.scatter(
        x if R == 0 else None, root=0, out=np.empty((1, 3), np.float64 if R == P - 1 else np.float32)))
    # and everything still works afterwards, in step
    y = comm.allgather(np.full((1,), R, np.int64))
    assert (y == np.arange(P)).all()


def window_cases() -> None:
    """Inputs in a comm.alloc window (read where they lie, algorithm shm-window#k): exact answers for even and
    uneven alltoall and uneven allgather, repeated with the input rewritten right after every call (a rank must
    not return while another still reads its input); a rank passing a plain array instead is a mismatch on
    every rank, with nothing written."""
    if not comm.single_node or P == 1:
        return
    # COLLECTIVE_SHM_STREAM_BYTES=1 (one of the jobs): every read below copies with streaming stores.
    want = int(os.environ.get("COLLECTIVE_SHM_STREAM_BYTES") or 8 << 20)  # unset or empty: the default
    stream = comm.node_arena().stream
    assert stream == (want if comm.node_arena().stream_copy is not None else 0), (stream, want)
    for dt in ("float32", "int8", "complex64"):
        cap = max(scales) * 2 * P + 2 * P
        win = comm.alloc((cap, 3), dt)
        for scale in scales:
            for alg in ("auto", "shm"):
                for even in (True, False):
                    sp = [scale] * P if even else splits_of(R, scale)
                    n = sum(sp)
                    x = win[:n]
                    x[...] = np.concatenate([block(R, d, sp[d], dt) for d in range(P)])
                    want_rows = [scale] * P if even else [splits_of(s, scale)[R] for s in range(P)]
                    want = np.concatenate([block(s, R, want_rows[s], dt) for s in range(P)])
                    y, got = comm.alltoall(x, splits=None if even else sp, return_splits=True, algorithm=alg)
                    assert got == want_rows and y.dtype == want.dtype and (y == want).all(), ("window", dt, scale)
                    assert comm.trace()[-1].algorithm.startswith("shm-window#"), comm.trace()[-1].algorithm
                rows = ((R * 2) % 3) * scale
                win[:rows] = block(R, 0, rows, dt)
                y = comm.allgather(win[:rows], algorithm=alg)
                want = np.concatenate([block(s, 0, ((s * 2) % 3) * scale, dt) for s in range(P)])
                assert y.shape == want.shape and (y == want).all(), ("window allgather", dt, scale)
                same_everywhere(y, "window allgather")
        rows = 2 + max(scales) // 50
        out = np.empty((rows * P, 3), dt)
        for it in range(30):  # repeats from the plan; the input rewritten as soon as each call returns
            win[:rows * P] = (np.arange(rows * P * 3).reshape(rows * P, 3) + 7 * R + it) % 101
            comm.alltoall(win[:rows * P], out=out)
            want = np.concatenate([(np.arange(rows * P * 3).reshape(rows * P, 3)[rows * R:rows * (R + 1)]
                                    + 7 * s + it) % 101 for s in range(P)]).astype(dt)
            assert (out == want).all(), ("window repeat", dt, it)
            win[:rows * P] = -1
        out[...] = 0
        raises_everywhere("a plain array against a window", lambda: comm.alltoall(
            win[:rows * P] if R else win[:rows * P].copy(), out=out), CollectiveMismatchError)
        assert (out == 0).all()
        del x
        comm.free(win)
    window_plan_cases()


def window_plan_cases() -> None:
    """Repeats on window inputs over 64 KiB run from a WindowRead plan whatever the cores (the reads straight from
    the inputs, not posted with the check): exact answers with the inputs rewritten after every call, for dtypes
    of 1 and 16 bytes (the plan's element offsets turned into bytes where it streams), and the plan streaming
    exactly when the output reaches COLLECTIVE_SHM_STREAM_BYTES."""
    from collective.shm import WindowRead

    for dt in ("int8", "complex128"):
        rows = (96 << 10) // (3 * np.dtype(dt).itemsize) // P * P + P  # over 64 KiB a rank
        win = comm.alloc((rows, 3), dt)
        out = np.empty((rows, 3), dt)
        b = rows // P
        for it in range(5):
            win[...] = ((np.arange(rows * 3).reshape(rows, 3) + 1000 * R + it) % 113).astype(dt)
            comm.alltoall(win, out=out)
            want = np.concatenate([((np.arange(rows * 3).reshape(rows, 3) + 1000 * s + it) % 113)[b * R:b * (R + 1)]
                                   for s in range(P)]).astype(dt)
            assert (out == want).all(), ("window plan alltoall", dt, it)
            win[...] = -1
        quick = comm._vhot[id(win)].plan.quick
        assert type(quick) is WindowRead, type(quick)
        assert (quick.stream is not None) == (0 < comm.node_arena().stream <= out.nbytes), (quick.stream, dt)
        del quick  # it holds views of the window, which free needs gone
        mine = rows - 5 * R  # uneven allgather from a leading slice, repeated into the same out
        gout = np.empty((sum(rows - 5 * s for s in range(P)), 3), dt)
        for it in range(5):
            win[:mine] = ((np.arange(mine * 3).reshape(mine, 3) + 7 * R + it) % 101).astype(dt)
            comm.allgather(win[:mine], out=gout)
            want = np.concatenate([(np.arange((rows - 5 * s) * 3).reshape(-1, 3) + 7 * s + it) % 101
                                   for s in range(P)]).astype(dt)
            assert (gout == want).all(), ("window plan allgather", dt, it)
            win[...] = -1
        comm.free(win)


ALLTOALL_ALGS = ("auto", "native", "pairwise", "bruck", "shm")


def one_rank_even() -> None:
    """Rank 0 sends and receives equal blocks, the others do not: every rank must run the same kind of call
    (MPI's Alltoall on rank 0 and Alltoallv on the others would hang)."""
    M = [[2 if i == 0 or j == 0 else (i + j) % 3 for j in range(P)] for i in range(P)]  # M[i][j]: rows i sends j
    x = np.concatenate([block(R, d, M[R][d], "float32") for d in range(P)])
    want = np.concatenate([block(s, R, M[s][R], "float32") for s in range(P)])
    for alg in ALLTOALL_ALGS:
        for _ in range(2):
            y, got = comm.alltoall(x, splits=M[R], return_splits=True, algorithm=alg)
            assert got == [M[s][R] for s in range(P)] and (y == want).all(), (alg, got)


def recv_splits_cases() -> None:
    """recv_splits: the rows a rank expects from each rank. Met: the result lands in ``out`` (uneven and equal
    blocks, repeated: the plan path); unmet, with every total right: every rank raises CollectiveMismatchError
    before anything moves (``out`` untouched); malformed: the rank raises its own error, the others the mismatch."""
    M = [[(i + 2 * j) % 3 + (i == j) for j in range(P)] for i in range(P)]
    x = np.concatenate([block(R, d, M[R][d], "int8") for d in range(P)])
    mine = [M[s][R] for s in range(P)]
    want = np.concatenate([block(s, R, mine[s], "int8") for s in range(P)])
    e = block(R, 0, 2 * P, "float64")
    e_want = np.concatenate([block(s, 0, 2 * P, "float64")[2 * R:2 * R + 2] for s in range(P)])
    for alg in ALLTOALL_ALGS:
        out = np.empty_like(want)
        for _ in range(3):
            r = comm.alltoall(x, splits=M[R], recv_splits=mine, algorithm=alg, out=out)
            assert r is out and (out == want).all(), alg
            eo = np.empty_like(e_want)
            assert comm.alltoall(e, recv_splits=[2] * P, algorithm=alg, out=eo) is eo and (eo == e_want).all()
        if P == 1:
            continue
        # Rank 0 expects 2 rows from everyone and gets 2P in all, but not 2 from each: from P=3 rank 1 sends it
        # 1 and the last rank 3, every other total staying 2P (rank 0's call is the equal one above, so its
        # plan's); at P=2 it sends itself 1.
        sp = [2] * P
        if P == 2:
            sp = [1, 3] if R == 0 else [3, 1]
        elif R == 1:
            sp[0], sp[-1] = 1, 3
        elif R == P - 1:
            sp[0], sp[-1] = 3, 1  # and itself 1: it gets 3 from rank 1
        for _ in range(2):
            eo = np.full_like(e_want, -5)
            raises_everywhere("an unmet recv_splits", lambda: comm.alltoall(
                e, splits=None if R == 0 and P > 2 else sp, recv_splits=[2] * P if R == 0 else None, algorithm=alg,
                out=eo), CollectiveMismatchError)
            assert (eo == -5).all(), "out written before the mismatch raised"
    if P == 1:
        return
    raises_everywhere("recv_splits of the wrong length", lambda: comm.alltoall(e, recv_splits=[2] if R == 0 else None))
    raises_everywhere("a negative recv_split", lambda: comm.alltoall(
        e, recv_splits=[-1, 2 * P + 1] + [2] * (P - 2) if R == 0 else None))
    raises_everywhere("recv_splits against out", lambda: comm.alltoall(
        e, recv_splits=[3] * P if R == 0 else None, out=np.empty((2 * P, 3))))
    y = comm.allgather(np.full((1,), R, np.int64))  # still in step
    assert (y == np.arange(P)).all()


cases.run("window inputs", window_cases)
cases.run("async forms", async_forms)
cases.run("0-d allgather", zero_d)
cases.run("bad input", bad_input)
cases.run("alltoall: one rank's blocks equal", one_rank_even)
cases.run("alltoall recv_splits", recv_splits_cases)
cases.finish()
