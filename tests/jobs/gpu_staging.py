"""Device arrays through MPI, without a GPU: host memory dressed as device arrays, staged or passed "CUDA-aware".

Every collective x algorithm x op x dtype x size through DeviceCollectives'
MPI paths, checked exactly; in place, with out=, async; the stager reuses its
pinned buffers and synchronises the producing stream before every copy; a bad
argument on one rank makes every rank raise.
Usage: mpiexec -n P python gpu_staging.py
"""
from __future__ import annotations

import numpy as np

import collective as col
from collective.backends.device import DeviceCollectives
from collective.backends.gpu_staging import GpuStager
from collective.errors import CollectiveMismatchError, CollectiveValueError
from gpu_fakes import FakeOps, HostCudaArray
from collective.bench.core import expected as exact_expected
from collective.bench.core import values  # small integers whose reduction is exact in every dtype and order
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
PRODUCER = 7  # the stream HostCudaArray names as its producer


def expect(name: str, n: int, dtype: np.dtype, op: str, root: int) -> np.ndarray | None:
    """The exact result this rank must hold (the benchmark's check, on its small integers)."""
    return exact_expected(name, n, dtype, op, root, R, P)


def same(got, want, what: str) -> None:
    if want is None:
        assert got is None, f"{what}: expected None, got {type(got).__name__}"
        return
    assert isinstance(got, HostCudaArray), f"{what}: got {type(got).__name__}, expected a device array"
    assert got.a.dtype == want.dtype and got.a.shape == want.shape, \
        f"{what}: {got.a.shape} {got.a.dtype} vs {want.shape}"
    assert np.array_equal(got.a, want), f"{what}: {got.a[:8]} != {want[:8]}"


def call(dev: DeviceCollectives, name: str, x, op: str, alg: str, root: int, out=None, async_: bool = False):
    r = dev.call(name, x, op, alg, root, out, async_=async_)
    return r.wait() if async_ else r


def sweep(dev: DeviceCollectives, label: str, algs: list[str]) -> None:
    for name in ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather"):
        for alg in algs:
            for dt in (np.dtype("int32"), np.dtype("float64"), np.dtype("int8")):
                for op in (("sum", "avg", "max") if name in ("allreduce", "reduce", "reduce_scatter") else ("sum",)):
                    for n in (1, 37):
                        for root in ((0, P - 1) if name in ("reduce", "broadcast") else (0,)):
                            def one() -> None:
                                x = HostCudaArray(values(R, n, dt, op), stream=PRODUCER)
                                x0 = x.a.copy()
                                same(call(dev, name, x, op, alg, root), expect(name, n, dt, op, root), "out-of-place")
                                assert np.array_equal(x.a, x0), "input modified"
                                same(call(dev, name, x, op, alg, root, async_=True), expect(name, n, dt, op, root),
                                     "async")
                                if name in ("allreduce", "broadcast", "reduce"):
                                    y = HostCudaArray(values(R, n, dt, op), stream=PRODUCER)
                                    r = call(dev, name, y, op, alg, root, out=y)
                                    want = expect(name, n, dt, op, root)
                                    if want is not None:
                                        assert r is y, "in place must return out"
                                        same(r, want, "in place")
                            cases.run(f"{label} {name} {alg} {dt} {op} n={n} root={root}", one)


# ------------------------------------------------------------- staged path
ops = FakeOps()
staged = DeviceCollectives(comm, "auto", stager=GpuStager(ops), cuda_aware=False,
                           nccl_problem="no CUDA device (fake)")
sweep(staged, "staged", ["native", "ring", "tree", "auto"])


def staged_setup() -> None:
    assert staged.nccl is None and not staged.cuda_aware
    assert "NCCL not usable" in staged.why and "staged" in staged.why, staged.why


def staged_syncs_producer_first() -> None:
    ops.calls.clear()
    x = HostCudaArray(np.ones(5, np.float32), stream=PRODUCER)
    out = HostCudaArray(np.zeros(5, np.float32), stream=11)
    staged.call("allreduce", x, "sum", "ring", 0, out)
    names = ops.names()
    assert ("sync", PRODUCER) in ops.calls, ops.calls
    assert names.index("d2h") > ops.calls.index(("sync", PRODUCER)), ops.calls
    # out's stream is synchronised before the copy into it (kernels may still use out)
    assert names.index("h2d") > ops.calls.index(("sync", 11)), ops.calls
    assert np.array_equal(out.a, np.full(5, P, np.float32))


def staged_reuses_pinned_buffers() -> None:
    st = staged.stager
    x = HostCudaArray(np.ones(1000, np.float64))

    def step() -> None:
        staged.call("allreduce", x, "sum", "ring")
        staged.call("allgather", x, None, "native")
        staged.call("reduce", x, "sum", "tree", P - 1)
        w = staged.call("allreduce", x, "sum", "ring", async_=True)
        staged.call("broadcast", x, None, "native", 0)
        w.wait()

    step()
    before = st.allocations
    for _ in range(20):
        step()
    assert st.allocations == before, f"{st.allocations - before} pinned allocations in steady state"


def staged_out_checked() -> None:
    x = HostCudaArray(np.ones(4, np.float32))
    try:
        staged.call("allreduce", x, "sum", "ring", 0, HostCudaArray(np.zeros(5, np.float32)))
    except CollectiveValueError as exc:
        assert "shape" in str(exc)
    else:
        raise AssertionError("a wrong out shape was accepted")


cases.run("staged setup", staged_setup)
cases.run("staged: producer stream synchronised before every copy", staged_syncs_producer_first)
cases.run("staged: pinned buffers reused", staged_reuses_pinned_buffers)
cases.run("staged: out checked on every rank", staged_out_checked)


def one_rank_bad_root() -> None:
    # Rank 1 passes a bad root: it raises its own error, the others a mismatch naming it; nobody hangs.
    root = P if R == 1 else 0
    try:
        staged.call("reduce", HostCudaArray(np.ones(3, np.float32)), "sum", "ring", root)
    except CollectiveValueError:
        assert R == 1
    except CollectiveMismatchError as exc:
        assert R != 1 and "rank 1" in str(exc), str(exc)
    else:
        raise AssertionError("no error")
    # the communicator is still usable afterwards
    same(staged.call("allreduce", HostCudaArray(np.ones(2, np.int32)), "sum", "ring"), np.full(2, P, np.int32), "after")


if P > 1:
    cases.run("staged: a bad argument on one rank raises on every rank", one_rank_bad_root)

# ------------------------------------------------------ "CUDA-aware" path
# mpi4py takes __cuda_array_interface__ buffers; over host memory this runs the direct path for real.
dops = FakeOps()
direct = DeviceCollectives(comm, "mpi", stager=GpuStager(dops), cuda_aware=True)
sweep(direct, "direct", ["native", "auto", "ring"])


def direct_skips_staging() -> None:
    dops.calls.clear()
    x = HostCudaArray(np.ones(6, np.int64), stream=PRODUCER)
    y = direct.call("allreduce", x, "sum", "native")
    assert np.array_equal(y.a, np.full(6, P, np.int64))
    assert "d2h" not in dops.names() and "h2d" not in dops.names(), dops.calls
    assert ("sync", PRODUCER) in dops.calls, dops.calls
    # avg needs a host-side division: staged, even with CUDA-aware MPI
    dops.calls.clear()
    z = direct.call("allreduce", x, "avg", "native")
    assert np.array_equal(z.a, np.ones(6, np.int64)) and "d2h" in dops.names()


cases.run("direct: device buffers go to MPI, the producer synchronised", direct_skips_staging)
cases.finish()
