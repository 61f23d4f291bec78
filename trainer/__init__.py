"""trainer: BSP data-parallel training on collective's allreduce, with gradient buckets that overlap backward."""
from __future__ import annotations

from .buckets import GradBucket, GradBuckets, allreduce_hook, default_allocator
from .checkpoint import CheckpointCorruptError, Checkpointer, CheckpointError, read_checkpoint, write_checkpoint
from .compress import fp16_compress_wrapper
from .data import ShardedLoader, ShardedSampler
from .elastic import ElasticState, ElasticStop, Recovery
from .loop import DataParallel, FitResult, StepStats, Timeline, fit, merge_timelines, timeline_path
from .nn import (
    Context,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    Tanh,
    array_module,
    mlp,
)
from .optim import SGD, Adam, Optimizer

__all__ = [
    "SGD",
    "Adam",
    "CheckpointCorruptError",
    "CheckpointError",
    "Checkpointer",
    "Context",
    "Conv2d",
    "DataParallel",
    "ElasticState",
    "ElasticStop",
    "Dropout",
    "FitResult",
    "Flatten",
    "GradBucket",
    "GradBuckets",
    "Linear",
    "Module",
    "Optimizer",
    "Parameter",
    "ReLU",
    "Recovery",
    "Sequential",
    "ShardedLoader",
    "ShardedSampler",
    "SoftmaxCrossEntropy",
    "StepStats",
    "Tanh",
    "Timeline",
    "allreduce_hook",
    "array_module",
    "default_allocator",
    "fit",
    "fp16_compress_wrapper",
    "merge_timelines",
    "mlp",
    "read_checkpoint",
    "timeline_path",
    "write_checkpoint",
]
