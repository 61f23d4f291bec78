"""Elastic mode over ULFM: real jobs launched by collective-run --elastic in which a rank kills itself (SIGKILL).

Each job (tests/jobs/elastic_core.py) checks on every survivor: RanksLostError names the lost job rank and the
call, every later call on the old communicator raises too, comm.shrink() gives a communicator whose collectives
(native, Schedules, shm, the repeat paths, alloc'd windows, broadcast, allgather, point-to-point) match NumPy, the
default communicator follows, and the old one raises. Jobs run under a hard timeout: none may hang.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from mpi_util import JOBS, ROOT, run_job

from collective.run import elastic_args, mpiexec_command

# Generous: the machine is shared and each job starts 4-5 Python processes with MPI; a hang is what it catches.
TIMEOUT = 300


def run_elastic(args: list[str], nprocs: int = 4, env: dict[str, str] | None = None, elastic: bool = True,
                timeout: float = TIMEOUT, job: str = "elastic_core.py",
                oversubscribe: bool = True, launcher_flags: tuple[str, ...] = ()) -> tuple[int, str, bool, float]:
    """Run tests/jobs/elastic_core.py under collective-run's command line; (exit code, output, timed out, seconds).

    ``launcher_flags``: more of collective-run's flags before the program (``--max-ranks M``, ``--host ...``)."""
    e = dict(os.environ)
    e.setdefault("COLLECTIVE_TIMEOUT", "120")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONFAULTHANDLER"] = "1"
    e["COLLECTIVE_SHM_CHUNK_BYTES"] = "262144"  # several chunks, so a kill can fall between two shm phases
    e.update(env or {})
    words = [*(["--oversubscribe"] if oversubscribe else []), "-n", str(nprocs), sys.executable, str(JOBS / job),
             *args]
    extra: dict[str, str] = {}
    if elastic:
        words, extra = elastic_args(["--elastic", *launcher_flags, *words])
    cmd, e = mpiexec_command(words, {**e, **extra})
    res = run_job(cmd, e, timeout)
    return res.returncode, res.output, res.timed_out, res.seconds


def _passed_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "PASSED" in ln]


def _check(args: list[str], survivors: int, env: dict[str, str] | None = None, nprocs: int = 4) -> str:
    rc, out, timed_out, secs = run_elastic(args, nprocs, env)
    tail = "\n".join(out.splitlines()[-80:])
    assert not timed_out, f"{args}: HUNG, killed after {secs:.0f} s\n{tail}"
    assert rc == 0, f"{args}: exit code {rc}\n{tail}"
    assert "FAIL" not in out, tail
    lines = _passed_lines(out)
    assert len(lines) == survivors, f"{args}: {len(lines)} ranks passed, expected {survivors}\n{tail}"
    assert all(int(ln.rsplit(" ", 1)[1]) > 30 for ln in lines), lines
    return out


needs_ulfm = pytest.mark.skipif(shutil.which("mpiexec") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "mpiexec")), reason="no mpiexec")


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("kill", [
    "native:2",      # inside MPI's own allreduce
    "async:1",       # an async allreduce on the communication thread, another queued behind it
    "shm:1",         # between two phases of a multi-chunk shm allreduce (the node barrier waits)
    "cma:2",         # inside a large shm allreduce's single-copy transfers: the others read and write its arrays
    "quick:3",       # the one-phase path of a repeated small shm allreduce
    "cross:1",       # a single-copy shm alltoall: the others read the victim's input (or wait in the last phase)
    "window:0",      # an alloc'd array's window path; rank 0 dies
    "broadcast:2",   # a ring broadcast (a leaf may finish first: it raises at its next call)
    "check:1",       # the cross-rank check, before any data moves
    "p2p:2",         # a receive from the rank that died
    "p2p-send:1",    # a large send to a rank that dies as the data arrives (no "Send error after request freed")
    "barrier:0",     # rank 0 dies before a barrier
    "agree:1",       # the others in comm.agree() while one survivor recovers from a failed recv: all raise
])
def test_kill_one_rank_survivors_shrink_and_compute(kill: str) -> None:
    _check(["--kill", kill], survivors=3)


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
def test_kill_mid_shm_phase_while_spinning_on_flags() -> None:
    """Flag waits (COLLECTIVE_SHM_WAIT=spin) see no MPI error: the peer watch must notice the dead rank."""
    _check(["--kill", "shm:2"], survivors=3, env={"COLLECTIVE_SHM_WAIT": "spin"})


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
def test_a_second_rank_dies_while_shrink_builds_the_survivors_communicator() -> None:
    """Job rank 3 dies in an allreduce; job rank 1 dies inside comm.shrink() (while the survivors' communicator is
    built): the two left get a working communicator of 2 from that same shrink()."""
    _check(["--kill", "native:3", "--die-in-shrink", "1"], survivors=2)


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("end,status", [("exception", 1), ("exit", 5)])
def test_after_a_recovery_the_exit_status_is_the_programs(end: str, status: int) -> None:
    """Survivors end without MPI_Finalize after a recovery: an uncaught exception (COLLECTIVE_ABORT_ON_EXCEPTION=0)
    still ends them with status 1, and the builtin exit(5) with 5."""
    rc, out, timed_out, secs = run_elastic(["--kill", "native:3", "--end", end], 4,
                                           env={"COLLECTIVE_ABORT_ON_EXCEPTION": "0"})
    tail = "\n".join(out.splitlines()[-40:])
    assert not timed_out, f"HUNG, killed after {secs:.0f} s\n{tail}"
    assert "FAIL" not in out and len(_passed_lines(out)) == 3, tail
    assert rc == status, f"exit code {rc}, expected {status}\n{tail}"


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
def test_two_failures_in_a_row_then_grow_back(tmp_path) -> None:
    """4 ranks lose rank 3 (native), then rank 0 (shm, mid-phase); 2 left grow back to 4 and compute correctly."""
    times = tmp_path / "times.json"
    out = _check(["--kill", "native:3", "--kill", "shm:0", "--grow", "--times", str(times)], survivors=4,
                 env={"COLLECTIVE_MAX_RANKS": "4"})
    assert sum("replacement PASSED" in ln for ln in _passed_lines(out)) == 2, out[-3000:]
    rec = json.loads(times.read_text())
    assert [r.get("victim") for r in rec[:2]] == [3, 0]
    assert all(r["total"] > 0 and r["shrink"] >= 0 for r in rec[:2])
    assert rec[2]["grow"] > 0


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
def test_elastic_without_ulfm_is_refused() -> None:
    """COLLECTIVE_ELASTIC=1 under a plain mpiexec (no --with-ft ulfm): init refuses on every rank, clearly."""
    rc, out, timed_out, _ = run_elastic([], 2, env={"COLLECTIVE_ELASTIC": "1"}, elastic=False, timeout=200)
    assert not timed_out, out[-3000:]
    assert rc != 0
    assert "COLLECTIVE_ELASTIC=1, but the job was not launched with fault tolerance" in out, out[-3000:]
    assert "collective-run --elastic" in out


@needs_ulfm
@pytest.mark.timeout(TIMEOUT + 60)
def test_grow_without_free_slots_is_refused_clearly() -> None:
    """Every slot taken (no --oversubscribe, one rank per core): MPI cannot spawn; every rank raises, none hangs."""
    cores = os.cpu_count() or 1
    _, out, timed_out, _ = run_elastic([], cores, elastic=True, timeout=200, job="elastic_grow_refused.py",
                                           oversubscribe=False)
    assert not timed_out, out[-3000:]
    assert "FAIL" not in out, out[-3000:]
    refused = [ln for ln in out.splitlines() if ln.startswith("refused on rank")]
    assert len(refused) == cores, out[-3000:]
    assert all("MPI could not spawn 1 process" in ln and "--oversubscribe" in ln for ln in refused), refused


def test_elastic_args() -> None:
    args, env = elastic_args(["--elastic", "--min-ranks", "2", "--max-ranks=6", "-n", "4", "python", "t.py",
                              "--elastic"])
    assert args[:2] == ["--with-ft", "ulfm"] and args[-4:] == ["4", "python", "t.py", "--elastic"]
    assert env == {"COLLECTIVE_ELASTIC": "1", "COLLECTIVE_MIN_RANKS": "2", "COLLECTIVE_MAX_RANKS": "6"}
    assert "-x" in args and "COLLECTIVE_MAX_RANKS" in args
    assert elastic_args(["-n", "2", "python", "--elastic"]) == (["-n", "2", "python", "--elastic"], {})
    for bad in (["--min-ranks", "2", "-n", "2", "p"], ["--elastic", "--min-ranks", "0", "p"],
                ["--elastic", "--min-ranks", "3", "--max-ranks", "2", "p"], ["--elastic", "--max-ranks"]):
        with pytest.raises(SystemExit):
            elastic_args(bad)


@pytest.mark.timeout(TIMEOUT + 60)
def test_emulated_cluster_loses_a_whole_host() -> None:
    """2 emulated hosts x 2 ranks: both ranks of host 1 die in a native allreduce; the 2 of host 0 continue."""
    from collective.emulate import unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(f"no emulated cluster here: {why}")
    e = dict(os.environ)
    e.setdefault("COLLECTIVE_TIMEOUT", "120")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "collective.run", "--emulate", "2x2", "--elastic", "--", sys.executable,
           str(JOBS / "elastic_core.py"), "--kill", "native:2+3"]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT, env=e, cwd=str(ROOT))
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"HUNG after {TIMEOUT} s: {str(exc.stdout)[-3000:]}") from None
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "FAIL" not in out, out[-4000:]
    assert len(_passed_lines(out)) == 2, out[-4000:]


def test_polling_waits_nap_and_watch_every_interval() -> None:
    """Elastic mode's request polling (no failure, no ULFM needed): a 200 ms wait naps instead of spinning and runs
    the peer watch about every 2 ms, the first one interval in."""
    from mpi_util import check, count_passed, mpirun

    res = mpirun("elastic_waits.py", 2, timeout=120)
    check(res, "elastic_waits")
    assert count_passed(res) == 3, res.output[-2000:]


def test_each_caller_gets_its_own_ranks_lost_error() -> None:
    """After a recovery every caller (several threads may raise it ``from`` their own exception) gets a new error
    with the same lost ranks; raise_lost chains it to the call's exception and lets other errors through."""
    from collective.errors import CollectiveValueError, RanksLostError
    from collective.ulfm import FailureState, raise_lost

    fs = FailureState(None, None, (0, 1, 2, 3), 1)
    fs.error = RanksLostError("allreduce", (2,), 3, where="allreduce on job rank 1 (rank 1 of 4)")
    a, b = fs.recover("allreduce", None), fs.recover("allreduce", None)
    assert a is not b and a is not fs.error
    assert a.lost_ranks == b.lost_ranks == (2,) and a.op == b.op == "allreduce" and a.survivors == 3
    assert "job rank 1 (rank 1 of 4)" in str(a) and fs.recover("barrier", None).op == "barrier"

    cause = OSError("MPI error")
    with pytest.raises(RanksLostError) as info:
        raise_lost(lambda op, exc, t: fs.recover(op, exc), "send", cause)
    assert info.value.__cause__ is cause and info.value.op == "send"
    other = CollectiveValueError("bad")
    raise_lost(lambda op, exc, t: None, "send", other)  # no sign of a failure: the caller re-raises
    raise_lost(None, "send", other)  # not elastic mode
    lost = fs.recover("recv", None)
    raise_lost(lambda op, exc, t: exc, "recv", lost)  # a RanksLostError already: re-raised as it is


def test_a_failed_recovery_raises_a_clear_error_on_every_later_call() -> None:
    """Once MPI_Comm_shrink failed, recovery cannot go on: every later call raises the same CollectiveError."""
    from collective.errors import CollectiveError, RanksLostError
    from collective.ulfm import FailureState

    fs = FailureState(None, None, (0, 1, 2), 0)
    fs.broken = CollectiveError("allreduce on job rank 0 (rank 0 of 3): a rank was lost, and MPI_Comm_shrink failed")
    for op in ("barrier", "shrink"):
        with pytest.raises(CollectiveError, match="MPI_Comm_shrink failed") as info:
            fs.recover(op, None)
        assert not isinstance(info.value, RanksLostError) and info.value is not fs.broken
