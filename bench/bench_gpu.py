"""collective-bench on GPUs: NCCL's own collectives against our ring/tree/star/hierarchical over NCCL, CPU's columns.

Run ``python -m collective.bench.bench_gpu`` with collective-bench's flags (``-b -e -f -n
-w -c -o -d -a --collective -r -J``), plus ``--backend nccl|mpi`` (default
nccl; mpi measures device arrays through MPI: CUDA-aware or staged) and
``--device gpu`` (accepted, for ``collective-bench --device gpu``). Columns:
``native`` (NCCL's collective), the Schedules over NCCL send/recv, ``auto``,
and ``memcpy`` (a device-to-device copy of the same bytes). Every ratio is
against ``native`` in the same run.

Timing: a barrier on the benchmark's own MPI communicator, then the call,
then a synchronisation of the caller's stream (the collective is ordered
before it); the slowest rank's time counts, the median over iterations is
reported. Buffers are device arrays allocated once for the largest size.
"""
from __future__ import annotations

import functools
import gc
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from .cli import busbw_factor, parse_args
from .core import (IP, OOP, CollectiveResult, JobInfo, SizeResult, Stat, counts, expected, modes_of, probe_cases,
                   values)

__all__ = ["main", "split_args", "gpu_columns", "TEST_HOST_ENV"]

#: Set to 1 to run on host memory dressed as device arrays through the MPI path (tests without a GPU).
TEST_HOST_ENV = "COLLECTIVE_BENCH_TEST_HOST_GPU"
#: Columns that mean nothing on a GPU.
_HOST_ONLY = {"shm": "shm works on host memory", "gloo": "gloo is a CPU transport here",
              "broken": "the test column exists on CPU only", "alloc": "comm.alloc arrays live in host memory",
              "native-lib": "on a GPU the native column itself runs NCCL's (or MPI's) own behind the library"}


def split_args(argv: Sequence[str]) -> tuple[list[str], str, str]:
    """Take ``--device`` and ``--backend`` out of a collective-bench command line.

    Returns:
        ``(the other arguments, device, backend)``.

    Raises:
        SystemExit: a value other than gpu / nccl|mpi.

    Example::

        split_args(["--device", "gpu", "-b", "4K"])   # (["-b", "4K"], "gpu", "nccl")
    """
    rest: list[str] = []
    device, backend = "gpu", "nccl"
    it = iter(argv)
    for a in it:
        key, eq, val = a.partition("=")
        if key in ("--device", "--backend"):
            if not eq:
                val = next(it, "")
            if key == "--device":
                if val != "gpu":
                    raise SystemExit(f"collective-bench: --device {val!r}: bench_gpu measures --device gpu")
                device = val
            else:
                if val not in ("nccl", "mpi"):
                    raise SystemExit(f"collective-bench: --backend {val!r}: choose nccl or mpi")
                backend = val
        else:
            rest.append(a)
    return rest, device, backend


def gpu_columns(algorithms: Sequence[str], explicit: bool) -> tuple[list[str], list[str]]:
    """The columns measured on a GPU, and notes for those left out (host-only ones named explicitly are errors).

    Example::

        gpu_columns(["native", "ring", "shm", "gloo", "memcpy"], explicit=False)
        # (["native", "ring", "memcpy"], ["shm: column absent, shm works on host memory", ...])
    """
    cols, notes = [], []
    for a in algorithms:
        if a in _HOST_ONLY:
            if explicit:
                raise SystemExit(f"collective-bench --device gpu: -a {a}: {_HOST_ONLY[a]}")
            notes.append(f"{a}: column absent, {_HOST_ONLY[a]}")
            continue
        cols.append(a)
    if "native" in cols:  # every ratio is against native: it goes first
        cols.remove("native")
        cols.insert(0, "native")
    return cols, notes


# ------------------------------------------------------------ device arrays
class _CupyArrays:
    """Device buffers through CuPy."""

    def __init__(self) -> None:
        import cupy

        self.cp = cupy

    def zeros(self, n: int, dtype: np.dtype) -> Any:
        return self.cp.zeros(n, dtype)

    def upload(self, dst: Any, src: np.ndarray) -> None:
        dst.set(src)

    def download(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)

    def copy(self, dst: Any, src: Any) -> None:
        self.cp.copyto(dst, src)

    def sync(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()

    def describe(self) -> str:
        cp = self.cp
        dev = cp.cuda.Device()
        name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return f"CuPy {cp.__version__}, {name}"


class _HostArray:
    """Host memory seen only through ``__cuda_array_interface__`` (the test mode: no GPU)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.a.shape, "typestr": self.a.dtype.str, "version": 3, "strides": None, "stream": None,
                "data": (int(self.a.__array_interface__["data"][0]), False)}

    def __getitem__(self, s: slice) -> "_HostArray":
        return _HostArray(self.a[s])


class _HostOps:
    """GpuStager's device calls over host memory (the test mode)."""

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def copy_stream(self) -> int:
        return 1

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        import ctypes

        ctypes.memmove(dst, src, nbytes)

    copy_to_device = copy_to_host

    def sync(self, stream: int) -> None:
        pass

    def empty(self, shape: tuple, dtype: Any) -> _HostArray:
        return _HostArray(np.empty(shape, dtype))


class _HostArrays:
    def zeros(self, n: int, dtype: np.dtype) -> _HostArray:
        return _HostArray(np.zeros(n, dtype))

    def upload(self, dst: _HostArray, src: np.ndarray) -> None:
        np.copyto(dst.a, src)

    def download(self, a: _HostArray) -> np.ndarray:
        return a.a.copy()

    def copy(self, dst: _HostArray, src: _HostArray) -> None:
        np.copyto(dst.a, src.a)

    def sync(self) -> None:
        pass

    def describe(self) -> str:
        return "host memory dressed as device arrays (test mode, no GPU)"


# ------------------------------------------------------------------ the run
class _GpuRun:
    def __init__(self, opts: Any, comm: Any, dev: Any, arrays: Any, mpicomm: Any, reporter: Any) -> None:
        from mpi4py import MPI

        self.MPI, self.opts, self.comm, self.dev = MPI, opts, comm, dev
        self.ar, self.mpi, self.rep = arrays, mpicomm, reporter
        self.P, self.R = mpicomm.Get_size(), mpicomm.Get_rank()

    def _call(self, coll: str, alg: str, x: Any, out: Any) -> Callable[[], Any]:
        o, dev = self.opts, self.dev
        op = o.op if coll in ("allreduce", "reduce", "reduce_scatter") else None
        root = o.root if coll in ("reduce", "broadcast") else 0
        return functools.partial(dev.call, coll, x, op, alg, root, out)

    def measure(self, coll: str, info: JobInfo, cols: list[str], notes: list[str]) -> CollectiveResult:
        o, P, R, ar = self.opts, self.P, self.R, self.ar
        dtype = o.dtype
        root = o.root if coll in ("reduce", "broadcast") else -1
        modes = {c: modes_of(c, coll) for c in cols}
        factor = busbw_factor(coll, P)
        shapes = list(dict.fromkeys(counts(coll, s, dtype.itemsize, P) for s in o.sizes))
        res = CollectiveResult(coll, root, factor, cols, modes, False, notes=list(notes))
        if self.rep is not None:
            self.rep.begin(info, o, res)
        max_in, max_out = max(s[1] for s in shapes), max(s[2] for s in shapes)
        max_count = max(s[0] for s in shapes)
        bufs = {}
        for c in cols:  # device buffers, allocated once for the largest size
            n_in, n_out = (max_count, max_count) if c == "memcpy" else (max_in, max_out)
            bufs[c] = (ar.zeros(n_in, dtype), ar.zeros(n_out, dtype), ar.zeros(n_in if IP in modes[c] else 0, dtype))
        seen = set(res.notes)
        for count, n_in, n_out in shapes:
            row = self.one_size(coll, cols, modes, bufs, count, n_in, n_out, factor, seen, res)
            res.rows.append(row)
            if self.rep is not None:
                self.rep.row(res, row)
        if self.rep is not None:
            self.rep.end(res)
        return res

    def one_size(self, coll: str, cols: list[str], modes: dict, bufs: dict, count: int, n_in: int, n_out: int,
                 factor: float, seen: set[str], res: CollectiveResult) -> SizeResult:
        o, MPI, mpi, P, R, ar = self.opts, self.MPI, self.mpi, self.P, self.R, self.ar
        dtype = o.dtype
        size = count * dtype.itemsize
        inp = values(R, n_in, dtype, o.op)
        cases: list[tuple[str, str, Callable[[], Any], Any, Callable[[], None] | None]] = []
        for c in cols:
            x, y, z = bufs[c]
            if c == "memcpy":
                cases.append((c, OOP, functools.partial(ar.copy, y[:count], x[:count]), None, None))
                continue
            xs, ys = x[:n_in], y[:n_out]
            ar.upload(xs, inp)
            for mode in modes[c]:
                if mode == IP:
                    zs = z[:n_in]
                    ar.upload(zs, inp)
                    cases.append((c, mode, self._call(coll, c, zs, zs), zs, functools.partial(ar.upload, zs, inp)))
                else:
                    cases.append((c, mode, self._call(coll, c, xs, ys), ys, None))
        ok = probe_cases([cs[2] for cs in cases], [(cs[0], cs[1]) for cs in cases], mpi, seen, res.notes, ar.sync)
        cases = [cs for i, cs in enumerate(cases) if ok[i]]
        k, n = len(cases), o.iters
        t = np.zeros((k, n), np.float64)
        barrier, clock, sync = mpi.Barrier, time.perf_counter, ar.sync
        orders = np.random.default_rng(20240531).permuted(np.tile(np.arange(k), (o.warmup + n, 1)), axis=1)
        gc.collect()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for it in range(-o.warmup, n):
                for i in orders[it + o.warmup]:
                    fn = cases[i][2]
                    barrier()
                    t0 = clock()
                    fn()
                    sync()  # the caller's stream is ordered after the collective
                    t1 = clock()
                    if it >= 0:
                        t[i, it] = t1 - t0
        finally:
            if gc_was:
                gc.enable()
        if k:
            mpi.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)
        wrong = np.zeros(k, np.int64)
        if o.check and k:
            root = o.root if coll in ("reduce", "broadcast") else 0
            want = expected(coll, n_in, dtype, o.op, root, R, P)
            for i, (c, mode, fn, result, reset) in enumerate(cases):
                if c == "memcpy":
                    continue
                if reset is not None:
                    reset()
                    barrier()
                    fn()
                ar.sync()
                has = coll != "reduce" or R == root
                if has and result is not None and want is not None:
                    wrong[i] = int(np.count_nonzero(ar.download(result) != want))
            mpi.Allreduce(MPI.IN_PLACE, wrong, op=MPI.SUM)
        row = SizeResult(size, count, n_in * dtype.itemsize)
        for i, (c, mode, *_rest) in enumerate(cases):
            f = 1.0 if c == "memcpy" else factor
            checked = o.check and c != "memcpy"
            row.cells.setdefault(c, {})[mode] = Stat(t[i] * 1e6, size, f, int(wrong[i]) if checked else None)
        return row


def _base_collectives(opts: Any) -> Any:
    """``--collective all`` on GPUs means allreduce and its kin; naming another collective is a usage error."""
    import dataclasses

    from .cli import BASE_COLLECTIVES, COLLECTIVES

    if opts.collectives == COLLECTIVES:
        return dataclasses.replace(opts, collectives=BASE_COLLECTIVES)
    more = [c for c in opts.collectives if c not in BASE_COLLECTIVES]
    if more:
        raise SystemExit(f"collective-bench --device gpu: --collective {','.join(more)}: measured on the CPU only; "
                         f"the GPU bench measures {', '.join(BASE_COLLECTIVES)}")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPU benchmark on every rank; rank 0 prints the nccl-tests table (and writes JSON with -J).

    Returns:
        0 when every result was exact, 1 when some element was wrong, 2 on a usage
        error or when the GPU backend is not usable here (the reason is printed).

    Example::

        collective-run -n 4 python -m collective.bench.bench_gpu -b 4K -e 256M -f 4 --collective all
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, _device, backend = split_args(args)
        opts = parse_args(rest)
        opts = _base_collectives(opts)
        cols, notes = gpu_columns(opts.algorithms, opts.explicit)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)
    from collective import config

    test_host = config.get(TEST_HOST_ENV)
    if not test_host:
        from collective.backends.nccl import probe

        why = probe()
        if why is not None:
            print(f"collective-bench --device gpu: no CUDA GPU: {why}", file=sys.stderr)
            return 2
    if opts.tune_path or opts.plot_path:
        notes.append("--tune and --plot are CPU-only; ignored")

    import mpi4py
    from mpi4py import MPI

    import collective as col
    from collective.backends.device import DeviceCollectives
    from collective.backends.gpu_staging import GpuStager

    from .report import TextReporter, to_json, write_json

    comm = col.init()
    if test_host:
        arrays: Any = _HostArrays()
        dev = DeviceCollectives(comm, "mpi", stager=GpuStager(_HostOps()), cuda_aware=False)
    else:
        import cupy

        from collective.backends.nccl import pick_device

        cupy.cuda.Device(pick_device(comm.local_rank, cupy.cuda.runtime.getDeviceCount())).use()
        arrays = _CupyArrays()
        dev = DeviceCollectives(comm, backend)
    mpicomm = MPI.COMM_WORLD.Dup()
    rank0 = mpicomm.Get_rank() == 0
    status = 0
    try:
        dev.setup()
        lib = MPI.Get_library_version().strip().splitlines()[0].split(", package")[0].strip()
        if dev.nccl is not None:
            from collective.backends.nccl import version_text

            lib = f"NCCL {version_text(dev.nccl.version or 0)} ({arrays.describe()}); bootstrap over {lib}"
        else:
            lib = f"{lib}, device arrays: {dev.why} ({arrays.describe()})"
        v = MPI.Get_version()
        cl = comm.cluster
        info = JobInfo(lib, f"{v[0]}.{v[1]}", mpi4py.__version__, mpicomm.Get_size(),
                       [len(cl.ranks_of_node(n)) for n in range(cl.nnodes)])
        if not 0 <= opts.root < mpicomm.Get_size() and any(c in ("reduce", "broadcast") for c in opts.collectives):
            if rank0:
                print(f"collective-bench: -r {opts.root} is not a rank (0..{mpicomm.Get_size() - 1})", file=sys.stderr)
            return 2
        run = _GpuRun(opts, comm, dev, arrays, mpicomm, TextReporter(sys.stdout) if rank0 else None)
        results = [run.measure(c, info, cols, notes) for c in opts.collectives]
        wrong = sum(r.wrong for r in results)
        status = 1 if wrong else 0
        if rank0:
            if opts.json_path:
                doc = to_json(info, opts, results, args)
                doc["device"] = "gpu"
                doc["backend"] = "nccl" if dev.nccl is not None else "mpi"
                write_json(opts.json_path, doc)
            if wrong:
                print(f"collective-bench: FAILED: {wrong} wrong element(s); see the #wrong columns", file=sys.stderr)
            sys.stdout.flush()
    finally:
        if dev.nccl is not None:
            dev.nccl.synchronize()
        mpicomm.Free()
    return status


if __name__ == "__main__":
    sys.exit(main())
