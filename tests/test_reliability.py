"""Nothing hangs, nothing is silently wrong: failure scenarios under real mpiexec, each under a hard timeout.

Every scenario that ends the job runs as its own job (an abort ends it); the
jobs run a few at a time. Each must end within COLLECTIVE_TIMEOUT + 15 s with a
non-zero exit and a message naming the rank, the op and what went wrong, and
leave no process behind (each job carries a unique marker that ``ps`` must no
longer show afterwards).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

from mpi_util import JobResult, check, count_passed, mpirun

TIMEOUT = 4  # COLLECTIVE_TIMEOUT inside the jobs
LIMIT = TIMEOUT + 15  # every failing job must be over by then
ALGS = ("ring", "tree", "star")


@dataclass
class Scenario:
    """One failing job: its arguments, environment, and the words its output must hold."""

    id: str
    args: list[str]
    words: list[str]
    env: dict[str, str] = field(default_factory=dict)
    nprocs: int = 3
    slow: bool = False  # a repeat that make test leaves to make test-full


SCENARIOS = [
    *[Scenario(f"sigkill-{a}", ["sigkill", "--algorithm", a],
               ["process rank 1", "signal 9", "rank 1: dying (sigkill) during #", f"algorithm {a}"]) for a in ALGS],
    *[Scenario(f"exit1-{a}", ["exit1", "--algorithm", a],
               ["exited with non-zero status", "Exit code:    1", "rank 1: dying (exit1) during #", f"algorithm {a}"])
      for a in ALGS],
    *[Scenario(f"raise-{a}", ["raise", "--algorithm", a],
               ["rank 1 of 3 died of an uncaught exception", "RuntimeError: boom", "rank 0: in #5 allreduce",
                "flight recorder"]) for a in ALGS],
    *[Scenario(f"sysexit-{a}", ["sysexit", "--algorithm", a],
               ["#5 allreduce shape (1000,) float32 algorithm " + a, "cannot finish: rank 1 exited",
                "still waiting for rank 1"]) for a in ALGS],
    Scenario("nojoin-checked", ["nojoin", "--algorithm", "ring"],
             ["#5 allreduce shape (1000,) float32 algorithm ring timed out after", f"COLLECTIVE_TIMEOUT={TIMEOUT}",
              "still waiting for rank 1, which has not entered #5", "rank 1: has not entered #5",
              "flight recorder, as rank", "has been stalled for", "COLLECTIVE_STALL_WARN=1"],
             env={"COLLECTIVE_STALL_WARN": "1"}),
    *[Scenario(f"nojoin-unchecked-{a}", ["nojoin", "--algorithm", a] + (["--async"] if a == "tree" else []),
               [f"#5 allreduce shape (1000,) float32 algorithm {a} timed out after", "still waiting for rank 1",
                "in the current step of " + a], env={"COLLECTIVE_CHECK": "0"}) for a in ALGS],
    # shm with its phases waiting on flags (forced: on 2 cores auto waits in MPI's barrier at P=3): the watchdog
    # still ends the job while a rank spins, and the flags tell which rank it waits for.
    Scenario("sigkill-shm-spin", ["sigkill", "--algorithm", "shm"],
             ["process rank 1", "signal 9", "rank 1: dying (sigkill) during #", "algorithm shm"],
             env={"COLLECTIVE_SHM_WAIT": "spin"}),
    Scenario("sysexit-shm-spin", ["sysexit", "--algorithm", "shm"],
             ["#5 allreduce shape (1000,) float32 algorithm shm cannot finish: rank 1 exited",
              "is waiting for rank 1 in the current step of shm"], env={"COLLECTIVE_SHM_WAIT": "spin"}),
    Scenario("nojoin-shm-spin", ["nojoin", "--algorithm", "shm"],
             ["#5 allreduce shape (1000,) float32 algorithm shm timed out after", f"COLLECTIVE_TIMEOUT={TIMEOUT}",
              "is waiting for rank 1 in the current step of shm", "rank 1: has not entered #5"],
             env={"COLLECTIVE_SHM_WAIT": "spin"}),
    # An op that fails on one rank alone after the check breaks the communicator there: the rank's next call
    # raises at once instead of standing in for the call it left (the others still wait in that one).
    *[Scenario(f"midcall-{a}", ["midcall", "--algorithm", a],
               ["rank 1: the first call raised MemoryError (injected", "rank 1: the next call raised CollectiveError "
                "at once", f"this communicator is broken: its op #11 allreduce shape ({n},) float32 algorithm {a}",
                "raised MemoryError on this rank", "broken: True", "rank 1: the repeated small allreduce raised at "
                "once", "rank 1: the repeated alltoall raised at once",
                f"#11 allreduce shape ({n},) float32 algorithm {a} timed out after"])
      for a, n in (("ring", 1000), ("shm", 3 << 20))],
    # The same with async calls: the one queued behind the failed one raises at once as well (with the check off,
    # a queued shm call that ran would hand the others its bytes as the failed call's, and they would return).
    *[Scenario(f"queued-{a}", ["queued", "--algorithm", a],
               ["rank 1: the first call raised MemoryError (injected", "rank 1: the queued call raised CollectiveError "
                "at once", f"this communicator is broken: its op #5 allreduce shape ({n},) float32 algorithm {a}",
                "broken: True", f"#5 allreduce shape ({n},) float32 algorithm {a} timed out after"],
               env={"COLLECTIVE_CHECK": "0"})
      for a, n in (("ring", 1000), ("shm", 3 << 20))],
    Scenario("mismatch-uncaught", ["mismatch", "--algorithm", "ring"],
             ["CollectiveMismatchError", "rank 1: float64 (1001,); ranks 0 and 2: float32 (1000,)",
              "died of an uncaught exception"]),
    # Abort reliability: the abort path, ten times over (make test: three times, once per algorithm).
    *[Scenario(f"abort-repeat-{i}", ["raise", "--algorithm", ALGS[i % 3]],
               ["rank 1 of 3 died of an uncaught exception", "MPI_ABORT was invoked on rank 1"],
               slow=i >= len(ALGS)) for i in range(10)],
]


def _orphans(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [ln.strip() for ln in out.splitlines() if marker in ln and "ps -eo" not in ln]


def _run(sc: Scenario) -> tuple[JobResult, list[str]]:
    marker = f"reltest-{sc.id}-{uuid.uuid4().hex[:10]}"
    env = {"COLLECTIVE_TIMEOUT": str(TIMEOUT), **sc.env}
    res = mpirun("reliability_fail.py", sc.nprocs, sc.args + ["--marker", marker], timeout=LIMIT + 60, env=env)
    res.ended = time.time()  # type: ignore[attr-defined]
    left: list[str] = []
    for _ in range(20):  # processes killed by the launcher may take a moment to be reaped
        left = _orphans(marker)
        if not left:
            break
        time.sleep(0.25)
    for ln in left:  # never leave them to the next test
        try:
            os.kill(int(ln.split()[0]), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    return res, left


@pytest.fixture(scope="module")
def launched(request: pytest.FixtureRequest) -> dict[str, Future]:
    """Start every selected scenario's job up front, three at a time; each test waits for its own."""
    wanted = {it.callspec.params["sc"].id for it in request.session.items
              if it.module is request.module and hasattr(it, "callspec") and "sc" in it.callspec.params}
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {sc.id: pool.submit(_run, sc) for sc in SCENARIOS if sc.id in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("sc", [pytest.param(s, marks=pytest.mark.slow) if s.slow else s for s in SCENARIOS],
                         ids=[s.id for s in SCENARIOS])
def test_failure_ends_the_job(sc: Scenario, launched: dict[str, Future]) -> None:
    """A non-zero exit within COLLECTIVE_TIMEOUT + 15 s, a message naming rank, op and cause, no orphans."""
    res, left = launched[sc.id].result()
    tail = "\n".join(res.output.splitlines()[-50:])
    assert not res.timed_out, f"{sc.id}: HUNG (killed after {res.seconds:.0f} s)\n{tail}"
    assert res.returncode != 0, f"{sc.id}: exit code 0\n{tail}"
    # From the moment every rank was ready (imports and init done: slow on a loaded machine) to the job's end.
    ready = [float(m) for m in re.findall(r"ready for scenario \S+ with algorithm \S+ at ([0-9.]+)", res.output)]
    assert ready, f"{sc.id}: no rank got ready\n{tail}"
    took = res.ended - max(ready)  # type: ignore[attr-defined]
    assert took <= LIMIT, f"{sc.id}: took {took:.1f} s > {LIMIT} s after every rank was ready\n{tail}"
    missing = [w for w in sc.words if w not in res.output]
    assert not missing, f"{sc.id}: output lacks {missing}\n{tail}"
    assert not left, f"{sc.id}: processes left behind: {left}"


def test_mismatches_and_bad_arguments_raise_everywhere() -> None:
    """Shape, dtype, op, root, algorithm, call-order mismatches and one-rank bad arguments, per algorithm (P=3)."""
    res = mpirun("reliability_mismatch.py", 3, timeout=150, env={"COLLECTIVE_TIMEOUT": "20"})
    check(res, "mismatch cases at P=3")
    assert count_passed(res) >= 60


def test_detail_mode_and_nan_report() -> None:
    """COLLECTIVE_DEBUG=DETAIL gives the same verdicts; COLLECTIVE_NAN_CHECK=1 names the rank and op (P=2)."""
    res = mpirun("reliability_mismatch.py", 2, timeout=150,
                 env={"COLLECTIVE_TIMEOUT": "20", "COLLECTIVE_DEBUG": "DETAIL", "COLLECTIVE_NAN_CHECK": "1"})
    check(res, "mismatch cases at P=2 in DETAIL mode")
    assert count_passed(res) >= 60
    assert "collective: rank 1 of 2: COLLECTIVE_NAN_CHECK: the input of #" in res.output
    assert "holds 1 NaN and 2 Inf (first at flat element 1)" in res.output


# ------------------------------------------------------------------ no MPI job needed
def test_one_rank_checks_nothing() -> None:
    """At P == 1 there is no fingerprint exchange and no watchdog thread."""
    import collective as col

    c = col.Communicator()
    assert not c.checking and not c.watchdog.running
    assert (c.allreduce(np.ones(3)) == 1).all()


def test_mismatch_message_groups_ranks_by_value() -> None:
    from collective.fingerprint import mismatch_message, rank_list

    assert rank_list([1]) == "rank 1" and rank_list([0, 2]) == "ranks 0 and 2"
    assert rank_list([0, 1, 2, 3, 5]) == "ranks 0-3 and 5"
    recs = [["allreduce", "sum", "float32", "(65536,)", "-", "ring", "MainThread", "#7", ""] for _ in range(3)]
    recs[1] = ["allreduce", "sum", "float64", "(65537,)", "-", "ring", "MainThread", "#7", ""]
    msg = mismatch_message(2, 3, recs)
    assert "(dtype, shape differ): rank 1: float64 (65537,); ranks 0 and 2: float32 (65536,)" in msg
    assert msg.startswith("allreduce #7 on rank 2 of 3")
    recs[1] = ["allreduce", "-", "-", "-", "-", "-", "MainThread", "#7", "CollectiveValueError: unknown op 'x'"]
    msg = mismatch_message(0, 3, recs)
    assert "rank 1 rejected its arguments (CollectiveValueError: unknown op 'x')" in msg
    recs = [["allreduce", "sum", "float32", "(4,)", "-", "ring", name, "#3", ""]
            for name in ("Thread-1 (work)", "Thread-2 (work)", "Thread-1 (work)")]
    msg = mismatch_message(1, 3, recs)
    assert "(thread differs): rank 1: thread 'Thread-2 (work)'; ranks 0 and 2: thread 'Thread-1 (work)'" in msg, msg
    assert "give each thread its own communicator" in msg and "from thread 'Thread-2 (work)'" in msg, msg


def test_fingerprint_hash_is_the_same_in_every_process() -> None:
    """The signature hash must not depend on Python's per-process str hash salt."""
    import sys

    code = ("import numpy as np; from collective.fingerprint import Fingerprints as F; f = F.__new__(F); f._static = {}; "
            "print(f._signature('allreduce', 'ring', 'sum', np.dtype('float32'), (4,), None)[0])")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(env, PYTHONHASHSEED=str(s))).stdout for s in (1, 2)}
    assert len(outs) == 1 and outs.pop().strip().isdigit()


def test_flight_recorder_keeps_the_last_n_and_summarises_older_ones() -> None:
    from collective.sequencer import FlightRecorder
    from collective.watchdog import Watchdog

    class Status:
        recorder = FlightRecorder(30)
        pending = 0

        def waiting_on(self) -> None:
            return None

    st = Status()
    wd = Watchdog(0, 1, timeout=5, status=st)
    for i in range(1, 41):
        rec = st.recorder.begin(i, "allreduce" if i % 2 else "broadcast", (4,), np.dtype("float32"), "ring",
                                0 if i % 2 == 0 else None)
        st.recorder.end(rec)
    lines = wd.trace_lines()
    assert "last 30 ops" in lines[0] and "COLLECTIVE_TRACE_BUFFER=30" in lines[0]
    assert any("5 x allreduce shape (4,) float32 algorithm ring (#11..#19)" in ln for ln in lines), lines
    assert lines[-1].startswith("  #40 broadcast shape (4,) float32 algorithm ring root 0")
    assert [r.seq for r in st.recorder.records()] == list(range(11, 41))
    # A scatter off its root records no shape or dtype (the root's rows define them): its line still prints.
    st.recorder.end(st.recorder.begin(41, "scatter", None, None, "auto", 0))
    assert wd.trace_lines()[-1].startswith("  #41 scatter shape - - algorithm auto root 0"), wd.trace_lines()[-1]


def test_deadline_aborts_a_blocked_call() -> None:
    """``deadline`` ends the process (MPI_Abort) with a message when the block overruns; passes otherwise."""
    import sys

    from collective.watchdog import deadline

    with deadline("quick", 30):
        pass
    code = "import time; from collective.watchdog import deadline\nwith deadline('init: test', 0.5): time.sleep(30)"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0 and time.monotonic() - t0 < 20
    assert "init: test did not finish within 0.5 s" in p.stderr, p.stderr
