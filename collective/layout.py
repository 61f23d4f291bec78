"""Where the ranks are: node discovery (MPI's shared-memory split, a topology file, or a fixed node size)."""
from __future__ import annotations

from typing import Any

import numpy as np

from collective.topologies.cluster import TOPOLOGY_ENV, Cluster, TopologyFileError, parse_topology

from . import config
from .errors import CollectiveValueError, describe

__all__ = ["discover_cluster", "real_node_count"]


def discover_cluster(comm: Any, MPI: Any) -> Cluster:
    """The layout of ``comm``'s ranks: from ``COLLECTIVE_TOPOLOGY``, ``COLLECTIVE_NODE_SIZE``, or MPI (collective).

    Example::

        cluster = discover_cluster(mpi_comm, MPI)
        cluster.node_of_rank   # e.g. (0, 0, 1, 1)
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    k = config.get("NODE_SIZE")
    path = config.get("TOPOLOGY")
    if path is not None:
        if k is not None:
            # Two sources of truth for one layout: refuse rather than silently prefer one.
            raise CollectiveValueError(f"{describe('init', rank, size)}: both {TOPOLOGY_ENV}={path} and "
                                       f"COLLECTIVE_NODE_SIZE={k} are set; unset one of them")
        return _topology_file(comm, path)
    if k is not None:
        return Cluster.from_node_size(size, k)
    try:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    except Exception:  # pragma: no cover - an MPI without shared-memory split
        local = None
    if local is not None:
        leader = np.array([rank], np.int64)
        local.Bcast(leader, root=0)
        local.Free()
        source = "MPI shared-memory split"
    else:  # pragma: no cover
        import socket

        name = socket.gethostname().encode()[:255]
        h = np.frombuffer(name.ljust(256, b"\0"), np.uint8)
        allh = np.empty((size, 256), np.uint8)
        comm.Allgather(h, allh)
        leader = np.array([next(i for i in range(size) if (allh[i] == h).all())], np.int64)
        source = "hostname"
    leaders = np.empty(size, np.int64)
    comm.Allgather(leader, leaders)
    order = {ld: i for i, ld in enumerate(sorted(set(leaders.tolist())))}
    return Cluster(tuple(order[int(ld)] for ld in leaders), source=source)


def _topology_file(comm: Any, path: str) -> Cluster:
    """The layout (and maybe links) of the topology file at ``path``: rank 0 reads it, every rank checks it.

    Rank 0 sends the bytes (or why it could not read them) to every rank, so
    the file need only exist where rank 0 runs, and every rank parses the same
    text and raises the same error, before any collective moves data. Plain
    buffers, no pickle.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    head = np.zeros(2, np.int64)  # (1 if read else 0, length of the bytes that follow)
    data = b""
    if rank == 0:
        try:
            with open(path, "rb") as f:
                data = f.read()
            head[0] = 1
        except OSError as exc:
            data = f"cannot read the file: {exc.strerror or exc}".encode()
        head[1] = len(data)
    comm.Bcast(head, root=0)
    buf = np.frombuffer(data, np.uint8).copy() if rank == 0 else np.empty(int(head[1]), np.uint8)
    if head[1]:
        comm.Bcast(buf, root=0)
    where = f"{TOPOLOGY_ENV}={path}"
    if not head[0]:
        raise CollectiveValueError(f"{describe('init', rank, size)}: {where} (read by rank 0): "
                                   f"{buf.tobytes().decode(errors='replace')}")
    try:
        return parse_topology(buf.tobytes(), where, nranks=size)
    except TopologyFileError as exc:
        raise CollectiveValueError(f"{describe('init', rank, size)}: {exc}") from None


def real_node_count(comm: Any, MPI: Any, cluster: Cluster) -> int:
    """1 if every rank of ``comm`` shares one shared-memory node (whatever the layout says), else the node count
    (at least 2). Collective."""
    if cluster.source == "MPI shared-memory split":
        return cluster.nnodes
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local = node.Get_size()
    node.Free()
    size = comm.Get_size()
    flags = np.empty(size, np.int64)
    comm.Allgather(np.array([1 if local == size else 0], np.int64), flags)
    return 1 if flags.all() else 2
