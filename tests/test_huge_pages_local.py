"""collective.cma.HugePages without MPI: which ranges it collapses into huge pages, when, and that it keeps the bytes.

The multi-rank side (a repeated single-copy allreduce on such an array, and the switch) is in
tests/jobs/shm_single_copy.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from jobs.pages import anonymous, huge_kb

from collective.cma import HugePages

MIB = 1 << 20


class _Kernel:
    """Stands in for madvise where only the bookkeeping is under test: records the ranges asked for."""

    def __init__(self, answer: int = 0) -> None:
        self.asked: list[tuple[int, int, int]] = []
        self.answer = answer

    def __call__(self, addr: int, nbytes: int, advice: int) -> int:
        self.asked.append((addr, nbytes, advice))
        return self.answer


def _pages(answer: int = 0, after: int = 2, budget: int = 1 << 40) -> tuple[HugePages, _Kernel]:
    hp = HugePages(size=2 * MIB, after=after, budget=budget)
    k = _Kernel(answer)
    hp._madvise = k
    return hp, k


def test_second_sighting_collapses_whole_pages_inside() -> None:
    hp, k = _pages()
    addr = 2 * MIB * 1000 + 64  # not aligned: the first and last partial huge pages are left alone
    hp.note(addr, 16 * MIB)
    assert k.asked == [] and hp.collapsed == 0
    hp.note(addr, 16 * MIB)
    assert k.asked == [(2 * MIB * 1001, 14 * MIB, 25)] and hp.collapsed == 14 * MIB
    hp.note(addr, 16 * MIB)  # once only
    assert len(k.asked) == 1


def test_collapsed_at_the_after_th_posting() -> None:
    hp, k = _pages(after=16)
    for i in range(15):
        hp.note(2 * MIB * 3, 8 * MIB)
    assert k.asked == []
    hp.note(2 * MIB * 3, 8 * MIB)
    assert k.asked == [(2 * MIB * 3, 8 * MIB, 25)]
    for i in range(40):
        hp.note(2 * MIB * 3, 8 * MIB)
    assert len(k.asked) == 1
    assert HugePages(size=2 * MIB).after == 16  # the default: long-lived arrays, not one step's


def test_budget_bounds_the_bytes_collapsed() -> None:
    hp, k = _pages(budget=20 * MIB)
    for base in (10, 20, 30):
        for _ in range(2):
            hp.note(2 * MIB * base, 8 * MIB)
    assert len(k.asked) == 2 and hp.collapsed == 16 * MIB  # the third would pass the budget


def test_small_ranges_and_other_sizes() -> None:
    hp, k = _pages()
    for _ in range(3):
        hp.note(2 * MIB * 10 + 8, 4 * MIB - 16)  # under two huge pages: nothing whole inside, never asked
    assert k.asked == []
    hp.note(2 * MIB * 20, 8 * MIB)
    hp.note(2 * MIB * 20, 6 * MIB)  # the same address with another size is another range
    assert k.asked == []
    hp.note(2 * MIB * 20, 6 * MIB)
    assert k.asked == [(2 * MIB * 20, 6 * MIB, 25)]


def test_refused_range_is_not_asked_again() -> None:
    hp, k = _pages(answer=-1)
    for _ in range(4):
        hp.note(2 * MIB * 7, 8 * MIB)
    assert len(k.asked) == 1 and hp.collapsed == 0
    hp.note(2 * MIB * 50, 8 * MIB)
    hp.note(2 * MIB * 50, 8 * MIB)
    assert len(k.asked) == 2  # a refusal of one range stops none of the others


def test_memory_is_bounded() -> None:
    hp, k = _pages()
    for i in range(HugePages.LIMIT + 10):
        hp.note(2 * MIB * (i + 1), 4 * MIB)
    assert len(hp._seen) <= HugePages.LIMIT
    hp.note(2 * MIB * (HugePages.LIMIT + 10), 4 * MIB)  # a recent range is still remembered
    assert len(k.asked) == 1


def test_a_range_posted_all_along_is_never_forgotten() -> None:
    # Ranges are forgotten least recently posted first: a long-lived buffer, collapsed once, stays remembered among
    # ever new ranges (forgetting it would collapse it, and count it against the budget, again and again).
    hp, k = _pages()
    hp.LIMIT = 8
    bucket = 2 * MIB * 4000
    hp.note(bucket, 8 * MIB)
    hp.note(bucket, 8 * MIB)
    assert len(k.asked) == 1
    for i in range(10 * hp.LIMIT):
        hp.note(2 * MIB * (i + 1), 4 * MIB)
        hp.note(bucket, 8 * MIB)
        assert len(hp._seen) <= hp.LIMIT
    assert len(k.asked) == 1 and hp.collapsed == 8 * MIB


def test_one_instance_per_process() -> None:
    assert HugePages.process() is HugePages.process()


def test_no_huge_pages() -> None:
    hp = HugePages(size=0)
    for _ in range(2):
        hp.note(2 * MIB * 5, 64 * MIB)
    assert hp.collapsed == 0


def test_never_collapses_where_huge_pages_are_set_to_never(tmp_path, monkeypatch) -> None:
    # MADV_COLLAPSE ignores the system's setting, so HugePages reads it: an administrator's "never" is kept.
    import collective.cma as cma

    size_file, enabled = tmp_path / "hpage_pmd_size", tmp_path / "enabled"
    size_file.write_text("2097152\n")
    monkeypatch.setattr(cma, "_PMD_SIZE_FILE", str(size_file))
    monkeypatch.setattr(cma, "_THP_ENABLED_FILE", str(enabled))
    enabled.write_text("always madvise [never]\n")
    assert HugePages().size == 0
    for setting in ("[always] madvise never\n", "always [madvise] never\n"):
        enabled.write_text(setting)
        assert HugePages().size == 2 * MIB
    enabled.unlink()  # no such setting: the size file decides
    assert HugePages().size == 2 * MIB


def test_real_kernel_keeps_the_bytes() -> None:
    hp = HugePages(after=2)
    if not hp.size:
        pytest.skip("this kernel has no transparent huge pages")
    buf = anonymous(12 * MIB)
    a = buf[100:100 + 10 * MIB]
    a[:] = np.arange(a.size, dtype=np.uint64).astype(np.uint8) * 7
    buf[:100] = 3
    buf[100 + 10 * MIB:] = 5
    want = a.copy()
    kb = huge_kb(a)
    hp.note(a.ctypes.data, a.nbytes)
    hp.note(a.ctypes.data, a.nbytes)
    assert np.array_equal(a, want) and (buf[:100] == 3).all() and (buf[100 + 10 * MIB:] == 5).all()
    if not hp.collapsed:
        pytest.skip("the kernel refused MADV_COLLAPSE here (before Linux 6.1, THP off, or no huge page free)")
    assert huge_kb(a) - kb >= 2048
