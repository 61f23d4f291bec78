"""Elastic training under real mpiexec: resizes without failures, and `collective-run --elastic` jobs of
examples/train_digits.py whose ranks SIGKILL themselves (COLLECTIVE_ELASTIC_TEST_KILL) at chosen points; the
survivors must finish with the parameters of an uninterrupted run with the same global batch."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mpi_util import ROOT, can_grow, check, count_passed, elastic_available, mpirun, run_training

pytestmark = pytest.mark.mpi

SCRIPT = ROOT / "examples" / "train_digits.py"
STEPS, SEED, BATCH = 16, 3, 96
#: Small buckets: the digits MLP then has three, so kills land between buckets' reductions and updates.
BUCKETS = {"COLLECTIVE_BUCKET_MB": "0.03"}
TOL = {"float32": 1e-5, "float64": 1e-10}
needs_elastic = pytest.mark.skipif(not elastic_available(), reason="the runtime has no elastic mode (ULFM core)")
needs_grow = pytest.mark.skipif(not can_grow(), reason="the runtime cannot grow a communicator (comm.grow)")




def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))


def launch(tmp: Path, name: str, *, elastic: bool = True, n: int = 4, kills: str = "", dtype: str = "float32",
           run_args: list[str] | None = None, args: list[str] | None = None, timeout: float = 420,
           save: bool = True) -> tuple[int, str, Path]:
    """Run train_digits.py under collective-run (``--elastic`` when asked); return (rc, output, params file)."""
    out = tmp / f"{name}.npz"
    cmd = [sys.executable, "-m", "collective.run", *(["--elastic"] if elastic else []), *(run_args or []),
           "-n", str(n), sys.executable, str(SCRIPT), "--steps", str(STEPS), "--seed", str(SEED), "--batch",
           str(BATCH), "--dtype", dtype, "--no-progress", *(["--elastic"] if elastic else []),
           *(["--save-params", str(out)] if save else []), *(args or [])]
    rc, text = run_training(name, cmd, tmp, BUCKETS, kills, timeout)
    return rc, text, out


_REFS: dict[str, dict[str, np.ndarray]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, dtype: str) -> dict[str, np.ndarray]:
    """An uninterrupted P=4 run (plain launch, no elastic state) with the same global batch, seed and steps."""
    if dtype not in _REFS:
        tmp = tmp_path_factory.mktemp(f"ref-{dtype}")
        rc, text, out = launch(tmp, "ref", elastic=False, dtype=dtype)
        assert rc == 0, text[-4000:]
        with np.load(out) as z:
            _REFS[dtype] = {k: z[k] for k in z.files}
    return _REFS[dtype]


def assert_same_params(ref: dict[str, np.ndarray], out: Path, dtype: str, what: str) -> None:
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert got.keys() == ref.keys()
    worst = max(_rel(ref[k], got[k]) for k in ref)
    assert worst <= TOL[dtype], f"{what}: parameters differ from the uninterrupted run by {worst:.3g} > {TOL[dtype]}"


def final_ranks(text: str) -> int:
    m = re.findall(r"^ranks (\d+), global batch", text, re.MULTILINE)
    assert m, f"no final line in the output:\n{text[-4000:]}"
    return int(m[-1])


def killed(text: str) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), c) for a, b, c in
            re.findall(r"elastic-test: killing world rank (\d+) at step (\d+) point (\S+)", text)]


def run_kills(tmp_path_factory: pytest.TempPathFactory, tmp: Path, kills: list[tuple[int, int, str]],
              dtype: str = "float32", name: str = "kill") -> str:
    """One elastic job with these kills: rc 0, every kill happened, 4 - len(kills) ranks left, same parameters."""
    ref = reference(tmp_path_factory, dtype)
    spec = ",".join(f"{r}:{s}:{p}" for r, s, p in kills)
    t0 = time.monotonic()
    rc, text, out = launch(tmp, name, kills=spec, dtype=dtype)
    assert rc == 0, f"kills {spec}: exit code {rc}\n{text[-6000:]}"
    assert sorted(killed(text)) == sorted(kills), f"kills {spec}: saw {killed(text)}\n{text[-4000:]}"
    assert final_ranks(text) == 4 - len(kills), text[-4000:]
    assert text.count("going on from the commit of step") >= len(kills), text[-4000:]
    assert_same_params(ref, out, dtype, f"kills {spec}")
    print(f"kills {spec}: {time.monotonic() - t0:.1f} s;",
          "; ".join(ln for ln in text.splitlines() if ln.startswith("elastic: lost") and "from the error" in ln))
    return text


# ------------------------------------------------------------------------------ without failures
def test_resize_without_failures() -> None:
    """4 -> 3 -> 2 ranks by subgroups: parameters equal one process's (global batch 96), uneven commits roll back
    to the smallest, and fit(elastic=True) trains bit for bit like fit()."""
    res = mpirun("elastic_resize.py", 4, timeout=300)
    check(res, "elastic_resize")
    assert count_passed(res) == 3


# ------------------------------------------------------------------------------ kills (the normal run)
@needs_elastic
def test_rank0_killed_mid_shm_then_another_in_the_commit(tmp_path_factory: pytest.TempPathFactory,
                                                          tmp_path: Path) -> None:
    """Two kills in a row: job rank 0 while bucket 0's shm reduction runs (the lowest survivor takes over rank 0's
    duties: it writes --save-params), then job rank 2 inside its commit."""
    run_kills(tmp_path_factory, tmp_path, [(0, 3, "shm"), (2, 8, "commit")])


@needs_elastic
def test_kill_just_before_the_final_agreement(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A rank dies after the last step, as fit() ends: every survivor sees it in the final agreement (none leaves
    while another waits), they recover and finish together with the uninterrupted run's parameters."""
    text = run_kills(tmp_path_factory, tmp_path, [(1, STEPS, "finish")])
    assert "in agree during step" in text, text[-4000:]


@needs_elastic
@pytest.mark.slow
def test_kill_in_the_update_float64(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """float64: the parameters match the uninterrupted run's within 1e-10."""
    run_kills(tmp_path_factory, tmp_path, [(3, 5, "update")], dtype="float64")


@needs_elastic
def test_below_min_ranks_stops_with_the_commit_on_disk_and_resumes(tmp_path_factory: pytest.TempPathFactory,
                                                                     tmp_path: Path) -> None:
    """--min-ranks 4 and a kill: the job stops with a clear message after writing the agreed commit; resuming
    from it on 3 ranks gives the uninterrupted run's parameters."""
    ref = reference(tmp_path_factory, "float32")
    ck = tmp_path / "ckpt"
    rc, text, _ = launch(tmp_path, "stop", kills="1:6:allreduce", run_args=["--min-ranks", "4"],
                         args=["--checkpoint-dir", str(ck), "--checkpoint-every", "100"], save=False)
    assert rc != 0, text[-4000:]
    m = re.search(r"fewer than the minimum 4 \(--min-ranks\); training stopped at the commit of step (\d+), "
                  r"written to (\S+)\.", text)
    assert m, text[-4000:]
    step = int(m.group(1))
    assert step in (6, 7), step  # the step that failed, or the one before (uneven completion)
    assert (ck / f"ckpt-{step:08d}.npz").is_file()
    rc, text, out = launch(tmp_path, "resumed", elastic=False, n=3, args=["--checkpoint-dir", str(ck), "--resume"])
    assert rc == 0, text[-4000:]
    assert f"steps {step}->{STEPS}" in text, text[-2000:]
    assert_same_params(ref, out, "float32", "stopped below --min-ranks, then resumed on 3 ranks")


# ------------------------------------------------------------------------------ the sweep (slow)
SWEEP = [
    [(0, 2, "allreduce"), (1, 6, "late-allreduce")],
    [(2, 11, "forward"), (0, 13, "shm")],
    [(1, 1, "shm"), (3, 4, "commit")],
    [(0, 9, "update"), (2, 12, "allreduce")],
    [(2, 3, "late-allreduce"), (0, 7, "commit")],
    [(1, 12, "shm"), (3, 14, "update")],
    [(3, 2, "update"), (2, 5, "allreduce")],
    [(0, 5, "forward"), (1, 10, "late-allreduce")],
    [(2, 0, "shm"), (1, 15, "commit")],
    [(3, 9, "shm"), (0, 12, "update")],
]


@needs_elastic
@pytest.mark.slow
@pytest.mark.parametrize("kills", SWEEP, ids=lambda k: "+".join(f"{r}-{s}-{p}" for r, s, p in k))
def test_kill_sweep(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                    kills: list[tuple[int, int, str]]) -> None:
    """Twenty kills over every point (rank 0 included, two in each job): the same parameters every time."""
    text = run_kills(tmp_path_factory, tmp_path, kills)
    del text


@needs_elastic
@pytest.mark.slow
def test_three_kills_down_to_one_rank(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Job ranks 0, 1 and 2 die one after another; the last rank finishes alone, with the same parameters."""
    run_kills(tmp_path_factory, tmp_path, [(0, 2, "allreduce"), (1, 6, "late-allreduce"), (2, 11, "forward")])


@needs_elastic
@pytest.mark.slow
def test_kill_during_a_checkpoint_float64(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Rank 0 dies while writing a disk checkpoint: the survivors go on; disk checkpoints keep being written."""
    ref = reference(tmp_path_factory, "float64")
    ck = tmp_path / "ckpt"
    rc, text, out = launch(tmp_path, "ckpt", kills="0:7:checkpoint", dtype="float64",
                           args=["--checkpoint-dir", str(ck), "--checkpoint-every", "4"])
    assert rc == 0, text[-4000:]
    assert_same_params(ref, out, "float64", "rank 0 killed while writing a checkpoint")
    assert (ck / "ckpt-00000016.npz").is_file() and (ck / "ckpt-00000012.npz").is_file()


@pytest.mark.slow
def test_without_elastic_a_kill_still_ends_the_job(tmp_path: Path) -> None:
    """Plain launch (no --elastic): the kill ends the job quickly with a non-zero exit code."""
    env_kill = "1:3:allreduce"
    t0 = time.monotonic()
    rc, text, _ = launch(tmp_path, "plain", elastic=False, kills=env_kill, args=["--elastic"], save=False)
    assert rc != 0, text[-4000:]
    assert killed(text) == [(1, 3, "allreduce")]
    assert "ranks 3" not in text
    print(f"plain job ended rc={rc} after {time.monotonic() - t0:.1f} s")



@needs_grow
def test_a_replacement_joins_and_the_run_ends_with_four_ranks(tmp_path_factory: pytest.TempPathFactory,
                                                               tmp_path: Path) -> None:
    """--max-ranks 4: after a kill the survivors spawn a replacement at the next commit; it receives the state and
    its shard, and the run ends on 4 ranks with the uninterrupted run's parameters."""
    ref = reference(tmp_path_factory, "float32")
    rc, text, out = launch(tmp_path, "grow", kills="2:5:allreduce", run_args=["--max-ranks", "4"])
    assert rc == 0, text[-6000:]
    assert killed(text) == [(2, 5, "allreduce")]
    assert final_ranks(text) == 4, text[-4000:]
    assert_same_params(ref, out, "float32", "a kill, then a replacement")
