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

*Double buffering* (:meth:`Optimizer.double_buffer`, used by the elastic
state): every parameter and state buffer gets a twin; a step reads the
current set and writes the other, and ``end_step`` makes the written set
current. The set read stays intact until the step after next starts writing
it, so the state before the last step is still in memory (a rollback costs no
copy, and neither does keeping it: the update writes once either way). Each
set is labelled with the optimizer step it holds (``generation``).
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
        # Double buffering (off by default): the other set of parameter and state buffers, which the update
        # writes; None writes in place.
        self._spare_data: list[Array] | None = None
        self._spare_state: dict[str, list[Array]] | None = None
        #: Optimizer step held by [current set, spare set] (None: partly written or never filled).
        self.generation: list[int | None] = [0, None]
        self._writing = False

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
        """Count a finished step (after every bucket's :meth:`update`); with double buffering, the written set becomes current."""
        self.t += 1
        if self._spare_data is not None:
            self._swap()
            self.generation = [self.t, self.generation[0]]
        self._writing = False

    # ------------------------------------------------------ double buffering
    @property
    def double_buffered(self) -> bool:
        """Whether updates write a second set of buffers (see :meth:`double_buffer`)."""
        return self._spare_data is not None

    def double_buffer(self) -> None:
        """Give every parameter and state buffer a twin; from now on each step writes the twin and then swaps.

        The state before the last finished step stays in memory (generation
        ``t - 1``) until the next step's first update; :meth:`use_generation`
        returns to it without copying.

        Example::

            opt.double_buffer()
            ...                      # a step fails half-way through its updates
            opt.use_generation(opt.t)   # the state after the last finished step, untouched
        """
        if self._spare_data is not None:
            return
        xp = array_module(self.buckets[0].data)
        self._spare_data = [xp.empty_like(b.data) for b in self.buckets]
        self._spare_state = {name: [xp.empty_like(buf) for buf in bufs] for name, bufs in self.state.items()}
        self.generation = [self.t, None]
        self._writing = False

    def set_step(self, t: int) -> None:
        """The current buffers hold optimizer step ``t`` (e.g. received by broadcast); the spare set holds nothing.

        Example::

            for bufs in opt.state.values():          # rank 0's state, step 12
                for buf in bufs:
                    comm.broadcast(buf, root=0, out=buf)
            opt.set_step(12)
        """
        self.t = int(t)
        self.generation = [self.t, None]
        self._writing = False

    def rebind(self, buckets: GradBuckets) -> None:
        """Work on ``buckets`` (rebuilt over another communicator, with the same layout); the state is kept.

        The spare set (double buffering) is allocated anew and holds nothing.
        """
        old = [int(b.data.size) for b in self.buckets]
        new = [int(b.data.size) for b in buckets]
        if old != new:
            raise ValueError(f"{type(self).__name__}.rebind: the new buckets hold {new} elements, the optimizer's "
                             f"state {old}; the model and the bucket settings must stay the same")
        self.buckets = buckets
        if self._spare_data is not None:
            xp = array_module(buckets[0].data)
            self._spare_data = [xp.empty_like(b.data) for b in buckets]
            self.generation = [self.generation[0], None]
        self._writing = False

    def use_generation(self, t: int) -> None:
        """Make the buffer set holding optimizer step ``t`` current (the parameters too); no data is copied.

        Raises:
            ValueError: neither set holds step ``t`` intact (only the last two finished steps are kept).
        """
        if self.generation[0] == t:  # a step half-way through wrote only the spare set
            self.t = t
            self._writing = False
            self.generation[1] = None
            return
        if self._spare_data is not None and self.generation[1] == t:
            self._swap()
            self.generation = [t, None]  # the set just left was written after t: nothing to go back to
            self.t = t
            self._writing = False
            return
        raise ValueError(f"{type(self).__name__}: the state of optimizer step {t} is not in memory (held: "
                         f"{self.generation}); only the last two finished steps are kept, with double_buffer()")

    def _swap(self) -> None:
        assert self._spare_data is not None and self._spare_state is not None
        for i, b in enumerate(self.buckets):
            cur = b.data
            self.buckets.set_data(i, self._spare_data[i])
            self._spare_data[i] = cur
        for name, bufs in self.state.items():
            self.state[name], self._spare_state[name] = self._spare_state[name], bufs

    def _begin_write(self) -> None:
        # The first update of a step overwrites the spare set: from here on it holds no finished step.
        if not self._writing:
            self._writing = True
            self.generation[1] = None

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

    def _views(self, i: int) -> tuple[Array, Array, Array, Array]:
        """(parameters read, parameters written, gradients, scratch) of bucket ``i``."""
        b = self.buckets[i]
        if self._spare_data is None:
            return b.data, b.data, b.grad, self._tmp[i]
        self._begin_write()
        return b.data, self._spare_data[i], b.grad, self._tmp[i]

    def _state(self, name: str, i: int) -> tuple[Array, Array]:
        """(read, written) buffers of state ``name`` of bucket ``i``."""
        cur = self.state[name][i]
        if self._spare_state is None:
            return cur, cur
        return cur, self._spare_state[name][i]


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
        p, out, g, tmp = self._views(i)
        xp = array_module(p)
        # Double buffered, the buffer written is free until the last operation, so it serves as the scratch:
        # a pass that writes a fresh buffer costs memory traffic, and this way tmp is never touched.
        if out is not p:
            tmp = out
        if self.weight_decay:
            xp.multiply(p, self.weight_decay, out=tmp)
            xp.add(g, tmp, out=g)
        d = g
        if self.momentum:
            buf, buf_out = self._state("momentum", i)
            if self.t == 0:
                buf_out[...] = g
            else:
                xp.multiply(buf, self.momentum, out=buf_out)
                if self.dampening:
                    xp.multiply(g, 1.0 - self.dampening, out=tmp)
                    buf_out += tmp
                else:
                    buf_out += g
            if self.nesterov:
                xp.multiply(buf_out, self.momentum, out=tmp)
                xp.add(g, tmp, out=g)
            else:
                d = buf_out
        xp.multiply(d, self.lr, out=tmp)
        xp.subtract(p, tmp, out=out)

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
        p, out, g, tmp = self._views(i)
        xp = array_module(p)
        m, m_out = self._state("exp_avg", i)
        v, v_out = self._state("exp_avg_sq", i)
        t = self.t + 1
        if self.weight_decay:
            if self.decoupled:
                xp.multiply(p, 1.0 - self.lr * self.weight_decay, out=out)
                p = out
            else:
                xp.multiply(p, self.weight_decay, out=tmp)
                xp.add(g, tmp, out=g)
        xp.multiply(m, self.beta1, out=m_out)
        xp.multiply(g, 1.0 - self.beta1, out=tmp)
        m_out += tmp
        xp.multiply(v, self.beta2, out=v_out)
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v_out += tmp
        bc1 = 1.0 - self.beta1 ** t
        bc2 = 1.0 - self.beta2 ** t
        xp.sqrt(v_out, out=tmp)
        tmp /= math.sqrt(bc2)
        tmp += self.eps
        xp.divide(m_out, tmp, out=tmp)
        tmp *= self.lr / bc1
        xp.subtract(p, tmp, out=out)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": self.decoupled}
