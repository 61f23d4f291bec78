"""Device arrays through MPI: CUDA-aware MPI when it says so, else staged through pinned host buffers allocated once.

Terms (the names below follow them):

* **device array** -- any object with ``__cuda_array_interface__`` (CuPy,
  Numba, PyTorch CUDA tensors). :func:`cuda_array_info` reads the interface:
  address, shape, dtype, contiguity and the *producing stream*.
* **producing stream** -- the interface's ``stream`` field (version 3): the
  CUDA stream on which work that writes the array may still be queued. MPI
  reads memory from the host side, with no notion of streams, so that stream
  is synchronised before a device buffer is handed to MPI or copied out.
  Forgetting this gives random wrong results that no test catches reliably.
* **staging** -- without CUDA-aware MPI, the collective runs on host copies
  in *pinned* (page-locked) buffers: copy device -> pinned, run the host
  collective, copy pinned -> device. Pinned buffers are slow to allocate, so
  :class:`GpuStager` keeps them in a free list and reuses them: a steady
  workload allocates nothing per call.
* **ops** -- the few device calls staging needs (:class:`CupyOps`): allocate
  pinned memory, asynchronous copies on a private copy stream, stream
  synchronisation, a new device array. They are an argument, so tests run
  the stager over host memory dressed as a device array with
  ``ctypes.memmove`` as the copy.
"""
from __future__ import annotations

import ctypes
import importlib
import sys
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .. import config
from ..errors import BackendUnavailableError, CollectiveTypeError, CollectiveValueError

__all__ = ["CudaArrayInfo", "cuda_array_info", "is_device_array", "DeviceOps", "CupyOps", "GpuStager",
           "mpi_cuda_aware"]


@dataclass(frozen=True)
class CudaArrayInfo:
    """What ``__cuda_array_interface__`` says about an array.

    Attributes:
        ptr: device address of the first element (0 for empty arrays is allowed).
        shape: the shape.
        dtype: the element type.
        readonly: the producer forbids writes.
        stream: the producing stream's handle (1: legacy default, 2: per-thread default),
            or None when the producer says it needs no synchronisation (version 3,
            ``"stream": None``). A producer that names no stream (version 2,
            PyTorch) is waited for on its current stream (see ``_unnamed_stream``).
        contiguous: C-contiguous (``strides`` None or the C strides).
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    readonly: bool
    stream: int | None
    contiguous: bool

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Bytes of the elements."""
        return self.size * self.dtype.itemsize


def is_device_array(x: Any) -> bool:
    """True for CuPy arrays and anything exposing ``__cuda_array_interface__`` (a GPU buffer).

    Example::

        is_device_array(np.ones(3))     # False
        is_device_array(cupy.ones(3))   # True
    """
    if isinstance(x, np.ndarray):
        return False
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return True
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - a property that raises (e.g. a CPU tensor's) means "not a device array"
        return False


#: cudaStreamLegacy, as __cuda_array_interface__ names the legacy default stream.
LEGACY_STREAM = 1


def _unnamed_stream(x: Any) -> int:
    """The stream to wait for when the producer names none (interface version 2, PyTorch's included).

    Such producers rely on the ordering of the legacy default stream, which the
    private non-blocking streams the copies and NCCL run on do not have: a
    tensor made by ``t.clone()`` just before the call could still be in flight.
    A PyTorch tensor is ordered on torch's current stream (as its DLPack export
    says); anything else on the legacy default stream.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        try:
            return int(torch.cuda.current_stream(x.device).cuda_stream) or LEGACY_STREAM
        except Exception:  # noqa: BLE001 - a torch built without CUDA cannot hold CUDA tensors anyway
            return LEGACY_STREAM
    return LEGACY_STREAM


def cuda_array_info(x: Any) -> CudaArrayInfo:
    """Read and check ``x.__cuda_array_interface__`` (versions 0 to 3).

    Raises:
        CollectiveTypeError: no interface, a masked array, or a dtype NumPy cannot name.
        CollectiveValueError: a malformed interface (stream 0 is forbidden by the protocol).

    Example::

        info = cuda_array_info(cupy.arange(4, dtype=cupy.float32))
        info.ptr, info.shape, info.dtype, info.stream
    """
    try:
        cai = x.__cuda_array_interface__
    except AttributeError:
        raise CollectiveTypeError(f"{type(x).__qualname__} has no __cuda_array_interface__: not a device "
                                  "array") from None
    try:
        shape = tuple(int(s) for s in cai["shape"])
        typestr = cai["typestr"]
        ptr, ro = cai["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CollectiveValueError(f"{type(x).__qualname__}: malformed __cuda_array_interface__ ({exc!r})") from None
    if cai.get("mask") is not None:
        raise CollectiveTypeError(f"{type(x).__qualname__}: masked device arrays are not supported (fill the mask "
                                  "first)")
    try:
        dtype = np.dtype(typestr)
    except TypeError:
        raise CollectiveTypeError(f"{type(x).__qualname__}: unknown typestr {typestr!r} in "
                                  "__cuda_array_interface__") from None
    strides = cai.get("strides")
    contiguous = True
    if strides is not None:
        want = []
        acc = dtype.itemsize
        for s in reversed(shape):
            want.append(acc)
            acc *= max(s, 1)
        want.reverse()
        # Axes of length 1 (and empty arrays) may carry any stride.
        contiguous = 0 in shape or all(n == 1 or int(s) == w for n, s, w in zip(shape, strides, want))
    if int(cai.get("version", 0)) >= 3 and "stream" in cai:
        stream = cai["stream"]
        if stream is not None:
            stream = int(stream)
            if stream == 0:
                raise CollectiveValueError(f"{type(x).__qualname__}: __cuda_array_interface__ stream 0 is forbidden by "
                                           "the protocol (it is ambiguous); the producer must name its stream")
    else:
        stream = _unnamed_stream(x)
    return CudaArrayInfo(int(ptr or 0), shape, dtype, bool(ro), stream, contiguous)


class DeviceOps(Protocol):
    """The device calls staging makes; :class:`CupyOps` on a GPU, fakes in tests."""

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        """A uint8 NumPy array of ``nbytes`` over page-locked host memory."""

    def copy_stream(self) -> int:
        """The handle of the private stream the copies run on."""

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Enqueue a device -> host copy on ``stream``."""

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Enqueue a host -> device copy on ``stream``."""

    def sync(self, stream: int) -> None:
        """Block until the work queued on ``stream`` has finished."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new device array (CuPy's type)."""


class CupyOps:
    """:class:`DeviceOps` over CuPy: pinned memory, cudaMemcpyAsync on a private stream, stream synchronisation.

    Raises:
        ImportError: no CuPy.
        BackendUnavailableError: no usable CUDA device.
    """

    def __init__(self, cupy: Any = None) -> None:
        if cupy is None:
            cupy = importlib.import_module("cupy")
        try:
            n = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:  # noqa: BLE001 - no driver, or a driver older than the runtime
            raise BackendUnavailableError(f"no CUDA device ({type(exc).__name__}: {exc})") from None
        if n < 1:
            raise BackendUnavailableError("no CUDA device")
        self.cupy = cupy
        self._stream: Any = None

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory (CuPy's pinned memory pool) as a uint8 array."""
        mem = self.cupy.cuda.alloc_pinned_memory(nbytes)
        return np.frombuffer(mem, np.uint8, nbytes)

    def copy_stream(self) -> int:
        """A non-blocking stream of the current device, made once."""
        if self._stream is None:
            self._stream = self.cupy.cuda.Stream(non_blocking=True)
        return int(self._stream.ptr)

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """cudaMemcpyAsync device -> host."""
        rt = self.cupy.cuda.runtime
        rt.memcpyAsync(dst, src, nbytes, rt.memcpyDeviceToHost, stream)

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """cudaMemcpyAsync host -> device."""
        rt = self.cupy.cuda.runtime
        rt.memcpyAsync(dst, src, nbytes, rt.memcpyHostToDevice, stream)

    def sync(self, stream: int) -> None:
        """cudaStreamSynchronize (1 and 2 name the legacy and per-thread default streams)."""
        self.cupy.cuda.runtime.streamSynchronize(stream)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """``cupy.empty``."""
        return self.cupy.empty(shape, dtype)


def _host_ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


class GpuStager:
    """Copies device arrays to and from pinned host buffers that are allocated once and reused.

    Buffers are handed out by :meth:`to_host` and :meth:`host_empty` and come
    back with :meth:`release`; a released buffer serves any later request
    that fits, so a training loop that stages the same sizes allocates only
    on its first step. The producing stream of every device array is
    synchronised before its memory is read or overwritten.

    Args:
        ops: the device calls (default :class:`CupyOps`).

    Example::

        st = GpuStager()
        h = st.to_host(x)                    # pinned NumPy copy of x
        y = st.host_empty(h.shape, h.dtype)
        comm.allreduce(h, out=y)             # the host collective
        out = st.to_device(y)                # a new device array with the result
        st.release(h, y)
    """

    #: Smallest buffer allocated (small messages share nothing, but need not allocate each time).
    MIN_BYTES = 4096

    def __init__(self, ops: DeviceOps | None = None) -> None:
        self.ops: DeviceOps = ops if ops is not None else CupyOps()
        self._free: list[np.ndarray] = []
        self._busy: dict[int, np.ndarray] = {}  # start address -> buffer
        self._lock = threading.Lock()
        #: Pinned allocations made so far (tests check that steady use makes none).
        self.allocations = 0
        #: Pinned bytes held.
        self.held_bytes = 0

    # ----------------------------------------------------------- buffers
    def _acquire(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = self._free
            # By index, never list.remove: == on NumPy arrays compares elements.
            fits = [i for i, a in enumerate(free) if a.nbytes >= nbytes]
            if fits:
                b = free.pop(min(fits, key=lambda i: free[i].nbytes))
            else:
                # Replace the largest free buffer by one at least twice its size, so a growing
                # request does not allocate on every call and the number of buffers stays bounded.
                size = max(nbytes, self.MIN_BYTES)
                if free:
                    big = free.pop(max(range(len(free)), key=lambda i: free[i].nbytes))
                    size = max(size, 2 * big.nbytes)
                    self.held_bytes -= big.nbytes
                b = self.ops.alloc_pinned(size)
                self.allocations += 1
                self.held_bytes += b.nbytes
            self._busy[_host_ptr(b)] = b
            return b

    def release(self, *arrays: np.ndarray | None) -> None:
        """Give staged host arrays back for reuse (None is ignored; releasing twice is harmless)."""
        with self._lock:
            for a in arrays:
                if a is None:
                    continue
                p = _host_ptr(a)
                for start, b in list(self._busy.items()):
                    if start <= p < start + max(b.nbytes, 1):
                        del self._busy[start]
                        self._free.append(b)
                        break

    def host_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A pinned host array of ``shape`` and ``dtype`` (contents undefined); give it back with :meth:`release`."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) if shape else 1
        b = self._acquire(n * dt.itemsize)
        return b[: n * dt.itemsize].view(dt).reshape(shape)

    # ------------------------------------------------------------ copies
    def sync_producer(self, info: CudaArrayInfo) -> None:
        """Wait for the work queued on the array's producing stream (MPI and host copies cannot wait on a stream)."""
        if info.stream is not None:
            self.ops.sync(info.stream)

    def to_host(self, x: Any) -> np.ndarray:
        """A pinned host copy of device array ``x`` (its producing stream synchronised first).

        Raises:
            CollectiveValueError: ``x`` is not C-contiguous.
        """
        info = cuda_array_info(x)
        if not info.contiguous:
            raise CollectiveValueError(f"{type(x).__qualname__} of shape {info.shape} is not C-contiguous; pass a "
                                       "contiguous array (e.g. cupy.ascontiguousarray(x))")
        h = self.host_empty(info.shape, info.dtype)
        if info.nbytes:
            self.sync_producer(info)
            s = self.ops.copy_stream()
            self.ops.copy_to_host(_host_ptr(h), info.ptr, info.nbytes, s)
            self.ops.sync(s)
        return h

    def to_device(self, host: np.ndarray, out: Any = None) -> Any:
        """Copy ``host`` into device array ``out`` (or a new one) and return it, the copy finished.

        ``out``'s producing stream is synchronised first: kernels still
        reading or writing it must not race with the copy.

        Raises:
            CollectiveTypeError / CollectiveValueError: ``out`` has another dtype or
                shape, is read-only or not contiguous.
        """
        if out is None:
            out = self.ops.empty(tuple(host.shape), host.dtype)
        info = cuda_array_info(out)
        if info.dtype != host.dtype:
            raise CollectiveTypeError(f"out has dtype {info.dtype}, expected {host.dtype}")
        if info.shape != tuple(host.shape):
            raise CollectiveValueError(f"out has shape {info.shape}, expected {tuple(host.shape)}")
        if info.readonly:
            raise CollectiveValueError("out is read-only")
        if not info.contiguous:
            raise CollectiveValueError("out is not C-contiguous")
        if info.nbytes:
            self.sync_producer(info)
            h = np.ascontiguousarray(host)
            s = self.ops.copy_stream()
            self.ops.copy_to_device(info.ptr, _host_ptr(h), info.nbytes, s)
            self.ops.sync(s)
        return out


# --------------------------------------------------------- CUDA-aware MPI
def mpi_cuda_aware(MPI: Any = None, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether MPI takes device buffers directly, and how that was found out.

    In order: ``COLLECTIVE_MPI_CUDA_AWARE`` (1 or 0) decides; mpi4py's
    ``MPI.Query_cuda_support()`` where it exists; the MPI 4.1 memory
    allocation kinds (``mpi_memory_alloc_kinds`` of ``MPI_INFO_ENV`` naming
    ``cuda``); Open MPI's ``MPIX_Query_cuda_support()`` or MPICH's
    ``MPIX_GPU_query_support(CUDA)`` found in the loaded MPI library. When
    nothing answers, the answer is no: staging is always correct.

    Example::

        aware, how = mpi_cuda_aware()   # (False, "MPIX_Query_cuda_support() returned 0 (Open MPI)")
    """
    aware = config.get("MPI_CUDA_AWARE", env)
    if aware is not None:
        return aware, f"COLLECTIVE_MPI_CUDA_AWARE={config.raw('MPI_CUDA_AWARE', env)}"
    if MPI is None:
        try:
            from mpi4py import MPI
        except ImportError:
            return False, "mpi4py is not installed"
    q = getattr(MPI, "Query_cuda_support", None)
    if callable(q):
        try:
            return bool(q()), "MPI.Query_cuda_support()"
        except Exception:  # noqa: BLE001 - fall through to the other probes
            pass
    try:
        kinds = MPI.INFO_ENV.Get("mpi_memory_alloc_kinds")
    except Exception:  # noqa: BLE001 - MPI < 4.1
        kinds = None
    if kinds and any(k.strip().split(":")[0] == "cuda" for k in str(kinds).split(",")):
        return True, f"mpi_memory_alloc_kinds={kinds}"
    try:
        lib = ctypes.CDLL(MPI.__file__)
    except Exception:  # noqa: BLE001 - no shared object to look into
        lib = None
    if lib is not None:
        f = getattr(lib, "MPIX_Query_cuda_support", None)
        if f is not None:
            f.restype = ctypes.c_int
            r = int(f())
            return r == 1, f"MPIX_Query_cuda_support() returned {r} (Open MPI)"
        g = getattr(lib, "MPIX_GPU_query_support", None)
        if g is not None:
            ok = ctypes.c_int(0)
            g.restype = ctypes.c_int
            if g(ctypes.c_int(0), ctypes.byref(ok)) == 0:  # 0 = MPIX_GPU_SUPPORT_CUDA
                return bool(ok.value), f"MPIX_GPU_query_support(CUDA) says {ok.value} (MPICH)"
    return False, "this MPI does not say whether it is CUDA-aware; staging through host memory"
