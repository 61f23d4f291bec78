"""The single-copy shm allreduce (cross-memory attach): its probe, its bits against the copy-in path, its guards.

Prints ``SINGLE_COPY yes`` or ``SINGLE_COPY no`` (rank 0): whether the node's ranks may read and write each
other's memory here. The probe must agree with a direct attempt made by this job's own system call; where it is
unavailable only that case and the copy-in cases run.
"""
from __future__ import annotations

import ctypes
import os
import zlib

import numpy as np
from harness import Cases
from pages import anonymous, huge_kb

import collective as col
import collective.variable as V
from collective.cma import HugePages
from collective.errors import CollectiveError, CollectiveMismatchError
from collective.shm import CMA_MIN_BYTES, CMA_PIECE_BYTES

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
mpi = comm.mpi_comm
arena = comm.node_arena()
fence = mpi.Barrier


def direct_attempt() -> bool:
    """Read one word of every other rank with process_vm_readv, written here independently of collective.cma."""
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    libc = ctypes.CDLL(None, use_errno=True)
    word = np.array([os.getpid() * 7 + 1], np.int64)
    peers = mpi.allgather((os.getpid(), word.ctypes.data))
    ok = True
    got = np.zeros(1, np.int64)
    for q, (pid, addr) in enumerate(peers):
        if q == R:
            continue
        loc, rem = Iov(got.ctypes.data, 8), Iov(addr, 8)
        n = libc.process_vm_readv(pid, ctypes.byref(loc), 1, ctypes.byref(rem), 1, 0)
        ok = ok and n == 8 and int(got[0]) == pid * 7 + 1
    mpi.Barrier()  # every peer's word lives until every rank has read it
    return bool(mpi.allreduce(int(ok), op=__import__("mpi4py").MPI.MIN))


def probe_agrees() -> None:
    direct = direct_attempt()
    assert (arena.cma is not None) == direct, f"rank {R}: probe says {arena.cma is not None}, a direct read {direct}"
    every = mpi.allgather(arena.cma is not None)
    assert len(set(every)) == 1, f"the node's ranks disagree on single copy: {every}"


cases.run("probe agrees with a direct attempt", probe_agrees)
available = arena.cma is not None
if R == 0:
    print(f"SINGLE_COPY {'yes' if available else 'no'}", flush=True)


def data(n: int, dtype: type, salt: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * R + salt)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(-100, 100, n).astype(dtype)
    scale = 10.0 ** rng.integers(-4, 3 if np.dtype(dtype).itemsize == 2 else 5, n)  # float16 tops out at 65504
    v = rng.standard_normal(n) * scale
    if np.dtype(dtype).kind == "c":
        v = v + 1j * rng.standard_normal(n)
    return v.astype(dtype)


def same_everywhere(a: np.ndarray, what: str) -> None:
    every = mpi.allgather(zlib.crc32(a.tobytes()))
    assert len(set(every)) == 1, f"{what}: ranks' results differ"


def copy_in(fn):  # the same call with the single-copy path switched off on this arena
    keep = arena.cma
    arena.cma = None
    try:
        return fn()
    finally:
        arena.cma = keep


calls = {"_single_copy": 0, "_single_copy_scatter": 0, "_single_copy_gather": 0}


def counting(name: str):
    real = getattr(arena, name)

    def call(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)
    return call


for name in calls:
    setattr(arena, name, counting(name))


def took(name: str, before: int, what: str) -> None:
    assert calls[name] == before + 1, f"rank {R}: {what} did not take the single-copy path ({name})"


def bits(dtype: type, n: int, op: str) -> None:
    x = data(n, dtype, n)
    keep = x.copy()
    before = calls["_single_copy"]
    y = comm.allreduce(x, op=op, algorithm="shm")
    took("_single_copy", before, f"allreduce of {n} elements of {np.dtype(dtype)}")
    assert np.array_equal(x, keep), f"rank {R}: the input changed"
    plain = copy_in(lambda: comm.allreduce(x, op=op, algorithm="shm"))
    what = f"{op} {np.dtype(dtype)} n={n}"
    assert y.tobytes() == plain.tobytes(), f"rank {R}: {what}: single copy's bits differ from copy-in's"
    same_everywhere(y, what)
    z = x.copy()
    comm.allreduce(z, op=op, algorithm="shm", out=z)
    assert z.tobytes() == plain.tobytes(), f"rank {R}: {what}: in place differs"
    for root in range(P):
        r = comm.reduce(x, root=root, op=op, algorithm="shm")
        if R == root:
            assert r.tobytes() == plain.tobytes(), f"rank {R}: {what}: reduce to {root} differs"
        else:
            assert r is None


def scatter_bits(dtype: type, rows: int) -> None:
    x = data(rows * 3, dtype, rows).reshape(rows, 3)
    before = calls["_single_copy_scatter"]
    y = comm.reduce_scatter(x, algorithm="shm")
    took("_single_copy_scatter", before, f"reduce_scatter of {x.shape} {np.dtype(dtype)}")
    plain = copy_in(lambda: comm.reduce_scatter(x, algorithm="shm"))
    assert y.shape == plain.shape and y.tobytes() == plain.tobytes(), f"rank {R}: reduce_scatter bits differ"
    every = mpi.allgather(y)
    whole = copy_in(lambda: comm.allreduce(x, algorithm="shm"))
    assert np.concatenate(every).tobytes() == whole.tobytes(), "reduce_scatter's blocks are not the allreduce"


def gather_bits(dtype: type, rows: int) -> None:
    x = data(rows * 5, dtype, rows + 1).reshape(rows, 5)
    before = calls["_single_copy_gather"] + vcalls[0]
    y = comm.allgather(x, algorithm="shm")
    # Either single-copy path: the fixed-size one, or the variable-size calls' (which equal first dims take where
    # collective.variable.single_copy says so: two phases, the check being the first).
    assert calls["_single_copy_gather"] + vcalls[0] == before + 1, (
        f"rank {R}: allgather of {x.shape} {np.dtype(dtype)} did not take a single-copy path")
    want = np.concatenate(mpi.allgather(x))
    assert y.tobytes() == want.tobytes(), f"rank {R}: allgather differs"
    out = np.zeros_like(want)
    comm.allgather(x, algorithm="shm", out=out)
    assert out.tobytes() == want.tobytes(), f"rank {R}: allgather into out differs"


def async_ops() -> None:
    # On the communication thread, several queued: each takes the path and gives the copy-in path's bits.
    xs = [data(CMA_MIN_BYTES // 4 + 3 * i, np.float32, 40 + i) for i in range(3)]
    before = calls["_single_copy"]
    works = [comm.allreduce_async(x, algorithm="shm") for x in xs]
    ys = [w.wait() for w in works]
    assert calls["_single_copy"] == before + 3, f"rank {R}: async allreduces did not take the single-copy path"
    for i, (x, y) in enumerate(zip(xs, ys)):
        plain = copy_in(lambda: comm.allreduce(x, algorithm="shm"))
        assert y.tobytes() == plain.tobytes(), f"rank {R}: async allreduce {i} differs from copy-in's bits"


def piece_edges() -> None:
    # Slices that end exactly on a piece, one element past it, and one short: every rank's loop bounds.
    k = max(CMA_MIN_BYTES // CMA_PIECE_BYTES // P + 1, 1)  # pieces per slice, at least the threshold's size
    for n in (k * P * CMA_PIECE_BYTES // 4 + 1, k * P * CMA_PIECE_BYTES // 4 - 1):
        bits(np.float32, n, "sum")


def switched_off_in(var: str) -> col.Communicator:
    """A communicator over every rank made while ``var`` is 0 (the settings are read when one is made)."""
    os.environ[var] = "0"
    try:
        sub = comm.split(0)
    finally:
        del os.environ[var]
    assert sub is not None
    return sub


def switched_off() -> None:
    sub = switched_off_in("COLLECTIVE_SHM_SINGLE_COPY")
    try:
        x = data(CMA_MIN_BYTES // 8 + 3, np.float64, 5)
        y = sub.allreduce(x, algorithm="shm")
        assert sub.node_arena().cma is None, f"rank {R}: COLLECTIVE_SHM_SINGLE_COPY=0 left single copy on"
        want = copy_in(lambda: comm.allreduce(x, algorithm="shm"))
        assert y.tobytes() == want.tobytes(), f"rank {R}: the switched-off communicator's result differs"
    finally:
        sub.close()


def unchecked_sizes() -> None:
    # With the cross-rank check off, ranks calling with different sizes: every rank raises, nothing is touched.
    sub = switched_off_in("COLLECTIVE_CHECK")
    try:
        n = CMA_MIN_BYTES // 4 + (1000 if R == 0 else 0)
        x = np.ones(n, np.float32)
        out = np.zeros(n, np.float32)
        try:
            sub.allreduce(x, algorithm="shm", out=out)
        except CollectiveMismatchError as exc:
            assert "single-copy" in str(exc) and "other ranks" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {R}: different sizes with the check off did not raise")
        assert not out.any(), f"rank {R}: the output was written"
        y = sub.allreduce(np.ones(CMA_MIN_BYTES // 4, np.float32), algorithm="shm")  # the group goes on
        assert (y == P).all()
    finally:
        sub.close()


# ---------------------------------------------------------------- variable-size calls by single copy
vcalls = [0]
vreal = arena.cross_read


def vcounting(*args, **kwargs):
    vcalls[0] += 1
    return vreal(*args, **kwargs)


arena.cross_read = vcounting
rule = V.single_copy


def forced(ar, sizes):  # single copy at every size but empty calls, on whatever cores the ranks share
    return ar.cma is not None and sum(sizes) > 0


def rows_of(src: int, dst: int, rows: int, dt: str) -> np.ndarray:
    v = (np.arange(rows * 3) * 7 + 1000 * src + 37 * dst) % 253
    return v.astype(dt).reshape(rows, 3)


def variable_calls(dt: str, scale: int) -> list:
    """(name, call) pairs of every variable-size shape: even and uneven (with empty blocks) alltoall, uneven
    and equal allgather, gather and scatter to every root."""
    sp = [((R + 2 * d) % 3) * scale for d in range(P)]
    uneven = np.concatenate([rows_of(R, d, sp[d], dt) for d in range(P)])
    even = np.concatenate([rows_of(R, d, scale, dt) for d in range(P)])
    mine = rows_of(R, 0, ((R * 2) % 3) * scale + 1, dt)
    shapes = [("alltoall even", lambda a: comm.alltoall(even, algorithm=a)),
             ("alltoall uneven", lambda a: comm.alltoall(uneven, splits=sp, algorithm=a)),
             ("allgather uneven", lambda a: comm.allgather(mine, algorithm=a)),
             ("allgather equal", lambda a: comm.allgather(even, algorithm=a))]
    for root in range(P):
        full = rows_of(root, 1, scale * P + 1, dt)
        shapes.append((f"gather {root}", lambda a, root=root: comm.gather(mine, root=root, algorithm=a)))
        shapes.append((f"scatter {root}", lambda a, root=root, full=full: comm.scatter(
            full if R == root else None, root=root, algorithm=a)))
    return shapes


def variable_bits(dt: str) -> None:
    """Every variable-size call by single copy gives the copy-in path's bytes and MPI's; the path was taken."""
    V.single_copy = forced
    try:
        for scale in (1, 3000):
            for name, call in variable_calls(dt, scale):
                before = vcalls[0]
                y = call("shm")
                assert vcalls[0] == before + 1, f"rank {R}: {name} {dt} x{scale} did not take the single-copy path"
                plain = copy_in(lambda: call("shm"))
                native = call("native")
                what = f"rank {R}: {name} {dt} x{scale}"
                if y is None:
                    assert plain is None and native is None, what
                    continue
                assert y.dtype == plain.dtype and y.shape == plain.shape, what
                assert y.tobytes() == plain.tobytes() == native.tobytes(), f"{what}: single copy's bytes differ"
    finally:
        V.single_copy = rule


def variable_repeats() -> None:
    """Repeated calls on the same arrays (the plan's path): each sees its own input, rewritten right after the
    call returned (no rank may return while another still reads its input)."""
    V.single_copy = forced
    try:
        n = 2000 * P
        x = np.empty((n, 3), np.float32)
        out = np.empty((n, 3), np.float32)
        g = np.empty((R + 1000, 3), np.float64)
        before = vcalls[0]
        for it in range(6):
            x[...] = rows_of(R, it, n, "float32")
            comm.alltoall(x, algorithm="shm", out=out)
            x[...] = -1  # the next call's data: a peer still reading would see it
            want = np.concatenate([rows_of(s, it, n, "float32")[R * 2000:(R + 1) * 2000] for s in range(P)])
            assert (out == want).all(), f"rank {R}: repeat {it} of alltoall"
            g[...] = rows_of(R, it, R + 1000, "float64")
            y = comm.allgather(g, algorithm="shm")
            g[...] = -1
            want = np.concatenate([rows_of(s, it, s + 1000, "float64") for s in range(P)])
            assert (y == want).all(), f"rank {R}: repeat {it} of allgather"
        assert vcalls[0] == before + 12, f"rank {R}: {vcalls[0] - before} single-copy calls of 12"
    finally:
        V.single_copy = rule


def variable_views() -> None:
    """Inputs that are slices of larger arrays (canaries around them), non-contiguous views, empty on some ranks,
    of itemsize 1 and 16, and a repeat whose array was replaced by another of the same shape: single copy gives
    MPI's bytes, reads nothing beyond an input and writes nothing beyond an output."""
    V.single_copy = forced
    try:
        for dt in ("int8", "complex128"):
            rows = [(R + q) % 3 * 700 for q in range(P)]  # rank R's block for rank q; some ranks' blocks empty
            body = np.concatenate([rows_of(R, q, rows[q], dt) for q in range(P)])
            big = np.full((body.shape[0] + 6, 3), 77, dt)
            big[3:-3] = body
            sliced = big[3:-3]  # contiguous, inside a larger array
            wide = np.full((body.shape[0], 6), 55, dt)
            wide[:, ::2] = body
            strided = wide[:, ::2]  # not contiguous: the library reads a contiguous copy
            mine = rows_of(R, 9, 0 if R == 1 else 2000 + R, dt)  # rank 1 gives no rows
            for label, x in (("slice", sliced), ("strided", strided)):
                before = vcalls[0]
                y = comm.alltoall(x, splits=rows, algorithm="shm")
                want = comm.alltoall(body, splits=rows, algorithm="native")
                assert vcalls[0] == before + 1, f"rank {R}: {label} {dt} alltoall did not take single copy"
                assert y.tobytes() == want.tobytes(), f"rank {R}: {label} {dt} alltoall differs from MPI's"
                room = np.full((want.shape[0] + 4, 3), 11, dt)
                comm.alltoall(x, splits=rows, algorithm="shm", out=room[2:-2])
                assert room[2:-2].tobytes() == want.tobytes(), f"rank {R}: {label} {dt} alltoall into a slice"
                assert (room[:2] == 11).all() and (room[-2:] == 11).all(), f"rank {R}: written beyond out"
            g = comm.allgather(mine, algorithm="shm")
            assert g.tobytes() == comm.allgather(mine, algorithm="native").tobytes(), f"rank {R}: allgather {dt}"
            for root in range(P):
                z = comm.gather(mine, root=root, algorithm="shm")
                w = comm.gather(mine, root=root, algorithm="native")
                assert (z is None) == (w is None) and (z is None or z.tobytes() == w.tobytes()), \
                    f"rank {R}: gather {dt} to {root}"
                src = np.full((P * 900 + 2, 3), 66, dt)
                src[1:-1] = rows_of(root, 4, P * 900, dt)
                s = comm.scatter(src[1:-1] if R == root else None, root=root, algorithm="shm")
                t = comm.scatter(src[1:-1] if R == root else None, root=root, algorithm="native")
                assert s.tobytes() == t.tobytes(), f"rank {R}: scatter {dt} from {root}"
            assert (big[:3] == 77).all() and (big[-3:] == 77).all() and (wide[:, 1::2] == 55).all()
        # The repeat's plan with a fresh array of the same shape each call (the old one gone): each call reads its own.
        n = 1500 * P
        for it in range(4):
            x = np.ascontiguousarray(rows_of(R, it, n, "float32"))
            y = comm.alltoall(x, algorithm="shm")
            want = np.concatenate([rows_of(s, it, n, "float32")[R * 1500:(R + 1) * 1500] for s in range(P)])
            del x
            assert y.tobytes() == want.tobytes(), f"rank {R}: fresh array repeat {it}"
    finally:
        V.single_copy = rule


def variable_one_rank_unposted() -> None:
    """A rank that posted nothing before the check (a path that posts nothing): every rank sees it in the same
    flags, posts again and ends one more phase, then reads; the results are right and the ranks stay in step."""
    V.single_copy = forced
    real_post = arena.post_input
    try:
        x = np.concatenate([rows_of(R, d, 3000, "float32") for d in range(P)])
        want = comm.alltoall(x, algorithm="native")
        for skip in range(P):
            if R == skip:
                def skip_once(*args) -> None:  # the post before the check; cross_read's own post goes through
                    arena.post_input = real_post
                arena.post_input = skip_once
            t0 = arena.ticket
            y = comm.alltoall(x, algorithm="shm")
            arena.post_input = real_post
            assert arena.ticket - t0 == 3, f"rank {R}: {arena.ticket - t0} phases with rank {skip} unposted, not 3"
            assert y.tobytes() == want.tobytes(), f"rank {R}: rank {skip} unposted: the result differs"
            t0 = arena.ticket
            y = comm.alltoall(x, algorithm="shm")  # every rank posted: two phases
            assert arena.ticket - t0 == 2 and y.tobytes() == want.tobytes(), f"rank {R}: after rank {skip}"
    finally:
        arena.post_input = real_post
        V.single_copy = rule


def variable_switched_off() -> None:
    """COLLECTIVE_SHM_SINGLE_COPY=0: the same calls copy through the window, with the same results."""
    sub = switched_off_in("COLLECTIVE_SHM_SINGLE_COPY")
    V.single_copy = forced
    try:
        x = np.concatenate([rows_of(R, d, 3000, "float32") for d in range(P)])
        y = sub.alltoall(x, algorithm="shm")
        sar = sub.node_arena()
        assert sar.cma is None, f"rank {R}: COLLECTIVE_SHM_SINGLE_COPY=0 left single copy on"
        assert y.tobytes() == comm.alltoall(x, algorithm="native").tobytes()

        def refused(*args, **kwargs):
            raise AssertionError(f"rank {R}: the single-copy path ran with it switched off")
        sar.cross_read = refused
        for _ in range(3):  # the first call and the plan's repeats
            z = sub.allgather(x[:R + 5], algorithm="shm")
            assert z.tobytes() == comm.allgather(x[:R + 5], algorithm="native").tobytes()
            z = sub.scatter(x if R == 0 else None, root=0, algorithm="shm")
            assert z.tobytes() == comm.scatter(x if R == 0 else None, root=0, algorithm="native").tobytes()
    finally:
        V.single_copy = rule
        sub.close()


def variable_unchecked() -> None:
    """With the cross-rank check off, a rank whose rows are twice as wide in bytes (float64 where the others pass
    float32): every rank raises CollectiveMismatchError, having read nothing; the group goes on."""
    sub = switched_off_in("COLLECTIVE_CHECK")
    V.single_copy = forced
    try:
        dt = np.float64 if R == 0 else np.float32
        x = np.ones((1000 * P, 3), dt)
        out = np.zeros((1000 * P, 3), dt)
        try:
            sub.alltoall(x, algorithm="shm", out=out)
        except CollectiveMismatchError as exc:
            assert "single-copy" in str(exc) and "alltoall" in str(exc) and "expected" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {R}: different bytes per row with the check off did not raise")
        assert not out.any(), f"rank {R}: the output was written"
        y = sub.alltoall(np.full((1000 * P, 3), R, np.float32), algorithm="shm")  # the group goes on
        assert (y == np.repeat(np.arange(P), 1000)[:, None]).all()
    finally:
        V.single_copy = rule
        sub.close()



def unchecked_roots() -> None:
    # With the check off, ranks that disagree on who gets the result (an allreduce against a reduce's non-roots, or
    # reduces to different roots) post the same size at the same ticket: a non-root posts no output, so a rank
    # that takes it for a receiver must raise with every other, never write at what that rank did not post.
    sub = switched_off_in("COLLECTIVE_CHECK")
    try:
        n = CMA_MIN_BYTES // 4
        x = np.ones(n, np.float32)
        for label, call in (
                ("allreduce against reduce", lambda out: sub.allreduce(x, algorithm="shm", out=out) if R == 0
                 else sub.reduce(x, root=0, algorithm="shm")),
                ("reduces to different roots", lambda out: sub.reduce(x, root=(R + 1) % P, algorithm="shm"))):
            out = np.zeros(n, np.float32)
            try:
                call(out)
            except CollectiveMismatchError as exc:
                assert "single-copy" in str(exc), str(exc)
            else:
                raise AssertionError(f"rank {R}: {label} with the check off did not raise")
            assert not out.any(), f"rank {R}: {label}: the output was written"
            y = sub.allreduce(np.ones(n, np.float32), algorithm="shm")  # the group goes on, in step
            assert (y == P).all(), f"rank {R}: {label}: the next allreduce gave {y[:4]}"
        # A reduce_scatter's output is its block alone: an allreduce of the same input must not take it for a whole
        # output (rank 0's block is followed by a canary that must stay zero).
        space = np.zeros(n, np.float32)
        out = space[:(n + P - 1) // P] if R == 0 else space
        try:
            if R == 0:
                sub.reduce_scatter(x, algorithm="shm", out=out)
            else:
                sub.allreduce(x, algorithm="shm", out=out)
        except CollectiveMismatchError as exc:
            assert "single-copy" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {R}: reduce_scatter against allreduce with the check off did not raise")
        assert not space.any(), f"rank {R}: reduce_scatter against allreduce: memory was written"
        y = sub.allreduce(np.ones(n, np.float32), algorithm="shm")
        assert (y == P).all(), f"rank {R}: after reduce_scatter against allreduce the next allreduce gave {y[:4]}"
    finally:
        sub.close()


def drop_ptrace() -> None:
    """Take CAP_SYS_PTRACE out of this process's effective and permitted sets (for good)."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    head, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    assert libc.capget(ctypes.byref(head), data) == 0, os.strerror(ctypes.get_errno())
    data[0].effective &= ~(1 << 19)  # CAP_SYS_PTRACE
    data[0].permitted &= ~(1 << 19)
    assert libc.capset(ctypes.byref(head), data) == 0, os.strerror(ctypes.get_errno())


def kernel_collapses() -> bool:
    """Whether this kernel collapses fresh anonymous memory into huge pages (asked here, not through collective)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    b = anonymous(8 << 20)
    b[:] = 1
    lo = (b.ctypes.data + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    kb = huge_kb(b)
    return libc.madvise(lo, 4 << 20, 25) == 0 and huge_kb(b) - kb >= 4096


def huge_pages() -> None:
    # A large array on 4 KiB pages reduced again and again in place: the call that posts it the HugePages.after-th
    # time puts it on huge pages first (none before), and every result is the copy-in path's bits; the bytes
    # around the array stay.
    huge = arena.huge
    if huge is None:  # the kernel has no transparent huge pages: the calls are as ever
        assert not os.path.exists("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"), f"rank {R}: no HugePages"
        if R == 0:
            print("NOTE huge pages: this kernel has no transparent huge pages", flush=True)
        return
    n = CMA_MIN_BYTES // 4 + (3 << 20) // 4 + 5
    raw = anonymous(n * 4 + 4096)
    x = raw[4:4 + n * 4].view(np.float32)  # not page aligned: only whole huge pages inside it are collapsed
    src = data(n, np.float32, 21)
    want = copy_in(lambda: comm.allreduce(src, algorithm="shm"))
    raw[:4] = 7
    raw[4 + n * 4:] = 9
    before, kb = huge.collapsed, huge_kb(x)
    for k in range(huge.after):
        x[:] = src
        comm.allreduce(x, algorithm="shm", out=x)
        assert x.tobytes() == want.tobytes(), f"rank {R}: call {k} on the anonymous array differs from copy-in"
        if k < huge.after - 1:
            assert huge.collapsed == before and huge_kb(x) == kb, f"rank {R}: posting {k + 1} collapsed"
    assert (raw[:4] == 7).all() and (raw[4 + n * 4:] == 9).all(), f"rank {R}: bytes around the array changed"
    can = kernel_collapses()
    every = mpi.allgather((can, huge.collapsed > before, huge_kb(x) - kb))
    if R == 0:
        print(f"NOTE huge pages: kernel collapses {can}; (kernel, collapsed, AnonHugePages kB) per rank {every}",
              flush=True)
    if can:
        assert huge.collapsed > before and huge_kb(x) - kb >= 2048, f"rank {R}: the repeated array stayed on 4K pages"
    sub = comm.split(0)  # another communicator notes into the same instance: one budget and count per process
    try:
        assert sub.node_arena().huge is huge, f"rank {R}: a sub-communicator's arena has HugePages of its own"
    finally:
        sub.close()
    off = switched_off_in("COLLECTIVE_SHM_HUGE_PAGES")
    try:
        assert off.node_arena().huge is None, f"rank {R}: COLLECTIVE_SHM_HUGE_PAGES=0 left huge pages on"
        y = anonymous(n * 4).view(np.float32)
        y[:] = src
        kb = huge_kb(y)
        for _ in range(HugePages().after):
            y[:] = src
            off.allreduce(y, algorithm="shm", out=y)
        assert y.tobytes() == want.tobytes() and huge_kb(y) == kb, f"rank {R}: switched off, the array changed pages"
    finally:
        off.close()


def one_rank_raises_inside() -> None:
    # A non-library error inside one rank's transfers (a float16 overflow under np.errstate(over="raise") in the
    # last rank's slice alone): every rank still ends the same phases and raises, so none may be left broken (a
    # broken rank's next call would raise at once while the others wait in theirs), and the group goes on.
    sub = comm.split(0)
    assert sub is not None and sub.node_arena().cma is not None
    try:
        n = CMA_MIN_BYTES // 2 + 3
        x = np.zeros(n, np.float16)
        s0, s1 = sub.node_arena().slice_of(n, P - 1)
        x[s0:s1] = 60000  # P times it is past float16's largest
        with np.errstate(over="raise"):
            try:
                sub.allreduce(x, algorithm="shm")
            except CollectiveError as exc:
                assert f"node rank {P - 1}" in str(exc), str(exc)
                assert R != P - 1 or "FloatingPointError" in str(exc), str(exc)
            else:
                raise AssertionError(f"rank {R}: the overflow in the last rank's slice raised nothing")
        every = mpi.allgather(sub.broken)
        assert all(b is None for b in every), f"rank {R}: broken after an error every rank raised: {every}"
        y = sub.allreduce(np.ones(5, np.float32), algorithm="shm")
        assert (y == P).all(), f"rank {R}: the group did not go on"
    finally:
        sub.close()


def plan_after_losing_single_copy() -> None:
    # An allgather of 9 MiB a rank by "auto" picks shm by single copy where every rank has a core of its own and the
    # node allows it, MPI's own once a failed transfer has switched single copy off. Rank 0 repeats from its plan,
    # the others pass strided views (the ordinary path, which picks at every call): after the loss rank 0's plan
    # must pick again too, not copy through the window while the others wait in MPI's allgatherv.
    sub = comm.split(0)
    assert sub is not None and sub.node_arena().cma is not None
    try:
        n = (9 << 20) // 4
        full = [np.arange(2 * n, dtype=np.float32) + q for q in range(P)]
        x = full[R][:n].copy() if R == 0 else full[R][::2]
        want = np.concatenate([full[q][:n] if q == 0 else full[q][::2] for q in range(P)])
        for k in range(2):
            assert np.array_equal(sub.allgather(x), want), f"rank {R}: allgather {k} with single copy"
        m = CMA_MIN_BYTES // 2 + 3
        h = np.zeros(m, np.float16)
        s0, s1 = sub.node_arena().slice_of(m, P - 1)
        h[s0:s1] = 60000  # P times it is past float16's largest: the last rank's transfer fails
        with np.errstate(over="raise"):
            try:
                sub.allreduce(h, algorithm="shm")
            except CollectiveError:
                pass
            else:
                raise AssertionError(f"rank {R}: the overflow in the last rank's slice raised nothing")
        assert sub.node_arena().cma is None, f"rank {R}: single copy still on after a failed transfer"
        for k in range(2):
            assert np.array_equal(sub.allgather(x), want), f"rank {R}: allgather {k} after single copy was lost"
    finally:
        sub.close()


def huge_pages_native() -> None:
    # MPI's own alltoall of large arrays on 4 KiB pages, again and again: both arrays go on huge pages by the
    # HugePages.after-th call (the first call posts the input for the check as well), and every result is right.
    huge = arena.huge
    if huge is None:
        return
    rows = (CMA_MIN_BYTES + (3 << 20)) // 4 // P
    x = anonymous(rows * P * 4 + 8)[8:].view(np.float32)
    out = anonymous(rows * P * 4).view(np.float32)
    for d in range(P):
        x[d * rows:(d + 1) * rows] = 1000 * R + d
    want = np.concatenate([np.full(rows, 1000 * q + R, np.float32) for q in range(P)])
    before, kb_x, kb_out = huge.collapsed, huge_kb(x), huge_kb(out)
    for k in range(huge.after):
        out[:] = -1
        comm.alltoall(x, algorithm="native", out=out)
        assert np.array_equal(out, want), f"rank {R}: native alltoall {k} on anonymous arrays is wrong"
        if k < huge.after - 2:
            assert huge.collapsed == before, f"rank {R}: posting {k + 1} of a native alltoall collapsed"
    if kernel_collapses():
        assert huge_kb(x) - kb_x >= 2048 and huge_kb(out) - kb_out >= 2048, \
            f"rank {R}: a native alltoall's repeated arrays stayed on 4 KiB pages"


def refused_mid_call() -> None:
    # The last rank loses the right to read the others' memory after the arena's probe passed (as a process that
    # drops a capability or changes its credentials would): its reads fail inside the call. Every rank must raise
    # the same error, none may hang in the second phase or return while another still touches its arrays, and the
    # group goes on through the shared window. A new arena's probe then finds the one-way refusal.
    sub = comm.split(0)
    assert sub is not None and sub.node_arena().cma is not None
    vsub = comm.split(0)  # for an alltoall's reads refused the same way (the probe runs before the refusal)
    assert vsub is not None and vsub.node_arena().cma is not None
    try:
        if R == P - 1:
            drop_ptrace()
        if direct_attempt():
            if R == 0:
                print("NOTE refused mid call: dropping CAP_SYS_PTRACE refused nothing here", flush=True)
            return
        n = CMA_MIN_BYTES // 8 + 7
        x = data(n, np.float64, 11)
        out = np.zeros(n, np.float64)
        try:
            sub.allreduce(x, algorithm="shm", out=out)
        except CollectiveError as exc:
            assert f"node rank {P - 1}" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {R}: a refused read inside the call did not raise")
        every = mpi.allgather(sub.node_arena().cma is None)
        assert all(every), f"single copy still on after the refusal: {every}"
        y = sub.allreduce(x, algorithm="shm")
        want = copy_in(lambda: comm.allreduce(x, algorithm="shm"))
        assert y.tobytes() == want.tobytes(), f"rank {R}: the allreduce after the refusal differs"
        # An alltoall whose reads the last rank is refused: the same on every rank, and the group goes on.
        V.single_copy = forced
        a = np.concatenate([rows_of(R, d, 3000, "float32") for d in range(P)])
        out = np.zeros_like(a)
        try:
            vsub.alltoall(a, algorithm="shm", out=out)
        except CollectiveError as exc:
            assert f"node rank {P - 1}" in str(exc) and "alltoall" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {R}: a refused read inside an alltoall did not raise")
        every = mpi.allgather(vsub.node_arena().cma is None)
        assert all(every), f"single copy still on after the alltoall's refusal: {every}"
        y = vsub.alltoall(a, algorithm="shm")
        assert y.tobytes() == comm.alltoall(a, algorithm="native").tobytes(), f"rank {R}: alltoall after it"
    finally:
        V.single_copy = rule
        vsub.close()
        sub.close()
    again = comm.split(0)
    assert again is not None
    try:
        every = mpi.allgather(again.node_arena().cma is None)
        assert all(every), f"a new arena's probe missed the one-way refusal: {every}"
    finally:
        again.close()


if available:
    for dtype, op in ((np.float32, "sum"), (np.float32, "max"), (np.float64, "sum"), (np.float16, "sum"),
                      (np.int8, "max"), (np.complex64, "prod")):
        n = CMA_MIN_BYTES // np.dtype(dtype).itemsize + 2 * P + 1
        cases.run(f"bits {np.dtype(dtype)} {op}", lambda: bits(dtype, n, op))
    cases.run("avg", lambda: bits(np.float64, CMA_MIN_BYTES // 8 + 1, "avg"))
    cases.run("piece edges", piece_edges)
    cases.run("async on the communication thread", async_ops)
    for dtype in (np.float32, np.int8):
        rows = CMA_MIN_BYTES // (3 * np.dtype(dtype).itemsize) + P + 1  # uneven blocks
        cases.run(f"reduce_scatter {np.dtype(dtype)}", lambda: scatter_bits(dtype, rows))
        each = CMA_MIN_BYTES // (5 * P * np.dtype(dtype).itemsize) + 3
        cases.run(f"allgather {np.dtype(dtype)}", lambda: gather_bits(dtype, each))
    cases.run("unchecked sizes raise", unchecked_sizes)
    cases.run("unchecked roots raise", unchecked_roots)
    cases.run("an error of one rank's transfers raises everywhere", one_rank_raises_inside)
    cases.run("a repeat's plan after the node lost single copy", plan_after_losing_single_copy)
    cases.run("huge pages for repeated arrays", huge_pages)
    cases.run("huge pages for MPI's own repeated calls", huge_pages_native)
cases.run("switched off", switched_off)
if available:
    for dt in ("float32", "int8", "complex64", "float16"):
        cases.run(f"variable bits {dt}", lambda: variable_bits(dt))
    cases.run("variable repeats", variable_repeats)
    cases.run("variable views, empty inputs, itemsize 1 and 16", variable_views)
    cases.run("variable one rank unposted", variable_one_rank_unposted)
    cases.run("variable unchecked sizes raise", variable_unchecked)
cases.run("variable switched off", variable_switched_off)
if available:
    cases.run("refused mid call", refused_mid_call)  # last: the last rank cannot read the others' memory after it
cases.finish()
