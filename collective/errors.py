"""Exception types of collective; every message names the op, the rank, the shape, the dtype and the algorithm."""
from __future__ import annotations

from typing import Any

__all__ = [
    "CollectiveError",
    "CollectiveValueError",
    "CollectiveConfigError",
    "CollectiveTypeError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
    "BackendUnavailableError",
    "SharedMemoryError",
    "describe",
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


class BackendUnavailableError(CollectiveError, RuntimeError):
    """A backend (MPI, NCCL) cannot be used here; the message says why and what to install."""


class SharedMemoryError(CollectiveError, MemoryError):
    """The node's shared memory (/dev/shm) cannot hold a window; the message says how much is needed and found,
    and how to give it more (``docker run --shm-size``) or need less (``COLLECTIVE_SHM_CHUNK_BYTES``)."""
