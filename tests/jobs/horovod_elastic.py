"""hvd.elastic job: a small torch model trained with hvd.DistributedOptimizer inside @hvd.elastic.run; one rank
SIGKILLs itself mid-training; the survivors restore the last commit, go on over fewer ranks and finish. Under
--max-ranks (COLLECTIVE_MAX_RANKS) the survivors' next commit spawns replacements running this same command line:
their hvd.init() joins, @hvd.elastic.run gives them rank 0's committed state, and every rank finishes together.

Usage: horovod_elastic.py [--kill JOBRANK:STEP:POINT] [--commit-every C] [--epochs E] [--final-ranks N]

POINT: backward (in a gradient hook, after the DistributedOptimizer submitted that gradient's allreduce: the
others wait inside the step's allreduces) or commit (after the step's update, just before its commit).
STEP counts optimizer steps from 0.

Each survivor checks: Horovod's size and rank follow the shrunken (then grown) communicator, the reset callbacks
ran once per change with the new size, training resumed from a commit of rank 0's (and grew at the next commit),
the parameters are the same bit for bit on every rank, and they equal (1e-10, float64) a single-process re-run of
the same schedule: the launched size up to the resumed commit, the survivors' size after it (the grown size after
the commit that grew), the ElasticSampler's samples in every part. A replacement checks that it joined last,
started from rank 0's last resume (not from its own initial state) without a reset, and the same parameters.
It prints PASSED n, or FAIL lines.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

import collective.horovod.torch as hvd

N, D, CLASSES, BATCH, LR, MOMENTUM, SEED = 96, 8, 3, 4, 0.1, 0.9, 5


def fail(msg: str) -> None:
    print(f"FAIL job rank {JOB}: {msg}", flush=True)
    os._exit(3)


passed = 0


def ok(cond: bool, msg: str) -> None:
    global passed
    if not cond:
        fail(msg)
    passed += 1


def die(where: str) -> None:
    print(f"job rank {JOB}: dying (SIGKILL) {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def make_model() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, CLASSES)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator()
    g.manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def order(epoch: int) -> list[int]:
    """The epoch's sample order, written out from ElasticSampler's documented rule (seed + epoch permutation)."""
    g = torch.Generator()
    g.manual_seed(SEED + epoch)
    return torch.randperm(N, generator=g).tolist()


def reference(resumes: list[tuple[int, int]], epochs: int) -> tuple[torch.Tensor, int]:
    """One process, no Horovod: (parameters, steps) of a run on resumes[i][1] ranks from step resumes[i][0] on.

    Each rank's batches come from its share of the rest of the epoch (every n-th index, padded by wrapping);
    the step's gradient is the mean of the ranks' mean-loss gradients, as DistributedOptimizer averages them.
    """
    x, y = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    step, seg = 0, 0
    for epoch in range(epochs):
        processed = 0
        while processed < N:
            n = resumes[seg][1]
            rest = order(epoch)[processed:]
            per = -(-len(rest) // n)
            padded = (rest * (n * per // len(rest) + 1))[:n * per]
            shards = [padded[r::n] for r in range(n)]
            changed = False
            for j in range(0, per, BATCH):
                if seg + 1 < len(resumes) and step == resumes[seg + 1][0]:
                    seg, changed = seg + 1, True
                    break  # the size changed: the rest of the epoch is dealt out afresh
                opt.zero_grad()
                loss = sum(torch.nn.functional.cross_entropy(model(x[s[j:j + BATCH]]), y[s[j:j + BATCH]])
                           for s in shards) / n
                loss.backward()
                opt.step()
                processed += BATCH * n
                step += 1
            if not changed:
                break
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), step


def semantics() -> None:
    """Horovod's state rules with no failure: sync takes rank 0's, restore undoes, commit keeps; the sampler."""
    r = hvd.rank()
    model = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0 + r)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = hvd.elastic.TorchState(model, opt, batch=20 + r, epoch=10 + r, seen=[r])
    state.sync()
    ok(all(torch.equal(p, torch.ones_like(p)) for p in model.parameters()), "sync: rank 0's parameters")
    ok((state.batch, state.epoch, state.seen) == (20, 10, [0]), f"sync: {state.batch} {state.epoch} {state.seen}")
    with torch.no_grad():
        model.weight.fill_(7.0)
    state.batch = 21
    state.seen.append(5)  # in place: the saved copy must not change
    state.restore()
    ok(torch.equal(model.weight, torch.ones_like(model.weight)), "restore: parameters back")
    ok((state.batch, state.seen) == (20, [0]), f"restore: {state.batch} {state.seen}")
    with torch.no_grad():
        model.weight.fill_(3.0)
    state.batch = 22
    state.commit()
    with torch.no_grad():
        model.weight.fill_(4.0)
    state.restore()
    ok(torch.equal(model.weight, torch.full_like(model.weight, 3.0)) and state.batch == 22, "commit then restore")

    n = hvd.size()
    data = list(range(10 * n + 1))
    smp = hvd.elastic.ElasticSampler(data, shuffle=False)
    ok(len(smp) == 11 and list(smp)[:3] == [r, r + n, r + 2 * n], f"sampler shard {list(smp)[:3]}, {len(smp)}")
    sst = hvd.elastic.TorchState(sampler=smp)
    smp.record_batch(0, 2)
    sst.commit()
    smp.record_batch(1, 2)
    sst.restore()
    ok(smp.processed_num == 2 * n and smp.processed_indices == data[:2 * n] and len(smp) == 9,
       f"sampler restore: {smp.processed_num} {len(smp)}")
    got = sum(hvd.allgather_object(list(smp), name="shards"), [])
    ok(set(got) == set(data[2 * n:]) and len(got) == 9 * n, f"the shards cover the rest of the epoch: {got}")
    smp.set_epoch(1)
    ok(smp.processed_num == 0 and len(smp) == 11, "set_epoch starts afresh")

    calls = []

    @hvd.elastic.run
    def broken(st: hvd.elastic.TorchState) -> None:
        calls.append(1)
        raise hvd.HorovodInternalError("not a lost rank")
    try:
        broken(state)
        ok(False, "run swallowed an error that is not a lost rank")
    except hvd.HorovodInternalError as e:
        ok(str(e) == "not a lost rank" and calls == [1], f"run re-raised once: {e} {calls}")


def main() -> None:
    global JOB
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill", default="")
    ap.add_argument("--commit-every", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--final-ranks", type=int, default=0,
                    help="the ranks expected at the end (default: COLLECTIVE_MAX_RANKS after a kill, else the "
                         "survivors)")
    args = ap.parse_args()
    hvd.init()
    from mpi4py import MPI

    replacement = MPI.Comm.Get_parent() != MPI.COMM_NULL  # spawned by the survivors' grow
    JOB = REPLACEMENT + hvd.rank() if replacement else hvd.rank()
    launched = hvd.size()
    max_ranks = int(os.environ.get("COLLECTIVE_MAX_RANKS") or 0)
    if not replacement:  # a replacement makes no op before run: the others wait in run's sync
        semantics()
    victim, kill_step, point = -1, -1, ""
    if args.kill:
        v, s, point = args.kill.split(":")
        victim, kill_step = int(v), int(s)
    x, y = make_data()
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = hvd.elastic.ElasticSampler(dataset, seed=SEED)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    model = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                                   named_parameters=model.named_parameters())
    state = hvd.elastic.TorchState(model, opt, sampler=sampler, epoch=0, step=0)
    resets: list[int] = []
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])
    resumes: list[tuple[int, int]] = []

    if JOB == victim and point == "backward":
        w = model[0].weight  # its gradient comes late in backward: allreduces of other gradients are in flight

        def hook(p: torch.Tensor) -> None:
            if state.step == kill_step:
                die(f"in backward of step {kill_step}")
        w.register_post_accumulate_grad_hook(hook)

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        resumes.append((state.step, hvd.size()))
        while state.epoch < args.epochs:
            for xb, yb in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                sampler.record_batch(0, BATCH)
                if JOB == victim and point == "commit" and state.step == kill_step:
                    die(f"before the commit of step {kill_step}")
                state.step += 1
                if state.step % args.commit_every == 0:
                    state.commit()
            state.epoch += 1
            sampler.set_epoch(state.epoch)
            state.commit()

    train(state)

    # Rank 0 launched with the job and saw every resume; a replacement saw only the last.
    launched, history = hvd.broadcast_object((launched, resumes), 0, name="rank0-history")
    survivors = [j for j in range(launched) if j != victim]
    final = args.final_ranks or (max(max_ranks, len(survivors)) if victim >= 0 else launched)
    grown = final > len(survivors)
    ok(hvd.size() == final, f"size {hvd.size()}, expected {final}")
    if replacement:
        ok(hvd.rank() >= len(survivors), f"a replacement is rank {hvd.rank()}, expected after {len(survivors)}")
        ok(resets == [] and resumes == history[-1:] and len(history) == 3,
           f"a replacement starts once, from rank 0's last resume: resets {resets}, resumes {resumes}, rank 0's "
           f"{history}")
    else:
        ok(hvd.rank() == survivors.index(JOB) and type(hvd.rank()) is int,
           f"rank {hvd.rank()!r} ({type(hvd.rank()).__name__}), expected the int {survivors.index(JOB)}")
    ok(sampler.num_replicas == hvd.size() and sampler.rank == hvd.rank(), "the sampler follows size and rank")
    if victim >= 0 and not replacement:
        sizes = [len(survivors), final] if grown else [len(survivors)]
        ok(resets == sizes, f"reset callbacks saw sizes {resets}, expected {sizes}")
        ok(len(resumes) == len(sizes) + 1 and resumes[0] == (0, launched) and resumes[1][1] == len(survivors),
           f"{resumes}")
        # Rank 0's last commit: before the failed step (backward), or after the victim's last finished step
        # (commit; the others committed it before noticing).
        c = args.commit_every
        want = {(kill_step // c) * c} if point == "backward" else {kill_step + 1 if (kill_step + 1) % c == 0
                                                                  else (kill_step + 1) // c * c}
        ok(resumes[1][0] in want, f"resumed at step {resumes[1][0]}, expected one of {sorted(want)}")
        if grown:  # at the first commit after the resume: c steps on, or an epoch's end before that
            ok(resumes[1][0] < resumes[2][0] <= resumes[1][0] + c and resumes[2][1] == final,
               f"grew at {resumes[2]}, expected within {c} steps of {resumes[1]}")
    elif not replacement:
        ok(resets == [] and resumes == [(0, launched)], f"{resets} {resumes}")
    ok(resumes == history[-len(resumes):], f"this rank's resumes {resumes} are not rank 0's {history}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = hvd.allgather(flat.unsqueeze(0), name="final-params")
    ok(all(torch.equal(every[0], every[r]) for r in range(hvd.size())),
       f"parameters differ across ranks: max diff {float((every - every[0]).abs().max())}")
    ref, steps = reference(history, args.epochs)
    ok(state.step == steps, f"{state.step} steps, the single-process re-run took {steps}")
    err = float(((flat - ref).abs() / ref.abs().clamp_min(1e-3)).max())
    ok(err <= 1e-10, f"parameters differ from the single-process re-run: max relative {err:.3g}")
    who = f"replacement {JOB}" if replacement else f"job rank {JOB}"
    print(f"{who} (rank {hvd.rank()} of {hvd.size()}): resumed {resumes}, steps {state.step}, "
          f"PASSED {passed}", flush=True)
    sys.stdout.flush()


JOB = -1
#: A replacement's JOB: this plus its Horovod rank (never a launched rank's number, so never the victim's).
REPLACEMENT = 1000

if __name__ == "__main__":
    main()
