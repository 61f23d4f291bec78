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
        Microseconds, or None (always None until the cost model is wired in).

    Example::

        predicted_us("ring", "allreduce", 1 << 20, comm.cluster)   # None for now
    """
    return None
