"""Command-line parsing of collective-bench: sizes like 4K/64M, the size sweep, algorithms, collectives, dtype, op."""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence

import numpy as np

from collective.spec import busbw_factor

__all__ = ["Options", "parse_args", "parse_size", "size_sweep", "format_size", "COLLECTIVES", "busbw_factor",
           "REFERENCE_ALGORITHMS", "VARIANTS", "LIB_NATIVE", "BROKEN_ENV", "default_algorithms", "known_algorithms",
           "env_rank", "BASE_COLLECTIVES", "ROOTED", "GLOO_COLLECTIVES", "column_applies"]

#: The collectives with an in-place form and a tuning table: allreduce and its kin.
BASE_COLLECTIVES: tuple[str, ...] = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather")
#: Collectives the benchmark measures, in the order `--collective all` runs them. ``allgatherv`` is comm.allgather
#: with a different number of rows on every rank; ``sendrecv`` is comm.send/recv between the pairs (r, r^1).
COLLECTIVES: tuple[str, ...] = (*BASE_COLLECTIVES, "alltoall", "gather", "scatter", "allgatherv", "sendrecv")
#: Collectives whose ``-r`` root matters.
ROOTED: tuple[str, ...] = ("reduce", "broadcast", "gather", "scatter")
#: Collectives with a gloo column, and the torch.distributed call it makes.
GLOO_COLLECTIVES: dict[str, str] = {"allreduce": "all_reduce", "alltoall": "all_to_all_single", "gather": "gather",
                                    "scatter": "scatter", "allgatherv": "all_gather (blocks padded to the largest)"}
#: Reference columns that are not algorithms of the library.
REFERENCE_ALGORITHMS: tuple[str, ...] = ("gloo", "memcpy")
#: Library variants that are not algorithm names: "alloc" is shm on comm.alloc() buffers (allreduce in place,
#: and out of place from one such buffer into another; alltoall and allgatherv from one into another);
#: "native-lib" is the library's native algorithm (MPI's own behind collective's checks and dispatch), while the
#: "native" column is MPI's own called straight through mpi4py, the baseline every ratio is against.
VARIANTS: tuple[str, ...] = ("alloc", "native-lib")
#: The collectives with an alloc column (on one node).
ALLOC_COLLECTIVES: tuple[str, ...] = ("allreduce", "alltoall", "allgatherv")
#: The column of the library's native algorithm (what auto runs when it picks "native").
LIB_NATIVE = "native-lib"
#: Set to 1 to register the deliberately wrong `broken` column (tests of the check column): the library's native
#: algorithm (for allreduce and its kin) or the bare MPI call (for the other collectives), then one element of
#: one rank's result changed.
BROKEN_ENV = "COLLECTIVE_BENCH_TEST_BROKEN"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size like "4096", "4K", "64M", "1G" or "4KiB" (binary units, as nccl-tests).

    Raises:
        ValueError: not a size.

    Example::

        parse_size("64M")   # 67108864
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; write bytes as e.g. 4096, 4K, 64M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(nbytes: int) -> str:
    """The shortest exact form of a byte count: 4096 -> "4K", 1536 -> "1536"."""
    for u in ("T", "G", "M", "K"):
        if nbytes and nbytes % _UNITS[u] == 0:
            return f"{nbytes // _UNITS[u]}{u}"
    return str(nbytes)


def size_sweep(minbytes: int, maxbytes: int, factor: int) -> list[int]:
    """The sizes from ``minbytes`` to ``maxbytes``, each ``factor`` times the previous (maxbytes included if hit).

    Example::

        size_sweep(4096, 65536, 4)   # [4096, 16384, 65536]
    """
    if minbytes < 0 or maxbytes < minbytes:
        raise ValueError(f"need 0 <= min size <= max size, got -b {minbytes} -e {maxbytes}")
    if minbytes == maxbytes:
        return [minbytes]
    if factor < 2:
        raise ValueError(f"the factor -f must be >= 2 when -b < -e, got {factor}")
    out, s = [], minbytes
    if s == 0:  # 0 would never grow: measure it, then continue from 1 byte
        out.append(0)
        s = 1
    while s <= maxbytes:
        out.append(s)
        s *= factor
    return out


def env_rank() -> int | None:
    """This process's MPI rank from the launcher's environment (before MPI starts), if any."""
    for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"):
        v = os.environ.get(k)
        if v is not None and v.isdigit():
            return int(v)
    return None


def _library_algorithms() -> tuple[str, ...]:
    """The library's algorithm names: collective.ALGORITHMS, then the Schedules of every collective (pairwise...)."""
    from collective import topologies
    from collective import ALGORITHMS

    by_coll = topologies.ALGORITHMS_BY_COLLECTIVE
    return tuple(dict.fromkeys((*ALGORITHMS, *(a for algs in by_coll.values() for a in algs))))


def column_applies(col: str, coll: str) -> bool:
    """Whether column ``col`` measures something for collective ``coll``.

    native, native-lib, memcpy and broken apply to every collective; gloo to
    ``GLOO_COLLECTIVES``; alloc to ``ALLOC_COLLECTIVES``; a library algorithm to the
    collectives that have it: those of the collective's ``collective.spec``
    entry, else auto, native, shm and the Schedules
    ``topologies.ALGORITHMS_BY_COLLECTIVE`` lists for it (allgatherv); none
    to sendrecv.

    Example::

        column_applies("bruck", "alltoall"), column_applies("ring", "alltoall")   # True, False
    """
    from collective import topologies

    if col in ("native", LIB_NATIVE, "memcpy", "broken"):
        return True
    if col == "gloo":
        return coll in GLOO_COLLECTIVES
    if col == "alloc":
        return coll in ALLOC_COLLECTIVES
    if coll == "sendrecv":  # point-to-point: no algorithm to choose
        return False
    from collective.spec import SPECS

    if coll in SPECS:  # the algorithms the library accepts for it
        return col in SPECS[coll].host
    return col in ("auto", "native", "shm", *topologies.ALGORITHMS_BY_COLLECTIVE.get(coll, ()))


def known_algorithms() -> tuple[str, ...]:
    """Every name ``-a`` accepts here: the library's algorithms, gloo, memcpy (and broken under the test variable)."""
    names = _library_algorithms() + VARIANTS + REFERENCE_ALGORITHMS
    from collective import config

    if config.get(BROKEN_ENV):
        names += ("broken",)
    return names


def default_algorithms() -> tuple[str, ...]:
    """What ``-a all`` means: native, the library's other algorithms, auto, then gloo and memcpy.

    Per collective, only the columns that apply to it run (:func:`column_applies`); gloo is dropped
    later when torch.distributed cannot be imported.
    """
    # native first (every ratio is against it), auto after the algorithms it chooses from.
    algs = [a for a in _library_algorithms() if a not in ("native", "auto")]
    return ("native", LIB_NATIVE, *algs, "auto", *[v for v in VARIANTS if v != LIB_NATIVE], *REFERENCE_ALGORITHMS)


@dataclass
class Options:
    """What one collective-bench run measures and writes.

    Attributes:
        sizes: buffer sizes in bytes (nccl-tests convention: the largest buffer a rank
            holds; the gathered result for allgather, the full input for reduce_scatter).
        iters: timed iterations per size and algorithm.
        warmup: untimed iterations before them.
        check: compare every result with the exact answer (#wrong column).
        op: reduction op.
        dtype: element type.
        algorithms: columns, in order.
        explicit: the user named ``algorithms`` (a missing gloo is then an error, not a silent skip).
        collectives: what to measure, in order.
        root: root rank of reduce, broadcast, gather and scatter.
        json_path: write the results as JSON here.
        plot_path: write a PNG of busbw against size here.
        tune_path: write (or update) a tuning table here.
        explain: print the cost model's predictions and auto's pick per size instead of measuring.
        wide: print every column's time, spread, algbw, busbw and #wrong in both modes (nccl-tests' layout)
            instead of one busbw per column.
    """

    sizes: list[int]
    iters: int = 20
    warmup: int = 5
    check: bool = True
    op: str = "sum"
    dtype: np.dtype = np.dtype(np.float32)
    algorithms: tuple[str, ...] = ()
    explicit: bool = False
    collectives: tuple[str, ...] = ("allreduce",)
    root: int = 0
    json_path: str | None = None
    plot_path: str | None = None
    tune_path: str | None = None
    explain: bool = False
    wide: bool = False


class _Parser(argparse.ArgumentParser):
    """argparse that prints its complaint on one rank only (every rank parses the same line)."""

    def error(self, message: str) -> NoReturn:
        if env_rank() in (None, 0):
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message and env_rank() in (None, 0):
            print(message, file=sys.stderr, end="")
        raise SystemExit(status)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dtype(name: str) -> np.dtype:
    from collective.ops import BFLOAT16, check_dtype

    if name == "bfloat16":
        if BFLOAT16 is None:
            raise ValueError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes)")
        return BFLOAT16
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"{name!r} is not a NumPy dtype; e.g. float32, float16, int32, bfloat16") from None
    why = check_dtype(dt, None)
    if why is not None:
        raise ValueError(why)
    return dt


#: What each column that is not plainly an algorithm of the library measures (the -a help).
_COLUMN_NOTES = {
    "native": "MPI's own collective called straight through mpi4py, the baseline of every ratio",
    LIB_NATIVE: "the library's native algorithm (MPI's own behind its checks and dispatch)",
    "auto": "what the library picks per size",
    "alloc": "shm on comm.alloc buffers, in place and from one into another (allreduce; alltoall and allgatherv "
             "out of place; one node)",
    "gloo": "torch.distributed over Gloo (allreduce only, when torch is installed)",
    "memcpy": "a local copy of the same bytes, no communication",
}


def _algorithms_help() -> str:
    """The -a help: every column ``all`` runs, in order, with what the non-algorithm ones measure."""
    try:
        cols = default_algorithms()
    except ImportError:  # the runtime is not importable: describe the fixed columns only
        cols = tuple(_COLUMN_NOTES)
    notes = "; ".join(f"{c}: {_COLUMN_NOTES[c]}" for c in cols if c in _COLUMN_NOTES)
    return f"comma list of columns; default all, which is: {', '.join(cols)}. {notes}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also what ``--help`` prints)."""
    p = _Parser(
        prog="collective-bench",
        description="Bandwidth of collective's algorithms against native MPI, nccl-tests style. Launch under "
                    "mpiexec, e.g. collective-run -n 4 collective-bench -b 4K -e 64M -f 4. Within each size the "
                    "algorithms run interleaved round-robin (shuffled each round) with their own buffers; time = "
                    "median over iterations of the slowest rank; compare algorithms by the ratios of one run.",
        epilog="Size SIZE per collective (nccl-tests): allreduce, reduce, broadcast: each rank's buffer; "
               "reduce_scatter, scatter: the whole input (the root's, for scatter), rank r gets block r; allgather, "
               "gather: the whole result, SIZE/P from each rank; alltoall: each rank's input, SIZE/P to every rank; "
               "allgatherv: the whole result, rank r contributes the elements between floor(n*r(r+1)/(P(P+1))) and "
               "floor(n*(r+1)(r+2)/(P(P+1))) of n = SIZE/itemsize, i.e. in proportion to r+1 (rank r about "
               "2(r+1)/(P+1) times the mean); sendrecv: each rank sends SIZE to rank r^1 and receives SIZE "
               "from it at the same time (with an odd P the last rank sits out; P=1 measures nothing). "
               "busbw = algbw x 2(P-1)/P for allreduce; (P-1)/P for reduce_scatter, allgather, allgatherv, "
               "alltoall, gather, scatter; 1 for reduce, broadcast, sendrecv. The native column calls MPI straight "
               "through mpi4py (Allreduce, Reduce, Bcast, Reduce_scatter_block, Allgather, Alltoall, Gather, "
               "Scatter, Allgatherv, Sendrecv); gloo calls torch.distributed over Gloo (all_reduce, "
               "all_to_all_single, gather, scatter; for allgatherv all_gather of blocks padded to the largest, since "
               "torch's all_gather needs equal sizes).",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: NumPy arrays over MPI (default); gpu: CuPy arrays over NCCL or MPI (bench.bench_gpu)")
    p.add_argument("-b", "--minbytes", type=_size_arg, default=4096, metavar="SIZE",
                   help="smallest buffer size in bytes, e.g. 4K (default 4K)")
    p.add_argument("-e", "--maxbytes", type=_size_arg, default=64 << 20, metavar="SIZE",
                   help="largest buffer size, e.g. 64M (default 64M)")
    p.add_argument("-f", "--stepfactor", type=int, default=4, metavar="N",
                   help="multiply the size by N between steps (default 4)")
    p.add_argument("-n", "--iters", type=int, default=20, metavar="N", help="timed iterations per size (default 20)")
    p.add_argument("-w", "--warmup_iters", type=int, default=5, metavar="N",
                   help="untimed warm-up iterations (default 5)")
    p.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, metavar="0|1",
                   help="check every result exactly, #wrong column (default 1)")
    p.add_argument("-o", "--op", default="sum", help="reduction op: sum, avg, prod, min, max (default sum)")
    p.add_argument("-d", "--datatype", default="float32", metavar="DTYPE",
                   help="element type, e.g. float32, float16, bfloat16, int32 (default float32)")
    p.add_argument("-a", "--algorithms", default="all", metavar="LIST", help=_algorithms_help())
    p.add_argument("--collective", default="allreduce", metavar="NAME[,NAME]",
                   help="allreduce, reduce, broadcast, reduce_scatter, allgather, alltoall, gather, scatter, "
                        "allgatherv, sendrecv, a comma list, or all (default allreduce)")
    p.add_argument("-r", "--root", type=int, default=0,
                   help="root rank of reduce, broadcast, gather and scatter (default 0)")
    p.add_argument("-J", "--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG of busbw against size (needs matplotlib)")
    p.add_argument("--tune", metavar="PATH",
                   help="write the fastest algorithm per size range as a tuning table for this P and layout "
                        "(COLLECTIVE_TUNING=PATH makes `auto` read it); an existing table of the same layout "
                        "keeps the collectives not measured now")
    p.add_argument("--wide", action="store_true",
                   help="print every column's time, spread, algbw, busbw and #wrong, out of place and in place, "
                        "and the predicted time (nccl-tests' layout; lines get long); the default prints one busbw "
                        "per column and size. -J writes everything either way")
    p.add_argument("--explain", action="store_true",
                   help="measure nothing: print, per collective and size, every algorithm's predicted time on the "
                        "links calibrated at start-up, the cost model's choice and what auto picks")
    return p


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse a command line into Options; exits with status 2 and a message on bad input.

    Example::

        opts = parse_args(["-b", "4K", "-e", "1M", "-a", "native,ring"])
    """
    p = build_parser()
    a = p.parse_args(argv)
    try:
        sizes = size_sweep(a.minbytes, a.maxbytes, a.stepfactor)
    except ValueError as exc:
        p.error(str(exc))
    if a.iters < 1:
        p.error(f"-n must be >= 1, got {a.iters}")
    if a.warmup_iters < 0:
        p.error(f"-w must be >= 0, got {a.warmup_iters}")
    from collective.ops import OPS

    op = a.op.lower()
    if op not in OPS:
        p.error(f"unknown op {a.op!r}; choose one of {', '.join(OPS)}")
    try:
        dtype = _dtype(a.datatype)
    except ValueError as exc:
        p.error(f"-d {a.datatype}: {exc}")
    from collective.ops import check_dtype, get_op

    why = check_dtype(dtype, get_op(op))
    if why is not None:
        p.error(f"-d {a.datatype} -o {op}: {why}")
    colls = [c.strip() for c in a.collective.split(",") if c.strip()]
    if colls == ["all"]:
        colls = list(COLLECTIVES)
    bad = [c for c in colls if c not in COLLECTIVES]
    if bad or not colls:
        p.error(f"unknown collective {', '.join(bad) or repr(a.collective)}; "
                f"choose from {', '.join(COLLECTIVES)} or all")
    names = [n.strip() for n in a.algorithms.split(",") if n.strip()]
    explicit = names != ["all"]
    if not explicit:
        algs = list(default_algorithms())
    else:
        known = known_algorithms()
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            p.error(f"unknown algorithm {', '.join(unknown) or repr(a.algorithms)}; "
                    f"choose from {', '.join(known)} or all")
        algs = list(dict.fromkeys(names))  # drop repeats, keep order
    if a.root < 0:
        p.error(f"-r must be >= 0, got {a.root}")
    return Options(sizes=sizes, iters=a.iters, warmup=a.warmup_iters, check=bool(a.check), op=op, dtype=dtype,
                   algorithms=tuple(algs), explicit=explicit, collectives=tuple(dict.fromkeys(colls)), root=a.root,
                   json_path=a.json, plot_path=a.plot, tune_path=a.tune, explain=a.explain, wide=a.wide)
