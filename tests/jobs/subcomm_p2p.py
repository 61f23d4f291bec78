"""Sub-communicators (split, subgroup, nested) with every algorithm, interleaved with the parent; send/recv."""
from __future__ import annotations

import numpy as np

import collective as col
from collective.errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError, CollectiveValueError
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
ALGS = ["auto", "native", "ring", "tree", "star", "hierarchical", "pipeline", "shm"]


def check_group(sub, members: list[int], what: str, parent: bool = True) -> None:
    """Every collective and algorithm on ``sub`` (whose ranks are parent ranks ``members``), parent calls between."""
    assert sub.size == len(members) and members[sub.rank] == R, (what, sub.size, sub.rank, members)
    want = sum(m + 1 for m in members)
    for alg in ALGS:
        for n in (1, 1000, 70_000):
            x = np.full(n, R + 1, np.float64)
            y = sub.allreduce(x, algorithm=alg)
            assert (y == want).all(), f"{what}: allreduce {alg} {n}"
            if parent:  # the parent, interleaved (only where every parent rank is in some group)
                z = comm.allreduce(np.ones(3), algorithm="ring")
                assert (z == P).all()
            b = sub.broadcast(np.full(n, R, np.int32), root=sub.size - 1, algorithm=alg)
            assert (b == members[-1]).all(), f"{what}: broadcast {alg}"
            g = sub.allgather(np.full((1, 2), R, np.int64), algorithm=alg)
            assert (g[:, 0] == members).all(), f"{what}: allgather {alg}"
    rows = sub.allgather(np.full((sub.rank + 1, 2), R, np.int64))  # uneven rows
    assert rows.shape[0] == sub.size * (sub.size + 1) // 2
    a = sub.alltoall(np.full(sub.size, R, np.int32))
    assert (a == members).all(), f"{what}: alltoall"
    gathered = sub.gather(np.array([R]), root=0)
    assert (gathered == members).all() if sub.rank == 0 else gathered is None
    w = sub.allreduce_async(np.ones(5))
    assert (w.wait() == sub.size).all()


def parity() -> None:
    sub = comm.split(R % 2, key=-R)  # key: reverse order within each half
    members = sorted([q for q in range(P) if q % 2 == R % 2], reverse=True)
    check_group(sub, members, "parity")
    sub.close()


def halves_and_nested() -> None:
    half = comm.split(0 if R < P // 2 else 1)
    members = [q for q in range(P) if (q < P // 2) == (R < P // 2)]
    check_group(half, members, "halves")
    inner = half.split(half.rank % 2)  # a split of a split
    check_group(inner, [m for i, m in enumerate(members) if i % 2 == half.rank % 2], "nested")
    inner.close()
    half.close()


def excluded() -> None:
    sub = comm.split(None if R == P - 1 else 7)
    if R == P - 1:
        assert sub is None
    else:
        check_group(sub, list(range(P - 1)), "one rank excluded", parent=False)
        sub.close()
    g = comm.subgroup([P - 1, 0]) if R in (0, P - 1) or R % 2 else None  # non-members may call it or not
    if R in (0, P - 1):
        assert g.rank == [P - 1, 0].index(R)
        y = g.allreduce(np.array([R + 1.0]))
        assert y[0] == (P - 1 + 1) + 1
        g.close()
    else:
        assert g is None


def errors_name_world_ranks() -> None:
    sub = comm.split(R % 2)
    if sub.size > 1:
        try:
            sub.allreduce(np.ones(3 + (sub.rank == sub.size - 1)))
        except CollectiveMismatchError as exc:
            assert "world rank" in str(exc), str(exc)
        else:
            raise AssertionError("no mismatch raised on the sub-communicator")
    sub.close()
    # Colors and keys MPI cannot take are refused before the op: the communicator goes on.
    for color, key in ((2**31, 0), (np.int64(2**40), 0), (0, 2**31), (0, -2**31 - 1), (-1, 0), (True, 0)):
        try:
            comm.split(color, key)
        except CollectiveValueError as exc:
            assert "color must be None or an integer" in str(exc), str(exc)
        else:
            raise AssertionError(f"split({color!r}, {key!r}) was accepted")
    assert comm.broken is None and (comm.allreduce(np.ones(2)) == P).all()
    edge = comm.split(2**31 - 1, key=-2**31)
    assert edge.size == P
    edge.close()
    try:
        comm.subgroup([0, 0])
    except CollectiveValueError as exc:
        assert "distinct" in str(exc)
    else:
        raise AssertionError("a bad subgroup was accepted")


def sendrecv() -> None:
    if P == 1:
        return
    right, left = (R + 1) % P, (R - 1) % P
    x = np.arange(10, dtype=np.float32) + R
    w = comm.isend(x, right, tag=3)
    out = np.empty(10, np.float32)
    src = comm.recv(out, left, tag=3)
    w.wait()
    assert src == left and (out == np.arange(10) + left).all()
    # an extension dtype (bfloat16) is named in the header as itself
    import ml_dtypes

    bf = (np.arange(6, dtype=np.float32) + R).astype(ml_dtypes.bfloat16)
    w = comm.isend(bf, right, tag=4)
    got = np.empty(6, ml_dtypes.bfloat16)
    comm.recv(got, left, tag=4)
    w.wait()
    assert (got.astype(np.float32) == np.arange(6) + left).all()
    # any source
    if R == 0:
        got = set()
        for _ in range(P - 1):
            buf = np.empty(2, np.int64)
            got.add(comm.recv(buf, col.ANY_SOURCE, tag=5))
            assert buf[0] == buf[1] * 10
        assert got == set(range(1, P))
    else:
        comm.send(np.array([R * 10, R], np.int64), 0, tag=5)
    # a message that does not fit out: raises naming both ranks and sizes; nothing is left on the wire
    if R == 0:
        comm.send(np.ones(8, np.float64), 1, tag=9)
        comm.send(np.ones(4, np.float64), 1, tag=9)
    elif R == 1:
        try:
            comm.recv(np.empty(4, np.float64), 0, tag=9)
        except CollectiveValueError as exc:
            assert "rank 0" in str(exc) and "64 bytes" in str(exc) and "32 bytes" in str(exc), str(exc)
        else:
            raise AssertionError("an oversized message was accepted")
        good = np.empty(4, np.float64)
        comm.recv(good, 0, tag=9)
        assert (good == 1).all()
    # a receive nothing matches gives up at its timeout
    if R == 1:
        try:
            comm.irecv(np.empty(1), 0, tag=11).wait(timeout=0.3)
        except CollectiveTimeoutError:
            pass
        else:
            raise AssertionError("an unmatched receive did not time out")
    try:
        comm.send(np.ones(1), P + 5)
    except CollectiveValueError:
        pass
    else:
        raise AssertionError("a bad destination was accepted")
    comm.barrier()


for name, fn in [("parity", parity), ("halves and nested", halves_and_nested), ("excluded", excluded),
                 ("errors", errors_name_world_ranks), ("send/recv", sendrecv)]:
    cases.run(name, fn)
cases.finish()
