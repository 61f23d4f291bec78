"""Turn collective-bench JSON into a Markdown table: native's busbw and every column's ratio to it, per size."""
from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["markdown", "main"]


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
        nat = res["native"]
        cells = []
        for c, m in heads:
            ref = nat.get("out_of_place" if c == "memcpy" else m)
            cell = res.get(c, {}).get(m)
            if not ref or not cell or not ref["busbw"]:
                cells.append("")
                continue
            cells.append(f"{cell['busbw'] / ref['busbw']:.2f}x")
        lines.append(f"| {_fmt_size(row['size'])} | {nat['out_of_place']['busbw']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """``python -m bench.tables RUN.json [--collective allreduce]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--collective", default="allreduce")
    a = ap.parse_args()
    with open(a.json) as f:
        print(markdown(json.load(f), a.collective))


if __name__ == "__main__":
    main()
