"""Runs a topologies Schedule over a Backend: nonblocking, segmented so reduction overlaps transfer, scratch reused.

Terms: a *plan* is one rank's share of a Schedule compiled for one element
size and segment size: byte offsets, scratch offsets and MPI tags worked out
once and cached, so a call does no arithmetic beyond slicing. A *segment* is a
piece of a transfer of at most ``segment_bytes``; each segment is its own
message, so while segment k is being reduced, segment k+1 is still arriving.
Tags number the segments on each (sender, receiver) channel in order, so both
sides agree on them without talking; the low bits of the op's sequence number
sit above them, so messages of consecutive collectives never match each other.

A Schedule of an in/out collective (alltoall, gather, scatter, allgatherv)
names several buffers: the caller passes ``{"input": x, "output": y}`` and the
executor lends the ``"temp"`` buffer from its scratch. Such a plan numbers
its buffers (``Plan.buffers``) and says which one each transfer and local copy
uses; a plan of the work buffer alone has the same shape as ever.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from collective.topologies import Schedule
from collective.topologies.schedule import TEMP, WORK

from .errors import CollectiveValueError

#: The scratch of a plan without reducing receives (which never reads it).
_NO_SCRATCH = np.empty(0, np.uint8)

__all__ = ["Plan", "compile_plan", "Executor", "ExecutorOptions"]


@dataclass
class ExecutorOptions:
    """Knobs of the executor.

    Attributes:
        segment_bytes: largest single message; longer transfers are split so the
            reduction of one segment overlaps the arrival of the next. Tests set
            it tiny to cover the multi-segment path on small inputs.
    """

    segment_bytes: int = 1 << 18


@dataclass(frozen=True)
class PlanStep:
    """One step of one rank, in bytes and tags.

    recv_copy / sends: (peer, byte_start, byte_stop, tag).
    recv_reduce: (peer, elem_start, elem_stop, scratch_elem_start, tag), in reduction order.
    The rest is used only by plans of several buffers (indices into ``Plan.buffers``):
    recv_copy_bufs / recv_reduce_bufs / send_bufs: the buffer of each entry above.
    copies: (src buffer, byte_start, byte_stop, dst buffer, dst byte_start), made before anything is posted.
    """

    recv_copy: tuple[tuple[int, int, int, int], ...]
    recv_reduce: tuple[tuple[int, int, int, int, int], ...]
    sends: tuple[tuple[int, int, int, int], ...]
    peers: tuple[int, ...]
    recv_copy_bufs: tuple[int, ...] = ()
    recv_reduce_bufs: tuple[int, ...] = ()
    send_bufs: tuple[int, ...] = ()
    copies: tuple[tuple[int, int, int, int, int], ...] = ()


@dataclass(frozen=True)
class Plan:
    """One rank's compiled share of a Schedule."""

    schedule: Schedule
    rank: int
    itemsize: int
    steps: tuple[PlanStep, ...]
    scratch_elems: int
    max_tag: int
    #: The buffers the steps name, by index; ("work",) for the collectives of one work buffer.
    buffers: tuple[str, ...] = (WORK,)
    #: This rank's elements of each of ``buffers``.
    extents: tuple[int, ...] = ()

    @property
    def temp_elems(self) -> int:
        """Elements of the temp buffer the executor lends this rank (0 if none)."""
        return self.extents[self.buffers.index(TEMP)] if TEMP in self.buffers else 0


def _segments(start: int, stop: int, seg: int) -> list[tuple[int, int]]:
    return [(a, min(a + seg, stop)) for a in range(start, stop, seg)]


def compile_plan(sched: Schedule, rank: int, itemsize: int, segment_bytes: int) -> Plan:
    """Compile rank ``rank``'s steps of ``sched`` for elements of ``itemsize`` bytes.

    Tags count segments per channel. Both ends split a transfer the same way
    (from its length alone), so the k-th segment sent a -> b is the k-th
    received b <- a. The sender's count for channel (rank -> q) needs only
    rank's own sends, and likewise for receives; no other rank's steps are read.
    """
    seg = max(1, segment_bytes // itemsize)
    sent: dict[int, int] = {}
    got: dict[int, int] = {}
    steps = []
    scratch = 0
    max_tag = 0
    buffers = sched.buffers
    index = {b: i for i, b in enumerate(buffers)}
    for step in sched.steps[rank]:
        rc, rr, sd = [], [], []
        rcb, rrb, sdb = [], [], []
        off = 0
        for rv in step.recvs:
            for a, b in _segments(rv.start, rv.stop, seg):
                tag = got.get(rv.peer, 0)
                got[rv.peer] = tag + 1
                max_tag = max(max_tag, tag)
                if rv.reduce:
                    rr.append((rv.peer, a, b, off, tag))
                    rrb.append(index[rv.buf])
                    off += b - a
                else:
                    rc.append((rv.peer, a * itemsize, b * itemsize, tag))
                    rcb.append(index[rv.buf])
        for s in step.sends:
            for a, b in _segments(s.start, s.stop, seg):
                tag = sent.get(s.peer, 0)
                sent[s.peer] = tag + 1
                max_tag = max(max_tag, tag)
                sd.append((s.peer, a * itemsize, b * itemsize, tag))
                sdb.append(index[s.buf])
        scratch = max(scratch, off)
        peers = tuple(sorted({t.peer for t in step.recvs} | {t.peer for t in step.sends}))
        if buffers == (WORK,):
            steps.append(PlanStep(tuple(rc), tuple(rr), tuple(sd), peers))
        else:
            cp = tuple((index[c.src], c.start * itemsize, c.stop * itemsize, index[c.dst], c.dst_start * itemsize)
                       for c in step.copies)
            steps.append(PlanStep(tuple(rc), tuple(rr), tuple(sd), peers, tuple(rcb), tuple(rrb), tuple(sdb), cp))
    extents = tuple(sched.extent(b, rank) for b in buffers)
    return Plan(sched, rank, itemsize, tuple(steps), scratch, max_tag, buffers, extents)


def _channel_segments(sched: Schedule, itemsize: int, segment_bytes: int) -> int:
    """The most segments any channel (sender -> receiver) of ``sched`` carries, cut as :func:`compile_plan` cuts
    them: the same number on every rank, since it counts every rank's sends (a receive is cut as its send is)."""
    seg = max(1, segment_bytes // itemsize)
    most = 0
    for steps in sched.steps:
        sent: dict[int, int] = {}
        for step in steps:
            for s in step.sends:
                sent[s.peer] = sent.get(s.peer, 0) + (s.stop - s.start + seg - 1) // seg
        if sent:
            most = max(most, max(sent.values()))
    return most


def no_reduction(*args: Any, **kwargs: Any) -> Any:
    """The reduction of a plan run with ufunc None: only a plan without reducing receives may be, so never called."""
    raise CollectiveValueError("executor: the plan reduces what it receives, but no ufunc was given")


class Executor:
    """Runs Plans over one Backend, reusing one scratch buffer that only grows.

    Not thread-safe: the Communicator serialises calls (one op at a time per
    communicator, in the same order on every rank).
    """

    def __init__(self, backend: Any, options: ExecutorOptions | None = None) -> None:
        self.backend = backend
        self.options = options or ExecutorOptions()
        self._scratch = np.empty(0, np.uint8)
        self._plans: dict[tuple, Plan] = {}
        tag_ub = getattr(backend, "tag_ub", 32767)
        # Split the tag into [sequence bits | segment counter bits] within the MPI tag bound.
        self.counter_bits = 20 if tag_ub >= (1 << 28) - 1 else 12
        self.seq_bits = max(0, min(8, tag_ub.bit_length() - 1 - self.counter_bits))
        #: The step being waited on, for stall and timeout reports: (plan, step index) or None.
        self.current: tuple[Plan, int] | None = None

    def plan(self, sched: Schedule, itemsize: int) -> Plan:
        """The cached plan of this rank for ``sched`` (Schedules are immutable and cached by their builders)."""
        key = (id(sched), itemsize, self.options.segment_bytes)
        p = self._plans.get(key)
        if p is None or p.schedule is not sched:
            seg_bytes = self.options.segment_bytes
            # Too many segments on some channel for the tag space: bigger ones. Counted over every rank's channels,
            # not this rank's: both ends of a channel must cut its transfers alike.
            while _channel_segments(sched, itemsize, seg_bytes) > (1 << self.counter_bits):
                seg_bytes *= 2
            p = compile_plan(sched, self.backend.rank, itemsize, seg_bytes)
            if len(self._plans) > 512:
                self._plans.clear()
            self._plans[key] = p
        return p

    def scratch(self, nbytes: int) -> np.ndarray:
        """A reusable uint8 buffer of at least ``nbytes`` (grown geometrically, never per call)."""
        if self._scratch.nbytes < nbytes:
            self._scratch = np.empty(max(nbytes, 2 * self._scratch.nbytes), np.uint8)
        return self._scratch

    def run(self, plan: Plan, work: np.ndarray | Mapping[str, np.ndarray | None], ufunc: Callable[..., Any] | None,
            seq: int) -> None:
        """Execute ``plan``: in place on ``work``, or on the named buffers of an in/out collective.

        Args:
            plan: this rank's plan (:meth:`plan`).
            work: the work buffer (1-D, contiguous, ``plan.schedule.nelems``
                elements); or, for a plan of several buffers, a mapping
                ``{"input": x, "output": y}`` of 1-D contiguous arrays of one
                dtype with this rank's extents (``plan.extents``); a buffer of
                no elements may be left out or None. The temp buffer comes
                from the executor's scratch.
            ufunc: the reduction (NumPy ufunc) of reducing receives, or None
                where there are none.
            seq: the op's sequence number (the high bits of the tags).

        Raises:
            CollectiveValueError: a buffer is missing or has the wrong size or
                dtype for the plan (nothing has been sent).
        """
        try:
            if plan.buffers != (WORK,):
                self._run_buffers(plan, work, ufunc, seq)
            else:
                self._run_work(plan, work, ufunc, seq)
        finally:
            self.current = None  # also after an error inside a step: no stale step in later reports

    def _run_work(self, plan: Plan, work: Any, ufunc: Callable[..., Any] | None, seq: int) -> None:
        """:meth:`run` for a plan of the work buffer alone."""
        if isinstance(work, Mapping):  # {"work": array} for a plan of the work buffer alone
            (work,) = self._arrays(plan, work)
        if not plan.steps:
            return
        be = self.backend
        isend, irecv, wait, waitall = be.isend, be.irecv, be.wait, be.waitall
        wbytes = work.view(np.uint8)
        scratch = _NO_SCRATCH
        reduce = no_reduction if ufunc is None else ufunc
        if plan.scratch_elems:
            sbytes = self.scratch(plan.scratch_elems * plan.itemsize)
            scratch = sbytes[: plan.scratch_elems * plan.itemsize].view(work.dtype)
        base = (seq & ((1 << self.seq_bits) - 1)) << self.counter_bits
        reqs: list[Any] = []
        rreqs: list[Any] = []
        try:
            for i, st in enumerate(plan.steps):
                self.current = (plan, i)
                # Loops, not comprehensions: a request posted before a later post fails must stay reachable
                # for abandon() below.
                reqs, rreqs = [], []
                for peer, a, b, tag in st.recv_copy:
                    reqs.append(irecv(wbytes[a:b], peer, base | tag))
                for peer, a, b, o, tag in st.recv_reduce:
                    rreqs.append(irecv(scratch[o:o + (b - a)].view(np.uint8), peer, base | tag))
                for peer, a, b, tag in st.sends:
                    reqs.append(isend(wbytes[a:b], peer, base | tag))
                for r, (peer, a, b, o, tag) in zip(rreqs, st.recv_reduce):
                    wait(r)
                    dst = work[a:b]
                    reduce(dst, scratch[o:o + (b - a)], out=dst)
                if reqs:
                    waitall(reqs)
        except BaseException:
            be.abandon(reqs + rreqs)
            raise
        self.current = None

    def _arrays(self, plan: Plan, given: Any) -> list[np.ndarray]:
        """The plan's buffers as 1-D arrays of one dtype, in ``plan.buffers`` order, checked; temp from scratch."""
        sched = plan.schedule
        where = f"{sched.algorithm} {sched.collective} on rank {plan.rank} of {sched.nranks}"
        if not isinstance(given, Mapping):
            given = {WORK: given}
        unknown = set(given) - set(plan.buffers) | ({TEMP} & set(given))
        if unknown:
            raise CollectiveValueError(f"{where}: buffers {sorted(unknown)} given; the caller's are "
                             f"{tuple(b for b in plan.buffers if b != TEMP)} (temp comes from the executor)")
        dtypes = {np.asarray(a).dtype for a in given.values() if a is not None}
        if len(dtypes) > 1:
            raise CollectiveValueError(f"{where}: buffers of several dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else np.dtype(np.uint8)
        if dtype.itemsize != plan.itemsize:
            raise CollectiveValueError(f"{where}: buffers of {dtype} ({dtype.itemsize} bytes) for a plan of "
                                       f"{plan.itemsize}-byte elements")
        arrays = []
        scratch_bytes = plan.scratch_elems * plan.itemsize
        for name, n in zip(plan.buffers, plan.extents):
            if name == TEMP:
                sbytes = self.scratch(scratch_bytes + n * plan.itemsize)
                arrays.append(sbytes[scratch_bytes:scratch_bytes + n * plan.itemsize].view(dtype))
                continue
            a = given.get(name)
            if a is None:
                if n:
                    raise CollectiveValueError(f"{where}: no {name} buffer; this rank's needs {n} elements")
                a = np.empty(0, dtype)
            if a.ndim != 1 or a.size != n or not a.flags.c_contiguous:
                raise CollectiveValueError(f"{where}: {name} buffer of shape {a.shape} ({a.dtype}); the plan needs "
                                           f"{n} contiguous elements in one dimension")
            arrays.append(a)
        return arrays

    def _run_buffers(self, plan: Plan, given: Any, ufunc: Callable[..., Any] | None, seq: int) -> None:
        """:meth:`run` for a plan of several buffers: the same loop, each range in its own buffer."""
        arrays = self._arrays(plan, given)
        if not plan.steps:
            return
        be = self.backend
        isend, irecv, wait, waitall = be.isend, be.irecv, be.wait, be.waitall
        raw = [a.view(np.uint8) for a in arrays]
        scratch = _NO_SCRATCH
        reduce = no_reduction if ufunc is None else ufunc
        if plan.scratch_elems:
            scratch = self.scratch(plan.scratch_elems * plan.itemsize)[: plan.scratch_elems * plan.itemsize]
            scratch = scratch.view(arrays[0].dtype)
        base = (seq & ((1 << self.seq_bits) - 1)) << self.counter_bits
        reqs: list[Any] = []
        rreqs: list[Any] = []
        try:
            for i, st in enumerate(plan.steps):
                self.current = (plan, i)
                for sb, a, b, db, c in st.copies:
                    raw[db][c:c + (b - a)] = raw[sb][a:b]
                reqs, rreqs = [], []  # loops, as in _run_work: every posted request stays reachable
                for (peer, a, b, tag), bi in zip(st.recv_copy, st.recv_copy_bufs):
                    reqs.append(irecv(raw[bi][a:b], peer, base | tag))
                for peer, a, b, o, tag in st.recv_reduce:
                    rreqs.append(irecv(scratch[o:o + (b - a)].view(np.uint8), peer, base | tag))
                for (peer, a, b, tag), bi in zip(st.sends, st.send_bufs):
                    reqs.append(isend(raw[bi][a:b], peer, base | tag))
                for r, (peer, a, b, o, tag), bi in zip(rreqs, st.recv_reduce, st.recv_reduce_bufs):
                    wait(r)
                    dst = arrays[bi][a:b]
                    reduce(dst, scratch[o:o + (b - a)], out=dst)
                if reqs:
                    waitall(reqs)
        except BaseException:
            be.abandon(reqs + rreqs)
            raise
        self.current = None
