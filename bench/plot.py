"""`--plot`: a PNG of busbw against size, one line per algorithm, log-2 size axis (matplotlib, imported lazily)."""
from __future__ import annotations

import importlib.util
from typing import Any

from .cli import format_size
from .core import IP, OOP, CollectiveResult, JobInfo

__all__ = ["column_colors", "figure", "unavailable", "write_plot"]

#: Line colours, each distinct from the others (matplotlib's tab20: the strong shades, then the light ones), so
#: that a run with more columns than the default ten-colour cycle never draws two columns alike.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
#: memcpy is a ceiling, not a competitor: grey (no other column gets grey).
_MEMCPY_COLOR = "#7f7f7f"
_MISSING = "--plot needs matplotlib; install it with: pip install 'pycollective[bench]'"


def unavailable() -> str | None:
    """Why ``--plot`` cannot draw here (matplotlib is not installed), or None when it can.

    Cheap (nothing is imported), so collective-bench asks it before measuring anything.
    """
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else _MISSING


def column_colors(columns: list[str] | tuple[str, ...]) -> dict[str, str]:
    """A distinct colour for every column, in column order (memcpy grey); more columns than colours reuse them.

    Example::

        column_colors(["native", "ring", "gloo", "memcpy"])   # four different colours
    """
    out: dict[str, str] = {}
    i = 0
    for c in columns:
        if c == "memcpy":
            out[c] = _MEMCPY_COLOR
        else:
            out[c] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return out


def figure(info: JobInfo, results: list[CollectiveResult], dtype: str, op: str) -> Any:
    """The matplotlib Figure that :func:`write_plot` saves: one panel per collective, out-of-place busbw per column."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(8, 4.5 * n), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        sizes = [r.size for r in res.rows]
        colors = column_colors(res.columns)
        for c in res.columns:
            # Out of place where a column has it; a column that only runs in place (alloc) shows that.
            mode = OOP if any(OOP in r.cells.get(c, {}) for r in res.rows) else IP
            pts = [(r.size, r.cells[c][mode].busbw) for r in res.rows if mode in r.cells.get(c, {}) and r.size > 0]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = {"linestyle": ":"} if c == "memcpy" else {"marker": "o", "markersize": 3}
            ax.plot(xs, ys, label=c if mode == OOP else f"{c} (in place)", color=colors[c], **style)
            if mode == IP and "native" in res.columns:  # its reference: native in place
                ref = [(r.size, r.cells["native"][IP].busbw) for r in res.rows
                       if IP in r.cells.get("native", {}) and r.size > 0]
                if ref:
                    ax.plot(*zip(*ref), label="native (in place)", color=colors["native"], linestyle="--",
                            linewidth=1)
        ax.set_xscale("log", base=2)
        ticks = [s for s in sizes if s > 0]
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([format_size(s) for s in ticks], rotation=45, fontsize=8)
        ax.set_xlabel("size (bytes per rank)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{res.collective}, {dtype}, op {op}, P={info.nranks}, ranks per node {info.ranks_per_node}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plot(path: str, info: JobInfo, results: list[CollectiveResult], dtype: str, op: str) -> None:
    """Draw out-of-place busbw (GB/s) against size for every column, one panel per collective.

    memcpy (copy speed) is drawn grey and dotted, as a ceiling rather than a competitor.

    Raises:
        SystemExit: matplotlib is not installed (the message says how to get it; the caller adds its prefix).

    Example::

        write_plot("busbw.png", info, results, "float32", "sum")
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(_MISSING) from None
    fig = figure(info, results, dtype, op)
    fig.savefig(path, dpi=100)
    plt.close(fig)
