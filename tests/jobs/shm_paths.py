"""The shm quick paths written out for speed give the same bits as the plain paths they stand for, on the same data.

``ShmArena.quick_allreduce`` against ``ShmArena.allreduce`` (the one-phase copy-in path), and
``SharedArrays.quick_allreduce`` over ``SharedArrays.plan`` against ``SharedArrays.allreduce`` (the window path),
with data whose sum depends on the order of the additions (random floats of mixed magnitudes), with and without
avg's division; each pair compared bit for bit on every rank, and across ranks.
"""
from __future__ import annotations

import functools
import zlib

import numpy as np

import collective as col
from collective.ops import average_in_place
from harness import Cases

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
mpi = comm.mpi_comm
arena = comm.node_arena()
seq = [10 ** 6]  # any number, the same on every rank
# The paths are called here directly, outside the communicator's op order, so each call is fenced by MPI's own
# barrier on both sides: no rank may post the next fingerprint while another still reads this one.
fence = mpi.Barrier


def data(n: int, dtype: type, salt: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * R + salt)
    scale = 10.0 ** rng.integers(-4, 5, n)
    return (rng.standard_normal(n) * scale).astype(dtype)


def same_everywhere(a: np.ndarray, what: str) -> None:
    mine = np.array([zlib.crc32(a.tobytes())], np.int64)
    every = np.empty(P, np.int64)
    mpi.Allgather(mine, every)
    assert (every == every[0]).all(), f"{what}: ranks' results differ"


def same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.tobytes() == b.tobytes(), f"rank {R}: {what}: the quick path's bits differ from the plain path's"


def one_phase(dtype: type, n: int, avg: bool) -> None:
    x = data(n, dtype, n)
    finish = functools.partial(average_in_place, n=P) if avg else None
    plain = np.empty_like(x)
    fence()
    arena.allreduce(x, plain, np.add)  # first=None: its own phases
    fence()
    if finish is not None:
        finish(plain)
    quick = np.empty_like(x)
    seq[0] += 1
    ok = arena.quick_allreduce(12345, seq[0], x, quick, np.add, finish, arena.quick_regions(x.dtype, n))
    fence()
    assert ok
    what = f"one-phase {np.dtype(dtype)} n={n}{' avg' if avg else ''}"
    same_bits(plain, quick, what)
    same_everywhere(quick, what)
    inplace = x.copy()  # in place, the input given as its bytes (as Sequencer.bind_allreduce's calls give it)
    seq[0] += 1
    ok = arena.quick_allreduce(12345, seq[0], inplace.view(np.uint8).data, inplace, np.add, finish,
                               arena.quick_regions(x.dtype, n))
    fence()
    assert ok
    same_bits(plain, inplace, what + " in place from bytes")


def window(dtype: type, n: int, avg: bool) -> None:
    g = comm.alloc(n, dtype)
    out = comm.alloc(n, dtype)
    shared = comm.sequencer.engine.shared
    views, out_views = comm.alloc_views(g), comm.alloc_views(out)
    finish = functools.partial(average_in_place, n=P) if avg else None
    g[:] = data(n, dtype, n + 1)
    fence()
    shared.allreduce(views, out_views, np.add, finish)
    fence()
    plain = out.copy()
    out[:] = 0
    comm.barrier()  # fences the node's memory: every rank's zeros land before anyone reduces into out
    fence()
    seq[0] += 1
    ok = shared.quick_allreduce(777, seq[0], shared.plan(views, out_views), np.add, finish)
    fence()
    assert ok
    what = f"window {np.dtype(dtype)} n={n}{' avg' if avg else ''}"
    same_bits(plain, out, what)
    same_everywhere(out, what)


for dtype in (np.float32, np.float64, np.float16):
    for n in (1, 7, 1000, 60_000):
        for avg in (False, True):
            cases.run(f"one-phase {n} {avg}", lambda: one_phase(dtype, n, avg))
for dtype in (np.float32, np.float64):
    for n in (70_000, 600_000):  # the window path's sizes: one piece and several
        for avg in (False, True):
            cases.run(f"window {n} {avg}", lambda: window(dtype, n, avg))
cases.finish()
