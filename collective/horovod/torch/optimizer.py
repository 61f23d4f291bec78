"""hvd.DistributedOptimizer: gradients allreduced as backward produces them, applied by the wrapped optimizer."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .compression import Compression
from .mpi_ops import (
    Adasum,
    Average,
    ProcessSet,
    allreduce_async_,
    global_process_set,
    grouped_allreduce_async_,
    sparse_allreduce_async,
    synchronize,
)

__all__ = ["DistributedOptimizer"]


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the user's optimizer class by :func:`DistributedOptimizer` (its methods override step etc.)."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any, backward_passes_per_step: int, op: int,
                 gradient_predivide_factor: float, groups: Any, sparse_as_dense: bool,
                 process_set: ProcessSet) -> None:
        base: Any = super(self.__class__, self)  # the user's optimizer class, mixed in: its own __init__ signature
        base.__init__(params)
        self._compression = compression
        all_params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            if any(not (isinstance(x, tuple) and len(x) == 2) for x in named):
                raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, usually "
                                 "model.named_parameters()")
            names = [n for n, _ in named]
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                raise ValueError(f"Parameter names in named_parameters must be unique; found duplicates: {dups}")
            known = {id(p) for _, p in named}
            unnamed = [i for i, p in enumerate(all_params) if id(p) not in known]
            if unnamed:
                raise ValueError("named_parameters was specified, but one or more model parameters were not named "
                                 f"(positions {unnamed} of the optimizer's parameters); pass every parameter")
            self._parameter_names = {p: f"DistributedOptimizer.{n}" for n, p in named}
        else:
            self._parameter_names = {p: f"DistributedOptimizer.noname.{i}" for i, p in enumerate(all_params)}
        self.backward_passes_per_step = backward_passes_per_step
        self._allreduce_delay = {p: backward_passes_per_step for p in all_params}
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._handles: dict[Any, tuple[Any, Any]] = {}
        self._hook_handles: list[Any] = []
        self._synchronized = False
        self._should_synchronize = True
        self._groups: list[tuple] | None = None
        self._p_to_group: dict[Any, tuple] = {}
        self._group_counts: dict[tuple, int] = {}
        trainable = [p for p in all_params if p.requires_grad]
        if groups is not None:
            if isinstance(groups, int):
                if groups < 0:
                    raise ValueError("groups should be a non-negative integer or a list of lists of torch.Tensor")
                if groups > 0:
                    k = -(-len(trainable) // groups)
                    self._groups = [tuple(trainable[i:i + k]) for i in range(0, len(trainable), k)]
            elif isinstance(groups, list):
                seen: set[int] = set()
                gs = []
                for g in groups:
                    for p in g:
                        if not isinstance(p, torch.Tensor):
                            raise ValueError("groups must consist of torch.Tensor")  # noqa: TRY004 - Horovod's
                        if id(p) in seen:
                            raise ValueError("A parameter can only appear once in groups")
                        seen.add(id(p))
                    gs.append(tuple(g))
                gs += [(p,) for p in trainable if id(p) not in seen]
                self._groups = gs
            else:
                raise ValueError("groups should be a non-negative integer or a list of lists of torch.Tensor")
            if self._groups is not None:
                for g in self._groups:
                    self._group_counts[g] = 0
                    for p in g:
                        self._p_to_group[p] = g
        self._requires_update = set(trainable)
        self._register_hooks()

    def load_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._handles.clear()
        self._synchronized = False
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        for g in self._group_counts:  # a restore (hvd.elastic) may come mid-backward, some groups half counted
            self._group_counts[g] = 0
        super(self.__class__, self).load_state_dict(*args, **kwargs)

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change how many backward passes accumulate locally before each allreduce."""
        self.backward_passes_per_step = passes
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = passes

    def _register_hooks(self) -> None:
        if self.process_set.process_set_id and not self.process_set.included():
            return  # a rank outside the set steps on its own gradients, as in Horovod
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(self._make_hook(p)))

    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple[Any, Any]:
        tensor = p.grad
        if tensor is None:
            # Another rank may have a gradient for it (a dynamic graph): every rank must submit.
            tensor = p.grad = torch.zeros_like(p.data)
        name = self._parameter_names.get(p)
        if tensor.is_sparse:
            if self.sparse_as_dense:
                tensor = tensor.to_dense()
            else:
                return sparse_allreduce_async(tensor, name=name, op=self.op, process_set=self.process_set), None
        compressed, ctx = self._compression.compress(tensor)
        pre, post = ((1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor) if self.op == Average
                     else (1.0, 1.0))
        h = allreduce_async_(compressed, name=name, op=self.op, prescale_factor=pre, postscale_factor=post,
                             process_set=self.process_set)
        return h, (ctx, compressed)

    def _grouped_allreduce_grad_async(self, ps: tuple) -> tuple[Any, Any]:
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p.data)
        pairs = [self._compression.compress(p.grad.to_dense() if p.grad.is_sparse else p.grad) for p in ps]
        pre, post = ((1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor) if self.op == Average
                     else (1.0, 1.0))
        h = grouped_allreduce_async_([c for c, _ in pairs], name=self._parameter_names.get(ps[0]), op=self.op,
                                     prescale_factor=pre, postscale_factor=post, process_set=self.process_set)
        return h, [(ctx, c) for c, ctx in pairs]

    def _make_hook(self, p: torch.Tensor) -> Any:
        def hook(*ignore: Any) -> None:
            if p in self._handles and self._handles[p][0] is not None and self._allreduce_delay[p] <= 0:
                raise AssertionError("Gradients were computed more than backward_passes_per_step times before "
                                     "call to step(). Increase backward_passes_per_step to accumulate gradients "
                                     "locally.")
            self._allreduce_delay[p] -= 1
            handle, ctx = None, None
            if self._allreduce_delay[p] == 0:
                if self._groups is not None:
                    g = self._p_to_group[p]
                    self._group_counts[g] += 1
                    if self._group_counts[g] == len(g):
                        self._handles[g] = self._grouped_allreduce_grad_async(g)
                        for gp in g:
                            self._handles.pop(gp, None)
                        self._group_counts[g] = 0
                        return
                else:
                    handle, ctx = self._allreduce_grad_async(p)
            self._handles[p] = (handle, ctx)
        return hook

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (starting those whose hooks did not fire) and install the results."""
        if self.process_set.process_set_id and not self.process_set.included():
            self._synchronized = True
            return
        done: set = set()
        for k in self._handles:
            done.update(k) if isinstance(k, tuple) else done.add(k)
        if self._groups is not None:
            for g in self._groups:
                if any(p not in done for p in g if p in self._requires_update) and g not in self._handles:
                    for gp in g:
                        self._handles.pop(gp, None)
                    self._handles[g] = self._grouped_allreduce_grad_async(g)
                    self._group_counts[g] = 0
        else:
            for p in sorted(self._requires_update - done, key=lambda q: self._parameter_names[q]):
                self._handles[p] = self._allreduce_grad_async(p)
            for p, (h, ctx) in list(self._handles.items()):
                if h is None:
                    self._handles[p] = self._allreduce_grad_async(p)
        for key, (h, ctx) in self._handles.items():
            if isinstance(key, tuple):
                outs = synchronize(h)
                for gp, out, (c, _) in zip(key, outs, ctx):
                    self._allreduce_delay[gp] = self.backward_passes_per_step
                    self._install(gp, self._compression.decompress(out, c))
            else:
                self._allreduce_delay[key] = self.backward_passes_per_step
                out = h() if callable(h) else synchronize(h)
                if ctx is None:  # sparse allreduce
                    key.grad = out
                else:
                    self._install(key, self._compression.decompress(out, ctx[0]))
        self._handles.clear()
        self._synchronized = True

    @staticmethod
    def _install(p: torch.Tensor, value: torch.Tensor) -> None:
        grad = p.grad
        assert grad is not None  # every parameter has one once its allreduce was submitted
        if grad.is_sparse:
            p.grad = value.to_sparse()
        elif value.data_ptr() != grad.data_ptr():
            grad.copy_(value)

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Within this context ``step()`` does not synchronize (call ``synchronize()`` yourself before)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause "
                                 "a race condition.")
        return super(self.__class__, self).zero_grad(*args, **kwargs)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1, op: int = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups: Any = None,
                         sparse_as_dense: bool = False,
                         process_set: ProcessSet = global_process_set) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged (``op``) over the ranks.

    Each parameter's gradient is allreduced as soon as backward has accumulated
    it ``backward_passes_per_step`` times (local sums in between), overlapping
    the rest of backward; ``step()`` waits for them first.

    Args:
        optimizer: any torch optimizer; its class is subclassed, its param groups reused.
        named_parameters: ``model.named_parameters()``: names that match the allreduces across ranks.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        backward_passes_per_step: backward passes accumulated locally per allreduce.
        op: hvd.Average (default) or hvd.Sum (Adasum is not supported).
        gradient_predivide_factor: with Average, scale by 1/f before the sum and f/size after.
        num_groups: deprecated spelling of ``groups`` as an integer.
        groups: an integer (split the parameters into that many fused allreduces) or a list of lists of
            parameters (each list one fused allreduce; the others alone).
        sparse_as_dense: allreduce sparse gradients as dense tensors.
        process_set: reduce over these ranks only.

    Example::

        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size()),
                                       named_parameters=model.named_parameters())
    """
    if op == Adasum:
        raise NotImplementedError("DistributedOptimizer: op=hvd.Adasum is not supported by collective.horovod; "
                                  "use hvd.Average")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning)
        if groups is None:
            groups = num_groups
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor, groups, sparse_as_dense, process_set)
