"""dist.all_reduce on the backend "collective" vs on gloo (and a bare mpi4py Allreduce), torch CPU tensors, interleaved.

Run (it launches its own mpiexec job when not started under one)::

    python bench/bench_torch_backend.py                  # P = 2, float32, one element, then 4 KiB .. 64 MiB
    python bench/bench_torch_backend.py --procs 4 --iters 5

Columns: ``collective`` (``dist.all_reduce(t)`` on the default group, backend "collective"), ``gloo``
(``dist.all_reduce(t, group=g)`` on a gloo group over the same ranks, built from the same store) and ``mpi4py``
(``MPI.COMM_WORLD.Allreduce(IN_PLACE, ...)`` on the tensor's memory: the floor any Python layer stands on).
busbw = bytes / time x 2(P-1)/P, as nccl-tests. Each iteration runs every column once, in an order rotated
by one per iteration, after a barrier; a time is the slowest rank's; the figure is the median over iterations.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [4, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--iters", type=int, default=7, help="interleaved iterations per size (median reported)")
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    return p.parse_args(argv)


def _reps(nbytes: int) -> int:
    """Calls per timed block: enough that small messages are not timer noise, few for large ones."""
    return max(1, min(200, (8 << 20) // max(nbytes, 1)))


def _bench(a: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import collective.torch

    torch.set_num_threads(1)
    dist.init_process_group("collective")
    comm = collective.get_default()
    P, R = comm.size, comm.rank
    gloo = dist.new_group(list(range(P)), backend="gloo")
    world = MPI.COMM_WORLD
    rows = []
    for nbytes in [s for s in SIZES if s <= a.max_bytes]:
        t = torch.zeros(nbytes // 4)
        arr = t.numpy()
        n = _reps(nbytes)

        def ours(t: torch.Tensor = t, n: int = n) -> None:
            for _ in range(n):
                dist.all_reduce(t)

        def glo(t: torch.Tensor = t, n: int = n) -> None:
            for _ in range(n):
                dist.all_reduce(t, group=gloo)

        def bare(arr: np.ndarray = arr, n: int = n) -> None:
            for _ in range(n):
                world.Allreduce(MPI.IN_PLACE, arr)

        cols = {"collective": ours, "gloo": glo, "mpi4py": bare}
        names = list(cols)
        for f in cols.values():  # warm-up: first-call setup out of the figures
            f()
        times: dict[str, list[float]] = {k: [] for k in names}
        for it in range(a.iters):
            order = names[it % len(names):] + names[: it % len(names)]
            for k in order:
                t.zero_()  # sums of zeros stay finite over any number of calls
                world.Barrier()
                t0 = time.perf_counter()
                cols[k]()
                dt = np.array([(time.perf_counter() - t0) / n])
                world.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
                times[k].append(float(dt[0]))
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append((nbytes, med))
    if R == 0:
        f = 2 * (P - 1) / P
        print(f"dist.all_reduce, float32 torch CPU tensors, in place, P={P}; busbw GB/s (time us); "
              f"median of {a.iters} interleaved iterations")
        print(f"{'bytes':>10} {'collective':>20} {'gloo':>20} {'mpi4py':>20} {'coll/gloo':>10} {'coll/mpi4py time':>17}")
        for nbytes, med in rows:
            cells = [f"{f * nbytes / med[k] / 1e9:8.2f} ({med[k] * 1e6:8.1f})" for k in ("collective", "gloo", "mpi4py")]
            print(f"{nbytes:>10} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} "
                  f"{med['gloo'] / med['collective']:>9.2f}x {med['collective'] / med['mpi4py']:>16.2f}x")
        sys.stdout.flush()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    a = _args(argv)
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        _bench(a)
        return 0
    from collective.run import mpiexec_command

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    cmd, env = mpiexec_command(["-n", str(a.procs), "--oversubscribe", sys.executable, str(Path(__file__).resolve()),
                                *argv], env)
    return subprocess.call(cmd, env=env, cwd=str(ROOT))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
