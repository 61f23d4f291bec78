"""alltoall and allgatherv on ``comm.alloc`` arrays, read out with streaming stores and with plain copies,
interleaved with MPI's own on plain arrays.

Run under a launcher (or let it launch itself)::

    python bench/bench_stream_copy.py --procs 2
    collective-run -n 4 python bench/bench_stream_copy.py --sizes 4M,16M --iters 40

Columns (float32, out of place into a preallocated ``out``, the same arrays every round so repeats take their
plans; median over ``--iters`` interleaved rounds in a shuffled order, each the slowest rank's time): ``mpi``
(bare ``MPI.COMM_WORLD``'s Alltoall or Allgatherv on NumPy arrays, the baseline), ``stream`` (the default
communicator on ``comm.alloc`` arrays: streaming copies from ``COLLECTIVE_SHM_STREAM_BYTES`` of output) and
``plain`` (a communicator made with ``COLLECTIVE_SHM_STREAM_BYTES=0``, on its own ``alloc`` arrays: plain
copies), as busbw ratios against ``mpi``. Sizes are the whole buffer as ``collective-bench`` counts them:
alltoall each rank's input; allgatherv the result, SIZE/P from each rank on average (in proportion to r+1).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_single_copy import communicators, interleaved, size_arg  # the script beside this one

COLLECTIVES = ("alltoall", "allgatherv")


def _columns(coll: str, nbytes: int, comm: Any, plain: Any, w: Any, MPI: Any) -> tuple[dict[str, Callable[[], Any]],
                                                                                          list[tuple[Any, Any]]]:
    """One callable per column for ``coll`` of ``nbytes``, each with buffers of its own; the alloc'd arrays."""
    P, R = w.size, w.rank
    count = nbytes // 4
    F = MPI.FLOAT
    cols: dict[str, Callable[[], Any]] = {}
    held: list[tuple[Any, Any]] = []
    if coll == "allgatherv":
        c = [count * (r + 1) * (r + 2) // (P * (P + 1)) - count * r * (r + 1) // (P * (P + 1)) for r in range(P)]
        displ = [sum(c[:r]) for r in range(P)]
        n = c[R]
    else:
        count -= count % P
        n = count
    x, o = np.arange(n, dtype=np.float32) + R, np.empty(count, np.float32)
    cols["mpi"] = ((lambda: w.Alltoall([x, F], [o, F])) if coll == "alltoall" else
                   (lambda: w.Allgatherv([x, F], [o, (c, displ), F])))
    for name, who in (("stream", comm), ("plain", plain)):
        # allgatherv: every rank allocates the largest input (alloc is collective, one shape), passes its rows
        a = who.alloc((count if coll == "alltoall" else max(c),), np.float32)
        a[:n] = np.arange(n, dtype=np.float32) + R
        out = np.empty(count, np.float32)
        held.append((who, a))
        cols[name] = ((lambda a=a, out=out, who=who: who.alltoall(a, algorithm="shm", out=out)) if coll == "alltoall"
                      else (lambda a=a, out=out, who=who: who.allgather(a[:n], algorithm="shm", out=out)))
    return cols, held


def main(argv: list[str] | None = None) -> None:
    """Parse the options; launch P ranks unless already under MPI; print one table per collective on rank 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2, help="ranks to launch when not started under MPI")
    ap.add_argument("--collective", default="alltoall,allgatherv", help=f"comma list of {', '.join(COLLECTIVES)}")
    ap.add_argument("--sizes", default="1M,4M,16M,64M", help="comma list of sizes in bytes")
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args(argv)
    colls = a.collective.split(",")
    bad = [c for c in colls if c not in COLLECTIVES]
    if bad:
        ap.error(f"unknown collective {bad}; one of {', '.join(COLLECTIVES)}")
    comm, plain = communicators(__file__, a.procs, argv, off="COLLECTIVE_SHM_STREAM_BYTES")
    from mpi4py import MPI

    w = MPI.COMM_WORLD
    arena = comm.node_arena()
    if w.rank == 0:
        how = f"from {arena.stream} bytes of output" if arena.stream else "OFF"
        print(f"P={w.size}; streaming copies {how}; busbw / mpi's, median of {a.iters} interleaved rounds "
              "(slowest rank)")
    for coll in colls:
        if w.rank == 0:
            print(f"{coll:>10} {'mpi (us)':>10} {'stream':>8} {'plain':>8}  stream/plain")
        for nb in (size_arg(s) for s in a.sizes.split(",")):
            cols, held = _columns(coll, nb, comm, plain, w, MPI)
            m = interleaved(cols, a.iters, nb, w, MPI)
            if w.rank == 0:
                print(f"{nb:>10} {m['mpi'] * 1e6:>10.1f} " + " ".join(f"{m['mpi'] / m[k]:>7.2f}x"
                                                                     for k in ("stream", "plain"))
                      + f"  {m['plain'] / m['stream']:.2f}x", flush=True)
            cols.clear()
            for who, arr in held:
                who.free(arr)
            del held, arr
    plain.close()


if __name__ == "__main__":
    main()
