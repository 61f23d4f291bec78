"""calibrate() under mpiexec: plausible, identical on every rank, fast, cached, file round trip, switch off.

Usage: mpiexec -n P python calibrate_job.py NODE_SIZE CACHE_FILE
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from mpi4py import MPI

from collective import calibrate as cal
from harness import Cases
from collective.topologies.cluster import Cluster

node_size, path = int(sys.argv[1]), sys.argv[2]
world = MPI.COMM_WORLD.Dup()
P, R = world.Get_size(), world.Get_rank()


class _Comm:  # what harness.Cases needs: rank and an MPI communicator that can Allreduce
    rank = R
    mpi_comm = world


cases = Cases(_Comm)
layout = Cluster.from_node_size(P, node_size)
state: dict = {}


def measured() -> None:
    t = time.perf_counter()
    cl = cal.calibrate(world, layout)
    took = time.perf_counter() - t
    state["cl"] = cl
    # Bounded by its sizes' time budget (cal.BUDGET_S a pair): a few tenths of a second on an idle machine. The
    # bound leaves room for a machine shared with other MPI jobs; what it catches is a budget that stopped working.
    assert took < 5.0, f"calibration took {took:.2f} s"
    assert cl.node_of_rank == layout.node_of_rank
    assert 0 < cl.gamma < 1e-7, cl.gamma
    has_intra = any(len(layout.ranks_of_node(m)) > 1 for m in set(layout.node_of_rank))
    assert (cl.intra is not None) == has_intra, cl
    assert (cl.inter is not None) == (layout.nnodes > 1), cl
    for link in (cl.intra, cl.inter):
        if link is not None:
            assert 1e-8 < link.alpha < 0.05 and 1e-13 <= link.beta < 1e-6, link
    mine = np.array([cl.gamma, *(x for ln in (cl.intra, cl.inter) if ln for x in (ln.alpha, ln.beta))])
    first = mine.copy()
    world.Bcast(first, root=0)
    assert np.array_equal(mine, first), f"rank {R} got {mine}, rank 0 {first}"


def cached() -> None:
    t = time.perf_counter()
    again = cal.calibrate(world, layout)
    assert again is state["cl"] and time.perf_counter() - t < 0.01


def file_round_trip() -> None:
    os.environ["COLLECTIVE_CALIBRATION_FILE"] = path
    cal._cache.clear()
    fresh = cal.calibrate(world, layout)  # measures and writes the file
    world.Barrier()
    assert os.path.exists(path) and "measured" in fresh.source
    cal._cache.clear()
    loaded = cal.calibrate(world, layout)  # reads it back
    assert "from " + path in loaded.source, loaded.source
    assert (loaded.intra, loaded.inter, loaded.gamma) == (fresh.intra, fresh.inter, fresh.gamma)
    # A different layout does not reuse it.
    cal._cache.clear()
    other = Cluster.from_node_size(P, P if node_size != P else 1)
    assert "measured" in cal.calibrate(world, other).source
    del os.environ["COLLECTIVE_CALIBRATION_FILE"]


def switched_off() -> None:
    os.environ["COLLECTIVE_CALIBRATE"] = "0"
    cal._cache.clear()
    assert cal.calibrate(world, layout) is layout
    del os.environ["COLLECTIVE_CALIBRATE"]


for name, fn in [("measured", measured), ("cached", cached), ("file round trip", file_round_trip),
                 ("switched off", switched_off)]:
    cases.run(name, fn)
cases.finish()
