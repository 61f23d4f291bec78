"""The CuPy, cupy.cuda.nccl and CUDA runtime calls of collective's GPU path, checked against the installed CuPy.

No GPU is needed: the names, the argument order of every call (read from the
signatures Cython embeds in CuPy's docstrings), NCCL's enum values, the form of
the unique id, and that the in-process fake NCCL the backend tests run on has the
same signatures as the real one. Skipped, with the reason, where CuPy is not
installed (``pip install 'pycollective[gpu]'``).
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "jobs"))

cupy = pytest.importorskip("cupy", reason="cupy not installed: the CuPy API-conformance checks need it "
                                          "(pip install 'pycollective[gpu]'; no GPU needed)")

import warnings  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from cupy.cuda import nccl  # noqa: E402

from gpu_fakes import FakeNccl, FakeNcclComm  # noqa: E402

from collective.backends import nccl as N  # noqa: E402
from collective.ops import OPS  # noqa: E402

if not getattr(nccl, "available", False):
    pytest.skip("cupy.cuda.nccl cannot load libnccl (pip install nvidia-nccl-cu12)", allow_module_level=True)


def params(f: Any) -> list[str]:
    """Parameter names of ``f`` (without self): from Cython's embedded signature, else inspect."""
    doc = (getattr(f, "__doc__", None) or "").strip()
    m = re.match(r"^[\w.]+\((.*?)\)", doc)
    if m is None:
        return [p for p in inspect.signature(f).parameters if p != "self"]
    out = []
    for p in m.group(1).split(","):
        p = p.split("=")[0].strip()
        if p and p != "self":
            out.append(p.split()[-1].lstrip("*"))
    return out


def _role(name: str) -> str:
    return {"sendbuff": "sendbuf", "recvbuff": "recvbuf"}.get(name, name)


#: NcclCommunicator methods the backend calls, with the argument order it passes them in
#: (collective/backends/nccl.py: NCCLBackend._native, run_plan; NcclWatch; close).
NCCL_METHODS = {
    "allReduce": ["sendbuf", "recvbuf", "count", "datatype", "op", "stream"],
    "reduce": ["sendbuf", "recvbuf", "count", "datatype", "op", "root", "stream"],
    "broadcast": ["sendbuf", "recvbuf", "count", "datatype", "root", "stream"],
    "reduceScatter": ["sendbuf", "recvbuf", "recvcount", "datatype", "op", "stream"],
    "allGather": ["sendbuf", "recvbuf", "count", "datatype", "stream"],
    "send": ["sendbuf", "count", "datatype", "peer", "stream"],
    "recv": ["recvbuf", "count", "datatype", "peer", "stream"],
    "check_async_error": [],
    "abort": [],
    "destroy": [],
}


@pytest.mark.parametrize("method", sorted(NCCL_METHODS))
def test_nccl_communicator_methods_take_the_arguments_we_pass(method: str) -> None:
    f = getattr(nccl.NcclCommunicator, method)
    assert [_role(p) for p in params(f)] == NCCL_METHODS[method], f.__doc__.splitlines()[0]
    # the fake the backend tests run on takes as many arguments, so a call the backend gets wrong fails there too
    fake = [p for p in inspect.signature(getattr(FakeNcclComm, method)).parameters if p != "self"]
    assert len(fake) == len(NCCL_METHODS[method]), (method, fake)


def test_nccl_module_functions_and_constructor() -> None:
    for name in ("groupStart", "groupEnd", "get_unique_id", "get_version", "NcclError"):
        assert hasattr(nccl, name), name
        if name.startswith("group"):
            assert params(getattr(nccl, name)) == [] and hasattr(FakeNccl, name)
    # NcclCommunicator(ndev, commId, rank[, config]): NCCLBackend.create passes (size, uid, rank)
    assert params(nccl.NcclCommunicator)[:3] == ["ndev", "commId", "rank"], nccl.NcclCommunicator.__doc__[:120]
    v = nccl.get_version()  # no GPU needed
    assert isinstance(v, int) and v >= N.MIN_VERSION, N.version_text(v)


def test_nccl_constants_are_our_tables() -> None:
    N.check_constants(nccl)  # no renumbering
    missing = [k for k in N._CONSTANTS if not hasattr(nccl, k)]
    # NCCL_BFLOAT16 exists only in CuPy built against NCCL 2.10+
    assert missing in ([], ["NCCL_BFLOAT16"]), missing
    for name, value in vars(FakeNccl).items():
        if name.startswith("NCCL_"):
            assert getattr(nccl, name) == value, name
    assert nccl.NCCL_UINT8 == N.NCCL_BYTE  # send/recv and collectives without reduction count bytes


def test_unique_id_form_is_accepted_by_this_cupy() -> None:
    """get_unique_id's value survives the bootstrap's int64 buffer and new_communicator passes it in a form
    NcclCommunicator accepts: without a GPU ncclCommInitRank then fails (an NCCL/CUDA error), never the
    argument conversion (TypeError/OverflowError: the id's type)."""
    try:
        uid = nccl.get_unique_id()
    except nccl.NcclError as exc:
        pytest.skip(f"ncclGetUniqueId fails here: {exc}")
    assert len(uid) == 128
    ints = [int(v) for v in uid]  # what bootstrap_unique_id carries
    assert uid in N.unique_id_forms(ints)
    try:
        comm = N.new_communicator(nccl, 1, ints, 0)
    except (nccl.NcclError, cupy.cuda.runtime.CUDARuntimeError) as exc:
        assert N.probe() is not None, f"a GPU is usable, yet a 1-rank communicator failed: {exc}"
    else:  # a GPU: a communicator of one rank
        comm.destroy()


def test_cuda_runtime_calls() -> None:
    rt = cupy.cuda.runtime
    want = {
        "memcpyAsync": ["dst", "src", "size", "kind", "stream"],  # CupyOps.copy_to_host / copy_to_device
        "streamSynchronize": ["stream"],  # CupyOps.sync (1, 2: the default streams)
        "eventRecord": ["event", "stream"],  # CupyDevice.wait_for_caller (a producer's raw stream handle)
        "getDeviceCount": [],
        "getDeviceProperties": ["device"],  # bench_gpu: ["name"]
    }
    for name, args in want.items():
        assert params(getattr(rt, name)) == args, (name, getattr(rt, name).__doc__)
    assert (rt.memcpyHostToDevice, rt.memcpyDeviceToHost) == (1, 2)
    # __cuda_array_interface__ v3 names the default streams 1 and 2 (0 is forbidden): the runtime's handles
    assert (rt.streamLegacy, rt.streamPerThread) == (1, 2)


def test_cupy_stream_event_device_and_memory_calls() -> None:
    cuda = cupy.cuda
    assert "non_blocking" in params(cuda.Stream.__init__)  # Stream(non_blocking=True)
    for m in ("wait_event", "synchronize", "__enter__", "__exit__", "use"):
        assert callable(getattr(cuda.Stream, m)), m
    assert {"block", "disable_timing"} <= set(params(cuda.Event.__init__))
    assert isinstance(inspect.getattr_static(cuda.Event, "done"), property)  # read as event.done, not done()
    assert params(cuda.Event.record) == ["stream"]
    assert params(cuda.get_current_stream) == ["device_id"]
    assert params(cuda.alloc_pinned_memory) == ["size"]
    assert callable(cuda.Device.use)
    for attr in ("device", "data", "flags", "view", "reshape", "set"):
        assert hasattr(cupy.ndarray, attr), attr
    assert params(cupy.ndarray.set)[:1] == ["arr"]
    for fn in ("empty", "zeros", "full", "asarray", "asnumpy", "ascontiguousarray", "copyto", "floor_divide",
               "divide"):
        assert callable(getattr(cupy, fn)), fn
    # Schedules' reductions on the GPU: getattr(cupy, op.ufunc.__name__)
    for op in OPS.values():
        assert callable(getattr(cupy, op.ufunc.__name__)), op.name


def test_probe_here_names_a_reason_or_none() -> None:
    why = N.probe()
    if why is not None:
        assert "no CUDA device" in why or "NCCL" in why or "cupy" in why, why
    else:
        assert int(cupy.cuda.runtime.getDeviceCount()) >= 1


def test_dtypes_cupy_and_nccl_share() -> None:
    for name, code in N.NCCL_DTYPES.items():
        if name == "bfloat16":
            continue
        assert N.nccl_datatype(np.dtype(name)) == code == getattr(nccl, f"NCCL_{name.upper()}")
