"""Every Schedule builder, proven correct by the simulator for many rank counts, sizes, roots and blocks; no MPI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import topologies
from topologies import (
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
    data=st.data(),
)
def test_random(algorithm: str, collective: str, P: int, n: int, data: st.DataObject) -> None:
    root = data.draw(st.integers(0, P - 1), label="root")
    blocks = None
    if data.draw(st.booleans(), label="custom blocks"):
        cuts = data.draw(st.lists(st.integers(0, n), min_size=P - 1, max_size=P - 1), label="cuts")
        blocks = (0, *sorted(cuts), n)
    verify(build(algorithm, collective, P, n, root, blocks), seed=n)


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
