"""The in/out Schedules (alltoall, gather, scatter, allgatherv) run by the Executor over real MPI, against NumPy."""
from __future__ import annotations

import pytest
from mpi_util import check, count_passed, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5, 8])
def test_every_in_out_schedule_dtype_size_root(nprocs: int) -> None:
    """pairwise and Bruck alltoall(v), binomial gather/scatter at several roots, ring allgatherv; five dtypes;
    empty, one-element, fewer-than-ranks, uneven and (P <= 4) few-MiB sizes; inputs untouched."""
    args = ["--large"] if nprocs <= 4 else []
    res = mpirun("schedules_io.py", nprocs, args, timeout=300)
    check(res, f"in/out schedules at P={nprocs}")
    assert count_passed(res) > 150


@pytest.mark.parametrize("nprocs", [3, 4])
def test_in_out_schedules_in_tiny_segments(nprocs: int) -> None:
    """24-byte segments: every transfer is many messages, tags counted per channel across buffers."""
    res = mpirun("schedules_io.py", nprocs, ["--segment", "24", "--dtypes", "int8,float16,complex64"], timeout=300)
    check(res, f"in/out schedules, 24-byte segments, at P={nprocs}")
    assert count_passed(res) > 150
