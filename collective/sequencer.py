"""The op sequencer: the one place where a collective begins and ends, in the same order on every rank.

Terms (the names below follow them):

* **op** -- one collective call on one communicator, numbered by its
  *sequence number* ``seq`` (1, 2, ...): the same number on every rank for
  the same call, since every rank issues its ops in the same order.
* **op record** -- the flight recorder's typed entry for an op
  (:class:`OpRecord`); the recorder keeps the last ``trace_len`` of them in a
  ring and reuses their slots, so beginning an op allocates nothing.
* **pending** -- async ops handed to the communication thread and not yet
  finished. A synchronous op made while some are pending queues behind them,
  so every rank still issues its ops in one order.
* **check** -- the cross-rank check (:mod:`collective.check`), run by the
  sequencer after the op's record begins (so the deadline covers it) and
  before any of its data moves.
* **issuer** -- the thread that called the op (``collective.threads``): its
  tag is recorded with the op and folded into the op's fingerprint, so an op
  issued by one thread on one rank and by another thread on another rank is a
  mismatch on every rank. An async op's issuer is the thread that called
  ``*_async``, not the communication thread that runs it.
* **gate** -- the lock of the callers' threads: held by a thread from the
  start of its synchronous op to its end (the *owner*), and while it queues
  an async op. A collective entered on the communicator from another thread
  while the gate is held raises CollectiveUsageError naming both calls and
  both threads, after taking part in the op order as a poisoned call so the
  other ranks raise too instead of waiting: two threads racing for one
  communicator would otherwise pair their ops by chance. Ops never run two
  at once: the owner runs its op itself only when nothing is pending
  (nothing can be queued meanwhile: queueing takes the gate), else it queues
  it behind the pending ops; the one communication thread runs the queued
  ops one by one, and lowers ``pending`` only after an op is done.
* **withdrawn** -- on a communicator made with ``on_timeout="raise"``, an op
  still waiting in its first phase (no rank has read another's data) when
  its deadline passes leaves it on this rank (:meth:`Sequencer.withdraw`,
  asked by the watchdog; see ``collective.shm``): the call raises
  CollectiveTimeoutError and the communicator is *broken*: this rank's
  sequence numbers are one ahead of the ranks that never came, so every
  later call on it raises at once (:attr:`Sequencer.broken`).
* **repeat** -- a synchronous allreduce whose signature passed every check
  before: its prepared call is a template refilled with this call's arrays
  (:meth:`Sequencer.allreduce`), and on one node its check and its
  data may share a single shm phase. It sits here, beside the ordinary path
  (:meth:`Sequencer.run`), because every frame counts at small sizes.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .arrays import Deferred
from .errors import (
    BackendUnavailableError,
    CollectiveError,
    CollectiveTimeoutError,
    CollectiveUsageError,
    describe,
    raise_lost,
)
from .fingerprint import Poison, rank_list
from .shm import RETIRED, Withdrawn, retired_window
from .spec import ROOTED
from .threads import TAGS, OrderedIssuers, ThreadTag, thread_tag
from .variable import VCall, VHot

__all__ = ["OpRecord", "FlightRecorder", "Work", "Sequencer", "MISS"]

#: What :meth:`Sequencer.vrepeat` returns when the ordinary path must take the call.
MISS = object()

_monotonic = time.monotonic


class OpRecord:
    """One op of the flight recorder.

    Attributes:
        seq: the op's sequence number on this communicator.
        what: (op, shape, dtype, algorithm, root), read through the properties of those names: a call repeated
            from a plan records its plan's tuple, one store instead of five.
        op: the collective's name ("allreduce", ..., "barrier").
        shape, dtype: of this rank's input (None for a barrier or a rejected call).
        algorithm: the algorithm that ran ("auto" resolved; None: this rank rejected its arguments).
        root: of a rooted collective, else None.
        thread: the issuing thread's ``collective.threads.ThreadTag`` (an async op's: the thread that called it).
        t_start, t_end: ``time.monotonic()`` when it began and ended (``t_end`` None while in flight).
    """

    __slots__ = ("seq", "what", "thread", "t_start", "t_end")

    def __init__(self) -> None:
        self.seq = 0
        self.what: tuple[str, Any, Any, Any, Any] = ("", None, None, None, None)
        self.thread: ThreadTag | None = None
        self.t_start: float = 0.0
        self.t_end: float | None = None

    @property
    def op(self) -> str:
        """The collective's name."""
        return self.what[0]

    @property
    def shape(self) -> Any:
        """This rank's input shape (None for a barrier or a rejected call)."""
        return self.what[1]

    @property
    def dtype(self) -> Any:
        """This rank's input dtype (None for a barrier or a rejected call)."""
        return self.what[2]

    @property
    def algorithm(self) -> Any:
        """The algorithm that ran (None: this rank rejected its arguments)."""
        return self.what[3]

    @property
    def root(self) -> Any:
        """The root of a rooted collective, else None."""
        return self.what[4]

    def describe(self, timing: bool = True) -> str:
        """One line: ``#7 allreduce shape (4,) float32 algorithm ring (12 us)`` (and ``from thread 'x'`` when the
        issuer is not the main thread)."""
        if self.algorithm is None:
            s = f"#{self.seq} {self.op} (arguments rejected on this rank)"
        elif self.op == "barrier":
            s = f"#{self.seq} barrier"
        else:
            # A scatter off its root has neither shape nor dtype of its own (the root's rows define them).
            shape = "-" if self.shape is None else tuple(self.shape)
            dtype = "-" if self.dtype is None else self.dtype
            s = f"#{self.seq} {self.op} shape {shape} {dtype} algorithm {self.algorithm}"
            if self.root is not None:
                s += f" root {self.root}"
        th = self.thread
        if th is not None and th.name != "MainThread":
            s += f" from thread {th.name!r}"
        if timing:
            s += " (in flight)" if self.t_end is None else f" ({(self.t_end - self.t_start) * 1e6:.0f} us)"
        return s

    def kind(self) -> str:
        """:meth:`describe` without the number and timing: what the op was, to count ops of one kind."""
        return self.describe(False).split(" ", 1)[1]


class FlightRecorder:
    """The last ``length`` ops of one communicator, oldest first, and the op in flight (``current``).

    Written by the op's thread, read by the watchdog thread: a reader may see
    a slot being refilled, which reports tolerate.
    """

    def __init__(self, length: int = 1024) -> None:
        self.length = n = max(1, int(length))
        self.slots = [OpRecord() for _ in range(n)]
        #: The op in flight, or None.
        self.current: OpRecord | None = None
        #: The sequence number of the newest op begun (0: none yet).
        self.last_seq = 0
        #: When a framework owns the communicator, how its program names our ops: op name -> the caller's
        #: words (a torch process group: "all_reduce via torch.distributed, group 'default_pg'"), for reports.
        self.called_as: dict[str, str] = {}

    def begin(self, seq: int, name: str, shape: Any, dtype: Any, algorithm: Any, root: Any,
              thread: ThreadTag | None = None) -> OpRecord:
        """Record op ``seq`` (issued by ``thread``) as begun and in flight; returns its record."""
        rec = self.slots[seq % self.length]
        rec.seq, rec.what = seq, (name, shape, dtype, algorithm, root)
        rec.thread = thread
        rec.t_end = None
        rec.t_start = _monotonic()
        self.last_seq = seq
        self.current = rec
        return rec

    def describe(self, rec: OpRecord, timing: bool = True) -> str:
        """``rec.describe(timing)``, followed by how the program called the op where :attr:`called_as` says."""
        via = self.called_as.get(rec.op)
        return rec.describe(timing) + (f" [{via}]" if via else "")

    def end(self, rec: OpRecord) -> None:
        """Record ``rec`` as finished."""
        rec.t_end = _monotonic()
        self.current = None

    def last(self) -> OpRecord | None:
        """The newest record, or None before the first op."""
        return self.slots[self.last_seq % self.length] if self.last_seq else None

    def records(self) -> list[OpRecord]:
        """The kept records, oldest first."""
        last = self.last_seq
        first = max(1, last - self.length + 1)
        return [self.slots[s % self.length] for s in range(first, last + 1)]


# Orders a handle's finish against the registration of its callback (both rare and short).
_THEN_LOCK = threading.Lock()


class Work:
    """Handle of an asynchronous collective: ``wait()`` returns its result, ``done()`` polls.

    Example::

        w = comm.allreduce_async(grad, out=grad)
        ...  # compute while the allreduce runs
        w.wait()
    """

    __slots__ = ("_event", "_result", "_exc", "_name", "_then")

    def __init__(self, name: str) -> None:
        self._event = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None
        self._name = name
        self._then: Callable[[Work], None] | None = None

    def done(self) -> bool:
        """True once the collective has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the collective finishes and return its result (re-raising its error).

        Args:
            timeout: seconds to wait before raising CollectiveTimeoutError; None waits
                until the op ends (the watchdog aborts the job at COLLECTIVE_TIMEOUT).
        """
        if not self._event.wait(timeout):
            raise CollectiveTimeoutError(f"{self._name}: not finished after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._result

    def finish(self, result: Any, exc: BaseException | None) -> None:
        """Complete the handle (called once, by the thread that ran the op), then run its :meth:`then` callback."""
        with _THEN_LOCK:
            self._result, self._exc = result, exc
            self._event.set()
            then, self._then = self._then, None
        if then is not None:
            then(self)

    def then(self, fn: Callable[[Work], None]) -> None:
        """Call ``fn(self)`` once the op has finished: on the thread that finishes it, or here if it has.

        One callback per handle. ``fn`` runs on the communication thread, which runs every later op: it must
        be quick and must not wait on another op (hand longer work to a thread of its own).
        """
        with _THEN_LOCK:
            if not self._event.is_set():
                self._then = fn
                return
        fn(self)


class Sequencer:
    """Orders, checks and records every op of one communicator; runs async ops on one communication thread.

    Args:
        rank, size: this rank and the number of ranks.
        check: the cross-rank check (:class:`collective.check.CrossRankCheck`).
        engine: moves the data: ``execute(call, first)`` (see ``collective.engine.HostEngine``).
        prep: the call preparation, whose repeat templates (``templates``, ``hot_call``, ``window``)
            the repeat paths refill.
        ordinary: ``ordinary(x, op, algorithm, out)``, the ordinary path of an allreduce that
            :meth:`allreduce` does not repeat (the communicator's: prepare, then :meth:`run`).
        async_ok: why async ops cannot run here (None: they can), e.g. MPI without THREAD_MULTIPLE.
        trace_len: flight-recorder length.
    """

    def __init__(self, rank: int, size: int, check: Any, engine: Any, prep: Any,
                 ordinary: Callable[[Any, Any, Any, Any], Any], async_ok: str | None = None,
                 trace_len: int = 1024) -> None:
        self.rank, self.size = rank, size
        self.check = check
        self.engine = engine
        self.prep = prep
        self.async_problem = async_ok
        self.recorder = FlightRecorder(trace_len)
        self.seq = 0
        #: Async ops handed to the communication thread and not finished (it lowers the count as the last thing
        #: an op does to this sequencer's state).
        self.pending = 0
        self.ordinary = ordinary
        self._templates = prep.templates
        self._finish_avg = engine.finish_avg
        #: ``vprepare(name, x, algorithm, out, return_splits, root, expect, splits)``: the prepared call
        #: (``collective.variable.VCall``) of an alltoall, allgather, gather or scatter that :meth:`vrepeat` hands to
        #: the ordinary path after its check; set by the communicator.
        self.vprepare: Callable[[str, Any, Any, Any, bool, int, bool, Any], Any] | None = None
        #: The communicator's point-to-point messages (``collective.p2p.PointToPoint``), once attached.
        self.p2p: Any = None
        #: Elastic mode: ``fault(name, exc, started)`` -> the error a failed op raises instead of ``exc`` (None:
        #: ``exc`` is no sign of a lost rank). Set by the communicator; None otherwise.
        self.fault: Callable[[str, BaseException, float | None], BaseException | None] | None = None
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        #: Where the issuing thread's tag comes from: the thread's own name (the module's TAGS / thread_tag),
        #: or one name for every thread (:meth:`ordered_by_caller`).
        self._tags: Any = TAGS
        self.thread_tag: Callable[[], ThreadTag] = thread_tag
        #: Held by a user thread's synchronous op from its start to its end (see the module docstring).
        self._gate = threading.Lock()
        #: The tag of the thread that holds the gate, and its call, while one does (for the usage error).
        self.owner: ThreadTag | None = None
        self.owner_call: Any = None
        #: Why every call on this communicator raises, once an op was withdrawn (see the module docstring).
        self.broken: str | None = None
        #: ``on_withdrawn(rec, gone)``: op ``rec`` was withdrawn on this rank (``gone``: the rank that left it first,
        #: else None); set by the communicator, which marks itself broken and reports. Runs on the op's thread.
        self.on_withdrawn: Callable[[OpRecord, int | None], None] | None = None
        #: ``on_broken()``: an op failed on this rank alone (see :meth:`_failed`); set by the communicator, which
        #: marks itself broken. Runs on the op's thread.
        self.on_broken: Callable[[], None] | None = None
        self._withdraw_why: tuple[int, str] = (0, "")

    # ------------------------------------------------------------ the gate
    def _overlap(self, c: Any, tag: ThreadTag) -> None:
        """Raise CollectiveUsageError for call ``c`` of thread ``tag`` entered while another thread holds the gate.

        First this rank takes part in the op order with a poisoned call (as a
        rank that rejected its arguments does), so ranks where the two threads
        did not overlap raise too instead of waiting for this call. Work that
        is not an op (``run_locked``: alloc, free, device setup) takes no
        sequence number on any rank, so it raises without a poisoned turn: one
        would pair with the other ranks' next op.
        """
        other, theirs = self.owner, self.owner_call
        mine = describe(getattr(c, "name", "collective"), self.rank, self.size, getattr(c, "shape", None),
                        getattr(c, "dtype", None), getattr(c, "algorithm", None))
        if other is None or other is tag:  # it is just starting or ending
            who, what = "another thread", "its collective"
        else:
            who = f"thread {other.name!r}"
            what = describe(getattr(theirs, "name", "collective"), None, None, getattr(theirs, "shape", None),
                            getattr(theirs, "dtype", None), getattr(theirs, "algorithm", None))
        err = CollectiveUsageError(
            f"{mine}: called from thread {tag.name!r} while {what} of {who} is in flight on this communicator. "
            "Two threads may not use one communicator at the same time: the order of their collectives would "
            "differ from rank to rank. Give each thread its own communicator (comm.split(0) or "
            "comm.subgroup(range(comm.size)), made in the same order on every rank), or let one thread at a time "
            "call collectives (a lock, or a queue served by one thread).")
        if type(c) is not _Call0:
            self.poison(getattr(c, "name", "collective"), err, tag)
        raise err

    def ordered_by_caller(self, name: str) -> None:
        """Tag every thread's ops ``name``: this communicator's one caller orders its ops across its threads.

        For torch.distributed's process groups: torch issues a group's ops in
        one order on every rank, some from the caller's thread and some from a
        completion callback's, so the issuing thread is no part of the op's
        identity there. A thread entering while another's op is in flight
        still raises.
        """
        issuers = OrderedIssuers(name)
        self._tags, self.thread_tag = issuers, issuers.make

    def _enter(self, c: Any, tag: ThreadTag) -> bool:
        """Take the gate for synchronous op ``c`` of thread ``tag``; False when this thread already holds it
        (nested: it must not release it). Raises CollectiveUsageError when another thread holds it."""
        if self._gate.acquire(False):
            self.owner, self.owner_call = tag, c
            return True
        if self.owner is not tag:
            self._overlap(c, tag)
        return False

    def _leave(self) -> None:
        # owner_call too: the call (its arrays, a device request, a poison's traceback) must not outlive the op.
        self.owner = self.owner_call = None
        self._gate.release()

    # ------------------------------------------------------------ ordinary ops
    def run(self, c: Any, execute: Callable[[Any, Any, int], Any] | None = None) -> Any:
        """Run prepared call ``c`` as this communicator's next op, after any pending async ops; its result.

        ``execute``: see :meth:`op` (the device paths pass their own).

        Raises:
            CollectiveUsageError: another thread's synchronous op is in flight on this communicator.
        """
        tag = self.thread_tag()
        held = self._enter(c, tag)
        try:
            if self.pending == 0:
                return self.op(c, execute, tag)
            return self._queue_op(c, execute, tag).wait()
        finally:
            if held:
                self._leave()

    def poison(self, name: str, exc: BaseException, tag: ThreadTag | None = None) -> None:
        """Take part in op ``name``'s check with a poison fingerprint after this rank rejected its arguments.

        The other ranks may be entering the op: they raise CollectiveMismatchError
        naming this rank and its error instead of waiting for it. The caller
        raises ``exc`` itself. ``tag``: the issuing thread (default: the calling one).
        """
        if not self.check.on:
            return
        p = Poison(name, exc)
        if tag is None:
            tag = self.thread_tag()
        nested = self.owner is tag  # this thread holds the gate already
        if not nested:
            # Blocking: a poisoned turn waits for another thread's op in flight (which its deadline bounds).
            self._gate.acquire()
            self.owner, self.owner_call = tag, p
        try:
            if self.pending == 0:
                try:
                    self.op(p, None, tag)
                except Exception:  # noqa: BLE001 - this rank raises its own error
                    pass
            else:
                self._queue_op(p, None, tag)
        finally:
            if not nested:
                self._leave()

    def op(self, c: Any, execute: Callable[[Any, Any, int], Any] | None = None, tag: ThreadTag | None = None) -> Any:
        """Begin, check, execute and end op ``c`` (the caller holds the gate and nothing is pending, or it is the
        communication thread).

        ``execute(c, first, seq)`` moves the data (default: the engine's); ``first``
        is the check when it is to be the call's first shm phase, else None
        (the check already ran). ``tag``: the issuing thread (default: the calling one).
        """
        if self.broken is not None:
            # Queued before an op broke this communicator (see _failed): run, it would stand in for the op that
            # this rank left while the others are still in it, so it raises instead.
            raise CollectiveError(f"{describe(c.name, self.rank, self.size)}: {self.broken}")
        self.seq = seq = self.seq + 1
        name = c.name
        recorder = self.recorder  # its begin and end, written out (every frame counts at small sizes)
        rec = recorder.slots[seq % recorder.length]
        rec.seq, rec.what = seq, (name, c.shape, c.dtype, c.algorithm, c.root if name in ROOTED else None)
        rec.thread = tag if tag is not None else self.thread_tag()
        rec.t_end = None
        rec.t_start = _monotonic()
        recorder.last_seq = seq
        recorder.current = rec
        try:
            check = self.check
            ca = check.arena
            if ca is not None and ca.cma is not None and type(c) is VCall:
                ca.post_input(c.x)  # before the check: the shm path may read it by single copy
            first = check.gate(rec, c) if check.on else None
            r = (execute or self.engine.execute)(c, first, seq)
        except BaseException as exc:
            self._failed(name, exc, rec.t_start)
            raise
        finally:
            rec.t_end = _monotonic()
            recorder.current = None
        return r.resolve() if type(r) is Deferred else r

    def _failed(self, name: str, exc: BaseException, started: float) -> None:
        """Raise what op ``name``'s error ``exc`` becomes (an op withdrawn: its timeout error; in elastic mode:
        RanksLostError); return if it stays.

        The library's own errors inside an op (CollectiveError: a mismatch, a
        failed single-copy transfer, bad sizes found from exchanged counts) are
        raised by every rank at the same point, so the ranks' calls still line
        up and the communicator goes on. Anything else (MemoryError allocating
        a result, KeyboardInterrupt, an MPI error) left the op on this rank
        alone, while the others may still wait in it or read this rank's
        arrays: the communicator is broken from then on, as after a withdrawal,
        so that no later call of this rank can stand in for the one it left
        (which could hand the others this call's bytes as another's).
        """
        if isinstance(exc, Withdrawn):
            raise self._withdrawn(name, exc) from None
        raise_lost(self.fault, name, exc, started)
        if not isinstance(exc, CollectiveError) and self.broken is None:
            rec = self.recorder.current
            what = self.recorder.describe(rec, False) if rec is not None else name
            self.broken = (f"this communicator is broken: its op {what} raised {type(exc).__name__} on this rank "
                           f"({exc}) while the other ranks may still be in it; the ranks' calls no longer line up; "
                           "every call on it raises. Other communicators are unaffected: make a new one to go on "
                           "(torch.distributed: a new process group)")
            if hasattr(exc, "add_note"):
                exc.add_note(f"collective: rank {self.rank} of {self.size}: {self.broken}")
            if self.on_broken is not None:
                self.on_broken()

    def withdraw(self, seq: int, why: str) -> bool:
        """For the watchdog: op ``seq`` is past its deadline (``why`` says how long it took); leave it on this rank
        if it is still in its first phase. True: asked (the op raises, unless every rank arrives meanwhile and it
        goes on); False: it cannot be withdrawn (not opted in, or data moves), and the job must end."""
        self._withdraw_why = (seq, why)
        return bool(self.engine.withdraw(seq))

    def _withdrawn(self, name: str, exc: Withdrawn) -> CollectiveError:
        """The error of op ``name`` that left its first phase (``exc`` says why); the communicator is broken."""
        if exc.again or self.broken is not None:
            return CollectiveError(f"{describe(name, self.rank, self.size)}: {self.broken}")
        rec = self.recorder.current
        what = self.recorder.describe(rec, False) if rec is not None else name
        seq, why = self._withdraw_why
        if exc.gone is not None:
            text = (f"{what} on rank {self.rank} of {self.size} cannot complete: rank {exc.gone} reached its "
                    "timeout waiting in it and left it, so this rank left it too (no data had moved)")
            self.broken = (f"this communicator is broken: rank {exc.gone} left its op {what} at its timeout, and so "
                           f"did this rank; the ranks' calls no longer line up")
        else:
            if rec is None or seq != rec.seq:
                why = "timed out (the communicator's timeout passed)"
            missing = list(exc.missing)
            text = (f"{what} on rank {self.rank} of {self.size} {why} waiting for {rank_list(missing)}, which "
                    f"{'has' if len(missing) == 1 else 'have'} not arrived: withdrawn on this rank (no data had "
                    "moved)")
            self.broken = (f"this communicator is broken: its op {what} timed out on this rank and was withdrawn "
                           f"while {rank_list(missing)} had not arrived; the ranks' calls no longer line up")
        self.broken += ("; every call on it raises. Other communicators are unaffected: make a new one to go on "
                        "(torch.distributed: a new process group)")
        if self.on_withdrawn is not None and rec is not None:
            self.on_withdrawn(rec, exc.gone)
        return CollectiveTimeoutError(f"{text}. This communicator is broken: every later call on it raises at once; "
                                      "other communicators are unaffected")

    def submit(self, c: Any, execute: Callable[[Any, Any, int], Any] | None = None) -> Work:
        """Queue op ``c`` on the communication thread; its handle.

        Raises:
            CollectiveUsageError: another thread's synchronous op is in flight on this communicator.
        """
        tag = self.thread_tag()
        held = self._enter(c, tag)
        try:
            return self._queue_op(c, execute, tag)
        finally:
            if held:
                self._leave()

    def _queue_op(self, c: Any, execute: Callable[[Any, Any, int], Any] | None, tag: ThreadTag) -> Work:
        """Queue op ``c`` of thread ``tag`` (no gate: the caller checked it or holds it); its handle."""
        if self._worker is None:
            if self.async_problem is not None and self.size > 1:
                raise BackendUnavailableError(f"{describe(c.name + '_async', self.rank, self.size)}: "
                                              f"{self.async_problem}")
            self._queue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._serve, name="collective-comm", daemon=True)
            self._worker.start()
        w = Work(c.name)
        self.pending += 1
        self._queue.put((c, w, execute, tag))  # type: ignore[union-attr]
        return w

    def run_here(self, c: Any, execute: Callable[[Any, Any, int], Any]) -> Any:
        """Op ``c`` on the calling thread, after every pending async op (device paths bound to this thread)."""
        tag = self.thread_tag()
        held = self._enter(c, tag)
        try:
            if self.pending:
                self._queue_op(_Call0(_nothing), None, tag).wait()
            return self.op(c, execute, tag)
        finally:
            if held:
                self._leave()

    def waiting_on(self) -> tuple[int, ...] | None:
        """The peers the op in flight waits for right now, or None (for the watchdog)."""
        return self.engine.waiting_on()

    def p2p_lines(self) -> list[str]:
        """The point-to-point messages in flight, a line each (for the watchdog's reports)."""
        return self.p2p.report_lines() if self.p2p is not None else []

    def run_locked(self, fn: Callable[[], Any], name: str = "collective") -> Any:
        """``fn()`` on the calling thread under the gate, after every pending async op (for work that must not
        interleave with ops: ``alloc``, ``free``, device setup, all collective; ``name`` says which in a usage
        error). In elastic mode an error of ``fn`` that a lost rank caused becomes RanksLostError."""
        tag = self.thread_tag()
        c = _Call0(fn, name)
        held = self._enter(c, tag)
        try:
            if self.pending:  # as run_here: wait for them, then run fn here (device setup is bound to this thread)
                self._queue_op(_Call0(_nothing), None, tag).wait()
            t0 = _monotonic()
            try:
                return fn()
            except BaseException as exc:
                self._failed(name, exc, t0)
                raise
        finally:
            if held:
                self._leave()

    def run_in_window(self, c: Any, own: list) -> bool:
        """Window-path op ``c`` with this rank's input ``own`` (``Communicator.allreduce_in_window``), under the
        gate; False, with nothing sent, if async ops are pending."""
        tag = self.thread_tag()
        held = self._enter(c, tag)
        try:
            if self.pending:
                return False
            c.own = own
            try:
                self.op(c, None, tag)
            finally:
                c.own = None
            return True
        finally:
            if held:
                self._leave()

    def _serve(self) -> None:
        q = self._queue
        while True:
            item = q.get()  # type: ignore[union-attr]
            if item is None:
                return
            c, w, execute, tag = item
            # The count drops before the waiter can wake, so a synchronous call made right after wait()
            # returns never queues behind a collective that has already finished.
            try:
                res = c.fn() if type(c) is _Call0 else self.op(c, execute, tag)
            except BaseException as exc:  # handed to the waiter, who re-raises it
                self.pending -= 1
                w.finish(None, exc)
            else:
                self.pending -= 1
                w.finish(res, None)

    def close(self) -> None:
        """Stop the communication thread (after the ops queued before)."""
        if self._worker is not None:
            self._queue.put(None)  # type: ignore[union-attr]
            self._worker.join()
            self._worker = None

    # --------------------------------------------------------------- repeats
    def allreduce(self, x: Any, op: Any = "sum", algorithm: Any = None, out: Any = None) -> Any:
        """A synchronous allreduce: a repeat of a checked signature on NumPy ``x`` here, anything else by
        ``ordinary`` (prepare, then :meth:`run`; it also explains what is wrong with the arguments).

        The communicator binds this as its ``allreduce``, so a repeat runs in
        this one frame: at small sizes the Python around a call is its cost.
        Only this call's own arrays are checked (contiguous; ``out`` absent,
        ``x`` itself, or a separate array of the same shape and dtype that
        does not overlap ``x``); the template is refilled under the gate and
        emptied again, so no user array is kept alive. alloc'd arrays from
        the window size, in place or into alloc'd arrays, take the window
        path (their prepared call is kept, see ``Preparer.hot_call``). A
        call that finds the gate held takes the ordinary path, which says
        why (another thread's op) or runs it (this thread's, nested).
        """
        if type(x) is not np.ndarray or self.pending:
            return self.ordinary(x, op, algorithm, out)
        prep = self.prep
        # An array of a replaced communicator (elastic mode, after a shrink): the checked path refuses it by name.
        if RETIRED and (retired_window(x) is not None
                        or (out is not None and out is not x and retired_window(out) is not None)):
            return self.ordinary(x, op, algorithm, out)
        if out is not None and x.base is not None and x.nbytes >= prep.window_min:  # windows are views
            hot = prep.hot_call("allreduce", x, op, algorithm, 0, out)
            if hot is not None:
                r = self._window_repeat(hot)
                return r if r is not None else self.ordinary(x, op, algorithm, out)
        try:
            c = self._templates.get((x.shape, x.dtype, op, algorithm))
        except TypeError:  # an unhashable op or algorithm
            return self.ordinary(x, op, algorithm, out)
        if c is None or not x.flags.c_contiguous:
            return self.ordinary(x, op, algorithm, out)
        # This call's own output: out absent, x itself, or a separate array of x's shape and dtype that does not
        # overlap it (written out here, not a call into prep: every frame counts at small sizes).
        if out is None:
            o = np.empty(x.shape, x.dtype)
        elif out is x:
            if not x.flags.writeable or (x.base is not None and c.algorithm == "shm" and x.nbytes >= prep.window_min
                                         and prep.window(x, x, True) is not None):  # alloc'd in place: the window
                return self.ordinary(x, op, algorithm, out)
            o = x
        elif type(out) is np.ndarray and out.shape == x.shape and out.dtype == x.dtype:
            f = out.flags
            if not (f.writeable and f.c_contiguous and ((f.owndata and x.flags.owndata)
                                                        or not np.may_share_memory(out, x))):
                return self.ordinary(x, op, algorithm, out)
            if (c.algorithm == "shm" and x.base is not None and x.nbytes >= prep.window_min
                    and prep.window(x, out, False) is not None):
                return self.ordinary(x, op, algorithm, out)  # alloc'd into alloc'd: the window path
            o = out
        else:
            return self.ordinary(x, op, algorithm, out)
        try:
            tag = self._tags.tag  # the issuing thread, one thread-local read (thread_tag() on its first call)
        except AttributeError:
            tag = self.thread_tag()
        gate = self._gate
        if not gate.acquire(False):  # not `with`: half the cost at small sizes
            return self.ordinary(x, op, algorithm, out)
        self.owner = tag
        self.owner_call = c
        try:
            # Else an async call got in first (queue behind it), or the communicator broke (see _failed): the
            # ordinary path.
            if not self.pending and self.broken is None:
                q = c.quick
                if q:
                    # A small shm allreduce repeated: check and data share one phase, in this frame with the
                    # recorder's begin/end written out: fewer frames on the path whose whole cost is Python.
                    self.seq = seq = self.seq + 1
                    recorder = self.recorder
                    rec = recorder.slots[seq % recorder.length]
                    rec.seq, rec.what = seq, c.what or c.record()
                    rec.thread = tag
                    rec.t_end = None
                    rec.t_start = _monotonic()
                    recorder.last_seq = seq
                    recorder.current = rec
                    try:
                        sig = c.sig
                        rop = c.rop
                        if not self.check.quick_arena.quick_allreduce(
                                sig[0] ^ tag.h ^ seq, seq, x if x.ndim == 1 else x.reshape(-1),
                                o if o.ndim == 1 else o.reshape(-1), rop.ufunc,
                                self._finish_avg if rop.average else None, q):
                            self.check.mismatch(seq, sig[1], tag.name)
                    except BaseException as exc:
                        self._failed("allreduce", exc, rec.t_start)
                        raise
                    finally:
                        rec.t_end = _monotonic()
                        recorder.current = None
                    return o
                if q is None and c.sig is not None and self.check.quick_arena is not None:
                    # Checked once through op(): from the next call on, one phase.
                    c.quick = self.check.quick_arena.quick_regions(c.dtype, x.size)
                c.xf = x if x.ndim == 1 else x.reshape(-1)
                c.of = o if o.ndim == 1 else o.reshape(-1)
                c.result = o
                c.inplace = o is x
                try:
                    return self.op(c, None, tag)
                finally:
                    c.xf = c.of = c.result = None
        finally:
            # owner_call may stay: it is the template, emptied of this call's arrays above and kept by prep anyway.
            self.owner = None
            gate.release()
        return self.ordinary(x, op, algorithm, out)

    def bind_allreduce(self, x: Any, op: str) -> Callable[[], Any]:
        """A callable that runs ``allreduce(x, op, out=x)`` each time it is called: the in-place allreduce of one
        array that its caller owns, repeated (a torch process group's view of a tensor it reduces again and again).

        Each call is that allreduce, with the same checks, the same cross-rank
        check and the same record; only what cannot change between calls of
        one owned array is settled here once: that ``x`` is a C-contiguous,
        writeable NumPy array below the window path's size, and its template
        (looked up again whenever the template is dropped, see
        ``Preparer.forget``). The caller must not change ``x``'s flags
        afterwards. Arrays that do not qualify, and those whose template
        never takes the one-phase path (another algorithm), take
        :meth:`allreduce` on every call.

        Example::

            run = comm.sequencer.bind_allreduce(view, "sum")
            run()  # as comm.allreduce(view, op="sum", out=view)
        """
        b = _BoundAllreduce(x, op)
        if (type(x) is np.ndarray and x.flags.c_contiguous and x.flags.writeable
                and 0 < x.nbytes < self.prep.window_min):
            b.flat = x.reshape(-1)
            b.bytes = b.flat.view(np.uint8).data
            b.key = (x.shape, x.dtype, op, None)
        return functools.partial(self._bound_allreduce, b)

    def _bound_allreduce(self, b: _BoundAllreduce) -> Any:
        """One call of a :meth:`bind_allreduce` callable: the quick block of :meth:`allreduce`, or that method."""
        c = b.c
        if c is None or self.pending or RETIRED or self.broken is not None:
            return self._bound_miss(b)
        q = c.quick
        if not q:  # not armed yet, or dropped (then looked up again)
            return self._bound_miss(b)
        try:
            tag = self._tags.tag
        except AttributeError:
            tag = self.thread_tag()
        gate = self._gate
        if not gate.acquire(False):
            return self.ordinary(b.x, b.op, None, b.x)
        self.owner = tag
        self.owner_call = c
        try:
            if not self.pending:
                # The same steps as allreduce's quick block.
                self.seq = seq = self.seq + 1
                recorder = self.recorder
                rec = recorder.slots[seq % recorder.length]
                rec.seq, rec.what = seq, c.what or c.record()
                rec.thread = tag
                rec.t_end = None
                rec.t_start = _monotonic()
                recorder.last_seq = seq
                recorder.current = rec
                try:
                    sig = c.sig
                    rop = c.rop
                    if not self.check.quick_arena.quick_allreduce(
                            sig[0] ^ tag.h ^ seq, seq, b.bytes, b.flat, rop.ufunc,
                            self._finish_avg if rop.average else None, q):
                        self.check.mismatch(seq, sig[1], tag.name)
                except BaseException as exc:
                    self._failed("allreduce", exc, rec.t_start)
                    raise
                finally:
                    rec.t_end = _monotonic()
                    recorder.current = None
                return b.x
        finally:
            self.owner = None
            gate.release()
        return self.ordinary(b.x, b.op, None, b.x)

    def _bound_miss(self, b: _BoundAllreduce) -> Any:
        """:meth:`allreduce` for a bound call, then its template again (the call may have made or armed it)."""
        r = self.allreduce(b.x, b.op, None, b.x)
        if b.key is not None:
            c = b.c = self._templates.get(b.key)
            if c is not None and c.quick is False:  # kept, so not dropped: never one phase (another algorithm)
                b.key = b.c = None
        return r

    def vrepeat(self, plan: Any, x: np.ndarray | None, out: np.ndarray | None, return_splits: bool, algorithm: Any,
                key: Any = None, default: Any = None, splits: Any = None) -> Any:
        """A synchronous alltoall, allgather, gather or scatter repeating the signature of ``plan`` with arrays ``x``
        (None: scatter off its root) and ``out``; its result, or :data:`MISS` when the ordinary path must take the
        call (nothing sent). ``splits``: scatter's, as the root passed them.

        ``plan`` is a ``collective.variable.VPlan`` kept under ``key`` in
        ``prep.vplans`` (the caller matched ``x`` and ``out`` to it), or a
        ``collective.variable.VHot`` from ``prep.vhot``: the plan of the very
        same array objects, which this frame matches to ``x``, ``out``,
        ``algorithm`` and the communicator's ``default`` algorithm itself
        (their mutable attributes: shape, dtype, contiguity, writability).
        Either way the call runs in this frame: at 64 KiB the Python around
        the copies is a good part of a call.

        The check runs in full: this rank posts the fingerprint and the sizes
        the ordinary path would post, so the other ranks may take either path.
        Only when every rank's posted (rows, out rows) are the plan's does the
        data move from the plan; otherwise the call carries on by the ordinary
        path from what the check returned (``vprepare`` prepares it; the
        caller checked its arguments against the plan's), which also raises
        on every rank when some rank's ``out`` is wrong. A scatter posts its
        plan's token instead of rows and runs from the plan only where every
        rank posted that token (``collective.variable.VPlan``); otherwise
        every rank takes the ordinary path, the root's header included.
        """
        if type(plan) is VHot:
            # The same objects as when the plan was made; only their mutable attributes can differ.
            if (plan.x() is not x or default is not plan.default or RETIRED
                    or (algorithm is not plan.algorithm
                        and (type(algorithm) is not str or algorithm != plan.algorithm))
                    or x.dtype is not plan.dtype or x.shape != plan.shape  # type: ignore[union-attr]
                    or not x.flags.c_contiguous):  # type: ignore[union-attr]  # (bound: alltoall and allgather)
                return MISS
            if out is None:
                if plan.out is not None:
                    return MISS
            elif (plan.out is None or plan.out() is not out or out.dtype is not plan.out_dtype
                  or out.shape != plan.out_shape):
                return MISS
            else:
                f = out.flags
                if not (f.writeable and f.c_contiguous):
                    return MISS
            key = plan.key
            plan = plan.plan
        try:
            tag = self._tags.tag
        except AttributeError:
            tag = self.thread_tag()
        gate = self._gate
        if not gate.acquire(False):
            return MISS
        self.owner = tag
        self.owner_call = plan
        try:
            check = self.check
            fp = check.fingerprints
            if (self.pending or self.broken is not None or fp is None or fp.detail or check.nan_check
                    or (plan.arena is not None and plan.arena is not self.engine.arena)
                    or (plan.cma is not None and plan.cma is (getattr(self.engine.arena, "cma", None) is None))):
                return MISS  # (the last: single copy went since the plan was made, so "auto" picks again)
            self.seq = seq = self.seq + 1
            recorder = self.recorder  # its begin, written out (every frame counts at small sizes)
            rec = recorder.slots[seq % recorder.length]
            rec.seq, rec.what = seq, plan.what
            rec.thread = tag
            rec.t_end = None
            rec.t_start = _monotonic()
            recorder.last_seq = seq
            recorder.current = rec
            try:
                sig = plan.sig
                quick = plan.quick
                posted = False
                if plan.posts and check.quick_arena is plan.arena:
                    plan.arena.post_input(x)  # before the check: the plan reads it by single copy
                o = (None if plan.n_out < 0 else out if out is not None  # none: gather off its root
                     else np.empty((plan.n_out, *plan.row_shape), plan.dtype))
                if quick is not None and check.quick_arena is plan.arena:  # the check fenced in that arena
                    # The data goes into the arena with the check: one phase, where every rank's post is its plan's.
                    verdict = quick.run(sig[0] ^ tag.h ^ seq, seq, x, o)
                    if verdict == 0:
                        return (o, list(plan.received)) if return_splits else o
                    if verdict == 1:
                        fp.report(seq, sig[1], tag.name)
                    pairs: tuple[int, ...] | None = plan.arena.pairs_of(seq)
                    posted = verdict == 2
                else:
                    same, pairs = fp.exchange_post(sig[0] ^ tag.h ^ seq, seq, plan.post)
                    if not same:
                        fp.report(seq, sig[1], tag.name)
                    token = plan.token
                    if (pairs == plan.pairs if token is None  # scatter: every rank posted its plan's token
                            else pairs is not None and pairs[::2].count(token) == self.size):
                        plan.move(x, o, seq)
                        return (o, list(plan.received)) if return_splits else o
                # Some rank's sizes differ from the plan's: the ordinary path from what the check returned.
                self.prep.vhot.pop(id(x), None)  # its plan is about to change
                c = self.vprepare(plan.name, x, algorithm, out, return_splits,  # type: ignore[misc]
                                  plan.root, plan.recv_equal, splits)
                c.sig = sig
                c.known = None if pairs is None else np.array(pairs, np.int64).reshape(self.size, 2)
                c.posted = posted
                r = self.engine.execute(c, None, seq)
                vplans = self.prep.vplans
                if c.plan is not None:
                    vplans[key] = c.plan
                else:
                    vplans.pop(key, None)
                return r.resolve() if type(r) is Deferred else r
            except BaseException as exc:
                self._failed(plan.name, exc, rec.t_start)
                raise
            finally:
                rec.t_end = _monotonic()
                recorder.current = None
        finally:
            self.owner = None
            gate.release()

    def _window_repeat(self, hot: Any) -> Any:
        """The window path of a repeated allreduce on alloc'd arrays (see ``SharedArrays.quick_allreduce``); None
        when the gate is held or an async op got in first (the ordinary path then takes the call).

        Once ``hot`` has passed the check through :meth:`op`, the check is the
        first phase of ``SharedArrays.quick_allreduce``: it posts fingerprint
        ``sig ^ thread ^ seq`` and returns False on a mismatch (nothing
        touched), and every rank then raises the report. The thread's tag and
        the recorder's begin/end are written out as on the small path: a
        training step between two calls leaves the caches cold, and every
        frame and object the interpreter touches around the data then shows.
        """
        try:
            tag = self._tags.tag  # one thread-local read (thread_tag() on the thread's first call)
        except AttributeError:
            tag = self.thread_tag()
        gate = self._gate
        if not gate.acquire(False):
            return None
        self.owner, self.owner_call = tag, hot
        try:
            if self.pending or self.broken is not None:
                return None
            plan = hot.quick
            if plan is not False:  # a list of pieces (empty where this rank's slice is)
                self.seq = seq = self.seq + 1
                recorder = self.recorder
                rec = recorder.slots[seq % recorder.length]
                rec.seq, rec.what = seq, hot.what or hot.record()
                rec.thread = tag
                rec.t_end = None
                rec.t_start = _monotonic()
                recorder.last_seq = seq
                recorder.current = rec
                try:
                    sig = hot.sig
                    rop = hot.rop
                    if not self.engine.shared.quick_allreduce(sig[0] ^ tag.h ^ seq, seq, plan, rop.ufunc,
                                                              self._finish_avg if rop.average else None):
                        self.check.mismatch(seq, sig[1], tag.name)
                except BaseException as exc:
                    self._failed("allreduce", exc, rec.t_start)
                    raise
                finally:
                    rec.t_end = _monotonic()
                    recorder.current = None
                return hot.result
            if hot.sig is not None and self.check.quick_arena is not None:
                # Checked once through op(): the next call takes the lines above.
                hot.quick = self.engine.shared.plan(hot.views, hot.out_views)
            return self.op(hot, None, tag)
        finally:
            self.owner = self.owner_call = None
            gate.release()


def _nothing() -> None:
    return None


class _BoundAllreduce:
    """What :meth:`Sequencer.bind_allreduce` settled for one array: the array, its flat view and its bytes, the
    op, and the template's key and template (``key`` None: the array takes the checked path on every call)."""

    __slots__ = ("x", "op", "flat", "bytes", "key", "c")

    def __init__(self, x: Any, op: str) -> None:
        self.x, self.op = x, op
        self.flat: np.ndarray | None = None
        self.bytes: memoryview | None = None
        self.key: tuple | None = None
        self.c: Any = None


class _Call0:
    """Work under the gate that is not an op itself (``run_locked``); queued, a marker the caller waits for."""

    shape = dtype = None

    def __init__(self, fn: Callable[[], Any], name: str = "collective") -> None:
        self.fn = fn
        self.name = name
