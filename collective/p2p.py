"""Point-to-point messages: send/recv and their nonblocking forms, checked and under a deadline.

Terms (the names below follow them):

* **header** -- every message is preceded by a small header (size in bytes,
  dtype, shape) on its own tag, so the receiver learns what comes before it
  posts the data: a message that does not fit ``out`` (another size, dtype
  or shape) raises naming both ranks and both arrays, and its bytes are
  drained, never left to match a later receive, never truncated silently.
* **tags** -- a user's tag t becomes tags ``BASE + 2t`` (header) and
  ``BASE + 2t + 1`` (data) on the communicator's private MPI communicator,
  above the Schedules' tags and below the watchdog's control tag. MPI's
  non-overtaking rule keeps a header and its data together, also for a
  receive from any source.
* **deadline** -- a wait gives up after the communicator's timeout: an
  unmatched receive is cancelled and raises CollectiveTimeoutError; a send
  that no one receives cannot be taken back, so the job is aborted with a
  report, as for a collective.

Point-to-point calls are not collective ops: they take no sequence number
and no cross-rank check (the header is the check), and they do not wait
behind async collectives.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from .arrays import to_numpy
from .backends.mpi import abandon
from .errors import CollectiveTimeoutError, CollectiveTypeError, CollectiveValueError, describe, raise_lost
from .ops import dtype_code, dtype_from_code

__all__ = ["PointToPoint", "P2PWork", "ANY_SOURCE"]

#: Pass as ``source`` to receive from whichever rank sends first.
ANY_SOURCE = -1
_BASE = 1 << 29
_HEAD = 36  # int64s: bytes, ndim, dtype (2 words), up to 32 dims


def _header(a: np.ndarray) -> np.ndarray:
    h = np.zeros(_HEAD, np.int64)
    h[0], h[1] = a.nbytes, a.ndim
    h[2:4] = np.frombuffer(dtype_code(a.dtype), np.int64)
    h[4:4 + a.ndim] = a.shape
    return h


def _what(h: np.ndarray) -> str:
    dt = h[2:4].tobytes().rstrip(b"\0").decode(errors="replace")
    try:
        dt = str(dtype_from_code(h[2:4].tobytes()))
    except ValueError:
        pass
    return f"{int(h[0])} bytes, {dt} {tuple(int(v) for v in h[4:4 + int(h[1])])}"


class P2PWork:
    """Handle of a nonblocking send or receive: ``wait()`` (its result: the source rank of a receive), ``done()``."""

    def __init__(self, p2p: PointToPoint, op: str, what: str, reqs: list[Any], recv: tuple | None = None) -> None:
        self._p2p, self._op, self._what, self._reqs, self._recv = p2p, op, what, reqs, recv
        self._t0 = time.monotonic()
        self._result: Any = None
        self._done = False
        p2p.inflight[id(self)] = (what, self._t0)

    def done(self) -> bool:
        """True once the message has been sent or received (polls; never blocks)."""
        if not self._done:
            if self._p2p.fault is None:
                self._progress()
            else:
                try:
                    self._progress_watched()
                except Exception as exc:
                    self._p2p.inflight.pop(id(self), None)
                    raise_lost(self._p2p.fault, self._op, exc, self._t0)
                    raise
        return self._done

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done (at most ``timeout`` s, else the communicator's deadline); a receive's source rank."""
        limit = self._p2p.timeout if timeout is None else timeout
        nap = 1e-6
        while not self.done():
            if time.monotonic() - self._t0 > limit:
                self._p2p.expire(self, limit, timeout is not None)
            time.sleep(nap)
            nap = min(2e-3, nap * 2)
        return self._result

    def _progress(self) -> None:
        MPI = self._p2p.MPI
        if self._recv is not None and self._recv[0] == "head":
            st = MPI.Status()
            if not self._reqs[0].Test(st):
                return
            self._reqs = self._p2p.receive_data(self, st.Get_source())
            if self._reqs is None:  # raised already
                return
        if MPI.Request.Testall(self._reqs):
            self._done = True
            self._p2p.inflight.pop(id(self), None)

    def _progress_watched(self) -> None:
        """Elastic mode's :meth:`_progress`: poll with MPI_Request_get_status, which frees nothing, and watch the
        peers; a failure leaves the requests to :func:`~collective.backends.mpi.abandon`.

        MPI_Test frees a request that completed in error, and Open MPI's ob1
        layer aborts the job when a fragment of such a freed send later fails
        too ("Send error after request freed"); see
        :meth:`~collective.backends.mpi.MPIBackend.watch_failures`.
        """
        p2p = self._p2p
        try:
            if self._recv is not None and self._recv[0] == "head":
                head = self._reqs[0]
                st = p2p.MPI.Status()
                if not head.Get_status(st):
                    p2p.watch_due()
                    return
                head.Wait()  # complete: frees it
                self._reqs = p2p.receive_data(self, st.Get_source())
                if self._reqs is None:  # raised already
                    return
            if not all([r.Get_status() for r in self._reqs]):
                p2p.watch_due()
                return
            p2p.MPI.Request.Waitall(self._reqs)
        except BaseException:
            if self._reqs:
                abandon(self._reqs)
            raise
        self._done = True
        p2p.inflight.pop(id(self), None)


class PointToPoint:
    """The point-to-point messages of one communicator.

    Args:
        comm: the communicator's private mpi4py communicator.
        MPI: the mpi4py.MPI module.
        timeout: seconds a wait may last (the communicator's deadline).
    """

    def __init__(self, comm: Any, MPI: Any, timeout: float) -> None:
        self.comm, self.MPI, self.timeout = comm, MPI, timeout
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.max_tag = (int(comm.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)) - 1 - _BASE) // 2
        #: id -> (what, start) of the sends and receives in flight, for stall reports.
        self.inflight: dict[int, tuple[str, float]] = {}
        #: Elastic mode: ``fault(name, exc, started)`` turns a failure into RanksLostError (see Sequencer.fault).
        self.fault: Any = None
        #: Elastic mode: raises once a peer is lost (FailureState.watch); polls call it every WATCH_S seconds.
        self.watch: Any = None
        self._watch_due = 0.0
        self._lock = threading.Lock()

    #: Seconds between two peer watches of a polling wait (elastic mode).
    WATCH_S = 0.002

    def watch_due(self) -> None:
        """Elastic mode, a poll found its message unfinished: run the peer watch if it is due."""
        t = time.monotonic()
        if t >= self._watch_due:
            self._watch_due = t + self.WATCH_S
            if self.watch is not None:
                self.watch()

    def _check_peer(self, name: str, peer: Any, tag: Any, any_ok: bool, a: Any = None) -> tuple[int, int]:
        where = describe(name, self.rank, self.size, getattr(a, "shape", None), getattr(a, "dtype", None))
        if isinstance(peer, bool) or not isinstance(peer, (int, np.integer)) or not (
                0 <= peer < self.size or (any_ok and peer == ANY_SOURCE)):
            raise CollectiveValueError(f"{where}: peer {peer!r} is not a rank of this communicator (0..{self.size - 1}"
                                       f"{', or ANY_SOURCE' if any_ok else ''})")
        if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag <= self.max_tag:
            raise CollectiveValueError(f"{where}: tag {tag!r} must be an integer in 0..{self.max_tag}")
        return int(peer), int(tag)

    def isend(self, x: Any, dest: int, tag: int = 0) -> P2PWork:
        """Start sending ``x`` to rank ``dest``; ``x`` must not change until the handle is done."""
        a = x if type(x) is np.ndarray else to_numpy(x)[0]
        dest, tag = self._check_peer("send", dest, tag, False, a)
        a = np.ascontiguousarray(a)
        h = _header(a)
        B = self.MPI.BYTE
        if self.fault is None:
            reqs = [self.comm.Isend([h, self.MPI.INT64_T], dest, _BASE + 2 * tag),
                    self.comm.Isend([a.reshape(-1).view(np.uint8), B], dest, _BASE + 2 * tag + 1)]
        else:  # one at a time: if the data's send fails, the header's stays reachable for abandon()
            reqs = [self.comm.Isend([h, self.MPI.INT64_T], dest, _BASE + 2 * tag)]
            try:
                reqs.append(self.comm.Isend([a.reshape(-1).view(np.uint8), B], dest, _BASE + 2 * tag + 1))
            except BaseException:
                abandon(reqs)
                raise
        w = P2PWork(self, "send", f"send to rank {dest} tag {tag} ({_what(h)})", reqs)
        w._keep = (a, h)  # type: ignore[attr-defined]  # the buffers live until the sends complete
        return w

    def irecv(self, out: Any, source: int = ANY_SOURCE, tag: int = 0) -> P2PWork:
        """Start receiving a message from ``source`` (or any rank) into ``out``; ``wait()`` returns the source rank."""
        if type(out) is np.ndarray:
            o = out
        else:
            try:
                o = to_numpy(out)[0]
            except CollectiveTypeError as exc:
                raise CollectiveTypeError(f"{describe('recv', self.rank, self.size)}: out: {exc}") from None
        source, tag = self._check_peer("recv", source, tag, True, o)
        if not o.flags.writeable or not o.flags.c_contiguous:
            raise CollectiveValueError(f"{describe('recv', self.rank, self.size, o.shape, o.dtype)}: out must be "
                                       "writable and C-contiguous")
        h = np.zeros(_HEAD, np.int64)
        src = self.MPI.ANY_SOURCE if source == ANY_SOURCE else source
        req = self.comm.Irecv([h, self.MPI.INT64_T], src, _BASE + 2 * tag)
        peer = "any rank" if source == ANY_SOURCE else f"rank {source}"
        return P2PWork(self, "recv", f"recv from {peer} tag {tag} into {o.nbytes} bytes, {o.dtype} {o.shape}", [req],
                       ("head", o, h, tag))

    def receive_data(self, w: P2PWork, source: int) -> list[Any]:
        """After ``w``'s header arrived from ``source``: post the data's receive, or drain it and raise."""
        _, o, h, tag = w._recv  # type: ignore[misc]
        w._recv = ("data",)
        w._result = source
        try:
            dt = dtype_from_code(h[2:4].tobytes())
        except ValueError:
            dt = None
        B = self.MPI.BYTE
        if dt != o.dtype or int(h[0]) != o.nbytes:
            sink = np.empty(int(h[0]), np.uint8)  # the message is taken off the wire, never left to match later
            self.comm.Recv([sink, B], source, _BASE + 2 * tag + 1)
            self.inflight.pop(id(w), None)
            w._done = True
            raise CollectiveValueError(
                f"recv on rank {self.rank} of {self.size} from rank {source} tag {tag}: the message ({_what(h)}) "
                f"does not fit out ({o.nbytes} bytes, {o.dtype} {o.shape}); nothing was written to out")
        return [self.comm.Irecv([o.reshape(-1).view(np.uint8), B], source, _BASE + 2 * tag + 1)]

    def expire(self, w: P2PWork, limit: float, caller_timeout: bool) -> None:
        """``w`` ran out of time: cancel an unmatched receive and raise; abort the job for a send."""
        pending = [r for r in w._reqs if r != self.MPI.REQUEST_NULL]
        recv = w._recv
        if recv is not None and recv[0] == "head":
            for r in pending:
                r.Cancel()
                r.Wait()
            self.inflight.pop(id(w), None)
            raise CollectiveTimeoutError(f"rank {self.rank} of {self.size}: {w._what}: nothing arrived within "
                                         f"{limit:g} s" + ("" if caller_timeout else " (COLLECTIVE_TIMEOUT)"))
        if caller_timeout:
            raise CollectiveTimeoutError(f"rank {self.rank} of {self.size}: {w._what}: not done within {limit:g} s")
        from .watchdog import abort_job

        abort_job(f"collective: rank {self.rank} of {self.size}: {w._what} did not finish within {limit:g} s "
                  "(COLLECTIVE_TIMEOUT): the peer never received (or finished sending) it; a message in flight "
                  "cannot be taken back, so the job is aborted")

    def report_lines(self) -> list[str]:
        """One line per send or receive in flight (for stall reports)."""
        now = time.monotonic()
        return [f"  {what}, for {now - t0:.1f} s" for what, t0 in list(self.inflight.values())]
