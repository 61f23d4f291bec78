"""Horovod's PyTorch collectives (allreduce, allgather, broadcast, alltoall, reducescatter, ...) on collective."""
from __future__ import annotations

import atexit
import itertools
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..engine import Engine, Handle
from ..exceptions import HorovodInternalError

__all__ = [
    "Adasum",
    "Average",
    "HorovodInternalError",
    "Max",
    "Min",
    "ProcessSet",
    "Product",
    "Sum",
    "add_process_set",
    "allgather",
    "allgather_async",
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "alltoall",
    "alltoall_async",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "global_process_set",
    "gloo_built",
    "gloo_enabled",
    "grouped_allgather",
    "grouped_allgather_async",
    "grouped_allreduce",
    "grouped_allreduce_",
    "grouped_allreduce_async",
    "grouped_allreduce_async_",
    "grouped_reducescatter",
    "grouped_reducescatter_async",
    "init",
    "is_homogeneous",
    "is_initialized",
    "join",
    "local_rank",
    "local_size",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "poll",
    "rank",
    "reducescatter",
    "reducescatter_async",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "sparse_allreduce_async",
    "start_timeline",
    "stop_timeline",
    "synchronize",
]

# Horovod's op constants (the same integers, so code that stores them keeps working).
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}
_REDUCE = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "prod"}
_INT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SUPPORTED = _INT_TYPES + (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)


class _State:
    """The process-wide state of collective.horovod: the communicator, its engine, process sets, handles."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.comm: Any = None
        self.engine: Engine | None = None
        self.sets: dict[int, ProcessSet] = {}
        self.next_set_id = 1
        self.handles: dict[int, tuple[Handle, Any]] = {}
        self.handle_ids = itertools.count(1)
        self.counters: dict[str, int] = {}
        self.atexit = False
        #: Set by a recovery from lost ranks: grow back to ``COLLECTIVE_MAX_RANKS`` at the next commit.
        self.grow_pending = False
        #: The RanksLostError of a failed grow (its engine had stopped cleanly, so it holds none).
        self.lost: Any = None
        #: This process was spawned by a grow and has joined the grown communicator (in its first init).
        self.joined = False


_state = _State()


# ------------------------------------------------------------------ process sets
class ProcessSet:
    """A subset of the ranks that collectives may be limited to (``process_set=``), as in Horovod.

    Args:
        ranks_or_comm: the global ranks of the set (a list), or an mpi4py communicator whose members form it.

    Example::

        even = hvd.add_process_set([0, 2])
        hvd.allreduce(t, process_set=even)
    """

    def __init__(self, ranks_or_comm: Any) -> None:
        self.process_set_id: int | None = None
        self.mpi_comm: Any = None  # an mpi4py communicator, when the set was made from one
        if isinstance(ranks_or_comm, (list, tuple, range)):
            self.ranks: list[int] | None = sorted(int(r) for r in ranks_or_comm)
        else:
            self.mpi_comm = ranks_or_comm
            self.ranks = None
        self.engine: Engine | None = None

    def _require(self) -> None:
        if self.process_set_id is None:
            raise ValueError(f"{self!r} has not been registered; call hvd.add_process_set() on every rank first")

    def size(self) -> int:
        """Number of ranks in the set."""
        self._require()
        return len(self.ranks)  # type: ignore[arg-type]

    def rank(self) -> int:
        """This rank's index in the set, or -1 if this rank is not a member."""
        self._require()
        r = rank()
        ranks = self.ranks
        assert ranks is not None  # registering a set settles its ranks
        return ranks.index(r) if r in ranks else -1

    def included(self) -> bool:
        """True if this rank is a member of the set."""
        self._require()
        return rank() in self.ranks  # type: ignore[operator]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessSet) and self.process_set_id == other.process_set_id \
            and self.process_set_id is not None

    def __hash__(self) -> int:
        return hash(("ProcessSet", self.process_set_id))

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet([])
global_process_set.process_set_id = 0


def _engine_for(process_set: ProcessSet, what: str) -> tuple[Engine, ProcessSet]:
    eng = _state.engine
    if eng is None:
        raise ValueError(f"{what}: Horovod has not been initialized; call hvd.init() first")
    if process_set is None or process_set.process_set_id == 0:
        return eng, global_process_set
    ps = _state.sets.get(process_set.process_set_id) if process_set.process_set_id is not None else None
    if ps is None:
        raise ValueError(f"{what}: {process_set!r} is not registered; call hvd.add_process_set() on every rank")
    if ps.engine is None:
        raise ValueError(f"{what} on rank {rank()}: this rank is not a member of process set "
                         f"{ps.process_set_id} (ranks {ps.ranks})")
    return ps.engine, ps


def _set_size(ps: ProcessSet) -> int:
    return size() if ps.process_set_id == 0 else len(ps.ranks)  # type: ignore[arg-type]


def _on_control(kind: str, q: dict, eng: Engine) -> Any:
    """Run add/remove_process_set on the global engine thread, once every rank asked for it."""
    comm = _state.comm
    if kind == "add_process_set":
        ranks = q["ranks"]
        # Collective over the members only; every member reaches this op in the same order on this thread.
        sub = comm.subgroup(ranks)
        return Engine(sub, ranks) if sub is not None else None
    ps = _state.sets.get(q["id"])
    if ps is not None and ps.engine is not None:
        ps.engine.shutdown()
        close = getattr(ps.engine.comm, "close", None)
        if close is not None:
            close()
    return None


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Register a process set on every rank (a collective over all ranks); returns it with its id.

    Args:
        process_set: a ProcessSet or a list of global ranks.

    Raises:
        ValueError: the ranks are out of range, repeated, or already form a set.
        HorovodInternalError: the communicator cannot form sub-communicators.
    """
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(list(process_set))
    eng, _ = _engine_for(global_process_set, "add_process_set")
    if ps.ranks is None:
        grp = ps.mpi_comm.Get_group()
        from mpi4py import MPI

        ps.ranks = sorted(MPI.Group.Translate_ranks(grp, list(range(grp.Get_size())), MPI.COMM_WORLD.Get_group()))
    if not ps.ranks or len(set(ps.ranks)) != len(ps.ranks) or not all(0 <= r < size() for r in ps.ranks):
        raise ValueError(f"add_process_set on rank {rank()}: ranks {ps.ranks} must be distinct, in [0, {size()})")
    for other in _state.sets.values():
        if other.ranks == ps.ranks:
            raise ValueError(f"add_process_set on rank {rank()}: a process set with ranks {ps.ranks} already "
                             f"exists (id {other.process_set_id})")
    name = f"add_process_set.{_next_name('add_process_set')}"
    sub_engine = eng.submit("add_process_set", name, [], ranks=ps.ranks).wait()
    with _state.lock:
        ps.process_set_id = _state.next_set_id
        _state.next_set_id += 1
        ps.engine = sub_engine
        _state.sets[ps.process_set_id] = ps
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a process set on every rank (a collective over all ranks); False if it was not registered."""
    eng, _ = _engine_for(global_process_set, "remove_process_set")
    if process_set.process_set_id in (None, 0) or process_set.process_set_id not in _state.sets:
        return False
    name = f"remove_process_set.{_next_name('remove_process_set')}"
    eng.submit("remove_process_set", name, [], id=process_set.process_set_id).wait()
    with _state.lock:
        _state.sets.pop(process_set.process_set_id, None)
        process_set.engine = None
        process_set.process_set_id = None
    return True


# ------------------------------------------------------------------ init and queries
def init(comm: Any = None, process_sets: Sequence[ProcessSet] | None = None) -> None:
    """Initialize Horovod on collective: a communicator over ``MPI.COMM_WORLD`` (or ``comm``) and the op engine.

    The communicator is Horovod's own (a duplicate of the MPI communicator), so
    Horovod's ops never interleave with direct calls to collective in the same script.
    In a process that ``hvd.elastic`` spawned to replace a lost rank (see
    :func:`grow_to_max_ranks`), the first ``init()`` joins the running job
    instead: ``size()`` and ``rank()`` are the grown job's (the new processes
    come last), and ``@hvd.elastic.run`` then takes rank 0's committed state.

    Args:
        comm: None (``MPI.COMM_WORLD``), an mpi4py communicator, or a list of ranks of COMM_WORLD.
        process_sets: process sets to register right away (a collective over all ranks).

    Example::

        import collective.horovod.torch as hvd
        hvd.init()
        print(hvd.rank(), hvd.size())
    """
    with _state.lock:
        if _state.engine is not None and _state.engine.running:
            return
        import collective
        from collective.watchdog import install_excepthook

        # A communicator of its own: the engine thread is then its only caller, so a script that also calls
        # collective directly (or torch.distributed on collective) never interleaves with Horovod's ops.
        if comm is None:
            c = _grown_communicator() or collective.Communicator()
        else:
            from mpi4py import MPI

            if isinstance(comm, (list, tuple)):
                mine = MPI.COMM_WORLD.Get_rank() in comm
                mc = MPI.COMM_WORLD.Create_group(MPI.COMM_WORLD.Get_group().Incl(list(comm)))
                if not mine:
                    raise ValueError(f"init: rank {MPI.COMM_WORLD.Get_rank()} is not in comm={list(comm)}")
            else:
                mc = comm
            c = collective.Communicator(mc)
        install_excepthook(c.rank, c.size)
        _state.comm = c
        global_process_set.ranks = list(range(c.size))
        _state.engine = Engine(c, on_control=_on_control)
        _state.counters.clear()
        if not _state.atexit:
            atexit.register(shutdown)
            _state.atexit = True
    for ps in process_sets or ():
        add_process_set(ps)


def _grown_communicator() -> Any:
    """In a process spawned by :func:`grow_to_max_ranks` (its first init only): the grown communicator, else None."""
    if _state.joined:
        return None
    from collective.communicator import take_parent

    grown = take_parent("hvd.init()")
    _state.joined = grown is not None
    return grown


def shutdown() -> None:
    """Stop the op engine once every rank has called shutdown (at exit this happens by itself)."""
    with _state.lock:
        eng, _state.engine = _state.engine, None
        sets = list(_state.sets.values())
        _state.sets.clear()
    for ps in sets:
        if ps.engine is not None:
            ps.engine.shutdown()
        ps.engine, ps.process_set_id = None, None
    if eng is not None:
        eng.shutdown()


def is_initialized() -> bool:
    """True between :func:`init` and :func:`shutdown`."""
    return _state.engine is not None


def _comm(what: str) -> Any:
    if _state.comm is None or _state.engine is None:
        raise ValueError(f"{what}: Horovod has not been initialized; call hvd.init() first")
    return _state.comm


def size() -> int:
    """Number of ranks."""
    return int(_comm("size").size)


def rank() -> int:
    """This process's rank (a plain int, as Horovod returns)."""
    return int(_comm("rank").rank)


def local_size() -> int:
    """Number of ranks on this node."""
    return int(_comm("local_size").local_size)


def local_rank() -> int:
    """This process's rank among the ranks of its node."""
    return int(_comm("local_rank").local_rank)


def _nodes() -> list[int]:
    nodes = list(_comm("cross_rank").cluster.node_of_rank)
    return nodes


def cross_size() -> int:
    """Number of nodes (Horovod: ranks sharing this local rank across nodes)."""
    nodes = _nodes()
    lr = local_rank()
    # Ranks with this local rank, one per node that has that many ranks.
    return sum(1 for n in sorted(set(nodes)) if nodes.count(n) > lr)


def cross_rank() -> int:
    """This rank's node index among the nodes holding a rank with this local rank."""
    nodes = _nodes()
    lr = local_rank()
    mine = nodes[rank()]
    return [n for n in sorted(set(nodes)) if nodes.count(n) > lr].index(mine)


def is_homogeneous() -> bool:
    """True if every node runs the same number of ranks."""
    nodes = _nodes()
    return len({nodes.count(n) for n in set(nodes)}) == 1


def mpi_threads_supported() -> bool:
    """True: the engine thread and the caller use MPI concurrently (MPI_THREAD_MULTIPLE)."""
    c = _comm("mpi_threads_supported")
    from mpi4py import MPI

    return c.thread_level >= MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    """True: every collective runs over MPI."""
    return True


def mpi_built() -> bool:
    """True: collective always runs over MPI."""
    return True


def gloo_enabled() -> bool:
    """False: there is no Gloo controller."""
    return False


def gloo_built() -> bool:
    """False: there is no Gloo controller."""
    return False


def nccl_built() -> int:
    """0: torch GPU tensors are staged through host memory; no NCCL op runs for them."""
    return 0


def ddl_built() -> bool:
    """False: IBM DDL is not supported."""
    return False


def ccl_built() -> bool:
    """False: oneCCL is not supported."""
    return False


def cuda_built() -> bool:
    """False: no CUDA kernels are built; GPU tensors are accepted and staged through host memory."""
    return False


def rocm_built() -> bool:
    """False: no ROCm kernels are built."""
    return False


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Not supported: collective writes its own trace (COLLECTIVE_TIMELINE); raises NotImplementedError."""
    raise NotImplementedError("start_timeline: Horovod's timeline is not supported by collective.horovod; "
                              "collective's op trace is enabled with COLLECTIVE_TIMELINE")


def stop_timeline() -> None:
    """Not supported (see :func:`start_timeline`)."""
    raise NotImplementedError("stop_timeline: Horovod's timeline is not supported by collective.horovod")


# ------------------------------------------------------------------ elastic mode
def lost_ranks_error() -> Any:
    """The ``RanksLostError`` behind Horovod's communicator once one of its collectives raised it (else None).

    In elastic mode (``collective-run --elastic``) a lost rank fails every
    pending and later op with ``HorovodInternalError``; this tells that case
    apart from the others (mismatched ops, a shut-down engine), which no
    recovery can mend.
    """
    eng = _state.engine
    if eng is not None and eng.lost is not None:
        return eng.lost
    return _state.lost


def continue_on_survivors() -> Any:
    """Collective over the survivors of a lost rank: Horovod goes on over them; returns the RanksLostError.

    Waits for the engine thread of the failed communicator to end, shrinks
    the communicator (``Communicator.shrink``: ranks renumbered 0..n-1 in
    their old order, so the lowest survivor is the new rank 0), starts a new
    engine over it, and forgets the registered process sets (their ranks
    changed: register them again, e.g. in a reset callback). ``size()``,
    ``rank()`` and every op then follow the new communicator. With
    ``COLLECTIVE_MAX_RANKS`` above the survivors' number, the next commit
    grows Horovod back to it (:func:`grow_to_max_ranks`).

    Raises:
        ValueError: Horovod is not initialized, or no rank was lost.
        HorovodInternalError: the engine thread did not end within the deadline (``COLLECTIVE_TIMEOUT``), or
            fewer ranks are left than ``COLLECTIVE_MIN_RANKS`` (``collective-run --min-ranks``).
    """
    from ...config import get as config_get

    with _state.lock:
        eng, comm = _state.engine, _state.comm
        if eng is None or comm is None:
            raise ValueError("hvd.elastic: Horovod has not been initialized; call hvd.init() first")
        lost = eng.lost if eng.lost is not None else _state.lost
        if lost is None:
            raise ValueError(f"hvd.elastic on rank {comm.rank}: no rank was lost; nothing to recover from")
        # The failed communicator fails every call now, so its engine thread ends at its next exchange.
        if not eng.wait_stopped(eng.timeout):
            raise HorovodInternalError(f"hvd.elastic on rank {comm.rank}: the engine of the failed communicator "
                                       f"did not stop within {eng.timeout:.0f} s (COLLECTIVE_TIMEOUT)")
        sets = list(_state.sets.values())
        _state.sets.clear()
        for ps in sets:  # their sub-communicators were retired with the communicator they came from
            ps.engine, ps.process_set_id = None, None
        new = comm.shrink()
        _state.comm = new
        global_process_set.ranks = list(range(new.size))
        _state.engine = Engine(new, on_control=_on_control)
        _state.counters.clear()
        _state.lost = None
        _state.grow_pending = True
    least = int(config_get("MIN_RANKS"))
    if new.size < least:
        raise HorovodInternalError(
            f"hvd.elastic on job rank {new.world_rank}: {new.size} rank(s) left after losing job rank(s) "
            f"{list(lost.lost_ranks)}, fewer than the minimum {least} (collective-run --min-ranks); training stops "
            "at the last commit (the state was restored to it)")
    return lost


def grow_to_max_ranks() -> bool:
    """Collective: after a recovery from lost ranks, spawn replacements until Horovod has ``COLLECTIVE_MAX_RANKS``.

    Does nothing (returns False) unless a recovery (:func:`continue_on_survivors`)
    happened since the last call and ``COLLECTIVE_MAX_RANKS``
    (``collective-run --max-ranks``) is above ``size()``; every rank decides
    alike. Otherwise it stops the op engines (every op has finished: call it
    between steps, as ``state.commit()`` does), grows the communicator
    (``Communicator.grow``: the new processes run this program's command line,
    and their ``hvd.init()`` joins), and starts a new engine over it.
    ``size()`` and ``rank()`` then follow the grown communicator: the ranks
    keep their numbers, the new ones come last. Registered process sets are
    dropped, as at a recovery. If no process can be spawned here, Horovod
    goes on with the ranks it has and rank 0 writes a one-line note to stderr.

    Returns:
        True if ranks were added.

    Raises:
        HorovodInternalError: a rank was lost while the engines stopped or while growing (its cause is the
            ``RanksLostError``: ``@hvd.elastic.run`` recovers from it), or an engine did not stop within
            the deadline (``COLLECTIVE_TIMEOUT``).

    Example::

        if grow_to_max_ranks():             # what state.commit() does (hvd.elastic)
            raise hvd.HostsUpdatedInterrupt()
    """
    import sys

    from ...config import get as config_get
    from ...errors import CollectiveError, RanksLostError

    with _state.lock:
        eng, comm = _state.engine, _state.comm
        if not _state.grow_pending or eng is None or comm is None:
            return False
        _state.grow_pending = False
        top = config_get("MAX_RANKS")
        if top is None or comm.size >= int(top):
            return False
        count = int(top) - comm.size
        where = f"hvd.elastic on rank {comm.rank} of {comm.size}: growing back to {top} ranks"
        sets = list(_state.sets.values())
        _state.sets.clear()
        for ps in sets:  # their sub-communicators end with the communicator they came from
            if ps.engine is not None:
                ps.engine.shutdown()
            ps.engine, ps.process_set_id = None, None
        # The engine thread is the communicator's only caller: it stops (every rank alike) before grow() runs.
        eng.shutdown()
        if eng.lost is not None:
            raise HorovodInternalError(f"{where}: a rank was lost first ({eng.lost})") from eng.lost
        if eng.running:
            raise HorovodInternalError(f"{where}: the op engine did not stop within {eng.timeout:.0f} s "
                                       "(COLLECTIVE_TIMEOUT)")
        try:
            new = comm.grow(count)
        except RanksLostError as exc:
            _state.lost = exc  # the engine stopped before the loss: the recovery finds the error here
            raise HorovodInternalError(f"{where}: {exc}") from exc
        except CollectiveError as exc:  # nothing could be spawned: go on with the ranks there are
            if comm.rank == 0:
                ranks = f"{comm.size} rank" + ("" if comm.size == 1 else "s")
                sys.stderr.write(f"hvd.elastic: no replacements ({exc}); going on with {ranks}\n")
                sys.stderr.flush()
            _state.engine = Engine(comm, on_control=_on_control)
            _state.counters.clear()
            return False
        _state.comm = new
        global_process_set.ranks = list(range(new.size))
        _state.engine = Engine(new, on_control=_on_control)
        _state.counters.clear()
    return True


# ------------------------------------------------------------------ tensor helpers
def _next_name(kind: str) -> int:
    with _state.lock:
        n = _state.counters.get(kind, 0)
        _state.counters[kind] = n + 1
    return n


def _name(kind: str, name: str | None, ps: ProcessSet) -> str:
    """``name``, or the next automatic one; each process set counts on its own, since only its members call it."""
    if name is not None:
        return name
    if not ps.process_set_id:
        return f"{kind}.noname.{_next_name(kind)}"
    tag = f"{kind}.set{ps.process_set_id}"
    return f"{tag}.noname.{_next_name(tag)}"


def _check_tensor(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):  # Horovod raises ValueError here, so that is what its users catch
        raise ValueError(f"{what} on rank {rank()}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    if t.dtype not in _SUPPORTED:
        raise ValueError(f"{what} on rank {rank()}: tensor type {t.dtype} is not supported "
                         f"(shape {tuple(t.shape)}); use an integer, float16/bfloat16/float32/float64 or bool tensor")
    if t.is_sparse:
        raise ValueError(f"{what} on rank {rank()}: sparse tensors go through sparse_allreduce_async or "
                         "DistributedOptimizer(sparse_as_dense=...)")
    return t


def _to_numpy(t: torch.Tensor, reducing: bool = False) -> np.ndarray:
    """A host NumPy view (or copy) of ``t`` for the engine; bfloat16 travels as float32 when reduced, else as bits."""
    x = t.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    if x.dtype == torch.bfloat16:
        x = x.float() if reducing else x.view(torch.int16)
    elif x.dtype == torch.bool:
        if reducing:
            raise ValueError(f"allreduce on rank {rank()}: bool tensors cannot be reduced; use uint8")
        x = x.view(torch.uint8)
    return x.numpy()


def _from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    out = torch.from_numpy(a if a.flags.c_contiguous else a.copy())  # ascontiguousarray would make 0-d 1-d
    if like.dtype == torch.bfloat16:
        out = out.view(torch.bfloat16) if out.dtype == torch.int16 else out.to(torch.bfloat16)
    elif like.dtype == torch.bool:
        out = out.view(torch.bool)
    elif out.dtype != like.dtype:
        out = out.to(like.dtype)
    if like.device.type != "cpu":
        out = out.to(like.device)
    return out


def _out_view(t: torch.Tensor, like: np.ndarray) -> np.ndarray | None:
    """A NumPy view of ``t``'s memory that an allreduce of ``like`` can write its result into, or None.

    Only a contiguous host tensor whose dtype travels as itself qualifies
    (bfloat16 is reduced as float32, bool is refused).
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype in (torch.bfloat16, torch.bool):
        return None
    v = t.detach().numpy()
    return v if v.dtype == like.dtype and v.shape == like.shape else None


#: Results of these dtypes (bfloat16 travels as float32) are averaged and postscaled by the engine, with one
#: factor, before their handle completes; integers and float16 are scaled the way Horovod scales them, in finish.
_ENGINE_SCALED = (np.dtype(np.float32), np.dtype(np.float64))


def _finish_in_place(t: torch.Tensor, postscale: float, average: bool, n: int) -> torch.Tensor:
    """Scale and average ``t`` (an integer or float16 tensor), which already holds the sum."""
    with torch.no_grad():
        y = _scale(t, postscale)
        if average:
            y = _average(y, n)
        if y is not t:
            t.copy_(y)
    return t


def _scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t * factor`` the way Horovod scales: integers in float64, float16 in float32, cast back."""
    if factor == 1.0:
        return t
    if t.dtype in _INT_TYPES:
        return (t.double() * factor).to(t.dtype)
    if t.dtype in (torch.float16, torch.bfloat16):
        return (t.float() * factor).to(t.dtype)
    return t * factor


def _average(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.dtype in _INT_TYPES:
        return torch.div(t, n, rounding_mode="trunc")
    if t.dtype in (torch.float16, torch.bfloat16):
        return (t.float() / n).to(t.dtype)
    return t / n


def _resolve_op(op: Any, average: Any, what: str) -> int:
    if op is not None and average is not None:
        raise ValueError(f"{what}: the op parameter supersedes average; pass only one of them")
    if op is None:
        op = Average if average is None or average else Sum
        if average is not None:
            warnings.warn("Parameter `average` has been replaced with `op` and will be removed in v1.0",
                          DeprecationWarning)
    if op == Adasum:
        raise NotImplementedError(f"{what}: op=hvd.Adasum is not supported by collective.horovod; use "
                                  "hvd.Average or hvd.Sum")
    if op not in _REDUCE:
        raise ValueError(f"{what}: unknown op {op!r}; use hvd.Average, hvd.Sum, hvd.Min, hvd.Max or hvd.Product")
    return op


def _register(h: Handle, finish: Any) -> int:
    hid = next(_state.handle_ids)
    with _state.lock:
        _state.handles[hid] = (h, finish)
    return hid


# ------------------------------------------------------------------ allreduce
def _allreduce_start(tensors: list[torch.Tensor], outputs: list[torch.Tensor] | None, name: str | None, op: int,
                     prescale: float, postscale: float, process_set: ProcessSet, kind: str, single: bool = False,
                     wake: bool = True) -> tuple[Handle, Any]:
    """Submit an allreduce of ``tensors``: its handle, and the function that turns the handle's result into the
    tensor(s) the caller gets. ``wake``: False when the caller waits at once (it then runs the engine's tick)."""
    eng, ps = _engine_for(process_set, kind)
    for t in tensors:
        _check_tensor(t, kind)
    arrays = [_to_numpy(_scale(t.detach(), prescale), reducing=True) for t in tensors]
    n = _set_size(ps)
    dest = None
    if outputs is not None:
        dest = []
        for o, t, a in zip(outputs, tensors, arrays):
            v = _out_view(o, a)
            if v is not None and o is t and prescale == 1.0:
                v = a  # a is already a view of o's memory: the very same array lets the collective run in place
            dest.append(v)
    by_engine = [a.dtype in _ENGINE_SCALED for a in arrays]
    factor = postscale / n if op == Average else postscale
    scales = [factor if e else 1.0 for e in by_engine] if factor != 1.0 else None
    h = eng.submit("allreduce", _name(kind, name, ps), arrays, outs=dest, scales=scales, wake=wake, op=_REDUCE[op],
                   prescale=prescale, postscale=postscale)
    rest = postscale != 1.0 or op == Average  # what is left to do for the dtypes the engine does not scale

    def finish(results: list[np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
        outs = []
        for i, (t, r) in enumerate(zip(tensors, results)):
            if dest is not None and dest[i] is not None and r is dest[i]:
                if rest and not by_engine[i]:
                    _finish_in_place(outputs[i], postscale, op == Average, n)  # type: ignore[index]
                outs.append(outputs[i])  # type: ignore[index]
                continue
            y = _from_numpy(r, t)
            if rest and not by_engine[i]:
                y = _scale(y, postscale)
                if op == Average:
                    y = _average(y, n)
            if outputs is not None:
                outputs[i].copy_(y)
                y = outputs[i]
            outs.append(y)
        return outs[0] if single else outs

    return h, finish


def _allreduce_submit(tensors: list[torch.Tensor], outputs: list[torch.Tensor] | None, name: str | None, op: int,
                      prescale: float, postscale: float, process_set: ProcessSet, kind: str,
                      single: bool = False) -> int:
    """Start an allreduce (see :func:`_allreduce_start`); its handle id for :func:`poll` and :func:`synchronize`."""
    return _register(*_allreduce_start(tensors, outputs, name, op, prescale, postscale, process_set, kind, single))


def _allreduce_now(tensors: list[torch.Tensor], outputs: list[torch.Tensor] | None, name: str | None, op: int,
                   prescale: float, postscale: float, process_set: ProcessSet, kind: str,
                   single: bool = False) -> Any:
    """Run an allreduce to the end on the calling thread (what :func:`synchronize` of a submitted one returns)."""
    h, finish = _allreduce_start(tensors, outputs, name, op, prescale, postscale, process_set, kind, single,
                                 wake=False)
    return finish(h.wait())


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: int | None = None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start an allreduce of ``tensor`` (not modified); :func:`synchronize` on the handle returns the result.

    Args:
        tensor: the tensor to reduce (same shape and dtype on every rank for this name).
        average: deprecated; use ``op``.
        name: the name that matches this op across ranks (auto-generated if None).
        op: hvd.Average (default), hvd.Sum, hvd.Min, hvd.Max or hvd.Product.
        prescale_factor: multiply before the reduction (integers in float64, float16 in float32).
        postscale_factor: multiply after the reduction.
        process_set: limit the op to these ranks.

    Returns:
        A handle for :func:`poll` and :func:`synchronize`.
    """
    op = _resolve_op(op, average, "allreduce_async")
    return _allreduce_submit([tensor], None, name, op, prescale_factor, postscale_factor, process_set, "allreduce",
                             True)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """In-place :func:`allreduce_async`: the result is written into ``tensor``."""
    op = _resolve_op(op, average, "allreduce_async_")
    return _allreduce_submit([tensor], [tensor], name, op, prescale_factor, postscale_factor, process_set,
                             "allreduce", True)


class HorovodAllreduce(torch.autograd.Function):
    """Allreduce with a gradient: the gradient is allreduced with the same op and factors."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: Any, op: int, prescale: float, postscale: float,
                process_set: ProcessSet) -> torch.Tensor:
        ctx.op, ctx.prescale, ctx.postscale, ctx.process_set = op, prescale, postscale, process_set
        return _allreduce_now([tensor], None, name, op, prescale, postscale, process_set, "allreduce", True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        g = allreduce(grad, op=ctx.op, prescale_factor=ctx.prescale, postscale_factor=ctx.postscale,
                      process_set=ctx.process_set)
        return g, None, None, None, None, None


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, compression: Any = None,
              op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce ``tensor`` over all ranks (default: average); differentiable. ``tensor`` is not modified.

    Example::

        avg = hvd.allreduce(torch.tensor([float(hvd.rank())]))   # mean of the ranks
    """
    from .compression import Compression

    compression = compression or Compression.none
    op = _resolve_op(op, average, "allreduce")
    compressed, cctx = compression.compress(tensor)
    if torch.is_grad_enabled() and getattr(compressed, "requires_grad", False):
        out = HorovodAllreduce.apply(compressed, name, op, prescale_factor, postscale_factor, process_set)
    else:  # what apply would return, without the autograd node
        out = _allreduce_now([compressed], None, name, op, prescale_factor, postscale_factor, process_set,
                             "allreduce", True)
    return compression.decompress(out, cctx)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: int | None = None,
               prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """In-place :func:`allreduce`: ``tensor`` holds the result, which is returned."""
    op = _resolve_op(op, average, "allreduce_")
    return _allreduce_now([tensor], [tensor], name, op, prescale_factor, postscale_factor, process_set, "allreduce",
                          True)


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None,
                            op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start one fused allreduce of every tensor in ``tensors``; synchronize returns the list of results."""
    op = _resolve_op(op, average, "grouped_allreduce_async")
    return _allreduce_submit(list(tensors), None, name, op, prescale_factor, postscale_factor, process_set,
                             "grouped_allreduce")


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None,
                             op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    """In-place :func:`grouped_allreduce_async`."""
    op = _resolve_op(op, average, "grouped_allreduce_async_")
    return _allreduce_submit(list(tensors), list(tensors), name, op, prescale_factor, postscale_factor,
                             process_set, "grouped_allreduce")


class HorovodGroupedAllreduce(torch.autograd.Function):
    """Grouped allreduce with a gradient (a grouped allreduce of the gradients)."""

    @staticmethod
    def forward(ctx: Any, name: Any, op: int, prescale: float, postscale: float, process_set: ProcessSet,
                *tensors: torch.Tensor) -> tuple:
        ctx.op, ctx.prescale, ctx.postscale, ctx.process_set = op, prescale, postscale, process_set
        return tuple(_allreduce_now(list(tensors), None, name, op, prescale, postscale, process_set,
                                    "grouped_allreduce"))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        g = grouped_allreduce(list(grads), op=ctx.op, prescale_factor=ctx.prescale, postscale_factor=ctx.postscale,
                              process_set=ctx.process_set)
        return (None, None, None, None, None, *g)


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None,
                      compression: Any = None, op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: ProcessSet = global_process_set) -> list:
    """Reduce every tensor in ``tensors`` in one fused op; differentiable; returns a list."""
    from .compression import Compression

    compression = compression or Compression.none
    op = _resolve_op(op, average, "grouped_allreduce")
    pairs = [compression.compress(t) for t in tensors]
    outs = HorovodGroupedAllreduce.apply(name, op, prescale_factor, postscale_factor, process_set,
                                         *[p[0] for p in pairs])
    return [compression.decompress(o, p[1]) for o, p in zip(outs, pairs)]


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None,
                       op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> list:
    """In-place :func:`grouped_allreduce`."""
    op = _resolve_op(op, average, "grouped_allreduce_")
    return _allreduce_now(list(tensors), list(tensors), name, op, prescale_factor, postscale_factor, process_set,
                          "grouped_allreduce")


def sparse_allreduce_async(tensor: torch.Tensor, name: str | None, op: int,
                           process_set: ProcessSet = global_process_set) -> Any:
    """Allreduce a sparse tensor by allgathering its indices and values; returns a callable giving the result.

    Every rank's nonzeros are concatenated and coalesced (duplicates summed);
    hvd.Average divides by the number of ranks. Only Sum and Average are defined.
    """
    if op not in (Sum, Average):
        raise ValueError(f"sparse_allreduce_async: op {_OP_NAMES.get(op, op)} is not defined for sparse "
                         "tensors; use hvd.Sum or hvd.Average")
    t = tensor.coalesce()
    idx = t.indices().t().contiguous()
    hi = allgather_async(idx, name=f"{name}.indices", process_set=process_set)
    hv = allgather_async(t.values(), name=f"{name}.values", process_set=process_set)
    n = _set_size(_engine_for(process_set, "sparse_allreduce_async")[1])

    def result() -> torch.Tensor:
        i, v = synchronize(hi), synchronize(hv)
        if op == Average:
            v = _average(v, n)
        return torch.sparse_coo_tensor(i.t(), v, tensor.size(), check_invariants=True).coalesce()

    return result


# ------------------------------------------------------------------ allgather
def _allgather_submit(tensors: list[torch.Tensor], name: str | None, process_set: ProcessSet, kind: str) -> int:
    eng, ps = _engine_for(process_set, kind)
    for t in tensors:
        _check_tensor(t, kind)
        if t.dim() == 0:
            raise ValueError(f"{kind} on rank {rank()}: a 0-d tensor has no first dimension; reshape it to (1,)")
    arrays = [_to_numpy(t) for t in tensors]
    h = eng.submit("allgather", _name(kind, name, ps), arrays)
    return _register(h, lambda res: [_from_numpy(r, t) for r, t in zip(res, tensors)])


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start an allgather: every rank's tensor concatenated along dim 0 (first dims may differ)."""
    hid = _allgather_submit([tensor], name, process_set, "allgather")
    h, finish = _state.handles[hid]
    _state.handles[hid] = (h, lambda res: finish(res)[0])
    return hid


class HorovodAllgather(torch.autograd.Function):
    """Allgather with a gradient: the averaged gradient's rows that came from this rank."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: Any, process_set: ProcessSet) -> torch.Tensor:
        ctx.dim, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        g = allreduce(grad, op=Average, process_set=ctx.process_set)
        dims = allgather(torch.tensor([ctx.dim], dtype=torch.int64), process_set=ctx.process_set)
        me = ctx.process_set.rank() if ctx.process_set.process_set_id else rank()
        off = int(dims[:me].sum())
        return g.narrow(0, off, ctx.dim), None, None


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (first dims may differ); differentiable.

    Example::

        ranks = hvd.allgather(torch.tensor([hvd.rank()]))   # [0, 1, ..., size-1]
    """
    _check_tensor(tensor, "allgather")
    if tensor.dim() == 0:
        raise ValueError(f"allgather on rank {rank()}: a 0-d tensor has no first dimension; reshape it to (1,)")
    return HorovodAllgather.apply(tensor, name, process_set)


def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start one allgather op over several tensors; synchronize returns the list of results."""
    return _allgather_submit(list(tensors), name, process_set, "grouped_allgather")


class HorovodGroupedAllgather(torch.autograd.Function):
    """Grouped allgather with a gradient (each tensor as in HorovodAllgather)."""

    @staticmethod
    def forward(ctx: Any, name: Any, process_set: ProcessSet, *tensors: torch.Tensor) -> tuple:
        ctx.dims, ctx.process_set = [t.shape[0] for t in tensors], process_set
        return tuple(synchronize(grouped_allgather_async(list(tensors), name, process_set)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        gs = grouped_allreduce(list(grads), op=Average, process_set=ctx.process_set)
        dims = allgather(torch.tensor([ctx.dims], dtype=torch.int64), process_set=ctx.process_set)
        me = ctx.process_set.rank() if ctx.process_set.process_set_id else rank()
        out = []
        for i, g in enumerate(gs):
            off = int(dims[:me, i].sum())
            out.append(g.narrow(0, off, ctx.dims[i]))
        return (None, None, *out)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> list:
    """Allgather every tensor in ``tensors`` in one op; differentiable; returns a list."""
    return list(HorovodGroupedAllgather.apply(name, process_set, *tensors))


# ------------------------------------------------------------------ broadcast
def _broadcast_submit(tensor: torch.Tensor, root_rank: int, name: str | None, process_set: ProcessSet,
                      inplace: bool) -> int:
    eng, ps = _engine_for(process_set, "broadcast")
    _check_tensor(tensor, "broadcast")
    if not isinstance(root_rank, (int, np.integer)) or not 0 <= int(root_rank) < size():
        raise ValueError(f"broadcast on rank {rank()}: root_rank {root_rank!r} is not a rank in [0, {size()})")
    root = int(root_rank)
    if ps.process_set_id != 0:
        if root not in ps.ranks:  # type: ignore[operator]
            raise ValueError(f"broadcast on rank {rank()}: root_rank {root} is not in process set {ps.ranks}")
        root = ps.ranks.index(root)  # type: ignore[union-attr]
    h = eng.submit("broadcast", _name("broadcast", name, ps), [_to_numpy(tensor)], root=root)

    def finish(res: list[np.ndarray]) -> torch.Tensor:
        y = _from_numpy(res[0].reshape(tuple(tensor.shape)), tensor)
        if inplace:
            tensor.data.copy_(y)
            return tensor
        return y

    return _register(h, finish)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start a broadcast of ``root_rank``'s tensor; synchronize returns a new tensor."""
    return _broadcast_submit(tensor, root_rank, name, process_set, False)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    """In-place :func:`broadcast_async`."""
    return _broadcast_submit(tensor, root_rank, name, process_set, True)


class HorovodBroadcast(torch.autograd.Function):
    """Broadcast with a gradient: the averaged gradient on the root, zeros elsewhere."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, name: Any, process_set: ProcessSet) -> torch.Tensor:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        g = allreduce(grad, op=Average, process_set=ctx.process_set)
        if rank() != ctx.root_rank:
            g = g * 0
        return g, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """``root_rank``'s ``tensor`` on every rank (a new tensor); differentiable."""
    return HorovodBroadcast.apply(tensor, root_rank, name, process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """In-place :func:`broadcast`: ``tensor`` receives ``root_rank``'s values."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


# ------------------------------------------------------------------ alltoall
def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Start an alltoall: rows ``splits[i]`` of ``tensor`` go to rank i; synchronize returns (output, received splits).

    Raises:
        ValueError: splits are not integers, do not have one entry per rank, are
            negative or exceed dim 0; or, without splits, dim 0 is not a multiple of the ranks.
    """
    eng, ps = _engine_for(process_set, "alltoall")
    _check_tensor(tensor, "alltoall")
    n = _set_size(ps)
    if tensor.dim() == 0:
        raise ValueError(f"alltoall on rank {rank()}: a 0-d tensor has no first dimension to split")
    rows = tensor.shape[0]
    if splits is None:
        if rows % n:
            raise ValueError(f"alltoall on rank {rank()}: dim 0 of shape {tuple(tensor.shape)} is not a multiple "
                             f"of the {n} ranks; pass splits")
        sp = [rows // n] * n
    else:
        if isinstance(splits, torch.Tensor):
            if splits.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"alltoall on rank {rank()}: splits must be an int32 tensor, got {splits.dtype}")
            sp = [int(v) for v in splits.reshape(-1).tolist()]
        else:
            if not all(isinstance(v, (int, np.integer)) for v in splits):
                raise ValueError(f"alltoall on rank {rank()}: splits must be integers, got {list(splits)}")
            sp = [int(v) for v in splits]
        if len(sp) != n or any(v < 0 for v in sp) or sum(sp) > rows:
            raise ValueError(f"alltoall on rank {rank()}: splits {sp} must be {n} non-negative counts whose sum "
                             f"does not exceed dim 0 ({rows}) of shape {tuple(tensor.shape)}")
    x = tensor.narrow(0, 0, sum(sp)) if sum(sp) != rows else tensor
    h = eng.submit("alltoall", _name("alltoall", name, ps), [_to_numpy(x)], splits=sp)

    def finish(res: tuple) -> tuple:
        return _from_numpy(res[0], tensor), torch.from_numpy(res[1])

    return _register(h, finish)


class HorovodAlltoall(torch.autograd.Function):
    """Alltoall with a gradient: the gradient goes back with the received splits."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: Any, name: Any, process_set: ProcessSet) -> Any:
        out, recv = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.recv, ctx.process_set, ctx.rows = recv, process_set, tensor.shape[0]
        if splits is None:
            return out
        ctx.mark_non_differentiable(recv)
        return out, recv

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *unused: Any) -> tuple:
        g, _ = alltoall(grad.contiguous(), splits=ctx.recv, process_set=ctx.process_set)
        if g.shape[0] != ctx.rows:  # rows beyond sum(splits) were not sent: their gradient is zero
            g = torch.cat([g, g.new_zeros((ctx.rows - g.shape[0],) + tuple(g.shape[1:]))])
        return g, None, None, None


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Scatter slices of ``tensor`` to every rank and gather theirs; differentiable.

    Returns:
        The gathered tensor; with ``splits`` given, also the received splits (an int32 tensor).
    """
    return HorovodAlltoall.apply(tensor, splits, name, process_set)


# ------------------------------------------------------------------ reducescatter
def _reducescatter_submit(tensors: list[torch.Tensor], name: str | None, op: int, process_set: ProcessSet,
                          prescale: float, postscale: float, kind: str) -> int:
    if op == Adasum:
        raise NotImplementedError(f"{kind}: op=hvd.Adasum is not supported; use hvd.Average or hvd.Sum")
    if op not in (Sum, Average):
        raise ValueError(f"{kind}: op {_OP_NAMES.get(op, op)!r} is not supported; use hvd.Average or hvd.Sum")
    eng, ps = _engine_for(process_set, kind)
    for t in tensors:
        _check_tensor(t, kind)
        if t.dim() == 0:
            raise ValueError(f"{kind} on rank {rank()}: a 0-d tensor cannot be scattered; give it a first dimension")
    n = _set_size(ps)
    arrays = [_to_numpy(_scale(t.detach(), prescale), reducing=True) for t in tensors]
    h = eng.submit("reducescatter", _name(kind, name, ps), arrays, op="sum", prescale=prescale, postscale=postscale)

    def finish(res: list[np.ndarray]) -> list[torch.Tensor]:
        outs = []
        for t, r in zip(tensors, res):
            y = _scale(_from_numpy(r, t), postscale)
            outs.append(_average(y, n) if op == Average else y)
        return outs

    return _register(h, finish)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                        process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    """Start a reduce-scatter: rank r gets the r-th block of dim 0 of the reduction (first ranks one row more)."""
    hid = _reducescatter_submit([tensor], name, op, process_set, prescale_factor, postscale_factor, "reducescatter")
    h, finish = _state.handles[hid]
    _state.handles[hid] = (h, lambda res: finish(res)[0])
    return hid


class HorovodReducescatter(torch.autograd.Function):
    """Reduce-scatter with a gradient: the scaled gradients allgathered."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: Any, op: int, process_set: ProcessSet, prescale: float,
                postscale: float) -> torch.Tensor:
        ctx.op, ctx.process_set, ctx.prescale, ctx.postscale = op, process_set, prescale, postscale
        return synchronize(reducescatter_async(tensor, name, op, process_set, prescale, postscale))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        g = grad * 1.0 if not grad.is_floating_point() else grad.clone()
        if ctx.op == Sum:
            g = g * _set_size(_engine_for(ctx.process_set, "reducescatter")[1])
        g = g * (ctx.prescale * ctx.postscale)
        return allgather(g, process_set=ctx.process_set), None, None, None, None, None


def reducescatter(tensor: torch.Tensor, name: str | None = None, compression: Any = None, op: int = Average,
                  process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce ``tensor`` over the ranks (default: average) and keep this rank's block of dim 0; differentiable."""
    from .compression import Compression

    compression = compression or Compression.none
    compressed, cctx = compression.compress(tensor)
    out = HorovodReducescatter.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    return compression.decompress(out, cctx)


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None, op: int = Average,
                                process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    """Start one reduce-scatter op over several tensors; synchronize returns the list of blocks."""
    return _reducescatter_submit(list(tensors), name, op, process_set, prescale_factor, postscale_factor,
                                 "grouped_reducescatter")


class HorovodGroupedReducescatter(torch.autograd.Function):
    """Grouped reduce-scatter with a gradient."""

    @staticmethod
    def forward(ctx: Any, name: Any, op: int, process_set: ProcessSet, prescale: float, postscale: float,
                *tensors: torch.Tensor) -> tuple:
        ctx.op, ctx.process_set, ctx.prescale, ctx.postscale = op, process_set, prescale, postscale
        return tuple(synchronize(grouped_reducescatter_async(list(tensors), name, op, process_set, prescale,
                                                             postscale)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        f = ctx.prescale * ctx.postscale
        if ctx.op == Sum:
            f *= _set_size(_engine_for(ctx.process_set, "grouped_reducescatter")[1])
        gs = grouped_allgather([g * f for g in grads], process_set=ctx.process_set)
        return (None, None, None, None, None, *gs)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None, compression: Any = None,
                          op: int = Average, process_set: ProcessSet = global_process_set,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list:
    """Reduce-scatter every tensor in ``tensors`` in one op; differentiable; returns a list."""
    from .compression import Compression

    compression = compression or Compression.none
    pairs = [compression.compress(t) for t in tensors]
    outs = HorovodGroupedReducescatter.apply(name, op, process_set, prescale_factor, postscale_factor,
                                             *[p[0] for p in pairs])
    return [compression.decompress(o, p[1]) for o, p in zip(outs, pairs)]


# ------------------------------------------------------------------ join, barrier, handles
def join(device: int = -1) -> int:
    """Declare that this rank has no more data: it contributes zeros to other ranks' allreduces until all join.

    Returns:
        The rank that joined last (the same on every rank).
    """
    eng, _ = _engine_for(global_process_set, "join")
    h = eng.submit("join", "join", [], wake=False)
    # No deadline: the other ranks may train for long; a rank that exits fails the join.
    while eng.running and not h.wait_done(1.0):
        pass
    return int(h.wait(0.0 if h.done() else None))


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Block until every rank of ``process_set`` has reached the barrier."""
    eng, ps = _engine_for(process_set, "barrier")
    eng.submit("barrier", _name("barrier", None, ps), []).wait()


def poll(handle: int) -> bool:
    """True once the op behind ``handle`` has finished (then :func:`synchronize` does not block)."""
    entry = _state.handles.get(handle)
    if entry is None:
        raise ValueError(f"poll: unknown handle {handle!r} (already synchronized?)")
    return entry[0].done()


def synchronize(handle: int) -> Any:
    """Wait for the op behind ``handle`` and return its output (raises HorovodInternalError on failure)."""
    with _state.lock:
        entry = _state.handles.get(handle)
    if entry is None:
        return None
    h, finish = entry
    try:
        res = h.wait()
    finally:
        with _state.lock:
            _state.handles.pop(handle, None)
    return finish(res)
