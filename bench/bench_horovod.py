"""collective.horovod's per-op latency: hvd.allreduce and its engine (eager vs fixed cycle) vs comm.allreduce, interleaved.

Run (it launches its own mpiexec job when not started under one)::

    python bench/bench_horovod.py                    # P = 2, 4 B .. 1 MiB
    python bench/bench_horovod.py --procs 4 --iters 5

Columns, each a loop of blocking calls on float32 data:

* ``comm``: ``comm.allreduce(x, out=y)`` on a Communicator of its own (the floor the engine stands on);
* ``engine cycle``: an Engine with ``eager=False`` (an op that a rank announced before the others waits for
  that rank's next cycle, up to 1 ms);
* ``engine eager``: an Engine with ``eager=True`` (such a rank goes straight into the next exchange);
* ``hvd``: ``hvd.allreduce(t, op=hvd.Sum)`` (the eager engine plus the torch conversions).
* ``cycle, rank 0 late`` / ``eager, rank 0 late``: the two engines again, rank 0 waiting ``--late`` us
  before each call in ``time.sleep`` (busy without holding the GIL, like torch's kernels), so the other ranks
  have announced the op when rank 0 does; the time includes that sleep.

Each engine has a communicator of its own. Each iteration runs every column once, in an order rotated by one
per iteration, after a barrier; a time is the slowest rank's; the figure is the median over iterations.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [4, 4 << 10, 64 << 10, 1 << 20]


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--iters", type=int, default=7, help="interleaved iterations per size (median reported)")
    p.add_argument("--late", type=float, default=300.0, help="us rank 0 sleeps before each call in the 'late' columns")
    return p.parse_args(argv)


def _reps(nbytes: int) -> int:
    """Calls per timed block: enough that small messages are not timer noise, few for large ones."""
    return max(5, min(200, (16 << 20) // max(nbytes, 1)))


def _bench(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    import collective
    import collective.horovod.torch as hvd
    from collective.horovod.engine import Engine

    torch.set_num_threads(1)
    hvd.init()
    comm = collective.Communicator()
    P, R = comm.size, comm.rank
    cycle = Engine(collective.Communicator(), eager=False)
    eager = Engine(collective.Communicator(), eager=True)
    rows = []
    for nbytes in SIZES:
        n = _reps(nbytes)
        x = np.ones(max(1, nbytes // 4), np.float32)
        y = np.empty_like(x)
        t = torch.ones(max(1, nbytes // 4))

        def on_comm(x: np.ndarray = x, y: np.ndarray = y, n: int = n) -> None:
            for _ in range(n):
                comm.allreduce(x, out=y)

        def on_engine(eng: Engine, late: float = 0.0, x: np.ndarray = x, n: int = n) -> None:
            for _ in range(n):
                if late and R == 0:  # rank 0 is busy a little (without the GIL, as torch's kernels run) first
                    time.sleep(late)
                eng.submit("allreduce", "bench", [x], op="sum").wait()

        def on_hvd(t: torch.Tensor = t, n: int = n) -> None:
            for _ in range(n):
                hvd.allreduce(t, op=hvd.Sum, name="bench")

        cols = {"comm": on_comm, "engine cycle": lambda: on_engine(cycle), "engine eager": lambda: on_engine(eager),
                "hvd": on_hvd, "cycle, rank 0 late": lambda: on_engine(cycle, a.late * 1e-6),
                "eager, rank 0 late": lambda: on_engine(eager, a.late * 1e-6)}
        names = list(cols)
        for fn in cols.values():  # warm up: buffers, templates, the engines' hot cycle
            fn()
        times: dict[str, list[float]] = {k: [] for k in names}
        for it in range(a.iters):
            order = names[it % len(names):] + names[:it % len(names)]
            for k in order:
                comm.barrier()
                t0 = time.perf_counter()
                cols[k]()
                dt = np.array([(time.perf_counter() - t0) / n])
                times[k].append(float(np.asarray(comm.allreduce(dt, op="max"))[0]))
        rows.append((nbytes, {k: float(np.median(v)) for k, v in times.items()}))
    cycle.shutdown()
    eager.shutdown()
    if R == 0:
        head = ["bytes"] + [f"{k} us" for k in rows[0][1]]
        print(f"P={P}, median of {a.iters} interleaved iterations, slowest rank")
        print(" | ".join(head))
        for nbytes, med in rows:
            print(" | ".join([str(nbytes)] + [f"{v * 1e6:.0f}" for v in med.values()]))
    hvd.shutdown()


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
