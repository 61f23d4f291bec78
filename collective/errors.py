"""Exception types of collective; every message names the op, the rank, the shape, the dtype and the algorithm."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "CollectiveError",
    "CollectiveValueError",
    "CollectiveConfigError",
    "CollectiveTypeError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
    "CollectiveUsageError",
    "BackendUnavailableError",
    "SharedMemoryError",
    "RanksLostError",
    "describe",
    "format_uncaught",
    "raise_lost",
]


def describe(
    op: str,
    rank: int | None = None,
    size: int | None = None,
    shape: Any = None,
    dtype: Any = None,
    algorithm: str | None = None,
) -> str:
    """The standard prefix of every message: ``allreduce on rank 1 of 4 (shape (3, 5), float32, algorithm ring)``."""
    where = op
    if rank is not None:
        where += f" on rank {rank}" + (f" of {size}" if size is not None else "")
    parts = []
    if shape is not None:
        parts.append(f"shape {tuple(shape)}")
    if dtype is not None:
        parts.append(str(dtype))
    if algorithm is not None:
        parts.append(f"algorithm {algorithm}")
    return where + (f" ({', '.join(parts)})" if parts else "")


class CollectiveError(Exception):
    """Base class of every error raised by collective."""


class CollectiveValueError(CollectiveError, ValueError):
    """An argument has a bad value (op, root, algorithm, out's shape...); raised before any message is sent."""


class CollectiveConfigError(CollectiveValueError):
    """A ``COLLECTIVE_*`` environment variable has a bad value, or one that differs across ranks where it must not.

    The message names the variable, the value (and the ranks, for a mismatch) and what is accepted.
    """


class CollectiveTypeError(CollectiveError, TypeError):
    """An argument has an unsupported type or dtype (bool, object, an unknown array type)."""


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """A collective did not complete before its deadline."""


class CollectiveMismatchError(CollectiveError):
    """Ranks called the same collective with different arguments (op, dtype, shape, root, algorithm, order)."""


class CollectiveUsageError(CollectiveError, RuntimeError):
    """A communicator used against its rules: a collective called on it while another thread's is in flight.

    The message names both calls and both threads, and what to do instead
    (one thread per communicator at a time; ``comm.split`` gives each thread its own).
    """


class BackendUnavailableError(CollectiveError, RuntimeError):
    """A backend (MPI, NCCL) cannot be used here; the message says why and what to install."""


def _library_dirs() -> tuple[str, ...]:
    """The folders of this library's packages that are imported (their frames are "inside the library")."""
    import os
    import sys

    dirs = []
    for name in ("collective", "collective.topologies", "collective.trainer", "collective.bench"):
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(dirs)


def format_uncaught(etype: type[BaseException], value: BaseException, tb: Any, full: bool = False) -> str:
    """The report of an uncaught exception: for one of ours raised inside the library, the caller's frames only.

    A :class:`CollectiveError` raised from inside the library is about the
    user's call, not about the library's internals: the frames that follow the
    last one outside the library (and any exception chained to it inside) are
    left out, so the report ends with the user's own line and our message. Any
    other exception, or ``full=True`` (``COLLECTIVE_TRACEBACK=full``), gets
    Python's usual report.

    Args:
        etype, value, tb: as ``sys.excepthook`` receives them.
        full: report every frame.

    Returns:
        The text to print, ending in a newline.

    Example::

        sys.stderr.write(format_uncaught(*sys.exc_info()))
    """
    import os
    import traceback

    frames = traceback.extract_tb(tb)
    ours = _library_dirs()

    def inside(fs: traceback.FrameSummary) -> bool:
        return os.path.abspath(fs.filename).startswith(ours)

    if full or not isinstance(value, CollectiveError) or not frames or not inside(frames[-1]):
        return "".join(traceback.format_exception(etype, value, tb))
    keep = len(frames)
    while keep > 0 and inside(frames[keep - 1]):
        keep -= 1
    hidden = len(frames) - keep
    text = "Traceback (most recent call last):\n" if keep else ""
    text += "".join(traceback.format_list(frames[:keep]))
    text += "".join(traceback.format_exception_only(etype, value))
    return text + (f"({hidden} frame{'s' if hidden != 1 else ''} inside collective not shown; "
                   "COLLECTIVE_TRACEBACK=full shows them)\n")


class SharedMemoryError(CollectiveError, MemoryError):
    """The node's shared memory (/dev/shm) cannot hold a window; the message says how much is needed and found,
    and how to give it more (``docker run --shm-size``) or need less (``COLLECTIVE_SHM_CHUNK_BYTES``)."""


class RanksLostError(CollectiveError):
    """Ranks of the job failed (elastic mode): the call cannot complete, nor can any later one on this communicator.

    Raised on every surviving rank, by the call that was in flight when the
    failure was noticed and by every later call on that communicator (and on
    the communicators made from it). Call ``comm.shrink()`` on every survivor
    to continue over them.

    Attributes:
        op: the call that raised ("allreduce", "barrier", "send", ...).
        lost_ranks: the lost ranks, as ranks of the original job (``MPI.COMM_WORLD`` at launch;
            replacements from ``comm.grow()`` count on from its size), sorted.
        survivors: how many ranks are left.
    """

    def __init__(self, op: str, lost_ranks: tuple[int, ...], survivors: int, where: str = "",
                 more: str = "") -> None:
        self.op = op
        self.lost_ranks = tuple(sorted(int(r) for r in lost_ranks))
        self.survivors = survivors
        lost = ", ".join(str(r) for r in self.lost_ranks) or "unknown"
        noun = "rank" if len(self.lost_ranks) == 1 else "ranks"
        super().__init__(f"{where or op}: lost job {noun} {lost} (the process failed); this call and every later "
                         f"one on this communicator cannot complete{more}. Call comm.shrink() on every survivor to "
                         f"continue over the {survivors} that are left")

    def __reduce__(self) -> Any:  # picklable with its attributes (object collectives, multiprocessing)
        return (type(self), (self.op, self.lost_ranks, self.survivors), {"args": self.args})


def raise_lost(fault: Callable[[str, BaseException, float | None], BaseException | None] | None, op: str,
               exc: BaseException, started: float | None = None) -> None:
    """Raise the RanksLostError that ``exc``, raised inside call ``op``, becomes in elastic mode (chained to it);
    return when it stays what it is (no elastic mode, no sign of a failure, or a RanksLostError already), and
    the caller re-raises it.

    Args:
        fault: the communicator's failure handler, ``fault(op, exc, started)`` -> RanksLostError or None (None:
            not elastic mode).
        op: the call that raised.
        exc: what it raised.
        started: ``time.monotonic()`` when the call began (for the detection time).

    Example::

        try:
            req.Wait()
        except Exception as exc:
            raise_lost(self.fault, "recv", exc, t0)
            raise
    """
    if fault is None:
        return
    lost = fault(op, exc, started)
    if lost is not None and lost is not exc:
        raise lost from exc
