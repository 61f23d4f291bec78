"""The one table of collectives: names, roots, reductions, result shapes, blocks, busbw factors, algorithms."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from collective import topologies

__all__ = [
    "CollectiveSpec", "SPECS", "COLLECTIVE_NAMES", "VARIABLE_NAMES", "OP_NAMES", "ROOTED", "REDUCING", "ALGORITHMS",
    "SCHEDULED", "NCCL_ALGORITHMS", "spec", "result_shape", "blocks_of", "busbw_factor",
]


@dataclass(frozen=True)
class CollectiveSpec:
    """What every part of the library needs to know about one collective.

    Attributes:
        name: the public name (``comm.<name>``).
        rooted: a ``root`` argument matters (reduce, broadcast).
        reducing: it takes a reduction ``op``.
        busbw: busbw / algbw for P ranks, as nccl-tests defines it.
        host: algorithms a caller may name for host (NumPy) arrays, "auto" first.
        nccl: algorithms the NCCL backend runs for device arrays (none: host arrays only).
    """

    name: str
    rooted: bool
    reducing: bool
    busbw: Callable[[int], float]
    host: tuple[str, ...]
    nccl: tuple[str, ...]


#: Schedule algorithms, run by the executor over any backend.
SCHEDULED: frozenset[str] = frozenset(topologies.ALGORITHMS)
#: Algorithms a caller may name. "auto" picks one per call.
ALGORITHMS: tuple[str, ...] = ("auto", "native", *topologies.ALGORITHMS, "shm")
#: What the NCCL backend runs ("shm" is host memory only).
NCCL_ALGORITHMS: tuple[str, ...] = ("auto", "native", *topologies.ALGORITHMS)


def _two_fold(p: int) -> float:
    return 2.0 * (p - 1) / p


def _one_fold(p: int) -> float:
    return (p - 1) / p


def _one(p: int) -> float:
    return 1.0


SPECS: dict[str, CollectiveSpec] = {s.name: s for s in (
    CollectiveSpec("allreduce", False, True, _two_fold, ALGORITHMS, NCCL_ALGORITHMS),
    CollectiveSpec("reduce", True, True, _one, ALGORITHMS, NCCL_ALGORITHMS),
    CollectiveSpec("broadcast", True, False, _one, ALGORITHMS, NCCL_ALGORITHMS),
    CollectiveSpec("reduce_scatter", False, True, _one_fold, ALGORITHMS, NCCL_ALGORITHMS),
    CollectiveSpec("allgather", False, False, _one_fold, ALGORITHMS, NCCL_ALGORITHMS),
    CollectiveSpec("alltoall", False, False, _one_fold, ("auto", "native", "pairwise", "bruck", "shm"), ()),
    CollectiveSpec("gather", True, False, _one_fold, ("auto", "native", "tree", "shm"), ()),
    CollectiveSpec("scatter", True, False, _one_fold, ("auto", "native", "tree", "shm"), ()),
)}
#: The collectives every rank calls with the same shape (allgather: the same row shape), in a fixed order.
COLLECTIVE_NAMES: tuple[str, ...] = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather")
#: The collectives whose sizes may differ across ranks (see ``collective.variable``).
VARIABLE_NAMES: tuple[str, ...] = ("alltoall", "gather", "scatter")
#: Every op the flight recorder and the watchdog's control channel name (their index is the wire code).
OP_NAMES: tuple[str, ...] = (*COLLECTIVE_NAMES, *VARIABLE_NAMES, "barrier", "split", "subgroup")
ROOTED: frozenset[str] = frozenset(n for n, s in SPECS.items() if s.rooted)
REDUCING: frozenset[str] = frozenset(n for n, s in SPECS.items() if s.reducing)


def spec(name: str) -> CollectiveSpec:
    """The entry of collective ``name`` (KeyError for an unknown one).

    Example::

        spec("allgather").busbw(4)   # 0.75
    """
    return SPECS[name]


def busbw_factor(collective: str, nranks: int) -> float:
    """busbw / algbw as nccl-tests defines it.

    2(P-1)/P for allreduce; (P-1)/P for reduce_scatter, allgather, allgatherv,
    alltoall, gather and scatter; 1 for reduce, broadcast and sendrecv (and
    any other name).

    Example::

        busbw_factor("allreduce", 4)   # 1.5
        busbw_factor("alltoall", 4)    # 0.75
    """
    s = SPECS.get(collective)
    if s is not None:
        return s.busbw(nranks)
    # Collectives measured by the benchmark that are not (or not yet) entries of SPECS.
    return _one_fold(nranks) if collective in ("alltoall", "gather", "scatter", "allgatherv") else 1.0


def blocks_of(name: str, shape: tuple[int, ...], size: int) -> tuple[int, ...] | None:
    """Element offsets of each rank's block (P + 1 of them) for reduce_scatter and allgather, else None.

    reduce_scatter splits rows (the first axis; a 0-d input is one row) like
    ``np.array_split``: the first ``rows % P`` ranks get one more.

    Example::

        blocks_of("reduce_scatter", (5, 2), 2)   # (0, 6, 10)
    """
    if name == "reduce_scatter":
        rows = shape[0] if shape else 1
        row = 1
        for d in shape[1:]:
            row *= d
        return tuple(b * row for b in topologies.even_blocks(rows, size))
    if name == "allgather":
        n = 1
        for d in shape:
            n *= d
        return tuple(i * n for i in range(size + 1))
    return None


def result_shape(name: str, shape: tuple[int, ...], size: int, rank: int) -> tuple[int, ...]:
    """The shape of rank ``rank``'s result of collective ``name`` on inputs of ``shape``.

    Example::

        result_shape("allgather", (2, 3), size=4, rank=0)        # (8, 3)
        result_shape("reduce_scatter", (5,), size=2, rank=1)      # (2,)
    """
    if name == "reduce_scatter":
        rows = shape[0] if shape else 1
        base, extra = divmod(rows, size)
        return (base + (1 if rank < extra else 0), *shape[1:])
    if name == "allgather":
        return (size * shape[0], *shape[1:]) if shape else (size,)
    return tuple(shape)
