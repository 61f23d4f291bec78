"""Trainer step time under communication: ours (overlap on/off) vs the local step vs PyTorch DDP over Gloo, as ratios.

Run under MPI, one core per rank:

    collective-run -n 2 python bench/bench_trainer.py
    collective-run -n 4 python bench/bench_trainer.py --json out.json

Every method runs the same data-parallel SGD step (per-rank batch 64, momentum
0.9) on the same MLP shapes, on all ranks at once; methods are interleaved in
cycles (one step of each method per cycle, each started after a barrier), so
drift on a shared machine hits them alike. Step times are medians over
cycles of the slowest rank's step; ratios are medians of the per-cycle
(paired) ratios.

Methods:
    local          our layers, no communication at all (the reference for ours)
    overlap        ours: bucketed async allreduce started during backward
    no-overlap     ours: the same buckets, allreduced after backward
    per-param      our layers + one blocking native MPI allreduce per parameter after backward
    overlap-alloc  ours (overlap), gradient buckets allocated by comm.alloc (the node's shared window)
    elastic        ours (overlap) with the elastic state: double-buffered optimizer, a commit every step
                   (``--elastic`` adds it next to overlap; launch with ``collective-run --elastic`` to
                   include the runtime's elastic mode)
Any of ours may name an allreduce algorithm: ``--methods local,overlap,overlap:ring``.
    torch-local    torch.nn, no communication (the reference for DDP)
    torch-ddp      torch DistributedDataParallel over Gloo (25 MB buckets, its default)

Ratios: each method over its own local step (wall time, and CPU time of the
process: on a shared machine CPU time is the steadier measure of what the
communication costs); and torch-ddp over ours (overlap), the per-step speed-up. For ours the report also says where the time goes
(forward, backward, waiting for buckets, optimizer; time in collectives on the
communication thread, and the fraction of it that was hidden). With
``elastic`` it also gives elastic / overlap, the steady-state cost of the
elastic state, paired per cycle.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import argparse
import functools
import itertools
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import collective as col
from collective.trainer import SGD, DataParallel, ElasticState, StepStats, mlp

MODELS = {"7.5MB": [784, 1024, 1024, 10], "40MB": [784, 2048, 2048, 2048, 10]}


def _layer_sizes(spec: str) -> list[int]:
    """``"784-4096-10"`` -> ``[784, 4096, 10]`` (a model named by its layer sizes)."""
    try:
        sizes = [int(v) for v in spec.split("-")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) < 1:
        raise SystemExit(f"bench_trainer: unknown model {spec!r}: name one of {', '.join(MODELS)} "
                         "or give layer sizes like 784-4096-4096-10")
    return sizes
OURS = ("local", "overlap", "no-overlap", "per-param", "overlap-alloc", "elastic")
TORCH = ("torch-local", "torch-ddp")


class Ours:
    """One of our methods on one model shape: a DataParallel (or a local one) and its SGD."""

    def __init__(self, method: str, sizes: list[int], comm: Any, batch: int, seed: int, bucket_mb: float | None,
                 algorithm: str | None) -> None:
        method, _, alg = method.partition(":")  # "overlap:ring": this method with this algorithm
        algorithm = alg or algorithm
        self.method, self.comm = method, comm
        use = comm if method in ("overlap", "no-overlap", "overlap-alloc", "elastic") else None
        alloc = "shared" if method == "overlap-alloc" else None  # buckets in the node's shared window
        self.dp = DataParallel(mlp(sizes, seed=seed), use, overlap=(method != "no-overlap"), bucket_mb=bucket_mb,
                               algorithm=algorithm, seed=seed, allocator=alloc)
        self.opt = SGD(self.dp.buckets, lr=1e-4, momentum=0.9)
        self.state = ElasticState(self.dp, self.opt) if method == "elastic" else None
        rng = np.random.default_rng(seed + 1 + comm.rank)
        self.x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        self.y = rng.integers(0, sizes[-1], batch)
        self.stats: list[StepStats] = []
        self.step_no = 0

    def step(self) -> None:
        if self.method == "per-param":
            dp = self.dp
            dp.forward_backward(self.x, self.y, None, self.step_no)
            for p in dp.model.parameters():
                self.comm.allreduce(p.grad, op="avg", algorithm="native", out=p.grad)
            self.opt.step()
        else:
            self.stats.append(self.dp.train_step(self.x, self.y, None, self.step_no, self.opt))
            if self.state is not None:
                self.state.commit(self.step_no + 1)
        self.step_no += 1


class Torch:
    """torch.nn MLP with SGD; wrapped in DistributedDataParallel over Gloo for torch-ddp."""

    def __init__(self, method: str, sizes: list[int], comm: Any, batch: int, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        layers: list[Any] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*layers)
        if method == "torch-ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        g = torch.Generator().manual_seed(seed + 1 + comm.rank)
        self.x = torch.randn(batch, sizes[0], generator=g)
        self.y = torch.randint(0, sizes[-1], (batch,), generator=g)
        self.loss = torch.nn.CrossEntropyLoss()

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        self.loss(self.model(self.x), self.y).backward()
        self.opt.step()


def init_gloo(comm: Any) -> str | None:
    """Start torch.distributed over Gloo on the same ranks (port from rank 0); return why not, or None."""
    try:
        import datetime

        import torch
        import torch.distributed as dist
    except Exception as exc:  # noqa: BLE001 - any import failure means no torch columns
        return f"torch cannot be imported ({type(exc).__name__}: {exc}); pip install torch==2.13.0"
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no Gloo"
    torch.set_num_threads(1)
    port = np.zeros(1, np.int64)
    if comm.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port[0] = s.getsockname()[1]
    comm.broadcast(port, root=0, out=port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{int(port[0])}", rank=comm.rank,
                           world_size=comm.size, timeout=datetime.timedelta(seconds=300))
    return None


def base(method: str) -> str:
    """The method without its ":algorithm" suffix."""
    return method.partition(":")[0]


def timed_step(comm: Any, fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, started right after a barrier."""
    comm.barrier()
    c0 = time.process_time()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def paired_ratio(t: np.ndarray, col_of: dict[str, int], m: str, ref: str) -> float:
    """Median over cycles of (method ``m``'s step) / (method ``ref``'s step in the same cycle)."""
    return float(np.median(t[:, col_of[m]] / t[:, col_of[ref]]))


def breakdown(stats: list[StepStats]) -> dict[str, float]:
    """Mean per-step times (ms) of one of our methods, and the hidden fraction."""
    if not stats:
        return {}
    keys = ("time", "forward", "backward", "exposed", "update", "comm")
    out = {k: 1e3 * float(np.mean([getattr(s, k) for s in stats])) for k in keys}
    hid = [s.hidden for s in stats if s.hidden is not None]
    out["hidden"] = float(np.mean(hid)) if hid else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="7.5MB,40MB",
                    help=f"comma list of {', '.join(MODELS)} or layer sizes such as 784-4096-4096-10")
    ap.add_argument("--methods", default=",".join(OURS + TORCH))
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--cycles", type=int, default=30, help="timed cycles (one step of every method each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed cycles first")
    ap.add_argument("--bucket-mb", type=float, default=None, help="our bucket cap (default: COLLECTIVE_BUCKET_MB or 25)")
    ap.add_argument("--algorithm", default=None,
                    help="our allreduce algorithm (default: the communicator's); per method: --methods overlap:ring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--elastic", action="store_true",
                    help="add the elastic method (and overlap, its reference) to --methods")
    ap.add_argument("--json", help="also write the results here (rank 0)")
    args = ap.parse_args()

    comm = col.init()
    P, R = comm.size, comm.rank
    methods = [m for m in args.methods.split(",") if m]
    if args.elastic:
        methods += [m for m in ("overlap", "elastic") if m not in methods]
    unknown = [m for m in methods if base(m) not in OURS + TORCH]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(OURS + TORCH)} (ours may end in :ALGORITHM)")
    if not hasattr(comm, "alloc"):
        methods = [m for m in methods if base(m) != "overlap-alloc"]
    why_no_torch = init_gloo(comm) if any(m in TORCH for m in methods) else None
    if why_no_torch:
        methods = [m for m in methods if m not in TORCH]
    results: dict[str, Any] = {"P": P, "batch_per_rank": args.batch, "cycles": args.cycles, "models": {}}
    if R == 0:
        print(f"# bench_trainer: P={P}, per-rank batch {args.batch}, {args.cycles} cycles of one step per method, "
              f"OMP/OPENBLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}, "
              f"yield_when_idle {os.environ.get('OMPI_MCA_mpi_yield_when_idle')}", flush=True)
        if why_no_torch:
            print(f"# torch columns skipped: {why_no_torch}", flush=True)
    for name in args.models.split(","):
        sizes = MODELS[name] if name in MODELS else _layer_sizes(name)
        runners: dict[str, Any] = {}
        for m in methods:
            runners[m] = (Torch(m, sizes, comm, args.batch, args.seed) if m in TORCH
                          else Ours(m, sizes, comm, args.batch, args.seed, args.bucket_mb, args.algorithm))
        nbytes = runners[next(m for m in methods if base(m) in OURS)].dp.buckets.nbytes if any(
            base(m) in OURS for m in methods) else 0
        for _ in range(args.warmup):
            for m in methods:
                runners[m].step()
        for r in runners.values():
            if isinstance(r, Ours):
                r.stats.clear()
        # One step of each method per cycle: drift on a shared machine hits every method alike, and each
        # cycle gives a paired ratio; the figures are medians over cycles of the slowest rank's step.
        local_t = np.zeros((2, args.cycles, len(methods)))
        for c in range(args.cycles):
            for j, m in enumerate(methods):
                local_t[:, c, j] = timed_step(comm, runners[m].step)
        t, cpu = comm.allreduce(local_t, op="max")
        med = {m: float(np.median(t[:, j])) for j, m in enumerate(methods)}
        col_of = {m: j for j, m in enumerate(methods)}
        paired = functools.partial(paired_ratio, t, col_of)
        cpu_paired = functools.partial(paired_ratio, cpu, col_of)
        row: dict[str, Any] = {"gradient_MB": nbytes / 2**20, "step_ms": {m: 1e3 * v for m, v in med.items()},
                               "ratio_to_local": {}, "cpu_ratio_to_local": {}, "breakdown_ms": {}}
        for m in methods:
            ref = "torch-local" if m in TORCH else next((r for r in methods if base(r) == "local"), "local")
            if ref in med:
                row["ratio_to_local"][m] = paired(m, ref)
                row["cpu_ratio_to_local"][m] = cpu_paired(m, ref)
            if isinstance(runners[m], Ours) and runners[m].stats:
                row["breakdown_ms"][m] = breakdown(runners[m].stats)
        row["ddp_over"] = {m: paired("torch-ddp", m) for m in methods
                           if "torch-ddp" in med and base(m) in ("overlap", "overlap-alloc", "no-overlap")}
        if "elastic" in med and "overlap" in med:
            row["elastic_over_overlap"] = paired("elastic", "overlap")
            row["cpu_elastic_over_overlap"] = cpu_paired("elastic", "overlap")
        results["models"][name] = row
        if R == 0:
            print(f"\n## MLP {'-'.join(map(str, sizes))}: {nbytes / 2**20:.1f} MB of gradients, P={P}")
            print(f"{'method':<14} {'step ms':>8} {'x local':>8} {'CPU x local':>12}   step ms quartiles")
            for m in methods:
                q1, q3 = np.percentile(1e3 * t[:, col_of[m]], [25, 75])
                ratio = row["ratio_to_local"].get(m, float("nan"))
                cratio = row["cpu_ratio_to_local"].get(m, float("nan"))
                print(f"{m:<14} {1e3 * med[m]:8.1f} {ratio:8.3f} {cratio:12.3f}   {q1:.1f}-{q3:.1f}")
            if "elastic_over_overlap" in row:
                print(f"elastic step / overlap step (paired per cycle): {row['elastic_over_overlap']:.3f} "
                      f"(CPU {row['cpu_elastic_over_overlap']:.3f})")
            for m, r in row["ddp_over"].items():
                print(f"torch DDP(gloo) step / ours ({m}) step: {r:.2f}x")
            if row["breakdown_ms"]:
                print(f"{'where (ms)':<14} {'step':>7} {'fwd':>7} {'bwd':>7} {'wait':>7} {'update':>7} "
                      f"{'comm':>7} {'hidden':>7}")
                for m, b in row["breakdown_ms"].items():
                    print(f"{m:<14} {b['time']:7.1f} {b['forward']:7.1f} {b['backward']:7.1f} {b['exposed']:7.1f} "
                          f"{b['update']:7.1f} {b['comm']:7.1f} {100 * b['hidden']:6.0f}%")
            sys.stdout.flush()
        del runners
    if R == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if why_no_torch is None and any(m in TORCH for m in methods):
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
