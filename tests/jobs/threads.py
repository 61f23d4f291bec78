"""Threads and one communicator (tests/test_threads.py): never silently wrong; one communicator per thread works.

argv[1]: "race" (the racing threads, then the deterministic cases) or "own" (threads with their own communicators).
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
from harness import Cases

import collective as col

ITERS = 200


def _threads(*bodies) -> list[BaseException | None]:
    """Run each body on a thread of its own (named by its key when given as (name, fn)); their errors, in order."""
    errs: list[BaseException | None] = [None] * len(bodies)

    def wrap(i, fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the case
            errs[i] = exc

    ts = []
    for i, b in enumerate(bodies):
        name, fn = b if isinstance(b, tuple) else (None, b)
        ts.append(threading.Thread(target=wrap, args=(i, fn), name=name))
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
        assert not t.is_alive(), f"thread {t.name} still running after 120 s"
    return errs


def race(comm: col.Communicator, algorithm: str, n: int) -> tuple[int, int, list[str]]:
    """The issue's scenario: two threads per rank, same shape and dtype, ITERS allreduces each on one communicator.

    Each thread stops at its first error, as a program would. Returns (results right, errors, problems).
    """
    P, R = comm.size, comm.rank
    right, errors, problems = [0, 0], [0, 0], []

    def body(k: int) -> None:
        # thread k's value on rank r: 1000 * (k + 1) + r; the sum over ranks is known for each thread.
        want = np.full(n, 1000.0 * (k + 1) * P + P * (P - 1) / 2)
        for _ in range(ITERS):
            x = np.full(n, 1000.0 * (k + 1) + R)
            try:
                y = comm.allreduce(x, algorithm=algorithm)
            except (col.CollectiveUsageError, col.CollectiveMismatchError) as exc:
                errors[k] += 1
                text = str(exc)
                if "thread" not in text:
                    problems.append(f"an error that names no thread: {text[:300]}")
                return
            if np.array_equal(y, want):
                right[k] += 1
            else:
                problems.append(f"thread {k}: WRONG result {y[:3]}, want {want[:3]}")
                return

    errs = _threads(lambda: body(0), lambda: body(1))
    problems += [f"thread {k} died: {type(e).__name__}: {e}" for k, e in enumerate(errs) if e is not None]
    return sum(right), sum(errors), problems


def main_race() -> None:
    comm = col.init()
    cases = Cases(comm)
    P, R = comm.size, comm.rank

    for algorithm, n in (("auto", 64), ("native", 64), ("ring", 1000), ("auto", 100000)):
        def case(algorithm=algorithm, n=n) -> None:
            right, errors, problems = race(comm, algorithm, n)
            assert not problems, problems[:5]
            every = np.empty((P, 2), np.int64)
            comm.mpi_comm.Allgather(np.array([right, errors], np.int64), every)
            # Either the threads met (on one rank, or crossed between ranks) and the calls raised, or they never
            # did and every call of both threads was right on every rank: how often they meet is up to the
            # scheduler, a wrong or silently paired result never is (the problems above).
            assert every[:, 1].sum() > 0 or (every[:, 0] == 2 * ITERS).all(), every.tolist()
            print(f"rank {R}: race {algorithm} n={n}: {right} right, {errors} raised", flush=True)
            # Every rank finished as many ops as the others: the communicator goes on working.
            y = comm.allreduce(np.full(5, float(R)))
            assert np.array_equal(y, np.full(5, P * (P - 1) / 2))
        cases.run(f"race {algorithm} n={n}", case)

    def overlap_named() -> None:
        """A synchronous call entered while another thread's is in flight: CollectiveUsageError naming both;
        the rank where the threads did not overlap raises too (the usage error reaches it as a rejected call)."""
        comm.barrier()
        started = threading.Event()
        out: dict[str, object] = {}

        def first() -> None:
            if R == 0:
                started.set()
            else:
                time.sleep(1.5)  # rank 0's call stays in flight meanwhile
            out["first"] = comm.allreduce(np.ones(8, np.float32))

        def second() -> None:
            if R == 0:
                started.wait(10)
                time.sleep(0.5)
            else:
                while "first" not in out:
                    time.sleep(0.01)
            comm.allreduce(np.ones(8, np.float32) * 2, algorithm="ring")

        e1, e2 = _threads(("first-caller", first), ("second-caller", second))
        y = comm.allreduce(np.full(3, 1.0))  # before any assertion: every rank makes the same calls
        assert np.array_equal(y, np.full(3, float(P)))
        assert e1 is None, e1
        assert np.array_equal(out["first"], np.full(8, P, np.float32)), out["first"]
        if R == 0:
            assert isinstance(e2, col.CollectiveUsageError), repr(e2)
            text = str(e2)
            for part in ("allreduce on rank 0", "thread 'second-caller'", "thread 'first-caller'",
                         "algorithm ring", "is in flight", "comm.split"):
                assert part in text, (part, text)
        else:
            assert isinstance(e2, col.CollectiveMismatchError), repr(e2)
            assert "rank 0 rejected its arguments (CollectiveUsageError" in str(e2), str(e2)

    cases.run("overlap raises a usage error on one rank and a mismatch on the others", overlap_named)

    def overlap_not_an_op() -> None:
        """Work under the gate that is no op (alloc, free, device setup: run_locked) entered while another thread
        holds the gate raises on that rank alone and takes no turn in the op order: the next op agrees everywhere."""
        comm.barrier()
        inside, release = threading.Event(), threading.Event()
        out: dict[str, object] = {}

        def holder() -> None:
            comm.sequencer.run_locked(lambda: (inside.set(), release.wait(30)), "alloc")

        def intruder() -> None:
            assert inside.wait(30)
            if R != 0:  # only rank 0's threads overlap
                while not out.get("held"):
                    time.sleep(0.01)
            out["ran"] = comm.sequencer.run_locked(lambda: "ran", "free")

        def hold() -> None:
            holder()
            out["held"] = True

        def release_later() -> None:
            time.sleep(0.5)
            release.set()

        errs = _threads(("holder", hold), ("intruder", intruder), ("releaser", release_later))
        y = comm.allreduce(np.full(4, float(R)))  # the op order is the same on every rank
        assert np.array_equal(y, np.full(4, P * (P - 1) / 2)), y
        assert errs[0] is None and errs[2] is None, errs
        if R == 0:
            assert isinstance(errs[1], col.CollectiveUsageError), repr(errs[1])
            assert "free on rank 0" in str(errs[1]) and "alloc of thread 'holder'" in str(errs[1]), str(errs[1])
        else:
            assert errs[1] is None and out["ran"] == "ran", (errs[1], out)

    cases.run("alloc/free overlapping another thread raise alone, out of the op order", overlap_not_an_op)

    def crossed_threads() -> None:
        """No overlap on any rank, but the threads' calls meet in a different order: a mismatch on every rank."""
        comm.barrier()
        got: dict[str, object] = {}

        def call(tag: str, value: float) -> None:
            try:
                got[tag] = comm.allreduce(np.full(16, value))
            except BaseException as exc:  # noqa: BLE001
                got[tag] = exc

        order = ("alpha", "beta") if R % 2 == 0 else ("beta", "alpha")
        for name in order:
            t = threading.Thread(target=call, args=(name, 1.0 if name == "alpha" else 2.0), name=name)
            t.start()
            t.join(60)
        y = comm.allreduce(np.full(3, 1.0))
        assert np.array_equal(y, np.full(3, float(P)))
        if P == 1:
            return
        for name in order:
            exc = got[name]
            assert isinstance(exc, col.CollectiveMismatchError), (name, exc)
            text = str(exc)
            assert "(thread differs)" in text and "thread 'alpha'" in text and "thread 'beta'" in text, text

    cases.run("threads crossed across ranks raise a mismatch naming both", crossed_threads)

    def same_name_crossed() -> None:
        """Two live threads of one name ("worker"), their calls crossed across ranks: names cannot tell them apart,
        so every call mismatches (saying to name them apart), never a pairing of the two threads' data."""
        comm.barrier()
        turns = [threading.Event(), threading.Event()]
        ended = threading.Event()
        got: dict[int, object] = {}

        def call(k: int) -> None:
            assert turns[k].wait(60)
            try:
                got[k] = comm.allreduce(np.full(16, 1000.0 * (k + 1) + R))
            except BaseException as exc:  # noqa: BLE001
                got[k] = exc
            if k == order[0]:
                turns[order[1]].set()
            else:
                ended.set()
            assert ended.wait(60)  # both stay alive until both have called: two live threads of one name

        order = (0, 1) if R % 2 == 0 else (1, 0)
        ts = [threading.Thread(target=call, args=(k,), name="worker") for k in (0, 1)]
        for t in ts:
            t.start()
        turns[order[0]].set()
        for t in ts:
            t.join(60)
            assert not t.is_alive()
        y = comm.allreduce(np.full(3, 1.0))  # the ops stayed in step
        assert np.array_equal(y, np.full(3, float(P)))
        if P == 1:
            assert all(np.array_equal(got[k], np.full(16, 1000.0 * (k + 1))) for k in (0, 1)), got
            return
        for k in (0, 1):
            exc = got[k]
            assert isinstance(exc, col.CollectiveMismatchError), (k, exc)
            text = str(exc)
            for part in ("(thread differs)", "worker (a second live thread so named", "name every thread that "
                         "calls collectives distinctly"):
                assert part in text, (part, text)

    cases.run("two live threads of one name crossed across ranks raise a mismatch", same_name_crossed)

    def crossed_async() -> None:
        """An async op's issuer is the thread that called it, not the communication thread."""
        comm.barrier()
        got: dict[str, object] = {}

        def call(tag: str) -> None:
            got[tag] = comm.allreduce_async(np.full(16, 1.0))

        name = "even" if R % 2 == 0 else "odd"
        t = threading.Thread(target=call, args=(name,), name=name)
        t.start()
        t.join(60)
        try:
            got[name].wait(60)  # type: ignore[union-attr]
            exc = None
        except col.CollectiveMismatchError as e:
            exc = e
        assert np.array_equal(comm.allreduce(np.ones(2)), np.full(2, float(P)))
        if P == 1:
            return
        assert exc is not None, "an async op issued by different threads did not raise"
        assert "thread 'even'" in str(exc) and "thread 'odd'" in str(exc), str(exc)

    cases.run("async ops tagged with their issuing thread", crossed_async)

    def serial_threads() -> None:
        """Threads taking turns in the same order on every rank are fine, sync and async, as is a thread's name
        that Python gave it (created in the same order everywhere)."""
        comm.barrier()
        res: list[object] = []

        def work(k: int) -> None:
            res.append(comm.allreduce(np.full(4, float(k + R))))
            w = comm.allreduce_async(np.full(4, float(k)))
            res.append(comm.broadcast(np.full(2, float(R)), root=P - 1))
            res.append(w.wait(60))
            res.append(comm.allgather(np.full(R + 1, float(k))))

        for k in range(3):
            errs = _threads(lambda k=k: work(k))
            assert errs == [None], errs
        want = []
        for k in range(3):
            want += [np.full(4, k * P + P * (P - 1) / 2), np.full(2, float(P - 1)), np.full(4, float(k * P)),
                     np.full(P * (P + 1) // 2, float(k))]
        assert len(res) == len(want) and all(np.array_equal(a, b) for a, b in zip(res, want)), res

    cases.run("threads taking turns in one order work", serial_threads)

    def async_from_main_thread() -> None:
        """The communication thread runs async ops without tripping the rule; a sync call queues behind them."""
        ws = [comm.allreduce_async(np.full(1000, float(i))) for i in range(6)]
        y = comm.allreduce(np.ones(10))
        z = comm.alltoall(np.arange(2 * P, dtype=np.float64))
        assert np.array_equal(y, np.full(10, float(P)))
        assert np.array_equal(z, np.tile([2.0 * R, 2.0 * R + 1], P))
        for i, w in enumerate(ws):
            assert np.array_equal(w.wait(60), np.full(1000, float(i * P)))

    cases.run("async ops from one thread", async_from_main_thread)
    cases.finish()


def main_own() -> None:
    """Each thread with a communicator of its own: every result right, at full speed of interleaving."""
    comm = col.init()
    cases = Cases(comm)
    P, R = comm.size, comm.rank

    def own(make) -> None:
        subs = [make(), make()]  # made in the same order on every rank, before the threads start
        bad: list[str] = []

        def body(k: int) -> None:
            c = subs[k]
            for i in range(ITERS):
                x = np.full(64 + 7 * k, 1000.0 * (k + 1) + R + i)
                y = c.allreduce(x) if i % 3 else c.allreduce_async(x, algorithm="ring").wait(60)
                want = 1000.0 * (k + 1) * P + P * (P - 1) / 2 + i * P
                if not np.array_equal(y, np.full(x.shape, want)):
                    bad.append(f"thread {k} iteration {i}: {y[:3]} != {want}")
                    return
            g = c.allgather(np.full(R + 1 + k, float(k)))
            if not np.array_equal(g, np.full(P * (P + 1) // 2 + P * k, float(k))):
                bad.append(f"thread {k}: allgather {g}")

        errs = _threads(lambda: body(0), lambda: body(1))
        assert errs == [None, None], errs
        assert not bad, bad[:4]
        for s in subs:
            s.close()
        assert np.array_equal(comm.allreduce(np.ones(3)), np.full(3, float(P)))

    cases.run("threads with comm.split(0) each", lambda: own(lambda: comm.split(0)))
    cases.run("threads with a subgroup of every rank each", lambda: own(lambda: comm.subgroup(range(P))))
    cases.finish()


if __name__ == "__main__":
    {"race": main_race, "own": main_own}[sys.argv[1]]()
