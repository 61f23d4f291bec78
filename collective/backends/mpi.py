"""The MPI backend: mpi4py's uppercase buffer calls, nonblocking point-to-point, MPI's own collectives as `native`."""
from __future__ import annotations

import os as _os
import time as _time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError

# Open MPI's UCX one-sided component prints a spurious error on machines without UCX networks when
# a shared window is created; the shared-memory component does the job.
_os.environ.setdefault("OMPI_MCA_osc", "^ucx")

# Imported on first use, not with the package: importing mpi4py.MPI initialises MPI, which a process that
# only launches jobs (collective-run, the test runner) must not do: it cost a second, and Open MPI left that
# singleton's shared-memory file in /dev/shm for good.
MPI: Any = None
#: The process that initialised MPI here (a process forked from it shares its MPI state but is no MPI process).
MPI_PID: int | None = None

__all__ = ["MPIBackend", "require_mpi", "mpi_dtype", "mpi_op"]


def _singleton_backing_dir() -> None:
    """Give a process started without a launcher its own directory for Open MPI's shared-memory file.

    Open MPI (5.0.x) never removes a singleton's ``sm_segment`` file from
    /dev/shm, so every ``python script.py`` would leave 16 MB there; a later
    job whose id hashes to the same name reuses the stale file and can crash in
    its first collective. A private directory, removed at exit, avoids both.
    Launched ranks (mpiexec sets PMIX_RANK) and a user's own setting are left alone.
    """
    env = _os.environ
    if any(k in env for k in ("PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "OMPI_MCA_btl_sm_backing_directory")):
        return
    if not _os.path.isdir("/dev/shm") or not _os.access("/dev/shm", _os.W_OK):
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="collective-singleton-", dir="/dev/shm")
    env["OMPI_MCA_btl_sm_backing_directory"] = path
    # Runs before mpi4py's finalisation (which unlinks nothing here); removing a mapped file is harmless on Linux.
    atexit.register(shutil.rmtree, path, True)


def require_mpi() -> Any:
    """The mpi4py ``MPI`` module (importing it initialises MPI), or BackendUnavailableError saying what to install."""
    global MPI, MPI_PID
    if MPI is None:
        _singleton_backing_dir()
        try:
            from mpi4py import MPI as mod
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise BackendUnavailableError(
                f"mpi4py cannot be imported ({exc}); install it with: pip install 'pycollective[mpi]'") from None
        MPI = mod
        MPI_PID = _os.getpid()
    return MPI


_DTYPE_CACHE: dict[np.dtype, Any] = {}


def mpi_dtype(dtype: np.dtype) -> Any | None:
    """The MPI datatype for a NumPy dtype, or None if MPI has none (bfloat16)."""
    try:
        return _DTYPE_CACHE[dtype]
    except KeyError:
        pass
    # Predefined types only: reduction ops refuse derived or duplicated types (mpi4py.util.dtlib
    # returns duplicates), and Open MPI refuses MPI_SIGNED_CHAR, so integers go by kind and width.
    fixed = {("i", 1): "INT8_T", ("i", 2): "INT16_T", ("i", 4): "INT32_T", ("i", 8): "INT64_T",
             ("u", 1): "UINT8_T", ("u", 2): "UINT16_T", ("u", 4): "UINT32_T", ("u", 8): "UINT64_T"}
    name = fixed.get((dtype.kind, dtype.itemsize))
    try:
        M = require_mpi()
        t = getattr(M, name) if name else M._typedict.get(dtype.char)
    except Exception:
        t = None
    _DTYPE_CACHE[dtype] = t
    return t


_USER_OPS: dict[tuple[str, np.dtype | None], Any] = {}


def needs_user_op(name: str, dtype: np.dtype | None) -> bool:
    """Whether MPI's built-in op ``name`` is wrong on ``dtype``, so :func:`mpi_op` gives a NumPy user op instead.

    PROD on complex types returned wrong products inside MPI_Reduce (P=4,
    root 3); MIN/MAX on floats drop a NaN depending on which rank holds it
    (IEEE and NumPy propagate it); SUM on 8- and 16-bit integers saturates
    from 64 elements on (Open MPI's vectorised op), where C and NumPy wrap.
    """
    if dtype is None:
        return False
    return ((name == "PROD" and dtype.kind == "c") or (name in ("MIN", "MAX") and dtype.kind == "f")
            or (name == "SUM" and dtype.kind in "iu" and dtype.itemsize <= 2))


def mpi_op(name: str, dtype: np.dtype | None = None) -> Any:
    """The MPI reduction op for "SUM", "PROD", "MIN" or "MAX" on ``dtype``.

    Some Open MPI 5 built-ins are wrong here, so those use a user-defined op
    that combines with NumPy while MPI still runs its own collective algorithm
    (see :func:`needs_user_op`).
    """
    if needs_user_op(name, dtype):
        op = _USER_OPS.get((name, dtype))
        if op is None:
            ufunc = {"SUM": np.add, "PROD": np.multiply, "MIN": np.minimum, "MAX": np.maximum}[name]

            def combine(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
                b = np.frombuffer(inoutbuf, dtype)
                ufunc(np.frombuffer(inbuf, dtype), b, out=b)

            op = _USER_OPS[(name, dtype)] = require_mpi().Op.Create(combine, commute=True)
        return op
    return getattr(require_mpi(), name)


#: Requests of failed calls: mpi4py frees a request when its object dies, and Open MPI aborts the job when a
#: freed request later completes in error, so a failed call's pending requests are kept here, never freed.
_ABANDONED: list[Any] = []


# Elastic mode's polling waits (MPIBackend._wait_watched): this many polls holding the interpreter lock, then
# sched_yield for _YIELD_S, then naps of _NAP_S; the peer watch every _WATCH_S.
_SPINS = 50
_YIELD_S = 2e-3
_NAP_S = 20e-6
_WATCH_S = 2e-3


def abandon(reqs: Any) -> None:
    """Keep mpi4py requests of a failed call (some maybe pending) for the life of the process, never freed."""
    _ABANDONED.extend(r for r in reqs if r)


class MPIBackend:
    """Moves bytes between the ranks of one (duplicated, private) MPI communicator.

    The communicator is a ``Dup`` of the user's, so our tags can never match the
    user's own messages.
    """

    name = "mpi"

    def __init__(self, comm: Any) -> None:
        require_mpi()
        self.comm = comm.Dup()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.tag_ub: int = int(self.comm.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) or 32767)
        self._byte = MPI.BYTE
        # Bound methods, looked up once: the executor's hot loop calls them per message.
        self._isend = self.comm.Isend
        self._irecv = self.comm.Irecv
        self._waitall = MPI.Request.Waitall

    def isend(self, buf: np.ndarray, peer: int, tag: int) -> Any:
        """Start sending the bytes of ``buf`` (contiguous uint8) to ``peer``."""
        return self._isend([buf, self._byte], peer, tag)

    def irecv(self, buf: np.ndarray, peer: int, tag: int) -> Any:
        """Start receiving bytes from ``peer`` into ``buf`` (contiguous uint8)."""
        return self._irecv([buf, self._byte], peer, tag)

    def wait(self, req: Any) -> None:
        """Block until ``req`` completes."""
        req.Wait()

    def waitall(self, reqs: Sequence[Any]) -> None:
        """Block until every request completes."""
        self._waitall(reqs)

    def abandon(self, reqs: Sequence[Any]) -> None:
        """Keep a failed call's requests for the life of the process (see :meth:`Backend.abandon`)."""
        abandon(reqs)

    def watch_failures(self, watch: Callable[[], None]) -> None:
        """Elastic mode: waits that poll, call ``watch`` (raises once a peer is lost) and never free a failed request.

        Under ULFM, MPI_Wait completes a send to a dead peer in error while
        Open MPI's ob1 layer may still hold one of its fragments; freeing the
        request there makes that fragment's own failure abort the job ("Send
        error after request freed"). So requests are polled with
        MPI_Request_get_status, which frees nothing; only complete ones are
        freed, and a failure leaves them all to the caller's :meth:`abandon`.
        """
        self._watch = watch
        self.wait = self._wait_one_watched  # type: ignore[method-assign]
        self.waitall = self._wait_watched  # type: ignore[method-assign]

    def _wait_one_watched(self, req: Any) -> None:
        self._wait_watched((req,))

    def _wait_watched(self, reqs: Sequence[Any]) -> None:
        """Poll ``reqs`` until all completed, then free them; an error propagates with them unfreed (the caller
        abandons every request of the failed call: the executor does, once, for the whole step).

        Polling backs off as shm's flag waits do (``shm._await_flag``): a few
        polls holding the interpreter lock (a peer a few microseconds behind),
        then ``sched_yield`` (the compute thread and oversubscribed peers get
        the core), then short naps. The peer watch (a process check per node
        peer and a probe) runs every ``_WATCH_S``, first after one interval.
        """
        for _ in range(_SPINS):
            if all([r.Get_status() for r in reqs]):
                self._waitall(reqs)
                return
        clock = _time.monotonic
        t = clock()
        due, naps = t + _WATCH_S, t + _YIELD_S
        yield_, sleep = _os.sched_yield, _time.sleep
        while not all([r.Get_status() for r in reqs]):
            t = clock()
            if t >= due:
                self._watch()
                due = t + _WATCH_S
            if t < naps:
                yield_()
            else:
                sleep(_NAP_S)
        self._waitall(reqs)  # all complete; one that completed in error raises here, and the caller abandons it

    def barrier(self) -> None:
        """MPI barrier over the private communicator."""
        self.comm.Barrier()

    def free(self) -> None:
        """Release the private communicator."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
