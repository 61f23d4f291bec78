"""Ring schedules: reduce-scatter and allgather passes around the ring 0 -> 1 -> ... -> P-1 -> 0 (or a given order)."""

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
# order  -- the ring as a list of ranks: position p holds rank order[p]. The
#           default is 0, 1, ..., P-1; topologies.build passes a node-adjacent
#           order (ranks of a node next to each other) so that only one link
#           per node boundary crosses nodes. Right, left and chunk indices above
#           are positions; chunk c is block order[c], so rank order[p] still
#           ends (reduce-scatter) or starts (allgather) with its own block.
#
# allgatherv is the allgather pass on an output buffer (see topologies.schedule):
# rank r first copies its input, block r, into place, in the same step as its
# first send, which the copy precedes.
#
# Fewer elements than ranks, or caller-supplied uneven blocks, give empty
# chunks. Their transfers are skipped by range length, identically on the
# sender and the receiver, so channel matching stays in step; a step left with
# nothing to do is dropped.
from __future__ import annotations

from collections.abc import Callable, Sequence

from .schedule import INPUT, OUTPUT, Copy, Recv, Schedule, Send, Step

__all__ = ["allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "allgatherv", "node_order", "BUILDERS"]

_Steps = list[list[Step]]


def _empty(nranks: int) -> _Steps:
    return [[] for _ in range(nranks)]


def _schedule(collective: str, nelems: int, root: int, blocks: tuple[int, ...], steps: _Steps) -> Schedule:
    return Schedule(collective, "ring", len(steps), nelems, root, blocks, tuple(tuple(s) for s in steps))


def _pass(steps: _Steps, blocks: tuple[int, ...], first: int, reduce: bool, order: Sequence[int] | None) -> None:
    """Append one ring pass (P-1 steps per rank) to ``steps``; see the comment at the top."""
    P = len(steps)
    if order is None:
        order = range(P)
    for p in range(P):
        r, right, left = order[p], order[(p + 1) % P], order[(p - 1) % P]
        for s in range(P - 1):
            out, inc = order[(first + p - s) % P], order[(first + p - s - 1) % P]
            sends = (Send(right, blocks[out], blocks[out + 1]),) if blocks[out] < blocks[out + 1] else ()
            recvs = (Recv(left, blocks[inc], blocks[inc + 1], reduce),) if blocks[inc] < blocks[inc + 1] else ()
            if sends or recvs:
                steps[r].append(Step(sends, recvs))


def node_order(nodes: Sequence[int]) -> tuple[int, ...]:
    """The ring order that keeps the ranks of each node adjacent: nodes by lowest rank, ranks ascending inside.

    Args:
        nodes: node label of each rank.

    Returns:
        A permutation of range(P); the identity when every node's ranks are consecutive.

    Example::

        node_order((0, 1, 0, 1))   # (0, 2, 1, 3): one link 2 -> 1 and one 3 -> 0 cross nodes
    """
    first: dict[int, int] = {}
    for r, n in enumerate(nodes):
        first.setdefault(n, r)
    return tuple(sorted(range(len(nodes)), key=lambda r: (first[nodes[r]], r)))


def allreduce(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], order: Sequence[int] | None = None
) -> Schedule:
    """Ring allreduce: a reduce-scatter pass, then an allgather pass; 2(P-1) steps per rank.

    Rank r sends chunk (r - s) in reduce-scatter step s, so it ends owning
    chunk r + 1, which the allgather pass starts from. ``order`` is the ring
    (default 0..P-1; see the comment at the top). Arguments are validated by
    :func:`topologies.build`.
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:  # nothing to move
        return _schedule("allreduce", nelems, 0, blocks, steps)
    _pass(steps, blocks, first=0, reduce=True, order=order)
    _pass(steps, blocks, first=1, reduce=False, order=order)
    return _schedule("allreduce", nelems, 0, blocks, steps)


def reduce_scatter(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], order: Sequence[int] | None = None
) -> Schedule:
    """Ring reduce-scatter: one pass, offset so that rank r ends owning the reduced block r."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce_scatter", nelems, 0, blocks, steps)
    _pass(steps, blocks, first=-1, reduce=True, order=order)
    return _schedule("reduce_scatter", nelems, 0, blocks, steps)


def allgather(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], order: Sequence[int] | None = None
) -> Schedule:
    """Ring allgather: one copy pass starting from block r on rank r."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allgather", nelems, 0, blocks, steps)
    _pass(steps, blocks, first=0, reduce=False, order=order)
    return _schedule("allgather", nelems, 0, blocks, steps)


def allgatherv(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], order: Sequence[int] | None = None
) -> Schedule:
    """Ring allgatherv: rank r's input (block r, any size, empty too) to every rank's output; P-1 steps.

    The first step copies the input into place in the output, then one copy
    pass runs on the output.
    """
    steps = _empty(nranks)
    if nelems:
        if nranks > 1:
            _pass(steps, blocks, first=0, reduce=False, order=order)
        for r in range(nranks):
            mine = steps[r]
            for i, st in enumerate(mine):
                mine[i] = Step(tuple(Send(s.peer, s.start, s.stop, OUTPUT) for s in st.sends),
                               tuple(Recv(rv.peer, rv.start, rv.stop, buf=OUTPUT) for rv in st.recvs))
            if blocks[r] < blocks[r + 1]:
                copy = (Copy(INPUT, 0, blocks[r + 1] - blocks[r], OUTPUT, blocks[r]),)
                if mine:
                    mine[0] = Step(mine[0].sends, mine[0].recvs, copy)
                else:
                    mine.append(Step(copies=copy))
    extents = {INPUT: tuple(blocks[r + 1] - blocks[r] for r in range(nranks)), OUTPUT: (nelems,) * nranks}
    return Schedule("allgatherv", "ring", nranks, nelems, 0, blocks, tuple(tuple(s) for s in steps), None, extents)


def reduce(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], order: Sequence[int] | None = None
) -> Schedule:
    """Ring reduce: a reduce-scatter pass, then every other rank sends its reduced block to ``root``.

    The root receives its P-1 blocks as copies in one step; they are disjoint.
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce", nelems, root, blocks, steps)
    _pass(steps, blocks, first=-1, reduce=True, order=order)
    gather = []
    for r in range(nranks):
        if r != root and blocks[r] < blocks[r + 1]:
            steps[r].append(Step(sends=(Send(root, blocks[r], blocks[r + 1]),)))
            gather.append(Recv(r, blocks[r], blocks[r + 1]))
    if gather:
        steps[root].append(Step(recvs=tuple(gather)))
    return _schedule("reduce", nelems, root, blocks, steps)


def broadcast(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], order: Sequence[int] | None = None
) -> Schedule:
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
    _pass(steps, blocks, first=0, reduce=False, order=order)
    return _schedule("broadcast", nelems, root, blocks, steps)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks, order=None)``.
BUILDERS: dict[str, Callable[..., Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
    "allgatherv": allgatherv,
}
