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
