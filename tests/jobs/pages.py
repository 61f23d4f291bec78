"""Memory on 4 KiB pages and how much of a mapping is on huge pages: for the huge-page tests, local and in jobs."""
from __future__ import annotations

import mmap

import numpy as np


def anonymous(nbytes: int) -> np.ndarray:
    """``nbytes`` of fresh private anonymous memory on 4 KiB pages (as torch's CPU allocator gives), as bytes."""
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)


def huge_kb(a: np.ndarray) -> int:
    """AnonHugePages (kB) of the mapping that holds ``a``'s first byte, from /proc/self/smaps (the kernel may have
    merged the mapping with a neighbour: compare before and after)."""
    addr, inside, kb = a.ctypes.data, False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                kb = int(line.split()[1])
    return kb
