"""Stand-ins that let the GPU code run without a GPU: host memory dressed as device arrays, and an in-process NCCL.

* ``HostCudaArray`` -- a NumPy array seen only through ``__cuda_array_interface__``
  (no buffer protocol, no ``__array_interface__``), with a ``stream`` field.
* ``FakeOps`` -- the stager's device calls over host memory (``ctypes.memmove``),
  recording every call so tests can check the order (stream synchronised first).
* ``FakeNccl`` -- NCCL for P threads of one process: ``send``/``recv`` in groups
  with rendezvous semantics (a group ends only when its sends were received, as
  on a GPU, so a Schedule that needs buffered sends deadlocks here too), and the
  five collectives, which check that every rank passed the same arguments.
* ``FakeDevice`` -- the NCCL backend's device side over NumPy.
"""
from __future__ import annotations

import contextlib
import ctypes
import operator
import threading
from collections import defaultdict, deque
from typing import Any, Callable

import numpy as np

# ncclDataType_t and ncclRedOp_t as nccl.h numbers them (independent of collective's own table).
NCCL_H_TYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64, 6: np.float16,
                7: np.float32, 8: np.float64}
NCCL_H_OPS = {0: np.add, 1: np.multiply, 2: np.maximum, 3: np.minimum}


def host_ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


class HostCudaArray:
    """A NumPy array that only exposes ``__cuda_array_interface__`` (version 3), like a CuPy array would."""

    def __init__(self, a: np.ndarray, stream: int | None = 7, readonly: bool = False) -> None:
        self.a = a
        self.stream = stream
        self.readonly = readonly

    @property
    def __cuda_array_interface__(self) -> dict:
        a = self.a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (host_ptr(a), self.readonly), "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides, "stream": self.stream}

    @property
    def shape(self) -> tuple:
        return self.a.shape

    @property
    def dtype(self) -> np.dtype:
        return self.a.dtype


class FakeOps:
    """The stager's device calls over host memory; ``calls`` records (name, args) in order."""

    COPY_STREAM = 99

    def __init__(self, result_stream: int | None = 5) -> None:
        self.calls: list[tuple] = []
        self.pinned: list[np.ndarray] = []
        self.result_stream = result_stream

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        b = np.empty(nbytes, np.uint8)
        self.pinned.append(b)
        self.calls.append(("alloc_pinned", nbytes))
        return b

    def copy_stream(self) -> int:
        return self.COPY_STREAM

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.calls.append(("d2h", nbytes, stream))
        ctypes.memmove(dst, src, nbytes)

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.calls.append(("h2d", nbytes, stream))
        ctypes.memmove(dst, src, nbytes)

    def sync(self, stream: int) -> None:
        self.calls.append(("sync", stream))

    def empty(self, shape: tuple, dtype: Any) -> HostCudaArray:
        self.calls.append(("empty", tuple(shape)))
        return HostCudaArray(np.empty(shape, dtype), stream=self.result_stream)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


# ---------------------------------------------------------------- fake NCCL
class FakeNcclError(RuntimeError):
    pass


class FakeNcclWorld:
    """The shared state of P fake NCCL ranks (threads of one process)."""

    def __init__(self, nranks: int, timeout: float = 10.0) -> None:
        self.P = nranks
        self.timeout = timeout
        self.cv = threading.Condition()
        self.chan: dict[tuple[int, int], deque] = defaultdict(deque)
        self.barrier = threading.Barrier(nranks, timeout=timeout)
        self.slots: list[Any] = [None] * nranks
        self.groups = [0] * nranks  # groups run per rank
        self.collectives = [0] * nranks

    def _group(self, rank: int, ops: list[tuple]) -> None:
        self.groups[rank] += 1
        sends = [o for o in ops if o[0] == "send"]
        recvs = [o for o in ops if o[0] == "recv"]
        posted = []
        with self.cv:
            for _, ptr, count, dt, peer in sends:
                nbytes = count * np.dtype(NCCL_H_TYPES[dt]).itemsize
                m = [ctypes.string_at(ptr, nbytes) if nbytes else b"", False]
                self.chan[(rank, peer)].append(m)
                posted.append(m)
            self.cv.notify_all()
            for _, ptr, count, dt, peer in recvs:
                q = self.chan[(peer, rank)]
                if not self.cv.wait_for(lambda: len(q) > 0, self.timeout):
                    raise FakeNcclError(f"fake NCCL: rank {rank} waits for a message from {peer}: deadlock")
                m = q.popleft()
                nbytes = count * np.dtype(NCCL_H_TYPES[dt]).itemsize
                if len(m[0]) != nbytes:
                    raise FakeNcclError(f"fake NCCL: rank {rank} receives {nbytes} B from {peer}, which sent "
                                        f"{len(m[0])}")
                if nbytes:
                    ctypes.memmove(ptr, m[0], nbytes)
                m[1] = True
            self.cv.notify_all()
            if not self.cv.wait_for(lambda: all(m[1] for m in posted), self.timeout):
                raise FakeNcclError(f"fake NCCL: rank {rank}'s sends were never received: deadlock")

    def _collective(self, rank: int, kind: str, sptr: int, rptr: int, count: int, dt: int, op: int | None,
                    root: int | None) -> None:
        self.collectives[rank] += 1
        dtype = np.dtype(NCCL_H_TYPES[dt])
        n_in = count * self.P if kind == "reduceScatter" else count
        data = np.empty(0, dtype)
        if n_in:
            data = np.frombuffer(ctypes.string_at(sptr, n_in * dtype.itemsize), dtype).copy()
        self.slots[rank] = ((kind, count, dt, op, root), data)
        self.barrier.wait()
        sigs = {s[0] for s in self.slots}
        try:
            if len(sigs) != 1:
                raise FakeNcclError(f"fake NCCL: ranks called different collectives: {sorted(map(str, sigs))}")
            bufs = [s[1] for s in self.slots]
            out = None
            if kind in ("allReduce", "reduce", "reduceScatter"):
                acc = bufs[0].copy()
                with np.errstate(all="ignore"):  # padding NCCL reduces too may hold any bits
                    for b in bufs[1:]:
                        acc = NCCL_H_OPS[op](acc, b)
                if kind == "allReduce" or (kind == "reduce" and rank == root):
                    out = acc
                elif kind == "reduceScatter":
                    out = acc[rank * count:(rank + 1) * count]
            elif kind == "broadcast":
                out = bufs[root]
            elif kind == "allGather":
                out = np.concatenate(bufs)
            if out is not None and out.size:
                out = np.ascontiguousarray(out, dtype)
                ctypes.memmove(rptr, host_ptr(out), out.nbytes)
        finally:
            self.barrier.wait()


def _c_args(count: int, dt: int, *ints: Any) -> None:
    """Convert the arguments as CuPy's Cython signatures do (``intptr_t``/``int``/``size_t``), so a float,
    a None or a negative count fails here as it would on a GPU; and check the datatype is one nccl.h has."""
    for v in (count, dt, *ints):
        operator.index(v)  # TypeError for what Cython's integer conversion refuses
    if operator.index(count) < 0:
        raise OverflowError("can't convert negative value to size_t")
    if dt not in NCCL_H_TYPES:
        raise FakeNcclError(f"fake NCCL: ncclInvalidArgument: datatype {dt}")


class FakeNcclComm:
    """One rank's communicator, with cupy.cuda.nccl.NcclCommunicator's method names, argument order and types.

    The signatures are those of CuPy (13 and 14); tests/test_cupy_api.py checks them against the
    installed CuPy. As in CuPy, ``abort()`` frees the communicator: later calls raise.
    """

    def __init__(self, world: FakeNcclWorld, rank: int, module: "FakeNccl") -> None:
        self.world, self.r, self.module = world, rank, module
        self.calls: list[tuple] = []
        self.aborted = False
        self.async_error: Exception | None = None
        self.fail_next: Exception | None = None

    def _live(self) -> None:
        if self.aborted:  # CuPy sets the ncclComm_t to NULL on abort: NCCL refuses it
            raise FakeNcclError("NCCL_ERROR_INVALID_ARGUMENT: the communicator was aborted")

    def _op(self, *op: Any) -> None:
        self._live()
        self.calls.append(op)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        tl = self.module.tl
        if getattr(tl, "depth", 0) > 0:
            tl.pending.append(op)
        else:
            self.world._group(self.r, [op])

    def send(self, ptr: int, count: int, dt: int, peer: int, stream: int) -> None:
        _c_args(count, dt, ptr, peer, stream)
        self._op("send", ptr, count, dt, peer)

    def recv(self, ptr: int, count: int, dt: int, peer: int, stream: int) -> None:
        _c_args(count, dt, ptr, peer, stream)
        self._op("recv", ptr, count, dt, peer)

    def _coll(self, kind: str, *args: Any) -> None:
        self._live()
        self.calls.append((kind, *args))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.world._collective(self.r, kind, *args)

    # count: elements of dt in each buffer; reduceScatter's is the per-rank (received) count,
    # allGather's the per-rank (sent) count, as in nccl.h.
    def allReduce(self, s: int, r: int, count: int, dt: int, op: int, stream: int) -> None:
        _c_args(count, dt, s, r, op, stream)
        self._coll("allReduce", s, r, count, dt, op, None)

    def reduce(self, s: int, r: int, count: int, dt: int, op: int, root: int, stream: int) -> None:
        _c_args(count, dt, s, r, op, root, stream)
        self._coll("reduce", s, r, count, dt, op, root)

    def broadcast(self, s: int, r: int, count: int, dt: int, root: int, stream: int) -> None:
        _c_args(count, dt, s, r, root, stream)
        self._coll("broadcast", s, r, count, dt, None, root)

    def reduceScatter(self, s: int, r: int, count: int, dt: int, op: int, stream: int) -> None:
        _c_args(count, dt, s, r, op, stream)
        self._coll("reduceScatter", s, r, count, dt, op, None)

    def allGather(self, s: int, r: int, count: int, dt: int, stream: int) -> None:
        _c_args(count, dt, s, r, stream)
        self._coll("allGather", s, r, count, dt, None, None)

    def check_async_error(self) -> None:
        self._live()
        if self.async_error is not None:
            raise self.async_error

    def abort(self) -> None:
        self.aborted = True  # idempotent, as CuPy's (it skips a NULL communicator)

    def destroy(self) -> None:
        pass


class FakeNccl:
    """The module side: groupStart/groupEnd per thread, and the constants cupy.cuda.nccl defines."""

    NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4
    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = 6, 7, 8, 9

    def __init__(self, world: FakeNcclWorld) -> None:
        self.world = world
        self.tl = threading.local()
        self.comms = [FakeNcclComm(world, r, self) for r in range(world.P)]

    def groupStart(self) -> None:
        tl = self.tl
        if getattr(tl, "depth", 0) == 0:
            tl.pending = []
        tl.depth = getattr(tl, "depth", 0) + 1

    def groupEnd(self) -> None:
        tl = self.tl
        tl.depth -= 1
        if tl.depth == 0 and tl.pending:
            ops, tl.pending = tl.pending, []
            self.world._group(self.tl.rank, ops)


class FakeEvent:
    def __init__(self, done: bool = True) -> None:
        self.done = done


class FakeDevice:
    """The NCCL backend's device side over NumPy: no streams, events that are already done (or not)."""

    xp = np
    device_id = 0
    stream_ptr = 4242

    def __init__(self) -> None:
        self.waited: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.event_done = True

    def ptr(self, a: np.ndarray) -> int:
        return host_ptr(a)

    def device_of(self, a: Any) -> int:
        return 0

    def on_stream(self) -> Any:
        return contextlib.nullcontext()

    def wait_for_caller(self, streams: tuple = ()) -> None:
        self.waited.append(tuple(streams))

    def release_to_caller(self) -> FakeEvent:
        ev = FakeEvent(self.event_done)
        self.events.append(ev)
        return ev

    def done(self, ev: FakeEvent) -> bool:
        return ev.done


def make_backends(P: int, nodes: tuple | None = None, **kw: Any) -> tuple[FakeNcclWorld, FakeNccl, list]:
    """P NCCL backends over one fake world (one per rank; each must be driven from its own thread)."""
    from collective.backends.nccl import NCCLBackend

    world = FakeNcclWorld(P)
    mod = FakeNccl(world)
    kw.setdefault("timeout", 30.0)
    kw.setdefault("watch_thread", False)
    bes = [NCCLBackend(mod.comms[r], r, P, nccl=mod, device=FakeDevice(), nodes=nodes, **kw) for r in range(P)]
    return world, mod, bes


def run_ranks(mod: FakeNccl, P: int, fn: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank)`` on P threads (the fake NCCL knows each thread's rank); re-raise the first failure."""
    results: list[Any] = [None] * P
    errors: list[BaseException | None] = [None] * P

    def body(r: int) -> None:
        mod.tl.rank = r
        try:
            results[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised below with its rank
            errors[r] = exc
            try:
                mod.world.barrier.abort()  # release the other ranks from a collective they wait in
            except Exception:  # noqa: BLE001
                pass
            with mod.world.cv:
                mod.world.cv.notify_all()

    ts = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(P)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    if any(t.is_alive() for t in ts):
        raise TimeoutError(f"fake NCCL ranks still running after {timeout} s")
    for r, e in enumerate(errors):
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise AssertionError(f"rank {r}: {type(e).__name__}: {e}") from e
    for r, e in enumerate(errors):
        if e is not None:
            raise AssertionError(f"rank {r}: {type(e).__name__}: {e}") from e
    return results
