"""Single-copy transfers between the processes of a node: Linux cross-memory attach (process_vm_readv/writev).

The kernel copies straight from one process's memory into another's, so a
byte crosses once instead of twice (into a shared window, then out of it).
It needs ptrace permission over the peer (the same user, and a Yama
``ptrace_scope`` of 0, or CAP_SYS_PTRACE) and a seccomp policy that allows the
calls; :func:`probe` tries both directions between every pair of the node's
ranks when the shm arena is made, and every rank of the node agrees on the
outcome, so a node uses it everywhere or nowhere.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import numpy as np

from .errors import CollectiveError

__all__ = ["CrossMemory", "HugePages", "probe"]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _syscalls() -> tuple[Any, Any] | None:
    """libc's process_vm_readv and process_vm_writev, typed, or None where libc lacks them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        calls = libc.process_vm_readv, libc.process_vm_writev
    except (OSError, AttributeError):
        return None
    for f in calls:
        f.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                      ctypes.c_ulong)
        f.restype = ctypes.c_ssize_t
    return calls


class CrossMemory:
    """Reads from and writes into the memory of the node's other ranks, by node rank.

    Args:
        pids: every node rank's process id, in node-rank order.
        rank: this process's node rank.
    """

    def __init__(self, pids: list[int], rank: int) -> None:
        calls = _syscalls()
        if calls is None:
            raise OSError("process_vm_readv is not in this C library")
        self._readv, self._writev = calls
        self.pids = pids
        self.rank = rank
        self._local = _Iovec()
        self._remote = _Iovec()
        self._lp = ctypes.byref(self._local)
        self._rp = ctypes.byref(self._remote)

    def _move(self, call: Any, what: str, q: int, local: int, remote: int, nbytes: int) -> None:
        loc, rem = self._local, self._remote
        pid = self.pids[q]
        while nbytes > 0:
            loc.base, loc.len, rem.base, rem.len = local, nbytes, remote, nbytes
            k = call(pid, self._lp, 1, self._rp, 1, 0)
            if k <= 0:
                e = ctypes.get_errno() if k < 0 else 0
                raise CollectiveError(f"{what} of {nbytes} bytes at {remote:#x} of node rank {q} (pid {pid}) from "
                                      f"node rank {self.rank} failed: {os.strerror(e) if e else 'nothing moved'}")
            local += k
            remote += k
            nbytes -= k

    def read(self, q: int, dst: int, src: int, nbytes: int) -> None:
        """Copy ``nbytes`` from address ``src`` of node rank ``q`` to this process's address ``dst``."""
        self._move(self._readv, "process_vm_readv", q, dst, src, nbytes)

    def write(self, q: int, dst: int, src: int, nbytes: int) -> None:
        """Copy ``nbytes`` from this process's address ``src`` to address ``dst`` of node rank ``q``."""
        self._move(self._writev, "process_vm_writev", q, src, dst, nbytes)


#: madvise advice that collapses a range's pages into transparent huge pages in place (Linux 6.1+).
_MADV_COLLAPSE = 25
_PMD_SIZE_FILE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
_THP_ENABLED_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


class HugePages:
    """Backs the large arrays that a node's single-copy calls move again and again with transparent huge pages.

    The kernel pins every page of a peer's array it copies from or into, so a
    transfer between arrays on 4 KiB pages costs markedly more than one between
    arrays on huge pages. That holds for the library's single-copy path and for
    MPI's own large messages on a node (Open MPI reads them by cross-memory
    attach as well), so both tell this of their large arrays. NumPy asks for
    huge pages for its large arrays; other allocators (torch's CPU tensors) do
    not. So a range of memory that calls
    post again and again (an array that lives, as a DDP bucket or a Horovod
    fusion buffer does) is collapsed into huge pages in place, once: madvise
    MADV_COLLAPSE on the whole huge pages inside it, which keeps its contents
    and leaves the memory around it alone. Where the node's transparent huge
    pages are set to ``never`` nothing is collapsed (MADV_COLLAPSE itself
    ignores that setting, so it is read here). A range the kernel refuses
    (before Linux 6.1, shared or file-backed memory it does not put on huge
    pages, no huge page to be had) stays as it is and is not asked again.

    Collapsing costs about as much as a few transfers of the range, and buys
    nothing for memory that is freed soon after: FSDP2 allocates its gathered
    parameters afresh every step, often at an address it used before. So a
    range is collapsed only at its ``after``-th posting, and only until
    ``budget`` bytes have been collapsed in all: a job's long-lived arrays are
    few and are posted from the first steps on, and whatever else reaches
    that count costs a bounded once.

    Every communicator's arena notes into the process's one instance
    (:meth:`process`): the budget is the process's, and a range counts its
    postings through any communicator.

    Args:
        size: the huge page size in bytes (None: the kernel's, 0 where it has none or they are set to ``never``:
            then nothing is collapsed).
        after: the posting of a range that collapses it.
        budget: bytes collapsed at most, in all.
    """

    #: Ranges remembered at most (a job that posts ever new ranges forgets those it posted least recently).
    LIMIT = 4096

    _process: HugePages | None = None
    _process_lock = threading.Lock()

    @classmethod
    def process(cls) -> HugePages:
        """The process's instance, which every communicator's arena shares (made on first use)."""
        with cls._process_lock:
            if cls._process is None:
                cls._process = cls()
            return cls._process

    def __init__(self, size: int | None = None, after: int = 16, budget: int = 4 << 30) -> None:
        self.size = _pmd_size() if size is None else size
        self.after, self.budget = after, budget
        self._lock = threading.Lock()  # communicators on different threads note into one instance
        self._madvise: Any = None
        if self.size > 0:
            try:
                f = ctypes.CDLL(None, use_errno=True).madvise
            except (OSError, AttributeError):
                self.size = 0
            else:
                f.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                f.restype = ctypes.c_int
                self._madvise = f
        #: (address, bytes) -> how often it was posted (``after`` and beyond: asked already, whatever the answer).
        self._seen: dict[tuple[int, int], int] = {}
        #: Bytes collapsed so far.
        self.collapsed = 0

    def note(self, addr: int, nbytes: int) -> None:
        """A call posts ``nbytes`` at ``addr`` of this process: collapse the range at its ``after``-th posting."""
        hp = self.size
        if hp <= 0 or nbytes < 2 * hp:
            return
        key = (addr, nbytes)
        seen = self._seen
        with self._lock:
            # Taken out and put back: the dict's order is the order of the latest postings, so a long-lived range,
            # collapsed already, is never the one forgotten (and collapsed, and counted, again).
            k = seen.pop(key, 0) + 1
            if k == 1 and len(seen) >= self.LIMIT:
                for old in list(seen)[: self.LIMIT // 2]:
                    del seen[old]
            seen[key] = min(k, self.after + 1)
            if k != self.after:
                return
            lo = (addr + hp - 1) // hp * hp
            hi = (addr + nbytes) // hp * hp
            if hi <= lo or self.collapsed + (hi - lo) > self.budget:
                return
            if self._madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
                self.collapsed += hi - lo
        # Else the kernel refused this range (no huge page to be had now, memory it cannot collapse: shared or
        # file-backed, or a kernel without the advice): it stays as it is, and is not asked again.


def _pmd_size() -> int:
    """The size of a transparent huge page in bytes, 0 where the kernel has none or they are set to ``never``."""
    try:
        with open(_THP_ENABLED_FILE) as f:
            if "[never]" in f.read():
                return 0
    except OSError:
        pass  # no such setting: the size file decides
    try:
        with open(_PMD_SIZE_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _pid_namespace() -> int:
    """An id of this process's PID namespace (0 where it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def probe(node_comm: Any) -> CrossMemory | None:
    """A :class:`CrossMemory` over ``node_comm`` where every pair of its ranks can read and write each other's
    memory, else None on every rank (collective over the node).

    Each rank reads a known word (its pid) from every other rank and, only where that word is right, writes its
    mark into a word of that rank, which then checks the marks; the node's ranks then agree, so all use it or none
    does. Ranks in different PID namespaces never try.
    """
    from mpi4py import MPI

    P, r = node_comm.Get_size(), node_comm.Get_rank()
    words = np.zeros(P + 1, np.int64)
    pid = os.getpid()
    words[0] = pid
    ns = _pid_namespace()
    seen = node_comm.allgather((pid, ns, words.ctypes.data))
    # A pid names a process only within its PID namespace: ranks in different ones (containers that share the
    # node's shared memory) would reach some other process, so they never try (every rank sees the same list).
    ok = len({n for _, n, _ in seen}) == 1
    cm: CrossMemory | None = None
    try:
        if ok:
            cm = CrossMemory([p for p, _, _ in seen], r)
            got = np.zeros(1, np.int64)
            mark = np.array([r + 1], np.int64)
            for q, (qpid, _, addr) in enumerate(seen):
                if q == r:
                    continue
                cm.read(q, got.ctypes.data, addr, 8)
                if int(got[0]) != qpid:  # not that rank's word: write nothing there
                    ok = False
                    break
                cm.write(q, addr + 8 * (1 + r), mark.ctypes.data, 8)
    except (OSError, CollectiveError):
        ok = False
    node_comm.Barrier()  # every write has landed before the marks are checked
    ok = ok and all(int(words[1 + q]) == q + 1 for q in range(P) if q != r)
    if not node_comm.allreduce(int(ok), op=MPI.MIN):
        return None
    return cm
