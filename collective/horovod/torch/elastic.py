"""hvd.elastic for collective.horovod.torch: training that goes on when a rank dies, and grows back.

Horovod's API (``hvd.elastic.run``, ``TorchState``, ``ElasticSampler``) on
collective's elastic mode: launch with ``collective-run --elastic -np N``
(Open MPI's ULFM fault tolerance). When a rank dies, every survivor's pending
or next Horovod op raises ``HorovodInternalError`` (caused by
``collective.RanksLostError``); ``@hvd.elastic.run`` catches it, restores the
state of the last ``state.commit()``, shrinks Horovod's communicator to the
survivors (``hvd.size()`` and ``hvd.rank()`` follow; the lowest surviving rank
is the new rank 0), runs the reset callbacks, broadcasts rank 0's state
(``state.sync()``) and calls the training function again.

With ``--max-ranks M`` (``COLLECTIVE_MAX_RANKS``), the first ``state.commit()``
after that spawns replacements up to M ranks, running the same command line,
and raises ``HostsUpdatedInterrupt`` as Horovod's commit does when hosts are
added; ``run`` catches it, runs the reset callbacks, syncs and calls the
function again. In a replacement, ``hvd.init()`` joins the grown job (its
rank comes after the others') and ``run``'s first sync gives it rank 0's
committed state, so it starts where the others go on. If no process can be
spawned, the job goes on with the ranks it has. Without ``--max-ranks`` the
job goes on with fewer ranks, down to ``--min-ranks`` (below it ``run``
raises ``HorovodInternalError``).

Launched without ``--elastic``, the same script runs as a fixed-size job:
the state syncs once and the function runs once; a lost rank ends the job.

Example::

    state = hvd.elastic.TorchState(model, opt, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            ...                          # steps; state.commit() every few
            state.batch = 0

    train(state)
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.utils.data

from ..elastic import ObjectState, State, lost_ranks_in, run_fn, set_host_check
from .functions import broadcast_object, broadcast_optimizer_state, broadcast_parameters
from .mpi_ops import continue_on_survivors, grow_to_max_ranks, lost_ranks_error, rank, size

__all__ = ["ElasticSampler", "ObjectState", "State", "TorchState", "run"]

# Every state's commit checks for added ranks: after a recovery it grows Horovod back to COLLECTIVE_MAX_RANKS.
set_host_check(grow_to_max_ranks)


def run(func: Any) -> Any:
    """Decorator: run ``func(state, ...)`` so that it goes on over the survivors when ranks are lost.

    Before each call every rank takes rank 0's state (``state.sync()``).
    When a rank dies, the survivors' Horovod ops raise; the wrapper then
    restores the last commit (``state.restore()``), continues Horovod on the
    survivors, runs the state's reset callbacks and calls ``func`` again.
    When a commit added ranks (``--max-ranks``), it raises
    ``HostsUpdatedInterrupt``: the wrapper runs the reset callbacks and calls
    ``func`` again after the sync, which the new ranks' ``run`` joins.
    Errors that are not a lost rank propagate unchanged. The first argument
    of ``func`` must be the state; ``func`` must not be a collective op
    itself. Make no Horovod op between ``hvd.init()`` and ``run`` (``run``'s
    sync does the broadcasts): a replacement starts the script there while
    the other ranks wait in ``run``.

    Args:
        func: the training function, ``func(state, *args, **kwargs)``.

    Returns:
        The wrapped function (it returns what ``func`` returns).

    Example::

        @hvd.elastic.run
        def train(state):
            for state.batch in range(state.batch, steps):
                step(state.model, state.optimizer)
                state.commit()

        train(hvd.elastic.TorchState(model, optimizer, batch=0))
    """
    return run_fn(func, _reset, _lost_error)


def _lost_error(exc: BaseException) -> Any:
    return lost_ranks_in(exc) or lost_ranks_error()


def _reset() -> None:
    continue_on_survivors()


# ------------------------------------------------------------------ sampler
class ElasticSampler(torch.utils.data.Sampler):
    """Shards a dataset over the ranks like ``DistributedSampler``, and re-shards what is left of the epoch after a
    reset.

    The epoch's order is a permutation of the dataset (seeded by ``seed +
    epoch``, the same on every rank). Batches consume it from the front:
    ``record_batch`` counts ``batch_size * num_replicas`` more samples as
    processed. After a reset (ranks lost or added; tracked by a
    :class:`TorchState`, which saves, restores and syncs the count), the
    unprocessed rest is dealt out afresh over the new number of ranks, so a
    change of ranks neither repeats nor skips the samples committed as
    processed. Each rank takes every
    ``num_replicas``-th index of the rest (padded by wrapping around to a
    multiple of ``num_replicas``).

    Use it as Horovod asks: put it in the ``TorchState``, call
    ``record_batch`` after each batch and ``set_epoch`` when an epoch ends
    (not when it starts: a restarted epoch must keep its count).

    Args:
        dataset: the data set (its length is read at every reset).
        shuffle: permute the indices each epoch (default True); else in order.
        seed: the permutation's seed, the same on every rank.

    Example::

        sampler = hvd.elastic.ElasticSampler(dataset, seed=1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler)
        state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0)
    """

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.processed_num = 0
        self.num_replicas = 0
        self.rank = 0
        self.remaining_indices: list[int] = []
        self.num_samples = 0
        self.total_size = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: a new permutation, nothing processed yet."""
        self.epoch = int(epoch)
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Count one batch of ``batch_size`` on every rank as processed (``batch_idx`` is Horovod's, unused)."""
        self.processed_num += int(batch_size) * self.num_replicas

    def state_dict(self) -> dict[str, int]:
        """The sampler's progress: ``{"epoch": ..., "processed_num": ...}``."""
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Take the progress of :meth:`state_dict` and re-shard the rest of the epoch over the ranks there are now."""
        self.epoch = int(state_dict["epoch"])
        self.processed_num = int(state_dict["processed_num"])
        self.reset()

    @property
    def processed_indices(self) -> list[int]:
        """The dataset indices of this epoch counted as processed (the front of the epoch's order)."""
        return self._order()[:self.processed_num]

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(int(self.seed) + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def reset(self) -> None:
        """Re-read ``hvd.size()``/``hvd.rank()`` and deal out the unprocessed rest of the epoch."""
        self.num_replicas = size()
        self.rank = rank()
        self.remaining_indices = self._order()[self.processed_num:]
        self.num_samples = math.ceil(len(self.remaining_indices) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Any:
        idx = list(self.remaining_indices)
        if idx and len(idx) < self.total_size:
            idx += (idx * math.ceil(self.total_size / len(idx)))[:self.total_size - len(idx)]
        return iter(idx[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


# ------------------------------------------------------------------ torch state
class _Handler:
    """Saves, restores and syncs one tracked object of a TorchState."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.save()

    def save(self) -> None:
        self.saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self.saved)

    def sync(self) -> None:
        raise NotImplementedError

    def set_value(self, value: Any) -> None:
        self.value = value
        self.save()


class _ModelHandler(_Handler):
    def sync(self) -> None:
        broadcast_parameters(self.value.state_dict(), root_rank=0)


class _OptimizerHandler(_Handler):
    def sync(self) -> None:
        broadcast_optimizer_state(self.value, root_rank=0)


class _SamplerHandler(_Handler):
    def __init__(self, value: Any, name: str) -> None:
        self.name = name
        super().__init__(value)

    def sync(self) -> None:
        self.value.load_state_dict(broadcast_object(self.value.state_dict(), 0,
                                                    name=f"elastic.TorchState.{self.name}"))


def _handler(name: str, value: Any) -> _Handler | None:
    if isinstance(value, torch.nn.Module):
        return _ModelHandler(value)
    if isinstance(value, torch.optim.Optimizer):
        return _OptimizerHandler(value)
    if isinstance(value, ElasticSampler):
        return _SamplerHandler(value, name)
    return None


class TorchState(ObjectState):
    """The state of a PyTorch training process: models, optimizers, samplers and plain values, as attributes.

    Every keyword becomes an attribute. Modules, optimizers and
    :class:`ElasticSampler` are handled by their ``state_dict()``: a commit
    deep-copies it, a restore loads it back, a sync broadcasts rank 0's
    (``broadcast_parameters``, ``broadcast_optimizer_state``, the sampler's
    progress) and saves it as the state a restore goes back to. Other values are copied on commit and broadcast pickled.
    Assigning a new module/optimizer/sampler to a tracked name tracks the new
    object and saves it.

    Args:
        model: a ``torch.nn.Module`` (or None).
        optimizer: a ``torch.optim.Optimizer``, e.g. an ``hvd.DistributedOptimizer`` (or None).
        kwargs: more objects and values to track (more models, samplers, ``epoch=0``, ``batch=0``...).

    Example::

        state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0, batch=0)
        state.commit()      # a copy in memory
        state.restore()     # back to it
        state.sync()        # rank 0's on every rank (collective)
    """

    def __init__(self, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        kwargs.update(model=model, optimizer=optimizer)
        handlers: dict[str, _Handler] = {}
        plain: dict[str, Any] = {}
        for k, v in kwargs.items():
            h = _handler(k, v)
            if h is None:
                plain[k] = v
            else:
                handlers[k] = h
        self._handlers = handlers
        for k, h in handlers.items():
            setattr(self, k, h.value)
        super().__init__(bcast_object=lambda obj: broadcast_object(obj, 0, name="elastic.TorchState.objects"),
                         get_rank=rank, **plain)

    def save(self) -> None:
        """Deep-copy every tracked ``state_dict()`` and value (what :meth:`commit` does)."""
        for h in self._handlers.values():
            h.save()
        super().save()

    def restore(self) -> None:
        """Load the saved copies back into the tracked objects and values."""
        for h in self._handlers.values():
            h.restore()
        super().restore()

    def sync(self) -> None:
        """Collective: every rank takes rank 0's objects and values, which become the saved copy."""
        for h in self._handlers.values():
            h.sync()
            h.save()  # rank 0's state is what restore goes back to, as for the plain values
        super().sync()

    def __setattr__(self, name: str, value: Any) -> None:
        handlers = self.__dict__.get("_handlers")
        if handlers is not None and name in handlers and name in self.__dict__:
            handlers[name].set_value(value)
        super().__setattr__(name, value)
