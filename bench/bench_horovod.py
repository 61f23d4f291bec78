"""collective.horovod measured against its floor and against torch on gloo: op latency, allreduce busbw, training.

Run (it launches one mpiexec job per rank count when not started under one)::

    python bench/bench_horovod.py                                # P = 2, every part
    python bench/bench_horovod.py --procs 2,4 --part busbw       # 4 KiB .. 64 MiB at P = 2 and 4
    python bench/bench_horovod.py --part train --model resnet18 --batch-size 16
    python bench/bench_horovod.py --part latency --late 1500 --iters 9

Parts, each a table of medians over ``--iters`` (``--rounds`` for train) interleaved iterations; every
iteration runs each column once, in an order rotated by one per iteration, after a barrier, and a time is
the slowest rank's:

* ``latency``: microseconds per blocking call on float32 data, 4 B .. 1 MiB. ``comm``: ``comm.allreduce(x,
  out=y)`` on a Communicator of its own (the floor the engine stands on); ``engine``: an Engine's
  ``submit(..., wake=False).wait()`` (the caller runs the exchange and the op itself, as a blocking hvd call
  does); ``engine, thread``: ``submit(...)`` wakes the engine's thread, then ``wait()`` (an async op waited on at
  once); ``hvd``: ``hvd.allreduce(t, op=hvd.Sum)``; ``engine, rank 0 late``: ``engine`` with rank 0 sleeping
  ``--late`` us before each call (busy without holding the GIL, like torch's kernels), the sleep included.
* ``busbw``: in-place allreduce of float32 torch tensors, ``--min-bytes`` .. ``--max-bytes`` (x4 steps);
  busbw = bytes / time x 2(P-1)/P, as nccl-tests. ``hvd``: ``hvd.allreduce_(t, op=hvd.Sum)``; ``gloo``:
  ``torch.distributed.all_reduce(t)`` on a gloo group over the same ranks; ``comm``: ``comm.allreduce(t,
  out=t)``. ``check``: one more call of each on known values, compared with the exact sum.
* ``train``: images per second per rank of the model of ``examples/horovod_synthetic_benchmark.py`` (fixed
  random images, cross entropy, SGD). ``local``: every rank trains alone (no communication: the ideal);
  ``hvd``: hvd.DistributedOptimizer; ``ddp-gloo``: torch's DistributedDataParallel on gloo; these three use
  torch's BatchNorm2d. ``hvd-syncbn``: the synthetic benchmark itself, hvd.SyncBatchNorm (batch statistics
  over every rank's batch) with hvd.DistributedOptimizer; torch's SyncBatchNorm has no CPU path, so DDP has
  no such column.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LATENCY_SIZES = [4, 4 << 10, 64 << 10, 1 << 20]
PARTS = ("latency", "busbw", "train")


def _size(s: str) -> int:
    """Bytes from ``4K``, ``64M``, ``1G`` or a plain integer."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = s.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * mult[t[-1]]) if t and t[-1] in mult else int(t)


def _fmt(n: int) -> str:
    for unit, m in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="2", help="rank counts, comma-separated: one mpiexec job each")
    p.add_argument("--part", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    p.add_argument("--iters", type=int, default=7, help="interleaved iterations per size (median reported)")
    p.add_argument("--late", type=float, default=300.0, help="latency: us rank 0 sleeps before each call in 'late'")
    p.add_argument("--warmup", type=int, default=20,
                   help="busbw: calls per column before timing (first-call setup, plans, and huge pages for tensors "
                        "passed again and again, COLLECTIVE_SHM_HUGE_PAGES, out of the figures)")
    p.add_argument("--min-bytes", type=_size, default=4 << 10, help="busbw: smallest message")
    p.add_argument("--max-bytes", type=_size, default=64 << 20, help="busbw: largest message")
    p.add_argument("--model", default="auto", help="train: a model name of examples/horovod_synthetic_benchmark.py")
    p.add_argument("--batch-size", type=int, default=16, help="train: images per rank per step")
    p.add_argument("--image-size", type=int, default=224, help="train: height and width of the images")
    p.add_argument("--steps", type=int, default=5, help="train: steps per column per round")
    p.add_argument("--rounds", type=int, default=5, help="train: interleaved rounds (median reported)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one job may take")
    a = p.parse_args(argv)
    bad = set(a.part.split(",")) - set(PARTS)
    if bad:
        p.error(f"--part: unknown {', '.join(sorted(bad))} (choose from {', '.join(PARTS)})")
    return a


def _interleaved(cols: Mapping[str, Callable[[], None]], iters: int, comm: Any) -> dict[str, float]:
    """Median over ``iters`` rotated rounds of each column's time (the slowest rank's), in seconds."""
    import numpy as np

    names = list(cols)
    times: dict[str, list[float]] = {k: [] for k in names}
    for it in range(iters):
        order = names[it % len(names):] + names[:it % len(names)]
        for k in order:
            comm.barrier()
            t0 = time.perf_counter()
            cols[k]()
            dt = np.array([time.perf_counter() - t0])
            times[k].append(float(np.asarray(comm.allreduce(dt, op="max"))[0]))
    return {k: float(np.median(v)) for k, v in times.items()}


def _table(title: str, head: list[str], rows: list[list[str]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- parts
def _latency(a: argparse.Namespace, comm: Any) -> None:
    import numpy as np
    import torch

    import collective
    import collective.horovod.torch as hvd
    from collective.horovod.engine import Engine

    R = comm.rank
    eng = Engine(collective.Communicator())
    rows = []
    for nbytes in LATENCY_SIZES:
        n = max(5, min(200, (16 << 20) // nbytes))  # calls per timed block: small ones above timer noise
        x = np.ones(max(1, nbytes // 4), np.float32)
        y = np.empty_like(x)
        t = torch.ones(max(1, nbytes // 4))

        def on_comm(x: np.ndarray = x, y: np.ndarray = y, n: int = n) -> None:
            for _ in range(n):
                comm.allreduce(x, out=y)

        def on_engine(wake: bool, late: float = 0.0, x: np.ndarray = x, y: np.ndarray = y, n: int = n) -> None:
            for _ in range(n):
                if late and R == 0:  # rank 0 is busy a little (without the GIL, as torch's kernels run) first
                    time.sleep(late)
                eng.submit("allreduce", "bench", [x], outs=[y], wake=wake, op="sum").wait()

        def on_hvd(t: torch.Tensor = t, n: int = n) -> None:
            for _ in range(n):
                hvd.allreduce(t, op=hvd.Sum, name="bench")

        cols = {"comm": on_comm, "engine": lambda: on_engine(False), "engine, thread": lambda: on_engine(True),
                "hvd": on_hvd, "engine, rank 0 late": lambda: on_engine(False, a.late * 1e-6)}
        for fn in cols.values():  # warm up: buffers, templates, the response cache
            fn()
        med = _interleaved(cols, a.iters, comm)
        rows.append([str(nbytes)] + [f"{v / n * 1e6:.0f}" for v in med.values()])
    eng.shutdown()
    if R == 0:
        _table(f"latency, P={comm.size}: us per blocking call, median of {a.iters} interleaved iterations",
               ["bytes"] + [f"{k} us" for k in cols], rows)


def _busbw(a: argparse.Namespace, comm: Any, dist: Any) -> None:
    import torch

    import collective.horovod.torch as hvd

    P = comm.size
    sizes = []
    n = a.min_bytes
    while n <= a.max_bytes:
        sizes.append(n)
        n *= 4
    rows = []
    for nbytes in sizes:
        count = max(1, nbytes // 4)
        reps = max(1, min(50, (8 << 20) // nbytes))
        bufs = {k: torch.zeros(count) for k in ("hvd", "gloo", "comm")}  # zeros stay zeros: no overflow

        def on_hvd(t: torch.Tensor = bufs["hvd"], reps: int = reps) -> None:
            for _ in range(reps):
                hvd.allreduce_(t, op=hvd.Sum, name="busbw")

        def on_gloo(t: torch.Tensor = bufs["gloo"], reps: int = reps) -> None:
            for _ in range(reps):
                dist.all_reduce(t)

        def on_comm(t: torch.Tensor = bufs["comm"], reps: int = reps) -> None:
            for _ in range(reps):
                comm.allreduce(t, out=t)

        cols = {"hvd": on_hvd, "gloo": on_gloo, "comm": on_comm}
        for fn in cols.values():  # the steady state of a training job that passes the same tensor every step
            for _ in range(-(-a.warmup // reps)):
                fn()
        med = _interleaved(cols, a.iters, comm)
        bw = {k: nbytes / (v / reps) * 2 * (P - 1) / P / 1e9 for k, v in med.items()}
        # Correctness: rank r contributes r + 1 + i % 7 at element i; the sum is exact in float32.
        ok = True
        once: dict[str, Callable[[torch.Tensor], Any]] = {
            "hvd": lambda t: hvd.allreduce_(t, op=hvd.Sum, name="busbw"), "gloo": dist.all_reduce,
            "comm": lambda t: comm.allreduce(t, out=t)}
        for k, call in once.items():
            t = bufs[k]
            pattern = (torch.arange(count) % 7).float()
            t.copy_(pattern + comm.rank + 1)
            call(t)
            ok = ok and torch.equal(t, pattern * P + P * (P + 1) / 2)
        ok = bool(comm.allreduce(torch.tensor([0.0 if ok else 1.0]), op="max")[0] == 0)
        rows.append([_fmt(nbytes), f"{bw['hvd']:.2f}", f"{bw['gloo']:.2f}", f"{bw['comm']:.2f}",
                     f"{bw['hvd'] / bw['gloo']:.2f}x", f"{med['hvd'] / reps * 1e6:.0f}",
                     f"{med['gloo'] / reps * 1e6:.0f}", "ok" if ok else "WRONG"])
    if comm.rank == 0:
        _table(f"allreduce busbw, P={P}: float32 torch tensors in place, GB/s, median of {a.iters} "
               "interleaved iterations", ["size", "hvd", "gloo", "comm", "hvd/gloo", "hvd us", "gloo us", "check"],
               rows)


def _train(a: argparse.Namespace, comm: Any) -> None:
    import torch
    import torch.nn.functional as F

    import collective.horovod.torch as hvd

    path = ROOT / "examples" / "horovod_synthetic_benchmark.py"
    spec = importlib.util.spec_from_file_location("horovod_synthetic_benchmark", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise SystemExit(f"bench_horovod --part train: needs {path} (run from a source checkout)")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    def make(norm: type) -> tuple[str, torch.nn.Module]:
        torch.manual_seed(0)
        return example.build_model(a.model, norm)

    name, m_local = make(torch.nn.BatchNorm2d)
    models = {"local": m_local, "hvd": make(torch.nn.BatchNorm2d)[1], "hvd-syncbn": make(hvd.SyncBatchNorm)[1],
              "ddp-gloo": torch.nn.parallel.DistributedDataParallel(make(torch.nn.BatchNorm2d)[1])}
    opts: dict[str, torch.optim.Optimizer] = {}
    for k, m in models.items():
        opt: torch.optim.Optimizer = torch.optim.SGD(m.parameters(), lr=0.01)
        if k.startswith("hvd"):
            opt = hvd.DistributedOptimizer(opt, named_parameters=[(f"{k}.{n}", p) for n, p in m.named_parameters()])
            hvd.broadcast_parameters(m.state_dict(), root_rank=0)
        opts[k] = opt
    g = torch.Generator().manual_seed(1 + comm.rank)
    data = torch.randn(a.batch_size, 3, a.image_size, a.image_size, generator=g)
    target = torch.randint(0, 1000, (a.batch_size,), generator=g)

    def steps(k: str) -> None:
        m, o = models[k], opts[k]
        for _ in range(a.steps):
            o.zero_grad()
            F.cross_entropy(m(data), target).backward()
            o.step()

    cols = {k: (lambda k=k: steps(k)) for k in models}
    for fn in cols.values():
        fn()
    med = _interleaved(cols, a.rounds, comm)
    rate = {k: a.batch_size * a.steps / v for k, v in med.items()}
    nparams = sum(p.numel() for p in m_local.parameters())
    if comm.rank == 0:
        _table(f"training, P={comm.size}: {name} ({nparams / 1e6:.2f} M parameters), batch {a.batch_size} per rank, "
               f"{a.image_size}x{a.image_size} images; images/s per rank, median of {a.rounds} rounds of "
               f"{a.steps} steps", ["local", "hvd", "hvd-syncbn", "ddp-gloo", "hvd/ddp-gloo", "hvd/local"],
               [[f"{rate['local']:.1f}", f"{rate['hvd']:.1f}", f"{rate['hvd-syncbn']:.1f}", f"{rate['ddp-gloo']:.1f}",
                 f"{rate['hvd'] / rate['ddp-gloo']:.2f}x", f"{rate['hvd'] / rate['local']:.2f}x"]])


def _bench(a: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    import collective
    import collective.horovod.torch as hvd
    from collective.bench.gloo import GlooGroup

    torch.set_num_threads(1)  # one process per core, as the ranks are placed
    parts = a.part.split(",")
    hvd.init()
    comm = collective.Communicator()
    if comm.rank == 0:
        print(f"bench_horovod: P={comm.size}, parts {', '.join(parts)}", flush=True)
    gloo = GlooGroup(MPI.COMM_WORLD, single_node=comm.single_node) if {"busbw", "train"} & set(parts) else None
    if "latency" in parts:
        _latency(a, comm)
    if "busbw" in parts and gloo is not None:
        _busbw(a, comm, gloo.dist)
    if "train" in parts:
        _train(a, comm)
    if gloo is not None:
        gloo.close()
    hvd.shutdown()


def main(argv: list[str]) -> int:
    """Run the parts here when under mpiexec, else launch one job per ``--procs`` entry; the exit status."""
    a = _args(argv)
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        _bench(a)
        return 0
    if str(ROOT) not in sys.path:  # run from a checkout: this checkout's collective, as the job gets
        sys.path.insert(0, str(ROOT))
    from collective.run import mpiexec_command

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMPI_MCA_mpi_yield_when_idle="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for procs in a.procs.split(","):
        cmd, env = mpiexec_command(["-n", procs, "--oversubscribe", sys.executable, str(Path(__file__).resolve()),
                                    *argv], env)
        job = subprocess.Popen(cmd, env=env, cwd=str(ROOT), start_new_session=True)
        try:
            rc = job.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGTERM)  # the whole job: mpiexec and its ranks
            time.sleep(2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            print(f"bench_horovod: the P={procs} job ran past --timeout {a.timeout:.0f} s", file=sys.stderr)
            return 124
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
