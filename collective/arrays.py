"""Array interop: turn a user's array into a NumPy view (zero-copy where possible) and the result back into its type.

Terms. ``to_numpy(x)`` returns ``(view, wrap)``: ``view`` is a NumPy array over
``x``'s memory (a copy only where the memory cannot be shared), ``wrap`` maps a
NumPy result back to ``x``'s type (None: the result stays NumPy). A wrap is
zero-copy where the target type can share NumPy memory (PyTorch); for types
that copy on construction (JAX) it returns a :class:`Deferred`, which the
communicator resolves once the collective has written the result.

Accepted, in the order they are tried (NumPy first: it is the hot path)::

    numpy.ndarray                 -> itself            (subclasses: viewed; np.matrix comes back as np.matrix)
    numpy scalar                  -> 0-d view          (result: a NumPy scalar)
    torch.Tensor (CPU, strided)   -> .numpy()          (result: a tensor sharing the memory; bfloat16 needs ml_dtypes)
    jax.Array (CPU)               -> np.asarray        (read-only; result: a new jax.Array on the same device)
    __cuda_array_interface__, CuPy, GPU tensors        -> CollectiveTypeError: the MPI backend moves host memory only
    __array_interface__ / __array_struct__ / buffer protocol / DLPack (CPU) -> NumPy view (result: NumPy)
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import CollectiveTypeError

__all__ = ["to_numpy", "from_numpy_like", "is_writable_view", "is_immutable", "Deferred", "type_name"]

# DLPack device types (dlpack.h DLDeviceType) that are host memory NumPy can read.
_DLPACK_HOST = (1, 3)  # kDLCPU, kDLCUDAHost (pinned host memory)
_GPU_HINT = ("the MPI backend moves host memory only; a GPU backend (NCCL) is needed for device arrays. "
             "Copy it to the host first (e.g. cupy.asnumpy(x), x.cpu(), np.asarray(jax.device_get(x)))")


class Deferred:
    """A result that is built after the collective has run: ``make(array)`` copies (JAX arrays are immutable).

    The communicator calls :meth:`resolve` when the collective finishes and hands
    the caller what it returns.
    """

    __slots__ = ("make", "array")

    def __init__(self, make: Callable[[np.ndarray], Any], array: np.ndarray) -> None:
        self.make, self.array = make, array

    def resolve(self) -> Any:
        """The finished result in the caller's array type."""
        return self.make(self.array)


def type_name(x: Any) -> str:
    """``module.QualName`` of ``x``'s type, as messages show it (``torch.Tensor``, ``jaxlib...ArrayImpl``)."""
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _gpu_error(x: Any, where: str) -> CollectiveTypeError:
    return CollectiveTypeError(f"{type_name(x)} {where}: {_GPU_HINT}")


# ----------------------------------------------------------------- PyTorch
def _torch_wrap(t: Any) -> Callable[[np.ndarray], Any]:
    import torch

    if t.dtype == torch.bfloat16:
        return lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy


def _from_torch(t: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    import torch

    dev = t.device.type
    if dev != "cpu":
        if dev == "cuda":
            raise _gpu_error(t, f"on device {t.device}")
        raise CollectiveTypeError(f"{type_name(t)} on device {t.device} is not supported by the MPI backend; "
                                  "move it to the CPU (x.cpu())")
    if t.layout != torch.strided:
        raise CollectiveTypeError(f"{type_name(t)} with layout {t.layout} is not supported; pass a dense tensor "
                                  "(x.to_dense())")
    if t.is_conj() or t.is_neg():
        raise CollectiveTypeError(f"{type_name(t)} has a lazy conjugate/negative bit; call x.resolve_conj() / "
                                  "x.resolve_neg() first")
    d = t.detach()
    if t.dtype == torch.bfloat16:
        from .ops import BFLOAT16

        if BFLOAT16 is None:
            raise CollectiveTypeError(f"{type_name(t)} of dtype torch.bfloat16 needs the ml_dtypes package "
                                      "(pip install ml_dtypes), or convert it (x.float())")
        return d.view(torch.int16).numpy().view(BFLOAT16), _torch_wrap(t)
    try:
        a = d.numpy()
    except (TypeError, RuntimeError) as exc:
        raise CollectiveTypeError(f"{type_name(t)} of dtype {t.dtype} has no NumPy equivalent ({exc}); "
                                  "convert it to a NumPy-compatible dtype first") from None
    return a, torch.from_numpy


# --------------------------------------------------------------------- JAX
def _from_jax(x: Any, jax: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    try:
        devices = x.devices()
        if any(d.platform != "cpu" for d in devices):
            raise _gpu_error(x, f"on {sorted(str(d) for d in devices)}")
        a = np.asarray(x)  # zero-copy view of a single-device CPU array; read-only (JAX arrays are immutable)
    except CollectiveTypeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a deleted or donated buffer, a tracer inside jit
        raise CollectiveTypeError(f"cannot read {type_name(x)} as a host array ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); collectives take concrete arrays, not values traced inside "
                                  "jax.jit") from None
    dev = next(iter(devices)) if len(devices) == 1 else None

    def make(r: np.ndarray) -> Any:
        return jax.device_put(r, dev) if dev is not None else jax.numpy.asarray(r)

    return a, lambda r: Deferred(make, r)


# ------------------------------------------------------------------- NumPy
def _from_subclass(x: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], Any] | None]:
    if isinstance(x, np.ma.MaskedArray):
        raise CollectiveTypeError(f"{type_name(x)}: masked values would be reduced as if they were data; pass "
                                  "x.filled(fill_value) (e.g. 0 for sum) or x.data")
    cls = type(x)
    if isinstance(x, np.memmap):
        return x.view(np.ndarray), None  # results are ordinary memory, not a mapped file
    return x.view(np.ndarray), lambda a: a.view(cls)


def _scalar(a: np.ndarray) -> Any:
    return a[()] if a.ndim == 0 else a


def _deferred_scalar(a: np.ndarray) -> Deferred:
    return Deferred(_scalar, a)  # a[()] copies: take it after the collective


def _host_dlpack(x: Any) -> np.ndarray | None:
    """A NumPy view of a DLPack producer in host memory; None when ``x`` is not one."""
    if not hasattr(x, "__dlpack__"):
        return None
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        kind = int(dev()[0])
        if kind not in _DLPACK_HOST:
            raise _gpu_error(x, f"lives on DLPack device type {kind}")
    try:
        return np.from_dlpack(x)
    except Exception as exc:  # noqa: BLE001 - the producer refused (dtype, strides, version)
        raise CollectiveTypeError(f"cannot import {type_name(x)} through DLPack: {exc}") from None


def to_numpy(x: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any] | None]:
    """A NumPy view of ``x`` and a function mapping a NumPy result back to ``x``'s type.

    Args:
        x: a NumPy array or scalar, a PyTorch CPU tensor, a JAX CPU array, or any
            object exposing ``__array_interface__``, ``__array_struct__``, the buffer
            protocol or DLPack on the host.

    Returns:
        ``(view, wrap)``. ``view`` shares ``x``'s memory except where that is
        impossible (JAX on several devices). ``wrap`` is None for NumPy arrays and
        for generic objects (their results are NumPy arrays).

    Raises:
        CollectiveTypeError: naming the type, for device (GPU) arrays, masked
            arrays, dtypes NumPy cannot hold, and anything that is not an array.

    Example::

        view, wrap = to_numpy(torch.ones(3))   # view shares the tensor's memory
        wrap(view * 2)                          # a torch tensor again
    """
    if type(x) is np.ndarray:
        return x, None
    mods = sys.modules
    torch = mods.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _from_torch(x)
    if isinstance(x, np.ndarray):
        return _from_subclass(x)
    if isinstance(x, np.generic):
        a = np.asarray(x)  # a copy: a scalar has no memory to share, so it is read-only (out= gets a new one)
        a.flags.writeable = False
        return a, _deferred_scalar
    jax = mods.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return _from_jax(x, jax)
    cupy = mods.get("cupy")
    if hasattr(x, "__cuda_array_interface__") or (cupy is not None and isinstance(x, cupy.ndarray)):
        raise _gpu_error(x, "is device memory")
    t = type(x)
    if hasattr(t, "__array_interface__") or hasattr(t, "__array_struct__") or hasattr(x, "__array_interface__"):
        try:
            a = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - a malformed interface
            raise CollectiveTypeError(f"cannot view {type_name(x)} as an array: {exc}") from None
        if a.dtype.kind != "O":
            return a, None
    h = _host_dlpack(x)
    if h is not None:
        return h, None
    try:
        mv = memoryview(x)
    except TypeError:
        mv = None
    if mv is not None:
        try:
            return np.asarray(mv), None
        except Exception as exc:  # noqa: BLE001 - a buffer format NumPy cannot read
            raise CollectiveTypeError(f"cannot view the buffer of {type_name(x)} (format {mv.format!r}) as an "
                                      f"array: {exc}") from None
    raise CollectiveTypeError(
        f"unsupported input type {type_name(x)}; pass a NumPy array, a PyTorch CPU tensor, a JAX array, or an "
        "object with __array_interface__, the buffer protocol or DLPack (for lists and Python numbers: "
        "np.asarray(x))")


def from_numpy_like(result: np.ndarray, wrap: Callable[[np.ndarray], Any] | None) -> Any:
    """Map a NumPy result back to the caller's array type (resolving a :class:`Deferred`)."""
    if wrap is None:
        return result
    r = wrap(result)
    return r.resolve() if type(r) is Deferred else r


def is_immutable(x: Any) -> bool:
    """True for array types that can never be written in place (JAX arrays, NumPy scalars).

    As ``out=`` such an array is not an error: the collective returns a new
    array of its type instead.
    """
    if isinstance(x, np.generic):
        return True
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def is_writable_view(a: np.ndarray) -> bool:
    """True if ``a`` is C-contiguous and writeable, so it can be written in place."""
    return bool(a.flags.c_contiguous and a.flags.writeable)
