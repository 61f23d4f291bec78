"""Pipelined binary-tree schedules: the buffer moves in pieces, each node forwarding piece i while piece i+1 arrives."""

# Terms (the names below follow them):
#
#   vrank  -- a rank relabelled relative to the root, vrank = (rank - root) mod P,
#             so the root is vrank 0. The tree below is drawn in vranks.
#   tree   -- a balanced binary tree in preorder: the subtree of vrank v is the
#             contiguous range [v, end); v's first child is v + 1 and holds the
#             first half (rounded up) of the rest, its second child the other
#             half. Contiguous subtrees keep consecutive ranks -- the ranks of
#             a node, as MPI usually places them -- in the same subtree, so
#             few edges cross nodes. Its depth D is floor(log2 P): the number
#             of edges from the root to the deepest leaf.
#   piece  -- the buffer is cut into k contiguous pieces of near-equal length
#             (``even_blocks(nelems, k)``); piece i is the i-th. k comes from
#             :func:`piece_count` unless the caller fixes it.
#   down   -- broadcast: the pieces flow from the root to the leaves.
#   up     -- reduce: partial reductions of the pieces flow from the leaves to the
#             root; each node combines its own piece, then its first child's,
#             then its second child's (a fixed order, so every run of one
#             schedule gives the same bits).
#
# The tree for P = 10 (D = 3):
#
#                 0
#             /       \
#            1         6
#          /   \     /   \
#         2     4   7     9
#         |     |   |
#         3     5   8
#
# Down, an inner node (neither root nor leaf) does k + 1 steps: step 0 receives
# piece 0 from its parent; step j (1 <= j < k) sends piece j-1 to its children
# while it receives piece j; step k sends piece k-1. So a node forwards piece i
# while piece i+1 arrives, and the last leaf holds the last piece after
# D + k - 1 rounds, each moving n/k elements, instead of D rounds each moving n
# (a binomial tree's log2 P rounds of n). The root sends piece j in its step j;
# a leaf receives all k pieces in one step (copy receives straight into its
# buffer, posted at once).
#
# Up is the mirror: a leaf sends piece j in its step j; an inner node's step j
# reduce-receives piece j from its children while it sends its finished piece
# j-1 to its parent; the root reduce-receives piece j in its step j. One piece
# per step keeps the scratch the executor needs for reduce receives at 2n/k.
#
# A binary tree's inner node sends each piece twice (to two children), so per
# round its out-link carries 2n/k: the pipeline wins when D + k - 1 rounds of
# 2n/k beat a binomial tree's log2 P rounds of n, i.e. large buffers on
# deeper trees. With D = 1 (P <= 3) there is nothing to pipeline across, and
# piece_count gives one piece (the executor still splits it into segments).
#
# The other collectives, on the same tree rooted at rank 0:
#   allreduce      -- pipelined reduce to rank 0, then pipelined broadcast from it:
#                     every rank ends with rank 0's bits.
#   reduce_scatter -- pipelined reduce to rank 0, then rank 0 sends block r to rank r
#                     in one step.
#   allgather      -- every rank sends block r to rank 0 in one step (rank 0 copies
#                     them in, disjoint), then pipelined broadcast from rank 0.
from __future__ import annotations

import functools
import math
from collections.abc import Callable

from .schedule import Recv, Schedule, Send, Step, even_blocks

__all__ = [
    "PIECE_ELEMS",
    "MAX_PIECES",
    "depth",
    "tree",
    "piece_count",
    "allreduce",
    "reduce",
    "broadcast",
    "reduce_scatter",
    "allgather",
    "BUILDERS",
]

#: Elements one piece is worth at least: a piece smaller than one link latency's worth of bytes
#: (alpha / beta: ~30 KB inside a node, ~55 KB across on the default links) costs more latency than
#: it saves, and 16384 float32 elements are 64 KiB.
PIECE_ELEMS = 16384
#: At most this many pieces: each piece is a step (a Python-level loop iteration) on every rank.
MAX_PIECES = 64

_Steps = list[list[Step]]
_Piece = tuple[int, int]


def depth(nranks: int) -> int:
    """Edges from the root to the deepest leaf of the tree of ``nranks`` ranks (0 for one): floor(log2 P)."""
    return max(nranks, 1).bit_length() - 1


@functools.lru_cache(maxsize=64)
def tree(nranks: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The preorder binary tree over vranks 0..P-1: (parent of each vrank, -1 for the root; children of each).

    Example::

        tree(4)   # ((-1, 0, 1, 0), ((1, 3), (2,), (), ()))
    """
    parent = [-1] * nranks
    kids: list[tuple[int, ...]] = [()] * nranks
    todo = [(0, nranks)] if nranks else []
    while todo:
        v, end = todo.pop()
        rest = end - v - 1
        if rest <= 0:
            continue
        mid = v + 1 + (rest + 1) // 2  # first child's subtree is [v + 1, mid), the second's [mid, end)
        kids[v] = (v + 1, mid) if mid < end else (v + 1,)
        for c, stop in zip(kids[v], (mid, end)):
            parent[c] = v
            todo.append((c, stop))
    return tuple(parent), tuple(kids)


def piece_count(nranks: int, nelems: int) -> int:
    """The number of pieces the pipeline cuts ``nelems`` elements into on ``nranks`` ranks.

    The rule: ``round(sqrt((D - 1) * nelems / PIECE_ELEMS))`` with D = :func:`depth`,
    at least 1, at most ``MAX_PIECES`` and at most ``nelems // PIECE_ELEMS``
    (so a piece holds at least ``PIECE_ELEMS`` elements). The square root is
    where ``(D + k - 1) * (alpha + beta * n / k)`` is least when a piece of
    ``PIECE_ELEMS`` elements costs about one latency; with D = 1 (P <= 3)
    there is no inner node to pipeline through, so one piece.

    Example::

        piece_count(8, 1 << 22)    # D = 3: 23 pieces of about 182K elements
        piece_count(3, 1 << 22)    # 1
        piece_count(8, 1000)       # 1
    """
    d = depth(nranks)
    if d <= 1 or nelems < 2 * PIECE_ELEMS:
        return 1
    k = round(math.sqrt((d - 1) * nelems / PIECE_ELEMS))
    return max(1, min(MAX_PIECES, nelems // PIECE_ELEMS, k))


def _empty(nranks: int) -> _Steps:
    return [[] for _ in range(nranks)]


def _schedule(collective: str, nelems: int, root: int, blocks: tuple[int, ...], steps: _Steps) -> Schedule:
    return Schedule(collective, "pipeline", len(steps), nelems, root, blocks, tuple(tuple(s) for s in steps))


def _pieces(nranks: int, nelems: int, pieces: int | None) -> list[_Piece]:
    """The (start, stop) of each piece: ``pieces`` of them (at most one per element), else :func:`piece_count`'s."""
    k = piece_count(nranks, nelems) if pieces is None else min(pieces, nelems)
    offs = even_blocks(nelems, k)
    return [(offs[i], offs[i + 1]) for i in range(k)]


def _down(steps: _Steps, root: int, pieces: list[_Piece]) -> None:
    """Append a pipelined broadcast of ``pieces`` from ``root`` (see the comment at the top)."""
    P, k = len(steps), len(pieces)
    parents, children = tree(P)
    for v in range(P):
        me = (v + root) % P
        kids = [(c + root) % P for c in children[v]]
        if v == 0:
            for a, b in pieces:
                steps[me].append(Step(sends=tuple(Send(c, a, b) for c in kids)))
            continue
        par = (parents[v] + root) % P
        if not kids:  # a leaf: every piece lands in its place; nothing to forward
            steps[me].append(Step(recvs=tuple(Recv(par, a, b) for a, b in pieces)))
            continue
        for j in range(k + 1):
            sends = tuple(Send(c, *pieces[j - 1]) for c in kids) if j else ()
            recvs = (Recv(par, *pieces[j]),) if j < k else ()
            steps[me].append(Step(sends, recvs))


def _up(steps: _Steps, root: int, pieces: list[_Piece]) -> None:
    """Append a pipelined reduce of ``pieces`` to ``root`` (see the comment at the top)."""
    P, k = len(steps), len(pieces)
    parents, children = tree(P)
    for v in range(P):
        me = (v + root) % P
        kids = [(c + root) % P for c in children[v]]
        par = None if v == 0 else (parents[v] + root) % P
        if par is not None and not kids:
            for a, b in pieces:
                steps[me].append(Step(sends=(Send(par, a, b),)))
            continue
        last = k if par is not None else k - 1  # the root has no finished piece to pass on
        for j in range(last + 1):
            sends = (Send(par, *pieces[j - 1]),) if j and par is not None else ()
            recvs = tuple(Recv(c, *pieces[j], reduce=True) for c in kids) if j < k else ()
            steps[me].append(Step(sends, recvs))


def reduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...], pieces: int | None = None) -> Schedule:
    """Pipelined binary-tree reduce of the whole buffer to ``root``; D + k - 1 rounds of n/k.

    Arguments are validated by :func:`topologies.build`; ``pieces`` fixes k
    (None: :func:`piece_count`).
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:  # nothing to move
        return _schedule("reduce", nelems, root, blocks, steps)
    _up(steps, root, _pieces(nranks, nelems, pieces))
    return _schedule("reduce", nelems, root, blocks, steps)


def broadcast(nranks: int, nelems: int, root: int, blocks: tuple[int, ...], pieces: int | None = None) -> Schedule:
    """Pipelined binary-tree broadcast of the whole buffer from ``root``; D + k - 1 rounds of n/k."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("broadcast", nelems, root, blocks, steps)
    _down(steps, root, _pieces(nranks, nelems, pieces))
    return _schedule("broadcast", nelems, root, blocks, steps)


def allreduce(nranks: int, nelems: int, root: int, blocks: tuple[int, ...], pieces: int | None = None) -> Schedule:
    """Pipelined reduce to rank 0, then pipelined broadcast from it: 2 (D + k - 1) rounds; identical bits everywhere."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allreduce", nelems, 0, blocks, steps)
    cut = _pieces(nranks, nelems, pieces)
    _up(steps, 0, cut)
    _down(steps, 0, cut)
    return _schedule("allreduce", nelems, 0, blocks, steps)


def reduce_scatter(nranks: int, nelems: int, root: int, blocks: tuple[int, ...],
                   pieces: int | None = None) -> Schedule:
    """Pipelined reduce to rank 0, then rank 0 sends each rank its block in one step."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce_scatter", nelems, 0, blocks, steps)
    _up(steps, 0, _pieces(nranks, nelems, pieces))
    scatter = []
    for r in range(1, nranks):
        if blocks[r] < blocks[r + 1]:
            scatter.append(Send(r, blocks[r], blocks[r + 1]))
            steps[r].append(Step(recvs=(Recv(0, blocks[r], blocks[r + 1]),)))
    if scatter:
        steps[0].append(Step(sends=tuple(scatter)))
    return _schedule("reduce_scatter", nelems, 0, blocks, steps)


def allgather(nranks: int, nelems: int, root: int, blocks: tuple[int, ...], pieces: int | None = None) -> Schedule:
    """Every rank sends its block to rank 0 in one step, then pipelined broadcast of the whole buffer from rank 0."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allgather", nelems, 0, blocks, steps)
    gather = []
    for r in range(1, nranks):
        if blocks[r] < blocks[r + 1]:
            steps[r].append(Step(sends=(Send(0, blocks[r], blocks[r + 1]),)))
            gather.append(Recv(r, blocks[r], blocks[r + 1]))
    if gather:
        steps[0].append(Step(recvs=tuple(gather)))
    _down(steps, 0, _pieces(nranks, nelems, pieces))
    return _schedule("allgather", nelems, 0, blocks, steps)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks, pieces=None)``.
BUILDERS: dict[str, Callable[..., Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
}
