"""Star schedules (the parameter-server shape): the root talks to every other rank directly."""

# Terms (the names below follow them):
#
#   root   -- the hub: schedule.root for reduce and broadcast, rank 0 otherwise.
#   leaf   -- any other rank; leaves never talk to each other.
#   gather -- one step on the root receiving from every leaf, in rank order,
#             with one step on each leaf sending to it.
#   scatter -- the mirror: one step on the root sending to every leaf.
#
#            1   2
#             \ /
#        5 --- 0 --- 3        (root 0, P = 6)
#              |
#              4
#
# Two rounds at most, but the root moves (P-1) n elements each way. Its reduce
# receives are applied in the order listed, i.e. root's own data first, then
# the leaves in rank order: the result does not depend on message timing.
from __future__ import annotations

from collections.abc import Callable

from .schedule import Recv, Schedule, Send, Step

__all__ = ["allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "BUILDERS"]

_Steps = list[list[Step]]
#: What leaf r exchanges with the root: (start, stop).
_Span = Callable[[int], tuple[int, int]]


def _empty(nranks: int) -> _Steps:
    return [[] for _ in range(nranks)]


def _schedule(collective: str, nelems: int, root: int, blocks: tuple[int, ...], steps: _Steps) -> Schedule:
    return Schedule(collective, "star", len(steps), nelems, root, blocks, tuple(tuple(s) for s in steps))


def _gather(steps: _Steps, root: int, span: _Span, reduce: bool) -> None:
    recvs = []
    for leaf in range(len(steps)):
        start, stop = span(leaf)
        if leaf != root and start < stop:
            steps[leaf].append(Step(sends=(Send(root, start, stop),)))
            recvs.append(Recv(leaf, start, stop, reduce))
    if recvs:
        steps[root].append(Step(recvs=tuple(recvs)))


def _scatter(steps: _Steps, root: int, span: _Span) -> None:
    sends = []
    for leaf in range(len(steps)):
        start, stop = span(leaf)
        if leaf != root and start < stop:
            sends.append(Send(leaf, start, stop))
            steps[leaf].append(Step(recvs=(Recv(root, start, stop),)))
    if sends:
        steps[root].append(Step(sends=tuple(sends)))


def reduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """The root receives every leaf's buffer and reduces it in. Arguments are validated by :func:`topologies.build`."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:  # nothing to move
        return _schedule("reduce", nelems, root, blocks, steps)
    _gather(steps, root, lambda leaf: (0, nelems), reduce=True)
    return _schedule("reduce", nelems, root, blocks, steps)


def broadcast(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """The root sends its buffer to every leaf in one step."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("broadcast", nelems, root, blocks, steps)
    _scatter(steps, root, lambda leaf: (0, nelems))
    return _schedule("broadcast", nelems, root, blocks, steps)


def allreduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Rank 0 reduces every buffer into its own, then sends the result to every leaf: two rounds."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allreduce", nelems, 0, blocks, steps)
    _gather(steps, 0, lambda leaf: (0, nelems), reduce=True)
    _scatter(steps, 0, lambda leaf: (0, nelems))
    return _schedule("allreduce", nelems, 0, blocks, steps)


def reduce_scatter(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Rank 0 reduces every buffer into its own, then sends block r to rank r."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce_scatter", nelems, 0, blocks, steps)
    _gather(steps, 0, lambda leaf: (0, nelems), reduce=True)
    _scatter(steps, 0, lambda leaf: (blocks[leaf], blocks[leaf + 1]))
    return _schedule("reduce_scatter", nelems, 0, blocks, steps)


def allgather(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Rank 0 collects block r from rank r, then sends the whole buffer to every leaf."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allgather", nelems, 0, blocks, steps)
    _gather(steps, 0, lambda leaf: (blocks[leaf], blocks[leaf + 1]), reduce=False)
    _scatter(steps, 0, lambda leaf: (0, nelems))
    return _schedule("allgather", nelems, 0, blocks, steps)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks)``.
BUILDERS: dict[str, Callable[[int, int, int, tuple[int, ...]], Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
}
