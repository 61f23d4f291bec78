"""torch.distributed on the backend "collective" vs on gloo: dist.all_reduce, and torch's own DDP and FSDP2 steps.

Run (it launches its own mpiexec job when not started under one)::

    python bench/bench_torch_backend.py                  # P = 2: all_reduce 4 B .. 64 MiB, then the training steps
    python bench/bench_torch_backend.py --procs 4 --part allreduce --iters 5
    python bench/bench_torch_backend.py --part train --rounds 3 --steps 2
    python bench/bench_torch_backend.py --part latency --iters 11
    python bench/bench_torch_backend.py --part ops --ops-bytes 64K,1M --iters 9

Part ``allreduce``, columns: ``collective`` (``dist.all_reduce(t)`` on the default group, backend
"collective"), ``gloo`` (``dist.all_reduce(t, group=g)`` on a gloo group over the same ranks, built from the
same store), ``mpi4py`` (``MPI.COMM_WORLD.Allreduce(IN_PLACE, ...)`` on the tensor's memory: the floor any
Python layer stands on) and ``copy`` (every rank copies the tensor's bytes into another buffer at the same
time, ``np.copyto``: an allreduce reads at least its input and writes its whole output, so at sizes where
memory bandwidth is the limit no backend takes less than this). busbw = bytes / time x 2(P-1)/P, as
nccl-tests.

Part ``latency`` (4 KiB by default, ``--latency-bytes``): where the time of one small ``dist.all_reduce`` goes,
columns interleaved as above: ``mpi4py`` (bare ``Allreduce``), ``comm-numpy`` and ``comm-tensor`` (the group's
communicator called on a NumPy array and on the tensor), ``group`` (the group's ``allreduce`` method called
directly, synchronous), ``group-async`` (the same with ``asyncOp`` and ``wait()``), ``dist`` (``dist.all_reduce``
on our group) and ``dist-floor`` (``dist.all_reduce`` on a group of a do-nothing ProcessGroup subclass
registered the same way: torch's own Python around a call, which no backend can save).

Part ``ops`` (sizes ``--ops-bytes``, each rank's input): every other ``dist.*`` call with a gloo twin, columns
interleaved as above: ``collective``, ``gloo`` and ``mpi4py`` (MPI's own call on the tensors' memory): broadcast,
reduce, all_gather_into_tensor, all_gather (a list of outputs), reduce_scatter_tensor, all_to_all_single (equal
blocks), gather and scatter (root 0), barrier.

Part ``train``: one step (zero_grad, forward, cross-entropy, backward, SGD step) of an MLP, per-rank batch 64,
one thread per rank: ``local`` (every rank trains alone at the same time: the ideal), ``ddp-collective`` and
``ddp-gloo`` (torch's ``DistributedDataParallel`` on the default group or on the gloo group), and for the
40 MB MLP ``fsdp-collective`` and ``fsdp-gloo`` (FSDP2 ``fully_shard`` per layer and on the whole, on a
DeviceMesh over either group), and ``ddp-floor`` and ``fsdp-floor``: the same on a group that communicates
nothing (see _register_floor), i.e. what DDP's and FSDP2's own work costs, the fastest any backend can be.
Models: 784-1024-1024-10 (7.5 MB of gradients) and 784-2048-2048-2048-10
(40 MB).

Part ``train`` also prints each column's CPU time per rank and step (every thread of the rank).

Method: every iteration (round) runs each column once (a block of steps), in an order rotated by one per
iteration, after a barrier; a time is the slowest rank's; the figure is the median over iterations. Part
``train`` first runs ``--train-warmup`` untimed steps of each column: a training job's steady state, in which
DDP's buckets of 16 MiB and more, passed step after step, are on huge pages.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = [4, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
SHAPES = {"784-1024-1024-10": (784, 1024, 1024, 10), "784-2048-2048-2048-10": (784, 2048, 2048, 2048, 10)}
#: FSDP2 runs on the larger model only (sharding pays where there is much to shard).
FSDP_SHAPES = ("784-2048-2048-2048-10",)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--iters", type=int, default=7, help="interleaved iterations per size (median reported)")
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--part", default="allreduce,train",
                   help="comma list of allreduce, latency, ops, train (default allreduce,train)")
    p.add_argument("--latency-bytes", type=int, default=4096, help="message size of part latency")
    p.add_argument("--ops-bytes", default="64K,1M", help="part ops: comma list of each rank's input bytes")
    p.add_argument("--warmup", type=int, default=20,
                   help="allreduce: calls per column before timing (first-call setup, plans, and huge pages for "
                        "tensors passed again and again, COLLECTIVE_SHM_HUGE_PAGES, out of the figures)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of MLP shapes (default both)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds per training column (median reported)")
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--train-warmup", type=int, default=20,
                   help="train: untimed steps per column first (first-call setup, DDP's buckets, and huge pages for "
                        "the buckets a training job passes again and again, COLLECTIVE_SHM_HUGE_PAGES: its steady "
                        "state)")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    return p.parse_args(argv)


def _reps(nbytes: int) -> int:
    """Calls per timed block: enough that small messages are not timer noise, few for large ones."""
    return max(1, min(200, (8 << 20) // max(nbytes, 1)))


def _bench(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import collective.torch  # noqa: F401  (registers the backend)

    torch.set_num_threads(1)
    _register_floor()
    dist.init_process_group("collective")
    gloo = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    world = MPI.COMM_WORLD
    if "allreduce" in a.part:
        _allreduce(a, gloo, world)
    if "latency" in a.part:
        _latency(a, world)
    if "ops" in a.part:
        _ops(a, gloo, world)
    if "train" in a.part:
        _train(a, gloo, world)
    dist.destroy_process_group()


def _allreduce(a: argparse.Namespace, gloo: object, world: object) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    P, R = dist.get_world_size(), dist.get_rank()
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

        def copy(arr: np.ndarray = arr, dst: np.ndarray = np.empty_like(arr), n: int = n) -> None:
            for _ in range(n):
                np.copyto(dst, arr)

        cols = {"collective": ours, "gloo": glo, "mpi4py": bare, "copy": copy}
        times = _interleaved(cols, a.iters, n, t.zero_, world, a.warmup)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append((nbytes, med))
    if R == 0:
        f = 2 * (P - 1) / P
        print(f"dist.all_reduce, float32 torch CPU tensors, in place, P={P}; busbw GB/s (time us); "
              f"median of {a.iters} interleaved iterations")
        print(f"{'bytes':>10} {'collective':>20} {'gloo':>20} {'mpi4py':>20} {'copy (us)':>10} {'coll/gloo':>10} "
              f"{'coll/mpi4py time':>17} {'coll/copy':>10} {'gloo/copy':>10}")
        for nbytes, med in rows:
            cells = [f"{f * nbytes / med[k] / 1e9:8.2f} ({med[k] * 1e6:8.1f})"
                     for k in ("collective", "gloo", "mpi4py")]
            print(f"{nbytes:>10} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} {med['copy'] * 1e6:>10.1f} "
                  f"{med['gloo'] / med['collective']:>9.2f}x {med['collective'] / med['mpi4py']:>16.2f}x "
                  f"{med['collective'] / med['copy']:>9.2f}x {med['gloo'] / med['copy']:>9.2f}x")
        sys.stdout.flush()


def _ops(a: argparse.Namespace, gloo: object, world: Any) -> None:
    """Part ``ops``: each dist.* call on "collective", on gloo and as MPI's own call, interleaved (see the module
    docstring)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    P, R = dist.get_world_size(), dist.get_rank()
    for nbytes in (_size(s) for s in a.ops_bytes.split(",")):
        n = max(P, nbytes // 4 // P * P)
        t, o, big, part = torch.ones(n), torch.empty(n), torch.empty(n * P), torch.empty(n // P)
        outs = [torch.empty(n) for _ in range(P)]
        ta, oa, ba, pa = t.numpy(), o.numpy(), big.numpy(), part.numpy()
        root = R == 0
        calls: dict[str, tuple[Callable[[Any], object], Callable[[], object]]] = {
            "broadcast": (lambda g: dist.broadcast(t, 0, group=g), lambda: world.Bcast(ta, 0)),
            "reduce": (lambda g: dist.reduce(t, 0, group=g),
                       lambda: world.Reduce(MPI.IN_PLACE if root else ta, ta if root else None, root=0)),
            "all_gather_into_tensor": (lambda g: dist.all_gather_into_tensor(big, t, group=g),
                                       lambda: world.Allgather(ta, ba)),
            "all_gather": (lambda g: dist.all_gather(outs, t, group=g), lambda: world.Allgather(ta, ba)),
            "reduce_scatter_tensor": (lambda g: dist.reduce_scatter_tensor(part, t, group=g),
                                      lambda: world.Reduce_scatter_block(ta, pa)),
            "all_to_all_single": (lambda g: dist.all_to_all_single(o, t, group=g), lambda: world.Alltoall(ta, oa)),
            "gather": (lambda g: dist.gather(t, outs if root else None, 0, group=g),
                       lambda: world.Gather(ta, ba if root else None, 0)),
            "scatter": (lambda g: dist.scatter(o, outs if root else None, 0, group=g),
                        lambda: world.Scatter(ba if root else None, oa, 0)),
            "barrier": (lambda g: dist.barrier(group=g), world.Barrier),
        }
        reps = _reps(nbytes)
        if R == 0:
            print(f"dist.* calls, float32 torch CPU tensors of {nbytes} bytes a rank, P={P}; us per call, median of "
                  f"{a.iters} interleaved iterations")
            print(f"{'call':>24} {'collective':>11} {'gloo':>11} {'mpi4py':>11} {'gloo/coll':>10} {'coll/mpi4py':>12}")
        for name, (call, bare) in calls.items():
            def block(fn: Callable[[], object], reps: int = reps) -> None:
                for _ in range(reps):
                    fn()
            cols = {"collective": lambda: block(lambda: call(None)), "gloo": lambda: block(lambda: call(gloo)),
                    "mpi4py": lambda: block(bare)}
            times = _interleaved(cols, a.iters, reps, lambda: t.fill_(1.0), world, a.warmup)
            med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
            if R == 0:
                print(f"{name:>24} {med['collective']:11.1f} {med['gloo']:11.1f} {med['mpi4py']:11.1f} "
                      f"{med['gloo'] / med['collective']:9.2f}x {med['collective'] / med['mpi4py']:11.2f}x",
                      flush=True)


def _size(text: str) -> int:
    """Bytes from ``64K``, ``1M`` or a plain number."""
    t = text.strip().upper().rstrip("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


def _interleaved(cols: dict[str, Callable[[], object]], iters: int, n: int, reset: Callable[[], object],
                 world: Any, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each column (``n`` calls a block), the columns in a rotating order each iteration.

    Every column first makes at least ``warmup`` calls (the steady state of a
    job that passes the same tensor every step). Every block starts after
    ``reset`` (sums of zeros stay finite over any number of calls) and a
    barrier; a block's time is the slowest rank's.
    """
    import numpy as np
    from mpi4py import MPI

    names = list(cols)
    for f in cols.values():
        for _ in range(max(1, -(-warmup // n))):
            f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for it in range(iters):
        for k in names[it % len(names):] + names[: it % len(names)]:
            reset()
            world.Barrier()
            t0 = time.perf_counter()
            cols[k]()
            dt = np.array([(time.perf_counter() - t0) / n])
            world.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
            times[k].append(float(dt[0]))
    return times


def _register_floor() -> None:
    """Register backend "nothing": a ProcessGroup that communicates nothing (the framework's own cost).

    Its calls leave every rank with what a one-rank group would: all_reduce and broadcast touch nothing, an
    all-gather copies the input into every slot, a reduce-scatter copies this rank's block. Every Work it
    returns is complete.
    """
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import _create_work_from_future  # type: ignore[attr-defined]

    def done(value: object) -> object:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(value)
        return _create_work_from_future(fut)

    class Nothing(dist.ProcessGroup):
        def __init__(self, rank: int, size: int) -> None:
            super().__init__(rank, size)  # type: ignore[call-arg]
            self._done = done([])
            self._name = self._desc = ""

        def getBackendName(self) -> str:
            return "nothing"

        # DeviceMesh reads the group's name, which torch sets through these.
        def _set_group_name(self, name: str) -> None:
            self._name = name

        @property
        def group_name(self) -> str:  # type: ignore[override]
            return self._name

        def _set_group_desc(self, desc: str) -> None:
            self._desc = desc

        @property
        def group_desc(self) -> str:
            return self._desc

        def allreduce(self, tensors: list, opts: object = None) -> object:  # type: ignore[override]
            return done(tensors)

        def broadcast(self, tensors: list, opts: object = None) -> object:  # type: ignore[override]
            return done(tensors)

        def barrier(self, opts: object = None) -> object:
            return self._done

        def allgather(self, outputs: list, inputs: list, opts: object = None) -> object:  # type: ignore[override]
            for o in outputs[0]:
                o.copy_(inputs[0].reshape(o.shape))
            return done(outputs)

        def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: object = None) -> object:
            for o in output.reshape(self.size(), -1):
                o.copy_(input.reshape(-1))
            return done([output])

        def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: object = None) -> object:
            output.reshape(-1).copy_(input.reshape(self.size(), -1)[self.rank()])
            return done([output])

    dist.Backend.register_backend("nothing", lambda o, _: Nothing(o.group_rank, o.group_size), extended_api=True,
                                  devices=["cpu"])


def _latency(a: argparse.Namespace, world: object) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    P, R = dist.get_world_size(), dist.get_rank()
    floor = dist.new_group(list(range(P)), backend="nothing")
    pg = dist.group.WORLD
    comm = pg.communicator  # type: ignore[union-attr]
    t = torch.zeros(a.latency_bytes // 4)
    arr = np.zeros(t.numel(), np.float32)
    sync, asyn = dist.AllreduceOptions(), dist.AllreduceOptions()
    sync.asyncOp, asyn.asyncOp = False, True
    n = 2000
    one = [t]

    cols = {
        "mpi4py": lambda: [world.Allreduce(MPI.IN_PLACE, arr) for _ in range(n)],
        "comm-numpy": lambda: [comm.allreduce(arr, out=arr) for _ in range(n)],
        "comm-tensor": lambda: [comm.allreduce(t, out=t) for _ in range(n)],
        "group": lambda: [pg.allreduce(one, sync) for _ in range(n)],
        "group-async": lambda: [pg.allreduce(one, asyn).wait() for _ in range(n)],
        "dist": lambda: [dist.all_reduce(t) for _ in range(n)],
        "dist-floor": lambda: [dist.all_reduce(t, group=floor) for _ in range(n)],
    }
    names = list(cols)

    def reset() -> None:
        t.zero_()
        arr[:] = 0

    times = _interleaved(cols, a.iters, n, reset, world)
    if R == 0:
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"one all_reduce of {a.latency_bytes} bytes (float32), P={P}: us per call, median of {a.iters} "
              f"interleaved blocks of {n} calls")
        for k in names:
            print(f"  {k:12} {med[k] * 1e6:8.2f}  {med[k] / med['mpi4py']:5.2f}x mpi4py")
        sys.stdout.flush()


def _train(a: argparse.Namespace, gloo: object, world: object) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    floor = dist.new_group(list(range(dist.get_world_size())), backend="nothing")
    meshes = {"collective": init_device_mesh("cpu", (dist.get_world_size(),)),
              "gloo": DeviceMesh.from_group(gloo, "cpu"), "floor": DeviceMesh.from_group(floor, "cpu")}
    for name in a.shapes.split(","):
        _train_model(a, name, gloo, floor, meshes, world)


def _mlp(sizes: tuple[int, ...]) -> object:
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, o in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _sharded(sizes: tuple[int, ...], mesh: object) -> object:
    """The MLP under FSDP2: ``fully_shard`` on each linear layer, then on the whole."""
    import torch
    from torch.distributed.fsdp import fully_shard

    m = _mlp(sizes)
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def _train_model(a: argparse.Namespace, name: str, gloo: object, floor: object, meshes: dict,
                 world: object) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel as DDP

    P, R = dist.get_world_size(), dist.get_rank()
    sizes = SHAPES[name]
    models = {"local": _mlp(sizes), "ddp-collective": DDP(_mlp(sizes)),
              "ddp-gloo": DDP(_mlp(sizes), process_group=gloo), "ddp-floor": DDP(_mlp(sizes), process_group=floor)}
    if name in FSDP_SHAPES:
        models["fsdp-collective"] = _sharded(sizes, meshes["collective"])
        models["fsdp-gloo"] = _sharded(sizes, meshes["gloo"])
        models["fsdp-floor"] = _sharded(sizes, meshes["floor"])
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    g = torch.Generator().manual_seed(1 + R)
    x = torch.randn(a.batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (a.batch,), generator=g)
    loss_fn = torch.nn.functional.cross_entropy

    def step(k: str) -> None:
        m, o = models[k], opts[k]
        o.zero_grad()
        loss_fn(m(x), y).backward()
        o.step()

    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for it in range(a.rounds + 1):  # round 0 warms up (--train-warmup steps) and is not counted
        order = names[it % len(names):] + names[:it % len(names)]
        for k in order:
            world.Barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps if it else a.train_warmup):
                step(k)
            dt = np.array([(time.perf_counter() - t0) / a.steps])
            dc = np.array([(time.process_time() - c0) / a.steps])
            world.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
            world.Allreduce(MPI.IN_PLACE, dc, op=MPI.SUM)
            if it >= 1:
                times[k].append(float(dt[0]))
                cpu[k].append(float(dc[0]) / P)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    cmed = {k: float(np.median(v)) * 1e3 for k, v in cpu.items()}
    if R == 0:
        grad_mb = sum(p.numel() * 4 for p in models["local"].parameters()) / 1e6
        print(f"MLP {name} ({grad_mb:.1f} MB of gradients), P={P}, per-rank batch {a.batch}, one thread per "
              f"rank; step ms, median of {a.rounds} interleaved rounds of {a.steps} steps")
        print("  " + "  ".join(f"{k} {v:.1f}" for k, v in med.items()))
        ratios = [f"ddp gloo/collective {med['ddp-gloo'] / med['ddp-collective']:.2f}x",
                  f"ddp-collective/local {med['ddp-collective'] / med['local']:.2f}x",
                  f"ddp-floor/local {med['ddp-floor'] / med['local']:.2f}x",
                  f"ddp gloo/floor {med['ddp-gloo'] / med['ddp-floor']:.2f}x"]
        if "fsdp-collective" in med:
            ratios += [f"fsdp gloo/collective {med['fsdp-gloo'] / med['fsdp-collective']:.2f}x",
                       f"fsdp gloo/floor {med['fsdp-gloo'] / med['fsdp-floor']:.2f}x"]
        print("  " + ", ".join(ratios))
        # CPU time of a rank's every thread: on a machine shared with other jobs it moves far less than the
        # wall time, and with one core per rank a step cannot take less wall time than it.
        print("  CPU ms per rank and step: " + "  ".join(f"{k} {v:.1f}" for k, v in cmed.items()))
        sys.stdout.flush()


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
