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
#
# gather and scatter (input and output buffers, see topologies.schedule) root
# the tree anywhere and move each block once. Their terms:
#
#   block r  -- rank r's contribution, [blocks[r], blocks[r+1]) of the root's
#               output (gather) or input (scatter); blocks may be empty.
#   subtree data of c -- the blocks of the ranks of c's subtree, in vrank order.
#   relay    -- a non-root vrank whose children's subtrees hold any data. It
#               keeps its subtree data in its temp buffer, its own block first
#               (a local copy from its input, gather; to its output, scatter),
#               then each child's subtree data at the offset of that child.
#               Any other non-root rank sends from its input or receives into
#               its output directly.
#   wrap     -- at the root, a subtree's ranks (c + root) mod P.. are in rank
#               order except where they pass P-1 -> 0: the one subtree that
#               wraps moves as two messages, the ranks up to P-1 and those from 0,
#               so every piece lands in (or leaves) the root's buffer in place.
#
# Empty pieces are skipped by both ends alike, and a rank with one rank only
# (P = 1) does its own copy and nothing else.
from __future__ import annotations

from collections.abc import Callable

from .schedule import INPUT, OUTPUT, TEMP, Copy, Recv, Schedule, Send, Step

__all__ = ["allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "gather", "scatter", "BUILDERS"]

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


class _Rooted:
    """The binomial tree rooted at ``root`` with each rank's block size: subtrees, their data, their pieces."""

    def __init__(self, nranks: int, root: int, blocks: tuple[int, ...]) -> None:
        P = self.P = nranks
        self.root, self.blocks = root, blocks
        self.size = [blocks[(v + root) % P + 1] - blocks[(v + root) % P] for v in range(P)]  # by vrank
        self.end = [P] + [min(v + (v & -v), P) for v in range(1, P)]  # subtree of v: vranks [v, end[v])
        self.pre = [0]
        for n in self.size:
            self.pre.append(self.pre[-1] + n)

    def rank(self, v: int) -> int:
        return (v + self.root) % self.P

    def data(self, v: int) -> int:
        """Elements of v's subtree data."""
        return self.pre[self.end[v]] - self.pre[v]

    def relay(self, v: int) -> bool:
        return v != 0 and self.data(v) > self.size[v]

    def temp_offset(self, v: int, c: int) -> int:
        """Where child c's subtree data starts in relay v's temp buffer."""
        return self.pre[c] - self.pre[v]

    def at_root(self, c: int) -> list[tuple[int, int, int]]:
        """Child c's subtree data in the root's rank-ordered buffer: (offset in c's data, root start, root stop)."""
        first, last = self.rank(c), self.rank(self.end[c] - 1)
        if first <= last:
            return [(0, self.blocks[first], self.blocks[last + 1])]
        head = self.blocks[self.P] - self.blocks[first]
        return [(0, self.blocks[first], self.blocks[self.P]), (head, 0, self.blocks[last + 1])]

    def rounds(self) -> list[tuple[int, int, int]]:
        """Every edge as (round k, child vrank, parent vrank), rounds ascending."""
        return [(k, c, c - (1 << k)) for k in range((self.P - 1).bit_length()) for c in _edges(self.P, k)]


def _io_schedule(collective: str, t: _Rooted, nelems: int, steps: _Steps, extents: dict) -> Schedule:
    return Schedule(collective, "tree", t.P, nelems, t.root, t.blocks, tuple(tuple(s) for s in steps), None, extents)


def gather(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial gather of block r from rank r's input into ``root``'s output: ceil(log2 P) rounds.

    Rounds k = 0, 1, ...: each child of round k sends its subtree data (from
    its input, or its temp buffer if it is a relay) to its parent, which puts it
    in its temp buffer after its own block, or, at the root, in place in the
    output. Each block moves once per level, never more.
    """
    P = nranks
    t = _Rooted(P, root, blocks)
    steps = _empty(P)
    first: dict[int, list[Copy]] = {}  # a rank's own-block copy, made in its first step
    if nelems:
        for v in range(P):
            r = t.rank(v)
            if v == 0 and t.size[0]:
                first[r] = [Copy(INPUT, 0, t.size[0], OUTPUT, blocks[r])]
            elif t.relay(v) and t.size[v]:
                first[r] = [Copy(INPUT, 0, t.size[v], TEMP, 0)]
        for k, c, p in t.rounds():
            child, parent = t.rank(c), t.rank(p)
            n = t.data(c)
            if not n:
                continue
            src = TEMP if t.relay(c) else INPUT
            if p == 0:
                pieces = t.at_root(c)
                sends = tuple(Send(parent, o, o + (b - a), src) for o, a, b in pieces if b > a)
                recvs = tuple(Recv(child, a, b, buf=OUTPUT) for o, a, b in pieces if b > a)
            else:
                at = t.temp_offset(p, c)
                sends, recvs = (Send(parent, 0, n, src),), (Recv(child, at, at + n, buf=TEMP),)
            steps[child].append(Step(sends, copies=tuple(first.pop(child, ()))))
            steps[parent].append(Step(recvs=recvs, copies=tuple(first.pop(parent, ()))))
        for r, copies in first.items():  # nothing to receive or send: the copy alone (one rank, or empty others)
            steps[r].append(Step(copies=tuple(copies)))
    extents = {
        INPUT: tuple(t.size[(r - root) % P] for r in range(P)),
        OUTPUT: tuple(nelems if r == root else 0 for r in range(P)),
        TEMP: tuple(t.data((r - root) % P) if t.relay((r - root) % P) else 0 for r in range(P)),
    }
    return _io_schedule("gather", t, nelems, steps, extents)


def scatter(nranks: int, nelems: int, root: int, blocks: tuple[int, ...]) -> Schedule:
    """Binomial scatter of block r of ``root``'s input to rank r's output: ceil(log2 P) rounds.

    The mirror of :func:`gather`: rounds k = top..0, each parent sends a child
    its subtree data, from the root's input in place or from a relay's temp
    buffer; a relay copies its own block to its output once it has it.
    """
    P = nranks
    t = _Rooted(P, root, blocks)
    steps = _empty(P)
    later: dict[int, list[Copy]] = {}  # a rank's own-block copy, made in its next step
    if nelems:
        if t.size[0]:
            later[root] = [Copy(INPUT, blocks[root], blocks[root + 1], OUTPUT, 0)]
        for k, c, p in reversed(t.rounds()):
            child, parent = t.rank(c), t.rank(p)
            n = t.data(c)
            if not n:
                continue
            dst = TEMP if t.relay(c) else OUTPUT
            if p == 0:
                pieces = t.at_root(c)
                sends = tuple(Send(child, a, b, INPUT) for o, a, b in pieces if b > a)
                recvs = tuple(Recv(parent, o, o + (b - a), buf=dst) for o, a, b in pieces if b > a)
            else:
                at = t.temp_offset(p, c)
                sends, recvs = (Send(child, at, at + n, TEMP),), (Recv(parent, 0, n, buf=dst),)
            steps[parent].append(Step(sends, copies=tuple(later.pop(parent, ()))))
            steps[child].append(Step(recvs=recvs))
            if dst == TEMP and t.size[c]:
                later[child] = [Copy(TEMP, 0, t.size[c], OUTPUT, 0)]
        for r, copies in later.items():
            steps[r].append(Step(copies=tuple(copies)))
    extents = {
        INPUT: tuple(nelems if r == root else 0 for r in range(P)),
        OUTPUT: tuple(t.size[(r - root) % P] for r in range(P)),
        TEMP: tuple(t.data((r - root) % P) if t.relay((r - root) % P) else 0 for r in range(P)),
    }
    return _io_schedule("scatter", t, nelems, steps, extents)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks)``.
BUILDERS: dict[str, Callable[[int, int, int, tuple[int, ...]], Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
    "gather": gather,
    "scatter": scatter,
}
