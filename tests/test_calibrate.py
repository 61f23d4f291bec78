"""Link-cost calibration under real mpiexec: one pair inside a node, one across (fake) nodes."""
from __future__ import annotations

import pytest

from collective.calibrate import measure_gamma
from mpi_util import check, count_passed, mpirun


def test_gamma_is_plausible() -> None:
    assert 1e-12 < measure_gamma(1 << 16) < 1e-7


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs, node_size", [(2, 2), (2, 1), (3, 2)])
def test_calibrate(nprocs: int, node_size: int, tmp_path) -> None:
    res = mpirun("calibrate_job.py", nprocs, [str(node_size), str(tmp_path / "links.json")], timeout=90)
    check(res, f"calibrate at P={nprocs}, node size {node_size}")
    assert count_passed(res) == 4
