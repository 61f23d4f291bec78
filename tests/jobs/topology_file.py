"""COLLECTIVE_TOPOLOGY under mpiexec: the file's layout and links are what every rank uses, or every rank refuses it.

Usage: mpiexec -n P python topology_file.py check NODE_OF_RANK   (e.g. 0,1,0,1: what the file must give)
       mpiexec -n P python topology_file.py refused MESSAGE      (the file is wrong; every rank's init must say MESSAGE)
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np

import collective as col
from harness import Cases
from collective.topologies.cluster import load_topology
from collective.topologies.cost import predict

mode, arg = sys.argv[1], sys.argv[2]
path = os.environ["COLLECTIVE_TOPOLOGY"]

if mode == "refused":
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    R, P = world.Get_rank(), world.Get_size()
    ok = 0
    try:
        col.init()
    except col.CollectiveValueError as exc:
        msg = str(exc)
        if f"init on rank {R} of {P}" in msg and arg in msg and path in msg:
            ok = 1
        else:
            print(f"rank {R}: FAIL the message {msg!r} lacks the rank, {arg!r} or the path", flush=True)
    else:
        print(f"rank {R}: FAIL init accepted the file", flush=True)
    total = world.allreduce(ok)  # lower-case mpi4py call on plain ints: the test's own bookkeeping
    if R == 0:
        print(f"REFUSED on {total} of {P} ranks", flush=True)
    sys.exit(0 if total == P else 1)

comm = col.init()
cases = Cases(comm)
P, R = comm.size, comm.rank
declared = load_topology(path, nranks=P)


def layout() -> None:
    cl = comm.cluster
    want = tuple(int(x) for x in arg.split(","))
    assert cl.node_of_rank == want, cl.node_of_rank
    assert cl.nnodes == len(set(want)) and cl.source == f"COLLECTIVE_TOPOLOGY={path}", cl
    peers = cl.ranks_of_node(want[R])
    assert (comm.node, comm.local_rank, comm.local_size) == (want[R], peers.index(R), len(peers))


def links_not_measured() -> None:
    cl = comm.cluster
    assert cl.links_declared
    assert (cl.intra, cl.inter, cl.gamma) == (declared.intra, declared.inter, declared.gamma), cl


def explain_uses_the_file() -> None:
    text = comm.explain("allreduce", 1 << 20)
    assert f"links from COLLECTIVE_TOPOLOGY={path}:" in text, text
    intra, inter = declared.intra, declared.inter
    line = (f"intra alpha {intra.alpha * 1e6:.1f} us, {1e-9 / intra.beta:.2f} GB/s; "
            f"inter alpha {inter.alpha * 1e6:.1f} us, {1e-9 / inter.beta:.2f} GB/s; "
            f"reduce {1e-9 / declared.gamma:.2f} GB/s")
    assert line in text, f"{line!r} not in\n{text}"
    for alg in ("native", "ring", "tree", "star", "hierarchical", "pipeline"):
        got = comm.cost_choice("allreduce", 1 << 20).seconds(alg)
        assert got == predict("allreduce", 1 << 20, declared, alg), alg
    crc = np.array([zlib.crc32(text.encode())], np.int64)
    allc = comm.allgather(crc, algorithm="native")
    assert (allc == allc[0]).all(), "explanations differ between ranks"
    if R == 0:
        print(text, flush=True)


def node_aware_moves_data() -> None:
    n = 50000
    x = np.arange(n, dtype=np.float64) + R
    want = np.arange(n, dtype=np.float64) * P + P * (P - 1) / 2
    for alg in ("hierarchical", "ring", "pipeline", "auto"):
        y = comm.allreduce(x, algorithm=alg)
        assert np.array_equal(y, want), alg


for name, fn in [("layout", layout), ("links not measured", links_not_measured), ("explain", explain_uses_the_file),
                 ("node-aware allreduce", node_aware_moves_data)]:
    cases.run(name, fn)
cases.finish()
