"""BSP equivalence job: train small models for --steps steps; check the ranks' parameters are bitwise identical after
every step, and (rank 0) save the final parameters so the test can compare P = 1, 2, 3, 4.

Usage: mpiexec -n P python trainer_bsp.py --out params.npz [--steps 50]
"""
from __future__ import annotations

import argparse
import zlib

import numpy as np
from harness import Cases

import collective as col
from collective.trainer import SGD, Adam, Conv2d, DataParallel, Flatten, Linear, ReLU, Sequential, ShardedLoader, mlp

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--steps", type=int, default=50)
args = ap.parse_args()

comm = col.init()
cases = Cases(comm)
saved: dict[str, np.ndarray] = {}
GLOBAL_BATCH = 48  # divisible by 1, 2, 3 and 4


def digest(dp: DataParallel) -> int:
    h = 0
    for b in dp.buckets:
        h = zlib.crc32(np.ascontiguousarray(b.data).view(np.uint8), h)
    return h


def train(tag: str, model: Sequential, dtype: np.dtype, make_opt, x: np.ndarray, y: np.ndarray,
          bucket_mb: float = 0.004, average: str = "loss") -> None:
    # Tiny buckets: several buckets (and launches during backward) even for a small model.
    dp = DataParallel(model, comm, bucket_mb=bucket_mb, first_bucket_mb=bucket_mb / 2, seed=3, average=average)
    assert len(dp.buckets) >= 3, f"{tag}: expected several buckets, got {len(dp.buckets)}"
    opt = make_opt(dp.buckets)
    loader = ShardedLoader(x, y, GLOBAL_BATCH, comm.rank, comm.size, seed=5, dtype=dtype)
    losses = []
    for step in range(args.steps):
        xb, yb, ids = loader.batch(step)
        st = dp.train_step(xb, yb, ids, step, opt)
        losses.append(st.loss)
        every = comm.allgather(np.array([digest(dp)], np.int64))
        if not (every == every[0]).all():
            raise AssertionError(f"{tag}: parameters differ between ranks after step {step + 1}: "
                                 f"digests {every.tolist()}")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"{tag}: loss did not decrease ({losses[0]:.4f} -> {losses[-1]:.4f})")
    for name, a in dp.parameter_arrays().items():
        saved[f"{tag}/{name}"] = np.array(a)


rng = np.random.default_rng(0)
x = rng.standard_normal((480, 20))
y = (x[:, :5].sum(axis=1) > 0).astype(np.int64) + 2 * (x[:, 5] > 0)
img = rng.standard_normal((240, 1, 8, 8))
yi = (img[:, 0, :4].mean(axis=(1, 2)) > 0).astype(np.int64)

cases.run("mlp float64 sgd dropout", lambda: train(
    "f64_sgd", mlp([20, 64, 48, 4], dropout=0.2, seed=1, dtype=np.float64), np.dtype(np.float64),
    lambda b: SGD(b, lr=0.05, momentum=0.9, weight_decay=1e-3), x, y))
cases.run("mlp float32 adam dropout", lambda: train(
    "f32_adam", mlp([20, 64, 48, 4], dropout=0.2, seed=1, dtype=np.float32, activation="tanh"), np.dtype(np.float32),
    lambda b: Adam(b, lr=1e-3, weight_decay=1e-4), x, y, average="bucket"))


def conv_model() -> Sequential:
    r = np.random.default_rng(2)
    return Sequential(Conv2d(1, 4, 3, padding=1, rng=r, dtype=np.float64), ReLU(),
                      Conv2d(4, 4, 3, stride=2, rng=r, dtype=np.float64), ReLU(), Flatten(),
                      Linear(4 * 3 * 3, 2, rng=r, dtype=np.float64))


cases.run("conv float64 nesterov", lambda: train(
    "f64_conv", conv_model(), np.dtype(np.float64),
    lambda b: SGD(b, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4), img, yi, bucket_mb=0.0008))

if comm.rank == 0 and not cases.failed:
    np.savez(args.out, **saved)
cases.finish()
