"""Collectives on device arrays for a Communicator: NCCL when every rank can use it, else MPI (CUDA-aware or staged).

Terms (the names below follow them):

* **setup** -- on the first device-array call, every rank (collectively, on
  the communicator's private MPI communicator, after queued async work) tells
  the others whether it can use NCCL and whether its MPI is CUDA-aware. The
  job uses NCCL only if every rank can, and passes device buffers to MPI only
  if every MPI is CUDA-aware: every rank then takes the same path.
* **nccl path** -- :class:`~collective.backends.nccl.NCCLBackend`; inputs
  that are not CuPy arrays are viewed as CuPy arrays (zero-copy), and their
  producing stream is waited on by the comm stream.
* **direct path** -- CUDA-aware MPI: the producing streams of the input and
  the output are synchronised, then MPI's own collective gets the device
  buffers. Used for ``native`` (and ``auto``) where MPI has the datatype and
  no host-side step is needed (``avg`` and complex ``prod`` are staged).
* **staged path** -- the input is copied to a pinned host buffer, the
  Communicator's ordinary host collective runs (every algorithm, every check,
  the watchdog), and the result is copied into the output device array.
  Pinned buffers come from one :class:`~collective.backends.gpu_staging.GpuStager`
  and are reused.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..arrays import is_immutable
from ..errors import BackendUnavailableError, CollectiveError, CollectiveTypeError, CollectiveValueError, describe
from ..spec import COLLECTIVE_NAMES as _NAMES
from ..spec import REDUCING, blocks_of, result_shape
from . import BACKENDS
from .gpu_staging import GpuStager, cuda_array_info, is_device_array, mpi_cuda_aware

__all__ = ["DeviceCollectives", "DeviceRequest", "StagedWork", "result_shape"]

_REDUCING = REDUCING


class DeviceRequest:
    """A collective on a device array, as the Communicator's ``_prepare`` hands it to :meth:`DeviceCollectives.run`."""

    __slots__ = ("name", "x", "op", "algorithm", "root", "out")

    def __init__(self, name: str, x: Any, op: Any, algorithm: str | None, root: Any, out: Any) -> None:
        self.name, self.x, self.op, self.algorithm, self.root, self.out = name, x, op, algorithm, root, out


class StagedWork:
    """Handle of a staged asynchronous collective: ``wait()`` copies the host result to the device and returns it."""

    __slots__ = ("_work", "_finish", "_done", "_result", "_lock")

    def __init__(self, work: Any, finish: Callable[[Any], Any]) -> None:
        self._work, self._finish = work, finish
        self._done = False
        self._result: Any = None
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the host collective, then copy its result to the device (once) and return it."""
        with self._lock:
            if not self._done:
                try:
                    r = self._work.wait(timeout)
                except BaseException:
                    if self._work.done():  # it failed (not just timed out): its buffers are free again
                        self._done = True
                        self._finish(None)
                    raise
                self._result = self._finish(r)
                self._done = True
            return self._result

    def done(self) -> bool:
        """True once the host collective has finished (the device copy happens in ``wait``)."""
        return self._done or self._work.done()


class _Done:
    """An already finished result, as a Work handle."""

    __slots__ = ("_r",)

    def __init__(self, r: Any) -> None:
        self._r = r

    def wait(self, timeout: float | None = None) -> Any:
        return self._r

    def done(self) -> bool:
        return True


class DeviceCollectives:
    """Runs the Communicator's collectives on device arrays (CuPy, ``__cuda_array_interface__``).

    Args:
        comm: the :class:`~collective.Communicator` (its private MPI communicator, lock, host collectives).
        backend: "auto" (NCCL where every rank can use it, else MPI), "nccl" or "mpi".
        stager: the pinned-buffer stager (default: one over CuPy, made on first use).
        cuda_aware: force the CUDA-aware answer (None: ask MPI, see ``mpi_cuda_aware``).
        nccl_factory: makes the NCCL backend from the private MPI communicator
            (default ``NCCLBackend.create``); tests pass a fake.
        nccl_problem: this rank's reason NCCL is unusable (None: usable; default: probe).

    Example::

        dev = DeviceCollectives(comm)
        y = dev.call("allreduce", cupy.ones(4, cupy.float32))
    """

    def __init__(self, comm: Any, backend: str = "auto", *, stager: GpuStager | None = None,
                 cuda_aware: bool | None = None, nccl_factory: Callable[[Any], Any] | None = None,
                 nccl_problem: Any = "probe") -> None:
        if backend not in BACKENDS:
            raise CollectiveValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.comm = comm
        self.requested = backend
        self._stager = stager
        self._aware_forced = cuda_aware
        self._factory = nccl_factory
        self._problem = nccl_problem
        self._ready = False
        self.nccl: Any = None
        #: Every rank's MPI takes device buffers (agreed at setup).
        self.cuda_aware = False
        #: Why the job uses the backend it uses (agreed at setup), for messages and reports.
        self.why = "not set up yet"
        self._setup_lock = threading.Lock()

    # --------------------------------------------------------------- setup
    @property
    def stager(self) -> GpuStager:
        """The pinned-buffer stager (made on first use)."""
        if self._stager is None:
            self._stager = GpuStager()
        return self._stager

    def setup(self) -> None:
        """Agree on the backend with every rank (collective; runs once, on the first device-array call).

        Every rank takes part in the agreement even when its own checks fail,
        so an error on one rank raises on every rank instead of leaving the
        others waiting.
        """
        with self._setup_lock:
            if self._ready:
                return
            # Queued async work first: what follows talks MPI on the private communicator.
            self.comm.sequencer.run_locked(self._agree, "device setup")
            self._ready = True

    def _agree(self) -> None:
        c = self.comm
        mcomm = c.mpi_comm
        error: BaseException | None = None
        problem: str | None = "not checked"
        aware, how = False, "not checked"
        try:
            problem = self._local_problem(c)
            if self._aware_forced is not None:
                aware, how = bool(self._aware_forced), "forced"
            else:
                aware, how = mpi_cuda_aware()
        except Exception as exc:  # noqa: BLE001 - raised below, after the others have been told
            error = exc
        mine = np.array([0 if problem is None else 1, 1 if aware else 0, 0 if error is None else 1], np.int64)
        every = np.empty((c.size, 3), np.int64)
        mcomm.Allgather(mine, every)
        if error is not None:
            if isinstance(error, CollectiveError):
                raise error
            # The library's error: the others raise theirs at this point too, so the communicator goes on (an
            # error of another type inside this gated work would break it, see Sequencer._failed).
            raise BackendUnavailableError(f"{describe('setup', c.rank, c.size)}: device-array setup failed here: "
                                          f"{type(error).__name__}: {error}") from error
        failed = [int(r) for r in np.flatnonzero(every[:, 2])]
        if failed:
            raise BackendUnavailableError(f"{describe('setup', c.rank, c.size)}: device-array setup failed on "
                                          f"rank(s) {', '.join(map(str, failed))} (see their errors)")
        bad = [int(r) for r in np.flatnonzero(every[:, 0])]
        self.cuda_aware = bool(every[:, 1].all())
        here = f" (here: {problem})" if problem else ""
        if self.requested == "nccl" and bad:
            raise BackendUnavailableError(
                f"{describe('setup', c.rank, c.size)}: backend 'nccl' was requested but NCCL is not usable on "
                f"rank(s) {', '.join(map(str, bad))}{here}")
        path = f"CUDA-aware MPI ({how})" if self.cuda_aware else "MPI staged through pinned host memory"
        if not bad:
            try:
                self.nccl = (self._factory or self._default_factory)(mcomm)
                self.why = "NCCL usable on every rank"
            except BackendUnavailableError as exc:
                # The bootstrap raises on every rank alike, so every rank falls back alike.
                if self.requested == "nccl":
                    raise
                self.why = f"NCCL could not be set up ({exc}); {path}"
            except Exception as exc:
                # NCCL's own (ncclCommInitRank, a CUDA error): its init is collective, the others fail in it too.
                # Raised as the library's, so the communicator's host calls go on; no fallback (not agreed).
                raise BackendUnavailableError(f"{describe('setup', c.rank, c.size)}: NCCL could not be set up "
                                              f"({type(exc).__name__}: {exc})") from exc
        else:
            self.why = f"NCCL not usable on rank(s) {', '.join(map(str, bad))}{here}; {path}"

    def _local_problem(self, c: Any) -> str | None:
        """Why this rank cannot use NCCL (None: it can)."""
        if self.requested == "mpi":
            return "backend 'mpi' requested"
        if self._problem != "probe":
            return self._problem
        from .nccl import gpus_per_rank_problem, probe

        problem = probe()
        if problem is None:
            import cupy

            problem = gpus_per_rank_problem(c.local_size, int(cupy.cuda.runtime.getDeviceCount()))
        return problem

    def _default_factory(self, mcomm: Any) -> Any:
        from .nccl import NCCLBackend

        c = self.comm
        return NCCLBackend.create(mcomm, c.local_rank, c.cluster.node_of_rank, timeout=c.watchdog.timeout)

    # --------------------------------------------------------------- calls
    def run(self, req: DeviceRequest, async_: bool = False) -> Any:
        """Run a :class:`DeviceRequest` (what the Communicator's methods hand over for device arrays)."""
        return self.call(req.name, req.x, req.op, req.algorithm, req.root, req.out, async_=async_)

    def call(self, name: str, x: Any, op: Any = "sum", algorithm: str | None = None, root: Any = 0, out: Any = None,
             async_: bool = False) -> Any:
        """One collective on device array ``x``; the Communicator's method of the same name, for device memory.

        Args:
            name: "allreduce", "reduce", "broadcast", "reduce_scatter" or "allgather".
            x, op, algorithm, root, out: as :class:`~collective.Communicator`'s methods
                (op is ignored by broadcast and allgather).
            async_: return a handle whose ``wait()`` returns the result.

        Returns:
            The result as ``x``'s type (a CuPy array, a CUDA tensor, a new jax.Array;
            a CuPy array for other ``__cuda_array_interface__`` inputs), or ``out``;
            None off the root of reduce; or a handle when ``async_``. JAX arrays
            are never written in place: as ``out`` they get a new array.
        """
        if name not in _NAMES:
            raise CollectiveValueError(f"unknown collective {name!r}; choose one of {', '.join(_NAMES)}")
        if not is_device_array(x):
            raise CollectiveTypeError(f"{describe(name, self.comm.rank, self.comm.size)}: {type(x).__qualname__} is "
                                      "not a device array")
        if out is not None and is_immutable(out):
            out = None  # a JAX array is never written in place: a new one comes back, as on the host path
        self.setup()
        if self.nccl is not None:
            return self._nccl_call(name, x, op, algorithm, root, out, async_)
        return self._mpi_call(name, x, op, algorithm, root, out, async_)

    # ------------------------------------------------- communicator's order
    def _in_order(self, name: str, shape: tuple, dtype: Any, alg: str, root: int, rop: Any,
                  run: Callable[[], Any]) -> Any:
        """Run ``run()`` as the Communicator's next op, on this thread: flight recorder, cross-rank check, ``run``."""
        op = _DeviceOp(name, shape, dtype, alg, root if name in ("reduce", "broadcast") else 0, rop)
        return self.comm.sequencer.run_here(op, lambda c, first, seq: run())

    def _poison(self, name: str, exc: BaseException) -> None:
        """Take part in the fingerprint check with a poison print, so the other ranks raise instead of waiting."""
        self.comm.sequencer.poison(name, exc)

    # ---------------------------------------------------------------- nccl
    def _nccl_call(self, name: str, x: Any, op: Any, algorithm: str | None, root: Any, out: Any, async_: bool) -> Any:
        be = self.nccl
        x_in, out_in = x, out
        try:
            xp = be.xp
            streams: list[int] = []
            x = self._as_backend_array(xp, x, streams)
            if out is not None:
                out = self._as_backend_array(xp, out, streams)
            # The communicator's default algorithm may be host-only (shm): device arrays then get auto.
            alg = algorithm or (self.comm.algorithm if self.comm.algorithm != "shm" else "auto")
            call = be.prepare(name, x, op, alg, root, out, tuple(dict.fromkeys(streams)))
        except Exception as exc:
            self._poison(name, exc)
            raise
        w = self._in_order(name, call.shape, call.dtype, call.algorithm, call.root, call.rop,
                           lambda: be.enqueue(call, False if async_ else None))
        if call.result is not None:
            if out_in is not None:
                w.result = out_in  # the caller's own object, whatever its type
            else:
                w.result = _like(x_in, call.result)
        return w if async_ else w.result

    @staticmethod
    def _as_backend_array(xp: Any, a: Any, streams: list[int]) -> Any:
        if isinstance(a, xp.ndarray):
            return a
        info = cuda_array_info(a)
        if info.stream is not None:
            streams.append(info.stream)  # the comm stream waits for the producer (an event, not the host)
        return xp.asarray(a)

    # ----------------------------------------------------------------- mpi
    def _usable_stager(self, x: Any) -> GpuStager:
        """The stager; without CuPy there is no way to move device memory here: a type error, as on the host path."""
        try:
            return self.stager
        except (ImportError, BackendUnavailableError) as exc:
            t = type(x)
            raise CollectiveTypeError(
                f"{t.__module__}.{t.__qualname__} is device memory, and neither a GPU backend (NCCL) nor CuPy (to move "
                f"it through MPI) is usable here ({self.why}; CuPy: {exc}); copy it to the host first (e.g. "
                "cupy.asnumpy(x), x.cpu()) or pip install 'pycollective[gpu]'") from None

    def _direct_ok(self, name: str, info: Any, op: Any, algorithm: str | None) -> bool:
        if not self.cuda_aware or not info.contiguous:
            return False
        alg = algorithm or self.comm.algorithm
        if alg not in ("native", "auto"):
            return False
        from ..ops import get_op
        from .mpi import mpi_dtype, needs_user_op

        if mpi_dtype(info.dtype) is None:
            return False
        if name in _REDUCING:
            rop = get_op(op)
            if rop is None or rop.average or needs_user_op(rop.mpi_name, info.dtype):
                return False  # a host-side step (division, NumPy user op), or a bad op the host path reports: stage
        return True

    def _mpi_call(self, name: str, x: Any, op: Any, algorithm: str | None, root: Any, out: Any, async_: bool) -> Any:
        c = self.comm
        h = ho = None
        try:
            st = self._usable_stager(x)
            info = cuda_array_info(x)
            what = describe(name, c.rank, c.size, info.shape, info.dtype, algorithm)
            if name in ("reduce", "broadcast") and (isinstance(root, bool) or not isinstance(root, (int, np.integer))
                                                    or not 0 <= root < c.size):
                raise CollectiveValueError(f"{what}: root {root!r} is not a rank of this communicator "
                                           f"(0..{c.size - 1})")
            rshape = result_shape(name, info.shape, c.size, c.rank)
            needs_out = name != "reduce" or c.rank == root
            inplace = out is not None and (out is x or _same_memory(out, info))
            if out is not None and not inplace:
                oi = cuda_array_info(out)
                bad = (f"out has dtype {oi.dtype}, expected {info.dtype}" if oi.dtype != info.dtype else
                       f"out has shape {oi.shape}, expected {rshape}" if oi.shape != rshape else
                       "out is read-only" if oi.readonly else "out is not C-contiguous" if not oi.contiguous else None)
                if bad is not None:
                    raise (CollectiveTypeError if oi.dtype != info.dtype else CollectiveValueError)(f"{what}: {bad}")
            direct = self._direct_ok(name, info, op, algorithm)
            if not direct:
                h = st.to_host(x)
                if needs_out:
                    ho = h if inplace else st.host_empty(rshape, info.dtype)
        except Exception as exc:
            if h is not None:
                st.release(h, ho)
            self._poison(name, exc)
            raise
        if direct:
            from ..ops import get_op

            rop = get_op(op) if name in _REDUCING else None
            rt = int(root) if name in ("reduce", "broadcast") else 0
            r = self._in_order(name, info.shape, info.dtype, "native", rt, rop,
                               lambda: self._direct(name, x, info, rop, rt, out, rshape, needs_out, inplace))
            return _Done(r) if async_ else r
        target = x if inplace else out

        def finish(r: Any) -> Any:
            try:
                if r is None or ho is None:
                    return None
                r = st.to_device(ho, target)
                return _like(x, r) if target is None else r
            finally:
                st.release(h, ho)

        host_call = getattr(c, name + "_async" if async_ else name)
        kw: dict[str, Any] = {"algorithm": algorithm, "out": ho}
        if name in ("reduce", "broadcast"):
            kw["root"] = root
        if name in _REDUCING:
            kw["op"] = op
        try:
            w = host_call(h, **kw)
        except BaseException:
            st.release(h, ho)
            raise
        if async_:
            return StagedWork(w, finish)
        return finish(w)

    def _direct(self, name: str, x: Any, info: Any, rop: Any, root: int, out: Any, rshape: tuple, needs_out: bool,
                inplace: bool) -> Any:
        """MPI's own collective on device buffers (CUDA-aware MPI), producing streams synchronised first."""
        from ..engine import mpi_collective
        from .mpi import mpi_dtype, mpi_op

        c = self.comm
        st = self.stager
        from .mpi import require_mpi

        MPI = require_mpi()
        T = mpi_dtype(info.dtype)
        o = None
        if needs_out:
            o = x if inplace else (out if out is not None else st.ops.empty(rshape, info.dtype))
        st.sync_producer(info)  # MPI reads device memory from the host side: nothing may be pending on its stream
        if o is not None and o is not x:
            st.sync_producer(cuda_array_info(o))
        mop = mpi_op(rop.mpi_name, info.dtype) if rop is not None else None
        m = c.mpi_comm
        counts = None
        if name == "reduce_scatter":
            b = blocks_of(name, tuple(info.shape), c.size)
            assert b is not None  # reduce_scatter always has blocks
            counts = [b[i + 1] - b[i] for i in range(c.size)]

        def device_copy(dst: Any, src: Any) -> None:  # a device copy MPI makes (Bcast works in one buffer)
            m.Sendrecv([src, T], c.rank, 0, [dst, T], c.rank, 0)

        mpi_collective(m, MPI, name, x, o, T, mop, root, c.rank, inplace, counts, device_copy)
        return o if needs_out else None


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _like(x: Any, r: Any) -> Any:
    """``r`` (a CuPy array) as ``x``'s type, sharing its memory: a CUDA tensor for a tensor, a jax.Array for one."""
    if _is_torch(x):
        import torch

        return torch.as_tensor(r, device=x.device)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        import jax.dlpack

        # DLPack hands JAX the buffer with the producing stream ordered before JAX's use of it.
        return jax.dlpack.from_dlpack(r)
    return r


class _DeviceOp:
    """A device-array op as the sequencer records and checks it (its signature; no host input to scan)."""

    __slots__ = ("name", "shape", "dtype", "algorithm", "root", "rop", "xf", "views", "sig")

    def __init__(self, name: str, shape: tuple, dtype: Any, algorithm: str, root: int, rop: Any) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype
        self.algorithm, self.root, self.rop = algorithm, root, rop
        self.xf = self.views = self.sig = None


def _same_memory(out: Any, info: Any) -> bool:
    try:
        oi = cuda_array_info(out)
    except Exception:  # noqa: BLE001 - not a device array: checked (and refused) later
        return False
    return oi.ptr == info.ptr and oi.nbytes == info.nbytes and oi.ptr != 0

