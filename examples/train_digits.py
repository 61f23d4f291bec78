"""Data-parallel training of an MLP on scikit-learn's bundled digits (no download); prints the test accuracy.

Run:  mpiexec -n 4 python examples/train_digits.py      (or: collective-run -n 4 python examples/train_digits.py)
Resume after a crash:  ... --checkpoint-dir ckpt --resume
Survive lost ranks:    collective-run --elastic [--min-ranks 2] [--max-ranks 4] -n 4 python examples/train_digits.py --elastic
"""
from __future__ import annotations

import os

# One core per rank: the BLAS must not start threads of its own (set before NumPy is imported).
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
# A rank waiting for a message yields its core to the computation instead of spinning.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import collective as col
from collective.trainer import SGD, Checkpointer, DataParallel, ElasticStop, ShardedLoader, fit, mlp


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1797 8x8 digits, scaled to [0, 1], split 80/20 by a fixed permutation (the same on every rank)."""
    import importlib.util

    # Read scikit-learn's bundled file directly: importing sklearn.datasets (SciPy and all) costs
    # seconds per rank, several times over when ranks outnumber cores.
    spec = importlib.util.find_spec("sklearn")
    f = Path(next(iter(spec.submodule_search_locations or []), "")) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if f is not None and f.is_file():
        raw = np.loadtxt(f, delimiter=",")
        x, y = raw[:, :-1] / 16.0, raw[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits  # the documented way, if the file has moved

        d = load_digits()
        x, y = d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps (global batches)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and dropout")
    ap.add_argument("--batch", type=int, default=64, help="global batch (a multiple of the number of ranks)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--save-params", metavar="PATH", help="write the final parameters to this .npz (rank 0)")
    ap.add_argument("--checkpoint-dir", metavar="DIR", help="write checkpoints here")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--elastic", action="store_true",
                    help="go on when ranks are lost (launch with collective-run --elastic): roll back to the last "
                         "step every survivor committed and continue with the same global batch")
    args = ap.parse_args()

    t_start = time.perf_counter()
    comm = col.init()
    dtype = np.dtype(args.dtype)
    xtr, ytr, xte, yte = load_digits_split()
    model = mlp([64, *args.hidden, 10], dropout=args.dropout, seed=args.seed, dtype=dtype)
    dp = DataParallel(model, comm, seed=args.seed)
    opt = SGD(dp.buckets, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    loader = ShardedLoader(xtr, ytr, args.batch, comm.rank, comm.size, seed=args.seed, dtype=dtype)
    ckpt = Checkpointer(args.checkpoint_dir, comm, every=args.checkpoint_every) if args.checkpoint_dir else None
    if args.resume and ckpt is None:
        ap.error("--resume needs --checkpoint-dir")
    try:
        result = fit(dp, opt, loader, args.steps, checkpoint=ckpt, resume=args.resume, progress=not args.no_progress,
                     elastic=args.elastic)
    except ElasticStop as exc:
        if dp.rank == 0:
            print(str(exc), file=sys.stderr, flush=True)
        sys.exit(3)
    comm = dp.comm  # after lost ranks, the survivors' communicator (its rank 0 is the lowest survivor)
    acc = dp.accuracy(xte.astype(dtype), yte)
    if comm.rank == 0:
        if args.save_params:
            np.savez(args.save_params, **{k: np.asarray(v) for k, v in dp.parameter_arrays().items()})
        last = result.losses[-1] if result.losses else float("nan")
        print(f"ranks {comm.size}, global batch {args.batch}, steps {result.start_step}->{result.steps}, "
              f"final loss {last:.4f}, test accuracy {100 * acc:.2f}% "
              f"({len(yte)} test images), wall time {time.perf_counter() - t_start:.1f} s", flush=True)
        for rec in result.recoveries:
            print(rec.describe(), flush=True)
    try:
        comm.barrier()
    except col.RanksLostError:  # elastic: a rank lost after training changes nothing that was saved
        pass

if __name__ == "__main__":
    main()
