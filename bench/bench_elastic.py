"""Recovery time of elastic training: from a rank's SIGKILL to the survivors' next step, with its parts.

Runs ``examples/train_digits.py --elastic`` under ``collective-run --elastic``
several times; in each run one rank kills itself (the
``COLLECTIVE_ELASTIC_TEST_KILL`` test hook) at a chosen step and point. The
killed rank prints the instant of its kill and the new rank 0 prints its
recovery (``trainer.Recovery``) with instants on the same clock
(``time.monotonic()``, one clock per machine), so the table gives, per run:

* ``kill->error``: from the kill until the survivor's collective raised
  ``RanksLostError`` (the failure's detection);
* the parts of ``comm.shrink()`` (``detect``, ``revoke``, ``agree``,
  ``shrink``, ``rebuild`` of the communicator and its shared windows);
* ``agree`` (the committed step), ``rebuild`` (the trainer's buckets),
  ``restore`` (the state made current and broadcast);
* ``kill->next step``: the whole recovery.

Run:  python bench/bench_elastic.py [-n 4] [--runs 6] [--out docs/bench/elastic_recovery.txt]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILL = re.compile(r"elastic-test: killing world rank (\d+) at step (\d+) point (\S+) t=([\d.]+)")
REC = re.compile(r"^elastic: lost rank\(s\) \[([\d, ]+)\] .*? \((.*); ([\d.]+) ms from the error to the next step "
                 r"\[monotonic ([\d.]+) -> ([\d.]+)\]\)", re.MULTILINE)
PLAN = [(1, 5, "allreduce"), (0, 6, "shm"), (3, 7, "update"), (2, 5, "commit"), (0, 8, "late-allreduce"),
        (1, 6, "forward")]


def one(n: int, kill: tuple[int, int, str], timeout: float) -> dict[str, float] | str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLLECTIVE_BUCKET_MB="0.03",
               COLLECTIVE_ELASTIC_TEST_KILL=":".join(map(str, kill)))
    cmd = [sys.executable, "-m", "collective.run", "--elastic", "-n", str(n), sys.executable,
           str(ROOT / "examples" / "train_digits.py"), "--elastic", "--steps", "12", "--batch", "96", "--no-progress"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timed out"
    text = p.stdout + p.stderr
    k, r = KILL.search(text), REC.search(text)
    if p.returncode != 0 or k is None or r is None:
        return f"rc {p.returncode}: {text[-600:]}"
    row = {"kill->error": float(r.group(4)) - float(k.group(4))}
    for part in r.group(2).split(", "):
        name, ms, _ = part.rsplit(" ", 2)
        row[name] = float(ms) / 1e3
    row["kill->next step"] = float(r.group(5)) - float(k.group(4))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=4, help="ranks")
    ap.add_argument("--runs", type=int, default=len(PLAN), help="jobs (one kill each)")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    rows, lines = [], []
    for i in range(args.runs):
        kill = PLAN[i % len(PLAN)]
        res = one(args.n, kill, args.timeout)
        label = f"rank {kill[0]} step {kill[1]} {kill[2]}"
        if isinstance(res, str):
            lines.append(f"{label}: FAILED {res}")
            print(lines[-1], flush=True)
            continue
        rows.append((label, res))
        print(label, {k: round(1e3 * v, 1) for k, v in res.items()}, flush=True)
    if not rows:
        sys.exit("no run recovered")
    cols = list(dict.fromkeys(k for _, r in rows for k in r))
    head = f"# elastic recovery at P={args.n}, one node, ms (python bench/bench_elastic.py -n {args.n} " \
           f"--runs {args.runs})"
    out = [head, "| kill | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, r in rows:
        out.append(f"| {label} | " + " | ".join(f"{1e3 * r[c]:.1f}" if c in r else "" for c in cols) + " |")
    med = {c: sorted(r[c] for _, r in rows if c in r) for c in cols}
    out.append("| median | " + " | ".join(f"{1e3 * v[len(v) // 2]:.1f}" for v in med.values()) + " |")
    out += lines
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
