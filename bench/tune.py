"""`--tune`: the fastest correct algorithm at each measured size, written as a tuning table for `auto`."""
from __future__ import annotations

import os

from collective.tuning import (
    PSEUDO_ALGORITHMS,
    TUNABLE_COLLECTIVES,
    Entry,
    TuningTable,
    TuningTableError,
    load_table,
    ranges_from_best,
    write_table,
)

from .cli import LIB_NATIVE
from .core import CollectiveResult, JobInfo, SizeResult

__all__ = ["best_algorithm", "table_entries", "write_tuning"]


def best_algorithm(row: SizeResult) -> str | None:
    """The concrete algorithm with the least median time summed over its modes, among those with no wrong element.

    Only algorithms measured in every mode the size has compete (so none wins by skipping the in-place run).
    When the run has the ``native-lib`` column, it stands for "native" (what auto would run: MPI's own behind
    the library's checks) and the bare ``native`` baseline does not compete.
    """
    cands = {c: m for c, m in row.cells.items() if c not in PSEUDO_ALGORITHMS}
    if LIB_NATIVE in cands:  # what auto would run for "native": MPI's own behind our checks, not the bare call
        cands.pop("native", None)
    if not cands:
        return None
    nmodes = max(len(m) for m in cands.values())
    best, best_t = None, float("inf")
    for c, modes in cands.items():
        if len(modes) < nmodes or any((s.wrong or 0) > 0 for s in modes.values()):
            continue
        t = sum(s.median_us for s in modes.values())
        if t < best_t:
            best, best_t = c, t
    return "native" if best == LIB_NATIVE else best


def table_entries(res: CollectiveResult) -> list[Entry]:
    """The entries of one collective, keyed on each rank's input bytes (what `auto` sees)."""
    best = [(r.input_bytes, b) for r in res.rows if (b := best_algorithm(r)) is not None]
    return ranges_from_best(best)


def write_tuning(path: str, info: JobInfo, results: list[CollectiveResult], dtype: str,
                 op: str) -> tuple[TuningTable, list[str]]:
    """Write (or update) the tuning table at ``path``.

    A table already there for the same nranks, layout, dtype and op keeps the
    collectives not measured now; any other file is replaced.

    Returns:
        The table written and notes for the report.
    """
    notes: list[str] = []
    table: dict[str, list[Entry]] = {}
    if os.path.exists(path):
        try:
            old = load_table(path)
        except TuningTableError as exc:
            notes.append(f"tune: replacing {path}: {exc}")
        else:
            same = (old.nranks, old.ranks_per_node, old.dtype, old.op) == (info.nranks, tuple(info.ranks_per_node),
                                                                            dtype, op)
            if same:
                table = {c: list(es) for c, es in old.table.items()}
            else:
                notes.append(f"tune: replacing {path} (measured for nranks {old.nranks}, "
                             f"layout {list(old.ranks_per_node)}, {old.dtype} {old.op})")
    for res in results:
        if res.collective not in TUNABLE_COLLECTIVES:
            notes.append(f"tune: {res.collective} has no tuning table; left out")
            continue
        es = table_entries(res)
        if es:
            table[res.collective] = es
        else:
            notes.append(f"tune: no concrete algorithm measured correctly for {res.collective}; left out")
    t = write_table(path, info.nranks, info.ranks_per_node, table, dtype=dtype, op=op)
    notes.append(f"tune: wrote {path} ({', '.join(f'{c}: {len(es)} range(s)' for c, es in t.table.items())}); "
                 f"use it with COLLECTIVE_TUNING={path}")
    return t, notes
