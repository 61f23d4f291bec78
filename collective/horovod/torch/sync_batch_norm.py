"""hvd.SyncBatchNorm: batch normalization whose statistics are computed over the batches of every rank."""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .mpi_ops import Sum, allreduce, global_process_set

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the union of all ranks' batches in training (plain BatchNorm in eval).

    The per-channel count, sum and sum of squares are allreduced with hvd.Sum,
    whose gradient is itself an allreduce, so backward is exact for the global
    batch. Inputs of any rank >= 2 (N, C, ...) are accepted.

    Example::

        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), hvd.SyncBatchNorm(8))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_set: Any = global_process_set) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return super().forward(input)
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_n = torch.tensor([x.numel() / c], dtype=x.dtype)
        stats = torch.cat([local_n, x.sum(dims), (x * x).sum(dims)])
        tot = allreduce(stats, op=Sum, name=None, process_set=self.process_set)
        n = tot[0]
        mean = tot[1:1 + c] / n
        var = tot[1 + c:] / n - mean * mean
        if self.training and self.track_running_stats:
            tracked, rmean, rvar = self.num_batches_tracked, self.running_mean, self.running_var
            assert tracked is not None and rmean is not None and rvar is not None  # track_running_stats keeps them
            with torch.no_grad():
                tracked.add_(1)
                m = (1.0 / float(tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                rmean.mul_(1 - m).add_(mean.detach() * m)
                rvar.mul_(1 - m).add_(unbiased.detach() * m)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)
