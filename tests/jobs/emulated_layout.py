"""On the emulated cluster: each host has its own hostname, MPI's shared-memory split finds the hosts as nodes."""
from __future__ import annotations

import socket
import sys

import numpy as np

import collective as col
from harness import Cases

hosts, per_host = (int(x) for x in sys.argv[1].split("x"))
comm = col.init()
cases = Cases(comm)


def layout() -> None:
    cl = comm.cluster
    assert cl.source.startswith("MPI shared-memory split"), cl.source
    assert cl.node_of_rank == tuple(r // per_host for r in range(hosts * per_host)), cl.node_of_rank
    assert comm.local_size == per_host and comm.local_rank == comm.rank % per_host
    name = socket.gethostname().encode().ljust(64, b"\0")[:64]
    names = comm.allgather(np.frombuffer(name, np.uint8).copy(), algorithm="native").reshape(-1, 64)
    distinct = {bytes(n).rstrip(b"\0") for n in names}
    assert len(distinct) == hosts, f"hostnames {distinct}"
    assert cl.inter is not None and cl.intra is not None, "both link kinds calibrated"


def hierarchical_moves_data() -> None:
    x = np.arange(1 << 16, dtype=np.float32) + comm.rank
    for alg in ("hierarchical", "ring", "native"):
        y = comm.allreduce(x, algorithm=alg)
        want = np.arange(1 << 16, dtype=np.float32) * comm.size + comm.size * (comm.size - 1) / 2
        assert np.array_equal(y, want), alg


cases.run("layout", layout)
cases.run("hierarchical", hierarchical_moves_data)
if comm.rank == 0:
    print(comm.explain("allreduce", 4 << 20), flush=True)
cases.finish()
