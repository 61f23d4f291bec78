"""Threads and one communicator: a collective is never silently paired with another thread's (real mpiexec)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from mpi_util import check, count_passed, mpirun


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_racing_threads_raise_and_never_exchange_wrong_data(nprocs: int) -> None:
    res = mpirun("threads.py", nprocs, ["race"], timeout=400)
    check(res, f"threads racing on one communicator at P={nprocs}")
    assert count_passed(res) == 11, res.output[-3000:]
    assert "WRONG" not in res.output


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_threads_with_their_own_communicators_work(nprocs: int) -> None:
    res = mpirun("threads.py", nprocs, ["own"], timeout=400)
    check(res, f"threads with their own communicators at P={nprocs}")
    assert count_passed(res) == 2


def test_thread_tags_follow_names_and_hash_the_same_everywhere() -> None:
    import os
    import subprocess
    import sys

    from collective.threads import ThreadTag, thread_tag

    assert thread_tag() is thread_tag() and thread_tag().name == threading.current_thread().name
    got: list[ThreadTag] = []
    t = threading.Thread(target=lambda: got.append(thread_tag()), name="loader")
    t.start()
    t.join()
    assert got[0].name == "loader" and got[0].h != thread_tag().h and got[0].ident == t.ident
    code = "from collective.threads import ThreadTag; print(ThreadTag('MainThread', 0).h)"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(env, PYTHONHASHSEED=str(s))).stdout for s in (1, 2)}
    assert outs == {f"{ThreadTag('MainThread', 0).h}\n"}


def test_two_live_threads_of_one_name_get_tags_of_their_own() -> None:
    from collective.threads import SHARED_NAME, ThreadTag, thread_tag

    got: dict[int, ThreadTag] = {}
    both = threading.Barrier(2, timeout=30)

    def body(k: int) -> None:
        both.wait()  # both alive before either takes its tag
        got[k] = thread_tag()
        both.wait()

    ts = [threading.Thread(target=body, args=(k,), name="twin") for k in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert got[0].h != got[1].h and got[0].h != ThreadTag("twin", 0).h, got
    assert all(SHARED_NAME in got[k].name and got[k].name.startswith("twin (") for k in (0, 1)), got
    # One live thread of the name (the other ended): the name is its tag.
    t = threading.Thread(target=lambda: got.__setitem__(2, thread_tag()), name="twin")
    t.start()
    t.join(30)
    assert got[2].name == "twin" and got[2].h == ThreadTag("twin", 0).h


def test_library_deadlines_take_no_number_from_unnamed_threads() -> None:
    """A user's unnamed threads are named in creation order; the library's own threads must not shift them."""
    from collective.watchdog import deadline

    before = threading.Thread(target=print).name
    with deadline("a test", 30):
        pass
    after = threading.Thread(target=print).name
    assert int(after.split("-")[1].split()[0]) == int(before.split("-")[1].split()[0]) + 1, (before, after)


def test_one_rank_overlap_raises_usage_error() -> None:
    """At P=1 too: a collective entered while another thread's synchronous one is in flight raises."""
    import collective as col

    comm = col.Communicator()
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:  # a collective that stays in flight: alloc's work, held open
        comm.sequencer.run_locked(lambda: (inside.set(), release.wait(30)), "alloc")

    t = threading.Thread(target=hold, name="holder")
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(col.CollectiveUsageError) as ei:
            comm.allreduce(np.ones(3))
        with pytest.raises(col.CollectiveUsageError):
            comm.allreduce_async(np.ones(3))
    finally:
        release.set()
        t.join(30)
    text = str(ei.value)
    assert "allreduce on rank 0 of 1" in text and "thread 'MainThread'" in text, text
    assert "alloc of thread 'holder' is in flight" in text, text
    assert np.array_equal(comm.allreduce(np.ones(3)), np.ones(3))  # the communicator goes on working
    comm.close()


def test_a_finished_call_keeps_nothing_of_its_caller_alive() -> None:
    """The gate's record of the call in flight ends with the call: its arrays, closures and a failed call's
    traceback (the caller's frames) are not kept until the next collective."""
    import gc
    import weakref

    import collective as col

    class Payload:
        pass

    comm = col.Communicator()
    try:
        p = Payload()
        ref = weakref.ref(p)
        comm.sequencer.run_locked(lambda p=p: None, "alloc")
        del p
        gc.collect()
        assert ref() is None, "run_locked kept its work alive"
        x = np.ones(1001)
        xref = weakref.ref(x)
        assert np.array_equal(comm.allreduce(x, op="max", algorithm="ring"), x)
        del x
        gc.collect()
        assert xref() is None, "an allreduce kept its input alive"

        def fail(p=Payload()) -> None:
            raise col.CollectiveValueError("refused")

        fref = weakref.ref(fail.__defaults__[0])
        with pytest.raises(col.CollectiveValueError):
            comm.sequencer.run_locked(fail, "free")
        del fail
        gc.collect()
        assert fref() is None, "a failed run_locked kept its work alive"
    finally:
        comm.close()


def test_run_locked_waits_for_pending_ops_and_runs_on_the_callers_thread() -> None:
    """alloc, free and device setup run on their caller's thread (device setup is bound to it) after the async
    ops queued before them, not on the communication thread."""
    import types

    import collective as col

    comm = col.Communicator()
    seqr = comm.sequencer
    release = threading.Event()
    try:
        c = types.SimpleNamespace(name="allreduce", shape=(3,), dtype=np.dtype("f8"), algorithm="native", root=0)
        w = seqr.submit(c, lambda c, first, seq: release.wait(30))  # an async op held in flight
        assert seqr.pending == 1
        threading.Thread(target=lambda: (time.sleep(0.3), release.set()), name="releaser").start()
        ran = seqr.run_locked(lambda: (w.done(), threading.current_thread().name), "alloc")
        assert ran == (True, "MainThread"), ran
        assert w.wait(30) is True
    finally:
        release.set()
        comm.close()


def test_ordered_by_caller_tags_every_thread_alike_and_still_detects_overlap() -> None:
    """torch.distributed's groups: one tag name on every thread, but two threads inside one op still raise."""
    import collective as col

    comm = col.Communicator()
    comm.sequencer.ordered_by_caller("torch.distributed")
    names: list[str] = []

    def call() -> None:
        names.append(comm.sequencer.thread_tag().name)
        comm.allreduce(np.ones(3), out=np.empty(3))

    t = threading.Thread(target=call, name="callback")
    t.start()
    t.join(30)
    call()
    assert names == ["torch.distributed", "torch.distributed"]
    assert comm.trace()[-1].thread.name == "torch.distributed"
    inside, release = threading.Event(), threading.Event()
    h = threading.Thread(target=lambda: comm.sequencer.run_locked(lambda: (inside.set(), release.wait(30)), "alloc"))
    h.start()
    assert inside.wait(30)
    try:
        with pytest.raises(col.CollectiveUsageError):
            comm.allreduce(np.ones(3))
    finally:
        release.set()
        h.join(30)
    comm.close()
