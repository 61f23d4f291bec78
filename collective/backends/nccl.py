"""The NCCL backend over cupy.cuda.nccl: MPI bootstrap, NCCL's own collectives as `native`, Schedules over send/recv.

Terms (the names below follow them):

* **tables** -- ``NCCL_DTYPES`` and ``NCCL_OPS`` map NumPy dtype names and our
  op names to NCCL's enum values (``ncclDataType_t``, ``ncclRedOp_t``). They
  are plain integers, so this module imports, and its tables are tested,
  without CuPy; where CuPy is present the values are checked against
  ``cupy.cuda.nccl``'s constants when a communicator is made.
* **native** -- NCCL's own ``allReduce``/``reduce``/``broadcast``/
  ``reduceScatter``/``allGather``. Collectives without reduction move bytes
  (any dtype). ``avg`` is a sum followed by our own division (integers
  floor-divide, as on the CPU). complex sum/avg travel as pairs of floats.
  Uneven reduce_scatter blocks are padded to the largest block.
* **scheduled** -- a topologies Schedule (ring, tree, star, hierarchical) run
  over NCCL ``send``/``recv``: one NCCL group per step (so a step's transfers
  progress together and the next step starts after them, in stream order),
  receives that reduce land in a scratch buffer and are combined by a CuPy
  kernel on the same stream. No host synchronisation inside a collective.
* **comm stream** -- every NCCL call and kernel of this backend runs on one
  private CUDA stream. It first waits (an event, not the host) for the work
  already queued on the caller's current stream, and the caller's stream
  then waits for the collective: results are ready in stream order, as with
  NCCL itself and torch.distributed.
* **watch** -- :class:`NcclWatch` follows the enqueued collectives (one CUDA
  event each), polls ``ncclCommGetAsyncError`` while anything is in flight,
  and on an asynchronous error or a missed deadline aborts the NCCL
  communicator (``ncclCommAbort``, which frees stuck kernels) and then the
  job, as the watchdog does for MPI.

The CuPy calls sit behind :class:`CupyDevice` and the NCCL module is an
argument, so tests run the backend over NumPy arrays and an in-process fake
NCCL without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from collective import topologies

from .. import config
from ..engine import schedule_result, schedule_work
from ..errors import (
    BackendUnavailableError,
    CollectiveError,
    CollectiveTimeoutError,
    CollectiveTypeError,
    CollectiveValueError,
    describe,
)
from ..executor import Plan, compile_plan, no_reduction
from ..ops import ReduceOp
from ..signature import cached_checks, check_algorithm, check_out, check_signature, overlap
from ..spec import COLLECTIVE_NAMES, NCCL_ALGORITHMS, REDUCING, ROOTED

__all__ = [
    "NCCL_DTYPES", "NCCL_OPS", "NCCL_BYTE", "MIN_VERSION", "DTYPE_MIN_VERSION", "ALGORITHMS",
    "version_text", "nccl_datatype", "native_plan", "probe", "bootstrap_unique_id", "unique_id_forms",
    "new_communicator", "pick_device",
    "gpus_per_rank_problem", "check_constants", "CupyDevice", "NcclWatch", "NcclWork", "NcclCall", "NCCLBackend",
]

# ------------------------------------------------------------------ tables
#: NumPy dtype name -> ncclDataType_t (nccl.h). int16/uint16 and complex have none.
NCCL_DTYPES: dict[str, int] = {
    "int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
    "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9,
}
#: Our op name -> ncclRedOp_t. avg is NCCL's sum followed by our division: ncclAvg (4, NCCL 2.10+) truncates
#: integer averages toward zero, the CPU path floor-divides, and NCCL 2.7-2.9 has no ncclAvg.
NCCL_OPS: dict[str, int] = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 0}
#: Bytes: what collectives without reduction and every send/recv move.
NCCL_BYTE: int = NCCL_DTYPES["uint8"]
#: Oldest NCCL this backend uses: ncclSend/ncclRecv arrived in 2.7.
MIN_VERSION: int = 2700
#: Dtypes that need a newer NCCL than MIN_VERSION.
DTYPE_MIN_VERSION: dict[str, int] = {"bfloat16": 21000}
#: Algorithms the NCCL backend runs ("shm" is host memory only).
ALGORITHMS: tuple[str, ...] = NCCL_ALGORITHMS
#: cupy.cuda.nccl constant name -> our table's value, checked when a communicator is made.
_CONSTANTS: dict[str, int] = {
    **{f"NCCL_{k.upper()}": v for k, v in NCCL_DTYPES.items()},
    "NCCL_SUM": 0, "NCCL_PROD": 1, "NCCL_MAX": 2, "NCCL_MIN": 3,
}
_ROOTED = ROOTED
_REDUCING = REDUCING
_NAMES = COLLECTIVE_NAMES
#: One message per transfer: NCCL pipelines inside a send itself, so Schedules are not segmented here.
_ONE_SEGMENT = 1 << 62


def version_text(code: int) -> str:
    """NCCL's version code as "major.minor.patch" (2.9+ codes are major*10000 + minor*100 + patch).

    Example::

        version_text(21803)   # "2.18.3"
        version_text(2708)    # "2.7.8"
    """
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def nccl_datatype(dtype: Any, version: int | None = None) -> int | None:
    """The ncclDataType_t of ``dtype``, or None if NCCL has none (or ``version`` is too old for it).

    Example::

        nccl_datatype(np.float32)   # 7
        nccl_datatype(np.int16)     # None
    """
    dt = np.dtype(dtype)
    name = dt.name
    code = NCCL_DTYPES.get(name)
    if code is None or dt.byteorder == ">":
        return None
    need = DTYPE_MIN_VERSION.get(name)
    if need is not None and version is not None and version < need:
        return None
    return code


def native_plan(collective: str, dtype: Any, op: str | None, version: int | None = None) -> tuple[int, int, int] | str:
    """How NCCL's own collective moves this call: ``(datatype, elements per array element, op)``, or why it cannot.

    Collectives without reduction move bytes (every dtype); complex sum/avg
    reduce the real and imaginary parts as two floats; other reductions need a
    dtype in ``NCCL_DTYPES``.

    Args:
        collective: "allreduce", "reduce", "broadcast", "reduce_scatter" or "allgather".
        dtype: element type.
        op: our op name ("sum", "avg", "prod", "min", "max"); ignored without reduction.
        version: NCCL's version code (bfloat16 needs 2.10), or None to not check.

    Returns:
        The triple, or a sentence saying why and what to use instead.

    Example::

        native_plan("allreduce", np.float32, "sum")      # (7, 1, 0)
        native_plan("allgather", np.int16, None)         # (1, 2, 0): bytes
        native_plan("allreduce", np.complex64, "sum")    # (7, 2, 0): float pairs
    """
    dt = np.dtype(dtype)
    if collective not in _REDUCING:
        return NCCL_BYTE, dt.itemsize, 0
    opc = NCCL_OPS.get(op or "")
    if opc is None:
        return f"NCCL has no op {op!r}"
    code = nccl_datatype(dt, version)
    if code is not None:
        return code, 1, opc
    if dt.kind == "c" and op in ("sum", "avg"):
        part = nccl_datatype(np.dtype(f"f{dt.itemsize // 2}"), version)
        if part is not None:
            return part, 2, opc
    if dt.name in DTYPE_MIN_VERSION and version is not None:
        return (f"NCCL {version_text(version)} has no {dt.name} (needs {version_text(DTYPE_MIN_VERSION[dt.name])}); "
                "use algorithm ring, tree or star (CuPy reduces those)")
    what = f"{dt} with op {op!r}" if dt.kind == "c" else str(dt)
    return f"NCCL has no datatype for {what}; use algorithm ring, tree or star (CuPy reduces those)"


# ------------------------------------------------------------ availability
_PROBED: list[str | None] = []


def probe(importer: Callable[[str], Any] | None = None) -> str | None:
    """None if NCCL through CuPy is usable in this process, else the reason it is not.

    Checks, in order: CuPy imports, it has NCCL, a CUDA device is visible,
    NCCL is new enough for send/recv. The answer with the default importer is
    cached (it does not change within a process).

    Args:
        importer: ``importlib.import_module`` (default); tests pass a fake.

    Example::

        probe()   # e.g. "cupy not installed (pip install 'pycollective[gpu]')"
    """
    if importer is None:
        if not _PROBED:
            _PROBED.append(probe(importlib.import_module))
        return _PROBED[0]
    try:
        cupy = importer("cupy")
    except ImportError as exc:
        if getattr(exc, "name", None) == "cupy":
            return "cupy not installed (pip install 'pycollective[gpu]')"
        return f"cupy cannot be imported ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install raises anything at import
        return f"cupy cannot be imported ({type(exc).__name__}: {exc})"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - no driver, no device, or a driver/runtime mismatch
        return f"no CUDA device (the CUDA runtime says: {type(exc).__name__}: {exc})"
    if n < 1:
        return "no CUDA device"
    try:
        with warnings.catch_warnings():  # CuPy warns when libnccl cannot be loaded: the reason below says it
            warnings.simplefilter("ignore")
            nccl = importer("cupy.cuda.nccl")
    except Exception as exc:  # noqa: BLE001
        return f"cupy has no NCCL support ({type(exc).__name__}: {exc}); install NCCL (pip install nvidia-nccl-cu12)"
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        return ("NCCL is not available to CuPy (libnccl could not be loaded, or CuPy was built without it); "
                "install it: pip install nvidia-nccl-cu12")
    try:
        v = int(nccl.get_version())
    except Exception:  # noqa: BLE001 - ncclGetVersion is missing before 2.3.4
        v = 0
    if v < MIN_VERSION:
        have = version_text(v) if v else "older than 2.3.4"
        return f"NCCL {have} is too old: send/recv need NCCL {version_text(MIN_VERSION)} or newer"
    return None


def check_constants(nccl: Any) -> None:
    """Raise BackendUnavailableError if ``nccl``'s constants disagree with our tables (a future renumbering)."""
    bad = []
    for name, want in _CONSTANTS.items():
        have = getattr(nccl, name, None)
        if have is not None and int(have) != want:
            bad.append(f"{name}={have} (expected {want})")
    if bad:
        raise BackendUnavailableError("cupy.cuda.nccl's constants differ from collective's NCCL tables: "
                                      + ", ".join(bad) + "; update collective.backends.nccl")


def pick_device(local_rank: int, device_count: int, env: dict[str, str] | None = None) -> int:
    """The CUDA device of a rank: ``COLLECTIVE_CUDA_DEVICE`` if set, else local_rank modulo the visible devices.

    Example::

        pick_device(local_rank=3, device_count=2)   # 1
    """
    d = config.get("CUDA_DEVICE", env)
    if d is not None:
        if not d < device_count:
            raise CollectiveValueError(f"COLLECTIVE_CUDA_DEVICE={d} but {device_count} CUDA device(s) are visible")
        return d
    if device_count < 1:
        raise BackendUnavailableError("no CUDA device")
    return local_rank % device_count


def gpus_per_rank_problem(local_size: int, device_count: int) -> str | None:
    """Why NCCL cannot serve the ranks of one node, or None: NCCL needs a GPU of its own for every rank.

    Example::

        gpus_per_rank_problem(local_size=4, device_count=1)
        # "4 ranks on this node share 1 GPU; NCCL needs one GPU per rank (..."
    """
    if local_size <= device_count:
        return None
    return (f"{local_size} ranks on this node share {device_count} GPU(s); NCCL needs one GPU per rank (run at most "
            f"{device_count} rank(s) per node, or use backend 'mpi')")


def bootstrap_unique_id(mpi_comm: Any, local_problem: str | None,
                        make_id: Callable[[], Sequence[int]]) -> tuple[int, ...]:
    """Agree over MPI that every rank can use NCCL, then give every rank the unique id rank 0 made.

    Collective over ``mpi_comm``. If some rank cannot use NCCL, or rank 0
    cannot make the id, every rank raises BackendUnavailableError naming the
    rank(s) and the reason: nobody is left waiting in ncclCommInitRank.

    Args:
        mpi_comm: an mpi4py communicator (uppercase buffer calls only).
        local_problem: why NCCL is not usable on this rank, or None.
        make_id: ``cupy.cuda.nccl.get_unique_id`` (called on rank 0 only): 128 bytes
            (CuPy 14+) or a tuple of 128 C ``char`` values (CuPy 13).

    Returns:
        The id's 128 values as ints, as rank 0's ``make_id`` gave them (0..255 from
        bytes, -128..127 from CuPy 13 on x86); :func:`new_communicator` turns them
        into the form the installed CuPy takes.

    Example::

        uid = bootstrap_unique_id(comm, probe(), nccl.get_unique_id)
        nc = new_communicator(nccl, comm.Get_size(), uid, comm.Get_rank())
    """
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    mine = np.array([0 if local_problem is None else 1], np.int64)
    every = np.empty(size, np.int64)
    mpi_comm.Allgather(mine, every)
    bad = [int(r) for r in np.flatnonzero(every)]
    if bad:
        ranks = ", ".join(map(str, bad))
        why = f": {local_problem}" if local_problem else " (see that rank's message)"
        raise BackendUnavailableError(f"NCCL is not usable on rank(s) {ranks} of {size}{why}; use backend='mpi' there "
                                      "and everywhere (every rank must use the same backend)")
    # The id is 128 C chars, signed or unsigned by platform: int64 carries either exactly.
    buf = np.zeros(129, np.int64)
    err = ""
    if rank == 0:
        try:
            uid = [int(v) for v in make_id()]
            if len(uid) != 128:
                raise ValueError(f"the unique id has {len(uid)} entries, expected 128")
            buf[1:] = uid
        except Exception as exc:  # noqa: BLE001 - told to every rank below
            buf[0] = 1
            err = f"{type(exc).__name__}: {exc}"
    mpi_comm.Bcast(buf, root=0)
    if buf[0]:
        raise BackendUnavailableError(f"rank 0 could not create the NCCL unique id ({err or 'see rank 0'})")
    return tuple(int(v) for v in buf[1:])


def unique_id_forms(uid: Sequence[int]) -> list[Any]:
    """The NCCL unique id in each form a ``NcclCommunicator`` of some CuPy takes, most recent CuPy first.

    CuPy 14+ takes ``bytes`` (``NcclCommunicator(int ndev, bytes commId, int rank)``);
    CuPy 13 takes a ``tuple`` whose items it stores in C ``char``: -128..127 where char
    is signed (x86), 0..255 where it is unsigned (aarch64, ppc64le).

    Example::

        unique_id_forms([255] * 128)   # [b"\\xff" * 128, (-1,) * 128, (255,) * 128]
    """
    raw = bytes(int(v) & 0xFF for v in uid)
    return [raw, tuple(v - 256 if v > 127 else v for v in raw), tuple(raw)]


def new_communicator(nccl: Any, size: int, uid: Sequence[int], rank: int) -> Any:
    """``nccl.NcclCommunicator(size, uid, rank)`` with the id in the form the installed CuPy takes.

    Only argument conversion is retried: CuPy rejects an id of the wrong type
    (TypeError) or a char out of range (OverflowError) before it calls
    ``ncclCommInitRank``, so every rank still joins the communicator exactly once.
    """
    errors = []
    for form in unique_id_forms(uid):
        try:
            return nccl.NcclCommunicator(size, form, rank)
        except (TypeError, OverflowError) as exc:
            errors.append(f"{type(form).__name__}: {type(exc).__name__}: {exc}")
    raise BackendUnavailableError("cupy.cuda.nccl.NcclCommunicator took the NCCL unique id in no known form ("
                                  + "; ".join(errors) + ")")


# ------------------------------------------------------------ device side
class CupyDevice:
    """The CuPy calls the NCCL backend makes: pointers, the comm stream and the events that order it.

    Tests substitute a stand-in with the same methods over NumPy arrays.

    Args:
        cupy: the ``cupy`` module.
        device_id: the CUDA device this rank uses; made current here.
    """

    def __init__(self, cupy: Any, device_id: int) -> None:
        self.xp = cupy
        self.device_id = device_id
        cupy.cuda.Device(device_id).use()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream_ptr: int = int(self.stream.ptr)

    def ptr(self, a: Any) -> int:
        """Device address of ``a``'s first element."""
        return int(a.data.ptr)

    def device_of(self, a: Any) -> int:
        """The device ``a`` lives on."""
        return int(a.device.id)

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Context in which CuPy kernels and allocations run on this rank's device and the comm stream.

        The device is entered first: CuPy refuses ``with stream`` while another device is current.
        """
        with self.xp.cuda.Device(self.device_id), self.stream:
            yield

    def wait_for_caller(self, streams: Sequence[int] = ()) -> None:
        """Make the comm stream wait for the work queued so far on the caller's stream (and on ``streams``).

        The caller's stream is the current stream of this rank's device (where the arrays are); events
        are created on that device, as cudaEventRecord needs an event and a stream of one device.
        """
        cp = self.xp
        with cp.cuda.Device(self.device_id):
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(cp.cuda.get_current_stream())
            self.stream.wait_event(ev)
            for s in streams:
                # A raw handle (1 and 2 name the legacy and per-thread default streams): cudaEventRecord takes
                # it as it is (cupy.cuda.ExternalStream, the other way, is deprecated since CuPy 14).
                e = cp.cuda.Event(block=False, disable_timing=True)
                cp.cuda.runtime.eventRecord(e.ptr, int(s))
                self.stream.wait_event(e)

    def release_to_caller(self) -> Any:
        """Make the caller's stream wait for the comm stream; the returned event marks this point."""
        cp = self.xp
        with cp.cuda.Device(self.device_id):
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(self.stream)
            cp.cuda.get_current_stream().wait_event(ev)
        return ev

    def done(self, event: Any) -> bool:
        """True once the work before ``event`` has finished (does not block)."""
        return bool(event.done)

    def bind_thread(self) -> None:
        """Make this rank's device current in the calling thread (the watch thread queries events from there)."""
        self.xp.cuda.Device(self.device_id).use()


# ------------------------------------------------------------------- watch
class _Pending:
    __slots__ = ("event", "what", "t0", "finished")

    def __init__(self, event: Any, what: str, t0: float) -> None:
        self.event, self.what, self.t0, self.finished = event, what, t0, False


class NcclWatch:
    """Follows enqueued NCCL work: completion, asynchronous errors and the deadline; aborts on failure.

    A background thread polls while anything is in flight (``interval``);
    ``wait`` polls too. On an asynchronous NCCL error, or when the oldest
    collective in flight is older than ``timeout``, the NCCL communicator is
    aborted (its stuck kernels end), every waiter raises, and ``on_fail``
    gets the report (default: end the job with MPI_Abort, as the MPI watchdog).

    Args:
        comm: the NCCL communicator (``check_async_error()``, ``abort()``).
        done: whether an event has completed, without blocking.
        timeout: seconds a collective may take from enqueue to completion.
        on_fail: called once with the report; default aborts the job.
        interval: polling period of the thread (None: timeout / 20, 5 ms to 0.5 s).
        clock: monotonic clock (tests pass a fake).
        thread: start the background thread (tests poll by hand).
        thread_init: called first in the background thread (makes the rank's CUDA device current there).

    Example::

        w = NcclWatch(nc, dev.done, timeout=300)
        p = w.add(dev.release_to_caller(), "allreduce (shape (4,), float32, native)")
        w.wait(p)
    """

    def __init__(self, comm: Any, done: Callable[[Any], bool], timeout: float,
                 on_fail: Callable[[str], None] | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, thread: bool = True,
                 where: str = "", thread_init: Callable[[], None] | None = None) -> None:
        if not timeout > 0:
            raise CollectiveValueError(f"NCCL timeout {timeout!r} must be > 0 seconds")
        self.comm, self.done, self.timeout, self.clock, self.where = comm, done, float(timeout), clock, where
        self.on_fail = on_fail if on_fail is not None else _abort_job
        self.interval = interval if interval is not None else max(0.005, min(0.5, self.timeout / 20))
        self.pending: deque[_Pending] = deque()
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._thread_init = thread_init
        if thread:
            self._thread = threading.Thread(target=self._loop, name="collective-nccl-watch", daemon=True)
            self._thread.start()

    def add(self, event: Any, what: str) -> _Pending:
        """Follow the collective that ``event`` ends; returns its handle for :meth:`wait`."""
        p = _Pending(event, what, self.clock())
        with self._lock:
            self.pending.append(p)
        self._wake.set()
        return p

    def poll(self) -> None:
        """One look: retire finished work, check NCCL's asynchronous error, enforce the deadline."""
        with self._lock:
            if self.failed is not None:
                return
            q = self.pending
            while q and self.done(q[0].event):  # one stream: events complete in the order they were recorded
                q.popleft().finished = True
            if not q:
                return
            try:
                self.comm.check_async_error()
            except Exception as exc:  # noqa: BLE001 - NcclError, or a CUDA error surfaced by NCCL
                msg = f"NCCL reported an asynchronous error during {q[0].what}: {type(exc).__name__}: {exc}"
            else:
                age = self.clock() - q[0].t0
                if age <= self.timeout:
                    return
                msg = (f"{q[0].what} did not complete within {self.timeout:g} s (COLLECTIVE_TIMEOUT); "
                       f"{len(q)} NCCL collective(s) in flight")
            self._fail_locked(msg)
        self.on_fail(self.report(msg))

    def _fail_locked(self, msg: str) -> None:
        self.failed = msg
        try:
            self.comm.abort()  # frees kernels waiting for a peer that will never come
        except Exception:  # noqa: BLE001 - already aborted or destroyed
            pass

    def report(self, msg: str) -> str:
        """The text printed when the watch gives up."""
        return (f"collective: {self.where}NCCL: {msg}. The NCCL communicator was aborted; a failed NCCL "
                "communicator cannot be reused, so the job is ended")

    def fail(self, msg: str) -> None:
        """Mark the communicator failed and abort it, without ``on_fail``: for a synchronous error the caller raises."""
        with self._lock:
            if self.failed is None:
                self._fail_locked(msg)

    def wait(self, p: _Pending, timeout: float | None = None) -> None:
        """Block until ``p`` completes, polling the async error; raise if the communicator failed.

        Args:
            p: the handle from :meth:`add`.
            timeout: give up after this many seconds with CollectiveTimeoutError (the
                collective goes on; the deadline still applies). None waits for it.
        """
        t_end = None if timeout is None else self.clock() + timeout
        nap = 0.0
        while True:
            if p.finished:
                return
            if self.failed is not None:
                raise CollectiveError(f"{self.where}NCCL communicator failed: {self.failed}")
            self.poll()
            if p.finished:
                return
            if t_end is not None and self.clock() >= t_end:
                raise CollectiveTimeoutError(f"{self.where}{p.what}: not finished after {timeout} s")
            time.sleep(nap)
            # Short naps: a GPU collective often ends within microseconds of being polled.
            nap = min(self.interval, 1e-3, nap * 2 if nap else 2e-5)

    def is_done(self, p: _Pending) -> bool:
        """Poll once; True if ``p`` has completed (raises if the communicator failed)."""
        if not p.finished:
            self.poll()
        if not p.finished and self.failed is not None:
            raise CollectiveError(f"{self.where}NCCL communicator failed: {self.failed}")
        return p.finished

    def _loop(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:  # noqa: BLE001 - the waiters poll as well
                pass
        while not self._stop:
            if not self.pending:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watch must outlive a bad poll; the waiter polls too
                pass
            time.sleep(self.interval)

    def close(self) -> None:
        """Stop the background thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def _abort_job(report: str) -> None:
    from ..watchdog import abort_job

    abort_job(report)


class NcclWork:
    """Handle of an enqueued NCCL collective: ``wait()`` returns its result once the GPU has finished it.

    Example::

        w = backend.allreduce_async(grad, out=grad)
        ...
        w.wait()
    """

    __slots__ = ("_p", "_result", "_watch")

    def __init__(self, pending: _Pending, result: Any, watch: NcclWatch) -> None:
        self._p, self._result, self._watch = pending, result, watch

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the collective has completed on the GPU and return its result.

        Args:
            timeout: seconds before CollectiveTimeoutError (the collective is not cancelled).
        """
        self._watch.wait(self._p, timeout)
        return self._result

    def done(self) -> bool:
        """True once the collective has completed on the GPU (does not block)."""
        return self._watch.is_done(self._p)

    @property
    def result(self) -> Any:
        """What ``wait()`` returns (the output array; the caller may swap in its own object for it)."""
        return self._result

    @result.setter
    def result(self, value: Any) -> None:
        self._result = value


# ------------------------------------------------------------------ backend
@dataclass
class NcclCall:
    """A prepared NCCL call: every argument checked, the result allocated (see :meth:`NCCLBackend.prepare`)."""

    name: str
    xf: Any
    of: Any
    result: Any
    shape: tuple
    dtype: np.dtype
    rop: ReduceOp | None
    algorithm: str
    root: int
    blocks: tuple | None
    native: tuple[int, int, int] | None
    inplace: bool
    streams: tuple[int, ...]


def _average(xp: Any, a: Any, n: int) -> None:
    if a.size == 0:
        return
    if a.dtype.kind in "iu":
        xp.floor_divide(a, a.dtype.type(n), out=a)
    else:
        xp.divide(a, a.dtype.type(n), out=a)


class NCCLBackend:
    """Collectives on CuPy arrays over one NCCL communicator: NCCL's own (native) or our Schedules over send/recv.

    Not the host ``Backend`` protocol: NCCL moves device memory in stream
    order, so this class takes whole collectives. Calls return once the
    collective is enqueued; the result is ready in stream order on the
    caller's current stream (``COLLECTIVE_NCCL_BLOCKING=1`` or
    ``blocking=True`` waits for completion instead).

    Args:
        comm: an NCCL communicator (``cupy.cuda.nccl.NcclCommunicator``) of ``size`` ranks.
        rank, size: this rank and the number of ranks.
        nccl: the ``cupy.cuda.nccl`` module (groupStart/groupEnd); tests pass a fake.
        device: a :class:`CupyDevice` (tests: a NumPy stand-in).
        nodes: node label of each rank (``Cluster.node_of_rank``), for hierarchical and ring.
        timeout: seconds before a collective in flight aborts the job (else
            ``COLLECTIVE_TIMEOUT``, else 300).
        blocking: wait for completion in every synchronous call.
        version: NCCL's version code (bfloat16 needs 2.10); None: no check.
        on_fail, watch_thread: passed to :class:`NcclWatch`.

    Example::

        be = NCCLBackend.create(MPI.COMM_WORLD, local_rank)
        y = be.allreduce(cupy.ones(4, cupy.float32))            # NCCL's allReduce
        z = be.allreduce(x, algorithm="ring")                    # our ring over send/recv
    """

    name = "nccl"

    def __init__(self, comm: Any, rank: int, size: int, *, nccl: Any, device: Any, nodes: Sequence[int] | None = None,
                 timeout: float | None = None, blocking: bool | None = None, version: int | None = None,
                 on_fail: Callable[[str], None] | None = None, watch_thread: bool = True) -> None:
        self.comm, self.rank, self.size, self.nccl, self.dev = comm, rank, size, nccl, device
        self.xp = device.xp
        self.nodes = tuple(nodes) if nodes is not None else None
        self.version = version
        if timeout is None:
            timeout = config.get("TIMEOUT")
        if blocking is None:
            blocking = config.get("NCCL_BLOCKING")
        self.blocking = bool(blocking)
        self.watch = NcclWatch(comm, device.done, timeout, on_fail, thread=watch_thread,
                               where=f"rank {rank} of {size}: ", thread_init=getattr(device, "bind_thread", None))
        self._lock = threading.Lock()
        self._static: dict[tuple, tuple] = {}
        self._plans: dict[tuple, Plan] = {}
        self._scratch: Any = None
        self._work_buf: Any = None
        self._pad_buf: Any = None
        self.seq = 0

    @classmethod
    def create(cls, mpi_comm: Any, local_rank: int, nodes: Sequence[int] | None = None, timeout: float | None = None,
               blocking: bool | None = None) -> NCCLBackend:
        """Make the NCCL communicator over the ranks of ``mpi_comm`` (collective over it).

        Every rank checks that NCCL is usable, picks its GPU (``pick_device``),
        rank 0 creates the unique id and MPI broadcasts it; then every rank
        joins ``ncclCommInitRank``.

        Raises:
            BackendUnavailableError: on every rank, naming the rank(s) where NCCL is not usable.
        """
        problem = probe()
        cupy: Any = None
        nccl: Any = None
        device = -1
        if problem is None:
            try:
                cupy = importlib.import_module("cupy")
                nccl = importlib.import_module("cupy.cuda.nccl")
                device = pick_device(local_rank, int(cupy.cuda.runtime.getDeviceCount()))
                check_constants(nccl)
            except Exception as exc:  # noqa: BLE001 - told to every rank by the bootstrap
                problem = f"{type(exc).__name__}: {exc}"
        uid = bootstrap_unique_id(mpi_comm, problem, lambda: nccl.get_unique_id())
        dev = CupyDevice(cupy, device)
        rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        nc = new_communicator(nccl, size, uid, rank)  # binds to the device CupyDevice made current
        return cls(nc, rank, size, nccl=nccl, device=dev, nodes=nodes, timeout=timeout, blocking=blocking,
                   version=int(nccl.get_version()))

    # ------------------------------------------------------------ checks
    def _fail(self, cls: type, name: str, shape: Any, dtype: Any, alg: Any, what: str) -> CollectiveError:
        return cls(f"{describe(name, self.rank, self.size, shape, dtype, alg)} [nccl]: {what}")

    def _static_checks(self, name: str, shape: tuple, dtype: np.dtype, op: Any, algorithm: str | None,
                       root: Any) -> tuple:
        alg = algorithm or "auto"
        if alg == "shm":
            raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                             "shm works on host memory; for device arrays use native, ring, tree, star, hierarchical "
                             "or pipeline")
        check_algorithm(name, shape, dtype, alg, ALGORITHMS, self._fail)
        rop, root, rshape, blocks = check_signature(name, shape, dtype, op, root, alg, self.rank, self.size,
                                                    self._fail)
        nat: tuple[int, int, int] | str | None = native_plan(name, dtype, rop.name if rop is not None else None,
                                                             self.version)
        if alg == "auto":
            # NCCL's own collectives are tuned for the GPU's links; Schedules are for comparison and dtypes it lacks.
            alg = "native" if not isinstance(nat, str) else ("tree" if name in _ROOTED else "ring")
        if alg == "native":
            if isinstance(nat, str):
                raise self._fail(CollectiveTypeError, name, shape, dtype, alg, nat)
        else:
            nat = None
        return rop, alg, rshape, blocks, root, nat

    def _prepare(self, name: str, x: Any, op: Any, algorithm: str | None, root: Any, out: Any,
                 streams: tuple[int, ...] = ()) -> NcclCall:
        xp, dev = self.xp, self.dev
        if not isinstance(x, xp.ndarray):
            raise self._fail(CollectiveTypeError, name, None, None, algorithm,
                             f"the NCCL backend takes {xp.__name__}.ndarray, got {type(x).__module__}."
                             f"{type(x).__qualname__} (convert with cupy.asarray(x))")
        shape, dtype = tuple(x.shape), x.dtype
        if self.watch.failed is not None:
            raise self._fail(CollectiveError, name, shape, dtype, algorithm,
                             f"the NCCL communicator failed earlier ({self.watch.failed})")
        rop, alg, rshape, blocks, root, nat = cached_checks(
            self._static, (name, shape, dtype, op, algorithm, root),
            lambda: self._static_checks(name, shape, dtype, op, algorithm, root))
        if dev.device_of(x) != dev.device_id:
            raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                             f"x is on CUDA device {dev.device_of(x)} but this rank's NCCL communicator uses device "
                             f"{dev.device_id}; create it there (with cupy.cuda.Device({dev.device_id}): ...)")
        xf = x.reshape(-1) if x.flags.c_contiguous else xp.ascontiguousarray(x).reshape(-1)
        needs_out = name != "reduce" or self.rank == root
        inplace = False
        if out is not None:
            if not isinstance(out, xp.ndarray):
                raise self._fail(CollectiveTypeError, name, shape, dtype, alg,
                                 f"out must be a {xp.__name__}.ndarray, got {type(out).__qualname__}")
            check_out(name, shape, dtype, alg, out.dtype, out.shape, rshape, self._fail)
            if not out.flags.c_contiguous:
                raise self._fail(CollectiveValueError, name, shape, dtype, alg, "out is not C-contiguous")
            if dev.device_of(out) != dev.device_id:
                raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                                 f"out is on CUDA device {dev.device_of(out)}, expected {dev.device_id}")
            of = out.reshape(-1)
            if of.size and xf.size:
                a0, b0 = dev.ptr(xf), dev.ptr(of)
                inplace = overlap(name, shape, dtype, alg, (a0, a0 + xf.nbytes), (b0, b0 + of.nbytes), self._fail)
            result = out if needs_out else None
            if not needs_out:
                of = None
        elif needs_out:
            o = xp.empty(rshape, dtype)  # on the caller's stream: the caller owns it
            of, result = o.reshape(-1), o
        else:
            of, result = None, None
        return NcclCall(name, xf, of, result, shape, dtype, rop, alg, root, blocks, nat, inplace, tuple(streams))

    # --------------------------------------------------------- execution
    def call(self, name: str, x: Any, op: Any = "sum", algorithm: str | None = None, root: Any = 0, out: Any = None,
             wait: bool | None = None, streams: Sequence[int] = ()) -> NcclWork:
        """Check, enqueue and return the handle of one collective (the public methods call this).

        Args:
            name: "allreduce", "reduce", "broadcast", "reduce_scatter" or "allgather".
            x, op, algorithm, root, out: as the Communicator's methods.
            wait: wait for completion (None: the backend's ``blocking``).
            streams: CUDA stream handles, besides the caller's current one, whose queued
                work the collective must wait for (producers of non-CuPy inputs).

        Returns:
            An :class:`NcclWork`; ``wait()`` returns the result.
        """
        return self.enqueue(self.prepare(name, x, op, algorithm, root, out, streams), wait)

    def prepare(self, name: str, x: Any, op: Any = "sum", algorithm: str | None = None, root: Any = 0, out: Any = None,
                streams: Sequence[int] = ()) -> NcclCall:
        """Check every argument and allocate the result; nothing is sent (bad input raises here, on this rank)."""
        if name not in _NAMES:
            raise CollectiveValueError(f"unknown collective {name!r}; choose one of {', '.join(_NAMES)}")
        return self._prepare(name, x, op, algorithm, root, out, tuple(streams))

    def enqueue(self, c: NcclCall, wait: bool | None = None) -> NcclWork:
        """Enqueue a prepared call on the comm stream; returns its handle (waited for if ``wait``, or ``blocking``)."""
        dev = self.dev
        what = describe(c.name, self.rank, self.size, c.shape, c.dtype, c.algorithm)
        with self._lock:
            if self.watch.failed is not None:
                raise CollectiveError(f"{what} [nccl]: the NCCL communicator failed earlier ({self.watch.failed})")
            self.seq += 1
            try:
                dev.wait_for_caller(c.streams)
                with dev.on_stream():
                    if c.algorithm == "native":
                        self._native(c)
                    else:
                        self._scheduled(c)
                    if c.rop is not None and c.rop.average and c.of is not None:
                        _average(self.xp, c.of, self.size)
                ev = dev.release_to_caller()
            except Exception as exc:
                # A failed enqueue leaves the ranks out of step: abort the communicator so peers stop
                # waiting (their watch reports it) and later calls here raise at once.
                msg = f"{what}: NCCL call failed: {type(exc).__name__}: {exc}"
                self.watch.fail(msg)
                raise CollectiveError(f"{msg}; the NCCL communicator was aborted") from exc
        work = NcclWork(self.watch.add(ev, what), c.result, self.watch)
        if self.blocking if wait is None else wait:
            work.wait()
        return work

    def _ptr(self, a: Any) -> int:
        return self.dev.ptr(a)

    def _buffer(self, attr: str, nbytes: int) -> Any:
        """A reusable device byte buffer (grown geometrically; freed memory is reused in comm-stream order)."""
        b = getattr(self, attr)
        if b is None or b.nbytes < nbytes:
            old = 0 if b is None else b.nbytes
            b = self.xp.empty(max(nbytes, 2 * old, 256), np.uint8)
            setattr(self, attr, b)
        return b

    def _native(self, c: NcclCall) -> None:
        nc, P, sp, ptr = self.comm, self.size, self.dev.stream_ptr, self._ptr
        native = c.native
        assert native is not None  # _native runs the calls that NCCL's own collective does
        dt, mult, opc = native
        xf, of, name = c.xf, c.of, c.name
        n = xf.size * mult
        if name == "reduce_scatter":
            blocks = c.blocks
            assert blocks is not None  # reduce_scatter always has blocks
            counts = [blocks[i + 1] - blocks[i] for i in range(P)]
            m = max(counts)
            if m == 0:
                return
            if min(counts) == m:
                nc.reduceScatter(ptr(xf), ptr(of), m * mult, dt, opc, sp)
                return
            # Uneven blocks: NCCL takes one count for every rank, so pad every block to the largest.
            isz = c.dtype.itemsize
            pad = self._buffer("_pad_buf", (P + 1) * m * isz)
            pin = pad[: P * m * isz].view(c.dtype)
            pout = pad[P * m * isz:(P + 1) * m * isz].view(c.dtype)
            for i in range(P):
                a, b = blocks[i], blocks[i + 1]
                if b > a:
                    self.xp.copyto(pin[i * m:i * m + (b - a)], xf[a:b])
            nc.reduceScatter(ptr(pin), ptr(pout), m * mult, dt, opc, sp)
            if of.size:
                self.xp.copyto(of, pout[: of.size])
            return
        if n == 0:
            return  # every rank has the same shape: every rank skips
        if name == "allreduce":
            nc.allReduce(ptr(xf), ptr(of), n, dt, opc, sp)
        elif name == "reduce":
            # recvbuff is read on the root only; elsewhere any valid pointer will do.
            nc.reduce(ptr(xf), ptr(of) if of is not None else ptr(xf), n, dt, opc, c.root, sp)
        elif name == "broadcast":
            nc.broadcast(ptr(xf) if self.rank == c.root else ptr(of), ptr(of), n, dt, c.root, sp)
        else:
            nc.allGather(ptr(xf), ptr(of), n, dt, sp)

    def _work(self, n: int, dtype: np.dtype) -> Any:
        nbytes = n * dtype.itemsize
        return self._buffer("_work_buf", nbytes)[:nbytes].view(dtype)

    def _scheduled(self, c: NcclCall) -> None:
        xp, name, P, r = self.xp, c.name, self.size, self.rank
        n = c.xf.size
        work = schedule_work(name, r, c.root, c.xf, c.of, c.inplace, c.blocks, lambda: self._work(n, c.dtype),
                             xp.copyto)
        if name == "allgather":
            sched = topologies.build(c.algorithm, name, P, work.size, 0, c.blocks, nodes=self.nodes)
        elif name == "reduce_scatter":
            sched = topologies.build(c.algorithm, name, P, n, 0, c.blocks, nodes=self.nodes)
        else:
            sched = topologies.build(c.algorithm, name, P, n, c.root if name in _ROOTED else 0, nodes=self.nodes)
        ufunc = getattr(xp, c.rop.ufunc.__name__) if c.rop is not None else None
        self.run_plan(self.plan(sched, c.dtype.itemsize), work, ufunc)
        schedule_result(name, r, work, c.of, c.blocks, xp.copyto)

    def plan(self, sched: topologies.Schedule, itemsize: int) -> Plan:
        """This rank's cached plan of ``sched``: one message per transfer (NCCL pipelines inside a send)."""
        key = (id(sched), itemsize)
        p = self._plans.get(key)
        if p is None or p.schedule is not sched:
            if len(self._plans) > 512:
                self._plans.clear()
            p = self._plans[key] = compile_plan(sched, self.rank, itemsize, _ONE_SEGMENT)
        return p

    def run_plan(self, plan: Plan, work: Any, ufunc: Callable[..., Any] | None) -> None:
        """Enqueue ``plan`` on the comm stream: one NCCL group per step, then that step's reductions.

        Every transfer is in bytes. Receives that reduce land in a scratch
        buffer at the offsets the plan assigned; the kernels that combine them
        into ``work`` follow the group on the same stream, in the plan's
        reduction order, so the result is the same on every rank.
        """
        if not plan.steps:
            return
        nc, nccl, sp, ptr = self.comm, self.nccl, self.dev.stream_ptr, self._ptr
        isz = plan.itemsize
        base = ptr(work)
        scratch: Any = None  # a device array, for a plan with reducing receives (which only they read)
        reduce = no_reduction if ufunc is None else ufunc
        sbase = 0
        if plan.scratch_elems:
            scratch = self._buffer("_scratch", plan.scratch_elems * isz)[: plan.scratch_elems * isz].view(work.dtype)
            sbase = ptr(scratch)
        for st in plan.steps:
            nccl.groupStart()
            try:
                for peer, a, b, _ in st.recv_copy:
                    nc.recv(base + a, b - a, NCCL_BYTE, peer, sp)
                for peer, a, b, o, _ in st.recv_reduce:
                    nc.recv(sbase + o * isz, (b - a) * isz, NCCL_BYTE, peer, sp)
                for peer, a, b, _ in st.sends:
                    nc.send(base + a, b - a, NCCL_BYTE, peer, sp)
            finally:
                nccl.groupEnd()
            for peer, a, b, o, _ in st.recv_reduce:
                dst = work[a:b]
                reduce(dst, scratch[o:o + (b - a)], out=dst)

    # ---------------------------------------------------------- public API
    def allreduce(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
        """Reduce ``x`` over all ranks; every rank gets the result (a CuPy array, ready in stream order).

        Example::

            y = be.allreduce(cupy.arange(4, dtype=cupy.float32))
        """
        return self.call("allreduce", x, op, algorithm, 0, out)._result

    def reduce(self, x: Any, root: int = 0, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
        """Reduce ``x`` onto ``root``; None on the other ranks."""
        return self.call("reduce", x, op, algorithm, root, out)._result

    def broadcast(self, x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Any:
        """Copy ``root``'s ``x`` to every rank."""
        return self.call("broadcast", x, None, algorithm, root, out)._result

    def reduce_scatter(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
        """Reduce ``x`` and give rank r the r-th slab of rows (split as ``np.array_split``)."""
        return self.call("reduce_scatter", x, op, algorithm, 0, out)._result

    def allgather(self, x: Any, algorithm: str | None = None, out: Any = None) -> Any:
        """Concatenate every rank's ``x`` along the first axis, in rank order."""
        return self.call("allgather", x, None, algorithm, 0, out)._result

    def allreduce_async(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> NcclWork:
        """:meth:`allreduce`, returning a handle; ``wait()`` blocks until the GPU has finished."""
        return self.call("allreduce", x, op, algorithm, 0, out, wait=False)

    def synchronize(self, timeout: float | None = None) -> None:
        """Wait until every collective enqueued so far has completed (polling NCCL's async error)."""
        q = list(self.watch.pending)
        if q:
            self.watch.wait(q[-1], timeout)

    def barrier(self) -> None:
        """Block until every rank has reached this point (a one-element NCCL allreduce, waited for)."""
        self.call("allreduce", self.xp.zeros(1, np.int32), "sum", "native", wait=True)

    def close(self) -> None:
        """Wait for work in flight, stop the watch and destroy the NCCL communicator."""
        try:
            if self.watch.failed is None:
                self.synchronize()
        finally:
            self.watch.close()
            destroy = getattr(self.comm, "destroy", None)
            if destroy is not None and self.watch.failed is None:
                destroy()
