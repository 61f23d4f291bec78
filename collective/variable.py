"""Collectives whose sizes differ across ranks: alltoall, gather, scatter and allgather with uneven first dims.

Terms (the names below follow them):

* **rows** -- the first axis of an input; the rest is the *row shape*, which
  (with the dtype) every rank must share. A 0-d input is one row of shape ().
* **counts** -- rows each rank sends (and each receives), known only after
  the ranks have told each other. Every rank's *post* (its rows, or
  alltoall's block when its blocks are equal, and its ``out``'s rows) travels
  in the cross-rank check itself (which compares collective, dtype, row
  shape, root and algorithm; ``collective.fingerprint``): fenced in shm, every
  rank reads every post; by MPI, every rank learns whether all posted the
  same rows and whether any ``out`` is wrong for that case. When that
  settles the counts (equal rows; on one node, any rows of allgather and
  gather) nothing more is exchanged; otherwise one small allgather gives
  every rank every count, every ``out`` size and what each alltoall rank
  said it expects from each (``recv_splits``). Either way every rank
  reaches the same verdict on a bad ``out`` or an unmet expectation and
  raises before any data moves.
* **header** -- scatter's non-root ranks pass no input: the root broadcasts
  the dtype, the row shape and the splits first. A repeated scatter skips it
  (and the counts) only where every rank posted the token of a plan made in
  one op from one header (:class:`VPlan`).

The data then moves by MPI's own v-collective (``native``, counted in bytes,
so every dtype goes) or by a Schedule of ``topologies`` (pairwise or Bruck
alltoall, binomial-tree gather and scatter, ring allgatherv) run by the
executor on an input and an output buffer, chosen for "auto" from counts
that every rank holds alike (``collective.choose``: shm or native on one
node, the cost model across nodes). An allgather whose counts turn out equal
takes the fixed-size path of ``collective.engine`` for what only that path
runs (tree, star, hierarchical, pipeline, and "auto" across nodes).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from collective import topologies

from .arrays import Deferred, to_numpy
from .errors import CollectiveError, CollectiveMismatchError, CollectiveTypeError, CollectiveValueError, describe
from .fingerprint import hash62
from .ops import check_dtype, dtype_code, dtype_from_code
from .shm import CMA_MIN_BYTES, CMA_READ_MIN_BYTES, QuickScatter, WindowRead
from .signature import check_algorithm, check_out_dtype

__all__ = ["VCall", "VPlan", "VHot", "VARIABLE", "ALGORITHMS_OF", "prepare_variable", "run_variable", "scatter_post",
           "scatter_token"]

#: The collectives this module runs.
VARIABLE = ("alltoall", "gather", "scatter", "allgather")
#: Algorithms a caller may name for each ("auto": see ``collective.choose.Chooser.auto``).
ALGORITHMS_OF: dict[str, tuple[str, ...]] = {
    "alltoall": ("auto", "native", "pairwise", "bruck", "shm"),
    "gather": ("auto", "native", "tree", "shm"),
    "scatter": ("auto", "native", "tree", "shm"),
    "allgather": ("auto", "native", "ring", "tree", "star", "hierarchical", "pipeline", "shm"),
}
#: Algorithms that exist but may not run a given one of these collectives (a tuple: an unhashable argument
#: is only unknown).
_KNOWN_ELSEWHERE = tuple(sorted({"shm", *topologies.ALGORITHMS, *(a for algs in ALGORITHMS_OF.values() for a in algs)}))
#: Where the node's ranks share cores, a repeated call on alloc'd inputs of at most this many bytes on every rank
#: posts them with the check (one phase) rather than reading them in place (two): at P=4 on two cores the one
#: phase won at 64 KiB and lost from 128 KiB on (the copy costs more than the phase it saves).
_WINDOW_POST_MAX = 64 << 10
#: The allgather algorithms only the fixed-size path of ``collective.engine`` has. An allgather whose counts are
#: equal runs there by these (named, or a tuning table's pick for "auto") and by "auto" across nodes, where that
#: path's chooser weighs them; native, ring and shm (and "auto" on one node) stay here, where a repeat reruns its
#: plan after one check.
_FIXED_ONLY = ("tree", "star", "hierarchical", "pipeline")
_HEADER = 36  # scatter's header: dtype (16 bytes), ndim, a flag, then up to 32 dims of the row shape


class VCall:
    """A prepared variable-size collective (its sizes are completed when it runs).

    Attributes:
        name, root, algorithm: as called ("auto" resolved when the counts are known).
        shape: the signature's shape: ``(-1, *row shape)`` (-1: the rows may differ); None for scatter.
        dtype: None for scatter (the root's travels in the header).
        x: this rank's input as a NumPy array of shape (rows, *row shape); None off scatter's root.
        splits: alltoall's rows for each destination, or scatter's at the root; None to split evenly.
        recv_splits: alltoall's rows this rank expects from each rank (checked on every rank before anything
            moves), or None: whatever the ranks send.
        out: the caller's output (a NumPy view), or None; ``wrap`` turns the result into the caller's type.
        result: what the call returns, set when it has run; ``received``: alltoall's rows from each rank.
        post: what this rank posts with its fingerprint: (rows, out rows or -1, bad), see :func:`post_of`;
            scatter's: :func:`scatter_post`. known: every rank's (rows, out rows) when the check settled them, else
            None.
    """

    __slots__ = ("name", "root", "algorithm", "shape", "dtype", "x", "splits", "out", "out_given", "wrap", "result",
                 "received", "return_splits", "row_shape", "rop", "views", "xf", "sig", "post", "known", "plan",
                 "posted", "segs", "recv_splits")

    def __init__(self, name: str, root: int, algorithm: str, x: np.ndarray | None, splits: tuple[int, ...] | None,
                 out: np.ndarray | None, out_given: Any, wrap: Any, return_splits: bool,
                 recv_splits: tuple[int, ...] | None = None) -> None:
        self.name, self.root, self.algorithm, self.x, self.splits = name, root, algorithm, x, splits
        self.recv_splits = recv_splits
        self.out, self.out_given, self.wrap, self.return_splits = out, out_given, wrap, return_splits
        self.row_shape: tuple[int, ...] | None = None if x is None else tuple(x.shape[1:])
        self.dtype = None if (x is None or name == "scatter") else x.dtype
        self.shape = None if self.row_shape is None or name == "scatter" else (-1, *self.row_shape)
        self.result: Any = None
        self.received: list[int] | None = None
        self.rop = self.views = self.sig = None
        self.xf = x  # read by the NaN scan (the root's input of scatter only; None elsewhere)
        self.post: tuple[int, int, int] | None = None
        self.known: np.ndarray | None = None
        #: After the call: its :class:`VPlan` when a repeat of it can run from one (see :func:`run_variable`).
        self.plan: VPlan | None = None
        #: Every rank posted its bytes into the shm arena with the check (``collective.shm.QuickScatter``'s
        #: POSTED verdict): an shm move only reads them.
        self.posted = False
        #: The window path: every rank's whole part of the ``comm.alloc`` window ``x`` lies in (the algorithm is
        #: then ``shm-window#k``, k the window's number, so the check compares windows); else None.
        self.segs: list[np.ndarray] | None = None


class VPlan:
    """What a variable-size call that ran once needs to run again with new arrays of the same shapes.

    Kept per signature by the communicator (``Preparer.vplans``) for
    alltoall, allgather and gather whose counts the cross-rank check settled: a
    repeat posts the same fingerprint and post as the ordinary path would, and
    runs from this plan only if every rank's posted (rows, out rows) equal
    ``pairs``, which fixes every count this plan was made from; otherwise the
    call carries on by the ordinary path from what the check returned
    (:meth:`collective.sequencer.Sequencer.vrepeat`).

    And for every scatter that ran with the check on: its ranks other than
    the root cannot tell the root's header (dtype, row shape, splits) from
    their own arguments, so a repeat posts ``token`` instead of rows, a hash
    of that header and of the op that made the plan (every rank made its plan
    in that one op, from one header and one choice of algorithm). The
    ordinary path posts -2 at the root and -1 elsewhere, which no token
    equals: a repeat runs from its plan only where every rank posted its
    plan's token, and otherwise every rank takes the ordinary path, header
    and counts included (see :func:`scatter_post`).

    Attributes:
        what: the flight recorder's (op, shape, dtype, algorithm, root) of a repeat (``OpRecord.what``).
        name, shape, dtype, algorithm: as the call's record shows them (``algorithm`` as called, "auto" unresolved:
            the fingerprint was made from it); ``ran``: the algorithm that ran.
        sig, post: the call's signature fingerprint and post (see ``collective.fingerprint``).
        pairs: every rank's (rows, out rows), flat, as the check returned them.
        n_out, row_shape: the rows and row shape of the result (-1: none here, gather off its root);
            ``received``: alltoall's rows from each rank; ``root``: gather's.
        recv_equal: the alltoall named what it expects from each rank (``recv_splits``, equal blocks): a repeat
            that the check sends down the ordinary path names it again.
        move: ``move(x, out, seq)`` moves the data of op ``seq`` from ``x`` into ``out`` (C-contiguous arrays).
        arena: the shm arena ``move`` uses, or None.
        quick: for shm within one chunk, the :class:`collective.shm.QuickScatter` that posts the data with the
            check (one phase a call); for a window, the :class:`collective.shm.WindowRead` that reads every
            input where it lies (two phases), or where the ranks share cores and the inputs are small,
            QuickScatter; else None.
        posts: ``move`` reads by single copy, so a repeat posts its input's address before the check
            (``ShmArena.post_input``).
        token: scatter's (see above); None for the others.
        cma: whether the node's arena had cross-memory access when the plan was made (what "auto" picked may rest
            on it; None: made without the arena). A repeat where that changed since (a failed single-copy transfer
            switches it off on every rank of the node at once) takes the ordinary path, which picks again, as a rank
            without a plan does.
    """

    __slots__ = ("name", "shape", "dtype", "algorithm", "ran", "sig", "post", "pairs", "n_out", "row_shape",
                 "received", "move", "arena", "quick", "posts", "root", "recv_equal", "cma", "token", "what")

    def __init__(self, c: VCall, algorithm: str, pairs: tuple[int, ...], n_out: int,
                 move: Callable[[np.ndarray, np.ndarray, int], None], arena: Any, quick: Any = None,
                 posts: bool = False, cma: bool | None = None, token: int | None = None) -> None:
        self.name, self.shape, self.dtype, self.algorithm, self.ran = c.name, c.shape, c.dtype, algorithm, c.algorithm
        self.sig, self.post, self.pairs, self.n_out, self.row_shape = c.sig, c.post, pairs, n_out, c.row_shape
        self.received = c.received
        self.move, self.arena, self.quick = move, arena, quick
        self.posts = posts
        self.root = c.root
        self.recv_equal = c.recv_splits is not None
        self.cma = cma
        self.token = token
        #: What the flight recorder shows of a repeat (``OpRecord.what``).
        self.what = (c.name, c.shape, c.dtype, algorithm, c.root if c.name in ("gather", "scatter") else None)
        if token is not None:  # scatter: what a repeat posts (its out rows are the key's, fixed)
            self.post = (token, c.post[1] if c.post is not None else -1, 0)


class VHot:
    """A :class:`VPlan` bound to the very array objects of the call that made or last repeated it.

    Kept per ``id(x)`` by the communicator (``Preparer.vhot``): a loop that
    passes the same arrays call after call finds its plan by one dict lookup
    and a few identity tests (``collective.sequencer.Sequencer.vrepeat``)
    instead of rebuilding the signature's key. The arrays are held weakly,
    so an entry keeps no user array alive, and an entry whose arrays died
    never matches another array that reuses an id.

    Attributes:
        name: "alltoall" or "allgather".
        x, out: weak references to the input and the output (``out`` None: the call passed none).
        algorithm: as the caller passed it; ``default``: the communicator's algorithm then.
        shape, dtype, out_shape, out_dtype: of ``x`` and ``out`` then (their mutable attributes are compared).
        plan, key: the plan and its key in ``Preparer.vplans``.
    """

    __slots__ = ("name", "x", "out", "algorithm", "default", "shape", "dtype", "out_shape", "out_dtype", "plan",
                 "key")

    def __init__(self, name: str, x: np.ndarray, out: np.ndarray | None, algorithm: str | None, default: str,
                 plan: VPlan, key: tuple) -> None:
        self.name = name
        self.x = weakref.ref(x)
        self.out = None if out is None else weakref.ref(out)
        self.algorithm, self.default, self.plan, self.key = algorithm, default, plan, key
        self.shape, self.dtype = x.shape, x.dtype
        self.out_shape = None if out is None else out.shape
        self.out_dtype = None if out is None else out.dtype


def post_of(name: str, rows: int, splits: tuple[int, ...] | None, out_rows: int, root: int, rank: int,
            size: int, recv_splits: tuple[int, ...] | None = None) -> tuple[int, int, int] | None:
    """What a rank posts with its fingerprint: ``(r, o, bad)``; None for scatter (see :func:`scatter_post`).

    ``r``: the rows of allgather's and gather's input, alltoall's rows per
    block when every block has as many and ``recv_splits`` (what this rank
    expects from each rank) is None or as many each (else -1: the ranks then
    exchange every count); ``o``: the rows of ``out``
    (-1: none, or gather off the root, where ``out`` is not written); ``bad``:
    1 if ``o`` is wrong should every rank post the same ``r`` (then the
    result has ``size * r`` rows), else 0.

    Example::

        post_of("allgather", 3, None, 12, 0, 1, 4)   # (3, 12, 0)
    """
    if name == "scatter":
        return None
    if name == "alltoall":
        r = splits[0] if splits and min(splits) == max(splits) else -1  # type: ignore[index]
        if recv_splits is not None and any(v != r for v in recv_splits):
            r = -1
    else:
        r = rows
    o = -1 if (name == "gather" and rank != root) else out_rows
    return r, o, int(o >= 0 and r >= 0 and o != size * r)


def scatter_post(rank: int, root: int, out_rows: int) -> tuple[int, int, int]:
    """What a scatter on the ordinary path posts with its fingerprint: ``(-2 at the root, -1 elsewhere, out rows
    or -1, 0)``. No repeat's token (:func:`scatter_token`, never negative) equals either, so a rank that takes
    the ordinary path sends every rank down it (the header included); and every scatter posts, so a repeat never
    reads another rank's words left from an earlier call.

    Example::

        scatter_post(1, 0, -1)   # (-1, -1, 0)
    """
    return -2 if rank == root else -1, out_rows, 0


def scatter_token(dtype: np.dtype, row_shape: tuple[int, ...], splits: tuple[int, ...], seq: int) -> int:
    """The 62-bit token a scatter's plan posts: a hash (crc32, the same in every process) of the root's header
    (dtype, row shape, splits) and of ``seq``, the op that made the plan on every rank.

    Example::

        scatter_token(np.dtype("float32"), (3,), (2, 2), 7)   # the same int on every rank
    """
    return hash62(dtype_code(dtype)
                  + np.array([len(row_shape), *row_shape, len(splits), *splits, seq], np.int64).tobytes())


def _rows_of(a: np.ndarray) -> np.ndarray:
    return a.reshape(1) if a.ndim == 0 else a


def _splits(name: str, splits: Any, rows: int, size: int, fail: Callable[[type, str], CollectiveError]) -> tuple:
    if splits is None:
        if name == "alltoall" and rows % size:
            raise fail(CollectiveValueError, f"{rows} rows do not split into {size} equal blocks; pass splits= "
                                             f"(a list of {size} row counts)")
        base, extra = divmod(rows, size)
        return tuple(base + (1 if i < extra else 0) for i in range(size))
    return _row_counts("splits", splits, size, rows, "the input", fail)


def _row_counts(what: str, values: Any, size: int, total: int, total_of: str,
                fail: Callable[[type, str], CollectiveError]) -> tuple:
    """``values`` (argument ``what``) as a tuple of ``size`` non-negative row counts adding up to ``total`` rows,
    which ``total_of`` holds (-1: any total)."""
    try:
        s = tuple(int(v) for v in values)
        ok = all(int(v) == v for v in values)
    except (TypeError, ValueError):
        raise fail(CollectiveValueError, f"{what} {values!r} is not a list of {size} row counts") from None
    if not ok or len(s) != size:
        raise fail(CollectiveValueError, f"{what} has {len(s)} entries; it needs one row count per rank ({size})")
    if min(s) < 0:
        raise fail(CollectiveValueError, f"{what} {list(s)} has a negative count")
    if total >= 0 and sum(s) != total:
        raise fail(CollectiveValueError, f"{what} {list(s)} add up to {sum(s)} rows, but {total_of} has {total}")
    return s


def prepare_variable(name: str, x: Any, root: int, splits: Any, algorithm: str | None, out: Any, rank: int,
                     size: int, default_alg: str, single_node: bool, return_splits: bool = False,
                     window: Callable[[np.ndarray], tuple[int, list[np.ndarray]] | None] | None = None,
                     recv_splits: Any = None) -> VCall:
    """Check every local argument of variable-size collective ``name``; raises before anything is sent.

    ``window(x)``: (number, every rank's part) of the ``comm.alloc`` window
    that ``x`` starts, or None (``SharedArrays.whole``); an alltoall or
    allgather by shm or auto on such an ``x`` reads every rank's input where
    it lies (algorithm ``shm-window#k``).
    """
    alg = algorithm or (default_alg if default_alg in ALGORITHMS_OF[name] else "auto")
    shape: Any = getattr(x, "shape", None)
    dtype: Any = getattr(x, "dtype", None)

    def fail(cls: type, what: str) -> CollectiveError:
        return cls(f"{describe(name, rank, size, shape, dtype, alg)}: {what}")

    def sfail(cls: type, _n: str, _s: Any, _d: Any, _a: Any, what: str) -> CollectiveError:
        return fail(cls, what)  # signature's checks, with this call's description (x's shape and dtype)

    check_algorithm(name, shape, dtype, alg, ALGORITHMS_OF[name], sfail, _KNOWN_ELSEWHERE)
    if alg == "shm" and not single_node:
        raise fail(CollectiveValueError, "shm needs every rank on one node; use auto, native or ring")
    if name in ("gather", "scatter") and (isinstance(root, bool) or not isinstance(root, (int, np.integer))
                                          or not 0 <= root < size):
        raise fail(CollectiveValueError, f"root {root!r} is not a rank of this communicator (0..{size - 1})")
    root = int(root) if name in ("gather", "scatter") else 0
    arr = None
    wrap = None
    if name != "scatter" or rank == root:
        if x is None:
            raise fail(CollectiveValueError, "the input is None" + (" on the root" if name == "scatter" else ""))
        try:
            a, wrap = (x, None) if type(x) is np.ndarray else to_numpy(x)
        except CollectiveTypeError as exc:
            raise fail(CollectiveTypeError, str(exc)) from None
        why = check_dtype(a.dtype, None)
        if why is not None:
            raise fail(CollectiveTypeError, why)
        arr = np.ascontiguousarray(_rows_of(a))
    elif x is not None:
        raise fail(CollectiveValueError, f"only the root (rank {root}) passes data; pass None on the other ranks")
    sp = None
    if name == "alltoall" or (name == "scatter" and rank == root):
        sp = _splits(name, splits, arr.shape[0], size, fail)  # type: ignore[union-attr]
    elif splits is not None:
        raise fail(CollectiveValueError, "splits= is only for alltoall and, at the root, scatter")
    o = None
    if out is not None:
        try:
            o, owrap = (out, None) if type(out) is np.ndarray else to_numpy(out)
        except CollectiveTypeError as exc:
            raise fail(CollectiveTypeError, f"out: {exc}") from None
        if not o.flags.writeable or not o.flags.c_contiguous:
            raise fail(CollectiveValueError, "out must be writable and C-contiguous")
        if arr is not None:
            check_out_dtype(name, arr.shape, arr.dtype, alg, o.dtype, sfail)
            if o.ndim == 0 or o.shape[1:] != arr.shape[1:]:
                raise fail(CollectiveValueError, f"out has shape {o.shape}; its rows must have shape {arr.shape[1:]}")
            if o.size and arr.size and np.may_share_memory(o, arr):
                raise fail(CollectiveValueError, "out overlaps the input; pass a separate array")
        wrap = owrap if owrap is not None else None
    segs = None
    if (window is not None and arr is not None and alg in ("auto", "shm") and single_node and size > 1
            and name in ("alltoall", "allgather")):
        found = window(arr)
        if found is not None:
            alg, segs = f"shm-window#{found[0]}", found[1]
    rs = None
    if recv_splits is not None:
        if name != "alltoall":
            raise fail(CollectiveValueError, "recv_splits= is only for alltoall")
        rs = _row_counts("recv_splits", recv_splits, size, -1 if o is None else int(o.shape[0]), "out", fail)
    c = VCall(name, root, alg, arr, sp, o, out, wrap, return_splits, rs)
    c.segs = segs
    if name == "scatter":
        c.post = scatter_post(rank, root, -1 if o is None else int(o.shape[0]))
    elif arr is not None:
        c.post = post_of(name, int(arr.shape[0]), sp, -1 if o is None else int(o.shape[0]), root, rank, size, rs)
    return c


# ----------------------------------------------------------------- running
def _fail_all(c: VCall, rank: int, size: int, bad: list[tuple[int, str]], cls: type | None = None) -> None:
    """Raise on every rank (they all computed ``bad`` from the same exchanged numbers): ``cls``, else
    CollectiveValueError on the ranks named in ``bad`` and CollectiveError on the others."""
    mine = [w for q, w in bad if q == rank]
    what = "; ".join(f"rank {q}: {w}" for q, w in bad[:8])
    if cls is None:
        cls = CollectiveValueError if mine else CollectiveError
    raise cls(f"{describe(c.name, rank, size, c.shape, c.dtype, c.algorithm)}: {what}. No data was sent; every "
              "rank raises this error")


def _out_rows(c: VCall) -> int:
    return -1 if c.out is None else int(c.out.shape[0])


def _finish(c: VCall, out: np.ndarray) -> Any:
    res = c.out_given if c.out is not None else (out if c.wrap is None else c.wrap(out))
    if type(res) is Deferred:
        res = res.resolve()
    return res


def _counts(c: VCall, comm: Any, rank: int, size: int, out_ok: bool = True) -> tuple[np.ndarray, bool]:
    """Every rank's counts and ``out`` rows: alltoall (P, 2P + 1) [splits, out rows, recv_splits or -1 each];
    scatter (P, 2) [out rows, whether its ``out`` holds the root's rows (``out_ok``)];
    allgather and gather (P, 2) [rows, out rows]; and whether the check settled them. From what the check
    exchanged where that settles them (``c.known``), else by one allgather."""
    known = c.known
    if known is not None:
        if c.name in ("allgather", "gather"):
            return known, True
        b = int(known[0, 0])
        if c.name == "alltoall" and b >= 0 and (known[:, 0] == b).all():  # every rank's blocks are b rows
            # (A rank expecting anything but b from some rank posted -1: every expectation here is met.)
            every = np.full((size, 2 * size + 1), -1, np.int64)
            every[:, :size] = b
            every[:, size] = known[:, 1]
            return every, True
    if c.name == "alltoall":
        mine = np.array([*c.splits, _out_rows(c), *(c.recv_splits or (-1,) * size)], np.int64)  # type: ignore[misc]
    elif c.name == "scatter":
        mine = np.array([_out_rows(c), int(out_ok)], np.int64)
    else:
        mine = np.array([c.x.shape[0], _out_rows(c)], np.int64)  # type: ignore[union-attr]
    if size == 1:
        return mine.reshape(1, -1), False
    every = np.empty((size, mine.size), np.int64)
    comm.Allgather(mine, every)
    return every, False


def run_variable(c: VCall, first: Callable[[], Any] | None, seq: int, comm: Any, MPI: Any, executor: Any,
                 nodes: tuple[int, ...], fixed: Callable[[VCall], Any], arena: Callable[[], Any] | None,
                 choose: Callable[[str, int, np.dtype, int], str], huge: Any = None) -> Any:
    """Run variable-size call ``c`` (op ``seq``) on mpi4py communicator ``comm``; its result.

    ``fixed(c)``: the fixed-size path of an allgather whose counts are equal.
    ``arena()``: the node's shm arena when every rank shares one node, else None.
    ``choose(name, nbytes, dtype, root)``: what "auto" runs ("allgather" for an allgather whose counts are
    equal, "allgatherv" for an uneven one; ``nbytes`` per rank, as ``topologies.cost.predict`` counts them; the
    same on every rank).
    ``huge``: the node arena's ``collective.cma.HugePages`` where it has one: MPI's own calls, which copy large
    messages between the node's processes by cross-memory attach too, tell it their large arrays.
    """
    if first is not None:
        first()  # the check, handed over as an arrival phase: nothing else to arrive at here
    rank, size = comm.Get_rank(), comm.Get_size()
    out_ok = _scatter_header(c, comm, MPI, rank, size) if c.name == "scatter" else True
    dtype = c.dtype
    assert dtype is not None  # scatter's came with the root's header
    rs = c.row_shape
    row = int(np.prod(rs)) if rs else 1
    called = c.algorithm
    every, settled = _counts(c, comm, rank, size, out_ok)
    # As Python ints from here on: with a few ranks, NumPy's per-operation cost on these tiny arrays is most of
    # a small call's time.
    ev = every.tolist()
    M: list[list[int]] | None = None
    counts: list[int] | None = None
    if c.name == "alltoall":
        M = [r[:size] for r in ev]
        cols = [list(col) for col in zip(*M)]  # cols[q]: what every rank sends rank q
        recv = cols[rank]
        want = [sum(col) for col in cols]
        outs = [r[size] for r in ev]
    elif c.name == "scatter":
        bad = [(q, f"out does not hold rows of shape {rs} and dtype {dtype} (the root's)") for q in range(size)
               if not ev[q][1]]
        if bad:
            _fail_all(c, rank, size, bad)
        recv = None
        want = list(c.splits)  # type: ignore[arg-type]
        outs = [r[0] for r in ev]
    else:
        counts = [r[0] for r in ev]
        total = sum(counts)
        want = [total if (c.name == "allgather" or q == c.root) else -1 for q in range(size)]
        outs = [r[1] for r in ev]
    bad = [(q, f"out has {outs[q]} rows, the result has {want[q]}") for q in range(size)
           if outs[q] >= 0 and want[q] >= 0 and outs[q] != want[q]]
    if bad:
        _fail_all(c, rank, size, bad)
    if c.name == "alltoall":
        bad = [(q, f"expects {ev[q][size + 1:]} rows from ranks 0..{size - 1}, they send {cols[q]}")
               for q in range(size) if ev[q][size + 1] >= 0 and ev[q][size + 1:] != cols[q]]
        if bad:  # what some rank sends another is not what that one expects: the ranks' calls differ
            _fail_all(c, rank, size, bad, CollectiveMismatchError)
    equal = (c.name == "allgather" and c.segs is None
             and counts.count(counts[0]) == size)  # type: ignore[union-attr,index]
    if equal and (c.algorithm in _FIXED_ONLY or (c.algorithm == "auto" and arena is None)):
        return fixed(c)
    alg = c.algorithm
    if alg == "auto":
        # From what every rank holds alike: the total of the counts, not this rank's own part.
        isz = dtype.itemsize * row
        if c.name == "alltoall":
            nbytes = sum(want) * isz // size
        elif c.name == "scatter":
            nbytes = sum(c.splits) * isz  # type: ignore[arg-type]
        else:
            nbytes = total * isz // size
        alg = choose(("allgather" if equal else "allgatherv") if c.name == "allgather" else c.name, nbytes, dtype,
                     c.root)
        if alg in _FIXED_ONLY:  # a tuning table's pick for allgather that only the fixed-size path runs
            c.algorithm = alg
            return fixed(c)
    if alg == "shm" and arena is None:
        alg = "native"
    c.algorithm = alg
    n_out = want[rank]
    out = None
    if n_out >= 0:
        out = c.out if c.out is not None else np.empty((n_out, *rs), dtype)  # type: ignore[misc]
    if c.name == "alltoall":
        assert recv is not None  # alltoall's, set above
        c.received = recv
    move = _mover(c, alg, M, counts, row, rank, size, comm, MPI, executor, nodes, arena)
    if (huge is not None and alg == "native"
            and max(c.x.nbytes if c.x is not None else 0, n_out * row * dtype.itemsize) >= CMA_MIN_BYTES):
        move = _noting(move, huge)  # decided once: a plan reruns these counts, and small calls keep their frame
    if c.posted and alg == "shm":  # every rank's bytes are in the arena already: read them
        assert arena is not None  # posted only through the arena
        _shm_mover(c, M, counts, row, rank, size, arena, posted=True)(c.x, out, seq)
    else:
        move(c.x, out, seq)
    if c.name == "scatter" and c.sig is not None:
        # Every rank makes its plan in this op from this header: the token names both (see VPlan).
        token = scatter_token(dtype, rs or (), c.splits, seq)  # type: ignore[arg-type]
        shm_arena = arena() if alg == "shm" else None  # type: ignore[misc]  # shm only with an arena
        quick = None
        posts = False
        if shm_arena is not None:
            sizes, reads = _shm_layout(c, M, counts, row, rank, size)  # in elements
            posts = single_copy(shm_arena, [n * dtype.itemsize for n in sizes])
            if max(sizes) <= shm_arena.chunk_elems(dtype) and not posts:
                # The root's bytes go into the arena with the check (one phase); every rank's post is its token and
                # out rows, which the plan's token fixes (a rank's plan of another op posts another token).
                quick = QuickScatter(shm_arena, dtype, sizes, reads, None, (token, _out_rows(c)),
                                     tuple(v for q in range(size) for v in (token, outs[q])))
        cma = None if arena is None else arena().cma is not None
        c.plan = VPlan(c, called, (), n_out, move, shm_arena, quick, posts, cma, token)
    elif settled and c.sig is not None and c.name in ("alltoall", "allgather", "gather") and c.known is not None:
        # Only rerunnable where the check fixed every count: a repeat posting the same pairs needs nothing else.
        pairs = tuple(int(v) for v in c.known.ravel())
        quick = None
        posts = False
        if (alg == "shm" or c.segs is not None) and c.post is not None:
            ar = arena()  # type: ignore[misc]  # shm and windows only with an arena
            sizes, reads = _shm_layout(c, M, counts, row, rank, size)  # in elements
            fits = max(sizes) <= ar.chunk_elems(dtype)
            posts = alg == "shm" and single_copy(ar, [n * dtype.itemsize for n in sizes])
            # A window's inputs are read where they lie (two phases), except where the ranks share cores and every
            # phase is a round of context switches: there small inputs are posted with the check instead (one
            # phase and a copy more, as for plain arrays), up to the size where the copy costs more than a phase.
            if c.segs is not None and (ar.spins or not fits or max(sizes) * dtype.itemsize > _WINDOW_POST_MAX):
                quick = WindowRead(ar, dtype, c.segs, reads, c.post[:2], pairs)
            elif fits and not posts:
                # (Single copy, see _shm_mover, moves each byte once in two phases: no posting with the check.)
                own = [(off, off + n) for q, off, n, _ in reads if q == rank]
                quick = QuickScatter(ar, dtype, sizes, reads, own[0] if c.name == "alltoall" else None, c.post[:2],
                                     pairs)
        shm_arena = arena() if alg == "shm" or c.segs is not None else None  # type: ignore[misc]
        cma = None if arena is None else arena().cma is not None  # made already: the check (on) is fenced in it
        c.plan = VPlan(c, called, pairs, n_out, move, shm_arena, quick, posts, cma)
    if out is None:
        return None
    res = _finish(c, out)
    if c.return_splits:
        return res, c.received
    return res


def _mover(c: VCall, alg: str, M: list[list[int]] | None, counts: list[int] | None, row: int, rank: int, size: int,
           comm: Any, MPI: Any, executor: Any, nodes: tuple[int, ...], arena: Callable[[], Any] | None
           ) -> Callable[[np.ndarray | None, np.ndarray | None, int], None]:
    """``move(x, out, seq)``: the data movement of call ``c`` by ``alg`` for these counts, from any C-contiguous
    ``x`` into any ``out`` of this call's shapes (None where this rank has none), as op ``seq``.

    Everything that depends on the counts only (MPI's counts and displacements, a Schedule's plan, the shm
    reads) is worked out here once, so a :class:`VPlan` reruns it with new arrays.
    """
    dtype = c.dtype
    assert dtype is not None  # run_variable settled it
    name = c.name
    if alg == "shm":
        assert arena is not None  # shm only where there is an arena (see run_variable)
        return _shm_mover(c, M, counts, row, rank, size, arena)
    if c.segs is not None:  # the window path: every rank's input is in one comm.alloc window
        assert arena is not None  # a window exists only with the arena
        read = arena().window_reader(c.segs, _shm_layout(c, M, counts, dtype.itemsize * row, rank, size)[1])

        def move_window(x: np.ndarray | None, o: np.ndarray | None, seq: int) -> None:
            read(o)  # type: ignore[arg-type]
        return move_window
    if name == "alltoall":
        assert M is not None  # alltoall's matrix
        sc = [v * row for v in M[rank]]
        rc = [M[q][rank] * row for q in range(size)]
        if alg == "native":
            b = M[0][0]
            return _native_mover(comm, MPI, "alltoall", dtype, sc, rc, 0, rank,
                                 all(r.count(b) == size for r in M))
        counts_e = tuple(tuple(v * row for v in M[i]) for i in range(size))
        sched = topologies.build(alg, "alltoall", size, sum(map(sum, counts_e)), counts=counts_e)
        vname, root = "alltoall", 0
    elif name == "scatter":
        ce = [v * row for v in c.splits]  # type: ignore[union-attr]
        if alg == "native":
            return _native_mover(comm, MPI, "scatter", dtype, ce, ce, c.root, rank)
        sched = topologies.build("tree", "scatter", size, sum(ce), c.root, counts=ce)
        vname, root = "scatter", c.root
    else:
        ce = [v * row for v in counts]  # type: ignore[union-attr]
        vname = "gather" if name == "gather" else "allgatherv"
        if alg == "native":
            return _native_mover(comm, MPI, vname, dtype, ce, ce, c.root, rank)
        salg = "tree" if vname == "gather" else "ring"
        root = c.root if vname == "gather" else 0
        sched = topologies.build(salg, vname, size, sum(ce), root, counts=ce,
                                 nodes=nodes if vname == "allgatherv" else None)
    plan = executor.plan(sched, dtype.itemsize)
    gets_input = vname != "scatter" or rank == root
    gets_output = vname not in ("gather",) or rank == root

    def move_schedule(x: np.ndarray | None, o: np.ndarray | None, seq: int) -> None:
        bufs = {"input": x.reshape(-1) if gets_input and x is not None else None,
                "output": o.reshape(-1) if gets_output and o is not None else None}
        executor.run(plan, bufs, None, seq)
    return move_schedule


def single_copy(ar: Any, sizes: list[int]) -> bool:
    """Whether an shm call whose ranks' inputs are ``sizes`` bytes (the same list on every rank) reads them
    straight from the ranks' inputs (``ShmArena.cross_read``, two phases) rather than copying through the arena's
    regions (one phase a chunk, and one for the check unless a repeat posts its bytes with it).

    Only where the node allows cross-memory attach. Where every rank spins on a core of its own, a phase costs
    little and the copy saved wins from ``CMA_READ_MIN_BYTES`` per rank (the mean) on; where the ranks share cores,
    a phase is a round of context switches, so only where some input spans more than one chunk (the copy-in path
    then takes more phases than this one). The same verdict on every rank.
    """
    if ar.cma is None:
        return False
    if ar.spins:
        return sum(sizes) >= CMA_READ_MIN_BYTES * len(sizes)
    return max(sizes) > ar.chunk


def _shm_mover(c: VCall, M: list[list[int]] | None, counts: list[int] | None, row: int, rank: int, size: int,
               arena: Callable[[], Any], posted: bool = False
               ) -> Callable[[np.ndarray | None, np.ndarray | None, int], None]:
    """:func:`_mover` for shm (``posted``: only the reads, see ``ShmArena.scatter_bytes``): by single copy where
    :func:`single_copy` says so (decided at each call: the node's verdict may be switched off), else through the
    arena's regions."""
    sizes, reads = _shm_layout(c, M, counts, c.dtype.itemsize * row, rank, size)  # type: ignore[union-attr]
    ar = arena()
    scatter_bytes = ar.scatter_bytes
    empty = np.empty(0, np.uint8)
    byte = np.uint8
    cross: list[tuple[list[tuple[int, int, int, int]], str]] = []  # made at the first call that reads by single copy

    def move_shm(x: np.ndarray | None, o: np.ndarray | None, seq: int) -> None:
        if not posted and single_copy(ar, sizes):
            if not cross:
                # From rank r+1 first, then r+2, ...: the ranks read from different peers at a time.
                cross.append((sorted(reads, key=lambda t: (t[0] - ar.rank - 1) % ar.size),
                              describe(c.name, rank, size, c.shape, c.dtype, "shm")))
            creads, what = cross[0]
            ar.cross_read(x.reshape(-1).view(byte) if x is not None else None,
                          o.reshape(-1).view(byte) if o is not None else None, sizes, creads, what)
            return
        ob = o.reshape(-1).view(np.uint8) if o is not None else None
        scatter_bytes(x.reshape(-1).view(np.uint8) if x is not None else empty, sizes,
                      [(q, off, n, ob[d:d + n]) for q, off, n, d in reads], posted)  # type: ignore[index]
    return move_shm


def _shm_layout(c: VCall, M: list[list[int]] | None, counts: list[int] | None, isz: int, rank: int,
                size: int) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """The call over the node's shm arena (every rank posts its input once, reads its parts from the others'):
    every rank's posted bytes, and this rank's reads as (rank, offset in its bytes, count, offset in ``out``).
    ``M``: alltoall's rows from each rank to each; ``counts``: allgather's and gather's rows of each rank."""
    reads: list[tuple[int, int, int, int]] = []
    if c.name == "alltoall":
        assert M is not None  # alltoall's matrix
        sizes = [sum(r) * isz for r in M]
        dst = 0
        for q in range(size):
            off = sum(M[q][:rank]) * isz
            n = M[q][rank] * isz
            reads.append((q, off, n, dst))
            dst += n
    elif c.name == "scatter":
        sizes = [0] * size
        sizes[c.root] = sum(c.splits) * isz  # type: ignore[arg-type]
        off = sum(c.splits[:rank]) * isz  # type: ignore[index]
        reads.append((c.root, off, c.splits[rank] * isz, 0))  # type: ignore[index]
    else:
        sizes = [v * isz for v in counts]  # type: ignore[union-attr]
        if c.name == "allgather" or rank == c.root:  # gather writes the root's out only
            dst = 0
            for q in range(size):
                reads.append((q, 0, sizes[q], dst))
                dst += sizes[q]
    return sizes, reads


def _scatter_header(c: VCall, comm: Any, MPI: Any, rank: int, size: int) -> bool:
    """The root's dtype, row shape and splits, on every rank; whether this rank's ``out`` (if any) holds rows of
    them (every rank learns every rank's answer with the counts, see :func:`_counts`)."""
    head = np.zeros(_HEADER + size, np.int64)
    if rank == c.root:
        x = c.x
        head[:2] = np.frombuffer(dtype_code(x.dtype), np.int64)  # type: ignore[union-attr]
        if x.ndim - 1 > _HEADER - 4:  # type: ignore[union-attr]
            head[3] = 1
        else:
            head[2] = x.ndim - 1  # type: ignore[union-attr]
            head[4:4 + x.ndim - 1] = x.shape[1:]  # type: ignore[union-attr]
        assert c.splits is not None  # the root's splits are resolved before the call runs
        head[_HEADER:] = c.splits
    comm.Bcast(head, root=c.root)
    if head[3]:
        raise CollectiveValueError(f"{describe('scatter', rank, size)}: the root's input has more than "
                                   f"{_HEADER - 4} dimensions")
    dtype = dtype_from_code(head[:2].tobytes())
    rs = tuple(int(v) for v in head[4:4 + int(head[2])])
    if rank != c.root:
        c.row_shape, c.splits = rs, tuple(int(v) for v in head[_HEADER:])
    c.dtype = dtype
    return c.out is None or (c.out.dtype == dtype and c.out.shape[1:] == rs)


def _noting(move: Callable[[np.ndarray | None, np.ndarray | None, int], None], huge: Any
            ) -> Callable[[np.ndarray | None, np.ndarray | None, int], None]:
    """``move`` that first tells ``huge`` (``collective.cma.HugePages``) of its arrays of ``CMA_MIN_BYTES`` or
    more (for calls where one may be that large): MPI copies a large message between the node's processes by
    pinning its pages, as the single-copy path does, so an array passed again and again goes on huge pages too."""
    def move_noting(x: np.ndarray | None, o: np.ndarray | None, seq: int) -> None:
        for a in (x, o):
            if a is not None and a.nbytes >= CMA_MIN_BYTES:
                huge.note(a.ctypes.data, a.nbytes)
        move(x, o, seq)
    return move_noting


def _native_mover(comm: Any, MPI: Any, name: str, dtype: np.dtype, sc: list[int], rc: list[int], root: int,
                  rank: int, equal: bool = False) -> Callable[[np.ndarray | None, np.ndarray | None, int], None]:
    """MPI's own v-collective, in bytes (so every dtype goes): element counts ``sc`` sent, ``rc`` received; the
    counts and displacements are worked out once. ``equal``: every rank's alltoall blocks are alike (every rank
    knows it alike: MPI's Alltoall on some ranks and Alltoallv on others would hang)."""
    isz = dtype.itemsize
    B = MPI.BYTE

    def layout(counts: list[int]) -> tuple[list[int], list[int]]:
        c = [v * isz for v in counts]
        d = [0] * len(c)
        for i in range(1, len(c)):
            d[i] = d[i - 1] + c[i - 1]
        return c, d

    empty = np.empty(0, np.uint8)
    send, recv = layout(sc), layout(rc)
    if name == "alltoall" and equal:
        f = comm.Alltoall  # equal blocks: MPI's alltoall, as a caller of MPI would use
        each = [sc[0] * isz, B], [rc[0] * isz, B]

        def move(x: Any, o: Any, seq: int) -> None:
            f([x, *each[0]], [o, *each[1]])
    elif name == "alltoall":
        f = comm.Alltoallv

        def move(x: Any, o: Any, seq: int) -> None:
            f([x, send, B], [o, recv, B])
    elif name == "gather":
        f = comm.Gatherv

        def move(x: Any, o: Any, seq: int) -> None:
            f([x, B], [o, recv, B] if rank == root else None, root)
    elif name == "scatter":
        f = comm.Scatterv

        def move(x: Any, o: Any, seq: int) -> None:
            f([x, send, B] if rank == root else None, [o, B], root)
    else:
        f = comm.Allgatherv

        def move(x: Any, o: Any, seq: int) -> None:
            f([x, B], [o, recv, B])

    def safe(x: Any, o: Any, seq: int) -> None:
        move(x if x is not None else empty, o if o is not None else empty, seq)
    return safe if name in ("gather", "scatter") else move
