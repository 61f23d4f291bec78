"""Transports: the small Backend protocol the executor runs Schedules over, and what is available here."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Backend", "available", "select", "explain_selection", "BACKENDS", "is_device_array"]

#: Backend names a caller may request ("auto" picks per array).
BACKENDS: tuple[str, ...] = ("auto", "mpi", "nccl")


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
        """Block until ``req`` completes (the watchdog enforces the deadline); on an error the caller abandons it."""

    def waitall(self, reqs: Sequence[Any]) -> None:
        """Block until every request in ``reqs`` completes; on an error the caller abandons them."""

    def abandon(self, reqs: Sequence[Any]) -> None:
        """Keep ``reqs`` (a failed call's requests, some maybe still pending) from ever being freed.

        MPI aborts the job when a request freed while pending later fails
        (a peer died): the elastic mode must survive exactly that.
        """

    def barrier(self) -> None:
        """Block until every rank has entered the barrier."""


def available() -> dict[str, str | None]:
    """Each backend's name mapped to None if usable here, else the reason it is not.

    Example::

        available()   # {"mpi": None, "nccl": "cupy not installed (pip install 'pycollective[gpu]')"}
    """
    from .nccl import probe

    out: dict[str, str | None] = {}
    try:
        from mpi4py import MPI  # noqa: F401

        out["mpi"] = None
    except Exception as exc:  # pragma: no cover - depends on the environment
        out["mpi"] = f"mpi4py cannot be imported ({exc}); pip install 'pycollective[mpi]'"
    out["nccl"] = probe()
    return out


def explain_selection(array: Any, requested: str = "auto",
                      avail: dict[str, str | None] | None = None) -> tuple[str, str]:
    """The backend a collective on ``array`` uses, and why (see :func:`select`).

    Returns:
        ``(name, reason)``, e.g. ``("mpi", "host array")`` or
        ``("mpi", "device array, NCCL not usable: no CUDA device; staged through host memory or CUDA-aware MPI")``.
    """
    from ..errors import BackendUnavailableError, CollectiveTypeError, CollectiveValueError
    from .gpu_staging import is_device_array as _dev

    if requested not in BACKENDS:
        raise CollectiveValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    avail = available() if avail is None else avail
    device = _dev(array)
    kind = "device array" if device else "host array"
    if requested == "nccl":
        if not device:
            raise CollectiveTypeError(f"backend 'nccl' moves GPU memory, but {type(array).__qualname__} is a host "
                                      "array; "
                                      "use backend 'mpi' or 'auto', or pass a CuPy array")
        if avail.get("nccl"):
            raise BackendUnavailableError(f"backend 'nccl' was requested but NCCL is not usable here: {avail['nccl']}")
        return "nccl", f"{kind}, backend 'nccl' requested"
    if requested == "auto" and device and avail.get("nccl", "not probed") is None:
        return "nccl", f"{kind} and NCCL usable"
    if avail.get("mpi"):
        raise BackendUnavailableError(f"no usable backend for a {kind}: mpi: {avail['mpi']}"
                                      + (f"; nccl: {avail.get('nccl')}" if device else ""))
    if not device:
        return "mpi", kind if requested == "auto" else f"{kind}, backend 'mpi' requested"
    if requested == "mpi":
        return "mpi", f"{kind}, backend 'mpi' requested; CUDA-aware MPI or staged through host memory"
    return "mpi", f"{kind}, NCCL not usable: {avail.get('nccl')}; CUDA-aware MPI or staged through host memory"


def select(array: Any, requested: str = "auto", avail: dict[str, str | None] | None = None) -> str:
    """The backend that moves ``array``: "nccl" or "mpi".

    ``auto`` picks NCCL for device arrays (CuPy, ``__cuda_array_interface__``)
    when NCCL is usable, MPI otherwise (device arrays then go through
    CUDA-aware MPI or pinned host buffers). Naming a backend that cannot be
    used raises with the reason. The answer is local: the caller must make
    every rank agree (NCCL usable on one rank and not another is an error).

    Args:
        array: the collective's input.
        requested: "auto", "mpi" or "nccl".
        avail: the result of :func:`available` (default: probe now; cached).

    Raises:
        BackendUnavailableError: the requested backend (or every backend) is not usable; says why.
        CollectiveTypeError: "nccl" for a host array.
        CollectiveValueError: an unknown name.

    Example::

        select(np.ones(3))                # "mpi"
        select(cupy.ones(3))              # "nccl" where NCCL is usable, else "mpi"
        select(np.ones(3), "nccl")        # CollectiveTypeError
    """
    return explain_selection(array, requested, avail)[0]


def is_device_array(x: Any) -> bool:
    """True for CuPy arrays and anything with ``__cuda_array_interface__``."""
    from .gpu_staging import is_device_array as _dev

    return _dev(x)
