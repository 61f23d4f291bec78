"""How the ranks of a node wait in a shm phase: agreed by every rank, and both ways give the same answers."""
from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

import collective as col
from collective.errors import CollectiveValueError
from collective.shm import ShmArena, _cpu_quota, _fenced, _own_cpus
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
world = comm.mpi_comm
cases = Cases(comm)


def agreed() -> None:
    """Every rank of the node waits the same way; a forced COLLECTIVE_SHM_WAIT is what they do."""
    arena = comm.node_arena()
    every = np.empty(P, np.int32)
    world.Allgather(np.array([arena.spins], np.int32), every)
    assert (every == every[0]).all(), f"ranks disagree on spinning: {every}"
    want = os.environ.get("COLLECTIVE_SHM_WAIT")
    if want in ("spin", "barrier"):
        assert arena.spins == (want == "spin"), f"COLLECTIVE_SHM_WAIT={want} but spins={arena.spins}"
    else:  # auto: a CPU of its own for every rank, within the quota
        cpus = world.allgather(sorted(os.sched_getaffinity(0)))  # test-side bookkeeping, not the data path
        quota = _cpu_quota()
        fits = _own_cpus([set(c) for c in cpus]) and (quota is None or P <= quota)
        assert arena.spins == fits, f"affinities {cpus}, quota {quota}: spins={arena.spins}"
    fences = os.environ.get("COLLECTIVE_SHM_FENCES", "auto")
    assert (arena.fence is not None) is _fenced(fences), f"COLLECTIVE_SHM_FENCES={fences}: fence {arena.fence}"


cases.run("wait agreed", agreed)


def mixed() -> None:
    """One rank asking for spin while another asks for a barrier: all take the barrier, and phases still meet."""
    for wants in ([("spin" if r == 0 else "barrier") for r in range(P)], ["spin"] * P, ["barrier"] * P):
        node = world.Split_type(MPI.COMM_TYPE_SHARED, key=R)
        arena = ShmArena(node, 4096, wants[R])
        try:
            assert arena.spins is (set(wants) == {"spin"}), f"{wants}: spins={arena.spins}"
            for n in (1, 1000, 5000):  # one phase, then several 4 KiB chunks (two phases each)
                out = np.empty(n)
                for rep in range(3):  # new values every call: a read of the last call's data shows
                    x = np.arange(n, dtype=np.float64) + R + 1000 * rep + n
                    arena.allreduce(x, out, np.add)
                    want = P * (np.arange(n) + 1000 * rep + n) + P * (P - 1) / 2
                    assert np.array_equal(out, want), f"{wants} n={n} rep {rep}"
            assert arena.waiting_on() == (), arena.waiting_on()
            for seq in range(4):  # the check's exchange (consecutive calls): agreeing, then disagreeing fingerprints
                assert arena.exchange(1000 + seq, seq)
            assert arena.exchange(7 if R == 0 else 8, 4) is (P == 1)
        finally:
            arena.free()
            node.Free()


cases.run("mixed wishes", mixed)


def bad_value() -> None:
    """An unknown COLLECTIVE_SHM_WAIT is refused at init, naming the variable, before any collective."""
    old = os.environ.get("COLLECTIVE_SHM_WAIT")
    os.environ["COLLECTIVE_SHM_WAIT"] = "sometimes"
    try:
        col.Communicator()
    except CollectiveValueError as e:
        assert "COLLECTIVE_SHM_WAIT='sometimes'" in str(e) and "spin" in str(e), str(e)
    else:
        raise AssertionError("COLLECTIVE_SHM_WAIT=sometimes was accepted")
    finally:
        if old is None:
            del os.environ["COLLECTIVE_SHM_WAIT"]
        else:
            os.environ["COLLECTIVE_SHM_WAIT"] = old


cases.run("bad value", bad_value)


def behind() -> None:
    """A rank far behind (0.3 s), before a call and between the phases of one: the others wait (spin, yield,
    then nap, using a fraction of a core where they spin) and get the right sums, on the small quick path too."""
    import time
    arena = comm.node_arena()
    for rep in range(6):  # the third call on is the prepared one-phase path (check and data in one phase)
        late = rep in (1, 4)
        if late and R == P - 1:
            time.sleep(0.3)
        cpu, wall = time.process_time(), time.perf_counter()
        y = comm.allreduce(np.full(8, R + 1.0 + rep), algorithm="shm")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert np.array_equal(y, np.full(8, P * (P + 1) / 2 + P * rep)), y
        if late and R != P - 1 and arena.spins:
            assert wall > 0.2 and cpu < 0.6 * wall, f"waited {wall:.3f} s using {cpu:.3f} s of CPU"
    # Late between the two phases of each 4 MiB chunk: rank P-1 ends every second phase 50 ms late.
    real_phase = arena.phase
    count = [0]

    def slow_phase() -> None:
        count[0] += 1
        if count[0] % 2 == 0:
            time.sleep(0.05)
        real_phase()

    if R == P - 1:
        arena.phase = slow_phase  # type: ignore[method-assign]
    single_copy, arena.cma = arena.cma, None  # the copy-in path's chunks: a phase pair each
    try:
        n = 3 * (4 << 20) // 8 + 5
        x = np.arange(n, dtype=np.float64) * (R + 1)
        y = comm.allreduce(x, algorithm="shm")
        assert np.array_equal(y, np.arange(n, dtype=np.float64) * (P * (P + 1) / 2)), "late between phases"
    finally:
        arena.phase = real_phase  # type: ignore[method-assign]
        arena.cma = single_copy
    assert R != P - 1 or count[0] >= 3, count


cases.run("a rank behind", behind)
cases.finish()
