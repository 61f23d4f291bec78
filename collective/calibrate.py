"""Measure the link costs of a job: alpha/beta inside a node and between nodes by timed exchanges, gamma by an add.

Terms: *alpha* is the latency of a message (seconds), *beta* the inverse
bandwidth (seconds per byte), *gamma* the seconds per byte to reduce an incoming
float32 buffer into the local one; see ``topologies.cost``. A *group* is the set
of ranks whose exchange stands for a link kind: the first two ranks of the
first node with two ranks for intra-node links, rank 0 and the lowest rank of
another node for inter-node links. A *shift exchange* is what one step of a ring
does: every rank of the group sends to the next and receives from the previous
at once.

Then every rank of that node does a shift exchange at once: the node's
aggregate (``SharedLinkCost.shared_beta``) is what its ranks share in a
collective (cores, when ranks outnumber them; memory bandwidth). gamma is
measured by every rank at once for the same reason. The inter-node pair's
figure is its own: the cost model shares a node's link among its ranks
itself. The group's first rank picks the
sizes; each size is timed a few times (median), alpha is the smallest size's
time, beta the least-squares slope of the larger sizes. Sizes stop growing once
the group has spent its time budget, so a slow link costs no more than a fast
one. Rank 0 broadcasts the result, so every rank prices algorithms identically
and "auto" picks the same one everywhere.

Cached per process (per layout), and in ``COLLECTIVE_CALIBRATION_FILE`` when that
names a file (read if it holds this layout, else written after measuring), which
is how ``collective-bench --tune`` can keep one for later jobs.
``COLLECTIVE_CALIBRATE=0`` skips it all: the cost model then uses its documented
defaults (``topologies.cost.DEFAULT_*``). A topology file (``COLLECTIVE_TOPOLOGY``)
that declares ``links`` also skips it: the declared costs are used as they are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

import numpy as np

from collective.topologies.cluster import Cluster, LinkCost, SharedLinkCost

from . import config

__all__ = ["calibrate", "enabled", "measure_gamma", "SIZES", "BUDGET_S"]

#: Message sizes of the ping-pong, bytes. The first gives alpha; the ones from 64 KiB on give beta.
SIZES: tuple[int, ...] = (8, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
#: Wall-clock seconds one representative pair may spend before its sizes stop growing.
BUDGET_S = 0.1
_REPS_SMALL, _REPS_LARGE = 6, 2
_STOP = -1
_cache: dict[tuple, Cluster] = {}


def enabled() -> bool:
    """False when ``COLLECTIVE_CALIBRATE`` is 0/false/no/off."""
    return bool(config.get("CALIBRATE"))


def measure_gamma(nbytes: int = 8 << 20, reps: int = 3) -> float:
    """Seconds per byte of ``np.add(a, b, out=a)`` on float32 buffers of ``nbytes`` (best of ``reps``).

    The default size is larger than the caches, as the large reductions the model matters for are.

    Example::

        gamma = measure_gamma()   # seconds per byte reduced
    """
    n = max(1, nbytes // 4)
    a = np.ones(n, np.float32)
    b = np.ones(n, np.float32)
    np.add(a, b, out=a)  # touch the pages first
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t)
    return max(best / (4 * n), 1e-13)


def _groups(cluster: Cluster) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(intra pair, inter pair, intra node): the first two ranks of the first node with two ranks; rank 0
    and the lowest rank of another node; every rank of that first node when it has more than two.
    Empty where the job has no such link."""
    node: tuple[int, ...] = ()
    for m in sorted(set(cluster.node_of_rank), key=lambda m: cluster.ranks_of_node(m)[0]):
        ranks = cluster.ranks_of_node(m)
        if len(ranks) >= 2:
            node = ranks
            break
    other = [r for r in range(cluster.size) if cluster.node_of_rank[r] != cluster.node_of_rank[0]]
    return node[:2], ((0, min(other)) if other else ()), (node if len(node) > 2 else ())


def _exchange(sub: Any, out: np.ndarray, inc: np.ndarray) -> list[tuple[int, float]]:
    """Shift exchanges on ``sub`` (every rank sends to the next, receives from the previous, at once).

    Its rank 0 decides the sizes and broadcasts them; returns [(size, seconds)] on that rank (the median
    of a few timed exchanges, each started together after a barrier), [] elsewhere.
    """
    me, n = sub.Get_rank(), sub.Get_size()
    right, left = (me + 1) % n, (me - 1) % n
    head = np.zeros(1, np.int64)
    points: list[tuple[int, float]] = []
    t_start = time.perf_counter()
    for i, size in enumerate(SIZES):
        head[0] = size
        sub.Bcast(head, root=0)
        if head[0] == _STOP:
            break
        reps = _REPS_SMALL if size < (64 << 10) else _REPS_LARGE
        times = []
        for k in range(reps + 1):  # the first exchange also warms the path up (and connects it)
            sub.Barrier()
            t = time.perf_counter()
            reqs = [sub.Irecv(inc[:size], source=left, tag=2), sub.Isend(out[:size], dest=right, tag=2)]
            reqs[0].Waitall(reqs)
            if k:
                times.append(time.perf_counter() - t)
        if me != 0:
            continue
        points.append((size, statistics.median(times)))  # np.median would import numpy.ma at every init
        if i == 0:
            t_start = time.perf_counter()  # connection set-up is not counted
        # Up to 64 KiB always (beta needs two sizes there); beyond, stop before a size whose exchanges
        # would overrun the budget, so a slow link stops early (guessed from the last, bandwidth-bound, size).
        if i + 1 < len(SIZES) and size >= (64 << 10):
            guess = (_REPS_LARGE + 2) * points[-1][1] * SIZES[i + 1] / size
            if time.perf_counter() - t_start + guess > BUDGET_S:
                head[0] = _STOP
                sub.Bcast(head, root=0)
                break
    return points


def _link(points: list[tuple[int, float]]) -> LinkCost:
    """alpha = smallest message's time; beta = least-squares slope over sizes >= 64 KiB (or all when fewer)."""
    alpha = max(points[0][1], 1e-7)
    big = [(s, t) for s, t in points if s >= (64 << 10)]
    if len(big) < 2:
        big = points[1:] or points
    xs = np.array([s for s, _ in big], float)
    ys = np.array([t for _, t in big], float) - alpha
    if len(big) >= 2 and np.ptp(xs) > 0:
        slope = float(np.polyfit(xs, ys, 1)[0])
    else:  # one point: the time above alpha over its size
        slope = float(ys[0] / xs[0]) if xs[0] > 0 else 0.0
    if not slope > 0:  # noise made the fit useless: fall back to the largest message's average rate
        slope = max(big[-1][1] - alpha, big[-1][1] / 2) / max(big[-1][0], 1)
    return LinkCost(alpha=alpha, beta=max(slope, 1e-13))


def _layout_key(cluster: Cluster) -> list[int]:
    return [len(cluster.ranks_of_node(m)) for m in sorted(set(cluster.node_of_rank))]


def _load(path: str, cluster: Cluster) -> np.ndarray | None:
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("version") != 1 or d.get("layout") != _layout_key(cluster) or d.get("node_of_rank") != list(
                cluster.node_of_rank):
            return None
        return np.array([*d["intra"], *d["inter"], d["gamma"], d["intra_shared_beta"]], float)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(path: str, cluster: Cluster, vals: np.ndarray) -> None:
    d = {"version": 1, "layout": _layout_key(cluster), "node_of_rank": list(cluster.node_of_rank),
         "intra": [float(vals[0]), float(vals[1])], "inter": [float(vals[2]), float(vals[3])],
         "gamma": float(vals[4]), "intra_shared_beta": float(vals[5])}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        # Owner only (a cluster's measured links are nobody else's business): created so, whatever the umask.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            os.fchmod(fd, 0o600)
            json.dump(d, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # a read-only place only costs the next job a measurement
        pass


def _store(vals: np.ndarray, slot: tuple[int, int], res: np.ndarray) -> None:
    vals[slot[0]], vals[slot[1]] = res[0], res[1]


def calibrate(comm: Any, cluster: Cluster, force: bool = False) -> Cluster:
    """Measure ``cluster``'s link costs on ``comm`` and return the Cluster with them filled in.

    Collective: every rank of ``comm`` calls it at the same point, with the same
    ``cluster``. Takes well under a second (see ``BUDGET_S``); ranks outside the
    representative pairs wait in a broadcast meanwhile.

    Args:
        comm: an mpi4py communicator whose ranks are ``cluster``'s ranks (use a
            private duplicate: this sends point-to-point messages on tags 1-3).
        cluster: the layout (``Cluster.node_of_rank``); its costs are ignored.
        force: measure even when ``COLLECTIVE_CALIBRATE=0`` or a cached result exists.

    Returns:
        ``cluster`` with ``intra``, ``inter`` (None on one node) and ``gamma``
        set and ``source`` noting the calibration; unchanged when disabled or
        when its links were declared in a topology file (``links_declared``).

    Example::

        from mpi4py import MPI
        cl = calibrate(MPI.COMM_WORLD.Dup(), Cluster.from_node_size(MPI.COMM_WORLD.size, 2))
        cl.intra.alpha, cl.inter.beta
    """
    if not force and (cluster.links_declared or not enabled()):
        return cluster  # the topology file's links replace measuring, identically on every rank
    key = (cluster.node_of_rank, comm.Get_size())
    if not force and key in _cache:
        return _cache[key]
    me, P = comm.Get_rank(), comm.Get_size()
    if P != cluster.size:
        raise ValueError(f"calibrate: the communicator has {P} ranks, the cluster {cluster.size}")
    path = config.get("CALIBRATION_FILE")
    # vals: intra alpha, beta, inter alpha, beta, gamma, intra shared beta (NaN where absent); 1.0 if from the file.
    vals = np.full(7, np.nan)
    if me == 0 and path and not force:
        got = _load(path, cluster)
        if got is not None:
            vals[:6], vals[6] = got, 1.0
    comm.Bcast(vals, root=0)
    if vals[6] != 1.0:
        vals[:] = np.nan
        from mpi4py import MPI

        groups = _groups(cluster)
        need = max(SIZES) if any(me in g for g in groups) else 0
        out, inc = np.ones(need, np.uint8), np.zeros(need, np.uint8)
        # Where each group's (alpha, beta) go in vals. The node's alpha waits in 4 (gamma's place, filled
        # below) and replaces the pair's when larger: every rank of a node is busy in a collective's steps.
        slots = ((0, 1), (2, 3), (4, 5))
        for group, slot in zip(groups, slots):
            # Split is collective: every rank takes part, the ones outside the group get no communicator.
            sub = comm.Split(0 if me in group else MPI.UNDEFINED, key=me)
            if sub != MPI.COMM_NULL:
                points = _exchange(sub, out, inc)
                sub.Free()
                if me == group[0]:
                    link = _link(points)
                    # The whole node moved len(group) messages at once: the node's own rate is per byte of all.
                    res = np.array([link.alpha, link.beta / (len(group) if slot == (4, 5) else 1)])
                    if me != 0:
                        comm.Send(res, dest=0, tag=4)
                    else:
                        _store(vals, slot, res)
            if me == 0 and group and group[0] != 0:
                res = np.empty(2)
                comm.Recv(res, source=group[0], tag=4)
                _store(vals, slot, res)
        if me == 0 and not np.isnan(vals[1]):
            if np.isnan(vals[5]):
                vals[5] = vals[1] / 2  # a node of two: its one exchange is the node's whole traffic
            elif vals[4] > vals[0]:
                vals[0] = vals[4]
        # gamma: every rank adds at once (they share the cores and memory as in a collective); rank 0's counts.
        comm.Barrier()
        g = measure_gamma()
        if me == 0:
            vals[4] = g
            if path:
                _save(path, cluster, vals)
        comm.Bcast(vals, root=0)
    source = f"{cluster.source}; links " + ("from " + path if vals[6] == 1.0 else "measured")
    out_cluster = dataclasses.replace(
        cluster,
        intra=None if np.isnan(vals[0]) else SharedLinkCost(float(vals[0]), float(vals[1]), float(vals[5])),
        inter=None if np.isnan(vals[2]) else LinkCost(float(vals[2]), float(vals[3])),
        gamma=float(vals[4]),
        source=source,
    )
    _cache[key] = out_cluster
    return out_cluster
