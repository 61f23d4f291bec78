"""The sizes of variable-size calls travel with the cross-rank check (tests/test_variable_counts.py).

Equal first dims cost no exchange beyond the check; uneven ones learn their
counts from the check where it is fenced in shm, and from one small
allgather where it is an MPI allreduce. Every check still runs: a trailing
shape, dtype or ``out`` that does not fit raises on every rank before any data
moves. The counts exchange is counted on a proxy of the engine's (real) MPI
communicator: an ``Allgather`` of a bare int64 array is that exchange, data
moves in ``[buffer, datatype]`` lists.
"""
from __future__ import annotations

import numpy as np
from harness import Cases

import collective as col


class Counting:
    """The engine's mpi4py communicator, counting the counts exchanges that pass through it."""

    def __init__(self, real) -> None:
        self.real = real
        self.exchanges = 0

    def Allgather(self, a, b):  # noqa: N802 - mpi4py's name
        if type(a) is np.ndarray and a.dtype == np.int64:
            self.exchanges += 1
        return self.real.Allgather(a, b)

    def __getattr__(self, name):
        return getattr(self.real, name)


def main() -> None:
    comm = col.init()
    cases = Cases(comm)
    P, R = comm.size, comm.rank
    counting = Counting(comm._engine.backend.comm)
    comm._engine.backend.comm = counting
    algs = ["auto", "native", "ring"] + (["shm"] if comm.single_node else [])

    def exchanges(fn) -> int:
        before = counting.exchanges
        fn()
        return counting.exchanges - before

    def expect_raise(fn, cls, *parts) -> None:
        try:
            fn()
        except cls as exc:
            for p in parts:
                assert p in str(exc), (p, str(exc))
            return
        raise AssertionError(f"no {cls.__name__}")

    def suite(fenced: bool) -> None:
        mode = "shm-fenced check" if fenced else "MPI check"
        for alg in algs:
            def equal(alg=alg) -> None:
                x = np.arange(6, dtype=np.float32).reshape(3, 2) + 100 * R
                want = np.concatenate([np.arange(6, dtype=np.float32).reshape(3, 2) + 100 * q for q in range(P)])
                got = {}
                n = exchanges(lambda: got.setdefault("y", comm.allgather(x, algorithm=alg)))
                assert np.array_equal(got["y"], want), got["y"]
                assert n == 0, f"equal first dims made {n} counts exchanges"
                out = np.empty((3 * P, 2), np.float32)
                n = exchanges(lambda: comm.allgather(x, algorithm=alg, out=out))
                assert np.array_equal(out, want) and n == 0, n
                z = comm.allgather(np.float64(R), algorithm=alg)  # 0-d: one row each
                assert np.array_equal(z, np.arange(P, dtype=np.float64)), z

            def uneven(alg=alg) -> None:
                for rows in (lambda q: q + 1, lambda q: 0 if q == 0 else 2, lambda q: 3 if q == P - 1 else 1):
                    x = np.full((rows(R), 3), R, np.int16)
                    want = np.concatenate([np.full((rows(q), 3), q, np.int16) for q in range(P)])
                    got = {}
                    n = exchanges(lambda: got.setdefault("y", comm.allgather(x, algorithm=alg)))
                    assert np.array_equal(got["y"], want), (got["y"], want)
                    equal_rows = len({rows(q) for q in range(P)}) == 1
                    assert n == (0 if fenced or equal_rows else 1), f"{n} counts exchanges"

            cases.run(f"{mode}: allgather equal first dims, {alg}", equal)
            if alg != "shm" or comm.single_node:
                cases.run(f"{mode}: allgather uneven first dims, {alg}", uneven)

        def gather_alltoall() -> None:
            x = np.full((2, 2), R, np.float64)
            got = {}
            n = exchanges(lambda: got.setdefault("g", comm.gather(x, root=P - 1)))
            if R == P - 1:
                assert np.array_equal(got["g"], np.repeat(np.arange(P, dtype=np.float64), 2)[:, None] * [1, 1])
            assert n == 0, n
            n = exchanges(lambda: comm.gather(np.full(R + 1, R), root=0))
            assert n == (0 if fenced or P == 1 else 1), n
            y = {}
            n = exchanges(lambda: y.setdefault("a", comm.alltoall(np.arange(3 * P) + 10 * R)))
            want = np.concatenate([np.arange(3 * R, 3 * R + 3) + 10 * q for q in range(P)])
            assert np.array_equal(y["a"], want) and n == 0, (y["a"], n)
            splits = [q % 2 for q in range(P)] if P > 1 else [2]
            n = exchanges(lambda: y.setdefault("b", comm.alltoall(np.zeros(sum(splits)), splits=splits)))
            assert n == (1 if P > 1 else 0), n  # blocks of differing sizes need every rank's splits

        cases.run(f"{mode}: gather and alltoall", gather_alltoall)

        def checks_still_hold() -> None:
            if P == 1:
                return
            x = np.zeros((2, 3 if R == 0 else 2), np.float32)  # rank 0's rows are wider
            expect_raise(lambda: comm.allgather(x), col.CollectiveMismatchError, "shape", "(-1, 3)", "(-1, 2)")
            y = np.zeros((2, 2), np.float32 if R else np.float64)
            expect_raise(lambda: comm.allgather(y), col.CollectiveMismatchError, "dtype", "float64", "float32")
            # Equal rows, but rank 1's out has one row too many: every rank raises, and nothing is written.
            out = np.full((2 * P + (1 if R == 1 else 0), 2), -1.0, np.float32)
            cls = col.CollectiveValueError if R == 1 else col.CollectiveError
            expect_raise(lambda: comm.allgather(np.ones((2, 2), np.float32), out=out), cls,
                         f"rank 1: out has {2 * P + 1} rows, the result has {2 * P}")
            assert (out == -1).all()
            # Uneven rows and a wrong out on rank 0.
            out0 = np.empty((1, 2), np.float32) if R == 0 else None
            cls = col.CollectiveValueError if R == 0 else col.CollectiveError
            expect_raise(lambda: comm.allgather(np.ones((R + 1, 2), np.float32), out=out0), cls,
                         f"rank 0: out has 1 rows, the result has {P * (P + 1) // 2}")
            assert np.array_equal(comm.allgather(np.full(2, R)), np.repeat(np.arange(P), 2))

        cases.run(f"{mode}: mismatched row shapes, dtypes and outs raise on every rank", checks_still_hold)

        def repeats() -> None:
            """Repeated calls run from a plan (no counts exchange, the check still runs); a repeat whose sizes,
            dtype or out change on one rank gets the right answer or raises on every rank, never a wrong one."""
            plans = comm._prep.vplans
            for alg in ("auto", "native", "pairwise") + (("shm",) if comm.single_node else ()):
                plans.clear()
                for it in range(4):  # equal blocks of 3 rows, fresh arrays each time
                    x = np.arange(3 * P * 2, dtype=np.float32).reshape(3 * P, 2) + 1000 * R + it
                    want = np.concatenate([x[3 * R:3 * R + 3] - 1000 * R + 1000 * q for q in range(P)])
                    y = {}
                    n = exchanges(lambda: y.setdefault("y", comm.alltoall(x, algorithm=alg, return_splits=True)))
                    assert np.array_equal(y["y"][0], want) and y["y"][1] == [3] * P, (alg, it, y)
                    assert n == 0, (alg, it, n)
                    assert len(plans) == (1 if P > 1 else 0), (alg, it, plans)  # P=1: no check, no plan
                    assert comm.trace()[-1].op == "alltoall"
                # Rank 0's blocks grow to 4 rows on a repeat: the others still run their plans' check, learn it and
                # carry on by the ordinary path; every rank gets the right rows.
                b = 4 if R == 0 else 3
                x = np.full((b * P, 2), R, np.float32)
                got, sp = comm.alltoall(x, algorithm=alg, return_splits=True)
                assert sp == [4 if q == 0 else 3 for q in range(P)], sp
                assert np.array_equal(got, np.concatenate([np.full((sp[q], 2), q, np.float32) for q in range(P)]))
                # Explicit uneven splits on the last rank only, then the repeat again.
                if P > 1:
                    sp_mine = [1] * (P - 1) + [3 * P - (P - 1)] if R == P - 1 else None
                    x = np.full((3 * P, 2), R, np.float32)
                    got, sp = comm.alltoall(x, splits=sp_mine, algorithm=alg, return_splits=True)
                    assert sp == [3] * (P - 1) + ([3 * P - (P - 1)] if R == P - 1 else [1]), sp
                    got = comm.alltoall(np.full((3 * P, 2), R, np.float32), algorithm=alg)
                    assert np.array_equal(got, np.repeat(np.arange(P, dtype=np.float32), 3)[:, None] * [1, 1])
                if P == 1:
                    continue
                # A repeat whose dtype differs on rank 1: a mismatch on every rank, before any data moves.
                comm.alltoall(np.zeros((3 * P, 2), np.float32), algorithm=alg)
                z = np.zeros((3 * P, 2), np.float64 if R == 1 else np.float32)
                expect_raise(lambda: comm.alltoall(z, algorithm=alg), col.CollectiveMismatchError, "dtype")
                # A repeat with an out one row too long on rank 1: every rank raises; no out is written.
                outs = np.full((3 * P, 2), -1.0, np.float32)
                comm.alltoall(np.zeros((3 * P, 2), np.float32), algorithm=alg, out=outs)
                comm.alltoall(np.zeros((3 * P, 2), np.float32), algorithm=alg, out=outs)
                outs[...] = -1
                o = outs if R != 1 else np.full((3 * P + 1, 2), -1.0, np.float32)
                cls = col.CollectiveValueError if R == 1 else col.CollectiveError
                expect_raise(lambda: comm.alltoall(np.zeros((3 * P, 2), np.float32), algorithm=alg, out=o), cls,
                             f"rank 1: out has {3 * P + 1} rows, the result has {3 * P}")
                assert (o == -1).all()
            for alg in algs:  # uneven allgather repeated, then one rank's rows change
                plans.clear()
                for it in range(3):
                    rows = [q + 1 + (2 if it == 2 and q == 0 else 0) for q in range(P)]  # it 2: rank 0's grow
                    x = np.full((rows[R], 3), R + it, np.int16)
                    want = np.concatenate([np.full((rows[q], 3), q + it, np.int16) for q in range(P)])
                    got = {}
                    n = exchanges(lambda: got.setdefault("y", comm.allgather(x, algorithm=alg)))
                    assert np.array_equal(got["y"], want), (alg, it, got["y"])
                    assert n == (0 if fenced or P == 1 else 1), (alg, it, n)
                if P > 1 and fenced:
                    assert plans, plans  # the last call's (rank 0 keeps its first shape's too)
                    z = np.zeros((R + 1, 3), np.int16 if R else np.int32)
                    expect_raise(lambda: comm.allgather(z, algorithm=alg), col.CollectiveMismatchError, "dtype")

        cases.run(f"{mode}: repeated alltoall and allgather", repeats)

        def equal_repeats() -> None:
            """Equal allgathers by native, ring, shm and auto on one node rerun their plan after one check (no
            counts exchange, no second check through the fixed-size path); rank 0 repeats on its bound arrays
            while the others pass fresh ones, then its rows grow: exact answers throughout. tree, star and
            pipeline are the fixed-size path's: they keep no plan."""
            plans = comm._prep.vplans
            for alg in algs:
                comm._prep.forget()
                bound = np.empty((4, 3), np.float32)
                out = np.empty((4 * P, 3), np.float32)
                for it in range(5):
                    if R == 0:
                        x, o = bound, out
                    else:
                        x, o = np.empty((4, 3), np.float32), np.empty((4 * P, 3), np.float32)
                    x[...] = np.arange(12).reshape(4, 3) + 100 * R + it
                    want = np.concatenate([np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * q + it
                                           for q in range(P)])
                    n = exchanges(lambda: comm.allgather(x, algorithm=alg, out=o))
                    assert np.array_equal(o, want), (alg, it, o)
                    assert n == 0, (alg, it, n)
                    plain = alg in ("native", "ring", "shm") or comm.single_node
                    assert len(plans) == (1 if P > 1 and plain else 0), (alg, it, plans)
                    if P > 1 and plain:
                        assert comm.trace()[-1].algorithm == alg, (alg, comm.trace()[-1].algorithm)
                rows = [6 if q == 0 else 4 for q in range(P)]  # rank 0's rows grow: uneven, by the ordinary path
                y = comm.allgather(np.full((rows[R], 3), R, np.float32), algorithm=alg)
                assert np.array_equal(y, np.concatenate([np.full((rows[q], 3), q, np.float32) for q in range(P)]))
                y = comm.allgather(bound if R == 0 else np.full((4, 3), 7.0, np.float32), algorithm=alg)
                first = np.arange(12, dtype=np.float32).reshape(4, 3) + 4  # rank 0's bound array, as of it 4
                assert np.array_equal(y, np.concatenate([first, np.full((4 * (P - 1), 3), 7.0, np.float32)])), y
            if comm.single_node and P > 1:
                # "auto" names what ran: around the sizes where the variable-size path's rules and the fixed-size
                # path's differ (4 KiB, 16 KiB, 64 KiB per rank)
                for nbytes in (1 << 10, 8 << 10, 32 << 10, 128 << 10):
                    plans.clear()
                    comm.allgather(np.ones(nbytes // 4, np.float32))
                    ran = [p.ran for p in plans.values()]
                    said = comm.auto_algorithm("allgather", nbytes, "float32")
                    assert ran == [said], (nbytes, ran, said)
                    assert comm.explain("allgather", nbytes).endswith("auto picks now: " + said), nbytes
            for alg in ("tree", "star", "pipeline"):
                plans.clear()
                x = np.full((2, 3), R, np.int32)
                for _ in range(2):
                    y = comm.allgather(x, algorithm=alg)
                    assert np.array_equal(y, np.repeat(np.arange(P, dtype=np.int32), 2)[:, None] * [1, 1, 1]), y
                assert not plans, (alg, plans)
                assert comm.trace()[-1].algorithm == alg, comm.trace()[-1].algorithm

        cases.run(f"{mode}: repeated equal allgathers", equal_repeats)

        def gather_repeats() -> None:
            """Repeated gathers run from a plan per root (no counts exchange): fresh and bound arrays, an out on
            every rank (written on the root only; None returned elsewhere), the root alternating, uneven rows;
            rank 0's rows then grow, one rank names another root, one another dtype: exact answers or a raise
            on every rank with no out written."""
            plans = comm._prep.vplans
            galgs = ("auto", "native", "tree") + (("shm",) if comm.single_node else ())
            for alg in galgs:
                comm._prep.forget()
                bound = np.empty((R + 1, 2), np.float32)
                for it in range(6):
                    root = (0, P - 1)[it % 2]
                    x = bound if it < 4 else np.empty((R + 1, 2), np.float32)
                    x[...] = 10 * R + it
                    total = P * (P + 1) // 2
                    out = np.full((total, 2), -1.0, np.float32)
                    got = {}
                    n = exchanges(lambda: got.setdefault("g", comm.gather(x, root=root, algorithm=alg, out=out)))
                    want = np.concatenate([np.full((q + 1, 2), 10 * q + it, np.float32) for q in range(P)])
                    if R == root:
                        assert got["g"] is out and np.array_equal(out, want), (alg, it, out)
                    else:
                        assert got["g"] is None and (out == -1).all(), (alg, it, got["g"], out)
                    assert n == (0 if fenced or P == 1 else 1), (alg, it, n)
                    if P > 1 and fenced:
                        assert len(plans) == min(it + 1, 2), (alg, it, list(plans))
                        assert comm.trace()[-1].root == root, comm.trace()[-1]
                if P == 1:
                    continue
                # Rank 0's rows grow on a repeat: the others still run their plans' check, learn it, and carry on
                # by the ordinary path.
                x = np.full((R + 3 if R == 0 else R + 1, 2), R, np.float32)
                g = comm.gather(x, root=P - 1, algorithm=alg)
                if R == P - 1:
                    assert np.array_equal(g, np.concatenate([np.full((q + 3 if q == 0 else q + 1, 2), q, np.float32)
                                                             for q in range(P)])), (alg, g)
                else:
                    assert g is None
                y = np.full((R + 1, 2), R, np.float32)
                comm.gather(y, root=0, algorithm=alg)
                expect_raise(lambda: comm.gather(y, root=0 if R else 1, algorithm=alg), col.CollectiveMismatchError,
                             "root")
                z = y.astype(np.float64) if R == 1 else y
                expect_raise(lambda: comm.gather(z, root=0, algorithm=alg), col.CollectiveMismatchError, "dtype")
                g = comm.gather(y, root=0, algorithm=alg)  # and in step afterwards
                if R == 0:
                    assert np.array_equal(g, np.concatenate([np.full((q + 1, 2), q, np.float32) for q in range(P)]))
            expect_raise(lambda: comm.gather(np.ones(2), root=P), col.CollectiveValueError, "root")
            expect_raise(lambda: comm.gather(np.ones(2), root=0.0), col.CollectiveValueError, "root")

        cases.run(f"{mode}: repeated gathers", gather_repeats)

        def scatter_repeats() -> None:
            """Repeated scatters run from a plan per root (no header, no counts exchange) where every rank holds
            one made in one op: every root in turn, uneven splits, an out on some ranks and not others; the root's
            splits, dtype or row shape then change (every rank takes the ordinary path, with its counts exchange,
            and right answers, also back on an older plan of the root's); a non-root's out of the wrong size and a
            rank naming another root raise on every rank with no out written."""
            plans = comm._prep.vplans
            salgs = ("auto", "native", "tree") + (("shm",) if comm.single_node else ())

            def source(n: int, it: int, dtype=np.float32, cols: int = 3) -> np.ndarray:
                return (np.arange(n * cols).reshape(n, cols) + 1000 * it).astype(dtype)

            def scatter(root, x, splits=None, alg="auto", out=None):
                got = {}
                n = exchanges(lambda: got.setdefault("s", comm.scatter(x if R == root else None, root=root,
                                                                       splits=splits if R == root else None,
                                                                       algorithm=alg, out=out)))
                return got["s"], n

            for alg in salgs:
                comm._prep.forget()
                for root in range(P):
                    sp = [q + 1 for q in range(P)] if root % 2 else None
                    n = sum(sp) if sp else 2 * P + 1
                    parts = sp or [len(a) for a in np.array_split(np.arange(n), P)]
                    start = sum(parts[:R])
                    for it in range(5):
                        out = np.full((parts[R], 3), -1.0, np.float32) if (R + root) % 2 else None
                        got, ex = scatter(root, source(n, it), sp, alg, out)
                        want = source(n, it)[start:start + parts[R]]
                        assert np.array_equal(got, want) and got.dtype == np.float32, (alg, root, it, got, want)
                        assert out is None or got is out, (alg, root, it)
                        if P > 1:  # the first call at a root makes the plans; the repeats need no counts
                            assert ex == (1 if it == 0 else 0), (alg, root, it, ex)
                            assert any(k[0] == "scatter" and k[-1] == root for k in plans), (alg, root, list(plans))
                            assert comm.trace()[-1].root == root, comm.trace()[-1]
                            if comm.single_node and alg in ("auto", "shm"):  # the root's bytes with the check
                                assert all(v.quick is not None for k, v in plans.items() if k[0] == "scatter"), alg
                        else:
                            assert ex == 0, ex
                if P == 1:
                    continue
                root = P - 1
                n = 2 * P + 1
                parts = [len(a) for a in np.array_split(np.arange(n), P)]
                start = sum(parts[:R])
                sp2 = [2] * (P - 1) + [3]
                start2 = 2 * R
                # (splits, dtype, columns, counts exchanges): a change at the root reaches every rank by its
                # ordinary path; the same call again runs from the new plans; back to the first, whose plan the
                # root still holds but the others replaced, every rank takes the ordinary path again.
                steps = [(None, np.float32, 3, 1), (None, np.float32, 3, 0), (sp2, np.float32, 3, 1),
                         (sp2, np.float32, 3, 0), (None, np.float32, 3, 1), (None, np.float32, 3, 0),
                         (None, np.float64, 3, 1), (None, np.float64, 3, 0), (None, np.float32, 2, 1),
                         (None, np.float32, 2, 0),
                         (None, np.float32, 3, 1)]
                for it, (splits, dt, cols, want_ex) in enumerate(steps):
                    m = sum(splits) if splits else n
                    got, ex = scatter(root, source(m, it, dt, cols), splits, alg)
                    lo, k = (start2, 2 + (R == P - 1)) if splits else (start, parts[R])
                    want = source(m, it, dt, cols)[lo:lo + k]
                    assert got.dtype == dt and np.array_equal(got, want), (alg, it, got, want)
                    assert ex == want_ex, (alg, it, ex, want_ex)
                # A non-root's out of the wrong size: every rank raises, no out is written.
                outs = np.full((parts[R] + (R == 0), 3), -1.0, np.float32)
                cls = col.CollectiveValueError if R == 0 else col.CollectiveError
                expect_raise(lambda: scatter(root, source(n, 0), None, alg, outs), cls, "rows")
                assert (outs == -1).all(), (alg, outs)
                got, ex = scatter(root, source(n, 1), None, alg)  # in step afterwards, from the plans
                assert np.array_equal(got, source(n, 1)[start:start + parts[R]]) and ex == 0, (alg, got, ex)
                # Rank 0 names itself the root while the others repeat their plans of root P-1.
                o = np.full((parts[R], 3), -1.0, np.float32)
                mine = 0 if R == 0 else root
                expect_raise(lambda: comm.scatter(source(n, 2) if R == mine else None, root=mine, algorithm=alg,
                                                  out=o), col.CollectiveMismatchError, "root")
                assert (o == -1).all(), (alg, o)
                got, ex = scatter(root, source(n, 3), None, alg)  # in step afterwards, from the plans
                assert np.array_equal(got, source(n, 3)[start:start + parts[R]]) and ex == 0, (alg, ex)
                # An out on the non-roots now: a plan of theirs from another op (or none): every rank's ordinary
                # path, then the plans of this call.
                for it, want_ex in ((4, 1), (5, 0)):
                    got, ex = scatter(root, source(n, it), None, alg, o if R != root else None)
                    assert np.array_equal(got, source(n, it)[start:start + parts[R]]) and ex == want_ex, (alg, ex)
                    assert R == root or got is o

        cases.run(f"{mode}: repeated scatters", scatter_repeats)

        def plans_apart() -> None:
            """Rank 0 alternates between two shapes, so on some calls every rank repeats a plan but the plans were
            made from different sizes (on one node every rank then posts its bytes with the check, and those
            whose plan does not fit read them by the ordinary path): right answers throughout, and the shm
            arena's chunks stay in step (the calls after it are checked too)."""
            if P == 1:
                return
            plans = comm._prep.vplans
            for alg in ("auto", "shm") if comm.single_node else ("auto",):
                plans.clear()
                for it in range(6):
                    b = 4 if (R == 0 and it % 2) else 3
                    x = np.full((b * P, 2), 10 * R + it, np.float32)
                    got, sp = comm.alltoall(x, algorithm=alg, return_splits=True)
                    assert sp == [4 if (q == 0 and it % 2) else 3 for q in range(P)], (alg, it, sp)
                    want = np.concatenate([np.full((sp[q], 2), 10 * q + it, np.float32) for q in range(P)])
                    assert np.array_equal(got, want), (alg, it, got)
                    rows = [(3 if (q == 0 and it % 2) else 1) + q for q in range(P)]
                    y = comm.allgather(np.full((rows[R], 3), R + it, np.int16), algorithm=alg)
                    assert np.array_equal(y, np.concatenate([np.full((rows[q], 3), q + it, np.int16)
                                                             for q in range(P)])), (alg, it, y)
                assert np.array_equal(comm.allreduce(np.ones(5)), np.full(5, float(P)))

        cases.run(f"{mode}: repeats whose plans differ across ranks", plans_apart)

        def same_arrays() -> None:
            """Repeats on the very same array objects run from the plan bound to them (``Preparer.vhot``): exact
            answers with the input rewritten between calls; a change of an array's mutable attributes (its shape
            set in place, out made read-only) is seen; one rank's differing call raises on every rank with no
            out written; the same x then passed to allgather gets allgather's answer."""
            rows = 2
            base = np.arange(rows * P * 3, dtype=np.float32).reshape(rows * P, 3)
            for alg in ("auto", "shm") if comm.single_node and P > 1 else ("auto",):
                comm._prep.forget()
                x = np.empty((rows * P, 3), np.float32)
                out = np.empty((rows * P, 3), np.float32)
                for it in range(6):
                    x[...] = base + 100 * R + it
                    y = comm.alltoall(x, algorithm=alg, out=out)
                    want = np.concatenate([base[rows * R:rows * (R + 1)] + 100 * q + it for q in range(P)])
                    assert y is out and np.array_equal(out, want), (alg, it, out)
                    got, sp = comm.alltoall(x, algorithm=alg, out=out, return_splits=True)
                    assert got is out and sp == [rows] * P and np.array_equal(out, want), (alg, it, sp)
                if P > 1:
                    assert id(x) in comm._prep.vhot, "no plan bound to the arrays"
                g = comm.allgather(x, algorithm=alg)  # the same x, another collective
                assert np.array_equal(g, np.concatenate([base + 100 * q + 5 for q in range(P)])), (alg, g)
                x.shape = (rows * P, 1, 3)  # in place: another signature
                y = comm.alltoall(x, algorithm=alg)
                assert y.shape == (rows * P, 1, 3) and np.array_equal(y[:, 0], want), (alg, y.shape)
                x.shape = (rows * P, 3)
                comm.alltoall(x, algorithm=alg, out=out)
                if P == 1:
                    continue
                # out made read-only on rank 1 only: rank 1 names it, the others raise too; no out is written.
                out[...] = -1
                out.flags.writeable = R != 1
                cls = col.CollectiveValueError if R == 1 else col.CollectiveError
                expect_raise(lambda: comm.alltoall(x, algorithm=alg, out=out), cls)
                out.flags.writeable = True
                assert (out == -1).all(), (alg, out)
                comm.alltoall(x, algorithm=alg, out=out)
                # Rank 1 sends float64 while the others repeat on their bound arrays: a mismatch on every rank.
                out[...] = -1
                z = x.astype(np.float64) if R == 1 else x
                o = np.empty((rows * P, 3), np.float64) if R == 1 else out
                expect_raise(lambda: comm.alltoall(z, algorithm=alg, out=o), col.CollectiveMismatchError, "dtype")
                assert (out == -1).all(), (alg, out)
                y = comm.alltoall(x, algorithm=alg, out=out)  # and in step afterwards
                assert np.array_equal(out, want), (alg, out)
            if comm.single_node and P > 1:
                # An alloc'd input, the same array every call: read where it lies (each rank a core of its own) or
                # posted with the check (ranks sharing cores), the input rewritten as soon as each call returns.
                win = comm.alloc((rows * P, 3), np.float32)
                out = np.empty((rows * P, 3), np.float32)
                for it in range(6):
                    win[...] = base + 100 * R + it
                    comm.alltoall(win, out=out)
                    want = np.concatenate([base[rows * R:rows * (R + 1)] + 100 * q + it for q in range(P)])
                    assert np.array_equal(out, want), ("window", it, out)
                    assert comm.trace()[-1].algorithm.startswith("shm-window#"), comm.trace()[-1].algorithm
                    win[...] = -1
                assert id(win) in comm._prep.vhot, "no plan bound to the window"
                comm.free(win)

        cases.run(f"{mode}: repeats on the very same arrays", same_arrays)

    def auto_across_nodes() -> None:
        """"auto" across (emulated) nodes runs what the cost model picks, from counts every rank holds alike."""
        from collective.topologies.cluster import Cluster, LinkCost

        nodes = tuple(q % 2 for q in range(P))  # two nodes, ranks interleaved
        cl = Cluster(nodes, LinkCost(5e-6, 1 / 5e9), LinkCost(50e-6, 1 / 1e9), 1 / 3e9, source="a test layout",
                     links_declared=True)
        sub = col.Communicator(comm.mpi_comm, cluster=cl)
        # The layout spans two nodes; the processes share one, so tell the parts that ask about shm.
        sub._chooser.single_node = sub._engine.single_node = False
        ran: list[str] = []
        real_run = sub._engine._exec.run
        sub._engine._exec.run = lambda plan, *a: (ran.append("schedule"), real_run(plan, *a))[1]
        try:
            for rows in (1, 2000, 200000):
                mine = rows * (R + 1)
                x = np.full((mine, 2), R, np.float32)
                total = rows * P * (P + 1) // 2
                alg = sub.auto_algorithm("allgatherv", total * 8 // P, "float32")
                ran.clear()
                y = sub.allgather(x)
                want = np.concatenate([np.full((rows * (q + 1), 2), q, np.float32) for q in range(P)])
                assert np.array_equal(y, want), (rows, y.shape)
                assert ran == ([] if alg == "native" else ["schedule"]), (rows, alg, ran)
                assert alg in ("native", "ring"), alg
                g = sub.gather(x, root=P - 1)
                if R == P - 1:
                    assert np.array_equal(g, want)
                sp = [rows * ((R + q) % 3) for q in range(P)]
                a, got = sub.alltoall(np.ones((sum(sp), 2), np.float32), splits=sp, return_splits=True)
                assert got == [rows * ((q + R) % 3) for q in range(P)] and a.shape == (sum(got), 2), got
                s = sub.scatter(np.arange(3 * P * rows, dtype=np.float32) if R == 0 else None, root=0)
                assert np.array_equal(s, np.arange(3 * rows * R, 3 * rows * (R + 1), dtype=np.float32))
            if P >= 4:  # interleaved nodes: the node-ordered ring wins the largest size
                assert sub.auto_algorithm("allgatherv", 200000 * (P + 1) * 4, "float32") == "ring"
        finally:
            sub.close()

    if P > 1:
        cases.run("auto across emulated nodes", auto_across_nodes)
    suite(fenced=comm._check.arena is not None)
    if comm._check.arena is not None:
        comm._check.detach_arena()  # from here on the check is an MPI allreduce on every rank
        comm._prep.forget()  # no template may take the one-phase path of the detached arena
        suite(fenced=False)
    cases.finish()


if __name__ == "__main__":
    main()
