"""Tuning tables: the fastest algorithm per message-size range for one job layout, written by `collective-bench --tune`.

A tuning table is a JSON file measured on one machine for one number of
ranks ``nranks`` and one layout ``ranks_per_node`` (how many ranks sit on
each node, in node order)::

    {"version": 1, "nranks": 4, "ranks_per_node": [4], "dtype": "float32", "op": "sum",
     "table": {"allreduce": [{"max_bytes": 65536, "algorithm": "native"},
                             {"max_bytes": null, "algorithm": "ring"}],
               "broadcast": [...]}}

Terms used below: an *entry* is one ``{"max_bytes", "algorithm"}`` pair;
``nbytes`` is the size in bytes of one rank's *input* buffer (``x.nbytes``,
the quantity ``auto`` sees; for allgather that is 1/P of the gathered
result). The entries of a collective are sorted by ``max_bytes``; the first
whose ``max_bytes >= nbytes`` wins, and ``null`` means no upper bound. Only
concrete algorithms appear: never ``auto`` (it reads the table) nor the
benchmark's reference columns (``gloo``, ``memcpy``).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CollectiveValueError

__all__ = [
    "FORMAT_VERSION",
    "PSEUDO_ALGORITHMS",
    "TUNABLE_COLLECTIVES",
    "Entry",
    "TuningTable",
    "TuningTableError",
    "load_table",
    "write_table",
    "ranges_from_best",
]

#: The file format this module reads and writes.
FORMAT_VERSION = 1
#: Names that are not algorithms a table may recommend: auto itself, collective-bench's reference columns, its
#: test column, and ``alloc`` (shm on ``comm.alloc`` buffers: how fast a call is when the data already sits in the
#: shared window, which a user's own array does not, so "shm" is the algorithm a table names for it).
PSEUDO_ALGORITHMS: frozenset[str] = frozenset(("auto", "gloo", "memcpy", "broken", "alloc"))
#: Collectives a table may hold.
TUNABLE_COLLECTIVES: tuple[str, ...] = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather")
_TOP_KEYS = ("version", "nranks", "ranks_per_node", "dtype", "op", "table")


class TuningTableError(CollectiveValueError):
    """A tuning table file is missing, unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Entry:
    """One size range of a collective.

    Attributes:
        max_bytes: the largest input size (bytes per rank) this entry covers;
            None means no upper bound.
        algorithm: the algorithm to run for sizes in the range.
    """

    max_bytes: int | None
    algorithm: str

    def to_json(self) -> dict[str, Any]:
        """The entry as the file stores it."""
        return {"max_bytes": self.max_bytes, "algorithm": self.algorithm}


@dataclass(frozen=True)
class TuningTable:
    """A validated tuning table (build one with :func:`load_table` or :func:`write_table`).

    Attributes:
        nranks: the number of ranks it was measured with.
        ranks_per_node: ranks on each node, in node order (sums to ``nranks``).
        dtype: the element type it was measured with (informational).
        op: the reduction op it was measured with (informational).
        table: entries per collective, sorted by ``max_bytes``.
        source: where it came from (a path), for messages.
    """

    nranks: int
    ranks_per_node: tuple[int, ...]
    dtype: str
    op: str
    table: Mapping[str, tuple[Entry, ...]]
    source: str = field(default="<memory>", compare=False)

    def choose(self, collective: str, nbytes: int, nranks: int,
               ranks_per_node: Sequence[int] | None = None) -> str | None:
        """The algorithm the table recommends, or None when it has no say.

        Args:
            collective: "allreduce", "reduce", "broadcast", "reduce_scatter" or "allgather".
            nbytes: bytes of one rank's input buffer (``x.nbytes``).
            nranks: the caller's number of ranks; a table measured with another count says nothing.
            ranks_per_node: the caller's layout; when given and different from the table's, None.

        Returns:
            The algorithm of the first entry whose ``max_bytes >= nbytes`` (None = no bound),
            or None when the table's ``nranks`` (or layout) differs, the collective is absent,
            or every entry's range ends below ``nbytes``.

        Example::

            t = load_table(config.get("TUNING"))   # collective.config
            alg = t.choose("allreduce", x.nbytes, comm.size) or "ring"
        """
        if nranks != self.nranks:
            return None
        if ranks_per_node is not None and tuple(ranks_per_node) != self.ranks_per_node:
            return None
        for e in self.table.get(collective, ()):
            if e.max_bytes is None or e.max_bytes >= nbytes:
                return e.algorithm
        return None

    def to_json(self) -> dict[str, Any]:
        """The table as the file stores it."""
        return {
            "version": FORMAT_VERSION,
            "nranks": self.nranks,
            "ranks_per_node": list(self.ranks_per_node),
            "dtype": self.dtype,
            "op": self.op,
            "table": {c: [e.to_json() for e in es] for c, es in self.table.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "<memory>",
                  known_algorithms: Iterable[str] | None = None) -> TuningTable:
        """Validate the parsed JSON of a table and build it.

        Args:
            data: the parsed JSON object.
            source: a name for messages (the file's path).
            known_algorithms: when given, every algorithm must be one of these.

        Raises:
            TuningTableError: naming ``source`` and the bad field.
        """
        def bad(where: str, what: str) -> TuningTableError:
            return TuningTableError(f"tuning table {source}: {where} {what}; rewrite it with "
                                    "collective-bench --tune PATH")

        if not isinstance(data, dict):
            raise bad("the top level", f"must be a JSON object, got {type(data).__name__}")
        missing = [k for k in _TOP_KEYS if k not in data]
        if missing:
            raise bad("the top level", f"lacks {', '.join(repr(k) for k in missing)}")
        extra = sorted(set(data) - set(_TOP_KEYS))
        if extra:
            raise bad("the top level", f"has unknown key(s) {', '.join(repr(k) for k in extra)}")
        if data["version"] != FORMAT_VERSION or isinstance(data["version"], bool):
            raise bad("'version'", f"is {data['version']!r}; this version of collective reads version {FORMAT_VERSION}")
        nranks = data["nranks"]
        if not _is_int(nranks) or not 1 <= nranks <= _MAX_RANKS:
            raise bad("'nranks'", f"must be an integer from 1 to {_MAX_RANKS}, got {_shown(nranks)}")
        rpn = data["ranks_per_node"]
        if not isinstance(rpn, list) or not rpn or not all(_is_int(k) and 1 <= k <= _MAX_RANKS for k in rpn):
            raise bad("'ranks_per_node'", f"must be a non-empty list of integers from 1 to {_MAX_RANKS}, "
                      f"got {_shown(rpn)}")
        if sum(rpn) != nranks:
            raise bad("'ranks_per_node'", f"sums to {sum(rpn)}, but 'nranks' is {nranks}")
        for k in ("dtype", "op"):
            if not isinstance(data[k], str) or not data[k]:
                raise bad(repr(k), f"must be a non-empty string, got {_shown(data[k])}")
        raw = data["table"]
        if not isinstance(raw, dict):
            raise bad("'table'", f"must be an object mapping collectives to entry lists, got {type(raw).__name__}")
        known = None if known_algorithms is None else frozenset(known_algorithms)
        table: dict[str, tuple[Entry, ...]] = {}
        for coll, entries in raw.items():
            if coll not in TUNABLE_COLLECTIVES:
                raise bad(f"'table' key {coll!r}", f"is not a collective; use {', '.join(TUNABLE_COLLECTIVES)}")
            table[coll] = _entries(entries, f"table[{coll!r}]", bad, known)
        return cls(int(nranks), tuple(int(k) for k in rpn), data["dtype"], data["op"], table, source)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a tuning table holds")


def _shown(v: Any) -> str:
    """``repr(v)``, cut short: a message quotes a bad value, not a 400-digit one whole."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


#: Bounds that no real table exceeds: more ranks than any machine has, or messages beyond 2^62 bytes, are a
#: damaged or foreign file, not a tuning result.
_MAX_RANKS = 1 << 24
_MAX_BYTES = 1 << 62
_MAX_FILE_BYTES = 16 << 20


def _entries(entries: Any, where: str, bad: Any, known: frozenset[str] | None) -> tuple[Entry, ...]:
    if not isinstance(entries, list) or not entries:
        raise bad(where, f"must be a non-empty list of entries, got {_shown(entries)}")
    out: list[Entry] = []
    prev = -1
    for i, e in enumerate(entries):
        w = f"{where}[{i}]"
        if isinstance(e, Entry):
            e = e.to_json()
        if not isinstance(e, dict) or set(e) != {"max_bytes", "algorithm"}:
            raise bad(w, f"must be an object with exactly 'max_bytes' and 'algorithm', got {_shown(e)}")
        mb, alg = e["max_bytes"], e["algorithm"]
        if mb is not None and (not _is_int(mb) or not 0 <= mb <= _MAX_BYTES):
            raise bad(f"{w}.max_bytes", f"must be an integer from 0 to 2**62 or null, got {_shown(mb)}")
        if not isinstance(alg, str) or not alg:
            raise bad(f"{w}.algorithm", f"must be a non-empty string, got {_shown(alg)}")
        if alg in PSEUDO_ALGORITHMS:
            raise bad(f"{w}.algorithm", f"is {alg!r}, which is not a concrete algorithm")
        if known is not None and alg not in known:
            raise bad(f"{w}.algorithm", f"{_shown(alg)} is not known here; known: {', '.join(sorted(known))}")
        if prev is None:
            raise bad(w, "follows an entry with max_bytes null (no bound); null must come last")
        if mb is not None and mb <= prev:
            raise bad(f"{w}.max_bytes", f"is {mb}, not above the previous entry's {prev}; sort entries by max_bytes")
        prev = mb
        out.append(Entry(mb, alg))
    return tuple(out)


def load_table(path: str | os.PathLike[str], known_algorithms: Iterable[str] | None = None) -> TuningTable:
    """Read and validate a tuning table file.

    Args:
        path: the JSON file (what ``COLLECTIVE_TUNING`` names).
        known_algorithms: when given, reject algorithms outside this set
            (e.g. a table written by a newer version).

    Returns:
        The table.

    Raises:
        TuningTableError: the file cannot be read, is not JSON, or breaks the format;
            the message names the file and the field.

    Example::

        t = load_table("tuning.json")
        t.choose("allreduce", 1 << 20, 4)   # e.g. "ring"
    """
    src = os.fspath(path)
    try:
        with open(src, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TuningTableError(f"tuning table {src}: cannot read it ({exc.strerror or exc}); "
                               "write one with collective-bench --tune PATH") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise TuningTableError(f"tuning table {src}: larger than {_MAX_FILE_BYTES} bytes, which no table written "
                               "by collective-bench --tune is; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TuningTableError(f"tuning table {src}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                               "write one with collective-bench --tune PATH") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise TuningTableError(f"tuning table {src}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg})") from None
    except RecursionError:
        raise TuningTableError(f"tuning table {src}: nested too deeply to be a tuning table") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts, or NaN
        raise TuningTableError(f"tuning table {src}: not a valid table ({exc})") from None
    return TuningTable.from_json(data, src, known_algorithms)


def write_table(path: str | os.PathLike[str], nranks: int, ranks_per_node: Sequence[int],
                table: Mapping[str, Sequence[Entry | Mapping[str, Any]]], dtype: str = "float32",
                op: str = "sum") -> TuningTable:
    """Validate and write a tuning table atomically (a reader never sees half a file).

    Args:
        path: where to write.
        nranks: ranks of the measured job.
        ranks_per_node: ranks on each node, in node order.
        table: entries per collective (Entry objects or ``{"max_bytes", "algorithm"}`` dicts),
            sorted by ``max_bytes``.
        dtype: the element type measured.
        op: the reduction op measured.

    Returns:
        The table as written.

    Raises:
        TuningTableError: the arguments break the format (nothing is written then).

    Example::

        write_table("tuning.json", 2, [2], {"allreduce": [Entry(65536, "native"), Entry(None, "ring")]})
    """
    dst = os.fspath(path)
    data = {
        "version": FORMAT_VERSION,
        "nranks": nranks,
        "ranks_per_node": list(ranks_per_node),
        "dtype": dtype,
        "op": op,
        "table": {c: [e.to_json() if isinstance(e, Entry) else dict(e) for e in es] for c, es in table.items()},
    }
    t = TuningTable.from_json(data, dst)
    d = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(t.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return t


def ranges_from_best(best: Iterable[tuple[int, str]]) -> list[Entry]:
    """Turn the winner at each measured size into table entries.

    Consecutive sizes with the same winner merge into one range; a range ends at
    the last size its algorithm won, and the last range has no upper bound.

    Args:
        best: ``(nbytes, algorithm)`` pairs, one per measured size (any order).

    Returns:
        The entries, sorted; empty when ``best`` is.

    Example::

        ranges_from_best([(4096, "native"), (65536, "native"), (1 << 20, "ring")])
        # [Entry(65536, "native"), Entry(None, "ring")]
    """
    pts: list[tuple[int, str]] = []
    for nb, alg in sorted(best, key=lambda p: p[0]):
        if pts and pts[-1][0] == nb:  # one winner per size: the first given
            continue
        pts.append((int(nb), alg))
    out: list[Entry] = []
    for i, (nb, alg) in enumerate(pts):
        last = i == len(pts) - 1
        if not last and pts[i + 1][1] == alg:
            continue
        out.append(Entry(None if last else nb, alg))
    return out
