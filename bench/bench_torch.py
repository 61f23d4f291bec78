"""PyTorch benchmark: our allreduce vs torch.distributed (Gloo) on torch CPU tensors, and training step time.

Run (it launches its own mpiexec jobs, one per rank count)::

    python bench/bench_torch.py                       # P = 2 and 4, both parts
    python bench/bench_torch.py --procs 2 --part train --steps 5

Part ``allreduce``: float32 torch tensors of 4 KiB .. 64 MiB, in place;
columns ``ours`` (``comm.allreduce(t, out=t)`` on the user's tensor),
``window`` (the tensor lives in ``comm.alloc`` memory: what our DDP does) and
``gloo`` (``torch.distributed.all_reduce``). busbw = bytes / time x 2(P-1)/P,
as nccl-tests. Part ``train``: one step (zero_grad, forward, cross-entropy,
backward, SGD step) of an MLP, per-rank batch 64, one thread per rank, for
``local`` (every rank trains alone at the same time: the ideal), ``ddp-gloo``
(torch DDP over Gloo), ``ours`` (trainer.torch.DistributedDataParallel),
``ours-shard`` (the same with ``shard_optimizer``: one copy of the parameters
on the node, each rank updating its share) and ``ddp-hook`` (torch DDP with
our comm hook); ``ours-overlap`` (overlap forced on) appears
when the default chose not to overlap (no spare core).

Method: absolute times drift several-fold on a shared machine, ratios inside
one run much less, so the methods are interleaved: every iteration runs each
method once (allreduce) or one block of steps (train), in an order rotated by
one each iteration, after a barrier; a time is the slowest rank's; the figure
is the median over iterations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"784-1024-1024-10": (784, 1024, 1024, 10), "784-2048-2048-2048-10": (784, 2048, 2048, 2048, 10)}


def _size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B").rstrip("I")
    return int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(s)


def _fmt(n: int) -> str:
    for unit, m in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


# ====================================================================== worker (inside mpiexec)
def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    import collective as col
    from collective.bench.gloo import GlooGroup

    torch.set_num_threads(1)
    comm = col.init()
    mpi = MPI.COMM_WORLD
    P, R = comm.size, comm.rank
    gloo = GlooGroup(mpi, single_node=comm.single_node)
    dist = gloo.dist
    out: dict = {"P": P, "allreduce": [], "train": []}

    def slowest(dt: float) -> float:
        a = np.array([dt])
        mpi.Allreduce(MPI.IN_PLACE, a, op=MPI.MAX)
        return float(a[0])

    if "allreduce" in args.part:
        sizes = []
        n = args.min_bytes
        while n <= args.max_bytes:
            sizes.append(n)
            n *= 4
        big = max(sizes) // 4
        t_ours = torch.zeros(big)
        t_gloo = torch.zeros(big)
        for nbytes in sizes:
            n = nbytes // 4
            win = torch.from_numpy(comm.alloc(n, np.float32))
            win.zero_()
            a, g = t_ours[:n], t_gloo[:n]
            cases = {
                "ours": lambda: comm.allreduce(a, out=a),
                "window": lambda: comm.allreduce(win, out=win),
                "gloo": lambda: dist.all_reduce(g),
            }
            names = list(cases)
            iters = args.iters if nbytes <= (4 << 20) else max(5, args.iters // 4)
            times: dict[str, list[float]] = {k: [] for k in names}
            for it in range(iters + 2):
                order = names[it % len(names):] + names[:it % len(names)]
                for k in order:
                    mpi.Barrier()
                    t0 = time.perf_counter()
                    cases[k]()
                    dt = slowest(time.perf_counter() - t0)
                    if it >= 2:  # two warm-up iterations
                        times[k].append(dt)
            row = {"bytes": nbytes}
            for k in names:
                med = float(np.median(times[k]))
                row[k + "_us"] = med * 1e6
                row[k + "_busbw"] = nbytes / med * 2 * (P - 1) / P / 1e9
            ok = bool((a == 0).all() and (win == 0).all() and (g == 0).all())
            row["check"] = ok
            out["allreduce"].append(row)
            if R == 0:
                print(f"  P={P} {_fmt(nbytes):>8}: ours {row['ours_busbw']:.2f}  window {row['window_busbw']:.2f}  "
                      f"gloo {row['gloo_busbw']:.2f} GB/s", file=sys.stderr, flush=True)

    if "train" in args.part:
        from collective.trainer.torch import CommHookState, DistributedDataParallel, allreduce_hook

        for name in args.shapes.split(","):
            sizes = SHAPES[name]

            def make() -> torch.nn.Module:
                torch.manual_seed(0)
                layers: list[torch.nn.Module] = []
                for a_, b_ in zip(sizes[:-1], sizes[1:]):
                    layers += [torch.nn.Linear(a_, b_), torch.nn.ReLU()]
                return torch.nn.Sequential(*layers[:-1])

            want = args.methods.split(",")
            models = {
                "local": make(),
                "ddp-gloo": torch.nn.parallel.DistributedDataParallel(make()),
                "ours": DistributedDataParallel(make(), comm),
            }
            if "ours-overlap" in want and not models["ours"].overlap:  # default did not overlap: what forcing costs
                models["ours-overlap"] = DistributedDataParallel(make(), comm, overlap=True)
            if "ddp-hook" in want and not args.no_hook:
                hooked = torch.nn.parallel.DistributedDataParallel(make())
                hooked.register_comm_hook(CommHookState(comm), allreduce_hook)
                models["ddp-hook"] = hooked
            if "ours-shard" in want:  # one copy of the parameters on the node, optimizer split over the ranks
                models["ours-shard"] = DistributedDataParallel(make(), comm)
            opts = {k: (m.shard_optimizer(torch.optim.SGD, lr=0.01, momentum=0.9) if k == "ours-shard" else
                        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)) for k, m in models.items()}
            g = torch.Generator().manual_seed(1 + R)
            x = torch.randn(args.batch, sizes[0], generator=g)
            y = torch.randint(0, sizes[-1], (args.batch,), generator=g)
            loss_fn = torch.nn.functional.cross_entropy

            def step(k: str) -> None:
                m, o = models[k], opts[k]
                o.zero_grad()
                loss_fn(m(x), y).backward()
                o.step()

            names = list(models)
            times = {k: [] for k in names}
            for it in range(args.rounds + 1):
                order = names[it % len(names):] + names[:it % len(names)]
                for k in order:
                    mpi.Barrier()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        step(k)
                    dt = slowest((time.perf_counter() - t0) / args.steps)
                    if it >= 1:
                        times[k].append(dt)
            nbytes = sum(p.numel() * 4 for p in models["local"].parameters())
            row = {"model": name, "grad_bytes": nbytes,
                   **{k + "_ms": float(np.median(v)) * 1e3 for k, v in times.items()}}
            out["train"].append(row)
            if R == 0:
                print(f"  P={P} {name}: " + "  ".join(f"{k} {row[k + '_ms']:.1f} ms" for k in names),
                      file=sys.stderr, flush=True)
            del models, opts
    gloo.close()
    if R == 0:
        print("RESULT " + json.dumps(out), flush=True)


# ====================================================================== launcher
def _launch(P: int, args: argparse.Namespace) -> dict:
    from collective.run import mpiexec_command

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMPI_MCA_mpi_yield_when_idle="1")
    wargs = ["--worker", "--part", args.part, "--min", str(args.min_bytes), "--max", str(args.max_bytes),
             "--iters", str(args.iters), "--shapes", args.shapes, "--rounds", str(args.rounds),
             "--steps", str(args.steps), "--batch", str(args.batch), "--methods", args.methods] + (["--no-hook"] if args.no_hook else [])
    cmd, env = mpiexec_command(["-n", str(P), "--oversubscribe", sys.executable, str(Path(__file__).resolve()), *wargs],
                               env)
    res = subprocess.run(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"bench_torch: the P={P} job failed (exit {res.returncode}):\n{res.stdout[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _report(results: list[dict]) -> str:
    lines = []
    if any(r["allreduce"] for r in results):
        lines += ["## allreduce, float32 torch CPU tensors, in place: busbw GB/s (ratio = ours / gloo)", "",
                  "| P | size | ours | window | gloo | ours/gloo | window/gloo | check |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results:
            for a in r["allreduce"]:
                lines.append(f"| {r['P']} | {_fmt(a['bytes'])} | {a['ours_busbw']:.2f} | {a['window_busbw']:.2f} | "
                             f"{a['gloo_busbw']:.2f} | {a['ours_busbw'] / a['gloo_busbw']:.2f}x | "
                             f"{a['window_busbw'] / a['gloo_busbw']:.2f}x | {'ok' if a['check'] else 'WRONG'} |")
        lines.append("")
    if any(r["train"] for r in results):
        extra = [c for c in ("ours-shard", "ours-overlap", "ddp-hook")
                 if any(c + "_ms" in t for r in results for t in r["train"])]
        shard = "ours-shard" in extra
        lines += ["## training step, per-rank batch 64, one thread per rank: ms per step (median)", "",
                  "| P | model (grad MB) | local | ddp-gloo | ours | " + "".join(f"{c} | " for c in extra)
                  + "ddp-gloo/ours | ours/local | " + ("ddp-gloo/ours-shard | ours-shard/local | " if shard else "")
                  + "ddp-gloo/local |",
                  "|---|---|---|---|---|" + "---|" * len(extra) + "---|---|" + "---|---|" * shard + "---|"]
        for r in results:
            for t in r["train"]:
                cells = "".join(f"{t[c + '_ms']:.1f} | " if c + "_ms" in t else "- | " for c in extra)
                sh = ""
                if shard:
                    sh = (f"{t['ddp-gloo_ms'] / t['ours-shard_ms']:.2f}x | {t['ours-shard_ms'] / t['local_ms']:.2f}x | "
                          if "ours-shard_ms" in t else "- | - | ")
                lines.append(f"| {r['P']} | {t['model']} ({t['grad_bytes'] / 1e6:.1f}) | {t['local_ms']:.1f} | "
                             f"{t['ddp-gloo_ms']:.1f} | {t['ours_ms']:.1f} | {cells}"
                             f"{t['ddp-gloo_ms'] / t['ours_ms']:.2f}x | {t['ours_ms'] / t['local_ms']:.2f}x | {sh}"
                             f"{t['ddp-gloo_ms'] / t['local_ms']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse options, run one mpiexec job per rank count (or be a rank of one), print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", default="2,4", help="comma list of rank counts (default 2,4)")
    ap.add_argument("--part", default="allreduce,train", help="allreduce, train or both (default both)")
    ap.add_argument("--min", dest="min_bytes", type=_size, default=4 << 10, help="smallest allreduce (default 4K)")
    ap.add_argument("--max", dest="max_bytes", type=_size, default=64 << 20, help="largest allreduce (default 64M)")
    ap.add_argument("--iters", type=int, default=40, help="timed allreduce iterations per size (fewer above 4 MiB)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of MLP shapes")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per training method")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--train-procs", default="2", help="rank counts for the training part (default 2)")
    ap.add_argument("--no-hook", action="store_true", help="leave out the ddp-hook column")
    ap.add_argument("--methods", default="local,ddp-gloo,ours,ours-shard,ours-overlap,ddp-hook",
                    help="training columns besides the three always run (local, ddp-gloo, ours): ours-shard "
                         "(shard_optimizer), ours-overlap, ddp-hook")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    results = []
    parts = args.part.split(",")
    train_p = {int(p) for p in args.train_procs.split(",")}
    for P in [int(p) for p in args.procs.split(",")]:
        want = [p for p in parts if p != "train" or P in train_p]
        if not want:
            continue
        sub = argparse.Namespace(**{**vars(args), "part": ",".join(want)})
        print(f"P={P}: {', '.join(want)} ...", file=sys.stderr, flush=True)
        results.append(_launch(P, sub))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_torch: {os.cpu_count()} cores, load average {load:.1f} at the end; ratios are within one run\n")
    print(_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
