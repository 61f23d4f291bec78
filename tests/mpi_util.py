"""Launch real mpiexec jobs from pytest under a hard timeout, and report which rank failed and why."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from collective.run import mpiexec_command

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"


@dataclass
class JobResult:
    """What one mpiexec job did."""

    returncode: int
    output: str
    timed_out: bool
    seconds: float

    def failures(self) -> list[str]:
        """The lines in which a rank reported a failure."""
        return [ln for ln in self.output.splitlines() if "FAIL" in ln or "Traceback" in ln or "Error" in ln]


def private_backing_dir(env: dict[str, str]) -> str | None:
    """A fresh directory for one job's Open MPI shared-memory files (set in ``env``), or None without /dev/shm.

    A job killed on a timeout (SIGKILL to the whole session) leaves its
    ``sm_segment`` files behind; a later job whose id hashes to the same name
    would reuse the stale file, contents and all. Each job's own directory,
    removed when it ends, rules that out.
    """
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        return None
    path = tempfile.mkdtemp(prefix="collective-job-", dir="/dev/shm")
    env["OMPI_MCA_btl_sm_backing_directory"] = path
    return path


def can_private_shm() -> bool:
    """Whether :func:`run_with_private_shm` can give a command a /dev/shm of its own here (root and unshare)."""
    return bool(shutil.which("unshare")) and hasattr(os, "geteuid") and os.geteuid() == 0


def run_with_private_shm(cmd: list[str], env: dict[str, str], timeout: float,
                         size: str = "256m") -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run ``cmd`` with a /dev/shm of its own; return its result and the files it left there (None: not checkable).

    The command runs in a private mount namespace over a fresh tmpfs of
    ``size`` on /dev/shm (a small one stands for Docker's 64 MB default), so
    what it leaves there is its own, whatever other jobs on the machine create
    meanwhile. Without the rights for that (not root, no ``unshare``) it runs
    plainly and the files are None.
    """
    wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 99; "$@"; rc=$?; '
               'echo "@@SHM@@ $(ls -A /dev/shm | tr "\\n" " ")"; exit $rc', "sh", *cmd]
    if can_private_shm():
        res = subprocess.run(wrapped, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 99:
            marks = [ln for ln in res.stdout.splitlines() if ln.startswith("@@SHM@@")]
            left = marks[-1].split()[1:] if marks else None
            res.stdout = "\n".join(ln for ln in res.stdout.splitlines() if not ln.startswith("@@SHM@@"))
            return res, left
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout), None


def mpirun(script: str | Path, nprocs: int, args: list[str] | None = None, timeout: float = 120,
           env: dict[str, str] | None = None, python_args: list[str] | None = None,
           rank_env: dict[int, dict[str, str | None]] | None = None) -> JobResult:
    """Run ``python script args`` on ``nprocs`` ranks; kill the whole job at ``timeout`` seconds.

    ``rank_env`` sets (or, with None, unsets) variables on some ranks only, as
    a variable exported on one host would: consecutive ranks with the same
    settings form one MPMD app context (``-n k env VAR=v python ... : -n m python ...``).

    On timeout every process of the job gets SIGTERM then SIGKILL (the job runs in
    its own session), and the stacks of the Python ranks are dumped first via
    faulthandler (SIGUSR1), so a hang shows where each rank was.
    """

    script = Path(script)
    if not script.is_absolute():
        script = JOBS / script
    e = dict(os.environ)
    e.setdefault("COLLECTIVE_TIMEOUT", "60")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONFAULTHANDLER"] = "1"
    # Ranks may share one GPU: JAX would otherwise reserve 75 % of its memory in each of them.
    e.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if env:
        e.update(env)
    prog = [sys.executable, *(python_args or []), str(script), *(args or [])]
    cmd, e = mpiexec_command(["--oversubscribe", *_app_contexts(nprocs, prog, rank_env or {})], e)
    # Each job gets its own shared-memory directory (not pytest's, see conftest), unless the caller chose one.
    return run_job(cmd, e, timeout, private_shm=not (env and "OMPI_MCA_btl_sm_backing_directory" in env))


def run_job(cmd: list[str], env: dict[str, str], timeout: float, private_shm: bool = True) -> JobResult:
    """Run the MPI job ``cmd`` in a session of its own; kill it (stacks dumped first) at ``timeout`` seconds.

    ``private_shm``: the job's shared-memory files go to a directory of its own, removed afterwards.
    """
    import time

    e = dict(env)
    e["OMPI_MCA_mpi_yield_when_idle"] = "1"
    backing = private_backing_dir(e) if private_shm else None
    t0 = time.monotonic()
    timed_out = False
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, start_new_session=True,
                             cwd=str(ROOT))
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _dump_and_kill(p.pid)
        out, _ = p.communicate()
    finally:
        if backing is not None:
            shutil.rmtree(backing, ignore_errors=True)
    return JobResult(p.returncode, out.decode(errors="replace"), timed_out, time.monotonic() - t0)


def _app_contexts(nprocs: int, prog: list[str], rank_env: dict[int, dict[str, str | None]]) -> list[str]:
    """mpiexec's app contexts for ``nprocs`` ranks of ``prog``, ranks with their own variables run under ``env``."""
    out: list[str] = []
    r = 0
    while r < nprocs:
        mine = rank_env.get(r, {})
        k = r + 1
        while k < nprocs and rank_env.get(k, {}) == mine:
            k += 1
        # env's options (-u) must come before its assignments.
        pre = [a for n, v in sorted(mine.items()) if v is None for a in ("-u", n)]
        pre += [f"{n}={v}" for n, v in sorted(mine.items()) if v is not None]
        out += ([":"] if out else []) + ["-n", str(k - r), *(["env", *pre] if pre else []), *prog]
        r = k
    return out


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    kids = [int(x) for x in out.split()]
    return kids + [g for k in kids for g in _children(k)]


def _dump_and_kill(pid: int) -> None:
    import time

    for k in _children(pid):
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"python" in f.read():
                    os.kill(k, signal.SIGUSR1)  # faulthandler.register(SIGUSR1) in the job prints stacks
        except OSError:
            pass
    time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
        time.sleep(0.3)


def check(res: JobResult, what: str) -> None:
    """Fail the test with the ranks' complaints if the job failed or hung."""
    if res.timed_out or res.returncode != 0:
        lines = res.output.splitlines()
        fails = res.failures()
        head = "TIMED OUT" if res.timed_out else f"exit code {res.returncode}"
        msg = [f"{what}: {head} after {res.seconds:.1f} s"]
        if fails:
            msg.append("failures:\n  " + "\n  ".join(fails[:40]))
        msg.append("output tail:\n" + "\n".join(lines[-60:]))
        raise AssertionError("\n".join(msg))


def count_passed(res: JobResult) -> int:
    """The number of cases the job reported as passed (its 'PASSED n' line)."""
    m = re.findall(r"PASSED (\d+)", res.output)
    return int(m[-1]) if m else 0


def run_training(name: str, cmd: list[str], cwd: Path, buckets: dict[str, str], kills: str = "",
                 timeout: float = 420) -> tuple[int, str]:
    """Run a training launch line (collective-run ...) in its own session and /dev/shm directory, with the
    elastic test kill points ``kills``; (exit code, output). A launch still running at ``timeout`` is killed
    with its whole process group and fails the test."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1", COLLECTIVE_TIMEOUT="120", **buckets)
    env.pop("COLLECTIVE_ELASTIC_TEST_KILL", None)
    if kills:
        env["COLLECTIVE_ELASTIC_TEST_KILL"] = kills
    backing = private_backing_dir(env)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                         start_new_session=True)
    try:
        text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        text, _ = p.communicate()
        raise AssertionError(f"{name}: no end after {timeout} s:\n{text.decode(errors='replace')[-4000:]}") from None
    finally:
        if backing is not None:
            shutil.rmtree(backing, ignore_errors=True)
    return p.returncode, text.decode(errors="replace")



def elastic_available() -> bool:
    """The runtime has elastic mode (comm.shrink over ULFM): for the elastic tests' skip marks."""
    from collective import errors
    from collective.communicator import Communicator

    return hasattr(errors, "RanksLostError") and hasattr(Communicator, "shrink")


def can_grow() -> bool:
    """The runtime can also grow a communicator back (comm.grow)."""
    from collective.communicator import Communicator

    return elastic_available() and hasattr(Communicator, "grow")
