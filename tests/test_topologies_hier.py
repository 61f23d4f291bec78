"""Hierarchical and node-ordered ring schedules proven by the simulator on many node layouts; their bytes across nodes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collective.topologies import COLLECTIVES, build, even_blocks, simulate, stats, verify
from collective.topologies.cost import traffic
from collective.topologies.hierarchical import layout
from collective.topologies.ring import node_order

ROOTED = ("reduce", "broadcast")
NODE_AWARE = ("hierarchical", "ring")

#: Node labels per rank: uniform, uneven, interleaved, one node, every rank its own node.
LAYOUTS: list[tuple[int, ...]] = [
    (0, 0, 1, 1),
    (0, 0, 0, 0, 1, 1, 1, 1),
    (0, 0, 1, 1, 2, 2),
    (0, 0, 0, 1, 1, 1, 2, 2, 2),
    (0, 0, 0, 1),
    (0, 1, 1, 1),
    (0, 0, 1, 1, 1, 2),
    (0, 0, 0, 0, 0, 1, 2, 2),
    (0, 1, 0, 1),  # interleaved: node-adjacent ring order differs from rank order
    (3, 1, 3, 2, 1, 3, 2),  # arbitrary labels, interleaved, uneven
    (0, 0, 0, 0, 0),  # one node
    (0, 1, 2, 3, 4),  # every rank its own node
    (0, 1),
    (0, 0),
]


def counts(P: int) -> list[int]:
    return sorted({0, 1, P - 1, P, P + 1, 2 * P * P + 3, 1009})


@pytest.mark.parametrize("nodes", LAYOUTS, ids=lambda n: "".join(map(str, n)))
@pytest.mark.parametrize("collective", list(COLLECTIVES))
@pytest.mark.parametrize("algorithm", NODE_AWARE)
def test_correct_on_layouts(algorithm: str, collective: str, nodes: tuple[int, ...]) -> None:
    P = len(nodes)
    for n in counts(P):
        for root in (range(P) if collective in ROOTED else [0]):
            sched = build(algorithm, collective, P, n, root, nodes=nodes)
            assert (sched.nranks, sched.nelems, sched.blocks) == (P, n, even_blocks(n, P))
            if n == 0:
                assert all(s == () for s in sched.steps)
            verify(sched, seed=n + root)


@pytest.mark.parametrize("nodes", LAYOUTS, ids=lambda n: "".join(map(str, n)))
@pytest.mark.parametrize("collective", ["reduce_scatter", "allgather"])
@pytest.mark.parametrize("algorithm", NODE_AWARE)
def test_uneven_blocks_on_layouts(algorithm: str, collective: str, nodes: tuple[int, ...]) -> None:
    P = len(nodes)
    rng = np.random.default_rng(P)
    n = 3 * P + 2
    for _ in range(6):
        cuts = sorted(int(x) for x in rng.integers(0, n + 1, size=P - 1))
        blocks = (0, *cuts, n)
        verify(build(algorithm, collective, P, n, 0, blocks, nodes=nodes))


@settings(max_examples=120, deadline=None)
@given(
    algorithm=st.sampled_from(NODE_AWARE),
    collective=st.sampled_from(list(COLLECTIVES)),
    nodes=st.lists(st.integers(0, 5), min_size=1, max_size=14),
    n=st.integers(0, 3000),
    data=st.data(),
)
def test_random_layouts(algorithm: str, collective: str, nodes: list[int], n: int, data: st.DataObject) -> None:
    P = len(nodes)
    root = data.draw(st.integers(0, P - 1), label="root")
    blocks = None
    if data.draw(st.booleans(), label="custom blocks"):
        cuts = data.draw(st.lists(st.integers(0, n), min_size=P - 1, max_size=P - 1), label="cuts")
        blocks = (0, *sorted(cuts), n)
    verify(build(algorithm, collective, P, n, root, blocks, nodes=nodes), seed=n)


@pytest.mark.parametrize("nodes", LAYOUTS, ids=lambda n: "".join(map(str, n)))
@pytest.mark.parametrize("algorithm", NODE_AWARE)
def test_every_rank_gets_the_same_bits(algorithm: str, nodes: tuple[int, ...]) -> None:
    """With a non-associative, non-commutative 'op', ranks agree only if each value is reduced once, then copied."""
    P, n = len(nodes), 97
    sched = build(algorithm, "allreduce", P, n, nodes=nodes)
    bufs = [np.arange(n, dtype=np.int64) * 7 + r for r in range(P)]
    out = simulate(sched, bufs, reduce=lambda a, b: (a * 31 + b) % 1000003)
    for r in range(1, P):
        assert np.array_equal(out[r], out[0]), f"rank {r} differs from rank 0"


def cross(algorithm: str, nodes: tuple[int, ...], n: int) -> dict[tuple[int, int], int]:
    return traffic(build(algorithm, "allreduce", len(nodes), n, nodes=nodes), nodes)


@pytest.mark.parametrize("per_node", [2, 3, 4])
def test_bytes_across_nodes_two_nodes(per_node: int) -> None:
    """Hierarchical: n each way per node pair; flat ring: 2(P-1)/P n over each boundary link."""
    P = 2 * per_node
    nodes = tuple(r // per_node for r in range(P))
    n = 120 * P
    hier = cross("hierarchical", nodes, n)
    ring = cross("ring", nodes, n)
    assert hier == {(0, 1): n, (1, 0): n}
    assert ring == {(0, 1): 2 * (P - 1) * n // P, (1, 0): 2 * (P - 1) * n // P}
    # The ratio the benchmark should approach on a slow inter-node link: 1.5 for 2x2, 1.75 for 2x4.
    assert ring[(0, 1)] / hier[(0, 1)] == pytest.approx(2 * (P - 1) / P)


def test_bytes_across_nodes_many_nodes() -> None:
    """L nodes: each node sends 2(L-1)/L n in all with hierarchical."""
    L, k = 4, 3
    nodes = tuple(r // k for r in range(L * k))
    n = 12 * L * k * 10
    hier = cross("hierarchical", nodes, n)
    out_of = {m: sum(v for (a, _), v in hier.items() if a == m) for m in range(L)}
    assert out_of == {m: 2 * (L - 1) * n // L for m in range(L)}


def test_node_adjacent_ring_crosses_each_boundary_once() -> None:
    nodes = (0, 1, 0, 1)
    assert node_order(nodes) == (0, 2, 1, 3)
    n = 400
    plain = traffic(build("ring", "allreduce", 4, n), nodes)  # rank order: every link crosses
    adjacent = cross("ring", nodes, n)
    assert plain == {(0, 1): 1200, (1, 0): 1200}
    assert adjacent == {(0, 1): 600, (1, 0): 600}


def test_steps_and_rounds_two_by_two() -> None:
    """2x2: one intra step, two lane-ring steps, one intra step."""
    s = stats(build("hierarchical", "allreduce", 4, 400, nodes=(0, 0, 1, 1)))
    assert s.rounds == 4 and s.steps == (4,) * 4
    assert s.elems_reduced == (300,) * 4  # its lane (n/2) in the node, half of it across


def test_layout_and_cache() -> None:
    assert layout(4, (7, 3, 7, 3)) == [[0, 2], [1, 3]]
    assert layout(3, None) == [[0, 1, 2]]
    a = build("hierarchical", "allreduce", 4, 100, nodes=[0, 0, 1, 1])
    assert build("hierarchical", "allreduce", 4, 100, nodes=(5, 5, 9, 9)) is a  # relabelled before caching
    assert build("tree", "allreduce", 4, 100, nodes=(0, 0, 1, 1)) is build("tree", "allreduce", 4, 100)
    assert build("ring", "allreduce", 4, 100, nodes=(0, 0, 1, 1)) is build("ring", "allreduce", 4, 100)
    assert build("ring", "allreduce", 4, 100, nodes=(0, 1, 0, 1)) is not build("ring", "allreduce", 4, 100)
    one = build("hierarchical", "allreduce", 4, 100, nodes=(2, 2, 2, 2))
    assert one is build("hierarchical", "allreduce", 4, 100)
    with pytest.raises(ValueError, match="nodes has 3 entries"):
        build("hierarchical", "allreduce", 4, 100, nodes=(0, 0, 1))


@pytest.mark.parametrize("per_node", [2, 3, 4])
@pytest.mark.parametrize("collective", ["allreduce", "reduce_scatter", "allgather"])
def test_two_nodes_never_talk_both_ways_in_a_step(collective: str, per_node: int) -> None:
    """With two nodes, no pair of ranks sends each other across nodes in the same step (TCP ran at half speed)."""
    nodes = tuple(r // per_node for r in range(2 * per_node))
    sched = build("hierarchical", collective, len(nodes), 1000, nodes=nodes)
    assert len({len(s) for s in sched.steps}) == 1
    depth = max(len(s) for s in sched.steps)
    # Every rank of these collectives has one step per phase, so steps of one index run together.
    for i in range(depth):
        pairs = {(r, s.peer) for r in range(len(nodes)) if i < len(sched.steps[r])
                 for s in sched.steps[r][i].sends if nodes[r] != nodes[s.peer]}
        both = {(a, b) for a, b in pairs if (b, a) in pairs}
        assert not both, f"step {i}: {sorted(both)}"
