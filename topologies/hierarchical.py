"""Hierarchical schedules: reduce-scatter inside each node, rings across nodes, allgather inside each node."""

# Terms (the names below follow them):
#
#   node   -- a set of ranks that share fast links (one machine). ``nodes[r]`` is
#             rank r's node label; nodes are numbered 0..L-1 by their lowest
#             rank, and the ranks of node m, ascending, are its local ranks
#             0..k_m-1. K is the largest k_m.
#   lane   -- the buffer is cut into K lanes. Inside node m, lane j belongs to
#             its *owner*, local rank j mod k_m: with equal node sizes every
#             rank owns one lane; a rank of a smaller node owns several.
#   piece  -- lane j is cut further into L pieces, piece (j, c) for node
#             position c. allreduce, reduce and broadcast cut each lane evenly;
#             reduce_scatter and allgather, whose result is laid out by the
#             caller's blocks, use piece (j, c) = the block of local rank j of
#             node c (empty when node c has no local rank j).
#   holder -- the rank of node m that keeps piece (j, c) between the phases:
#             the owner of lane j, with one exception (two nodes, below).
#   lane ring -- for each lane j, the ring through the nodes in node order,
#             0 -> 1 -> ... -> L-1 -> 0; node c's piece (j, p) leaves from its
#             holder there and lands on its holder on the next node. Its chunks
#             are the pieces (j, 0..L-1), so it is exactly a ring reduce-scatter
#             or allgather pass over L positions, and the lane rings run side by
#             side: step s of every lane ring is one step.
#   two nodes -- the ring 0 -> 1 -> 0 would make each pair of lane owners send
#             to each other at once, and a TCP link shared both ways by one pair
#             of MPI ranks ran at half speed in the emulated cluster. So node 0
#             holds piece (j, 1) on its next local rank: in every lane-ring step
#             rank a -> b never meets b -> a (with two or more ranks on node 0).
#
#   2 nodes x 2 ranks (ranks 0,1 on node 0, ranks 2,3 on node 1; lanes a, b;
#   "a1" is piece (a, 1)). Holders: rank 0 {a0, b1}, rank 1 {b0, a1}, rank 2
#   {a0, a1}, rank 3 {b0, b1}. Each lane-ring step sends around one 4-cycle:
#
#        node 0        node 1
#       [rank 0] --b1--> [rank 3]
#          ^                |
#          a0               b0
#          |                v
#       [rank 2] <--a1-- [rank 1]      (rank 2 is on node 1, rank 1 on node 0)
#
# allreduce = (1) intra reduce-scatter: every rank sends each piece it does not
# hold to its holder, which reduces the node's contributions in local-rank
# order; (2) each lane ring does a reduce-scatter pass then an allgather pass
# over the nodes; (3) intra allgather: every holder sends its pieces to the
# other ranks of its node. Each element is reduced along one fixed path and
# then only copied, so every rank ends with the same bits, whatever the timing.
#
# Bytes that cross nodes: each node sends 2(L-1)/L n in all, against
# 2(P-1)/P n on each node-boundary link of the flat ring: with 2 nodes of 2
# ranks, n against 1.5 n; 2 nodes of 4 ranks, n against 1.75 n. Inside a node
# the exchanges are direct (one step, every rank to every other), because
# intra-node links are fast and the step count, not the bytes, dominates there.
#
# reduce = (1), the lane rings' reduce-scatter pass, then node c's holder of
# each piece (j, c), now whole, sends it to the root. broadcast is the mirror:
# the root sends piece (j, c) to its holder on node c, the lane rings' allgather
# pass, then (3) (skipping the root, which has everything). reduce_scatter and
# allgather are (1)+(2 RS) and (2 AG)+(3) with the caller's blocks as pieces,
# so the holder of piece (j, c) on node c is the rank whose block it is.
#
# Edge cases: one rank or no elements give no steps; one node is (1)+(3) only
# (a direct reduce-scatter/allgather), every rank its own node is the flat ring;
# empty pieces (fewer elements than lanes x nodes, empty blocks) are skipped on
# both ends alike, so channels stay matched.
from __future__ import annotations

from collections.abc import Callable, Sequence

from .schedule import Recv, Schedule, Send, Step, even_blocks

__all__ = ["allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "layout", "BUILDERS"]

_Steps = list[list[Step]]
#: pieces[j][c] = (start, stop) of piece (j, c).
_Pieces = list[list[tuple[int, int]]]


class _Layout:
    """Nodes as lists of ranks, lane owners and piece holders; see the comment at the top."""

    def __init__(self, nranks: int, nodes: Sequence[int] | None) -> None:
        self.node_ranks: list[list[int]] = layout(nranks, nodes)
        self.L = len(self.node_ranks)
        self.K = max(len(m) for m in self.node_ranks)

    def owner(self, lane: int, node: int) -> int:
        ranks = self.node_ranks[node]
        return ranks[lane % len(ranks)]

    def holder(self, lane: int, piece: int, node: int) -> int:
        """The rank of ``node`` that holds piece (lane, piece) between the intra and the inter phases.

        The lane owner, except with two nodes: node 0 keeps piece (j, 1) on its
        next local rank, so that in every lane-ring step each pair of ranks
        talks one way only (see "two nodes" at the top).
        """
        if self.L == 2 and node == 0 and piece == 1:
            return self.owner(lane + 1, 0)
        return self.owner(lane, node)


def layout(nranks: int, nodes: Sequence[int] | None) -> list[list[int]]:
    """The ranks of each node, ascending, nodes ordered by their lowest rank; ``None`` is one node.

    Example::

        layout(4, (7, 3, 7, 3))   # [[0, 2], [1, 3]]
    """
    if nodes is None:
        return [list(range(nranks))]
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(nodes):
        groups.setdefault(n, []).append(r)
    return list(groups.values())


def _empty(nranks: int) -> _Steps:
    return [[] for _ in range(nranks)]


def _schedule(collective: str, nelems: int, root: int, blocks: tuple[int, ...], steps: _Steps) -> Schedule:
    return Schedule(collective, "hierarchical", len(steps), nelems, root, blocks, tuple(tuple(s) for s in steps))


def _append(steps: _Steps, sends: dict[int, list[Send]], recvs: dict[int, list[Recv]]) -> None:
    """Append one step to every rank that has something to send or receive."""
    for r in range(len(steps)):
        s, v = sends.get(r, ()), recvs.get(r, ())
        if s or v:
            steps[r].append(Step(tuple(s), tuple(v)))


def _even_pieces(nelems: int, lay: _Layout) -> _Pieces:
    lanes = even_blocks(nelems, lay.K)
    pieces = []
    for j in range(lay.K):
        cut = even_blocks(lanes[j + 1] - lanes[j], lay.L)
        pieces.append([(lanes[j] + cut[c], lanes[j] + cut[c + 1]) for c in range(lay.L)])
    return pieces


def _block_pieces(blocks: tuple[int, ...], lay: _Layout) -> _Pieces:
    pieces = []
    for j in range(lay.K):
        row = []
        for ranks in lay.node_ranks:
            r = ranks[j] if j < len(ranks) else None
            row.append((blocks[r], blocks[r + 1]) if r is not None else (0, 0))
        pieces.append(row)
    return pieces


def _intra_reduce_scatter(steps: _Steps, lay: _Layout, pieces: _Pieces) -> None:
    """Every rank sends each piece it does not hold to the piece's holder in its node, which reduces it.

    The holder lists its receives in local-rank order, so the node's partial sum
    of a piece is always (own + next + ...) in that order.
    """
    sends: dict[int, list[Send]] = {}
    recvs: dict[int, list[Recv]] = {}
    for m, ranks in enumerate(lay.node_ranks):
        for r in ranks:  # ascending local rank: the holder's reduction order
            for j in range(lay.K):
                for c, (a, b) in enumerate(pieces[j]):
                    h = lay.holder(j, c, m)
                    if h != r and a < b:
                        sends.setdefault(r, []).append(Send(h, a, b))
                        recvs.setdefault(h, []).append(Recv(r, a, b, reduce=True))
    _append(steps, sends, recvs)


def _intra_allgather(steps: _Steps, lay: _Layout, pieces: _Pieces, skip: int | None = None) -> None:
    """Every holder sends its pieces to the other ranks of its node (except ``skip``), which copy them."""
    sends: dict[int, list[Send]] = {}
    recvs: dict[int, list[Recv]] = {}
    for m, ranks in enumerate(lay.node_ranks):
        for j in range(lay.K):
            for c, (a, b) in enumerate(pieces[j]):
                h = lay.holder(j, c, m)
                for r in ranks:
                    if r != h and r != skip and a < b:
                        sends.setdefault(h, []).append(Send(r, a, b))
                        recvs.setdefault(r, []).append(Recv(h, a, b))
    _append(steps, sends, recvs)


def _lane_rings(steps: _Steps, lay: _Layout, pieces: _Pieces, first: int, reduce: bool) -> None:
    """One ring pass (L-1 steps) over the nodes in every lane at once; see ``ring._pass`` for first/chunks.

    In step s node position c sends piece (j, first + c - s) to position c + 1,
    from its holder there to the holder on the next node, which receives it
    (and sends it on in step s + 1). Each message's send and receive are listed
    together, in lane order, so a pair of ranks carrying several lanes matches
    them in the same order on both ends.
    """
    L = lay.L
    for s in range(L - 1):
        sends: dict[int, list[Send]] = {}
        recvs: dict[int, list[Recv]] = {}
        for j in range(lay.K):
            for c in range(L):
                p = (first + c - s) % L
                a, b = pieces[j][p]
                if a < b:
                    src, dst = lay.holder(j, p, c), lay.holder(j, p, (c + 1) % L)
                    sends.setdefault(src, []).append(Send(dst, a, b))
                    recvs.setdefault(dst, []).append(Recv(src, a, b, reduce))
        _append(steps, sends, recvs)


def _root_exchange(steps: _Steps, lay: _Layout, pieces: _Pieces, root: int, to_root: bool) -> None:
    """Piece (j, c) between its holder on node c and the root: to the root after the lane rings' reduce-scatter
    pass (first=-1, node c then holds it whole), or from the root before their allgather pass (first=0)."""
    sends: dict[int, list[Send]] = {}
    recvs: dict[int, list[Recv]] = {}
    for j in range(lay.K):
        for c in range(lay.L):
            h = lay.holder(j, c, c)
            a, b = pieces[j][c]
            if h != root and a < b:
                src, dst = (h, root) if to_root else (root, h)
                sends.setdefault(src, []).append(Send(dst, a, b))
                recvs.setdefault(dst, []).append(Recv(src, a, b))
    _append(steps, sends, recvs)


def allreduce(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], nodes: Sequence[int] | None = None
) -> Schedule:
    """Intra-node reduce-scatter, lane-ring allreduce across nodes, intra-node allgather.

    Args:
        nranks, nelems, root, blocks: as for :func:`topologies.build`, which validates them.
        nodes: node label of each rank; None is one node.

    Example::

        verify(allreduce(4, 100, 0, even_blocks(100, 4), nodes=(0, 0, 1, 1)))
    """
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:  # nothing to move
        return _schedule("allreduce", nelems, 0, blocks, steps)
    lay = _Layout(nranks, nodes)
    pieces = _even_pieces(nelems, lay)
    _intra_reduce_scatter(steps, lay, pieces)
    _lane_rings(steps, lay, pieces, first=-1, reduce=True)
    _lane_rings(steps, lay, pieces, first=0, reduce=False)
    _intra_allgather(steps, lay, pieces)
    return _schedule("allreduce", nelems, 0, blocks, steps)


def reduce(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], nodes: Sequence[int] | None = None
) -> Schedule:
    """Intra-node reduce-scatter, lane-ring reduce-scatter across nodes, then every piece to ``root``."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce", nelems, root, blocks, steps)
    lay = _Layout(nranks, nodes)
    pieces = _even_pieces(nelems, lay)
    _intra_reduce_scatter(steps, lay, pieces)
    _lane_rings(steps, lay, pieces, first=-1, reduce=True)
    _root_exchange(steps, lay, pieces, root, to_root=True)
    return _schedule("reduce", nelems, root, blocks, steps)


def broadcast(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], nodes: Sequence[int] | None = None
) -> Schedule:
    """``root`` scatters the pieces to their lane owners, lane-ring allgather across nodes, intra-node allgather."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("broadcast", nelems, root, blocks, steps)
    lay = _Layout(nranks, nodes)
    pieces = _even_pieces(nelems, lay)
    _root_exchange(steps, lay, pieces, root, to_root=False)
    _lane_rings(steps, lay, pieces, first=0, reduce=False)
    _intra_allgather(steps, lay, pieces, skip=root)
    return _schedule("broadcast", nelems, root, blocks, steps)


def reduce_scatter(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], nodes: Sequence[int] | None = None
) -> Schedule:
    """Intra-node reduce-scatter by lane, then lane-ring reduce-scatter: rank r ends with its block reduced."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("reduce_scatter", nelems, 0, blocks, steps)
    lay = _Layout(nranks, nodes)
    pieces = _block_pieces(blocks, lay)
    _intra_reduce_scatter(steps, lay, pieces)
    _lane_rings(steps, lay, pieces, first=-1, reduce=True)
    return _schedule("reduce_scatter", nelems, 0, blocks, steps)


def allgather(
    nranks: int, nelems: int, root: int, blocks: tuple[int, ...], nodes: Sequence[int] | None = None
) -> Schedule:
    """Lane-ring allgather of the blocks across nodes, then intra-node allgather by lane."""
    steps = _empty(nranks)
    if nranks == 1 or nelems == 0:
        return _schedule("allgather", nelems, 0, blocks, steps)
    lay = _Layout(nranks, nodes)
    pieces = _block_pieces(blocks, lay)
    _lane_rings(steps, lay, pieces, first=0, reduce=False)
    _intra_allgather(steps, lay, pieces)
    return _schedule("allgather", nelems, 0, blocks, steps)


#: Collective -> builder, each called as ``builder(nranks, nelems, root, blocks, nodes=None)``.
BUILDERS: dict[str, Callable[..., Schedule]] = {
    "allreduce": allreduce,
    "reduce": reduce,
    "broadcast": broadcast,
    "reduce_scatter": reduce_scatter,
    "allgather": allgather,
}
