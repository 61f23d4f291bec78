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
* **repeat** -- a synchronous allreduce whose signature passed every check
  before: its prepared call is a template refilled with this call's arrays
  (:meth:`Sequencer.allreduce_repeat`), and on one node its check and its
  data may share a single shm phase. It sits here, beside the ordinary path
  (:meth:`Sequencer.run`), because every frame counts at small sizes.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from .arrays import Deferred
from .errors import BackendUnavailableError, CollectiveTimeoutError, describe
from .fingerprint import Poison
from .shm import RETIRED
from .spec import ROOTED

__all__ = ["OpRecord", "FlightRecorder", "Work", "Sequencer"]

_monotonic = time.monotonic


class OpRecord:
    """One op of the flight recorder.

    Attributes:
        seq: the op's sequence number on this communicator.
        op: the collective's name ("allreduce", ..., "barrier").
        shape, dtype: of this rank's input (None for a barrier or a rejected call).
        algorithm: the algorithm that ran ("auto" resolved; None: this rank rejected its arguments).
        root: of a rooted collective, else None.
        t_start, t_end: ``time.monotonic()`` when it began and ended (``t_end`` None while in flight).
    """

    __slots__ = ("seq", "op", "shape", "dtype", "algorithm", "root", "t_start", "t_end")

    def __init__(self) -> None:
        self.seq, self.op, self.shape, self.dtype, self.algorithm, self.root = 0, "", None, None, None, None
        self.t_start: float = 0.0
        self.t_end: float | None = None

    def describe(self, timing: bool = True) -> str:
        """One line: ``#7 allreduce shape (4,) float32 algorithm ring (12 us)``."""
        if self.algorithm is None:
            s = f"#{self.seq} {self.op} (arguments rejected on this rank)"
        elif self.op == "barrier":
            s = f"#{self.seq} barrier"
        else:
            s = f"#{self.seq} {self.op} shape {tuple(self.shape)} {self.dtype} algorithm {self.algorithm}"
            if self.root is not None:
                s += f" root {self.root}"
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

    def begin(self, seq: int, name: str, shape: Any, dtype: Any, algorithm: Any, root: Any) -> OpRecord:
        """Record op ``seq`` as begun and in flight; returns its record."""
        rec = self.slots[seq % self.length]
        rec.seq, rec.op, rec.shape, rec.dtype, rec.algorithm, rec.root = seq, name, shape, dtype, algorithm, root
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


class Work:
    """Handle of an asynchronous collective: ``wait()`` returns its result, ``done()`` polls.

    Example::

        w = comm.allreduce_async(grad, out=grad)
        ...  # compute while the allreduce runs
        w.wait()
    """

    __slots__ = ("_event", "_result", "_exc", "_name")

    def __init__(self, name: str) -> None:
        self._event = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None
        self._name = name

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
        """Complete the handle (called once, by the thread that ran the op)."""
        self._result, self._exc = result, exc
        self._event.set()


class Sequencer:
    """Orders, checks and records every op of one communicator; runs async ops on one communication thread.

    Args:
        rank, size: this rank and the number of ranks.
        check: the cross-rank check (:class:`collective.check.CrossRankCheck`).
        engine: moves the data: ``execute(call, first)`` (see ``collective.engine.HostEngine``).
        prep: the call preparation, whose repeat templates (``templates``, ``hot_call``, ``window``)
            the repeat paths refill.
        async_ok: why async ops cannot run here (None: they can), e.g. MPI without THREAD_MULTIPLE.
        trace_len: flight-recorder length.
    """

    def __init__(self, rank: int, size: int, check: Any, engine: Any, prep: Any, async_ok: str | None = None,
                 trace_len: int = 1024) -> None:
        self.rank, self.size = rank, size
        self.check = check
        self.engine = engine
        self.prep = prep
        self.async_problem = async_ok
        self.recorder = FlightRecorder(trace_len)
        self.seq = 0
        self.lock = threading.Lock()
        #: Async ops handed to the communication thread and not finished.
        self.pending = 0
        self._templates = prep.templates
        self._finish_avg = engine.finish_avg
        #: The communicator's point-to-point messages (``collective.p2p.PointToPoint``), once attached.
        self.p2p: Any = None
        #: Elastic mode: ``fault(name, exc, started)`` -> the error a failed op raises instead of ``exc`` (None:
        #: ``exc`` is no sign of a lost rank). Set by the communicator; None otherwise.
        self.fault: Callable[[str, BaseException, float], BaseException | None] | None = None
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------ ordinary ops
    def run(self, c: Any, execute: Callable[[Any, Any, int], Any] | None = None) -> Any:
        """Run prepared call ``c`` as this communicator's next op, after any pending async ops; its result.

        ``execute``: see :meth:`op` (the device paths pass their own).
        """
        if self.pending == 0:
            with self.lock:
                return self.op(c, execute)
        return self.submit(c, execute).wait()

    def poison(self, name: str, exc: BaseException) -> None:
        """Take part in op ``name``'s check with a poison fingerprint after this rank rejected its arguments.

        The other ranks may be entering the op: they raise CollectiveMismatchError
        naming this rank and its error instead of waiting for it. The caller
        raises ``exc`` itself.
        """
        if not self.check.on:
            return
        p = Poison(name, exc)
        if self.pending == 0:
            with self.lock:
                try:
                    self.op(p)
                except Exception:  # noqa: BLE001 - this rank raises its own error
                    pass
        else:
            self.submit(p)

    def op(self, c: Any, execute: Callable[[Any, Any, int], Any] | None = None) -> Any:
        """Begin, check, execute and end op ``c`` (the caller holds ``lock`` and nothing is pending before it).

        ``execute(c, first, seq)`` moves the data (default: the engine's); ``first``
        is the check when it is to be the call's first shm phase, else None
        (the check already ran).
        """
        self.seq = seq = self.seq + 1
        name = c.name
        recorder = self.recorder  # its begin and end, written out (every frame counts at small sizes)
        rec = recorder.slots[seq % recorder.length]
        rec.seq, rec.op, rec.shape, rec.dtype, rec.algorithm = seq, name, c.shape, c.dtype, c.algorithm
        rec.root = c.root if name in ROOTED else None
        rec.t_end = None
        rec.t_start = _monotonic()
        recorder.last_seq = seq
        recorder.current = rec
        try:
            check = self.check
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
        """Raise what op ``name``'s error ``exc`` becomes in elastic mode (RanksLostError); return if it stays."""
        fault = self.fault
        if fault is None:
            return
        lost = fault(name, exc, started)
        if lost is not None and lost is not exc:
            raise lost from exc  # types that copy on construction (JAX) are made now

    def submit(self, c: Any, execute: Callable[[Any, Any, int], Any] | None = None) -> Work:
        """Queue op ``c`` on the communication thread; its handle."""
        if self._worker is None:
            if self.async_problem is not None and self.size > 1:
                raise BackendUnavailableError(f"{describe(c.name + '_async', self.rank, self.size)}: "
                                              f"{self.async_problem}")
            self._queue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._serve, name="collective-comm", daemon=True)
            self._worker.start()
        w = Work(c.name)
        self.pending += 1
        self._queue.put((c, w, execute))  # type: ignore[union-attr]
        return w

    def run_here(self, c: Any, execute: Callable[[Any, Any, int], Any]) -> Any:
        """Op ``c`` on the calling thread, after every pending async op (device paths bound to this thread)."""
        if self.pending:
            self.submit(_Call0(_nothing)).wait()
        with self.lock:
            return self.op(c, execute)

    def waiting_on(self) -> tuple[int, ...] | None:
        """The peers the op in flight waits for right now, or None (for the watchdog)."""
        return self.engine.waiting_on()

    def p2p_lines(self) -> list[str]:
        """The point-to-point messages in flight, a line each (for the watchdog's reports)."""
        return self.p2p.report_lines() if self.p2p is not None else []

    def run_locked(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the lock held, after every pending async op (for work that must not interleave with ops)."""
        if self.pending:
            return self.submit(_Call0(fn)).wait()
        with self.lock:
            t0 = _monotonic()
            try:
                return fn()
            except BaseException as exc:
                self._failed("alloc", exc, t0)
                raise

    def _serve(self) -> None:
        q = self._queue
        while True:
            item = q.get()  # type: ignore[union-attr]
            if item is None:
                return
            c, w, execute = item
            # The count drops before the waiter can wake, so a synchronous call made right after wait()
            # returns never queues behind a collective that has already finished.
            try:
                with self.lock:
                    res = c.fn() if type(c) is _Call0 else self.op(c, execute)
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
    def run_quick(self, c: Any, run: Callable[..., bool], *args: Any) -> None:
        """Op ``c`` whose check is its first phase: ``run(h, seq, *args)`` posts fingerprint ``h`` of op ``seq``
        and moves the data; it returns False on a mismatch (nothing touched), and every rank then raises the
        report. The caller holds ``lock``; ``c`` passed the check before (its fingerprint is ``c.sig``).
        """
        self.seq = seq = self.seq + 1
        rec = self.recorder.begin(seq, "allreduce", c.shape, c.dtype, c.algorithm, None)
        try:
            sig = c.sig
            if not run(sig[0] ^ seq, seq, *args):
                self.check.mismatch(seq, sig[1])
        except BaseException as exc:
            self._failed("allreduce", exc, rec.t_start)
            raise
        finally:
            self.recorder.end(rec)

    def allreduce_repeat(self, x: np.ndarray, op: Any, algorithm: Any, out: Any) -> Any:
        """A synchronous allreduce of NumPy ``x`` that repeats a checked signature; its result, or None if it
        does not (the caller then takes the ordinary path, which explains what is wrong).

        Only this call's own arrays are checked (contiguous; ``out`` absent,
        ``x`` itself, or a separate array of the same shape and dtype that
        does not overlap ``x``); the template is refilled under the lock and
        emptied again, so no user array is kept alive. alloc'd arrays from
        the window size, in place or into alloc'd arrays, take the window
        path (their prepared call is kept, see ``Preparer.hot_call``).
        """
        prep = self.prep
        if RETIRED and (x.base is not None or out is not None):  # maybe an array of a replaced communicator: the checked path says so
            return None
        if out is not None and x.base is not None and x.nbytes >= prep.window_min:  # windows are views
            hot = prep.hot_call("allreduce", x, op, algorithm, 0, out)
            if hot is not None:
                return self._window_repeat(hot)
        try:
            c = self._templates.get((x.shape, x.dtype, op, algorithm))
        except TypeError:  # an unhashable op or algorithm
            return None
        if c is None or not x.flags.c_contiguous:
            return None
        # This call's own output: out absent, x itself, or a separate array of x's shape and dtype that does not
        # overlap it (written out here, not a call into prep: every frame counts at small sizes).
        if out is None:
            o = np.empty(x.shape, x.dtype)
        elif out is x:
            if not x.flags.writeable or (x.base is not None and c.algorithm == "shm" and x.nbytes >= prep.window_min
                                         and prep.window(x, x, True) is not None):  # alloc'd in place: the window
                return None
            o = x
        elif type(out) is np.ndarray and out.shape == x.shape and out.dtype == x.dtype:
            f = out.flags
            if not (f.writeable and f.c_contiguous and ((f.owndata and x.flags.owndata)
                                                        or not np.may_share_memory(out, x))):
                return None
            if (c.algorithm == "shm" and x.base is not None and x.nbytes >= prep.window_min
                    and prep.window(x, out, False) is not None):
                return None  # alloc'd into alloc'd: the window path
            o = out
        else:
            return None
        lock = self.lock
        lock.acquire()  # not `with`: half the cost at small sizes
        try:
            if self.pending:  # an async call got in first: queue behind it, on the ordinary path
                return None
            q = c.quick
            if q:
                # A small shm allreduce repeated: check and data share one phase. run_quick and the recorder's
                # begin/end, written out: three frames fewer on the path whose whole cost is Python.
                self.seq = seq = self.seq + 1
                recorder = self.recorder
                rec = recorder.slots[seq % recorder.length]
                rec.seq, rec.op, rec.shape, rec.dtype, rec.algorithm, rec.root = (seq, "allreduce", c.shape, c.dtype,
                                                                                 c.algorithm, None)
                rec.t_end = None
                rec.t_start = _monotonic()
                recorder.last_seq = seq
                recorder.current = rec
                try:
                    sig = c.sig
                    rop = c.rop
                    if not self.check.quick_arena.quick_allreduce(
                            sig[0] ^ seq, seq, x if x.ndim == 1 else x.reshape(-1), o if o.ndim == 1 else o.reshape(-1),
                            rop.ufunc, self._finish_avg if rop.average else None, q):
                        self.check.mismatch(seq, sig[1])
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
                return self.op(c)
            finally:
                c.xf = c.of = c.result = None
        finally:
            lock.release()

    def _window_repeat(self, hot: Any) -> Any:
        """The window path of a repeated allreduce on alloc'd arrays (see ``SharedArrays.quick_allreduce``)."""
        lock = self.lock
        lock.acquire()
        try:
            if self.pending:
                return None
            plan = hot.quick
            shared = self.engine.shared
            if plan is not False:  # a list of pieces (empty where this rank's slice is)
                rop = hot.rop
                self.run_quick(hot, shared.quick_allreduce, plan, rop.ufunc,
                               self.engine.finish_avg if rop.average else None)
                return hot.result
            if hot.sig is not None and self.check.quick_arena is not None:
                # Checked once through op(): the next call takes the lines above.
                hot.quick = shared.plan(hot.views, hot.out_views)
            return self.op(hot)
        finally:
            lock.release()


def _nothing() -> None:
    return None


class _Call0:
    """Work queued behind pending ops that is not an op itself (``run_locked``)."""

    name = "collective"

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
