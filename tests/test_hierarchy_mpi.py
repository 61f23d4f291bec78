"""Node-aware algorithms under real mpiexec, exact, on fake nodes (COLLECTIVE_NODE_SIZE or a topology file)."""
from __future__ import annotations

import json

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


def test_topology_file(tmp_path) -> None:
    """COLLECTIVE_TOPOLOGY declaring 2 interleaved nodes and their links: every rank takes that layout, does not
    calibrate, explains with the declared links, and the node-aware algorithms stay exact; a file for another
    job size is refused by every rank at init."""
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps({
        "nodes": [[0, 2], [1, 3]],
        "links": {"intra": {"alpha_us": 7, "GBps": 2.5}, "inter": {"alpha_us": 80, "GBps": 0.4}, "reduce_GBps": 5},
    }))
    env = {"COLLECTIVE_TOPOLOGY": str(topo)}
    res = mpirun("topology_file.py", 4, ["check", "0,1,0,1"], timeout=120, env=env)
    check(res, "topology file at P=4")
    assert count_passed(res) == 4
    res = mpirun("correctness.py", 4, ["--algorithms", "hierarchical,ring", "--dtypes", "int32,float16,float64"],
                 timeout=300, env=env)
    check(res, "hierarchical and node-ordered ring correctness at P=4 on the file's nodes")
    assert count_passed(res) > 300
    wrong = tmp_path / "three.json"
    wrong.write_text(json.dumps({"node_of_rank": ["a", "a", "b"]}))
    res = mpirun("topology_file.py", 4, ["refused", "describes 3 ranks, but this job has 4"], timeout=120,
                 env={"COLLECTIVE_TOPOLOGY": str(wrong)})
    check(res, "a topology file for 3 ranks in a 4-rank job")
    assert "REFUSED on 4 of 4 ranks" in res.output
