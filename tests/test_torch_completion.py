"""The torch backend's completion of async Works at group shutdown (local: the completer's logic, no MPI job).

The Works here are the communicator's own handles (collective.sequencer.Work), finished by a test thread where
the communication thread would finish them; the completer cannot tell the difference.
"""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("torch")

from collective.sequencer import Work  # noqa: E402
from collective.torch import _Completer  # noqa: E402

WHAT = "process group 'g1' (rank 0 of 2)"


def _then_count(fut) -> list[str]:
    """Record, by thread name, each run of a callback attached to ``fut``."""
    ran: list[str] = []
    fut.then(lambda f: ran.append(threading.current_thread().name))
    return ran


def test_close_fails_unfinished_work_and_no_callback_runs_after() -> None:
    c = _Completer()
    w = Work("allreduce")
    a = c.add([w], None, "value", "all_reduce")
    ran = _then_count(a.get_future())
    c.close(WHAT, 5.0)
    # Settled by close: an error naming the op, the group and that it was closed.
    assert a.is_completed() and not a.is_success()
    err = a.exception()
    assert err is not None and "all_reduce" in str(err) and WHAT in str(err) and "closed" in str(err), err
    with pytest.raises(Exception, match="was closed"):
        a.wait()
    n = len(ran)
    assert n == 1  # the callback ran once, before close returned
    # The op ends late (on the communication thread in real life): nothing runs, nothing raises.
    w.finish(1, None)
    time.sleep(0.2)
    assert len(ran) == n


def test_close_completes_finished_work_and_waits_for_its_callbacks() -> None:
    c = _Completer()
    gate = threading.Event()
    w = Work("allreduce")
    a = c.add([w], None, "value", "all_reduce")
    slow: list[str] = []

    def cb(f) -> None:
        gate.wait(10)  # a callback still running when close starts
        slow.append("done")

    a.get_future().then(cb)
    w.finish(None, None)  # hands the completion to the pool, whose callback now blocks
    t0 = time.monotonic()
    threading.Timer(0.3, gate.set).start()
    c.close(WHAT, 10.0)
    assert slow == ["done"], "close returned before a running callback ended"
    assert 0.2 < time.monotonic() - t0 < 9
    assert a.is_success() and a.get_future().value() == "value"


def test_close_settles_the_waiting_threads_works_by_whether_they_ended() -> None:
    """Works of the waiting thread (point-to-point, joined calls): those that ended complete with their result
    or error, the others fail, and the thread completes nothing once close has settled them."""
    c = _Completer()
    never = [Work("recv"), Work("recv")]
    ok, bad = [Work("send"), Work("send")], [Work("recv"), Work("send")]
    d = c.add(never, None, None, "irecv")  # first in line: holds the waiting thread
    a = c.add(ok, None, "ok", "send")
    b = c.add(bad, None, None, "recv")
    ran = _then_count(d.get_future())
    for w in ok:
        w.finish(None, None)
    bad[0].finish(None, ValueError("bad message"))
    bad[1].finish(None, None)
    c.close(WHAT, 5.0)
    assert a.is_success() and a.get_future().value() == "ok"
    assert isinstance(b.exception(), ValueError) and "bad message" in str(b.exception())
    assert "irecv" in str(d.exception()) and "was closed" in str(d.exception())
    assert len(ran) == 1
    for w in never:  # the receive ends late: the waiting thread finds its future settled
        w.finish(None, None)
    time.sleep(0.2)
    assert len(ran) == 1 and "was closed" in str(d.exception())


def test_add_after_close_fails_at_once() -> None:
    c = _Completer()
    c.close(WHAT, 1.0)
    w = Work("allreduce")
    a = c.add([w], None, None, "broadcast")
    assert a.is_completed() and "broadcast" in str(a.exception()) and "was closed" in str(a.exception())
    w.finish(None, None)  # its op ends: no completion is handed to the (shut down) pool
    assert "was closed" in str(a.exception())


def test_close_returns_at_its_deadline_when_a_callback_never_ends() -> None:
    c = _Completer()
    w = Work("allreduce")
    a = c.add([w], None, None, "all_reduce")
    release = threading.Event()
    a.get_future().then(lambda f: release.wait(30))
    w.finish(None, None)
    time.sleep(0.1)  # the pool has started the callback
    t0 = time.monotonic()
    with pytest.warns(ResourceWarning, match="still running"):
        c.close(WHAT, 0.5)
    assert time.monotonic() - t0 < 5
    release.set()
