"""Collective algorithms as data: Schedule builders, a simulator that proves them, and their counts."""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence

from . import bruck, hierarchical, pairwise, pipeline, ring, star, tree
from .schedule import (
    BUFFERS,
    COLLECTIVES,
    IN_OUT_COLLECTIVES,
    Copy,
    Recv,
    Schedule,
    ScheduleError,
    ScheduleStats,
    Send,
    Step,
    alltoall_displacements,
    even_blocks,
    even_counts,
    expected,
    offsets,
    simulate,
    stats,
    verify,
)

__all__ = [
    "ALGORITHMS",
    "ALL_COLLECTIVES",
    "BUFFERS",
    "COLLECTIVES",
    "ALGORITHMS_BY_COLLECTIVE",
    "IN_OUT_COLLECTIVES",
    "Copy",
    "Recv",
    "Schedule",
    "ScheduleError",
    "ScheduleStats",
    "Send",
    "Step",
    "alltoall_displacements",
    "build",
    "even_blocks",
    "even_counts",
    "expected",
    "offsets",
    "simulate",
    "stats",
    "verify",
]

#: The Schedule builders of every collective of ``COLLECTIVES``, by name.
ALGORITHMS: tuple[str, ...] = ("ring", "tree", "star", "hierarchical", "pipeline")
_BUILDERS: dict[str, Mapping[str, Callable[..., Schedule]]] = {
    "ring": ring.BUILDERS, "tree": tree.BUILDERS, "star": star.BUILDERS, "hierarchical": hierarchical.BUILDERS,
    "pipeline": pipeline.BUILDERS, "pairwise": pairwise.BUILDERS, "bruck": bruck.BUILDERS}
#: Every collective a Schedule can express: ``COLLECTIVES`` (one work buffer) and ``IN_OUT_COLLECTIVES``.
ALL_COLLECTIVES: dict[str, tuple[str, str]] = {**COLLECTIVES, **IN_OUT_COLLECTIVES}
#: Collective -> the Schedule algorithms that build it (the one table; "native", MPI's own, is not a Schedule).
#:
#: ============== ==========================================================================
#: allreduce ...  ring, tree, star, hierarchical, pipeline (every collective of COLLECTIVES)
#: alltoall       pairwise (P-1 steps, large messages), bruck (ceil(log2 P) steps, small ones)
#: gather         tree (binomial, any root)
#: scatter        tree (binomial, any root)
#: allgatherv     ring (uneven and empty blocks)
#: ============== ==========================================================================
ALGORITHMS_BY_COLLECTIVE: dict[str, tuple[str, ...]] = {
    **{c: ALGORITHMS for c in COLLECTIVES},
    "alltoall": ("pairwise", "bruck"),
    "gather": ("tree",),
    "scatter": ("tree",),
    "allgatherv": ("ring",),
}
#: Collectives whose ``root`` means something; the others always build with root 0.
_ROOTED = ("reduce", "broadcast", "gather", "scatter")


def build(
    algorithm: str,
    collective: str,
    nranks: int,
    nelems: int,
    root: int = 0,
    blocks: Sequence[int] | None = None,
    nodes: Sequence[int] | None = None,
    pieces: int | None = None,
    counts: Sequence[Sequence[int]] | Sequence[int] | None = None,
) -> Schedule:
    """Build (or fetch from the cache) the Schedule of ``collective`` by ``algorithm``.

    Args:
        algorithm: one of ``ALGORITHMS_BY_COLLECTIVE[collective]``.
        collective: one of ``ALL_COLLECTIVES``.
        nranks: number of ranks P, >= 1.
        nelems: elements in each rank's work buffer, >= 0. For
            ``IN_OUT_COLLECTIVES``: the elements of all ranks' inputs together
            (gather's and allgatherv's output, scatter's input at the root, the
            sum of alltoall's counts).
        root: root rank of reduce, broadcast, gather and scatter,
            0 <= root < P; checked but ignored (the schedule's root is 0) for
            the other collectives.
        blocks: P+1 non-decreasing offsets from 0 to ``nelems`` delimiting
            block r = [blocks[r], blocks[r+1]); blocks may be empty. Defaults
            to ``even_blocks(nelems, nranks)``. For gather, scatter and
            allgatherv block r is rank r's part; for alltoall rank r's input,
            cut evenly (``even_blocks``) among the destinations unless
            ``counts`` says otherwise.
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
        a2a = build("bruck", "alltoall", 3, 9, counts=[[1, 2, 0], [3, 0, 1], [0, 0, 2]])
        g = build("tree", "gather", 4, 10, root=2, counts=[4, 0, 3, 3])
    """
    # lru_cache needs hashable arguments: a list or an array of offsets becomes a tuple.
    if blocks is not None and not isinstance(blocks, tuple):
        blocks = tuple(blocks)
    if nodes is not None and not isinstance(nodes, tuple):
        nodes = tuple(nodes)
    if counts is not None:
        counts = _normalize_counts(algorithm, collective, nranks, nelems, blocks, counts)
        if collective == "alltoall":
            blocks = offsets([sum(row) for row in counts])
        else:
            blocks, counts = offsets(counts), None  # type: ignore[arg-type]
    if pieces is not None:
        if algorithm != "pipeline":
            pieces = None  # ignored, and left out of the cache key so the cache hits
        elif isinstance(pieces, bool) or operator.index(pieces) < 1:
            raise ValueError(f"topologies.build({algorithm!r}, {collective!r}): pieces must be an integer >= 1, "
                             f"got {pieces!r}")
        else:
            pieces = operator.index(pieces)
    return _build(algorithm, collective, nranks, nelems, root, blocks, _normalize_nodes(algorithm, nranks, nodes),
                  pieces, counts)


def _normalize_counts(algorithm: str, collective: str, nranks: int, nelems: int, blocks: tuple[int, ...] | None,
                      counts: Sequence[Sequence[int]] | Sequence[int]) -> tuple:
    """``counts`` as a tuple (of tuples), checked against the collective, ``nranks``, ``nelems`` and ``blocks``."""
    where = f"topologies.build({algorithm!r}, {collective!r})"
    P = operator.index(nranks)
    try:
        if collective == "alltoall":
            out: tuple = tuple(tuple(operator.index(c) for c in row) for row in counts)  # type: ignore[union-attr]
            flat = [c for row in out for c in row]
            shape_ok = len(out) == P and all(len(row) == P for row in out)
        elif collective in ("gather", "scatter", "allgatherv"):
            out = tuple(operator.index(c) for c in counts)  # type: ignore[arg-type]
            flat = list(out)
            shape_ok = len(out) == P
        else:
            raise ValueError(f"{where}: counts is for alltoall, gather, scatter and allgatherv only")
    except TypeError:
        raise ValueError(f"{where}: counts must be integers, got {counts!r}") from None
    if not shape_ok:
        want = f"{P} x {P}" if collective == "alltoall" else f"{P}"
        raise ValueError(f"{where}: counts must be {want} for {P} ranks, got {counts!r}")
    if any(c < 0 for c in flat):
        raise ValueError(f"{where}: counts must be >= 0, got {counts!r}")
    if sum(flat) != nelems:
        raise ValueError(f"{where}: counts sum to {sum(flat)}, but nelems is {nelems}")
    if blocks is not None:
        rows = offsets([sum(row) for row in out]) if collective == "alltoall" else offsets(out)
        if tuple(blocks) != rows:
            raise ValueError(f"{where}: blocks {tuple(blocks)} disagree with counts (which give {rows}); pass one")
    return out


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
    counts: tuple[tuple[int, ...], ...] | None = None,
) -> Schedule:
    where = f"topologies.build({algorithm!r}, {collective!r})"
    if algorithm not in _BUILDERS:
        raise ValueError(f"{where}: unknown algorithm; choose one of {tuple(_BUILDERS)}")
    if collective not in ALL_COLLECTIVES:
        raise ValueError(f"{where}: unknown collective; choose one of {tuple(ALL_COLLECTIVES)}")
    if algorithm not in ALGORITHMS_BY_COLLECTIVE[collective]:
        raise ValueError(f"{where}: unknown collective for this algorithm; {collective} is built by "
                         f"{ALGORITHMS_BY_COLLECTIVE[collective]}")
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
    if collective == "alltoall":
        if counts is None:  # each rank's input cut evenly among the destinations
            counts = even_counts(blocks)
        return builder(nranks, nelems, root, blocks, counts)
    if algorithm == "pipeline":
        return builder(nranks, nelems, root, blocks, pieces=pieces)
    if nodes is None:
        return builder(nranks, nelems, root, blocks)
    if algorithm == "ring":
        return builder(nranks, nelems, root, blocks, order=ring.node_order(nodes))
    return builder(nranks, nelems, root, blocks, nodes=nodes)
