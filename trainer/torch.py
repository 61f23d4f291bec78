"""PyTorch adapter: DistributedDataParallel on collective's allreduce, and a comm hook for torch's own DDP.

Terms (the names below follow them). A *bucket* is a group of parameters
whose gradients live in one flat *buffer*; buckets are filled in reverse
registration order (the order backward produces gradients) and capped like the
NumPy trainer's (``trainer.buckets.bucket_caps``: a first bucket of 1 MB so
communication starts early, 25 MB after, ``COLLECTIVE_BUCKET_MB``) when they
are reduced on the communication thread; reduced inline (no core to spare),
all gradients share one bucket unless caps are given, by the same rule.
Every parameter has a *slot*: a view of its shape into its bucket's buffer.

One step, on each rank::

    backward:  param's grad accumulated  -> post-accumulate-grad hook:
                 slot = grad * (1/P)        (one pass: the copy into the bucket does the averaging, as torch DDP does)
                 param.grad = slot          (the optimizer reads the reduced gradient in place)
                 bucket complete?  -> allreduce(buffer, "sum", out=buffer), in bucket order on every rank:
                                      async on the communication thread when a core is spare for it,
                                      else right here (the bucket is still in cache)
    end of backward (autograd's final callback): wait for every bucket

On one node the buffers live in the node's shared window (``comm.alloc``), so
the allreduce is ``shm-window``: each rank reduces its slice reading every
rank's buffer where it lies, and nothing is copied in. Reduced inline, a
bucket's slice that only this rank reads is not even copied into the bucket:
the hook keeps that part of autograd's gradient, and the allreduce reads it
there (``Communicator.allreduce_in_window``; the same bits). ``no_sync()`` skips
all of it (gradients accumulate locally) until the first backward after it.

``model.shard_optimizer(cls, **kw)`` (one node) replaces the allreduce: the
parameters move into one shared copy, each rank owns some of them, and the
returned optimizer's step has each owner average its parameters' gradients
from every rank's slots and update them in place (ZeRO stage 1, nothing
copied back).

For users who keep ``torch.nn.parallel.DistributedDataParallel``:
``ddp.register_comm_hook(CommHookState(comm), allreduce_hook)`` routes DDP's
buckets through collective's allreduce instead of the process group's.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
import zlib
from typing import Any, Iterator

import numpy as np
import torch

import collective
from collective import config
from collective.arrays import to_numpy
from collective import WINDOW_MIN_BYTES  # the size from which alloc'd arrays are reduced in place

from .buckets import DEFAULT_BUCKET_MB, DEFAULT_FIRST_BUCKET_MB, bucket_caps

__all__ = ["DistributedDataParallel", "DDP", "ShardedOptimizer", "CommHookState", "allreduce_hook", "keep_freed_memory",
           "DEFAULT_BUCKET_MB", "DEFAULT_FIRST_BUCKET_MB"]


def _np_dtype(dt: torch.dtype) -> np.dtype:
    """The NumPy dtype holding torch dtype ``dt`` (bfloat16 through ml_dtypes); raises when there is none."""
    return to_numpy(torch.empty(0, dtype=dt))[0].dtype


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit systems
_trim_kept = 0  # the largest trim threshold asked for so far: a second, smaller model must not lower it


def keep_freed_memory(trim_bytes: int) -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of handing them back to the kernel.

    The wrapper copies each fresh gradient into its bucket and drops it, so
    autograd allocates a new one every step. With glibc's defaults a freed
    block of many MB goes back to the kernel (unmapped, or trimmed off the top
    of the heap), and the next step's gradient faults in every page again,
    which shows as a slower backward of every large layer. Blocks up to 32 MiB
    then come from the heap (glibc's largest ``M_MMAP_THRESHOLD``), and up to
    ``trim_bytes`` of free heap is kept (or more, if an earlier call asked
    for more). Process-wide and for the rest of the process: glibc stops
    adapting its mmap threshold, so blocks of 128 KiB to 32 MiB always come
    from the heap and freed ones are reused rather than returned (a process
    whose shapes keep changing may hold more memory). A no-op (False) where
    the C library has no ``mallopt`` (not glibc).
    """
    global _trim_kept
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not glibc (Windows: CDLL(None) is a TypeError)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _trim_kept = max(_trim_kept, min(trim_bytes, (1 << 31) - 1))
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return mallopt(_M_TRIM_THRESHOLD, _trim_kept) == 1 and ok


def _spare_core(comm: Any) -> bool:
    """True when this rank has a core beyond its torch threads for the communication thread."""
    total = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        mine = total
    if mine < total:  # bound by the launcher (mpiexec binds ranks to cores): these cores are this rank's
        return mine > torch.get_num_threads()
    return total > int(getattr(comm, "local_size", 1)) * torch.get_num_threads()


class _Bucket:
    """One bucket: its parameters, their slots in the flat buffer, and this step's state."""

    __slots__ = ("index", "params", "slots", "offsets", "array", "flat", "pending", "ready", "work", "own_slice",
                 "own")

    def __init__(self, index: int, params: list[torch.nn.Parameter], array: np.ndarray, dtype: torch.dtype) -> None:
        self.index = index
        self.params = params
        self.array = array  # the NumPy view the collective reduces (maybe in the shared window)
        flat = torch.from_numpy(array.view(np.int16) if dtype == torch.bfloat16 else array)
        self.flat = flat.view(dtype) if dtype == torch.bfloat16 else flat
        self.slots: list[torch.Tensor] = []
        self.offsets: list[int] = []
        off = 0
        for p in params:
            n = p.numel()
            self.slots.append(self.flat[off:off + n].view(p.shape))
            self.offsets.append(off)
            off += n
        self.pending = len(params)
        self.ready = bytearray(len(params))  # 1 once this step's gradient of params[i] is in its slot
        self.work: Any = None
        #: [start, stop) of the buffer that only this rank reads in the window allreduce (None: not used), and
        #: this step's gradients for parts of it, left where autograd put them: (start, stop, ndarray, scale, param)
        self.own_slice: tuple[int, int] | None = None
        self.own: list[tuple[int, int, np.ndarray, float, torch.nn.Parameter]] = []


class DistributedDataParallel(torch.nn.Module):
    """Data-parallel training of a ``torch.nn.Module`` over collective: torch DDP's contract, our allreduce.

    At construction every rank checks that the models agree and takes rank 0's
    parameters and buffers. During ``loss.backward()`` each bucket's allreduce
    starts as soon as backward has produced all its gradients, and backward
    returns only when every gradient holds its average over the ranks, so
    ``optimizer.step()`` follows as usual.

    Args:
        module: the model (CPU, dense parameters); every rank builds the same one.
        comm: a collective Communicator (default: ``collective.init()``).
        bucket_mb: cap of every bucket but the first, in MB (else ``COLLECTIVE_BUCKET_MB``, else 25; when
            reducing inline, see ``overlap``, and neither is given: a single bucket).
        first_bucket_mb: cap of the first bucket reduced (default 1 MB).
        algorithm: allreduce algorithm (None: the communicator's default, "auto").
        broadcast_buffers: give every rank rank 0's buffers (BatchNorm statistics) before each forward, as DDP does.
        find_unused_parameters: parameters that get no gradient in a step count as zero instead of raising.
        shared_memory: keep the buckets in the node's shared window (default: when every rank is on one node).
        keep_memory: tune glibc's malloc to keep freed blocks (see :func:`keep_freed_memory`; default
            ``COLLECTIVE_KEEP_MEMORY``, else True): the process keeps up to twice the gradient bytes plus
            64 MiB of freed memory for reuse instead of faulting it in again every step.
        overlap: how a complete bucket is reduced. True: its allreduce starts on the communication
            thread and runs while backward goes on. False: it runs at once on this thread, inside
            backward, while the bucket is still in cache. None (default): True when this rank has a
            core to spare beyond its torch threads, else False: on cores that all compute, a
            communication thread only takes cycles from backward (see docs/guides/pytorch.md).

    On one node, :meth:`shard_optimizer` instead keeps one copy of the
    parameters and splits the optimizer over the ranks (no allreduce).

    Example::

        comm = collective.init()
        model = DistributedDataParallel(make_model(), comm)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in shard:
            opt.zero_grad()
            loss_fn(model(x), y).backward()   # gradients averaged over ranks when this returns
            opt.step()
    """

    def __init__(self, module: torch.nn.Module, comm: Any = None, *, bucket_mb: float | None = None,
                 first_bucket_mb: float | None = None, algorithm: str | None = None, broadcast_buffers: bool = True,
                 find_unused_parameters: bool = False, shared_memory: bool | None = None,
                 overlap: bool | None = None, keep_memory: bool | None = None) -> None:
        super().__init__()
        self.module = module
        self.comm = comm if comm is not None else collective.init()
        self.algorithm = algorithm
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        # What rebind() decides again on another communicator, as a construction there would.
        self._overlap_arg, self._bucket_args = overlap, (bucket_mb, first_bucket_mb)
        self._decide_overlap()
        params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.device.type != "cpu" or p.layout != torch.strided:
                raise ValueError(f"DistributedDataParallel: parameter {name} is {p.device}/{p.layout}; the MPI backend "
                                 "reduces dense CPU tensors (a GPU backend is a separate feature)")
            params.append(p)
        if not params:
            raise ValueError("DistributedDataParallel: the module has no parameters that require gradients")
        if keep_memory is None:
            keep_memory = config.get("KEEP_MEMORY")
        if keep_memory and self.comm.size > 1:
            keep_freed_memory(2 * sum(p.numel() * p.element_size() for p in params) + (64 << 20))
        P = self.comm.size
        self._shared_auto = shared_memory is None  # decided again by rebind() for the new communicator
        if shared_memory is None:
            shared_memory = P > 1 and bool(getattr(self.comm, "single_node", False))
        self.shared_memory = shared_memory
        self._scale = 1.0 / P
        self._sync = True
        self._queued = False
        self._next = 0
        self._buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._params = params
        #: under shard_optimizer: the rank that updates each parameter (by id), and whether a backward has put
        #: gradients in the buckets that no step has consumed yet
        self._owner: dict[int, int] | None = None
        #: under shard_optimizer: this rank's parameters, each with the other ranks' slots of its gradient
        self._mine: list[tuple[torch.nn.Parameter, list[torch.Tensor]]] = []
        self._grads_waiting = False
        self._unused: set[int] = set()  # under shard_optimizer: ids of parameters no rank used this step
        self._reduced = False  # under shard_optimizer: this step's gradients are averaged (clip_grad_norm_ did it)
        #: under shard_optimizer: ids of the owned parameters whose gradient the last step averaged, until a
        #: zero_grad; a backward that meets such a gradient adds to an average (averaging again would scale it
        #: by 1/P), which sets _stale
        self._averaged: set[int] = set()
        self._stale = False
        groups = self._assign(params)
        if P > 1:
            self._check_same_layout(groups)  # before comm.alloc: a collective that differing models would hang in
        for group in groups:
            self._build(group)
        self._hooks: list[Any] = []
        if P > 1:
            self._broadcast_state()
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    # ------------------------------------------------------------ layout
    def _decide_overlap(self) -> None:
        """Set ``overlap`` and the bucket caps for ``self.comm`` (collective when ``overlap`` was left to decide)."""
        if self._overlap_arg is None:
            # Whether a core is spare is each rank's own view (its affinity, its torch threads), but the bucket
            # layout follows from it and must be the same on every rank: overlap only if every rank can.
            spare = np.array([1 if _spare_core(self.comm) else 0], np.int32)
            self.overlap = bool(self.comm.allreduce(spare, op="min")[0]) if self.comm.size > 1 else bool(spare[0])
        else:
            self.overlap = bool(self._overlap_arg)
        # Reduced inline, buckets overlap nothing: one bucket unless caps are given (as in the NumPy trainer)
        self.first_cap, self.cap = bucket_caps(*self._bucket_args, self.overlap)

    def _assign(self, params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
        groups: list[list[torch.nn.Parameter]] = []
        cur: list[torch.nn.Parameter] = []
        nbytes = 0
        for p in reversed(params):
            cap = self.first_cap if not groups else self.cap
            b = p.numel() * p.element_size()
            if cur and (nbytes + b > cap or p.dtype != cur[0].dtype):
                groups.append(cur)
                cur, nbytes = [], 0
            cur.append(p)
            nbytes += b
        if cur:
            groups.append(cur)
        return groups

    def _build(self, group: list[torch.nn.Parameter]) -> None:
        dt = group[0].dtype
        npdt = _np_dtype(dt)
        n = sum(p.numel() for p in group)
        if self.shared_memory:
            array = self.comm.alloc(n, npdt)  # collective over the node: every rank builds the same buckets
            array[...] = 0
        else:
            array = np.zeros(n, npdt)
        k = len(self._buckets)
        b = _Bucket(k, group, array, dt)
        if (self.shared_memory and not self.overlap and dt in (torch.float32, torch.float64)
                and self.algorithm in (None, "auto", "shm") and array.nbytes >= WINDOW_MIN_BYTES
                and self.comm.window_slice(n) is not None and self.comm.size > 1):
            # Reduced inline in the window: the part of the bucket only this rank reads is reduced straight
            # from autograd's gradients, never copied in (Communicator.allreduce_in_window).
            b.own_slice = self.comm.window_slice(n)
        for i, p in enumerate(group):
            self._where[id(p)] = (k, i)
        self._buckets.append(b)

    @property
    def bucket_sizes(self) -> list[int]:
        """Bytes of each bucket, in launch order."""
        return [b.array.nbytes for b in self._buckets]

    @staticmethod
    def _fingerprint(groups: list[list[torch.nn.Parameter]]) -> int:
        s = "|".join(f"{k}:{g[0].dtype}:" + ",".join(str(tuple(p.shape)) for p in g) for k, g in enumerate(groups))
        return zlib.crc32(s.encode()) & 0x7FFFFFFF

    def _check_same_layout(self, groups: list[list[torch.nn.Parameter]]) -> None:
        comm = self.comm
        mine = np.array([[self._fingerprint(groups), len(groups), sum(p.numel() for g in groups for p in g)]],
                        np.int64)
        every = comm.allgather(mine)
        bad = [r for r in range(comm.size) if not np.array_equal(every[r], every[0])]
        if bad:
            raise ValueError(f"DistributedDataParallel on rank {comm.rank} of {comm.size}: the model's parameters "
                             f"differ between rank 0 and rank(s) {bad} (layout checksum, buckets, elements: "
                             f"{every[0].tolist()} vs {[every[r].tolist() for r in bad]}); every rank must build the "
                             "same model with the same bucket settings")

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Every rank takes rank 0's parameters (a broadcast per bucket, staged in its gradient buffer) and buffers."""
        comm = self.comm
        for b in self._buckets:
            for p, s in zip(b.params, b.slots):
                s.copy_(p)
            comm.broadcast(b.array, root=0, out=b.array)
            for p, s in zip(b.params, b.slots):
                p.copy_(s)
            b.flat.zero_()
        self._broadcast_buffers()

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        for buf in self.module.buffers():
            if buf.numel():
                comm_buf = buf if buf.is_contiguous() else buf.contiguous()
                self.comm.broadcast(comm_buf, root=0, out=comm_buf)
                if comm_buf is not buf:
                    buf.copy_(comm_buf)

    def rebind(self, comm: Any) -> None:
        """Collective over ``comm``: go on over another communicator (the survivors after a lost rank, a subgroup).

        Rebuilds the buckets on ``comm`` (their shared windows too: the old
        communicator's are not touched again), scales gradients by
        ``1/comm.size``, drops the gradients of an unfinished step, checks that
        every rank's model agrees and gives every rank the parameters and
        buffers of ``comm``'s rank 0 (after a shrink, the lowest surviving
        rank). The optimizer keeps working on the same parameter tensors.
        It makes the same collective calls, in the same order, as the
        constructor on ``comm`` (``overlap`` and the bucket caps are decided
        again there), so ranks new to ``comm`` (replacements after
        ``comm.grow``) construct their wrapper while the others rebind.
        :class:`~collective.trainer.torch_elastic.TorchElasticState` calls it
        during a recovery and when the job grows back.

        Args:
            comm: the communicator to train on from now on; every rank of it calls ``rebind``.

        Raises:
            ValueError: the optimizer is sharded (:meth:`shard_optimizer`: its parameters live in the old
                communicator's shared window), or the models differ between the ranks of ``comm``.

        Example::

            try:
                loss.backward()
            except collective.RanksLostError:
                model.rebind(model.comm.shrink())
        """
        where = f"DistributedDataParallel.rebind on rank {comm.rank} of {comm.size}"
        if self._owner is not None:
            raise ValueError(f"{where}: the optimizer is sharded (shard_optimizer): its parameters live in the old "
                             "communicator's shared window and cannot move; elastic training needs a plain optimizer")
        if self._queued or any(b.work is not None for b in self._buckets):
            self._reset_step()
        self.comm = comm
        P = comm.size
        self._decide_overlap()
        if self._shared_auto:
            self.shared_memory = P > 1 and bool(getattr(comm, "single_node", False))
        self._scale = 1.0 / P
        self._next = 0
        self._buckets, self._where = [], {}
        for p in self._params:  # the unfinished step's gradients point into the old buckets
            p.grad = None
        groups = self._assign(self._params)
        if P > 1:
            self._check_same_layout(groups)
        for group in groups:
            self._build(group)
        if P > 1 and not self._hooks:
            for p in self._params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        elif P == 1:
            for h in self._hooks:
                h.remove()
            self._hooks = []
        if P > 1:
            self._broadcast_state()

    # ---------------------------------------------------------- per step
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (after taking rank 0's buffers when ``broadcast_buffers``)."""
        if self._queued:  # the last backward failed before its end callback: start this step afresh
            self._reset_step()
        if self.broadcast_buffers and self.comm.size > 1 and self.module.training:
            self._broadcast_buffers()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside this context backward only accumulates gradients locally; the first backward after it reduces them.

        Example::

            with model.no_sync():
                loss_fn(model(x1), y1).backward()   # local accumulation
            loss_fn(model(x2), y2).backward()       # reduces the sum of both micro-batches
        """
        old = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = old

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: move ``p``'s gradient into its slot (scaled by 1/P); launch complete buckets."""
        if not self._sync:
            return
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        k, i = self._where[id(p)]
        b = self._buckets[k]
        if b.ready[i]:
            raise RuntimeError(f"DistributedDataParallel on rank {self.comm.rank}: the gradient of a parameter of "
                               f"shape {tuple(p.shape)} was reported twice before its bucket was reduced (two "
                               "backward passes per step need no_sync() around all but the last)")
        if self._owner is not None:
            self._shard_grad_ready(p, b, i)
            return
        slot = b.slots[i]
        with torch.no_grad():
            kept = self._into_slot(p.grad, slot, b, i)
        if not kept:  # else p.grad stays autograd's (local, unscaled, as under torch DDP) until the bucket is
            p.grad = slot  # reduced: part of the slot is filled in only then
        b.ready[i] = 1
        b.pending -= 1
        self._launch_ready(inline=not self.overlap)

    def _into_slot(self, g: torch.Tensor | None, slot: torch.Tensor, b: _Bucket | None = None, i: int = 0) -> bool:
        """``slot = g * (1/P)``: None is a zero contribution, a gradient already in the slot is scaled there.

        Given its bucket ``b`` (index ``i``), the part of ``g`` in this rank's
        own slice may be kept for the window allreduce instead: returns
        whether a part was kept.
        """
        if g is None:
            slot.zero_()
        elif g.data_ptr() == slot.data_ptr() and g.stride() == slot.stride():
            slot.mul_(self._scale)
        elif b is not None and b.own_slice is not None and g.dtype == slot.dtype and g.is_contiguous():
            return self._copy_but_own(b, i, g, slot)
        else:
            torch.mul(g, self._scale, out=slot)
        return False

    def _copy_but_own(self, b: _Bucket, i: int, g: torch.Tensor, slot: torch.Tensor) -> bool:
        """Copy ``g * (1/P)`` into its slot but for the part in this rank's own slice, kept for the allreduce.

        Returns whether a part was kept (else all of it was copied).
        """
        lo = b.offsets[i]
        hi = lo + slot.numel()
        s0, s1 = b.own_slice  # type: ignore[misc]
        a, z = max(lo, s0), min(hi, s1)
        gf, sf, scale = g.detach().reshape(-1), slot.view(-1), self._scale
        if a >= z:
            torch.mul(gf, scale, out=sf)
            return False
        if a > lo:
            torch.mul(gf[:a - lo], scale, out=sf[:a - lo])
        if z < hi:
            torch.mul(gf[z - lo:], scale, out=sf[z - lo:])
        b.own.append((a, z, gf[a - lo:z - lo].numpy(), scale, b.params[i]))  # the view keeps the tensor alive
        return True

    def _launch_ready(self, inline: bool = False) -> None:
        """Start the allreduce of every complete bucket, in bucket order (the same order on every rank).

        ``inline``: run them here, on the caller's thread (no communication thread, nothing to wait for).
        """
        bs = self._buckets
        comm, alg = self.comm, self.algorithm
        while self._next < len(bs) and bs[self._next].pending == 0:
            b = bs[self._next]
            done = False
            if b.own:
                b.own.sort(key=lambda piece: piece[0])
                pieces = [piece[:4] for piece in b.own]
                done = inline and comm.allreduce_in_window(b.array, pieces, alg)
                if not done:
                    for a, z, g, scale in pieces:  # not reduced in the window here: copy the kept parts in
                        np.multiply(g, scale, out=b.array[a:z])
                for piece in b.own:
                    piece[4].grad = b.slots[self._where[id(piece[4])][1]]
                b.own.clear()
            if done:  # reduced by allreduce_in_window
                pass
            elif inline:
                comm.allreduce(b.array, op="sum", algorithm=alg, out=b.array)
            else:
                b.work = comm.allreduce_async(b.array, op="sum", algorithm=alg, out=b.array)
            self._next += 1

    def _finish(self) -> None:
        """End of backward: account for unused parameters, launch what is left, wait for every bucket."""
        self._queued = False
        try:
            missing = [(b, i) for b in self._buckets if b.pending for i in range(len(b.params)) if not b.ready[i]]
            if missing and not self.find_unused_parameters:
                shapes = [tuple(b.params[i].shape) for b, i in missing[:8]]
                raise RuntimeError(f"DistributedDataParallel on rank {self.comm.rank}: backward produced no gradient "
                                   f"for {len(missing)} parameter(s) (shapes {shapes}); pass "
                                   "find_unused_parameters=True if parts of the model are unused in some steps")
            # Every rank takes part (any rank may miss some), as in torch DDP's used-parameter map; flags are
            # read before the loops below give missing parameters a gradient.
            used = self._used_flags() if self.find_unused_parameters and self.comm.size > 1 else None
            if self._owner is not None:  # no bucket collectives under shard_optimizer: agree on them at once
                unused = self._globally_unused(used) if used is not None else set()
                with torch.no_grad():
                    for b, i in missing:  # this rank's part, as if its hook had run (zero unless accumulated)
                        self._shard_grad_ready(b.params[i], b, i)
                self._unused = unused if not self._grads_waiting else self._unused & unused
                self._grads_waiting = True
                return
            with torch.no_grad():
                for b, i in missing:  # a zero contribution unless no_sync accumulated one: others may have used it
                    self._into_slot(b.params[i].grad, b.slots[i])
                    b.params[i].grad = b.slots[i]
                    b.pending -= 1
            self._launch_ready(inline=not self.overlap)
            for b in self._buckets:
                if b.work is not None:
                    b.work.wait()
            if used is not None:
                # After every bucket: ranks that used a parameter reduced its bucket during backward, the others
                # only now, so this allreduce must come after all of them on every rank.
                unused = self._globally_unused(used)
                for b, i in missing:  # unused on every rank: no gradient at all, so optimizers skip it (torch DDP)
                    if id(b.params[i]) in unused:
                        b.params[i].grad = None
        finally:
            self._reset_step()

    def _used_flags(self) -> np.ndarray:
        """1 for every parameter (bucket order) this rank used since its gradients were last reduced."""
        return np.fromiter((1 if b.ready[i] or p.grad is not None else 0
                            for b in self._buckets for i, p in enumerate(b.params)), np.int32)

    def _globally_unused(self, used: np.ndarray) -> set[int]:
        """Ids of the parameters no rank used: a max-allreduce of every rank's :meth:`_used_flags`."""
        every = self.comm.allreduce(used, op="max")
        return {id(p) for p, u in zip((p for b in self._buckets for p in b.params), every) if not u}

    def _reset_step(self) -> None:
        """Every bucket back to the start of a step (after an error too: no launched bucket left running)."""
        self._queued = False
        for b in self._buckets:
            if b.work is not None and not b.work.done():
                with contextlib.suppress(Exception):
                    b.work.wait()
            b.work = None
            b.own.clear()
            b.pending = len(b.params)
            b.ready = bytearray(len(b.params))
        self._next = 0

    # ------------------------------------------------- sharded optimizer
    def shard_optimizer(self, optimizer_class: type, **defaults: Any) -> ShardedOptimizer:
        """Keep one copy of the parameters in the node's shared memory and split the optimizer over the ranks.

        Every parameter gets an *owner* rank (the largest first, each to the
        least loaded rank). After this call backward no longer allreduces:
        each rank leaves its gradient of every parameter it does not own in
        that parameter's bucket slot, and the returned optimizer's ``step()``
        has each owner add the other ranks' gradients of its parameters to
        its own (their average), update them with ``optimizer_class``, and
        write them once, into the memory every rank's model reads. Per rank
        that is 1/P of the optimizer's work and state and no copy of reduced
        gradients or parameters at all (ZeRO stage 1 on shared memory).

        Collective over every rank, before the first step, with the same
        class and arguments on every rank (checked). Needs every rank on one
        node (``shared_memory``) and float32/float64 parameters.

        Differences from a plain optimizer: ``p.grad`` is None for
        parameters another rank owns, and the owner's holds its own gradient
        until the step (or :meth:`ShardedOptimizer.clip_grad_norm_`)
        averages it; clip with ``opt.clip_grad_norm_``, not torch's.
        Gradients must be zeroed between steps (they cannot accumulate
        across steps; checked), and the last backward before a step must
        run outside ``no_sync()`` (checked). ``state_dict()`` holds this
        rank's share; ``opt.optimizer`` is the torch optimizer over this
        rank's parameters (None if it owns none). It is not a
        ``torch.optim.Optimizer`` (no GradScaler). The parameters live in
        the shared window until MPI finalizes.

        Args:
            optimizer_class: a ``torch.optim.Optimizer`` subclass (SGD, Adam, ...).
            **defaults: its arguments (lr, momentum, ...).

        Returns:
            The :class:`ShardedOptimizer` to call ``zero_grad()`` and ``step()`` on.

        Example::

            model = DistributedDataParallel(make_model(), comm)
            opt = model.shard_optimizer(torch.optim.SGD, lr=0.01, momentum=0.9)
            for x, y in shard:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        """
        comm = self.comm
        where = f"DistributedDataParallel.shard_optimizer on rank {comm.rank} of {comm.size}"
        if self._owner is not None:
            raise ValueError(f"{where}: the optimizer is already sharded")
        if self._grads_waiting or self._queued:
            raise ValueError(f"{where}: call it before the first backward")
        if comm.size > 1 and not (self.shared_memory and getattr(comm, "single_node", False)):
            raise ValueError(f"{where}: every rank must be on one node, sharing its memory (shared_memory=True); "
                             "across nodes use a plain optimizer")
        bad = sorted({str(b.flat.dtype) for b in self._buckets} - {"torch.float32", "torch.float64"})
        if bad:
            raise ValueError(f"{where}: parameters of dtype {', '.join(bad)}; sharding takes float32 and float64")
        name = f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"
        sig = f"{name}|{sorted((k, repr(v)) for k, v in defaults.items())}"
        if comm.size > 1:
            every = comm.allgather(np.array([zlib.crc32(sig.encode()) & 0x7FFFFFFF], np.int64))
            odd = [r for r in range(comm.size) if every[r] != every[0]]
            if odd:
                raise ValueError(f"{where}: rank(s) {odd} pass another optimizer or other arguments than rank 0 "
                                 f"(here: {name} with {defaults})")
        load = [0] * comm.size
        owner: dict[int, int] = {}
        for p in sorted(self._params, key=lambda q: -q.numel()):  # same order everywhere (stable sort, same model)
            r = min(range(comm.size), key=lambda q: load[q])
            owner[id(p)] = r
            load[r] += p.numel()
        mine = [p for p in self._params if owner[id(p)] == comm.rank]
        others: dict[int, list[torch.Tensor]] = {id(p): [] for p in mine}
        if comm.size > 1:
            ones: list[torch.Tensor] = []
            with torch.no_grad():
                for b in self._buckets:
                    shared = comm.alloc(b.array.size, b.array.dtype)  # collective over the node, bucket by bucket
                    one = torch.from_numpy(comm.alloc_views(shared)[0])  # local rank 0's: the copy all ranks use
                    if comm.local_rank == 0:
                        for p, off in zip(b.params, b.offsets):
                            one[off:off + p.numel()].copy_(p.reshape(-1))
                    peers = [torch.from_numpy(v) for q, v in enumerate(comm.alloc_views(b.array)) if q != comm.rank]
                    for p, off in zip(b.params, b.offsets):
                        if id(p) in others:
                            others[id(p)] = [v[off:off + p.numel()].view(p.shape) for v in peers]
                    b.own_slice = None
                    ones.append(one)
            comm.barrier()  # rank 0's copy is complete (and fenced) before any rank reads it
            with torch.no_grad():
                for b, one in zip(self._buckets, ones):
                    for p, off in zip(b.params, b.offsets):
                        p.data = one[off:off + p.numel()].view(p.shape)
        for p in mine:  # a tensor hook runs before autograd accumulates: p.grad is still what the step left
            self._hooks.append(p.register_hook(lambda g, p=p: self._before_accumulate(p)))
        self._mine = [(p, others[id(p)]) for p in mine]
        self._owner = owner
        return ShardedOptimizer(self, optimizer_class(mine, **defaults) if mine else None)

    def _before_accumulate(self, p: torch.Tensor) -> None:
        if p.grad is not None and id(p) in self._averaged:
            self._stale = True

    def _shard_grad_ready(self, p: torch.Tensor, b: _Bucket, i: int) -> None:
        """Hook under shard_optimizer: an owned gradient stays; another rank's goes (scaled by 1/P) into its slot."""
        b.ready[i] = 1
        b.pending -= 1
        if self._owner[id(p)] == self.comm.rank:  # type: ignore[index]
            return
        g = p.grad
        with torch.no_grad():
            if not self._grads_waiting:
                self._into_slot(g, b.slots[i])
            elif g is not None:  # a second backward before the step: accumulate, as gradients do
                b.slots[i].add_(g, alpha=self._scale)
        p.grad = None  # its memory goes back to the allocator for the next backward

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.nn.Module.zero_grad``; under shard_optimizer it also drops gradients waiting for the step."""
        super().zero_grad(set_to_none)
        self._grads_waiting = self._stale = False
        self._averaged.clear()

    @torch.no_grad()
    def _shard_reduce(self) -> None:
        """Owners average their parameters' gradients from every rank's slots (once per step; collective)."""
        comm = self.comm
        if self._reduced or comm.size == 1:
            self._reduced = True
            return
        me, P = comm.rank, comm.size
        stale = self._stale
        left = any(p.grad is not None for p in self._params if self._owner[id(p)] != me)  # type: ignore[index]
        flags = comm.allgather(np.array([[1 if self._grads_waiting else 0, int(stale), int(left)]], np.int8))
        where = f"ShardedOptimizer on rank {me} of {P}"
        if flags[:, 1].any():
            raise RuntimeError(f"{where}: rank(s) {np.flatnonzero(flags[:, 1]).tolist()} did not zero the gradients "
                               "since the last step (opt.zero_grad() or model.zero_grad()); under shard_optimizer "
                               "gradients do not accumulate across steps")
        if flags[:, 2].any():
            raise RuntimeError(f"{where}: rank(s) {np.flatnonzero(flags[:, 2]).tolist()} hold gradients of a "
                               "no_sync() backward that no later backward reduced: the last backward before the "
                               "step must run outside no_sync()")
        if flags[:, 0].min() != flags[:, 0].max():
            raise RuntimeError(f"{where}: rank(s) {np.flatnonzero(flags[:, 0] == 0).tolist()} step without a "
                               "backward since their last step or zero_grad, the others after one")
        comm.barrier()  # every rank's slots are written (and fenced) before the owners read them
        if flags[0, 0]:
            for p, others in self._mine:
                g = p.grad
                if g is None and id(p) in self._unused:
                    continue  # no rank used it: no gradient, the optimizer skips it (as under torch DDP)
                if g is None or not g.is_contiguous() or g.dtype != p.dtype:
                    g = torch.zeros_like(p) if g is None else g.contiguous().to(p.dtype)
                torch.add(others[0], g, alpha=self._scale, out=g)  # own * 1/P + the others' (scaled)
                for o in others[1:]:
                    g.add_(o)
                p.grad = g
        self._reduced = True

    def _shard_step(self, inner: Any) -> None:
        """Average (unless clip_grad_norm_ did), update the owned parameters, wait for every owner."""
        comm = self.comm
        self._shard_reduce()
        err: BaseException | None = None
        if inner is not None:
            try:
                inner.step()
            except Exception as exc:  # noqa: BLE001 - reported below, after every rank has finished its share
                err = exc
        self._grads_waiting = self._reduced = False
        self._averaged = {id(p) for p, _ in self._mine if p.grad is not None}
        if comm.size > 1:
            failed = comm.allgather(np.array([1 if err is not None else 0], np.int8))
            comm.barrier()  # every owner's parameters are written before any rank's next forward reads them
            if err is None and failed.any():
                raise RuntimeError(f"ShardedOptimizer.step on rank {comm.rank} of {comm.size}: the optimizer failed on "
                                   f"rank(s) {np.flatnonzero(failed).tolist()}; the parameters they own are not "
                                   "(all) updated")
        if err is not None:
            raise err

    @torch.no_grad()
    def _shard_clip(self, max_norm: float, norm_type: float) -> torch.Tensor:
        self._shard_reduce()
        gs = [p.grad for p, _ in self._mine if p.grad is not None]
        if norm_type == float("inf"):
            part = max((float(g.abs().max()) for g in gs if g.numel()), default=0.0)
            total = float(self.comm.allreduce(np.array([part]), op="max")[0]) if self.comm.size > 1 else part
        else:
            part = sum(float(torch.linalg.vector_norm(g, norm_type, dtype=torch.float64)) ** norm_type for g in gs)
            whole = float(self.comm.allreduce(np.array([part]), op="sum")[0]) if self.comm.size > 1 else part
            total = whole ** (1.0 / norm_type)
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in gs:
                g.mul_(coef)
        return torch.tensor(total)


class ShardedOptimizer:
    """The optimizer :meth:`DistributedDataParallel.shard_optimizer` returns: this rank's share of the update.

    ``step()`` is collective (every rank calls it after the same backward
    passes); ``zero_grad()`` is local. ``optimizer`` is the wrapped torch
    optimizer over this rank's parameters (None if it owns none).
    """

    def __init__(self, model: DistributedDataParallel, optimizer: Any) -> None:
        self.model = model
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (this rank's parameters; change ``lr`` here on every rank)."""
        return self.optimizer.param_groups if self.optimizer is not None else []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop this step's gradients (those waiting in the buckets too): the model's ``zero_grad``."""
        self.model.zero_grad(set_to_none)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Average the gradients now, then scale them so that their norm over every parameter is at most ``max_norm``.

        What ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` does
        after a torch DDP backward; it has to be this call here, since the
        gradients are averaged by their owners (a torch clip before
        ``step()`` would see each rank's own). Collective; call it between
        backward and ``step()``.

        Returns:
            The total norm before clipping (a 0-d tensor, the same on every rank).
        """
        return self.model._shard_clip(float(max_norm), float(norm_type))

    def step(self, closure: Any = None) -> None:
        """Average the owned gradients over the ranks, update the owned parameters, wait for every owner."""
        if closure is not None:
            raise ValueError("ShardedOptimizer.step takes no closure: run forward and backward before it")
        self.model._shard_step(self.optimizer)

    def state_dict(self) -> dict:
        """This rank's share of the optimizer state (the wrapped optimizer's state_dict; {} if it owns nothing)."""
        return self.optimizer.state_dict() if self.optimizer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` returned on this rank."""
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)


DDP = DistributedDataParallel


class CommHookState:
    """State of :func:`allreduce_hook`: the communicator, and one thread that completes DDP's futures in order.

    Our allreduces run in issue order on the communicator's thread; a second
    thread waits on each in turn and completes the torch Future that DDP waits
    on, so DDP overlaps them with backward just as it does its own.

    Args:
        comm: a collective Communicator (default: ``collective.init()``).
        algorithm: allreduce algorithm (None: the communicator's default).
    """

    def __init__(self, comm: Any = None, algorithm: str | None = None) -> None:
        self.comm = comm if comm is not None else collective.init()
        self.algorithm = algorithm
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        raise TypeError("CommHookState holds a live communicator and cannot be pickled (DDP's static graph "
                        "or checkpointing of hook state is not supported)")

    def _complete_later(self, work: Any, fut: torch.futures.Future, tensor: torch.Tensor) -> None:
        with self._lock:
            if self._thread is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, name="collective-ddp-hook", daemon=True)
                self._thread.start()
        self._queue.put((work, fut, tensor))

    def _serve(self) -> None:
        q = self._queue
        while True:
            work, fut, tensor = q.get()
            try:
                work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to DDP, which raises it in backward
                fut.set_exception(exc)
            else:
                fut.set_result(tensor)


def allreduce_hook(state: CommHookState, bucket: Any) -> torch.futures.Future:
    """A torch DDP communication hook that averages each gradient bucket with collective's allreduce.

    Divides the bucket by the number of ranks, then sums it in place over the
    ranks (the arithmetic of torch's default hook), asynchronously.

    Args:
        state: a :class:`CommHookState`.
        bucket: the ``torch.distributed.GradBucket`` DDP hands the hook.

    Returns:
        A future completed with the averaged bucket tensor.

    Example::

        ddp = torch.nn.parallel.DistributedDataParallel(model)   # gloo process group, as usual
        ddp.register_comm_hook(CommHookState(collective.init()), allreduce_hook)
    """
    t = bucket.buffer()
    comm = state.comm
    fut: torch.futures.Future = torch.futures.Future()
    if comm.size == 1:
        fut.set_result(t)
        return fut
    t.div_(comm.size)
    work = comm.allreduce_async(t, op="sum", algorithm=state.algorithm, out=t)
    state._complete_later(work, fut, t)
    return fut


def _annotate_for_torch() -> None:
    # torch checks a hook's annotations by identity (dist.GradBucket, Future[Tensor]); this module's are strings.
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - a torch build without distributed
        return
    allreduce_hook.__annotations__ = {"state": CommHookState, "bucket": dist.GradBucket,
                                      "return": torch.futures.Future[torch.Tensor]}


_annotate_for_torch()
