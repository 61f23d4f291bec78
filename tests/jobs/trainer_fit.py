"""fit() on synthetic data, for the kill -9 / resume and timeline tests.

Usage: mpiexec -n P python trainer_fit.py --steps 30 [--ckpt DIR --every 5 --resume] [--save params.npz]
       [--die-at 17 --die-rank 1] [--sizes 32,64,64,4] [--timeline tl.json --bucket-mb 1]
--die-at S: rank --die-rank sends itself SIGKILL right after step S (the job must be torn down by mpiexec).
"""
from __future__ import annotations

import argparse
import os
import signal

import numpy as np

import collective as col
from collective.trainer import SGD, Checkpointer, DataParallel, ShardedLoader, StepStats, fit, mlp

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--ckpt")
ap.add_argument("--every", type=int, default=5)
ap.add_argument("--resume", action="store_true")
ap.add_argument("--save")
ap.add_argument("--die-at", type=int, default=-1)
ap.add_argument("--die-rank", type=int, default=1)
ap.add_argument("--sizes", default="32,64,64,4")
ap.add_argument("--batch", type=int, default=32, help="global batch")
ap.add_argument("--bucket-mb", type=float, default=0.01)
ap.add_argument("--timeline")
ap.add_argument("--dtype", default="float32")
args = ap.parse_args()

comm = col.init()
dtype = np.dtype(args.dtype)
sizes = [int(s) for s in args.sizes.split(",")]
rng = np.random.default_rng(0)
x = rng.standard_normal((max(512, 4 * args.batch), sizes[0]))
y = (x[:, :3].sum(axis=1) > 0).astype(np.int64) % sizes[-1]
dp = DataParallel(mlp(sizes, dropout=0.1, seed=7, dtype=dtype), comm, bucket_mb=args.bucket_mb, seed=7)
opt = SGD(dp.buckets, lr=0.05, momentum=0.9, weight_decay=1e-4)
loader = ShardedLoader(x, y, args.batch, comm.rank, comm.size, seed=11, dtype=dtype)
ckpt = Checkpointer(args.ckpt, comm, every=args.every) if args.ckpt else None


def die(st: StepStats) -> None:
    if st.step == args.die_at and comm.rank == args.die_rank:
        print(f"rank {comm.rank}: killing myself (SIGKILL) after step {st.step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


res = fit(dp, opt, loader, args.steps, checkpoint=ckpt, resume=args.resume, progress=False,
          timeline=args.timeline, callbacks=[die])
if comm.rank == 0:
    if args.save:
        np.savez(args.save, **{k: np.asarray(v) for k, v in dp.parameter_arrays().items()})
    print(f"done: steps {res.start_step}->{res.steps}, loss {res.losses[-1] if res.losses else float('nan'):.5f}, "
          f"{len(dp.buckets)} buckets", flush=True)
