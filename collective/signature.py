"""The checks of a collective call: its signature (algorithm, op, dtype, root, result shape, blocks) and its out array.

Host calls (``collective.prepare.Preparer``) and NCCL calls
(``collective.backends.nccl.NCCLBackend``) both check through these
functions, so a bad argument gets the same exception and message whatever
array type it comes in.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from collective.topologies import even_blocks

from .errors import CollectiveError, CollectiveTypeError, CollectiveValueError
from .ops import OPS, ReduceOp, check_dtype, get_op

__all__ = ["ROOTED", "REDUCING", "check_signature", "check_algorithm", "check_out", "check_out_dtype", "overlap",
           "cached_checks"]

ROOTED = frozenset(("reduce", "broadcast"))
REDUCING = frozenset(("allreduce", "reduce", "reduce_scatter"))

Fail = Callable[[type, str, Any, Any, Any, str], CollectiveError]


def cached_checks(cache: dict[tuple, tuple], key: tuple, compute: Callable[[], tuple]) -> tuple:
    """``cache[key]``, computing it with ``compute()`` (which raises on a bad call) the first time.

    The hot path of a repeated call is one dict lookup. An unhashable part of
    the key (a list passed as root, say) skips the cache so that ``compute``
    explains the error; the cache is cleared when a program makes it grow
    past 4096 signatures.
    """
    try:
        hit = cache.get(key)
    except TypeError:
        return compute()
    if hit is None:
        hit = compute()
        if len(cache) > 4096:
            cache.clear()
        cache[key] = hit
    return hit


def check_algorithm(name: str, shape: tuple, dtype: np.dtype, alg: Any, choices: Sequence[str], fail: Fail,
                    others: Collection[str] = ()) -> None:
    """Raise (through ``fail``, see :func:`check_signature`) unless ``alg`` is one of ``choices`` (the backend's
    algorithms: ``spec.ALGORITHMS`` on the host; a variable-size collective's own). ``others``: algorithms that
    exist but do not run this collective, which the message calls so rather than unknown."""
    if alg not in choices:
        what = f"algorithm {alg!r} does not run {name}" if alg in others else f"unknown algorithm {alg!r}"
        raise fail(CollectiveValueError, name, shape, dtype, alg, f"{what}; choose one of {', '.join(choices)}")


def check_out(name: str, shape: tuple, dtype: np.dtype, alg: str, out_dtype: Any, out_shape: tuple, rshape: tuple,
              fail: Fail) -> None:
    """Raise (through ``fail``) unless an out array of ``out_dtype`` and ``out_shape`` fits a result of ``dtype``
    and ``rshape`` (contiguity and writability are the caller's: they depend on the array type)."""
    if out_dtype != dtype:
        check_out_dtype(name, shape, dtype, alg, out_dtype, fail)
    if tuple(out_shape) != tuple(rshape):
        raise fail(CollectiveValueError, name, shape, dtype, alg,
                   f"out has shape {tuple(out_shape)}, expected {tuple(rshape)}")


def check_out_dtype(name: str, shape: tuple, dtype: np.dtype, alg: str, out_dtype: Any, fail: Fail) -> None:
    """Raise (through ``fail``) unless ``out_dtype`` is the result's ``dtype`` (for results whose shape the caller
    checks itself, such as a variable-size collective's rows)."""
    if out_dtype != dtype:
        raise fail(CollectiveTypeError, name, shape, dtype, alg, f"out has dtype {out_dtype}, expected {dtype}")


def overlap(name: str, shape: tuple, dtype: np.dtype, alg: str, x_span: tuple[int, int], out_span: tuple[int, int],
            fail: Fail) -> bool:
    """Whether out is the input itself (in place), from their memory spans ``(start, end)``; raises (through
    ``fail``) when they overlap only partly. Empty spans never overlap."""
    a0, a1 = x_span
    b0, b1 = out_span
    if a0 < b1 and b0 < a1 and a0 < a1 and b0 < b1:
        if (a0, a1) != (b0, b1):
            raise fail(CollectiveValueError, name, shape, dtype, alg,
                       "out partly overlaps the input; pass out=x (the same array) or a separate array")
        return True
    return False


def check_signature(name: str, shape: tuple, dtype: np.dtype, op: Any, root: Any, alg: str, rank: int, size: int,
                    fail: Fail) -> tuple[ReduceOp | None, int, tuple, tuple[int, ...] | None]:
    """Check op, dtype and root of one call; return ``(op, root, result shape, blocks)``.

    Raises what ``fail(cls, name, shape, dtype, alg, message)`` builds (a
    message naming the op, rank, shape, dtype and algorithm), before anything
    is sent. ``blocks`` are the element offsets of each rank's block for
    reduce_scatter (rows split like ``np.array_split``) and allgather, else None.

    Example::

        check_signature("allreduce", (4,), np.dtype("float32"), "sum", 0, "ring", 0, 2, fail)
    """
    rop = None
    if name in REDUCING:
        rop = get_op(op)
        if rop is None:
            raise fail(CollectiveValueError, name, shape, dtype, alg,
                       f"unknown op {op!r}; choose one of {', '.join(OPS)}")
    why = check_dtype(dtype, rop)
    if why is not None:
        raise fail(CollectiveTypeError, name, shape, dtype, alg, why)
    if name in ROOTED:
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < size:
            raise fail(CollectiveValueError, name, shape, dtype, alg,
                       f"root {root!r} is not a rank of this communicator (0..{size - 1})")
        root = int(root)
    else:
        root = 0
    n = int(np.prod(shape)) if shape else 1
    blocks = None
    if name == "reduce_scatter":
        rows = shape[0] if len(shape) else 1
        rest = shape[1:]
        row = int(np.prod(rest)) if rest else 1
        rb = even_blocks(rows, size)
        blocks = tuple(b * row for b in rb)
        rshape: tuple = (rb[rank + 1] - rb[rank], *rest)
    elif name == "allgather":
        blocks = tuple(i * n for i in range(size + 1))
        rshape = (size * shape[0], *shape[1:]) if len(shape) else (size,)
    else:
        rshape = shape
    return rop, root, rshape, blocks
