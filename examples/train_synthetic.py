"""Data-parallel training on synthetic data, sized so communication matters (40 MB of gradients by default).

Prints the step time, the time the communication thread spent in allreduces,
the part of it the main thread still waited for, and the fraction hidden
behind backward; with --timeline every rank writes a Chrome-trace file
(open it at https://ui.perfetto.dev) showing each layer's forward/backward and
each bucket's ready/launch/allreduce/done.

Run:  mpiexec -n 2 python examples/train_synthetic.py --timeline tl.json
      mpiexec -n 2 python examples/train_synthetic.py --no-overlap      (allreduce after backward, for comparison)
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import collective as col
from collective import config
from collective.trainer import SGD, DataParallel, ShardedLoader, fit, fp16_compress_wrapper, mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="784,2048,2048,2048,10", help="MLP layer sizes (default: 40 MB of gradients)")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bucket-mb", type=float, default=None, help="bucket cap (default COLLECTIVE_BUCKET_MB or 25)")
    ap.add_argument("--no-overlap", action="store_true", help="allreduce the buckets after backward instead")
    ap.add_argument("--fp16", action="store_true", help="allreduce in float16 (fp16_compress_wrapper)")
    ap.add_argument("--shared-buckets", action="store_true",
                    help="allocate gradient buckets with comm.alloc (the node's shared window), if available")
    ap.add_argument("--timeline", metavar="PATH", help="write a Chrome trace per rank (also COLLECTIVE_TIMELINE)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    comm = col.init()
    P = comm.size
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    n = max(4096, 8 * P * args.batch)
    x = rng.standard_normal((n, sizes[0]), dtype=np.float32)
    teacher = rng.standard_normal((sizes[0], sizes[-1])).astype(np.float32)
    y = (x @ teacher).argmax(axis=1)  # learnable labels
    alloc = "shared" if args.shared_buckets and hasattr(comm, "alloc") else None
    hook = fp16_compress_wrapper() if args.fp16 else None
    dp = DataParallel(mlp(sizes, seed=args.seed), comm, bucket_mb=args.bucket_mb, overlap=not args.no_overlap,
                      hook=hook, allocator=alloc, seed=args.seed)
    opt = SGD(dp.buckets, lr=0.01, momentum=0.9)
    loader = ShardedLoader(x, y, P * args.batch, comm.rank, P, seed=args.seed)
    res = fit(dp, opt, loader, args.steps, progress=not args.no_progress, timeline=args.timeline)
    skip = min(3, max(0, len(res.stats) - 1))
    if comm.rank == 0:
        ms = {k: 1e3 * res.mean(k, skip) for k in ("time", "forward", "backward", "exposed", "update", "comm")}
        print(f"P={P}, MLP {args.sizes}, {dp.buckets.nbytes / 2**20:.1f} MB of gradients in {len(dp.buckets)} buckets, "
              f"overlap {'off' if args.no_overlap else 'on'}{', fp16' if args.fp16 else ''}")
        print(f"step {ms['time']:.1f} ms ({P * args.batch / ms['time'] * 1e3:.0f} samples/s): forward {ms['forward']:.1f}, "
              f"backward {ms['backward']:.1f}, waiting for buckets {ms['exposed']:.1f}, optimizer {ms['update']:.1f}; "
              f"allreduce time {ms['comm']:.1f} ms, hidden {100 * res.mean('hidden', skip):.0f}%; "
              f"final loss {res.losses[-1]:.4f}", flush=True)
        if args.timeline or config.get("TIMELINE"):
            print(f"timeline: {args.timeline or config.get('TIMELINE')} (one file per rank, "
                  f"'.rank<r>' before the suffix)")


if __name__ == "__main__":
    main()
