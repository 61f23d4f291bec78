"""How `auto` decides whether a node's ranks may spin: the CPU matching and the cgroup quota, without MPI."""
from __future__ import annotations

from pathlib import Path

import pytest

from collective.shm import _cpu_quota, _own_cpus


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
