"""Every route of an allreduce through the op core: the same sequence numbers, records and check verdicts on every rank.

Routes: the one-phase shm path (a repeated small allreduce), the window path (alloc'd arrays, armed and not), MPI's
own, a Schedule, async, and the device path (arrays that only expose ``__cuda_array_interface__``, staged through
fake device copies). After each, every rank's newest flight-recorder entry must agree (sequence number, op,
algorithm), and a mismatch made on that route must raise on every rank.
"""
from __future__ import annotations

import zlib

import numpy as np

import collective as col
from collective.backends.device import DeviceCollectives
from collective.backends.gpu_staging import GpuStager
from collective.errors import CollectiveMismatchError
from gpu_fakes import FakeOps, HostCudaArray
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(col.Communicator())  # its own: the last case closes the default communicator
mpi = comm.mpi_comm


def agree(route: str, algorithm_prefix: str) -> None:
    """Every rank's newest record has the same seq, op and algorithm, and the algorithm is the route's."""
    rec = comm.trace()[-1]
    mine = np.array([rec.seq, zlib.crc32(rec.op.encode()), zlib.crc32(str(rec.algorithm).encode())], np.int64)
    every = np.empty((P, 3), np.int64)
    mpi.Allgather(mine, every)
    assert (every == every[0]).all(), f"{route}: ranks' newest records differ: {every.tolist()}"
    assert str(rec.algorithm).startswith(algorithm_prefix), f"{route}: ran {rec.algorithm}, not {algorithm_prefix}"
    assert rec.t_end is not None and rec.t_end >= rec.t_start


def mismatch_raises(route: str, call) -> None:
    if P == 1:  # one rank cannot disagree with itself
        return
    try:
        call()
    except CollectiveMismatchError:
        return
    raise AssertionError(f"{route}: a mismatch did not raise CollectiveMismatchError on rank {R}")


def expect(a: np.ndarray, v: float) -> None:
    assert (a == v).all(), f"rank {R}: got {a.ravel()[:4]}..., expected {v}"


total = P * (P + 1) / 2


def one_phase() -> None:
    x = np.full(1000, R + 1, np.float32)
    for _ in range(4):  # the third call on is the armed template
        expect(comm.allreduce(x), total)
        agree("one-phase", "shm" if P > 1 else "native")
    if comm.sequencer.check.quick_arena is not None:
        assert any(t.quick for t in comm.sequencer.prep.templates.values()), "one-phase path never armed"
        # A mismatch on the armed path: the same shape, another op on the last rank.
        mismatch_raises("one-phase", lambda: comm.allreduce(x, op="max" if R == P - 1 else "sum"))
        expect(comm.allreduce(x), total)  # and the path still works afterwards, in step on every rank
        agree("one-phase after mismatch", "shm")
    # The same path bound to one array (Sequencer.bind_allreduce, the torch backend's), in place.
    y = np.empty((10, 100), np.float32)
    run = comm.sequencer.bind_allreduce(y, "sum")
    for _ in range(4):
        y[:] = R + 1
        assert run() is y
        expect(y, total)
        agree("one-phase bound", "shm" if P > 1 else "native")
    y[:] = R + 1
    # A mismatch on the bound path: the last rank binds another op to the same array.
    mismatch_raises("one-phase bound", comm.sequencer.bind_allreduce(y, "max") if R == P - 1 else run)
    y[:] = R + 1
    run()
    expect(y, total)
    agree("one-phase bound after mismatch", "shm" if P > 1 else "native")


def window() -> None:
    g = comm.alloc(col.WINDOW_MIN_BYTES // 4, np.float32)
    for _ in range(4):
        g[:] = R + 1
        comm.allreduce(g, out=g, algorithm="shm")
        expect(g, total)
        agree("window", "shm-window#")
    armed = [h for h in comm.sequencer.prep.hot_calls() if h.quick is not False]
    if comm.sequencer.check.quick_arena is not None:
        assert armed, "window path never armed"
        plain = np.full(g.size, R + 1, np.float32)
        # The last rank passes a plain array where the others pass their window: the names differ.
        mismatch_raises("window", lambda: comm.allreduce(plain if R == P - 1 else g, out=plain if R == P - 1 else g,
                                                         algorithm="shm"))
        g[:] = R + 1
        comm.allreduce(g, out=g, algorithm="shm")
        expect(g, total)
        agree("window after mismatch", "shm-window#")
    run = comm.sequencer.bind_allreduce(g, "sum")  # at the window's size a bound call is the plain one
    for _ in range(3):
        g[:] = R + 1
        run()
        expect(g, total)
        agree("window bound", "shm-window#" if P > 1 else "native")


def native_and_schedules() -> None:
    for alg in ("native", "ring", "tree", "hierarchical"):
        x = np.full(5000, R + 1, np.float64)
        expect(comm.allreduce(x, algorithm=alg), total)
        agree(alg, alg)
        mismatch_raises(alg, lambda: comm.allreduce(np.ones(5000 + (R == P - 1), np.float64), algorithm=alg))


def async_route() -> None:
    ws = [comm.allreduce_async(np.full(3000, R + 1, np.float32), algorithm=a) for a in ("ring", "native", "shm")]
    for w in ws:
        expect(w.wait(), total)
    agree("async", "shm" if P > 1 else "native")
    w = comm.allreduce_async(np.ones(3000 + (R == P - 1), np.float32), algorithm="ring")
    mismatch_raises("async", w.wait)


def device_route() -> None:
    ops = FakeOps()
    dev = DeviceCollectives(comm, "auto", stager=GpuStager(ops), cuda_aware=False, nccl_problem="no CUDA device")
    x = HostCudaArray(np.full(700, R + 1, np.float32))
    before = comm.trace()[-1].seq
    y = dev.call("allreduce", x, algorithm="ring")
    expect(y.a, total)
    agree("device", "ring")
    assert comm.trace()[-1].seq > before
    bad = HostCudaArray(np.full(700 + (R == P - 1), R + 1, np.float32))
    mismatch_raises("device", lambda: dev.call("allreduce", bad, algorithm="ring"))


def closed() -> None:
    """A closed communicator raises our error on every call; init() after closing the default gives a new one."""
    from collective.errors import CollectiveError

    c = col.Communicator()
    x = np.ones(10, np.float32)
    for _ in range(3):
        c.allreduce(x)  # the repeat path armed, then gone with close()
    run = c.sequencer.bind_allreduce(x, "sum")
    for _ in range(3):
        run()  # the bound path armed: its template dropped by close()
    c.close()
    c.close()  # a second close does nothing
    for call in (lambda: c.allreduce(x), run, lambda: c.allreduce_async(x), lambda: c.broadcast(x), c.barrier,
                 lambda: c.alloc(4)):
        try:
            call()
        except CollectiveError as exc:
            assert "closed" in str(exc), exc
        else:
            raise AssertionError("a call on a closed communicator did not raise")
    old = col.init()
    old.close()
    assert not col.is_initialized()
    new = col.init()
    assert new is not old and not new.closed
    expect(new.allreduce(np.ones(3)), P)


for name, fn in [("one-phase", one_phase), ("window", window), ("native and schedules", native_and_schedules),
                 ("async", async_route), ("device", device_route), ("closed", closed)]:
    if P == 1 and name not in ("one-phase", "native and schedules", "closed"):
        continue
    cases.run(name, fn)
cases.finish()
