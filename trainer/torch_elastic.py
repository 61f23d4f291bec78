"""Elastic training for the torch wrapper: after a lost rank every survivor rolls back to the last commit, goes on.

:class:`TorchElasticState` is the torch side of ``trainer.elastic``: the same
recovery (:class:`~collective.trainer.elastic.ElasticCore`: shrink to the
survivors, agree on the smallest committed step, restore it, rebind, reshard,
broadcast), over a :class:`~collective.trainer.torch.DistributedDataParallel`
and a ``torch.optim.Optimizer``.

A *commit* copies the module's ``state_dict`` tensors (parameters and
buffers), the optimizer's per-parameter state (momentum, Adam's moments and
step) and its hyperparameters (``lr`` ...) into preallocated tensors: two
sets, used in turn, so a commit allocates nothing after the first two and the
state of the step before stays in memory. Two are needed and enough: when a
rank dies inside step ``s``'s reductions, a survivor may have finished step
``s`` while another failed inside it, and no survivor can be further ahead
(see ``trainer.elastic``).

*Growing back* (``collective-run --max-ranks``): at the first commit after a
loss, :meth:`~collective.trainer.elastic.ElasticCore.maybe_grow` spawns
replacements (``comm.grow``) running the same program, rebinds the model and
the sampler to the grown communicator and broadcasts rank 0's commit. A
replacement's ``collective.init()`` returns that communicator with
``is_replacement`` True; it builds the model and optimizer as every rank does
(the wrapper's construction makes the same collective calls as the
survivors' ``rebind``) and calls :meth:`TorchElasticState.join`, which gives
it the step, the parameters and buffers, the optimizer's state (created where
it has none yet) and hyperparameters, and ``extra``. The sampler's position
is the step. Each step's global batch and sample order stay those of an
uninterrupted run.

Test hook: ``COLLECTIVE_ELASTIC_TEST_KILL="RANK:STEP:POINT[,...]"`` as for the
NumPy trainer, with the points ``forward``, ``allreduce`` (just after bucket
0's reduction was started or, reduced inline, done), ``shm`` (while bucket 0's
reduction is in flight, as the flight recorder shows it), ``late-allreduce``
(the last bucket's), ``update`` (after ``optimizer.step()``), ``commit`` and
``finish``.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .elastic import (
    _KILLS,
    ElasticCore,
    ElasticStop,
    Recovery,
    broadcast_extra,
    kill_in_flight,
    kill_point,
    lost_rank_errors,
)
from .torch import DistributedDataParallel

__all__ = ["TorchElasticState", "ElasticStop", "Recovery", "lost_rank_errors"]


class _Snapshot:
    """One commit: copies of the module's state_dict tensors and of the optimizer's state, and the step."""

    __slots__ = ("step", "tensors", "optim", "groups", "extra")

    def __init__(self) -> None:
        self.step = -1
        self.tensors: list[torch.Tensor] = []
        self.optim: list[dict[str, Any] | None] = []
        self.groups: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}


def _copy_into(old: Any, new: torch.Tensor) -> torch.Tensor:
    """``new``'s values in ``old``'s memory when the shapes and dtypes agree, else in a fresh copy."""
    if isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype:
        old.copy_(new)
        return old
    return new.detach().clone()


_NUMBERS: dict[str, type] = {"int": int, "float": float, "bool": bool}


def _kind(v: Any) -> str:
    """A value's kind for the layout checksum: its type, with the dtype and shape of arrays and tensors."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return f"{type(v).__name__}:{v.dtype}:{tuple(v.shape)}"
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__}[" + ",".join(_kind(e) for e in v) + "]"
    return type(v).__name__


def _broadcast_value(comm: Any, v: Any, root: int) -> Any:
    """``root``'s value of ``v`` (a tensor, filled in place, or a number of ``v``'s type); other values as they are."""
    if isinstance(v, torch.Tensor):
        buf = v if v.is_contiguous() else v.contiguous()
        flat = buf.view(-1)
        comm.broadcast(flat, root=root, out=flat)
        if buf is not v:
            v.copy_(buf)
        return v
    if isinstance(v, (int, float)):  # bool too
        a = np.array([v], np.float64)
        comm.broadcast(a, root=root, out=a)
        return type(v)(a[0])
    return v


def _copy_extra(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in extra.items()}


class TorchElasticState(ElasticCore):
    """The state of a torch training loop that survives lost ranks: committed in memory every step.

    Launch with ``collective-run --elastic``. Call :meth:`begin_step` before
    each step and :meth:`commit` after it; on ``collective.RanksLostError``
    call :meth:`recover`, which shrinks the communicator to the survivors,
    agrees with them on the last step every one of them committed, restores
    that commit (parameters, buffers, optimizer state, ``extra``), rebuilds
    the model's buckets on the new communicator
    (:meth:`DistributedDataParallel.rebind`), gives the sampler the new rank's
    share of each global batch and broadcasts the new rank 0's state; training
    goes on from ``recovery.step``. The lowest surviving rank is the new rank
    0 (read ``state.comm.rank``, not the rank of the launch). With
    ``max_ranks``, call :meth:`maybe_grow` after each commit: at the first
    commit after a loss the survivors spawn replacements up to ``max_ranks``
    and hand them the commit; a replacement (``comm.is_replacement``) builds
    the model and optimizer as the program does and calls :meth:`join`
    instead of starting from step 0. End with :meth:`finish`, a
    fault-tolerant agreement every survivor leaves alike.

    Args:
        model: the wrapped model; its communicator must be elastic for :meth:`recover` to work.
        optimizer: a ``torch.optim.Optimizer`` over ``model.parameters()`` (not a sharded one).
        sampler: the data sharding, resharded after every change of the rank count: anything with
            ``reshard(rank, size)``, e.g. ``collective.trainer.data.ShardedSampler`` (whose ``reshard``
            raises ``ValueError`` when the global batch cannot be split evenly over the survivors).
        min_ranks: stop below this many ranks (default ``COLLECTIVE_MIN_RANKS``, else 1): the new rank 0
            writes the agreed commit (:meth:`save`) and every survivor raises ``ElasticStop``.
        max_ranks: grow back to this many ranks after a loss (default ``COLLECTIVE_MAX_RANKS``, set by
            ``collective-run --max-ranks``; else no growing).
        stop_dir: where that commit goes (default ``elastic-checkpoint``).
        extra: small named values (numbers, arrays, tensors) committed and restored with the step.
        step: the step the state in memory belongs to (the first commit).

    Raises:
        ValueError: the optimizer is sharded, or does not update the model's parameters.

    Example::

        sampler = ShardedSampler(len(x), global_batch, comm.rank, comm.size, seed=0)
        state = TorchElasticState(model, opt, sampler)
        if comm.is_replacement:           # spawned to grow the job back: take the survivors' commit
            state.join()
        step = state.committed_step
        while True:
            try:
                if step >= steps:
                    state.finish(step)
                    break
                state.begin_step(step)
                idx = torch.from_numpy(sampler.indices(step))
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
                state.commit(step)
                state.maybe_grow(step)        # after a loss, with max_ranks: replacements join here
            except collective.RanksLostError as exc:
                step = state.recover(exc, step).step
    """

    def __init__(self, model: DistributedDataParallel, optimizer: torch.optim.Optimizer, sampler: Any = None, *,
                 min_ranks: int | None = None, max_ranks: int | None = None,
                 stop_dir: str | os.PathLike | None = None, extra: dict[str, Any] | None = None,
                 step: int = 0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"TorchElasticState: the optimizer is a {type(optimizer).__name__}, not a "
                             "torch.optim.Optimizer (a sharded optimizer cannot move to another communicator)")
        mine = {id(p) for p in model.parameters()}
        foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in mine]
        if foreign:
            raise ValueError(f"TorchElasticState: the optimizer updates {len(foreign)} tensor(s) that are not the "
                             f"model's parameters (shapes {foreign[:4]})")
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self._init_core(min_ranks, max_ranks, stop_dir, step, "TorchElasticState")
        self.extra: dict[str, Any] = dict(extra or {})
        self._spare = _Snapshot()
        self._commits: list[_Snapshot] = [self._take(int(step), _Snapshot())]
        self._params_sent = False
        self._install_test_hooks()

    # ------------------------------------------------------------ test hooks
    def _install_test_hooks(self) -> None:
        """With ``COLLECTIVE_ELASTIC_TEST_KILL`` set: kill points around the bucket reductions and the update."""
        if not _KILLS:
            return
        model = self.model
        launch = model._launch_ready

        def hooked(inline: bool = False) -> None:
            n = len(model._buckets)
            first = model._next == 0 and n > 0 and model._buckets[0].pending == 0
            if first:
                kill_in_flight(self.comm, self._step, "shm")
            before = model._next
            launch(inline)
            if first:
                kill_point(self.comm, self._step, "allreduce")
            if before < n <= model._next:
                kill_point(self.comm, self._step, "late-allreduce")

        model._launch_ready = hooked  # type: ignore[method-assign]
        self.optimizer.register_step_post_hook(lambda *_: kill_point(self.comm, self._step, "update"))

    # ------------------------------------------------------------ commit
    @property
    def comm(self) -> Any:
        """The communicator training runs on now (the model's)."""
        return self.model.comm

    @property
    def committed_step(self) -> int:
        """The step of the newest commit."""
        return self._commits[-1].step

    def _optim_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def _take(self, step: int, snap: _Snapshot) -> _Snapshot:
        """Copy the live state into ``snap`` (reusing its tensors) and label it ``step``."""
        live = list(self.model.module.state_dict().values())
        old = snap.tensors
        snap.tensors = [_copy_into(old[i] if i < len(old) else None, t) for i, t in enumerate(live)]
        olds = snap.optim
        optim: list[dict[str, Any] | None] = []
        for i, p in enumerate(self._optim_params()):
            st = self.optimizer.state.get(p)
            if not st:
                optim.append(None)
                continue
            prev = (olds[i] if i < len(olds) else None) or {}
            optim.append({k: _copy_into(prev.get(k), v) if isinstance(v, torch.Tensor) else v for k, v in st.items()})
        snap.optim = optim
        snap.groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        snap.extra = _copy_extra(self.extra)
        snap.step = int(step)
        return snap

    def commit(self, step: int) -> None:
        """Record that the state in memory is the one after ``step`` steps (local, no message).

        Copies the parameters, buffers and optimizer state into the older of
        the two commits (its tensors are reused). Call it after every
        finished step.
        """
        kill_point(self.comm, step - 1, "commit")
        older = self._commits[0] if len(self._commits) == 2 else self._spare
        self._take(step, older)
        self._commits = [self._commits[-1], older]

    @torch.no_grad()
    def restore(self, step: int) -> None:
        """Make the committed state of ``step`` current again (one of the last two commits).

        Raises:
            ValueError: ``step`` is not one of the commits held in memory.
        """
        for snap in reversed(self._commits):  # the newest of that step, if it was committed twice
            if snap.step == step:
                break
        else:
            raise ValueError(f"TorchElasticState.restore: step {step} is not committed in memory on rank "
                             f"{getattr(self.comm, 'rank', 0)} (held: {[c.step for c in self._commits]})")
        for live, saved in zip(self.model.module.state_dict().values(), snap.tensors):
            live.copy_(saved)
        state = self.optimizer.state
        for p, kept in zip(self._optim_params(), snap.optim):
            if kept is None:
                state.pop(p, None)
                continue
            st = state[p]
            for k in [k for k in st if k not in kept]:
                del st[k]
            for k, v in kept.items():
                st[k] = _copy_into(st.get(k), v) if isinstance(v, torch.Tensor) else v
        for g, h in zip(self.optimizer.param_groups, snap.groups):
            g.update(h)
        self.extra = _copy_extra(snap.extra)
        for p in self.model.parameters():
            p.grad = None
        others = [c for c in self._commits if c is not snap]
        if others:
            self._spare = others[0]
        self._commits = [snap]

    # ------------------------------------------------------------ broadcast
    def _structure(self) -> list[dict[str, list[Any]] | None]:
        """The optimizer state's structure, per parameter: None (no state) or each key's kind (``tensor`` with
        its dtype and shape, ``int``, ``float``, ``bool``, or the name of a type no broadcast can carry)."""
        out: list[dict[str, list[Any]] | None] = []
        for st in self._commits[-1].optim:
            if st is None:
                out.append(None)
                continue
            out.append({k: (["tensor", str(v.dtype).removeprefix("torch."), list(v.shape)]
                            if isinstance(v, torch.Tensor) else [type(v).__name__]) for k, v in sorted(st.items())})
        return out

    def _layout(self) -> tuple[int, int]:
        """Checksums of (the optimizer state's structure, everything else that must agree: the parameter groups'
        parameters (dtypes and shapes), keys and kinds, ``extra``'s names and shapes)."""
        state = json.dumps(self._structure())
        rest = []
        for g in self.optimizer.param_groups:
            # The parameters too: a joining rank may differ from root in the state's structure alone, and one
            # whose optimizer updates other parameters must fail here with every rank, not in _adopt by itself.
            params = ",".join(f"{p.dtype}{tuple(p.shape)}" for p in g["params"])
            rest.append(f"params:[{params}];" + ";".join(f"{k}:{_kind(v)}" for k, v in sorted(g.items())
                                                          if k != "params"))
        # extra's numbers take root's value in the local type (broadcast_extra): their names must agree
        rest.append(";".join(f"{k}:{_kind(v) if isinstance(v, (torch.Tensor, np.ndarray)) else ''}"
                             for k, v in sorted(self.extra.items())))
        crc = zlib.crc32
        return crc(state.encode()) & 0x7FFFFFFF, crc("|".join(rest).encode()) & 0x7FFFFFFF

    @torch.no_grad()
    def _adopt(self, structure: list[dict[str, list[Any]] | None], root: int) -> None:
        """Give the optimizer state ``structure`` (root's), its values to be overwritten by the broadcast."""
        where = f"TorchElasticState.sync on rank {self.comm.rank} of {self.comm.size}"
        params = self._optim_params()
        if len(structure) != len(params):
            raise RuntimeError(f"{where}: rank {root}'s optimizer has state for {len(structure)} parameters, this "
                               f"rank's optimizer updates {len(params)}")
        state = self.optimizer.state
        for p, spec in zip(params, structure):
            if spec is None:
                state.pop(p, None)
                continue
            st = state[p]
            st.clear()
            for k, kind in spec.items():
                if kind[0] == "tensor":
                    st[k] = torch.zeros(kind[2], dtype=getattr(torch, kind[1]), device=p.device)
                else:
                    st[k] = _NUMBERS[kind[0]](0)

    @torch.no_grad()
    def sync(self, root: int = 0, params: bool = True, joining: bool = False) -> None:
        """Collective: every rank takes ``root``'s committed state: the step, the optimizer's state and
        hyperparameters, ``extra``, and the parameters and buffers too unless ``params=False`` or
        :meth:`DistributedDataParallel.rebind` has just sent them.

        Args:
            root: the rank whose commit every rank takes.
            params: broadcast the parameters and buffers as well.
            joining: this rank is a replacement (:meth:`join`): its optimizer state may differ in structure
                from ``root``'s (no momentum before a first step, say); it takes ``root``'s.

        Raises:
            RuntimeError: the optimizer state, its parameter groups or ``extra`` differ in structure between
                the ranks (on every rank alike), or ``root``'s state holds values no broadcast can carry for a
                joining rank.
        """
        comm = self.comm
        sent, self._params_sent = self._params_sent, False
        if comm is None or comm.size == 1:
            return
        snap = self._commits[-1]
        every = comm.allgather(np.array([[snap.step, *self._layout(), int(joining)]], np.int64))
        odd = [r for r in range(comm.size) if every[r, 2] != every[root, 2]
               or (every[r, 1] != every[root, 1] and not every[r, 3])]
        if odd:
            raise RuntimeError(f"TorchElasticState.sync on rank {comm.rank} of {comm.size}: the optimizer state, its "
                               f"parameter groups or extra of rank(s) {odd} differ in structure from rank {root}'s")
        step = int(every[root, 0])
        if any(every[r, 1] != every[root, 1] for r in range(comm.size)):  # replacements take root's structure
            text = json.dumps(self._structure()).encode() if comm.rank == root else b""
            size = np.array([len(text)], np.int64)
            comm.broadcast(size, root=root, out=size)
            raw = np.frombuffer(text, np.uint8).copy() if comm.rank == root else np.empty(int(size[0]), np.uint8)
            comm.broadcast(raw, root=root, out=raw)
            structure = json.loads(raw.tobytes().decode())
            carried = {"tensor", *_NUMBERS}
            bad = sorted({kind[0] for spec in structure if spec for kind in spec.values()} - carried)
            if bad:
                raise RuntimeError(f"TorchElasticState.sync on rank {comm.rank} of {comm.size}: rank {root}'s "
                                   f"optimizer state holds values of type(s) {bad}, which a joining rank cannot "
                                   "receive (tensors and numbers only)")
            if every[comm.rank, 1] != every[root, 1]:
                self._adopt(structure, root)
        if params and not sent:
            self.model._broadcast_state()
        for p in self._optim_params():  # the parameters' order: the state dict's may differ after a restore
            st = self.optimizer.state.get(p) or {}
            for k in sorted(st):
                st[k] = _broadcast_value(comm, st[k], root)
        self._broadcast_groups(root)
        tensors = {k: v for k, v in self.extra.items() if isinstance(v, torch.Tensor)}
        for k in sorted(tensors):
            buf = tensors[k].detach().contiguous()
            flat = buf.view(-1)
            comm.broadcast(flat, root=root, out=flat)
            self.extra[k] = buf
        rest = {k: v for k, v in self.extra.items() if k not in tensors}
        broadcast_extra(comm, rest, root)
        self.extra.update(rest)
        self._commits = [self._take(step, snap)]

    def _broadcast_groups(self, root: int) -> None:
        """Every rank takes ``root``'s hyperparameters (``lr`` ...): numbers and tuples of numbers in one broadcast,
        tensors each in place; other values (flags, None) are the program's, the same everywhere (checked)."""
        comm = self.comm
        numbers: list[float] = []
        for g in self.optimizer.param_groups:
            for k in sorted(g):
                v = g[k]
                if k == "params" or isinstance(v, torch.Tensor):
                    continue
                if isinstance(v, (int, float)):
                    numbers.append(float(v))
                elif isinstance(v, (tuple, list)) and all(isinstance(e, (int, float)) for e in v):
                    numbers.extend(float(e) for e in v)
        a = np.array(numbers, np.float64)
        if a.size:
            comm.broadcast(a, root=root, out=a)
        it = iter(a.tolist())
        for g in self.optimizer.param_groups:
            for k in sorted(g):
                v = g[k]
                if k == "params":
                    continue
                if isinstance(v, torch.Tensor):
                    g[k] = _broadcast_value(comm, v, root)
                elif isinstance(v, (int, float)):
                    g[k] = type(v)(next(it))
                elif isinstance(v, (tuple, list)) and all(isinstance(e, (int, float)) for e in v):
                    g[k] = type(v)(type(e)(next(it)) for e in v)

    # ------------------------------------------------------------ rebind
    def _bind(self, comm: Any, rebuild: bool) -> None:
        """Reshard first (a global batch the survivors cannot split raises before anything changes), then rebind."""
        if self.sampler is not None:
            self.sampler.reshard(comm.rank, comm.size)
        if rebuild:
            self.model.rebind(comm)
            self._params_sent = comm.size > 1

    def _sampler(self) -> Any:
        return self.sampler

    def rebind(self, comm: Any) -> None:
        """Collective over ``comm``: go on training on another communicator (e.g. a subgroup), from its rank 0's
        commit: rebuilds the model's buckets there, reshards the sampler and broadcasts the committed state.

        Example::

            sub = comm.subgroup([0, 1, 2])
            if sub is not None:
                state.rebind(sub)
        """
        self.restore(self.committed_step)
        self._bind(comm, rebuild=True)
        self.sync(0)

    # ------------------------------------------------------------ disk
    def _default_stop_dir(self) -> Path:
        return Path("elastic-checkpoint")

    def _stop_hint(self, where: Path) -> str:
        return " Load it with TorchElasticState.load(path) on a fresh job"

    def arrays(self) -> dict[str, np.ndarray]:
        """The newest commit as named NumPy arrays: ``model/NAME``, ``optim/I/KEY``, ``extra/NAME``, ``step``."""
        snap = self._commits[-1]
        out: dict[str, np.ndarray] = {"step": np.array(snap.step, np.int64)}
        for name, t in zip(self.model.module.state_dict().keys(), snap.tensors):
            out[f"model/{name}"] = t.detach().cpu().numpy().copy()
        for i, st in enumerate(snap.optim):
            for k, v in (st or {}).items():
                out[f"optim/{i}/{k}"] = (v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor)
                                         else np.array(v))
        for k, v in snap.extra.items():
            out[f"extra/{k}"] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        return out

    def save(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Rank 0 writes the newest commit to ``directory/elastic-STEP.npz`` (:meth:`arrays`; no pickle).

        Returns:
            The file's path (on every rank), or None without a directory.
        """
        where = Path(directory) if directory is not None else self.stop_dir
        if where is None:
            return None
        path = where / f"elastic-{self.committed_step:08d}.npz"
        if self.comm is None or self.comm.rank == 0:
            where.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **self.arrays())  # type: ignore[arg-type]
            os.replace(tmp, path)
        return path

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> int:
        """Load a file :meth:`save` wrote into the model, the optimizer and ``extra``; it becomes the commit.

        Local (every rank loads the same file). Returns the step.

        Raises:
            ValueError: the file does not match the model (names or shapes).
        """
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        sd = self.model.module.state_dict()
        missing = [k for k in sd if f"model/{k}" not in data]
        bad = [k for k, t in sd.items() if f"model/{k}" in data and tuple(data[f"model/{k}"].shape) != tuple(t.shape)]
        unknown = [k[len("model/"):] for k in data if k.startswith("model/") and k[len("model/"):] not in sd]
        if missing or bad or unknown:
            raise ValueError(f"TorchElasticState.load({path}): the file does not match the model (missing "
                             f"{missing[:4]}, other shapes {bad[:4]}, not in the model {unknown[:4]})")
        for k, t in sd.items():
            t.copy_(torch.from_numpy(data[f"model/{k}"]))
        state = self.optimizer.state
        for i, p in enumerate(self._optim_params()):
            pre = f"optim/{i}/"
            keys = [k[len(pre):] for k in data if k.startswith(pre)]
            if not keys:
                state.pop(p, None)
                continue
            st = state[p]
            st.clear()
            for k in keys:
                a = data[pre + k]
                st[k] = torch.from_numpy(a.copy())
        for k in [k[len("extra/"):] for k in data if k.startswith("extra/")]:
            v = self.extra.get(k)
            a = data[f"extra/{k}"]
            self.extra[k] = (torch.from_numpy(a.copy()) if isinstance(v, torch.Tensor)
                             else a if isinstance(v, np.ndarray) or a.ndim else type(v if v is not None else 0.0)(a))
        step = int(data["step"])
        self._commits = [self._take(step, self._commits[-1])]
        return step
