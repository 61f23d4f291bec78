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

A Schedule is pure data: ``steps[rank]`` is that rank's tuple of Steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "COLLECTIVES",
    "Send",
    "Recv",
    "Step",
    "Schedule",
    "ScheduleError",
    "ScheduleStats",
    "even_blocks",
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


class ScheduleError(ValueError):
    """A Schedule is malformed, deadlocks, or computes the wrong result."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``buffer[start:stop]`` to ``peer``."""

    peer: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Recv:
    """Receive ``stop - start`` elements from ``peer`` into ``buffer[start:stop]``.

    ``reduce=True`` combines them with the op (``buf = op(buf, incoming)``);
    ``reduce=False`` overwrites the range.
    """

    peer: int
    start: int
    stop: int
    reduce: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    """Sends and receives a rank posts together; see the module docstring."""

    sends: tuple[Send, ...] = ()
    recvs: tuple[Recv, ...] = ()


@dataclass(frozen=True)
class Schedule:
    """One collective, for every rank, as data.

    Attributes:
        collective: one of ``COLLECTIVES``.
        algorithm: the builder's name ("ring", "tree", ...), for messages.
        nranks: number of ranks P.
        nelems: elements in each rank's work buffer.
        root: the root rank for reduce/broadcast (and the internal root of
            rooted algorithms), or 0.
        blocks: P+1 offsets delimiting block r = [blocks[r], blocks[r+1]).
        steps: ``steps[rank]`` is that rank's Steps in order.
    """

    collective: str
    algorithm: str
    nranks: int
    nelems: int
    root: int
    blocks: tuple[int, ...]
    steps: tuple[tuple[Step, ...], ...]

    def __post_init__(self) -> None:
        if self.collective not in COLLECTIVES:
            raise ScheduleError(f"unknown collective {self.collective!r}")
        if len(self.steps) != self.nranks:
            raise ScheduleError(f"{self.algorithm} {self.collective}: steps for {len(self.steps)} ranks, expected {self.nranks}")
        if len(self.blocks) != self.nranks + 1 or self.blocks[0] != 0 or self.blocks[-1] != self.nelems:
            raise ScheduleError(f"{self.algorithm} {self.collective}: blocks {self.blocks} do not split {self.nelems} elements in {self.nranks}")


def even_blocks(nelems: int, nranks: int) -> tuple[int, ...]:
    """Offsets splitting ``nelems`` into ``nranks`` blocks; the first ``nelems % nranks`` get one more."""
    base, extra = divmod(nelems, nranks)
    offsets = [0]
    for r in range(nranks):
        offsets.append(offsets[-1] + base + (1 if r < extra else 0))
    return tuple(offsets)


def _check_step(sched: Schedule, rank: int, index: int, step: Step) -> None:
    where = f"{sched.algorithm} {sched.collective} P={sched.nranks} n={sched.nelems}: rank {rank} step {index}"
    for t in (*step.sends, *step.recvs):
        if not 0 <= t.peer < sched.nranks or t.peer == rank:
            raise ScheduleError(f"{where}: bad peer {t.peer}")
        if not 0 <= t.start < t.stop <= sched.nelems:
            raise ScheduleError(f"{where}: bad or empty range [{t.start}, {t.stop})")
    for s in step.sends:
        for r in step.recvs:
            if s.start < r.stop and r.start < s.stop:
                raise ScheduleError(f"{where}: send [{s.start},{s.stop}) overlaps receive [{r.start},{r.stop})")
    for i, a in enumerate(step.recvs):
        for b in step.recvs[i + 1:]:
            if (not a.reduce or not b.reduce) and a.start < b.stop and b.start < a.stop:
                raise ScheduleError(f"{where}: copy receive overlaps another receive")


def simulate(
    sched: Schedule,
    buffers: Sequence[np.ndarray],
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.add,
) -> list[np.ndarray]:
    """Run ``sched`` on in-memory buffers, one per rank, and return the final buffers.

    Each rank advances through its steps as soon as the messages its current
    step receives have been posted, exactly the dependency the executor has.
    Raises ScheduleError on a malformed step, a size mismatch between a send
    and its receive, a deadlock, or messages left unreceived.
    """
    P = sched.nranks
    if len(buffers) != P:
        raise ScheduleError(f"simulate: {len(buffers)} buffers for {P} ranks")
    bufs = [np.array(b, copy=True).reshape(-1) for b in buffers]
    for b in bufs:
        if b.size != sched.nelems:
            raise ScheduleError(f"simulate: buffer of {b.size} elements, schedule has {sched.nelems}")
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
            if not posted[r]:
                for s in step.sends:
                    channels.setdefault((r, s.peer), []).append(bufs[r][s.start:s.stop].copy())
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
                if rv.reduce:
                    bufs[r][rv.start:rv.stop] = reduce(bufs[r][rv.start:rv.stop], msg)
                else:
                    bufs[r][rv.start:rv.stop] = msg
            ptr[r] += 1
            posted[r] = False
            progress = True
        if all(ptr[r] >= len(sched.steps[r]) for r in range(P)):
            break
        if not progress:
            stuck = {r: ptr[r] for r in range(P) if ptr[r] < len(sched.steps[r])}
            raise ScheduleError(f"{sched.algorithm} {sched.collective} P={P} n={sched.nelems}: deadlock; rank: step = {stuck}")
    left = {k: len(v) for k, v in channels.items() if v}
    if left:
        raise ScheduleError(f"{sched.algorithm} {sched.collective} P={P} n={sched.nelems}: unreceived messages {left}")
    return bufs


def expected(
    sched: Schedule,
    inputs: Sequence[np.ndarray],
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.add,
) -> list[np.ndarray | None]:
    """What each rank's work buffer must hold after ``sched`` on ``inputs``.

    Elements the collective leaves unspecified are returned as None (a whole
    rank) or checked only on the ranges that matter by :func:`verify`.
    """
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


def verify(sched: Schedule, seed: int = 0) -> None:
    """Simulate ``sched`` on random small-integer inputs and check the result exactly.

    Unspecified elements (non-root ranks of reduce, other ranks' blocks of
    reduce_scatter, non-root inputs of broadcast, other blocks of allgather)
    are filled with a poison value so a schedule that relies on them fails.
    """
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
    sent it data have started.
    """

    steps: tuple[int, ...]
    elems_sent: tuple[int, ...]
    elems_received: tuple[int, ...]
    elems_reduced: tuple[int, ...]
    messages_sent: tuple[int, ...]
    rounds: int
    extra: dict = field(default_factory=dict)


def stats(sched: Schedule) -> ScheduleStats:
    """Count steps, elements and messages per rank, and the critical path, of ``sched``."""
    P = sched.nranks
    sent = [0] * P
    recvd = [0] * P
    reduced = [0] * P
    msgs = [0] * P
    for r in range(P):
        for step in sched.steps[r]:
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
            done_at[r] = t + 1
            ptr[r] += 1
            remaining -= 1
            progress = True
        if not progress:
            raise ScheduleError(f"{sched.algorithm} {sched.collective}: deadlock while counting rounds")
    return ScheduleStats(tuple(len(s) for s in sched.steps), tuple(sent), tuple(recvd), tuple(reduced), tuple(msgs), max(done_at, default=0))
