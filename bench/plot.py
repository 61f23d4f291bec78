"""`--plot`: a PNG of busbw against size, one line per algorithm, log-2 size axis (matplotlib, imported lazily)."""
from __future__ import annotations

from .cli import format_size
from .core import IP, OOP, CollectiveResult, JobInfo

__all__ = ["write_plot"]


def write_plot(path: str, info: JobInfo, results: list[CollectiveResult], dtype: str, op: str) -> None:
    """Draw out-of-place busbw (GB/s) against size for every column, one panel per collective.

    memcpy (copy speed) is drawn grey and dotted, as a ceiling rather than a competitor.

    Raises:
        SystemExit: matplotlib is not installed (the message says how to get it).

    Example::

        write_plot("busbw.png", info, results, "float32", "sum")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("collective-bench: --plot needs matplotlib; install it with: pip install "
                         "'collective[bench]'") from None
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(8, 4.5 * n), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        sizes = [r.size for r in res.rows]
        for c in res.columns:
            # Out of place where a column has it; a column that only runs in place (alloc) shows that.
            mode = OOP if any(OOP in r.cells.get(c, {}) for r in res.rows) else IP
            pts = [(r.size, r.cells[c][mode].busbw) for r in res.rows if mode in r.cells.get(c, {}) and r.size > 0]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = {"color": "grey", "linestyle": ":"} if c == "memcpy" else {"marker": "o", "markersize": 3}
            ax.plot(xs, ys, label=c if mode == OOP else f"{c} (in place)", **style)
            if mode == IP and "native" in res.columns:  # its reference: native in place
                ref = [(r.size, r.cells["native"][IP].busbw) for r in res.rows
                       if IP in r.cells.get("native", {}) and r.size > 0]
                if ref:
                    ax.plot(*zip(*ref), label="native (in place)", color="C0", linestyle="--", linewidth=1)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
