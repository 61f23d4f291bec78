"""The shm alltoall, allgatherv, gather and scatter's two ways of moving data on one node, interleaved with MPI's.

Run under a launcher (or let it launch itself)::

    collective-run -n 2 python bench/bench_single_copy_variable.py
    python bench/bench_single_copy_variable.py --procs 4 --collective alltoall --sizes 1M,16M --iters 30

Columns (float32, out of place into a preallocated ``out``, the same arrays every round so repeats take their
plans; median over ``--iters`` interleaved rounds in a shuffled order, each the slowest rank's time, as busbw
ratios against ``mpi``): ``single`` (the default communicator: single copy where
``collective.variable.single_copy`` says so, else copy-in; with ``--every-size``, single copy at every size),
``copy-in`` (a communicator made with ``COLLECTIVE_SHM_SINGLE_COPY=0``: every byte copied into the node's window
and out again), ``lib`` (the library's ``algorithm="native"``: MPI's own behind the checks) and ``mpi`` (bare
``MPI.COMM_WORLD``'s Alltoall, Allgatherv, Gather or Scatter, the baseline). Sizes are the whole buffer as
``collective-bench`` counts them: alltoall each rank's input; allgatherv, gather and scatter the result, SIZE/P
from each rank on average (allgatherv: in proportion to r+1).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_single_copy import communicators, interleaved, size_arg  # the script beside this one

COLLECTIVES = ("alltoall", "allgatherv", "gather", "scatter")


def _columns(coll: str, nbytes: int, comm: Any, plain: Any, w: Any, MPI: Any) -> dict[str, Callable[[], Any]]:
    """One callable per column for ``coll`` of ``nbytes``, each with buffers of its own."""
    P, R = w.size, w.rank
    count = nbytes // 4
    F = MPI.FLOAT
    cols: dict[str, Callable[[], Any]] = {}
    if coll == "allgatherv":
        c = [count * (r + 1) * (r + 2) // (P * (P + 1)) - count * r * (r + 1) // (P * (P + 1)) for r in range(P)]
        displ = [sum(c[:r]) for r in range(P)]
    else:
        count -= count % P
    for name in ("single", "copy-in", "lib", "mpi"):
        who = plain if name == "copy-in" else comm
        alg = "native" if name == "lib" else "shm"
        if coll == "alltoall":
            x, o = np.arange(count, dtype=np.float32) + R, np.empty(count, np.float32)
            cols[name] = ((lambda x=x, o=o: w.Alltoall([x, F], [o, F])) if name == "mpi" else
                          (lambda x=x, o=o, who=who, alg=alg: who.alltoall(x, algorithm=alg, out=o)))
        elif coll == "allgatherv":
            x, o = np.arange(c[R], dtype=np.float32) + R, np.empty(count, np.float32)
            cols[name] = ((lambda x=x, o=o: w.Allgatherv([x, F], [o, (c, displ), F])) if name == "mpi" else
                          (lambda x=x, o=o, who=who, alg=alg: who.allgather(x, algorithm=alg, out=o)))
        elif coll == "gather":
            x, o = np.arange(count // P, dtype=np.float32) + R, (np.empty(count, np.float32) if R == 0 else None)
            cols[name] = ((lambda x=x, o=o: w.Gather([x, F], [o, F] if R == 0 else None, 0)) if name == "mpi" else
                          (lambda x=x, o=o, who=who, alg=alg: who.gather(x, root=0, algorithm=alg, out=o)))
        else:
            x, o = np.arange(count, dtype=np.float32), np.empty(count // P, np.float32)
            cols[name] = ((lambda x=x, o=o: w.Scatter([x, F] if R == 0 else None, [o, F], 0)) if name == "mpi" else
                          (lambda x=x, o=o, who=who, alg=alg: who.scatter(x if R == 0 else None, root=0,
                                                                          algorithm=alg, out=o)))
    return cols


def main(argv: list[str] | None = None) -> None:
    """Parse the options; launch P ranks unless already under MPI; print one table per collective on rank 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2, help="ranks to launch when not started under MPI")
    ap.add_argument("--collective", default="alltoall,allgatherv", help=f"comma list of {', '.join(COLLECTIVES)}")
    ap.add_argument("--sizes", default="64K,256K,1M,4M,16M,32M", help="comma list of sizes in bytes")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--every-size", action="store_true", help="the single column takes single copy at every size")
    a = ap.parse_args(argv)
    colls = a.collective.split(",")
    bad = [c for c in colls if c not in COLLECTIVES]
    if bad:
        ap.error(f"unknown collective {bad}; one of {', '.join(COLLECTIVES)}")
    comm, plain = communicators(__file__, a.procs, argv)
    from mpi4py import MPI

    import collective.variable as variable

    if a.every_size:
        variable.single_copy = lambda ar, sizes: ar.cma is not None and sum(sizes) > 0
    w = MPI.COMM_WORLD
    x = np.ones(w.size, np.float32)
    comm.alltoall(x, algorithm="shm")  # makes both windows (and probes) before timing
    plain.alltoall(x, algorithm="shm")
    arena = comm.node_arena()
    if w.rank == 0:
        print(f"P={w.size}; single copy {'available' if arena.cma is not None else 'UNAVAILABLE'} here; the ranks "
              f"{'spin on a core each' if arena.spins else 'share cores'}; busbw / mpi's, median of {a.iters} "
              f"interleaved rounds (slowest rank){'; single copy at every size' if a.every_size else ''}")
    for coll in colls:
        if w.rank == 0:
            print(f"{coll:>10} {'mpi (us)':>10} {'single':>8} {'copy-in':>8} {'lib':>8}  single/copy-in")
        for nb in (size_arg(s) for s in a.sizes.split(",")):
            cols = _columns(coll, nb, comm, plain, w, MPI)
            m = interleaved(cols, a.iters, nb, w, MPI)
            if w.rank == 0:
                print(f"{nb:>10} {m['mpi'] * 1e6:>10.1f} " + " ".join(f"{m['mpi'] / m[k]:>7.2f}x"
                                                                     for k in ("single", "copy-in", "lib"))
                      + f"  {m['copy-in'] / m['single']:.2f}x", flush=True)
    plain.close()


if __name__ == "__main__":
    main()
