"""Elastic training of the torch wrapper: TorchElasticState in one process (commit, rollback, save/load, rebind),
then `collective-run --elastic` jobs of examples/train_torch.py whose ranks SIGKILL themselves mid-allreduce; the
survivors must finish with the parameters of an uninterrupted run with the same global batch."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_util import ROOT, can_grow, check, count_passed, elastic_available, mpirun, run_training

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'pycollective[torch]')")

import collective as col  # noqa: E402
from collective.trainer.data import ShardedSampler  # noqa: E402
from collective.trainer.torch import DistributedDataParallel  # noqa: E402
from collective.trainer.torch_elastic import TorchElasticState  # noqa: E402


# ------------------------------------------------------------------------------ one process
def _setup(opt_name: str, dtype: torch.dtype = torch.float64) -> tuple[DistributedDataParallel, object]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 3)).to(dtype)
    model = DistributedDataParallel(net, col.Communicator())
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def _batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)


def _train(model: DistributedDataParallel, opt: object, step: int, stop_before_update: bool = False) -> None:
    x, y = _batch(step)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    if not stop_before_update:
        opt.step()


def _state(model: DistributedDataParallel, opt: object) -> dict[str, torch.Tensor]:
    out = {f"m.{k}": v.detach().clone() for k, v in model.module.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            out[f"o.{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_rollback_one_step_and_after_a_half_finished_step(opt_name: str) -> None:
    """Restoring either of the last two commits gives their state bit for bit (parameters, BatchNorm buffers,
    optimizer state), also after a step that stopped before its update; training on from there equals training
    straight through; a step not held raises."""
    ref_model, ref_opt = _setup(opt_name)
    want = {}
    for s in range(6):
        want[s] = _state(ref_model, ref_opt)
        _train(ref_model, ref_opt, s)
    want[6] = _state(ref_model, ref_opt)

    model, opt = _setup(opt_name)
    state = TorchElasticState(model, opt, extra={"seen": 0})
    _same(_state(model, opt), want[0])
    for s in range(4):
        _train(model, opt, s)
        state.extra["seen"] += 1
        state.commit(s + 1)
    _train(model, opt, 4, stop_before_update=True)  # a step that failed inside its reductions
    state.restore(3)  # the survivor that had finished one step more rolls back
    _same(_state(model, opt), want[3])
    assert state.extra == {"seen": 3} and state.committed_step == 3
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="step 4 is not committed"):
        state.restore(4)
    for s in range(3, 6):
        _train(model, opt, s)
        state.commit(s + 1)
    _same(_state(model, opt), want[6])
    state.restore(5)
    _same(_state(model, opt), want[5])


def test_restoring_step_zero_drops_the_optimizer_state() -> None:
    """Before the first update there is no momentum: a rollback to step 0 removes what step 1 created."""
    model, opt = _setup("sgd")
    want = _state(model, opt)
    state = TorchElasticState(model, opt)
    _train(model, opt, 0)
    state.commit(1)
    assert any(opt.state.get(p) for p in model.parameters())
    state.restore(0)
    assert not any(opt.state.get(p) for p in model.parameters())
    _same(_state(model, opt), want)


def test_commits_reuse_their_tensors() -> None:
    """After the first two commits a commit allocates no new copies: the two sets are used in turn."""
    model, opt = _setup("adam")
    state = TorchElasticState(model, opt)
    ptrs = []
    for s in range(5):
        _train(model, opt, s)
        state.commit(s + 1)
        ptrs.append(state._commits[-1].tensors[0].data_ptr())
    assert ptrs[1] == ptrs[3] and ptrs[2] == ptrs[4] and ptrs[1] != ptrs[2]


def test_save_and_load_the_commit(tmp_path: Path) -> None:
    """save() writes the newest commit as a plain .npz; load() on a fresh model and optimizer gives the same state,
    and both train on alike."""
    model, opt = _setup("adam")
    state = TorchElasticState(model, opt, extra={"lr_scale": 0.5})
    for s in range(3):
        _train(model, opt, s)
        state.commit(s + 1)
    path = state.save(tmp_path)
    assert path == tmp_path / "elastic-00000003.npz" and path.is_file()
    with np.load(path, allow_pickle=False) as z:
        assert int(z["step"]) == 3
    other, other_opt = _setup("adam")
    st2 = TorchElasticState(other, other_opt, extra={"lr_scale": 1.0})
    assert st2.load(path) == 3 and st2.committed_step == 3 and st2.extra["lr_scale"] == 0.5
    _same(_state(other, other_opt), _state(model, opt))
    _train(model, opt, 3)
    _train(other, other_opt, 3)
    _same(_state(other, other_opt), _state(model, opt))
    bad, bad_opt = _setup("adam")
    bad.module[0] = torch.nn.Linear(6, 16, bias=False).to(torch.float64)
    with pytest.raises(ValueError, match="does not match the model"):
        TorchElasticState(bad, torch.optim.Adam(bad.parameters())).load(path)


def test_rebind_on_one_rank_and_bad_arguments() -> None:
    """rebind() onto another single-rank communicator keeps training identical; a sharded optimizer and an
    optimizer over other tensors are refused with the reason."""
    model, opt = _setup("sgd")
    ref, ref_opt = _setup("sgd")
    state = TorchElasticState(model, opt, ShardedSampler(64, 8, 0, 1))
    for s in range(2):
        _train(model, opt, s)
        _train(ref, ref_opt, s)
        state.commit(s + 1)
    state.rebind(col.Communicator())
    for s in range(2, 4):
        _train(model, opt, s)
        _train(ref, ref_opt, s)
    _same(_state(model, opt), _state(ref, ref_opt))
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        m2, _ = _setup("sgd")
        TorchElasticState(m2, m2.shard_optimizer(torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match="not the model's parameters"):
        TorchElasticState(model, torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1))
    m3, _ = _setup("sgd")
    m3.shard_optimizer(torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="the optimizer is sharded"):
        m3.rebind(col.Communicator())


def test_broadcast_extra_keeps_each_value_kind() -> None:
    """Numbers come back as numbers of their type, arrays as arrays of their dtype and shape (shared by both
    elastic states)."""
    from collective.trainer.elastic import broadcast_extra

    extra = {"f": 0.25, "i": 7, "a": np.arange(6, dtype=np.float32).reshape(2, 3), "l": [1.0, 2.0]}
    broadcast_extra(col.Communicator(), extra)
    assert type(extra["f"]) is float and extra["f"] == 0.25
    assert type(extra["i"]) is int and extra["i"] == 7
    assert extra["a"].dtype == np.float32 and extra["a"].shape == (2, 3)
    assert isinstance(extra["l"], np.ndarray) and extra["l"].tolist() == [1.0, 2.0]


# ------------------------------------------------------------------------------ collective-run --elastic jobs
SCRIPT = ROOT / "examples" / "train_torch.py"
STEPS, SEED, BATCH = 12, 3, 96
#: Small buckets: several per step, so bucket 0's reduction is one of many.
BUCKETS = {"COLLECTIVE_BUCKET_MB": "0.004"}
TOL = {"float32": 1e-5, "float64": 1e-10}
needs_elastic = pytest.mark.skipif(not elastic_available(), reason="the runtime has no elastic mode (ULFM core)")
needs_grow = pytest.mark.skipif(not can_grow(), reason="the runtime cannot grow a communicator (comm.grow)")




def launch(tmp: Path, name: str, *, elastic: bool = True, kills: str = "", dtype: str = "float32",
           batch: int = BATCH, run_args: list[str] | None = None, timeout: float = 420) -> tuple[int, str, Path]:
    """Run train_torch.py on 4 ranks under collective-run (``--elastic`` when asked); (rc, output, params file)."""
    out = tmp / f"{name}.npz"
    cmd = [sys.executable, "-m", "collective.run", *(["--elastic"] if elastic else []), *(run_args or []), "-n", "4",
           sys.executable, str(SCRIPT), "--steps", str(STEPS), "--seed", str(SEED), "--batch", str(batch),
           "--hidden", "32", "--dtype", dtype, "--save-params", str(out), *(["--elastic"] if elastic else [])]
    rc, text = run_training(name, cmd, tmp, BUCKETS, kills, timeout)
    return rc, text, out


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))


def killed(text: str) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), c) for a, b, c in
            re.findall(r"elastic-test: killing world rank (\d+) at step (\d+) point (\S+)", text)]


_REFS: dict[str, dict[str, np.ndarray]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, dtype: str) -> dict[str, np.ndarray]:
    """An uninterrupted P=4 run (plain launch, no elastic state), once per dtype for the tests that compare with it."""
    if dtype not in _REFS:
        rc, text, path = launch(tmp_path_factory.mktemp(f"ref-{dtype}"), "ref", elastic=False, dtype=dtype)
        assert rc == 0, text[-4000:]
        _REFS[dtype] = _load(path)
    return _REFS[dtype]


def run_kills(tmp_path_factory: pytest.TempPathFactory, tmp: Path, kills: list[tuple[int, int, str]], dtype: str,
              max_ranks: int | None = None) -> str:
    """An elastic P=4 run with these kills (and ``--max-ranks``: 4 grows back): rc 0, every kill happened, 4 - kills
    ranks left (4 when growing back), every rank's parameters alike and the uninterrupted run's within TOL[dtype]
    relative."""
    ref = reference(tmp_path_factory, dtype)
    spec = ",".join(f"{r}:{s}:{p}" for r, s, p in kills)
    grow = max_ranks == 4
    rc, text, out = launch(tmp, "kill", kills=spec, dtype=dtype,
                           run_args=["--max-ranks", str(max_ranks)] if max_ranks else None)
    assert rc == 0, f"kills {spec}: exit code {rc}\n{text[-6000:]}"
    assert sorted(killed(text)) == sorted(kills), f"kills {spec}: saw {killed(text)}\n{text[-4000:]}"
    left = 4 if grow else 4 - len(kills)
    m = re.findall(r"^ranks (\d+), global batch", text, re.MULTILINE)
    assert m and int(m[-1]) == left, text[-4000:]
    assert text.count("going on from the commit of step") >= len(kills), text[-4000:]
    assert f"parameters identical on all {left} ranks: True" in text, text[-4000:]
    got = _load(out)
    assert got.keys() == ref.keys()
    worst = max(_rel(ref[k], got[k]) for k in ref)
    assert worst <= TOL[dtype], f"kills {spec}: parameters differ from the uninterrupted run by {worst:.3g}"
    print(f"kills {spec} ({dtype}): worst relative difference {worst:.3g};",
          "; ".join(ln for ln in text.splitlines() if ln.startswith("elastic: ")))
    return text


@pytest.mark.mpi
@needs_elastic
def test_three_ranks_killed_in_turn_float64(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """float64, three losses in one run: job rank 1 dies while bucket 0's allreduce is in flight; then job rank 0
    (the lowest survivor, rank 1, takes over printing and --save-params) right after its bucket 0 was reduced:
    uneven completion; then job rank 2 mid-allreduce in the last bucket. The last survivor's parameters match the
    uninterrupted run within 1e-10. With --max-ranks 5, which the global batch 96 does not split over, no
    replacement is spawned: the survivors say so and go on alone."""
    text = run_kills(tmp_path_factory, tmp_path, [(1, 3, "shm"), (0, 6, "allreduce"), (2, 9, "late-allreduce")],
                     "float64", max_ranks=5)
    assert ("elastic: no replacements (the global batch 96 cannot be split evenly over 5 ranks); going on with 3 "
            "ranks") in text, text[-4000:]


@pytest.mark.mpi
@needs_grow
def test_a_replacement_joins_and_the_run_ends_with_four_ranks(tmp_path_factory: pytest.TempPathFactory,
                                                               tmp_path: Path) -> None:
    """--max-ranks 4: job rank 0 dies while bucket 0's allreduce is in flight; at the next commit the survivors
    spawn a replacement, which builds the model, receives the commit (parameters, optimizer state, step, extra) and
    its shard, and the run ends on 4 ranks, all alike, with the uninterrupted run's parameters."""
    text = run_kills(tmp_path_factory, tmp_path, [(0, 4, "shm")], "float64", max_ranks=4)
    m = re.search(r"going on from the commit of step (\d+)", text)
    assert m, text[-4000:]
    assert f"elastic: 4 ranks again after step {int(m.group(1)) + 1}" in text, text[-4000:]


@pytest.mark.mpi
def test_join_receives_the_commit_p2() -> None:
    """Without spawning, at P=2: a rank with a fresh model and optimizer joins while the other rebinds (the
    collectives of a grow); it receives the step, parameters, buffers, optimizer state (SGD momentum, Adam's
    moments and step, created where it had none), the scheduled lr and extra, and both train on as in an
    uninterrupted run; a survivor whose state differs in structure, or a joining rank whose optimizer updates
    other parameters, is an error on every rank."""
    res = mpirun("torch_elastic_join.py", 2, timeout=240)
    check(res, "torch_elastic_join")
    assert count_passed(res) == 4


@pytest.mark.mpi
@needs_elastic
def test_a_global_batch_the_survivors_cannot_split_is_a_clear_error(tmp_path: Path) -> None:
    """Global batch 64 on 4 ranks, one lost: 64 does not split over 3, and every survivor says so."""
    rc, text, _ = launch(tmp_path, "uneven", kills="2:2:shm", batch=64)
    assert rc != 0, text[-4000:]
    assert "cannot be split evenly over 3 ranks" in text, text[-4000:]
