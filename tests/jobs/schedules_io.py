"""Inside an mpiexec job: every in/out Schedule (alltoall, gather, scatter, allgatherv) run by the Executor over MPI.

Each case builds the Schedule with topologies.build, runs it with
collective.executor.Executor over an MPIBackend, and compares every rank's
output bitwise with what NumPy computes from all ranks' inputs (each rank can
generate every rank's input from the case's seed). Inputs must come back
untouched. Options: --segment BYTES (the executor's largest message; tiny
values force many segments), --large (add a few MiB cases).
"""
from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import numpy as np
from harness import Cases

from collective.backends.mpi import MPIBackend, require_mpi
from collective.executor import Executor, ExecutorOptions
from collective.topologies import alltoall_displacements, build, offsets

DTYPES = ("float32", "float64", "int8", "float16", "complex64")


def rank_input(seed: int, r: int, n: int, dtype: np.dtype) -> np.ndarray:
    """Rank r's input of case ``seed``: small integers (exact in every dtype), the same on every rank that asks."""
    rng = np.random.default_rng([seed, r])
    x = rng.integers(-100, 100, size=n).astype(dtype)
    if dtype.kind == "c":
        x = x + 1j * rng.integers(-100, 100, size=n).astype(dtype)
    return x


def same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{what}: got {got.shape} {got.dtype}, expected {want.shape} {want.dtype}")
    if got.tobytes() != want.tobytes():
        bad = int(np.flatnonzero(got != want)[0]) if got.size else -1
        raise AssertionError(f"{what}: element {bad} is {got[bad]}, expected {want[bad]}")


class Job:
    def __init__(self, segment: int) -> None:
        MPI = require_mpi()
        self.backend = MPIBackend(MPI.COMM_WORLD)
        self.P, self.rank = self.backend.size, self.backend.rank
        self.ex = Executor(self.backend, ExecutorOptions(segment_bytes=segment))
        self.seq = 0

    def run(self, sched, dtype: np.dtype, buffers: dict) -> None:
        self.seq += 1
        self.ex.run(self.ex.plan(sched, dtype.itemsize), buffers, None, self.seq)

    def alltoall(self, alg: str, counts: list[list[int]], dtype: np.dtype, seed: int) -> None:
        P, r = self.P, self.rank
        total = sum(map(sum, counts))
        sched = build(alg, "alltoall", P, total, counts=counts)
        send, recv = alltoall_displacements(counts)
        xs = [rank_input(seed, i, send[i][P], dtype) for i in range(P)]
        x = xs[r].copy()
        out = np.full(recv[r][P], 77, dtype)
        self.run(sched, dtype, {"input": x, "output": out})
        want = np.concatenate([xs[i][send[i][r]:send[i][r + 1]] for i in range(P)]).astype(dtype)
        same(out, want, f"{alg} alltoall counts={counts if total < 200 else '...'}")
        same(x, xs[r], "input untouched")

    def gather(self, sizes: list[int], root: int, dtype: np.dtype, seed: int) -> None:
        P, r = self.P, self.rank
        sched = build("tree", "gather", P, sum(sizes), root, counts=sizes)
        xs = [rank_input(seed, i, sizes[i], dtype) for i in range(P)]
        x = xs[r].copy()
        out = np.full(sum(sizes), 77, dtype) if r == root else None
        self.run(sched, dtype, {"input": x, "output": out})
        if r == root:
            same(out, np.concatenate(xs).astype(dtype), f"gather sizes={sizes} root={root}")
        same(x, xs[r], "input untouched")

    def scatter(self, sizes: list[int], root: int, dtype: np.dtype, seed: int) -> None:
        P, r = self.P, self.rank
        sched = build("tree", "scatter", P, sum(sizes), root, counts=sizes)
        full = rank_input(seed, root, sum(sizes), dtype)
        x = full.copy() if r == root else None
        out = np.full(sizes[r], 77, dtype)
        self.run(sched, dtype, {"input": x, "output": out})
        b = offsets(sizes)
        same(out, full[b[r]:b[r + 1]], f"scatter sizes={sizes} root={root}")
        if r == root:
            same(x, full, "input untouched")

    def allgatherv(self, sizes: list[int], dtype: np.dtype, seed: int) -> None:
        P, r = self.P, self.rank
        sched = build("ring", "allgatherv", P, sum(sizes), counts=sizes)
        xs = [rank_input(seed, i, sizes[i], dtype) for i in range(P)]
        x = xs[r].copy()
        out = np.full(sum(sizes), 77, dtype)
        self.run(sched, dtype, {"input": x, "output": out})
        same(out, np.concatenate(xs).astype(dtype), f"allgatherv sizes={sizes}")
        same(x, xs[r], "input untouched")


def size_lists(P: int, rng: np.random.Generator, large: bool) -> list[list[int]]:
    """Per-rank sizes: all zero, one element in all, fewer than ranks, even, uneven with zeros, one big block."""
    out = [[0] * P, [1] + [0] * (P - 1), [int(i < P // 2) for i in range(P)], [5] * P,
           [int(v) for v in rng.integers(0, 9, size=P)], [0] * (P - 1) + [37]]
    if large:
        out.append([(1 << 18) + 3 * i for i in range(P)])
    return out


def matrices(P: int, rng: np.random.Generator, large: bool) -> list[list[list[int]]]:
    """alltoall counts: zero, one element, even, uneven with zeros, a row/column of zeros, one big row."""
    out = [[[0] * P for _ in range(P)], [[int(i == 0 and j == P - 1) for j in range(P)] for i in range(P)],
           [[3] * P for _ in range(P)], [[int(v) for v in row] for row in rng.integers(0, 6, size=(P, P))],
           [[0 if i == 1 or j == 0 else 2 for j in range(P)] for i in range(P)],
           [[50 * int(i == P // 2) + (i + j) % 2 for j in range(P)] for i in range(P)]]
    if large:
        out.append([[(1 << 16) + i + j for j in range(P)] for i in range(P)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segment", type=int, default=1 << 18)
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    a = ap.parse_args()
    job = Job(a.segment)
    P = job.P
    cases = Cases(SimpleNamespace(rank=job.rank, mpi_comm=job.backend.comm))
    rng = np.random.default_rng(P)  # the same on every rank: every rank builds the same cases
    sizes, mats = size_lists(P, rng, a.large), matrices(P, rng, a.large)
    seed = 0
    for name in a.dtypes.split(","):
        dt = np.dtype(name)
        big = [s for s in sizes if sum(s) > 1 << 16]
        for s in sizes:
            seed += 1
            if s in big and name not in ("float32", "int8"):
                continue  # a few MiB in two dtypes is enough; the small cases cover every dtype
            cases.run(f"allgatherv {name} {s[:8]}", lambda s=s, seed=seed, dt=dt: job.allgatherv(s, dt, seed))
            for root in sorted({0, P - 1, P // 2, 1 % P}):
                cases.run(f"gather {name} root={root}", lambda s=s, root=root, seed=seed, dt=dt: job.gather(s, root, dt, seed))
                cases.run(f"scatter {name} root={root}",
                          lambda s=s, root=root, seed=seed, dt=dt: job.scatter(s, root, dt, seed))
        for m in mats:
            seed += 1
            if sum(map(sum, m)) > 1 << 16 and name not in ("float32", "int8"):
                continue
            for alg in ("pairwise", "bruck"):
                cases.run(f"{alg} alltoall {name}", lambda alg=alg, m=m, seed=seed, dt=dt: job.alltoall(alg, m, dt, seed))
    # Every root, once, in one dtype.
    for root in range(P):
        seed += 1
        s = [int(v) for v in rng.integers(0, 4, size=P)]
        cases.run(f"gather every root {root}", lambda root=root, s=s, seed=seed: job.gather(s, root, np.dtype("float64"), seed))
        cases.run(f"scatter every root {root}",
                  lambda root=root, s=s, seed=seed: job.scatter(s, root, np.dtype("float64"), seed))
    # An MPI whose tag bound is the standard's least (32767) leaves 4096 segments a channel. Rank 1's block, in
    # 64-byte segments, takes more: every rank's plan then cuts bigger segments, also where its own channels stay
    # below that (rank 2's), since both ends of a channel must cut its transfers alike.
    if P >= 3:
        narrow = MPIBackend(require_mpi().COMM_WORLD)
        narrow.tag_ub = 32767
        tight = Executor(narrow, ExecutorOptions(segment_bytes=64))
        assert tight.counter_bits == 12, tight.counter_bits
        wide = [1, 4097 * 64 + 5, 3 * 64 + 7] + [2] * (P - 3)

        def narrow_tags(kind: str, root: int, dt: np.dtype) -> None:
            saved = job.ex
            job.ex = tight
            try:
                getattr(job, kind)(wide if root == 0 else wide[::-1], root, dt, 7)
            finally:
                job.ex = saved
        for kind in ("gather", "scatter"):
            for root in (0, P - 1):
                for name in ("int8", "float64"):
                    cases.run(f"{kind} past the tag space of one channel root={root} {name}",
                              lambda kind=kind, root=root, dt=np.dtype(name): narrow_tags(kind, root, dt))
    # Bad buffers are refused before anything is sent, on the rank that has them, naming buffer and rank.
    def refused(sched, buffers: dict, itemsize: int, words: tuple[str, ...]) -> None:
        try:
            job.ex.run(job.ex.plan(sched, itemsize), buffers, None, 1)
        except ValueError as exc:
            missing = [w for w in (*words, f"rank {job.rank}") if w not in str(exc)]
            if missing:
                raise AssertionError(f"message lacks {missing}: {exc}") from None
        else:
            raise AssertionError(f"accepted: {words}")

    a2a = build("pairwise", "alltoall", P, 2 * P * P)
    f32 = np.float32
    cases.run("bad size", lambda: refused(a2a, {"input": np.zeros(2 * P + 1, f32), "output": np.zeros(2 * P, f32)},
                                          4, ("input", str(2 * P))))
    cases.run("bad dtype", lambda: refused(a2a, {"input": np.zeros(2 * P), "output": np.zeros(2 * P)}, 4,
                                           ("float64",)))
    cases.run("temp given", lambda: refused(a2a, {"input": np.zeros(2 * P, f32), "output": np.zeros(2 * P, f32),
                                                  "temp": np.zeros(4, f32)}, 4, ("temp",)))
    g = build("tree", "gather", P, 3 * P, P - 1)
    if job.rank == P - 1:
        cases.run("gather root without output", lambda: refused(g, {"input": np.zeros(3, f32)}, 4, ("output",)))

    def work_mapping() -> None:  # a plan of the work buffer alone also takes {"work": array}
        sched = build("ring", "allgather", P, 3 * P)
        w = np.full(3 * P, -1.0)
        w[3 * job.rank:3 * job.rank + 3] = job.rank
        job.run(sched, w.dtype, {"work": w})
        same(w, np.repeat(np.arange(P, dtype=np.float64), 3), "allgather through a mapping")
    cases.run("work mapping", work_mapping)
    cases.finish()


if __name__ == "__main__":
    sys.exit(main())
