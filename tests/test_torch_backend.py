"""The torch.distributed backend "collective" under real mpiexec (P = 2 and 3), and torch's own suite's fast subset."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from mpi_util import check, count_passed, mpirun

# torch's rendezvous variables must be absent: the backend takes rank and size from MPI.
_ENV = {"COLLECTIVE_TIMEOUT": "60"}


@pytest.mark.parametrize("nprocs", [2, 3])
def test_dist_calls_ddp_fsdp2_and_mismatch(nprocs: int) -> None:
    """Every call, op, dtype and async form; DDP and FSDP2 against the reference; mismatches: one job per P
    (each rank imports torch once)."""
    res = mpirun("torch_backend.py", nprocs, ["--only", "calls,ddp,fsdp,mismatch"], timeout=400, env=_ENV)
    check(res, f"torch backend calls, DDP/FSDP2 and mismatches at P={nprocs}")
    assert count_passed(res) >= 29  # 18 call cases, 6 DDP/FSDP2 cases and 5 mismatch cases


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
    "test_monitored_barrier_gloo_rank_0_timeout",
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
