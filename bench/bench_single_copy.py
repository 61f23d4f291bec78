"""The shm allreduce's two ways of moving data on one node, interleaved: single copy (cross-memory attach) and copy-in.

Run under a launcher (or let it launch itself)::

    collective-run -n 2 python bench/bench_single_copy.py
    python bench/bench_single_copy.py --procs 4 --sizes 4M,16M,64M --iters 15

Columns (in-place float32 ``comm.allreduce(x, out=x, algorithm="shm")``; median over ``--iters`` interleaved
rounds, each the slowest rank's time): ``single`` (the default communicator: single copy from
``collective.shm.CMA_MIN_BYTES``, where the node allows it), ``copy-in`` (a communicator made with
``COLLECTIVE_SHM_SINGLE_COPY=0``: every byte copied into the node's window and out again), ``mpi`` (bare
``MPI.COMM_WORLD.Allreduce``) and ``copy`` (every rank copies the array at the same time: the memory-bound floor).
Times are also given in copies (time / copy).

``--pages small`` runs every column on fresh private anonymous memory on 4 KiB pages (as torch allocates its CPU
tensors) instead of NumPy arrays (which NumPy puts on huge pages where the kernel's transparent huge pages are
``madvise`` or ``always``), after ``collective.cma.HugePages.after`` warm-up calls, and adds ``single-4k``: the
single copy on another such array by a communicator made with ``COLLECTIVE_SHM_HUGE_PAGES=0``, whose arrays stay
on 4 KiB pages (the default communicator's array is on huge pages by then: see "single copy" in
docs/concepts/shm.md).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size_arg(text: str) -> int:
    """Bytes from ``4K``, ``16M``, ``1G`` (binary units) or a plain number."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    return int(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else int(t)


def communicators(script: str, procs: int, argv: list[str] | None,
                  off: str = "COLLECTIVE_SHM_SINGLE_COPY") -> tuple[Any, Any]:
    """Under MPI: the default communicator and one made with ``off=0`` (by default ``COLLECTIVE_SHM_SINGLE_COPY``:
    copy-in), over every rank. Otherwise launch ``script`` on ``procs`` ranks with the same arguments and exit
    with the job."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ and "PMI_SIZE" not in os.environ:
        from collective.run import main as run

        sys.exit(run(["-n", str(procs), sys.executable, os.path.abspath(script), *(argv or sys.argv[1:])]))
    import collective as col

    comm = col.init()
    os.environ[off] = "0"
    try:
        plain = comm.split(0)
    finally:
        del os.environ[off]
    assert plain is not None
    return comm, plain


def interleaved(cols: dict[str, Callable[[], Any]], iters: int, seed: int, w: Any, MPI: Any) -> dict[str, float]:
    """Each column's median time in seconds over ``iters`` rounds (after three untimed ones, which make the plans
    and touch the pages), the columns in a shuffled order each round, each call after a barrier and timed on the
    slowest rank."""
    res: dict[str, list[float]] = {k: [] for k in cols}
    order = list(cols)
    rng = random.Random(seed)
    for it in range(iters + 3):
        rng.shuffle(order)
        for k in order:
            w.Barrier()
            t0 = time.perf_counter()
            cols[k]()
            dt = np.array([time.perf_counter() - t0])
            w.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
            if it >= 3:
                res[k].append(float(dt[0]))
    return {k: float(np.median(v)) for k, v in res.items()}


def main(argv: list[str] | None = None) -> None:
    """Parse the options; launch P ranks unless already under MPI; print the table on rank 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2, help="ranks to launch when not started under MPI")
    ap.add_argument("--sizes", default="4M,8M,16M,32M,64M", help="comma list of message sizes in bytes")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--pages", choices=("numpy", "small"), default="numpy",
                    help="arrays: NumPy's, or fresh anonymous memory on 4 KiB pages (adds the single-4k column)")
    a = ap.parse_args(argv)
    comm, plain = communicators(__file__, a.procs, argv)
    from mpi4py import MPI

    small = a.pages == "small"
    four_k = None
    if small:
        os.environ["COLLECTIVE_SHM_HUGE_PAGES"] = "0"
        try:
            four_k = comm.split(0)
        finally:
            del os.environ["COLLECTIVE_SHM_HUGE_PAGES"]
    w = MPI.COMM_WORLD
    x = np.ones(1, np.float32)
    for cm in (comm, plain, four_k):  # makes the windows (and probes) before timing
        if cm is not None:
            cm.allreduce(x, algorithm="shm")
    single = comm.node_arena().cma is not None
    names = ["single", *(["single-4k"] if small else []), "copy-in", "mpi"]
    if w.rank == 0:
        print(f"shm allreduce, float32, in place, P={w.size}; single copy {'available' if single else 'UNAVAILABLE'} "
              f"here; {'anonymous memory on 4 KiB pages' if small else 'NumPy arrays'}; median of {a.iters} "
              "interleaved rounds (slowest rank), ms and copies")
        print(f"{'bytes':>10} " + " ".join(f"{k:>16}" for k in names) + f" {'copy':>8}  copy-in/single"
              + ("  single-4k/single" if small else ""))
    for nb in (size_arg(s) for s in a.sizes.split(",")):
        x = _anonymous(nb // 4) if small else np.ones(nb // 4, np.float32)
        c = np.empty_like(x)
        cols = {
            "single": lambda: comm.allreduce(x, out=x, algorithm="shm"),
            "copy-in": lambda: plain.allreduce(x, out=x, algorithm="shm"),
            "mpi": lambda: w.Allreduce(MPI.IN_PLACE, x),
            "copy": lambda: np.copyto(c, x),
        }
        if four_k is not None:
            y = _anonymous(nb // 4)
            cols["single-4k"] = lambda: four_k.allreduce(y, out=y, algorithm="shm")
            from collective.cma import HugePages

            for _ in range(HugePages().after):  # the default communicator's array goes on huge pages
                x[:] = 0
                comm.allreduce(x, out=x, algorithm="shm")
        res: dict[str, list[float]] = {k: [] for k in cols}
        for _ in range(a.iters):
            for k, f in cols.items():
                x[:] = 0
                if four_k is not None:
                    y[:] = 0
                w.Barrier()
                t0 = time.perf_counter()
                f()
                dt = np.array([time.perf_counter() - t0])
                w.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
                res[k].append(float(dt[0]))
        if w.rank == 0:
            m = {k: float(np.median(v)) * 1e3 for k, v in res.items()}
            cell = {k: f"{v:8.3f} ({v / m['copy']:4.2f})" for k, v in m.items()}
            print(f"{nb:>10} " + " ".join(f"{cell[k]:>16}" for k in names) + f" {m['copy']:8.3f}  "
                  f"{m['copy-in'] / m['single']:.2f}x" + (f"  {m['single-4k'] / m['single']:.2f}x" if small else ""),
                  flush=True)
    if four_k is not None:
        four_k.close()
    plain.close()


def _anonymous(n: int) -> np.ndarray:
    """``n`` float32 of fresh private anonymous memory, on 4 KiB pages until something asks for huge ones."""
    import mmap

    return np.frombuffer(mmap.mmap(-1, 4 * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.float32, count=n)


if __name__ == "__main__":
    main()
