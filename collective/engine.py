"""The host engine: moves a prepared call's data by MPI's own collective, the node's shared memory, or a Schedule.

It owns what the host paths need: the MPI backend and the Schedule executor,
the node's shm arena (made when the communicator is, on one node, so the
cross-rank check can be one of its phases) and the ``comm.alloc`` windows.
The sequencer calls :meth:`HostEngine.execute` once per op, one op at a time
(from the gate's owner or the communication thread), after the op's record
began; ``first`` is the cross-rank check when it is to be the call's first shm
phase.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .arrays import Deferred
from .backends.mpi import MPIBackend, mpi_dtype, mpi_op, require_mpi
from .errors import CollectiveValueError, SharedMemoryError
from .executor import Executor, ExecutorOptions, Plan
from .ops import average_in_place
from .prepare import Barrier
from .shm import (
    ARENA_SHARE,
    MIN_CHUNK_BYTES,
    SharedArrays,
    ShmArena,
    arena_bytes,
    fitting_chunk,
    node_space,
    space_message,
)
from .variable import VCall, run_variable
from .watchdog import deadline

__all__ = ["HostEngine", "mpi_collective", "schedule_work", "schedule_result", "MPI_COUNT_LIMIT"]


#: Most elements one MPI call moves: counts are C ints (MPI_ERR_ARG from 2**31 on); bigger calls go in pieces.
MPI_COUNT_LIMIT = 1 << 30


def _pieces(n: int) -> range:
    """Starts of the pieces of an ``n``-element buffer that each fit one MPI call."""
    return range(0, n, MPI_COUNT_LIMIT)


def _resolve(r: Any) -> Any:
    return r.resolve() if type(r) is Deferred else r


def mpi_collective(comm: Any, MPI: Any, name: str, x: Any, out: Any, T: Any, mop: Any, root: int, rank: int,
                   inplace: bool, counts: list[int] | None, copy: Callable[[Any, Any], None]) -> None:
    """MPI's own collective ``name`` from ``x`` into ``out`` (host buffers, or device ones for CUDA-aware MPI).

    ``out`` is None off the root of reduce; ``counts``: elements of each
    rank's block (reduce_scatter); ``copy(dst, src)`` copies the root's input
    into its output before a broadcast, which works in one buffer. Buffers of
    more than :data:`MPI_COUNT_LIMIT` elements (1-D) go in pieces of at most
    that many, in the same order on every rank: MPI's counts are C ints.
    """
    big = _elems(x) > MPI_COUNT_LIMIT or _elems(out) > MPI_COUNT_LIMIT
    if big:
        _mpi_pieces(comm, MPI, name, x, out, T, mop, root, rank, inplace, counts, copy)
    elif name == "allreduce":
        comm.Allreduce(MPI.IN_PLACE if inplace else [x, T], [out, T], mop)
    elif name == "reduce":
        if rank == root:
            comm.Reduce(MPI.IN_PLACE if inplace else [x, T], [out, T], mop, root)
        else:
            comm.Reduce([x, T], None, mop, root)
    elif name == "broadcast":
        if rank == root and not inplace:
            copy(out, x)
        comm.Bcast([out, T], root)
    elif name == "reduce_scatter":
        comm.Reduce_scatter([x, T], [out, T], counts, mop)
    else:
        comm.Allgather([x, T], [out, T])


def _elems(a: Any) -> int:
    """Elements of a host array or a device one (``__cuda_array_interface__`` only); 0 for None."""
    if a is None:
        return 0
    n = getattr(a, "size", None)
    if n is None:
        n = 1
        for d in a.__cuda_array_interface__["shape"]:
            n *= d
    return int(n)


def _mpi_pieces(comm: Any, MPI: Any, name: str, x: Any, out: Any, T: Any, mop: Any, root: int, rank: int,
                inplace: bool, counts: list[int] | None, copy: Callable[[Any, Any], None]) -> None:
    """:func:`mpi_collective` for buffers past MPI's count limit: the same result, one piece per MPI call.

    Element-wise collectives (allreduce, reduce, broadcast) cut the buffer.
    reduce_scatter becomes one reduce per rank's block, and allgather one
    broadcast per rank's block, each cut likewise: no buffer but the caller's.
    """
    if name == "allreduce":
        for a in _pieces(out.size):
            b = a + MPI_COUNT_LIMIT
            comm.Allreduce(MPI.IN_PLACE if inplace else [x[a:b], T], [out[a:b], T], mop)
    elif name == "reduce":
        for a in _pieces(x.size):
            b = a + MPI_COUNT_LIMIT
            if rank == root:
                comm.Reduce(MPI.IN_PLACE if inplace else [x[a:b], T], [out[a:b], T], mop, root)
            else:
                comm.Reduce([x[a:b], T], None, mop, root)
    elif name == "broadcast":
        if rank == root and not inplace:
            copy(out, x)
        for a in _pieces(out.size):
            comm.Bcast([out[a:a + MPI_COUNT_LIMIT], T], root)
    elif name == "reduce_scatter":
        start = 0
        for q, m in enumerate(counts or ()):
            for a in _pieces(m):
                b = min(m, a + MPI_COUNT_LIMIT)
                src = x[start + a:start + b]
                if rank == q:
                    comm.Reduce([src, T], [out[a:b], T], mop, q)
                else:
                    comm.Reduce([src, T], None, mop, q)
            start += m
    else:  # allgather: every rank's block is broadcast from its owner, in rank order
        m = x.size
        copy(out[rank * m:(rank + 1) * m], x)
        for q in range(comm.Get_size()):
            for a in _pieces(m):
                b = min(m, a + MPI_COUNT_LIMIT)
                comm.Bcast([out[q * m + a:q * m + b], T], q)


def schedule_work(name: str, rank: int, root: int, x: Any, out: Any, inplace: bool, blocks: tuple | None,
                  scratch: Callable[[], Any], copy: Callable[[Any, Any], None]) -> Any:
    """The buffer a Schedule of collective ``name`` runs in, filled with this rank's input.

    The output itself where the result lands in place (allreduce, broadcast,
    the root of reduce, allgather); otherwise ``scratch()`` (a reusable buffer
    of ``x``'s size), so other ranks' partial sums never land in the caller's
    buffers. Host (NumPy) and device (CuPy) buffers alike.
    """
    if name == "allreduce" or name == "broadcast" or (name == "reduce" and rank == root):
        if not inplace and (name != "broadcast" or rank == root):
            copy(out, x)
        return out
    if name == "reduce" or name == "reduce_scatter":
        work = scratch()
        copy(work, x)
        return work
    a, b = blocks[rank], blocks[rank + 1]  # type: ignore[index]
    if b > a:  # allgather: this rank's block of the output
        copy(out[a:b], x)
    return out


def schedule_result(name: str, rank: int, work: Any, out: Any, blocks: tuple | None,
                    copy: Callable[[Any, Any], None]) -> None:
    """After the Schedule: reduce_scatter copies this rank's block of ``work`` into ``out``."""
    if name == "reduce_scatter":
        a, b = blocks[rank], blocks[rank + 1]  # type: ignore[index]
        if b > a:
            copy(out, work[a:b])


class HostEngine:
    """Runs prepared host calls on one communicator.

    Args:
        backend: the MPI backend over the communicator's private mpi4py communicator.
        segment_bytes: largest single message of Schedule algorithms.
        chunk_bytes, shm_wait: the shm arena's chunk size and wait (``COLLECTIVE_SHM_CHUNK_BYTES``,
            ``COLLECTIVE_SHM_WAIT``).
        check: the cross-rank check, which the arena fences once it exists.
        withdrawable: a rank may leave an op's first shm phase at its deadline (``on_timeout="raise"``).
        single_copy: large shm allreduces move each byte once where the node allows it
            (``COLLECTIVE_SHM_SINGLE_COPY``).
        huge_pages: arrays that single-copy calls post again and again go on huge pages
            (``COLLECTIVE_SHM_HUGE_PAGES``).
        shm_fences: where shm phases fence (``COLLECTIVE_SHM_FENCES``).
        shm_stream_bytes: reads out of ``alloc`` windows from this many output bytes use streaming stores
            (``COLLECTIVE_SHM_STREAM_BYTES``; 0: never).
    """

    def __init__(self, backend: MPIBackend, segment_bytes: int, chunk_bytes: int, shm_wait: str, check: Any,
                 nodes: tuple[int, ...] = (), withdrawable: bool = False, single_copy: bool = True,
                 huge_pages: bool = True, shm_fences: str = "auto", shm_stream_bytes: int = 8 << 20) -> None:
        self.backend = backend
        self.withdrawable = withdrawable
        self.single_copy = single_copy
        self.huge_pages = huge_pages
        self.shm_fences = shm_fences
        self.shm_stream_bytes = shm_stream_bytes
        self.rank, self.size = backend.rank, backend.size
        self._mpi = require_mpi()
        self._exec = Executor(backend, ExecutorOptions(segment_bytes=segment_bytes))
        self.chunk_bytes, self.shm_wait = chunk_bytes, shm_wait
        self._check = check
        self.arena: ShmArena | None = None
        #: The ``comm.alloc`` arrays, once the first is made.
        self.shared: SharedArrays | None = None
        #: avg's division for the window path, which applies it to each reduced piece while it is in cache.
        self.finish_avg = functools.partial(average_in_place, n=self.size)
        self._work_buf = np.empty(0, np.uint8)
        self.nodes = nodes
        #: Every rank of the communicator shares one shared-memory node (set by the communicator).
        self.single_node = False
        #: Why the node has no shm arena (None while it has one or none was tried).
        self.shm_problem: str | None = None
        #: ``prepare_fixed(name, x, op, algorithm, root, out)``: the fixed-size preparation (an allgather whose
        #: counts turn out equal runs as one); set by the communicator once its Preparer exists.
        self.prepare_fixed: Callable[..., Any] | None = None
        #: Called with the arena right after it is made (collective over the node); elastic mode watches peers.
        self.on_arena: Callable[[ShmArena], None] | None = None
        #: ``choose_variable(name, nbytes, dtype, root)``: what "auto" runs for a variable-size collective
        #: (``Chooser.auto_variable``); set by the communicator before any op runs.
        self.choose_variable: Callable[[str, int, np.dtype, int], str] | None = None

    def plan(self, sched: Any, itemsize: int) -> Plan:
        """This rank's compiled ``sched`` for elements of ``itemsize`` bytes."""
        return self._exec.plan(sched, itemsize)

    def waiting_on(self) -> tuple[int, ...] | None:
        """The peers the op in flight waits for right now (an shm phase or a Schedule step), or None."""
        arena = self.arena
        if arena is not None:
            behind = arena.waiting_on()
            if behind:
                return behind
        cur = self._exec.current
        if cur is None:
            return None
        plan, i = cur
        return plan.steps[i].peers

    def withdraw(self, seq: int) -> bool:
        """Ask op ``seq``, past its deadline, to leave its first phase on this rank; False where it cannot.

        It can while it waits in that phase on a withdrawable arena that the
        cross-rank check is fenced in: no rank has read another's data yet.
        It then raises ``shm.Withdrawn`` from its wait, unless every rank
        arrives meanwhile (it goes on). Elsewhere (a data phase, an MPI
        call, an arena that does not cover the communicator) an op cannot be
        taken back, and the caller ends the job.
        """
        ar = self.arena
        if ar is None or not ar.withdrawable or not ar.check_fenced or ar.arriving != seq:
            return False
        ar.withdraw_seq = seq
        return True

    # --------------------------------------------------------------- arena
    def make_arena(self, optional: bool = False) -> ShmArena | None:
        """The node's shm arena (created collectively over the node on first use); the check is fenced in it.

        The chunk shrinks (down to ``shm.MIN_CHUNK_BYTES``) until the arena
        takes at most half of the shared memory the node has free (node rank
        0 measures, so every rank picks the same), and the arena's pages are
        committed when it is made: a small /dev/shm (Docker's 64 MB) is an
        error here, never a SIGBUS later.

        Args:
            optional: on a shortage return None (the cross-rank check stays an
                MPI allreduce; ``shm_problem`` says why) instead of raising.
                Later calls, e.g. an shm collective's, raise the same error.

        Raises:
            SharedMemoryError: the node's shared memory cannot hold even the smallest arena; the message says
                how much is needed, what was found and how to fix it.
        """
        if self.arena is not None:
            return self.arena
        problem = self.shm_problem
        if problem is not None:
            if optional:
                return None
            raise SharedMemoryError(problem)
        MPI = self._mpi
        node = self.backend.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        P = node.Get_size()
        free, total = node_space(node)
        chunk = fitting_chunk(self.chunk_bytes, P, free)
        try:
            if chunk == 0:
                need = arena_bytes(P, min(self.chunk_bytes, MIN_CHUNK_BYTES))
                raise SharedMemoryError(space_message(
                    f"the shm arena ({P} ranks on the node; the smallest chunk)", int(need / ARENA_SHARE),
                    free, total, chunk_hint=None) + "; shm collectives and comm.alloc are unavailable")
            self.arena = ShmArena(node, chunk, self.shm_wait, withdrawable=self.withdrawable,
                                  single_copy=self.single_copy, huge_pages=self.huge_pages,
                                  fences=self.shm_fences, stream_bytes=self.shm_stream_bytes)
        except SharedMemoryError as exc:
            node.Free()
            self.shm_problem = str(exc)
            if optional:
                return None
            raise
        if self.on_arena is not None:
            self.on_arena(self.arena)
        # Every rank creates the arena in the same call, so from the next call on every rank checks through it.
        self._check.attach_arena(self.arena, self.arena.size == self.size)
        return self.arena

    def alloc(self, nbytes: int) -> np.ndarray:
        """``nbytes`` in a new shared window of the node (collective over the node), its pages committed.

        Raises:
            SharedMemoryError: the node's shared memory cannot hold it (every rank of the node raises).
        """
        with deadline(f"alloc of {nbytes} bytes on rank {self.rank} (collective over the node)"):
            if self.shared is None:
                self.shared = SharedArrays(self.make_arena())  # type: ignore[arg-type]
            return self.shared.alloc(nbytes)

    def free(self, a: np.ndarray) -> None:
        """Free the window of ``a`` from :meth:`alloc` (collective over the node; see ``SharedArrays.free``).

        The caller first drops every prepared call that holds ``a`` (their
        views count as uses), and runs this in the op order, like ``alloc``.
        """
        with deadline(f"free of an alloc'd array on rank {self.rank} (collective over the node)"):
            if self.shared is None:
                raise CollectiveValueError(f"free on rank {self.rank} of {self.size}: {type(a).__name__} is not an "
                                           "array from comm.alloc (none was made)")
            self.shared.free(a)

    def close(self) -> None:
        """Free the ``alloc`` windows, then the arena (collective over the node)."""
        if self.shared is not None:
            self.shared.free_all()
            self.shared = None
        self.free_arena()

    def free_arena(self) -> None:
        """Free the arena, leaving the ``alloc`` windows (collective over the node; nothing may use it after).

        An ``alloc``'d array is its caller's: unmapping its window would make a
        later read of it crash the process, so only :meth:`close` (every rank
        closing the communicator) or ``free`` releases those.
        """
        if self.arena is not None:
            self._check.detach_arena()
            arena, self.arena = self.arena, None
            arena.free()

    # ----------------------------------------------------------- execution
    def execute(self, c: Any, first: Callable[[], Any] | None, seq: int) -> Any:
        """Move the data of call ``c``, op number ``seq``; its result."""
        if type(c) is Barrier:
            self._barrier(first)
            return None
        if type(c) is VCall:
            assert self.choose_variable is not None  # set by the communicator with its Chooser
            return run_variable(c, first, seq, self.backend.comm, self._mpi, self._exec, self.nodes,
                                self._fixed_seq(seq),
                                self.make_arena if self.single_node and self.shm_problem is None else None,
                                self.choose_variable, self.arena.huge if self.arena is not None else None)
        alg = c.algorithm
        if alg == "native":
            self._native(c)
        elif alg == "shm" or c.views is not None:
            self._shm(c, first)
        else:
            self._scheduled(c, seq)
        return c.result

    def _fixed_seq(self, seq: int) -> Callable[[VCall], Any]:
        def fixed(c: VCall) -> Any:
            call = self.prepare_fixed(c.name, c.x, None, c.algorithm, 0, c.out)  # type: ignore[misc]
            out = self.execute(call, None, seq)
            return c.out_given if c.out is not None else (out if c.wrap is None else _resolve(c.wrap(out)))
        return fixed

    def _barrier(self, check: Callable[[], Any] | None) -> None:
        arena = self.arena
        fence = arena.fence if arena is not None else None
        if fence is not None:  # a fence on each side, as between the phases of shm
            fence()
        if check is None or not check():  # the check already synchronised every rank
            self.backend.comm.Barrier()
        if fence is not None:
            fence()

    def _work(self, n: int, dtype: np.dtype) -> np.ndarray:
        nbytes = n * dtype.itemsize
        if self._work_buf.nbytes < nbytes:
            self._work_buf = np.empty(max(nbytes, 2 * self._work_buf.nbytes), np.uint8)
        return self._work_buf[:nbytes].view(dtype)

    def _native(self, c: Any) -> None:
        m = c.mpi
        if m is None:
            m = c.mpi = (mpi_dtype(c.dtype), mpi_op(c.rop.mpi_name, c.dtype) if c.rop is not None else None)
        counts = None
        if c.name == "reduce_scatter":
            counts = [c.blocks[i + 1] - c.blocks[i] for i in range(self.size)]
        mpi_collective(self.backend.comm, self._mpi, c.name, c.xf, c.of, m[0], m[1], c.root, self.rank, c.inplace,
                       counts, np.copyto)
        if c.rop is not None and c.rop.average and c.of is not None:
            average_in_place(c.of, self.size)

    def _scheduled(self, c: Any, seq: int) -> None:
        name, rop = c.name, c.rop
        work = schedule_work(name, self.rank, c.root, c.xf, c.of, c.inplace, c.blocks,
                             lambda: self._work(c.xf.size, c.dtype), np.copyto)
        self._exec.run(c.plan, work, rop.ufunc if rop is not None else None, seq)
        schedule_result(name, self.rank, work, c.of, c.blocks, np.copyto)
        if rop is not None and rop.average and c.of is not None:
            average_in_place(c.of, self.size)

    def _shm(self, c: Any, first: Callable[[], Any] | None) -> None:
        ar = self.make_arena()
        assert ar is not None  # without optional=True it raises rather than return None
        name, xf, of, rop = c.name, c.xf, c.of, c.rop
        if c.views is not None:
            self.shared.allreduce(c.views, c.out_views, rop.ufunc,  # type: ignore[union-attr]
                                  self.finish_avg if rop.average else None, first, c.own)
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
