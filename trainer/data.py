"""Deterministic sharding of a data set across ranks, reshuffled every epoch from a seed.

Terms: the *global batch* of step ``s`` is the ``B`` sample indices that one
process training with batch ``B`` would use at step ``s``: epoch
``e = s // steps_per_epoch`` shuffles all ``N`` indices with a generator
seeded by ``(seed, e)``, and the step takes the next ``B`` of them (the last
``N % B`` of each epoch are dropped, so every step has a full batch). Rank
``r`` of ``P`` gets the ``r``-th contiguous slice of ``B / P`` of them. So P
ranks with per-rank batch ``b`` see exactly the global batch ``P * b`` that
one process sees, and the *data position* is the step number alone: resuming
at step ``s`` (at any P) continues the same sequence.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .nn import Array

__all__ = ["ShardedLoader", "ShardedSampler"]


class ShardedSampler:
    """Which sample indices rank ``rank`` of ``size`` uses at each step.

    Args:
        n: number of samples in the data set.
        global_batch: samples per step over all ranks (must be a multiple of ``size``).
        rank: this rank.
        size: the number of ranks.
        seed: shuffling seed.
        shuffle: reshuffle every epoch (False: the data set order, every epoch).

    Example::

        s = ShardedSampler(1000, 64, rank=1, size=4, seed=0)
        idx = s.indices(step=10)   # 16 indices: rank 1's quarter of step 10's global batch
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"ShardedSampler: rank {rank} is not in 0..{size - 1}")
        if global_batch < 1 or global_batch % size:
            raise ValueError(f"ShardedSampler: the global batch {global_batch} must be a positive multiple of the "
                             f"number of ranks {size} (each rank takes global_batch / size samples); "
                             f"try --batch {max(size, global_batch - global_batch % size)}")
        if n < global_batch:
            raise ValueError(f"ShardedSampler: the data set has {n} samples, fewer than one global batch "
                             f"({global_batch})")
        self.n, self.global_batch, self.rank, self.size = n, global_batch, rank, size
        self.local_batch = global_batch // size
        self.seed, self.shuffle = int(seed), shuffle
        self.steps_per_epoch = n // global_batch
        self._epoch = -1
        self._perm: np.ndarray = np.arange(n)

    def reshard(self, rank: int, size: int) -> None:
        """Take rank ``rank``'s share of ``size`` ranks from now on (the global batches stay the same).

        Raises:
            ValueError: ``size`` does not divide the global batch (or ``rank`` is out of range).
        """
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"ShardedSampler.reshard: rank {rank} is not in 0..{size - 1}")
        if self.global_batch % size:
            raise ValueError(f"ShardedSampler.reshard: the global batch {self.global_batch} cannot be split evenly "
                             f"over {size} ranks (each rank takes global_batch / size samples); choose a global "
                             "batch that every rank count between --min-ranks and --max-ranks divides")
        self.rank, self.size = int(rank), int(size)
        self.local_batch = self.global_batch // size

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (cached for the current epoch)."""
        if epoch != self._epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                self._perm = np.arange(self.n)
            self._epoch = epoch
        return self._perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch number within the epoch) of ``step``."""
        return divmod(int(step), self.steps_per_epoch)

    def global_indices(self, step: int) -> np.ndarray:
        """The ``global_batch`` sample indices of ``step`` (what one process would use)."""
        epoch, k = self.position(step)
        perm = self.permutation(epoch)
        return perm[k * self.global_batch:(k + 1) * self.global_batch]

    def indices(self, step: int) -> np.ndarray:
        """This rank's slice of :meth:`global_indices`."""
        b = self.local_batch
        return self.global_indices(step)[self.rank * b:(self.rank + 1) * b]


class ShardedLoader:
    """Batches of (inputs, labels, sample indices) for this rank, on the model's array module and dtype.

    Args:
        x: the whole data set's inputs (a NumPy array, first axis = samples); every rank holds it.
        y: the labels, one per sample.
        global_batch: as for :class:`ShardedSampler`.
        rank: as for :class:`ShardedSampler`.
        size: as for :class:`ShardedSampler`.
        seed: as for :class:`ShardedSampler`.
        shuffle: as for :class:`ShardedSampler`.
        dtype: dtype of the inputs given to the model.
        xp: array module of the model (numpy or cupy).

    Example::

        loader = ShardedLoader(x_train, y_train, 64, comm.rank, comm.size, seed=0)
        xb, yb, ids = loader.batch(step)
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, global_batch: int, rank: int = 0, size: int = 1, seed: int = 0,
                 shuffle: bool = True, dtype: Any = np.float32, xp: Any = np) -> None:
        if len(x) != len(y):
            raise ValueError(f"ShardedLoader: {len(x)} inputs but {len(y)} labels")
        self.x = np.ascontiguousarray(x, dtype=dtype)
        self.y = np.asarray(y)
        self.xp = xp
        self.sampler = ShardedSampler(len(x), global_batch, rank, size, seed, shuffle)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def reshard(self, rank: int, size: int) -> None:
        """See :meth:`ShardedSampler.reshard`."""
        self.sampler.reshard(rank, size)

    def batch(self, step: int) -> tuple[Array, Array, Array]:
        """(inputs, labels, global sample indices) of this rank at ``step``."""
        idx = self.sampler.indices(step)
        xb, yb = self.x[idx], self.y[idx]
        if self.xp is not np:
            return self.xp.asarray(xb), self.xp.asarray(yb), self.xp.asarray(idx)
        return xb, yb, idx
