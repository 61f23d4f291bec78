"""The negotiation engine behind collective.horovod: named ops matched across ranks, then run on a Communicator.

Terms. A *request* is one rank's announcement of a named op: its kind
(allreduce, allgather, broadcast, alltoall, reducescatter, barrier, join,
add_process_set, remove_process_set), the dtype and shape of each array, the
reduction op, the root, the splits. A *tick* is one exchange of the requests
each rank made since the previous tick: every rank's slot (a few header
words, its cached requests, and the JSON of the others; metadata only: array
data never goes through JSON or pickle) reaches every rank; see
``_tick_once``. Every rank sees every request, so every rank holds the same
*table* of pending names and takes the same decisions without a coordinator:
a name is *ready* once every rank that has not joined has requested it; ready
names run in one order on every rank (by the lowest requesting rank's
sequence number), inside the tick that made them ready.

The *response cache* is Horovod's: a request that ran before with the same
name, kind, dtypes, shapes, op and factors (a training loop's gradients, a
repeated named call) travels as two integers, its cache id and its sequence
number, instead of JSON. Ids are handed out while ops run, which happens in
one order on every rank, so every rank's cache is the same at every tick
(least recently run entries make room first, also in that order).

The *driver* is the thread that runs the ticks, one at a time per rank (a
lock): a caller that waits on a handle drives them itself, so a blocking op
goes from submit to its data collective and back without waking another
thread; the engine thread drives them when no caller waits (async ops in
flight, and an idle cycle that keeps answering the other ranks' ticks). Ticks
are collectives on one communicator whichever thread runs them; the
communicator is told so (``ordered_by_caller``).

Matching follows Horovod: ops are matched by name, not by call order, so a
rank may start ops in any order; ranks that disagree on a name's kind,
dtype, shape, op or root get a HorovodInternalError on every rank without
any data moving; a name already in flight on this rank is a ValueError at
submission. A rank that called join contributes zeros to allreduces until
every rank has joined; any other op that needs a joined rank fails with
HorovodInternalError. A rank that shut down fails the ops that need it.
Callers wait on a Handle with a deadline, and the error of a timed-out wait
names the ranks that never requested the op.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CollectiveValueError, RanksLostError
from ..threads import set_name
from .exceptions import HorovodInternalError

__all__ = ["KINDS", "Engine", "Handle"]

KINDS = ("allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "barrier", "join",
         "add_process_set", "remove_process_set")
_JOINABLE = frozenset(("allreduce",))
#: Kinds whose requests are the same on every rank when the ranks agree (allgather's and alltoall's first
#: dims and splits differ by rank), so one cache entry stands for every rank's request.
_CACHED_KINDS = frozenset(("allreduce", "broadcast", "reducescatter"))
#: Entries of the response cache (Horovod's HOROVOD_CACHE_CAPACITY default).
_CACHE_CAPACITY = 1024
_FLAG_SHUTDOWN = 2
_CYCLE_S = 0.001
_IDLE_S = 0.005
_HOT_S = 0.05
#: A waiting caller whose ticks brought nothing new for this long paces them by the cycle (it spins meanwhile,
#: so that a rank a little behind is answered at once).
_PATIENT_S = 0.02
#: One rank's slot in a tick's exchange: the header (number of cached requests, flags, JSON length), then the
#: cached requests' (id, seq) pairs and the JSON of the others when they fit.
_SLOT_WORDS = 64
_HEAD = 3
#: Largest fused allreduce buffer (Horovod's default fusion threshold).
_FUSION_BYTES = 64 << 20
_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dt: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = str(dt)
    return name


class Handle:
    """One submitted op: ``done()`` polls, ``wait()`` returns the result or raises its error."""

    __slots__ = ("_done", "_exc", "_result", "engine", "kind", "name")

    def __init__(self, name: str, kind: str, engine: Engine) -> None:
        self.name, self.kind, self.engine = name, kind, engine
        self._done = False
        self._result: Any = None
        self._exc: BaseException | None = None

    def done(self) -> bool:
        """True once the op has finished (successfully or not)."""
        if self._done:
            self.engine._claim(self.name)
            return True
        return False

    def wait(self, timeout: float | None = None) -> Any:
        """The op's result; raises its error, or HorovodInternalError after ``timeout`` s naming the missing ranks.

        While the op is unfinished the calling thread runs the engine's ticks
        itself (see the module docstring). Without ``timeout`` the engine's
        deadline applies, and an op that misses it is withdrawn on every rank.
        """
        if not self._done:
            eng = self.engine
            limit = eng.timeout if timeout is None else timeout
            eng._drive_until(self, limit)
            if not self._done:
                err = eng._unfinished(self, limit, withdraw=timeout is None)
                if err is not None:
                    raise err
        self.engine._claim(self.name)
        if self._exc is not None:
            raise self._exc
        return self._result

    def wait_done(self, timeout: float) -> bool:
        """Like :meth:`wait` for at most ``timeout`` s, without raising: True once the op has finished."""
        if not self._done:
            eng = self.engine
            eng._drive_until(self, timeout)
            if not self._done:
                # The engine thread may be publishing the op's completion right now: decide under its lock.
                with eng._lock:
                    return self._done
        return True

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        """Publish the op's outcome; the engine calls it holding its ``_lock`` (see ``Engine._unfinished``)."""
        self._result, self._exc = result, exc
        self._done = True


@dataclass
class _Local:
    """This rank's own submitted op: its arrays and the handle its caller waits on."""

    kind: str
    arrays: list
    handle: Handle
    outs: list | None = None  # where an allreduce writes each result (None: a new array)
    scales: list | None = None  # what an allreduce multiplies each result by before completing (None: nothing)
    key: tuple | None = None  # its key in the response cache (see _Out)
    taken: bool = False  # the driver has read its arrays and outs to run it: it can no longer be withdrawn


@dataclass
class _Out:
    """A request not yet sent: what its JSON holds, and its key in this rank's side of the response cache."""

    seq: int
    name: str
    kind: str
    key: tuple | None  # (name, kind, ((dtype, shape), ...), meta items); None: never cached
    sig: list  # (dtype, shape) of each array
    meta: dict

    def request(self) -> dict:
        req = {"seq": self.seq, "name": self.name, "kind": self.kind,
               "dtypes": [_dtype_name(d) for d, _ in self.sig], "shapes": [list(s) for _, s in self.sig]}
        req.update(self.meta)
        return req


@dataclass
class _Pending:
    """A name in the table: every rank's request for it, and each rank's sequence number for it."""

    reqs: dict = field(default_factory=dict)  # rank -> request dict (a cached one is shared, without "seq")
    seqs: dict = field(default_factory=dict)  # rank -> seq


class Engine:
    """Matches named ops across the ranks of ``comm`` and runs them on it (see the module docstring).

    Args:
        comm: a collective Communicator of the engine's own (the global one or a process set's); the engine
            tags every thread's ops on it alike (the caller's and its own thread run its ticks).
        ranks: the global ranks of ``comm``'s members, in ``comm`` rank order (for messages).
        on_control: called by the driver for add/remove_process_set ops once every rank requested them.
        eager: while this rank has announced ops that wait for other ranks and no caller waits, the engine
            thread starts the next exchange at once instead of after the cycle's pause (see ``_loop``); False
            keeps the fixed cycle.
    """

    def __init__(self, comm: Any, ranks: list[int] | None = None,
                 on_control: Callable[[str, dict, Engine], Any] | None = None, eager: bool = True) -> None:
        self.comm = comm
        seqr = getattr(comm, "sequencer", None)
        if seqr is not None:
            seqr.ordered_by_caller("collective-horovod")
        self.eager = eager
        self.rank, self.size = comm.rank, comm.size
        self.ranks = list(range(comm.size)) if ranks is None else list(ranks)
        self.timeout = float(os.environ.get("COLLECTIVE_TIMEOUT", "300") or 300)
        self._on_control = on_control
        self._lock = threading.Lock()
        # Notified (holding _lock) whenever handles finish: a caller whose deadline passed while its op was
        # already running waits on it for the op's outcome (see _unfinished).
        self._finished_cv = threading.Condition(self._lock)
        self._drive = threading.Lock()  # held by the thread that runs a tick
        self._callers = 0  # callers inside wait(), which run the ticks themselves
        self._wake = threading.Event()
        self._outbox: list[_Out] = []
        self._local: dict[str, _Local] = {}
        # Finished here, but neither waited on nor polled, and no other op submitted since (see submit).
        self._unclaimed: set[str] = set()
        self._cancelled: dict[str, _Local] = {}  # withdrawn here, until every rank has dropped them
        self._table: dict[str, _Pending] = {}
        self._seq = 0
        self._tick = 0
        self._joined: dict[int, int] = {}  # rank -> tick at which its join arrived
        self._shut: set[int] = set()
        self._stopping = False
        self._finished = False  # every rank has shut down
        self._hot_until = 0.0
        self._ticked_at = 0.0  # when this rank's last tick ended
        self._stopped = threading.Event()
        self._fatal: BaseException | None = None
        #: The RanksLostError of the communicator, once a collective of this engine raised one (elastic mode).
        self.lost: RanksLostError | None = None
        self._slots = np.zeros((self.size, _SLOT_WORDS), np.int64)  # a tick's exchange: in, out
        self._got = np.zeros((self.size, _SLOT_WORDS), np.int64)
        self._used = _SLOT_WORDS  # words of this rank's row the last tick may have written
        self._fusion: dict[np.dtype, np.ndarray] = {}  # the fused allreduces' buffer per dtype, kept for reuse
        # The response cache: entry id -> the agreed request (no "seq"), the ids in least recently run order,
        # id(request) -> id, and this rank's own request keys -> id (and back, for eviction).
        self._entries: list[dict | None] = []
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._entry_id: dict[int, int] = {}
        self._ids: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {}
        self._thread = threading.Thread(target=self._loop, name="collective-horovod", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side
    def submit(self, kind: str, name: str, arrays: list[np.ndarray], outs: list[np.ndarray | None] | None = None,
               scales: list[float] | None = None, wake: bool = True, **meta: Any) -> Handle:
        """Announce ``name`` to the other ranks and return its handle (arrays are read by the driver).

        ``outs`` (allreduce only): for each array, a C-contiguous array of its
        shape and dtype that receives the result (it may be the array itself),
        or None for a new one; the handle's result then holds that array.
        ``scales`` (allreduce only, floating-point arrays): for each array, a
        factor its result is multiplied by before the handle completes (1.0:
        none), so a finished handle's result is final (Horovod's average and
        postscale fold into one such factor). ``wake``: start the engine
        thread's next tick now; False when the caller waits on the handle at
        once (it runs the tick itself).

        Raises:
            ValueError: ``name`` is already in flight on this rank.
            HorovodInternalError: the engine has shut down.
        """
        h = Handle(name, kind, self)
        sig = [(a.dtype, a.shape) for a in arrays]
        key: tuple | None = None
        if kind in _CACHED_KINDS:
            key = (name, kind, tuple(sig), tuple(meta.items()))
            try:
                hash(key)
            except TypeError:  # a list in meta: such a request is never cached
                key = None
        with self._lock:
            if self._fatal is not None or self._stopping:
                raise HorovodInternalError(
                    f"{kind} {name!r} on rank {self.rank}: Horovod has been shut down"
                    + (f" ({self._fatal})" if self._fatal is not None else "")
                    + "; call hvd.init() before any collective") from self._fatal
            # A name is in flight until its op finishes; a name whose op finished before this rank looked at it
            # (waited, polled, or submitted anything else) still counts, so a second submission straight after
            # the first is refused however quickly the other ranks made the first one run.
            if name in self._local or name in self._unclaimed:
                raise ValueError(
                    f"{kind} on rank {self.rank}: an op named {name!r} is already in flight on this rank; "
                    "names must be unique among unfinished ops (synchronize the first one, or pick another name)")
            self._unclaimed.clear()
            self._seq += 1
            self._local[name] = _Local(kind, arrays, h, outs, scales, key)
            self._outbox.append(_Out(self._seq, name, kind, key, sig, meta))
        if wake:
            self._wake.set()
        return h

    def cancel(self, name: str) -> None:
        """Withdraw this rank's request for ``name`` on every rank (after its deadline passed here).

        The other ranks drop the request when the next tick delivers the
        withdrawal; if the op becomes ready before that, this rank still takes
        part with its arrays as they were now (its caller has already been
        given the error and owns its tensors again: a copy is kept, and the
        result goes nowhere), so the other ranks' results stay right.
        """
        with self._lock:
            self._withdraw_locked(name)
        self._wake.set()

    def _withdraw_locked(self, name: str) -> bool:
        """:meth:`cancel`'s work, the caller holding ``_lock``; False if ``name`` is not in flight here or is
        already running (its outs are being written: too late to withdraw)."""
        loc = self._local.get(name)
        if loc is None or loc.taken:
            return False
        del self._local[name]
        loc.arrays = [np.array(a, copy=True) for a in loc.arrays]
        loc.outs = None
        self._cancelled[name] = loc
        self._seq += 1
        self._outbox.append(_Out(self._seq, name, "cancel", None, [], {}))
        return True

    def missing(self, name: str) -> str:
        """Which ranks have not requested ``name`` yet (for a timeout's message)."""
        with self._lock:
            p = self._table.get(name)
            got = set(p.reqs) if p is not None else set()
        lacking = [self.ranks[r] for r in range(self.size) if r not in got]
        return (f"still waiting for rank(s) {lacking} to submit it" if lacking
                else "every rank submitted it; it is queued behind other ops")

    def shutdown(self, timeout: float | None = None) -> None:
        """Tell the other ranks this rank is done and stop once every rank has said so (or ``timeout`` passes)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._stopped.wait(self.timeout if timeout is None else timeout)

    @property
    def running(self) -> bool:
        """False once the engine thread has ended."""
        return not self._stopped.is_set()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the engine thread to end (after a fatal error it ends by itself); True if it
        did."""
        return self._stopped.wait(timeout)

    def _drive_until(self, h: Handle, limit: float) -> None:
        """Run ticks on the calling thread until ``h`` finishes, ``limit`` s pass or the engine stops."""
        clock = time.monotonic
        deadline = clock() + limit
        # join waits for the others' data to run out, which may take long: it keeps the cycle. Any other op
        # spins while ticks bring news (a rank a few microseconds behind is answered at once), then paces.
        patient = h.kind == "join"
        news_at = clock()
        with self._lock:
            self._callers += 1
        try:
            while not h._done:
                left = deadline - clock()
                if left <= 0 or not self._drive.acquire(timeout=left):
                    return
                try:
                    if h._done or self._fatal is not None or self._finished:
                        return
                    news = self._step()
                finally:
                    self._drive.release()
                if h._done:
                    return
                now = clock()
                if news:
                    news_at = now
                if patient or now - news_at > _PATIENT_S:
                    time.sleep(min(_CYCLE_S, max(0.0, deadline - now)))
        finally:
            with self._lock:
                self._callers -= 1

    def _unfinished(self, h: Handle, limit: float, withdraw: bool) -> HorovodInternalError | None:
        """The error of a wait on ``h`` whose time ran out, or None if ``h`` finished after all; ``withdraw``: its
        deadline passed, so it is withdrawn on every rank (its name then cannot match a later op).

        The engine publishes a completion (pops the op, then finishes its
        handle) under ``_lock``, so the decision here, taken under the same
        lock, is atomic: either the op finished (its outs written) and the
        wait returns it, or it is withdrawn before the driver takes it. An op
        the driver has already taken runs on every rank and writes its outs
        whatever happens here, so a withdrawing wait waits for its outcome
        (its data collective has a deadline of its own) rather than hand the
        caller arrays that are still being written.
        """
        with self._lock:
            if h._done:
                return None
            running = False
            if self._fatal is None and not self._finished and withdraw:
                loc = self._local.get(h.name)
                running = loc is not None and loc.taken
                if running:
                    self._finished_cv.wait_for(lambda: h._done, self.timeout)
                    if h._done:
                        return None
                else:
                    self._withdraw_locked(h.name)
        if self._fatal is not None or self._finished:
            err = HorovodInternalError(f"{h.kind} {h.name!r} on rank {self.rank}: the engine stopped before the op "
                                       "ran" + (f": {type(self._fatal).__name__}: {self._fatal}"
                                                if self._fatal is not None else ""))
            err.__cause__ = self._fatal
            return err
        self._wake.set()
        if running:
            return HorovodInternalError(
                f"{h.kind} {h.name!r} on rank {self.rank} of {self.size}: its data collective started but did not "
                f"finish within {limit + self.timeout:.0f} s (set COLLECTIVE_TIMEOUT to wait longer)")
        return HorovodInternalError(
            f"{h.kind} {h.name!r} on rank {self.rank} of {self.size}: not finished after {limit:.0f} s; "
            f"{self.missing(h.name)} (set COLLECTIVE_TIMEOUT to wait longer)")

    # ---------------------------------------------------------------- driver
    def _loop(self) -> None:
        # Every engine (the global one, one per process set, the next after a shrink) has a thread of this name.
        set_name("collective-horovod")
        try:
            while self._fatal is None and not self._finished:
                if self._callers and not self._stopping:  # a waiting caller runs the ticks
                    self._wake.wait(_IDLE_S)
                    self._wake.clear()
                    continue
                with self._lock:
                    # Requests not sent yet, or this rank's ops that every rank has heard of here but some rank
                    # has not announced yet (join waits for the others' data to run out, which may take long: it
                    # keeps the cycle).
                    eager = bool(self._outbox) or (self.eager and any(n in self._table for n in self._local
                                                                      if n != "join"))
                    busy = bool(self._table or self._local)
                if not eager:
                    # Otherwise tick only once nobody has for a cycle: the other ranks need this rank's ticks to
                    # get through theirs (a waiting caller there sees its deadline pass, and every rank learns of a
                    # cancel or a shutdown); a caller here that drives them saves this thread the wake-ups.
                    idle = (_CYCLE_S if busy or time.monotonic() < self._hot_until else _IDLE_S)
                    pause = self._ticked_at + idle - time.monotonic()
                    if pause > 0:
                        self._wake.wait(pause)
                        self._wake.clear()
                        continue
                # else: go straight into the next exchange. It completes when the last rank's driver joins it,
                # which is as soon as that rank submits, so the op starts without the pause of a cycle on this
                # side. Every rank still sees the same exchanges in the same order, so the decisions stay
                # identical on every rank.
                self._wake.clear()
                if not self._drive.acquire(timeout=_IDLE_S):
                    continue
                try:
                    if self._fatal is None and not self._finished:
                        self._step()
                finally:
                    self._drive.release()
        finally:
            self._stopped.set()

    def _step(self) -> bool:
        """One tick on the driver (holding ``_drive``); True if it carried any request. A failure stops the
        engine: every waiter gets the error instead of hanging."""
        try:
            news, self._finished = self._tick_once()
            self._ticked_at = time.monotonic()
        except BaseException as exc:
            self._die(exc)
            if not isinstance(exc, Exception):
                raise
            return True
        if self._finished:
            self._wake.set()
        return news

    def _die(self, exc: BaseException) -> None:
        with self._lock:
            if isinstance(exc, RanksLostError) and self.lost is None:
                self.lost = exc
            self._fatal = exc
            for name, loc in self._local.items():  # finished under the lock, as _complete does
                err = HorovodInternalError(f"{loc.kind} {name!r} on rank {self.rank}: the engine "
                                           f"stopped: {type(exc).__name__}: {exc}")
                err.__cause__ = exc
                loc.handle._finish(None, err)
            self._local.clear()
            self._finished_cv.notify_all()
        self._wake.set()

    def _encode(self, out: list[_Out]) -> tuple[list[int], bytes]:
        """The (id, seq) pairs of ``out``'s cached requests and the JSON of the others."""
        pairs: list[int] = []
        full = []
        ids = self._ids
        for o in out:
            i = ids.get(o.key) if o.key is not None else None
            if i is None:
                full.append(o.request() if o.kind != "cancel" else {"seq": o.seq, "name": o.name, "kind": "cancel"})
            else:
                pairs += (i, o.seq)
        return pairs, (json.dumps(full, separators=(",", ":")).encode() if full else b"")

    def _tick_once(self) -> tuple[bool, bool]:
        """One exchange of new requests, then every op that became ready: (any request came, every rank has shut
        down).

        The exchange is a sum-allreduce of int64 words in which each rank fills
        only its own slot: every slot comes back exactly as its rank wrote it,
        and the communicator's allreduce is its fastest collective for small
        messages. When a slot is longer than ``_SLOT_WORDS`` (its header tells),
        every slot travels again, whole, in a second allreduce of the same
        kind.
        """
        with self._lock:
            out, self._outbox = self._outbox, []
            flags = (_FLAG_SHUTDOWN if self._stopping else 0)
        pairs, payload = self._encode(out) if out else ([], b"")
        comm, size, rank = self.comm, self.size, self.rank
        words = _HEAD + len(pairs) + -(-len(payload) // 8)
        slots, got = self._slots, self._got  # kept from tick to tick: only this rank's row is ever written
        mine = slots[rank]
        if words <= _SLOT_WORDS and not payload:  # the usual tick: header and cached pairs, one write
            head = [len(pairs) // 2, flags, 0, *pairs]
            if self._used > len(head):
                mine[len(head):self._used] = 0
            mine[:len(head)] = head
            self._used = len(head)
        else:
            mine[:] = 0
            if words <= _SLOT_WORDS:
                _fill(mine, pairs, payload, flags)
            else:
                mine[:_HEAD] = len(pairs) // 2, flags, len(payload)
            self._used = _SLOT_WORDS
        comm.allreduce(slots, op="sum", out=got)
        self._tick += 1
        heads = got[:, :_HEAD].tolist()
        news = any(n or j for n, _, j in heads)
        if news:
            self._hot_until = time.monotonic() + _HOT_S
            longest = max(_HEAD + 2 * n + -(-j // 8) for n, _, j in heads)
            if longest > _SLOT_WORDS:
                buf = np.zeros((size, longest), np.int64)
                _fill(buf[rank], pairs, payload, flags)  # every rank's whole slot again, read from here alone
                got = np.asarray(comm.allreduce(buf.reshape(-1), op="sum")).reshape(size, longest)
            with self._lock:  # missing() reads the table from the callers' threads
                for r, (n, _, j) in enumerate(heads):
                    if n:
                        row = got[r, _HEAD:_HEAD + 2 * n].tolist()
                        for k in range(0, 2 * n, 2):
                            self._record(r, self._entries[row[k]], row[k + 1])  # type: ignore[arg-type]
                    if j:
                        src = got[r, _HEAD + 2 * n:].view(np.uint8)[:j].tobytes()
                        for req in json.loads(src.decode()):
                            self._record(r, req, req["seq"])
        for r in range(size):
            if heads[r][1] & _FLAG_SHUTDOWN:
                self._shut.add(r)
        self._run_ready()
        return news, len(self._shut) == size

    def _record(self, r: int, req: dict, seq: int) -> None:
        name = req["name"]
        if req["kind"] == "cancel":
            p = self._table.get(name)
            if p is not None:
                p.reqs.pop(r, None)
                p.seqs.pop(r, None)
                if not p.reqs:
                    del self._table[name]
            if r == self.rank:
                self._cancelled.pop(name, None)
            return
        p = self._table.get(name)
        if p is None:
            p = self._table[name] = _Pending()
        p.reqs[r] = req
        p.seqs[r] = seq
        if req["kind"] == "join":
            self._joined[r] = self._tick

    def _run_ready(self) -> None:
        if not self._table:
            return
        joined = set(self._joined)
        need = [r for r in range(self.size) if r not in joined]
        ready: list[tuple[tuple, str]] = []
        failed: list[tuple[str, str]] = []
        for name, p in self._table.items():
            if name == "join":
                continue
            reqs = p.reqs
            if len(reqs) == self.size or all(r in reqs for r in need):
                low = min(reqs)
                ready.append(((p.seqs[low], low), name))
            else:
                gone = [r for r in need if r not in reqs and r in self._shut]
                if gone:
                    failed.append((name, f"rank(s) {[self.ranks[r] for r in gone]} shut down before submitting it"))
        for name, why in failed:
            self._fail_all(name, why)
        if ready:
            ready.sort()
            self._run([name for _, name in ready], joined)
        if "join" in self._table and len(self._table["join"].reqs) == self.size:
            last_tick = max(self._joined.values())
            last = max(r for r, t in self._joined.items() if t == last_tick)
            self._pop("join")
            self._joined.clear()
            self._complete("join", self.ranks[last])
        elif "join" in self._table:
            gone = [r for r in range(self.size) if r in self._shut and r not in self._table["join"].reqs]
            if gone:
                self._fail_all("join", f"rank(s) {[self.ranks[r] for r in gone]} shut down without joining")

    def _pop(self, name: str) -> _Pending:
        with self._lock:
            return self._table.pop(name)

    def _complete(self, name: str, result: Any, exc: BaseException | None = None) -> None:
        # Popping the op and finishing its handle happen under one hold of the lock: a caller whose deadline
        # passed decides under it too (see _unfinished), so it never sees a finished op as unfinished.
        with self._lock:
            loc = self._local.pop(name, None)
            if loc is not None:
                self._unclaimed.add(name)
                loc.handle._finish(result, exc)
                self._finished_cv.notify_all()

    def _claim(self, name: str) -> None:
        """The caller has seen ``name`` finish (waited or polled): the name is free for a new op."""
        if name in self._unclaimed:
            with self._lock:
                self._unclaimed.discard(name)

    def _fail_all(self, name: str, why: str) -> None:
        p = self._pop(name)
        if name == "join":
            self._joined.clear()
        with self._lock:
            loc = self._local.get(name)
        kind = loc.kind if loc is not None else next(iter(p.reqs.values()))["kind"]
        self._complete(name, None, HorovodInternalError(f"{kind} {name!r} on rank {self.ranks[self.rank]} "
                                                         f"of {self.size}: {why}"))

    def _remember(self, name: str, reqs: dict[int, dict], q: dict) -> None:
        """Keep the agreed request of ``name`` (about to run) in the response cache, the same way on every rank."""
        cid = self._entry_id.get(id(q))
        if cid is not None and self._entries[cid] is q and all(v is q for v in reqs.values()):
            self._lru.move_to_end(cid)  # every rank sent the cached request: it stays
            return
        entry = {k: v for k, v in q.items() if k != "seq"}
        for v in reqs.values():
            if v is not q and {k: x for k, x in v.items() if k != "seq"} != entry:
                return  # requests that agree yet differ (e.g. by a field one rank left out) are not cached
        if len(self._lru) >= _CACHE_CAPACITY:
            cid, _ = self._lru.popitem(last=False)
            old = self._entries[cid]
            self._entry_id.pop(id(old), None)
            key = self._key_of.pop(cid, None)
            if key is not None and self._ids.get(key) == cid:
                del self._ids[key]
            self._entries[cid] = entry
        else:
            cid = len(self._entries)
            self._entries.append(entry)
        self._entry_id[id(entry)] = cid
        self._lru[cid] = None
        with self._lock:
            loc = self._local.get(name)
        if loc is not None and loc.key is not None:
            self._ids[loc.key] = cid
            self._key_of[cid] = loc.key

    def _mismatch(self, reqs: dict[int, dict]) -> str | None:
        """Why the ranks' requests for one name disagree (None if they agree)."""
        items = sorted(reqs.items())
        r0, q0 = items[0]
        kind = q0["kind"]

        def differ(key: str, show: Callable[[dict], Any] = lambda q: None) -> str | None:
            for r, q in items[1:]:
                a, b = (show(q0), show(q)) if show(q0) is not None else (q0.get(key), q.get(key))
                if a != b:
                    return (f"ranks disagree on {key}: rank {self.ranks[r0]} has {a}, "
                            f"rank {self.ranks[r]} has {b}")
            return None

        for r, q in items[1:]:
            if q["kind"] != kind:
                return (f"ranks disagree on the op for this name: rank {self.ranks[r0]} called {kind}, "
                        f"rank {self.ranks[r]} called {q['kind']}")
        checks: list[str | None] = [
            differ("number of tensors", lambda q: len(q["shapes"])),
            differ("dtype", lambda q: q["dtypes"]),
        ]
        if kind in ("allgather", "alltoall"):
            checks.append(differ("rank of the tensors", lambda q: [len(s) for s in q["shapes"]]))
            checks.append(differ("shape beyond the first dimension", lambda q: [s[1:] for s in q["shapes"]]))
        elif kind not in ("barrier",):
            checks.append(differ("shape", lambda q: q["shapes"]))
        for key in ("op", "root", "prescale", "postscale", "process_set", "ranks", "id"):
            if any(key in q for _, q in items):
                checks.append(differ(key))
        if kind == "alltoall":
            checks.append(differ("whether splits were given", lambda q: q.get("splits") is not None))
        return next((c for c in checks if c), None)

    def _prepare(self, name: str, joined: set[int]) -> tuple[str, list[np.ndarray], list | None, list | None, dict,
                                                             dict] | None:
        """Take ``name`` off the table: (kind, this rank's arrays, their outs, their scales, every rank's request,
        the first request), or None after failing it on this rank because the ranks disagree (the same decision on
        every rank)."""
        p = self._pop(name)
        reqs = p.reqs
        q = reqs[min(reqs)]
        kind = q["kind"]
        # Every rank sent the same cache entry: the requests agree by construction.
        why = None if all(v is q for v in reqs.values()) else self._mismatch(reqs)
        if why is None and joined and kind not in _JOINABLE:
            why = (f"rank(s) {sorted(self.ranks[r] for r in joined)} called join; only allreduce continues "
                   f"while ranks have joined")
        if why is None and kind == "broadcast" and not 0 <= q["root"] < self.size:
            why = f"root rank {q['root']} is out of range for {self.size} ranks"
        if why is not None:
            self._complete(name, None, HorovodInternalError(f"{kind} {name!r} on rank {self.ranks[self.rank]} "
                                                             f"of {self.size}: {why}"))
            return None
        if kind in _CACHED_KINDS and not joined:
            self._remember(name, reqs, q)
        with self._lock:  # cancel() swaps a withdrawn op's arrays and outs under the lock
            loc = self._local.get(name) or self._cancelled.get(name)
            outs = scales = None
            if loc is not None:
                arrays, outs, scales = loc.arrays, loc.outs, loc.scales
                loc.taken = True
        if loc is None:  # this rank joined: it contributes zeros of the agreed shapes
            arrays = [np.zeros(s, np.dtype(d)) for s, d in zip(q["shapes"], q["dtypes"])]
        return kind, arrays, outs, scales, reqs, q

    def _run(self, names: list[str], joined: set[int]) -> None:
        """Run the ready ``names`` in order; consecutive allreduces with one op share fused collectives.

        Fusion is Horovod's: many small gradients ready in the same cycle
        travel as one buffer per dtype (up to ``_FUSION_BYTES``). Every rank
        sees the same ready list, so every rank fuses the same way.
        """
        batch: list[tuple[str, list[np.ndarray], list | None, list | None]] = []
        batch_op, batch_bytes = None, 0

        def flush() -> None:
            nonlocal batch, batch_op, batch_bytes
            if batch:
                flat = [a for _, arrays, _, _ in batch for a in arrays]
                dest = [o for _, arrays, outs, _ in batch for o in (outs or [None] * len(arrays))]
                scale = [f for _, arrays, _, fs in batch for f in (fs or [1.0] * len(arrays))]
                try:
                    out = _fused_allreduce(self.comm, flat, batch_op, dest, self._fusion,  # type: ignore[arg-type]
                                           scale)
                except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
                    for n, _, _, _ in batch:
                        self._complete(n, None, self._wrap("allreduce", n, exc))
                else:
                    i = 0
                    for n, arrays, _, _ in batch:
                        self._complete(n, out[i:i + len(arrays)])
                        i += len(arrays)
            batch, batch_op, batch_bytes = [], None, 0

        for name in names:
            got = self._prepare(name, joined)
            if got is None:
                continue
            kind, arrays, outs, scales, reqs, q = got
            if kind == "allreduce":
                nbytes = sum(a.nbytes for a in arrays)
                if batch and (q["op"] != batch_op or batch_bytes + nbytes > _FUSION_BYTES):
                    flush()
                batch.append((name, arrays, outs, scales))
                batch_op, batch_bytes = q["op"], batch_bytes + nbytes
                continue
            flush()
            try:
                result = self._execute(kind, arrays, reqs, q)
            except Exception as exc:  # noqa: BLE001 - handed to the waiter
                self._complete(name, None, self._wrap(kind, name, exc))
            else:
                self._complete(name, result)
        flush()

    def _wrap(self, kind: str, name: str, exc: BaseException) -> BaseException:
        if isinstance(exc, RanksLostError) and self.lost is None:
            self.lost = exc  # read by hvd.elastic.run to tell a lost rank from other errors
        if isinstance(exc, (HorovodInternalError, ValueError, TypeError)):
            return exc
        err = HorovodInternalError(f"{kind} {name!r} on rank {self.ranks[self.rank]}: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    def _execute(self, kind: str, arrays: list[np.ndarray], reqs: dict[int, dict], q: dict) -> Any:
        comm = self.comm  # allreduce never reaches here: _run batches and fuses it
        if kind == "allgather":
            # The communicator's allgather takes uneven first dims; every rank's rows are known here, so the
            # result's shape is checked against the announcements.
            out = []
            for i, a in enumerate(arrays):
                rows = sum(reqs[r]["shapes"][i][0] if r in reqs else 0 for r in range(self.size))
                out.append(np.asarray(comm.allgather(np.ascontiguousarray(a))).reshape((rows,) + a.shape[1:]))
            return out
        if kind == "broadcast":
            return [np.asarray(comm.broadcast(np.ascontiguousarray(a), root=q["root"])) for a in arrays]
        if kind == "reducescatter":
            return [np.asarray(comm.reduce_scatter(np.ascontiguousarray(a), op=q["op"])) for a in arrays]
        if kind == "alltoall":
            a = arrays[0]
            splits = [reqs[r]["splits"] for r in range(self.size)]
            recv = [splits[r][self.rank] for r in range(self.size)]
            y = np.asarray(comm.alltoall(np.ascontiguousarray(a), splits=splits[self.rank]))
            return y.reshape((sum(recv),) + a.shape[1:]), np.array(recv, np.int32)
        if kind == "barrier":
            comm.barrier()
            return None
        if kind in ("add_process_set", "remove_process_set"):
            if self._on_control is None:
                raise HorovodInternalError(f"{kind} is only run by the global process set")
            return self._on_control(kind, q, self)
        raise CollectiveValueError(f"unknown op kind {kind!r}")


def _fused_allreduce(comm: Any, arrays: list[np.ndarray], op: str, outs: list[np.ndarray | None],
                     fusion: dict[np.dtype, np.ndarray], scales: list[float] | None = None) -> list[np.ndarray]:
    """Allreduce every array with one collective per dtype (Horovod's tensor fusion for one grouped op).

    A result goes into ``outs[i]`` when that is not None (no new array), else
    into a new array, multiplied by ``scales[i]`` where given and not 1.0
    (in the same pass as the copy out of a fused buffer). Several arrays of
    one dtype travel in ``fusion[dtype]``, a buffer kept from call to call:
    allocating a large one each time costs the kernel's page mapping on every
    call.
    """
    out: list[np.ndarray | None] = [None] * len(arrays)
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for dt, idx in by_dtype.items():
        if len(idx) == 1:
            i = idx[0]
            a, dest = np.ascontiguousarray(arrays[i]), outs[i]
            if dest is not None:
                comm.allreduce(a, op=op, out=dest)
            else:
                dest = np.asarray(comm.allreduce(a, op=op)).reshape(a.shape)
            if scales is not None and scales[i] != 1.0:
                np.multiply(dest, scales[i], out=dest)
            out[i] = dest
            continue
        total = sum(arrays[i].size for i in idx)
        buf = fusion.get(dt)
        if buf is None or buf.size < total:
            buf = np.empty(total, dt)
            if buf.nbytes <= _FUSION_BYTES:  # one grouped op larger than that gets a buffer of its own
                fusion[dt] = buf
        flat = buf[:total]
        np.concatenate([arrays[i].reshape(-1) for i in idx], out=flat)
        comm.allreduce(flat, op=op, out=flat)
        off = 0
        for i in idx:
            n = arrays[i].size
            part = flat[off:off + n].reshape(arrays[i].shape)
            dest = outs[i]
            if dest is None:
                dest = np.empty_like(part)  # the buffer is reused by the next fused allreduce
            if scales is not None and scales[i] != 1.0:
                np.multiply(part, scales[i], out=dest)
            else:
                dest[...] = part
            out[i] = dest
            off += n
    return out  # type: ignore[return-value]

def _fill(row: np.ndarray, pairs: list[int], payload: bytes, flags: int) -> None:
    """Write one rank's slot: the header, the cached requests' (id, seq) pairs, the JSON bytes."""
    n = len(pairs)
    row[0], row[1], row[2] = n // 2, flags, len(payload)
    if n:
        row[_HEAD:_HEAD + n] = pairs
    if payload:
        row[_HEAD + n:].view(np.uint8)[:len(payload)] = np.frombuffer(payload, np.uint8)
