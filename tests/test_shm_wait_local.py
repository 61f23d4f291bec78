"""The waits of the shm arena without MPI: when `auto` lets ranks spin (CPU matching, cgroup quota), and the flag
protocol by which a rank leaves a first phase at its deadline (on_timeout="raise")."""
from __future__ import annotations

from pathlib import Path

import pytest

from collective.shm import _FINAL, ShmArena, Withdrawn, _cpu_quota, _fenced, _mark, _own_cpus, _reached, _verdict


@pytest.mark.parametrize("cpus,fits", [
    ([{0}, {1}], True),                    # mpiexec binding each rank to a core of its own
    ([{0, 1}, {0, 1}], True),              # unbound, two CPUs for two ranks
    ([{0, 1}, {0, 1}, {0, 1}], False),     # three ranks on two CPUs (oversubscribed)
    ([{0}, {0}, {1}, {2, 3}], False),      # four CPUs in all, but two ranks bound to the same one
    ([{0, 1, 2, 3}, {0}, {1}, {2}], True),  # the unbound rank takes the CPU nobody is bound to
    ([{5}], True),
])
def test_own_cpus(cpus: list[set[int]], fits: bool) -> None:
    assert _own_cpus(cpus) is fits


@pytest.mark.parametrize("text,cpus", [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 1),
                                       ("50000 100000\n", 1), ("garbage\n", None)])
def test_cpu_quota(tmp_path: Path, text: str, cpus: int | None) -> None:
    f = tmp_path / "cpu.max"
    f.write_text(text)
    assert _cpu_quota(str(f)) == cpus


def test_cpu_quota_without_the_file(tmp_path: Path) -> None:
    assert _cpu_quota(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("want,machine,fenced", [
    ("auto", "x86_64", False), ("auto", "AMD64", False),        # total store order: the flag publishes in order
    ("auto", "aarch64", True), ("auto", "ppc64le", True), ("auto", "riscv64", True),
    ("always", "x86_64", True), ("always", "aarch64", True),
])
def test_fenced(want: str, machine: str, fenced: bool) -> None:
    assert _fenced(want, machine) is fenced


# ------------------------------------------------------------------ withdrawal (on_timeout="raise")
@pytest.mark.parametrize("v,t,reached", [
    (5, 5, True), (6, 5, True), (4, 5, False), (0, 1, False),
    (-5, 5, False),                   # deciding at this very phase: not yet
    (-6, 5, True),                    # deciding at a later phase: it passed this one
    (-5 - _FINAL, 5, False),          # left this phase for good
    (-7 - _FINAL, 5, True),           # left a later phase: it passed this one
    (-3 - _FINAL, 5, False),
])
def test_reached(v: int, t: int, reached: bool) -> None:
    assert _reached(v, t) is reached


def test_mark() -> None:
    assert _mark(-5) == (5, False) and _mark(-5 - _FINAL) == (5, True) and _mark(-1 - _FINAL) == (1, True)


@pytest.mark.parametrize("flags,missing,gone", [
    ([(1, 5), (2, 5)], [], None),                 # every rank arrived: the deciding one stays
    ([(1, 5), (2, 4)], [2], None),                # rank 2 has not arrived: no rank can have passed
    ([(1, -5), (2, 5)], [], None),                # rank 1 is deciding too: it arrived, so both stay
    ([(1, -5 - _FINAL), (2, 5)], [], 1),          # rank 1 left: this one leaves
    ([(1, 6), (2, -6 - _FINAL)], [], None),       # both passed this phase (rank 2 left a later one)
    ([(1, 0), (2, 3), (3, 5)], [1, 2], None),
])
def test_verdict(flags: list[tuple[int, int]], missing: list[int], gone: int | None) -> None:
    assert _verdict(flags, 5) == (missing, gone)


def _arenas(P: int) -> list[ShmArena]:
    """P ranks' views of one node's flags in process memory, as ShmArena keeps them, for the protocol alone."""
    import numpy as np

    mem = np.zeros((P, 8), np.int64)
    flags = [mem[p].data.cast("B").cast("q") for p in range(P)]
    out = []
    for r in range(P):
        a = ShmArena.__new__(ShmArena)
        a.rank, a.size, a.flags, a.my_flag = r, P, flags, flags[r]
        a._others = [f for p, f in enumerate(flags) if p != r]
        a._peers = [(p, f) for p, f in enumerate(flags) if p != r]
        a._sync = lambda: None  # one process: the interpreter orders every read and write
        a.ticket, a.watch, a.withdrawable = 0, None, True
        a.arriving = a.withdraw_seq = a._declined = 0
        a.withdrawn = None
        out.append(a)
    return out


@pytest.mark.parametrize("P", [2, 3, 4])
def test_withdrawal_protocol_agrees(P: int) -> None:
    """Ranks arrive at random moments while some are asked to leave at random moments: either every rank passes
    the phase or every rank leaves it, never some of each (a rank that passed would read a region that one that
    left may never fill); a rank that never arrives makes every rank that is asked leave, naming it."""
    import random
    import sys
    import threading
    import time

    rng = random.Random(P)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        seen = set()
        for trial in range(40):
            ars = _arenas(P)
            absent = P - 1 if trial % 5 == 4 else None
            out: dict[int, object] = {}

            def rank(r: int, delay: float) -> None:
                time.sleep(delay)
                try:
                    ars[r]._arrival(1)
                    out[r] = "passed"
                except Withdrawn as exc:
                    out[r] = exc

            delays = [rng.uniform(0, 0.02) for _ in range(P)]
            asked = [r for r in range(P) if r != absent and rng.random() < 0.6] or [0]
            threads = [threading.Thread(target=rank, args=(r, delays[r])) for r in range(P) if r != absent]
            for th in threads:
                th.start()
            for r in asked:  # the watchdog of rank r, at its deadline
                time.sleep(rng.uniform(0, 0.02))
                ars[r].withdraw_seq = 1
            for th in threads:
                th.join(10)
                assert not th.is_alive(), f"trial {trial}: a rank still waits"
            kinds = {"passed" if v == "passed" else "left" for v in out.values()}
            assert len(kinds) == 1, f"trial {trial}: {out}"
            seen |= kinds
            if absent is not None:
                assert kinds == {"left"}
                assert any(isinstance(v, Withdrawn) and absent in v.missing for v in out.values()), out
            if kinds == {"left"}:  # every flag of a rank that left stays marked: a late rank leaves at once
                late = [a for a in ars if a.rank not in out]
                for a in late:
                    with pytest.raises(Withdrawn):
                        a._arrival(1)
        assert seen == {"passed", "left"}, seen  # both outcomes came up
    finally:
        sys.setswitchinterval(old)
