"""TorchElasticState.join over real MPI without spawning (run at P=2): rank 1 builds a fresh model and optimizer,
as a replacement does, while rank 0 rebinds (the collectives the survivors make after comm.grow); rank 1 must
receive the step, parameters, buffers, optimizer state (created where it had none), hyperparameters and extra,
and both must train on as in an uninterrupted run.

Usage: mpiexec -n 2 python torch_elastic_join.py
"""
from __future__ import annotations

import numpy as np
import torch
from collective.trainer.data import ShardedSampler
from collective.trainer.torch import DistributedDataParallel
from collective.trainer.torch_elastic import TorchElasticState
from harness import Cases

import collective as col

comm = col.init()
cases = Cases(comm)
assert comm.size == 2, "run at P=2"
GLOBAL_BATCH, STEPS, SWITCH = 16, 6, 3  # the replacement joins after SWITCH steps; lr changes there too
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(7)
X = torch.randn(160, 6, generator=gen, dtype=torch.float64)
Y = (X[:, :3].sum(dim=1) > 0).long() + (X[:, 3] > 0).long()


def build(c, opt_name: str, seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.BatchNorm1d(24), torch.nn.ReLU(),
                              torch.nn.Linear(24, 3)).to(torch.float64)
    model = DistributedDataParallel(net, c, bucket_mb=0.001, first_bucket_mb=0.0005)
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sampler = ShardedSampler(len(X), GLOBAL_BATCH, c.rank, c.size, seed=3)
    return model, opt, sampler


def step_once(model, opt, sampler, s: int) -> None:
    idx = torch.from_numpy(sampler.indices(s))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.step()


def schedule(opt, s: int) -> None:
    """A learning-rate schedule kept in the optimizer's groups (what a scheduler writes there)."""
    if s == SWITCH:
        for g in opt.param_groups:
            g["lr"] *= 0.5


def snapshot(model, opt) -> dict[str, np.ndarray]:
    out = {f"m.{k}": v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in sorted(opt.state.get(p, {}).items()):
            out[f"o.{i}.{k}"] = v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
    for j, g in enumerate(opt.param_groups):
        out[f"g.{j}.lr"] = np.array(g["lr"])
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))


def join_case(opt_name: str):
    def case() -> None:
        ref_model, ref_opt, ref_sampler = build(comm, opt_name, 1)  # the uninterrupted run
        for s in range(STEPS):
            schedule(ref_opt, s)
            step_once(ref_model, ref_opt, ref_sampler, s)
        ref = snapshot(ref_model, ref_opt)

        model, opt, sampler = build(comm, opt_name, 1)
        state = TorchElasticState(model, opt, sampler, extra={"seen": 0, "ema": torch.zeros(3, dtype=torch.float64)})
        for s in range(SWITCH):
            state.begin_step(s)
            step_once(model, opt, sampler, s)
            state.extra["seen"] += 1
            state.extra["ema"] += 0.5
            state.commit(s + 1)
        schedule(opt, SWITCH)
        state.commit(SWITCH)  # the schedule's change is part of the commit
        if comm.rank == 0:  # the survivor: rebinds onto the (here: same) communicator, as after comm.grow
            state.rebind(comm)
        else:  # the replacement: a model and optimizer of its own (other initial values), then join()
            model, opt, sampler = build(comm, opt_name, 99)
            assert not any(opt.state.get(p) for p in model.parameters())
            state = TorchElasticState(model, opt, sampler, extra={"seen": 0, "ema": torch.ones(3, dtype=torch.float64)})
            state.join()
        assert state.committed_step == SWITCH, state.committed_step
        assert state.extra["seen"] == SWITCH and type(state.extra["seen"]) is int, state.extra
        assert torch.equal(state.extra["ema"], torch.full((3,), 0.5 * SWITCH, dtype=torch.float64)), state.extra
        assert sampler.rank == comm.rank and sampler.size == 2
        mine = snapshot(model, opt)
        every = comm.allgather(np.concatenate([v.reshape(-1) for v in mine.values()])[None, :])
        assert np.array_equal(every[0], every[1]), "the replacement's state differs from rank 0's"
        for s in range(SWITCH, STEPS):
            state.begin_step(s)
            step_once(model, opt, sampler, s)
            state.commit(s + 1)
        got = snapshot(model, opt)
        assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
        worst = max(rel(ref[k], got[k]) for k in ref)
        assert worst < 1e-12, (f"{opt_name}: differs from the uninterrupted run by {worst:.3g} in "
                               f"{[k for k in ref if rel(ref[k], got[k]) >= 1e-12]}")
        # BatchNorm's running statistics are each rank's own after the last forward; the rest is replicated.
        kept = np.concatenate([v.reshape(-1) for k, v in got.items() if "running" not in k])
        every = comm.allgather(kept[None, :])
        assert np.array_equal(every[0], every[1]), "the ranks differ after training on"

    return case


def committed_with_rank1_not_stepped(model: torch.nn.Module, opt: torch.optim.Optimizer,
                                     sampler: ShardedSampler) -> TorchElasticState:
    """A state committed at step 1 where rank 1 took part in the step's reductions but its optimizer did not step
    (so it lacks rank 0's momentum)."""
    state = TorchElasticState(model, opt, sampler)
    if comm.rank == 0:
        step_once(model, opt, sampler, 0)
    else:
        idx = torch.from_numpy(sampler.indices(0))
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
    state.commit(1)
    return state


def a_differing_survivor_is_refused() -> None:
    """Only a joining rank may take root's structure: a rank that is not joining and lacks root's momentum is an
    error on every rank, raised after the one exchange that shows it (nobody hangs)."""
    model, opt, sampler = build(comm, "sgd", 1)
    state = committed_with_rank1_not_stepped(model, opt, sampler)
    try:
        state.sync(0)
    except RuntimeError as exc:
        assert "rank(s) [1] differ in structure from rank 0's" in str(exc), exc
    else:
        raise AssertionError("no error")


def a_joining_rank_with_other_parameters_is_refused() -> None:
    """A joining rank may lack root's optimizer state, but not root's parameters: one whose optimizer updates
    fewer of them is an error on every rank, raised after the one exchange that shows it (nobody waits alone in
    a broadcast that rank never makes)."""
    model, opt, sampler = build(comm, "sgd", 1)
    if comm.rank == 1:
        opt = torch.optim.SGD(list(model.parameters())[:2], lr=0.05, momentum=0.9, weight_decay=1e-3)
    state = committed_with_rank1_not_stepped(model, opt, sampler)
    try:
        state.sync(0, joining=comm.rank == 1)
    except RuntimeError as exc:
        assert "rank(s) [1] differ in structure from rank 0's" in str(exc), exc
    else:
        raise AssertionError("no error")


for name in ("sgd", "adam"):
    cases.run(f"join_{name}", join_case(name))
cases.run("differing_survivor_refused", a_differing_survivor_is_refused)
cases.run("joining_rank_with_other_parameters_refused", a_joining_rank_with_other_parameters_is_refused)
cases.finish()
