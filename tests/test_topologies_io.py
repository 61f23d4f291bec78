"""The in/out Schedules (alltoall, gather, scatter, allgatherv) proven by the simulator, with their textbook counts."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collective.topologies import (
    ALL_COLLECTIVES,
    ALGORITHMS_BY_COLLECTIVE,
    COLLECTIVES,
    IN_OUT_COLLECTIVES,
    Copy,
    Recv,
    Schedule,
    ScheduleError,
    Send,
    Step,
    build,
    offsets,
    simulate,
    stats,
    verify,
)

SIZES = [*range(1, 18), 32, 33]
ROOTED = ("gather", "scatter")
CASES = [(c, a) for c in IN_OUT_COLLECTIVES for a in ALGORITHMS_BY_COLLECTIVE[c]]


def ceil_log2(P: int) -> int:
    return (P - 1).bit_length()


def roots(collective: str, P: int) -> list[int]:
    if collective not in ROOTED:
        return [0]
    return list(range(P)) if P <= 9 else sorted({0, 1, P // 2, P - 1})


def layouts(P: int, rng: np.random.Generator) -> list[list[int]]:
    """Per-rank sizes: none, one element, fewer elements than ranks, even, uneven with empty blocks, one rank only."""
    return [
        [0] * P,
        [1] + [0] * (P - 1),
        [int(r % 2 == 1) for r in range(P)][:P],
        [3] * P,
        [int(v) for v in rng.integers(0, 5, size=P)],
        [0] * (P - 1) + [11],
    ]


def matrices(P: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """alltoall counts: none, one element, even, random with zeros, a silent rank and a deaf one, one big sender."""
    return [
        [[0] * P for _ in range(P)],
        [[int(i == P - 1 and j == 0) for j in range(P)] for i in range(P)],
        [[2] * P for _ in range(P)],
        [[int(v) for v in row] for row in rng.integers(0, 4, size=(P, P))],
        [[0 if i == 0 or j == P - 1 else 1 for j in range(P)] for i in range(P)],
        [[9 * int(i == P // 2) + int(j == i) for j in range(P)] for i in range(P)],
    ]


@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("collective, algorithm", CASES)
def test_correct(collective: str, algorithm: str, P: int) -> None:
    rng = np.random.default_rng(P)
    if collective == "alltoall":
        for n in sorted({0, 1, P - 1, P * P, P * P + 3}):  # each rank's share cut evenly (counts=None)
            sched = build(algorithm, collective, P, n)
            assert sched.counts is not None and sum(map(sum, sched.counts)) == n
            verify(sched, seed=n)
        for counts in matrices(P, rng):
            sched = build(algorithm, collective, P, sum(map(sum, counts)), counts=counts)
            assert sched.counts == tuple(map(tuple, counts))
            verify(sched, seed=P)
        return
    for sizes in layouts(P, rng):
        for root in roots(collective, P):
            sched = build(algorithm, collective, P, sum(sizes), root, counts=sizes)
            assert sched.blocks == offsets(sizes) and sched.root == (root if collective in ROOTED else 0)
            verify(sched, seed=root)
    for n in (0, 1, P - 1, 4 * P + 1):  # even_blocks
        verify(build(algorithm, collective, P, n, roots(collective, P)[-1]))


def test_nothing_to_move_is_no_steps_and_one_rank_a_local_copy() -> None:
    for collective, algorithm in CASES:
        assert all(s == () for s in build(algorithm, collective, 5, 0, 0).steps)
        one = build(algorithm, collective, 1, 7, 0)
        s = stats(one)
        assert s.rounds == 0 and s.elems_sent == (0,) and s.elems_copied == (7,)
        assert one.steps[0] == (Step(copies=(one.steps[0][0].copies[0],)),)


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(CASES), P=st.integers(1, 24), data=st.data())
def test_random(case: tuple[str, str], P: int, data: st.DataObject) -> None:
    collective, algorithm = case
    root = data.draw(st.integers(0, P - 1), label="root")
    size = st.integers(0, 6) if data.draw(st.booleans(), label="small") else st.integers(0, 300)
    if collective == "alltoall":
        counts = data.draw(st.lists(st.lists(size, min_size=P, max_size=P), min_size=P, max_size=P), label="counts")
        verify(build(algorithm, collective, P, sum(map(sum, counts)), counts=counts), seed=P)
    else:
        sizes = data.draw(st.lists(size, min_size=P, max_size=P), label="sizes")
        verify(build(algorithm, collective, P, sum(sizes), root, counts=sizes), seed=root)


# -- the textbook figures ---------------------------------------------------------------------------------------------


def comm_steps(sched: Schedule, r: int) -> int:
    return sum(1 for step in sched.steps[r] if step.sends or step.recvs)


@pytest.mark.parametrize("P", [*range(2, 18), 32, 33])
def test_pairwise_is_p_minus_1_steps_of_one_block(P: int) -> None:
    b = 5
    sched = build("pairwise", "alltoall", P, b * P * P)
    s = stats(sched)
    assert s.rounds == P - 1 and s.steps == (P - 1,) * P
    assert s.elems_sent == ((P - 1) * b,) * P == s.elems_received  # (P-1)/P of each rank's input
    assert s.messages_sent == (P - 1,) * P and s.elems_copied == (b,) * P  # its own block stays, copied
    for r in range(P):
        for k, step in enumerate(sched.steps[r], start=1):
            assert [x.peer for x in step.sends] == [(r + k) % P] and [x.peer for x in step.recvs] == [(r - k) % P]


@pytest.mark.parametrize("P", [*range(2, 18), 32, 33])
def test_bruck_is_log_steps_of_half_the_blocks(P: int) -> None:
    b, K = 3, ceil_log2(P)
    sched = build("bruck", "alltoall", P, b * P * P)
    s = stats(sched)
    moved = sum(1 for k in range(K) for i in range(1, P) if i >> k & 1)  # slots sent, over all steps
    assert s.rounds == K
    assert all(comm_steps(sched, r) == K for r in range(P)) and s.messages_sent == (K,) * P
    assert s.elems_sent == (b * moved,) * P
    if P & (P - 1) == 0:
        assert moved == K * P // 2  # half the blocks in every step
    # Fewer messages than pairwise wherever P > 2, more elements wherever P > 3.
    pw = stats(build("pairwise", "alltoall", P, b * P * P))
    assert sum(s.messages_sent) <= sum(pw.messages_sent)
    assert P <= 3 or sum(s.elems_sent) > sum(pw.elems_sent)
    # The temp buffer: the packed receive areas and one stage; input and output are the caller's.
    assert all(sched.extent("temp", r) <= (K + 1) * b * P for r in range(P))


@pytest.mark.parametrize("P", [*range(2, 18), 32, 33])
def test_binomial_gather_scatter_are_log_rounds_moving_each_block_once_per_level(P: int) -> None:
    b = 4
    for root in roots("gather", P):
        g, sc = build("tree", "gather", P, b * P, root), build("tree", "scatter", P, b * P, root)
        for sched in (g, sc):
            assert stats(sched).rounds == ceil_log2(P)
            assert max(comm_steps(sched, r) for r in range(P)) <= ceil_log2(P) + (sched.collective == "scatter")
        sg, ss = stats(g), stats(sc)
        assert sg.elems_received[root] == (P - 1) * b and ss.elems_sent[root] == (P - 1) * b
        # Every other rank sends (gather) / receives (scatter) its subtree once: one message, two at the wrap.
        for r in range(P):
            if r != root:
                assert 1 <= sg.messages_sent[r] <= 2 and len([x for x in sc.steps[r] if x.recvs]) == 1
        assert sum(sg.elems_sent) == sum(ss.elems_received)
        # Each block travels once per tree level above it: sum of depths * b, where depth = popcount(vrank).
        depth = sum(v.bit_count() for v in range(P))
        assert sum(sg.elems_sent) == b * depth
        assert sum(sg.messages_sent) <= P  # P-1 edges, and at most one subtree wraps around rank P-1 -> 0
    assert sum(stats(build("tree", "gather", P, b * P, 0)).messages_sent) == P - 1  # root 0: nothing wraps


@pytest.mark.parametrize("P", [*range(2, 18), 32, 33])
def test_ring_allgatherv_is_p_minus_1_steps(P: int) -> None:
    rng = np.random.default_rng(P)
    sizes = [int(v) + 1 for v in rng.integers(0, 7, size=P)]
    n = sum(sizes)
    s = stats(build("ring", "allgatherv", P, n, counts=sizes))
    assert s.rounds == P - 1 and s.steps == (P - 1,) * P
    assert s.elems_sent == tuple(n - sizes[(r + 1) % P] for r in range(P))  # every block but the right neighbour's
    assert s.elems_received == tuple(n - sizes[r] for r in range(P))
    assert s.elems_copied == tuple(sizes)
    # Empty blocks: their transfers vanish on both ends, never deadlock.
    sizes[P // 2] = 0
    verify(build("ring", "allgatherv", P, sum(sizes), counts=sizes))


def test_ring_allgatherv_keeps_a_nodes_ranks_adjacent() -> None:
    sched = build("ring", "allgatherv", 4, 10, nodes=(0, 1, 0, 1), counts=[1, 2, 3, 4])
    verify(sched)
    assert {x.peer for st in sched.steps[0] for x in st.sends} == {2}  # order 0, 2, 1, 3


# -- the API ----------------------------------------------------------------------------------------------------------


def test_table_and_build() -> None:
    assert set(ALL_COLLECTIVES) == set(COLLECTIVES) | set(IN_OUT_COLLECTIVES)
    assert set(ALGORITHMS_BY_COLLECTIVE) == set(ALL_COLLECTIVES)
    assert ALGORITHMS_BY_COLLECTIVE["alltoall"] == ("pairwise", "bruck")
    # counts for the per-rank collectives are the same as blocks: the same cached Schedule.
    assert build("tree", "gather", 4, 10, 2, counts=[4, 0, 3, 3]) is build("tree", "gather", 4, 10, 2, (0, 4, 4, 7, 10))
    a = build("pairwise", "alltoall", 3, 9, counts=np.array([[1, 2, 0], [3, 0, 1], [0, 0, 2]]))
    assert a is build("pairwise", "alltoall", 3, 9, counts=((1, 2, 0), (3, 0, 1), (0, 0, 2)))
    assert a.blocks == (0, 3, 7, 9)
    assert build("bruck", "alltoall", 3, 7, blocks=(0, 3, 3, 7)).counts == ((1, 1, 1), (0, 0, 0), (2, 1, 1))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("pairwise", "allreduce", 4, 10), {}, "unknown collective for this algorithm"),
        (("ring", "gather", 4, 10), {}, "unknown collective for this algorithm"),
        (("bruck", "alltoall", 2, 3), {"counts": [[1, 1], [1]]}, "2 x 2"),
        (("bruck", "alltoall", 2, 3), {"counts": [[1, 1], [1, 1]]}, "sum to 4"),
        (("pairwise", "alltoall", 2, 2), {"counts": [[1, -1], [1, 1]]}, ">= 0"),
        (("pairwise", "alltoall", 2, 2), {"counts": [[1.5, 0], [0, 0]]}, "integers"),
        (("pairwise", "alltoall", 2, 4), {"counts": [[1, 1], [1, 1]], "blocks": (0, 1, 4)}, "disagree"),
        (("tree", "gather", 3, 4), {"counts": [1, 3]}, "must be 3"),
        (("tree", "scatter", 3, 4, 3), {}, "root"),
        (("ring", "allgather", 3, 3), {"counts": [1, 1, 1]}, "counts is for"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        build(*args, **kwargs)
    assert f"'{args[0]}'" in str(info.value) and f"'{args[1]}'" in str(info.value)


# -- the simulator catches broken in/out schedules --------------------------------------------------------------------


def two(rank0: tuple[Step, ...], rank1: tuple[Step, ...], temp: int = 0) -> Schedule:
    ext = {"input": (2, 2), "output": (4, 4), "temp": (temp, temp)}
    return Schedule("allgatherv", "test", 2, 4, 0, (0, 2, 4), (rank0, rank1), None, ext)


def run(sched: Schedule) -> list:
    return simulate(sched, [{"input": np.arange(2) + 10 * r} for r in range(2)])


def test_simulator_runs_copies_before_sends() -> None:
    swap = (Step((Send(1, 0, 2, "output"),), (Recv(1, 2, 4, buf="output"),), (Copy("input", 0, 2, "output", 0),)),)
    back = (Step((Send(0, 2, 4, "output"),), (Recv(0, 0, 2, buf="output"),), (Copy("input", 0, 2, "output", 2),)),)
    out = run(two(swap, back))
    assert out[0]["output"].tolist() == [0, 1, 10, 11] == out[1]["output"].tolist()
    verify(two(swap, back))


@pytest.mark.parametrize(
    "rank0, rank1, match",
    [
        ((Step(copies=(Copy("output", 0, 2, "input", 0),)),), (), "read-only"),
        ((Step(recvs=(Recv(1, 0, 2, buf="input"),)),), (Step((Send(0, 0, 2, "input"),)),), "read-only"),
        ((Step(copies=(Copy("input", 0, 3, "output", 0),)),), (), "bad or empty range"),
        ((Step(copies=(Copy("input", 0, 2, "temp", 0),)),), (), "bad or empty range"),  # temp has 0 elements
        ((Step(copies=(Copy("input", 0, 2, "work", 0),)),), (), "not one of"),
        ((Step(recvs=(Recv(1, 0, 2, buf="output"),), copies=(Copy("input", 0, 2, "output", 0),)),),
         (Step((Send(0, 0, 2, "input"),)),), "overlaps a receive"),
        ((Step(copies=(Copy("output", 0, 2, "output", 1),)),), (), "onto itself"),
    ],
)
def test_simulator_rejects(rank0: tuple[Step, ...], rank1: tuple[Step, ...], match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        run(two(rank0, rank1))


def test_verify_catches_a_misplaced_block() -> None:
    good = build("pairwise", "alltoall", 3, 18)
    steps = [list(s) for s in good.steps]
    st0 = steps[0][0]  # rank 0's own-block copy lands one element off
    c = st0.copies[0]
    steps[0][0] = Step(st0.sends, st0.recvs, (Copy(c.src, c.start, c.stop - 1, c.dst, c.dst_start + 1),))
    bad = Schedule("alltoall", "pairwise", 3, 18, 0, good.blocks, tuple(map(tuple, steps)), good.counts, good.extents)
    with pytest.raises(ScheduleError, match="rank 0 output element 0"):
        verify(bad)
    # A gather whose root forgets its own block leaves the poison there.
    g = build("tree", "gather", 4, 8, 1)
    steps = [list(s) for s in g.steps]
    steps[1] = [Step(s.sends, s.recvs) for s in steps[1]]
    with pytest.raises(ScheduleError, match="rank 1 output element 2"):
        verify(Schedule("gather", "tree", 4, 8, 1, g.blocks, tuple(map(tuple, steps)), None, g.extents))
