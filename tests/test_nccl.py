"""NCCL and GPU arrays: every host-side piece without a GPU, and the real thing (marker ``gpu``) where one exists.

Without a GPU: the NCCL dtype/op tables, the availability probe and backend
selection with their reasons, the unique-id bootstrap, __cuda_array_interface__
parsing, the pinned-buffer stager (over host memory dressed as device arrays),
the CUDA-awareness query, the async-error/deadline watch, and the NCCL backend
itself -- native collectives and every Schedule over send/recv groups --
running on P threads over an in-process fake NCCL. The MPI paths of device
arrays (staged and CUDA-aware) run under mpiexec in tests/jobs/gpu_staging.py.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))

from gpu_fakes import (  # noqa: E402
    NCCL_H_OPS,
    NCCL_H_TYPES,
    FakeNccl,
    FakeOps,
    HostCudaArray,
    make_backends,
    run_ranks,
)

import collective.backends as backends  # noqa: E402
from collective.backends import nccl as N  # noqa: E402
from collective.bench.core import _reduce_all, values as _values  # noqa: E402  (the exact-input generator every correctness job uses)
from collective.backends.gpu_staging import (LEGACY_STREAM, GpuStager, cuda_array_info, is_device_array,  # noqa: E402
                                              mpi_cuda_aware)
from collective.errors import (  # noqa: E402
    BackendUnavailableError,
    CollectiveError,
    CollectiveTimeoutError,
    CollectiveTypeError,
    CollectiveValueError,
)

GPU_REASON = N.probe()


# ------------------------------------------------------------------ tables
def test_dtype_and_op_tables_match_nccl_h() -> None:
    for code, t in NCCL_H_TYPES.items():
        assert N.NCCL_DTYPES[np.dtype(t).name] == code
    assert N.NCCL_DTYPES["bfloat16"] == 9
    for code, uf in NCCL_H_OPS.items():
        name = {np.add: "sum", np.multiply: "prod", np.maximum: "max", np.minimum: "min"}[uf]
        assert N.NCCL_OPS[name] == code
    assert N.NCCL_OPS["avg"] == N.NCCL_OPS["sum"]  # avg = sum, then our own division
    assert N.NCCL_BYTE == 1
    N.check_constants(FakeNccl)  # a module numbered as nccl.h passes


def test_constants_that_moved_are_refused() -> None:
    class Renumbered:
        NCCL_FLOAT32 = 8
        NCCL_SUM = 0

    with pytest.raises(BackendUnavailableError, match="NCCL_FLOAT32=8"):
        N.check_constants(Renumbered)


@pytest.mark.parametrize("coll,dtype,op,want", [
    ("allreduce", "float32", "sum", (7, 1, 0)),
    ("allreduce", "float16", "max", (6, 1, 2)),
    ("reduce", "uint8", "prod", (1, 1, 1)),
    ("reduce_scatter", "int64", "min", (4, 1, 3)),
    ("allreduce", "int32", "avg", (2, 1, 0)),
    ("allreduce", "complex64", "sum", (7, 2, 0)),
    ("allreduce", "complex128", "avg", (8, 2, 0)),
    ("allgather", "int16", None, (1, 2, 0)),
    ("broadcast", "complex128", None, (1, 16, 0)),
    ("broadcast", "bool", None, (1, 1, 0)),
])
def test_native_plan(coll: str, dtype: str, op: str | None, want: tuple) -> None:
    assert N.native_plan(coll, np.dtype(dtype), op) == want


@pytest.mark.parametrize("coll,dtype,op,words", [
    ("allreduce", "int16", "sum", "no datatype for int16"),
    ("reduce", "uint16", "max", "ring, tree or star"),
    ("allreduce", "complex64", "prod", "complex64 with op 'prod'"),
    ("allreduce", "complex64", "max", "no datatype"),
    ("allreduce", "float32", "median", "no op"),
])
def test_native_plan_refusals_say_what_to_do(coll: str, dtype: str, op: str, words: str) -> None:
    why = N.native_plan(coll, np.dtype(dtype), op)
    assert isinstance(why, str) and words in why


def test_bfloat16_needs_nccl_2_10() -> None:
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    assert N.native_plan("allreduce", np.dtype(bf16), "sum", version=21805) == (9, 1, 0)
    why = N.native_plan("allreduce", np.dtype(bf16), "sum", version=20906)
    assert isinstance(why, str) and "2.9.6" in why and "2.10.0" in why


def test_dtypes_newer_than_the_nccl_in_use_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(N.DTYPE_MIN_VERSION, "float16", 21000)  # as bfloat16 is, without needing ml_dtypes
    assert N.nccl_datatype(np.float16, version=20906) is None and N.nccl_datatype(np.float16, version=21000) == 6
    why = N.native_plan("allreduce", np.dtype(np.float16), "sum", version=20906)
    assert isinstance(why, str) and "NCCL 2.9.6 has no float16 (needs 2.10.0)" in why
    assert N.native_plan("allgather", np.dtype(np.float16), None, version=20906) == (1, 2, 0)  # bytes need no type


def test_version_text_and_byte_order() -> None:
    assert N.version_text(21803) == "2.18.3" and N.version_text(2708) == "2.7.8"
    assert N.version_text(N.MIN_VERSION) == "2.7.0"
    assert N.nccl_datatype(np.dtype(">f4")) is None and N.nccl_datatype(np.float32) == 7


# ------------------------------------------------------------ availability
class _Mod:
    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


def _importer(cupy: object = None, nccl: object = None, cupy_error: Exception | None = None,
              nccl_error: Exception | None = None):
    def imp(name: str) -> object:
        if name == "cupy":
            if cupy_error is not None:
                raise cupy_error
            return cupy
        if nccl_error is not None:
            raise nccl_error
        return nccl

    return imp


def _cupy(count: object = 1) -> _Mod:
    def get() -> int:
        if isinstance(count, Exception):
            raise count
        return count

    return _Mod(cuda=_Mod(runtime=_Mod(getDeviceCount=get), nccl_enabled=True))


def _nccl_mod(version: int = 21805, available: bool = True) -> _Mod:
    return _Mod(available=available, get_version=lambda: version, NcclCommunicator=object)


@pytest.mark.parametrize("imp,words", [
    (_importer(cupy_error=ModuleNotFoundError("No module named 'cupy'", name="cupy")), "cupy not installed"),
    (_importer(cupy_error=ImportError("libcudart.so.12: cannot open shared object", name="cupy_backends")),
     "cupy cannot be imported"),
    (_importer(cupy_error=RuntimeError("CUDA driver too old")), "cupy cannot be imported"),
    (_importer(_cupy(), nccl_error=ImportError("libnccl.so.2")), "cupy has no NCCL support"),
    (_importer(_cupy(), _nccl_mod(available=False)), "NCCL is not available to CuPy"),
    (_importer(_cupy(RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")), _nccl_mod()),
     "no CUDA device (the CUDA runtime says"),
    (_importer(_cupy(0), _nccl_mod()), "no CUDA device"),
    (_importer(_cupy(0), nccl_error=ImportError("libnccl.so.2")), "no CUDA device"),  # the device comes first
    (_importer(_cupy(2), _nccl_mod(2604)), "NCCL 2.6.4 is too old"),
])
def test_probe_reasons(imp, words: str) -> None:
    why = N.probe(imp)
    assert why is not None and words in why, why


def test_probe_usable() -> None:
    assert N.probe(_importer(_cupy(2), _nccl_mod(21805))) is None


def test_available_reports_reasons_here() -> None:
    av = backends.available()
    assert set(av) >= {"mpi", "nccl"}
    assert av["mpi"] is None
    assert av["nccl"] == GPU_REASON
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert av["nccl"] == "cupy not installed (pip install 'pycollective[gpu]')"


def test_select_and_its_reasons() -> None:
    host, dev = np.ones(3), HostCudaArray(np.ones(3))
    no_gpu = {"mpi": None, "nccl": "no CUDA device"}
    gpu = {"mpi": None, "nccl": None}
    assert backends.select(host, avail=no_gpu) == "mpi"
    assert backends.select(host, avail=gpu) == "mpi"
    assert backends.select(dev, avail=gpu) == "nccl"
    assert backends.select(dev, "mpi", avail=gpu) == "mpi"
    name, why = backends.explain_selection(dev, avail=no_gpu)
    assert name == "mpi" and "no CUDA device" in why and "staged" in why
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        backends.select(dev, "nccl", avail=no_gpu)
    with pytest.raises(CollectiveTypeError, match="host array"):
        backends.select(host, "nccl", avail=gpu)
    with pytest.raises(CollectiveValueError, match="unknown backend"):
        backends.select(host, "gloo", avail=gpu)
    with pytest.raises(BackendUnavailableError, match="mpi4py"):
        backends.select(host, avail={"mpi": "mpi4py cannot be imported", "nccl": None})
    assert backends.select(dev, avail={"mpi": "mpi4py cannot be imported", "nccl": None}) == "nccl"
    assert backends.select(host) == "mpi"


def test_is_device_array() -> None:
    assert is_device_array(HostCudaArray(np.ones(2)))
    assert not is_device_array(np.ones(2)) and not is_device_array([1, 2]) and not is_device_array(3.0)

    class Raises:
        @property
        def __cuda_array_interface__(self) -> dict:
            raise AttributeError("a CPU tensor")

    assert not is_device_array(Raises())


def test_pick_device() -> None:
    assert N.pick_device(3, 2, env={}) == 1 and N.pick_device(0, 1, env={}) == 0
    assert N.pick_device(3, 4, env={"COLLECTIVE_CUDA_DEVICE": "2"}) == 2
    with pytest.raises(CollectiveValueError, match="2 CUDA device"):
        N.pick_device(0, 2, env={"COLLECTIVE_CUDA_DEVICE": "5"})
    with pytest.raises(CollectiveValueError, match="not an integer"):
        N.pick_device(0, 2, env={"COLLECTIVE_CUDA_DEVICE": "x"})
    with pytest.raises(BackendUnavailableError):
        N.pick_device(0, 0, env={})


def test_one_gpu_per_rank() -> None:
    assert N.gpus_per_rank_problem(2, 2) is None and N.gpus_per_rank_problem(1, 8) is None
    why = N.gpus_per_rank_problem(4, 1)
    assert why is not None and "4 ranks on this node share 1 GPU" in why and "backend 'mpi'" in why


# --------------------------------------------------------------- bootstrap
class _ThreadComm:
    """Allgather and Bcast between P threads (what bootstrap_unique_id uses of an mpi4py communicator)."""

    def __init__(self, shared: dict, rank: int, size: int) -> None:
        self.s, self.r, self.P = shared, rank, size

    def Get_rank(self) -> int:
        return self.r

    def Get_size(self) -> int:
        return self.P

    def Allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        self.s["slots"][self.r] = send.copy()
        self.s["barrier"].wait()
        recv[:] = np.concatenate(self.s["slots"])
        self.s["barrier"].wait()

    def Bcast(self, buf: np.ndarray, root: int) -> None:
        if self.r == root:
            self.s["bcast"] = buf.copy()
        self.s["barrier"].wait()
        buf[:] = self.s["bcast"]
        self.s["barrier"].wait()


def _bootstrap(P: int, problems: dict[int, str], make_id) -> list:
    shared = {"slots": [None] * P, "barrier": threading.Barrier(P, timeout=10)}
    out: list = [None] * P

    def body(r: int) -> None:
        try:
            out[r] = N.bootstrap_unique_id(_ThreadComm(shared, r, P), problems.get(r), make_id)
        except Exception as exc:  # noqa: BLE001 - compared below
            out[r] = exc

    ts = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    return out


def test_bootstrap_shares_rank0s_id() -> None:
    uid = tuple(range(-64, 64))  # signed chars, as cupy returns them on x86
    made = []
    out = _bootstrap(3, {}, lambda: made.append(1) or uid)
    assert out == [uid] * 3 and made == [1]  # made once, on rank 0
    unsigned = tuple(range(128, 256))  # unsigned chars (aarch64) travel unchanged too
    assert _bootstrap(2, {}, lambda: unsigned) == [unsigned] * 2


def test_bootstrap_failure_on_one_rank_raises_everywhere() -> None:
    out = _bootstrap(3, {2: "no CUDA device"}, lambda: tuple(range(128)))
    assert all(isinstance(e, BackendUnavailableError) for e in out)
    assert all("rank(s) 2 of 3" in str(e) for e in out)
    assert "no CUDA device" in str(out[2])
    out = _bootstrap(2, {}, lambda: (_ for _ in ()).throw(RuntimeError("ncclGetUniqueId failed")))
    assert all(isinstance(e, BackendUnavailableError) and "unique id" in str(e) for e in out)
    assert "ncclGetUniqueId failed" in str(out[0])
    out = _bootstrap(2, {}, lambda: (1, 2, 3))
    assert all(isinstance(e, BackendUnavailableError) for e in out) and "3 entries" in str(out[0])


class _Cupy14Comm:
    """NcclCommunicator(int ndev, bytes commId, int rank): CuPy 14+."""

    def __init__(self, ndev: int, commId: object, rank: int) -> None:
        if not isinstance(commId, bytes):
            raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got {type(commId).__name__})")
        assert len(commId) == 128
        self.uid = commId


class _Cupy13Comm:
    """NcclCommunicator(int ndev, tuple commId, int rank): CuPy 13, items stored in C char (signed on x86)."""

    lo, hi = -128, 127

    def __init__(self, ndev: int, commId: object, rank: int) -> None:
        if not isinstance(commId, tuple):
            raise TypeError(f"Argument 'commId' has incorrect type (expected tuple, got {type(commId).__name__})")
        for v in commId:
            if not self.lo <= v <= self.hi:
                raise OverflowError("value too large to convert to char")
        self.uid = commId


class _Cupy13CommUnsignedChar(_Cupy13Comm):
    lo, hi = 0, 255  # aarch64


def test_unique_id_in_the_form_the_installed_cupy_takes() -> None:
    raw = bytes(range(128, 256))
    ints = list(raw)  # what the bootstrap gives after CuPy 14's bytes
    signed = tuple(v - 256 for v in raw)  # what CuPy 13 on x86 returns and the bootstrap passes on
    assert N.unique_id_forms(ints) == N.unique_id_forms(signed) == [raw, signed, tuple(raw)]
    for uid in (ints, signed):
        assert N.new_communicator(_Mod(NcclCommunicator=_Cupy14Comm), 2, uid, 0).uid == raw
        assert N.new_communicator(_Mod(NcclCommunicator=_Cupy13Comm), 2, uid, 0).uid == signed
        assert N.new_communicator(_Mod(NcclCommunicator=_Cupy13CommUnsignedChar), 2, uid, 0).uid == tuple(raw)

    def refuses(ndev: int, commId: object, rank: int) -> None:
        raise TypeError("expected str")

    with pytest.raises(BackendUnavailableError, match="no known form.*bytes: TypeError"):
        N.new_communicator(_Mod(NcclCommunicator=refuses), 2, ints, 0)

    def init_fails(ndev: int, commId: object, rank: int) -> None:
        raise RuntimeError("NCCL_ERROR_UNHANDLED_CUDA_ERROR")

    with pytest.raises(RuntimeError, match="UNHANDLED_CUDA_ERROR"):  # ncclCommInitRank ran: not retried
        N.new_communicator(_Mod(NcclCommunicator=init_fails), 2, ints, 0)


def test_bootstrap_carries_cupy14_bytes_ids() -> None:
    uid = bytes(range(256))[::2]  # get_unique_id of CuPy 14+ returns 128 bytes
    out = _bootstrap(2, {}, lambda: uid)
    assert out == [tuple(uid)] * 2
    assert N.new_communicator(_Mod(NcclCommunicator=_Cupy14Comm), 2, out[1], 1).uid == uid


def test_bootstrap_over_real_mpi_self() -> None:
    from mpi4py import MPI

    assert N.bootstrap_unique_id(MPI.COMM_SELF, None, lambda: tuple(range(128))) == tuple(range(128))


# ------------------------------------------------- __cuda_array_interface__
def test_cuda_array_info() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    info = cuda_array_info(HostCudaArray(a, stream=3))
    assert info.ptr == a.__array_interface__["data"][0] and info.shape == (3, 4) and info.dtype == np.float32
    assert info.stream == 3 and info.contiguous and info.nbytes == 48 and not info.readonly
    assert not cuda_array_info(HostCudaArray(a[:, ::2])).contiguous
    assert cuda_array_info(HostCudaArray(a[:1, :])).contiguous
    assert cuda_array_info(HostCudaArray(a, stream=None)).stream is None

    class V2:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<i8", "data": (0, True), "version": 2, "stream": 5}

    # Version 2 names no stream: its producers count on the legacy default stream's ordering, so it is waited for.
    assert cuda_array_info(V2()).stream == LEGACY_STREAM and cuda_array_info(V2()).readonly

    class Stream0:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<i8", "data": (8, False), "version": 3, "stream": 0}

    with pytest.raises(CollectiveValueError, match="stream 0"):
        cuda_array_info(Stream0())

    class Masked:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<i8", "data": (8, False), "version": 3, "mask": object()}

    with pytest.raises(CollectiveTypeError, match="masked"):
        cuda_array_info(Masked())
    with pytest.raises(CollectiveTypeError, match="not a device array"):
        cuda_array_info(np.ones(2))


# ------------------------------------------------------------------ stager
def test_stager_round_trip_syncs_producer_and_reuses_buffers() -> None:
    ops = FakeOps(result_stream=5)
    st = GpuStager(ops)
    x = HostCudaArray(np.arange(100, dtype=np.float64), stream=7)
    for i in range(10):
        ops.calls.clear()
        h = st.to_host(x)
        assert np.array_equal(h, x.a) and h.dtype == np.float64 and h.shape == (100,)
        # the producing stream is synchronised before the copy reads device memory, the copy before returning
        assert ops.calls[:3] == [("sync", 7), ("d2h", 800, 99), ("sync", 99)] or i == 0
        r = st.host_empty((100,), np.float64)
        np.multiply(h, 2, out=r)
        y = st.to_device(r)
        assert isinstance(y, HostCudaArray) and np.array_equal(y.a, 2 * x.a)
        # the new array's stream is synchronised before the copy into it
        assert ops.calls.index(("sync", 5)) < ops.names().index("h2d")
        st.release(h, r)
    assert st.allocations == 2 and ops.names().count("alloc_pinned") == 0  # both allocated in round 1


def test_stager_into_out_and_in_place() -> None:
    ops = FakeOps()
    st = GpuStager(ops)
    x = HostCudaArray(np.arange(6, dtype=np.int32).reshape(2, 3), stream=2)
    h = st.to_host(x)
    h += 1
    assert st.to_device(h, x) is x and np.array_equal(x.a, np.arange(1, 7).reshape(2, 3))
    assert ("sync", 2) in ops.calls
    with pytest.raises(CollectiveValueError, match="shape"):
        st.to_device(h, HostCudaArray(np.zeros(6, np.int32)))
    with pytest.raises(CollectiveTypeError, match="dtype"):
        st.to_device(h, HostCudaArray(np.zeros((2, 3), np.int64)))
    with pytest.raises(CollectiveValueError, match="read-only"):
        st.to_device(h, HostCudaArray(np.zeros((2, 3), np.int32), readonly=True))
    with pytest.raises(CollectiveValueError, match="contiguous"):
        st.to_host(HostCudaArray(np.zeros((4, 4))[:, 1]))
    st.release(h, None)
    st.release(h)  # twice: harmless


def test_stager_empty_arrays_copy_nothing() -> None:
    ops = FakeOps()
    st = GpuStager(ops)
    h = st.to_host(HostCudaArray(np.zeros((0, 3), np.float32)))
    assert h.shape == (0, 3)
    st.to_device(h, HostCudaArray(np.zeros((0, 3), np.float32)))
    assert "d2h" not in ops.names() and "h2d" not in ops.names()


def test_stager_growth_is_geometric_and_bounded() -> None:
    st = GpuStager(FakeOps())
    for n in range(1000, 200000, 1000):  # a size growing on every call
        h = st.to_host(HostCudaArray(np.ones(n, np.uint8)))
        st.release(h)
    assert st.allocations <= 8 and len(st._free) == 1


def test_stager_buffers_in_flight_are_not_shared() -> None:
    st = GpuStager(FakeOps())
    a = st.host_empty((10,), np.int64)
    b = st.host_empty((10,), np.int64)
    a[:] = 1
    b[:] = 2
    assert (a == 1).all() and st.allocations == 2
    st.release(a)
    c = st.host_empty((5,), np.int64)
    assert c.__array_interface__["data"][0] == a.__array_interface__["data"][0] and (b == 2).all()


# -------------------------------------------------------------- CUDA-aware
def test_mpi_cuda_aware_query() -> None:
    assert mpi_cuda_aware(env={"COLLECTIVE_MPI_CUDA_AWARE": "1"}) == (True, "COLLECTIVE_MPI_CUDA_AWARE=1")
    assert mpi_cuda_aware(env={"COLLECTIVE_MPI_CUDA_AWARE": "0"})[0] is False
    # One boolean parser for every variable (collective.config): yes/no/on/off too; anything else is an error.
    assert mpi_cuda_aware(env={"COLLECTIVE_MPI_CUDA_AWARE": "yes"}) == (True, "COLLECTIVE_MPI_CUDA_AWARE=yes")
    with pytest.raises(CollectiveValueError):
        mpi_cuda_aware(env={"COLLECTIVE_MPI_CUDA_AWARE": "maybe"})
    assert mpi_cuda_aware(_Mod(Query_cuda_support=lambda: True), env={}) == (True, "MPI.Query_cuda_support()")
    kinds = _Mod(INFO_ENV=_Mod(Get=lambda k: "mpi,system,cuda:device"), __file__="/nonexistent.so")
    assert mpi_cuda_aware(kinds, env={})[0] is True
    nothing = _Mod(INFO_ENV=_Mod(Get=lambda k: None), __file__="/nonexistent.so")
    aware, how = mpi_cuda_aware(nothing, env={})
    assert not aware and "staging" in how
    aware, how = mpi_cuda_aware(env={})  # this machine's MPI
    assert isinstance(aware, bool) and how


# ------------------------------------------------------------------- watch
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _WatchComm:
    def __init__(self) -> None:
        self.error: Exception | None = None
        self.aborted = 0

    def check_async_error(self) -> None:
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.aborted += 1


class _Ev:
    def __init__(self) -> None:
        self.done = False


def _watch(timeout: float = 10.0):
    comm, clock, fails = _WatchComm(), _Clock(), []
    w = N.NcclWatch(comm, lambda e: e.done, timeout, on_fail=fails.append, interval=0.001, clock=clock, thread=False)
    return w, comm, clock, fails


def test_watch_completion_in_order() -> None:
    w, comm, clock, fails = _watch()
    e1, e2 = _Ev(), _Ev()
    p1, p2 = w.add(e1, "op1"), w.add(e2, "op2")
    w.poll()
    assert not p1.finished and len(w.pending) == 2
    e1.done = True
    w.poll()
    assert p1.finished and not p2.finished
    e2.done = True
    w.wait(p2)
    assert p2.finished and not w.pending and not fails and comm.aborted == 0


def test_watch_async_error_aborts_comm_and_raises() -> None:
    w, comm, clock, fails = _watch()
    p = w.add(_Ev(), "allreduce on rank 0 of 2 (shape (4,), float32, algorithm ring)")
    comm.error = RuntimeError("NCCL_ERROR_REMOTE_ERROR: a peer died")
    with pytest.raises(CollectiveError, match="asynchronous error.*a peer died"):
        w.wait(p)
    assert comm.aborted == 1 and len(fails) == 1 and "was aborted" in fails[0]
    w.poll()
    assert comm.aborted == 1 and len(fails) == 1  # once


def test_watch_deadline_aborts_comm() -> None:
    w, comm, clock, fails = _watch(timeout=5)
    p = w.add(_Ev(), "broadcast (shape (8,), int32, algorithm native)")
    clock.t = 4.9
    w.poll()
    assert not fails
    clock.t = 5.1
    with pytest.raises(CollectiveError, match="did not complete within 5 s"):
        w.wait(p)
    assert comm.aborted == 1 and "broadcast" in fails[0] and "COLLECTIVE_TIMEOUT" in fails[0]


def test_watch_wait_timeout_does_not_abort() -> None:
    w, comm, clock, fails = _watch(timeout=100)
    p = w.add(_Ev(), "op")

    def tick() -> float:
        clock.t += 0.5
        return clock.t

    w.clock = tick
    with pytest.raises(CollectiveTimeoutError, match="not finished after 1"):
        w.wait(p, timeout=1)
    assert comm.aborted == 0 and not fails and w.failed is None


def test_watch_thread_enforces_deadline_without_a_waiter() -> None:
    comm, fails = _WatchComm(), []
    got = threading.Event()
    w = N.NcclWatch(comm, lambda e: e.done, 0.05, on_fail=lambda m: (fails.append(m), got.set()), interval=0.005)
    try:
        w.add(_Ev(), "stuck allreduce")
        assert got.wait(5), "the watch thread did not fire"
        assert comm.aborted == 1 and "stuck allreduce" in fails[0]
    finally:
        w.close()


# ----------------------------------------------- NCCL backend on fake NCCL
def _expected(name: str, P: int, r: int, shape: tuple, dtype: np.dtype, op: str, root: int) -> np.ndarray | None:
    n = int(np.prod(shape))
    full = _reduce_all(n, dtype, op, P).reshape(shape) if name in ("allreduce", "reduce", "reduce_scatter") else None
    if name == "allreduce":
        return full
    if name == "reduce":
        return full if r == root else None
    if name == "broadcast":
        return _values(root, n, dtype, op).reshape(shape)
    if name == "reduce_scatter":
        return np.array_split(full, P)[r]
    return np.concatenate([_values(q, n, dtype, op).reshape(shape) for q in range(P)])


def _ops_for(name: str, dtype: np.dtype) -> tuple[str, ...]:
    if name not in ("allreduce", "reduce", "reduce_scatter"):
        return ("sum",)
    return ("sum", "avg", "prod") if dtype.kind == "c" else ("sum", "avg", "prod", "min", "max")


@pytest.mark.parametrize("P,nodes", [(1, None), (2, None), (3, None), (4, (0, 0, 1, 1)), (5, (0, 1, 0, 1, 1))])
def test_backend_every_collective_algorithm_op_dtype(P: int, nodes: tuple | None) -> None:
    """Exact answers on every rank: native NCCL calls and every Schedule as NCCL groups, in and out of place."""
    world, mod, bes = make_backends(P, nodes=nodes)
    # Every dtype kind at P=3; at the other sizes a float, a complex (float pairs) and a dtype NCCL lacks.
    names = ("int8", "int32", "uint64", "float16", "float64", "complex64", "int16") if P == 3 else \
        ("float32", "complex64", "int16")
    dtypes = [np.dtype(d) for d in names]
    shapes = [(1,), (7,), (5, 3)] if P == 3 else [(7,), (5, 3)]

    def rank(r: int) -> int:
        be = bes[r]
        n_cases = 0
        for name in ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather"):
            for alg in ("native", "ring", "tree", "star", "hierarchical", "auto"):
                for dt in dtypes:
                    for op in _ops_for(name, dt):
                        if alg == "native" and isinstance(N.native_plan(name, dt, op), str):
                            continue
                        for shape in shapes:
                            for root in ((0, P - 1) if name in ("reduce", "broadcast") else (0,)):
                                what = f"{name} {alg} {dt} {op} {shape} root {root}"
                                x = _values(r, int(np.prod(shape)), dt, op).reshape(shape)
                                x0 = x.copy()
                                want = _expected(name, P, r, shape, dt, op, root)
                                got = be.call(name, x, op, alg, root).wait()
                                if want is None:
                                    assert got is None, what
                                else:
                                    assert got.dtype == dt and got.shape == want.shape, what
                                    assert np.array_equal(got, want), f"{what}: {got} != {want}"
                                assert np.array_equal(x, x0), f"{what}: input changed"
                                if name in ("allreduce", "broadcast", "reduce"):
                                    y = x.copy()
                                    got = be.call(name, y, op, alg, root, out=y).wait()
                                    if want is not None:
                                        assert got is y and np.array_equal(y, want), f"{what} in place"
                                n_cases += 1
        return n_cases

    counts = run_ranks(mod, P, rank, timeout=120)
    assert counts[0] > (500 if P == 3 else 100) and len(set(counts)) == 1
    if P > 1:
        assert world.groups[0] > 0 and world.collectives[0] > 0  # both paths ran


def test_backend_uneven_reduce_scatter_and_empty_arrays() -> None:
    P = 3
    world, mod, bes = make_backends(P)

    def rank(r: int) -> None:
        be = bes[r]
        for rows in (0, 1, 2, 4, 7):
            for alg in ("native", "ring", "tree"):
                x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + r
                want = np.array_split(sum(np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + q
                                          for q in range(P)), P)[r]
                got = be.reduce_scatter(x, algorithm=alg)
                assert got.shape == want.shape and np.array_equal(got, want), (rows, alg, got, want)
        for name in ("allreduce", "broadcast", "allgather"):
            got = be.call(name, np.zeros(0, np.float64), "sum", "native").wait()
            assert got.size == 0
        be.barrier()

    run_ranks(mod, P, rank)
    # the padded native path: every rank issued reduceScatter with the largest block's count
    counts = {c[3] for c in mod.comms[0].calls if c[0] == "reduceScatter"}
    assert counts == {2, 4, 6}  # rows 1, 2 | 4 | 7 over 3 ranks, 2 elements a row


def test_backend_out_and_async() -> None:
    P = 2
    world, mod, bes = make_backends(P)

    def rank(r: int) -> None:
        be = bes[r]
        x = np.full((3, 2), r + 1, np.int64)
        out = np.empty((6, 2), np.int64)
        assert be.allgather(x, out=out) is out
        assert np.array_equal(out, np.concatenate([np.full((3, 2), q + 1) for q in range(P)]))
        w = be.allreduce_async(x, op="max", algorithm="ring")
        assert w.done()
        assert np.array_equal(w.wait(), np.full((3, 2), P))
        o = np.empty(4, np.float32)
        assert be.reduce(np.ones(4, np.float32), root=1, out=o) is (o if r == 1 else None)
        be.synchronize()

    run_ranks(mod, P, rank)


def test_backend_checks_arguments_before_sending() -> None:
    world, mod, bes = make_backends(2)
    be = bes[0]
    x = np.ones(4, np.float32)
    x8 = np.ones(8, np.float32)
    bad = [
        (lambda: be.allreduce(x, algorithm="shm"), CollectiveValueError, "shm works on host memory"),
        (lambda: be.allreduce(x, algorithm="bogus"), CollectiveValueError, "unknown algorithm"),
        (lambda: be.allreduce(x, op="median"), CollectiveValueError, "unknown op"),
        (lambda: be.allreduce(np.ones(2, bool)), CollectiveTypeError, "bool"),
        (lambda: be.allreduce(np.ones(2, np.complex64), op="max"), CollectiveTypeError, "complex"),
        (lambda: be.allreduce(np.ones(2, np.int16), algorithm="native"), CollectiveTypeError, "no datatype for int16"),
        (lambda: be.reduce(x, root=2), CollectiveValueError, "root 2"),
        (lambda: be.broadcast(x, root=True), CollectiveValueError, "root True"),
        (lambda: be.allreduce(x, out=np.ones(5, np.float32)), CollectiveValueError, "shape"),
        (lambda: be.allreduce(x, out=np.ones(4, np.float64)), CollectiveTypeError, "dtype"),
        (lambda: be.allreduce(x, out=np.ones((4, 2), np.float32)[:, 0]), CollectiveValueError, "contiguous"),
        (lambda: be.allreduce(x8[:6], out=x8[2:]), CollectiveValueError, "partly overlaps"),
        (lambda: be.allreduce([1.0, 2.0]), CollectiveTypeError, "numpy.ndarray"),
        (lambda: be.call("gather", x), CollectiveValueError, "unknown collective"),
    ]
    for fn, cls, words in bad:
        with pytest.raises(cls, match=words):
            fn()
    assert mod.comms[0].calls == [] and world.groups == [0, 0]  # nothing was sent
    assert "[nccl]" in str(pytest.raises(CollectiveValueError, be.allreduce, x, algorithm="shm").value)
    # int16 with auto: our ring over send/recv (CuPy reduces), not an error
    assert be._static_checks("allreduce", (2,), np.dtype(np.int16), "sum", None, 0)[1] == "ring"
    assert be._static_checks("reduce", (2,), np.dtype(np.int16), "sum", "auto", 0)[1] == "tree"
    assert be._static_checks("allreduce", (2,), np.dtype(np.float32), "sum", "auto", 0)[1] == "native"


def test_backend_enqueue_failure_aborts_and_later_calls_raise() -> None:
    world, mod, bes = make_backends(1, on_fail=lambda m: None)
    mod.tl.rank = 0
    be = bes[0]
    mod.comms[0].fail_next = RuntimeError("NCCL_ERROR_INVALID_ARGUMENT")
    with pytest.raises(CollectiveError, match="NCCL call failed.*INVALID_ARGUMENT"):
        be.allreduce(np.ones(3, np.float32), algorithm="native")
    assert mod.comms[0].aborted
    with pytest.raises(CollectiveError, match="failed earlier"):
        be.allreduce(np.ones(3, np.float32))


def test_backend_waits_for_foreign_producer_streams() -> None:
    world, mod, bes = make_backends(1)
    mod.tl.rank = 0
    be = bes[0]
    be.call("allreduce", np.ones(2, np.float32), "sum", "native", streams=(1234,))
    assert be.dev.waited[-1] == (1234,)
    assert be.dev.events and all(e.done for e in be.dev.events)


def test_backend_blocking_waits_and_reports_a_stuck_collective() -> None:
    fails: list[str] = []
    world, mod, bes = make_backends(1, blocking=True, timeout=0.05, on_fail=fails.append)
    mod.tl.rank = 0
    be = bes[0]
    be.dev.event_done = False  # the GPU never finishes
    with pytest.raises(CollectiveError, match="did not complete within"):
        be.allreduce(np.ones(2, np.float32))
    assert mod.comms[0].aborted and fails and "allreduce" in fails[0]


# --------------------------------------------- DeviceCollectives, one rank
@pytest.fixture(scope="module")
def comm():
    import collective as col

    return col.Communicator()


def test_device_collectives_staged_path(comm) -> None:
    from collective.backends.device import DeviceCollectives

    ops = FakeOps()
    dev = DeviceCollectives(comm, "auto", stager=GpuStager(ops), cuda_aware=False, nccl_problem="no CUDA device")
    x = HostCudaArray(np.arange(6, dtype=np.float32).reshape(2, 3), stream=7)
    y = dev.call("allreduce", x, "sum", "ring")
    assert isinstance(y, HostCudaArray) and np.array_equal(y.a, x.a) and dev.nccl is None
    assert "no CUDA device" in dev.why and "staged" in dev.why
    assert ("sync", 7) in ops.calls
    assert np.array_equal(dev.call("allgather", x, None, "native").a, x.a)
    assert dev.call("reduce", x, "sum", "tree", 0, x) is x
    w = dev.call("allreduce", x, "avg", None, async_=True)
    assert np.array_equal(w.wait().a, x.a) and w.done()
    try:
        import jax.numpy as jnp
    except ImportError:
        jnp = None
    if jnp is not None:  # a JAX array as out is never written: a new array comes back, as on the host path
        frozen = jnp.zeros((2, 3), jnp.float32)
        r = dev.call("allreduce", x, "sum", "ring", 0, frozen)
        assert r is not frozen and np.array_equal(r.a, x.a) and not np.asarray(frozen).any()
    with pytest.raises(CollectiveTypeError, match="not a device array"):
        dev.call("allreduce", np.ones(2))
    with pytest.raises(CollectiveValueError, match="root 1"):
        dev.call("reduce", x, "sum", None, 1)


def test_device_collectives_nccl_path_with_fake_nccl(comm) -> None:
    from collective.backends.device import DeviceCollectives

    world, mod, bes = make_backends(1)
    mod.tl.rank = 0
    be = bes[0]

    class Xp:  # numpy, plus asarray of a device array (what cupy.asarray does)
        __name__ = "numpy"

        def __getattr__(self, name: str):
            return getattr(np, name)

        def asarray(self, a):
            return a.a if isinstance(a, HostCudaArray) else np.asarray(a)

    be.xp = Xp()
    made = []
    dev = DeviceCollectives(comm, "auto", nccl_problem=None, nccl_factory=lambda m: made.append(m) or be)
    x = HostCudaArray(np.arange(4, dtype=np.float64), stream=33)
    y = dev.call("allreduce", x, "sum", "native")
    assert dev.nccl is be and len(made) == 1 and dev.why == "NCCL usable on every rank"
    assert isinstance(y, np.ndarray) and np.array_equal(y, x.a)
    assert be.dev.waited[-1] == (33,)  # the comm stream waits for the producer's stream
    z = dev.call("allgather", x, None, "ring", async_=True).wait()
    assert np.array_equal(z, x.a)
    with pytest.raises(CollectiveValueError, match="shm works on host memory"):
        dev.call("allreduce", x, "sum", "shm")
    assert len(made) == 1


def test_communicator_routes_device_arrays(comm) -> None:
    """comm.allreduce(device array) goes to DeviceCollectives; host arrays are untouched by it."""
    from collective.backends.device import DeviceCollectives

    saved = comm._device_colls
    ops = FakeOps()
    comm._device_colls = DeviceCollectives(comm, "auto", stager=GpuStager(ops), cuda_aware=False,
                                           nccl_problem="no CUDA device")
    try:
        x = HostCudaArray(np.arange(4, dtype=np.int64), stream=7)
        y = comm.allreduce(x, op="max", algorithm="ring")
        assert isinstance(y, HostCudaArray) and np.array_equal(y.a, x.a)
        assert comm.broadcast(x, root=0, out=x) is x
        assert comm.reduce(x, root=0).a.tolist() == [0, 1, 2, 3]
        assert np.array_equal(comm.reduce_scatter(x).a, x.a) and np.array_equal(comm.allgather(x).a, x.a)
        w = comm.allreduce_async(x)
        assert np.array_equal(w.wait().a, x.a)
        assert ("sync", 7) in ops.calls
        assert np.array_equal(comm.allreduce(np.ones(3)), np.ones(3))
    finally:
        comm._device_colls = saved


def test_communicator_backend_option() -> None:
    import collective as col

    with pytest.raises(CollectiveValueError, match="unknown backend 'gloo'"):
        col.Communicator(backend="gloo")


def test_device_arrays_without_cupy_are_a_type_error(comm) -> None:
    if GPU_REASON is None:
        pytest.skip("a GPU is usable here: device arrays can be moved")
    with pytest.raises(CollectiveTypeError, match="is device memory.*neither a GPU backend.*cupy.asnumpy"):
        comm.allreduce(HostCudaArray(np.ones(4, np.float32)))


def test_device_collectives_setup_errors_and_fallback(comm, monkeypatch: pytest.MonkeyPatch) -> None:
    from collective.backends.device import DeviceCollectives

    monkeypatch.setenv("COLLECTIVE_MPI_CUDA_AWARE", "maybe")
    dev = DeviceCollectives(comm, "auto", stager=GpuStager(FakeOps()), nccl_problem=None)
    with pytest.raises(CollectiveValueError, match="COLLECTIVE_MPI_CUDA_AWARE='maybe'"):
        dev.setup()
    monkeypatch.delenv("COLLECTIVE_MPI_CUDA_AWARE")

    def no_nccl(mcomm: object) -> None:
        raise BackendUnavailableError("rank 0 could not create the NCCL unique id (boom)")

    dev = DeviceCollectives(comm, "auto", stager=GpuStager(FakeOps()), cuda_aware=False, nccl_problem=None,
                            nccl_factory=no_nccl)
    y = dev.call("allreduce", HostCudaArray(np.ones(3, np.float32)), "sum", "ring")
    assert np.array_equal(y.a, np.ones(3)) and dev.nccl is None and "could not be set up" in dev.why
    strict = DeviceCollectives(comm, "nccl", nccl_problem=None, nccl_factory=no_nccl)
    with pytest.raises(BackendUnavailableError, match="unique id"):
        strict.setup()


def test_device_setup_failures_leave_the_host_communicator_usable() -> None:
    """Errors of the device setup reach every rank after its agreement (no rank is left in it): the communicator's
    host calls go on, and the error is the library's (BackendUnavailableError, the cause kept)."""
    import collective as col
    from collective.backends.device import DeviceCollectives

    c = col.Communicator()
    try:
        def init_fails(mcomm: object) -> None:
            raise RuntimeError("NCCL error: unhandled system error (fake)")

        def no_device(comm: object) -> None:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected (fake)")

        dev = DeviceCollectives(c, "auto", stager=GpuStager(FakeOps()), cuda_aware=False, nccl_problem=None,
                                nccl_factory=init_fails)
        with pytest.raises(BackendUnavailableError, match="unhandled system error") as info:
            dev.setup()
        assert isinstance(info.value.__cause__, RuntimeError) and dev.nccl is None
        dev = DeviceCollectives(c, "auto", stager=GpuStager(FakeOps()), cuda_aware=False, nccl_problem=None)
        dev._local_problem = no_device  # type: ignore[method-assign]
        with pytest.raises(BackendUnavailableError, match="cudaErrorNoDevice") as info:
            dev.setup()
        assert isinstance(info.value.__cause__, RuntimeError)
        assert c.broken is None and np.array_equal(c.allreduce(np.ones(3)), np.ones(3))
    finally:
        c.close()


def test_device_collectives_refuses_nccl_when_unusable(comm) -> None:
    from collective.backends.device import DeviceCollectives

    dev = DeviceCollectives(comm, "nccl", nccl_problem="cupy not installed")
    with pytest.raises(BackendUnavailableError, match="rank\\(s\\) 0.*cupy not installed"):
        dev.call("allreduce", HostCudaArray(np.ones(2)))
    with pytest.raises(CollectiveValueError, match="unknown backend"):
        DeviceCollectives(comm, "gloo")


# ------------------------------------------------------------ staged, P > 1
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_device_arrays_through_mpi(nprocs: int) -> None:
    """Staged and CUDA-aware paths under mpiexec with host memory dressed as device arrays."""
    from mpi_util import check, count_passed, mpirun

    res = mpirun("gpu_staging.py", nprocs, timeout=300)
    check(res, f"device arrays through MPI at P={nprocs}")
    assert count_passed(res) > 600


# -------------------------------------------------------------- the bench
def test_bench_gpu_arguments() -> None:
    from collective.bench.bench_gpu import gpu_columns, split_args

    assert split_args(["--device", "gpu", "-b", "4K"]) == (["-b", "4K"], "gpu", "nccl")
    assert split_args(["--backend=mpi", "-n", "3", "--device=gpu"]) == (["-n", "3"], "gpu", "mpi")
    with pytest.raises(SystemExit, match="--device 'cpu'"):
        split_args(["--device", "cpu"])
    with pytest.raises(SystemExit, match="choose nccl or mpi"):
        split_args(["--backend", "gloo"])
    from collective.bench.cli import default_algorithms

    cols, notes = gpu_columns(["ring", "native", "shm", "gloo", "auto", "memcpy"], explicit=False)
    assert cols == ["native", "ring", "auto", "memcpy"]
    # the CPU default list: host-only columns (shm, alloc, native-lib, gloo) become notes, not empty columns
    cols, notes = gpu_columns(default_algorithms(), explicit=False)
    assert not {"shm", "alloc", "native-lib", "gloo"} & set(cols) and cols[0] == "native", cols
    assert any(n.startswith("native-lib: column absent") for n in notes), notes
    assert any(n.startswith("shm: column absent") for n in notes) and any(n.startswith("gloo:") for n in notes)
    with pytest.raises(SystemExit, match="-a shm: shm works on host memory"):
        gpu_columns(["native", "shm"], explicit=True)


def test_bench_gpu_says_why_it_cannot_run(capsys: pytest.CaptureFixture) -> None:
    if GPU_REASON is None:
        pytest.skip("a GPU is usable here")
    from collective.bench.bench_gpu import main

    assert main(["--device", "gpu", "-b", "4K", "-e", "4K"]) == 2
    assert f"no CUDA GPU: {GPU_REASON}" in capsys.readouterr().err
    assert main(["--device", "gpu", "-a", "shm"]) == 2


@pytest.mark.mpi
def test_bench_gpu_table_in_test_mode() -> None:
    """The GPU bench end to end on host memory dressed as device arrays (MPI path): same columns, exact results."""
    from collective.bench.bench_gpu import TEST_HOST_ENV
    from mpi_util import mpirun

    res = mpirun("gpu_bench_job.py", 2, ["--device", "gpu", "-b", "1K", "-e", "16K", "-f", "4", "-n", "2", "-w", "1",
                                         "-a", "native,ring,tree,memcpy", "--collective", "allreduce,reduce_scatter",
                                         "--wide"],
                 timeout=200, env={TEST_HOST_ENV: "1"})
    assert res.returncode == 0, res.output[-3000:]
    out = res.output
    assert out.count("# Out of bounds values : 0 OK") == 2, out[-3000:]
    assert "time  iqr  algbw  busbw #wrong" in out and "busbw / native busbw" in out
    assert "local copy" in out and "busbw = algbw x 2(P-1)/P" in out and "(P-1)/P" in out


# ------------------------------------------------------------ on a real GPU
def _gpus() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


@pytest.mark.gpu
def test_gpu_present_or_skipped_visibly() -> None:
    if GPU_REASON is not None:
        pytest.skip(f"no CUDA GPU: {GPU_REASON}")
    assert _gpus() >= 1


@pytest.mark.gpu
def test_gpu_single_rank_nccl_backend() -> None:
    if GPU_REASON is not None:
        pytest.skip(f"no CUDA GPU: {GPU_REASON}")
    import cupy
    from mpi4py import MPI

    be = N.NCCLBackend.create(MPI.COMM_SELF, 0)
    try:
        for alg in ("native", "ring", "tree"):
            x = cupy.arange(10, dtype=cupy.float32)
            assert bool((be.allreduce(x, algorithm=alg) == x).all())
            assert bool((be.allgather(x, algorithm=alg) == x).all())
        st = GpuStager()
        h = st.to_host(cupy.arange(5, dtype=cupy.int32))
        assert np.array_equal(h, np.arange(5)) and np.array_equal(cupy.asnumpy(st.to_device(h)), np.arange(5))
    finally:
        be.close()


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["nccl", "mpi"])
def test_gpu_correctness_job(backend: str) -> None:
    """The correctness suite on device arrays: NCCL native and Schedules over NCCL, and MPI (staged or CUDA-aware)."""
    if GPU_REASON is not None:
        pytest.skip(f"no CUDA GPU: {GPU_REASON}")
    from mpi_util import check, mpirun

    n = _gpus()
    # NCCL needs one GPU per rank (on one GPU the suite runs NCCL's own calls and our code at P=1); the MPI
    # path can share one GPU between ranks.
    P = min(n, 4) if backend == "nccl" else 2
    res = mpirun("gpu_correctness.py", P, ["--backend", backend], timeout=600)
    check(res, f"GPU correctness ({backend}) at P={P}")
    if backend == "nccl":
        # One rank more than GPUs: every rank gets our reason instead of NCCL's "Duplicate GPU" (or a hang).
        res = mpirun("gpu_correctness.py", n + 1, ["--backend", "nccl", "--quick"], timeout=120)
        check(res, f"backend nccl with {n + 1} ranks on {n} GPU(s)")
        assert "REFUSED as expected" in res.output, res.output[-2000:]
