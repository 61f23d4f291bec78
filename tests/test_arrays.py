"""Array interop (collective/arrays.py) in one process: every accepted kind, zero-copy views, result types, errors."""
from __future__ import annotations

import array

import numpy as np
import pytest

import collective as col
from collective.arrays import Deferred, from_numpy_like, is_immutable, to_numpy

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = jnp = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install 'pycollective[torch]')")
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed (pip install jax)")


@pytest.fixture(scope="module")
def comm() -> col.Communicator:
    return col.Communicator()


# ------------------------------------------------------------------ NumPy and generic host arrays
def test_numpy_is_passed_through() -> None:
    x = np.arange(5.0)
    v, wrap = to_numpy(x)
    assert v is x and wrap is None


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_numpy_subclasses(comm: col.Communicator) -> None:
    m = np.matrix([[1.0, 2.0]])
    assert type(comm.allreduce(m)) is np.matrix
    with pytest.raises(col.CollectiveTypeError, match="MaskedArray.*filled"):
        comm.allreduce(np.ma.array([1.0, 2.0], mask=[0, 1]))


def test_numpy_scalars(comm: col.Communicator) -> None:
    y = comm.allreduce(np.float32(2.5))
    assert type(y) is np.float32 and y == 2.5
    assert type(comm.allreduce_async(np.int64(3)).wait()) is np.int64
    z = comm.allreduce(np.float64(4.0), out=np.float64(0.0))  # immutable out: a new scalar
    assert type(z) is np.float64 and z == 4.0
    assert is_immutable(np.float64(1.0)) and not is_immutable(np.zeros(1))


def test_buffer_protocol_objects_are_viewed_not_copied(comm: col.Communicator) -> None:
    ba = bytearray(b"\x01\x02\x03")
    v, _ = to_numpy(ba)
    assert v.dtype == np.uint8 and v.flags.writeable
    v[0] = 9
    assert ba[0] == 9
    assert comm.allreduce(ba, out=ba) is ba
    aa = array.array("f", [1.0, 2.0])
    y = comm.allreduce(aa)
    assert type(y) is np.ndarray and y.dtype == np.float32 and y.tolist() == [1.0, 2.0]
    assert comm.allreduce(memoryview(aa), out=aa) is aa
    with pytest.raises(col.CollectiveValueError, match="read-only"):
        comm.allreduce(np.zeros(3, np.uint8), out=b"abc")


class _Interface:
    """Exposes a NumPy array's memory through __array_interface__ only."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.__array_interface__ = a.__array_interface__


class _DLPackOnly:
    """Exposes a NumPy array through DLPack only (device type given)."""

    def __init__(self, a: np.ndarray, device: int = 1) -> None:
        self.a, self.device = a, device

    def __dlpack__(self, **kw: object) -> object:
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device, 0)


class _FakeCuda:
    """Looks like a CuPy/Numba device array: __cuda_array_interface__ and nothing host-readable."""

    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_array_interface_and_dlpack(comm: col.Communicator) -> None:
    a = np.arange(6, dtype=np.int32)
    v, wrap = to_numpy(_Interface(a))
    assert np.shares_memory(v, a) and wrap is None
    assert comm.allreduce(_Interface(a)).tolist() == a.tolist()
    b = np.arange(4.0)
    v, _ = to_numpy(_DLPackOnly(b))
    assert np.shares_memory(v, b)
    assert comm.allreduce(_DLPackOnly(b)).tolist() == b.tolist()
    with pytest.raises(col.CollectiveTypeError, match="DLPack device type 2.*GPU backend"):
        comm.allreduce(_DLPackOnly(b, device=2))


def test_device_memory_is_refused_with_the_type_named() -> None:
    """The host path never reads device memory; the communicator hands device arrays to the GPU backend first."""
    with pytest.raises(col.CollectiveTypeError, match=r"_FakeCuda is device memory.*GPU backend \(NCCL\)"):
        to_numpy(_FakeCuda())


@pytest.mark.parametrize("bad", [[1, 2], 3.0, object(), "abc", {"a": 1}])
def test_unsupported_types_are_named(comm: col.Communicator, bad: object) -> None:
    with pytest.raises(col.CollectiveTypeError, match=f"unsupported input type builtins.{type(bad).__qualname__}"):
        comm.allreduce(bad)


def test_deferred_results_are_made_after_the_collective() -> None:
    a = np.zeros(2)
    d = Deferred(lambda r: r.tolist(), a)
    a[:] = 7
    assert d.resolve() == [7.0, 7.0]
    assert from_numpy_like(a, lambda r: Deferred(lambda q: q.sum(), r)) == 14.0


# ------------------------------------------------------------------ PyTorch
@needs_torch
def test_torch_tensors_share_memory_and_come_back_as_tensors(comm: col.Communicator) -> None:
    for dt in (torch.float32, torch.float64, torch.int32, torch.int64, torch.float16, torch.uint8):
        t = torch.arange(6).to(dt).reshape(2, 3)
        v, _ = to_numpy(t)
        assert v.ctypes.data == t.data_ptr()
        y = comm.allreduce(t)
        assert type(y) is torch.Tensor and y.dtype == dt and torch.equal(y, t)
    t = torch.arange(6.0).reshape(2, 3)
    assert comm.allreduce(t, out=t) is t
    o = torch.empty(2, 3)
    assert comm.allreduce(t, out=o) is o and torch.equal(o, t)
    assert torch.equal(comm.allreduce(t.T), t.T)  # a strided view is copied in, the result is contiguous
    p = torch.nn.Parameter(torch.ones(3))
    y = comm.allreduce(p)
    assert type(y) is torch.Tensor and not y.requires_grad
    with pytest.raises(col.CollectiveValueError, match="contiguous"):
        comm.allreduce(t.T, out=torch.empty(2, 3).T)


@needs_torch
def test_torch_refusals_name_the_problem(comm: col.Communicator) -> None:
    with pytest.raises(col.CollectiveTypeError, match="meta.*move it to the CPU"):
        comm.allreduce(torch.ones(3, device="meta"))
    with pytest.raises(col.CollectiveTypeError, match="sparse.*to_dense"):
        comm.allreduce(torch.ones(3).to_sparse())
    with pytest.raises(col.CollectiveTypeError, match="resolve_conj"):
        comm.allreduce(torch.ones(3, dtype=torch.complex64).conj())
    with pytest.raises(col.CollectiveTypeError, match="bool"):
        comm.allreduce(torch.ones(3, dtype=torch.bool))


@needs_torch
def test_torch_bfloat16(comm: col.Communicator) -> None:
    from collective.ops import BFLOAT16

    t = torch.full((4,), 1.5, dtype=torch.bfloat16)
    if BFLOAT16 is None:
        with pytest.raises(col.CollectiveTypeError, match="ml_dtypes"):
            comm.allreduce(t)
        return
    y = comm.allreduce(t)
    assert y.dtype == torch.bfloat16 and torch.equal(y, t)
    assert comm.allreduce(t, out=t) is t


# ------------------------------------------------------------------ JAX
@needs_jax
def test_jax_arrays(comm: col.Communicator) -> None:
    x = jnp.arange(4.0)
    y = comm.allreduce(x)
    assert isinstance(y, jax.Array) and np.array_equal(np.asarray(y), np.asarray(x))
    z = comm.allreduce(x, out=x)  # immutable: a new array of the same type, never an error
    assert isinstance(z, jax.Array) and z is not x
    w = comm.allreduce_async(x).wait()
    assert isinstance(w, jax.Array)
    assert is_immutable(x)
