"""Flat gradient buckets: parameters and gradients live in contiguous buffers; a bucket's allreduce starts when its last gradient is ready.

Terms. A *bucket* is a group of parameters whose values live in one flat
buffer (``bucket.data``) and whose gradients live in another
(``bucket.buffer``); every ``param.data`` and ``param.grad`` is a view into
them, so backward writes gradients straight into the buffer that is reduced,
and the optimizer updates a whole bucket with a few vector operations. Buckets
are filled in *reverse* layer order (the order backward produces gradients),
whole layers at a time, each capped by size: the first at ``first_bucket_mb`` (1 MB, so communication
starts early), the rest at ``bucket_mb`` (25 MB; ``COLLECTIVE_BUCKET_MB``),
like PyTorch DDP. A parameter larger than the cap gets a bucket of its own.

A *comm hook* ``hook(bucket) -> Future`` reduces one bucket
(``allreduce_hook`` by default: one allreduce with ``bucket.op``: "avg"
divides by P once per bucket; "sum" when the gradients were already divided
by P, which the trainer does for free by scaling the loss gradient). When backward reports the last gradient of a
bucket *ready*, the bucket is *launched*: its hook runs and its allreduce
starts on the communicator's thread while backward goes on. Buckets launch
in bucket-index order on every rank (a bucket that is ready early waits for
its predecessors), so every rank issues the same collectives in the same
order. ``wait(i)`` blocks until bucket ``i`` is reduced.

Buffers are allocated once, by a pluggable *allocator* ``(nelems, dtype) ->
1-D array`` (default: zeros from the parameters' array module), so a
communicator's shared-memory ``alloc`` can be dropped in later; nothing is
allocated per step.
"""
from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from collective import config

from .nn import Array, Module, Parameter, array_module

__all__ = [
    "DEFAULT_BUCKET_MB",
    "DEFAULT_FIRST_BUCKET_MB",
    "Allocator",
    "CommHook",
    "Future",
    "GradBucket",
    "GradBuckets",
    "allreduce_hook",
    "bucket_caps",
    "default_allocator",
]

DEFAULT_BUCKET_MB = 25.0
DEFAULT_FIRST_BUCKET_MB = 1.0
_MB = 1 << 20

Allocator = Callable[[int, np.dtype], Array]


class Future(Protocol):
    """What a comm hook returns: ``wait()`` blocks until the bucket's buffer holds the averaged gradients."""

    def wait(self) -> Any: ...

    def done(self) -> bool: ...


CommHook = Callable[["GradBucket"], Future]


def default_allocator(xp: Any = np) -> Allocator:
    """An allocator of zero-filled 1-D arrays from array module ``xp``."""
    def alloc(n: int, dtype: np.dtype) -> Array:
        return xp.zeros(n, dtype=dtype)

    return alloc


class _Done:
    """A Future that is already complete (one rank, or no communicator)."""

    __slots__ = ()

    def wait(self) -> None:
        return None

    def done(self) -> bool:
        return True


_DONE = _Done()


class _WorkFuture:
    """A Future over a collective Work handle."""

    __slots__ = ("work",)

    def __init__(self, work: Any) -> None:
        self.work = work

    def wait(self) -> None:
        self.work.wait()

    def done(self) -> bool:
        return bool(self.work.done())


class GradBucket:
    """One bucket: its parameters, their flat value and gradient buffers, and this step's timings.

    Attributes:
        index: position in launch order (0 = the last layers, reduced first).
        params: the parameters, in bucket (reverse layer) order.
        offsets: (start, stop) of each parameter in the flat buffers.
        data: flat parameter values; ``param.data`` are views into it.
        buffer: flat gradients plus any extra slots; ``param.grad`` are views into it.
            This is what the comm hook reduces.
        grad: ``buffer`` without the extra slots (what the optimizer reads).
        op: the reduction that averages the buffer over ranks: "avg" for raw local gradients, "sum" when
            they are already divided by P (the trainer folds 1/P into the loss gradient).
        comm: the communicator (None when there is nothing to reduce).
        algorithm: the algorithm the hook passes to the collective (None: the communicator's default).
        fallbacks: how many times a compressing hook fell back to full precision.
    """

    def __init__(self, index: int, params: list[Parameter], offsets: list[tuple[int, int]], data: Array,
                 buffer: Array, nelems: int, comm: Any, algorithm: str | None, manager: GradBuckets | None) -> None:
        self.index = index
        self.params = params
        self.offsets = offsets
        self.data = data
        self.buffer = buffer
        self.nelems = nelems
        self.grad = buffer[:nelems]
        self.op = "avg"
        self.comm = comm
        self.algorithm = algorithm
        self.fallbacks = 0
        self._manager = manager
        self._alloc: Allocator | None = None
        self.pending = len(params)
        self.future: Future | None = None
        self.t_ready = self.t_launch = self.t_wait = self.t_done = 0.0

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.buffer.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the gradient buffer (what one allreduce moves)."""
        return int(self.buffer.size) * self.dtype.itemsize

    @property
    def world_size(self) -> int:
        return 1 if self.comm is None else int(self.comm.size)

    def alloc(self, n: int, dtype: Any) -> Array:
        """A buffer from this bucket's allocator (for hooks that need one; call once, keep it)."""
        assert self._alloc is not None
        return self._alloc(n, np.dtype(dtype))

    def with_buffer(self, buffer: Array, op: str) -> GradBucket:
        """A proxy of this bucket that reduces ``buffer`` with ``op`` (for compressing wrappers)."""
        b = GradBucket(self.index, self.params, self.offsets, self.data, buffer, int(buffer.size), self.comm,
                       self.algorithm, self._manager)
        b.op = op
        b._alloc = self._alloc
        return b

    def allreduce_async(self, x: Array, op: str) -> Future:
        """Start an in-place allreduce of ``x`` on the communicator's thread (hooks issue every collective here)."""
        if self.comm is None or self.comm.size == 1:
            return _DONE
        if self._manager is not None:
            self._manager._issue_log.append(self.index)
        return _WorkFuture(self.comm.allreduce_async(x, op=op, algorithm=self.algorithm, out=x))

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.params)
        return f"GradBucket({self.index}, {self.nbytes / _MB:.2f} MB, {self.dtype}, [{names}])"


def allreduce_hook(bucket: GradBucket) -> Future:
    """The default comm hook: average ``bucket.buffer`` over ranks in place (one allreduce with ``bucket.op``).

    Example::

        buckets = GradBuckets(model.parameters(), comm, hook=allreduce_hook)
    """
    return bucket.allreduce_async(bucket.buffer, bucket.op)


#: The cap of the single bucket used when nothing overlaps (see bucket_caps): no model is this large.
ONE_BUCKET = 1 << 62


def bucket_caps(bucket_mb: float | None = None, first_bucket_mb: float | None = None,
                overlap: bool = True) -> tuple[int, int]:
    """(first bucket cap, other buckets' cap) in bytes: arguments, then ``COLLECTIVE_BUCKET_MB``, then 1 MB / 25 MB.

    ``overlap=False`` (buckets reduced after backward or inline, overlapping
    nothing) with no cap given anywhere: one bucket. Each bucket is then only
    a point where the ranks meet and wait out each other's jitter, so more
    buckets buy no overlap and cost one more wait each (``bench/bench_torch.py``
    times the wrapper's step with and without overlap; docs/performance.md).
    """
    if not overlap and bucket_mb is None and first_bucket_mb is None and not config.is_set("BUCKET_MB"):
        return ONE_BUCKET, ONE_BUCKET
    if bucket_mb is None:
        bucket_mb = config.get("BUCKET_MB") if config.is_set("BUCKET_MB") else DEFAULT_BUCKET_MB
    if bucket_mb <= 0:
        raise ValueError(f"bucket size {bucket_mb} MB must be > 0")
    first = DEFAULT_FIRST_BUCKET_MB if first_bucket_mb is None else first_bucket_mb
    if first <= 0:
        raise ValueError(f"first bucket size {first} MB must be > 0")
    return int(min(first, bucket_mb) * _MB), int(bucket_mb * _MB)


class GradBuckets:
    """Moves parameters into flat buckets and reduces their gradients, one async allreduce per bucket.

    Args:
        params: the model's parameters in forward order: ``model.parameter_groups()`` (one list per
            layer: a layer's parameters stay in one bucket) or ``model.parameters()`` (each its own unit).
        comm: a collective Communicator; None reduces nothing (single process).
        bucket_mb: cap of every bucket but the first, in MB (else ``COLLECTIVE_BUCKET_MB``, else 25;
            with ``overlap=False`` and no cap given: one bucket, see ``bucket_caps``).
        first_bucket_mb: cap of bucket 0 (default 1 MB, or bucket_mb if smaller).
        hook: the comm hook (default ``allreduce_hook``); wrap it to compress.
        algorithm: allreduce algorithm for the hook (None: the communicator's default).
        overlap: launch each bucket as soon as it is ready (True), or all of them
            after backward has finished (False; for measuring what overlap buys).
        allocator: ``(nelems, dtype) -> 1-D array`` for gradient buffers (default:
            zeros from the parameters' array module); e.g. a communicator's
            shared-memory ``alloc``.
        param_allocator: the same for parameter buffers.
        extra: extra slots at the end of bucket 0's buffer, reduced with the
            gradients (the trainer averages its loss there for free).
        op: the allreduce op that averages: "avg" (sum, then divide by P once per
            bucket) or "sum" (the gradients are already divided by P).

    Example::

        buckets = GradBuckets(model.parameter_groups(), comm)
        model.register_grad_ready_hook(buckets.mark_ready)
        buckets.broadcast_parameters()
        buckets.begin(); model.backward(dy); buckets.finish()
        for i in range(len(buckets)):
            buckets.wait(i)          # bucket i's gradients are now averaged over ranks
    """

    def __init__(self, params: Sequence[Parameter] | Sequence[Sequence[Parameter]], comm: Any = None, *,
                 bucket_mb: float | None = None, first_bucket_mb: float | None = None, hook: CommHook | None = None, algorithm: str | None = None,
                 overlap: bool = True, allocator: Allocator | None = None, param_allocator: Allocator | None = None,
                 extra: int = 0, op: str = "avg") -> None:
        if op not in ("avg", "sum"):
            raise ValueError(f"GradBuckets: op {op!r} must be 'avg' or 'sum'")
        units = [list(u) if isinstance(u, (list, tuple)) else [u] for u in params]
        units = [u for u in units if u]
        params = [p for u in units for p in u]
        if not params:
            raise ValueError("GradBuckets: the model has no parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("GradBuckets: a parameter appears twice in the list")
        self.comm = comm
        self.hook: CommHook = hook or allreduce_hook
        self.op = op
        self.overlap = overlap
        self.first_cap, self.cap = bucket_caps(bucket_mb, first_bucket_mb, overlap)
        xp = array_module(params[0].data)
        grad_alloc = allocator or default_allocator(xp)
        param_alloc = param_allocator or default_allocator(xp)
        self.buckets: list[GradBucket] = []
        self._where: dict[int, int] = {}
        self._issue_log: list[int] = []
        self._views: dict[int, tuple[Array, list[Array]]] = {}  # set_data: a buffer's parameter views
        groups = self._assign(units)
        sizes = [sum(p.size for p in g) + (extra if i == 0 else 0) for i, g in enumerate(groups)]
        self._fingerprint = zlib.crc32("|".join(
            f"{n}:{g[0].dtype}:" + ",".join(f"{p.name}{p.shape}" for p in g) for n, g in zip(sizes, groups)
        ).encode()) & 0x7FFFFFFF
        # Before allocating: a shared-memory allocator is collective, and must see the same sizes everywhere.
        self.check_same_layout(len(groups), sum(sizes))
        for group in groups:
            self._build(group, grad_alloc, param_alloc, algorithm, extra if not self.buckets else 0)
        self._next = 0  # the next bucket to launch this step
        self._nan_check = config.get("NAN_CHECK")
        self._t_first_launch = 0.0
        self.extra: Array = self.buckets[0].buffer[self.buckets[0].nelems:]

    # ------------------------------------------------------------ layout
    def _assign(self, units: list[list[Parameter]]) -> list[list[Parameter]]:
        # Units (a layer's parameters, reported ready together) are never split across buckets: a bucket
        # holding one layer's weight and the previous layer's bias could only launch a layer later.
        groups: list[list[Parameter]] = []
        cur: list[Parameter] = []
        nbytes = 0
        for unit in reversed(units):
            for p in unit[1:]:
                if p.dtype != unit[0].dtype or array_module(p.data) is not array_module(unit[0].data):
                    raise ValueError(f"GradBuckets: parameters {unit[0].name!r} and {p.name!r} of one layer differ in "
                                     "dtype or array module; pass them as separate units")
            cap = self.first_cap if not groups else self.cap
            b = sum(p.size * p.dtype.itemsize for p in unit)
            if cur and (nbytes + b > cap or unit[0].dtype != cur[0].dtype
                        or array_module(unit[0].data) is not array_module(cur[0].data)):
                groups.append(cur)
                cur, nbytes = [], 0
            cur.extend(reversed(unit))
            nbytes += b
        if cur:
            groups.append(cur)
        return groups

    def _build(self, group: list[Parameter], grad_alloc: Allocator, param_alloc: Allocator, algorithm: str | None,
               extra: int) -> None:
        dtype = group[0].dtype
        offsets, off = [], 0
        for p in group:
            offsets.append((off, off + p.size))
            off += p.size
        data = param_alloc(off, dtype)
        buffer = grad_alloc(off + extra, dtype)
        for buf, what in ((data, "parameter"), (buffer, "gradient")):
            if buf.ndim != 1 or buf.dtype != dtype or not buf.flags.c_contiguous:
                raise ValueError(f"GradBuckets: the {what} allocator returned shape {buf.shape}, dtype {buf.dtype}; "
                                 f"expected a contiguous 1-D {dtype} array")
        k = len(self.buckets)
        for p, (a, b) in zip(group, offsets):
            data[a:b] = p.data.reshape(-1)
            p.data = data[a:b].reshape(p.shape)
            p.grad = buffer[a:b].reshape(p.shape)
            p.grad[...] = 0
            self._where[id(p)] = k
        bucket = GradBucket(k, group, offsets, data, buffer, off, self.comm, algorithm, self)
        bucket._alloc = grad_alloc
        bucket.op = self.op
        self.buckets.append(bucket)

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> GradBucket:
        return self.buckets[i]

    def __iter__(self):
        return iter(self.buckets)

    @property
    def params(self) -> list[Parameter]:
        """Every parameter, in bucket order."""
        return [p for b in self.buckets for p in b.params]

    @property
    def nbytes(self) -> int:
        """Total bytes of gradients reduced per step."""
        return sum(b.nbytes for b in self.buckets)

    def set_data(self, i: int, data: Array) -> None:
        """Make ``data`` (same size, dtype and array module) bucket ``i``'s parameter buffer; the parameters view it.

        The optimizer's double buffering swaps two such buffers every step; the
        views are cut once per buffer and reused.
        """
        b = self.buckets[i]
        if data.shape != b.data.shape or data.dtype != b.data.dtype:
            raise ValueError(f"GradBuckets.set_data({i}): shape {data.shape}, dtype {data.dtype}; bucket {i} holds "
                             f"{b.data.shape} {b.data.dtype}")
        key = id(data)
        views = self._views.get(key)
        if views is None or views[0] is not data:
            if len(self._views) > 4 * len(self.buckets):  # buffers that are gone: start over
                self._views.clear()
            views = (data, [data[a:z].reshape(p.shape) for p, (a, z) in zip(b.params, b.offsets)])
            self._views[key] = views
        b.data = data
        for p, v in zip(b.params, views[1]):
            p.data = v

    # ------------------------------------------------------- setup checks
    def fingerprint(self) -> int:
        """A checksum of the bucket layout (names, shapes, dtypes, bucket boundaries)."""
        return self._fingerprint

    def check_same_layout(self, nbuckets: int | None = None, nelems: int | None = None) -> None:
        """Collective: raise on every rank if the ranks' models or bucket settings differ.

        Called on construction, before any buffer is allocated or any bucket reduced.
        """
        comm = self.comm
        if comm is None or comm.size == 1:
            return
        if nbuckets is None:
            nbuckets, nelems = len(self.buckets), sum(b.buffer.size for b in self.buckets)
        mine = np.array([self.fingerprint(), nbuckets, nelems], np.int64)
        every = comm.allgather(mine.reshape(1, 3))
        bad = [r for r in range(comm.size) if not np.array_equal(every[r], every[0])]
        if bad:
            raise ValueError(f"GradBuckets on rank {comm.rank} of {comm.size}: the model's parameters differ between "
                             f"rank 0 and rank(s) {bad} (layout checksum, bucket count, elements: "
                             f"{every[0].tolist()} vs {[every[r].tolist() for r in bad]}); every rank must build the "
                             "same model with the same bucket settings")

    def broadcast_parameters(self, root: int = 0) -> None:
        """Give every rank ``root``'s parameter values (one broadcast per bucket)."""
        comm = self.comm
        if comm is None or comm.size == 1:
            return
        for b in self.buckets:
            comm.broadcast(b.data, root=root, out=b.data)

    # ---------------------------------------------------------- per step
    def begin(self) -> None:
        """Start a step: every parameter's gradient is pending again."""
        for b in self.buckets:
            if b.future is not None and b.t_done == 0.0:
                raise RuntimeError(f"GradBuckets.begin: bucket {b.index} of the previous step was never waited for; "
                                   "call wait_all() (or the optimizer step) before the next backward")
            b.pending = len(b.params)
            b.future = None
            b.t_ready = b.t_launch = b.t_wait = b.t_done = 0.0
        self._next = 0
        self._issue_log.clear()
        self._t_first_launch = 0.0

    def mark_ready(self, module: Module | None, params: Sequence[Parameter]) -> None:
        """Grad-ready hook: ``params``' gradients are final; launch every bucket that is now complete, in order."""
        now = time.monotonic()
        for p in params:
            k = self._where.get(id(p))
            if k is None:
                raise KeyError(f"GradBuckets: parameter {p.name or p!r} of {module!r} is not in any bucket")
            b = self.buckets[k]
            if b.pending <= 0:
                raise RuntimeError(f"GradBuckets: gradient of {p.name or p!r} reported ready twice in one step "
                                   f"(bucket {k}); call begin() at the start of every step")
            b.pending -= 1
            if b.pending == 0:
                b.t_ready = now
        if self.overlap:
            self._launch_ready()

    def _launch_ready(self) -> None:
        bs = self.buckets
        while self._next < len(bs) and bs[self._next].pending == 0:
            self._launch(bs[self._next])
            self._next += 1

    def _launch(self, b: GradBucket) -> None:
        b.t_launch = time.monotonic()
        if not self._t_first_launch:
            self._t_first_launch = b.t_launch
        if self._nan_check:
            self._report_nonfinite(b)
        b.future = self.hook(b)

    def _report_nonfinite(self, b: GradBucket) -> None:
        """COLLECTIVE_NAN_CHECK=1: name the rank, bucket and parameters whose gradients hold NaN or Inf."""
        xp = array_module(b.grad)
        if bool(xp.isfinite(b.grad).all()):
            return
        names = [p.name or f"#{i}" for i, (p, (a, z)) in enumerate(zip(b.params, b.offsets))
                 if not bool(xp.isfinite(b.grad[a:z]).all())]
        rank = getattr(b.comm, "rank", 0)
        sys.stderr.write(f"collective: rank {rank}: bucket {b.index} holds NaN or Inf before its allreduce, "
                         f"in the gradients of {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}\n")
        sys.stderr.flush()

    def finish(self) -> None:
        """End of backward: check every gradient was reported, and launch what has not been launched."""
        missing = [p.name or repr(p) for b in self.buckets if b.pending for p in b.params][:10]
        if missing:
            raise RuntimeError(f"GradBuckets: backward finished without reporting the gradients of {missing}; "
                               "every parameter must get a gradient each step (all ranks run the same model)")
        self._launch_ready()

    def wait(self, i: int) -> GradBucket:
        """Block until bucket ``i``'s buffer holds the gradients averaged over ranks; return the bucket."""
        b = self.buckets[i]
        if b.future is None:
            raise RuntimeError(f"GradBuckets.wait({i}): bucket {i} was not launched; call finish() after backward")
        if not b.t_done:
            b.t_wait = time.monotonic()
            b.future.wait()
            b.t_done = time.monotonic()
        return b

    def wait_all(self) -> None:
        """Wait for every bucket, in launch order."""
        for i in range(len(self.buckets)):
            self.wait(i)

    # ------------------------------------------------------------ timing
    def comm_spans(self) -> list[list[tuple[float, float]]]:
        """For each bucket, the (start, end) ``time.monotonic()`` spans of this step's collectives on the comm thread.

        Read from the communicator's flight recorder: the hooks' collectives run
        in issue order on one thread, so the i-th allreduce recorded after the
        first launch is the i-th one issued. Empty lists when unknown.
        """
        out: list[list[tuple[float, float]]] = [[] for _ in self.buckets]
        log = self._issue_log
        trace = getattr(self.comm, "trace", None)
        if not log or trace is None or not self._t_first_launch:
            return out
        t0 = self._t_first_launch - 1e-6
        recs = [(r.t_start, r.t_end) for r in trace() if r.op == "allreduce" and r.t_start >= t0]
        if len(recs) < len(log):
            return out
        for k, (a, b) in zip(log, recs):
            if b is not None:
                out[k].append((a, b))
        return out
