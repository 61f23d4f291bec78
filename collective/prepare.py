"""Call preparation: every argument of a collective checked and its result allocated before this rank sends anything.

Terms (the names below follow them):

* **signature** -- what depends only on the call's name, shape, dtype, op,
  algorithm and root: checked once (``static``) and cached, along with the
  algorithm "auto" resolves to and the compiled Schedule.
* **call** -- a prepared collective (:class:`Call`): this call's arrays
  (flat views), the result, and its signature's outcome.
* **template** -- a call without arrays, kept per signature of synchronous
  NumPy allreduces, which the sequencer refills on a repeat.
* **hot call** -- a prepared call on ``comm.alloc`` arrays (the window path),
  kept with its arrays: that memory lives as long as the communicator.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from collective import topologies

from .arrays import to_numpy
from .backends.mpi import mpi_dtype
from .errors import CollectiveError, CollectiveTypeError, CollectiveValueError, describe
from .ops import ReduceOp
from .shm import ONE_PHASE_BYTES, WINDOW_MIN_BYTES
from .signature import cached_checks, check_algorithm, check_out, check_signature, overlap
from .spec import ALGORITHMS, ROOTED, SCHEDULED

__all__ = ["Call", "Preparer"]


class Call:
    """A prepared collective: every argument checked, the result allocated.

    Attributes:
        name, shape, dtype, rop, algorithm, root: the signature ("auto" resolved; rop None if not reducing).
        xf: the input, flat and contiguous. of: the output, flat (None where this rank gets none).
        result: what the call returns. blocks: element offsets of each rank's block (reduce_scatter, allgather).
        inplace: ``of`` is ``xf``'s memory. plan: this rank's compiled Schedule (Schedule algorithms).
        views, out_views: every node rank's view of an alloc'd input and output (the window path).
        own: window path only: this rank's input for parts of its slice (``Communicator.allreduce_in_window``).
        sig: the signature's fingerprint, once the check computed it. mpi: (MPI datatype, MPI op) once run natively.
        quick: the one-phase state. A template's: False (not eligible), None (eligible, not armed), or the
            regions the quick path runs in (``ShmArena.quick_regions``). A hot call's (every one is eligible):
            False until armed, then its ``SharedArrays.plan`` (armed once checked with the check fenced in
            the arena, see ``Sequencer._window_repeat``).
        what: the flight recorder's (op, shape, dtype, algorithm, root) of a template or hot call repeated from
            the quick path, once :meth:`record` made it (None before).
    """

    __slots__ = ("name", "xf", "shape", "dtype", "rop", "algorithm", "root", "of", "result", "blocks", "inplace",
                 "plan", "views", "out_views", "own", "sig", "mpi", "quick", "what")

    def __init__(self, name: str, xf: Any, shape: tuple, dtype: np.dtype, rop: ReduceOp | None,
                 algorithm: str, root: int, of: Any, result: Any, blocks: tuple | None,
                 inplace: bool, plan: Any) -> None:
        self.name, self.xf, self.shape, self.dtype, self.rop = name, xf, shape, dtype, rop
        self.algorithm, self.root, self.of, self.result, self.blocks = algorithm, root, of, result, blocks
        self.inplace, self.plan = inplace, plan
        self.views: list[np.ndarray] | None = None
        self.out_views: list[np.ndarray] | None = None
        self.own: list | None = None
        self.sig: Any = None
        self.mpi: Any = None
        self.quick: Any = False
        self.what: tuple | None = None

    def record(self) -> tuple:
        """The flight recorder's (op, shape, dtype, algorithm, root) of this allreduce, kept for its repeats."""
        self.what = w = (self.name, self.shape, self.dtype, self.algorithm, None)
        return w


class Barrier:
    """The barrier, as the sequencer runs it (an op with no data)."""

    name = "barrier"
    shape: tuple = ()
    dtype = None
    algorithm = "native"
    root = None
    rop = None
    xf = None
    views = None


BARRIER = Barrier()


class Preparer:
    """Checks and prepares the calls of one communicator.

    Args:
        rank, size: this rank and the number of ranks.
        algorithm: the communicator's default algorithm.
        auto: ``auto(name, nbytes, dtype) -> algorithm`` (the chooser's pick; the same on every rank).
        plan: ``plan(schedule, itemsize)`` compiles a Schedule for this rank (the executor's).
        nodes: the node of each rank (hierarchical Schedules).
        node_count: nodes the ranks really span (shm needs one).
        shared: returns the communicator's ``SharedArrays`` or None (the window path).
        chunk_bytes: the shm arena's chunk (the one-phase path takes one chunk).
    """

    #: alloc'd allreduces from this size on run in their windows (below: copied in, one phase).
    window_min = WINDOW_MIN_BYTES

    def __init__(self, rank: int, size: int, algorithm: str, auto: Callable[[str, int, np.dtype], str],
                 plan: Callable[[Any, int], Any], nodes: tuple[int, ...], node_count: int,
                 shared: Callable[[], Any], chunk_bytes: int) -> None:
        self.rank, self.size, self.algorithm = rank, size, algorithm
        self._auto, self._plan, self._nodes = auto, plan, nodes
        self._node_count = node_count
        self._shared = shared
        self._chunk = chunk_bytes
        self._static: dict[tuple, tuple] = {}
        #: (shape, dtype, op, algorithm) -> the template of a synchronous NumPy allreduce (see the module docstring).
        self.templates: dict[tuple, Call] = {}
        #: (name, shape, dtype, algorithm, out's shape) -> the ``collective.variable.VPlan`` of a synchronous NumPy
        #: alltoall or allgather whose counts the check settled (see ``Sequencer.vrepeat``).
        self.vplans: dict[tuple, Any] = {}
        #: id(x) -> the ``collective.variable.VHot`` of the last such call on the array object ``x``.
        self.vhot: dict[int, Any] = {}
        #: (id(x), id(out)) -> (x, out, (name, op, algorithm, root), call) of calls on alloc'd arrays.
        self._hot: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, tuple, Call]] = {}

    def fail(self, cls: type, name: str, shape: Any, dtype: Any, alg: Any, what: str) -> CollectiveError:
        """An error of type ``cls`` naming the op, this rank, the shape, dtype and algorithm, then ``what``."""
        return cls(f"{describe(name, self.rank, self.size, shape, dtype, alg)}: {what}")

    def forget(self) -> None:
        """Drop every template, hot call and plan (their regions and windows are about to be freed)."""
        self._drop_templates()
        self._hot.clear()
        self.vplans.clear()
        self.vhot.clear()

    def _drop_templates(self) -> None:
        """Empty :attr:`templates`, disarming each: a template is live only while it is kept here, so a caller
        holding one (``Sequencer.bind_allreduce``) sees ``quick`` False and takes the checked path again."""
        for t in self.templates.values():
            t.quick = False
        self.templates.clear()

    def hot_calls(self) -> list[Call]:
        """The prepared calls kept for ``comm.alloc`` arrays (the window path)."""
        return [h[3] for h in self._hot.values()]

    def hot_call(self, name: str, x: np.ndarray, op: Any, algorithm: Any, root: int, out: Any) -> Call | None:
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

    def prepare(self, name: str, x: Any, op: Any, algorithm: str | None, root: int, out: Any) -> Call:
        """Check every argument of host call ``name`` and allocate its result; raises before anything is sent."""
        if out is not None and type(x) is np.ndarray and x.base is not None:  # alloc'd arrays are views
            hot = self.hot_call(name, x, op, algorithm, root, out)
            if hot is not None:
                return hot
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
            lambda: self.static_checks(name, shape, dtype, op, algorithm, root))
        if arr.flags.c_contiguous:
            xf = arr if arr.ndim == 1 else arr.reshape(-1)
        else:
            xf = np.ascontiguousarray(arr).reshape(-1)
        needs_out = name != "reduce" or self.rank == root
        of, result, inplace = self._output(name, arr, xf, out, wrap, rshape, needs_out, alg)
        views = out_views = None
        if alg == "shm" and name == "allreduce":
            window = self.window(xf, of, inplace)
            if window is not None:
                alg, views, out_views = window
        c = Call(name, xf, shape, dtype, rop, alg, root, of, result, blocks, inplace, plan)
        c.views, c.out_views = views, out_views
        if (name == "allreduce" and views is None and type(x) is np.ndarray and type(op) is str
                and (algorithm is None or type(algorithm) is str) and (out is None or type(out) is np.ndarray)):
            self._remember(c, xf, op, algorithm)
        if views is not None and type(out) is np.ndarray:
            # Only calls on alloc'd arrays are kept: that memory lives as long as the communicator anyway,
            # whereas keeping a user's plain arrays would keep them alive.
            if len(self._hot) >= 256:
                self._hot.clear()
            self._hot[(id(x), id(out))] = (x, out, (name, op, algorithm, root), c)
        return c

    def _output(self, name: str, arr: np.ndarray, xf: np.ndarray, out: Any, wrap: Any, rshape: tuple,
                needs_out: bool, alg: str) -> tuple[np.ndarray | None, Any, bool]:
        """(flat output, result to return, in place?) of a call, checking ``out`` when given."""
        shape, dtype = arr.shape, arr.dtype
        if out is None:
            if not needs_out:
                return None, None, False
            o = np.empty(rshape, dtype)
            return (o if o.ndim == 1 else o.reshape(-1)), (o if wrap is None else wrap(o)), False
        if type(out) is np.ndarray:
            o, owrap = out, None
        else:
            try:
                o, owrap = to_numpy(out)
            except CollectiveTypeError as exc:
                raise self.fail(CollectiveTypeError, name, shape, dtype, alg, f"out: {exc}") from None
        check_out(name, shape, dtype, alg, o.dtype, o.shape, rshape, self.fail)
        fresh = False
        if not o.flags.writeable:
            from .arrays import is_immutable

            if not is_immutable(out):
                raise self.fail(CollectiveValueError, name, shape, dtype, alg, "out is read-only")
            # JAX arrays (and NumPy scalars) are never written in place: the result is a new one of out's type
            o, fresh = np.empty(rshape, dtype), True
        if not o.flags.c_contiguous:
            raise self.fail(CollectiveValueError, name, shape, dtype, alg,
                            "out is not C-contiguous; pass a contiguous array (e.g. np.ascontiguousarray)")
        of = o if o.ndim == 1 else o.reshape(-1)
        inplace = False
        if o is arr:
            inplace = True
        elif of.size and xf.size and np.may_share_memory(of, xf):
            a0, b0 = xf.__array_interface__["data"][0], of.__array_interface__["data"][0]
            inplace = overlap(name, shape, dtype, alg, (a0, a0 + xf.nbytes), (b0, b0 + of.nbytes), self.fail)
        if not needs_out:
            return None, None, inplace
        return of, (owrap(o) if fresh else out), inplace  # type: ignore[misc]

    def _remember(self, c: Call, xf: np.ndarray, op: str, algorithm: str | None) -> None:
        """Keep a template of synchronous NumPy allreduce ``c`` (no arrays), for the sequencer's repeat path."""
        key = (c.shape, c.dtype, op, algorithm)
        if key in self.templates:
            return
        if len(self.templates) >= 256:
            self._drop_templates()
        q = self.templates[key] = Call(c.name, None, c.shape, c.dtype, c.rop, c.algorithm, c.root, None, None,
                                       c.blocks, False, c.plan)
        if (c.algorithm == "shm" and 0 < xf.nbytes <= ONE_PHASE_BYTES and c.rop is not None
                and xf.size <= self._chunk // c.dtype.itemsize):
            q.quick = None  # eligible for the one-phase path once its fingerprint is known

    def window(self, x: np.ndarray, out: np.ndarray | None, inplace: bool) -> tuple[str, list, list] | None:
        """(algorithm name, every rank's view of ``x``, of ``out``) when an shm allreduce of ``x`` into ``out``
        runs in their windows (both alloc'd, or ``x`` in place), else None.

        Small alloc'd arrays take shm's one-phase copy-in path (below
        ``window_min``). The name is distinct, so a rank passing a plain array
        is caught as a mismatch, and holds the windows' numbers, since ranks
        reducing different windows would each update only their own slice of each.
        """
        shared = self._shared()
        if (shared is None or x.nbytes < WINDOW_MIN_BYTES
                or not (inplace or (out is not None and out.base is not None))):
            return None
        found = shared.lookup(x)
        dst = found if inplace or found is None else shared.lookup(out)
        if found is None or dst is None:
            return None
        return (f"shm-window#{found[0]}" if inplace else f"shm-window#{found[0]}->#{dst[0]}"), found[1], dst[1]

    def static_checks(self, name: str, shape: tuple, dtype: np.dtype, op: Any, algorithm: str | None,
                      root: Any) -> tuple:
        """Check what depends only on the call's signature.

        Returns (op, algorithm, result shape, blocks, root, plan): ``plan`` is this
        rank's compiled Schedule for the Schedule algorithms (None for the others),
        so a repeated call neither rebuilds nor looks up its Schedule.
        """
        alg = algorithm or self.algorithm
        check_algorithm(name, shape, dtype, alg, ALGORITHMS, self.fail)
        rop, root, rshape, blocks = check_signature(name, shape, dtype, op, root, alg, self.rank, self.size,
                                                    self.fail)
        n = int(np.prod(shape)) if shape else 1
        if alg == "auto":
            alg = self._auto(name, n * dtype.itemsize, dtype)
        elif alg == "shm" and self._node_count > 1:
            raise self.fail(CollectiveValueError, name, shape, dtype, alg,
                            f"shm needs every rank on one node, but these {self.size} ranks span "
                            f"{self._node_count} nodes; use auto, ring, tree or hierarchical")
        elif alg == "native" and mpi_dtype(dtype) is None:
            raise self.fail(CollectiveTypeError, name, shape, dtype, alg,
                            "MPI has no datatype for this dtype; use algorithm ring, tree or star")
        plan = None
        if alg in SCHEDULED:
            nelems = self.size * n if name == "allgather" else n
            sched = topologies.build(alg, name, self.size, nelems, root if name in ROOTED else 0, blocks,
                                     nodes=self._nodes)
            plan = self._plan(sched, dtype.itemsize)
        return rop, alg, rshape, blocks, root, plan
