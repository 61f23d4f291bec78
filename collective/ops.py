"""Reduction ops and the dtype table: which dtypes each op accepts, and how each op reduces two arrays."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ReduceOp", "OPS", "get_op", "check_dtype", "BFLOAT16",  # noqa: F822 - BFLOAT16 comes from __getattr__
           "bfloat16", "dtype_name", "average_in_place", "dtype_code", "dtype_from_code"]

_UNSET = object()
_bfloat16: Any = _UNSET


def bfloat16() -> np.dtype | None:
    """The bfloat16 dtype, or None without the ml_dtypes package.

    bfloat16 is not a NumPy dtype; ml_dtypes (shipped with JAX and others)
    provides one. It is imported on first use, not with this module: importing
    it loads a compiled extension and its type registrations into every
    process, most of which never see a bfloat16 array, and an array of
    bfloat16 exists only where ml_dtypes is imported already. ``BFLOAT16``
    (this module's attribute) is the same value.
    """
    global _bfloat16
    if _bfloat16 is _UNSET:
        try:
            import ml_dtypes

            _bfloat16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:  # pragma: no cover - depends on the environment
            _bfloat16 = None
    return _bfloat16  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    if name == "BFLOAT16":  # looked up when asked for, so that importing this module does not import ml_dtypes
        return bfloat16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ReduceOp:
    """One reduction op.

    Attributes:
        name: "sum", "avg", "prod", "min" or "max".
        ufunc: the elementwise NumPy ufunc that combines two arrays.
        mpi_name: the MPI op the native path uses ("SUM" for avg: the division follows).
        average: divide by the number of ranks after reducing.
        ordered: needs an ordering of values (min/max), so complex dtypes are refused.
    """

    name: str
    ufunc: Callable[..., np.ndarray]
    mpi_name: str
    average: bool = False
    ordered: bool = False


OPS: dict[str, ReduceOp] = {
    "sum": ReduceOp("sum", np.add, "SUM"),
    "avg": ReduceOp("avg", np.add, "SUM", average=True),
    "prod": ReduceOp("prod", np.multiply, "PROD"),
    "min": ReduceOp("min", np.minimum, "MIN", ordered=True),
    "max": ReduceOp("max", np.maximum, "MAX", ordered=True),
}


def get_op(op: str | ReduceOp) -> ReduceOp | None:
    """The ReduceOp for a name (case-insensitive) or None if unknown."""
    if isinstance(op, ReduceOp):
        return op
    if isinstance(op, str):
        return OPS.get(op.lower())
    return None


def dtype_name(dtype: np.dtype) -> str:
    """A short dtype name for messages and fingerprints ("float32", "bfloat16")."""
    return str(dtype)


def check_dtype(dtype: np.dtype, op: ReduceOp | None) -> str | None:
    """Why ``dtype`` cannot be reduced with ``op`` (None if it can; op None = no reduction).

    Every numeric NumPy dtype is accepted: signed and unsigned integers, float16/32/64,
    longdouble, complex64/128/256, and bfloat16 when ml_dtypes is installed. bool moves
    (broadcast, allgather, alltoall, gather, scatter) but is not reduced: a "sum" of
    booleans is ambiguous (or vs count). object is refused: objects cannot travel
    without pickle. Complex values have no order, so min/max refuse them.
    """
    if dtype.kind in "iuf" or dtype.kind == "c":
        if op is not None and op.ordered and dtype.kind == "c":
            return f"op {op.name!r} needs ordered values; {dtype} is complex (use sum, avg or prod)"
        return None
    if dtype.name == "bfloat16" and dtype == bfloat16():  # ml_dtypes is imported already where such arrays exist
        return None
    if dtype.kind == "b":
        if op is None:
            return None
        return "bool arrays are not reduced (convert to uint8 for counts, or use max/min on uint8 for or/and)"
    if dtype.kind == "O":
        return "object arrays cannot be sent without pickle; use a numeric dtype"
    return f"dtype {dtype} is not numeric; use an integer, float or complex dtype"


def average_in_place(a: np.ndarray, n: int) -> None:
    """Divide the sum ``a`` by ``n`` in place: ``avg``'s last step (integers floor-divide and stay integers).

    Example::

        s = np.array([7, 9]); average_in_place(s, 2)   # s is now [3, 4]
    """
    if a.dtype.kind in "iu":
        np.floor_divide(a, a.dtype.type(n), out=a)
    else:
        np.divide(a, n, out=a, casting="unsafe")


def dtype_code(dtype: np.dtype) -> bytes:
    """16 bytes naming ``dtype`` for a message header: its array-protocol string, or its name for dtypes NumPy
    only knows through an extension (bfloat16 from ml_dtypes, whose string is an anonymous ``|V2``)."""
    text = dtype.name if dtype.kind == "V" else dtype.str
    return text.encode()[:16].ljust(16, b"\0")


def dtype_from_code(code: bytes) -> np.dtype:
    """The dtype :func:`dtype_code` named (ValueError for one this process does not know)."""
    text = code.rstrip(b"\0").decode(errors="replace")
    if text == "bfloat16" and bfloat16() is not None:
        return bfloat16()  # type: ignore[return-value]
    try:
        return np.dtype(text)
    except TypeError:
        raise ValueError(f"unknown dtype {text!r} (a dtype from an extension this process lacks?)") from None
