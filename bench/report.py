"""Output in the shape of nccl-tests: a header, one line per size, a footer; and JSON.

The default (compact) table gives each column one cell per size: its busbw
out of place (in place for a column that only runs in place; memcpy: its copy
speed), then the size's #wrong summed over every column and mode.
``--wide`` gives each column (algorithm) a group of cells separated by ``|``:
an optional ``pred`` time, then per mode (out-of-place, in-place) the median
time, its interquartile spread, algbw, busbw and #wrong; the memcpy reference
has one cell: time, spread and its copy speed. The footer gives the mean
busbw per column and the ratio of every column's busbw to native's, size by
size (every mode when wide, the compact cell's mode otherwise).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from .cli import Options, format_size
from .core import IP, OOP, CollectiveResult, JobInfo, SizeResult, Stat

__all__ = ["TextReporter", "to_json", "write_json", "fmt_time", "MODE_LABEL", "FACTOR_TEXT"]

MODE_LABEL = {OOP: "out-of-place", IP: "in-place"}
FACTOR_TEXT = {"allreduce": "2(P-1)/P", "reduce_scatter": "(P-1)/P", "allgather": "(P-1)/P", "reduce": "1",
               "broadcast": "1", "alltoall": "(P-1)/P", "gather": "(P-1)/P", "scatter": "(P-1)/P",
               "allgatherv": "(P-1)/P", "sendrecv": "1"}
_PREFIX_W = (12, 12, 8, 6, 5)
_CELL_W = (9, 4, 6, 6, 6)  # time, iqr, algbw, busbw, #wrong
_MEMCPY_W = (9, 4, 6)  # time, iqr, GB/s
_PRED_W = 9
_SEP = " |"


def fmt_time(us: float) -> str:
    """Microseconds with 4-5 significant digits in at most 9 characters."""
    if us >= 1e5:
        return f"{us:.0f}"
    if us >= 1e3:
        return f"{us:.1f}"
    return f"{us:.2f}"


def _cells(widths: tuple[int, ...], texts: list[str]) -> str:
    return "".join(f" {t:>{w}}" for w, t in zip(widths, texts))


def _width(widths: tuple[int, ...]) -> int:
    return sum(w + 1 for w in widths)


class _Layout:
    """Where every column's cells go, so header and rows line up."""

    def __init__(self, res: CollectiveResult) -> None:
        self.res = res

    def group_width(self, col: str) -> int:
        r = self.res
        if col == "memcpy":
            return _width(_MEMCPY_W)
        return (_PRED_W + 1 if r.show_pred else 0) + _width(_CELL_W) * len(r.modes[col])

    def header(self, opts: Options) -> list[str]:
        r = self.res
        pre_w = _width(_PREFIX_W)
        l1, l2 = " " * pre_w, " " * pre_w
        l3 = _cells(_PREFIX_W, ["size", "count", "type", "redop", "root"])
        l4 = _cells(_PREFIX_W, ["(B)", "(elements)", "", "", ""])
        for c in r.columns:
            gw = self.group_width(c)
            l1 += _SEP + f"{c:^{gw}}"
            l2 += _SEP
            l3 += _SEP
            l4 += _SEP
            if c == "memcpy":
                l2 += f"{'local copy':^{gw}}"
                l3 += _cells(_MEMCPY_W, ["time", "iqr", "bw"])
                l4 += _cells(_MEMCPY_W, ["(us)", "(%)", "(GB/s)"])
                continue
            if r.show_pred:
                l2 += " " * (_PRED_W + 1)
                l3 += _cells((_PRED_W,), ["pred"])
                l4 += _cells((_PRED_W,), ["(us)"])
            for m in r.modes[c]:
                l2 += f"{MODE_LABEL[m]:^{_width(_CELL_W)}}"
                l3 += _cells(_CELL_W, ["time", "iqr", "algbw", "busbw", "#wrong"])
                l4 += _cells(_CELL_W, ["(us)", "(%)", "(GB/s)", "(GB/s)", ""])
        return ["#" + ln[1:].rstrip() for ln in (l1, l2, l3, l4)]

    def row(self, row: SizeResult, opts: Options) -> str:
        r = self.res
        line = _cells(_PREFIX_W, [str(row.size), str(row.count), str(opts.dtype),
                                  opts.op if r.collective in ("allreduce", "reduce", "reduce_scatter") else "none",
                                  str(r.root)])
        for c in r.columns:
            line += _SEP
            cells = row.cells.get(c, {})
            if c == "memcpy":
                s = cells.get(OOP)
                line += _cells(_MEMCPY_W, ["n/a", "", ""] if s is None else
                               [fmt_time(s.median_us), f"{100 * s.iqr:.0f}", f"{s.algbw:.2f}"])
                continue
            if r.show_pred:
                p = row.pred_us.get(c)
                line += _cells((_PRED_W,), ["" if p is None else fmt_time(p)])
            for m in r.modes[c]:
                line += _cells(_CELL_W, _stat_texts(cells.get(m)))
        return line.rstrip()


def _stat_texts(s: Stat | None) -> list[str]:
    if s is None:
        return ["n/a", "", "", "", ""]
    return [fmt_time(s.median_us), f"{100 * s.iqr:.0f}", f"{s.algbw:.2f}", f"{s.busbw:.2f}",
            "N/A" if s.wrong is None else str(s.wrong)]


def compact_mode(res: CollectiveResult, col: str) -> str:
    """The mode of ``col``'s one cell in the compact table: out of place where it has it, else in place."""
    return OOP if OOP in res.modes[col] else IP


def _compact_label(res: CollectiveResult, col: str) -> str:
    return col if compact_mode(res, col) == OOP else f"{col}:ip"


class _CompactLayout:
    """The default table: per size, one busbw cell per column and the size's #wrong."""

    _PREFIX = (10, 8, 5)  # size, type, redop

    def __init__(self, res: CollectiveResult) -> None:
        self.res = res
        self.widths = [max(7, len(_compact_label(res, c))) for c in res.columns]

    def header(self, opts: Options) -> list[str]:
        r = self.res
        names = _cells(self._PREFIX, ["size", "type", "redop"])
        names += "".join(f" {_compact_label(r, c):>{w}}" for c, w in zip(r.columns, self.widths)) + "  #wrong"
        units = _cells(self._PREFIX, ["(B)", "", ""])
        units += "".join(f" {'(GB/s)':>{w}}" for w in self.widths)
        return ["# busbw per column, out of place (:ip: in place only; memcpy: copy speed); --wide: times, both modes",
                "#" + names[1:], "#" + units[1:].rstrip()]

    def row(self, row: SizeResult, opts: Options) -> str:
        r = self.res
        line = _cells(self._PREFIX, [str(row.size), str(opts.dtype),
                                     opts.op if r.collective in ("allreduce", "reduce", "reduce_scatter") else "none"])
        wrong: list[int | None] = []
        for c, w in zip(r.columns, self.widths):
            cells = row.cells.get(c, {})
            s = cells.get(compact_mode(r, c))
            line += f" {'n/a' if s is None else f'{s.busbw:.2f}':>{w}}"
            wrong += [cells[m].wrong for m in r.modes[c] if m in cells and c != "memcpy"]
        checked = [n for n in wrong if n is not None]
        line += f" {'N/A' if not checked else str(sum(checked)):>7}"
        return line


def footer_lines(res: CollectiveResult, wide: bool = True) -> list[str]:
    """The footer: #wrong total, mean busbw per column, busbw ratios vs native per size, notes.

    ``wide=False`` (the compact table's footer) gives each column its compact cell's mode only.
    """
    out = []
    w = res.wrong
    out.append(f"# Out of bounds values : {w} {'OK' if w == 0 else 'FAILED'}")
    out.append("# Avg bus bandwidth (GB/s, mean over sizes; memcpy: copy speed):")
    for c in res.columns:
        parts = []
        for m in res.modes[c] if wide else (compact_mode(res, c),):
            v = res.avg_busbw(c, m)
            parts.append(f"{MODE_LABEL[m]} {'n/a' if v is None else f'{v:.3f}'}")
        out.append(f"#   {c:<10} " + "   ".join(parts))
    others = [(c, m) for c in res.columns if c != "native"
              for m in (res.modes[c] if wide else (compact_mode(res, c),))]
    if "native" in res.columns and others:
        labels = [c if m == OOP else f"{c}:ip" for c, m in others]
        widths = [max(8, len(s)) for s in labels]
        out.append("#")
        out.append("# busbw / native busbw, same run (>1: faster than native; :ip = in-place vs native in-place; "
                   "memcpy: copy speed vs native)")
        out.append("# " + f"{'size':>10}" + "".join(f" {s:>{w}}" for s, w in zip(labels, widths)))
        for row in res.rows:
            cells = []
            for (c, m), w in zip(others, widths):
                q = row.ratio_vs_native(c, m)
                cells.append(f" {'-' if q is None else f'{q:.2f}x':>{w}}")
            out.append("# " + f"{format_size(row.size):>10}" + "".join(cells))
    for n in res.notes:
        out.append(f"# note: {n}")
    return out


class TextReporter:
    """Prints the nccl-tests style table to ``stream`` as sizes complete.

    Example::

        run(opts, comm, mpicomm, TextReporter(sys.stdout) if comm.rank == 0 else None)
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.layout: _Layout | _CompactLayout | None = None
        self.opts: Options | None = None
        self.first = True

    def _print(self, *lines: str) -> None:
        for ln in lines:
            print(ln, file=self.stream)
        self.stream.flush()

    def begin(self, info: JobInfo, opts: Options, res: CollectiveResult) -> None:
        """The header of one collective's table."""
        self.layout, self.opts = (_Layout(res) if opts.wide else _CompactLayout(res)), opts
        nodes = len(info.ranks_per_node)
        if not self.first:
            self._print("")
        self.first = False
        self._print(
            f"# collective-bench: {res.collective}, {opts.dtype}, op {opts.op}"
            + (f", root {res.root}" if res.root >= 0 else ""),
            f"# MPI: {info.mpi_library} (MPI {info.mpi_version}, mpi4py {info.mpi4py_version})",
            f"# nranks {info.nranks}, ranks per node {info.ranks_per_node} ({nodes} node{'s' if nodes != 1 else ''})",
            f"# minBytes {opts.sizes[0]} maxBytes {opts.sizes[-1]} sizes {len(opts.sizes)} warmup iters: "
            f"{opts.warmup} iters: {opts.iters} validation: {int(opts.check)}",
            f"# busbw = algbw x {FACTOR_TEXT[res.collective]} = {res.factor:.3f}; time = median over iterations of "
            "the slowest rank" + ("; iqr = interquartile range / median" if opts.wide else ""),
            "# each size runs the columns interleaved round-robin, shuffled each round, with their own buffers",
            "# and a barrier before every timed call (gloo after the others: a Gloo call slows whatever follows it);",
            "# compare columns as ratios within one run",
            "#",
            *self.layout.header(opts),
        )

    def row(self, res: CollectiveResult, row: SizeResult) -> None:
        """One size's line."""
        assert self.layout is not None and self.opts is not None
        self._print(self.layout.row(row, self.opts))

    def end(self, res: CollectiveResult) -> None:
        """The footer."""
        assert self.opts is not None
        self._print(*footer_lines(res, wide=self.opts.wide))


def to_json(info: JobInfo, opts: Options, results: list[CollectiveResult], argv: list[str] | None = None) -> dict:
    """Everything measured, as a JSON-ready dict (raw per-iteration samples included).

    Layout: job fields at the top; ``collectives`` is a list with, per collective,
    ``sizes`` (each with ``results[column][mode]`` statistics, ``pred_us`` and
    ``ratio_vs_native[column][mode]``), ``avg_busbw[column][mode]`` and ``wrong``.
    Modes are "out_of_place" and "in_place".
    """
    colls = []
    for res in results:
        sizes = []
        for row in res.rows:
            sizes.append({
                "size": row.size,
                "count": row.count,
                "input_bytes": row.input_bytes,
                "pred_us": {c: row.pred_us.get(c) for c in res.columns},
                "auto_pick": row.auto_pick,
                "results": {c: {m: s.to_json() for m, s in row.cells.get(c, {}).items()} for c in res.columns},
                "ratio_vs_native": {c: {m: row.ratio_vs_native(c, m) for m in res.modes[c]}
                                    for c in res.columns if c != "native"},
            })
        colls.append({
            "collective": res.collective,
            "root": res.root,
            "busbw_factor": res.factor,
            "columns": list(res.columns),
            "modes": {c: list(m) for c, m in res.modes.items()},
            "sizes": sizes,
            "avg_busbw": {c: {m: res.avg_busbw(c, m) for m in res.modes[c]} for c in res.columns},
            "wrong": res.wrong,
            "notes": list(res.notes),
        })
    wrong = sum(r.wrong for r in results)
    return {
        "tool": "collective-bench",
        "format": 1,
        "argv": list(argv) if argv is not None else None,
        "mpi": {"library": info.mpi_library, "version": info.mpi_version, "mpi4py": info.mpi4py_version},
        "nranks": info.nranks,
        "ranks_per_node": list(info.ranks_per_node),
        "dtype": str(opts.dtype),
        "op": opts.op,
        "iters": opts.iters,
        "warmup": opts.warmup,
        "check": opts.check,
        "sizes": list(opts.sizes),
        "collectives": colls,
        "wrong": wrong,
        "ok": wrong == 0,
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
