"""Variable-size collectives: sizes that travel with the cross-rank check (real mpiexec), and what "auto" runs."""
from __future__ import annotations

import numpy as np
import pytest
from collective.topologies import cost
from collective.topologies.cluster import Cluster, LinkCost
from mpi_util import check, count_passed, mpirun

from collective.choose import VARIABLE_AUTO, Chooser

INTRA = LinkCost(alpha=5e-6, beta=1 / 5e9)
INTER = LinkCost(alpha=50e-6, beta=1 / 1e9)


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_counts_travel_with_the_check(nprocs: int) -> None:
    res = mpirun("allgather_counts.py", nprocs, timeout=400)
    check(res, f"counts of variable-size calls at P={nprocs}")
    assert count_passed(res) == (16 if nprocs == 1 else 33), res.output[-3000:]


def _chooser(nodes: tuple[int, ...], single_node: bool = False, shm_ok: bool = True,
             shared_cores: bool = False, single_copy: bool = False) -> Chooser:
    cl = Cluster(nodes, intra=INTRA, inter=INTER, gamma=1 / 3e9)
    local = sum(1 for n in nodes if n == nodes[0])
    return Chooser(cl, 0, len(nodes), local, single_node, None, lambda: False, shm_ok=lambda: shm_ok,
                   shared_cores=lambda: shared_cores, single_copy=lambda: single_copy)


SIZES = (0, 64, 4 << 10, 64 << 10, 1 << 20, 16 << 20)


@pytest.mark.parametrize("nodes", [(0, 0, 0, 0, 1, 1, 1, 1), (0, 1) * 4, (0, 0, 1, 1, 1)])
def test_auto_across_nodes_is_the_cost_models_choice(nodes: tuple[int, ...]) -> None:
    """Across nodes, auto picks the cheapest of native and the collective's own Schedules, identically on every
    rank (it depends on the cluster and the call only), and only algorithms the collective can run."""
    picks = {}
    for name, cands in VARIABLE_AUTO.items():
        for nbytes in SIZES:
            for dt in (np.float32, np.int8, np.complex128):
                got = {_chooser(nodes).auto_variable(name, nbytes, np.dtype(dt), root) for root in (0,)}
                want = cost.choose(name, nbytes, Cluster(nodes, intra=INTRA, inter=INTER, gamma=1 / 3e9),
                                   np.dtype(dt).itemsize, cands).best
                assert got == {want}, (name, nbytes, dt, got, want)
                assert want in cands
                picks[(name, nbytes)] = want
    assert set(VARIABLE_AUTO["alltoall"]) == {"native", "pairwise", "bruck"}
    assert set(VARIABLE_AUTO["gather"]) == set(VARIABLE_AUTO["scatter"]) == {"native", "tree"}
    assert set(VARIABLE_AUTO["allgatherv"]) == {"native", "ring"}
    if nodes == (0, 1) * 4:
        # Ranks of a node interleaved: native's ring follows rank order and crosses the network at every hop; the
        # node-ordered ring allgatherv crosses it twice, which wins once the bytes count.
        assert picks[("allgatherv", 16 << 20)] == "ring" and picks[("allgatherv", 64)] == "native", picks


def test_auto_schedules_win_where_the_model_says_so() -> None:
    """Bruck for small alltoalls and pairwise for large ones when MPI's own is not a candidate; the model's
    table lists each candidate with a finite time."""
    ch = _chooser((0, 0, 0, 0, 1, 1, 1, 1))
    assert ch.cost_choice("alltoall", 64, "float32", 0, ("pairwise", "bruck")).best == "bruck"
    assert ch.cost_choice("alltoall", 16 << 20, "float32", 0, ("pairwise", "bruck")).best == "pairwise"
    for name, cands in VARIABLE_AUTO.items():
        c = ch.cost_choice(name, 1 << 20, "float16", 3)
        assert {a for a, _ in c.predictions} == set(cands) and all(t > 0 for _, t in c.predictions), c
    text = ch.explain("allgatherv", 1 << 20)
    assert "ring" in text and "native" in text and "auto picks now" in text


def test_auto_on_one_node_and_one_rank() -> None:
    for name in VARIABLE_AUTO:
        for nbytes in SIZES:
            # alltoall and allgatherv: where every rank has a core, shm from 4 KiB below 64 KiB and MPI's own from
            # there; shm from 4 KiB where they share
            want = ("native" if name in ("alltoall", "allgatherv") and not 4 << 10 <= nbytes < 64 << 10
                    else "shm")
            assert _chooser((0,) * 4, single_node=True).auto_variable(name, nbytes, np.dtype("f4")) == want
            want = ("shm" if name in ("gather", "scatter") or (4 << 10 <= nbytes and (name != "alltoall"
                                                                                   or nbytes <= 4 << 20))
                    else "native")
            assert _chooser((0,) * 4, single_node=True, shared_cores=True).auto_variable(name, nbytes, "f4") == want
            assert _chooser((0,) * 4, single_node=True, shm_ok=False, shared_cores=True).auto_variable(
                name, nbytes, "f4") == "native"
            assert _chooser((0,) * 4, single_node=True, shm_ok=False).auto_variable(name, nbytes, "f4") == "native"
            assert _chooser((0,), single_node=True).auto_variable(name, nbytes, np.dtype("f4")) == "native"
            # with single copy on the node: allgatherv shm again from 8 MiB where every rank has a core; unchanged
            # for the others, where they share cores, across nodes, and without the arena
            big = name == "allgatherv" and nbytes >= 8 << 20
            want_own = "shm" if big else _chooser((0,) * 4, single_node=True).auto_variable(name, nbytes, "f4")
            assert _chooser((0,) * 4, single_node=True, single_copy=True).auto_variable(name, nbytes, "f4") == want_own
            for kw in ({"shared_cores": True}, {"shm_ok": False}):
                assert (_chooser((0,) * 4, single_node=True, single_copy=True, **kw).auto_variable(name, nbytes, "f4")
                        == _chooser((0,) * 4, single_node=True, **kw).auto_variable(name, nbytes, "f4"))
            assert _chooser((0, 0, 1, 1), single_copy=True).auto_variable(name, nbytes, "f4") == _chooser(
                (0, 0, 1, 1)).auto_variable(name, nbytes, "f4")
        # the public entry points take these names too
        assert _chooser((0, 0, 1, 1)).auto(name, 1 << 20, np.dtype("float32")) in VARIABLE_AUTO[name]



def test_auto_for_equal_allgather_follows_a_tuning_table_else_allgatherv() -> None:
    """An allgather whose first dims are equal ("allgather") takes a tuning table's allgather entries where it has
    them (shm only where the arena can exist), and otherwise what allgatherv takes."""
    from collective.tuning import Entry, TuningTable

    table = TuningTable(4, (4,), "float32", "sum", {"allgather": (Entry(64 << 10, "shm"), Entry(None, "tree"))})
    for kw in ({}, {"shared_cores": True}, {"single_copy": True}, {"shm_ok": False}):
        for nbytes in SIZES:
            plain = _chooser((0,) * 4, single_node=True, **kw)
            assert plain.auto_variable("allgather", nbytes, "f4") == plain.auto_variable("allgatherv", nbytes, "f4")
            tuned = _chooser((0,) * 4, single_node=True, **kw)
            tuned.tuning = table
            want = "tree" if nbytes > 64 << 10 else "shm" if kw.get("shm_ok", True) else "native"
            assert tuned.auto_variable("allgather", nbytes, "f4") == want, (kw, nbytes)
            assert tuned.auto_variable("allgatherv", nbytes, "f4") == plain.auto_variable("allgatherv", nbytes, "f4")


def test_auto_algorithm_names_what_an_equal_allgather_runs() -> None:
    """``comm.auto_algorithm("allgather")`` (``Chooser.auto_call``) answers what a NumPy allgather runs: on one node
    where the arena can exist, the variable-size path's pick; elsewhere, and for every other collective, the
    fixed-size path's."""
    for kw in ({}, {"shared_cores": True}, {"single_copy": True}):
        ch = _chooser((0,) * 4, single_node=True, **kw)
        for nbytes in SIZES:
            assert ch.auto_call("allgather", nbytes, np.dtype("f4")) == ch.auto_variable("allgather", nbytes, "f4")
            assert ch.auto_call("allreduce", nbytes, np.dtype("f4")) == ch.auto("allreduce", nbytes, np.dtype("f4"))
        assert "auto picks now: " + ch.auto_variable("allgather", 8 << 10, "f4") in ch.explain("allgather", 8 << 10)
    # where they differ: 1 MiB with a core per rank runs native by the variable-size path; the fixed-size path's
    # auto would say shm
    ch = _chooser((0,) * 4, single_node=True)
    assert ch.auto_call("allgather", 1 << 20, np.dtype("f4")) == "native"
    assert ch.auto("allgather", 1 << 20, np.dtype("f4")) == "shm"
    for ch in (_chooser((0,) * 4, single_node=True, shm_ok=False), _chooser((0, 0, 1, 1))):
        for nbytes in SIZES:
            assert ch.auto_call("allgather", nbytes, np.dtype("f4")) == ch.auto("allgather", nbytes, np.dtype("f4"))
