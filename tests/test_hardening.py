"""Hardening: default deadlines, fork after init, huge messages, small /dev/shm, freeing alloc'd arrays (real mpiexec)."""
from __future__ import annotations

import pytest
from mpi_util import check, count_passed, mpirun

pytestmark = pytest.mark.mpi

_NO_TIMEOUT = {0: {"COLLECTIVE_TIMEOUT": None}, 1: {"COLLECTIVE_TIMEOUT": None}}


def test_default_deadline_outlasts_a_busy_rank_and_says_it_is_alive() -> None:
    res = mpirun("hardening.py", 2, ["busy_rank", "6"], timeout=120, rank_env=_NO_TIMEOUT,
                 env={"COLLECTIVE_STALL_WARN": "2"})
    check(res, "rank 0 busy for 6 s under the default deadline")
    assert count_passed(res) == 1 and res.output.count("PASSED") == 2, res.output
    assert "rank 0 is alive and busy outside this collective" in res.output, res.output
    assert "COLLECTIVE_TIMEOUT=1800" in res.output, res.output


def test_default_deadline_ends_fast_when_a_rank_is_gone() -> None:
    res = mpirun("hardening.py", 2, ["gone_rank"], timeout=120, rank_env=_NO_TIMEOUT)
    assert not res.timed_out and res.returncode != 0, res.output
    assert "rank 1 exited" in res.output, res.output
    assert res.seconds < 40, res.seconds


def test_infinite_timeout_runs_alloc_free_subgroup_close() -> None:
    res = mpirun("hardening.py", 2, ["no_deadline"], timeout=120, env={"COLLECTIVE_TIMEOUT": "inf"})
    check(res, "alloc, free, subgroup, split and close with COLLECTIVE_TIMEOUT=inf")
    assert res.output.count("PASSED 1") == 2, res.output
    assert "OverflowError" not in res.output, res.output


@pytest.mark.parametrize("nprocs", [2, 3])
def test_native_collectives_in_pieces_past_the_count_limit(nprocs: int) -> None:
    res = mpirun("hardening.py", nprocs, ["native_pieces"], timeout=120)
    check(res, f"native collectives in pieces at P={nprocs}")
    assert count_passed(res) == 6


@pytest.mark.slow
def test_native_allreduce_of_2_31_plus_7_uint8() -> None:
    # Two ranks hold 2 GiB in, 2 GiB out each, plus MPI's own buffers: about 10 GiB in all, a few minutes.
    res = mpirun("hardening.py", 2, ["huge"], timeout=600, env={"COLLECTIVE_TIMEOUT": "600"})
    check(res, "a 2**31 + 7-element uint8 native allreduce")
    assert res.output.count("PASSED 1") == 2


def test_forked_children_end_without_mpi_finalization() -> None:
    res = mpirun("hardening.py", 2, ["fork_child"], timeout=180)
    check(res, "children forked after init")
    assert res.output.count("PASSED 1") == 2, res.output
    assert "exited (its program ended)" not in res.output


def _private_job(nprocs: int, size: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    import os
    import sys

    from mpi_util import JOBS, ROOT, can_private_shm, run_with_private_shm

    if not can_private_shm():
        pytest.skip("a private /dev/shm needs root and unshare")
    e = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_btl_sm_backing_directory"}
    e.update({"PYTHONPATH": str(ROOT), "COLLECTIVE_TIMEOUT": "120", "OMPI_MCA_mpi_yield_when_idle": "1"}, **(env or {}))
    cmd = [sys.executable, "-m", "collective.run", "-n", str(nprocs), "--oversubscribe", sys.executable,
           str(JOBS / "hardening.py"), *args]
    res, _ = run_with_private_shm(cmd, e, timeout, size=size)
    return res, res.stdout + res.stderr


@pytest.mark.parametrize("nprocs, size, alloc_mib, ar_mib", [(2, "20m", 8, 64), (8, "64m", 1, 16), (2, "32m", 64, 8)])
def test_small_dev_shm_works_or_says_what_to_do(nprocs: int, size: str, alloc_mib: int, ar_mib: int) -> None:
    res, out = _private_job(nprocs, size, ["small_shm", str(alloc_mib), str(ar_mib)])
    assert res.returncode == 0, out[-6000:]
    assert "Bus error" not in out and "MPI_ERR" not in out, out[-6000:]
    assert out.count("PASSED 1") == nprocs, out[-6000:]
    if alloc_mib * nprocs > int(size[:-1]) // 2:  # cannot fit next to the arena and MPI's own buffers
        assert out.count("ALLOC REFUSED") == nprocs, out[-6000:]
        assert "docker run --shm-size=" in out and "needs" in out and "free of" in out, out[-6000:]


def test_alloc_free_rounds_keep_dev_shm_flat() -> None:
    res, out = _private_job(2, "128m", ["free_rounds"])
    assert res.returncode == 0, out[-6000:]
    assert out.count("PASSED 3") == 2, out[-6000:]


def test_dev_shm_too_small_for_any_arena() -> None:
    res, out = _private_job(2, "1m", ["tiny_shm"], timeout=120)
    assert "Bus error" not in out and "MPI_ERR" not in out, out[-6000:]
    assert "needs 2.0 MiB of shared memory; found 1.0 MiB free of 1.0 MiB in /dev/shm" in out, out[-6000:]
    assert "docker run --shm-size=" in out, out[-6000:]
    if "INIT REFUSED" not in out:  # the communicator made the arena optional: it ran on without shm
        assert res.returncode == 0 and out.count("PASSED 1") == 2 and out.count("SHM REFUSED") == 4, out[-6000:]


def test_auto_needs_no_window_where_shm_cannot_run() -> None:
    import numpy as np

    from collective.choose import Chooser
    from collective.topologies.cluster import Cluster

    cl = Cluster.from_node_size(4, 4)
    for ok, want in ((True, "shm"), (False, "native")):
        ch = Chooser(cl, 0, 4, 4, True, None, lambda: False, shm_ok=lambda ok=ok: ok)
        assert ch.auto("allreduce", 64 << 20, np.dtype(np.float32)) == want
        assert ch.auto("broadcast", 64 << 20, np.dtype(np.float32)) == want
