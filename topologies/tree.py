"""Binomial-tree schedules: ceil(log2 P) rounds up to the root, or down from it."""

# Terms (the names below follow them):
#
#   vrank  -- a rank relabelled relative to the root, vrank = (rank - root) mod P,
#             so the root is vrank 0. Every tree below is drawn in vranks.
#   round  -- round k moves data over the edges of length 2^k: between vrank c,
#             whose lowest set bit is k, and its parent c - 2^k. A rank does
#             one step in each round it takes part in.
#   child  -- vrank c of such an edge; parent -- vrank c - 2^k.
#   subtree of c -- vranks [c, c + 2^k) clipped to P: c and everything below it.
#
# The binomial tree for P = 8 (edge labels are the round k):
#
#                   0
#          /k=2     |k=1    \k=0
#         4         2        1
#       /k=1 \k=0   |k=0
#      6      5     3
#      |k=0
#      7
#
# Up (reduce, gather): rounds k = 0, 1, ...; in round k every child with lowest
# set bit k sends to its parent and is done, so when it sends it already holds
# its whole subtree. Down (broadcast, scatter): the mirror, rounds k = top..0.
# A parent whose would-be child c >= P (P not a power of two) skips that round.
#
# A subtree is a contiguous range of vranks, hence of blocks when vrank == rank.
# The collectives that move blocks (reduce_scatter, allgather) therefore always
# root the tree at rank 0; reduce and broadcast move the whole buffer and may
# root it anywhere.
from __future__ import annotations

from typing import Callable

from .schedule import Recv, Schedule, Send, Step

__all__ = ["allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "BUILDERS"]

_Steps = list[list[Step]]
#: What child vrank c of the edge of length ``bit`` exchanges with its parent: (start, stop).
_Span = Callable[[int, int], tuple[int, int]]


def _empty(nranks: int) -> _Steps:
    return [[] for _ in range(nranks)]


def _schedule(collective: str, nelems: int, root: int, blocks: tuple[int, ...], steps: _Steps) -> Schedule:
    return Schedule(collective, "tree", len(steps), nelems, root, blocks, tuple(tuple(s) for s in steps))


def _edges(P: int, k: int) -> range:
    """The child vranks of round k: those whose lowest set bit is k."""
    return range(1 << k, P, 2 << k)


def _up(steps: _Steps, root: int, span: _Span, reduce: bool) -> None:
    """Rounds k = 0, 1, ...: each child sends ``span`` to its parent, which reduces or copies it."""
    P = len(steps)
    for k in range((P - 1).bit_length()):
        for c in _edges(P, k):
            start, stop = span(c, 1 << k)
            if start < stop:
                child, parent = (c + root) % P, (c - (1 << k) + root) % P
                steps[child].append(Step(sends=(Send(parent, start, stop),)))
                steps[parent].append(Step(recvs=(Recv(child, start, stop, reduce),)))


def _down(steps: _Steps, root: int, span: _Span) -> None:
    """Rounds k = top..0: each parent sends ``span`` to its child, which copies it."""
    P = len(steps)
    for k in reversed(range((P - 1).bit_length())):
        for c in _edges(P, k):
            start, stop = span(c, 1 << k)
            if start < stop:
                child, parent = (c + root) % P, (c - (1 << k) + root) % P
                steps[parent].append(Step(sends=(Send(child, start, stop),)))
                steps[child].append(Step(recvs=(Recv(parent, start, stop),)))


def _subtree(blocks: tuple[int, ...]) -> _Span:
    """The blocks of the subtree of c (root 0, so vrank == rank)."""
    P = len(blocks) - 1
    return lambda c, bit: (blocks[c], blocks[min(c + bit, P)])


def reduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial reduce of the whole buffer to ``root``. Arguments are validated by :func:`topologies.build`."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:  # nothing to move
        return _schedule("reduce", nelems, root, blocks, steps)
    _up(steps, root, lambda c, bit: (0, nelems), reduce=True)
    return _schedule("reduce", nelems, root, blocks, steps)


def broadcast(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial broadcast of the whole buffer from ``root``."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("broadcast", nelems, root, blocks, steps)
    _down(steps, root, lambda c, bit: (0, nelems))
    return _schedule("broadcast", nelems, root, blocks, steps)


def allreduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial reduce to rank 0, then binomial broadcast from it: 2 ceil(log2 P) rounds."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allreduce", nelems, 0, blocks, steps)
    _up(steps, 0, lambda c, bit: (0, nelems), reduce=True)
    _down(steps, 0, lambda c, bit: (0, nelems))
    return _schedule("allreduce", nelems, 0, blocks, steps)


def reduce_scatter(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial reduce to rank 0, then binomial scatter: each child gets its subtree's blocks."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce_scatter", nelems, 0, blocks, steps)
    _up(steps, 0, lambda c, bit: (0, nelems), reduce=True)
    _down(steps, 0, _subtree(blocks))
    return _schedule("reduce_scatter", nelems, 0, blocks, steps)


def allgather(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial gather of the blocks to rank 0 (each child sends its subtree's), then binomial broadcast."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allgather", nelems, 0, blocks, steps)
    _up(steps, 0, _subtree(blocks), reduce=False)
    _down(steps, 0, lambda c, bit: (0, nelems))
    return _schedule("allgather", nelems, 0, blocks, steps)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks)``.
BUILDERS: dict[str, Callable[[int, int, int, tuple[int, ...]], Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
}
