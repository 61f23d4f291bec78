"""Ring schedules: reduce-scatter and allgather passes around the ring 0 -> 1 -> ... -> P-1 -> 0."""

# Terms (the names below follow them):
#
#   chunk  -- block c of the schedule, [blocks[c], blocks[c+1]). A ring moves
#             one chunk per rank per step; chunk indices are taken mod P.
#   step   -- one send to the right neighbour and one receive from the left
#             neighbour, posted together.
#   right  -- rank (r + 1) mod P, the only rank r sends to in a ring pass.
#   left   -- rank (r - 1) mod P, the only rank r receives from.
#
#   The ring for P = 6: every rank sends right and receives from the left.
#
#        0 ---> 1 ---> 2
#        ^             |
#        |             v
#        5 <--- 4 <--- 3
#
# A pass is P-1 steps. In step s rank r sends chunk (first + r - s) and receives
# chunk (first + r - s - 1): what it sends in step s+1 is what it received in
# step s, and its left neighbour sends exactly the chunk it expects. A
# reduce-scatter pass (receives reduce) leaves rank r holding the full
# reduction of chunk (first + r + 1); an allgather pass (receives copy) needs
# rank r to start with chunk (first + r) and leaves it holding every chunk.
#
# Fewer elements than ranks, or caller-supplied uneven blocks, give empty
# chunks. Their transfers are skipped by range length, identically on the
# sender and the receiver, so channel matching stays in step; a step left with
# nothing to do is dropped.
from __future__ import annotations

from typing import Callable

from .schedule import Recv, Schedule, Send, Step

__all__ = ["allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "BUILDERS"]

_Steps = list[list[Step]]


def _empty(nranks: int) -> _Steps:
    return [[] for _ in range(nranks)]


def _schedule(collective: str, nelems: int, root: int, blocks: tuple[int, ...], steps: _Steps) -> Schedule:
    return Schedule(collective, "ring", len(steps), nelems, root, blocks, tuple(tuple(s) for s in steps))


def _pass(steps: _Steps, blocks: tuple[int, ...], first: int, reduce: bool) -> None:
    """Append one ring pass (P-1 steps per rank) to ``steps``; see the comment at the top."""
    P = len(steps)
    for r in range(P):
        right, left = (r + 1) % P, (r - 1) % P
        for s in range(P - 1):
            out, inc = (first + r - s) % P, (first + r - s - 1) % P
            sends = (Send(right, blocks[out], blocks[out + 1]),) if blocks[out] < blocks[out + 1] else ()
            recvs = (Recv(left, blocks[inc], blocks[inc + 1], reduce),) if blocks[inc] < blocks[inc + 1] else ()
            if sends or recvs:
                steps[r].append(Step(sends, recvs))


def allreduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Ring allreduce: a reduce-scatter pass, then an allgather pass; 2(P-1) steps per rank.

    Rank r sends chunk (r - s) in reduce-scatter step s, so it ends owning
    chunk r + 1, which the allgather pass starts from. Arguments are validated
    by :func:`topologies.build`.
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:  # nothing to move
        return _schedule("allreduce", nelems, 0, blocks, steps)
    _pass(steps, blocks, first=0, reduce=True)
    _pass(steps, blocks, first=1, reduce=False)
    return _schedule("allreduce", nelems, 0, blocks, steps)


def reduce_scatter(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Ring reduce-scatter: one pass, offset so that rank r ends owning the reduced block r."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce_scatter", nelems, 0, blocks, steps)
    _pass(steps, blocks, first=-1, reduce=True)
    return _schedule("reduce_scatter", nelems, 0, blocks, steps)


def allgather(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Ring allgather: one copy pass starting from block r on rank r."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allgather", nelems, 0, blocks, steps)
    _pass(steps, blocks, first=0, reduce=False)
    return _schedule("allgather", nelems, 0, blocks, steps)


def reduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Ring reduce: a reduce-scatter pass, then every other rank sends its reduced block to ``root``.

    The root receives its P-1 blocks as copies in one step; they are disjoint.
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce", nelems, root, blocks, steps)
    _pass(steps, blocks, first=-1, reduce=True)
    gather = []
    for r in range(nranks):
        if r != root and blocks[r] < blocks[r + 1]:
            steps[r].append(Step(sends=(Send(root, blocks[r], blocks[r + 1]),)))
            gather.append(Recv(r, blocks[r], blocks[r + 1]))
    if gather:
        steps[root].append(Step(recvs=tuple(gather)))
    return _schedule("reduce", nelems, root, blocks, steps)


def broadcast(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Ring broadcast (scatter-allgather): ``root`` sends block r to rank r in one step, then an allgather pass.

    Each rank sends about n elements in all instead of the root sending P-1
    copies of the buffer.
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("broadcast", nelems, root, blocks, steps)
    scatter = []
    for r in range(nranks):
        if r != root and blocks[r] < blocks[r + 1]:
            scatter.append(Send(r, blocks[r], blocks[r + 1]))
            steps[r].append(Step(recvs=(Recv(root, blocks[r], blocks[r + 1]),)))
    if scatter:
        steps[root].append(Step(sends=tuple(scatter)))
    _pass(steps, blocks, first=0, reduce=False)
    return _schedule("broadcast", nelems, root, blocks, steps)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks)``.
BUILDERS: dict[str, Callable[[int, int, int, tuple[int, ...]], Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
}
