"""Deadlines for every blocking wait, stall warnings, the flight recorder, cross-rank checks, and aborting the whole job on failure.

Terms (the names below follow them):

* **op record** -- one entry of the *flight recorder*: ``[seq, op, shape,
  dtype, algorithm, root, t_start, t_end]`` (a list, so ``end`` fills in the
  end time cheaply). Each rank keeps its last ``COLLECTIVE_TRACE_BUFFER``.
* **deadline** -- every collective (and so every blocking wait inside one,
  sync or on the async thread) must end within ``timeout`` seconds of its
  start. A timed-out MPI operation cannot be cancelled safely, so expiry
  reports and ends the whole job with MPI_Abort.
* **control channel** -- small ``int64[8]`` point-to-point messages between
  the watchdog threads, on the communicator's private MPI communicator with
  tag TAG_UB (the executor's tags stay below it). The watchdog thread polls it
  every ``interval`` with a matched probe, so no receive is ever left posted
  (nothing pending at MPI_Finalize or Comm_free). Kinds:
  QUERY (what are you doing? optionally: dump your flight recorder),
  STATUS (the answer: last op begun, in flight or not, since when),
  EXIT (this rank's program is ending; its last op was #L).
  A rank waiting in op #N > L of a rank that sent EXIT aborts the job at
  once: that rank will never join.
* **check** -- the per-call cross-rank fingerprint comparison
  (:mod:`collective.fingerprint`) and, with ``COLLECTIVE_NAN_CHECK=1``, the
  scan of the input for NaN and Inf; run by the communicator after ``begin``
  (so the deadline covers it) and before any of the call's data moves.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from . import config
from .fingerprint import Fingerprints, Poison, rank_list

__all__ = ["Watchdog", "OpRecord", "install_excepthook", "abort_job", "deadline"]

#: Fields of one flight-recorder entry (a list, so the end time can be filled in cheaply).
OpRecord = list  # [seq, op, shape, dtype, algorithm, root, t_start, t_end]

_NAMES = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "barrier")
_CODE = {n: i for i, n in enumerate(_NAMES)}
_QUERY, _STATUS, _EXIT = 1, 2, 3
_RECENT = 20  # flight-recorder entries printed one per line; older ones are summarised by kind


def _say(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def abort_job(message: str, code: int = 1) -> None:
    """Print ``message`` to stderr and end every rank of the job (MPI_Abort on COMM_WORLD)."""
    try:
        _say(message)
    finally:
        try:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.COMM_WORLD.Abort(code)
        finally:
            os._exit(code)


class _Ctrl:
    """The control channel of one communicator (see the module docstring). Callers hold ``lock``."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.tag = int(comm.Get_attr(MPI.TAG_UB))
        self.lock = threading.Lock()
        self.sends: list[tuple[Any, np.ndarray]] = []
        self.closed = False

    def usable(self) -> bool:
        MPI = self.MPI
        return not self.closed and self.comm != MPI.COMM_NULL and not MPI.Is_finalized()

    def send(self, peer: int, *msg: int) -> None:
        buf = np.zeros(8, np.int64)
        buf[: len(msg)] = msg
        self.sends.append((self.comm.Isend([buf, self.MPI.INT64_T], peer, self.tag), buf))

    def receive(self) -> list[list[int]]:
        out = []
        MPI = self.MPI
        while True:
            m = self.comm.Improbe(MPI.ANY_SOURCE, self.tag)
            if m is None:
                break
            buf = np.empty(8, np.int64)
            m.Recv([buf, MPI.INT64_T])
            out.append(buf.tolist())
        if self.sends:
            self.sends = [(r, b) for r, b in self.sends if not r.Test()]
        return out

    def flush(self) -> None:
        if self.sends:
            self.MPI.Request.Waitall([r for r, _ in self.sends])
            self.sends = []


@contextmanager
def deadline(what: str, timeout: float | None = None) -> Iterator[None]:
    """Abort the whole job if the block has not finished within ``timeout`` seconds (else COLLECTIVE_TIMEOUT).

    For blocking MPI calls outside any op record, such as the collective
    communicator duplication and node discovery inside ``Communicator()``.

    Example::

        with deadline("init: duplicating the communicator"):
            comm = MPI.COMM_WORLD.Dup()
    """
    t = float(timeout) if timeout is not None else config.get("TIMEOUT")

    def expire() -> None:
        try:
            from mpi4py import MPI

            where = f"rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()}"
        except Exception:  # noqa: BLE001
            where = f"pid {os.getpid()}"
        abort_job(f"collective: {where}: {what} did not finish within {t:g} s (COLLECTIVE_TIMEOUT): some rank "
                  "has not made the same call (did every rank call collective.init()?); aborting the job")

    timer = threading.Timer(t, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


_LIVE: list[weakref.ref] = []


def _live() -> list["Watchdog"]:
    return [w for w in (r() for r in _LIVE) if w is not None]


class Watchdog:
    """Watches the op in flight: deadline, stall warning, flight recorder, cross-rank checks, exit notices.

    Args:
        rank, size: this rank and the number of ranks of the communicator.
        timeout: seconds an op may take before the job is aborted (else
            ``COLLECTIVE_TIMEOUT``, else 300; ``inf`` disables).
        stall_warn: seconds after which a stalled op is reported, once (else
            ``COLLECTIVE_STALL_WARN``, else 60).
        trace_len: flight-recorder length (else ``COLLECTIVE_TRACE_BUFFER``, else 1024).
        waiting_on: returns the peers the op in flight waits for right now
            (the executor's current step), or None. When it is a bound method of
            the Communicator, the communicator's private MPI communicator and
            queue length are found through it unless ``comm`` is given.
        comm: the private mpi4py communicator the collectives run on.

    Example::

        wd = Watchdog(rank, size, timeout=30, comm=mpi_comm)
        rec = [seq, "allreduce", x.shape, x.dtype, "ring", None, time.monotonic(), None]
        wd.begin(rec)
        try:
            if wd.check is not None:
                wd.check(rec, call)     # raises CollectiveMismatchError on every rank
            ...                         # move the data
        finally:
            wd.end(rec)
    """

    def __init__(
        self,
        rank: int,
        size: int,
        timeout: float | None = None,
        stall_warn: float | None = None,
        trace_len: int | None = None,
        waiting_on: Callable[[], Any] | None = None,
        comm: Any = None,
    ) -> None:
        self.rank, self.size = rank, size
        self.timeout = float(timeout) if timeout is not None else config.get("TIMEOUT")
        if not self.timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
        self.stall_warn = stall_warn if stall_warn is not None else config.get("STALL_WARN")
        n = trace_len if trace_len is not None else config.get("TRACE_BUFFER")
        self.trace: deque[OpRecord] = deque(maxlen=max(1, n))
        self.current: OpRecord | None = None
        self.waiting_on = waiting_on
        owner = getattr(waiting_on, "__self__", None)
        self._owner = weakref.ref(owner) if owner is not None else None
        if comm is None and owner is not None:
            comm = owner._backend.comm
        self.comm = comm
        #: How often the watchdog thread wakes: deadline resolution and exit-notice latency.
        self.interval = max(0.05, min(1.0, self.timeout / 10, self.stall_warn / 4))
        self._answer_wait = min(3.0, 2 * self.interval + 0.3)
        #: Ranks that announced their exit -> the last op they began.
        self.exited: dict[int, int] = {}
        fp_on = size > 1 and comm is not None and config.get("CHECK")
        detail = config.get("DEBUG") == "detail"
        self._fp = Fingerprints(comm, rank, size, detail) if fp_on else None
        self.nan_check = config.get("NAN_CHECK")
        #: None when there is nothing to check (one rank, or COLLECTIVE_CHECK=0 without NaN checks).
        self.check: Callable[[OpRecord, Any], bool] | None = self._check if (self._fp or self.nan_check) else None
        if self._fp is not None and not self.nan_check:
            self.check = self._fp.check_call  # one frame less per call: see Fingerprints.check_call
        self._ctrl: _Ctrl | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: OpRecord | None = None
        self._dumped: Any = None
        self._nonce = 0
        self._answers: dict[int, list[int]] = {}
        self._ask_lock = threading.Lock()  # one round of questions at a time (watchdog thread or excepthook)
        if size > 1:
            if comm is not None:
                from mpi4py import MPI

                # The watchdog thread talks MPI while other threads do: only with THREAD_MULTIPLE.
                if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
                    self._ctrl = _Ctrl(comm)
            _LIVE.append(weakref.ref(self))
            install_excepthook(rank, size)
            self._thread = threading.Thread(target=self._loop, name="collective-watchdog", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------- hot path
    def begin(self, rec: OpRecord) -> None:
        """Mark ``rec`` as the op in flight (cheap: the hot path calls this per collective)."""
        self.trace.append(rec)
        self.current = rec

    def end(self, rec: OpRecord) -> None:
        """Mark ``rec`` finished."""
        rec[7] = time.monotonic()
        self.current = None

    def _check(self, rec: OpRecord, c: Any) -> bool:
        """Check call ``c`` (record ``rec``) across ranks; True if that synchronised every rank (a barrier needs no more)."""
        poison = c.error if type(c) is Poison else None
        if self.nan_check and poison is None:
            xf = getattr(c, "xf", None)
            if xf is not None and not (rec[1] == "broadcast" and rec[5] != self.rank):  # only the root's input counts
                self._nan(rec, xf)
        fp = self._fp
        if fp is None:
            if poison is not None:
                raise poison
            return False
        fp.check(rec[0], rec[1], rec[4], getattr(c, "rop", None), rec[3], rec[2], rec[5], poison,
                 None if poison is not None else c)
        return True

    def _nan(self, rec: OpRecord, xf: np.ndarray) -> None:
        if xf.dtype.kind in "iu" or xf.size == 0:
            return
        try:
            finite = np.isfinite(xf)
        except TypeError:  # a dtype without isfinite
            return
        if finite.all():
            return
        nans = int(np.count_nonzero(np.isnan(xf)))
        infs = int(xf.size - np.count_nonzero(finite) - nans)
        first = int(np.flatnonzero(~finite)[0])
        _say(f"collective: rank {self.rank} of {self.size}: COLLECTIVE_NAN_CHECK: the input of {self.describe(rec, False)} "
             f"holds {nans} NaN and {infs} Inf (first at flat element {first}); they propagate to the result as IEEE 754 says")

    # ----------------------------------------------------------- the thread
    def _loop(self) -> None:
        failed = False
        while not self._stop.wait(self.interval):
            try:
                if self._ctrl is not None:
                    self._poll()
                rec = self.current
                if rec is None:
                    continue
                if self.exited:
                    gone = sorted(q for q, last in list(self.exited.items()) if rec[0] > last)
                    if gone and rec is self.current:
                        peers = self._ask_peers(rec[0], dump=True)
                        abort_job(self.report(rec, f"cannot finish: {rank_list(gone)} exited (its program ended) "
                                                   f"without entering it; aborting the job", peers))
                age = time.monotonic() - rec[6]
                if age > self.timeout and rec is self.current:
                    peers = self._ask_peers(rec[0], dump=True)
                    if rec is self.current:
                        abort_job(self.report(rec, f"timed out after {age:.1f} s (COLLECTIVE_TIMEOUT={self.timeout:g}); "
                                                   "a timed-out MPI operation cannot be cancelled, so the job is aborted",
                                              peers))
                elif age > self.stall_warn and self._warned is not rec:
                    self._warned = rec
                    peers = self._ask_peers(rec[0], dump=False)
                    if rec is self.current:
                        _say(self.report(rec, f"has been stalled for {age:.1f} s (COLLECTIVE_STALL_WARN={self.stall_warn:g}; "
                                              f"the job is aborted at COLLECTIVE_TIMEOUT={self.timeout:g})", peers,
                                         trace=False))
            except Exception:  # noqa: BLE001 - the watchdog must outlive its own bugs
                if not failed:
                    failed = True
                    _say(f"collective: rank {self.rank}: watchdog error (deadlines still apply):\n{traceback.format_exc()}")

    def _poll(self) -> None:
        ctrl = self._ctrl
        with ctrl.lock:
            if not ctrl.usable():
                return
            msgs = ctrl.receive()
        for m in msgs:
            kind, q = m[0], m[1]
            if kind == _QUERY:
                st = self._status()
                with ctrl.lock:
                    if ctrl.usable():
                        ctrl.send(q, _STATUS, self.rank, *st, m[7])
                if m[3] and self._dumped is not self.current:
                    self._dumped = self.current
                    _say("\n".join(self.trace_lines(f"as rank {q} asked (it is aborting the job at op #{m[2]})")))
            elif kind == _STATUS:
                if m[7] == self._nonce:
                    self._answers[q] = m
            elif kind == _EXIT:
                self.exited[q] = m[2]

    def _status(self) -> tuple[int, int, int, int, int]:
        """(last op begun, in flight, its name code, ms since it began or ended, async ops queued)."""
        now = time.monotonic()
        owner = self._owner() if self._owner is not None else None
        queued = int(getattr(owner, "_pending", 0) or 0)
        cur = self.current
        if cur is not None:
            return cur[0], 1, _CODE.get(cur[1], -1), int((now - cur[6]) * 1000), queued
        try:
            last = self.trace[-1]
        except IndexError:
            return 0, 0, -1, 0, queued
        return last[0], 0, _CODE.get(last[1], -1), int((now - (last[7] or last[6])) * 1000), queued

    def _ask_peers(self, seq: int, dump: bool, wait: float | None = None) -> dict[int, Any]:
        """Ask every live peer what it is doing; their answers, None for no answer, "exited" for exited ones."""
        ctrl = self._ctrl
        if ctrl is None:
            return {}
        peers = [q for q in range(self.size) if q != self.rank]
        with self._ask_lock:
            ask = [q for q in peers if q not in self.exited]
            self._nonce += 1
            self._answers = {}
            with ctrl.lock:
                if not ctrl.usable():
                    return {}
                for q in ask:
                    ctrl.send(q, _QUERY, self.rank, seq, int(dump), 0, 0, 0, self._nonce)
            t_end = time.monotonic() + (self._answer_wait if wait is None else wait)
            while time.monotonic() < t_end and len(self._answers) < len(ask):
                time.sleep(0.02)
                self._poll()
            return {q: ("exited", self.exited[q]) if q in self.exited else self._answers.get(q) for q in peers}

    # -------------------------------------------------------------- reports
    def describe(self, rec: OpRecord, timing: bool = True) -> str:
        """One line for one op record: ``#7 allreduce shape (4,) float32 algorithm ring (12 us)``."""
        seq, op, shape, dtype, alg, root, t0, t1 = rec
        if alg is None:
            s = f"#{seq} {op} (arguments rejected on this rank)"
        elif op == "barrier":
            s = f"#{seq} barrier"
        else:
            s = f"#{seq} {op} shape {tuple(shape)} {dtype} algorithm {alg}"
            if root is not None:
                s += f" root {root}"
        if timing:
            s += " (in flight)" if t1 is None else f" ({(t1 - t0) * 1e6:.0f} us)"
        return s

    def trace_lines(self, why: str = "") -> list[str]:
        """The flight recorder: the last ops one per line, older ones counted by kind (oldest first)."""
        for _ in range(5):
            try:
                recs = list(self.trace)
                break
            except RuntimeError:  # appended to while copied
                continue
        else:  # pragma: no cover
            recs = []
        lines = [f"collective: rank {self.rank} of {self.size}: flight recorder{', ' + why if why else ''}: "
                 f"last {len(recs)} ops, oldest first (COLLECTIVE_TRACE_BUFFER={self.trace.maxlen}):"]
        old, recent = recs[:-_RECENT], recs[-_RECENT:]
        if old:
            kinds: dict[str, list[int]] = {}
            for rc in old:
                k = self.describe([0, *rc[1:6], 0, 0], False)[3:]
                e = kinds.setdefault(k, [0, rc[0], rc[0]])
                e[0] += 1
                e[2] = rc[0]
            lines.append(f"  {len(old)} older ops, by kind:")
            lines.extend(f"    {n} x {k} (#{a}..#{b})" for k, (n, a, b) in kinds.items())
        lines.extend("  " + self.describe(rc) for rc in recent)
        return lines

    def peer_lines(self, seq: int, peers: dict[int, Any], plain: bool = False) -> tuple[list[str], list[int]]:
        """Each peer's answer as a line, relative to op #seq (``plain``: as is); and the peers that have not entered #seq."""
        lines, missing = [], []
        for q, st in sorted(peers.items()):
            if st is None:
                lines.append(f"  rank {q}: no answer within {self._answer_wait:.1f} s (its process is stuck outside "
                             "Python, or gone)")
                missing.append(q)
                continue
            if st[0] == "exited":
                lines.append(f"  rank {q}: has exited (its program ended after op #{st[1]})")
                if st[1] < seq:
                    missing.append(q)
                continue
            s, inflight, code, age_ms, queued = st[2], st[3], st[4], st[5], st[6]
            name = _NAMES[code] if 0 <= code < len(_NAMES) else "collective"
            age = age_ms / 1000
            more = f" ({queued} async op{'s' if queued > 1 else ''} not finished there)" if queued else ""
            if plain:
                lines.append(f"  rank {q}: in #{s} {name}, for {age:.1f} s{more}" if inflight else
                             f"  rank {q}: not in a collective; its last op, #{s} {name}, ended {age:.1f} s ago{more}"
                             if s else f"  rank {q}: has made no collective call yet")
                continue
            if inflight and s == seq:
                lines.append(f"  rank {q}: in #{s} {name} too, for {age:.1f} s{more}")
            elif inflight and s > seq:
                lines.append(f"  rank {q}: finished #{seq}, now in #{s} {name} for {age:.1f} s{more}")
            elif inflight:
                lines.append(f"  rank {q}: has not entered #{seq}: it is still in #{s} {name}, for {age:.1f} s{more}")
                missing.append(q)
            elif s >= seq:
                lines.append(f"  rank {q}: finished #{seq}; not in a collective now (last op #{s} {name})")
            elif s == 0:
                lines.append(f"  rank {q}: has not entered #{seq}: it has made no collective call yet")
                missing.append(q)
            else:
                lines.append(f"  rank {q}: has not entered #{seq}: it is not in any collective; its last op, "
                             f"#{s} {name}, ended {age:.1f} s ago{more}")
                missing.append(q)
        return lines, missing

    def report(self, rec: OpRecord, what: str, peers: dict[int, Any] | None = None, trace: bool = True) -> str:
        """The report for op ``rec``: what happened, the peers it waits for, what each peer does, the flight recorder."""
        lines = [f"collective: rank {self.rank} of {self.size}: {self.describe(rec, False)} {what}"]
        owner = self._owner() if self._owner is not None else None
        queued = int(getattr(owner, "_pending", 0) or 0)
        if queued > 0:
            lines.append(f"collective: rank {self.rank}: {queued} async op{'s' if queued > 1 else ''} not finished "
                         "on this rank (this one, if it is async, and any queued behind it)")
        step = self.waiting_on() if self.waiting_on else None
        if step:
            lines.append(f"collective: rank {self.rank} is waiting for {rank_list(list(step))} in the current step "
                         f"of {rec[4]}")
        if peers:
            plines, missing = self.peer_lines(rec[0], peers)
            if missing:
                lines.append(f"collective: rank {self.rank} is still waiting for {rank_list(missing)}, which "
                             f"{'has' if len(missing) == 1 else 'have'} not entered #{rec[0]} {rec[1]}")
            lines.append(f"collective: rank {self.rank} asked the other ranks what they are doing:")
            lines.extend(plines)
        elif self._ctrl is None and self.size > 1:
            lines.append("collective: (the other ranks cannot be asked: MPI lacks THREAD_MULTIPLE)")
        if trace:
            lines.extend(self.trace_lines())
        return "\n".join(lines) + "\n"

    def failure_report(self) -> str:
        """For an abort outside any deadline (an uncaught exception): this rank's recorder and what the peers do."""
        rec = self.current
        nxt = rec[0] if rec is not None else (self.trace[-1][0] + 1 if self.trace else 1)
        peers = self._ask_peers(nxt, dump=True, wait=min(1.5, self.interval + 0.5))
        lines = []
        if peers:
            lines.append(f"collective: rank {self.rank} asked the other ranks what they are doing:")
            lines.extend(self.peer_lines(nxt, peers, plain=True)[0])
        lines.extend(self.trace_lines())
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------- shutdown
    def _drain(self) -> None:
        """Wait until no op is in flight or queued on this communicator (the deadline still applies)."""
        owner = self._owner() if self._owner is not None else None
        while self.current is not None or (owner is not None and getattr(owner, "_pending", 0) > 0):
            if self._thread is None or not self._thread.is_alive():
                return
            time.sleep(0.005)

    def close(self, announce: bool = True) -> None:
        """Stop the watchdog thread; with ``announce``, tell the other ranks that this rank's program has ended.

        Called at interpreter exit (before mpi4py finalizes MPI). Call it before
        freeing the communicator if a Communicator is closed early.
        """
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None
        ctrl = self._ctrl
        if ctrl is None:
            return
        with ctrl.lock:
            if not ctrl.usable():
                return
            for m in ctrl.receive():  # exit notices that already arrived: do not send to ranks that have gone
                if m[0] == _EXIT:
                    self.exited[m[1]] = m[2]
            if announce:
                last = self.trace[-1][0] if self.trace else 0
                for q in range(self.size):
                    if q != self.rank and q not in self.exited:
                        ctrl.send(q, _EXIT, self.rank, last)
            ctrl.flush()
            ctrl.closed = True


@atexit.register
def _at_exit() -> None:
    """Runs before mpi4py finalizes MPI: let queued work finish, then announce this rank's exit to every peer.

    A peer waiting in a collective this rank never entered then aborts the job
    with a message saying so, instead of hanging (Open MPI's MPI_Finalize waits
    for every rank).
    """
    wds = _live()
    for wd in wds:
        wd._drain()
    for wd in wds:
        try:
            wd.close(announce=True)
        except Exception:  # noqa: BLE001 - never turn a clean exit into a crash
            pass


_HOOK_INSTALLED = False


def install_excepthook(rank: int, size: int) -> None:
    """Make an uncaught exception on any rank (main or other thread) end the whole job instead of hanging it.

    The report names the rank and carries the traceback, this rank's flight
    recorder and what every other rank is doing. Disabled with
    ``COLLECTIVE_ABORT_ON_EXCEPTION=0``; a no-op on one rank.

    Example::

        install_excepthook(comm.rank, comm.size)   # collective.init() does this
    """
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED or not config.get("ABORT_ON_EXCEPTION"):
        return
    _HOOK_INSTALLED = True
    prev = sys.excepthook

    def hook(etype: Any, value: Any, tb: Any) -> None:
        if size <= 1 or issubclass(etype, KeyboardInterrupt):
            prev(etype, value, tb)
            return
        text = "".join(traceback.format_exception(etype, value, tb))
        parts = [f"collective: rank {rank} of {size} died of an uncaught exception; aborting the job:\n{text}"]
        for wd in _live():
            try:
                parts.append(wd.failure_report())
            except Exception:  # noqa: BLE001 - the abort matters more than the report
                pass
        abort_job("".join(parts))

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thread_hook
