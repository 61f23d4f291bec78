"""The `gloo` reference column: torch.distributed over Gloo on the same data, what a PyTorch user gets.

allreduce is ``all_reduce``; alltoall ``all_to_all_single``; gather and
scatter ``gather`` and ``scatter`` into and out of views of one tensor;
allgatherv ``all_gather`` of every rank's block padded to the largest one
(torch's all_gather needs equal sizes), then the padding dropped.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import numpy as np

__all__ = ["unavailable_reason", "unsupported_dtype", "GlooGroup"]

# Element types Gloo reduces on the CPU; anything else is shown as n/a.
_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int32", "int64")


def unavailable_reason() -> str | None:
    """Why the gloo column cannot run here (torch missing, no Gloo), or None when it can."""
    try:
        import torch.distributed as dist
    except Exception as exc:  # noqa: BLE001 - any import failure means "no column"
        return f"torch.distributed cannot be imported ({type(exc).__name__}: {exc})"
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no Gloo backend"
    return None


def unsupported_dtype(dtype: np.dtype) -> str | None:
    """Why the gloo column does not measure ``dtype`` (None when it does)."""
    return None if str(dtype) in _DTYPES else f"the gloo column does not measure {dtype}"


class GlooGroup:
    """A Gloo process group over the same ranks as an mpi4py communicator (rank and size from MPI).

    Rank 0 picks a free TCP port and broadcasts it (an integer buffer, no pickle).
    The rendezvous address is ``MASTER_ADDR`` when set, 127.0.0.1 when every rank
    is on one node, else rank 0's host name.

    Args:
        mpicomm: the benchmark's own mpi4py communicator.
        single_node: every rank shares one node.
    """

    def __init__(self, mpicomm: Any, single_node: bool) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        # One intra-op thread per rank, as torch DDP users run one process per core: torch's default
        # (a thread per core) leaves OpenMP workers spinning after each reduction, on the cores every
        # other column of the interleaved run needs.
        torch.set_num_threads(1)
        self.dist = dist
        self.rank, self.size = mpicomm.Get_rank(), mpicomm.Get_size()
        port = np.zeros(1, np.int64)
        host = np.zeros(256, np.uint8)
        if self.rank == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", 0))
                port[0] = s.getsockname()[1]
            name = socket.gethostname().encode()[:255]
            host[: len(name)] = np.frombuffer(name, np.uint8)
        mpicomm.Bcast(port, root=0)
        mpicomm.Bcast(host, root=0)
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else
                                                 bytes(host).rstrip(b"\0").decode(errors="replace"))
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{int(port[0])}", rank=self.rank,
                                world_size=self.size, timeout=datetime.timedelta(seconds=300))

    def make_allreduce(self, op: str, x: np.ndarray, out: np.ndarray | None) -> Callable[[], None]:
        """A call that allreduces ``x`` with Gloo: into ``out`` (copy, then all_reduce) or in place when out is None.

        ``x.dtype`` must pass :func:`unsupported_dtype`.
        """
        import torch

        dist = self.dist
        rop = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
               "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        tx = torch.from_numpy(x)
        tgt = tx if out is None else torch.from_numpy(out)
        P = self.size
        avg_int = op == "avg" and x.dtype.kind in "iu"

        def call() -> None:
            if out is not None:
                tgt.copy_(tx)
            dist.all_reduce(tgt, op=rop)
            if op == "avg":  # Gloo has no AVG: divide as collective does (floor for integers)
                if avg_int:
                    tgt.floor_divide_(P)
                else:
                    tgt.div_(P)

        return call

    def make(self, coll: str, x: np.ndarray, out: np.ndarray, root: int) -> Callable[[], None]:
        """A call of ``coll`` (alltoall, gather, scatter or allgatherv) with Gloo from ``x`` into ``out``.

        Blocks are equal except for allgatherv, whose block sizes come from
        every rank's ``x.size`` (exchanged here once, not in the call). ``out``
        is ignored off the root of gather; ``x`` off the root of scatter.
        """
        import torch

        dist, P, R = self.dist, self.size, self.rank
        tx, tout = torch.from_numpy(x), torch.from_numpy(out)
        if coll == "alltoall":
            return lambda: dist.all_to_all_single(tout, tx)
        if coll == "gather":
            b = x.size
            parts = [tout[i * b:(i + 1) * b] for i in range(P)] if R == root else None
            return lambda: dist.gather(tx, gather_list=parts, dst=root)
        if coll == "scatter":
            b = out.size
            parts = [tx[i * b:(i + 1) * b] for i in range(P)] if R == root else None
            return lambda: dist.scatter(tout, scatter_list=parts, src=root)
        if coll != "allgatherv":
            raise ValueError(f"GlooGroup.make: no gloo column for {coll}")
        sizes = torch.tensor([x.size], dtype=torch.int64)
        every = [torch.zeros(1, dtype=torch.int64) for _ in range(P)]
        dist.all_gather(every, sizes)
        counts = [int(t[0]) for t in every]
        m = max(counts)
        offs = np.concatenate(([0], np.cumsum(counts))).tolist()
        pad_in = torch.zeros(m, dtype=tx.dtype)
        pad_out = torch.zeros(P * m, dtype=tx.dtype)
        blocks = [pad_out[r * m:(r + 1) * m] for r in range(P)]
        n = x.size

        def call() -> None:
            pad_in[:n].copy_(tx)
            dist.all_gather(blocks, pad_in)
            for r in range(P):
                tout[offs[r]:offs[r + 1]].copy_(blocks[r][:counts[r]])

        return call

    def close(self) -> None:
        """Destroy the process group."""
        self.dist.destroy_process_group()
