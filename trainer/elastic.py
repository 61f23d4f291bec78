"""Elastic training state: an in-memory commit every step, and the recovery that rolls every survivor back to it.

Terms. A *commit* records that the parameters and optimizer state in memory
are those after ``step`` steps. It copies nothing: the optimizer double
buffers (``Optimizer.double_buffer``), so the state of the last finished step
and of the one before it are both in memory, each labelled with its optimizer
step. A *failure* is a lost rank, seen by every survivor as
``collective.errors.RanksLostError`` from the pending or the next collective.

Why two steps are enough. Completion is uneven: when a rank dies inside step
``s``'s reductions, a survivor may have received every bucket and finished
step ``s`` (committed ``s``) while another failed inside it (committed
``s - 1``). Nobody can be further ahead: step ``s + 1``'s first bucket needs
the dead rank's contribution. And a rank overwrites the state of ``s - 1``
only in ``s + 1``'s updates, after that first bucket was reduced, i.e. after
every rank had committed ``s``. So the survivors' commits differ by at most
one step, and each holds both.

*Recovery* (:meth:`ElasticState.recover`), on every survivor: shrink the
communicator to the survivors; agree on the smallest committed step (one
min-allreduce); make that step's buffers current; rebuild the gradient
buckets over the new communicator (its shared windows); take the new rank's
share of each global batch (:meth:`ShardedLoader.reshard`), so the global
batch and the sample order are exactly those of an uninterrupted run; and go
on from the agreed step. The lowest surviving rank is the new rank 0 and
takes over its duties (progress bar, checkpoints, saved parameters). Below
``min_ranks`` the job stops (:class:`ElasticStop`) after that rank has written
the agreed commit to disk. With ``max_ranks``, replacements
(``comm.grow``) join at the next commit and receive the state by broadcast.

The recovery itself (:class:`ElasticCore`) is shared with the torch wrapper's
state, ``trainer.torch_elastic.TorchElasticState``, which commits by copying.

Test hook: ``COLLECTIVE_ELASTIC_TEST_KILL="RANK:STEP:POINT[,...]"`` makes the
rank whose original (world) rank is RANK SIGKILL itself in step STEP at POINT:
``forward``, ``allreduce`` (just after bucket 0's reduction was launched), ``shm``
(while bucket 0's reduction runs on the communication thread, as the flight
recorder shows it: inside the shm phases when the buckets live in the node's
shared window), ``late-allreduce`` (the last bucket's), ``update`` (between two
buckets' optimizer updates), ``commit`` (inside the commit), ``checkpoint``
(while rank 0 writes one) or ``finish`` (STEP being the last: just before the
agreement that ends training).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from collective import config
from collective.errors import RanksLostError

from .checkpoint import Checkpointer
from .data import ShardedLoader
from .loop import DataParallel, checkpoint_meta
from .optim import Optimizer

__all__ = ["ElasticCore", "ElasticState", "ElasticStop", "Recovery", "broadcast_extra", "kill_point",
           "lost_rank_errors"]

KILL_POINTS = ("forward", "allreduce", "shm", "late-allreduce", "update", "commit", "checkpoint", "finish")


class ElasticStop(RuntimeError):
    """Fewer ranks are left than the job's minimum: training stopped; the message names the commit on disk."""

    def __init__(self, message: str, step: int, path: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.path = path


def lost_rank_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "a rank is gone" (``collective.RanksLostError``), for ``except``."""
    return (RanksLostError,)


@dataclass
class Recovery:
    """One recovery from lost ranks (times in seconds, ``time.monotonic()``).

    Attributes:
        lost: world ranks lost (as the error named them).
        op: the operation that failed.
        size_before, size_after: ranks before and after.
        failed_step: the step that was under way.
        step: the step training went on from (the agreed commit).
        t_error: when this rank caught the error.
        parts: seconds spent in each part: ``shrink`` (and its own parts from
            ``comm.recovery_times``), ``agree``, ``rebuild`` (buckets and shared
            windows), ``restore`` (buffers and state broadcast).
        t_resumed: when the next step started (set by the loop).
    """

    lost: list[int]
    op: str
    size_before: int
    size_after: int
    failed_step: int
    step: int
    t_error: float
    parts: dict[str, float] = field(default_factory=dict)
    t_resumed: float | None = None

    def describe(self) -> str:
        """One line for the log."""
        parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in self.parts.items())
        total = (f"; {1e3 * (self.t_resumed - self.t_error):.1f} ms from the error to the next step "
                 f"[monotonic {self.t_error:.6f} -> {self.t_resumed:.6f}]") if self.t_resumed is not None else ""
        return (f"elastic: lost rank(s) {self.lost} in {self.op} during step {self.failed_step + 1}; "
                f"{self.size_before} -> {self.size_after} ranks, going on from the commit of step {self.step} "
                f"({parts}{total})")


def _parse_kills(text: str | None) -> list[tuple[int, int, str]]:
    out = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        bits = item.split(":")
        if len(bits) != 3 or bits[2] not in KILL_POINTS:
            raise ValueError(f"COLLECTIVE_ELASTIC_TEST_KILL: {item!r} is not RANK:STEP:POINT with POINT one of "
                             f"{', '.join(KILL_POINTS)}")
        out.append((int(bits[0]), int(bits[1]), bits[2]))
    return out


def _world_rank(comm: Any) -> int:
    if comm is None:
        return 0
    wr = getattr(comm, "world_ranks", None)
    return int(wr[comm.rank]) if wr is not None else int(comm.rank)


def kill_point(comm: Any, step: int, point: str) -> None:
    """Test hook: SIGKILL this process if ``COLLECTIVE_ELASTIC_TEST_KILL`` names this rank, ``step`` and ``point``.

    Prints ``elastic-test: killing world rank R at step S point P t=T`` (T on
    ``time.monotonic()``, one clock for the machine) first, so a test can time
    the recovery from the kill.
    """
    if not _KILLS:
        return
    wr = _world_rank(comm)
    if (wr, int(step), point) not in _KILLS:
        return

    sys.stdout.write(f"elastic-test: killing world rank {wr} at step {step} point {point} t={time.monotonic():.6f}\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_flight(comm: Any, step: int, point: str, op: str = "allreduce", limit: float = 5.0) -> None:
    """Test hook: like :func:`kill_point`, from a thread that waits until an ``op`` is running on ``comm``.

    It watches the flight recorder for a record of ``op`` that has started
    and not ended (the collective is in flight on the communication thread),
    then kills; after ``limit`` seconds without one it kills anyway.
    """
    if not _KILLS or (_world_rank(comm), int(step), point) not in _KILLS:
        return
    seen = {id(r) for r in comm.trace()}

    def watch() -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if any(r.op == op and r.t_start and r.t_end is None and id(r) not in seen for r in comm.trace()):
                break
            time.sleep(0)
        kill_point(comm, step, point)

    threading.Thread(target=watch, daemon=True).start()


def _load_kills() -> set[tuple[int, int, str]]:
    return set(_parse_kills(config.raw("ELASTIC_TEST_KILL")))


_KILLS = _load_kills()


def broadcast_extra(comm: Any, extra: dict[str, Any], root: int = 0) -> None:
    """Collective: every rank's ``extra`` values take ``root``'s, in place of the dict, each keeping its kind.

    Arrays stay arrays (of their dtype), numbers stay numbers of their type
    (sent as float64), and anything else with a NumPy form comes back as a
    float64 array. Every rank must hold the same names.
    """
    for k in sorted(extra):
        v = extra[k]
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
        else:
            a = np.array(v, dtype=np.float64).reshape(-1)  # a number travels as one element
        flat = a.reshape(-1)
        comm.broadcast(flat, root=root, out=flat)
        if isinstance(v, np.ndarray):
            extra[k] = a
        elif np.ndim(v) == 0:
            extra[k] = type(v)(flat[0].item())
        else:
            extra[k] = a


class ElasticCore:
    """What every elastic state shares: the recovery protocol (shrink, agree on the smallest commit, restore,
    rebind, sync), the final agreement and the bookkeeping of recoveries.

    A subclass holds the commits and says how to restore one (:meth:`restore`),
    how to bind the model and data to a new communicator (``_bind``), how to
    broadcast the committed state (:meth:`sync`) and how to write it to disk
    (:meth:`save`); it sets ``_commits`` (a list whose entries start with the
    step, newest last) in its constructor after calling ``_init_core``.
    """

    _commits: list[Any]

    def _init_core(self, min_ranks: int | None, max_ranks: int | None, stop_dir: str | os.PathLike | None,
                   step: int, name: str) -> None:
        self.min_ranks = int(min_ranks if min_ranks is not None else config.get("MIN_RANKS"))
        mx = max_ranks if max_ranks is not None else config.get("MAX_RANKS")
        self.max_ranks = int(mx) if mx is not None else None
        if self.min_ranks < 1:
            raise ValueError(f"{name}: min_ranks={self.min_ranks} must be >= 1")
        if self.max_ranks is not None and self.max_ranks < self.min_ranks:
            raise ValueError(f"{name}: max_ranks={self.max_ranks} is below min_ranks={self.min_ranks}")
        self.stop_dir = Path(stop_dir) if stop_dir is not None else None
        self.recoveries: list[Recovery] = []
        self._grow_at: int | None = None
        self._shrunk: Any = None
        self._step = int(step)
        self._resumed: Recovery | None = None

    # ------------------------------------------------------------ what a subclass provides
    @property
    def comm(self) -> Any:
        """The communicator training runs on now."""
        raise NotImplementedError

    def restore(self, step: int) -> None:
        """Make the committed state of ``step`` current again."""
        raise NotImplementedError

    def sync(self, root: int = 0, params: bool = True, joining: bool = False) -> None:
        """Collective: every rank takes ``root``'s committed state (``joining``: this rank is a replacement)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Collective: rank 0 writes the newest commit to disk."""
        raise NotImplementedError

    def _bind(self, comm: Any, rebuild: bool) -> None:
        raise NotImplementedError

    def _default_stop_dir(self) -> Path:
        return Path("elastic-checkpoint")

    def _stop_hint(self, where: Path) -> str:
        return f" Resume with --checkpoint-dir {where} --resume"

    # ------------------------------------------------------------ recovery (shared)
    def recover(self, error: BaseException, failed_step: int | None = None) -> Recovery:
        """Collective over the survivors: shrink, agree on the last step every survivor committed, restore it, reshard.

        Args:
            error: the ``RanksLostError`` caught (names the lost ranks and the op).
            failed_step: the step that was under way (for the record).

        Returns:
            The :class:`Recovery`; training goes on from ``recovery.step``.

        Raises:
            ElasticStop: fewer than ``min_ranks`` ranks are left (after the
                commit was written to disk by the new rank 0).
        """
        errors = lost_rank_errors()
        while True:
            try:
                return self._recover_once(error, failed_step)
            except errors as again:  # another rank was lost during the recovery: recover from that one too
                error = again

    def _recover_once(self, error: BaseException, failed_step: int | None) -> Recovery:
        t_err = time.monotonic()
        # A loss during an earlier attempt leaves the communicator that attempt shrank to, not yet bound.
        old = self._shrunk if self._shrunk is not None else self.comm
        size_before = self.comm.size
        new = old.shrink()
        self._shrunk = new
        t1 = time.monotonic()
        parts: dict[str, float] = {"shrink": t1 - t_err}
        for k, v in (getattr(new, "recovery_times", None) or {}).items():
            if k in ("detect", "revoke", "agree", "shrink", "rebuild"):  # durations (not instants, not sums)
                parts[f"shrink.{k}"] = float(v)
        # Agree and restore before the buckets are rebuilt: the rebuild copies the current parameters, and the
        # state one step back lives only in the old buffers.
        step = self.agree_on(new)
        t2 = time.monotonic()
        parts["agree"] = t2 - t1
        self.restore(step)
        t3 = time.monotonic()
        self._bind(new, rebuild=True)
        t4 = time.monotonic()
        parts["rebuild"] = t4 - t3
        self.sync(0)
        parts["restore"] = (t3 - t2) + (time.monotonic() - t4)
        rec = Recovery(lost=list(getattr(error, "lost_ranks", []) or []), op=str(getattr(error, "op", "?")),
                       size_before=size_before, size_after=new.size,
                       failed_step=failed_step if failed_step is not None else step, step=step, t_error=t_err,
                       parts=parts)
        self._shrunk = None
        self.recoveries.append(rec)
        self._resumed = rec
        if new.size < self.min_ranks:
            where = self.stop_dir if self.stop_dir is not None else self._default_stop_dir()
            path = self.save(where)
            msg = (f"elastic: {new.size} rank(s) left, fewer than the minimum {self.min_ranks} (--min-ranks); "
                   f"training stopped at the commit of step {step}, written to {path}.{self._stop_hint(where)}")
            raise ElasticStop(msg, step, str(path) if path is not None else None)
        if self.max_ranks is not None and new.size < self.max_ranks:
            self._grow_at = step + 1
        return rec

    # ------------------------------------------------------------ shared
    def begin_step(self, step: int) -> None:
        """Mark the start of ``step`` (0-based; the loop calls it): the test hooks' clock and the recovery's end."""
        self._step = int(step)
        if self._resumed is not None:
            self._resumed.t_resumed = time.monotonic()
            self._resumed = None
        kill_point(self.comm, step, "forward")

    @property
    def committed_step(self) -> int:
        """The step of the newest commit."""
        return int(self._commits[-1][0])

    def agree(self) -> int:
        """Collective: the smallest committed step over the ranks (what every rank can restore)."""
        return self.agree_on(self.comm)

    def finish(self, step: int) -> None:
        """Collective: end training after ``step`` steps, on every survivor alike (a fault-tolerant agreement).

        A rank lost in the last step, after its reductions, is noticed here by
        every survivor: each raises ``RanksLostError`` (then :meth:`recover`
        and train again from the agreed commit), or none does and all leave
        together. An ordinary collective here could complete on some survivors
        (which would leave) and fail on others (which would wait in
        ``shrink()`` for them until the deadline).
        """
        kill_point(self.comm, step, "finish")
        comm = self.comm
        if comm is not None and comm.size > 1:
            comm.agree(True)

    # ------------------------------------------------------------ growing back (shared)
    def maybe_grow(self, step: int) -> bool:
        """Collective: at the first commit after a shrink, spawn replacements up to ``max_ranks``; they get the state.

        Call it after :meth:`commit` (``step`` being the step just committed).
        Every rank decides alike (the step and the sizes are the same
        everywhere). The survivors grow the communicator (``comm.grow``),
        rebind the model and the data to it, and broadcast rank 0's commit;
        the replacements, started with this program's command line, receive it
        in :meth:`join`. Where no process can be spawned, or the sampler's
        global batch does not split evenly over ``max_ranks``, rank 0 says so
        on stderr and training goes on with the ranks there are.

        Returns:
            True if the communicator grew.

        Raises:
            RanksLostError: a rank was lost while growing (recover from it as from any other loss).
        """
        if self._grow_at is None or step < self._grow_at:
            return False
        self._grow_at = None
        comm = self.comm
        target = self.max_ranks or comm.size
        count = target - comm.size
        if count <= 0:
            return False
        from collective.errors import CollectiveError

        def decline(why: str) -> bool:
            if comm.rank == 0:
                ranks = f"{comm.size} rank" + ("" if comm.size == 1 else "s")
                sys.stderr.write(f"elastic: no replacements ({why}); going on with {ranks}\n")
                sys.stderr.flush()
            return False

        batch = getattr(self._sampler(), "global_batch", None)
        if batch is not None and batch % target:  # decided before spawning: a replacement would wait in vain
            return decline(f"the global batch {batch} cannot be split evenly over {target} ranks")
        try:
            merged = comm.grow(count)
        except lost_rank_errors():
            raise
        except CollectiveError as exc:  # no replacement could be started: train on with the ranks there are
            return decline(str(exc))
        self._bind(merged, rebuild=True)
        self._match_new_ranks()
        self.sync(0, params=False)
        return True

    def join(self) -> None:
        """Collective, on a replacement: take the survivors' committed state (they call :meth:`maybe_grow`).

        Call it once the model and the optimizer are built as the program
        builds them (``comm.is_replacement`` is True); training goes on from
        :attr:`committed_step`.
        """
        self._bind(self.comm, rebuild=False)
        self.sync(0, params=False, joining=True)

    def _sampler(self) -> Any:
        """The data's sampler (what ``global_batch`` is read from), or None."""
        return None

    def _match_new_ranks(self) -> None:
        """After a grow, on the survivors: the collectives the replacements' model construction made beyond
        what ``_bind`` did (none by default)."""

    def agree_on(self, comm: Any) -> int:
        """Collective over ``comm``: the smallest committed step over its ranks.

        An ordinary allreduce is enough during recovery: what follows it
        (rebuild, state broadcast, the next step) is collective on the same
        communicator, so a survivor it failed on cannot leave without the
        others noticing; they all recover again.
        """
        mine = np.array([self.committed_step], np.int64)
        if comm is None or comm.size == 1:
            return int(mine[0])
        return int(comm.allreduce(mine, op="min")[0])


class ElasticState(ElasticCore):
    """The training state that survives lost ranks: committed in memory every step, restored after a failure.

    It covers the parameters and the optimizer's state (double buffered: a
    commit copies nothing), the step, and ``extra``: small named values
    (numbers, short arrays) that are copied at each commit.

    Args:
        dp: the replicated model; its communicator must be elastic
            (``collective-run --elastic``) for :meth:`recover` to work.
        optimizer: its optimizer (switched to double buffering here).
        loader: the sharded data; resharded after every change of the rank count.
        checkpoint: disk checkpoints (rebound to the new communicator after a
            change; also where the commit goes when the job stops).
        min_ranks: stop below this many ranks (default ``COLLECTIVE_MIN_RANKS``, else 1).
        max_ranks: grow back to this many ranks (default ``COLLECTIVE_MAX_RANKS``, else no growing).
        stop_dir: where the commit is written when the job stops and no ``checkpoint`` is given.
        extra: more values to commit and restore with the step.
        step: the step the state in memory belongs to (the first commit).

    Example::

        state = ElasticState(dp, opt, loader, checkpoint=ckpt)
        step = state.committed_step
        while step < steps:
            try:
                dp.train_step(*loader.batch(step), step, opt)
                step += 1
                state.commit(step)
            except lost_rank_errors() as exc:
                step = state.recover(exc).step
    """

    def __init__(self, dp: DataParallel, optimizer: Optimizer, loader: ShardedLoader | None = None, *,
                 checkpoint: Checkpointer | None = None, min_ranks: int | None = None, max_ranks: int | None = None,
                 stop_dir: str | os.PathLike | None = None, extra: dict[str, Any] | None = None,
                 step: int = 0) -> None:
        self.dp = dp
        self.optimizer = optimizer
        self.loader = loader
        self.checkpoint = checkpoint
        self._init_core(min_ranks, max_ranks, stop_dir, step, "ElasticState")
        self.extra: dict[str, Any] = dict(extra or {})
        optimizer.double_buffer()
        # The last two commits: (step, optimizer step, copy of extra), newest last.
        self._commits: list[tuple[int, int, dict[str, Any]]] = []
        self._commits = [(int(step), int(optimizer.t), dict(self.extra))]
        self._install_test_hooks()

    # ------------------------------------------------------------ test hooks
    def _install_test_hooks(self) -> None:
        """With ``COLLECTIVE_ELASTIC_TEST_KILL`` set: the kill points inside the step (buckets, optimizer)."""
        if not _KILLS:
            return
        buckets = self.dp.buckets
        hook = buckets.hook
        last = len(buckets) - 1

        def launch(bucket: Any) -> Any:
            if bucket.index == 0:
                kill_in_flight(self.comm, self._step, "shm")
            fut = hook(bucket)
            if bucket.index == 0:
                kill_point(self.comm, self._step, "allreduce")
            if bucket.index == last:
                kill_point(self.comm, self._step, "late-allreduce")
            return fut

        buckets.hook = launch
        opt = self.optimizer
        update = type(opt).update.__get__(opt)

        def upd(i: int) -> None:
            update(i)
            if i == 0:  # between two buckets' updates (or before the step ends, with one bucket)
                kill_point(self.comm, self._step, "update")

        opt.update = upd  # type: ignore[method-assign]

    # ------------------------------------------------------------ commit
    @property
    def comm(self) -> Any:
        """The communicator training runs on now."""
        return self.dp.comm

    def commit(self, step: int) -> None:
        """Record that the state in memory is the one after ``step`` steps (no copy of the model; local, no message).

        Call it after every finished step: the state of the step before stays
        in memory until the next step's updates, which is what a rollback after
        uneven completion needs.
        """
        kill_point(self.comm, step - 1, "commit")
        extra = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.extra.items()}
        self._commits = [*self._commits[-1:], (int(step), int(self.optimizer.t), extra)]

    def restore(self, step: int) -> None:
        """Make the committed state of ``step`` current again (one of the last two commits; no copy).

        Raises:
            ValueError: ``step`` is not one of the commits held in memory.
        """
        for s, t, extra in reversed(self._commits):  # the newest of that step, if it was committed twice
            if s == step:
                self.optimizer.use_generation(t)
                self.extra = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in extra.items()}
                self._commits = [(s, t, extra)]
                return
        raise ValueError(f"ElasticState.restore: step {step} is not committed in memory on rank "
                         f"{getattr(self.comm, 'rank', 0)} (held: {[c[0] for c in self._commits]})")

    def sync(self, root: int = 0, params: bool = True, joining: bool = False) -> None:
        """Collective: every rank takes ``root``'s committed state (step, optimizer state, parameters, extra).

        New ranks (replacements) call it to receive the state; survivors call
        it after a recovery so every replica is the same bit for bit.
        ``joining`` changes nothing here: the optimizer's buffers exist from
        its construction, the same on every rank.
        """
        del joining
        comm = self.comm
        if comm is None or comm.size == 1:
            return
        step, t, _ = self._commits[-1]
        head = np.array([step, t, len(self.extra)], np.int64)
        comm.broadcast(head, root=root, out=head)
        step, t = int(head[0]), int(head[1])
        if params:
            self.dp.buckets.broadcast_parameters(root)
        for bufs in self.optimizer.state.values():
            for buf in bufs:
                comm.broadcast(buf, root=root, out=buf)
        broadcast_extra(comm, self.extra, root)
        self.optimizer.set_step(t)
        self._commits = [(step, t, dict(self.extra))]

    # ------------------------------------------------------------ disk
    def checkpoint_arrays(self, step: int) -> Callable[[], dict[str, Any]]:
        """The arrays function of the disk checkpoint after ``step`` steps (``Checkpointer.save`` calls it on the
        rank that writes); with ``COLLECTIVE_ELASTIC_TEST_KILL``, the ``checkpoint`` kill point is in it."""
        dp, opt = self.dp, self.optimizer
        if not _KILLS:
            return lambda: dp.state_arrays(opt)

        def arrays() -> dict[str, Any]:
            kill_point(self.comm, step - 1, "checkpoint")
            return dp.state_arrays(opt)

        return arrays

    def save(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Collective: rank 0 writes the newest commit as a checkpoint (``checkpoint``'s directory by default)."""
        if directory is None and self.checkpoint is None:
            return None
        ck = self.checkpoint if directory is None else Checkpointer(directory, self.comm)
        assert ck is not None
        ck.rebind(self.comm)
        step = self.committed_step
        sampler = self.loader.sampler if self.loader is not None else None
        return ck.save(step, lambda: self.dp.state_arrays(self.optimizer),
                       checkpoint_meta(self.dp, self.optimizer, sampler, step))

    def rebind(self, comm: Any) -> None:
        """Collective over ``comm``: go on training on another communicator (e.g. a subgroup), from rank 0's commit.

        Rebuilds the gradient buckets over ``comm``, takes this rank's share of
        the data there, and broadcasts rank 0's committed state.

        Example::

            sub = comm.subgroup([0, 1, 2])
            if sub is not None:
                state.rebind(sub)
        """
        self._bind(comm, rebuild=True)
        self.sync(0)

    def _default_stop_dir(self) -> Path:
        return self.checkpoint.directory if self.checkpoint is not None else Path("elastic-checkpoint")

    def _bind(self, comm: Any, rebuild: bool) -> None:
        """Rebuild everything that holds the communicator (buckets, optimizer, data shard, checkpointer)."""
        if rebuild:
            self.dp.rebuild(comm)
            self.optimizer.rebind(self.dp.buckets)
            self._install_test_hooks()
        if self.loader is not None:
            self.loader.reshard(comm.rank, comm.size)
        if self.checkpoint is not None:
            self.checkpoint.rebind(comm)

    def _sampler(self) -> Any:
        return self.loader.sampler if self.loader is not None else None

    def _match_new_ranks(self) -> None:
        # The replacements' DataParallel broadcast the parameters from rank 0 as it was built; match it.
        self.dp.buckets.broadcast_parameters(0)
