"""collective-run runs scripts written for torchrun: torchrun's flags, and torchrun's environment on every rank.

The launches are real (collective-run -> mpiexec); a job started by torchrun itself is still refused.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from collective.run import TorchrunOptions, _nprocs, elastic_args, mpiexec_command, rank_env_command, torchrun_args

SCRIPT = os.path.join(os.path.dirname(__file__), "jobs", "torchrun_script.py")


def test_torchrun_flags_become_mpiexec_flags() -> None:
    py = sys.executable
    assert torchrun_args(["--nproc_per_node", "4", "train.py", "--lr", "1"]) == (
        ["-n", "4", "--", py, "train.py", "--lr", "1"], TorchrunOptions(nproc_per_node=4))
    args, opts = torchrun_args(["--nproc-per-node=2", "--nnodes=2", "--host", "a:2,b:2", "--master-port", "1234",
                                "-m", "pkg.train", "--epochs", "3"])
    assert args == ["-n", "4", "--map-by", "ppr:2:node", "--host", "a:2,b:2", "--", py, "-m", "pkg.train", "--epochs",
                    "3"]
    assert opts == TorchrunOptions(nproc_per_node=2, nnodes=2, master_port=1234, by_node=True)
    assert torchrun_args(["--standalone", "--nproc_per_node", "2", "--no_python", "./a.out", "x"])[0] == [
        "-n", "2", "--", "./a.out", "x"]
    assert torchrun_args(["--nnodes", "1:1", "--node_rank", "0", "--nproc_per_node", "cpu", "t.py"])[0] == [
        "-n", str(os.cpu_count()), "--", py, "t.py"]
    # mpiexec-style launches, and a program's own torchrun-like arguments, are left alone
    plain = ["-n", "2", "--mca", "btl", "self,sm", "python", "t.py", "--nproc_per_node", "3"]
    assert torchrun_args(plain) == (plain, None)


def test_one_split_serves_every_translation() -> None:
    """torchrun's, collective-run's own, horovodrun's and mpiexec's flags mixed: each read once, the program kept."""
    py = sys.executable
    line, extra = elastic_args(["--nproc_per_node", "2", "--elastic", "--min-ranks", "1", "train.py", "--elastic"])
    assert extra == {"COLLECTIVE_ELASTIC": "1", "COLLECTIVE_MIN_RANKS": "1"}
    assert line[-2:] == ["train.py", "--elastic"] and "--min-ranks" not in line and line.count("--elastic") == 1
    args, opts = torchrun_args(line)
    assert opts == TorchrunOptions(nproc_per_node=2)
    assert args[:2] == ["-n", "2"] and args[-4:] == ["--", py, "train.py", "--elastic"]
    assert args[2:-4] == ["--with-ft", "ulfm", "-x", "COLLECTIVE_ELASTIC", "-x", "COLLECTIVE_MIN_RANKS"]
    # MPICH-style and single-dash Open MPI options with values before the torchrun flags
    args, opts = torchrun_args(["-genv", "A", "1", "-host", "a,b", "--nproc_per_node", "2", "t.py", "--nnodes", "9"])
    assert opts == TorchrunOptions(nproc_per_node=2)
    assert args == ["-n", "2", "-genv", "A", "1", "-host", "a,b", "--", py, "t.py", "--nnodes", "9"]


def test_process_count_and_hosts_come_from_the_options_only() -> None:
    assert _nprocs(["--host", "a", "python", "t.py", "-n", "99"]) is None
    assert _nprocs(["-host", "a,b", "-n", "2", "python", "t.py", "-n", "99"]) == 2
    assert _nprocs(["-n", "1", "a", ":", "-n", "2", "b"]) == 1
    cmd, _ = mpiexec_command(["-n", "64", "python", "t.py", "--host", "x", "--oversubscribe"], env={})
    assert cmd[1] == "--oversubscribe", "the program's own --host/--oversubscribe are its own"
    for hosts in (["--host=a:32,b:32"], ["--hosts", "a:32,b:32"], ["-host", "a:32,b:32"], ["--hostfile=f"]):
        cmd, _ = mpiexec_command([*hosts, "-n", "64", "python", "t.py"], env={})
        assert "--oversubscribe" not in cmd, hosts
    cmd, _ = mpiexec_command(["-n", "1", "a", ":", "-n", "63", "b"], env={})
    assert cmd[1] == "--oversubscribe", "MPMD contexts add up"


def test_node_environment_only_where_collective_run_placed_the_ranks() -> None:
    line = ["--nproc_per_node", "2", "--nnodes", "2", "--host", "a:2,b:2"]
    args, opts = torchrun_args([*line, "t.py"])
    assert opts is not None and opts.by_node
    assert rank_env_command(args, opts, {})[args.index("--") + 4] == "2", "GROUP_RANK from rank // 2"
    args, opts = torchrun_args([*line, "--map-by", "node", "t.py"])
    assert opts is not None and not opts.by_node and "ppr:2:node" not in args
    out = rank_env_command(args, opts, {})
    assert out[args.index("--") + 4] == "0", "the user's own placement: the node of a rank is not known"


@pytest.mark.parametrize("args,message", [
    (["--nnodes", "2", "t.py"], "--nnodes 2 needs the hosts"),
    (["--nproc_per_node", "2", "-n", "2", "t.py"], "not both"),
    (["--nproc_per_node", "2", "--nnodes", "2", "--host", "a,b", "--node_rank", "1", "t.py"], "drop --node_rank"),
    (["--nnodes", "1:4", "t.py"], "elastic range"),
    (["--nproc_per_node", "0", "t.py"], "must be a whole number >= 1"),
    (["--nproc_per_node", "two", "t.py"], "must be a whole number >= 1"),
    (["--nproc_per_node", "2", "--rdzv-endpoint", "h:29400", "t.py"], "MPI's launcher is the rendezvous"),
    (["--nproc_per_node", "2", "--max_restarts", "3", "t.py"], "ends the MPI job"),
    (["--nproc_per_node", "2"], "no program given"),
    (["--nproc_per_node"], "needs a value"),
    (["--master_port", "1", "-n", "2", "python", "t.py"], "give --nproc_per_node N too"),
])
def test_torchrun_flags_that_cannot_work_exit_with_a_reason(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        torchrun_args(args)


def test_rank_environment_goes_where_a_double_dash_marks_the_program() -> None:
    out = rank_env_command(["-n", "2", "--host", "h1:2,h2:2", "--", "python", "x.py", ":", "-n", "1", "--", "y"], None,
                           {})
    sh = [i for i, a in enumerate(out) if a == "sh"]
    assert len(sh) == 2 and out[:5] == ["-n", "2", "--host", "h1:2,h2:2", "sh"] and "--" not in out
    # several hosts, nodes unknown: no GROUP_RANK; the first host and torchrun's default port for env://
    assert out[sh[0] + 3:sh[0] + 8] == ["collective-run", "0", "h1", "29500", ""] and out[sh[0] + 8:] [:2] == [
        "python", "x.py"]
    assert out[sh[1] - 3:sh[1]] == [":", "-n", "1"] and out[-1] == "y"
    one = rank_env_command(["-n", "2", "--", "python", "x.py"], TorchrunOptions(nproc_per_node=2),
                           {"MASTER_PORT": "4321"})
    assert one[one.index("collective-run") + 1:][:4] == ["1", "127.0.0.1", "4321", "1"]
    kept = rank_env_command(["-n", "2", "--", "python", "x.py"], TorchrunOptions(nproc_per_node=2),
                            {"OMP_NUM_THREADS": "4"})
    assert kept[kept.index("collective-run") + 4] == "", "a user's OMP_NUM_THREADS is kept"


@pytest.mark.parametrize("line,at", [
    (["-host", "a,b", "-n", "2", "python", "t.py"], 4),
    (["-ppn", "2", "-n", "4", "python", "t.py"], 4),
    (["-genv", "A", "1", "-n", "2", "python", "t.py"], 5),
    (["--cpus-per-proc", "2", "--oversubscribe", "-n", "2", "python", "t.py"], 5),
    (["-npernode", "2", "--mca", "btl", "self", "-n", "4", "python", "t.py"], 7),
])
def test_a_line_of_known_options_gets_the_environment_before_its_program(line: list[str], at: int) -> None:
    out = rank_env_command(line, None, {})
    assert out[:at] == line[:at] and out[at:at + 2] == ["sh", "-c"] and out[-2:] == ["python", "t.py"]


@pytest.mark.parametrize("line", [
    ["--some-new-flag", "v", "-n", "2", "python", "t.py"],
    ["-n", "2", "-xyz", "a,b", "python", "t.py"],
    ["-n", "2", "python", "t.py", ":", "-n", "1", "-zz", "w", "python", "u.py"],
])
def test_a_line_with_an_unknown_option_and_no_double_dash_passes_through_untouched(line: list[str], capsys) -> None:
    """An option collective-run does not know may take values: without --, where the program starts is unknown."""
    assert rank_env_command(line, None, {})[-2:] == line[-2:]
    if ":" not in line:
        assert rank_env_command(line, None, {}) == line
    err = capsys.readouterr().err
    assert "were not set" in err and "put -- right after mpiexec's options" in err


def _launch(argv: list[str], extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_")) and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                         "MASTER_PORT", "OMP_NUM_THREADS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["COLLECTIVE_TIMEOUT"] = "120"
    env.update(extra or {})
    backing = tempfile.mkdtemp(prefix="collective-job-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    env["OMPI_MCA_btl_sm_backing_directory"] = backing
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400, check=False)
    finally:
        shutil.rmtree(backing, ignore_errors=True)


def _seen(out: str) -> dict[int, dict[str, str]]:
    ranks = {}
    for line in out.splitlines():
        if line.startswith("TORCHRUN-ENV "):
            kv = dict(w.split("=", 1) for w in line.split()[1:])
            ranks[int(kv["RANK"])] = kv
    return ranks


@pytest.mark.parametrize("backend,nprocs", [("collective", 3), ("gloo", 2)])
def test_a_torchrun_script_runs_unchanged_under_collective_run(backend: str, nprocs: int) -> None:
    res = _launch([sys.executable, "-m", "collective.run", "--nproc_per_node", str(nprocs), SCRIPT, backend])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    seen = _seen(res.stdout)
    assert sorted(seen) == list(range(nprocs)), out[-4000:]
    ports = {kv["MASTER_PORT"] for kv in seen.values()}
    assert len(ports) == 1 and ports != {"None"}
    for r, kv in seen.items():
        assert kv["WORLD_SIZE"] == str(nprocs) and kv["LOCAL_RANK"] == str(r)
        assert kv["LOCAL_WORLD_SIZE"] == str(nprocs) and kv["GROUP_RANK"] == "0" == kv["NODE_RANK"]
        assert kv["GROUP_WORLD_SIZE"] == "1" and kv["ROLE_RANK"] == str(r) and kv["MASTER_ADDR"] == "127.0.0.1"
        assert kv["OMP_NUM_THREADS"] == "1"
        assert f"OK rank {r} of {nprocs} on {backend}" in res.stdout, out[-4000:]


def test_mpiexec_style_launch_sets_the_same_environment() -> None:
    res = _launch([sys.executable, "-m", "collective.run", "-n", "2", "--", sys.executable, SCRIPT, "collective"],
                  {"OMP_NUM_THREADS": "2"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    seen = _seen(res.stdout)
    assert sorted(seen) == [0, 1] and all(kv["LOCAL_RANK"] == str(r) for r, kv in seen.items())
    assert all(kv["OMP_NUM_THREADS"] == "2" for kv in seen.values()), "the user's setting is kept"
    # Without --, every option known (Open MPI's -host): the same environment, the line otherwise as given
    code = "import os; print('PLAIN', os.environ.get('RANK'), os.environ['OMPI_COMM_WORLD_RANK'])"
    res = _launch([sys.executable, "-m", "collective.run", "-host", "localhost:2", "-n", "2", sys.executable, "-c",
                   code])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert sorted(ln for ln in res.stdout.splitlines() if ln.startswith("PLAIN")) == [
        "PLAIN 0 0", "PLAIN 1 1"], out[-4000:]
    assert "put -- right after" not in res.stderr


def test_a_job_started_by_torchrun_itself_is_still_refused() -> None:
    """torchrun's processes are MPI singletons: each would train alone, so init_process_group("collective") refuses."""
    res = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
                   "collective"])
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    assert out.count("WORLD_SIZE=2 says torchrun") >= 1 and "each would run alone" in out, out[-4000:]
    assert "collective-run -n N" in out and "OK rank" not in out, out[-4000:]


def test_collective_run_command_keeps_mpiexec_options() -> None:
    args, _ = torchrun_args(["--nproc_per_node", "8", "--mca", "btl", "self,sm", "t.py"])
    cmd, _ = mpiexec_command(args, env={})
    assert cmd[1:] == ["--oversubscribe", "-n", "8", "--mca", "btl", "self,sm", "--", sys.executable, "t.py"] or \
        cmd[1:] == ["-n", "8", "--mca", "btl", "self,sm", "--", sys.executable, "t.py"]
