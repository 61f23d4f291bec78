"""Measuring: buffers per size, algorithms interleaved round-robin per size, slowest-rank times, exact checks.

Terms used below. A *column* is one algorithm of the library (native, ring,
...), or a reference: ``gloo`` (torch.distributed over Gloo) or ``memcpy``
(a local copy of the same bytes, no communication). A *mode* is out-of-place
(a separate output buffer) or in-place (``out=x``). A *case* is one column in
one mode at one size: a zero-argument call on preallocated buffers.

Method (absolute times drift between runs on shared machines, ratios inside
one run much less; docs/performance.md): within each size every case runs once
per iteration, in a round-robin order shuffled each round (the same seed on
every rank), so no case always runs after the same neighbour and inherits its
after-effects (caches full of another buffer); the ``gloo`` cases run after
the others, each iteration of them in turn, because any call right after a
Gloo all_reduce runs slower, native MPI's included, even long after it
returned (a rank that blocked in Gloo comes back to cold caches); a barrier on the
benchmark's own MPI communicator precedes every timed call; a call's time is
the slowest rank's (a native MPI Allreduce(MAX) of the per-iteration times);
the reported time is the median over iterations and the spread their
interquartile range. Each size gets its own buffers, made and touched before
its first call and kept for all its iterations (so no call allocates), the
size a user's array of that size has: slices of one buffer for the largest
size would give small sizes the transparent huge pages NumPy advises for
arrays from 4 MiB (see _Buffers).

alltoall, gather, scatter, allgatherv and sendrecv run out-of-place only, on
one-dimensional arrays (a row is an element), into preallocated outputs
(``out=``) as MPI's calls are; where a version of the library's gather or
scatter takes no ``out=``, the check calls it once more after the timed
iterations and compares what it returns. See ``collective-bench --help`` for
each collective's size convention and allgatherv's uneven split.
"""
from __future__ import annotations

import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .cli import ALLOC_COLLECTIVES, LIB_NATIVE, ROOTED, Options, busbw_factor, column_applies
from .gloo import unsupported_dtype
from .predict import predicted_us

__all__ = ["MODES", "Stat", "SizeResult", "CollectiveResult", "JobInfo", "Reporter", "run", "counts", "values",
           "expected", "modes_of", "allgatherv_counts", "sendrecv_peer"]

OOP, IP = "out_of_place", "in_place"
#: The modes, in column order.
MODES: tuple[str, ...] = (OOP, IP)
_IN_PLACE_COLLECTIVES = frozenset(("allreduce", "reduce", "broadcast"))


@dataclass
class Stat:
    """One case's measurement at one size.

    Attributes:
        times_us: per timed iteration, the slowest rank's time in microseconds.
        nbytes: the size column (bytes) that algbw divides.
        factor: busbw / algbw for this collective and P.
        wrong: elements that differ from the exact answer, summed over ranks (None: not checked).
    """

    times_us: np.ndarray
    nbytes: int
    factor: float
    wrong: int | None = None

    @property
    def median_us(self) -> float:
        """Median over iterations."""
        return float(np.median(self.times_us))

    @property
    def iqr(self) -> float:
        """Interquartile range over the median (0.1 = 10 %)."""
        q1, q3 = np.percentile(self.times_us, [25, 75])
        m = self.median_us
        return float((q3 - q1) / m) if m > 0 else 0.0

    @property
    def algbw(self) -> float:
        """Size / median time, GB/s (10^9 bytes)."""
        m = self.median_us
        return self.nbytes / (m * 1e3) if m > 0 else 0.0

    @property
    def busbw(self) -> float:
        """algbw times the collective's nccl-tests factor, GB/s."""
        return self.algbw * self.factor

    def to_json(self) -> dict[str, Any]:
        """The statistics and the raw samples."""
        t = self.times_us
        q1, q3 = np.percentile(t, [25, 75])
        return {"time_us": self.median_us, "min_us": float(t.min()), "p25_us": float(q1), "p75_us": float(q3),
                "max_us": float(t.max()), "iqr": self.iqr, "algbw": self.algbw, "busbw": self.busbw,
                "wrong": self.wrong, "samples_us": [float(v) for v in t]}


@dataclass
class SizeResult:
    """Every case at one size.

    Attributes:
        size: bytes (nccl-tests convention: the largest per-rank buffer).
        count: elements in that buffer.
        input_bytes: bytes of one rank's input (what `auto` and tuning tables key on).
        cells: column -> mode -> Stat; a missing mode is n/a.
        pred_us: column -> predicted time (or None).
        auto_pick: the algorithm ``auto`` ran at this size (None without an auto column).
    """

    size: int
    count: int
    input_bytes: int
    cells: dict[str, dict[str, Stat]] = field(default_factory=dict)
    pred_us: dict[str, float | None] = field(default_factory=dict)
    auto_pick: str | None = None

    def ratio_vs_native(self, col: str, mode: str) -> float | None:
        """busbw(col) / busbw(native) in ``mode`` (memcpy compares with native out-of-place)."""
        a = self.cells.get(col, {}).get(mode)
        b = self.cells.get("native", {}).get(mode if col != "memcpy" else OOP)
        if a is None or b is None:
            return None
        # busbw is zero at P=1 (factor 0) or for empty buffers; algbw ratios are the same thing then.
        if b.busbw > 0 and a.busbw > 0:
            return a.busbw / b.busbw
        if b.algbw > 0:
            return a.algbw / b.algbw
        return None


@dataclass
class CollectiveResult:
    """All sizes of one collective.

    Attributes:
        collective: its name.
        root: root rank (reduce, broadcast) or -1.
        factor: busbw / algbw.
        columns: column names, in order.
        modes: column -> the modes it has.
        show_pred: some prediction is a number (print the pred(us) column).
        rows: one per size.
        notes: why a column or case was left out.
    """

    collective: str
    root: int
    factor: float
    columns: list[str]
    modes: dict[str, tuple[str, ...]]
    show_pred: bool
    rows: list[SizeResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def wrong(self) -> int:
        """#wrong summed over every size, column and mode."""
        return sum(s.wrong or 0 for r in self.rows for m in r.cells.values() for s in m.values())

    def avg_busbw(self, col: str, mode: str) -> float | None:
        """Mean busbw over the sizes where the case ran (algbw for memcpy: its factor is 1)."""
        v = [r.cells[col][mode].busbw for r in self.rows if mode in r.cells.get(col, {})]
        return float(np.mean(v)) if v else None


@dataclass
class JobInfo:
    """What the header says about the job."""

    mpi_library: str
    mpi_version: str
    mpi4py_version: str
    nranks: int
    ranks_per_node: list[int]


class Reporter(Protocol):
    """Receives results as they are measured (only rank 0's reporter prints)."""

    def begin(self, info: JobInfo, opts: Options, res: CollectiveResult) -> None: ...
    def row(self, res: CollectiveResult, row: SizeResult) -> None: ...
    def end(self, res: CollectiveResult) -> None: ...


# ------------------------------------------------------------------ data
def counts(coll: str, size: int, itemsize: int, nranks: int) -> tuple[int, int, int]:
    """``(count, n_in, n_out)`` for a size in bytes: elements of the size column, of each input, of each output.

    reduce_scatter's input and allgather's output are rounded down to a multiple of P elements (as nccl-tests);
    alltoall, gather and scatter round down to a multiple of P too (equal blocks).
    For allgatherv ``n_in`` is the mean, ``count // P``: rank r's own input is
    ``allgatherv_counts(count, P)[r]``.

    Example::

        counts("allgather", 4096, 4, 2)   # (1024, 512, 1024)
        counts("scatter", 4096, 4, 3)     # (1023, 1023, 341)
    """
    count = size // itemsize
    if coll in ("reduce_scatter", "scatter"):
        count -= count % nranks
        return count, count, count // nranks
    if coll in ("allgather", "gather"):
        count -= count % nranks
        return count, count // nranks, count
    if coll == "alltoall":
        count -= count % nranks
        return count, count, count
    if coll == "allgatherv":
        return count, count // nranks, count
    return count, count, count


def allgatherv_counts(count: int, nranks: int) -> list[int]:
    """allgatherv's elements per rank: in proportion to r+1, summing to ``count`` exactly.

    Rank r's block runs from ``floor(count*r(r+1)/(P(P+1)))`` to
    ``floor(count*(r+1)(r+2)/(P(P+1)))``, so the sizes differ: rank r sends
    about 2(r+1)/(P+1) times the mean.

    Example::

        allgatherv_counts(1024, 2)   # [341, 683]
    """
    t = nranks * (nranks + 1)
    b = [count * r * (r + 1) // t for r in range(nranks + 1)]
    return [b[r + 1] - b[r] for r in range(nranks)]


def sendrecv_peer(rank: int, nranks: int) -> int | None:
    """sendrecv's partner of ``rank``: ``rank ^ 1``, or None for the last rank of an odd P (it sits out).

    Example::

        [sendrecv_peer(r, 3) for r in range(3)]   # [1, 0, None]
    """
    peer = rank ^ 1
    return peer if peer < nranks else None


def values(rank: int, n: int, dtype: np.dtype, op: str) -> np.ndarray:
    """Rank ``rank``'s input: small integers whose reduction over the ranks is exact in ``dtype`` (any order).

    The same scheme as tests/jobs/correctness.py: |sum| <= 5P, |product| <= 4.
    """
    i = np.arange(n, dtype=np.int64)
    if op == "prod":
        v = np.where((i + rank) % 3 == 0, -1, 1) if dtype.kind != "u" else np.ones(n, np.int64)
        if rank < 2:
            v = v * np.where((i + rank) % 2 == 0, 2, 1)
    elif dtype.kind == "u" or dtype.itemsize == 1:
        v = (i * 7 + rank * 3) % 4
    else:
        v = (i * 7 + rank * 5) % 11 - 5
    return v.astype(dtype)


def _reduce_all(n: int, dtype: np.dtype, op: str, nranks: int) -> np.ndarray:
    uf = {"sum": np.add, "avg": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op]
    acc = values(0, n, dtype, op)
    for r in range(1, nranks):
        acc = uf(acc, values(r, n, dtype, op))
    if op == "avg":
        acc = np.floor_divide(acc, dtype.type(nranks)) if dtype.kind in "iu" else np.divide(acc, nranks).astype(dtype)
    return acc


def expected(coll: str, n_in: int, dtype: np.dtype, op: str, root: int, rank: int, nranks: int) -> np.ndarray | None:
    """The exact result this rank must hold (None: it holds none: reduce and gather off the root, sendrecv unpaired).

    ``n_in`` is the elements of each rank's input (``counts``), except for
    allgatherv: the elements of the whole result, split by ``allgatherv_counts``.
    Rank r's input is ``values(r, ...)``.
    """
    if coll == "allreduce":
        return _reduce_all(n_in, dtype, op, nranks)
    if coll == "reduce":
        return _reduce_all(n_in, dtype, op, nranks) if rank == root else None
    if coll == "broadcast":
        return values(root, n_in, dtype, op)
    if coll == "reduce_scatter":  # the library's even blocks: the first n % P ranks get one more
        return np.array_split(_reduce_all(n_in, dtype, op, nranks), nranks)[rank]
    if coll == "alltoall":  # block `rank` of every rank's input, in rank order
        b = n_in // nranks
        return np.concatenate([values(s, n_in, dtype, op)[rank * b:(rank + 1) * b] for s in range(nranks)])
    if coll == "gather" and rank != root:
        return None
    if coll == "scatter":
        return np.array_split(values(root, n_in, dtype, op), nranks)[rank]
    if coll == "allgatherv":
        return np.concatenate([values(r, c, dtype, op) for r, c in enumerate(allgatherv_counts(n_in, nranks))])
    if coll == "sendrecv":
        peer = sendrecv_peer(rank, nranks)
        return None if peer is None else values(peer, n_in, dtype, op)
    return np.concatenate([values(r, n_in, dtype, op) for r in range(nranks)])


def modes_of(col: str, coll: str) -> tuple[str, ...]:
    """The modes a column has for a collective (memcpy and reduce_scatter/allgather: out-of-place only)."""
    if col == "memcpy" or coll not in _IN_PLACE_COLLECTIVES:
        return (OOP,)
    return MODES


# ------------------------------------------------------------------ cases
class _Buffers:
    """One column's buffers for one size (alloc's: once for the largest, then sliced), touched when made.

    Per size, not slices of one allocation for the largest: NumPy advises
    transparent huge pages for arrays from 4 MiB, so a 1 MiB slice of a 64 MiB
    buffer would sit on huge pages that a user's 1 MiB array never gets, and
    every column (MPI's own included) would look faster than it is for users.
    ``alloc``'s shared windows cannot have huge pages where shmem THP is off.
    """

    def __init__(self, x: np.ndarray, o: np.ndarray, z: np.ndarray) -> None:
        self.x, self.o, self.z = x, o, z
        for a in (x, o, z):
            a[...] = 0  # every page faulted in now, not in a timed call

    @classmethod
    def new(cls, n_in: int, n_out: int, in_place: bool, dtype: np.dtype) -> "_Buffers":
        """Fresh arrays: input, output, and the in-place copy of the input when the column runs in place."""
        return cls(*(np.empty(n, dtype) for n in (n_in, n_out, n_in if in_place else 0)))


def _first(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` itself when it holds n elements (an array of its own, as a user's is: no view), else ``a[:n]``."""
    return a if a.size == n else a[:n]


@dataclass
class _Case:
    col: str
    mode: str
    fn: Callable[[], Any]
    result: np.ndarray | None  # where this rank's answer lands (None: nowhere)
    reset: Callable[[], None] | None = None  # restore the input before the in-place check
    returns: bool = False  # the answer is what fn returns (gather, scatter without out=): checked by one more call


def probe_cases(calls: Sequence[Callable[[], Any]], labels: Sequence[tuple[str, str]], mpicomm: Any,
                seen: set[str], notes: list[str], after: Callable[[], Any] | None = None) -> list[bool]:
    """Run every case once; which ones every rank ran (a refused one shows as n/a, with the reason, once per run).

    A case the library refuses (an algorithm without this collective or dtype)
    raises on every rank before any message, so all ranks agree. ``after``
    runs before the agreement (e.g. a device synchronisation).
    """
    from mpi4py import MPI

    from collective import CollectiveError

    ok = np.ones(len(calls), np.int32)
    why: dict[int, str] = {}
    for i, fn in enumerate(calls):
        try:
            fn()
        except CollectiveError as exc:
            ok[i] = 0
            why[i] = str(exc).split(": ", 1)[-1].splitlines()[0]
    if after is not None:
        after()
    mpicomm.Allreduce(MPI.IN_PLACE, ok, op=MPI.MIN)
    for i, (col, mode) in enumerate(labels):
        if not ok[i]:
            note = f"{col} {mode.replace('_', '-')}: n/a ({why.get(i, 'refused on another rank')})"
            if note not in seen:
                seen.add(note)
                notes.append(note)
    return [bool(v) for v in ok]


def _library_call(comm: Any, coll: str, alg: str, op: str, root: int, x: np.ndarray, out: np.ndarray) -> Callable:
    # partial, not a lambda: one less Python frame inside the timed call.
    if coll == "allreduce":
        return functools.partial(comm.allreduce, x, op, alg, out)
    if coll == "reduce":
        return functools.partial(comm.reduce, x, root, op, alg, out)
    if coll == "broadcast":
        return functools.partial(comm.broadcast, x, root, alg, out)
    if coll == "reduce_scatter":
        return functools.partial(comm.reduce_scatter, x, op, alg, out)
    return functools.partial(comm.allgather, x, alg, out)


def _native_call(mpicomm: Any, coll: str, op: str, root: int, x: np.ndarray, out: np.ndarray,
                 in_place: bool) -> Callable:
    """MPI's own collective called straight through mpi4py, as its users call it: the baseline column.

    No library code runs inside the timed call (no checks, no dispatch), so a
    ratio against it charges our whole Python path to us. ``avg`` is MPI's
    sum followed by NumPy's division, as a user of MPI would write it. Where
    MPI has no datatype for the dtype the call raises CollectiveTypeError
    (and the probe marks the column n/a).
    """
    from mpi4py import MPI

    from collective.backends.mpi import mpi_dtype, mpi_op
    from collective.ops import OPS, average_in_place

    T = mpi_dtype(x.dtype)
    if T is None:  # the probe of the cases marks the column n/a at this size
        from collective.errors import CollectiveTypeError

        def refused() -> None:
            raise CollectiveTypeError(f"native: MPI has no datatype for {x.dtype}")
        return refused
    rop = OPS[op] if coll in ("allreduce", "reduce", "reduce_scatter") else None
    mop = mpi_op(rop.mpi_name, x.dtype) if rop is not None else None
    P, R = mpicomm.Get_size(), mpicomm.Get_rank()
    has_out = coll != "reduce" or R == root
    avg = rop is not None and rop.average and has_out
    send = MPI.IN_PLACE if in_place else [x, T]
    recv = [out, T]
    if coll == "allreduce":
        call = functools.partial(mpicomm.Allreduce, send, recv, mop)
    elif coll == "reduce":
        call = functools.partial(mpicomm.Reduce, send if R == root else [x, T], recv if R == root else None, mop, root)
    elif coll == "broadcast":
        if in_place or R != root:
            return functools.partial(mpicomm.Bcast, recv, root)

        def call() -> None:  # out of place: the root's input lands in its output, as the library's does
            np.copyto(out, x)
            mpicomm.Bcast(recv, root)
        return call
    elif coll == "reduce_scatter":
        call = functools.partial(mpicomm.Reduce_scatter_block, [x, T], recv, mop)
    else:
        return functools.partial(mpicomm.Allgather, [x, T], recv)
    if not avg:
        return call

    def averaged() -> None:
        call()
        average_in_place(out, P)
    return averaged


#: The collectives beyond allreduce's kin: out-of-place only, built by the ``_*_v`` functions below.
_MORE = ("alltoall", "gather", "scatter", "allgatherv", "sendrecv")


def _refused(coll: str, why: str) -> Callable[[], None]:
    """A case that raises before any message on every rank (the probe then shows the column as n/a, saying why)."""
    from collective.errors import CollectiveError

    def refused() -> None:
        raise CollectiveError(f"{coll}: {why}")
    return refused


def _idle() -> None:
    """sendrecv's call on the rank without a partner (the last one of an odd P)."""


def _takes_out(fn: Callable) -> bool:
    """Whether the library's call has an ``out=`` parameter (then it writes where MPI's own call does)."""
    import inspect

    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _library_call_v(comm: Any, coll: str, alg: str, root: int, x: np.ndarray, out: np.ndarray, nranks: int,
                    rank: int) -> tuple[Callable, bool]:
    """The library's call of a collective of ``_MORE``, and whether its answer is its return value (else ``out``).

    A call this version of the library lacks raises on every rank ("not
    available in this version"), so its column shows n/a with that note.
    gather and scatter write into ``out`` where they take it, else their
    answer is what they return.
    sendrecv is ``comm.isend`` to the partner, ``comm.recv`` from it, then the
    send's ``wait``: both directions at once, as MPI's Sendrecv (ordered
    ``send``/``recv`` where isend is missing).
    """
    def missing(name: str) -> Callable[[], None]:
        return _refused(coll, f"comm.{name}() is not available in this version of collective")

    if coll == "alltoall":
        if not hasattr(comm, "alltoall"):
            return missing("alltoall"), False
        return functools.partial(comm.alltoall, x, algorithm=alg, out=out), False
    if coll == "gather":
        if not hasattr(comm, "gather"):
            return missing("gather"), True
        if _takes_out(comm.gather):  # into the same preallocated buffer as MPI's Gather (the root's only)
            mine = out if rank == root else None
            return functools.partial(comm.gather, x, root=root, algorithm=alg, out=mine), False
        return functools.partial(comm.gather, x, root=root, algorithm=alg), True
    if coll == "scatter":
        if not hasattr(comm, "scatter"):
            return missing("scatter"), True
        if _takes_out(comm.scatter):
            return functools.partial(comm.scatter, x if rank == root else None, root, algorithm=alg, out=out), False
        return functools.partial(comm.scatter, x if rank == root else None, root, algorithm=alg), True
    if coll == "allgatherv":  # comm.allgather with a different first dimension on every rank
        if not hasattr(comm, "gather"):  # uneven allgather comes with the full collective set (gather, alltoall...)
            return _refused(coll, "comm.allgather() of different sizes per rank is not available in this version "
                                  "of collective"), False
        return functools.partial(comm.allgather, x, algorithm=alg, out=out), False
    if nranks < 2:
        return _refused(coll, "needs 2 ranks or more (ranks pair up as r and r^1)"), False
    if not (hasattr(comm, "send") and hasattr(comm, "recv")):
        return missing("send"), False
    peer = sendrecv_peer(rank, nranks)
    if peer is None:
        return _idle, False
    send, recv = comm.send, comm.recv
    if hasattr(comm, "isend"):
        isend = comm.isend

        def exchange() -> None:
            w = isend(x, peer, 0)
            recv(out, peer, 0)
            w.wait()
        return exchange, False

    def ordered() -> None:  # the lower rank of the pair sends first
        if rank < peer:
            send(x, peer, 0)
            recv(out, peer, 0)
        else:
            recv(out, peer, 0)
            send(x, peer, 0)
    return ordered, False


def _native_call_v(mpicomm: Any, coll: str, root: int, x: np.ndarray, out: np.ndarray) -> Callable:
    """MPI's own call straight through mpi4py for a collective of ``_MORE`` (see ``_native_call``).

    Alltoall, Gather, Scatter (equal blocks), Allgatherv (``allgatherv_counts``)
    and Sendrecv with the partner ``sendrecv_peer``.
    """
    from collective.backends.mpi import mpi_dtype

    P, R = mpicomm.Get_size(), mpicomm.Get_rank()
    T = mpi_dtype(x.dtype)
    if T is None:
        return _refused(coll, f"native: MPI has no datatype for {x.dtype}")
    if coll == "alltoall":
        return functools.partial(mpicomm.Alltoall, [x, T], [out, T])
    if coll == "gather":
        return functools.partial(mpicomm.Gather, [x, T], [out, T] if R == root else None, root)
    if coll == "scatter":
        return functools.partial(mpicomm.Scatter, [x, T] if R == root else None, [out, T], root)
    if coll == "allgatherv":
        c = allgatherv_counts(out.size, P)
        displ = np.concatenate(([0], np.cumsum(c)[:-1])).tolist()
        return functools.partial(mpicomm.Allgatherv, [x, T], [out, (c, displ), T])
    if P < 2:
        return _refused(coll, "needs 2 ranks or more (ranks pair up as r and r^1)")
    peer = sendrecv_peer(R, P)
    if peer is None:
        return _idle
    return functools.partial(mpicomm.Sendrecv, [x, T], peer, 0, [out, T], peer, 0)


def _wrong(got: Any, want: np.ndarray) -> int:
    """Elements of ``got`` that differ from ``want``; a missing result or one of another size is all wrong."""
    if got is None:
        return max(want.size, 1)
    g = np.asarray(got)
    if g.size != want.size:
        return max(g.size, want.size, 1)
    return int(np.count_nonzero(g.reshape(want.shape) != want))


def _broken(call: Callable, res: np.ndarray | None) -> Callable:
    """native, then one element of this rank's result made wrong: proves #wrong and the exit status work."""
    def fn() -> None:
        call()
        if res is not None and res.size:
            res[0] += 1

    return fn


# ------------------------------------------------------------------ the run
class _Run:
    def __init__(self, opts: Options, comm: Any, mpicomm: Any, reporter: Reporter | None) -> None:
        from mpi4py import MPI

        self.MPI, self.opts, self.comm, self.mpi, self.rep = MPI, opts, comm, mpicomm, reporter
        self.P, self.R = mpicomm.Get_size(), mpicomm.Get_rank()
        self.gloo: Any = None

    def info(self) -> JobInfo:
        import mpi4py

        MPI = self.MPI
        lib = MPI.Get_library_version().strip().splitlines()[0].split(", package")[0].strip()
        v = MPI.Get_version()
        cl = self.comm.cluster
        rpn = [len(cl.ranks_of_node(n)) for n in range(cl.nnodes)]
        return JobInfo(lib, f"{v[0]}.{v[1]}", mpi4py.__version__, self.P, rpn)

    def columns(self, coll: str) -> tuple[list[str], list[str]]:
        from .cli import GLOO_COLLECTIVES

        cols, notes = [], []
        for c in self.opts.algorithms:
            if c == "alloc" and (coll not in ALLOC_COLLECTIVES or not self.comm.single_node):
                notes.append(f"alloc: shm on comm.alloc buffers, {', '.join(ALLOC_COLLECTIVES)} on one node only; "
                             f"absent for {coll}" + ("" if self.comm.single_node else " across nodes"))
                continue
            if c == "gloo" and coll not in GLOO_COLLECTIVES:
                notes.append(f"gloo: measured for {', '.join(GLOO_COLLECTIVES)}; absent for {coll}")
                continue
            if not column_applies(c, coll):
                if self.opts.explicit:  # `-a all` runs what each collective has, silently
                    notes.append(f"{c}: not an algorithm of {coll}; absent")
                continue
            if c == "gloo" and self.gloo is None:
                from .gloo import GlooGroup, unavailable_reason

                why_torch = unavailable_reason()
                why = why_torch or unsupported_dtype(self.opts.dtype)
                ok = np.array([0 if why else 1], np.int32)
                self.mpi.Allreduce(self.MPI.IN_PLACE, ok, op=self.MPI.MIN)
                if not ok[0]:
                    why = why or "torch.distributed is missing on another rank"
                    if self.opts.explicit:
                        hint = ("install torch (pip install 'pycollective[torch]') or leave gloo out" if why_torch
                                else "leave gloo out or choose another -d")
                        raise SystemExit(f"collective-bench: -a gloo: {why}; {hint}")
                    notes.append(f"gloo: column absent, {why}")
                    continue
                self.gloo = GlooGroup(self.mpi, single_node=self.comm.cluster.nnodes == 1)
            cols.append(c)
        return cols, notes

    def measure(self, coll: str, info: JobInfo) -> CollectiveResult:
        o, P = self.opts, self.P
        dtype = o.dtype
        root = o.root if coll in ROOTED else -1
        cols, notes = self.columns(coll)
        modes = {c: modes_of(c, coll) for c in cols}
        factor = busbw_factor(coll, P)
        # Sizes that round to the same element count (below one element, or P for reduce_scatter/allgather) run once.
        shapes = list(dict.fromkeys(counts(coll, s, dtype.itemsize, P) for s in o.sizes))
        sizes = [s[0] * dtype.itemsize for s in shapes]
        preds = {(c, s): predicted_us("native" if c == LIB_NATIVE else c, coll, s, self.comm.cluster)
                 for c in cols for s in sizes}
        res = CollectiveResult(coll, root, factor, cols, modes, any(v is not None for v in preds.values()),
                               notes=notes)
        if self.rep is not None:
            self.rep.begin(info, o, res)
        max_in = max(s[1] for s in shapes)
        max_out = max(s[2] for s in shapes)
        alloc = None
        if "alloc" in cols:  # collective: every rank reaches it in the same column order
            # In place on one window; out of place from one window into another. allgatherv's inputs differ by
            # rank (up to the whole result's count), every rank's alloc the same size.
            big_in = max(s[0] for s in shapes) if coll == "allgatherv" else max_in
            alloc = _Buffers(*(self.comm.alloc(n, dtype) for n in (big_in, max_out, 0 if coll in _MORE else max_in)))
        seen_notes: set[str] = set(notes)
        for size, (count, n_in, n_out) in zip(sizes, shapes):
            own_in = self.own_input(coll, root, count, n_in)
            bufs = {c: (alloc if c == "alloc" else _Buffers.new(count, count, False, dtype) if c == "memcpy" else
                        _Buffers.new(own_in, n_out, IP in modes[c], dtype)) for c in cols}
            row = self.one_size(coll, root, cols, modes, bufs, count, n_in, n_out, factor, seen_notes, res, own_in)
            del bufs  # before the next size's: at most one size's buffers at a time
            row.pred_us = {c: preds[(c, size)] for c in cols}
            if "auto" in cols:
                row.auto_pick = self.auto_pick(coll, n_in * dtype.itemsize, dtype)
            res.rows.append(row)
            if self.rep is not None:
                self.rep.row(res, row)
        if self.rep is not None:
            self.rep.end(res)
        return res

    def own_input(self, coll: str, root: int, count: int, n_in: int) -> int:
        """Elements of this rank's input: allgatherv's share, scatter's whole input on the root only."""
        if coll == "allgatherv":
            return allgatherv_counts(count, self.P)[self.R]
        if coll == "scatter" and self.R != root:
            return 0
        return n_in

    def auto_pick(self, coll: str, nbytes: int, dtype: np.dtype) -> str | None:
        """What ``auto`` runs at this size, or None where this version of the library cannot say."""
        from collective import CollectiveError

        try:
            return self.comm.auto_algorithm(coll, nbytes, dtype)
        except (CollectiveError, KeyError, ValueError):
            return None

    def cases_more(self, coll: str, root: int, cols: list[str], bufs: dict, count: int, n_in: int, n_out: int,
                   inp: np.ndarray) -> list[_Case]:
        """The cases of a collective of ``_MORE`` (out-of-place only)."""
        comm, P, R = self.comm, self.P, self.R
        holder = root if coll == "gather" else 0  # the rank whose result `broken` spoils
        has_result = (coll != "gather" or R == root) and (coll != "sendrecv" or sendrecv_peer(R, P) is not None)
        out: list[_Case] = []
        for c in cols:
            b = bufs[c]
            if c == "memcpy":
                src, dst = _first(b.x, count), _first(b.o, count)
                out.append(_Case(c, OOP, functools.partial(np.copyto, dst, src), None))
                continue
            x, y = _first(b.x, inp.size), _first(b.o, n_out)
            np.copyto(x, inp)
            res = y if has_result else None
            returns = False
            if c == "gloo":
                fn = self.gloo.make(coll, x, y, root)
            elif c == "native":
                fn = _native_call_v(self.mpi, coll, root, x, y)
            elif c == "broken":  # the bare MPI call: it exists whatever this version of the library has
                fn = _broken(_native_call_v(self.mpi, coll, root, x, y), res if R == holder else None)
            else:
                alg = "native" if c == LIB_NATIVE else "shm" if c == "alloc" else c
                fn, returns = _library_call_v(comm, coll, alg, root, x, y, P, R)
            out.append(_Case(c, OOP, fn, None if returns else res, None, returns))
        return out

    def cases(self, coll: str, root: int, cols: list[str], modes: dict, bufs: dict, count: int, n_in: int,
              n_out: int, inp: np.ndarray) -> list[_Case]:
        if coll in _MORE:
            return self.cases_more(coll, root, cols, bufs, count, n_in, n_out, inp)
        o, comm, R = self.opts, self.comm, self.R
        out: list[_Case] = []
        holder = root if coll == "reduce" else 0  # the rank whose result `broken` spoils
        has_result = coll != "reduce" or R == root
        for c in cols:
            b = bufs[c]
            if c == "memcpy":
                # The bytes copied do not matter; the buffers were zeroed (touched) when allocated.
                src, dst = _first(b.x, count), _first(b.o, count)
                out.append(_Case(c, OOP, functools.partial(np.copyto, dst, src), None))
                continue
            x, y = _first(b.x, n_in), _first(b.o, n_out)
            np.copyto(x, inp)
            for mode in modes[c]:
                if mode == IP:
                    z = _first(b.z, n_in)
                    np.copyto(z, inp)
                    tgt, dst = z, z
                    reset = functools.partial(np.copyto, z, inp)
                else:
                    tgt, dst, reset = x, y, None
                res = dst if has_result else None
                if c == "gloo":
                    fn = self.gloo.make_allreduce(o.op, tgt, None if mode == IP else dst)
                elif c == "native":
                    fn = _native_call(self.mpi, coll, o.op, root, tgt, dst, mode == IP)
                elif c == LIB_NATIVE:
                    fn = _library_call(comm, coll, "native", o.op, root, tgt, dst)
                elif c == "broken":
                    fn = _broken(_library_call(comm, coll, "native", o.op, root, tgt, dst),
                                 res if R == holder else None)
                else:
                    fn = _library_call(comm, coll, "shm" if c == "alloc" else c, o.op, root, tgt, dst)
                out.append(_Case(c, mode, fn, res, reset))
        return out

    def one_size(self, coll: str, root: int, cols: list[str], modes: dict, bufs: dict, count: int, n_in: int,
                 n_out: int, factor: float, seen_notes: set[str], res: CollectiveResult,
                 own_in: int | None = None) -> SizeResult:
        o, MPI, mpi, P, R = self.opts, self.MPI, self.mpi, self.P, self.R
        dtype = o.dtype
        size = count * dtype.itemsize
        inp = values(R, n_in if own_in is None else own_in, dtype, o.op)
        cases = self.cases(coll, root, cols, modes, bufs, count, n_in, n_out, inp)

        ok = probe_cases([cs.fn for cs in cases], [(cs.col, cs.mode) for cs in cases], mpi, seen_notes, res.notes)
        cases = [cs for i, cs in enumerate(cases) if ok[i]]

        k, n = len(cases), o.iters
        t = np.zeros((k, n), np.float64)
        barrier, clock = mpi.Barrier, time.perf_counter
        gc.collect()
        gc_was = gc.isenabled()
        gc.disable()  # a collection inside a timed call would be charged to whichever case ran it
        mixed = np.array([i for i, cs in enumerate(cases) if cs.col != "gloo"], np.int64)
        apart = [i for i, cs in enumerate(cases) if cs.col == "gloo"]  # after the others: see the module docstring
        # A rotation would keep every case's predecessor fixed (the sequence is one cycle): shuffle instead.
        orders = np.random.default_rng(20240531).permuted(np.tile(mixed, (o.warmup + n, 1)), axis=1)
        def timed(i: int, it: int) -> None:
            fn = cases[i].fn
            barrier()
            t0 = clock()
            fn()
            t1 = clock()
            if it >= 0:  # else a warm-up iteration
                t[i, it] = t1 - t0

        try:
            for it in range(-o.warmup, n):
                for i in orders[it + o.warmup]:
                    timed(i, it)
            for it in range(-o.warmup, n):
                for i in apart:
                    timed(i, it)
        finally:
            if gc_was:
                gc.enable()
        if k:
            mpi.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)

        wrong = np.zeros(k, np.int64)
        if o.check and k:
            want = expected(coll, count if coll == "allgatherv" else n_in, dtype, o.op, root, R, P)
            for i, cs in enumerate(cases):
                if cs.col == "memcpy":
                    continue
                if cs.reset is not None:  # in place: the timed calls overwrote the input
                    cs.reset()
                    barrier()
                    cs.fn()
                if cs.returns:  # the answer is the return value: one more call, on every rank in the same order
                    barrier()
                    got = cs.fn()
                    if want is not None:
                        wrong[i] = _wrong(got, want)
                    elif got is not None:  # a result where none is due (gather off the root)
                        wrong[i] = 1
                elif cs.result is not None and want is not None:
                    wrong[i] = _wrong(cs.result, want)
            mpi.Allreduce(MPI.IN_PLACE, wrong, op=MPI.SUM)

        row = SizeResult(size, count, n_in * dtype.itemsize)
        for i, cs in enumerate(cases):
            f = 1.0 if cs.col == "memcpy" else factor
            checked = o.check and cs.col != "memcpy"
            row.cells.setdefault(cs.col, {})[cs.mode] = Stat(t[i] * 1e6, size, f, int(wrong[i]) if checked else None)
        return row


def run(opts: Options, comm: Any, mpicomm: Any, reporter: Reporter | None = None) -> tuple[JobInfo,
                                                                                           list[CollectiveResult]]:
    """Measure every collective of ``opts`` on every size; call ``reporter`` as results arrive.

    Args:
        opts: what to measure.
        comm: the library's Communicator (what is measured).
        mpicomm: the benchmark's own mpi4py communicator (barriers, timing and checks ride on it,
            so they never disturb the library's traffic).
        reporter: receives the header, each size's row and the footer; None on ranks that print nothing.

    Returns:
        The job description and one result per collective (the same on every rank).

    Example::

        info, results = run(parse_args(["-b", "4K", "-e", "4K"]), col.init(), MPI.COMM_WORLD.Dup())
    """
    r = _Run(opts, comm, mpicomm, reporter)
    if not 0 <= opts.root < r.P and any(c in ROOTED for c in opts.collectives):
        raise SystemExit(f"collective-bench: -r {opts.root} is not a rank (0..{r.P - 1})")
    info = r.info()
    out = []
    try:
        for coll in opts.collectives:
            out.append(r.measure(coll, info))
    finally:
        if r.gloo is not None:
            r.gloo.close()
    return info, out
