"""Every Schedule builder, proven correct by the simulator for many rank counts, sizes, roots and blocks; no MPI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collective import topologies
from collective.topologies import pipeline
from collective.topologies import (
    ALGORITHMS,
    COLLECTIVES,
    Recv,
    Schedule,
    ScheduleError,
    Send,
    Step,
    build,
    even_blocks,
    simulate,
    stats,
    verify,
)

ROOTED = ("reduce", "broadcast")
SIZES = [*range(1, 18), 32, 33]
PRIME = 1009


def counts(P: int) -> list[int]:
    """Zero, fewer elements than ranks, around P, and a large prime (no multiple of P)."""
    return sorted({0, 1, P - 1, P, P + 1, PRIME})


def roots(collective: str, P: int) -> list[int]:
    if collective not in ROOTED:
        return [0]
    return list(range(P)) if P <= 17 else sorted({0, 1, P // 2, P - 1})


def ceil_log2(P: int) -> int:
    return (P - 1).bit_length()


def random_blocks(rng: np.random.Generator, nelems: int, P: int) -> tuple[int, ...]:
    """P blocks of random, often empty, sizes summing to nelems."""
    cuts = sorted(int(x) for x in rng.integers(0, nelems + 1, size=P - 1))
    return (0, *cuts, nelems)


@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("collective", list(COLLECTIVES))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_correct(algorithm: str, collective: str, P: int) -> None:
    for n in counts(P):
        for root in roots(collective, P):
            sched = build(algorithm, collective, P, n, root)
            assert (sched.nranks, sched.nelems, sched.blocks) == (P, n, even_blocks(n, P))
            assert sched.root == (root if collective in ROOTED else 0)
            if P == 1 or n == 0:
                assert all(s == () for s in sched.steps), "nothing to move, so no steps"
            verify(sched, seed=n + root)


@pytest.mark.parametrize("P", [2, 3, 4, 5, 7, 8, 13, 16, 17, 33])
@pytest.mark.parametrize("collective", list(COLLECTIVES))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_uneven_blocks(algorithm: str, collective: str, P: int) -> None:
    rng = np.random.default_rng(P)
    n = 3 * P + 2
    layouts = [
        (0, *[n] * P),  # everything in block 0, the rest empty
        (*[0] * P, n),  # everything in the last block
        tuple(min(n, (r // 2) * 7) for r in range(P)) + (n,),  # every other block empty
        *(random_blocks(rng, n, P) for _ in range(3)),
        random_blocks(rng, P // 2, P),  # fewer elements than ranks
    ]
    for blocks in layouts:
        for root in roots(collective, P)[:3]:
            sched = build(algorithm, collective, P, blocks[-1], root, blocks)
            assert sched.blocks == blocks
            verify(sched)


@settings(max_examples=150, deadline=None)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    collective=st.sampled_from(list(COLLECTIVES)),
    P=st.integers(1, 40),
    n=st.integers(0, 5000),
    pieces=st.one_of(st.none(), st.integers(1, 80)),
    data=st.data(),
)
def test_random(algorithm: str, collective: str, P: int, n: int, pieces: int | None, data: st.DataObject) -> None:
    root = data.draw(st.integers(0, P - 1), label="root")
    blocks = None
    if data.draw(st.booleans(), label="custom blocks"):
        cuts = data.draw(st.lists(st.integers(0, n), min_size=P - 1, max_size=P - 1), label="cuts")
        blocks = (0, *sorted(cuts), n)
    # pieces: the pipeline's piece count (None: its own rule); the other algorithms ignore it.
    verify(build(algorithm, collective, P, n, root, blocks, pieces=pieces), seed=n)


# -- the textbook figures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("P", [2, 3, 4, 5, 8, 16, 17])
def test_ring_allreduce_is_bandwidth_optimal(P: int) -> None:
    n = 12 * P
    s = stats(build("ring", "allreduce", P, n))
    assert s.steps == (2 * (P - 1),) * P
    assert s.elems_sent == (2 * (P - 1) * n // P,) * P
    assert s.elems_reduced == ((P - 1) * n // P,) * P
    assert s.rounds == 2 * (P - 1)


@pytest.mark.parametrize("P", [2, 3, 4, 5, 8, 16, 17])
def test_ring_reduce_scatter_and_allgather(P: int) -> None:
    n = 5 * P
    for collective in ("reduce_scatter", "allgather"):
        s = stats(build("ring", collective, P, n))
        assert s.rounds == P - 1
        assert s.elems_sent == ((P - 1) * n // P,) * P


@pytest.mark.parametrize("P", [*range(2, 18), 32, 33])
def test_tree_rounds_are_logarithmic(P: int) -> None:
    for root in roots("reduce", P):
        assert stats(build("tree", "reduce", P, 100, root)).rounds == ceil_log2(P)
        assert stats(build("tree", "broadcast", P, 100, root)).rounds == ceil_log2(P)
    for collective in ("allreduce", "reduce_scatter", "allgather"):
        assert stats(build("tree", collective, P, 100 * P)).rounds == 2 * ceil_log2(P)
    # Every rank does at most one step per round.
    assert max(stats(build("tree", "allreduce", P, 100)).steps) <= 2 * ceil_log2(P)
    # Gather and scatter move each block to or from rank 0 once, not whole subtrees' worth more.
    n = 10 * P
    assert stats(build("tree", "allgather", P, n)).elems_received[0] == n - n // P
    assert stats(build("tree", "reduce_scatter", P, n)).elems_sent[0] == n - n // P


@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("collective", list(COLLECTIVES))
def test_pipeline_many_pieces(collective: str, P: int) -> None:
    """Small buffers cut into many pieces (the rule alone gives one piece below 32K elements)."""
    for n in counts(P):
        for k in (2, 3, 8, max(1, min(n, 64))):  # up to one element per piece
            for root in roots(collective, P)[:5]:
                sched = build("pipeline", collective, P, n, root, pieces=k)
                verify(sched, seed=n + root + k)
    rng = np.random.default_rng(P)
    for _ in range(3):  # uneven, often empty, blocks with several pieces that straddle them
        blocks = random_blocks(rng, 50, P)
        verify(build("pipeline", collective, P, 50, P - 1 if collective in ROOTED else 0, blocks, pieces=6))


@pytest.mark.parametrize("P", [*range(2, 18), 32, 33])
def test_pipeline_rounds_are_depth_plus_pieces(P: int) -> None:
    """D + k - 1 rounds each way (D = floor(log2 P)), where a binomial tree takes ceil(log2 P) rounds of n."""
    D = pipeline.depth(P)
    assert D == int(np.floor(np.log2(P)))
    for k in (1, 2, 5, 16):
        for root in roots("reduce", P)[:4]:
            assert stats(build("pipeline", "reduce", P, 1000, root, pieces=k)).rounds == D + k - 1
            assert stats(build("pipeline", "broadcast", P, 1000, root, pieces=k)).rounds == D + k - 1
        assert stats(build("pipeline", "allreduce", P, 1000, pieces=k)).rounds == 2 * (D + k - 1)
        assert stats(build("pipeline", "reduce_scatter", P, 1000, pieces=k)).rounds == D + k
        assert stats(build("pipeline", "allgather", P, 1000, pieces=k)).rounds == D + k
    # A binary tree: the root sends each piece to at most two children; every rank receives each piece once.
    n, k = 1200, 6
    s = stats(build("pipeline", "broadcast", P, n, 0, pieces=k))
    assert s.elems_sent[0] == min(P - 1, 2) * n
    assert sum(s.elems_sent) == (P - 1) * n and s.elems_received[1:] == (n,) * (P - 1)
    s = stats(build("pipeline", "reduce", P, n, 0, pieces=k))
    assert s.elems_received[0] == s.elems_reduced[0] == min(P - 1, 2) * n


@pytest.mark.parametrize("P", [4, 7, 10, 33])
def test_pipeline_forwards_while_receiving(P: int) -> None:
    """Every inner node sends piece j-1 on in the same step as piece j arrives (down), or is reduced in (up)."""
    k = 5
    parents, children = pipeline.tree(P)
    inner = [v for v in range(1, P) if children[v]]
    assert inner, "these P have inner nodes"
    for collective in ("broadcast", "reduce"):
        sched = build("pipeline", collective, P, 10 * k, 0, pieces=k)
        for v in inner:
            both = [st for st in sched.steps[v] if st.sends and st.recvs]
            assert len(both) == k - 1, f"{collective}: rank {v} overlaps {len(both)} steps"
            for step in both:
                assert all(rv.start == step.sends[0].stop for rv in step.recvs)  # the next piece


def test_pipeline_tree_and_piece_rule() -> None:
    assert pipeline.tree(1) == ((-1,), ((),))
    assert pipeline.tree(4) == ((-1, 0, 1, 0), ((1, 3), (2,), (), ()))
    for P in range(1, 70):
        parents, children = pipeline.tree(P)
        assert sorted(c for cs in children for c in cs) == list(range(1, P))
        assert all(len(cs) <= 2 for cs in children)
        assert all(parents[c] == v for v, cs in enumerate(children) for c in cs)
        depth = [0] * P
        for v in range(1, P):
            depth[v] = depth[parents[v]] + 1
        assert max(depth) == pipeline.depth(P)
    # One piece when there is nothing to pipeline through or too little data; never tiny pieces; bounded count.
    assert pipeline.piece_count(3, 1 << 24) == 1 and pipeline.piece_count(64, 1000) == 1
    assert pipeline.piece_count(8, 1 << 22) == 23
    for P in (4, 8, 33, 1000):
        for n in (1, 2 * pipeline.PIECE_ELEMS, 10**5, 10**6, 10**8):
            k = pipeline.piece_count(P, n)
            assert 1 <= k <= pipeline.MAX_PIECES and (k == 1 or n // k >= pipeline.PIECE_ELEMS)
    assert len(build("pipeline", "broadcast", 8, 1 << 22).steps[0]) == 23
    assert build("pipeline", "broadcast", 8, 5, pieces=100).steps[0] == build("pipeline", "broadcast", 8, 5,
                                                                              pieces=5).steps[0]


def test_pipeline_allreduce_same_bits_everywhere() -> None:
    """With a non-associative, non-commutative 'op', ranks agree only if each value is reduced once, then copied."""
    for P in (2, 5, 8, 13):
        sched = build("pipeline", "allreduce", P, 97, pieces=4)
        bufs = [np.arange(97, dtype=np.int64) * 7 + r for r in range(P)]
        out = simulate(sched, bufs, reduce=lambda a, b: (a * 31 + b) % 1000003)
        for r in range(1, P):
            assert np.array_equal(out[r], out[0]), f"P={P}: rank {r} differs from rank 0"
        again = simulate(sched, bufs, reduce=lambda a, b: (a * 31 + b) % 1000003)
        assert np.array_equal(again[0], out[0])


@pytest.mark.parametrize("P", [2, 3, 5, 8, 17])
def test_star_is_two_rounds_through_the_root(P: int) -> None:
    n = 100
    s = stats(build("star", "allreduce", P, n))
    assert s.rounds == 2
    assert s.elems_received[0] == s.elems_reduced[0] == (P - 1) * n
    assert s.elems_sent[0] == (P - 1) * n
    assert s.steps == (2,) * P
    for root in range(P):
        assert stats(build("star", "reduce", P, n, root)).rounds == 1
        assert stats(build("star", "broadcast", P, n, root)).rounds == 1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_rank_or_no_elements_is_zero_rounds(algorithm: str) -> None:
    for collective in COLLECTIVES:
        assert stats(build(algorithm, collective, 1, 50)).rounds == 0
        assert stats(build(algorithm, collective, 6, 0)).rounds == 0


def test_reduction_order_is_rank_order() -> None:
    """Root's receives are listed in rank order, so the result never depends on timing."""
    sched = build("star", "reduce", 5, 10, root=2)
    assert [rv.peer for rv in sched.steps[2][0].recvs] == [0, 1, 3, 4]
    # Non-commutative "op" (keep the left operand * 10 + right) exposes the order.
    bufs = [np.full(10, r, dtype=np.int64) for r in range(5)]
    out = simulate(sched, bufs, reduce=lambda a, b: a * 10 + b)
    assert out[2][0] == 20134


# -- the API ----------------------------------------------------------------------------------------------------------


def test_build_is_cached() -> None:
    a = build("ring", "allreduce", 4, 100)
    assert build("ring", "allreduce", 4, 100) is a
    blocks = [0, 10, 10, 60, 100]
    assert build("tree", "allgather", 4, 100, blocks=blocks) is build("tree", "allgather", 4, 100, blocks=tuple(blocks))
    assert build("star", "reduce_scatter", 4, 100, blocks=np.array(blocks)).blocks == tuple(blocks)
    # pieces means nothing to the others: it does not split their cache.
    assert build("ring", "allreduce", 4, 100, pieces=3) is a
    assert build("pipeline", "allreduce", 8, 100, pieces=3) is build("pipeline", "allreduce", 8, 100, pieces=3)
    assert build("pipeline", "allreduce", 8, 100, pieces=3) is not build("pipeline", "allreduce", 8, 100)


@pytest.mark.parametrize(
    "args, match",
    [
        (("ring", "allreduce", 0, 10), "nranks"),
        (("tree", "reduce", 4, -1), "nelems"),
        (("star", "broadcast", 4, 10, 4), "root"),
        (("ring", "reduce", 4, 10, -1), "root"),
        (("tree", "allreduce", 4, 10, 7), "root"),
        (("ring", "allgather", 3, 10, 0, (0, 5, 10)), "blocks"),
        (("ring", "allgather", 2, 10, 0, (0, 5, 9)), "blocks"),
        (("tree", "reduce_scatter", 2, 10, 0, (1, 5, 10)), "blocks"),
        (("star", "allgather", 3, 10, 0, (0, 6, 4, 10)), "blocks"),
        (("mesh", "allreduce", 4, 10), "unknown algorithm"),
        (("ring", "alltoall", 4, 10), "unknown collective"),
        (("pipeline", "broadcast", 4, 10, 0, None, None, 0), "pieces"),
        (("pipeline", "reduce", 4, 10, 0, None, None, -3), "pieces"),
    ],
)
def test_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        build(*args)
    assert f"'{args[0]}'" in str(info.value) and f"'{args[1]}'" in str(info.value)


def test_imports_no_transport() -> None:
    code = "import sys, topologies; bad = {'mpi4py', 'cupy', 'collective'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=topologies.__path__[0] + "/..")


# -- the simulator catches broken schedules ---------------------------------------------------------------------------


def two_ranks(rank0: tuple[Step, ...], rank1: tuple[Step, ...], n: int = 4, collective: str = "allreduce") -> Schedule:
    return Schedule(collective, "test", 2, n, 0, even_blocks(n, 2), (rank0, rank1))


def run(sched: Schedule) -> None:
    simulate(sched, [np.arange(sched.nelems) for _ in range(sched.nranks)])


def test_simulator_accepts_a_correct_exchange() -> None:
    swap = two_ranks(
        (Step((Send(1, 0, 2),), (Recv(1, 2, 4),)),),
        (Step((Send(0, 2, 4),), (Recv(0, 0, 2),)),),
    )
    out = simulate(swap, [np.arange(4), np.arange(4) + 10])
    assert out[0].tolist() == [0, 1, 12, 13] and out[1].tolist() == [0, 1, 12, 13]


@pytest.mark.parametrize(
    "rank0, rank1, match",
    [
        ((Step((Send(2, 0, 4),)),), (), "bad peer"),  # no such rank
        ((Step((Send(0, 0, 4),)),), (), "bad peer"),  # to itself
        ((Step((Send(1, 2, 2),)),), (Step(recvs=(Recv(0, 2, 2),)),), "empty range"),
        ((Step((Send(1, 0, 5),)),), (Step(recvs=(Recv(0, 0, 5),)),), "bad or empty range"),  # past the end
        ((Step((Send(1, 0, 2),)),), (Step(recvs=(Recv(0, 0, 3),)),), "which sent 2"),  # size mismatch
        ((Step(recvs=(Recv(1, 0, 4),)), Step((Send(1, 0, 4),))),
         (Step(recvs=(Recv(0, 0, 4),)), Step((Send(0, 0, 4),))), "deadlock"),  # both receive first
        ((Step((Send(1, 0, 2),), (Recv(1, 1, 3),)),), (Step((Send(0, 0, 2),), (Recv(0, 0, 2),)),), "overlaps"),
        ((Step(recvs=(Recv(1, 0, 2), Recv(1, 1, 3, reduce=True))),), (Step((Send(0, 0, 2), Send(0, 1, 3))),),
         "copy receive overlaps"),
        ((Step((Send(1, 0, 4),)),), (), "unreceived"),
    ],
)
def test_simulator_rejects(rank0: tuple[Step, ...], rank1: tuple[Step, ...], match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        run(two_ranks(rank0, rank1))


def test_simulator_catches_a_wrong_peer() -> None:
    """Rank 0 sends to rank 2 what rank 1 waits for: rank 1 never finishes."""
    sched = Schedule("broadcast", "test", 3, 4, 0, even_blocks(4, 3), (
        (Step((Send(2, 0, 4),)),),
        (Step(recvs=(Recv(0, 0, 4),)),),
        (),
    ))
    with pytest.raises(ScheduleError, match="deadlock"):
        verify(sched)


def test_verify_catches_wrong_results() -> None:
    # A ring allreduce with one reduce turned into a copy loses a contribution.
    good = build("ring", "allreduce", 4, 8)
    steps = [list(s) for s in good.steps]
    first = steps[1][0]
    steps[1][0] = Step(first.sends, tuple(Recv(rv.peer, rv.start, rv.stop, reduce=False) for rv in first.recvs))
    bad = Schedule("allreduce", "ring", 4, 8, 0, good.blocks, tuple(tuple(s) for s in steps))
    with pytest.raises(ScheduleError, match="expected"):
        verify(bad)
    # A broadcast that skips a rank leaves it holding the poison.
    good = build("star", "broadcast", 3, 5, root=1)
    skip = Schedule("broadcast", "star", 3, 5, 1, good.blocks, (
        (Step(recvs=(Recv(1, 0, 5),)),),
        (Step((Send(0, 0, 5),)),),
        (),
    ))
    with pytest.raises(ScheduleError, match="rank 2"):
        verify(skip)
    # A reduce_scatter that leaves rank r holding another block is wrong.
    shifted = build("ring", "allreduce", 3, 6)
    first_pass = tuple(s[:2] for s in shifted.steps)  # ends with block r + 1 on rank r
    with pytest.raises(ScheduleError):
        verify(Schedule("reduce_scatter", "ring", 3, 6, 0, shifted.blocks, first_pass))
