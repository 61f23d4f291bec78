"""Collective algorithms as data: Schedule builders (ring, tree, star), a simulator that proves them, their counts."""
from __future__ import annotations

import functools
import operator
from typing import Sequence

from . import ring, star, tree
from .schedule import (
    COLLECTIVES,
    Recv,
    Schedule,
    ScheduleError,
    ScheduleStats,
    Send,
    Step,
    even_blocks,
    expected,
    simulate,
    stats,
    verify,
)

__all__ = [
    "ALGORITHMS",
    "COLLECTIVES",
    "Recv",
    "Schedule",
    "ScheduleError",
    "ScheduleStats",
    "Send",
    "Step",
    "build",
    "even_blocks",
    "expected",
    "simulate",
    "stats",
    "verify",
]

#: The Schedule builders ``build`` knows, by name.
ALGORITHMS: tuple[str, ...] = ("ring", "tree", "star")
_BUILDERS = {"ring": ring.BUILDERS, "tree": tree.BUILDERS, "star": star.BUILDERS}
#: Collectives whose ``root`` means something; the others always build with root 0.
_ROOTED = ("reduce", "broadcast")


def build(
    algorithm: str,
    collective: str,
    nranks: int,
    nelems: int,
    root: int = 0,
    blocks: Sequence[int] | None = None,
) -> Schedule:
    """Build (or fetch from the cache) the Schedule of ``collective`` by ``algorithm``.

    Args:
        algorithm: one of ``ALGORITHMS``.
        collective: one of ``COLLECTIVES``.
        nranks: number of ranks P, >= 1.
        nelems: elements in each rank's work buffer, >= 0.
        root: root rank of reduce and broadcast, 0 <= root < P; checked but
            ignored (the schedule's root is 0) for the other collectives.
        blocks: P+1 non-decreasing offsets from 0 to ``nelems`` delimiting
            block r = [blocks[r], blocks[r+1]); blocks may be empty. Defaults
            to ``even_blocks(nelems, nranks)``.

    Returns:
        The Schedule. It is immutable and cached, so equal arguments return
        the same object.

    Raises:
        ValueError: an argument is out of range; the message names the
            algorithm and the collective.

    Example::

        sched = build("ring", "allreduce", 4, 1000)
        verify(sched)
        assert stats(sched).rounds == 6
    """
    # lru_cache needs hashable arguments: a list or an array of offsets becomes a tuple.
    if blocks is not None and not isinstance(blocks, tuple):
        blocks = tuple(blocks)
    return _build(algorithm, collective, nranks, nelems, root, blocks)


@functools.lru_cache(maxsize=256)
def _build(
    algorithm: str, collective: str, nranks: int, nelems: int, root: int, blocks: tuple[int, ...] | None
) -> Schedule:
    where = f"topologies.build({algorithm!r}, {collective!r})"
    if algorithm not in _BUILDERS:
        raise ValueError(f"{where}: unknown algorithm; choose one of {ALGORITHMS}")
    if collective not in COLLECTIVES:
        raise ValueError(f"{where}: unknown collective; choose one of {tuple(COLLECTIVES)}")
    nranks, nelems, root = operator.index(nranks), operator.index(nelems), operator.index(root)
    if nranks < 1:
        raise ValueError(f"{where}: nranks must be >= 1, got {nranks}")
    if nelems < 0:
        raise ValueError(f"{where}: nelems must be >= 0, got {nelems}")
    if not 0 <= root < nranks:
        raise ValueError(f"{where}: root must be in [0, {nranks}), got {root}")
    if blocks is None:
        blocks = even_blocks(nelems, nranks)
    else:
        blocks = tuple(operator.index(b) for b in blocks)
        if (
            len(blocks) != nranks + 1
            or blocks[0] != 0
            or blocks[-1] != nelems
            or any(a > b for a, b in zip(blocks, blocks[1:]))
        ):
            raise ValueError(
                f"{where}: blocks must be {nranks + 1} non-decreasing offsets from 0 to {nelems}, got {blocks}"
            )
    return _BUILDERS[algorithm][collective](nranks, nelems, root if collective in _ROOTED else 0, blocks)
