"""The torch.distributed backend "collective" under real mpiexec (P = 2 and 3), and torch's own suite's fast subset."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from mpi_util import JobResult, check, count_passed, mpirun

# torch's rendezvous variables must be absent: the backend takes rank and size from MPI.
_ENV = {"COLLECTIVE_TIMEOUT": "60"}


@pytest.mark.parametrize("nprocs", [2, 3])
def test_dist_calls_ddp_fsdp2_and_mismatch(nprocs: int) -> None:
    """Every call, op, dtype and async form; DDP and FSDP2 against the reference; mismatches: one job per P
    (each rank imports torch once)."""
    res = mpirun("torch_backend.py", nprocs, ["--only", "calls,ddp,fsdp,mismatch"], timeout=400, env=_ENV)
    check(res, f"torch backend calls, DDP/FSDP2 and mismatches at P={nprocs}")
    assert count_passed(res) >= 33  # 20 call cases, 6 DDP/FSDP2 cases and 7 mismatch cases


# A fast, representative subset of torch's own DistributedTest suite (imported from the installed wheel by
# tests/torch_suite_runner.py), each of which gloo passes under the same runner. The suite gates many tests on
# the backend's name (gloo, nccl, mpi), so the subset runs with the gates seeing "gloo" (--gates-as gloo).
# The whole suite:
#   python tests/torch_suite_runner.py --backend collective --np 2 [--gates-as gloo]
SUITE_SUBSET = [
    "test_get_rank", "test_get_rank_size_group", "test_barrier", "test_broadcast", "test_reduce_sum", "test_reduce_max",
    "test_all_reduce_sum", "test_all_reduce_product", "test_all_reduce_min", "test_all_reduce_sum_async",
    "test_all_reduce_sum_complex", "test_all_reduce_complex_unsupported_ops", "test_all_reduce_coalesced_sum",
    "test_all_gather", "test_all_gather_complex", "test_all_gather_coalesced_simple",
    "test_all_gather_object_default_pg", "test_get_future", "test_DistributedDataParallelCPU",
    "test_DistributedDataParallelCPU_grad_is_view", "test_accumulate_gradients_no_sync_allreduce_with_then_hook",
    "test_ddp_create_graph", "test_static_graph_api_cpu", "test_gather", "test_scatter_complex",
    "test_scatter_object_list", "test_send_recv_with_tag", "test_send_recv_any_source", "test_isend", "test_irecv",
    "test_batch_isend_irecv_gloo_tags", "test_sparse_all_reduce_sum", "test_grads_same_across_ranks_with_no_sync",
    "test_monitored_barrier_gloo", "test_monitored_barrier_gloo_subgroup", "test_monitored_barrier_gloo_rank_0_timeout",
    "test_barrier_timeout_full_group",
]


def test_torch_suite_subset_p2() -> None:
    pytest.importorskip("expecttest")  # torch's testing helpers import it
    import torch_suite_runner

    res = torch_suite_runner.run("collective", 2, SUITE_SUBSET, timeout=240, env=_ENV, gates_as="gloo")
    bad = {k: v for k, v in res.items() if v[0] != "pass"}
    assert not bad and len(res) == len(SUITE_SUBSET), bad


def test_torchrun_style_launch_raises_clearly(tmp_path) -> None:
    """Two processes started without MPI but with torchrun's variables: each MPI rank is alone, so both refuse."""
    import os
    import socket
    import subprocess
    import sys

    from mpi_util import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import torch.distributed as dist, collective.torch\n"
              "dist.init_process_group('collective')\n")
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_"))}
        env.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT), OMPI_MCA_btl_sm_backing_directory=str(tmp_path))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode != 0, out
        # collective.init() refuses first: torchrun's WORLD_SIZE says 2 processes, MPI sees one
        assert "WORLD_SIZE=2 says torchrun" in out and "each would run alone" in out, out[-2000:]


def test_destroy_process_group_closes_every_groups_communicator() -> None:
    res = mpirun("torch_lifecycle.py", 2, ["destroy"], timeout=300, env=_ENV)
    check(res, "torch process-group lifecycle at P=2")
    assert count_passed(res) == 4


@pytest.mark.parametrize("where,nprocs", [("world", 2), ("subgroup", 3)])
def test_group_timeout_ends_a_stall_and_names_the_torch_call(where: str, nprocs: int) -> None:
    """collective.init() ran first (COLLECTIVE_TIMEOUT=60); the group's timeout=3 s still ends the stall."""
    import re
    import time

    res = mpirun("torch_lifecycle.py", nprocs, ["stall", where], timeout=240, env=_ENV)
    ended = time.time()
    out = res.output
    assert not res.timed_out and res.returncode != 0, out[-3000:]
    assert "STALL NOT ENDED" not in out, out[-3000:]
    start = float(re.search(r"STALL START ([0-9.]+)", out).group(1))
    # The deadline is 3 s; the rest is the report, MPI_Abort and the launcher's teardown on a loaded machine.
    assert ended - start < 40, f"the stall ended {ended - start:.1f} s after it began (the group's timeout is 3 s)"
    group = "group '0' (default_pg)" if where == "world" else "group '1'"
    assert f"[all_reduce via torch.distributed, {group}] timed out after" in out, out[-3000:]
    assert "COLLECTIVE_TIMEOUT=3)" in out and "COLLECTIVE_TIMEOUT=60" not in out, out[-3000:]
    # The group has a timeout=, so the call raised on rank 0 (withdrawn: rank 1 never arrived), uncaught.
    assert "withdrawn on this rank" in out and "CollectiveTimeoutError" in out, out[-3000:]


def _mismatch_demo(backend: str, case: str) -> tuple[JobResult, dict[int, str]]:
    """examples/torch_mismatch.py launched by collective-run at P=2; each rank's lines."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from mpi_util import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env.update(PYTHONPATH=str(ROOT), COLLECTIVE_TIMEOUT="60")
    backing = tempfile.mkdtemp(prefix="collective-job-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    env["OMPI_MCA_btl_sm_backing_directory"] = backing
    try:
        p = subprocess.run([sys.executable, "-m", "collective.run", "-n", "2", "--", sys.executable,
                            str(ROOT / "examples" / "torch_mismatch.py"), "--backend", backend, "--case", case],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        shutil.rmtree(backing, ignore_errors=True)
    out = p.stdout + p.stderr
    lines: dict[int, str] = {0: "", 1: ""}
    for ln in out.splitlines():
        for r in (0, 1):
            if ln.startswith(f"rank {r}: "):
                lines[r] += ln + "\n"
    return JobResult(p.returncode, out, False, 0.0), lines


def test_mismatches_raise_on_every_rank_where_gloo_hangs_or_is_wrong() -> None:
    """The side-by-side of the PyTorch guide: on "collective" every rank raises at once, for every case."""
    import re

    res, lines = _mismatch_demo("collective", "all")
    assert res.returncode == 0, res.output[-3000:]
    for r in (0, 1):
        for case, what in (("size", "shape differs"), ("dtype", "dtype differs"), ("op", "op differs"),
                           ("collective", "collective, op, root, algorithm differ")):
            m = re.search(rf"rank {r}: {case}: collective raised CollectiveMismatchError after ([0-9.]+) s: "
                          rf".*the ranks' calls do not match \({re.escape(what)}\)", lines[r])
            assert m and float(m.group(1)) < 10, lines[r]
    # gloo, same calls: a different op is silently wrong (neither the sum nor the max) ...
    res, lines = _mismatch_demo("gloo", "op")
    assert res.returncode == 0, res.output[-3000:]
    assert all("op: gloo returned [3.0, 3.0, 2.0, 2.0]" in lines[r] for r in (0, 1)), lines
    # ... and different collectives wait until the group's 10 s timeout
    res, lines = _mismatch_demo("gloo", "collective")
    waited = [float(x) for x in re.findall(r"gloo raised \w+ after ([0-9.]+) s", lines[0] + lines[1])]
    assert res.returncode != 0 and waited and max(waited) >= 9.5, res.output[-3000:]


@pytest.mark.parametrize("mode", ["same", "reversed"])
def test_collective_group_under_a_gloo_world_needs_mpi_ranks(mode: str) -> None:
    """new_group(backend="collective") is made of torch's global ranks: they must be MPI's, or it refuses."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = mpirun("torch_gloo_world.py", 2, [str(port), mode], timeout=240, env=_ENV)
    if mode == "same":
        check(res, "a collective group under a gloo world")
        assert res.output.count("OK ") == 2, res.output[-3000:]
    else:
        assert res.output.count("REFUSED ") == 2, res.output[-3000:]
        assert "torch's default group (backend 'gloo') says rank 1 of world size 2, but MPI says rank 0 of 2" \
            in res.output, res.output[-3000:]
