"""The torch.distributed backend "collective" under real mpiexec (P = 2 and 3), and torch's own suite's fast subset."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from mpi_util import check, count_passed, mpirun  # noqa: E402

# torch's rendezvous variables must be absent: the backend takes rank and size from MPI.
_ENV = {"COLLECTIVE_TIMEOUT": "60"}


@pytest.mark.parametrize("nprocs", [2, 3])
def test_dist_calls_ops_dtypes_async_mismatch(nprocs: int) -> None:
    res = mpirun("torch_backend.py", nprocs, ["--only", "calls,mismatch"], timeout=300, env=_ENV)
    check(res, f"torch backend calls at P={nprocs}")
    assert count_passed(res) >= 12


@pytest.mark.parametrize("nprocs", [2, 3])
def test_ddp_and_fsdp2_match_the_reference(nprocs: int) -> None:
    res = mpirun("torch_backend.py", nprocs, ["--only", "ddp,fsdp"], timeout=300, env=_ENV)
    check(res, f"torch DDP/FSDP2 on collective at P={nprocs}")
    assert count_passed(res) >= 6
