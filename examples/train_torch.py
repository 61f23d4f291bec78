"""Train a PyTorch MLP data-parallel with collective's DDP adapter.

Run: collective-run -n 2 python examples/train_torch.py [--epochs 8] [--batch 64] [--shard]
Survive lost ranks: collective-run --elastic -n 4 python examples/train_torch.py --elastic [--save-params p.npz]
...and grow back: collective-run --elastic -n 4 --max-ranks 4 python examples/train_torch.py --elastic

Every rank builds the same model, wraps it in trainer.torch.DistributedDataParallel
(which gives every rank rank 0's parameters), and takes its own slice of each
global batch (trainer.data.ShardedSampler: the global batches and their order
do not depend on the number of ranks); backward averages the gradients over
the ranks, so the ranks stay bitwise identical. With --elastic the state is
committed in memory after every step (trainer.torch_elastic.TorchElasticState);
when a rank dies the survivors roll back to the last step all of them
committed, reshard the global batch over themselves and go on, the lowest
surviving rank taking over rank 0's printing and --save-params. With
collective-run --max-ranks, the survivors spawn replacements at the next
commit: a replacement runs this same script, builds the model as every rank
does, takes the survivors' commit (TorchElasticState.join) and trains on from
its step with its share of each global batch. Data:
scikit-learn's bundled 8x8 digits (nothing is downloaded), or a synthetic task
without scikit-learn.
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib

import numpy as np
import torch

import collective as col
from collective.trainer.data import ShardedSampler
from collective.trainer.torch import DistributedDataParallel
from collective.trainer.torch_elastic import ElasticStop, TorchElasticState


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(train x, train y, test x, test y, classes), the same on every rank."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    except ImportError:  # a synthetic task: the class is the argmax of a fixed linear map
        g = np.random.default_rng(seed)
        x = g.standard_normal((2000, 64)).astype(np.float32)
        y = (x @ g.standard_normal((64, 10))).argmax(1).astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    cut = len(x) * 4 // 5
    t = torch.from_numpy
    return t(x[:cut]), t(y[:cut]), t(x[cut:]), t(y[cut:]), int(y.max()) + 1


def main() -> None:
    """Parse options, train, and print per-epoch loss and test accuracy on rank 0."""
    ap = argparse.ArgumentParser(description="data-parallel PyTorch training over collective")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps (default: --epochs epochs)")
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--shard", action="store_true",
                    help="model.shard_optimizer: one copy of the parameters per node, each rank updates its share")
    ap.add_argument("--elastic", action="store_true",
                    help="go on when ranks are lost (launch with collective-run --elastic): roll back to the last "
                         "commit, reshard, continue")
    ap.add_argument("--save-params", metavar="PATH", help="write the final parameters to this .npz (rank 0)")
    args = ap.parse_args()
    if args.shard and args.elastic:
        raise SystemExit("--shard and --elastic do not combine: a sharded optimizer cannot move to the survivors")

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    comm = col.init()
    P, R = comm.size, comm.rank
    xtr, ytr, xte, yte, classes = load_data(args.seed)
    xtr, xte = xtr.to(dtype), xte.to(dtype)
    if args.batch % P:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of ranks ({P})")
    sampler = ShardedSampler(len(xtr), args.batch, R, P, seed=args.seed)

    torch.manual_seed(args.seed + R)  # different on purpose: the wrapper broadcasts rank 0's parameters
    net = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(args.hidden, classes)).to(dtype)
    model = DistributedDataParallel(net, comm)
    if args.shard:
        opt = model.shard_optimizer(torch.optim.SGD, lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    if R == 0:
        print(f"{P} ranks, {len(xtr)} training samples, global batch {args.batch}, buckets "
              f"{[round(b / 1e6, 2) for b in model.bucket_sizes]} MB", flush=True)

    per_epoch = sampler.steps_per_epoch
    steps = args.steps if args.steps is not None else args.epochs * per_epoch
    # The epoch's running loss is part of the committed state: after a rollback it is that of the agreed step.
    extra = {"loss_sum": 0.0}
    state = TorchElasticState(model, opt, sampler, extra=extra) if args.elastic else None
    step = 0
    if state is not None and comm.is_replacement:  # spawned by the survivors (--max-ranks): take their commit
        state.join()
        step = state.committed_step
    t0 = time.perf_counter()
    model.train()
    while True:
        try:
            if step >= steps:
                if state is not None:
                    state.finish(step)  # every survivor leaves alike, or all recover
                break
            if state is not None:
                state.begin_step(step)
            idx = torch.from_numpy(sampler.indices(step))  # this rank's slice of the step's global batch
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()  # returns once the gradients are averaged over the ranks
            opt.step()
            step += 1
            run = state.extra if state is not None else extra
            run["loss_sum"] += loss.item()
            if step % per_epoch == 0 or step == steps:
                done = (step - 1) % per_epoch + 1
                total = run["loss_sum"]
                model.eval()
                with torch.no_grad():
                    acc = float((model.module(xte).argmax(1) == yte).float().mean())
                model.train()
                if model.comm.rank == 0:
                    print(f"epoch {(step - 1) // per_epoch + 1}: loss {total / done:.4f} (rank 0's shard)  "
                          f"test accuracy {acc:.3f}  ({(time.perf_counter() - t0) / done * 1e3:.1f} ms/step)",
                          flush=True)
                run["loss_sum"] = 0.0
                t0 = time.perf_counter()
            if state is not None:
                state.commit(step)
                if state.maybe_grow(step) and model.comm.rank == 0:  # replacements joined (--max-ranks)
                    print(f"elastic: {model.comm.size} ranks again after step {step}", file=sys.stderr, flush=True)
        except col.RanksLostError as exc:
            if state is None:
                raise
            try:
                rec = state.recover(exc, step)
            except ElasticStop as stop:
                if state.comm.rank == 0:
                    print(str(stop), file=sys.stderr, flush=True)
                sys.exit(3)
            step = rec.step
            if model.comm.rank == 0:
                print(rec.describe(), file=sys.stderr, flush=True)

    comm = model.comm  # after lost ranks, the survivors' communicator (its rank 0 is the lowest survivor)
    P, R = comm.size, comm.rank
    if R == 0 and args.save_params:
        np.savez(args.save_params, **{k: v.detach().numpy() for k, v in model.module.state_dict().items()})
    crc = 0
    for p in model.parameters():
        crc = zlib.crc32(p.detach().numpy().tobytes(), crc)
    try:
        every = comm.allgather(np.array([crc], np.int64))
    except col.RanksLostError:  # elastic: a rank lost after training changes nothing that was saved
        every = np.array([crc], np.int64)
    same = len(set(every.tolist())) == 1
    if R == 0:
        print(f"parameters identical on all {len(every)} ranks: {same}", flush=True)
        print(f"ranks {P}, global batch {args.batch}, steps {steps}, recoveries "
              f"{len(state.recoveries) if state is not None else 0}, wall time "
              f"{time.perf_counter() - t_start:.1f} s", flush=True)
    if not same:
        raise SystemExit(f"rank {R}: parameters differ across ranks: {every.tolist()}")


if __name__ == "__main__":
    main()
