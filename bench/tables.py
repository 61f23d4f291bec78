"""Turn collective-bench JSON into a Markdown table: native's busbw and every column's ratio to it, per size."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .cli import LIB_NATIVE

__all__ = ["markdown", "auto_markdown", "main"]

#: Columns that are not a fixed algorithm auto could pick for a plain array.
_NOT_FIXED = ("auto", "alloc", "gloo", "memcpy", "broken")


def _fmt_size(n: int) -> str:
    for unit, k in (("M", 20), ("K", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k} {unit}iB"
    return f"{n} B"


def markdown(doc: dict[str, Any], collective: str = "allreduce") -> str:
    """A table with one row per size: native busbw (GB/s) out-of-place, then busbw/native for each column and mode.

    In-place cells compare with native in-place; memcpy with native out-of-place.

    Example::

        print(markdown(json.load(open("allreduce_p2.json"))))
    """
    coll = next(c for c in doc["collectives"] if c["collective"] == collective)
    cols = [c for c in coll["columns"] if c != "native"]
    heads = []
    for c in cols:
        for mode in coll["modes"][c]:
            heads.append((c, mode))
    label = {"out_of_place": "", "in_place": " (in place)"}
    lines = ["| size | native busbw GB/s | " + " | ".join(f"{c}{label[m]}" for c, m in heads) + " |",
             "|---" * (2 + len(heads)) + "|"]
    for row in coll["sizes"]:
        res = row["results"]
        nat = res.get("native", {})  # empty where MPI's call was n/a (sendrecv at P=1, a dtype MPI lacks)
        cells = []
        for c, m in heads:
            ref = nat.get("out_of_place" if c == "memcpy" else m)
            cell = res.get(c, {}).get(m)
            if not ref or not cell or not ref["busbw"]:
                cells.append("")
                continue
            cells.append(f"{cell['busbw'] / ref['busbw']:.2f}x")
        base = nat.get("out_of_place")
        lines.append(f"| {_fmt_size(row['size'])} | {'n/a' if base is None else format(base['busbw'], '.2f')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def auto_markdown(doc: dict[str, Any], collective: str = "allreduce", mode: str = "out_of_place") -> str:
    """A table of ``auto`` against the best fixed algorithm, per size, with the cost model's predictions.

    Columns: what auto ran, its median time, the fastest fixed algorithm
    measured in the same run and its time, auto / best (1.00 = auto was the
    best; <= 1.10 is the "within 10 %" target), then the cost model's own
    pick (the cheapest predicted) and, for each measured algorithm the model
    covers, measured / predicted for the fastest one.

    Example::

        print(auto_markdown(json.load(open("allreduce_p4.json"))))
    """
    coll = next(c for c in doc["collectives"] if c["collective"] == collective)
    fixed = [c for c in coll["columns"] if c not in _NOT_FIXED]
    if LIB_NATIVE in fixed and "native" in fixed:  # auto's "native" is the library's: compare with that column
        fixed.remove("native")
    lines = ["| size | auto ran | auto (us) | best fixed | best (us) | auto / best | model's pick | best: measured / predicted |",
             "|---|---|---|---|---|---|---|---|"]
    for row in coll["sizes"]:
        res = row["results"]
        times = {c: res[c][mode]["time_us"] for c in fixed if mode in res.get(c, {})}
        auto = res.get("auto", {}).get(mode)
        if not times or auto is None:
            continue
        best = min(times, key=times.get)
        preds = {c: v for c, v in row.get("pred_us", {}).items() if v is not None and c in fixed}
        model = min(preds, key=preds.get) if preds else ""
        ratio = f"{times[best] / preds[best]:.2f}" if best in preds and preds[best] else "no model"
        lines.append(f"| {_fmt_size(row['size'])} | {row.get('auto_pick') or '?'} | {auto['time_us']:.1f} | {best} | "
                     f"{times[best]:.1f} | {auto['time_us'] / times[best]:.2f} | {model} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    """``python -m collective.bench.tables RUN.json [--collective allreduce] [--auto]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--collective", default="allreduce")
    ap.add_argument("--auto", action="store_true", help="auto against the best fixed algorithm, with predictions")
    a = ap.parse_args()
    with open(a.json) as f:
        doc = json.load(f)
    print(auto_markdown(doc, a.collective) if a.auto else markdown(doc, a.collective))


if __name__ == "__main__":
    main()
