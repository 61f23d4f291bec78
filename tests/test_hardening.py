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
