"""Deadlines for blocking waits, stall warnings, the flight recorder, cross-rank checks, aborting the job on failure.

Terms (the names below follow them):

* **op record** -- one entry of the *flight recorder*
  (``collective.sequencer.OpRecord``: seq, op, shape, dtype, algorithm, root,
  start and end time). Each rank keeps its last ``COLLECTIVE_TRACE_BUFFER``.
* **status** -- what the watchdog reads of the communicator it watches, and
  nothing else (:class:`OpStatus`): the flight recorder (with the op in
  flight), how many async ops are pending, and which peers the op in flight
  waits for right now.
* **deadline** -- every collective (and so every blocking wait inside one,
  sync or on the async thread) must end within ``timeout`` seconds of its
  start. A timed-out MPI operation cannot be cancelled safely, so expiry
  reports and ends the whole job with MPI_Abort. On a communicator made with
  ``on_timeout="raise"`` (a torch process group given a ``timeout=``), an
  op still in its first phase, where no rank has read another's data, is
  *withdrawn* instead (``OpStatus.withdraw``): it raises on this rank, the
  report is printed, the communicator is broken, and the job goes on.
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
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from . import config
from .backends.mpi import abandon
from .errors import CollectiveError, format_uncaught
from .fingerprint import rank_list
from .sequencer import FlightRecorder, OpRecord
from .spec import OP_NAMES

__all__ = ["Watchdog", "OpStatus", "install_excepthook", "abort_job", "deadline", "forked_child", "at_exit_last"]

_NAMES = OP_NAMES
_CODE = {n: i for i, n in enumerate(_NAMES)}


class OpStatus(Protocol):
    """What the watchdog reads of the communicator it watches (``collective.sequencer.Sequencer`` has it)."""

    recorder: FlightRecorder
    pending: int

    def waiting_on(self) -> tuple[int, ...] | None:
        """The peers the op in flight waits for right now, or None."""
        ...

    def p2p_lines(self) -> list[str]:
        """The point-to-point messages in flight, a line each."""
        ...

    def withdraw(self, seq: int, why: str) -> bool:
        """Ask op ``seq``, past its deadline, to leave its first phase on this rank; False where it cannot."""
        ...
_QUERY, _STATUS, _EXIT = 1, 2, 3
_RECENT = 20  # flight-recorder entries printed one per line; older ones are summarised by kind


def _say(text: str, dying: bool = False) -> None:
    """Print ``text`` to ``sys.stderr``; ``dying`` (this process is about to end): to the real stderr where
    ``sys.stderr`` is a stand-in that is no file.

    A process that goes on keeps its reports where its program pointed ``sys.stderr`` (a log tee, a
    redirect). One that is ending does not: the StringIO that torch.distributed's excepthook swaps in while it
    runs ours is printed once ours returns, which an aborted process never does.
    """
    out = sys.stderr
    if dying:
        try:
            out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
            out = sys.__stderr__ or out
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


#: Seconds MPI_Abort may take before this process ends itself (the launcher then ends the job: a rank failed).
ABORT_GRACE_S = 10.0


def abort_job(message: str, code: int = 1) -> None:
    """Print ``message`` to stderr and end every rank of the job (MPI_Abort on COMM_WORLD).

    MPI_Abort gets a deadline like every other blocking wait: should it not
    end this process within ``ABORT_GRACE_S``, the process exits with
    ``code`` and the launcher ends the rest.
    """
    try:
        _say(message, dying=True)
    finally:
        try:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                t = threading.Timer(ABORT_GRACE_S, os._exit, (code,))
                t.daemon = True
                t.start()
                MPI.COMM_WORLD.Abort(code)
        finally:
            os._exit(code)


class _Ctrl:
    """The control channel of one communicator (see the module docstring). Callers hold ``lock``."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        tag_ub = comm.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)  # only the world has it set
        assert tag_ub is not None  # MPI sets it on the world communicator
        self.tag = int(tag_ub)
        self.lock = threading.Lock()
        self.sends: list[tuple[Any, np.ndarray]] = []
        self.closed = False

    def usable(self) -> bool:
        MPI = self.MPI
        return not self.closed and self.comm != MPI.COMM_NULL and not MPI.Is_finalized()

    # An MPI error on the channel means a peer failed (elastic mode; otherwise the job is ending): the channel
    # closes quietly and the collective that notices the failure reports it.
    def send(self, peer: int, *msg: int) -> None:
        buf = np.zeros(8, np.int64)
        buf[: len(msg)] = msg
        try:
            self.sends.append((self.comm.Isend([buf, self.MPI.INT64_T], peer, self.tag), buf))
        except self.MPI.Exception:
            self.close_failed()

    def receive(self) -> list[list[int]]:
        out = []
        MPI = self.MPI
        try:
            while True:
                m = self.comm.Improbe(MPI.ANY_SOURCE, self.tag)
                if m is None:
                    break
                buf = np.empty(8, np.int64)
                m.Recv([buf, MPI.INT64_T])
                out.append(buf.tolist())
            if self.sends:
                self.sends = [(r, b) for r, b in self.sends if not r.Test()]
        except MPI.Exception:
            self.close_failed()
        return out

    def flush(self) -> None:
        if self.sends:
            try:
                self.MPI.Request.Waitall([r for r, _ in self.sends])
            except self.MPI.Exception:
                self.close_failed()
            self.sends = []

    def close_failed(self) -> None:
        """Close the channel after an MPI error; its pending sends are kept, never freed (see backends.mpi)."""
        abandon([r for r, _ in self.sends])
        self.closed = True
        self.sends = []


@contextmanager
def deadline(what: str, timeout: float | None = None) -> Iterator[None]:
    """Abort the whole job if the block has not finished within ``timeout`` seconds (else COLLECTIVE_TIMEOUT).

    For blocking MPI calls outside any op record, such as the collective
    communicator duplication and node discovery inside ``Communicator()``.
    An infinite limit (``COLLECTIVE_TIMEOUT=inf``) watches nothing: no thread.

    Example::

        with deadline("init: duplicating the communicator"):
            comm = MPI.COMM_WORLD.Dup()
    """
    t = float(timeout) if timeout is not None else config.get("TIMEOUT")
    if t == float("inf"):  # Event.wait cannot take it (OverflowError), and there is nothing to watch
        yield
        return

    def expire() -> None:
        try:
            from mpi4py import MPI

            where = f"rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()}"
        except Exception:  # noqa: BLE001
            where = f"pid {os.getpid()}"
        abort_job(f"collective: {where}: {what} did not finish within {t:g} s (COLLECTIVE_TIMEOUT): some rank "
                  "has not made the same call (did every rank call collective.init()?); aborting the job")

    done = threading.Event()

    def watch() -> None:
        if not done.wait(t):
            expire()

    # A named thread, not threading.Timer: an unnamed one would take a number from Python's count of unnamed
    # threads, and a user's thread names must come out the same on every rank (collective.threads).
    threading.Thread(target=watch, name="collective-deadline", daemon=True).start()
    try:
        yield
    finally:
        done.set()


_LIVE: list[weakref.ref] = []


def _live() -> list[Watchdog]:
    return [w for w in (r() for r in _LIVE) if w is not None]


class Watchdog:
    """Watches the op in flight: deadline, stall warning, flight-recorder reports, exit notices.

    Args:
        rank, size: this rank and the number of ranks of the communicator.
        timeout: seconds an op may take before the job is aborted (else
            ``COLLECTIVE_TIMEOUT``, else 1800; ``inf`` disables).
        stall_warn: seconds after which a stalled op is reported, once (else
            ``COLLECTIVE_STALL_WARN``, else 60).
        status: the communicator's :class:`OpStatus` (its sequencer); None for
            a watchdog with nothing to watch yet (an empty recorder).
        comm: the private mpi4py communicator the collectives run on (the
            control channel uses it).

    Example::

        wd = Watchdog(rank, size, timeout=30, status=sequencer, comm=mpi_comm)
    """

    def __init__(
        self,
        rank: int,
        size: int,
        timeout: float | None = None,
        stall_warn: float | None = None,
        status: OpStatus | None = None,
        comm: Any = None,
    ) -> None:
        self.rank, self.size = rank, size
        self.timeout = float(timeout) if timeout is not None else config.get("TIMEOUT")
        if not self.timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
        self.stall_warn = stall_warn if stall_warn is not None else config.get("STALL_WARN")
        self._status_src: OpStatus | None = status
        self.recorder: FlightRecorder = status.recorder if status is not None else FlightRecorder(1)
        self.comm = comm
        #: How often the watchdog thread wakes: deadline resolution and exit-notice latency.
        self.interval = max(0.05, min(1.0, self.timeout / 10, self.stall_warn / 4))
        self._answer_wait = min(3.0, 2 * self.interval + 0.3)
        #: Ranks that announced their exit -> the last op they began.
        self.exited: dict[int, int] = {}
        self._ctrl: _Ctrl | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: Any = None
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

    @property
    def running(self) -> bool:
        """True while the watchdog thread runs (never at one rank)."""
        return self._thread is not None

    def _pending(self) -> int:
        st = self._status_src
        return int(st.pending) if st is not None else 0

    def _waiting_on(self) -> tuple[int, ...] | None:
        st = self._status_src
        return st.waiting_on() if st is not None else None

    # ----------------------------------------------------------- the thread
    def _loop(self) -> None:
        failed = False
        while not self._stop.wait(self.interval):
            try:
                if self._ctrl is not None:
                    self._poll()
                rec = self.recorder.current
                if rec is None:
                    continue
                seq = rec.seq
                if self.exited:
                    gone = sorted(q for q, last in list(self.exited.items()) if seq > last)
                    if gone and rec is self.recorder.current:
                        peers = self._ask_peers(seq, dump=True)
                        abort_job(self.report(rec, f"cannot finish: {rank_list(gone)} exited (its program ended) "
                                                   f"without entering it; aborting the job", peers))
                age = time.monotonic() - rec.t_start
                if age > self.timeout and rec is self.recorder.current and rec.seq == seq:
                    if self._withdraw(rec, seq, age):
                        continue
                    age = time.monotonic() - rec.t_start
                    peers = self._ask_peers(seq, dump=True)
                    if rec is self.recorder.current and rec.seq == seq:
                        abort_job(self.report(
                            rec, f"timed out after {age:.1f} s (COLLECTIVE_TIMEOUT={self.timeout:g}); "
                                 "a timed-out MPI operation cannot be cancelled, so the job is aborted", peers))
                elif age > self.stall_warn and self._warned != seq:
                    self._warned = seq
                    peers = self._ask_peers(seq, dump=False)
                    if rec is self.recorder.current and rec.seq == seq:
                        _say(self.report(
                            rec, f"has been stalled for {age:.1f} s (COLLECTIVE_STALL_WARN={self.stall_warn:g}; "
                                 f"the job is aborted at COLLECTIVE_TIMEOUT={self.timeout:g})", peers, trace=False))
            except Exception:  # noqa: BLE001 - the watchdog must outlive its own bugs
                if not failed:
                    failed = True
                    _say(f"collective: rank {self.rank}: watchdog error (deadlines still apply):\n"
                         f"{traceback.format_exc()}")

    def _withdraw(self, rec: OpRecord, seq: int, age: float) -> bool:
        """Op ``rec`` (number ``seq``) is past its deadline: ask it to leave its first phase; True once it ended
        (it left and raised, its report printed by :meth:`withdrawal_report`, or every rank arrived and it
        finished), False when it cannot leave or is still in flight after a grace (the caller ends the job)."""
        st = self._status_src
        ask = getattr(st, "withdraw", None)
        if ask is None or not ask(seq, f"timed out after {age:.1f} s (the communicator's timeout is "
                                       f"{self.timeout:g} s)"):
            return False
        # The op's thread leaves within a nap, then asks the other ranks for the report (at most _answer_wait).
        end = time.monotonic() + self._answer_wait + max(2.0, 4 * self.interval)
        while time.monotonic() < end:
            if rec is not self.recorder.current or rec.seq != seq:
                return True
            time.sleep(0.005)
        return False

    def withdrawal_report(self, rec: OpRecord, gone: int | None) -> None:
        """Print the report of op ``rec``, withdrawn on this rank (``gone``: the rank that left it first, else None):
        what happened and, past its own deadline, what each other rank is doing. On the op's thread, before
        the call raises."""
        if gone is not None:
            _say(self.report(rec, f"cannot complete: rank {gone} reached its timeout in it and left it; withdrawn on "
                                  "this rank too (no data had moved): the call raises, this communicator is broken "
                                  "(every later call on it raises), the job goes on", trace=False, waiting=False))
            return
        age = time.monotonic() - rec.t_start
        peers = self._ask_peers(rec.seq, dump=False)
        _say(self.report(rec, f"timed out after {age:.1f} s (COLLECTIVE_TIMEOUT={self.timeout:g}); withdrawn on "
                              "this rank (no data had moved): the call raises CollectiveTimeoutError, this "
                              "communicator is broken (every later call on it raises), the job goes on", peers,
                         trace=False, waiting=False))

    def _poll(self) -> None:
        ctrl = self._ctrl
        assert ctrl is not None  # its callers poll only a watchdog with a control channel
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
                cur = self.recorder.current
                cur_seq = cur.seq if cur is not None else None
                if m[3] and self._dumped != cur_seq:
                    self._dumped = cur_seq
                    _say("\n".join(self.trace_lines(f"as rank {q} asked (it is aborting the job at op #{m[2]})")))
            elif kind == _STATUS:
                if m[7] == self._nonce:
                    self._answers[q] = m
            elif kind == _EXIT:
                self.exited[q] = m[2]

    def _status(self) -> tuple[int, int, int, int, int]:
        """(last op begun, in flight, its name code, ms since it began or ended, async ops queued)."""
        now = time.monotonic()
        queued = self._pending()
        cur = self.recorder.current
        if cur is not None:
            return cur.seq, 1, _CODE.get(cur.op, -1), int((now - cur.t_start) * 1000), queued
        last = self.recorder.last()
        if last is None:
            return 0, 0, -1, 0, queued
        return last.seq, 0, _CODE.get(last.op, -1), int((now - (last.t_end or last.t_start)) * 1000), queued

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
        return self.recorder.describe(rec, timing)

    def trace_lines(self, why: str = "") -> list[str]:
        """The flight recorder: the last ops one per line, older ones counted by kind (oldest first)."""
        recs = self.recorder.records()
        lines = [f"collective: rank {self.rank} of {self.size}: flight recorder{', ' + why if why else ''}: "
                 f"last {len(recs)} ops, oldest first (COLLECTIVE_TRACE_BUFFER={self.recorder.length}):"]
        old, recent = recs[:-_RECENT], recs[-_RECENT:]
        if old:
            kinds: dict[str, list[int]] = {}
            for rc in old:
                e = kinds.setdefault(rc.kind(), [0, rc.seq, rc.seq])
                e[0] += 1
                e[2] = rc.seq
            lines.append(f"  {len(old)} older ops, by kind:")
            lines.extend(f"    {n} x {k} (#{a}..#{b})" for k, (n, a, b) in kinds.items())
        lines.extend("  " + self.recorder.describe(rc) for rc in recent)
        return lines

    def peer_lines(self, seq: int, peers: dict[int, Any], plain: bool = False) -> tuple[list[str], list[int]]:
        """Each peer's answer as a line, relative to op #seq (``plain``: as is); the peers not yet in #seq."""
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

    def liveness_lines(self, missing: list[int], peers: dict[int, Any]) -> list[str]:
        """Which of the ``missing`` ranks are alive and busy (they answered) and which may be gone (no answer)."""
        busy = [q for q in missing if peers.get(q) is not None and peers[q][0] != "exited"]
        silent = [q for q in missing if peers.get(q) is None]
        out = []
        if busy:
            out.append(f"collective: {rank_list(busy)} {'is' if len(busy) == 1 else 'are'} alive and busy outside "
                       f"this collective (answered); waiting for {'it' if len(busy) == 1 else 'them'} up to "
                       f"COLLECTIVE_TIMEOUT={self.timeout:g} s (raise it for longer evaluation or checkpoints)")
        if silent:
            out.append(f"collective: {rank_list(silent)} did not answer: gone, or stuck outside Python (a rank "
                       "whose program ends tells the others, and the launcher ends the job when a process dies)")
        return out

    def report(self, rec: OpRecord, what: str, peers: dict[int, Any] | None = None, trace: bool = True,
               waiting: bool = True) -> str:
        """The report for op ``rec``: what happened, the peers it waits for, what each peer does, the flight record
        (``waiting``: the op still waits, so say how long it will wait for the peers that are busy)."""
        lines = [f"collective: rank {self.rank} of {self.size}: {self.recorder.describe(rec, False)} {what}"]
        queued = self._pending()
        if queued > 0:
            lines.append(f"collective: rank {self.rank}: {queued} async op{'s' if queued > 1 else ''} not finished "
                         "on this rank (this one, if it is async, and any queued behind it)")
        step = self._waiting_on()
        if step:
            lines.append(f"collective: rank {self.rank} {'is' if waiting else 'was'} waiting for "
                         f"{rank_list(list(step))} in the current step of {rec.algorithm}")
        if peers:
            plines, missing = self.peer_lines(rec.seq, peers)
            if missing:
                lines.append(f"collective: rank {self.rank} {'is still' if waiting else 'was'} waiting for "
                             f"{rank_list(missing)}, which "
                             f"{'has' if len(missing) == 1 else 'have'} not entered #{rec.seq} {rec.op}")
                if waiting:
                    lines.extend(self.liveness_lines(missing, peers))
            lines.append(f"collective: rank {self.rank} asked the other ranks what they are doing:")
            lines.extend(plines)
        elif self._ctrl is None and self.size > 1:
            lines.append("collective: (the other ranks cannot be asked: MPI lacks THREAD_MULTIPLE)")
        st = self._status_src
        p2p = st.p2p_lines() if st is not None and hasattr(st, "p2p_lines") else []
        if p2p:
            lines.append(f"collective: rank {self.rank}: point-to-point messages in flight:")
            lines.extend(p2p)
        if trace:
            lines.extend(self.trace_lines())
        return "\n".join(lines) + "\n"

    def failure_report(self) -> str:
        """For an abort outside any deadline (an uncaught exception): this rank's recorder and what the peers do."""
        rec = self.recorder.current
        nxt = rec.seq if rec is not None else self.recorder.last_seq + 1
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
        while self.recorder.current is not None or self._pending() > 0:
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
                last = self.recorder.last_seq
                for q in range(self.size):
                    if q != self.rank and q not in self.exited:
                        ctrl.send(q, _EXIT, self.rank, last)
            ctrl.flush()
            ctrl.closed = True


_LAST: list[Any] = []


def at_exit_last(fn: Any) -> None:
    """Run ``fn()`` at interpreter exit after the watchdogs have announced this rank's exit (before MPI finalizes);
    in the order registered."""
    _LAST.append(fn)


@atexit.register
def _at_exit() -> None:
    """Runs before mpi4py finalizes MPI: let queued work finish, then announce this rank's exit to every peer.

    A peer waiting in a collective this rank never entered then aborts the job
    with a message saying so, instead of hanging (Open MPI's MPI_Finalize waits
    for every rank). Never in a forked child: it is not the rank.
    """
    if forked_child():
        return
    wds = _live()
    for wd in wds:
        wd._drain()
    for wd in wds:
        try:
            wd.close(announce=True)
        except Exception:  # noqa: BLE001 - never turn a clean exit into a crash
            pass
    for fn in list(_LAST):
        try:
            fn()
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------ fork
#: A forked child's exit status as far as it is known (sys.exit's argument, 1 after an uncaught exception).
_child_status: list[int] = [0]


def forked_child() -> bool:
    """True in a process forked from an MPI rank after collective initialised MPI (not an MPI process itself)."""
    from .backends import mpi as _mpi

    return _mpi.MPI_PID is not None and os.getpid() != _mpi.MPI_PID


def _exit_status(code: Any) -> int:
    """The process exit status for ``sys.exit(code)``, as Python computes it."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # noqa: BLE001 - an exit must not fail on its message
        pass
    return 1


def _after_fork() -> None:
    """In a child forked from a rank whose MPI is initialised: end it without MPI's finalization or exit notices.

    Such a child shares the rank's MPI state but is no MPI process: MPI_Finalize
    there waits for the job forever, and an exit notice would tell the other
    ranks that this rank had ended. A child that ends with ``sys.exit()``, by
    returning from the main module or by an uncaught exception leaves through
    ``os._exit`` with the same status, right after the handlers the child
    registered itself (and before the parent's, which multiprocessing's fork
    workers, torch's DataLoader among them, skip the same way). A bare ``raise
    SystemExit(n)`` reports 0.
    """
    if not forked_child():  # collective never initialised MPI in the parent: nothing to protect
        return
    real_exit = sys.exit

    def exit_(status: Any = None) -> None:
        _child_status[0] = _exit_status(status)
        real_exit(status)

    def excepthook(etype: Any, value: Any, tb: Any) -> None:
        _child_status[0] = 1
        sys.__excepthook__(etype, value, tb)  # never collective's hook: MPI_Abort would end the whole job

    sys.exit = exit_  # type: ignore[assignment]
    sys.excepthook = excepthook
    threading.excepthook = threading.__excepthook__
    atexit.register(_child_exit)  # registered last, so it runs before every handler inherited from the rank


def _child_exit() -> None:
    """The forked child's last Python step: flush, then leave without running MPI's finalization."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(_child_status[0])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


_HOOK_INSTALLED = False


def install_excepthook(rank: int, size: int) -> None:
    """Make an uncaught exception on any rank (main or other thread) end the whole job instead of hanging it.

    The report names the rank and carries the traceback, this rank's flight
    recorder and what every other rank is doing. Disabled with
    ``COLLECTIVE_ABORT_ON_EXCEPTION=0``; no abort on one rank. Either way, an
    uncaught error of ours raised inside the library (a wrong argument, a
    mismatch) is reported from the user's own frames down to our message
    (``errors.format_uncaught``); ``COLLECTIVE_TRACEBACK=full`` shows every frame.

    Example::

        install_excepthook(comm.rank, comm.size)   # collective.init() does this
    """
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    _HOOK_INSTALLED = True
    abort = size > 1 and config.get("ABORT_ON_EXCEPTION")
    full = config.get("TRACEBACK") == "full"
    prev = sys.excepthook

    def hook(etype: Any, value: Any, tb: Any) -> None:
        if issubclass(etype, KeyboardInterrupt) or not (abort or isinstance(value, CollectiveError)):
            prev(etype, value, tb)
            return
        if forked_child():  # not the rank: never abort the job from a forked child
            prev(etype, value, tb)
            return
        text = format_uncaught(etype, value, tb, full=full)
        if not abort:
            sys.stderr.write(text)
            sys.stderr.flush()
            return
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
    if abort:
        threading.excepthook = thread_hook
