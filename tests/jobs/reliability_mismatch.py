"""Mismatched calls and bad arguments on one rank: every rank raises (nothing hangs, nothing is silently wrong), and the job goes on.

Usage: mpiexec -n P python reliability_mismatch.py   (P >= 2; rank 1 is the odd one out)
Run with COLLECTIVE_DEBUG=DETAIL and COLLECTIVE_NAN_CHECK=1 as well: the same cases must hold.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

import collective as col
from harness import Cases

comm = col.init()
R, P = comm.rank, comm.size
assert P >= 2, "run on at least 2 ranks"
cases = Cases(comm)
ODD = 1
Mismatch = col.CollectiveMismatchError


def expect(fn: Callable[[], Any], words: list[str], bad_rank: int | None = None, bad_cls: type = col.CollectiveError,
           bad_words: tuple[str, ...] = ()) -> None:
    """Every rank raises: CollectiveMismatchError with ``words`` in it; ``bad_rank`` its own ``bad_cls`` error."""
    try:
        fn()
    except Mismatch as exc:
        if R == bad_rank:
            raise AssertionError(f"rank {R} rejected its arguments but raised the mismatch: {exc}") from None
        msg = str(exc)
        for w in words + [f"on rank {R} of {P}"]:
            assert w in msg, f"mismatch message lacks {w!r}: {msg}"
    except col.CollectiveError as exc:
        if R != bad_rank or not isinstance(exc, bad_cls):
            raise
        for w in bad_words:
            assert w in str(exc), f"error message lacks {w!r}: {exc}"
    else:
        raise AssertionError("no error raised")
    ok()


def ok() -> None:
    """The communicator still works after the error (shm too, over two chunks: every rank agrees on the regions)."""
    y = comm.allreduce(np.full(5, R + 1, np.int64), algorithm="ring")
    assert (y == P * (P + 1) // 2).all(), y
    z = comm.allreduce(np.arange(600_000, dtype=np.float64) + R, algorithm="shm")
    assert np.array_equal(z, P * np.arange(600_000, dtype=np.float64) + P * (P - 1) // 2), z[:4]


def odd(a: Any, b: Any) -> Any:
    return a if R == ODD else b


# First, before any shm call has set up the node's shared window (which is collective): a mismatch there must
# meet the fingerprint check on every rank, not the window's set-up on some.
cases.run("first shm call, one rank native", lambda: expect(
    lambda: comm.allreduce(np.ones(100_000, np.float32), algorithm=odd("native", "shm")), ["algorithm differs"]))

# From here on the node's shared window exists, so every call's check goes through it (ShmArena.exchange) instead
# of an MPI allreduce: every case below is a mismatch that exchange must catch on every rank.
fp = comm.sequencer.check.fingerprints
assert fp is not None and fp.exchange is not None, "the check should go through the shared window by now"

for alg in ("ring", "tree", "star", "native", "shm"):
    f32 = np.dtype(np.float32)
    cases.run(f"{alg} shape", lambda: expect(
        lambda: comm.allreduce(np.ones(odd(65537, 65536), np.float32), algorithm=alg),
        ["shape differs", "rank 1: (65537,)", "(65536,)", f"algorithm {alg}"]))
    cases.run(f"{alg} dtype and shape", lambda: expect(
        lambda: comm.allreduce(np.ones(odd(65537, 65536), odd(np.float64, np.float32)), algorithm=alg),
        ["dtype, shape differ", "rank 1: float64 (65537,)", "float32 (65536,)"]))
    cases.run(f"{alg} op", lambda: expect(
        lambda: comm.allreduce(np.ones(10, np.float32), op=odd("max", "sum"), algorithm=alg),
        ["op differs", "rank 1: op max", "op sum"]))
    cases.run(f"{alg} reduce root", lambda: expect(
        lambda: comm.reduce(np.ones(10, np.int32), root=odd(0, P - 1), algorithm=alg),
        ["root differs", "rank 1: root 0", f"root {P - 1}"]))
    cases.run(f"{alg} broadcast root", lambda: expect(
        lambda: comm.broadcast(np.ones(10, np.int32), root=odd(1, 0), algorithm=alg),
        ["root differs", "rank 1: root 1", "root 0"]))
    cases.run(f"{alg} algorithm", lambda: expect(
        lambda: comm.allreduce(np.ones(10, np.float32), algorithm=odd("tree" if alg != "tree" else "ring", alg)),
        ["algorithm differs", f"algorithm {alg}"]))

    def call_order() -> None:
        x = np.ones(10, np.float32)
        first = (lambda: comm.broadcast(x, root=0, algorithm=alg)) if R == ODD else (lambda: comm.allreduce(x, algorithm=alg))
        second = (lambda: comm.allreduce(x, algorithm=alg)) if R == ODD else (lambda: comm.broadcast(x, root=0, algorithm=alg))
        expect(first, ["collective", "rank 1: broadcast", "allreduce"])
        expect(second, ["collective", "rank 1: allreduce", "broadcast"])
    cases.run(f"{alg} call order", call_order)

    def barrier_vs_collective() -> None:
        expect(lambda: comm.barrier() if R == ODD else comm.allgather(np.ones(3), algorithm=alg),
               ["collective", "rank 1: barrier", "allgather"])
    cases.run(f"{alg} barrier vs allgather", barrier_vs_collective)

    cases.run(f"{alg} reduce_scatter rows", lambda: expect(
        lambda: comm.reduce_scatter(np.ones((odd(2 * P + 1, 2 * P), 3)), algorithm=alg), ["shape differs"]))

    # A bad argument on one rank only: that rank raises its own error, the others the mismatch naming it.
    for label, call, cls, word in [
        ("op name", lambda: comm.allreduce(np.ones(10, np.float32), op=odd("median", "sum"), algorithm=alg),
         col.CollectiveValueError, "unknown op 'median'"),
        ("root", lambda: comm.broadcast(np.ones(4), root=odd(P, 0), algorithm=alg), col.CollectiveValueError, "root"),
        ("dtype", lambda: comm.allreduce(np.ones(4, odd(bool, np.uint8)), algorithm=alg), col.CollectiveTypeError, "bool"),
        ("out shape", lambda: comm.allreduce(np.ones(4), out=np.empty(odd(5, 4)), algorithm=alg),
         col.CollectiveValueError, "out has shape"),
        ("algorithm name", lambda: comm.allreduce(np.ones(4), algorithm=odd("bogus", alg)), col.CollectiveValueError,
         "unknown algorithm"),
    ]:
        cases.run(f"{alg} bad {label} on rank 1 only", lambda: expect(
            call, ["rank 1 rejected its arguments", word, "cannot run"], bad_rank=ODD, bad_cls=cls, bad_words=(word,)))

    def async_mismatch() -> None:
        x = np.ones(odd(100, 101), np.float32)
        w = comm.allreduce_async(x, algorithm=alg)
        expect(w.wait, ["shape differs", "rank 1: (100,)"])
    cases.run(f"{alg} async mismatch", async_mismatch)

    def async_bad_arg_with_queue() -> None:
        # Rank 1's bad call happens while good async work is queued: its poison must keep its place in line.
        big = np.ones(1 << 16, np.float32)
        w1 = comm.allreduce_async(big, algorithm=alg)
        try:
            w2 = comm.allreduce_async(np.ones(8), op=odd("nope", "sum"), algorithm=alg)
        except col.CollectiveValueError:
            assert R == ODD
            w2 = None
        w3 = comm.allreduce_async(np.full(3, 2.0), algorithm=alg)
        assert (w1.wait() == P).all()
        assert (w3.wait() == 2.0 * P).all()
        if w2 is not None:
            expect(w2.wait, ["rank 1 rejected its arguments", "unknown op 'nope'"])
        else:
            ok()
    cases.run(f"{alg} async bad argument on rank 1 behind queued work", async_bad_arg_with_queue)


def count_1000_vs_200000() -> None:  # the case: corrupted memory, then hung, with raw MPI
    expect(lambda: comm.allreduce(np.ones(odd(1000, 200000), np.float32), algorithm="native"),
           ["shape differs", "rank 1: (1000,)", "(200000,)"])
cases.run("count 1000 vs 200000", count_1000_vs_200000)


def quick_path_check() -> None:
    """Small shm allreduces repeated enough to take the one-phase quick path (check and data share one barrier):
    a rank whose call differs, through the full path or through a quick call of its own, is still caught on
    every rank, nothing is written into out, and the quick path works afterwards."""
    a, b = np.full(1000, R + 1.0, np.float32), np.full(1001, R + 1.0, np.float32)
    out_a, out_b = np.zeros(1000, np.float32), np.zeros(1001, np.float32)
    for _ in range(4):  # both signatures armed on every rank
        comm.allreduce(a, out=out_a, algorithm="shm")
        comm.allreduce(b, out=out_b, algorithm="shm")
    assert (out_a == P * (P + 1) / 2).all() and (out_b == P * (P + 1) / 2).all()
    out_a[:] = -1
    out_b[:] = -1
    # Both quick: rank 1 calls the 1001-element one.
    expect(lambda: comm.allreduce(odd(b, a), out=odd(out_b, out_a), algorithm="shm"),
           ["shape differs", "rank 1: (1001,)", "(1000,)"])
    # Rank 1 through the full path (another op), the others quick.
    expect(lambda: comm.allreduce(a, op=odd("max", "sum"), out=out_a, algorithm="shm"), ["op differs", "rank 1: op max"])
    # In place, quick everywhere but on rank 1 (float64).
    c = np.full(1000, 2.0, odd(np.float64, np.float32))
    expect(lambda: comm.allreduce(c, out=c, algorithm="shm"), ["dtype differs", "rank 1: float64"])
    assert (out_a == -1).all() and (out_b == -1).all() and (c == 2.0).all(), "out written before the mismatch"
    for _ in range(3):
        y = comm.allreduce(a, out=out_a, op="avg", algorithm="shm")
        assert y is out_a and (y == (P + 1) / 2).all(), y[:3]
cases.run("quick path (small repeated shm allreduce) mismatch", quick_path_check)


def auto_resolves_alike() -> None:  # one rank names the algorithm auto resolves to: no mismatch
    x = np.ones(10, np.float32)
    y = comm.allreduce(x, algorithm=odd(comm.auto_algorithm("allreduce", x.nbytes, x.dtype), "auto"))
    assert (y == P).all()
cases.run("auto resolves alike", auto_resolves_alike)


def every_rank_bad() -> None:  # each rank rejects its own arguments: each raises its own error, nothing hangs
    try:
        comm.allreduce(np.ones(4), op=f"bad{R}")
    except col.CollectiveMismatchError as exc:
        raise AssertionError(f"expected this rank's own error: {exc}") from None
    except col.CollectiveValueError as exc:
        assert f"bad{R}" in str(exc)
    else:
        raise AssertionError("no error")
    ok()
cases.run("every rank bad", every_rank_bad)


def alloc_vs_plain() -> None:
    """In place on an alloc'd array on every rank but one, which passes a plain array: a mismatch, not a hang."""
    n = 100_000  # 400 KB: alloc'd arrays this large are reduced in the window
    g = comm.alloc(n, np.float32)
    g[:] = 1
    x = g if R != ODD else np.ones(n, np.float32)
    expect(lambda: comm.allreduce(x, out=x, algorithm="shm"), ["algorithm differs"])
    g2 = comm.alloc(7, np.float32)
    g2[:] = R
    comm.allreduce(g2, out=g2, algorithm="shm")
    assert (g2 == P * (P - 1) / 2).all(), g2
cases.run("alloc'd vs plain array", alloc_vs_plain)


def alloc_shape() -> None:
    """alloc'd arrays whose lengths differ on one rank (prefix slices): a mismatch before anything is pushed."""
    g = comm.alloc(100_000, np.float32)
    g[:] = R
    x = g[:odd(99_999, 100_000)]
    expect(lambda: comm.allreduce(x, out=x, algorithm="shm"), ["shape differs"])
    assert (g == R).all(), "an array was written before the mismatch was found"
cases.run("alloc'd shape", alloc_shape)


def alloc_other_window() -> None:
    """Same shape, but rank 1 reduces another alloc'd array: each rank would update only its own slice of each."""
    a, b = comm.alloc(100_000, np.float32), comm.alloc(100_000, np.float32)
    a[:] = R
    b[:] = R
    x = odd(b, a)
    expect(lambda: comm.allreduce(x, out=x, algorithm="shm"), ["algorithm differs", "shm-window#"])
    assert (a == R).all() and (b == R).all(), "an array was written before the mismatch was found"
    # alloc'd into alloc'd on rank 1, in place on the others
    expect(lambda: comm.allreduce(a, out=odd(b, a), algorithm="shm"), ["algorithm differs", "->#"])
    # into different alloc'd outputs
    c = comm.alloc(100_000, np.float32)
    expect(lambda: comm.allreduce(a, out=odd(c, b), algorithm="shm"), ["algorithm differs", "->#"])
    assert (a == R).all() and (b == R).all() and (c == 0).all(), "an array was written before the mismatch was found"
    comm.allreduce(a, out=b, algorithm="shm")  # agreeing again: works
    assert (b == P * (P - 1) / 2).all() and (a == R).all()
cases.run("alloc'd arrays, rank 1 reduces another window", alloc_other_window)


def cached_call_bad_op() -> None:
    """A bad op on one rank for an alloc'd array whose call is cached: it still reaches the others as a poison."""
    g = comm.alloc(100_000, np.float32)
    comm.allreduce(g, out=g, algorithm="shm")  # the next identical call would reuse this one
    op = np.array(["sum", "max"]) if R == ODD else "sum"
    expect(lambda: comm.allreduce(g, op=op, out=g, algorithm="shm"),
           ["rank 1 rejected its arguments", "cannot run"], bad_rank=ODD)
cases.run("cached alloc'd call, bad op on rank 1 only", cached_call_bad_op)


def quick_path_mismatch() -> None:
    """Plain-array calls every rank prepared before (allreduce's quick path): a mismatch is still caught."""
    for alg in ("native", "shm"):
        x = np.ones(1024, np.float32)
        for op in ("sum", "max"):
            comm.allreduce(x, op=op, algorithm=alg)  # every rank now holds a template for both ops
        expect(lambda: comm.allreduce(x, op="max" if R == ODD else "sum", algorithm=alg), ["op differs"])
        # rank 1 has no float64 template (the full path) while the others take the quick one
        y = np.ones(1024, np.float32 if R != ODD else np.float64)
        expect(lambda: comm.allreduce(y, out=y, algorithm=alg), ["dtype differs"])
        assert (y == 1).all(), "an array was written before the mismatch was found"
cases.run("quick path, op and dtype differ on rank 1", quick_path_mismatch)


def nan_inf() -> None:  # IEEE: NaN propagates through every op, Inf through sums, Inf + -Inf is NaN
    for alg in ("native", "ring", "tree", "star", "shm"):
        x = np.arange(8, dtype=np.float64)
        if R == ODD:
            x[1] = np.nan
            x[2] = np.inf
            x[3] = -np.inf
        if R == 0:
            x[3] = np.inf
        want3 = {"sum": np.nan, "min": -np.inf, "max": np.inf, "prod": -np.inf}
        for op in ("sum", "min", "max", "prod"):
            y = comm.allreduce(x, op=op, algorithm=alg)
            assert np.isnan(y[1]), (alg, op, y)
            assert y[2] == (2.0 if op == "min" else np.inf), (alg, op, y)
            assert np.array_equal(y[3:4], [want3[op]], equal_nan=True), (alg, op, y)
cases.run("NaN and Inf propagate", nan_inf)


def agree() -> None:  # outside elastic mode: an allreduce of the flags (AND)
    assert comm.agree(True) is True
    assert comm.agree(R != ODD) is False
    assert comm.agree(1) is True and comm.agree(0) is False
cases.run("agree is the AND of every rank's flag", agree)

if os.environ.get("COLLECTIVE_DEBUG", "").upper() == "DETAIL":
    def detail_agrees() -> None:
        for n in (1, 100, 1000):
            assert (comm.allreduce(np.ones(n), algorithm="ring") == P).all()
        comm.barrier()
    cases.run("DETAIL mode: agreeing calls pass", detail_agrees)

cases.finish()
# Ranks leaving at different times is normal: rank 1 exits last, after the others announced their exit.
if R == ODD:
    import time

    time.sleep(1.0)
