"""Small layers with explicit forward and backward on NumPy or CuPy arrays; each layer's backward reports its ready gradients.

Terms: a *layer* is a Module with its own parameters (Linear, Conv2d) or none
(ReLU, Tanh, Dropout, Flatten). ``forward(x, ctx)`` keeps what backward needs;
``backward(dy)`` writes the parameter gradients into ``param.grad`` (in place:
the trainer makes every ``grad`` a view into a flat bucket, so no gradient is
ever copied) and returns the gradient of the input. When a layer's backward
has written all its gradients it calls its *grad-ready hooks* with its
parameters; the trainer's hook starts a bucket's allreduce as soon as the
bucket's last gradient is ready.

One code path serves NumPy and CuPy: every layer takes the array module
``xp`` of its input (``array_module(x)``), and parameters are created on the
module passed as ``xp`` at construction.

Dropout draws its mask from a counter-based hash of (seed, layer, step,
global sample index, feature), not from a stateful generator: a sample gets
the same mask whichever rank and shard it lands on, so P ranks train exactly
like one process, and resuming at a step needs no generator state.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Context",
    "Conv2d",
    "Dropout",
    "Flatten",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "SoftmaxCrossEntropy",
    "Tanh",
    "array_module",
    "counter_uniform",
    "mlp",
]

Array = Any  # numpy.ndarray or cupy.ndarray
GradReadyHook = Callable[["Module", "list[Parameter]"], None]
Tracer = Callable[[str, str, float, float], None]


def array_module(x: Any) -> Any:
    """The array module (numpy or cupy) that ``x`` belongs to."""
    if type(x).__module__.startswith("cupy"):
        import cupy  # only reached with a CuPy array in hand

        return cupy
    return np


class Parameter:
    """A trainable array and its gradient (same shape and dtype).

    ``data`` and ``grad`` may be rebound to views into flat buffers (see
    ``trainer.buckets``); code must always go through the attributes, never
    keep its own reference across steps.
    """

    __slots__ = ("data", "grad", "name")

    def __init__(self, data: Array, name: str = "") -> None:
        xp = array_module(data)
        self.data = data
        self.grad = xp.zeros_like(data)
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.dtype})"


@dataclass
class Context:
    """Per-step state a forward pass may need.

    Attributes:
        training: dropout is active only when True.
        step: the global step number (dropout masks differ per step).
        sample_ids: global dataset index of each row of the batch (dropout masks
            follow the sample, so any sharding gives the same masks). None: use
            the row number.
        seed: the run's seed.
    """

    training: bool = True
    step: int = 0
    sample_ids: Array | None = None
    seed: int = 0


class Module:
    """Base of every layer: parameters, forward/backward, and grad-ready hooks."""

    def __init__(self) -> None:
        self.params: list[Parameter] = []
        self.name = type(self).__name__
        self._hooks: list[GradReadyHook] = []

    # -- parameters
    def parameters(self) -> list[Parameter]:
        """This module's parameters, in forward order."""
        return list(self.params)

    def parameter_groups(self) -> list[list[Parameter]]:
        """Parameters grouped by the layer that reports them ready together, in forward order."""
        return [self.parameters()] if self.params else []

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """(name, parameter) pairs, in forward order."""
        return [(p.name, p) for p in self.parameters()]

    # -- hooks
    def register_grad_ready_hook(self, hook: GradReadyHook) -> None:
        """Call ``hook(module, params)`` each time backward has finished writing ``params``' gradients."""
        self._hooks.append(hook)

    def _ready(self) -> None:
        if self.params:
            for h in self._hooks:
                h(self, self.params)

    # -- compute
    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        """Compute the output and keep what backward needs."""
        raise NotImplementedError

    def backward(self, dy: Array) -> Array | None:
        """Write the parameter gradients, report them ready, and return d(loss)/d(input)."""
        dx = self._backward(dy)
        self._ready()
        return dx

    def _backward(self, dy: Array) -> Array | None:
        raise NotImplementedError

    def __call__(self, x: Array, ctx: Context | None = None) -> Array:
        return self.forward(x, ctx)

    def __repr__(self) -> str:
        return self.name


def _init_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype: Any, xp: Any) -> Array:
    # PyTorch's default for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)).
    bound = 1.0 / np.sqrt(max(1, fan_in))
    return xp.asarray(rng.uniform(-bound, bound, size=shape).astype(dtype))


class Linear(Module):
    """``y = x @ W + b`` with ``W`` of shape (in_features, out_features).

    Args:
        in_features: input size.
        out_features: output size.
        bias: add a bias vector.
        rng: generator for the initial values (rank 0's are broadcast to all ranks anyway).
        dtype: parameter dtype (float32 or float64).
        xp: array module for the parameters (numpy or cupy).

    Example::

        layer = Linear(784, 10, rng=np.random.default_rng(0))
        y = layer.forward(np.ones((2, 784), np.float32))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rng: np.random.Generator | None = None, dtype: Any = np.float32, xp: Any = np) -> None:
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_init_uniform(rng, (in_features, out_features), in_features, dtype, xp), "weight")
        self.params = [self.weight]
        self.bias: Parameter | None = None
        if bias:
            self.bias = Parameter(_init_uniform(rng, (out_features,), in_features, dtype, xp), "bias")
            self.params.append(self.bias)
        #: False for the first layer: the gradient of the input data is never needed.
        self.needs_input_grad = True
        self._x: Array = None

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        self._x = x
        y = x @ self.weight.data
        if self.bias is not None:
            y += self.bias.data
        return y

    def _backward(self, dy: Array) -> Array | None:
        xp = array_module(dy)
        # Written straight into the bucket views: no temporary, no copy.
        xp.matmul(self._x.T, dy, out=self.weight.grad)
        if self.bias is not None:
            dy.sum(axis=0, out=self.bias.grad)
        dx = dy @ self.weight.data.T if self.needs_input_grad else None
        self._x = None
        return dx

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Module):
    """``max(x, 0)``."""

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        xp = array_module(x)
        y = xp.maximum(x, 0)
        self._y = y
        return y

    def _backward(self, dy: Array) -> Array:
        dx = dy * (self._y > 0)
        self._y = None
        return dx


class Tanh(Module):
    """``tanh(x)``."""

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        xp = array_module(x)
        self._y = xp.tanh(x)
        return self._y

    def _backward(self, dy: Array) -> Array:
        y = self._y
        self._y = None
        return dy * (1 - y * y)


_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (for combining seeds)."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def counter_uniform(key: int, counters: Array) -> Array:
    """Uniform floats in [0, 1), one per element of ``counters`` (uint64), a pure function of (key, counter).

    splitmix64 applied to ``counter ^ key``: stateless and vectorised, so any
    subset of counters, computed on any rank, gives the same numbers.
    """
    xp = array_module(counters)
    u64 = xp.uint64
    z = counters ^ u64(key)
    z = z + u64(_GOLDEN)
    z = (z ^ (z >> u64(30))) * u64(_M1)
    z = (z ^ (z >> u64(27))) * u64(_M2)
    z = z ^ (z >> u64(31))
    return (z >> u64(11)).astype(xp.float64) * (1.0 / (1 << 53))


class Dropout(Module):
    """Zero each activation with probability ``p`` while training, scaling the rest by ``1 / (1 - p)``.

    The mask of sample ``i`` at step ``s`` is a hash of (seed, layer key, s, i,
    feature): the same on whichever rank sample ``i`` lands, so training at P
    ranks equals training in one process; the layer key (set by Sequential to
    the layer's index) makes two Dropout layers differ.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p={p} must be in [0, 1)")
        self.p = p
        self.key = 0
        self._mask: Array = None

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        ctx = ctx or Context(training=False)
        if not ctx.training or self.p == 0.0:
            self._mask = None
            return x
        xp = array_module(x)
        n = x.shape[0]
        feat = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
        ids = ctx.sample_ids if ctx.sample_ids is not None else xp.arange(n)
        ids = xp.asarray(ids).astype(xp.uint64).reshape(n, 1)
        counters = ids * xp.uint64(feat) + xp.arange(feat, dtype=xp.uint64).reshape(1, feat)
        key = _mix64(_mix64(_mix64(ctx.seed & _MASK64) ^ self.key) ^ (ctx.step & _MASK64))
        keep = counter_uniform(key, counters) >= self.p
        self._mask = (keep * (1.0 / (1.0 - self.p))).astype(x.dtype).reshape(x.shape)
        return x * self._mask

    def _backward(self, dy: Array) -> Array:
        m = self._mask
        self._mask = None
        return dy if m is None else dy * m

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class Flatten(Module):
    """Reshape (N, ...) to (N, -1)."""

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def _backward(self, dy: Array) -> Array:
        return dy.reshape(self._shape)


class Conv2d(Module):
    """2-D convolution on NCHW input, by im2col and one matrix product.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: side of the square kernel.
        stride: as in PyTorch.
        padding: as in PyTorch.
        rng: as for Linear.
        dtype: as for Linear.
        xp: as for Linear.

    Weight shape (out_channels, in_channels, k, k), bias (out_channels,).

    Example::

        conv = Conv2d(1, 4, 3, padding=1)
        y = conv.forward(np.ones((2, 1, 8, 8), np.float32))   # (2, 4, 8, 8)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, *, rng: np.random.Generator | None = None, dtype: Any = np.float32,
                 xp: Any = np) -> None:
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        k = kernel_size
        self.cin, self.cout, self.k, self.stride, self.padding = in_channels, out_channels, k, stride, padding
        fan_in = in_channels * k * k
        self.weight = Parameter(_init_uniform(rng, (out_channels, in_channels, k, k), fan_in, dtype, xp), "weight")
        self.params = [self.weight]
        self.bias: Parameter | None = None
        if bias:
            self.bias = Parameter(_init_uniform(rng, (out_channels,), fan_in, dtype, xp), "bias")
            self.params.append(self.bias)
        self.needs_input_grad = True

    def _cols(self, xpad: Array) -> tuple[Array, int, int]:
        xp = array_module(xpad)
        n, c, h, w = xpad.shape
        k, s = self.k, self.stride
        oh, ow = (h - k) // s + 1, (w - k) // s + 1
        sn, sc, sh, sw = xpad.strides
        # (N, OH, OW, C, k, k) window view, then one copy into the column matrix.
        win = xp.lib.stride_tricks.as_strided(xpad, (n, oh, ow, c, k, k), (sn, sh * s, sw * s, sc, sh, sw))
        return xp.ascontiguousarray(win).reshape(n * oh * ow, c * k * k), oh, ow

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        xp = array_module(x)
        p = self.padding
        xpad = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else xp.ascontiguousarray(x)
        cols, oh, ow = self._cols(xpad)
        self._cols_cache, self._xshape, self._padshape = cols, x.shape, xpad.shape
        y = cols @ self.weight.data.reshape(self.cout, -1).T
        if self.bias is not None:
            y += self.bias.data
        n = x.shape[0]
        return y.reshape(n, oh, ow, self.cout).transpose(0, 3, 1, 2)

    def _backward(self, dy: Array) -> Array | None:
        xp = array_module(dy)
        n, _, oh, ow = dy.shape
        dyf = dy.transpose(0, 2, 3, 1).reshape(n * oh * ow, self.cout)
        cols = self._cols_cache
        xp.matmul(dyf.T, cols, out=self.weight.grad.reshape(self.cout, -1))
        if self.bias is not None:
            dyf.sum(axis=0, out=self.bias.grad)
        dx = None
        if self.needs_input_grad:
            dcols = (dyf @ self.weight.data.reshape(self.cout, -1)).reshape(n, oh, ow, self.cin, self.k, self.k)
            dpad = xp.zeros(self._padshape, dtype=dy.dtype)
            s, k = self.stride, self.k
            # col2im: each kernel offset (i, j) adds one strided slab; k*k vectorised adds.
            for i in range(k):
                for j in range(k):
                    dpad[:, :, i:i + s * oh:s, j:j + s * ow:s] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
            p = self.padding
            dx = dpad[:, :, p:p + self._xshape[2], p:p + self._xshape[3]] if p else dpad
        self._cols_cache = None
        return dx

    def __repr__(self) -> str:
        return f"Conv2d({self.cin}, {self.cout}, k={self.k}, stride={self.stride}, padding={self.padding})"


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse, each reporting its gradients ready as it finishes.

    Parameter names are ``"{index}.{name}"`` (``"0.weight"``). The first layer
    with parameters skips the input gradient (nothing consumes it).

    Example::

        model = Sequential(Linear(64, 32), ReLU(), Linear(32, 10))
        logits = model.forward(x, Context(step=0))
        model.backward(dlogits)
    """

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        self.layers: list[Module] = list(layers)
        #: Optional ``tracer(kind, name, t0, t1)`` called per layer ("forward"/"backward"), for timelines.
        self.tracer: Tracer | None = None
        for i, layer in enumerate(self.layers):
            for p in layer.params:
                p.name = f"{i}.{p.name.split('.')[-1]}"
            if isinstance(layer, Dropout):
                layer.key = i
        for layer in self.layers:
            if hasattr(layer, "needs_input_grad"):
                layer.needs_input_grad = False
                break

    def parameters(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def parameter_groups(self) -> list[list[Parameter]]:
        return [g for layer in self.layers for g in layer.parameter_groups()]

    def register_grad_ready_hook(self, hook: GradReadyHook) -> None:
        """Register ``hook`` on every layer that has parameters."""
        for layer in self.layers:
            if layer.params:
                layer.register_grad_ready_hook(hook)

    def forward(self, x: Array, ctx: Context | None = None) -> Array:
        tr = self.tracer
        for i, layer in enumerate(self.layers):
            if tr is None:
                x = layer.forward(x, ctx)
            else:
                t0 = time.monotonic()
                x = layer.forward(x, ctx)
                tr("forward", f"{i} {layer!r}", t0, time.monotonic())
        return x

    def backward(self, dy: Array) -> Array | None:
        tr = self.tracer
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if tr is None:
                dy = layer.backward(dy)
            else:
                t0 = time.monotonic()
                dy = layer.backward(dy)
                tr("backward", f"{i} {layer!r}", t0, time.monotonic())
            if dy is None:  # the first layer with parameters: nothing before it needs a gradient
                break
        return dy

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(repr(layer) for layer in self.layers) + ")"


class SoftmaxCrossEntropy:
    """Softmax cross-entropy averaged over the rows of the batch.

    ``forward(logits, labels)`` returns the mean loss (a Python float) and keeps
    the gradient, which ``backward()`` returns: ``(softmax - onehot) / n``.
    Each rank averages over its own shard; the trainer's allreduce averages
    over ranks, so with equal shards the update is that of the global mean.

    Example::

        loss_fn = SoftmaxCrossEntropy()
        loss = loss_fn.forward(logits, labels)
        model.backward(loss_fn.backward())
    """

    def forward(self, logits: Array, labels: Array) -> float:
        xp = array_module(logits)
        n = logits.shape[0]
        z = logits - logits.max(axis=1, keepdims=True)
        ez = xp.exp(z)
        s = ez.sum(axis=1, keepdims=True)
        rows = xp.arange(n)
        lab = xp.asarray(labels).astype(xp.int64)
        loss = float((xp.log(s[:, 0]) - z[rows, lab]).sum()) / n
        g = ez / s
        g[rows, lab] -= 1
        g /= n
        self._grad = g
        return loss

    def backward(self) -> Array:
        g = self._grad
        self._grad = None
        return g


def mlp(sizes: Sequence[int], *, activation: str = "relu", dropout: float = 0.0, seed: int = 0,
        dtype: Any = np.float32, xp: Any = np) -> Sequential:
    """A multilayer perceptron: Linear layers of ``sizes`` with ``activation`` (and Dropout) between them.

    Args:
        sizes: [in, hidden..., out].
        activation: "relu" or "tanh".
        dropout: dropout probability after each hidden activation (0 = none).
        seed: seed of the initial weights.
        dtype: parameter dtype.
        xp: array module (numpy or cupy).

    Example::

        model = mlp([784, 1024, 1024, 10])
    """
    rng = np.random.default_rng(seed)
    act = {"relu": ReLU, "tanh": Tanh}[activation]
    layers: list[Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(Linear(a, b, rng=rng, dtype=dtype, xp=xp))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(Dropout(dropout))
    return Sequential(*layers)
