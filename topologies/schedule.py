"""The Schedule data type, the in-memory simulator that proves a Schedule correct, and its step/byte counts.

Terms used throughout `topologies/` (the builders' variable names follow them):

* **work buffer** -- each rank owns one flat buffer of ``nelems`` elements. A
  collective is a sequence of steps that move element ranges of these buffers
  between ranks. What the buffer holds before and after depends on the
  collective (see ``COLLECTIVES``).
* **block** -- ``blocks`` is a tuple of ``nranks + 1`` offsets; block ``r`` is
  ``[blocks[r], blocks[r+1])``. reduce_scatter leaves block ``r`` reduced on
  rank ``r``; allgather starts with block ``r`` filled on rank ``r``. Ring
  algorithms also use the blocks as their chunks.
* **step** -- a set of sends and receives a rank posts together. Sends read the
  buffer as it was when the step began; receives land when the step ends,
  either copied over the range (``reduce=False``) or combined into it with the
  reduction op (``reduce=True``), in the order they are listed. Within a step a
  send never overlaps a receive, and copy receives never overlap anything.
* **channel** -- messages from rank ``a`` to rank ``b`` match in order: the k-th
  send ``a -> b`` is the k-th receive ``b <- a``, whatever steps they sit in.
  The executor turns k into the MPI tag, so matching never depends on timing.
* **buffer** -- the collectives of ``COLLECTIVES`` use the work buffer alone
  (``"work"``). Those of ``IN_OUT_COLLECTIVES`` (alltoall, gather, scatter,
  allgatherv) read an ``"input"`` buffer, which no step may write, and fill an
  ``"output"`` buffer laid out differently; a rank may also use a private
  ``"temp"`` buffer (the executor provides it). Each range names its buffer
  (``buf``), and ``Schedule.extents`` gives every buffer's size on every rank,
  which may differ from rank to rank.
* **copy** -- a local copy between ranges of a rank's buffers (``Step.copies``).
  A step's copies run first, in order, before its receives and sends are
  posted, so its sends read what they wrote. A step with copies alone is local
  work: it takes no round.

A Schedule is pure data: ``steps[rank]`` is that rank's tuple of Steps.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from types import MappingProxyType

import numpy as np

__all__ = [
    "COLLECTIVES",
    "IN_OUT_COLLECTIVES",
    "BUFFERS",
    "WORK",
    "INPUT",
    "OUTPUT",
    "TEMP",
    "Send",
    "Recv",
    "Copy",
    "Step",
    "Schedule",
    "ScheduleError",
    "ScheduleStats",
    "even_blocks",
    "offsets",
    "alltoall_displacements",
    "even_counts",
    "simulate",
    "expected",
    "verify",
    "stats",
]

#: Collective -> (what the work buffers hold before, what they must hold after).
COLLECTIVES: dict[str, tuple[str, str]] = {
    "allreduce": ("every rank: its input", "every rank: the reduction of all inputs"),
    "reduce": ("every rank: its input", "root: the reduction of all inputs"),
    "broadcast": ("root: the data", "every rank: root's data"),
    "reduce_scatter": ("every rank: its input", "rank r, block r: that block's reduction"),
    "allgather": ("rank r, block r: its contribution", "every rank: every block"),
}

#: Collectives with an input and an output buffer -> (input of each rank, output of each rank).
#: ``blocks`` are the rank blocks of the concatenation of every rank's input: rank r contributes
#: block r (for scatter, the root's input is that concatenation). alltoall's ``counts[i][j]``
#: is what rank i sends rank j: rank i's input holds its blocks for ranks 0..P-1 in order, rank
#: j's output the blocks from ranks 0..P-1 in order.
IN_OUT_COLLECTIVES: dict[str, tuple[str, str]] = {
    "alltoall": ("rank i: counts[i][j] elements for each rank j", "rank j: counts[i][j] elements from each rank i"),
    "gather": ("rank r: block r", "root: every block; others: nothing"),
    "scatter": ("root: every block; others: nothing", "rank r: block r"),
    "allgatherv": ("rank r: block r", "every rank: every block"),
}

WORK, INPUT, OUTPUT, TEMP = "work", "input", "output", "temp"
#: The buffers a range may name; see the module docstring.
BUFFERS: tuple[str, ...] = (WORK, INPUT, OUTPUT, TEMP)


class ScheduleError(ValueError):
    """A Schedule is malformed, deadlocks, or computes the wrong result."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``buf[start:stop]`` to ``peer``."""

    peer: int
    start: int
    stop: int
    buf: str = WORK


@dataclass(frozen=True, slots=True)
class Recv:
    """Receive ``stop - start`` elements from ``peer`` into ``buf[start:stop]``.

    ``reduce=True`` combines them with the op (``buf = op(buf, incoming)``);
    ``reduce=False`` overwrites the range.
    """

    peer: int
    start: int
    stop: int
    reduce: bool = False
    buf: str = WORK


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy ``src[start:stop]`` to ``dst[dst_start:dst_start + stop - start]`` on the same rank."""

    src: str
    start: int
    stop: int
    dst: str
    dst_start: int

    @property
    def dst_stop(self) -> int:
        """End of the destination range."""
        return self.dst_start + self.stop - self.start


@dataclass(frozen=True, slots=True)
class Step:
    """Copies, then sends and receives a rank posts together; see the module docstring."""

    sends: tuple[Send, ...] = ()
    recvs: tuple[Recv, ...] = ()
    copies: tuple[Copy, ...] = ()


@dataclass(frozen=True)
class Schedule:
    """One collective, for every rank, as data.

    Attributes:
        collective: one of ``COLLECTIVES`` or ``IN_OUT_COLLECTIVES``.
        algorithm: the builder's name ("ring", "tree", ...), for messages.
        nranks: number of ranks P.
        nelems: elements in each rank's work buffer; for ``IN_OUT_COLLECTIVES``
            the elements of all ranks' inputs together.
        root: the root rank for reduce/broadcast/gather/scatter (and the
            internal root of rooted algorithms), or 0.
        blocks: P+1 offsets delimiting block r = [blocks[r], blocks[r+1]).
        steps: ``steps[rank]`` is that rank's Steps in order.
        counts: alltoall only: ``counts[i][j]`` elements go from rank i to rank j.
        extents: buffer name -> its elements on each rank. None (the default)
            means the work buffer alone, ``nelems`` on every rank.
    """

    collective: str
    algorithm: str
    nranks: int
    nelems: int
    root: int
    blocks: tuple[int, ...]
    steps: tuple[tuple[Step, ...], ...]
    counts: tuple[tuple[int, ...], ...] | None = None
    extents: Mapping[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.collective not in COLLECTIVES and self.collective not in IN_OUT_COLLECTIVES:
            raise ScheduleError(f"unknown collective {self.collective!r}")
        if len(self.steps) != self.nranks:
            raise ScheduleError(
                f"{self.algorithm} {self.collective}: steps for {len(self.steps)} ranks, expected {self.nranks}")
        if len(self.blocks) != self.nranks + 1 or self.blocks[0] != 0 or self.blocks[-1] != self.nelems:
            raise ScheduleError(f"{self.algorithm} {self.collective}: blocks {self.blocks} do not split "
                                f"{self.nelems} elements in {self.nranks}")
        ext = {WORK: (self.nelems,) * self.nranks} if self.extents is None else dict(self.extents)
        for name, sizes in ext.items():
            if name not in BUFFERS or len(sizes) != self.nranks or any(n < 0 for n in sizes):
                raise ScheduleError(f"{self.algorithm} {self.collective}: bad extents {name!r}: {sizes}")
        if self.counts is not None and self.blocks != offsets([sum(row) for row in self.counts]):
            raise ScheduleError(f"{self.algorithm} {self.collective}: blocks {self.blocks} are not the running sums "
                                f"of the rows of counts")
        object.__setattr__(self, "extents", MappingProxyType(ext))

    def __hash__(self) -> int:  # extents is a read-only mapping; the other fields determine it
        return hash((self.collective, self.algorithm, self.nranks, self.nelems, self.root, self.blocks, self.steps,
                     self.counts))

    def extent(self, buf: str, rank: int) -> int:
        """Elements of buffer ``buf`` on ``rank`` (0 for a buffer the schedule does not use)."""
        sizes = self.extents.get(buf)  # type: ignore[union-attr]
        return 0 if sizes is None else sizes[rank]

    @property
    def buffers(self) -> tuple[str, ...]:
        """The buffers this schedule uses, in ``BUFFERS`` order."""
        return tuple(b for b in BUFFERS if b in self.extents)  # type: ignore[operator]


def even_blocks(nelems: int, nranks: int) -> tuple[int, ...]:
    """Offsets splitting ``nelems`` into ``nranks`` blocks; the first ``nelems % nranks`` get one more."""
    base, extra = divmod(nelems, nranks)
    offsets = [0]
    for r in range(nranks):
        offsets.append(offsets[-1] + base + (1 if r < extra else 0))
    return tuple(offsets)


def offsets(sizes: Sequence[int]) -> tuple[int, ...]:
    """Running offsets of ``sizes``: ``(0, sizes[0], sizes[0] + sizes[1], ...)``, one more entry than ``sizes``."""
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return tuple(out)


def _check_step(sched: Schedule, rank: int, index: int, step: Step) -> None:
    where = f"{sched.algorithm} {sched.collective} P={sched.nranks} n={sched.nelems}: rank {rank} step {index}"

    def in_range(buf: str, start: int, stop: int) -> None:
        if buf not in sched.extents:  # type: ignore[operator]
            raise ScheduleError(f"{where}: buffer {buf!r} is not one of the schedule's {sched.buffers}")
        if not 0 <= start < stop <= sched.extent(buf, rank):
            raise ScheduleError(f"{where}: bad or empty range [{start}, {stop}) of {buf}")

    transfers: tuple[Send | Recv, ...] = (*step.sends, *step.recvs)
    for t in transfers:
        if not 0 <= t.peer < sched.nranks or t.peer == rank:
            raise ScheduleError(f"{where}: bad peer {t.peer}")
        in_range(t.buf, t.start, t.stop)
    for c in step.copies:
        in_range(c.src, c.start, c.stop)
        in_range(c.dst, c.dst_start, c.dst_stop)
        if c.src == c.dst and c.start < c.dst_stop and c.dst_start < c.stop:
            raise ScheduleError(f"{where}: copy [{c.start},{c.stop}) onto itself in {c.src}")
    for w in (*(r.buf for r in step.recvs), *(c.dst for c in step.copies)):
        if w == INPUT:
            raise ScheduleError(f"{where}: writes the input buffer, which is read-only")
    for s in step.sends:
        for r in step.recvs:
            if s.buf == r.buf and s.start < r.stop and r.start < s.stop:
                raise ScheduleError(f"{where}: send [{s.start},{s.stop}) overlaps receive [{r.start},{r.stop})")
    for i, a in enumerate(step.recvs):
        for b in step.recvs[i + 1:]:
            if a.buf == b.buf and (not a.reduce or not b.reduce) and a.start < b.stop and b.start < a.stop:
                raise ScheduleError(f"{where}: copy receive overlaps another receive")
        for c in step.copies:
            if a.buf == c.dst and a.start < c.dst_stop and c.dst_start < a.stop:
                raise ScheduleError(f"{where}: copy into [{c.dst_start},{c.dst_stop}) overlaps a receive")


def simulate(
    sched: Schedule,
    buffers: Sequence[np.ndarray | Mapping[str, np.ndarray]],
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.add,
) -> list:
    """Run ``sched`` on in-memory buffers, one per rank, and return the final buffers.

    Each rank advances through its steps as soon as the messages its current
    step receives have been posted, exactly the dependency the executor has.
    Raises ScheduleError on a malformed step, a size mismatch between a send
    and its receive, a deadlock, or messages left unreceived.

    Args:
        sched: the Schedule.
        buffers: one work buffer per rank; or, for a schedule with several
            buffers, one mapping per rank from buffer name to array. A buffer
            left out starts as zeros of the dtype of the first one given (the
            ``"temp"`` buffer, or one of zero elements on this rank).
        reduce: the reduction op of ``reduce`` receives.

    Returns:
        The final work buffers; with mappings given, one dict per rank of
        every buffer of the schedule.
    """
    P = sched.nranks
    if len(buffers) != P:
        raise ScheduleError(f"simulate: {len(buffers)} buffers for {P} ranks")
    mapped = any(isinstance(b, Mapping) for b in buffers)
    bufs: list[dict[str, np.ndarray]] = []
    for r, arg in enumerate(buffers):
        given: dict[str, np.ndarray] = dict(arg) if isinstance(arg, Mapping) else {WORK: arg}
        dtype = next(iter(given.values())).dtype if given else np.dtype(np.int64)
        mine = {}
        for name in sched.buffers:
            if name in given:
                mine[name] = np.array(given[name], copy=True).reshape(-1)
            else:
                mine[name] = np.zeros(sched.extent(name, r), dtype)
            if mine[name].size != sched.extent(name, r):
                raise ScheduleError(f"simulate: rank {r} buffer {name!r} of {mine[name].size} elements, "
                                    f"schedule has {sched.extent(name, r)}")
        bufs.append(mine)
    for r in range(P):
        for i, step in enumerate(sched.steps[r]):
            _check_step(sched, r, i, step)
    channels: dict[tuple[int, int], list[np.ndarray]] = {}
    ptr = [0] * P
    posted = [False] * P
    while True:
        progress = False
        for r in range(P):
            if ptr[r] >= len(sched.steps[r]):
                continue
            step = sched.steps[r][ptr[r]]
            b = bufs[r]
            if not posted[r]:
                for c in step.copies:
                    b[c.dst][c.dst_start:c.dst_stop] = b[c.src][c.start:c.stop]
                for s in step.sends:
                    channels.setdefault((r, s.peer), []).append(b[s.buf][s.start:s.stop].copy())
                posted[r] = True
                progress = True
            need: dict[int, int] = {}
            for rv in step.recvs:
                need[rv.peer] = need.get(rv.peer, 0) + 1
            if any(len(channels.get((p, r), ())) < k for p, k in need.items()):
                continue
            for rv in step.recvs:
                msg = channels[(rv.peer, r)].pop(0)
                if msg.size != rv.stop - rv.start:
                    raise ScheduleError(
                        f"{sched.algorithm} {sched.collective} P={P} n={sched.nelems}: rank {r} step {ptr[r]} "
                        f"receives {rv.stop - rv.start} elements from {rv.peer}, which sent {msg.size}"
                    )
                dst = b[rv.buf]
                if rv.reduce:
                    dst[rv.start:rv.stop] = reduce(dst[rv.start:rv.stop], msg)
                else:
                    dst[rv.start:rv.stop] = msg
            ptr[r] += 1
            posted[r] = False
            progress = True
        if all(ptr[r] >= len(sched.steps[r]) for r in range(P)):
            break
        if not progress:
            stuck = {r: ptr[r] for r in range(P) if ptr[r] < len(sched.steps[r])}
            raise ScheduleError(
                f"{sched.algorithm} {sched.collective} P={P} n={sched.nelems}: deadlock; rank: step = {stuck}")
    left = {k: len(v) for k, v in channels.items() if v}
    if left:
        raise ScheduleError(f"{sched.algorithm} {sched.collective} P={P} n={sched.nelems}: unreceived messages {left}")
    return bufs if mapped else [b[WORK] for b in bufs]


def expected(
    sched: Schedule,
    inputs: Sequence[np.ndarray],
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.add,
) -> list[np.ndarray | None]:
    """What each rank's work buffer must hold after ``sched`` on ``inputs``.

    Elements the collective leaves unspecified are returned as None (a whole
    rank) or checked only on the ranges that matter by :func:`verify`. For
    ``IN_OUT_COLLECTIVES``, ``inputs`` are the ranks' input buffers and the
    result their output buffers.
    """
    if sched.collective in IN_OUT_COLLECTIVES:
        return list(_expected_outputs(sched, inputs))
    P, root = sched.nranks, sched.root
    total = inputs[0].copy()
    for x in inputs[1:]:
        total = reduce(total, x)
    c = sched.collective
    if c == "allreduce":
        return [total.copy() for _ in range(P)]
    if c == "reduce":
        return [total.copy() if r == root else None for r in range(P)]
    if c == "broadcast":
        return [inputs[root].copy() for _ in range(P)]
    if c == "reduce_scatter":
        return [total.copy() for _ in range(P)]  # only block r is checked
    if c == "allgather":
        full = np.empty_like(inputs[0])
        for r in range(P):
            a, b = sched.blocks[r], sched.blocks[r + 1]
            full[a:b] = inputs[r][a:b]
        return [full.copy() for _ in range(P)]
    raise ScheduleError(f"unknown collective {c!r}")


def even_counts(blocks: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """alltoall counts where rank i's input, block i of ``blocks``, is cut evenly (``even_blocks``) among the ranks."""
    P = len(blocks) - 1
    return tuple(tuple(b - a for a, b in pairwise(even_blocks(blocks[i + 1] - blocks[i], P))) for i in range(P))


def alltoall_displacements(counts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Where each block sits: ``send[i][j]``: the offset of i's block for j in i's input; ``recv[j][i]``: in j's output.

    Each has P+1 entries per rank (the last is the buffer's size).
    """
    P = len(counts)
    send = [offsets(counts[i]) for i in range(P)]
    recv = [offsets([counts[i][j] for i in range(P)]) for j in range(P)]
    return send, recv


def _expected_outputs(sched: Schedule, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    P, c, blocks = sched.nranks, sched.collective, sched.blocks
    if c == "alltoall":
        assert sched.counts is not None
        send, _ = alltoall_displacements(sched.counts)
        return [np.concatenate([inputs[i][send[i][j]:send[i][j + 1]] for i in range(P)]) for j in range(P)]
    if c == "scatter":
        full = inputs[sched.root]
        return [full[blocks[r]:blocks[r + 1]].copy() for r in range(P)]
    full = np.concatenate([np.asarray(x).reshape(-1) for x in inputs])
    if c == "gather":
        return [full if r == sched.root else full[:0] for r in range(P)]
    return [full.copy() for _ in range(P)]  # allgatherv


def _verify_in_out(sched: Schedule, seed: int) -> None:
    """verify() for IN_OUT_COLLECTIVES: distinct input values, poisoned output and temp buffers."""
    rng = np.random.default_rng(seed)
    P = sched.nranks
    poison = -(10**12)
    inputs = [rng.integers(-10**9, 10**9, size=sched.extent(INPUT, r)).astype(np.int64) for r in range(P)]
    start = [
        {name: inputs[r].copy() if name == INPUT else np.full(sched.extent(name, r), poison, np.int64)
         for name in sched.buffers}
        for r in range(P)
    ]
    out = simulate(sched, start)
    want = _expected_outputs(sched, inputs)
    for r in range(P):
        got, w = out[r][OUTPUT], want[r]
        if got.shape != w.shape or not np.array_equal(got, w):
            bad = int(np.flatnonzero(got != w)[0]) if got.shape == w.shape else -1
            raise ScheduleError(
                f"{sched.algorithm} {sched.collective} P={P} n={sched.nelems} root={sched.root}: rank {r} output "
                + (f"element {bad} is {got[bad]}, expected {w[bad]}" if bad >= 0 else
                   f"has {got.size} elements, expected {w.size}")
            )
        if not np.array_equal(out[r][INPUT], inputs[r]):
            raise ScheduleError(f"{sched.algorithm} {sched.collective} P={P}: rank {r} input was changed")


def verify(sched: Schedule, seed: int = 0) -> None:
    """Simulate ``sched`` on random small-integer inputs and check the result exactly.

    Unspecified elements (non-root ranks of reduce, other ranks' blocks of
    reduce_scatter, non-root inputs of broadcast, other blocks of allgather)
    are filled with a poison value so a schedule that relies on them fails.
    For ``IN_OUT_COLLECTIVES`` every input element is distinct and the output
    and temp buffers start poisoned, so a block in the wrong place fails too.
    """
    if sched.collective in IN_OUT_COLLECTIVES:
        _verify_in_out(sched, seed)
        return
    rng = np.random.default_rng(seed)
    P, n = sched.nranks, sched.nelems
    inputs = [rng.integers(-8, 9, size=n).astype(np.int64) for _ in range(P)]
    start = [x.copy() for x in inputs]
    if sched.collective == "broadcast":
        for r in range(P):
            if r != sched.root:
                start[r][:] = -10**9
    if sched.collective == "allgather":
        for r in range(P):
            a, b = sched.blocks[r], sched.blocks[r + 1]
            keep = start[r][a:b].copy()
            start[r][:] = -10**9
            start[r][a:b] = keep
    out = simulate(sched, start)
    want = expected(sched, inputs)
    for r in range(P):
        w = want[r]
        if w is None:
            continue
        got = out[r]
        if sched.collective == "reduce_scatter":
            a, b = sched.blocks[r], sched.blocks[r + 1]
            got, w = got[a:b], w[a:b]
        if not np.array_equal(got, w):
            bad = int(np.flatnonzero(got != w)[0])
            raise ScheduleError(
                f"{sched.algorithm} {sched.collective} P={P} n={n} root={sched.root}: rank {r} "
                f"element {bad} is {got[bad]}, expected {w[bad]}"
            )


@dataclass(frozen=True)
class ScheduleStats:
    """Counts for one Schedule, per rank, plus the critical path in rounds.

    ``rounds`` is the number of dependent steps on the longest chain: a step
    completes one round after both its own previous step and the steps that
    sent it data have started. A step of copies alone takes no round;
    ``elems_copied`` counts the elements of local copies.
    """

    steps: tuple[int, ...]
    elems_sent: tuple[int, ...]
    elems_received: tuple[int, ...]
    elems_reduced: tuple[int, ...]
    messages_sent: tuple[int, ...]
    rounds: int
    extra: dict = field(default_factory=dict)
    elems_copied: tuple[int, ...] = ()


def stats(sched: Schedule) -> ScheduleStats:
    """Count steps, elements and messages per rank, and the critical path, of ``sched``."""
    P = sched.nranks
    sent = [0] * P
    recvd = [0] * P
    reduced = [0] * P
    msgs = [0] * P
    copied = [0] * P
    for r in range(P):
        for step in sched.steps[r]:
            for c in step.copies:
                copied[r] += c.stop - c.start
            for s in step.sends:
                sent[r] += s.stop - s.start
                msgs[r] += 1
            for rv in step.recvs:
                recvd[r] += rv.stop - rv.start
                if rv.reduce:
                    reduced[r] += rv.stop - rv.start
    # Critical path: replay with logical time, matching channels in order.
    start_time: dict[tuple[int, int], int] = {}
    send_start: dict[tuple[int, int], list[int]] = {}
    ptr = [0] * P
    done_at = [0] * P
    consumed: dict[tuple[int, int], int] = {}
    remaining = sum(len(s) for s in sched.steps)
    while remaining:
        progress = False
        for r in range(P):
            i = ptr[r]
            if i >= len(sched.steps[r]):
                continue
            step = sched.steps[r][i]
            if (r, i) not in start_time:
                start_time[(r, i)] = done_at[r]
                for s in step.sends:
                    send_start.setdefault((r, s.peer), []).append(done_at[r])
            need: dict[int, int] = {}
            for rv in step.recvs:
                need[rv.peer] = need.get(rv.peer, 0) + 1
            if any(len(send_start.get((p, r), ())) - consumed.get((p, r), 0) < k for p, k in need.items()):
                continue
            t = start_time[(r, i)]
            for rv in step.recvs:
                k = consumed.get((rv.peer, r), 0)
                t = max(t, send_start[(rv.peer, r)][k])
                consumed[(rv.peer, r)] = k + 1
            done_at[r] = t + 1 if step.sends or step.recvs else t  # copies alone are local: no round
            ptr[r] += 1
            remaining -= 1
            progress = True
        if not progress:
            raise ScheduleError(f"{sched.algorithm} {sched.collective}: deadlock while counting rounds")
    return ScheduleStats(tuple(len(s) for s in sched.steps), tuple(sent), tuple(recvd), tuple(reduced), tuple(msgs),
                         max(done_at, default=0), {}, tuple(copied))
