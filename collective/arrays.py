"""Array interop: turn a user's array into a NumPy view (zero-copy where possible) and the result back into its type."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import CollectiveTypeError

__all__ = ["to_numpy", "from_numpy_like", "is_writable_view"]


def _torch_to_numpy(t: Any) -> np.ndarray:
    if t.device.type != "cpu":
        raise CollectiveTypeError(f"torch tensor on device {t.device} is not supported by the MPI backend; move it to the CPU")
    if str(t.dtype) == "torch.bfloat16":
        from .ops import BFLOAT16

        if BFLOAT16 is None:
            raise CollectiveTypeError("bfloat16 torch tensors need the ml_dtypes package (pip install ml_dtypes)")
        import torch

        return t.detach().view(torch.int16).numpy().view(BFLOAT16)
    return t.detach().numpy()


def to_numpy(x: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any] | None]:
    """A NumPy view of ``x`` and a function mapping a NumPy result back to ``x``'s type.

    The second item is None for NumPy inputs (results stay NumPy). Accepts NumPy
    arrays and scalars, PyTorch CPU tensors (zero-copy), and anything NumPy can
    view without copying through ``__array_interface__`` or the buffer protocol.
    """
    if type(x) is np.ndarray:
        return x, None
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        return _torch_to_numpy(x), torch.from_numpy
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x), None
    if hasattr(x, "__array_interface__") or hasattr(x, "__buffer__") or isinstance(x, (bytearray, memoryview)):
        try:
            return np.asarray(x), None
        except Exception as exc:
            raise CollectiveTypeError(f"cannot view {type(x).__module__}.{type(x).__qualname__} as an array: {exc}") from exc
    raise CollectiveTypeError(
        f"unsupported input type {type(x).__module__}.{type(x).__qualname__}; pass a NumPy array, a PyTorch CPU tensor, "
        "or an object with __array_interface__ or the buffer protocol"
    )


def from_numpy_like(result: np.ndarray, wrap: Callable[[np.ndarray], Any] | None) -> Any:
    """Map a NumPy result back to the caller's array type."""
    if wrap is None:
        return result
    return wrap(result)


def is_writable_view(a: np.ndarray) -> bool:
    """True if ``a`` is C-contiguous and writeable, so it can be written in place."""
    return bool(a.flags.c_contiguous and a.flags.writeable)
