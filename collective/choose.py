"""What "auto" runs: a tuning table, the rules for one node, or the cost model on the calibrated links."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from collective.topologies import cost
from collective.topologies.cluster import Cluster

from .backends.mpi import mpi_dtype

__all__ = ["Chooser", "VARIABLE_AUTO"]

#: Above this many bytes per rank an alltoall copies through the shm arena in several chunks, each a phase, and
#: MPI's own won again where the ranks share cores (docs/bench/alltoall_allgatherv_p4.txt): the default chunk.
_SHM_ALLTOALL_MAX = 4 << 20
#: Where every rank has a core of its own, shm alltoall and allgatherv beat the library's MPI path below this many
#: bytes per rank (one phase that is also the check, against the check and then MPI's call), tied with it here,
#: and lost above (MPI copies each byte once, shm twice): the P=2 tables of docs/bench.
_SHM_OWN_CORES_BELOW = 64 << 10
#: Where every rank has a core of its own and the node allows single copy (``collective.shm``, "single copy"), shm
#: allgatherv reads every block straight from its owner's input and beats the library's MPI path again from this
#: many bytes per rank (bench/bench_single_copy_variable.py); shm alltoall by single copy only tied with MPI's own
#: (which copies each byte once too), as it did everywhere where the ranks share cores, so those stay MPI's.
_SINGLE_COPY_OWN_CORES_FROM = 8 << 20
#: The variable-size collectives "auto" chooses for (``Chooser.auto_variable``), each with what it may pick
#: besides shm: "native" and the Schedules ``topologies.cost.candidates_for`` lists (priced alike).
VARIABLE_AUTO: dict[str, tuple[str, ...]] = {name: cost.candidates_for(name)
                                             for name in ("alltoall", "gather", "scatter", "allgatherv")}


class Chooser:
    """Picks algorithms for one communicator; every input is the same on every rank, so is every pick.

    Args:
        cluster: the calibrated layout (identical on every rank).
        rank, size, local_size: this rank, the number of ranks, ranks on this node.
        single_node: every rank shares one shared-memory node (shm can run).
        tuning: a table from ``collective-bench --tune`` (``COLLECTIVE_TUNING``), or None.
        quick: returns whether small shm allreduces run in one phase (the check fenced in the arena).
        shm_ok: returns whether the node's shm arena can exist (False where /dev/shm is too small for it:
            "auto" then picks paths that need no shared window). None: always.
        shared_cores: returns whether the node's ranks share cores (the arena's phases wait in MPI's barrier
            rather than spin, ``ShmArena.spins``; the same answer on every rank). None: never.
        single_copy: returns whether the node's shm arena moves bytes by cross-memory attach (``ShmArena.cma``;
            the same answer on every rank of the node). None: never.
    """

    def __init__(self, cluster: Cluster, rank: int, size: int, local_size: int, single_node: bool, tuning: Any,
                 quick: Callable[[], bool], shm_ok: Callable[[], bool] | None = None,
                 shared_cores: Callable[[], bool] | None = None,
                 single_copy: Callable[[], bool] | None = None) -> None:
        self._shm_ok = shm_ok
        self._shared_cores = shared_cores
        self._single_copy = single_copy
        self.cluster, self.rank, self.size, self.local_size = cluster, rank, size, local_size
        self.single_node = single_node
        self.tuning = tuning
        self._quick = quick
        self._ranks_per_node = [len(cluster.ranks_of_node(n)) for n in range(cluster.nnodes)]
        self._choices: dict[tuple, Any] = {}

    def auto(self, name: str, nbytes: int, dtype: np.dtype, root: int = 0) -> str:
        """The algorithm "auto" picks for a call of ``nbytes`` of ``dtype`` (``root``: of gather or scatter, whose
        Schedules the cost model compares from the root).

        In order: a tuning table when it covers this P and layout; on one
        node, shm for allreduce, and for the others MPI's own below 16 KiB
        (4 KiB with three ranks or more) and shm above; across nodes, the cost
        model's cheapest among native and the Schedules on the calibrated
        links (see :meth:`explain`).
        """
        if name in VARIABLE_AUTO:
            return self.auto_variable(name, nbytes, dtype, root)
        shm = self.single_node and (self._shm_ok is None or self._shm_ok())
        if self.tuning is not None and mpi_dtype(dtype) is not None:
            chosen = self.tuning.choose(name, nbytes, self.size, self._ranks_per_node)
            if chosen is not None and (chosen != "shm" or shm):
                return chosen
        if self.size == 1:
            return "native" if mpi_dtype(dtype) is not None else "ring"
        if self.single_node and not shm:  # no shared window: MPI's own, or a ring for dtypes MPI lacks
            return "native" if mpi_dtype(dtype) is not None else "ring"
        if self.single_node:
            if name == "allreduce" and self._quick():
                # shm at every size: its one synchronisation is also the cross-rank check, where MPI's own
                # collective follows a check of its own (docs/bench: the auto tables).
                return "shm"
            # The others, and allreduce without the one-phase path (check off, DETAIL, NaN check): MPI's own
            # won at the smallest sizes in the shm runs of docs/bench, shm above.
            small = (16 << 10) if self.local_size == 2 else (4 << 10)
            return "native" if nbytes < small and mpi_dtype(dtype) is not None else "shm"
        return self.cost_choice(name, nbytes, dtype).best

    def auto_call(self, name: str, nbytes: int, dtype: np.dtype, root: int = 0) -> str:
        """What "auto" runs for a host (NumPy) call of ``name`` (``Communicator.auto_algorithm``): :meth:`auto`, but
        an allgather on one node where the arena can exist runs by the variable-size path (its first dims equal on
        every rank), which picks by :meth:`auto_variable` ("allgather").

        Example::

            chooser.auto_call("allgather", 8 << 10, np.dtype("float32"))   # e.g. "shm" on one node
        """
        if name == "allgather" and self.single_node and (self._shm_ok is None or self._shm_ok()):
            return self.auto_variable(name, nbytes, dtype, root)
        return self.auto(name, nbytes, dtype, root)

    def auto_variable(self, name: str, nbytes: int, dtype: Any = "uint8", root: int = 0) -> str:
        """What "auto" runs for variable-size collective ``name`` (a key of ``VARIABLE_AUTO``, or "allgather": an
        allgather whose first dims are equal on every rank, which follows a tuning table's allgather entries where
        it has them, and otherwise takes what allgatherv would).

        ``nbytes`` per rank as ``topologies.cost.predict`` counts it (the mean
        of the ranks' inputs; scatter: the root's whole input), computed from
        counts every rank holds alike, so every rank picks the same. In order
        (tuning tables cover none of these but allgather): one rank: native; on
        one node where the node's arena can exist (else native: MPI's own runs
        these in bytes, so every dtype goes), alltoall and allgatherv take
        shm from 4 KiB (alltoall up to 4 MiB) where the ranks share cores, and
        where every rank has a core of its own shm from 4 KiB below 64 KiB and
        native from there (with a core each, MPI's own beat copying through
        the arena from 64 KiB at P = 2; sharing two cores, P = 4, shm won:
        docs/bench/alltoall_allgatherv_p2.txt and _p4.txt), and allgatherv shm
        again from 8 MiB where the node allows single copy (each byte read
        once, straight from its owner's input: see ``collective.shm``), gather
        and scatter take shm; across nodes, the cost model's
        cheapest of native and the collective's Schedules (pairwise and Bruck
        alltoall, binomial-tree gather and scatter, ring allgatherv) on the
        calibrated links. Inputs from ``comm.alloc`` are read where they lie
        whatever this says (``collective.variable.prepare_variable``).

        Example::

            chooser.auto_variable("alltoall", 64 << 10, "float32")   # e.g. "pairwise" across nodes
        """
        shm = self.single_node and (self._shm_ok is None or self._shm_ok())
        if name == "allgather":  # first dims equal on every rank: a tuning table's allgather, else as allgatherv
            if self.tuning is not None and mpi_dtype(np.dtype(dtype)) is not None:
                chosen = self.tuning.choose(name, nbytes, self.size, self._ranks_per_node)
                if chosen is not None and (chosen != "shm" or shm):
                    return chosen
            name = "allgatherv"
        cands = VARIABLE_AUTO[name]
        if self.size == 1:
            return "native"
        if self.single_node:
            if not shm:
                return "native"
            if name in ("alltoall", "allgatherv"):
                if nbytes < (4 << 10):
                    return "native"
                if self._shared_cores is not None and self._shared_cores():
                    return "shm" if name != "alltoall" or nbytes <= _SHM_ALLTOALL_MAX else "native"
                if (name == "allgatherv" and nbytes >= _SINGLE_COPY_OWN_CORES_FROM and self._single_copy is not None
                        and self._single_copy()):
                    return "shm"
                return "shm" if nbytes < _SHM_OWN_CORES_BELOW else "native"
            return "shm"
        return self.cost_choice(name, nbytes, dtype, root, cands).best

    def cost_choice(self, collective: str, nbytes: int, dtype: Any = "float32", root: int = 0,
                    candidates: Any = None) -> Any:
        """The cost model's pick for one call (cached): see ``Communicator.cost_choice``."""
        dt = np.dtype(dtype)
        if candidates is None:
            native = mpi_dtype(dt) is not None or collective in VARIABLE_AUTO  # those run natively in bytes
            candidates = tuple(a for a in cost.candidates_for(collective) if a != "native" or native)
        key = (collective, int(nbytes), dt.itemsize, root, tuple(candidates))
        ch = self._choices.get(key)
        if ch is None:
            if len(self._choices) > 4096:
                self._choices.clear()
            ch = cost.choose(collective, int(nbytes), self.cluster, dt.itemsize, candidates, root)
            self._choices[key] = ch
        return ch

    def explain(self, collective: str, nbytes: int, dtype: Any = "float32", root: int = 0) -> str:
        """Each algorithm's predicted time, the cost model's choice, what "auto" picks (``Communicator.explain``)."""
        dt = np.dtype(dtype)
        text = cost.explain(self.cost_choice(collective, nbytes, dt, root), self.cluster)
        return f"{text}\n  auto picks now: {self.auto_call(collective, int(nbytes), dt, root)}"
