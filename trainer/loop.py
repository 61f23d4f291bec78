"""The BSP data-parallel training loop: DataParallel (one step), fit() (progress, checkpoints, resume) and the timeline.

One step, on every rank: forward and loss on this rank's shard (the loss
gradient scaled by 1/P, so summing the buckets averages them); backward,
during which each bucket's allreduce starts as soon as its last gradient is
ready (``trainer.buckets``); then, for each bucket in order, wait for its
reduction and apply the optimizer to it. The mean loss over the global batch
rides along in a spare slot of bucket 0, so reporting it costs no collective.

*Exposed* communication is the time the main thread spends waiting for
buckets; *comm time* is how long the communication thread spent in the
buckets' collectives; the *hidden* fraction is ``1 - exposed / comm time``.

Timeline: with ``COLLECTIVE_TIMELINE=path`` (or ``fit(timeline=path)``) every
rank writes a Chrome-trace / Perfetto JSON file (``path`` with ``.rank{r}``
before its suffix, or ``{rank}`` in the path replaced): each layer's forward
and backward, each bucket's ready and launch instants, its allreduce on the
communication thread, the main thread's wait for it and its optimizer update.
``merge_timelines`` joins the ranks' files into one view.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from collective import config

from .buckets import Allocator, CommHook, GradBuckets
from .checkpoint import Checkpointer
from .data import ShardedLoader
from .nn import Array, Context, Sequential, SoftmaxCrossEntropy, array_module
from .optim import Optimizer

__all__ = ["DataParallel", "FitResult", "StepStats", "Timeline", "checkpoint_meta", "fit", "merge_timelines",
           "timeline_path"]


@dataclass
class StepStats:
    """What one step did (times in seconds).

    Attributes:
        step: steps done after this one.
        loss: mean loss over the global batch.
        time: wall time of the step.
        forward, backward: main-thread time in forward (with the loss) and backward.
        exposed: main-thread time spent waiting for buckets' reductions.
        update: main-thread time in the optimizer.
        comm: time the communication thread spent in this step's collectives (0 if unknown or P = 1).
        hidden: fraction of ``comm`` that overlapped computation (None if unknown).
    """

    step: int
    loss: float
    time: float
    forward: float
    backward: float
    exposed: float
    update: float
    comm: float
    hidden: float | None


@dataclass
class FitResult:
    """What fit() did: per-step statistics, where it started, and (elastic) the recoveries from lost ranks."""

    start_step: int
    stats: list[StepStats] = field(default_factory=list)
    recoveries: list[Any] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.start_step + len(self.stats)

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.stats]

    def mean(self, attr: str, skip: int = 0) -> float:
        """Mean of one StepStats attribute over the steps after the first ``skip``."""
        vals = [getattr(s, attr) for s in self.stats[skip:] if getattr(s, attr) is not None]
        return float(np.mean(vals)) if vals else float("nan")


def timeline_path(path: str | os.PathLike, rank: int) -> str:
    """The file rank ``rank`` writes for ``path``: ``{rank}`` replaced, else ``.rank{r}`` before the suffix."""
    s = str(path)
    if "{rank}" in s:
        return s.replace("{rank}", str(rank))
    p = Path(s)
    suffix = p.suffix or ".json"
    return str(p.with_name(f"{p.stem if p.suffix else p.name}.rank{rank}{suffix}"))


class Timeline:
    """Chrome-trace events of one rank: ``pid`` = rank, thread 0 = compute, thread 1 = communication.

    Times are ``time.monotonic()`` (one clock for every process on a machine),
    written in microseconds, so the ranks' files line up when merged.

    Args:
        rank: this rank.
        max_events: stop recording after this many events (a long run's timeline stays bounded).
    """

    COMPUTE, COMM = 0, 1

    def __init__(self, rank: int = 0, max_events: int = 200_000) -> None:
        self.rank = rank
        self.max_events = max_events
        self.events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": self.COMPUTE, "args": {"name": "compute"}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": self.COMM, "args": {"name": "communication"}},
        ]
        self.dropped = 0

    def _add(self, ev: dict[str, Any]) -> None:
        if len(self.events) < self.max_events:
            self.events.append(ev)
        else:
            self.dropped += 1

    def complete(self, name: str, cat: str, t0: float, t1: float, tid: int = 0, args: dict | None = None) -> None:
        """A span from ``t0`` to ``t1`` (seconds, monotonic clock)."""
        ev = {"name": name, "cat": cat, "ph": "X", "ts": t0 * 1e6, "dur": max(0.0, t1 - t0) * 1e6,
              "pid": self.rank, "tid": tid}
        if args:
            ev["args"] = args
        self._add(ev)

    def instant(self, name: str, cat: str, t: float, tid: int = 0, args: dict | None = None) -> None:
        """A point in time."""
        ev = {"name": name, "cat": cat, "ph": "i", "s": "t", "ts": t * 1e6, "pid": self.rank, "tid": tid}
        if args:
            ev["args"] = args
        self._add(ev)

    def tracer(self, kind: str, name: str, t0: float, t1: float) -> None:
        """``Sequential.tracer``: a layer's forward or backward."""
        self.complete(f"{kind} {name}", kind, t0, t1)

    def write(self, path: str | os.PathLike) -> str:
        """Write this rank's file (see :func:`timeline_path`) atomically; return its name."""
        out = timeline_path(path, self.rank)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms",
                       "otherData": {"rank": self.rank, "dropped_events": self.dropped}}, f)
        os.replace(tmp, out)
        return out


def merge_timelines(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """Join several ranks' timeline files into one Chrome-trace file.

    Example::

        merge_timelines([f"tl.rank{r}.json" for r in range(4)], "tl.json")
    """
    events: list[dict[str, Any]] = []
    for p in paths:
        with open(p) as f:
            events.extend(json.load(f)["traceEvents"])
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


class DataParallel:
    """A model replicated on every rank, its gradients averaged bucket by bucket while backward runs (BSP).

    Args:
        model: a Sequential; its parameters are moved into flat buckets, and
            every rank starts from rank 0's values.
        comm: a collective Communicator (None: one process, no communication).
        loss: the loss (default SoftmaxCrossEntropy), averaged over this rank's
            shard; the allreduce averages over ranks.
        bucket_mb: see :class:`trainer.buckets.GradBuckets`.
        first_bucket_mb: see :class:`trainer.buckets.GradBuckets`.
        hook: see :class:`trainer.buckets.GradBuckets`.
        overlap: see :class:`trainer.buckets.GradBuckets`.
        algorithm: see :class:`trainer.buckets.GradBuckets`;
            ``algorithm="ring"`` picks the allreduce for every bucket.
        allocator: see :class:`trainer.buckets.GradBuckets`. ``allocator="shared"`` (or
            ``comm.alloc``) keeps the gradient buckets in the node's shared window,
            which the ``shm`` allreduce reads in place (no copy-in); "auto" (the
            default) does so when all ranks share one node and the model is on the
            host, else uses plain arrays (None).
        seed: the run's seed (dropout masks).
        average: where the division by P happens: "loss" (default) scales the
            loss gradient by 1/P before backward, so the buckets are summed and
            nothing is divided afterwards (free: the loss gradient is one small
            array); "bucket" sums and then divides each bucket once (op "avg").
        broadcast: start from rank 0's parameters (broadcast now).

    Example::

        dp = DataParallel(mlp([64, 128, 10]), comm)
        opt = SGD(dp.buckets, lr=0.1, momentum=0.9)
        stats = dp.train_step(x, y, ids, step, opt)
    """

    def __init__(self, model: Sequential, comm: Any = None, *, loss: Any = None, bucket_mb: float | None = None,
                 first_bucket_mb: float | None = None, hook: CommHook | None = None, algorithm: str | None = None,
                 overlap: bool = True, allocator: Allocator | str | None = "auto", seed: int = 0,
                 average: str = "loss", broadcast: bool = True) -> None:
        if average not in ("loss", "bucket"):
            raise ValueError(f"DataParallel: average={average!r} must be 'loss' or 'bucket'")
        self.model = model
        self.loss = loss if loss is not None else SoftmaxCrossEntropy()
        self.seed = int(seed)
        self._settings: dict[str, Any] = {
            "bucket_mb": bucket_mb, "first_bucket_mb": first_bucket_mb, "hook": hook, "algorithm": algorithm,
            "overlap": overlap, "allocator": allocator, "average": average}
        self._build(comm)
        model.register_grad_ready_hook(self._grad_ready)
        self.timeline: Timeline | None = None
        if broadcast:
            self.buckets.broadcast_parameters()

    def _build(self, comm: Any) -> None:
        """The buckets over ``comm`` (the parameters' current values are copied into them)."""
        st = self._settings
        allocator = st["allocator"]
        self.comm = comm
        self.rank = 0 if comm is None else comm.rank
        self.size = 1 if comm is None else comm.size
        model = self.model
        if allocator == "auto":
            # Shared buckets when every rank is on one node and the model is on the host: the shm
            # allreduce then reduces them where they lie, with no copy in or out (bench/bench_trainer.py
            # compares the allocators; docs/performance.md).
            host = all(isinstance(p.data, np.ndarray) for g in model.parameter_groups() for p in g)
            single = comm is not None and comm.size > 1 and getattr(comm, "single_node", False)
            allocator = "shared" if (host and single) else None
        if allocator == "shared":
            if comm is None or comm.size == 1:
                allocator = None  # nothing to share with
            elif not hasattr(comm, "alloc"):
                raise ValueError("DataParallel: allocator='shared' needs a communicator with alloc()")
            else:
                allocator = comm.alloc
        elif isinstance(allocator, str):
            raise ValueError(f"DataParallel: allocator={allocator!r}: pass a function, 'shared' or None")
        average = st["average"]
        self.buckets = GradBuckets(model.parameter_groups(), comm, bucket_mb=st["bucket_mb"],
                                   first_bucket_mb=st["first_bucket_mb"], hook=st["hook"], algorithm=st["algorithm"],
                                   overlap=st["overlap"], allocator=allocator, extra=1,
                                   op="sum" if average == "loss" else "avg")
        #: Factor applied to the loss gradient: 1/P when the buckets are summed (average="loss").
        self.grad_scale = 1.0 / self.size if average == "loss" else 1.0

    def _grad_ready(self, module: Any, params: Sequence[Any]) -> None:
        # One hook registered once: the buckets it feeds are rebuilt when the communicator changes.
        self.buckets.mark_ready(module, params)

    def rebuild(self, comm: Any) -> None:
        """Collective over ``comm``: rebuild the buckets over another communicator (after a shrink or a grow).

        The parameters keep their values (copied into the new buckets);
        gradient buffers come from ``comm``'s allocator, and the loss scale
        follows the new number of ranks. The optimizer must then be
        ``rebind``-ed to :attr:`buckets`.
        """
        self._build(comm)

    # ------------------------------------------------------------ a step
    def set_timeline(self, timeline: Timeline | None) -> None:
        """Record every following step into ``timeline`` (None stops)."""
        self.timeline = timeline
        self.model.tracer = timeline.tracer if timeline is not None else None

    def forward_backward(self, x: Array, y: Array, ids: Array | None = None, step: int = 0) -> float:
        """Forward, loss and backward on this rank's shard; buckets launch during backward. Returns the local loss."""
        ctx = Context(training=True, step=step, sample_ids=ids, seed=self.seed)
        self.buckets.begin()
        t0 = time.monotonic()
        logits = self.model.forward(x, ctx)
        tl = time.monotonic()
        loss = self.loss.forward(logits, y)
        self.buckets.extra[0] = loss * self.grad_scale  # averaged over ranks along with bucket 0's gradients
        t1 = time.monotonic()
        if self.timeline is not None:
            self.timeline.complete("loss", "forward", tl, t1)
        dy = self.loss.backward()
        if self.grad_scale != 1.0:
            dy = dy * self.grad_scale  # the 1/P of the average, applied once to the small loss gradient
        self.model.backward(dy)
        self.buckets.finish()
        self._t_fwd = t1 - t0
        return loss

    def train_step(self, x: Array, y: Array, ids: Array | None, step: int, optimizer: Optimizer) -> StepStats:
        """One BSP step: forward/backward with overlapped reductions, then per-bucket wait and update.

        Args:
            x: this rank's inputs.
            y: this rank's labels.
            ids: global sample indices of the rows (dropout follows samples); None: row numbers.
            step: steps done before this one (the data position and the dropout counter).
            optimizer: updates each bucket once it is reduced.
        """
        tl = self.timeline
        t0 = time.monotonic()
        self.forward_backward(x, y, ids, step)
        t_bwd = time.monotonic()
        exposed = update = 0.0
        bs = self.buckets
        for i in range(len(bs)):
            b = bs.wait(i)
            tu = time.monotonic()
            optimizer.update(i)
            tu1 = time.monotonic()
            exposed += b.t_done - b.t_wait
            update += tu1 - tu
            if tl is not None:
                tl.complete(f"wait bucket {i}", "wait", b.t_wait, b.t_done, args={"bucket": i})
                tl.complete(f"update bucket {i}", "optimizer", tu, tu1, args={"bucket": i})
        optimizer.end_step()
        t1 = time.monotonic()
        spans = bs.comm_spans() if self.size > 1 else [[] for _ in bs]
        comm = sum(e - s for sp in spans for s, e in sp)
        hidden = None
        if comm > 0:
            hidden = min(1.0, max(0.0, 1.0 - exposed / comm))
        if tl is not None:
            tl.complete(f"step {step}", "step", t0, t1, args={"step": step})
            for b in bs:
                args = {"bucket": b.index, "bytes": b.nbytes, "params": [p.name for p in b.params]}
                tl.instant(f"bucket {b.index} ready", "bucket", b.t_ready, args=args)
                tl.instant(f"bucket {b.index} launch", "bucket", b.t_launch, args=args)
                for s, e in spans[b.index]:
                    tl.complete(f"allreduce bucket {b.index}", "comm", s, e, tid=Timeline.COMM, args=args)
                tl.instant(f"bucket {b.index} done", "bucket", b.t_done, args=args)
        loss = float(bs.extra[0])
        return StepStats(step + 1, loss, t1 - t0, self._t_fwd, t_bwd - t0 - self._t_fwd, exposed, update, comm,
                         hidden)

    # ------------------------------------------------------- evaluation
    def predict(self, x: Array, batch: int = 1024) -> Array:
        """Logits of ``x`` (no dropout), computed locally in chunks of ``batch``."""
        xp = array_module(self.buckets[0].data)
        ctx = Context(training=False)
        tracer, self.model.tracer = self.model.tracer, None
        try:
            outs = [self.model.forward(xp.asarray(x[i:i + batch]), ctx) for i in range(0, len(x), batch)]
        finally:
            self.model.tracer = tracer
        return xp.concatenate(outs)

    def accuracy(self, x: Array, y: Array) -> float:
        """Fraction of ``x`` classified as ``y`` (computed locally; every rank gets the same answer)."""
        xp = array_module(self.buckets[0].data)
        pred = self.predict(x).argmax(axis=1)
        return float((pred == xp.asarray(y)).mean())

    # ------------------------------------------------------ checkpoints
    def parameter_arrays(self) -> dict[str, Array]:
        """Every parameter by name (views, no copy): ``{"0.weight": ..., ...}``."""
        return {p.name: p.data for p in self.model.parameters()}

    def state_arrays(self, optimizer: Optimizer) -> dict[str, Array]:
        """Parameters and optimizer state, by name, for a checkpoint (views, no copy)."""
        out = {f"param/{k}": v for k, v in self.parameter_arrays().items()}
        out.update({f"optim/{k}": v for k, v in optimizer.state_arrays().items()})
        return out

    def load_state(self, arrays: dict[str, np.ndarray] | None, meta: dict[str, Any], optimizer: Optimizer) -> None:
        """Collective: rank 0 loads ``arrays`` into the model and optimizer, then every rank gets them by broadcast."""
        xp = array_module(self.buckets[0].data)
        if arrays is not None:
            for p in self.model.parameters():
                key = f"param/{p.name}"
                if key not in arrays:
                    raise KeyError(f"DataParallel.load_state: the checkpoint has no parameter {p.name!r}")
                if tuple(arrays[key].shape) != p.shape:
                    raise ValueError(f"DataParallel.load_state: parameter {p.name!r} has shape "
                                     f"{tuple(arrays[key].shape)} in the checkpoint, {p.shape} in the model")
                p.data[...] = xp.asarray(arrays[key])
            optimizer.load_state_arrays({k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")},
                                        int(meta["optimizer"]["t"]))
        optimizer.t = int(meta["optimizer"]["t"])
        comm = self.comm
        if comm is not None and comm.size > 1:
            self.buckets.broadcast_parameters()
            for bufs in optimizer.state.values():
                for buf in bufs:
                    comm.broadcast(buf, root=0, out=buf)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the trainer extra; without it, no bar
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.2)


def fit(dp: DataParallel, optimizer: Optimizer, loader: ShardedLoader, steps: int, *,
        checkpoint: Checkpointer | None = None, resume: bool = False, progress: bool = True,
        timeline: str | os.PathLike | None = None,
        callbacks: Sequence[Callable[[StepStats], None]] = (), elastic: bool = False,
        min_ranks: int | None = None, max_ranks: int | None = None) -> FitResult:
    """Train until ``steps`` steps are done (BSP), with a progress bar on rank 0, checkpoints and resume.

    Args:
        dp: the replicated model.
        optimizer: its optimizer (over ``dp.buckets``).
        loader: this rank's sharded data (its global batch and seed fix the data order).
        steps: total steps (a resumed run continues from the checkpoint's step to here).
        checkpoint: writes every ``checkpoint.every`` steps (and at the end, if due).
        resume: continue from the newest checkpoint in ``checkpoint``'s directory, if any.
        progress: tqdm bar on rank 0 (loss over the global batch, samples/s, comm time hidden).
        timeline: Chrome-trace file per rank (default ``COLLECTIVE_TIMELINE``; None/"" for none).
        callbacks: called with each step's StepStats, on every rank.
        elastic: survive lost ranks (launch with ``collective-run --elastic``): the state is committed in
            memory every step; after a loss the survivors roll back to the last step all of them
            committed, reshard the data and go on, with the same global batch and sample order
            (``trainer.elastic``). A replacement rank joins here and receives the state.
        min_ranks: elastic: stop (``ElasticStop``, the commit written to disk) below this many ranks
            (default ``COLLECTIVE_MIN_RANKS``).
        max_ranks: elastic: grow back to this many ranks after a loss (default ``COLLECTIVE_MAX_RANKS``).

    Returns:
        FitResult with every step's StepStats (the steps the run kept, after any rollback) and the recoveries.

    Example::

        result = fit(dp, SGD(dp.buckets, lr=0.1, momentum=0.9), loader, steps=500,
                     checkpoint=Checkpointer("ckpt", comm, every=100), resume=True)
    """
    start = 0
    sampler = loader.sampler
    joining = elastic and bool(getattr(dp.comm, "is_replacement", False))
    if checkpoint is not None and resume and not joining:
        found = checkpoint.load_latest()
        if found is not None:
            arrays, meta = found
            data = meta.get("data", {})
            if data.get("global_batch") != sampler.global_batch or data.get("seed") != sampler.seed:
                raise ValueError(f"fit: the checkpoint in {checkpoint.directory} was written with global batch "
                                 f"{data.get('global_batch')} and data seed {data.get('seed')}; this run has "
                                 f"{sampler.global_batch} and {sampler.seed}. Resume with the same --batch and --seed")
            if meta.get("rng", {}).get("seed") != dp.seed:
                raise ValueError(f"fit: the checkpoint's seed {meta.get('rng', {}).get('seed')} differs from this "
                                 f"run's {dp.seed}")
            dp.load_state(arrays, meta, optimizer)
            start = int(meta["step"])
    state = None
    lost: tuple[type[BaseException], ...] = ()
    if elastic:
        from .elastic import ElasticState, lost_rank_errors

        state = ElasticState(dp, optimizer, loader, checkpoint=checkpoint, min_ranks=min_ranks, max_ranks=max_ranks,
                             step=start)
        if joining:
            state.join()
            start = state.committed_step
        lost = lost_rank_errors()
        comm = dp.comm
        if comm is not None and comm.size > 1 and not getattr(comm, "elastic", False) and dp.rank == 0:
            sys.stderr.write("fit(elastic=True): this job was not launched in elastic mode (collective-run --elastic), "
                             "so a lost rank still ends it; the state is committed every step all the same\n")
    tl_path = timeline if timeline is not None else config.get("TIMELINE")
    if tl_path:
        dp.set_timeline(Timeline(dp.rank))
    bar = _progress(steps, start, progress and dp.rank == 0)
    result = FitResult(start)
    rate = None
    step = start
    try:
        while True:
            try:
                if step >= steps:
                    if state is not None:
                        # A fault-tolerant agreement: a rank lost in the last step (after its reductions) is
                        # noticed here by every survivor alike, not by some in whatever the program does next.
                        state.finish(step)
                    break
                if state is not None:
                    state.maybe_grow(step)
                    state.begin_step(step)
                x, y, ids = loader.batch(step)
                st = dp.train_step(x, y, ids, step, optimizer)
                if state is not None:
                    state.commit(st.step)
                result.stats.append(st)
                for cb in callbacks:
                    cb(st)
                if bar is not None:
                    sps = sampler.global_batch / st.time if st.time > 0 else 0.0
                    rate = sps if rate is None else 0.9 * rate + 0.1 * sps
                    post = {"loss": f"{st.loss:.4f}", "samples/s": f"{rate:.0f}"}
                    if st.hidden is not None:
                        post["hidden"] = f"{100 * st.hidden:.0f}%"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if checkpoint is not None and checkpoint.due(st.step):
                    arrays = (state.checkpoint_arrays(st.step) if state is not None
                              else lambda: dp.state_arrays(optimizer))
                    checkpoint.save(st.step, arrays, checkpoint_meta(dp, optimizer, sampler, st.step))
                step = st.step
            except lost as exc:  # elastic only: shrink, roll back to the last step every survivor committed
                assert state is not None
                rec = state.recover(exc, step)
                result.recoveries.append(rec)
                result.stats = [s for s in result.stats if s.step <= rec.step]
                step = rec.step
                if dp.rank == 0:
                    if bar is None:
                        bar = _progress(steps, step, progress)
                    elif bar.n != step:
                        bar.n = step
                        bar.refresh()
                    sys.stderr.write(rec.describe() + "\n")
                    sys.stderr.flush()
    finally:
        if bar is not None:
            bar.close()
        if tl_path and dp.timeline is not None:
            dp.timeline.write(tl_path)
            dp.set_timeline(None)
    return result


def checkpoint_meta(dp: DataParallel, optimizer: Optimizer, sampler: Any, step: int) -> dict[str, Any]:
    """The metadata of a trainer checkpoint after ``step`` steps (what ``fit(resume=True)`` checks).

    Args:
        dp: the model.
        optimizer: its optimizer.
        sampler: the data's ShardedSampler (None: no data position recorded).
        step: steps done.
    """
    meta: dict[str, Any] = {
        "world_size": dp.size,
        "rng": {"kind": "splitmix64 counter of (seed, layer, step, sample, feature)", "seed": dp.seed,
                "counter": step},
        "optimizer": {"type": type(optimizer).__name__, "t": optimizer.t, "hyper": optimizer.hyperparams()},
        "buckets": [[p.name for p in b.params] for b in dp.buckets],
    }
    if sampler is not None:
        epoch, k = sampler.position(step)
        meta["data"] = {"global_batch": sampler.global_batch, "seed": sampler.seed, "epoch": epoch, "batch": k}
    return meta
