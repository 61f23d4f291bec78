"""Transports: the small Backend protocol the executor runs Schedules over, and what is available here."""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["Backend", "available"]


class Backend(Protocol):
    """Point-to-point byte transport plus the transport's own (native) collectives.

    Buffers passed to ``isend``/``irecv`` are contiguous uint8 NumPy views; the
    executor does every reduction itself, so a backend only moves bytes.
    """

    name: str
    rank: int
    size: int

    def isend(self, buf: np.ndarray, peer: int, tag: int) -> Any:
        """Start sending ``buf`` to ``peer``; returns a request."""

    def irecv(self, buf: np.ndarray, peer: int, tag: int) -> Any:
        """Start receiving into ``buf`` from ``peer``; returns a request."""

    def wait(self, req: Any) -> None:
        """Block until ``req`` completes (the watchdog enforces the deadline)."""

    def waitall(self, reqs: Sequence[Any]) -> None:
        """Block until every request in ``reqs`` completes."""

    def barrier(self) -> None:
        """Block until every rank has entered the barrier."""


def available() -> dict[str, str | None]:
    """Each backend's name mapped to None if usable here, else the reason it is not."""
    out: dict[str, str | None] = {}
    try:
        from mpi4py import MPI  # noqa: F401

        out["mpi"] = None
    except Exception as exc:  # pragma: no cover - depends on the environment
        out["mpi"] = f"mpi4py cannot be imported ({exc}); pip install 'collective[mpi]'"
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nccl  # noqa: F401

        out["nccl"] = None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as exc:
        out["nccl"] = f"cupy with NCCL is not usable ({type(exc).__name__}: {exc})"
    return out
