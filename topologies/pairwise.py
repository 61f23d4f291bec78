"""Pairwise-exchange alltoall(v): in step k every rank sends to the rank k ahead and receives from the rank k behind."""

# Terms (the names below follow them):
#
#   counts -- counts[i][j] elements go from rank i to rank j (alltoallv: any
#             non-negative matrix; alltoall: all equal).
#   send displacement -- rank i's input holds its blocks for ranks 0..P-1 in
#             order; the block for j starts at send[i][j].
#   recv displacement -- rank j's output holds the blocks from ranks 0..P-1 in
#             order; the block from i starts at recv[j][i].
#   step k -- k = 1..P-1: rank r sends its block for dest = (r + k) mod P and
#             receives the block from src = (r - k) mod P. Every rank talks to
#             one rank each way per step, and over the P-1 steps to every
#             other rank exactly once, so each rank sends (P-1)/P of its input.
#
#   P = 4, step 1:  0 -> 1 -> 2 -> 3 -> 0   step 2:  0 <-> 2, 1 <-> 3   step 3:  0 -> 3 -> 2 -> 1 -> 0
#
# A rank's own block (counts[r][r]) never travels: a local copy from input to
# output in its first step. Edge cases: one rank is that copy alone; no
# elements at all is no steps; an empty block is skipped by both ends (the
# sender's block for dest has the same count the receiver expects from src),
# and a step left empty is dropped, so channels stay matched.
from __future__ import annotations

from collections.abc import Callable

from .schedule import INPUT, OUTPUT, Copy, Recv, Schedule, Send, Step, alltoall_displacements

__all__ = ["alltoall", "BUILDERS"]


def alltoall(nranks: int, nelems: int, root: int, blocks: tuple[int, ...],
             counts: tuple[tuple[int, ...], ...]) -> Schedule:
    """Pairwise-exchange alltoall(v): P-1 steps, one send and one receive each.

    Args:
        nranks: P.
        nelems: the sum of ``counts``.
        root: unused (0).
        blocks: offsets of the ranks' inputs in the concatenation of all
            inputs (running sums of the rows of ``counts``).
        counts: the P x P matrix of elements from rank i to rank j.

    Arguments are validated by :func:`topologies.build`.
    """
    P = nranks
    send, recv = alltoall_displacements(counts)
    steps: list[list[Step]] = [[] for _ in range(P)]
    if nelems:
        for r in range(P):
            own = counts[r][r]
            copies = (Copy(INPUT, send[r][r], send[r][r] + own, OUTPUT, recv[r][r]),) if own else ()
            for k in range(1, P):
                dest, src = (r + k) % P, (r - k) % P
                sends = (Send(dest, send[r][dest], send[r][dest + 1], INPUT),) if counts[r][dest] else ()
                recvs = (Recv(src, recv[r][src], recv[r][src + 1], buf=OUTPUT),) if counts[src][r] else ()
                if sends or recvs:
                    steps[r].append(Step(sends, recvs, copies))
                    copies = ()
            if copies:  # nothing to exchange: the copy is the whole job
                steps[r].append(Step(copies=copies))
    extents = {INPUT: tuple(send[r][P] for r in range(P)), OUTPUT: tuple(recv[r][P] for r in range(P))}
    return Schedule("alltoall", "pairwise", P, nelems, 0, blocks, tuple(tuple(s) for s in steps), counts, extents)


#: Collective -> builder, called as ``builder(nranks, nelems, root, blocks, counts)``.
BUILDERS: dict[str, Callable[..., Schedule]] = {"alltoall": alltoall}
