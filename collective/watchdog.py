"""Deadlines for every blocking wait, stall warnings, the flight recorder, and aborting the whole job on failure."""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable

__all__ = ["Watchdog", "OpRecord", "install_excepthook", "abort_job"]

#: Fields of one flight-recorder entry (a list, so the end time can be filled in cheaply).
OpRecord = list  # [seq, op, shape, dtype, algorithm, root, t_start, t_end]


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not a number of seconds") from None


def abort_job(message: str, code: int = 1) -> None:
    """Print ``message`` to stderr and end every rank of the job (MPI_Abort on COMM_WORLD)."""
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    sys.stderr.flush()
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


class Watchdog:
    """Watches the op in flight; warns after ``stall_warn`` seconds and aborts the job after ``timeout``.

    A timed-out MPI operation cannot be cancelled safely, so expiry ends the
    job with a report (op, sequence number, shape, dtype, algorithm, the peers
    still awaited, and the last ops of this rank) instead of raising.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        timeout: float | None = None,
        stall_warn: float | None = None,
        trace_len: int | None = None,
        waiting_on: Callable[[], Any] | None = None,
    ) -> None:
        self.rank, self.size = rank, size
        self.timeout = timeout if timeout is not None else _env_float("COLLECTIVE_TIMEOUT", 300.0)
        self.stall_warn = stall_warn if stall_warn is not None else _env_float("COLLECTIVE_STALL_WARN", 60.0)
        n = trace_len if trace_len is not None else int(os.environ.get("COLLECTIVE_TRACE_BUFFER", "1024"))
        self.trace: deque[OpRecord] = deque(maxlen=max(1, n))
        self.current: OpRecord | None = None
        self.waiting_on = waiting_on
        self._thread: threading.Thread | None = None
        self._warned: OpRecord | None = None

    def begin(self, rec: OpRecord) -> None:
        """Mark ``rec`` as the op in flight (cheap: the hot path calls this per collective)."""
        self.trace.append(rec)
        self.current = rec
        if self._thread is None:
            self._start()

    def end(self, rec: OpRecord) -> None:
        """Mark ``rec`` finished."""
        rec[7] = time.monotonic()
        self.current = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="collective-watchdog", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = max(0.05, min(1.0, self.timeout / 10, self.stall_warn / 4))
        while True:
            time.sleep(interval)
            rec = self.current
            if rec is None:
                continue
            age = time.monotonic() - rec[6]
            if age > self.timeout and rec is self.current:
                abort_job(self.report(rec, f"timed out after {age:.1f} s (COLLECTIVE_TIMEOUT={self.timeout:g})"))
            elif age > self.stall_warn and self._warned is not rec:
                self._warned = rec
                sys.stderr.write(self.report(rec, f"stalled for {age:.1f} s (warning at COLLECTIVE_STALL_WARN={self.stall_warn:g}; "
                                                  f"aborting at {self.timeout:g} s)", trace=False))
                sys.stderr.flush()

    def describe(self, rec: OpRecord) -> str:
        """One line for one op record."""
        seq, op, shape, dtype, alg, root, t0, t1 = rec
        s = f"#{seq} {op} shape {shape} {dtype} algorithm {alg}"
        if root is not None:
            s += f" root {root}"
        s += " (in flight)" if t1 is None else f" ({(t1 - t0) * 1e6:.0f} us)"
        return s

    def report(self, rec: OpRecord, what: str, trace: bool = True) -> str:
        """A report naming the op in flight, the peers awaited, and (with ``trace``) the flight recorder."""
        lines = [f"collective: rank {self.rank} of {self.size}: {self.describe(rec)} {what}"]
        waiting = self.waiting_on() if self.waiting_on else None
        if waiting:
            lines.append(f"collective: rank {self.rank} is still waiting for rank(s) {', '.join(map(str, waiting))}")
        if trace:
            lines.append(f"collective: rank {self.rank}: last {len(self.trace)} ops (oldest first):")
            lines.extend("  " + self.describe(r) for r in self.trace)
        return "\n".join(lines) + "\n"


_HOOK_INSTALLED = False


def install_excepthook(rank: int, size: int) -> None:
    """Make an uncaught exception on any rank (main or other thread) end the whole job instead of hanging it.

    Disabled with COLLECTIVE_ABORT_ON_EXCEPTION=0.
    """
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED or os.environ.get("COLLECTIVE_ABORT_ON_EXCEPTION", "1") == "0":
        return
    _HOOK_INSTALLED = True
    prev = sys.excepthook

    def hook(etype: Any, value: Any, tb: Any) -> None:
        if size <= 1 or issubclass(etype, KeyboardInterrupt):
            prev(etype, value, tb)
            return
        text = "".join(traceback.format_exception(etype, value, tb))
        abort_job(f"collective: rank {rank} of {size} died of an uncaught exception; aborting the job:\n{text}")

    def thread_hook(args: Any) -> None:
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thread_hook
