"""Cross-rank call fingerprints: one two-integer allreduce per collective proves that every rank makes the same call.

Terms (the names below follow them):

* **signature** -- what must agree across ranks for a collective to be
  correct: the collective, the reduction op, the dtype, the shape, the root
  and the algorithm actually used ("auto" already resolved; it resolves from
  size, rank count and dtype only, so identically on every rank).
* **fingerprint** -- a 62-bit hash of the signature XORed with the hash of
  the thread that issued the call (``collective.threads``: an op issued by
  different threads on different ranks is a mismatch) and with the call's
  sequence number (so a skipped or extra call on one rank shows up as well).
  The signature's hash is computed once per distinct signature (crc32, which
  unlike Python's ``hash()`` of a str is the same in every process) and cached;
  every call is still checked, so all ranks always agree on when a check
  happens.
* **check** -- every rank contributes ``[h, -h]`` to one native MPI allreduce
  with MAX: ``max(h) == -max(-h)`` exactly when all fingerprints are equal.
* **post** -- the sizes of a variable-size call (``collective.variable``)
  travel in the same exchange: ``[r, -r, bad]`` after ``[h, -h]`` tell every
  rank whether all posted the same rows ``r`` and whether any rank's ``out``
  is wrong for that case (every other call posts zeros, so the exchange is the
  same MPI call whatever the collective); fenced in shm, every rank reads every
  rank's rows and ``out`` rows (``ShmArena.exchange_pairs``).
  Only on a mismatch (or with ``COLLECTIVE_DEBUG=DETAIL``) do the ranks
  allgather a fixed-size *record* (utf-8 text of the signature, no pickle) to
  say which rank called what.
* **poison** -- the fingerprint of a call that failed its argument checks on
  this rank. The rank still takes part in the check, so the other ranks raise
  CollectiveMismatchError naming it and its error instead of waiting for it.
  If every rank failed, the fingerprints agree and each raises its own error.
"""
from __future__ import annotations

import sys
import zlib
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import CollectiveMismatchError
from .threads import SHARED_NAME, ThreadTag

__all__ = ["Fingerprints", "Poison", "POISON", "RECORD_BYTES", "FIELDS", "rank_list"]

#: The fingerprint of a call whose arguments this rank rejected (no real fingerprint takes this value).
POISON = (1 << 63) - 1
#: Size of one rank's record in the mismatch allgather (the error text of a poison call is cut to fit).
RECORD_BYTES = 256
#: The fields of a record, in order; what differs between ranks is named by these words.
FIELDS = ("collective", "op", "dtype", "shape", "root", "algorithm", "thread", "sequence", "error")
_THREAD, _SEQUENCE, _ERROR = FIELDS.index("thread"), FIELDS.index("sequence"), FIELDS.index("error")
_SEP = "\x1f"
_MASK62 = (1 << 62) - 1


def hash62(data: bytes) -> int:
    """A 62-bit hash of ``data``, the same in every process (two crc32s): below 2**62, so never POISON.

    Example::

        hash62(b"allreduce") == hash62(b"allreduce")   # True, on every rank
    """
    return (zlib.crc32(data) | (zlib.crc32(data, 0x5BD1E995) << 32)) & _MASK62


class Poison:
    """A collective call that failed its argument checks on this rank (carries the error).

    Looks like a prepared call to the communicator's ``_execute`` (name, shape,
    dtype, algorithm, root, rop), so it takes the same path, in the same order,
    as the other ranks' real call; the fingerprint check then raises.
    """

    __slots__ = ("name", "error", "shape", "dtype", "algorithm", "root", "rop", "xf", "views")

    def __init__(self, name: str, error: BaseException) -> None:
        self.name, self.error = name, error
        self.shape = self.dtype = self.algorithm = self.root = self.rop = self.xf = self.views = None


def rank_list(ranks: list[int]) -> str:
    """``[1]`` -> "rank 1"; ``[0, 2]`` -> "ranks 0 and 2"; ``[0, 1, 2, 3, 5]`` -> "ranks 0-3 and 5"."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs: list[str] = []
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:  # type: ignore[operator]
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else (f"{start}, {prev}" if prev == start + 1 else f"{start}-{prev}"))
        if r is not None:
            start = prev = r
    text = ", ".join(runs)
    head, _, last = text.rpartition(", ")
    return "ranks " + (f"{head} and {last}" if head else last)


class Fingerprints:
    """The per-call cross-rank check on one (private) MPI communicator.

    Args:
        comm: the mpi4py communicator the collectives run on (the check's
            allreduce is ordered with them, before any of the call's data moves).
        rank, size: this rank and the number of ranks.
        detail: gather every rank's full record on every call
            (``COLLECTIVE_DEBUG=DETAIL``), not only after a mismatch.

    Example::

        fp = Fingerprints(mpi_comm, rank, size)
        fp.check(seq, "allreduce", "ring", OPS["sum"], np.dtype("float32"), (1024,), None,
                 thread=collective.threads.thread_tag())
    """

    def __init__(self, comm: Any, rank: int, size: int, detail: bool = False) -> None:
        from mpi4py import MPI

        self.comm, self.rank, self.size, self.detail = comm, rank, size, detail
        self._static: dict[tuple, tuple[int, list[str]]] = {}
        # array.array, not numpy: setting and reading two items is several times cheaper.
        self._send = array("q", [0] * 5)  # [h, -h, r, -r, bad] (see "post")
        self._recv = array("q", [0] * 5)
        self._sargs = [self._send, MPI.INT64_T]
        self._rargs = [self._recv, MPI.INT64_T]
        self._max = MPI.MAX
        self._allreduce = comm.Allreduce
        #: When every rank shares one node and the shm arena exists: ``exchange(h, seq)`` posts this rank's
        #: fingerprint in shared memory, ends a phase of the node's arena and returns whether every rank posted
        #: ``h`` (a phase and P reads instead of an MPI allreduce; see ShmArena.exchange).
        self.exchange: Callable[[int, int], bool] | None = None
        #: With it, ``exchange_pairs(h, seq, a, b)`` also posts two numbers (ShmArena.exchange_pairs).
        self.exchange_pairs: Callable[[int, int, int, int], tuple[int, ...] | None] | None = None

    def _signature(self, name: str, alg: Any, opname: Any, dtype: Any, shape: Any, root: Any) -> tuple[int, list[str]]:
        key = (name, alg, opname, dtype, shape, root)
        hit = self._static.get(key)
        if hit is None:
            fields = [name, opname or "-", "-" if dtype is None else str(dtype),
                      "-" if shape is None else str(tuple(shape)), "-" if root is None else str(root), str(alg)]
            h = hash62(_SEP.join(fields).encode())
            if len(self._static) > 4096:  # a program with endlessly many shapes: keep the cache bounded
                self._static.clear()
            hit = self._static[key] = (h, fields)
        return hit

    def check(self, seq: int, name: str, alg: Any, rop: Any, dtype: Any, shape: Any, root: Any,
              poison: BaseException | None = None, call: Any = None, *, thread: ThreadTag) -> None:
        """Raise CollectiveMismatchError on every rank unless every rank's call has the same fingerprint.

        A poison call (``poison`` is its error) always raises: that error when
        every rank was poisoned, else the mismatch (with the mismatch report
        added to this rank's own error as a note). ``call``: the prepared call,
        whose ``sig`` attribute keeps the signature's fingerprint when it has
        one (a call reused step after step then skips the lookup). ``thread``: the
        issuing thread's ``collective.threads.ThreadTag``, from the op's record (the
        communicator's tags: a torch process group tags every thread alike).
        A call with a ``post`` (``(rows, out rows, bad)``, see the module docstring)
        gets ``call.known``: every rank's (rows, out rows) as a (P, 2) array,
        out rows -1 where they were checked already; None when the exchange
        could not tell (the ranks' rows differ, the check is by MPI).
        """
        if poison is None:
            sig = getattr(call, "sig", None)
            if sig is None:
                sig = self._signature(name, alg, rop.name if rop is not None else None, dtype, shape, root)
                try:
                    call.sig = sig
                except AttributeError:  # None, or a request type without the attribute
                    pass
            h, fields = sig
            h ^= thread.h ^ seq  # below 2**62, so never POISON
        else:
            h, fields = POISON, [name, "-", "-", "-", "-", "-"]
        if self.detail:
            self._gather(seq, fields, thread.name, poison, always=True)
        else:
            post = getattr(call, "post", None) if poison is None else None
            if post is None:
                ex = self.exchange
                if ex is not None:
                    same = ex(h, seq)
                else:
                    s = self._send
                    s[0] = h
                    s[1] = -h
                    s[2] = s[3] = s[4] = 0
                    self._allreduce(self._sargs, self._rargs, self._max)
                    r = self._recv
                    same = r[0] == -r[1]
            else:
                same, pairs = self.exchange_post(h, seq, post)
                call.known = None if pairs is None else np.array(pairs, np.int64).reshape(self.size, 2)
            if not same:
                self._gather(seq, fields, thread.name, poison, always=False)
        if poison is not None:
            raise poison

    def exchange_post(self, h: int, seq: int, post: tuple[int, int, int]) -> tuple[bool, tuple[int, ...] | None]:
        """Exchange fingerprint ``h`` of call ``seq`` with this rank's post ``(rows, out rows, bad)``.

        Returns (whether every rank's fingerprint is ``h``, every rank's
        (rows, out rows) as one flat tuple, or None where the exchange cannot
        tell them). Fenced in shm every rank reads every post; by MPI the tuple
        is ``(rows, -1) * P`` when every rank posted the same rows and no
        ``out`` is wrong for them (the out rows -1: checked already), else None.
        Every rank gets the same answer.
        """
        ex = self.exchange_pairs
        if ex is not None:
            pairs = ex(h, seq, post[0], post[1])
            return pairs is not None, pairs
        s = self._send
        s[0] = h
        s[1] = -h
        s[2] = post[0]
        s[3] = -post[0]
        s[4] = post[2]
        self._allreduce(self._sargs, self._rargs, self._max)
        r = self._recv
        if r[0] != -r[1]:
            return False, None
        if r[2] == -r[3] and r[4] == 0:  # every rank posted the same rows
            return True, (post[0], -1) * self.size
        return True, None

    def check_call(self, rec: Any, c: Any) -> bool:
        """:meth:`check` of prepared call ``c`` (its ``OpRecord`` ``rec``), as the communicator's check; returns True.

        The per-call entry: one frame from the communicator to the exchange
        for a call whose signature fingerprint is known, which is most of what
        a small allreduce costs in Python. Poisoned calls, DETAIL mode and the
        MPI allreduce go through :meth:`check`.
        """
        ex = self.exchange
        sig = getattr(c, "sig", None)
        if ex is None or sig is None or self.detail or getattr(c, "post", None) is not None:
            poisoned = type(c) is Poison
            op, shape, dtype, algorithm, root = rec.what
            self.check(rec.seq, op, algorithm, getattr(c, "rop", None), dtype, shape, root,
                       c.error if poisoned else None, None if poisoned else c, thread=rec.thread)
            return True
        seq = rec.seq
        th = rec.thread
        if not ex(sig[0] ^ th.h ^ seq, seq):
            self._gather(seq, sig[1], th.name, None, always=False)
        return True

    def report(self, seq: int, fields: list[str], thread: str) -> None:
        """Raise the mismatch report of call ``seq`` (this rank's signature ``fields``, issued by ``thread``) on
        every rank.

        For a quick path that compared fingerprints itself and found them
        different: every rank calls it, so the records' allgather matches.
        """
        self._gather(seq, fields, thread, None, always=False)

    def _gather(self, seq: int, fields: list[str], thread: str, poison: BaseException | None, always: bool) -> None:
        """Allgather every rank's record; raise the mismatch report on every rank if any differ."""
        mine = fields + [thread.replace(_SEP, " "), f"#{seq}",
                         "" if poison is None else f"{type(poison).__name__}: {poison}"]
        raw = _SEP.join(mine).encode()
        if len(raw) > RECORD_BYTES:
            raw = raw[: RECORD_BYTES - 3] + b"..."
        rec = np.zeros(RECORD_BYTES, np.uint8)
        rec[: len(raw)] = np.frombuffer(raw, np.uint8)
        allrec = np.empty((self.size, RECORD_BYTES), np.uint8)
        from mpi4py import MPI

        self.comm.Allgather([rec, MPI.BYTE], [allrec, MPI.BYTE])
        records = [bytes(allrec[q]).rstrip(b"\0").decode(errors="replace").split(_SEP) for q in range(self.size)]
        for rc in records:  # a record cut short still has every field
            rc.extend([""] * (len(FIELDS) - len(rc)))
        if always:
            keys = {"poison" if rc[_ERROR] else _SEP.join(rc[:_ERROR]) for rc in records}
            if len(keys) == 1:  # all agree, or every rank rejected its arguments (each raises its own error)
                return
        msg = mismatch_message(self.rank, self.size, records)
        if poison is not None:
            _add_note(poison, msg)
            raise poison
        raise CollectiveMismatchError(msg)


def _add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (PEP 678); Python 3.10 has no ``add_note``, so there it joins the message."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    elif len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}",)
    else:
        exc.args = (*exc.args, note)


def mismatch_message(rank: int, size: int, records: list[list[str]]) -> str:
    """The report every rank raises: which fields differ, and each group of ranks' values, grouped by value.

    Example: ``allreduce #7 on rank 0 of 3: the ranks' calls do not match (dtype, shape differ):
    rank 1: float64 (65537,); ranks 0 and 2: float32 (65536,) ...``
    """
    me = records[rank]
    bad = [q for q, rc in enumerate(records) if rc[_ERROR]]
    good = [q for q in range(size) if q not in bad]
    idx = [i for i in range(_ERROR) if len({records[q][i] for q in good}) > 1] if good else []
    parts: list[str] = []
    if bad:
        parts.extend(f"rank {q} rejected its arguments ({records[q][_ERROR]})" for q in bad[:8])
        if len(bad) > 8:
            parts.append(f"{len(bad) - 8} more ranks rejected theirs")
    if idx:
        groups: dict[tuple, list[int]] = {}
        for q in good:
            groups.setdefault(tuple(records[q][i] for i in idx), []).append(q)
        order = sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[1][0]))  # the odd one out first
        parts.append("; ".join(f"{rank_list(rs)}: {' '.join(_show(idx, v))}" for v, rs in order))
    seq = me[_SEQUENCE]
    if idx:
        what = ", ".join(FIELDS[i] for i in idx) + (" differ" if len(idx) > 1 else " differs")
        head = (f"{me[0]} {seq} on rank {rank} of {size}: the ranks' calls do not match ({what}): {'; '.join(parts)}. "
                "No data was sent and every rank raises this error. Every rank must make the same collective calls, "
                "in the same order, with the same op, dtype, shape, root and algorithm.")
        if _THREAD in idx:
            head += (" The threads differ: this op was issued by different threads on different ranks, so the "
                     "threads' calls met in a different order on each rank. Collectives on one communicator must "
                     "come from one thread at a time, in the same order on every rank; give each thread its own "
                     "communicator (comm.split(0) or comm.subgroup(range(comm.size)), made in the same order on every "
                     "rank). Threads are told apart by name: name those that call collectives "
                     "(threading.Thread(name=...)) the same on every rank.")
            if any(SHARED_NAME in records[q][_THREAD] for q in good):
                head += (f" A thread marked '{SHARED_NAME}' bears the name of another live thread of its rank, "
                         "so the two cannot be told apart across ranks: name every thread that calls collectives "
                         "distinctly.")
        if any(records[q][5].startswith("shm-window#") for q in good):
            head += (" (shm-window#k is the k-th comm.alloc() array, used where it lies; #k->#j: reduced into the "
                     "j-th; every rank must pass the same ones, or none)")
    else:
        head = (f"{me[0]} {seq} on rank {rank} of {size} cannot run: {'; '.join(parts)}. No data was sent; "
                "every rank raises an error (a rank that rejected its arguments raises its own).")
    full: dict[str, list[int]] = {}
    for q, rc in enumerate(records):
        full.setdefault(_full(rc), []).append(q)
    lines = [f"  {rank_list(rs)}: {text}" for text, rs in full.items()]
    return head + "\nEach rank's call:\n" + "\n".join(lines)


def _show(idx: list[int], values: tuple) -> list[str]:
    out = []
    for i, v in zip(idx, values):
        name = FIELDS[i]
        if name == "thread":
            out.append(f"thread {v!r}")
        else:
            out.append(v if name in ("collective", "dtype", "shape", "sequence") else f"{name} {v}")
    return out


def _full(rc: list[str]) -> str:
    thread = "" if rc[_THREAD] in ("MainThread", "") else f" from thread {rc[_THREAD]!r}"
    if rc[_ERROR]:
        return f"{rc[_SEQUENCE]} {rc[0]}{thread}: rejected its arguments: {rc[_ERROR]}"
    s = f"{rc[_SEQUENCE]} {rc[0]}"
    if rc[1] != "-":
        s += f" op {rc[1]}"
    s += f" {rc[2]} shape {rc[3]}"
    if rc[4] != "-":
        s += f" root {rc[4]}"
    return s + f" algorithm {rc[5]}" + thread
