"""Horovod's torch helpers: broadcast_parameters, broadcast_optimizer_state, broadcast_object, allgather_object.

The object collectives pickle (the one documented exception to collective's
no-pickle rule): only call them with objects from ranks you trust, as with
Horovod and torch.distributed.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

from .mpi_ops import ProcessSet, allgather, broadcast_, broadcast_async_, global_process_set, rank, synchronize

__all__ = ["allgather_object", "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters"]


def broadcast_parameters(params: Any, root_rank: int, process_set: ProcessSet = global_process_set) -> None:
    """Overwrite every tensor in ``params`` with ``root_rank``'s values, in place.

    Args:
        params: ``model.state_dict()``, ``model.named_parameters()`` or a list of (name, tensor).
        root_rank: the rank whose values everyone takes.

    Example::

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list) or hasattr(params, "__iter__"):
        items = list(params)
        for it in items:
            if not (isinstance(it, tuple) and len(it) == 2):
                raise ValueError("broadcast_parameters: params must be a dict or a list of (name, tensor) pairs; "
                                 f"got an element of type {type(it).__name__}")
    else:
        raise ValueError(f"broadcast_parameters: invalid params of type {type(params).__name__}")
    handles = []
    for name, p in items:
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"broadcast_parameters: {name!r} is a {type(p).__name__}, not a tensor")  # noqa: TRY004
        handles.append(broadcast_async_(p.data if isinstance(p, torch.nn.Parameter) else p, root_rank,
                                        name=f"broadcast_parameters.{name}", process_set=process_set))
    for h in handles:
        synchronize(h)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, model: Any = None,
                              process_set: ProcessSet = global_process_set) -> None:
    """Make every rank's optimizer state (hyper-parameters and per-parameter state) equal ``root_rank``'s.

    Ranks whose optimizer has no state yet (no step taken) create it first by a
    step with zero gradients that leaves the parameters unchanged, so every
    rank holds the same tensors to receive into. Tensors travel as tensors;
    scalars and other values travel with :func:`broadcast_object`.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("broadcast_optimizer_state: cannot broadcast torch.optim.LBFGS state")  # noqa: TRY004
    sd = optimizer.state_dict()
    if not sd["state"]:
        _init_state(optimizer)
        sd = optimizer.state_dict()
    tensors, others = [], {}
    for pid, st in sorted(sd["state"].items()):
        for k, v in sorted(st.items()):
            if torch.is_tensor(v) and v.dim() > 0:
                tensors.append((f"{pid}.{k}", v))
            else:
                others[(pid, k)] = v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    root_others, root_groups = broadcast_object((others, groups), root_rank, name="broadcast_optimizer_state.objects",
                                                process_set=process_set)
    handles = [broadcast_async_(t, root_rank, name=f"broadcast_optimizer_state.{n}", process_set=process_set)
               for n, t in tensors]
    for h in handles:
        synchronize(h)
    for (pid, k), v in root_others.items():
        if pid in sd["state"]:
            cur = sd["state"][pid].get(k)
            if torch.is_tensor(cur) and torch.is_tensor(v):
                cur.copy_(v)
            else:
                sd["state"][pid][k] = v
    for g, rg in zip(sd["param_groups"], root_groups):
        g.update(rg)
    optimizer.load_state_dict(sd)


def _init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state with one step on zero gradients, leaving the parameters as they were.

    Gradients that were None stay zero afterwards, as in Horovod.
    """
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                saved.append((p, p.data.clone(), p.grad))
                p.grad = torch.zeros_like(p.data)
    step = optimizer.step
    if hasattr(optimizer, "skip_synchronize"):  # a DistributedOptimizer must not reduce these zeros
        with optimizer.skip_synchronize():
            step()
    else:
        step()
    for p, data, grad in saved:
        p.data.copy_(data)
        if grad is not None:
            p.grad = grad


def _pickle(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.from_numpy(np.frombuffer(buf.getvalue(), np.uint8).copy())


def _unpickle(raw: Any) -> Any:
    """The object :func:`_pickle` packed: the object collectives only (the documented exception; trusted peers)."""
    return pickle.loads(raw.tobytes())


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """``root_rank``'s ``obj`` on every rank (pickled; only for trusted peers).

    Example::

        epoch = hvd.broadcast_object(epoch, root_rank=0)
    """
    name = name or type(obj).__name__
    data = _pickle(obj) if rank() == root_rank else torch.zeros(0, dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.int64)
    broadcast_(n, root_rank, name=f"broadcast_object.{name}.size", process_set=process_set)
    if rank() != root_rank:
        data = torch.zeros(int(n.item()), dtype=torch.uint8)
    broadcast_(data, root_rank, name=f"broadcast_object.{name}.data", process_set=process_set)
    return obj if rank() == root_rank else _unpickle(data.numpy())


def allgather_object(obj: Any, name: str | None = None, process_set: ProcessSet = global_process_set) -> list:
    """Every rank's ``obj``, in rank order, on every rank (pickled; only for trusted peers).

    Example::

        hosts = hvd.allgather_object(socket.gethostname())
    """
    name = name or type(obj).__name__
    data = _pickle(obj)
    sizes = allgather(torch.tensor([data.numel()], dtype=torch.int64), name=f"allgather_object.{name}.sizes",
                      process_set=process_set)
    got = allgather(data, name=f"allgather_object.{name}.data", process_set=process_set).numpy()
    out, off = [], 0
    for s in sizes.tolist():
        out.append(_unpickle(got[off:off + s]))
        off += s
    return out
