"""Bruck's alltoall(v) for small messages: ceil(log2 P) steps, each moving about half the blocks by a power of two."""

# Terms (the names below follow them):
#
#   counts -- counts[i][j] elements go from rank i to rank j; send/recv
#             displacements as in pairwise.py (input by destination, output
#             by source, both in rank order).
#   slot   -- rank r thinks of its blocks by distance: slot i is the block for
#             rank (r + i) mod P. Bruck's first local rotation puts slot i at
#             position i; here it is done by addressing (a slot is read from
#             wherever it lies, the input at first), not by a copy.
#   step k -- k = 0..K-1, K = ceil(log2 P): rank r sends every slot i with bit k
#             set to rank (r + 2^k) mod P, and receives the same slot indices
#             from rank (r - 2^k) mod P. After steps 0..k-1, slot i on rank r
#             holds the block from src = r - (i mod 2^k) to src + i; after the
#             last step, the block from r - i to r itself.
#   pack   -- the slots of one step go as one message: copied one after another
#             into the stage area of the temp buffer, unless they already lie
#             back to back in one buffer (then they are sent from there).
#   recv area k -- the slots received in step k land, packed, in their own
#             region of the temp buffer and stay there until a later step sends
#             them on or the end: no unpacking copies.
#   final rotation -- a last local step copies slot i to the output at the
#             block of rank (r - i) mod P. A slot received alone in its last
#             step (and slot 0, the rank's own block, from the input) goes
#             straight to the output instead.
#
#   P = 5, slots 1..4 of every rank; step 0 sends slots {1, 3} one rank on,
#   step 1 slots {2, 3} two ranks on, step 2 slot {4} four ranks on.
#
# Each step sends about half the data, K n/2 in all against (P-1) n/P for
# pairwise: fewer, larger messages, which wins while latency dominates.
# Uneven counts make a slot's size change from step to step (it holds another
# rank's block after each move); sizes are worked out per rank and step, and
# both ends agree on them because they name the same block. Edge cases: one
# rank is the own-block copy alone; no elements at all is no steps; empty
# slots are skipped, and a step whose message is empty both ways is dropped on
# both ends.
from __future__ import annotations

from collections.abc import Callable

from .schedule import INPUT, OUTPUT, TEMP, Copy, Recv, Schedule, Send, Step, alltoall_displacements

__all__ = ["alltoall", "BUILDERS"]


def _size(counts: tuple[tuple[int, ...], ...], r: int, i: int, k: int) -> int:
    """Elements in slot i on rank r before step k: the block from r - (i mod 2^k) to that rank + i."""
    P = len(counts)
    src = (r - (i & ((1 << k) - 1))) % P
    return counts[src][(src + i) % P]


def alltoall(nranks: int, nelems: int, root: int, blocks: tuple[int, ...],
             counts: tuple[tuple[int, ...], ...]) -> Schedule:
    """Bruck's alltoall(v): ceil(log2 P) steps of one message each way, then the final rotation (local).

    Args:
        nranks: P.
        nelems: the sum of ``counts``.
        root: unused (0).
        blocks: offsets of the ranks' inputs in the concatenation of all inputs.
        counts: the P x P matrix of elements from rank i to rank j.

    Arguments are validated by :func:`topologies.build`.
    """
    P = nranks
    K = (P - 1).bit_length()
    send, recv = alltoall_displacements(counts)
    steps: list[list[Step]] = [[] for _ in range(P)]
    temp = [0] * P
    for r in range(P):
        if not nelems:
            break
        # What arrives in each step (slot, size), non-empty only; the recv areas come first in temp, the stage last.
        arriving = []
        for k in range(K):
            bit = 1 << k
            arriving.append([(i, n) for i in range(bit, P) if i & bit and (n := _size(counts, (r - bit) % P, i, k))])
        direct = [len(a) == 1 and a[0][0] < 2 << k for k, a in enumerate(arriving)]  # one slot, in its last move
        area = [0 if direct[k] else sum(n for _, n in a) for k, a in enumerate(arriving)]
        stage = sum(area)
        where: dict[int, tuple[str, int]] = {i: (INPUT, send[r][(r + i) % P]) for i in range(1, P)}
        final: set[int] = set()  # slots already in the output
        own = counts[r][r]
        copies = [Copy(INPUT, send[r][r], send[r][r] + own, OUTPUT, recv[r][r])] if own else []
        packed = 0
        base = 0
        for k in range(K):
            bit, dest, src = 1 << k, (r + (1 << k)) % P, (r - (1 << k)) % P
            out = [(i, n) for i in range(bit, P) if i & bit and (n := _size(counts, r, i, k))]
            sends: tuple[Send, ...] = ()
            if out:
                total = sum(n for _, n in out)
                buf0, off0 = where[out[0][0]]
                if all(where[i] == (buf0, o) for (i, _), o in zip(out, _running(off0, [n for _, n in out]))):
                    sends = (Send(dest, off0, off0 + total, buf0),)  # already back to back: no packing
                else:
                    for (i, n), o in zip(out, _running(stage, [n for _, n in out])):
                        b, at = where[i]
                        copies.append(Copy(b, at, at + n, TEMP, o))
                    packed = max(packed, total)
                    sends = (Send(dest, stage, stage + total, TEMP),)
            recvs: tuple[Recv, ...] = ()
            if direct[k]:
                i, n = arriving[k][0]
                recvs = (Recv(src, recv[r][(r - i) % P], recv[r][(r - i) % P] + n, buf=OUTPUT),)
                final.add(i)
            elif arriving[k]:
                recvs = (Recv(src, base, base + area[k], buf=TEMP),)
                for (i, _), o in zip(arriving[k], _running(base, [n for _, n in arriving[k]])):
                    where[i] = (TEMP, o)
            base += area[k]
            if sends or recvs or copies:
                steps[r].append(Step(sends, recvs, tuple(copies)))
                copies = []
        # The final rotation: slot i (i >= 1) now holds the block from rank r - i.
        for i in range(1, P):
            n = _size(counts, r, i, K)
            if n and i not in final:
                b, at = where[i]
                copies.append(Copy(b, at, at + n, OUTPUT, recv[r][(r - i) % P]))
        if copies:
            steps[r].append(Step(copies=tuple(copies)))
        temp[r] = stage + packed
    extents = {INPUT: tuple(send[r][P] for r in range(P)), OUTPUT: tuple(recv[r][P] for r in range(P)),
               TEMP: tuple(temp)}
    return Schedule("alltoall", "bruck", P, nelems, 0, blocks, tuple(tuple(s) for s in steps), counts, extents)


def _running(start: int, sizes: list[int]) -> list[int]:
    """Offsets ``start, start + sizes[0], ...``, one per size."""
    out = []
    for n in sizes:
        out.append(start)
        start += n
    return out


#: Collective -> builder, called as ``builder(nranks, nelems, root, blocks, counts)``.
BUILDERS: dict[str, Callable[..., Schedule]] = {"alltoall": alltoall}
