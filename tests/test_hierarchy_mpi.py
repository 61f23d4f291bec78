"""The correctness suite for the node-aware algorithms under real mpiexec, on fake nodes (COLLECTIVE_NODE_SIZE)."""
from __future__ import annotations

import pytest

from mpi_util import check, count_passed, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs, node_size", [(4, 1), (4, 2), (4, 3)])
def test_hierarchical(nprocs: int, node_size: int) -> None:
    """4 nodes of 1, 2 of 2, and 3+1: exact, bitwise identical across ranks, async, bad args (+ large at 2x2).

    (ring on fake nodes of consecutive ranks is the plain ring, which the main suite covers.)
    """
    args = ["--algorithms", "hierarchical"] + (["--large"] if node_size == 2 else [])
    res = mpirun("correctness.py", nprocs, args, timeout=300, env={"COLLECTIVE_NODE_SIZE": str(node_size)})
    check(res, f"hierarchical correctness at P={nprocs}, COLLECTIVE_NODE_SIZE={node_size}")
    assert count_passed(res) > 1000


def test_node_aware_multi_segment() -> None:
    """Tiny segments: every hierarchical transfer goes through the segmented receive-and-reduce path."""
    res = mpirun("correctness.py", 4, ["--algorithms", "hierarchical", "--dtypes", "float16,int64"],
                 timeout=300, env={"COLLECTIVE_NODE_SIZE": "2", "COLLECTIVE_SEGMENT_BYTES": "24"})
    check(res, "segmented hierarchical correctness at P=4, COLLECTIVE_NODE_SIZE=2")
    assert count_passed(res) > 150


def test_explain_and_calibration_at_init() -> None:
    """init() calibrates (identically on every rank); explain() names every algorithm and the choice."""
    res = mpirun("explain_job.py", 4, [], timeout=120, env={"COLLECTIVE_NODE_SIZE": "2"})
    check(res, "explain at P=4")
    assert count_passed(res) == 3
