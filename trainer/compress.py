"""Gradient compression as comm-hook wrappers: fp16 allreduce with pre-division and a full-precision fallback.

A wrapper takes a comm hook and returns one (PyTorch's ``fp16_compress_wrapper``
shape): compression is composed around the reduction, never a flag inside it.

``fp16_compress_wrapper``: the bucket's gradients are divided by P while being
cast to float16 (dividing *before* the sum keeps the sum of P gradients from
overflowing float16's 65504; gradients the trainer already divided by P,
``bucket.op == "sum"``, are only cast), the inner hook sums the half-precision copy,
and the result is cast back into the bucket. If the reduced copy holds an inf
or a NaN (an overflow, or a gradient that was not finite), the bucket is
reduced again in full precision instead. The reduced copy is bitwise identical
on every rank, so every rank takes the same branch and issues the same
collectives in the same order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .buckets import CommHook, Future, GradBucket, allreduce_hook
from .nn import Array, array_module

__all__ = ["fp16_compress_wrapper"]


class _Decompress:
    """Future of a compressed bucket: waits, checks the result is finite, casts back or falls back."""

    __slots__ = ("_done", "bucket", "half", "hook", "inner")

    def __init__(self, inner: Future, bucket: GradBucket, half: Array, hook: CommHook) -> None:
        self.inner, self.bucket, self.half, self.hook = inner, bucket, half, hook
        self._done = False

    def done(self) -> bool:
        return self._done or self.inner.done()

    def wait(self) -> None:
        if self._done:
            return
        self.inner.wait()
        half, b = self.half, self.bucket
        xp = array_module(half)
        # A sum in float32 is finite exactly when every element is (|x| <= 65504, at most 2^31 of them).
        if bool(xp.isfinite(half.sum(dtype=xp.float32))):
            b.buffer[...] = half
        else:
            b.fallbacks += 1
            self.hook(b).wait()  # the original gradients are untouched: reduce them in full precision
        self._done = True


def fp16_compress_wrapper(hook: CommHook = allreduce_hook, dtype: Any = np.float16) -> CommHook:
    """Wrap ``hook`` so each bucket is reduced in half precision (pre-divided by P), falling back on inf/NaN.

    Args:
        hook: the hook that reduces a buffer (default ``allreduce_hook``).
        dtype: the compressed dtype (float16; bfloat16 where the array library has it).

    Returns:
        A comm hook for ``GradBuckets(hook=...)``. Its half-precision buffers are
        allocated on a bucket's first use, from the bucket's allocator, and reused.

    Example::

        dp = DataParallel(model, comm, hook=fp16_compress_wrapper(allreduce_hook))
    """
    dtype = np.dtype(dtype)
    proxies: dict[int, tuple[Array, GradBucket]] = {}

    def fp16_hook(bucket: GradBucket) -> Future:
        P = bucket.world_size
        if P == 1:
            return hook(bucket)
        got = proxies.get(id(bucket))
        if got is None or got[0].size != bucket.buffer.size:
            half = bucket.alloc(bucket.buffer.size, dtype)
            got = proxies[id(bucket)] = (half, bucket.with_buffer(half, op="sum"))
        half, proxy = got
        xp = array_module(half)
        div = P if bucket.op == "avg" else 1  # "sum": already divided by P
        if xp is np:
            with np.errstate(over="ignore"):  # an overflow becomes inf, which wait() detects and falls back on
                np.divide(bucket.buffer, div, out=half, casting="unsafe")
        else:
            xp.divide(bucket.buffer, div, out=half, casting="unsafe")
        return _Decompress(hook(proxy), bucket, half, hook)

    fp16_hook.__name__ = f"fp16_compress_wrapper({getattr(hook, '__name__', 'hook')})"
    return fp16_hook
