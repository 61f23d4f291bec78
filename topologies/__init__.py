"""Collective algorithms as data: Schedule builders, a simulator that proves them, and their counts."""
from __future__ import annotations

import functools
import operator
from typing import Sequence

from . import hierarchical, pipeline, ring, star, tree
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
ALGORITHMS: tuple[str, ...] = ("ring", "tree", "star", "hierarchical", "pipeline")
_BUILDERS = {"ring": ring.BUILDERS, "tree": tree.BUILDERS, "star": star.BUILDERS, "hierarchical": hierarchical.BUILDERS,
             "pipeline": pipeline.BUILDERS}
#: Collectives whose ``root`` means something; the others always build with root 0.
_ROOTED = ("reduce", "broadcast")


def build(
    algorithm: str,
    collective: str,
    nranks: int,
    nelems: int,
    root: int = 0,
    blocks: Sequence[int] | None = None,
    nodes: Sequence[int] | None = None,
    pieces: int | None = None,
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
        nodes: node label of each rank (e.g. ``Cluster.node_of_rank``); None
            means one node. Used by "hierarchical" (its whole shape) and
            "ring" (the ring keeps a node's ranks adjacent); ignored by the
            others.
        pieces: "pipeline" only (the others ignore it): cut the buffer into
            this many pieces (at most one per element) instead of
            ``pipeline.piece_count``'s choice; tests use it to cover many
            pieces on small buffers.

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
        hier = build("hierarchical", "allreduce", 4, 1000, nodes=(0, 0, 1, 1))
        piped = build("pipeline", "broadcast", 8, 1 << 22, root=3)   # 23 pieces down a binary tree
    """
    # lru_cache needs hashable arguments: a list or an array of offsets becomes a tuple.
    if blocks is not None and not isinstance(blocks, tuple):
        blocks = tuple(blocks)
    if nodes is not None and not isinstance(nodes, tuple):
        nodes = tuple(nodes)
    if pieces is not None:
        if algorithm != "pipeline":
            pieces = None  # ignored, and left out of the cache key so the cache hits
        elif isinstance(pieces, bool) or operator.index(pieces) < 1:
            raise ValueError(f"topologies.build({algorithm!r}, {collective!r}): pieces must be an integer >= 1, "
                             f"got {pieces!r}")
        else:
            pieces = operator.index(pieces)
    return _build(algorithm, collective, nranks, nelems, root, blocks, _normalize_nodes(algorithm, nranks, nodes),
                  pieces)


@functools.lru_cache(maxsize=64)
def _normalize_nodes(algorithm: str, nranks: int, nodes: Sequence[int] | None) -> tuple[int, ...] | None:
    """Node labels renumbered 0, 1, ... by lowest rank, or None where they change nothing (so the cache hits)."""
    if nodes is None or algorithm not in ("ring", "hierarchical"):
        return None
    nodes = tuple(operator.index(n) for n in nodes)
    if len(nodes) != nranks:
        raise ValueError(f"topologies.build({algorithm!r}): nodes has {len(nodes)} entries for {nranks} ranks")
    label: dict[int, int] = {}
    nodes = tuple(label.setdefault(n, len(label)) for n in nodes)
    if len(label) == 1:
        return None  # one node: the plain schedules
    if algorithm == "ring" and ring.node_order(nodes) == tuple(range(nranks)):
        return None  # every node's ranks are consecutive: the plain ring already crosses each boundary once
    return nodes


@functools.lru_cache(maxsize=256)
def _build(
    algorithm: str,
    collective: str,
    nranks: int,
    nelems: int,
    root: int,
    blocks: tuple[int, ...] | None,
    nodes: tuple[int, ...] | None = None,
    pieces: int | None = None,
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
    builder = _BUILDERS[algorithm][collective]
    root = root if collective in _ROOTED else 0
    if algorithm == "pipeline":
        return builder(nranks, nelems, root, blocks, pieces=pieces)
    if nodes is None:
        return builder(nranks, nelems, root, blocks)
    if algorithm == "ring":
        return builder(nranks, nelems, root, blocks, order=ring.node_order(nodes))
    return builder(nranks, nelems, root, blocks, nodes=nodes)
