"""The correctness suite on CuPy arrays: every collective x algorithm x op x dtype x size, exact answers, on GPUs.

``--backend nccl``: NCCL's own collectives (native) and our Schedules over
NCCL send/recv (ring, tree, star, hierarchical), one GPU per rank.
``--backend mpi``: the same calls through MPI (CUDA-aware, or staged through
pinned host buffers; COLLECTIVE_MPI_CUDA_AWARE=0 forces staging); ranks may
share a GPU. Inputs are small integers, so every order of reduction gives the
exact answer, and each rank computes the expected result itself.
Usage: mpiexec -n P python gpu_correctness.py [--backend nccl|mpi] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import zlib

import numpy as np

import collective as col
from collective.backends.nccl import native_plan, probe
from collective.bench.core import expected as exact_expected
from collective.bench.core import values  # small integers whose reduction is exact in every dtype and order
from harness import Cases

ap = argparse.ArgumentParser()
ap.add_argument("--backend", choices=("nccl", "mpi"), default="nccl")
ap.add_argument("--quick", action="store_true", help="fewer dtypes and sizes")
args = ap.parse_args()

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
why = probe()
if why is not None:
    if R == 0:
        print(f"SKIP gpu_correctness: no CUDA GPU: {why}", flush=True)
    cases.finish()
    sys.exit(0)

import cupy  # noqa: E402

from collective.backends.device import DeviceCollectives  # noqa: E402
from collective.backends.nccl import gpus_per_rank_problem, pick_device  # noqa: E402

# As in any NCCL program, each rank picks its GPU before it makes arrays (the NCCL backend uses the same rule).
cupy.cuda.Device(pick_device(comm.local_rank, cupy.cuda.runtime.getDeviceCount())).use()
dev = DeviceCollectives(comm, args.backend)
shared_gpu = gpus_per_rank_problem(comm.local_size, cupy.cuda.runtime.getDeviceCount())
if args.backend == "nccl" and shared_gpu is not None:
    def refused_everywhere() -> None:
        # More ranks than GPUs: NCCL itself would fail in ncclCommInitRank ("Duplicate GPU"); every rank
        # must get our reason instead, before any NCCL call, and nobody may be left waiting.
        try:
            dev.call("allreduce", cupy.ones(4, cupy.float32))
        except col.BackendUnavailableError as exc:
            assert "NCCL needs one GPU per rank" in str(exc) and "or use backend 'mpi'" in str(exc), str(exc)
            if R == 0:
                print(f"REFUSED as expected: {exc}", flush=True)
        else:
            raise AssertionError(f"backend 'nccl' accepted {P} ranks on one GPU")

    cases.run("ranks sharing a GPU: backend nccl refused on every rank", refused_everywhere)
    cases.finish()
    sys.exit(0)
ALGS = ["native", "ring", "tree", "star", "hierarchical", "auto"]
DTYPES = [np.dtype(d) for d in (("int32", "float32", "complex64", "int16") if args.quick else
                                ("int8", "uint8", "int32", "int64", "float16", "float32", "float64", "complex64",
                                 "int16"))]
SIZES = [1, 37, 4099] if args.quick else [1, 37, 4099, (1 << 16) + 3]
OPS = ["sum", "avg", "prod", "min", "max"]


def expected(name: str, n: int, dtype: np.dtype, op: str, root: int) -> np.ndarray | None:
    """The exact result this rank must hold (the benchmark's check, on its small integers)."""
    return exact_expected(name, n, dtype, op, root, R, P)


def same(got, want, what: str) -> None:
    if want is None:
        assert got is None, f"{what}: expected None off the root, got {type(got).__name__}"
        return
    assert isinstance(got, cupy.ndarray), f"{what}: got {type(got).__name__}, expected cupy.ndarray"
    g = cupy.asnumpy(got)
    assert g.shape == want.shape and g.dtype == want.dtype, f"{what}: {g.shape} {g.dtype} vs {want.shape} {want.dtype}"
    if not np.array_equal(g, want):
        bad = np.flatnonzero(g.reshape(-1) != want.reshape(-1))
        k = int(bad[0])
        raise AssertionError(f"{what}: element {k} is {g.reshape(-1)[k]}, expected {want.reshape(-1)[k]} "
                             f"({bad.size} wrong of {g.size})")


def identical_on_every_rank(a, what: str) -> None:
    h = np.array([zlib.crc32(cupy.asnumpy(a).tobytes())], np.int64)
    every = np.empty(P, np.int64)
    comm.mpi_comm.Allgather(h, every)
    assert (every == every[0]).all(), f"{what}: results differ between ranks (crc32 {every.tolist()})"


def ops_for(name: str, dtype: np.dtype) -> list[str]:
    if name not in ("allreduce", "reduce", "reduce_scatter"):
        return ["sum"]
    return [o for o in OPS if not (dtype.kind == "c" and o in ("min", "max"))]


def check(name: str, alg: str, dtype: np.dtype, op: str, n: int, root: int) -> None:
    what = f"{args.backend} {name} {alg} {dtype} {op} n={n} root={root}"
    x = cupy.asarray(values(R, n, dtype, op))
    x0 = x.copy()
    want = expected(name, n, dtype, op, root)
    got = dev.call(name, x, op, alg, root)
    same(got, want, what)
    assert bool((x == x0).all()), f"{what}: the input changed"
    if got is not None and name not in ("reduce", "reduce_scatter"):  # reduce_scatter: each rank its own block
        identical_on_every_rank(got, what)
    if name in ("allreduce", "broadcast", "reduce"):
        y = x.copy()
        r = dev.call(name, y, op, alg, root, y)
        if want is not None:
            assert r is y, f"{what}: in place must return out"
            same(y, want, what + " in place")
    w = dev.call(name, x, op, alg, root, async_=True)
    same(w.wait(), want, what + " async")


for name in ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather"):
    for alg in ALGS:
        for dt in DTYPES:
            for op in ops_for(name, dt):
                if alg == "native" and args.backend == "nccl" and isinstance(native_plan(name, dt, op), str):
                    continue  # refused before any message: checked below
                for n in SIZES:
                    for root in ((0, P - 1) if name in ("reduce", "broadcast") else (0,)):
                        cases.run(f"{name} {alg} {dt} {op} n={n} root={root}",
                                  lambda: check(name, alg, dt, op, n, root))


def producer_stream_is_respected() -> None:
    # x is written by a kernel on another stream and never synchronised by the caller: the collective
    # must still see the finished values (comm stream waits on an event / the stager syncs the stream).
    s = cupy.cuda.Stream(non_blocking=True)
    for alg in ("native", "ring"):
        with s:
            x = cupy.zeros(1 << 22, cupy.float32)
            for _ in range(20):  # keep the stream busy for a while
                x += 1
            y = dev.call("allreduce", x, "sum", alg)
        s.synchronize()
        same(y, np.full(1 << 22, 20 * P, np.float32), f"producer stream ({alg})")


def large_every_algorithm() -> None:
    n = 4 << 20
    for alg in ALGS:
        x = cupy.full(n, R + 1, cupy.float32)
        same(dev.call("allreduce", x, "sum", alg), np.full(n, P * (P + 1) // 2, np.float32), f"16 MiB {alg}")


def refusals() -> None:
    x = cupy.ones(4, cupy.float32)
    bad = [(lambda: dev.call("allreduce", x, "sum", "shm"), "shm")] if args.backend == "nccl" else []
    for fn, words in bad + [
        (lambda: dev.call("allreduce", x, "median", "ring"), "op"),
        (lambda: dev.call("reduce", x, "sum", "ring", P), "root"),
        (lambda: dev.call("allreduce", x, "sum", "ring", 0, cupy.ones(5, cupy.float32)), "shape"),
    ]:
        try:
            fn()
        except col.CollectiveError as exc:
            assert words in str(exc), str(exc)
        else:
            raise AssertionError(f"accepted: {words}")
    if args.backend == "nccl":
        try:
            dev.call("allreduce", cupy.ones(4, cupy.int16), "sum", "native")
        except col.CollectiveTypeError as exc:
            assert "int16" in str(exc)
        else:
            raise AssertionError("int16 native accepted")
    same(dev.call("allreduce", x, "sum", "ring"), np.full(4, P, np.float32), "after refusals")


cases.run("producer stream respected", producer_stream_is_respected)
cases.run("16 MiB, every algorithm", large_every_algorithm)
cases.run("bad arguments refused on every rank", refusals)
if R == 0:
    print(f"backend {args.backend}: {dev.why}", flush=True)
if dev.nccl is not None:
    dev.nccl.synchronize()
cases.finish()
