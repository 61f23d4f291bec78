"""collective: topology-aware allreduce, reduce, broadcast, reduce-scatter, allgather over MPI for data parallelism."""
from __future__ import annotations

import threading
from typing import Any

from . import checkout  # noqa: F401  (first: in a source checkout it maps collective.trainer & co. onto their folders)
from .communicator import ALGORITHMS, COLLECTIVE_NAMES, WINDOW_MIN_BYTES, Communicator, Work
from .errors import (
    BackendUnavailableError,
    CollectiveConfigError,
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CollectiveTypeError,
    CollectiveUsageError,
    CollectiveValueError,
    RanksLostError,
)
from .ops import OPS
from .p2p import ANY_SOURCE
from .sequencer import OpRecord

__all__ = [
    "init", "get_default", "is_initialized", "Communicator", "Work", "OpRecord", "ALGORITHMS", "COLLECTIVE_NAMES",
    "OPS", "WINDOW_MIN_BYTES", "ANY_SOURCE",
    "allreduce", "allreduce_async", "reduce", "reduce_async", "broadcast", "broadcast_async",
    "reduce_scatter", "reduce_scatter_async", "allgather", "allgather_async", "barrier",
    "CollectiveError", "CollectiveValueError", "CollectiveTypeError", "CollectiveTimeoutError",
    "CollectiveMismatchError", "CollectiveUsageError", "BackendUnavailableError", "CollectiveConfigError",
    "RanksLostError",
]
__version__ = "0.1.0"

_default: Communicator | None = None
_init_lock = threading.Lock()


def init(**kwargs: Any) -> Communicator:
    """Create (once) and return the default communicator over ``MPI.COMM_WORLD``.

    Idempotent: later calls return the same communicator and ignore their
    arguments (after ``close()`` of the default communicator, a new one). Also installs the hook that aborts the
    whole job when any rank dies of an uncaught exception (``COLLECTIVE_ABORT_ON_EXCEPTION=0`` disables it).

    Elastic mode (``collective-run --elastic``): after ``comm.shrink()`` or
    ``comm.grow()`` on the default communicator, the new one is the default.
    In a process spawned by ``comm.grow()``, the first call returns the grown
    communicator (``is_replacement`` True).

    Raises:
        CollectiveConfigError: MPI sees one process while a launcher's variable (torchrun's ``WORLD_SIZE``,
            Slurm's ``SLURM_NTASKS`` under srun, ...) says several were started (see ``collective.launch``).

    Args:
        **kwargs: passed to :class:`Communicator` on the first call (algorithm,
            timeout, segment_bytes).

    Example::

        import collective as col
        comm = col.init()
        print(comm.rank, comm.size, comm.local_rank, comm.local_size)
    """
    global _default
    with _init_lock:
        if _default is None or _default.closed:
            from .backends.mpi import require_mpi
            from .launch import check_launch
            from .watchdog import install_excepthook

            MPI = require_mpi()
            check_launch(MPI.COMM_WORLD.Get_size())
            from .communicator import take_parent

            # Spawned by comm.grow(): the first init joins the growing ranks.
            grown = take_parent("collective.init()", **kwargs) if _default is None else None
            _default = grown if grown is not None else Communicator(**kwargs)
            install_excepthook(_default.rank, _default.size)
        return _default


def is_initialized() -> bool:
    """True once :func:`init` has created the default communicator (and it is not closed)."""
    return _default is not None and not _default.closed


def get_default() -> Communicator:
    """The default communicator, created by :func:`init` on first use."""
    return _default if _default is not None and not _default.closed else init()


def allreduce(x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
    """:meth:`Communicator.allreduce` on the default communicator."""
    return get_default().allreduce(x, op=op, algorithm=algorithm, out=out)


def allreduce_async(x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
    """:meth:`Communicator.allreduce_async` on the default communicator."""
    return get_default().allreduce_async(x, op=op, algorithm=algorithm, out=out)


def reduce(x: Any, root: int = 0, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
    """:meth:`Communicator.reduce` on the default communicator."""
    return get_default().reduce(x, root=root, op=op, algorithm=algorithm, out=out)


def reduce_async(x: Any, root: int = 0, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
    """:meth:`Communicator.reduce_async` on the default communicator."""
    return get_default().reduce_async(x, root=root, op=op, algorithm=algorithm, out=out)


def broadcast(x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Any:
    """:meth:`Communicator.broadcast` on the default communicator."""
    return get_default().broadcast(x, root=root, algorithm=algorithm, out=out)


def broadcast_async(x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Work:
    """:meth:`Communicator.broadcast_async` on the default communicator."""
    return get_default().broadcast_async(x, root=root, algorithm=algorithm, out=out)


def reduce_scatter(x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
    """:meth:`Communicator.reduce_scatter` on the default communicator."""
    return get_default().reduce_scatter(x, op=op, algorithm=algorithm, out=out)


def reduce_scatter_async(x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
    """:meth:`Communicator.reduce_scatter_async` on the default communicator."""
    return get_default().reduce_scatter_async(x, op=op, algorithm=algorithm, out=out)


def allgather(x: Any, algorithm: str | None = None, out: Any = None) -> Any:
    """:meth:`Communicator.allgather` on the default communicator."""
    return get_default().allgather(x, algorithm=algorithm, out=out)


def allgather_async(x: Any, algorithm: str | None = None, out: Any = None) -> Work:
    """:meth:`Communicator.allgather_async` on the default communicator."""
    return get_default().allgather_async(x, algorithm=algorithm, out=out)


def barrier() -> None:
    """:meth:`Communicator.barrier` on the default communicator."""
    get_default().barrier()
