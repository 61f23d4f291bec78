"""The alpha-beta-gamma cost model: closed forms it must reproduce, the choices it makes, and its explanation."""
from __future__ import annotations

import pytest

from collective.topologies import ALGORITHMS, COLLECTIVES, build
from collective.topologies.cluster import Cluster, LinkCost
from collective.topologies.cost import CANDIDATES, choose, cost, explain, predict, recursive_doubling_allreduce

INTRA = LinkCost(alpha=1e-5, beta=1e-9)  # 10 us, 1 GB/s
INTER = LinkCost(alpha=1e-4, beta=1e-8)  # 100 us, 100 MB/s
GAMMA = 5e-10


def cluster(nodes: tuple[int, ...]) -> Cluster:
    return Cluster(nodes, intra=INTRA, inter=INTER, gamma=GAMMA)


def test_one_message() -> None:
    """Two ranks on two nodes, one broadcast message of n elements: alpha + bytes * beta of the inter link."""
    n = 4000
    assert cost(build("star", "broadcast", 2, n), cluster((0, 1))) == pytest.approx(INTER.alpha + 4 * n * INTER.beta)
    assert cost(build("star", "broadcast", 2, n), cluster((0, 0))) == pytest.approx(INTRA.alpha + 4 * n * INTRA.beta)
    assert cost(build("star", "broadcast", 2, n), cluster((0, 0)), itemsize=8) == pytest.approx(
        INTRA.alpha + 8 * n * INTRA.beta)


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_ring_allreduce_closed_form(P: int) -> None:
    """2(P-1) steps of alpha + (n/P) beta, and (P-1) of them reduce n/P elements."""
    n = 1000 * P
    b = 4 * n / P
    want = 2 * (P - 1) * (INTRA.alpha + b * INTRA.beta) + (P - 1) * b * GAMMA
    assert cost(build("ring", "allreduce", P, n), cluster((0,) * P)) == pytest.approx(want)


def test_star_root_port_is_the_bottleneck() -> None:
    """The root receives P-1 whole buffers one after another through its in-port."""
    P, n = 5, 10000
    t = cost(build("star", "reduce", P, n), cluster((0,) * P))
    assert t == pytest.approx(INTRA.alpha + (P - 1) * 4 * n * (INTRA.beta + GAMMA))


def test_node_link_is_shared() -> None:
    """Two ranks of a node sending across at once share its link: twice the time of one."""
    n = 100000
    one = cost(build("star", "broadcast", 2, n), cluster((0, 1)))
    two = cost(build("hierarchical", "allgather", 4, 2 * n, nodes=(0, 0, 1, 1)), cluster((0, 0, 1, 1)))
    assert two > one  # each node sends n elements over its link, and the intra step comes on top


def test_no_steps_cost_nothing() -> None:
    assert cost(build("ring", "allreduce", 1, 100), cluster((0,))) == 0.0
    assert cost(build("tree", "reduce", 4, 0), cluster((0, 0, 1, 1))) == 0.0
    assert predict("allreduce", 4096, cluster((0,)), "native") == 0.0


def test_mismatched_cluster() -> None:
    with pytest.raises(ValueError, match="4 ranks, the cluster 2"):
        cost(build("ring", "allreduce", 4, 100), cluster((0, 1)))


def test_recursive_doubling_rounds() -> None:
    n = 1000
    t = cost(recursive_doubling_allreduce(8, n), cluster((0,) * 8))
    assert t == pytest.approx(3 * (INTRA.alpha + 4 * n * (INTRA.beta + GAMMA)))
    assert cost(recursive_doubling_allreduce(6, n), cluster((0,) * 6)) > cost(
        recursive_doubling_allreduce(4, n), cluster((0,) * 4))  # folding in the extra ranks costs two steps


@pytest.mark.parametrize("per_node", [2, 4])
def test_hierarchical_wins_large_messages_across_a_slow_link(per_node: int) -> None:
    nodes = tuple(r // per_node for r in range(2 * per_node))
    cl = cluster(nodes)
    c = choose("allreduce", 16 << 20, cl)
    # MPI's own (Rabenseifner at these sizes) also sends about N per node across: the two tie.
    assert c.best in ("hierarchical", "native")
    assert c.seconds("hierarchical") < 0.9 * min(c.seconds(a) for a in ("ring", "tree", "star", "pipeline"))
    # Bytes across the node link dominate: ring / hierarchical approaches 2(P-1)/P.
    P = len(nodes)
    ratio = c.seconds("ring") / c.seconds("hierarchical")
    assert 0.85 * 2 * (P - 1) / P < ratio <= 2 * (P - 1) / P


def test_small_messages_want_few_steps() -> None:
    c = choose("allreduce", 64, cluster((0,) * 8))
    assert c.best != "ring"  # 14 latencies lose to 3 or fewer
    assert c.seconds("ring") > 4 * c.seconds(c.best)


@pytest.mark.parametrize("collective", list(COLLECTIVES))
def test_choice_table_is_complete_and_sorted(collective: str) -> None:
    cl = cluster((0, 0, 1, 1, 2))
    c = choose(collective, 1 << 16, cl, root=3)
    assert sorted(a for a, _ in c.predictions) == sorted(CANDIDATES)
    times = [t for _, t in c.predictions]
    assert times == sorted(times) and all(t > 0 for t in times)
    assert c.best == c.predictions[0][0]
    assert choose(collective, 1 << 16, cl, candidates=["tree"], root=3).best == "tree"
    with pytest.raises(ValueError):
        choose(collective, 10, cl, candidates=[])


def test_ties_go_to_the_earlier_candidate(monkeypatch) -> None:
    import collective.topologies.cost as cost_module

    # Without our executor's per-step cost, the flat ring and the modelled native ring cost the same at P=3.
    monkeypatch.setattr(cost_module, "EXECUTOR_STEP", 0.0)
    cl = cluster((0, 0, 0))
    a = choose("allreduce", 64 << 20, cl, candidates=["native", "ring"])
    b = choose("allreduce", 64 << 20, cl, candidates=["ring", "native"])
    assert a.seconds("ring") == a.seconds("native")
    assert (a.best, b.best) == ("native", "ring")


def test_executor_step_makes_native_win_small_messages() -> None:
    """Our Schedules pay EXECUTOR_STEP per step, MPI's own does not: small messages go to native."""
    from collective.topologies.cost import EXECUTOR_STEP

    cl = cluster((0, 0, 1, 1))
    c = choose("allreduce", 4096, cl)
    assert c.best == "native"
    hier = build("hierarchical", "allreduce", 4, 1024, nodes=(0, 0, 1, 1))
    steps = max(len(s) for s in hier.steps)
    assert c.seconds("hierarchical") == pytest.approx(cost(hier, cl, 4, EXECUTOR_STEP))
    assert cost(hier, cl, 4, EXECUTOR_STEP) >= cost(hier, cl) + steps * EXECUTOR_STEP * 0.999


def test_explain_names_every_candidate_and_the_choice() -> None:
    cl = cluster((0, 0, 1, 1))
    text = explain(choose("allreduce", 4 << 20, cl), cl)
    for alg in ("native", *ALGORITHMS):
        assert alg in text
    assert "<- chosen" in text and "measured" in text
    assert "not calibrated" in explain(choose("allreduce", 100, Cluster((0, 1))), Cluster((0, 1)))


def test_explain_says_which_links_are_measured_and_which_are_defaults() -> None:
    """On one node nothing is measured between nodes: the inter figures are labelled defaults, never measured."""
    one_node = Cluster((0, 0), intra=LinkCost(4e-6, 1 / 8e9), gamma=1 / 14e9)
    head, figures = explain(choose("allreduce", 1 << 20, one_node), one_node).splitlines()[:2]
    assert "links measured: intra, reduce; defaults: inter (not used: one node):" in head, head
    assert "inter alpha 50.0 us, 1.10 GB/s" in figures  # DEFAULT_INTER's figures, shown under that label
    spread = Cluster((0, 1), inter=LinkCost(4e-6, 1 / 8e9))
    head = explain(choose("allreduce", 1 << 20, spread), spread).splitlines()[0]
    assert "links measured: inter; defaults: intra (not used: one rank per node), reduce:" in head, head
    full = cluster((0, 0, 1, 1))
    assert "links measured:\n" in explain(choose("allreduce", 1 << 20, full), full)


def test_node_bus_is_shared_by_transfers_inside_it() -> None:
    """With a node-wide rate, the ring's 2(P-1)P transfers queue on the node: their bytes at its rate, plus one latency."""
    from collective.topologies.cost import SharedLinkCost

    P, n = 4, 4000 * 4
    b = 4 * n / P
    fast_ranks = SharedLinkCost(alpha=1e-5, beta=1e-10, shared_beta=1e-9)  # the node, not the ranks, limits
    cl = Cluster((0,) * P, intra=fast_ranks, gamma=0.0)
    assert cost(build("ring", "allreduce", P, n), cl) == pytest.approx(1e-5 + 2 * (P - 1) * P * b * 1e-9)
    # One transfer alone is limited by the slower of its rank ports and the node.
    assert cost(build("star", "broadcast", 2, n), Cluster((0, 0), intra=fast_ranks)) == pytest.approx(
        1e-5 + 4 * n * 1e-9)


@pytest.mark.parametrize("P", [8, 16, 17])
def test_pipeline_is_priced_by_its_pieces(P: int) -> None:
    """One rank per node, 4 MiB: 16 pieces approach the root's out-link bound (2 n beta: two children), well under
    one piece (D hops of n each) and the binomial tree; no hand-written formula, the replay of its steps."""
    assert "pipeline" in CANDIDATES
    cl = cluster(tuple(range(P)))
    n, k = 1 << 20, 16
    D = P.bit_length() - 1
    b = 4 * n / k
    for collective in ("broadcast", "reduce"):
        one = cost(build("pipeline", collective, P, n, pieces=1), cl)
        many = cost(build("pipeline", collective, P, n, pieces=k), cl)
        tree = cost(build("tree", collective, P, n), cl)
        assert 2 * 4 * n * INTER.beta <= many <= (D + k - 1) * (INTER.alpha + 2 * b * (INTER.beta + GAMMA))
        assert many < 0.75 * tree and many < 0.6 * one, (collective, many, tree, one)


@pytest.mark.parametrize("P", [2, 3, 4, 6, 8])
def test_rabenseifner_model_moves_what_hierarchical_moves(P: int) -> None:
    """The model of MPI's large-message allreduce: per power-of-two rank, 2(p-1)/p of N in halving/doubling steps."""
    from collective.topologies.cost import rabenseifner_allreduce, traffic

    n = 1 << 12
    s = rabenseifner_allreduce(P, n)
    p = 1 << (P.bit_length() - 1)
    steps = {len(s.steps[r]) for r in range(p)}
    assert steps == {2 * (p.bit_length() - 1) + (2 if P > p and 0 < P - p else 0)} or P != p
    if P == p and P % 2 == 0:
        nodes = tuple(r // (P // 2) for r in range(P))
        across = traffic(s, nodes)
        # each node sends N/2 in the reduce-scatter and N/2 in the allgather, like hierarchical
        assert across == {(0, 1): n, (1, 0): n}
        hier = traffic(build("hierarchical", "allreduce", P, n, nodes=nodes), nodes)
        assert across == hier


# -- the in/out collectives: alltoall, gather, scatter, allgatherv ----------------------------------------------------


def test_candidates_per_collective() -> None:
    from collective.topologies import ALGORITHMS_BY_COLLECTIVE
    from collective.topologies.cost import candidates_for

    assert candidates_for("alltoall") == ("native", "pairwise", "bruck")
    assert candidates_for("gather") == candidates_for("scatter") == ("native", "tree")
    assert candidates_for("allgatherv") == ("native", "ring")
    for collective in COLLECTIVES:
        assert candidates_for(collective) == CANDIDATES  # the choices of before, unchanged
    assert set(ALGORITHMS_BY_COLLECTIVE) >= set(COLLECTIVES)
    with pytest.raises(ValueError, match="unknown collective"):
        candidates_for("alltoallw")


@pytest.mark.parametrize("collective", ["alltoall", "gather", "scatter", "allgatherv"])
def test_in_out_choice_table_is_complete_and_sorted(collective: str) -> None:
    from collective.topologies.cost import candidates_for

    cl = cluster((0, 0, 1, 1, 2))
    c = choose(collective, 1 << 16, cl, root=3)
    assert sorted(a for a, _ in c.predictions) == sorted(candidates_for(collective))
    times = [t for _, t in c.predictions]
    assert times == sorted(times) and all(t > 0 for t in times)
    # MPI's own runs the same shapes (and linear ones) in C, without our per-step Python: never slower in the model.
    assert c.best == "native"
    assert "native" not in [a for a, _ in choose(collective, 1 << 16, cl, candidates=candidates_for(collective)[1:],
                                                 root=3).predictions]


@pytest.mark.parametrize("P", [4, 8, 16])
def test_bruck_for_small_alltoall_pairwise_for_large(P: int) -> None:
    """Without MPI's own (a dtype MPI lacks), auto picks Bruck's log steps for small blocks, pairwise's fewer bytes
    for large ones, on one node and across nodes."""
    for nodes in ((0,) * P, tuple(r * 2 // P for r in range(P))):
        cl = cluster(nodes)
        small = choose("alltoall", 64 * P, cl, candidates=("pairwise", "bruck"))
        large = choose("alltoall", (16 << 20), cl, candidates=("pairwise", "bruck"))
        assert (small.best, large.best) == ("bruck", "pairwise"), nodes
        assert small.seconds("pairwise") > (1.1 if P == 4 else 1.5) * small.seconds("bruck")


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_pairwise_closed_form(P: int) -> None:
    """One node: the own-block copy, then P-1 steps of alpha + one block's bytes through each rank's ports."""
    from collective.topologies.cost import EXECUTOR_STEP

    b = 1000  # elements per block
    want = 4 * b * GAMMA + (P - 1) * (INTRA.alpha + 4 * b * INTRA.beta)
    sched = build("pairwise", "alltoall", P, b * P * P)
    assert cost(sched, cluster((0,) * P)) == pytest.approx(want)
    assert predict("alltoall", 4 * b * P, cluster((0,) * P), "pairwise") == pytest.approx(want + (P - 1) * EXECUTOR_STEP)


def test_copies_are_priced_and_one_rank_is_a_copy() -> None:
    n = 10000
    for collective, alg in (("alltoall", "pairwise"), ("alltoall", "bruck"), ("gather", "tree"), ("scatter", "tree"),
                            ("allgatherv", "ring")):
        assert cost(build(alg, collective, 1, n), cluster((0,))) == pytest.approx(4 * n * GAMMA)
    # Bruck's packing copies cost on top of its messages: more than a copy-free exchange of the same bytes.
    b8 = build("bruck", "alltoall", 8, 8 * 8 * 100)
    assert sum(s.stop - s.start for st in b8.steps[0] for s in st.copies) > 0


def test_native_gather_scatter_is_the_cheaper_of_tree_and_linear() -> None:
    """MPI's own gather/scatter is modelled by a binomial tree or the linear one-step shape, whichever costs less."""
    from collective.topologies.cost import linear_gather, linear_scatter

    P = 8
    cl = cluster(tuple(range(P)))
    for n in (8, 8 << 20):
        for lin, coll in ((linear_gather(P, n, 3), "gather"), (linear_scatter(P, n, 3), "scatter")):
            tree = build("tree", coll, P, n, 3)
            assert predict(coll, 4 * n // P if coll == "gather" else 4 * n, cl, "native", root=3) == pytest.approx(
                min(cost(tree, cl), cost(lin, cl)))
