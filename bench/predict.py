"""Predicted times for the `pred(us)` column: a hook the topology cost model fills in; None means no prediction."""
from __future__ import annotations

from typing import Any

__all__ = ["predicted_us"]


def predicted_us(alg: str, coll: str, nbytes: int, cluster: Any = None) -> float | None:
    """The predicted time in microseconds of one call, or None when there is no model for it.

    collective-bench prints a ``pred(us)`` column per algorithm only when this
    returns a number for some size, and puts the values in its JSON.

    Args:
        alg: the algorithm ("native", "ring", ...; also "auto", "gloo", "memcpy").
        coll: the collective ("allreduce", ...).
        nbytes: the benchmark's size column (nccl-tests convention: the largest
            per-rank buffer, i.e. the gathered result for allgather).
        cluster: the communicator's ``topologies.cluster.Cluster`` (ranks, nodes,
            link costs once calibrated).

    Returns:
        Microseconds from ``topologies.cost.predict`` on the calibrated links, or
        None for columns the model does not cover (shm, auto, gloo, memcpy) or
        an uncalibrated cluster.

    Example::

        predicted_us("ring", "allreduce", 1 << 20, comm.cluster)
    """
    from collective.topologies import ALGORITHMS_BY_COLLECTIVE
    from collective.topologies import cost

    if cluster is None or cluster.intra is None or (alg != "native" and alg not in
                                                    ALGORITHMS_BY_COLLECTIVE.get(coll, ())):
        return None
    # cost.predict takes one rank's input: the size column is the whole result for the gathers.
    per_rank = nbytes // cluster.size if coll in ("allgather", "gather", "allgatherv") else nbytes
    try:
        return cost.predict(coll, per_rank, cluster, alg) * 1e6
    except (ValueError, KeyError):  # sendrecv, or a collective this version's model lacks
        return None
