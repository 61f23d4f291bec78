"""The torch.distributed backend "collective": ``import collective.torch``, then ``init_process_group("collective")``.

Every ``torch.distributed`` call on a group of this backend becomes one call
of a :class:`collective.Communicator` on NumPy views of the tensors' memory,
so torch's DDP, FSDP2, DeviceMesh and ``dist.*`` code gets our algorithms and
our cross-rank checks (a shape, dtype or op that differs between ranks raises
on every rank instead of hanging).

Rank and world size come from MPI. Under ``mpiexec`` (or ``collective-run``)
``init_process_group("collective")`` needs no ``MASTER_ADDR``, rank or world
size: torch still wants a key-value store, which this module builds from MPI
(a TCPStore whose address rank 0 broadcasts) for ``init_method="collective://"``
and, under an MPI launcher, for torch's default ``env://`` (``MASTER_ADDR`` and
``MASTER_PORT`` are then not read). A rank or world size passed by the user that disagrees with MPI
raises :class:`collective.CollectiveValueError`.

Synchronous calls (``async_op=False``) run on the caller's thread;
asynchronous ones go to the communicator's thread, which hands each finished
op to a pool of this module's threads that completes the torch Future (point-
to-point calls and joined ones reach the pool through a completion thread), so
``work.wait(timeout)`` raises on timeout and errors propagate through the
future.

Example::

    import torch, torch.distributed as dist
    import collective.torch  # registers the backend
    dist.init_process_group("collective")   # under: mpiexec -n 4 python train.py
    t = torch.ones(4)
    dist.all_reduce(t)                       # [4, 4, 4, 4]
"""
from __future__ import annotations

import datetime
import functools
import importlib
import math
import os
import queue
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (  # type: ignore[attr-defined]  # torch's stub lacks _create_work_from_future
    AllgatherOptions,
    _create_work_from_future,
)
from torch.distributed.constants import default_pg_timeout

import collective as _col

from .errors import CollectiveError, CollectiveTimeoutError, CollectiveTypeError, CollectiveValueError, describe
from .fingerprint import hash62
from .ops import bfloat16
from .p2p import ANY_SOURCE
from .sequencer import Work
from .threads import set_name

__all__ = ["BACKEND", "CollectiveProcessGroup", "MonitoredBarrierError", "WorkTimeoutError", "create_store",
           "join_closing", "mpi_launched"]

#: The backend name torch knows us by.
BACKEND = "collective"

#: The point-to-point tag of monitored_barrier's messages (user tags of dist.send stay below it).
MONITORED_BARRIER_TAG = 1 << 28
# monitored_barrier's messages: an arrival, rank 0's question whether it is the rank's current one, the answers,
# the release and the failure (each with the arrival's number).
_MB_ARRIVE, _MB_ASK, _MB_YES, _MB_STALE, _MB_RELEASE, _MB_FAIL = 1, 2, 3, 4, 5, 6


class MonitoredBarrierError(CollectiveTimeoutError, RuntimeError):
    """A monitored barrier that some rank did not reach in time (a RuntimeError, as torch's gloo raises)."""


class WorkTimeoutError(CollectiveTimeoutError, dist.DistBackendError):
    """``Work.wait(timeout)`` ran out: a DistBackendError (so a RuntimeError), as torch's backends raise there."""

# The enum's members, as ReduceOp carries them (torch's stub of RedOpType itself lists none).
_R = dist.ReduceOp
_NAMED = {_R.SUM: "sum", _R.AVG: "avg", _R.PRODUCT: "prod", _R.MIN: "min", _R.MAX: "max"}
_BITWISE = {_R.BAND: ("band", "min"), _R.BOR: ("bor", "max"), _R.BXOR: ("bxor", "sum")}
# bool follows torch's NCCL backend: a sum of booleans is their OR, a product their AND.
_BOOL = {_R.SUM: "max", _R.MAX: "max", _R.BOR: "max", _R.PRODUCT: "min", _R.MIN: "min", _R.BAND: "min"}


def _quick_ops() -> dict[int, str]:
    """The allreduce fast path's ops by ``hash(opts.reduceOp)`` (empty: no fast path).

    Hashing a ReduceOp is one C++ call taking no argument, cheaper than
    comparing it with an op, and reading its ``op`` makes an enum object.
    torch hashes a ReduceOp by its RedOpType; this table is checked here
    against every op, so where a torch hashes otherwise a hash finds no op or
    its own, and the checked path takes the call.
    """
    try:
        table = {hash(_R(op)): name for op, name in _NAMED.items()}
        others = [hash(_R(op)) for op in (_R.BAND, _R.BOR, _R.BXOR)]
        make_premul = getattr(dist, "_make_nccl_premul_sum", None)
        if make_premul is not None:
            others += [hash(make_premul(2.0)), hash(make_premul(0.5))]
        again = [hash(_R(op)) for op in _NAMED]
    except (TypeError, RuntimeError):  # unhashable, or a ReduceOp that cannot be built so
        return {}
    if len(table) != len(_NAMED) or any(h in table for h in others) or again != list(table):
        return {}
    return table


_QUICK_OPS = _quick_ops()
#: The allreduce path keeps NumPy views of tensors up to this size, this many at most (see _hot_array).
_HOT_MAX_BYTES, _HOT_ENTRIES = 1 << 18, 16
# Reductions whose preparation or finish writes into the tensor reduced.
_IN_PLACE_OPS = frozenset((_R.PREMUL_SUM, _R.BAND, _R.BOR, _R.BXOR))
# torch dtypes whose tensors .numpy() views directly.
_PLAIN = frozenset((torch.float32, torch.float64, torch.float16, torch.int8, torch.int16, torch.int32, torch.int64,
                    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.complex128))


def mpi_launched() -> bool:
    """True when an MPI launcher (Open MPI, MPICH/Hydra, PMIx, Slurm's PMI) started this process."""
    e = os.environ
    return any(k in e for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


# --------------------------------------------------------------- the store
def _check_against_mpi(comm: Any, rank: int, world_size: int, what: str) -> None:
    if rank not in (-1, comm.rank) or world_size not in (-1, comm.size):
        raise CollectiveValueError(
            f"{describe('init_process_group', comm.rank, comm.size)}: {what} says rank {rank} of world size "
            f"{world_size}, but MPI says rank {comm.rank} of {comm.size}; the backend {BACKEND!r} takes both from "
            "MPI: leave them out (or fix the launcher's environment)")


def create_store(timeout: datetime.timedelta | None = None) -> dist.TCPStore:
    """A TCPStore shared by every rank of the default communicator; rank 0 serves it, its address goes by broadcast.

    Collective over every rank (it calls :func:`collective.init` when needed).

    Args:
        timeout: the store's timeout (torch's default process-group timeout when None).

    Returns:
        The store (rank 0 is its server).

    Example::

        store = collective.torch.create_store()
        dist.init_process_group("gloo", store=store, rank=comm.rank, world_size=comm.size)
    """
    comm = _comm(timeout)
    tmo = timeout or datetime.timedelta(seconds=300)
    head = np.zeros(258, np.uint8)  # port (2 bytes, big-endian), then the host name, zero-padded
    store = None
    if comm.rank == 0:
        host = "127.0.0.1" if comm.single_node else socket.gethostname()
        store = dist.TCPStore(host, 0, comm.size, True, tmo, wait_for_workers=False)
        name = host.encode()[:256]
        head[0], head[1] = store.port >> 8, store.port & 0xFF
        head[2:2 + len(name)] = np.frombuffer(name, np.uint8)
    comm.broadcast(head, root=0, out=head)
    if store is None:
        host = bytes(head[2:]).rstrip(b"\0").decode()
        store = dist.TCPStore(host, int(head[0]) << 8 | int(head[1]), comm.size, False, tmo)
    return store


def _seconds(timeout: datetime.timedelta | None) -> float | None:
    """A process group's ``timeout=`` in seconds; None where torch filled in its default (nobody asked for it)."""
    if timeout is None or timeout == default_pg_timeout:
        return None
    return timeout.total_seconds()


def _comm(timeout: datetime.timedelta | None = None) -> Any:
    """The default communicator (made now, with ``timeout`` as its deadline when one was asked for)."""
    if _col.is_initialized():
        return _col.get_default()
    secs = _seconds(timeout)
    return _col.init(timeout=secs) if secs is not None else _col.init()


def _mpi_rendezvous(url: str, timeout: datetime.timedelta | None = None, **_: Any) -> Iterator[tuple[Any, int, int]]:
    """``collective://``: rank and world size from MPI, a store from :func:`create_store`."""
    q = parse_qs(urlparse(url).query)
    comm = _comm(timeout)
    _check_against_mpi(comm, int(q.get("rank", ["-1"])[0]), int(q.get("world_size", ["-1"])[0]), "init_process_group")
    yield create_store(timeout), comm.rank, comm.size
    raise CollectiveError(f"{describe('init_process_group', comm.rank, comm.size)}: collective:// cannot "
                          "re-rendezvous (restart the job)")


def _install_rendezvous() -> None:
    rdzv = importlib.import_module("torch.distributed.rendezvous")

    handlers = rdzv._rendezvous_handlers  # private, but the only way to extend env:// rather than replace it
    if "collective" not in handlers:
        rdzv.register_rendezvous_handler("collective", _mpi_rendezvous)
    env = handlers.get("env")
    if env is not None and not getattr(env, "_collective", False):
        def env_or_mpi(url: str, **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
            # Under an MPI launcher, MPI knows everything env:// needs, and its store's address is rank 0's
            # for sure (a MASTER_ADDR, which collective-run sets for scripts on other backends, is a guess
            # on several nodes).
            if mpi_launched():
                return _mpi_rendezvous(url, **kwargs)
            return env(url, **kwargs)

        env_or_mpi._collective = True  # type: ignore[attr-defined]
        handlers["env"] = env_or_mpi


def _install_monitored_barrier() -> None:
    """``dist.monitored_barrier`` on a group of this backend runs the group's own :meth:`~CollectiveProcessGroup.
    monitored_barrier`: torch's function refuses every backend but gloo by name before it reaches the group.
    Every other group (gloo's, a rank outside the group) goes to torch's own function, unchanged."""
    c10d: Any = importlib.import_module("torch.distributed.distributed_c10d")
    torch_own = c10d.monitored_barrier
    if getattr(torch_own, "_collective", False):
        return

    @functools.wraps(torch_own)
    def monitored_barrier(group: Any = None, timeout: Any = None, wait_all_ranks: bool = False) -> Any:
        pg = group if group is not None or not dist.is_initialized() else c10d._get_default_group()
        if not isinstance(pg, CollectiveProcessGroup) or c10d._rank_not_in_group(group):
            return torch_own(group, timeout, wait_all_ranks)
        if isinstance(timeout, float):  # as torch's function takes it: seconds, with its warning
            warnings.warn("Please specify timeout arg as a timedelta. Converting current value of "
                          f"{timeout} assuming it represents seconds", stacklevel=2)
            timeout = datetime.timedelta(seconds=timeout)
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError(f"monitored_barrier: timeout must be a datetime.timedelta, got {type(timeout).__name__} "
                            f"(rank {pg.rank()})")
        return pg.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)

    monitored_barrier._collective = True  # type: ignore[attr-defined]
    c10d.monitored_barrier = monitored_barrier
    dist.monitored_barrier = monitored_barrier  # type: ignore[attr-defined]  # (absent from torch's stub)


# ------------------------------------------------------ Work and completion
class _Async(dist._Work):
    """Work of an asynchronous call: completed by the callback pool, ``wait(timeout)`` raises on timeout."""

    # A receive's: its source rank when one was given; from any rank, the receive whose wait() tells it.
    source: int | None = None
    _learn: Any = None

    def __init__(self, fut: torch.futures.Future, done: threading.Event, name: str, source: int | None = None,
                 learn: Any = None) -> None:
        super().__init__()
        self._fut, self._done, self._name = fut, done, name
        self.source, self._learn = source, learn

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        secs = timeout.total_seconds() if timeout is not None else 0.0
        if not self._done.wait(secs if secs > 0 else None):
            raise WorkTimeoutError(f"{self._name}: not finished after {secs} s")
        self._fut.wait()  # raises the call's error
        return True

    # Completed means the future holds the outcome (the event is set just before the pool sets it): a Work
    # reported complete has a value or an exception to give, and a failed one is never a success.
    def is_completed(self) -> bool:
        return self._fut.done()

    def is_success(self) -> bool:
        return self._fut.done() and self.exception() is None

    def exception(self) -> Any:
        if not self._fut.done():
            return None
        try:
            self._fut.wait()
        except Exception as exc:  # noqa: BLE001 - returned, as torch's Work.exception() does
            return exc
        return None

    def get_future(self) -> torch.futures.Future:
        return self._fut

    def _source_rank(self) -> int:
        """The sender of a completed receive (``dist.recv(src=None)`` returns it)."""
        self.wait()
        src = self.source
        if src is None and self._learn is not None:
            src = self._learn.wait()
        if src is None:
            raise CollectiveError(f"{self._name}: not a receive, so it has no source rank")
        return int(src)


class _Entry:
    """One Work of ours that is not completed yet: its future and what completes it."""

    __slots__ = ("done", "fut", "name", "post", "value", "works")

    def __init__(self, works: list[Any], post: Callable[[], None] | None, value: Any, fut: torch.futures.Future,
                 done: threading.Event, name: str) -> None:
        self.works, self.post, self.value, self.fut, self.done, self.name = works, post, value, fut, done, name


def _finished(w: Any) -> bool:
    """True when Work ``w`` (ours, a point-to-point one, a joined torch Work) has ended, well or not; never blocks."""
    try:
        return bool(w.done())
    except Exception:  # noqa: BLE001 - done() raised the op's error: it has ended
        return True


class _Completer:
    """A pool that completes the torch Futures of our Works, and one thread that waits for the Works that
    cannot tell it themselves.

    Completing a future runs its callbacks (DDP's, a comm hook's) on the completing thread, and a
    callback may block on another of our futures (torch's PowerSGD hook waits on an all_reduce it
    starts inside a callback): so neither the communication thread nor the waiting thread runs
    callbacks itself, and the pool grows a thread while all of its threads sit in such callbacks. A
    single op of the communication thread hands itself to the pool as it finishes (``Work.then``);
    point-to-point Works and joined calls go through the waiting thread, in submission order.

    Each future is completed once, by whoever *claims* its entry first under the lock: the thread
    that saw its Works end, or :meth:`close`. Once ``close`` has claimed every entry, a Work that
    ends later finds nothing to complete, so no callback of this completer starts after ``close``
    returns (see there).
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when _running drops to 0
        self._pending: set[_Entry] = set()  # added, not claimed yet
        self._running = 0  # claimed entries whose completion (post, the future's callbacks) has not ended
        self._closed: str | None = None  # what close() was told: new work fails with it
        # One name for every pool thread: which of them runs a callback differs across ranks, and a callback that
        # starts a collective must be tagged the same on every rank (collective.threads).
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="collective-torch-callbacks",
                                        initializer=set_name, initargs=("collective-torch-callbacks",))

    def add(self, works: list[Any], post: Callable[[], None] | None, value: Any, name: str,
            source: int | None = None, learn: Any = None) -> _Async:
        """Complete a new Work's future with ``value`` once ``works`` are done and ``post`` ran (a receive's
        ``source`` and ``learn``: see _Async); after :meth:`stop` its future fails at once (the group closed)."""
        fut: torch.futures.Future = torch.futures.Future()
        done = threading.Event()
        e = _Entry(works, post, value, fut, done, name)
        with self._lock:
            closed = self._closed
            if closed is None:
                self._pending.add(e)
        if closed is not None:
            _complete(None, None, fut, done, self._closed_error(name, closed))
            return _Async(fut, done, name, source, learn)
        if len(works) == 1 and type(works[0]) is Work:
            # One op of our communication thread: that thread hands the completion to the pool when the op ends
            # (one thread switch fewer per call than the completion thread).
            works[0].then(lambda w: self._hand_over(w, e))
            return _Async(fut, done, name, source, learn)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="collective-torch-completion", daemon=True)
                    self._thread.start()
        self._q.put(e)
        return _Async(fut, done, name, source, learn)

    def _claim(self, e: _Entry) -> bool:
        """Take ``e`` to complete it: False when another thread (or close) has."""
        with self._lock:
            if e not in self._pending:
                return False
            self._pending.discard(e)
            self._running += 1
            return True

    def _settle(self, e: _Entry, exc: BaseException | None) -> None:
        """Complete claimed ``e`` (on a pool thread): its future gets its value or ``exc``."""
        try:
            _complete(e.post, e.value, e.fut, e.done, exc)
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    def _submit(self, e: _Entry, exc: BaseException | None) -> None:
        try:
            self._pool.submit(self._settle, e, exc)
        except RuntimeError:  # the interpreter is shutting down: no thread can start any more
            self._settle(e, exc)

    def _hand_over(self, w: Any, e: _Entry) -> None:
        """On the communication thread, as ``w`` finishes: the pool completes the future (never raises)."""
        if not self._claim(e):
            return  # the group closed before the op ended: close() failed its future
        try:
            w.wait()  # finished: returns or raises at once
        except BaseException as exc:  # noqa: BLE001 - handed to the future's waiter
            self._submit(e, exc)
        else:
            self._submit(e, None)

    def stop(self, what: str) -> None:
        """Accept no new work: later calls' futures fail at once, saying that ``what`` (the group) was closed."""
        with self._lock:
            if self._closed is None:
                self._closed = what

    def close(self, what: str, timeout: float) -> None:
        """Complete or fail every future not completed yet, and see that none of their callbacks runs later.

        Call it once the communicator has closed (its queued ops have run): a
        future whose Works have ended completes (its result, or its op's
        error); any other (a receive never matched) fails now with an error
        saying that ``what`` was closed; a Work that ends after this finds its
        future settled and runs nothing. Returns once every completion begun
        has ended, or after ``timeout`` s if a callback is still blocked then
        (it is named in a ResourceWarning; nothing new starts after this
        returns either way). The waiting thread is not joined: it may sit in
        a receive's wait until that receive's deadline, and completes nothing
        after this.
        """
        self.stop(what)
        with self._lock:
            left, self._pending = list(self._pending), set()
            self._running += len(left)
            thread, self._thread = self._thread, None
        for e in left:
            if all(_finished(w) for w in e.works):
                try:
                    for w in e.works:
                        w.wait()
                except BaseException as exc:  # noqa: BLE001 - handed to the future's waiter
                    self._submit(e, exc)
                else:
                    self._submit(e, None)
            else:
                self._submit(e, self._closed_error(e.name, what))
        if thread is not None:
            self._q.put(None)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running and self._idle.wait(max(0.0, deadline - time.monotonic())):
                pass
            stuck = self._running
        self._pool.shutdown(wait=False)
        if stuck:
            import warnings

            warnings.warn(f"{what}: closed with {stuck} completion callback(s) still running after {timeout:g} s "
                          "(a callback blocked on something that will not happen); they were left running",
                          ResourceWarning, stacklevel=2)

    @staticmethod
    def _closed_error(name: str, what: str) -> CollectiveError:
        return CollectiveError(f"{name}: {what} was closed (destroy_process_group) before this op finished; "
                               "wait on a group's Works before destroying it")

    def _run(self) -> None:
        while True:
            e = self._q.get()
            if e is None:
                return
            with self._lock:
                if e not in self._pending:
                    continue  # close() settled it
            try:
                for w in e.works:
                    w.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the future's waiter
                err: BaseException | None = exc
            else:
                err = None
            if self._claim(e):
                self._submit(e, err)


def _complete(post: Callable[[], None] | None, value: Any, fut: torch.futures.Future, done: threading.Event,
              exc: BaseException | None = None) -> None:
    """Complete ``fut`` with ``value`` after ``post`` (the ops have finished), or with ``exc`` or post's error;
    set ``done`` first."""
    if exc is None and post is not None:
        try:
            post()
        except BaseException as e:  # noqa: BLE001 - handed to the future's waiter
            exc = e
    done.set()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _done(value: Any) -> Any:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return _create_work_from_future(fut)


# ------------------------------------------------------- tensors as arrays
def _array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor's memory (bfloat16 through ml_dtypes, bool as uint8)."""
    if t.requires_grad:
        t = t.detach()
    dt = t.dtype
    if dt in _PLAIN:
        return t.numpy()
    if dt is torch.bfloat16:
        bf16 = bfloat16()
        if bf16 is None:
            raise CollectiveTypeError("torch.bfloat16 tensors need the ml_dtypes package (pip install ml_dtypes)")
        return t.view(torch.int16).numpy().view(bf16)
    if dt is torch.bool:
        return t.view(torch.uint8).numpy()
    raise CollectiveTypeError(f"tensors of dtype {dt} have no NumPy equivalent; convert them (x.float())")


def _wire(t: torch.Tensor) -> np.ndarray:
    """:func:`_array` for a point-to-point message: bfloat16 as int16, whose dtype the message header can name."""
    if t.dtype is torch.bfloat16:
        return t.detach().view(torch.int16).numpy()
    return _array(t)


def _check_tensor(t: Any, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise CollectiveTypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise CollectiveTypeError(f"{where}: tensor on {t.device}; the backend {BACKEND!r} takes CPU tensors")
    if t.layout != torch.strided:
        raise CollectiveTypeError(f"{where}: tensor with layout {t.layout}; pass a dense tensor (x.to_dense())")


def _work_tensor(t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """``t`` itself when contiguous, else a contiguous copy and the call that writes it back."""
    if t.is_contiguous():
        return t, None
    c = t.contiguous()
    return c, lambda: t.copy_(c)  # type: ignore[return-value]


def _chain(*fns: Callable[[], None] | None) -> Callable[[], None] | None:
    fs = [f for f in fns if f is not None]
    if not fs:
        return None
    if len(fs) == 1:
        return fs[0]

    def run() -> None:
        for f in fs:
            f()
    return run


# ------------------------------------------------------------ the group
class CollectiveProcessGroup(dist.ProcessGroup):
    """A torch ProcessGroup whose calls run on a :class:`collective.Communicator`.

    Created by torch (``init_process_group("collective")``, ``new_group``);
    users rarely build one themselves.

    Args:
        comm: the communicator of this group (its rank and size are the group's); the group owns it.
        timeout: the group's default timeout (torch's ``timeout=``).
        default: True for the default group (``init_process_group``'s).

    Example::

        pg = dist.group.WORLD          # after init_process_group("collective")
        pg.getBackendName()            # "collective"
    """

    def __init__(self, comm: Any, timeout: datetime.timedelta | None = None, default: bool = False) -> None:
        super().__init__(comm.rank, comm.size)  # type: ignore[call-arg]  # torch's stub lists (store, rank, size) only
        self._comm = comm
        # torch issues this group's ops in one order on every rank, from the caller's thread or from a
        # completion callback's (DDP's communication hooks): the issuing thread is no part of an op's identity.
        comm.sequencer.ordered_by_caller("torch.distributed")
        self._default = default
        self._timeout = timeout
        self._completer = _Completer()
        self._gname = ""
        self._gdesc = ""
        self._mb_calls = 0  # this rank's monitored barriers so far: the nonce of its next arrival
        self._label()
        # Synchronous calls (asyncOp False) come from torch's Python wrappers, which only wait() on the Work
        # they get back: this one completed Work serves every synchronous call but allreduce's (which returns
        # None, on which dist.all_reduce waits for nothing), and no call pays for a future of its own.
        self._sync_done = _done([])
        # Small tensors' NumPy views by id(tensor): (weak ref, data_ptr, shape, dtype, view, op name -> the
        # communicator's allreduce bound to the view); see _hot_array.
        self._hot: dict[int, tuple[weakref.ref, int, Any, Any, np.ndarray, dict[str, Callable[[], Any]]]] = {}

    # ---- names (DeviceMesh and torch's logs read them)
    def getBackendName(self) -> str:
        return BACKEND

    def _set_group_name(self, name: str) -> None:
        self._gname = name
        self._label()

    @property
    def group_name(self) -> str:  # type: ignore[override]  # the stub's GroupName is a NewType of str
        return self._gname

    def _set_group_desc(self, desc: str) -> None:
        self._gdesc = desc
        self._label()

    @property
    def group_desc(self) -> str:
        return self._gdesc

    def __repr__(self) -> str:
        return f"CollectiveProcessGroup(rank={self._comm.rank}, size={self._comm.size}, name={self._gname!r})"

    @property
    def communicator(self) -> Any:
        """The :class:`collective.Communicator` this group's calls run on (its own; closed by ``shutdown``)."""
        return self._comm

    def _label(self) -> None:
        """Name torch's calls in our stall reports and flight recorder: the torch op, the group."""
        group = f"group {self._gname!r}" if self._gname else "a group"
        if self._gdesc and self._gdesc != "undefined":
            group += f" ({self._gdesc})"
        self._comm.watchdog.recorder.called_as = {
            ours: f"{theirs} via torch.distributed, {group}" for ours, theirs in _TORCH_CALLS.items()}

    def shutdown(self) -> None:
        """Close this group's communicator (``destroy_process_group`` calls it on every member; collective).

        Work queued before finishes first; the group's completion thread ends after it. A ``new_group``'s
        communicator closes on a thread of its own: torch shuts groups down in an order of their names that
        may differ between ranks, and a closing communicator waits for its members. The default group's
        (shut down last) closes here, after every group closing before it.
        """
        comm = self._comm
        if comm.closed:
            return
        if not self._default:
            t = threading.Thread(target=self._close, name="collective-torch-close", daemon=True)
            with _CLOSING_LOCK:
                _CLOSING.append(t)
            t.start()
            return
        join_closing()
        self._close()

    def _close(self) -> None:
        comm = self._comm
        what = (f"process group {self._gname!r}" if self._gname else "the process group") + \
            f" (rank {comm.rank} of {comm.size})"
        self._completer.stop(what)
        try:
            comm.close()
        finally:
            self._completer.close(what, comm.watchdog.timeout)

    def abort(self) -> None:
        """As :meth:`shutdown`: an MPI collective in flight cannot be cancelled, so the deadline ends it."""
        self.shutdown()

    # ---- helpers
    def _refused(self, call: str, exc: CollectiveError, seq: int) -> None:
        """This rank refused torch call ``call``'s arguments (``exc``): where no op of the communicator ran since
        its sequence number was ``seq`` (the refusal is this layer's, before anything was sent), take part in
        the op the other ranks are entering with a poison fingerprint, so that they raise naming this rank and
        its error instead of waiting for it until the deadline (as the communicator's own calls do)."""
        seqr = self._comm.sequencer
        if seqr.seq == seq:
            seqr.poison(call, exc)

    def _where(self, call: str, t: torch.Tensor | None = None) -> str:
        c = self._comm
        return describe(call, c.rank, c.size, None if t is None else tuple(t.shape), None if t is None else t.dtype)

    def _one(self, tensors: list[torch.Tensor], call: str) -> torch.Tensor:
        if len(tensors) != 1:
            raise CollectiveValueError(f"{self._where(call)}: expected one tensor per call, got {len(tensors)}")
        t = tensors[0]
        self._check(t, call)
        return t

    def _check(self, t: Any, call: str) -> None:
        """:func:`_check_tensor`, naming ``call``, this rank and ``t``'s shape and dtype only when it raises."""
        if type(t) is torch.Tensor and t.is_cpu and t.layout is torch.strided:
            return
        _check_tensor(t, self._where(call, t) if isinstance(t, torch.Tensor) else self._where(call))

    def _hot_array(self, t: Any) -> np.ndarray | None:
        """A NumPy view of ``t`` for the in-place allreduce path, or None where that path does not apply.

        A small tensor's view is kept, keyed on the tensor's identity, with the pointer, shape and dtype that
        it is valid for: a tensor reduced again and again (a loss, a counter, a small DDP bucket) then costs
        no conversion per call, and its synchronous calls run the sequencer's allreduce bound to the view
        (``Sequencer.bind_allreduce``: the view is this entry's alone, so its flags never change). The entry
        refers to the tensor weakly (a tensor that ends its autograd graph must not keep the graph alive), and
        a hit must be that very tensor.
        """
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            return None
        try:
            a = t.detach().numpy()  # refuses GPU, sparse, conjugate or negative bits, dtypes without a NumPy twin
        except (TypeError, RuntimeError):
            return None
        if a.dtype.kind == "b":
            return None  # bool: the full path maps the ops
        if a.nbytes <= _HOT_MAX_BYTES:
            hot = self._hot
            if len(hot) >= _HOT_ENTRIES:
                hot.clear()
            hot[id(t)] = (weakref.ref(t), t.data_ptr(), t.shape, t.dtype, a, {})
        return a

    def _finish(self, is_async: bool, name: str, start: Callable[[], Any], post: Callable[[], None] | None,
                value: Any) -> Any:
        """Run a prepared call: ``start`` starts it (async: returns our Works), ``post`` runs after it."""
        if not is_async:
            start()
            if post is not None:
                post()
            return self._sync_done
        w = start()
        return self._completer.add(w if isinstance(w, list) else [w], post, value, name)

    # ---- reductions
    def _reduce_args(self, t: torch.Tensor, rop: Any, call: str) -> tuple[torch.Tensor, np.ndarray, str,
                                                                             Callable[[], None] | None]:
        """(the tensor reduced, its array, our op name, what to do after): the reduction of ``t`` with ``rop``."""
        op = rop.op
        w, back = _work_tensor(t)
        if op == _R.PREMUL_SUM:
            f = rop.factor if hasattr(rop, "factor") else None
            if f is None:
                raise CollectiveValueError(f"{self._where(call, t)}: PREMUL_SUM without a factor")
            w.mul_(f)  # the input is the output: torch's backends scale it in place too
            return w, _array(w), "sum", back
        if t.dtype is torch.bool:
            name = _BOOL.get(op)
            if op == _R.BXOR:
                arr = _array(w)  # parity of the count: a uint8 sum keeps it modulo 256
                return w, arr, "sum", _chain(lambda: np.bitwise_and(arr, 1, out=arr), back)
            if name is None:
                raise CollectiveValueError(f"{self._where(call, t)}: {op} is not defined on bool tensors")
            return w, _array(w), name, back
        name = _NAMED.get(op)
        if name is not None:
            return w, _array(w), name, back
        if op in _BITWISE:
            if t.dtype.is_floating_point or t.dtype.is_complex:
                raise CollectiveTypeError(f"{self._where(call, t)}: {op} needs integer or bool tensors")
            ours, plane = _BITWISE[op]
            a = _array(w)
            if ours in _col.OPS:
                return w, a, ours, back
            # Bit planes: one uint8 per bit, reduced with min (and), max (or) or sum (xor: parity of the count,
            # which a uint8 sum keeps modulo 256), then packed back into the tensor's bytes.
            bits = np.unpackbits(a.view(np.uint8))
            raw = a.reshape(-1).view(np.uint8)

            def pack() -> None:
                if ours == "bxor":
                    np.bitwise_and(bits, 1, out=bits)
                raw[:] = np.packbits(bits)
            return w, bits, plane, _chain(pack, back)
        raise CollectiveValueError(f"{self._where(call, t)}: unsupported reduce op {op}")

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:  # type: ignore[override]
        """``dist.all_reduce``'s call: in place; a synchronous one (``opts.asyncOp`` False) has finished when it
        returns and returns None (torch's wrapper then waits on nothing), an asynchronous one its Work."""
        if opts is None:
            opts = dist.AllreduceOptions()
        name = _QUICK_OPS.get(hash(opts.reduceOp)) if _QUICK_OPS else None
        if name is not None and len(tensors) == 1:
            # The common case in few steps: the tensor's own memory, reduced in place. A small tensor seen
            # before reuses its NumPy view and, synchronous, the communicator's call bound to that view (see
            # _hot_array); numpy() refuses what this path must not take (a GPU or sparse tensor, bfloat16, a
            # conjugate bit); the full path below explains those.
            t = tensors[0]
            hot = self._hot.get(id(t))
            a: np.ndarray | None
            if (hot is not None and hot[0]() is t and t.data_ptr() == hot[1] and t.shape == hot[2]
                    and t.dtype is hot[3] and t.is_contiguous()):
                if not opts.asyncOp:
                    run = hot[5].get(name)
                    if run is None:
                        run = hot[5][name] = self._comm.sequencer.bind_allreduce(hot[4], name)
                    run()
                    return None
                a = hot[4]
            else:
                a = self._hot_array(t)
            if a is not None:
                if not opts.asyncOp:
                    self._comm.allreduce(a, op=name, out=a)
                    return None
                return self._completer.add([self._comm.allreduce_async(a, op=name, out=a)], None, tensors,
                                           "all_reduce")
        seq = self._comm.sequencer.seq  # (the quick path above refuses nothing: it hands over or runs)
        try:
            if len(tensors) == 1 and isinstance(tensors[0], torch.Tensor) and tensors[0].layout == torch.sparse_coo:
                return self._sparse_allreduce(tensors[0], opts)
            t = self._one(tensors, "all_reduce")
            _, a, name, post = self._reduce_args(t, opts.reduceOp, "all_reduce")
        except CollectiveError as exc:
            self._refused("all_reduce", exc, seq)
            raise
        comm = self._comm
        if not opts.asyncOp:
            comm.allreduce(a, op=name, out=a)
            if post is not None:
                post()
            return None
        return self._finish(True, "all_reduce", lambda: comm.allreduce_async(a, op=name, out=a), post, tensors)

    def _sparse_allreduce(self, t: torch.Tensor, opts: Any) -> Any:
        """SUM of sparse COO tensors: every rank's indices and values gathered, then added up (coalesced)."""
        where = self._where("all_reduce", t)
        if opts.reduceOp.op != _R.SUM:
            raise CollectiveValueError(f"{where}: sparse tensors take ReduceOp.SUM only, got {opts.reduceOp.op}")
        if t.device.type != "cpu":
            raise CollectiveTypeError(f"{where}: tensor on {t.device}; the backend {BACKEND!r} takes CPU tensors")
        c = t.detach().coalesce()
        idx = _array(c.indices().t().contiguous())  # (nnz, sparse dims): the ranks' nnz may differ
        val = c.values().contiguous()
        vals = _array(val)
        comm = self._comm
        got: list[np.ndarray] = []

        def finish() -> None:
            every_idx, every_val = got
            v = _tensor(np.ascontiguousarray(every_val), val.dtype).reshape(-1, *val.shape[1:])
            total = torch.sparse_coo_tensor(torch.from_numpy(np.ascontiguousarray(every_idx)).t(), v, t.shape)
            with torch.no_grad():
                t.copy_(total.coalesce())  # coalesced, as gloo returns it; a sparse copy_ replaces t's contents

        if opts.asyncOp:
            ws = [comm.allgather_async(idx), comm.allgather_async(vals)]

            def collect() -> None:
                got.extend(w.wait() for w in ws)
                finish()

            return self._completer.add(ws, collect, [t], "all_reduce")
        got.extend((comm.allgather(idx), comm.allgather(vals)))
        finish()
        return self._sync_done

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        if opts is None:
            opts = dist.AllreduceCoalescedOptions()
        comm, works, posts = self._comm, [], []
        for t in tensors:
            self._check(t, "all_reduce_coalesced")
        self._agree_list(tensors, opts.reduceOp.op, "all_reduce_coalesced")
        for t in tensors:
            _, a, name, post = self._reduce_args(t, opts.reduceOp, "all_reduce_coalesced")
            if opts.asyncOp:
                works.append(comm.allreduce_async(a, op=name, out=a))
            else:
                comm.allreduce(a, op=name, out=a)
            posts.append(post)
        post = _chain(*posts)
        return self._finish(opts.asyncOp, "all_reduce_coalesced", lambda: works, post, tensors)

    def _agree_list(self, tensors: list[torch.Tensor], op: Any, call: str) -> None:
        """Before one call per tensor: every rank must pass as many tensors, of the same sizes and dtypes, with the
        same op, else every rank raises with nothing written.

        One allreduce (max) of a checksum of the list and its negative (so the minimum too). Without it a rank
        with fewer tensors would return with its tensors reduced against the first of another rank's, and a
        list that differs in its k-th tensor would raise only after the tensors before it were written.
        """
        sig = repr((str(op), [(t.numel(), str(t.dtype)) for t in tensors])).encode()
        h = hash62(sig)
        m = self._comm.allreduce(np.array([h, -h], np.int64), op="max")
        if m[0] != -m[1]:
            mine = [(tuple(t.shape), str(t.dtype)) for t in tensors]
            raise CollectiveValueError(
                f"{self._where(call)}: the ranks' tensor lists differ (count, sizes, dtypes or op); this rank has "
                f"{len(tensors)} tensor(s) {mine[:8]}{' ...' if len(mine) > 8 else ''} and op {op}. Nothing was "
                "reduced; every rank raises this error")

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:  # type: ignore[override]
        if opts is None:
            opts = dist.ReduceOptions()
        t = self._one(tensors, "reduce")
        root, comm = opts.rootRank, self._comm
        _, a, name, post = self._reduce_args(t, opts.reduceOp, "reduce")
        if comm.rank != root:
            post = None  # torch leaves non-root tensors unspecified; ours are left as given
        return self._finish(opts.asyncOp, "reduce",
                            (lambda: comm.reduce_async(a, root=root, op=name, out=a)) if opts.asyncOp else
                            (lambda: comm.reduce(a, root=root, op=name, out=a)), post, tensors)

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> Any:  # type: ignore[override]
        if opts is None:
            opts = dist.ReduceScatterOptions()
        out = self._one(outputs, "reduce_scatter")
        if len(inputs) != 1 or len(inputs[0]) != self._comm.size:
            raise CollectiveValueError(f"{self._where('reduce_scatter', out)}: expected one list of "
                                       f"{self._comm.size} input tensors")
        for x in inputs[0]:
            self._check(x, "reduce_scatter")
            if x.shape != out.shape or x.dtype != out.dtype:
                raise CollectiveValueError(f"{self._where('reduce_scatter', out)}: every input must have the "
                                           f"output's shape and dtype; got {tuple(x.shape)} {x.dtype}")
        stacked = torch.stack([x.reshape(-1) for x in inputs[0]])
        return self._reduce_scatter(stacked, out, opts, "reduce_scatter", outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        if opts is None:
            opts = dist.ReduceScatterOptions()
        self._check(output, "reduce_scatter_tensor")
        self._check(input, "reduce_scatter_tensor")
        P = self._comm.size
        if input.numel() != P * output.numel() or input.dtype != output.dtype:
            raise CollectiveValueError(f"{self._where('reduce_scatter_tensor', input)}: the input must hold "
                                       f"{P} x the output ({tuple(output.shape)}, {output.dtype})")
        src = input.reshape(P, -1).contiguous()
        if src.data_ptr() == input.data_ptr() and opts.reduceOp.op in _IN_PLACE_OPS:
            src = src.clone()  # the scaling or the bit planes' write-back must not touch the input
        return self._reduce_scatter(src, output, opts, "reduce_scatter_tensor", [output])

    def _reduce_scatter(self, stacked: torch.Tensor, out: torch.Tensor, opts: Any, call: str, value: Any) -> Any:
        w, a, name, post = self._reduce_args(stacked, opts.reduceOp, call)
        comm, P = self._comm, self._comm.size
        if a.shape[0] != P:  # bit planes: one row per rank again
            a = a.reshape(P, -1)
        got: list[Any] = []

        def finish() -> None:
            res = got[0]
            if post is not None:
                # The bit planes or scaled copy: reduce-scatter gave this rank its row; rebuild its bytes.
                a[comm.rank] = res[0]
                post()
                out.copy_(w[comm.rank].reshape(out.shape))
            else:
                out.copy_(_tensor(res[0], w.dtype).reshape(out.shape))

        if (post is None and out.is_contiguous() and out.dtype is w.dtype and out.dtype in _PLAIN
                and out.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()):
            # Straight into the output (its row of the result), unless it lies in the input (torch's in-place
            # form): no result array to allocate and copy.
            o = _array(out).reshape(1, -1)
            if opts.asyncOp:
                return self._completer.add([comm.reduce_scatter_async(a, op=name, out=o)], None, value, call)
            comm.reduce_scatter(a, op=name, out=o)
            return self._sync_done
        if opts.asyncOp:
            wk = comm.reduce_scatter_async(a, op=name)

            def collect() -> None:
                got.append(wk.wait())
                finish()

            return self._completer.add([wk], collect, value, call)
        got.append(comm.reduce_scatter(a, op=name))
        finish()
        return self._sync_done

    # ---- data movement
    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:  # type: ignore[override]
        if opts is None:
            opts = dist.BroadcastOptions()
        t = self._one(tensors, "broadcast")
        w, back = _work_tensor(t)
        a, root, comm = _array(w), opts.rootRank, self._comm
        return self._finish(opts.asyncOp, "broadcast",
                            (lambda: comm.broadcast_async(a, root=root, out=a)) if opts.asyncOp else
                            (lambda: comm.broadcast(a, root=root, out=a)), back, tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> Any:  # type: ignore[override]
        if opts is None:
            opts = AllgatherOptions()
        x = self._one(inputs, "all_gather")
        outs = outputs[0] if len(outputs) == 1 else None
        P, comm = self._comm.size, self._comm
        if outs is None or len(outs) != P:
            raise CollectiveValueError(f"{self._where('all_gather', x)}: expected one list of {P} output tensors")
        for o in outs:
            self._check(o, "all_gather")
            if o.dtype != x.dtype:
                raise CollectiveTypeError(f"{self._where('all_gather', x)}: output dtype {o.dtype} is not the input's")
        a = _array(x.contiguous()).reshape(-1)
        even = all(o.numel() == x.numel() for o in outs)
        src = a.reshape(1, -1) if even else a
        sizes = [o.numel() for o in outs]
        if not even:
            self._agree_sizes(x, sizes, "all_gather")

        def scatter_rows(res: np.ndarray) -> None:
            flat = _tensor(res.reshape(-1), x.dtype)
            for o, piece in zip(outs, torch.split(flat, sizes)):
                o.copy_(piece.reshape(o.shape))

        if opts.asyncOp:
            wk = comm.allgather_async(src)
            return self._completer.add([wk], lambda: scatter_rows(wk.wait()), outputs, "all_gather")
        scatter_rows(comm.allgather(src))
        return self._sync_done

    def _agree_sizes(self, x: torch.Tensor, sizes: list[int], call: str) -> None:
        """Before an uneven all_gather: every rank's output sizes must be what the ranks send, else all raise.

        One allreduce (max) of each rank's expected sizes, their negatives (so the minimum too) and a flag
        for a rank whose input is not the size it expects from itself: a rank whose outputs disagree would
        otherwise get the right total cut in the wrong places. An allreduce, not an allgather, so that a
        rank taking the even path (an allgather) meets a mismatch in the cross-rank check.
        """
        comm, P = self._comm, self._comm.size
        e = np.asarray(sizes, np.int64)
        m = comm.allreduce(np.concatenate([e, -e, [int(sizes[comm.rank] != x.numel())]]), op="max")
        hi, lo, bad = m[:P], -m[P:2 * P], int(m[2 * P])
        if bad or (hi != lo).any():
            raise CollectiveValueError(
                f"{self._where(call, x)}: the output tensors of the ranks expect other sizes than the ranks send: "
                f"this rank sends {x.numel()} elements and expects {sizes}; from rank r the ranks expect "
                f"{lo.tolist()} .. {hi.tolist()} elements" + (", and some rank's input is not the size its own "
                                                               "output expects" if bad else ""))

    def _agree_gather(self, x: torch.Tensor, sizes: list[int], root: int) -> None:
        """Before a gather: what each rank sends must be what the root's output tensors hold, else every rank raises.

        Only the root knows its outputs' sizes and only each rank its own input's, so one allreduce (max) joins
        them: slot r holds rank r's input size, slots P.. the root's output sizes. Without it a rank sending
        another size than the root expects would raise on the root only, after the data moved, or (the total
        unchanged) cut the root's outputs in the wrong places.
        """
        comm, P = self._comm, self._comm.size
        v = np.full(2 * P, -1, np.int64)
        v[comm.rank] = x.numel()
        if comm.rank == root:
            v[P:] = sizes
        m = comm.allreduce(v, op="max")
        sent, want = m[:P], m[P:]
        if (sent != want).any():
            bad = [r for r in range(P) if sent[r] != want[r]]
            raise CollectiveValueError(
                f"{self._where('gather', x)}: the root's output tensors (rank {root}) expect other sizes than the "
                f"ranks send: rank(s) {bad} send {sent[bad].tolist()} elements, the root's outputs hold "
                f"{want[bad].tolist()}. Nothing was gathered; every rank raises this error")

    def allgather_coalesced(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                            opts: Any = None) -> Any:
        if opts is None:
            opts = AllgatherOptions()
        # outputs[r][i]: rank r's piece of input i (torch's layout); one all_gather per input.
        works = [self.allgather([[o[i] for o in outputs]], [x], opts) for i, x in enumerate(inputs)]
        return self._join(works, outputs, opts.asyncOp, "all_gather_coalesced")

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        if opts is None:
            opts = AllgatherOptions()
        self._check(output, "all_gather_into_tensor")
        self._check(input, "all_gather_into_tensor")
        P, comm = self._comm.size, self._comm
        if output.numel() != P * input.numel() or output.dtype != input.dtype:
            raise CollectiveValueError(f"{self._where('all_gather_into_tensor', input)}: the output must hold "
                                       f"{P} x the input ({tuple(input.shape)}, {input.dtype}); got "
                                       f"{tuple(output.shape)}, {output.dtype}")
        if input.untyped_storage().data_ptr() == output.untyped_storage().data_ptr():
            input = input.clone()
        a = _array(input.contiguous()).reshape(1, -1)
        w, back = _work_tensor(output)
        o = _array(w).reshape(P, -1)
        return self._finish(opts.asyncOp, "all_gather_into_tensor",
                            (lambda: comm.allgather_async(a, out=o)) if opts.asyncOp else
                            (lambda: comm.allgather(a, out=o)), back, [output])

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: Any = None) -> Any:
        if opts is None:
            opts = AllgatherOptions()
        works = [self.all_gather_single(o, x, opts) for o, x in zip(outputs, inputs)]
        return self._join(works, outputs, opts.asyncOp, "all_gather_into_tensor_coalesced")

    allgather_into_tensor_coalesced = all_gather_single_coalesced  # type: ignore[assignment]  # backend form

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> Any:
        if opts is None:
            opts = dist.ReduceScatterOptions()
        works = [self.reduce_scatter_single(o, x, opts) for o, x in zip(outputs, inputs)]
        return self._join(works, outputs, opts.asyncOp, "reduce_scatter_tensor_coalesced")

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced  # type: ignore[assignment]  # backend form

    def _join(self, works: list[Any], value: Any, is_async: bool, name: str) -> Any:
        if not is_async:
            return self._sync_done
        return self._completer.add([_TorchWait(w) for w in works], None, value, name)

    def barrier(self, opts: Any = None) -> Any:
        """Block until every rank of the group has arrived (after this rank's queued async calls).

        ``opts.asyncOp`` is ignored: the barrier has finished when this returns, and the Work returned is
        already complete (as torch's own wrapper waits on it at once).
        """
        self._comm.barrier()  # waits for the queued async calls first, like every rank's
        return self._sync_done

    def monitored_barrier(self, timeout: datetime.timedelta | None = None, wait_all_ranks: bool = False) -> None:
        """A barrier that names the ranks that did not reach it within ``timeout`` (torch's gloo semantics).

        ``dist.monitored_barrier`` on this group calls it (``import collective.torch`` lets torch's function
        through to this backend, which it otherwise refuses by name).
        Rank 0 waits for a message from each other rank, then releases them all; the messages are
        point-to-point (tag :data:`MONITORED_BARRIER_TAG`), so a rank that never comes cannot hang the
        others beyond ``timeout``. An arrival carries a number of its own (the rank's count of monitored
        barriers), which rank 0 asks the rank to confirm before counting it and echoes in the release, so rank
        0 counts only ranks waiting in a monitored barrier at that moment: the arrival of a rank that has
        given up waiting (in a call rank 0 gave up on), or a release it no longer waits for, is set aside
        rather than taken for the next call's. When rank 0 fails a call, it tells every rank whose arrival has
        reached it, which raises at once (as on gloo) instead of waiting out its own timeout.

        Args:
            timeout: how long to wait (the group's timeout when None).
            wait_all_ranks: rank 0 names every late rank instead of the first.

        Raises:
            MonitoredBarrierError: on rank 0, naming the rank(s) that did not arrive ("Rank 1 failed to
                pass monitoredBarrier in 2000 ms"); on the others, when rank 0 did not release them in time.

        Example::

            dist.group.WORLD.monitored_barrier(datetime.timedelta(seconds=30), wait_all_ranks=True)
        """
        comm, tag = self._comm, MONITORED_BARRIER_TAG
        span = timeout if timeout is not None else self._timeout  # a timedelta of 0 is falsy, but given
        limit = (span if span is not None else datetime.timedelta(seconds=300)).total_seconds()
        ms = int(limit * 1000)
        # How long rank 0 waits for a rank's answer once that rank's arrival is here, whatever its own deadline:
        # the rank came in time, and only its answer may be slow (a loaded machine).
        grace = min(limit, 1.0)
        t0 = time.monotonic()
        end = t0 + limit
        msg = np.zeros(2, np.int64)  # (kind, nonce)

        def send(kind: int, nonce: int, to: int) -> None:
            comm.isend(np.array([kind, nonce], np.int64), to, tag).wait()

        def receive(src: int, until: float) -> tuple[int, int]:
            comm.irecv(msg, src, tag).wait(timeout=max(until - time.monotonic(), 1e-3))
            return int(msg[0]), int(msg[1])

        if comm.rank != 0:
            self._mb_calls = mine = self._mb_calls + 1
            send(_MB_ARRIVE, mine, 0)
            try:
                while True:  # rank 0's messages for earlier calls are answered or dropped, never taken for this one
                    kind, nonce = receive(0, end)
                    if kind == _MB_ASK:  # is this arrival the current one?
                        send(_MB_YES if nonce == mine else _MB_STALE, nonce, 0)
                        if nonce == mine:  # counted: wait for rank 0's verdict, which comes within its deadline
                            end = max(end, time.monotonic() + limit + (comm.size - 1) * grace)
                    elif nonce == mine and kind in (_MB_RELEASE, _MB_FAIL):
                        break
            except CollectiveTimeoutError:
                raise MonitoredBarrierError(f"Rank {comm.rank} successfully reached monitoredBarrier, but received "
                                            f"errors while waiting for send/recv from rank 0: no release within "
                                            f"{ms} ms") from None
            if kind == _MB_FAIL:
                raise MonitoredBarrierError(f"Rank {comm.rank} successfully reached monitoredBarrier, but received "
                                            "errors while waiting for send/recv from rank 0: rank 0 failed the "
                                            "barrier (some rank did not arrive in time)")
            return
        late: list[int] = []
        came: dict[int, int] = {}  # rank: its current arrival
        asking: dict[int, int] = {}  # rank: an arrival whose answer rank 0 did not get

        def fail(text: str) -> MonitoredBarrierError:
            # Every rank whose arrival is here hears that the call failed (a rank still waiting in it raises at
            # once, as on gloo; one that has moved on drops it), so no arrival of this call is left for the next.
            # The queued arrivals are all read before any rank is told: a rank told early could come to its next
            # call in time to have that call's arrival read here too.
            told = [*came.items(), *asking.items()]
            for r in range(1, comm.size):
                while True:
                    try:
                        kind, nonce = receive(r, 0.0)
                    except CollectiveTimeoutError:
                        break
                    if kind == _MB_ARRIVE:
                        told.append((r, nonce))
            for r, nonce in told:
                send(_MB_FAIL, nonce, r)
            return MonitoredBarrierError(text)

        for r in range(1, comm.size):
            if time.monotonic() >= end and not late and not wait_all_ranks:
                raise fail(f"Rank 0 timed out in monitoredBarrier after {ms} ms (ranks "
                           f"{list(range(r, comm.size))} not heard from)")
            try:
                newer: int | None = None  # an arrival that came while rank 0 waited for an answer
                while r not in came:
                    if newer is None:
                        kind, nonce = receive(r, end)
                        if kind != _MB_ARRIVE:
                            continue  # an answer to an earlier call's question
                    else:
                        nonce, newer = newer, None
                    send(_MB_ASK, nonce, r)
                    asking[r] = nonce
                    while True:
                        kind, got = receive(r, max(end, time.monotonic() + grace))
                        if kind == _MB_ARRIVE:  # sent before the rank read the question: ask about it next
                            newer = got
                        elif kind in (_MB_YES, _MB_STALE) and got == nonce:
                            break
                    del asking[r]
                    if kind == _MB_YES:
                        came[r] = nonce
            except CollectiveTimeoutError:
                if not wait_all_ranks:
                    raise fail(f"Rank {r} failed to pass monitoredBarrier in {ms} ms") from None
                late.append(r)
        if late:
            raise fail(f"Ranks {', '.join(map(str, late))} failed to pass monitoredBarrier in {ms} ms")
        for r, nonce in came.items():
            send(_MB_RELEASE, nonce, r)

    # ---- all-to-all, gather, scatter, point to point
    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts: Any = None) -> Any:
        if opts is None:
            opts = dist.AllToAllOptions()
        fn = self._comm.alltoall
        P = self._comm.size
        self._check(input, "all_to_all_single")
        self._check(output, "all_to_all_single")
        # Splits count rows (first-dim entries); each tensor's row holds its own trailing elements, so a rank
        # that sends nothing (input (0, d)) still receives d elements per row.
        splits = ([int(s) * math.prod(input.shape[1:]) for s in input_split_sizes] if input_split_sizes
                  else [input.numel() // P] * P)
        want = ([int(s) * math.prod(output.shape[1:]) for s in output_split_sizes] if output_split_sizes
                else [output.numel() // P] * P)
        a = _array(input.contiguous()).reshape(-1)
        if (input.dtype == output.dtype and output.is_contiguous() and sum(splits) == a.size
                and sum(want) == output.numel()
                and input.untyped_storage().data_ptr() != output.untyped_storage().data_ptr()):
            # Straight into the output: every rank checks what it gets from each rank against output_split_sizes
            # (recv_splits) before anything moves. Equal blocks both ways take a repeat's plan.
            o = _array(output).reshape(-1)
            sp: list[int] | None = None if splits == want and splits.count(splits[0]) == P else splits
            if opts.asyncOp:
                wk = self._comm.alltoall_async(a, splits=sp, out=o, recv_splits=want)
                return self._completer.add([wk], wk.wait, [output], "all_to_all_single")
            fn(a, splits=sp, out=o, recv_splits=want)
            return self._sync_done
        return self._alltoall(fn, a, splits, want, [output], opts.asyncOp, "all_to_all_single")

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                          input_split_sizes: list[int], opts: Any = None) -> Any:
        """``dist.all_to_all_single``'s entry: :meth:`alltoall_base`, and its Work as it is.

        torch's own ``ProcessGroup.all_to_all_single`` reaches :meth:`alltoall_base` too, but hands back a Work
        of its own whose ``is_completed()`` never turns True. ``opts`` may be the timeout (torch's other form).
        """
        if isinstance(opts, datetime.timedelta):
            timeout, opts = opts, dist.AllToAllOptions()
            opts.timeout = timeout
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> Any:
        if opts is None:
            opts = dist.AllToAllOptions()
        fn = self._comm.alltoall
        if len(inputs) != self._comm.size or len(outputs) != self._comm.size:
            raise CollectiveValueError(f"{self._where('all_to_all')}: expected {self._comm.size} inputs and outputs")
        for t in (*inputs, *outputs):
            self._check(t, "all_to_all")
        flat = torch.cat([x.reshape(-1) for x in inputs]) if inputs else torch.empty(0)
        return self._alltoall(fn, _array(flat), [x.numel() for x in inputs], [o.numel() for o in outputs], outputs,
                              opts.asyncOp, "all_to_all")

    def _alltoall(self, fn: Callable[..., Any], a: np.ndarray, splits: list[int], want: list[int],
                  outs: list[torch.Tensor], is_async: bool, call: str) -> Any:
        dtype = outs[0].dtype

        def place(got: Any) -> None:  # (what each rank sends, recv_splits, was checked before anything moved)
            flat = _tensor(np.ascontiguousarray(got).reshape(-1), dtype)
            if len(outs) == 1:
                outs[0].copy_(flat.reshape(outs[0].shape))
            else:
                for o, piece in zip(outs, torch.split(flat, want)):
                    o.copy_(piece.reshape(o.shape))

        if is_async:
            wk = self._comm.alltoall_async(a, splits=splits, recv_splits=want)
            return self._completer.add([wk], lambda: place(wk.wait()), outs, call)
        place(fn(a, splits=splits, recv_splits=want))
        return self._sync_done

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> Any:  # type: ignore[override]
        if opts is None:
            opts = dist.GatherOptions()
        fn = self._comm.gather
        x = self._one(inputs, "gather")
        root, comm = opts.rootRank, self._comm
        a = _array(x.contiguous()).reshape(-1)
        outs = outputs[0] if comm.rank == root else []
        if comm.rank == root and len(outs) != comm.size:
            raise CollectiveValueError(f"{self._where('gather', x)}: the root needs {comm.size} output tensors")

        if comm.rank == root:
            for o in outs:
                self._check(o, "gather")
                if o.dtype != x.dtype:
                    raise CollectiveTypeError(f"{self._where('gather', x)}: output dtype {o.dtype} is not the input's")
        if type(root) is int and 0 <= root < comm.size:  # (a bad root: the library's call below says so everywhere)
            self._agree_gather(x, [o.numel() for o in outs], root)

        def place(res: Any) -> None:
            if comm.rank != root:
                return
            if res.size != sum(o.numel() for o in outs):
                raise CollectiveValueError(f"{self._where('gather', x)}: the ranks sent {res.size} elements in all, "
                                           f"the root's outputs hold {[o.numel() for o in outs]}")
            flat = _tensor(res.reshape(-1), x.dtype)
            for o, piece in zip(outs, torch.split(flat, [o.numel() for o in outs])):
                o.copy_(piece.reshape(o.shape))

        if opts.asyncOp:
            wk = self._comm.gather_async(a, root=root)
            return self._completer.add([wk], lambda: place(wk.wait()), outputs, "gather")
        place(fn(a, root=root))
        return self._sync_done

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> Any:  # type: ignore[override]
        if opts is None:
            opts = dist.ScatterOptions()
        fn = self._comm.scatter
        y = self._one(outputs, "scatter")
        root, comm = opts.rootRank, self._comm
        if comm.rank == root:
            ins = inputs[0]
            if len(ins) != comm.size:
                raise CollectiveValueError(f"{self._where('scatter', y)}: the root needs {comm.size} input tensors")
            for t in ins:
                self._check(t, "scatter")
                if t.dtype != y.dtype:
                    raise CollectiveTypeError(f"{self._where('scatter', y)}: input dtype {t.dtype} is not the output's")
            a = _array(torch.cat([t.reshape(-1) for t in ins])) if ins else None
            splits = [t.numel() for t in ins]
        else:
            a, splits = None, None

        # Always through out= (the output itself where contiguous, else a contiguous stand-in copied back after):
        # the library then checks every rank's output size against the root's splits before anything moves, so a
        # piece that does not fit raises on every rank and writes nothing, whatever the output's dtype or strides.
        w, back = _work_tensor(y)
        o = _array(w).reshape(-1)
        return self._finish(opts.asyncOp, "scatter",
                            (lambda: comm.scatter_async(a, root=root, splits=splits, out=o)) if opts.asyncOp else
                            (lambda: fn(a, root=root, splits=splits, out=o)), back, outputs)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> Any:
        t = self._one(tensors, "send")
        fn = self._comm.isend
        a = _wire(t.contiguous())
        return self._completer.add([fn(a, dst, tag)], None, tensors, "send")

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> Any:
        t = self._one(tensors, "recv")
        fn = self._comm.irecv
        w, back = _work_tensor(t)
        ours = fn(_wire(w), src, tag)
        # From any rank, the sender is what our receive's wait() returns.
        return self._completer.add([ours], back, tensors, "recv", source=src if src != ANY_SOURCE else None,
                                   learn=ours)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> Any:
        return self.recv(tensors, ANY_SOURCE, tag)


class _TorchWait:
    """Our-Work-like view of a torch Work (for joining coalesced calls)."""

    __slots__ = ("_w",)

    def __init__(self, w: Any) -> None:
        self._w = w

    def wait(self) -> None:
        self._w.wait()

    def done(self) -> bool:
        return bool(self._w.is_completed())


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` sharing ``a``'s memory (``a`` as :func:`_array` made it: bfloat16, bool as uint8)."""
    if dtype is torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if dtype is torch.bool:
        return torch.from_numpy(a.view(np.bool_))
    return torch.from_numpy(a)


def _refusing(call: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Method ``fn`` of the group (torch call ``call``) whose own argument errors reach the other ranks (see
    :meth:`CollectiveProcessGroup._refused`)."""
    def method(self: CollectiveProcessGroup, *args: Any, **kwargs: Any) -> Any:
        seq = self._comm.sequencer.seq
        try:
            return fn(self, *args, **kwargs)
        except CollectiveError as exc:
            self._refused(call, exc, seq)
            raise
    method.__name__, method.__qualname__, method.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return method


for _m, _call in (("allreduce_coalesced", "all_reduce_coalesced"), ("reduce", "reduce"),
                  ("reduce_scatter", "reduce_scatter"), ("reduce_scatter_single", "reduce_scatter_tensor"),
                  ("broadcast", "broadcast"), ("allgather", "all_gather"),
                  ("allgather_coalesced", "all_gather_coalesced"), ("all_gather_single", "all_gather_into_tensor"),
                  ("all_gather_single_coalesced", "all_gather_into_tensor_coalesced"),
                  ("reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced"),
                  ("alltoall_base", "all_to_all_single"), ("alltoall", "all_to_all"), ("gather", "gather"),
                  ("scatter", "scatter")):
    setattr(CollectiveProcessGroup, _m, _refusing(_call, getattr(CollectiveProcessGroup, _m)))

#: How torch's calls reach our ops (several torch calls share one of ours), for stall reports.
_TORCH_CALLS = {"allreduce": "all_reduce", "reduce": "reduce", "broadcast": "broadcast",
                "reduce_scatter": "reduce_scatter or reduce_scatter_tensor",
                "allgather": "all_gather or all_gather_into_tensor", "alltoall": "all_to_all or all_to_all_single",
                "gather": "gather", "scatter": "scatter", "barrier": "barrier"}


def _create(opts: Any, backend_options: Any) -> CollectiveProcessGroup:
    """torch's creator for the backend (extended API): each group on a communicator of its own.

    The default group's is a copy of the default communicator with the group's
    deadline (``timeout=``, when given; else the default communicator's), so
    a ``timeout=`` holds even when ``collective.init()`` ran before, and the
    user's own calls on the default communicator stay apart from torch's. A
    ``new_group``'s is a subgroup of the default group's (world ranks), with
    its own ``timeout=`` when given. Where torch's default group is another
    backend's (``new_group(backend="collective")`` under gloo), its ranks are
    the ones the subgroup is made of, so they must be MPI's.

    A group given a ``timeout=`` gets gloo's semantics at that deadline
    (``on_timeout="raise"``): a call that some rank never joins raises on the
    ranks waiting in it and leaves the group broken, instead of ending the
    job; a ``new_group`` without one inherits the default group's.
    """
    secs = _seconds(opts.timeout)
    default = _comm(opts.timeout)
    world = dist.GroupMember.WORLD
    base = world.communicator if isinstance(world, CollectiveProcessGroup) and not world.communicator.closed \
        else default
    ranks = list(opts.global_ranks_in_group or [])
    if world is not None and not isinstance(world, CollectiveProcessGroup):
        _check_against_mpi(default, world.rank(), world.size(),
                           f"torch's default group (backend {dist.get_backend(world)!r})")
    if world is None or not ranks:
        _check_against_mpi(default, opts.group_rank, opts.group_size, "the process group")
        ranks = list(range(default.size))
    return CollectiveProcessGroup(base.subgroup(ranks, timeout=secs, on_timeout="raise" if secs is not None else None),
                                  opts.timeout, default=world is None)


_CLOSING: list[threading.Thread] = []
_CLOSING_LOCK = threading.Lock()


def join_closing() -> None:
    """Wait until the communicators of the groups shut down so far are closed (each has its deadline)."""
    with _CLOSING_LOCK:
        threads = list(_CLOSING)
        _CLOSING.clear()
    for t in threads:
        t.join()


def _register() -> None:
    import atexit

    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
    _install_rendezvous()
    _install_monitored_barrier()
    # Before MPI finalizes: mpi4py finalizes in a Py_AtExit callback, which runs after every atexit handler,
    # so no communicator is still closing then.
    atexit.register(join_closing)


_register()
