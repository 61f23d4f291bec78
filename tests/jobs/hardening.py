"""Jobs of the hardening tests (tests/test_hardening.py); argv[1] names the case."""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import numpy as np

faulthandler.register(signal.SIGUSR1)

import collective as col


def busy_rank() -> None:
    """Default deadline: rank 0 busy for longer than the stall warning; the job survives and says why it waits."""
    comm = col.init()
    assert comm.watchdog.timeout == 1800.0, comm.watchdog.timeout
    x = np.full(1000, comm.rank + 1, np.float32)
    comm.allreduce(x, out=x)
    if comm.rank == 0:
        time.sleep(float(sys.argv[2]))  # "evaluation" on rank 0
    y = comm.allreduce(np.ones(1000, np.float32))
    assert (y == comm.size).all()
    print(f"rank {comm.rank}: PASSED 1", flush=True)


def gone_rank() -> None:
    """Default deadline: a rank whose program ends while the other waits ends the job at once."""
    comm = col.init()
    comm.allreduce(np.ones(10, np.float32))
    if comm.rank == 1:
        sys.exit(0)
    comm.allreduce(np.ones(10, np.float32))


def native_pieces() -> None:
    """native past MPI's count limit (lowered here to 1000 elements so every collective is cut into pieces)."""
    from collective import engine

    engine.MPI_COUNT_LIMIT = 1000
    comm = col.init()
    P, R = comm.size, comm.rank
    passed = 0
    for n in (999, 1000, 1001, 3001, 7 * P * 333):
        base = np.arange(n, dtype=np.float64)
        x = base * (R + 1)
        want = base * (P * (P + 1) / 2)
        assert np.array_equal(comm.allreduce(x, algorithm="native"), want)
        y = x.copy()
        comm.allreduce(y, out=y, algorithm="native")
        assert np.array_equal(y, want)
        r = comm.reduce(x, root=P - 1, algorithm="native")
        if R == P - 1:
            assert np.array_equal(r, want)
        b = comm.broadcast(x if R == 1 else np.zeros(n), root=1, algorithm="native")
        assert np.array_equal(b, base * 2)
        if n % P == 0:
            rs = comm.reduce_scatter(x, algorithm="native")
            k = n // P
            assert np.array_equal(rs, want[R * k:(R + 1) * k]), (n, rs[:4], want[R * k:R * k + 4])
        g = comm.allgather(x, algorithm="native")
        assert np.array_equal(g, np.concatenate([base * (q + 1) for q in range(P)]))
        passed += 1
    # Small integers wrap in C and NumPy; Open MPI's vectorised SUM saturated them from 64 elements on.
    for dt in (np.int8, np.uint8, np.int16, np.uint16):
        info = np.iinfo(dt)
        xs = [np.random.default_rng(q).integers(info.min, info.max, 5000, dtype=dt, endpoint=True) for q in range(P)]
        want = xs[0].copy()
        for y in xs[1:]:
            np.add(want, y, out=want)
        for alg in ("native", "ring"):
            got = comm.allreduce(xs[R], algorithm=alg)
            assert np.array_equal(got, want), (np.dtype(dt).name, alg, got[:4], want[:4])
        r = comm.reduce(xs[R], root=0, algorithm="native")
        assert R != 0 or np.array_equal(r, want)
    passed += 1
    print(f"rank {R}: PASSED {passed}", flush=True)


def _pattern(out: np.ndarray, mul: int, add: int) -> None:
    """out[i] = (mul * i + add) mod 256, filled a piece at a time (an index array of 2**31 would be 16 GiB)."""
    step = 1 << 24
    for a in range(0, out.size, step):
        b = min(out.size, a + step)
        out[a:b] = (np.arange(a, b, dtype=np.int64) * mul + add) % 256


def huge() -> None:
    """A 2**31 + 7-element uint8 allreduce by native, checked element by element."""
    comm = col.init()
    n = (1 << 31) + 7
    x = np.empty(n, np.uint8)
    _pattern(x, 3, comm.rank)
    out = comm.allreduce(x, algorithm="native")
    del x
    want = np.empty(1 << 24, np.uint8)
    step = want.size
    P = comm.size
    for a in range(0, n, step):  # sum over ranks r of (3i + r) mod 256, in uint8 arithmetic
        b = min(n, a + step)
        w = want[:b - a]
        w[...] = (np.arange(a, b, dtype=np.int64) * 3 * P + P * (P - 1) // 2) % 256
        assert np.array_equal(out[a:b], w), a
    print(f"rank {comm.rank}: PASSED 1", flush=True)


def _wait_child(pid: int, limit: float = 20.0) -> int:
    """The child's exit status, or an AssertionError if it has not ended within ``limit`` seconds (killed)."""
    t_end = time.monotonic() + limit
    while time.monotonic() < t_end:
        p, st = os.waitpid(pid, os.WNOHANG)
        if p:
            return os.waitstatus_to_exitcode(st)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} did not end within {limit} s (stuck in MPI finalization?)")


def fork_child() -> None:
    """Children forked after init end with sys.exit(n), a normal return or an exception, with their status;
    no exit notice reaches the other ranks, and fork workers of torch's DataLoader keep working."""
    comm = col.init()
    comm.allreduce(np.ones(4, np.float32))
    cases = {"sys.exit(3)": 3, "sys.exit()": 0, "end of main": 0, "uncaught exception": 1, "sys.exit('bye')": 1}
    for what, want in cases.items():
        pid = os.fork()
        if pid == 0:
            if what == "sys.exit(3)":
                sys.exit(3)
            if what == "sys.exit()":
                sys.exit()
            if what == "uncaught exception":
                raise RuntimeError("child fails (expected by the test)")
            if what == "sys.exit('bye')":
                sys.exit("bye")
            return  # "end of main": the interpreter ends normally after main returns
        got = _wait_child(pid)
        assert got == want, (what, got, want)
        # The other ranks must not have been told that this rank exited: a collective still works.
        y = comm.allreduce(np.full(4, comm.rank + 1, np.float32))
        assert (y == comm.size * (comm.size + 1) / 2).all()
    try:
        import torch
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError:
        pass
    else:
        ds = TensorDataset(torch.arange(64, dtype=torch.float32))
        loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="fork")
        total = sum(float(b[0].sum()) for b in loader)
        assert total == float(sum(range(64)))
        y = comm.allreduce(np.full(4, total, np.float32))
        assert (y == total * comm.size).all()
    print(f"rank {comm.rank}: PASSED 1", flush=True)


def _free(comm, a) -> None:
    """comm.free(a): the Communicator method where it exists, else the same steps (drop prepared calls, free in
    op order) spelled out."""
    if hasattr(comm, "free"):
        comm.free(a)
    else:
        comm._prep.forget()
        comm._seqr.run_locked(lambda: comm._engine.free(a))


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def small_shm() -> None:
    """On a small /dev/shm: alloc and shm allreduce either work (checked) or raise SharedMemoryError saying what
    to do, never SIGBUS; argv[2] is the alloc size in MiB, argv[3] the allreduce size in MiB."""
    from collective.errors import SharedMemoryError

    comm = col.init()
    P, R = comm.size, comm.rank
    arena = comm._engine.arena
    print(f"rank {R}: arena chunk {arena.chunk if arena is not None else None}", flush=True)
    alloc_mib, ar_mib = int(sys.argv[2]), int(sys.argv[3])
    n = ar_mib << 18  # float32
    x = np.full(n, R + 1, np.float32)
    x[::4097] = R
    want = np.full(n, P * (P + 1) / 2, np.float32)
    want[::4097] = P * (P - 1) / 2
    try:
        g = comm.alloc(alloc_mib << 18, np.float32)
    except SharedMemoryError as exc:
        print(f"rank {R}: ALLOC REFUSED {exc}", flush=True)
        g = None
    else:
        g[:] = R + 1
        comm.allreduce(g, out=g, algorithm="shm")
        assert (g == P * (P + 1) / 2).all()
    y = comm.allreduce(x, algorithm="shm")
    assert np.array_equal(y, want)
    y = comm.allreduce(x)  # auto
    assert np.array_equal(y, want)
    print(f"rank {R}: PASSED 1", flush=True)


def free_rounds() -> None:
    """comm.free: 50 rounds of alloc 8 MiB + free keep /dev/shm flat; bad frees raise on every rank."""
    from collective.errors import CollectiveValueError

    comm = col.init()
    P, R = comm.size, comm.rank
    comm.barrier()
    base = _shm_used()
    for i in range(50):
        g = comm.alloc(2 << 20, np.float32)  # 8 MiB on every rank
        g[:] = R + i
        comm.allreduce(g, out=g, algorithm="shm")
        assert g[0] == sum(q + i for q in range(P))
        _free(comm, g)
        assert not g.flags.writeable
        if R == 0 and i % 10 == 0:
            print(f"round {i}: /dev/shm used {(_shm_used() - base) >> 20} MiB above the start", flush=True)
    comm.barrier()
    grown = _shm_used() - base
    assert grown < (8 << 20), f"/dev/shm grew by {grown} bytes over 50 alloc+free rounds"
    passed = 1
    # A view still alive: every rank refuses (rank 0 holds one), nothing is freed, the array still works.
    g = comm.alloc(1 << 16, np.float32)
    v = g[:100] if R == 0 else None
    try:
        _free(comm, g)
    except CollectiveValueError as exc:
        assert "nothing was freed" in str(exc), exc
        assert R != 0 or "still use its memory" in str(exc), exc
    else:
        raise AssertionError("free with a live view did not raise")
    del v
    g[:] = 1
    comm.allreduce(g, out=g, algorithm="shm")
    assert (g == P).all()
    _free(comm, g)
    passed += 1
    # Not an alloc'd array on one rank: every rank raises.
    h = comm.alloc(1024, np.float32)
    try:
        _free(comm, h if R != P - 1 else np.zeros(1024, np.float32))
    except CollectiveValueError as exc:
        assert R != P - 1 or "not an array from comm.alloc" in str(exc), exc
    else:
        raise AssertionError("free of a plain array did not raise")
    _free(comm, h)
    try:
        _free(comm, h)  # twice
    except CollectiveValueError as exc:
        assert "freed already" in str(exc), exc
    else:
        raise AssertionError("a second free did not raise")
    passed += 1
    keep = comm.alloc(4096, np.uint8)  # left to close(), which frees what is still allocated
    keep[:] = 7
    comm.close()
    comm.barrier() if False else None
    print(f"rank {R}: PASSED {passed}", flush=True)


def tiny_shm() -> None:
    """A /dev/shm too small for any arena: init says so, or (where the communicator makes the arena optional)
    works without it: auto picks no shm, and shm and alloc raise the same SharedMemoryError."""
    from collective.errors import SharedMemoryError

    try:
        comm = col.init()
    except SharedMemoryError as exc:
        print(f"INIT REFUSED {exc}", flush=True)
        print("PASSED 1", flush=True)
        return
    x = np.ones(1 << 16, np.float32)
    assert (comm.allreduce(x) == comm.size).all()
    assert comm.trace()[-1].algorithm != "shm", comm.trace()[-1].algorithm
    for call in (lambda: comm.allreduce(x, algorithm="shm"), lambda: comm.alloc(1024)):
        try:
            call()
        except SharedMemoryError as exc:
            print(f"SHM REFUSED {exc}", flush=True)
        else:
            raise AssertionError("shm without an arena did not raise")
    assert (comm.allreduce(x) == comm.size).all()
    print("PASSED 1", flush=True)


def no_deadline() -> None:
    """COLLECTIVE_TIMEOUT=inf: alloc, free, subgroup, split and close (the calls under a deadline of their own)
    run with no deadline at all, and collectives still give the right results."""
    comm = col.init()
    assert comm.watchdog.timeout == float("inf"), comm.watchdog.timeout
    P, R = comm.size, comm.rank
    g = comm.alloc(1 << 12, np.float32)
    g[:] = R + 1
    comm.allreduce(g, out=g)
    assert (g == P * (P + 1) / 2).all()
    _free(comm, g)
    sub = comm.subgroup(range(P))
    y = sub.allreduce(np.full(16, R + 1, np.float32))
    assert (y == P * (P + 1) / 2).all()
    sub.close()
    half = comm.split(R % 2)
    assert half.size == len(range(R % 2, P, 2))
    half.close()
    time.sleep(0.2)  # a deadline thread that failed would have ended the job by now
    comm.close()
    print(f"rank {R}: PASSED 1", flush=True)


if __name__ == "__main__":
    {"busy_rank": busy_rank, "gone_rank": gone_rank, "native_pieces": native_pieces, "huge": huge,
     "fork_child": fork_child, "small_shm": small_shm, "free_rounds": free_rounds, "tiny_shm": tiny_shm,
     "no_deadline": no_deadline}[sys.argv[1]]()
