"""comm.explain / cost_choice under mpiexec: same choice on every rank, every candidate listed, calibrated links."""
from __future__ import annotations

import os
import zlib

import numpy as np

import collective as col
from harness import Cases

comm = col.init()
cases = Cases(comm)


def calibrated() -> None:
    cl = comm.cluster
    assert cl.gamma is not None and cl.intra is not None, cl
    assert (cl.inter is not None) == (cl.nnodes > 1), cl


def same_choice_everywhere() -> None:
    for coll in col.COLLECTIVE_NAMES:
        for nbytes in (4 << 10, 64 << 10, 1 << 20, 16 << 20):
            text = comm.explain(coll, nbytes)
            crc = np.array([zlib.crc32(text.encode())], np.int64)
            allc = comm.allgather(crc, algorithm="native")
            assert (allc == allc[0]).all(), f"{coll} {nbytes}: explanations differ between ranks"
            for alg in ("native", "ring", "tree", "star", "hierarchical", "pipeline"):
                assert alg in text, f"{alg} missing from\n{text}"
            assert "<- chosen" in text and "auto picks now" in text
            assert comm.cost_choice(coll, nbytes).best in text


def bad_collective() -> None:
    try:
        comm.explain("alltoallw", 10)
    except col.CollectiveValueError as exc:
        assert "alltoallw" in str(exc)
    else:
        raise AssertionError("no error for an unknown collective")
    assert "alltoall" in comm.explain("alltoall", 1 << 20)  # the variable-size collectives have a choice too


for name, fn in [("calibrated", calibrated), ("same choice", same_choice_everywhere), ("bad", bad_collective)]:
    cases.run(name, fn)
cases.finish()
