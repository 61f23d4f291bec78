"""The `shm` algorithm and `alloc()`: collectives inside one node over MPI-3 shared windows, no message passing.

Terms (the names below follow them):

* **arena** -- one ``MPI.Win.Allocate_shared`` window over the node
  communicator. Every rank owns a *segment* of it: a 128-byte *flag* (a
  monotonically increasing int64 counter, then two fingerprint slots: see
  ``exchange``, then what the calls post) followed by two *regions* of
  ``chunk`` bytes (double buffering). Every rank maps every segment.
* **chunk** -- a piece of the user's buffer processed as a unit (4 MiB by
  default: fewer phases beat cache-sized chunks, see docs/bench).
* **slice** -- within a chunk, the part rank r reduces: chunk elements split
  evenly by local rank.
* **phase** -- a rank raises its flag to the phase's *ticket* (tickets only
  grow; the flags also tell stall reports who is behind), then waits until
  every rank has ended the phase: by watching the other ranks' flags when the
  node has a core for every rank, else in the node communicator's barrier
  (see ``ShmArena.spins``). Every rank of a node waits the same way.

Allreduce of one chunk, on rank r (P ranks on the node)::

    copy own input chunk but slice r -> region_r      | phase ARRIVED (the call's first one: its
                                                      |   fingerprint check, see ShmArena.arrive)
    region_r[slice r] = region_0 + ... + input + ...  | (rank order: deterministic; rank r's own
        ... + region_P-1                              |   slice read from its input, never copied)
    out[slice r] = region_r[slice r]                  | phase REDUCED
    out[slice q] = region_q[slice q], q != r

Copying into its own region before the check sends nothing: no other rank
reads a region before the phase that follows.

Chunk g uses region g % 2. Writing region g % 2 again at chunk g+2 is safe:
rank r gets there only after every rank arrived at chunk g+1, which each did
after finishing chunk g. So two phases per chunk, and no final phase. A call of
at most ``ONE_PHASE_BYTES`` is one phase: after ARRIVED every rank reduces the
whole chunk from all regions itself (in rank order, the same bits).

**withdrawal** -- on an arena made *withdrawable* (a communicator with
``on_timeout="raise"``), the first phase of a call (its *arrival*: the
cross-rank check, before any rank reads another's data) waits by flags
alone, and a rank may leave it when the watchdog says the op's deadline has
passed (:meth:`ShmArena.arrival`). It lowers its flag to ``-t`` (ticket t,
*deciding*), fences, and reads every other flag: if some rank has not
arrived (its flag below t), no rank can have passed the phase, since passing
takes every flag at t, read after its own flag was raised and fenced; the
rank then marks its flag ``-t - _FINAL`` (*gone*) for good and raises. If
every rank has arrived meanwhile, it raises its flag to t again and goes on.
A rank that passes the phase reads every flag once more after a fence, so it
never passes a phase that a deciding rank leaves; a rank waiting in it that
finds a flag gone leaves too. The flags of a rank that left stay marked
until the window is freed, and its regions are never written again, so a
peer that comes later finds the mark and raises instead of reading them.

**single copy** -- where the node's ranks may read and write each other's
memory (cross-memory attach, probed when the arena is made: see
collective.cma), an allreduce or reduce of at least ``CMA_MIN_BYTES`` never
touches the regions: each rank posts its input's and output's addresses, its
call number and size in its flag before the first phase (ARRIVED, the
cross-rank check); then rank r, piece by piece of its slice, reads slice r
of every other rank's input straight into its cache, reduces in rank order
(the same bits as the copy-in path) and writes the result straight into
every rank's output (the root's alone for a reduce); a second phase (DONE)
says every result has landed and nobody reads an input any more. Each byte
crosses between processes once, and a call is two phases whatever its size.
A rank touches another's memory only at addresses that rank posted for the
very call (same call number, collective, root and size), so a rank on
another path, or with another collective, root or size, is an error, never a
stray write. A rank whose transfers fail (a peer's memory refused, a peer
gone) marks the call in its flag and still ends the last phase, so no rank
returns while another touches its arrays; every rank then raises, and the
node copies through the regions from then on. A reduce_scatter from
``CMA_MIN_BYTES`` of input is the same with rank r's block in place of its
slice and no writes (it reduces straight into its own output); an allgather
from ``CMA_MIN_BYTES`` of output reads every other rank's input straight into
its block of the output.
The variable-size calls (alltoall, allgather, gather, scatter) use it too,
reading only: each rank posts its input's address and size with the ticket
before the call's first phase (the check; :meth:`ShmArena.post_input`),
then reads its blocks from every owner's input straight into its output
and ends one phase, after which no rank reads another's input
(:meth:`ShmArena.cross_read`; which calls take it:
``collective.variable.single_copy``).

``alloc()`` hands out arrays that live in their own shared window; an
allreduce on such an array, in place or into another alloc'd array, reads
every rank's data where it lies (no copy-in): rank r reduces slice r and
writes it straight into every rank's output, so a call is two phases
whatever its size (inputs ready; all results landed).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .cma import CrossMemory, HugePages, probe

try:  # streaming copies (collective/_stream.c); absent where the package was built without a C compiler
    from ._stream import STREAMS as _STREAMS
    from ._stream import copy as _stream_copy
except ImportError:
    _STREAMS, _stream_copy = 0, None
if not _STREAMS:  # a processor without the streaming stores it knows (x86-64's): NumPy's copies, as without it
    _stream_copy = None
from .errors import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CollectiveValueError,
    SharedMemoryError,
)

__all__ = ["ShmArena", "SharedArrays", "QuickScatter", "WindowRead", "Withdrawn", "DEFAULT_CHUNK_BYTES",
           "ONE_PHASE_BYTES", "WINDOW_MIN_BYTES", "SHM_WAITS", "MIN_CHUNK_BYTES", "arena_bytes", "fitting_chunk",
           "shm_space", "commit"]

# Fewer phases won over cache-sized chunks in the chunk-size runs of docs/bench (above all when ranks outnumber
# cores and every phase costs context switches).
DEFAULT_CHUNK_BYTES = 4 << 20
#: COLLECTIVE_SHM_STREAM_BYTES's default (see ShmArena.streams).
DEFAULT_STREAM_BYTES = 8 << 20
#: Piece of its slice a rank reduces and then pushes to the others in the window path (alloc'd arrays).
WINDOW_PIECE_BYTES = 1 << 20
#: Allreduce and reduce up to this many bytes (in one chunk) run in one phase: every rank reduces all of
#: it, reading P times the bytes, which beats a second synchronisation while the bytes are few.
ONE_PHASE_BYTES = 256 << 10
#: shm allreduces of alloc'd arrays (in place, or into another alloc'd array) from this size on run in their
#: window; smaller ones are copied in and take the one-phase path, which beats the window's two phases there.
WINDOW_MIN_BYTES = 256 << 10
#: Shm allreduces, reduces, reduce_scatters and allgathers from this size on move each byte once between the
#: ranks' own arrays by cross-memory attach where the node allows it (see collective.cma and "single copy"). Below
#: it the data stays in the last-level cache, where the copy-in path's extra copy costs less than the kernel's
#: pinning of every page (docs/bench/shm_single_copy.txt).
CMA_MIN_BYTES = 16 << 20
#: The piece of its slice a rank reduces at a time on the single-copy path: its operands and the result stay in
#: the caches between the reads from the peers and the writes to them, and each system call moves this much.
CMA_PIECE_BYTES = 1 << 20
#: Where every rank spins on a core of its own, shm alltoall, allgather, gather and scatter from this many bytes
#: per rank on (the mean of the ranks' inputs) read their blocks straight from the owners' inputs by cross-memory
#: attach where the node allows it (see "single copy", and ``collective.variable.single_copy`` where ranks share
#: cores): two phases and one copy a byte, where the copy-in path takes one phase (within a chunk, see
#: QuickScatter) and two copies a byte; below it the copy-in path's copies stay in the caches and cost less than the
#: system calls and the kernel's pinning of every page (bench/bench_single_copy_variable.py --every-size).
CMA_READ_MIN_BYTES = 1 << 20
_FLAG = 128  # two cache lines for the flag, so flags of different ranks never share a line
#: Word of the flag whose bit ``seq & 1`` says that this rank posted call ``seq``'s data with its check (see
#: QuickScatter); words 0-6 are the ticket, the fingerprint slots and the variable-size posts (see exchange_pairs).
_POSTED = 7
#: Words of the flag where a single-copy call posts its number (calls counted by the arena), the addresses of its
#: input and output in this process and the input's size in bytes (see "single copy").
_CMA_CALL, _CMA_X, _CMA_OUT, _CMA_BYTES = 8, 9, 10, 11
#: Words where a single-copy call also posts which collective it is (see _CMA_WHAT) and its root (-1: none), and where
#: a rank whose transfers failed marks that call (its number plus one) before the last phase (see "single copy").
_CMA_KIND, _CMA_ROOT, _CMA_FAILED = 12, 13, 14
#: The kinds of single-copy call; "variable" is alltoall, allgather, gather and scatter by
#: :meth:`ShmArena.cross_read`, whose posts give the input alone (the output is the reader's own).
_CMA_WHAT = ("allreduce", "reduce", "reduce_scatter", "allgather", "variable")
_CMA_VARIABLE = 4
# Waiting on a flag: this many plain reads (holding the interpreter lock, so a partner a few microseconds behind
# is caught at once), then sched_yield (which lets other threads of this process run) for _YIELD_S, then naps,
# for a rank that is far behind (a long step or a slow rank: a nap costs a fraction of a core where a spin takes
# all of it, and oversleeps by the timer slack, which a wait this long can afford).
_SPINS = 200
_YIELD_S = 2e-3
_NAP_S = 20e-6
#: How often a napping wait checks that its peers live (elastic mode): a failure is noticed within about this.
_WATCH_S = 5e-3
#: A flag below ``-_FINAL`` says its rank left the phase of ticket ``-flag - _FINAL`` for good; one in
#: (-_FINAL, 0) that its rank is deciding whether to leave the phase of ticket ``-flag`` (see "withdrawal").
_FINAL = 1 << 62


def _mark(v: int) -> tuple[int, bool]:
    """(ticket, gone) of a marked flag ``v`` (negative): the phase its rank withdraws or withdrew from."""
    return (-v - _FINAL, True) if v < -_FINAL else (-v, False)


def _reached(v: int, t: int) -> bool:
    """Whether a flag reading ``v`` says its rank has ended the phase of ticket ``t``'s arrival for good: raised to
    t or beyond, or marked at a later ticket (it passed t before it left a later phase)."""
    return v >= t or (v < 0 and _mark(v)[0] > t)


def _verdict(flags: list[tuple[int, int]], t: int) -> tuple[list[int], int | None]:
    """A deciding rank's look at the other ranks' ``(rank, flag)`` in the phase of ticket ``t``: (the ranks that have
    not arrived, a rank that has left it for good or None). Both empty: every rank arrived, and some may have
    passed the phase, so the deciding rank must stay; a rank deciding too counts as arrived."""
    missing: list[int] = []
    gone = None
    for q, v in flags:
        if v >= t:
            continue
        if v < 0:
            m, final = _mark(v)
            if m > t or (m == t and not final):
                continue
            if m == t:
                gone = q if gone is None else gone
                continue
        missing.append(q)
    return missing, gone


class Withdrawn(CollectiveTimeoutError):
    """This rank left the first phase of an op (see "withdrawal"); the sequencer turns it into the call's error.

    Attributes:
        missing: the node ranks that had not arrived (empty when another rank left first).
        gone: a node rank that had left the phase first, else None.
        again: True when the arena refused a later call (this rank left an earlier op).
    """

    def __init__(self, missing: list[int], gone: int | None, again: bool = False) -> None:
        self.missing, self.gone, self.again = tuple(missing), gone, again
        super().__init__("left an op's first phase" + (f": node ranks {self.missing} had not arrived" if missing
                                                       else f": node rank {gone} had left it" if gone is not None
                                                       else " earlier"))


# ------------------------------------------------------------ /dev/shm space
#: The smallest chunk the arena shrinks to on a small /dev/shm: the one-phase path needs a chunk of this.
MIN_CHUNK_BYTES = ONE_PHASE_BYTES
#: The arena takes at most this share of the free shared memory it finds, leaving the rest to ``alloc`` and to
#: MPI's own shared-memory transport.
ARENA_SHARE = 0.5
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in for writing now, failing (not SIGBUS) on a shortage
_MAP_FIXED_NOREPLACE = 0x100000
_libc: Any = None


def shm_dir() -> str:
    """Where Open MPI's shared windows live: ``OMPI_MCA_osc_sm_backing_directory``, else /dev/shm."""
    return os.environ.get("OMPI_MCA_osc_sm_backing_directory") or "/dev/shm"


def shm_space() -> tuple[int, int]:
    """(free, total) bytes of the file system shared windows live on; (-1, -1) when it cannot be read."""
    try:
        st = os.statvfs(shm_dir())
    except OSError:
        return -1, -1
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def node_space(node_comm: Any) -> tuple[int, int]:
    """:func:`shm_space` as node rank 0 reads it, on every rank of the node (collective; plain buffers)."""
    buf = np.array(shm_space() if node_comm.Get_rank() == 0 else (0, 0), np.int64)
    node_comm.Bcast(buf, root=0)
    return int(buf[0]), int(buf[1])


def arena_bytes(nranks: int, chunk: int) -> int:
    """Shared memory an arena of ``nranks`` segments of ``chunk``-byte regions takes (pages rounded up)."""
    seg = _FLAG + 2 * chunk
    page = mmap.PAGESIZE
    return nranks * ((seg + page - 1) // page * page)


def fitting_chunk(want: int, nranks: int, free: int) -> int:
    """The largest chunk of at most ``want`` bytes (a multiple of 64) whose arena takes at most ``ARENA_SHARE``
    of ``free`` bytes; 0 when not even :data:`MIN_CHUNK_BYTES` fits. ``free`` < 0 (unknown): ``want``."""
    if free < 0:
        return want
    chunk = want
    budget = int(free * ARENA_SHARE)
    if arena_bytes(nranks, chunk) > budget:
        chunk = (budget // nranks - _FLAG - mmap.PAGESIZE) // 2 // 64 * 64
    return chunk if chunk >= min(want, MIN_CHUNK_BYTES) else 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def space_message(what: str, need: int, free: int, total: int, chunk_hint: bool | None) -> str:
    """What a shortage of shared memory says: what was needed, what was found, and the fixes (``chunk_hint``:
    True, a smaller arena chunk; False, freeing alloc'd arrays; None, only more shared memory)."""
    found = (f"found {_mib(free)} free of {_mib(total)} in {shm_dir()}" if free >= 0
             else f"could not read the size of {shm_dir()}")
    size_mb = max(256, -(-((max(0, total)) + need) // (64 << 20)) * 64)
    fix = f"give the node more shared memory (docker run --shm-size={size_mb}m ..., or mount a larger tmpfs on " \
          f"{shm_dir()})"
    if chunk_hint:
        fix += ", or need less: COLLECTIVE_SHM_CHUNK_BYTES=1048576 (or smaller; the shm arena takes 2 chunks a rank)"
    elif chunk_hint is not None:
        fix += ", or free arrays you no longer need (comm.free(a))"
    return f"{what} needs {_mib(need)} of shared memory; {found}: {fix}"


def _madvise(addr: int, length: int, advice: int) -> int:
    """madvise(2) on [addr, addr+length); 0 or the errno (EINVAL also where the advice is unknown)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _libc.madvise(addr, length, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def commit(buf: np.ndarray) -> str | None:
    """Give every page of ``buf`` (shared memory) its backing now; None when done, else why it could not.

    A window's file is sparse: a page without backing store found free by a
    later write is SIGBUS, no error. Faulting every page in for writing at
    creation turns a shortage into this error instead. Where the kernel
    cannot populate ahead (before Linux 5.14, or not Linux) nothing is done.
    """
    n = buf.nbytes
    if n == 0 or not sys.platform.startswith("linux"):
        return None
    addr = buf.__array_interface__["data"][0]
    page = mmap.PAGESIZE
    start = addr // page * page
    try:
        err = _madvise(start, addr + n - start, _MADV_POPULATE_WRITE)
    except (OSError, AttributeError):  # no libc to call
        return None
    if err == 0 or err == errno.EINVAL:
        return None
    return os.strerror(err)


def _mpi_op(name: str) -> Any:
    from mpi4py import MPI

    return getattr(MPI, name)


def _other_views(segs: list[np.ndarray], a: np.ndarray) -> int:
    """How many arrays, besides ``segs`` (every rank's part of one window) and ``a``, view the window's memory.

    Every view of a part has that part's whole-segment array as its ``base``
    (NumPy points a view at the first array up the chain that wraps a foreign
    buffer), so the references to those arrays count the views.
    """
    extra = 0
    for seg in segs:
        base = seg.base
        if base is None:
            continue
        # Held here: ``base`` and getrefcount's argument; by ``seg``; by ``a`` when it views this part.
        held = 3 + (1 if a is not seg and a.base is base else 0)
        extra += sys.getrefcount(base) - held
    return extra


def _placeholder(addr: int, nbytes: int) -> None:
    """Map read-only zero pages where a freed window's array was, where nothing else is mapped now, so a stale
    read of it gives zeros instead of a crash (best effort: Linux only)."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    start = (addr + page - 1) // page * page  # whole pages only: a partial one may hold live data
    end = (addr + nbytes) // page * page
    if end <= start:
        return
    try:
        if _libc is None:
            _madvise(0, 0, 0)  # loads libc
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long)
        r = _libc.mmap(start, end - start, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS |
                       _MAP_FIXED_NOREPLACE, -1, 0)
        if r is not None and r != start and r != ctypes.c_void_p(-1).value:
            _libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
            _libc.munmap(r, end - start)  # an old kernel placed it elsewhere: not ours to keep
    except (OSError, AttributeError):
        pass


def _agree_ok(comm: Any, ok: bool) -> bool:
    """Whether every rank of ``comm`` has ``ok`` (collective)."""
    from mpi4py import MPI

    return bool(comm.allreduce(int(ok), op=MPI.MIN))


def _cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole CPUs a cgroup v2 quota allows (``cpu.max``: quota and period; rounded down, at least 1), or None
    without one. Read where a container sees its own cgroup; a quota set elsewhere goes unseen."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def _own_cpus(cpus: list[set[int]]) -> bool:
    """Whether every rank can have a CPU of its own, each rank choosing from its allowed set (a matching:
    ranks bound to {0}, {0}, {1}, {2, 3} cannot, though the four sets span four CPUs)."""
    owner: dict[int, int] = {}

    def place(r: int, seen: set[int]) -> bool:
        for c in cpus[r]:
            if c not in seen:
                seen.add(c)
                if c not in owner or place(owner[c], seen):
                    owner[c] = r
                    return True
        return False

    return all(place(r, set()) for r in range(len(cpus)))


#: How the ranks of a node wait for each other in a phase (COLLECTIVE_SHM_WAIT): see _node_spins.
SHM_WAITS = ("auto", "spin", "barrier")

#: Where a phase puts a memory fence on each side of its flag (COLLECTIVE_SHM_FENCES): see _fenced.
SHM_FENCES = ("auto", "always")


def _fenced(want: str, machine: str | None = None) -> bool:
    """Whether a phase needs fence instructions on this processor (``want``: one of SHM_FENCES).

    A phase publishes a rank's writes by raising its flag after them, and a
    rank that sees the flag reads what was written before it. That needs
    stores to reach memory in program order and loads not to pass older
    loads. x86-64 guarantees both for ordinary and string stores (total
    store order); its non-temporal stores it does not order, so every copy
    made with them ends with a store fence of its own (glibc's ``memcpy``,
    ``collective._stream.copy``): the ordering costs nothing there, and
    ``auto`` leaves the fences out. Elsewhere (Arm, POWER) loads and stores reorder, and
    ``Win_sync``, a full barrier, orders them. A rank withdrawing from a
    phase (elastic mode) fences everywhere: it writes its flag and then
    reads the others', an order that total store order does not keep.
    """
    arch = (machine if machine is not None else platform.machine()).lower()
    return want == "always" or arch not in ("x86_64", "amd64", "i386", "i686")


def _node_spins(node_comm: Any, MPI: Any, want: str) -> bool:
    """Whether the node's ranks wait for each other by watching flags (collective; the same answer on every rank).

    ``want`` (one of SHM_WAITS) on each rank: ``auto`` spins when every rank
    can have a CPU of its own within its affinity (mpiexec may bind each rank
    to one core) and the ranks are no more than a cgroup CPU quota allows. A
    spinning rank takes the core of a rank that shares it (many times slower
    where ranks outnumber cores): there MPI's barrier, which yields the core,
    waits instead. The ranks spin only if every one of them
    would.
    """
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        mine = set(range(os.cpu_count() or 1))
    allowed = np.zeros(1024, np.uint8)  # CPUs 0-1023, one byte each
    allowed[[c for c in mine if c < 1024]] = 1
    size = node_comm.Get_size()
    every = np.empty((size, allowed.size), np.uint8)
    node_comm.Allgather(allowed, every)
    quota = _cpu_quota()
    fits = _own_cpus([set(np.flatnonzero(row).tolist()) for row in every]) and (quota is None or size <= quota)
    vote = {"spin": 1, "barrier": 0}.get(want, int(fits))
    v = np.array([vote], np.int32)
    node_comm.Allreduce(MPI.IN_PLACE, v, MPI.MIN)  # every rank must wait the same way, or phases never meet
    return bool(v[0])


def _spun(f: memoryview, t: int) -> bool:
    """The first two stages of a wait for ``f[0] >= t``: spin, then yield the core for _YIELD_S (see _SPINS);
    whether the flag got there. What is left is napping, which each waiter does its own way."""
    for _ in range(_SPINS):
        if f[0] >= t:
            return True
    yield_ = os.sched_yield
    clock = time.monotonic
    end = clock() + _YIELD_S
    while clock() < end:
        for _ in range(64):
            if f[0] >= t:
                return True
            yield_()
    return False


def _await_flag(f: memoryview, t: int, watch: Callable[[], None] | None = None) -> None:
    """Return once ``f[0] >= t`` (another rank's flag): spin, then yield the core, then nap (see _SPINS).

    The deadline is the watchdog's, which aborts the job from its thread (the
    interpreter lock is given up at least every switch interval). ``watch``
    (elastic mode) is called about every ``_WATCH_S`` while napping and raises
    when a peer is gone: a dead rank never raises its flag.
    """
    if _spun(f, t):
        return
    clock = time.monotonic
    sleep = time.sleep
    # A negative flag: its rank left a later phase's arrival (see "withdrawal"), so it ended this one.
    if watch is None:
        while True:
            v = f[0]
            if v >= t or (v < 0 and _reached(v, t)):
                return
            sleep(_NAP_S)
    due = clock() + _WATCH_S
    while True:
        v = f[0]
        if v >= t or (v < 0 and _reached(v, t)):
            return
        sleep(_NAP_S)
        if clock() > due:
            watch()
            due = clock() + _WATCH_S


def _reduce_into(ufunc: Callable[..., Any], parts: list[np.ndarray], dst: np.ndarray) -> None:
    """``dst = parts[0] op parts[1] op ...``, in rank order: every shm path reduces through here, so every rank's
    result, whatever its path, is bitwise the same."""
    if len(parts) > 1:
        ufunc(parts[0], parts[1], dst)
    else:
        np.copyto(dst, parts[0])
    for p in parts[2:]:
        ufunc(dst, p, dst)


def _reduce_slices(ufunc: Callable[..., Any], regs: list[np.ndarray], a: int, b: int, dst: np.ndarray) -> None:
    """``dst = regs[0][a:b] op regs[1][a:b] op ...`` (see :func:`_reduce_into`)."""
    _reduce_into(ufunc, [r[a:b] for r in regs], dst)


def _allocate_committed(node_comm: Any, nbytes: int, what: str, chunk_hint: bool) -> Any:
    """``MPI.Win.Allocate_shared`` of ``nbytes`` per rank with every rank's segment committed (collective over
    the node); on a shortage on any rank, every rank raises :class:`SharedMemoryError` and nothing is left.

    A shortage found by MPI's own check (MPI_ERR_INTERN, MPI_ERR_NO_MEM) or by
    :func:`commit` reads the same: what was needed, what was found, the fix.
    """
    from mpi4py import MPI

    size = node_comm.Get_size()
    # Node rank 0 measures for all, so every rank decides alike: Open MPI's own space check fails on the rank
    # that creates the file while the others wait in the call for good, so a shortage must be caught first.
    free, total = node_space(node_comm)
    page = mmap.PAGESIZE
    need = size * ((max(nbytes, 1) + page - 1) // page * page) + 2 * page
    if 0 <= free < need:
        raise SharedMemoryError(space_message(what, need, free, total, chunk_hint)
                                + f" (found before creating it, on node rank {node_comm.Get_rank()})")
    win = None
    why = None
    try:
        win = MPI.Win.Allocate_shared(max(nbytes, 1), 1, comm=node_comm)
        win.Set_errhandler(MPI.ERRORS_RETURN)  # an error is an exception here, as on the communicators
    except MPI.Exception as exc:
        why = f"MPI could not create the window ({exc.Get_error_string().strip()})"
    if win is not None:
        buf, _ = win.Shared_query(node_comm.Get_rank())
        # numpy's stub takes only its listed buffer types, not mpi4py's buffer (which has the buffer protocol)
        why = commit(np.frombuffer(buf, np.uint8, count=max(nbytes, 1)))  # type: ignore[call-overload]
        if why is not None:
            why = f"committing this rank's pages failed ({why})"
    created = _agree_ok(node_comm, win is not None)
    if _agree_ok(node_comm, why is None):
        return win
    if created:
        assert win is not None  # every rank made it, this one too
        win.Free()  # collective: every rank made it
    msg = space_message(what, need, free, total, chunk_hint)
    raise SharedMemoryError(f"{msg} (node rank {node_comm.Get_rank()}: {why or 'another rank ran short'})")


class ShmArena:
    """The node's shared window of flags and double-buffered regions, plus the shm collectives.

    Args:
        node_comm: the node's communicator (collective over it).
        chunk_bytes: the region size (shrunk to a multiple of 64, at least 4096).
        wait: how phases wait (one of SHM_WAITS, see :func:`_node_spins`).
        withdrawable: a rank may leave a call's first phase at the op's deadline (see "withdrawal"); every
            rank of the node must pass the same value.
        single_copy: large allreduces move each byte once where the node allows it (see "single copy"); every
            rank of the node must pass the same value.
        huge_pages: the arrays that single-copy calls post again and again are put on huge pages (see
            ``collective.cma.HugePages``); this rank's alone.
        fences: where phases fence (one of SHM_FENCES, see :func:`_fenced`); this rank's alone.
        stream_bytes: a read out of ``alloc`` windows that writes at least this many bytes into this rank's
            output writes them with streaming stores (see :attr:`stream`; 0: never); this rank's alone.
    """

    def __init__(self, node_comm: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES, wait: str = "auto",
                 withdrawable: bool = False, single_copy: bool = True, huge_pages: bool = True,
                 fences: str = "auto", stream_bytes: int = DEFAULT_STREAM_BYTES) -> None:
        from mpi4py import MPI

        self._mpi = self.mpi = MPI
        self.comm = node_comm
        self.rank = node_comm.Get_rank()
        self.size = node_comm.Get_size()
        self.chunk = max(4096, (chunk_bytes + 63) // 64 * 64)
        seg_bytes = _FLAG + 2 * self.chunk
        self.win = _allocate_committed(node_comm, seg_bytes, f"the shm arena (2 regions of {_mib(self.chunk)} for "
                                       f"each of {self.size} ranks on the node)", chunk_hint=True)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.segs = []
        for p in range(self.size):
            buf, _ = self.win.Shared_query(p)
            self.segs.append(np.frombuffer(buf, np.uint8, count=seg_bytes))
        self.flags = [s[:_FLAG].data.cast("q") for s in self.segs]
        self.my_flag = self.flags[self.rank]
        for w in range(_FLAG // 8):  # a post read before this rank's first one must name no call
            self.my_flag[w] = 0
        #: A full memory fence over the node's shared memory (the arena's and the alloc'd windows').
        self._sync = self.win.Sync
        #: The fence a phase puts on each side of its flag, or None where the processor keeps the order without
        #: one (see _fenced).
        self.fence: Callable[[], None] | None = self._sync if _fenced(fences) else None
        #: The node communicator's barrier: how a phase waits where the ranks share cores (see :attr:`spins`).
        self.barrier = node_comm.Barrier
        #: Phases wait by watching the other ranks' flags (else in MPI's barrier): see _node_spins.
        self.spins = _node_spins(node_comm, MPI, wait)
        #: The other ranks' flags.
        self.others = [f for p, f in enumerate(self.flags) if p != self.rank]
        self._regions: dict[tuple[int, np.dtype], list[np.ndarray]] = {}
        #: True once the cross-rank check runs through ``exchange``, which fences and synchronises itself.
        self.check_fenced = False
        self.ticket = 0
        self.chunks_done = 0
        #: Elastic mode: called while a phase waits on a flag; raises when a peer is gone (see collective.ulfm).
        self.watch: Callable[[], None] | None = None
        self.withdrawable = withdrawable
        #: ``arrival(seq)``: the first phase of op ``seq`` (:meth:`phase` itself unless withdrawable).
        self.arrival: Callable[[int], None] = self._arrival if withdrawable else self.phase
        self._peers = [(p, f) for p, f in enumerate(self.flags) if p != self.rank]
        #: The op whose first phase this rank waits in, while it may leave it (0: none); the watchdog reads it.
        self.arriving = 0
        #: The op the watchdog asks to leave its first phase (0: none); set from the watchdog's thread.
        self.withdraw_seq = 0
        self._declined = 0  # the op that found every rank arrived when it meant to leave: it stays
        #: The error of the op this rank left; from then on no phase runs here (its flag stays marked).
        self.withdrawn: Withdrawn | None = None
        #: Cross-memory access to the node's other ranks (see "single copy"), or None where the node lacks it.
        self.cma: CrossMemory | None = probe(node_comm) if single_copy and self.size > 1 else None
        #: Puts the arrays that single-copy calls post again and again on huge pages, or None.
        huge = HugePages.process() if self.cma is not None and huge_pages else None
        self.huge: HugePages | None = huge if huge is not None and huge.size else None  # size 0: the kernel has none
        #: Reads out of ``alloc`` windows of at least this many bytes copy with ``stream_copy`` (0: never).
        self.stream = stream_bytes if _stream_copy is not None else 0
        #: ``stream_copy(dst, src)``: copies bytes with streaming stores, which write around the caches rather
        #: than first reading every destination line into them, and fences them: a large output that the caches
        #: could not keep anyway costs one memory transfer a byte less. None where the extension is not built.
        self.stream_copy = _stream_copy
        self._cma_tmp = np.empty(0, np.uint8)
        self._cma_call = 0  # the ticket that names the single-copy call in flight (see _post)
        self.comm.Barrier()  # every flag is zeroed before anyone waits on it

    def waiting_on(self) -> tuple[int, ...]:
        """Node-local ranks whose flag is behind this rank's: those its phase waits for (none between phases,
        as a phase ends only once every flag has reached its ticket)."""
        flags = self.flags
        if not flags:  # freed
            return ()
        t = flags[self.rank][0]
        if t < 0:  # this rank is leaving (or left) a first phase: the ranks that had not arrived at it
            t = _mark(t)[0]
        me = self.rank
        return tuple(p for p, f in enumerate(flags) if p != me and not _reached(f[0], t))

    def phase(self, seq: int = 0) -> None:
        """End a phase on this rank and wait until every rank of the node has ended it.

        ``seq``: the op whose first phase this is, where it stands for :attr:`arrival` (unused here).

        The flag says how far this rank got. With :attr:`spins` the wait is
        for every other rank's flag to reach this phase's ticket (cheaper than a
        barrier where every rank has a core); else the node
        communicator's barrier, which blocks in MPI and so yields the core to
        a rank that shares it. The window sync before the flag is raised and
        the one after the wait order every rank's writes before the phase
        before every rank's reads after it (release and acquire: Open MPI's
        Win_sync is a full memory barrier), where the processor needs them
        (:attr:`fence`). :meth:`quick_allreduce` takes these steps inline.
        """
        t = self.ticket = self.ticket + 1
        fence = self.fence
        if fence is not None:
            fence()
        self.my_flag[0] = t
        if self.spins:
            for f in self.others:
                if f[0] < t:
                    _await_flag(f, t, self.watch)
        else:
            self.barrier()
        if fence is not None:
            fence()

    def _arrival(self, seq: int = 0) -> None:
        """The first phase of op ``seq`` on a withdrawable arena: :meth:`phase` by flags, which this rank leaves,
        raising :class:`Withdrawn`, when the watchdog asks (:attr:`withdraw_seq`) while some rank has not
        arrived, or when another rank left it (see "withdrawal")."""
        if self.withdrawn is not None:
            raise Withdrawn([], None, again=True)
        t = self.ticket = self.ticket + 1
        sync = self._sync
        sync()
        self.my_flag[0] = t
        peers = self._peers
        self.arriving = seq
        try:
            while True:
                for q, f in peers:
                    if f[0] < t:
                        self._await_arrival(q, f, t, seq)
                sync()
                # The second look: a rank that was deciding to leave, or left, after the first one lowered its flag.
                if not [q for q, f in peers if f[0] < t and not _reached(f[0], t)]:
                    return
        finally:
            self.arriving = 0

    def _await_arrival(self, q: int, f: memoryview, t: int, seq: int) -> None:
        """Return once rank ``q``'s flag ``f`` says it reached ticket ``t``; raise Withdrawn when it left the phase
        or when this rank leaves it (see :meth:`_arrival`). Waits as :func:`_await_flag` does."""
        if _spun(f, t):
            return
        clock = time.monotonic
        sleep = time.sleep
        watch = self.watch
        due = clock() + _WATCH_S
        gone_at = -t - _FINAL
        peers = self._peers
        while True:
            v = f[0]
            if v >= t or (v < 0 and _reached(v, t)):
                return
            for p, g in peers:  # any rank that left this phase, not only q: no rank passes it, this one leaves too
                if g[0] == gone_at:
                    self._leave(t, [], p)
            if self.withdraw_seq == seq and self._declined != seq:
                self._withdraw(t, seq)
            sleep(_NAP_S)
            if watch is not None and clock() > due:
                watch()
                due = clock() + _WATCH_S

    def _withdraw(self, t: int, seq: int) -> None:
        """Leave the phase of ticket ``t`` (op ``seq``, past its deadline) unless every rank arrived meanwhile."""
        mine = self.my_flag
        mine[0] = -t  # deciding: no rank passes the phase while this holds
        self._sync()  # a full fence: the flag is visible before the others are read
        missing, gone = _verdict([(q, f[0]) for q, f in self._peers], t)
        if not missing and gone is None:  # every rank is here: some may have passed already, so stay
            mine[0] = t
            self._sync()
            self._declined = seq
            return
        self._leave(t, missing, gone)

    def _leave(self, t: int, missing: list[int], gone: int | None) -> None:
        """Mark this rank gone from the phase of ticket ``t`` for good and raise Withdrawn."""
        self.my_flag[0] = -t - _FINAL
        self._sync()
        self.withdrawn = err = Withdrawn(missing, gone)
        raise err

    def exchange(self, h: int, seq: int) -> bool:
        """Post fingerprint ``h`` of call ``seq``, end a phase, and return whether every rank posted ``h``.

        The cross-rank check of a call (Fingerprints.check) on one node: a
        phase and P reads of shared memory instead of an MPI allreduce (a
        fraction of its cost, see docs/bench). Every rank reads the
        same P values, so every rank reaches the same verdict. Calls alternate
        between two slots: a rank can post call seq+1's fingerprint while a
        slower one still reads call seq's, but not seq+2's, since that needs
        the slower rank to have ended call seq+1's phase. (Every rank is at
        the same seq until the first mismatch, which this reports.)
        :meth:`quick_allreduce` takes these steps inline.
        """
        slot = 1 + (seq & 1)
        self.my_flag[slot] = h
        self.arrival(seq)
        for f in self.others:
            if f[slot] != h:
                return False
        return True

    def exchange_counts(self, h: int, seq: int, a: int, b: int) -> tuple[bool, np.ndarray | None]:
        """:meth:`exchange` that also posts two numbers of this rank (e.g. its rows and its ``out``'s rows).

        Returns (whether every rank posted ``h``, every rank's two numbers as a
        (P, 2) int64 array, None unless they did). The numbers sit in the
        flag's cache line next to the fingerprint, in a pair per slot, so the
        sizes of a variable-size collective travel with its check.
        """
        pairs = self.exchange_pairs(h, seq, a, b)
        if pairs is None:
            return False, None
        return True, np.array(pairs, np.int64).reshape(self.size, 2)

    def exchange_pairs(self, h: int, seq: int, a: int, b: int) -> tuple[int, ...] | None:
        """:meth:`exchange_counts` with every rank's two numbers as one flat tuple ``(a0, b0, a1, b1, ...)``, or
        None when some rank posted another fingerprint (a repeated call compares the tuple with its plan's)."""
        odd = seq & 1
        w = 3 + 2 * odd  # words 3-4 for even calls, 5-6 for odd ones (0: ticket, 1-2: fingerprints)
        f = self.my_flag
        f[w] = a  # before exchange posts the fingerprint: a rank that sees it sees these too
        f[w + 1] = b
        f[_POSTED] &= ~(1 << odd)  # this call's data is not in the region yet (see QuickScatter)
        if not self.exchange(h, seq):
            return None
        return self.pairs_of(seq)

    def pairs_of(self, seq: int) -> tuple[int, ...]:
        """Every rank's two numbers of call ``seq`` (posted by :meth:`exchange_pairs` or :class:`QuickScatter`), as
        one flat tuple; read after the call's phase (they stay until every rank has ended call seq+1's)."""
        w = 3 + 2 * (seq & 1)
        w1 = w + 1
        return tuple(v for fl in self.flags for v in (fl[w], fl[w1]))

    def quick_regions(self, dtype: np.dtype, n: int) -> tuple[list[np.ndarray], list[np.ndarray], memoryview,
                                                              memoryview]:
        """Every rank's region for even and for odd chunk numbers, cut to ``n`` elements, then this rank's two
        as bytes (for quick_allreduce)."""
        even, odd = ([r[:n] for r in self.regions(g, dtype)] for g in (0, 1))
        mine = self.rank
        return even, odd, even[mine].view(np.uint8).data, odd[mine].view(np.uint8).data

    def quick_allreduce(self, h: int, seq: int, x: np.ndarray | memoryview, out: np.ndarray,
                        ufunc: Callable[..., Any], finish: Callable[[np.ndarray], None] | None,
                        regions: tuple[list[np.ndarray], list[np.ndarray], memoryview, memoryview]) -> bool:
        """:meth:`allreduce`'s one-phase path with :meth:`exchange` folded in; False (nothing reduced) on a mismatch.

        The same steps, regions and synchronisation as ``allreduce(x, out,
        ufunc, first=check)`` for ``x`` of at most ``ONE_PHASE_BYTES`` with the
        check fenced in this arena, in one frame instead of seven: at 4 KiB
        the Python around one phase is what a call costs. ``regions``: from
        :meth:`quick_regions` for ``x``'s dtype and size; ``x``: the array, or
        its bytes (a memoryview of a C-contiguous array, which a caller
        repeating calls on one array keeps: copying it costs half); ``finish``,
        applied to ``out`` (e.g. avg's division). ``x`` must not
        overlap ``out`` unless it is ``out``. Every rank reads the same P
        fingerprints, so all return the same verdict; on False the chunk count
        goes back, as :meth:`arrive` does.
        """
        g = self.chunks_done
        self.chunks_done = g + 1
        odd = g & 1
        regs = regions[odd]
        if type(x) is memoryview:
            (regions[3] if odd else regions[2])[:] = x
        else:
            regs[self.rank][...] = x  # half np.copyto's cost at 4 KiB
        # exchange(h, seq) and its phase(), inlined (the same operations): two frames fewer at 4 KiB.
        slot = 1 + (seq & 1)
        flag = self.my_flag
        flag[slot] = h
        if self.withdrawable:  # its arrival, which this rank may leave at the deadline (see "withdrawal")
            self._arrival(seq)
        else:
            t = self.ticket = self.ticket + 1
            fence = self.fence
            if fence is not None:
                fence()
            flag[0] = t
            if self.spins:
                for f in self.others:
                    if f[0] < t:
                        _await_flag(f, t, self.watch)
            else:
                self.barrier()
            if fence is not None:
                fence()
        for f in self.others:
            if f[slot] != h:
                self.chunks_done = g
                return False
        # _reduce_into(ufunc, regs, out), inlined (the same operations): its frame cost 2-4 % at 4 KiB.
        if len(regs) > 1:
            ufunc(regs[0], regs[1], out)
        else:
            out[...] = regs[0]
        for reg in regs[2:]:
            ufunc(out, reg, out)
        if finish is not None:
            finish(out)
        return True

    def arrive(self, first: Callable[[], Any], rollback: bool = True) -> None:
        """End the first phase of a call with ``first()`` instead of a phase of its own.

        ``first`` is the call's cross-rank fingerprint check: an allreduce
        every rank enters, whatever its algorithm, so when it returns every
        rank has entered the call, which is all the first phase says (one
        synchronisation instead of two; with more ranks than cores each costs
        a round of context switches). If it raises (a mismatch), this rank's
        chunk count goes back by the chunk it started, so every rank still
        agrees which region comes next. ``first`` returns whether it
        synchronised every rank; when it did not (the NaN check alone, with
        the fingerprint check off), a phase follows.

        Memory: the arena's :attr:`fence` (``Win_sync``, a full memory barrier
        of the process in Open MPI and MPICH; none where the processor keeps
        the order, see :func:`_fenced`) is the fence for the ``alloc``'d
        windows too.
        """
        fenced = self.check_fenced
        fence = self.fence
        if not fenced and fence is not None:
            fence()
        try:
            synced = first()
        except BaseException:
            if rollback:
                self.chunks_done -= 1
            raise
        if fenced and synced:  # the check was a phase of this arena (exchange): fences and all
            return
        if synced:
            if fence is not None:
                fence()
        else:
            self.phase()

    def regions(self, g: int, dtype: np.dtype) -> list[np.ndarray]:
        """Every rank's region for chunk number ``g``, viewed as ``dtype`` (cached: building the views is not free)."""
        key = (g & 1, dtype)
        regs = self._regions.get(key)
        if regs is None:
            off = _FLAG + (g & 1) * self.chunk
            n = self.chunk // dtype.itemsize
            regs = self._regions[key] = [s[off:off + n * dtype.itemsize].view(dtype) for s in self.segs]
        return regs

    def chunk_elems(self, dtype: np.dtype) -> int:
        """Elements of ``dtype`` per chunk."""
        return self.chunk // dtype.itemsize

    def _chunks(self, n: int, dtype: np.dtype) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """Per chunk of ``n`` elements: (start, stop, every rank's region for it), counting the chunks done."""
        step = self.chunk_elems(dtype)
        for c0 in range(0, n, step):
            g = self.chunks_done
            self.chunks_done = g + 1
            yield c0, min(n, c0 + step), self.regions(g, dtype)

    def _filled(self, x: np.ndarray, first: Callable[[], Any] | None,
                own: bool = False) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """Per chunk of ``x``: copy it into this rank's region and end the phase; yield (start, stop, regions).

        The first chunk's phase is ``first`` when given (see :meth:`arrive`).
        ``own``: leave out this rank's slice of the chunk (see :meth:`slice_of`),
        which only this rank reads, straight from ``x``.
        """
        mine = self.rank
        copyto = np.copyto
        for c0, c1, regs in self._chunks(x.size, x.dtype):
            reg = regs[mine]
            if own:
                s0, s1 = self.slice_of(c1 - c0, mine)
                copyto(reg[:s0], x[c0:c0 + s0])
                copyto(reg[s1:c1 - c0], x[c0 + s1:c1])
            else:
                copyto(reg[:c1 - c0], x[c0:c1])
            self.arrive(first) if first is not None and c0 == 0 else self.phase()
            yield c0, c1, regs

    def slice_of(self, m: int, q: int) -> tuple[int, int]:
        """The part [start, stop) of an m-element chunk that rank q reduces (split evenly by rank)."""
        base, extra = divmod(m, self.size)
        s0 = q * base + min(q, extra)
        return s0, s0 + base + (1 if q < extra else 0)

    def allreduce(self, x: np.ndarray, out: np.ndarray | None, ufunc: Callable[..., Any], root: int | None = None,
                  first: Callable[[], Any] | None = None) -> None:
        """Reduce ``x`` (1-D, contiguous) over the node into ``out``; only ``root`` gets all of it when root is given.

        ``out`` may be ``x`` (in place). On non-root ranks of a reduce ``out`` is
        not touched (it may be None). ``first``: see :meth:`arrive`.
        """
        P, r = self.size, self.rank
        if self._single(x.nbytes, first):
            self._single_copy(x, out, ufunc, root, first)
            return
        if out is None:  # a reduce's non-root: it writes nothing, so x stands in and is never written
            assert root is not None and r != root, "allreduce: out is None on a rank that gets the result"
            out = x
        n = x.size
        phase = self.phase
        if 0 < n * x.dtype.itemsize <= ONE_PHASE_BYTES and n <= self.chunk_elems(x.dtype):
            # Small (one chunk): every rank that wants the result reduces the whole chunk itself, in rank
            # order (the same bits as the two-phase path), so one synchronisation per call instead of two.
            # The region is rewritten two chunks later, after everyone arrived at the next one.
            for _, _, regs in self._filled(x, first):
                if root is None or r == root:
                    _reduce_slices(ufunc, regs, 0, n, out)
            return
        # Only this rank reads its own slice of its region, so that slice is read straight from x, never copied
        # in, and the region's slice is free to take the result (x may be out: in place, x is still read).
        for c0, c1, regs in self._filled(x, first, own=True):
            m = c1 - c0
            mine = regs[r]
            s0, s1 = self.slice_of(m, r)
            wants = root is None or r == root
            if s1 > s0:
                srcs = list(regs)
                srcs[r] = x[c0:c1]
                _reduce_slices(ufunc, srcs, s0, s1, mine[s0:s1])
                if wants:
                    np.copyto(out[c0 + s0:c0 + s1], mine[s0:s1])
            phase()  # every rank ends it, even a reduce's non-roots that read nothing after it
            if not wants:
                continue
            for q in range(P):
                if q == r:
                    continue
                q0, q1 = self.slice_of(m, q)
                if q1 > q0:
                    np.copyto(out[c0 + q0:c0 + q1], regs[q][q0:q1])

    def _single(self, nbytes: int, first: Callable[[], Any] | None) -> bool:
        """Whether a fixed-size call moving ``nbytes`` takes the single-copy path: the node allows it, the call is
        large enough, and its first phase is one of this arena's (the check fenced here, or none), which the posts'
        ticket names."""
        return self.cma is not None and nbytes >= CMA_MIN_BYTES and (first is None or self.check_fenced)

    def _post(self, what: str, x: np.ndarray, out: np.ndarray | None, first: Callable[[], Any] | None,
              root: int | None = None) -> list[int]:
        """Post ``x``'s and ``out``'s addresses (0: none) for a single-copy call ``what`` (one of _CMA_WHAT), end its
        first phase (``first``, see :meth:`arrive`) and return every rank's input address (even indices) and output
        address (odd).

        Raises CollectiveMismatchError, after a phase on every rank that gets here, when some rank posted another
        call, collective, root or size, or a rank that gets a result posted no output: nothing is read or written
        then (every rank reads the same posts, so every rank finds the same odd ones).
        """
        r = self.rank
        # The ticket before the first phase names the call: a rank on another path, or a call behind or ahead,
        # posts another (tickets only grow, and no rank gets two phases past another), so a stale post never
        # passes for this call's. A rank leaves only after the last phase (or in the first, before any rank read a
        # post), so a post that names this call is live until every rank is done with it.
        k = self._cma_call = self.ticket
        kind, rt = _CMA_WHAT.index(what), -1 if root is None else root
        f = self.my_flag
        xa = x.ctypes.data
        oa = out.ctypes.data if out is not None else 0
        huge = self.huge
        if huge is not None:  # before any peer reads or writes them: see HugePages
            huge.note(xa, x.nbytes)
            if oa and oa != xa:
                huge.note(oa, out.nbytes)  # type: ignore[union-attr]
        f[_CMA_X] = xa
        f[_CMA_OUT] = oa
        f[_CMA_BYTES] = nbytes = x.nbytes
        f[_CMA_KIND] = kind
        f[_CMA_ROOT] = rt
        f[_CMA_CALL] = k
        if first is not None:
            self.arrive(first, rollback=False)  # ARRIVED: every rank posted, and passed the check
        else:
            self.phase()
        flags = self.flags
        odd = [q for q, fl in enumerate(flags)
               if fl[_CMA_CALL] != k or fl[_CMA_BYTES] != nbytes or fl[_CMA_KIND] != kind or fl[_CMA_ROOT] != rt
               or (fl[_CMA_OUT] == 0 and (rt < 0 or q == rt))]
        if odd:
            self.phase()

            def called(fl: Any) -> str:
                w = int(fl[_CMA_KIND])
                return (f"{_CMA_WHAT[w] if 0 <= w < len(_CMA_WHAT) else '?'} of {fl[_CMA_BYTES]} bytes at ticket "
                        f"{fl[_CMA_CALL]}" + (f" to root {fl[_CMA_ROOT]}" if fl[_CMA_ROOT] >= 0 else ""))
            got = ", ".join(f"node rank {q}: {called(flags[q])}" for q in odd)
            raise CollectiveMismatchError(
                f"{what} on node rank {r} ({x.dtype}, {x.size} elements): the single-copy path found other ranks "
                f"in another call ({got}; this rank: {called(f)}); nothing was read or written (the cross-rank "
                f"check is off, and the ranks called differently)")
        return [int(v) for fl in flags for v in (fl[_CMA_X], fl[_CMA_OUT])]

    def _finish(self, what: str, x: np.ndarray | None, transfer: Callable[[], None]) -> None:
        """Run a posted single-copy call's ``transfer``, then its last phase, after a failure too: every result has
        landed, no rank reads another's arrays any more, and every rank ends the same phases, so none returns while
        another still touches its arrays. Where any rank's transfers failed, every rank raises (the elastic error
        where a peer is gone), and the node copies through the regions from then on."""
        k = self._cma_call
        failed: BaseException | None = None
        try:
            transfer()
        except BaseException as exc:  # noqa: BLE001 - whatever it was, the others must not wait for this rank
            failed = exc
            self.my_flag[_CMA_FAILED] = k + 1
        self.phase()
        bad = [q for q, fl in enumerate(self.flags) if fl[_CMA_FAILED] == k + 1]
        if not bad:
            return
        self.cma = None  # every rank saw the same marks
        watch = self.watch
        if watch is not None:  # a peer that is gone: the elastic error, once its loss is known
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                watch()
                time.sleep(_WATCH_S)
        if failed is not None and not isinstance(failed, Exception):
            raise failed  # KeyboardInterrupt, SystemExit: the program stops
        # Any other error (MemoryError, a ufunc's FloatingPointError under np.errstate) is the library's here: every
        # rank ended the same phases and raises, so the ranks' calls still line up (see Sequencer._failed).
        where = ", ".join(f"node rank {q}" for q in bad)
        arrays = f" ({x.dtype}, {x.size} elements)" if x is not None else ""
        why = "" if failed is None else f" ({failed})" if isinstance(failed, CollectiveError) else \
            f" ({type(failed).__name__}: {failed})"
        raise CollectiveError(
            f"{what} on node rank {self.rank}{arrays}: the single-copy transfers failed on {where}{why}; the output "
            "is incomplete, and this node's later calls copy through the shared window") from failed

    def _reduce_posted(self, x: np.ndarray, posts: list[int], a0: int, a1: int, dst: np.ndarray | None,
                       ufunc: Callable[..., Any], targets: list[int]) -> None:
        """Reduce elements [a0, a1) of every rank's posted input, in rank order (the same bits as the copy-in
        path), into ``dst`` (its element i is element a0 + i; None: a scratch piece), piece by piece, and write
        each piece into the posted outputs of node ranks ``targets`` at its own offset."""
        cm = self.cma
        assert cm is not None
        P, r = self.size, self.rank
        isz = x.dtype.itemsize
        step = max(1, CMA_PIECE_BYTES // isz)
        if self._cma_tmp.nbytes < 3 * step * isz:
            self._cma_tmp = np.empty(3 * step * isz, np.uint8)
        tmp = self._cma_tmp[:3 * step * isz].view(x.dtype)
        t0, t1, acc = tmp[:step], tmp[step:2 * step], tmp[2 * step:]
        read, write = cm.read, cm.write
        last = P - 1
        for a in range(a0, a1, step):
            b = min(a1, a + step)
            m = b - a
            nb = m * isz
            off = a * isz
            mine = x[a:b]
            ops = []
            for q in (0, 1):
                if q == r:
                    ops.append(mine)
                else:
                    t = (t0, t1)[q][:m]
                    read(q, t.ctypes.data, posts[2 * q] + off, nb)
                    ops.append(t)
            res = acc[:m] if dst is None else dst[a - a0:b - a0]
            # Rank order, as every shm path: ((x0 op x1) op x2) ...; the last step writes the result.
            ufunc(ops[0], ops[1], res if last == 1 else acc[:m])
            for q in range(2, P):
                if q == r:
                    o = mine
                else:
                    o = t1[:m]
                    read(q, o.ctypes.data, posts[2 * q] + off, nb)
                ufunc(acc[:m], o, res if q == last else acc[:m])
            src = res.ctypes.data
            for q in targets:
                write(q, posts[2 * q + 1] + off, src, nb)

    def _single_copy(self, x: np.ndarray, out: np.ndarray | None, ufunc: Callable[..., Any], root: int | None,
                     first: Callable[[], Any] | None) -> None:
        """:meth:`allreduce` by cross-memory attach: see "single copy"."""
        r = self.rank
        wants = root is None or r == root
        assert out is not None or not wants, "allreduce: out is None on a rank that gets the result"
        what = "allreduce" if root is None else "reduce"
        posts = self._post(what, x, out if wants else None, first, root)
        s0, s1 = self.slice_of(x.size, r)
        targets = [q for q in range(self.size) if q != r and (root is None or q == root)]
        dst = out[s0:s1] if wants else None  # type: ignore[index]
        # DONE: every result has landed, and no rank reads another's input any more
        self._finish(what, x, lambda: self._reduce_posted(x, posts, s0, s1, dst, ufunc, targets))

    def _single_copy_scatter(self, x: np.ndarray, out: np.ndarray, blocks: tuple[int, ...],
                             ufunc: Callable[..., Any], first: Callable[[], Any] | None) -> None:
        """:meth:`reduce_scatter` by cross-memory attach: rank r reduces its block of every rank's input straight
        into its ``out``; then a phase (no rank reads another's input any more)."""
        r = self.rank
        posts = self._post("reduce_scatter", x, out, first)
        self._finish("reduce_scatter", x, lambda: self._reduce_posted(x, posts, blocks[r], blocks[r + 1], out, ufunc,
                                                                      []))

    def _single_copy_gather(self, x: np.ndarray, out: np.ndarray, first: Callable[[], Any] | None) -> None:
        """:meth:`allgather` by cross-memory attach: each rank reads every other rank's input straight into its
        block of ``out``; then a phase (no rank reads another's input any more)."""
        cm = self.cma
        assert cm is not None
        r, nb = self.rank, x.nbytes
        posts = self._post("allgather", x, out, first)
        ob = out.reshape(-1).view(np.uint8)
        base = ob.ctypes.data
        mine = ob[r * nb:(r + 1) * nb]
        if mine.ctypes.data != x.ctypes.data:
            np.copyto(mine, x.reshape(-1).view(np.uint8))

        def transfer() -> None:
            for q in range(self.size):
                if q != r:
                    cm.read(q, base + q * nb, posts[2 * q], nb)
        self._finish("allgather", x, transfer)

    def post_input(self, x: np.ndarray | None) -> None:
        """Post where this rank's input of a variable-size call lies (C-contiguous; None: no input), before the
        call's first phase, for :meth:`cross_read` (see "single copy"): the ticket, which names the call, last."""
        f = self.my_flag
        if x is None or not x.size:
            f[_CMA_X] = f[_CMA_BYTES] = 0
        else:
            f[_CMA_X] = xa = x.ctypes.data
            f[_CMA_BYTES] = x.nbytes
            huge = self.huge
            if huge is not None and x.nbytes >= CMA_MIN_BYTES:  # before any peer reads it
                huge.note(xa, x.nbytes)
        f[_CMA_OUT] = 0
        f[_CMA_KIND] = _CMA_VARIABLE
        f[_CMA_ROOT] = -1
        f[_CMA_CALL] = self.ticket

    def cross_read(self, mine: np.ndarray | None, out: np.ndarray | None, sizes: list[int],
                   reads: list[tuple[int, int, int, int]], what: str) -> None:
        """A variable-size call by single copy: copy ``reads`` straight from the ranks' inputs into ``out``, then
        end a phase (DONE: no rank reads another's input any more).

        ``mine``: this rank's input as bytes (None: none); ``sizes``: every rank's input in bytes, as the call's
        counts say (the same on every rank); ``reads``: (rank, offset in its input, count, offset in ``out``), in
        bytes; ``what``: the call (its collective, shapes and dtype), for the errors.

        Where the call's check was the phase that just ended (fenced in this arena) and every rank posted its
        input with :meth:`post_input` before it (the ticket then in every post: a post of an earlier call names
        an earlier ticket, as every call ends a phase after posting), the reads follow at once. Otherwise (the
        check is off or runs by MPI; a rank took a path that posts nothing, e.g. a repeat whose plan never reads
        by single copy) every rank posts now and ends a phase first: every rank reads the same posts after the
        same phase, and a rank that posts again moves its post past the ticket, so all decide alike. Then every
        rank's post must name this call and its size must be ``sizes``' (a rank in another call, or with another
        size, where the check is off): else every rank ends the phase and raises CollectiveMismatchError, having
        read nothing. A failed read ends the last phase too, and every rank raises (see :meth:`_finish`).
        """
        cm = self.cma
        assert cm is not None, "cross_read: the node has no cross-memory access"
        flags = self.flags
        k = self.ticket - 1
        if not self.check_fenced or any(fl[_CMA_CALL] != k or fl[_CMA_KIND] != _CMA_VARIABLE for fl in flags):
            self.post_input(mine)
            self.phase()
            k = self.ticket - 1
        self._cma_call = k
        odd = [q for q, fl in enumerate(flags)
               if fl[_CMA_CALL] != k or fl[_CMA_KIND] != _CMA_VARIABLE or fl[_CMA_BYTES] != sizes[q]]
        if odd:
            self.phase()

            def called(q: int) -> str:
                fl, w = flags[q], int(flags[q][_CMA_KIND])
                kind = "an alltoall, allgather, gather or scatter" if w == _CMA_VARIABLE else (
                    f"an {_CMA_WHAT[w]}" if 0 <= w < len(_CMA_WHAT) else "another call")
                return (f"node rank {q}: {kind} of {fl[_CMA_BYTES]} bytes at ticket {fl[_CMA_CALL]} "
                        f"(expected {sizes[q]})")
            raise CollectiveMismatchError(
                f"{what} on node rank {self.rank}: the single-copy path found ranks in another call or with other "
                f"sizes ({', '.join(called(q) for q in odd)}; this call: ticket {k}); nothing was read (the "
                f"cross-rank check is off, and the ranks' calls differ)")
        me = self.rank
        base = out.ctypes.data if out is not None and out.size else 0
        srcs = [int(fl[_CMA_X]) for fl in flags]

        def transfer() -> None:
            read = cm.read
            for q, off, n, d in reads:
                if not n:
                    continue
                if q == me:
                    out[d:d + n] = mine[off:off + n]  # type: ignore[index]
                else:
                    read(q, base + d, srcs[q] + off, n)
        self._finish(what, None, transfer)

    def broadcast(self, out: np.ndarray, root: int) -> None:
        """Copy ``root``'s ``out`` (1-D, contiguous) into every rank's ``out``."""
        r = self.rank
        phase = self.phase
        for c0, c1, regs in self._chunks(out.size, out.dtype):
            if r == root:
                np.copyto(regs[r][:c1 - c0], out[c0:c1])
            # One phase per chunk: writing region g % 2 again at chunk g+2 happens after every rank
            # arrived at chunk g+1, i.e. after each finished copying chunk g out.
            phase()
            if r != root:
                np.copyto(out[c0:c1], regs[root][:c1 - c0])

    def reduce_scatter(self, x: np.ndarray, out: np.ndarray, blocks: tuple[int, ...], ufunc: Callable[..., Any],
                       first: Callable[[], Any] | None = None) -> None:
        """Reduce ``x`` over the node; this rank's ``out`` gets ``[blocks[r], blocks[r+1])`` of the result."""
        if self._single(x.nbytes, first):
            self._single_copy_scatter(x, out, blocks, ufunc, first)
            return
        b0, b1 = blocks[self.rank], blocks[self.rank + 1]
        # One phase per chunk, as in broadcast: region g % 2 is rewritten only after all arrived at g+1.
        for c0, c1, regs in self._filled(x, first):
            a, b = max(c0, b0), min(c1, b1)
            if b > a:
                _reduce_slices(ufunc, regs, a - c0, b - c0, out[a - b0:b - b0])

    def allgather(self, x: np.ndarray, out: np.ndarray, first: Callable[[], Any] | None = None) -> None:
        """Concatenate every rank's ``x`` (same size everywhere) into ``out`` in rank order."""
        P, m = self.size, x.size
        if self._single(out.nbytes, first):
            self._single_copy_gather(x, out, first)
            return
        for c0, c1, regs in self._filled(x, first):
            for q in range(P):
                np.copyto(out[q * m + c0:q * m + c1], regs[q][:c1 - c0])

    def scatter_bytes(self, mine: np.ndarray, sizes: list[int], reads: list[tuple[int, int, int, np.ndarray]],
                      posted: bool = False) -> None:
        """Move bytes between the node's ranks: each posts ``mine``; this rank copies out ``reads``.

        ``sizes``: every rank's ``mine`` in bytes (the same list on every
        rank). ``reads``: (rank q, offset into q's bytes, count, destination
        array of that many bytes). In rounds of a chunk: every rank copies its
        next chunk into its region, a phase, then every rank copies what it
        reads of that chunk out (each byte is written once and read once,
        straight between the ranks' arrays and the window; this rank's own
        bytes straight from ``mine``). The variable-size collectives
        (alltoall, gather, scatter, allgather) are this with different
        ``reads``.

        ``posted``: every rank posted all of its bytes (at most a chunk) into
        the last chunk counted, with the call's check as its phase (see
        :class:`QuickScatter`): only the reads are left.
        """
        C = self.chunk
        rounds = max((n + C - 1) // C for n in sizes) if sizes else 0
        byte = np.dtype(np.uint8)
        me = self.rank
        if posted:
            assert rounds <= 1, "scatter_bytes: posted bytes span more than one chunk"
        for k in range(rounds):
            a0 = k * C
            if posted:
                regs = self.regions(self.chunks_done - 1, byte)
            else:
                g = self.chunks_done
                self.chunks_done = g + 1
                regs = self.regions(g, byte)
                part = mine[a0:a0 + C]
                if part.size:
                    regs[me][:part.size] = part
                self.phase()
            for q, off, n, dst in reads:
                lo, hi = max(off, a0), min(off + n, a0 + C)
                if hi > lo:
                    dst[lo - off:hi - off] = mine[lo:hi] if q == me else regs[q][lo - a0:hi - a0]

    def window_reader(self, segs: list[np.ndarray],
                      reads: list[tuple[int, int, int, int]]) -> Callable[[np.ndarray], None]:
        """``read(out)``: a variable-size call whose every rank's input lies in one ``alloc`` window (``segs``,
        from :meth:`SharedArrays.whole`): this rank copies ``reads`` (rank, offset in its bytes, count, offset in
        ``out``'s bytes) straight from the ranks' inputs into ``out``, then ends a phase.

        No copy-in, so two phases: the cross-rank check, fenced in the
        arena, says that every input is ready (without it a phase does); the
        phase after the reads says that no rank reads another's input any
        more, which its owner may then overwrite.
        """
        ar = self
        srcs = tuple((segs[q][off:off + n], d, d + n) for q, off, n, d in reads if n)
        byte = np.dtype(np.uint8)
        stream = self.stream_copy if self.streams(sum(n for _, _, n, _ in reads)) else None

        def read(out: np.ndarray) -> None:
            if not ar.check_fenced:
                ar.phase()
            ob = out.reshape(-1).view(byte)
            if stream is not None:
                for src, a, b in srcs:
                    stream(ob[a:b], src)
            else:
                for src, a, b in srcs:
                    ob[a:b] = src
            ar.phase()
        return read

    def streams(self, nbytes: int) -> bool:
        """Whether a read out of ``alloc`` windows that writes ``nbytes`` into this rank's output copies with
        :attr:`stream_copy`: from :attr:`stream` bytes (``COLLECTIVE_SHM_STREAM_BYTES``), where the output is
        too large for the caches to keep until it is used. Below that, plain copies leave it in the caches."""
        return 0 < self.stream <= nbytes

    def free(self) -> None:
        """Release the window (collective over the node)."""
        self.flags = self.others = []
        self._peers = []
        self._regions.clear()
        self.segs = []
        self.win.Unlock_all()
        self.win.Free()


class QuickScatter:
    """A repeated alltoall, allgather, gather or scatter on one node whose bytes travel with its cross-rank check: one
    phase a call.

    :meth:`ShmArena.scatter_bytes` of at most one chunk, for the sizes a plan
    fixed (``collective.variable.VPlan``), with :meth:`ShmArena.exchange_pairs`
    as its phase. Before the check this rank copies its input into its
    region (which sends nothing: no rank reads a region before the phase that
    follows), leaving out ``private``, the part only it reads (its own block
    of an alltoall); it sets bit ``seq & 1`` of its flag's word ``_POSTED``
    to say so, posts its fingerprint and its (rows, out rows), and ends the
    phase. Every rank reads the same flags, so every rank reaches the same
    verdict on what follows (:meth:`run`): a mismatch, or whether every rank
    posted its input. A rank that took the ordinary path (no plan, or another
    one) posts through :meth:`ShmArena.exchange_pairs`, which clears the bit.

    Everything that depends on the sizes alone (the region parts, the slices
    of the input and the output) is cut here once: at 64 KiB the Python
    around the copies is a good part of a call, the more so where ranks share
    cores and each core runs several ranks' Python in turn.

    Args:
        arena: the node's arena (the check is fenced in it).
        dtype: the elements' dtype; every offset below counts elements of it.
        sizes, reads: as :meth:`ShmArena.scatter_bytes` takes them, in elements, reads' destinations as
            offsets into the output: (rank, offset in its input, count, offset in out).
        private: [start, stop) of this rank's input that no other rank reads (not posted), or None.
        post: this rank's (rows, out rows), as the check posts them.
        expect: every rank's (rows, out rows), flat, as the plan was made from.
    """

    #: Verdicts of :meth:`run`.
    DONE, MISMATCH, POSTED, APART = 0, 1, 2, 3
    __slots__ = ("arena", "posts", "own", "reads", "post", "expect")

    def __init__(self, arena: ShmArena, dtype: np.dtype, sizes: list[int], reads: list[tuple[int, int, int, int]],
                 private: tuple[int, int] | None, post: tuple[int, int], expect: tuple[int, ...]) -> None:
        me = arena.rank
        n = sizes[me]
        assert max(sizes) <= arena.chunk_elems(dtype), "QuickScatter: more than one chunk"
        lo, hi = private if private is not None else (n, n)
        ranges = [(a, b) for a, b in ((0, lo), (hi, n)) if b > a]
        self.arena, self.post, self.expect = arena, post, expect
        #: Per region parity: (this rank's region part, the slice of its input copied there).
        self.posts = tuple(tuple((arena.regions(p, dtype)[me][a:b], slice(a, b)) for a, b in ranges) for p in (0, 1))
        #: Reads of this rank's own input: (slice of out, slice of its input).
        self.own = tuple((slice(d, d + c), slice(off, off + c)) for q, off, c, d in reads if q == me and c)
        #: Per region parity: (slice of out, another rank's region part).
        self.reads = tuple(tuple((slice(d, d + c), arena.regions(p, dtype)[q][off:off + c]) for q, off, c, d in reads
                                 if q != me and c) for p in (0, 1))

    def run(self, h: int, seq: int, x: np.ndarray | None, o: np.ndarray | None) -> int:
        """Post ``x`` (C-contiguous, the plan's shape and dtype; None: scatter off its root) with fingerprint ``h``
        of call ``seq``, end the phase, and copy this rank's part into ``o`` (None: gather off its root) if every
        rank's post is the plan's; the verdict:

        * ``DONE``: every rank posted its input and every (rows, out rows) is the plan's; ``o`` holds the result.
        * ``MISMATCH``: some rank posted another fingerprint. Nothing is written and the chunk count is as
          before: every rank raises the mismatch report.
        * ``POSTED``: every rank posted its input, but the (rows, out rows) differ from the plan's: the call
          goes on by the ordinary path from them (``ShmArena.pairs_of``), its shm reads from the posted bytes
          (``scatter_bytes(posted=True)``), with no other phase, as every rank's does.
        * ``APART``: some rank took the ordinary path, so its input is not posted yet: the chunk count is as
          before and the call goes on by the ordinary path (its own data phase), as on that rank.
        """
        ar = self.arena
        g = ar.chunks_done
        ar.chunks_done = g + 1
        xf = x if x is None or x.ndim == 1 else x.reshape(-1)  # None: scatter off its root (nothing posted)
        for reg, sl in self.posts[g & 1]:
            reg[...] = xf[sl]  # type: ignore[index]  # (a rank without input posts nothing)
        odd = seq & 1
        w = 3 + 2 * odd
        slot = 1 + odd
        bit = 1 << odd
        f = ar.my_flag
        f[w], f[w + 1] = self.post
        f[_POSTED] |= bit
        f[slot] = h
        if ar.withdrawable:  # its arrival, which this rank may leave at the deadline (see "withdrawal")
            ar.arrival(seq)
        else:  # ShmArena.phase, written out: a frame less on a path whose cost is largely Python.
            t = ar.ticket = ar.ticket + 1
            fence = ar.fence
            if fence is not None:
                fence()
            f[0] = t
            if ar.spins:
                for fl in ar.others:
                    if fl[0] < t:
                        _await_flag(fl, t, ar.watch)
            else:
                ar.barrier()
            if fence is not None:
                fence()
        e = self.expect
        i = 0
        same = posted = True
        for fl in ar.flags:
            if fl[slot] != h:
                ar.chunks_done = g
                return 1
            if not fl[_POSTED] & bit:
                posted = False
            elif fl[w] != e[i] or fl[w + 1] != e[i + 1]:
                same = False
            i += 2
        if not posted:
            ar.chunks_done = g
            return 3
        if not same:
            return 2
        if o is None:  # gather off its root: nothing to read
            return 0
        of = o if o.ndim == 1 else o.reshape(-1)
        for d, s in self.own:
            of[d] = xf[s]  # type: ignore[index]  # (a rank without input reads none of its own)
        for d, src in self.reads[g & 1]:
            of[d] = src
        return 0


class WindowRead:
    """A repeated alltoall or allgather whose every rank's input lies in one ``alloc`` window: the check, reads
    straight from the inputs, a phase (:meth:`ShmArena.window_reader` with the check folded in).

    Two phases a call where :class:`QuickScatter` takes one and a copy more: the plan takes this where each
    rank spins on a core of its own (a phase is then a few reads of shared memory), and QuickScatter for small
    inputs where the ranks share cores and every phase is a round of context switches (see
    ``collective.variable``).

    Args:
        arena: the node's arena (the check is fenced in it).
        dtype: the elements' dtype; offsets count elements of it.
        segs: every rank's whole part of the window, as bytes (``SharedArrays.whole``).
        reads: (rank, offset in its input, count, offset in out), in elements.
        post, expect: as :class:`QuickScatter`'s.
    """

    __slots__ = ("arena", "srcs", "post", "expect", "stream")

    def __init__(self, arena: ShmArena, dtype: np.dtype, segs: list[np.ndarray], reads: list[tuple[int, int, int, int]],
                 post: tuple[int, int], expect: tuple[int, ...]) -> None:
        isz = dtype.itemsize
        self.arena, self.post, self.expect = arena, post, expect
        #: ``stream_copy(dst, src)`` where the reads copy with streaming stores (:meth:`ShmArena.streams`), and
        #: then :attr:`srcs` count bytes, else None.
        self.stream = arena.stream_copy if arena.streams(sum(c for _, _, c, _ in reads) * isz) else None
        if self.stream is not None:
            reads = [(q, off * isz, c * isz, d * isz) for q, off, c, d in reads]
            dtype, isz = np.dtype(np.uint8), 1
        #: (slice of out, the part of a rank's input it gets).
        self.srcs = tuple((slice(d, d + c), segs[q][off * isz:(off + c) * isz].view(dtype)) for q, off, c, d in reads
                          if c)

    def run(self, h: int, seq: int, x: np.ndarray, o: np.ndarray) -> int:
        """Post fingerprint ``h`` of call ``seq`` and this rank's (rows, out rows), end the phase, and if every
        rank's post is the plan's, copy this rank's part of every input into ``o`` and end one more phase.

        Verdicts as :meth:`QuickScatter.run`'s: ``DONE``; ``MISMATCH`` (nothing written: every rank raises);
        ``APART`` where some rank's (rows, out rows) differ from the plan's: the call goes on by the ordinary
        path from them (``ShmArena.pairs_of``), whose window reads and final phase every rank's path shares.
        ``x`` is not read: its memory is this rank's part of the window.
        """
        ar = self.arena
        odd = seq & 1
        w = 3 + 2 * odd
        slot = 1 + odd
        f = ar.my_flag
        f[w], f[w + 1] = self.post
        f[_POSTED] &= ~(1 << odd)
        f[slot] = h
        # Both phases are ShmArena.phase written out: two frames less on a path whose cost is largely Python.
        fence = ar.fence
        spins = ar.spins
        if ar.withdrawable:  # the first is its arrival, which this rank may leave at the deadline
            ar.arrival(seq)
            t = ar.ticket
        else:
            t = ar.ticket = ar.ticket + 1
            if fence is not None:
                fence()
            f[0] = t
            if spins:
                for fl in ar.others:
                    if fl[0] < t:
                        _await_flag(fl, t, ar.watch)
            else:
                ar.barrier()
            if fence is not None:
                fence()
        e = self.expect
        i = 0
        same = True
        for fl in ar.flags:
            if fl[slot] != h:
                return 1
            if fl[w] != e[i] or fl[w + 1] != e[i + 1]:
                same = False
            i += 2
        if not same:
            return 3
        stream = self.stream
        if stream is not None:
            ob = o.reshape(-1).view(np.uint8)
            for d, src in self.srcs:
                stream(ob[d], src)
        else:
            of = o if o.ndim == 1 else o.reshape(-1)
            for d, src in self.srcs:
                of[d] = src
        t = ar.ticket = t + 1
        if fence is not None:
            fence()
        f[0] = t
        if spins:
            for fl in ar.others:
                if fl[0] < t:
                    _await_flag(fl, t, ar.watch)
        else:
            ar.barrier()
        if fence is not None:
            fence()
        return 0


#: Windows of communicators that lost ranks (elastic mode): id of each rank's buffer object -> (the object, why).
#: Their memory stays mapped (freeing it would take the lost ranks), so collectives refuse arrays in it by name.
RETIRED: dict[int, tuple[Any, str]] = {}


def _buffer_root(a: np.ndarray) -> Any:
    """The object at the bottom of ``a``'s chain of bases (an MPI buffer for a window's array), or None."""
    b = a.base
    while type(b) is np.ndarray:
        b = b.base
    return b


def retired_window(a: Any) -> str | None:
    """Why ``a`` (an array) lies in a window of a replaced communicator, or None if it does not."""
    if not RETIRED or type(a) is not np.ndarray or a.base is None:
        return None
    root = _buffer_root(a)
    got = RETIRED.get(id(root)) if root is not None else None
    return got[1] if got is not None and got[0] is root else None


class SharedArrays:
    """Arrays allocated in the node's shared memory by ``comm.alloc``; collectives on them copy nothing in.

    Each ``alloc`` is one collective ``Allocate_shared``, numbered in call
    order (the same number on every rank); the arrays are remembered by their
    address so a collective recognises them, and by that number so the
    cross-rank check can tell one rank's window from another's.
    """

    def __init__(self, arena: ShmArena) -> None:
        self.arena = arena
        self._scratch_buf = np.empty(WINDOW_PIECE_BYTES, np.uint8)
        self._by_addr: dict[int, tuple[Any, list[np.ndarray], int]] = {}
        self._views: dict[tuple[int, int, np.dtype], tuple[int, list[np.ndarray]]] = {}
        #: id(array) -> (the array, its answer, its window's address) of :meth:`whole`.
        self._whole: dict[int, tuple[np.ndarray, tuple[int, list[np.ndarray]], int]] = {}
        self._number = -1

    def alloc(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` in a new shared window (collective over the node), its pages committed.

        Raises:
            SharedMemoryError: the node's shared memory cannot hold it (on every rank of the node).
        """
        ar = self.arena
        win = _allocate_committed(ar.comm, nbytes, f"alloc of {nbytes} bytes on each of {ar.size} ranks of the "
                                  "node", chunk_hint=False)
        segs = []
        for p in range(ar.size):
            buf, _ = win.Shared_query(p)
            segs.append(np.frombuffer(buf, np.uint8, count=max(nbytes, 1))[:nbytes])
        mine = segs[ar.rank]
        self._number += 1  # never reused, so a freed window's number cannot match a new one's in the check
        self._by_addr[mine.__array_interface__["data"][0]] = (win, segs, self._number)
        return mine

    def free(self, a: np.ndarray, what: str = "free") -> None:
        """Free the window of ``a``, an array :meth:`alloc` returned (or a view of all of it); collective over
        the node, every rank passing its own array of the same ``alloc``.

        Every rank checks first, and every rank raises if any rank fails a
        check, so none is left waiting: ``a`` must be such an array, the same
        ``alloc`` on every rank, and no other array may still view its memory
        (it is unmapped: a view used afterwards would crash the process).
        Afterwards ``a`` is read-only and reads zeros.

        Raises:
            CollectiveValueError: naming the check that failed and the node rank it failed on.
        """
        ar = self.arena
        addr = a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else 0
        ent = self._by_addr.get(addr)
        problem = None
        if ent is None:
            problem = (f"{type(a).__name__} is not an array from comm.alloc (or was freed already)"
                       if isinstance(a, np.ndarray) or a is None else f"{type(a).__name__} is not an array")
        elif a.nbytes != ent[1][ar.rank].nbytes:
            problem = f"a part ({a.nbytes} of {ent[1][ar.rank].nbytes} bytes) of an alloc'd array; pass all of it"
        number = ent[2] if ent is not None else -1
        if problem is None:
            assert ent is not None  # no entry is a problem above
            for k in [k for k in self._views if k[0] == addr]:  # our own cached views of it go first
                del self._views[k]
            self._plans_dropped()
            extra = _other_views(ent[1], a)
            if extra > 0:
                problem = (f"{extra} other array{'s' if extra > 1 else ''} (views of it or of another rank's part, "
                           "or a call still holding it) still use its memory; delete them first")
        lo = ar.comm.allreduce(number if problem is None else -1, op=_mpi_op("MIN"))
        hi = ar.comm.allreduce(number if problem is None else -1, op=_mpi_op("MAX"))
        if lo != hi or lo < 0:
            mine = problem or ("every rank's array is from an alloc, but not the same one on every rank"
                               if lo >= 0 or number >= 0 else "another rank's array cannot be freed")
            raise CollectiveValueError(f"{what} on node rank {ar.rank} of {ar.size}: {mine}; nothing was freed")
        win, segs, _ = self._by_addr.pop(addr)
        segs.clear()
        win.Free()
        a.flags.writeable = False
        _placeholder(addr, a.nbytes)

    def retire(self, why: str) -> None:
        """Make collectives refuse this communicator's arrays, saying ``why`` (it lost ranks; nothing is freed)."""
        for win, segs, _ in self._by_addr.values():
            for seg in segs:
                root = _buffer_root(seg)
                if root is not None:
                    RETIRED[id(root)] = (root, why)
        self._views.clear()
        self._whole.clear()

    def _plans_dropped(self) -> None:
        """Forget cached views (a plan of the window path holds some) and the arrays :meth:`whole` kept."""
        self._views.clear()
        self._whole.clear()

    def free_all(self) -> None:
        """Free every window (collective over the node; the same windows on every rank, in alloc order)."""
        for addr, (win, segs, _) in sorted(self._by_addr.items(), key=lambda kv: kv[1][2]):
            segs.clear()
            win.Free()
        self._by_addr.clear()
        self._views.clear()
        self._whole.clear()

    def _scratch(self, n: int, dtype: np.dtype) -> np.ndarray:
        """n elements of ``dtype`` of scratch (at most one window piece)."""
        return self._scratch_buf[:n * dtype.itemsize].view(dtype)

    def lookup(self, a: np.ndarray) -> tuple[int, list[np.ndarray]] | None:
        """(window number, every rank's matching part of the window as ``a``'s dtype) when ``a`` is an alloc'd
        array or a leading slice of one, else None.

        Every rank must pass the same length (the fingerprint check compares
        shapes) and the same window (the caller puts its number into the
        checked signature). The views are cached per (address, size, dtype),
        so a training loop's repeated calls on the same buckets build nothing.
        """
        b = a.base
        if b is None:  # owns its memory, so not a view of a window (the common case, decided in 30 ns)
            return None
        while type(b) is np.ndarray:  # a view (of a view...): an array that owns its memory at the root is
            nb = b.base               # a plain one; a window's roots in the MPI buffer it was made from
            if nb is None:
                return None
            b = nb
        addr = a.__array_interface__["data"][0]
        key = (addr, a.nbytes, a.dtype)
        found = self._views.get(key)
        if found is None:
            ent = self._by_addr.get(addr)
            if ent is None or ent[1][self.arena.rank].nbytes < a.nbytes:
                return None
            found = (ent[2], [s[:a.nbytes].view(a.dtype) for s in ent[1]])
            if len(self._views) >= 1024:  # many distinct prefix lengths: keep the cache bounded
                self._views.clear()
            self._views[key] = found
        return found

    def whole(self, a: np.ndarray) -> tuple[int, list[np.ndarray]] | None:
        """(window number, every rank's whole part of the window, as bytes) when ``a`` is an alloc'd array or a
        leading slice of one, else None (a plain array: decided by its ``base`` alone).

        The answer is kept for the array object (a loop passes the same one
        call after call, and reading its address is the costly part); the
        arrays kept are views of windows, dropped before a window is freed.
        """
        if a.base is None:
            return None
        hit = self._whole.get(id(a))
        if hit is not None and hit[0] is a:
            live = self._by_addr.get(hit[2])
            if live is not None and live[2] == hit[1][0]:  # the window still exists (numbers are never reused)
                return hit[1]
        addr = a.__array_interface__["data"][0]
        ent = self._by_addr.get(addr)
        found = None if ent is None or ent[1][self.arena.rank].nbytes < a.nbytes else (ent[2], ent[1])
        if found is not None:
            if len(self._whole) >= 64:
                self._whole.clear()
            self._whole[id(a)] = (a, found, addr)
        return found

    def own_slice(self, n: int) -> tuple[int, int]:
        """The part [start, stop) of an n-element array that this rank reduces in :meth:`allreduce`."""
        return self.arena.slice_of(n, self.arena.rank)

    def allreduce(self, src: list[np.ndarray], dst: list[np.ndarray], ufunc: Callable[..., Any],
                  finish: Callable[[np.ndarray], None] | None = None,
                  first: Callable[[], Any] | None = None,
                  own: list[tuple[int, int, np.ndarray, float]] | None = None) -> None:
        """Allreduce alloc'd arrays where they lie: every rank's ``dst`` gets the reduction of every rank's ``src``.

        ``src`` and ``dst`` are every rank's view (from ``lookup``); ``dst`` is
        ``src`` in place, else another window. Rank r alone reduces slice r
        (reading every rank's slice r), in rank order into rank 0's ``dst``
        slice (the same operations, hence the same bits, as every other shm
        path), applies ``finish`` (e.g. the division of ``avg``) and copies the
        result into slice r of every other rank's ``dst``. No other rank reads
        or writes slice r meanwhile, so one phase before (inputs ready, and
        every rank inside the call, so no one still uses its ``dst``) and one
        after (all copies landed, no one reads ``src`` any more) suffice,
        whatever the size: no per-chunk synchronisation.

        ``own``: pieces ``(start, stop, g, scale)`` of this rank's slice (see
        :meth:`own_slice`; sorted, disjoint) whose input is ``g * scale``
        rather than what its ``src`` holds there: the torch wrapper leaves
        autograd's gradient where it is for the part only this rank reads,
        instead of copying it into the window first. The product is formed
        per cache-sized piece, as the copy would have (the same bits).
        """
        ar = self.arena
        r = ar.rank
        n = src[0].size
        s0, s1 = ar.slice_of(n, r)
        acc, rest = dst[0], dst[1:]
        phase, arrive = ar.phase, ar.arrive
        arrive(first, rollback=False) if first is not None else phase()  # ARRIVED: every rank's array holds its input
        # Cache-sized pieces keep the reduced piece in cache while it is copied out.
        step = max(1, WINDOW_PIECE_BYTES // acc.dtype.itemsize)
        copyto = np.copyto
        segs: list[tuple[int, int, Any, float]] = []
        pos = s0
        for a, b, g, scale in own or ():
            if a > pos:
                segs.append((pos, a, None, 1.0))
            segs.append((a, b, g, scale))
            pos = b
        if pos < s1:
            segs.append((pos, s1, None, 1.0))
        for a0, b0, g, scale in segs:
            for a in range(a0, b0, step):
                b = min(b0, a + step)
                d = acc[a:b]  # rank 0's copy of slice r: only this rank touches slice r in this phase
                if g is None:
                    _reduce_slices(ufunc, src, a, b, d)
                else:
                    mine = self._scratch(b - a, acc.dtype)
                    np.multiply(g[a - a0:b - a0], scale, out=mine)
                    parts = [s[a:b] for s in src]
                    parts[r] = mine
                    _reduce_slices(ufunc, parts, 0, b - a, d)
                if finish is not None:
                    finish(d)
                for o in rest:
                    copyto(o[a:b], d)
        phase()  # DONE: every slice has landed everywhere, and nobody reads our array any more

    def plan(self, src: list[np.ndarray], dst: list[np.ndarray]) -> list[tuple[list[np.ndarray], np.ndarray,
                                                                              list[np.ndarray]]]:
        """The pieces of :meth:`allreduce` (no ``own``) on these views, cut once for :meth:`quick_allreduce`:
        per piece of this rank's slice, (every rank's input there, the output it is reduced into, the other
        outputs it is copied to)."""
        r = self.arena.rank
        s0, s1 = self.arena.slice_of(src[0].size, r)
        step = max(1, WINDOW_PIECE_BYTES // src[0].dtype.itemsize)
        return [([s[a:min(s1, a + step)] for s in src], dst[0][a:min(s1, a + step)],
                 [o[a:min(s1, a + step)] for o in dst[1:]]) for a in range(s0, s1, step)]

    def quick_allreduce(self, h: int, seq: int, plan: list[tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]],
                        ufunc: Callable[..., Any], finish: Callable[[np.ndarray], None] | None) -> bool:
        """:meth:`allreduce` (no ``own``) with the cross-rank check as its first phase (ShmArena.exchange of
        fingerprint ``h`` of call ``seq``) over pieces cut once (:meth:`plan`); False, with nothing touched,
        on a mismatch.

        The same operations in the same order as :meth:`allreduce`, with as
        little Python around them as can be: between two calls a training
        step (or the benchmark's other columns) evicts the caches and TLB, and
        every object the interpreter touches then costs a miss, which at 1 MiB
        was comparable to moving the data itself (see docs/bench).
        """
        ar = self.arena
        if not ar.exchange(h, seq):
            return False
        copyto = np.copyto
        for ins, acc, rest in plan:
            _reduce_into(ufunc, ins, acc)
            if finish is not None:
                finish(acc)
            for o in rest:
                copyto(o, acc)
        ar.phase()
        return True
