"""SGD (momentum, Nesterov, weight decay) and Adam over flat gradient buckets, updated bucket by bucket as each is reduced.

An optimizer works on a ``GradBuckets``: its state (momentum, Adam's moments)
is one flat buffer per bucket, allocated once, so a bucket's update is a few
whole-buffer vector operations with ``out=`` and allocates nothing. ``step()``
waits for bucket 0, updates it, waits for bucket 1, ...: the update of the
first buckets overlaps the reduction of the later ones.

Every rank starts from rank 0's parameters (``GradBuckets.broadcast_parameters``)
and applies the same elementwise operations to the same averaged gradients
(bitwise identical on every rank), so the ranks' parameters stay bitwise
identical. The formulas follow ``torch.optim.SGD`` and ``torch.optim.Adam``.
"""
from __future__ import annotations

import math
from typing import Any

from .buckets import GradBuckets
from .nn import Array, array_module

__all__ = ["SGD", "Adam", "Optimizer"]


class Optimizer:
    """Base: per-bucket flat state buffers, a step counter, and per-parameter views for checkpoints.

    Args:
        buckets: the model's GradBuckets.
        lr: learning rate (may be changed between steps: ``opt.lr = ...``).
    """

    #: Names of the per-element state buffers.
    state_names: tuple[str, ...] = ()

    def __init__(self, buckets: GradBuckets, lr: float) -> None:
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: lr={lr} must be >= 0")
        self.buckets = buckets
        self.lr = float(lr)
        #: Steps taken so far (Adam's bias correction and SGD's first momentum step read it).
        self.t = 0
        xp = array_module(buckets[0].data)
        self.state: dict[str, list[Array]] = {
            name: [xp.zeros_like(b.data) for b in buckets] for name in self.state_names}
        self._tmp: list[Array] = [xp.empty_like(b.data) for b in buckets]

    def update(self, i: int) -> None:
        """Apply this step's update to bucket ``i`` (its gradients must already be reduced)."""
        raise NotImplementedError

    def step(self) -> None:
        """Wait for each bucket's reduction in order and update it; then count the step."""
        for i in range(len(self.buckets)):
            self.buckets.wait(i)
            self.update(i)
        self.end_step()

    def end_step(self) -> None:
        """Count a finished step (after every bucket's :meth:`update`)."""
        self.t += 1

    # -------------------------------------------------------- checkpoints
    def hyperparams(self) -> dict[str, Any]:
        """The settings (for checkpoint metadata and checks on resume)."""
        return {"lr": self.lr}

    def state_arrays(self) -> dict[str, Array]:
        """Every state buffer, one view per parameter: ``{"momentum/0.weight": array, ...}``."""
        out: dict[str, Array] = {}
        for name, bufs in self.state.items():
            for b, buf in zip(self.buckets, bufs):
                for p, (a, z) in zip(b.params, b.offsets):
                    out[f"{name}/{p.name}"] = buf[a:z].reshape(p.shape)
        return out

    def load_state_arrays(self, arrays: dict[str, Any], t: int) -> None:
        """Restore the state written by :meth:`state_arrays` and the step counter."""
        xp = array_module(self.buckets[0].data)
        for name, bufs in self.state.items():
            for b, buf in zip(self.buckets, bufs):
                for p, (a, z) in zip(b.params, b.offsets):
                    key = f"{name}/{p.name}"
                    if key not in arrays:
                        raise KeyError(f"{type(self).__name__}: the checkpoint has no state {key!r}")
                    v = arrays[key]
                    if tuple(v.shape) != p.shape:
                        raise ValueError(f"{type(self).__name__}: state {key!r} has shape {tuple(v.shape)}, "
                                         f"the parameter {p.shape}")
                    buf[a:z] = xp.asarray(v).reshape(-1)
        self.t = int(t)

    def _views(self, i: int) -> tuple[Array, Array, Array]:
        b = self.buckets[i]
        return b.data, b.grad, self._tmp[i]


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov momentum and L2 weight decay (torch semantics).

    Args:
        buckets: the model's GradBuckets.
        lr: learning rate.
        momentum: momentum factor (0 = plain SGD).
        weight_decay: L2 penalty added to the gradient.
        dampening: dampening of the momentum.
        nesterov: Nesterov momentum.

    Example::

        opt = SGD(dp.buckets, lr=0.1, momentum=0.9, weight_decay=1e-4)
    """

    def __init__(self, buckets: GradBuckets, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False) -> None:
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        self.state_names = ("momentum",) if momentum else ()
        super().__init__(buckets, lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.dampening, self.nesterov = float(dampening), bool(nesterov)

    def update(self, i: int) -> None:
        p, g, tmp = self._views(i)
        xp = array_module(p)
        if self.weight_decay:
            xp.multiply(p, self.weight_decay, out=tmp)
            xp.add(g, tmp, out=g)
        d = g
        if self.momentum:
            buf = self.state["momentum"][i]
            if self.t == 0:
                buf[...] = g
            else:
                buf *= self.momentum
                if self.dampening:
                    xp.multiply(g, 1.0 - self.dampening, out=tmp)
                    buf += tmp
                else:
                    buf += g
            if self.nesterov:
                xp.multiply(buf, self.momentum, out=tmp)
                xp.add(g, tmp, out=g)
            else:
                d = buf
        xp.multiply(d, self.lr, out=tmp)
        xp.subtract(p, tmp, out=p)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "dampening": self.dampening, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (torch semantics), with L2 weight decay or decoupled weight decay (AdamW).

    Args:
        buckets: the model's GradBuckets.
        lr: learning rate.
        betas: (beta1, beta2).
        eps: added to the denominator.
        weight_decay: L2 penalty (added to the gradient), or with ``decoupled``
            the AdamW decay ``p *= 1 - lr * weight_decay``.
        decoupled: AdamW.

    Example::

        opt = Adam(dp.buckets, lr=1e-3)
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, buckets: GradBuckets, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
        super().__init__(buckets, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam: betas={betas} must be in [0, 1)")
        self.beta1, self.beta2, self.eps = float(b1), float(b2), float(eps)
        self.weight_decay, self.decoupled = float(weight_decay), bool(decoupled)

    def update(self, i: int) -> None:
        p, g, tmp = self._views(i)
        xp = array_module(p)
        m, v = self.state["exp_avg"][i], self.state["exp_avg_sq"][i]
        t = self.t + 1
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - self.lr * self.weight_decay
            else:
                xp.multiply(p, self.weight_decay, out=tmp)
                xp.add(g, tmp, out=g)
        m *= self.beta1
        xp.multiply(g, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        bc1 = 1.0 - self.beta1 ** t
        bc2 = 1.0 - self.beta2 ** t
        xp.sqrt(v, out=tmp)
        tmp /= math.sqrt(bc2)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= self.lr / bc1
        xp.subtract(p, tmp, out=p)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": self.decoupled}
