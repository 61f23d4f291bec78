"""Trainer cases under real MPI: no per-step allocation, errors that reach every rank, fp16 compression and its
fallback, launch order, layout mismatch.

Usage: mpiexec -n P python trainer_cases.py --tmp DIR     (P >= 2)
"""
from __future__ import annotations

import argparse
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
from harness import Cases

import collective as col
from collective.trainer import (
    SGD,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointError,
    DataParallel,
    GradBuckets,
    Parameter,
    ShardedLoader,
    fit,
    fp16_compress_wrapper,
    mlp,
)

ap = argparse.ArgumentParser()
ap.add_argument("--tmp", required=True)
args = ap.parse_args()

comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
tmp = Path(args.tmp)
rng = np.random.default_rng(0)
X = rng.standard_normal((1024, 64))
Y = (X[:, :4].sum(axis=1) > 0).astype(np.int64)


def make(sizes=(64, 512, 512, 10), **kw) -> tuple[DataParallel, SGD, ShardedLoader]:
    dp = DataParallel(mlp(list(sizes), seed=1), comm, seed=1, **kw)
    opt = SGD(dp.buckets, lr=0.01, momentum=0.9, weight_decay=1e-4)
    return dp, opt, ShardedLoader(X, Y, 16 * P, R, P, seed=2)


def addresses(dp: DataParallel, opt: SGD) -> list[int]:
    out = [p.grad.__array_interface__["data"][0] for p in dp.model.parameters()]
    out += [p.data.__array_interface__["data"][0] for p in dp.model.parameters()]
    out += [b.buffer.__array_interface__["data"][0] for b in dp.buckets]
    out += [s.__array_interface__["data"][0] for bufs in opt.state.values() for s in bufs]
    return out


def no_per_step_allocation() -> None:
    dp, opt, loader = make(bucket_mb=0.5)
    assert len(dp.buckets) >= 3, dp.buckets
    for s in range(3):
        dp.train_step(*loader.batch(s), s, opt)
    before = addresses(dp, opt)
    tracemalloc.start()
    try:
        peaks = []
        for s in range(3, 8):
            dp.forward_backward(*loader.batch(s), s)  # activations are allocated here; gradients are not
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for i in range(len(dp.buckets)):  # the bucket machinery: wait for each reduction, update
                dp.buckets.wait(i)
                opt.update(i)
            opt.end_step()
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    after = addresses(dp, opt)
    assert before == after, "a gradient, bucket or optimizer buffer was reallocated between steps"
    smallest = min(b.nbytes for b in dp.buckets)
    assert max(peaks) < min(64 << 10, smallest), (
        f"reducing and updating {dp.buckets.nbytes} bytes of buckets allocated up to {max(peaks)} bytes per step")
    if R == 0:
        print(f"no per-step allocation: {len(dp.buckets)} buckets, {dp.buckets.nbytes} bytes; per-step peak of the "
              f"bucket machinery (wait + update) {max(peaks)} bytes; buffer addresses unchanged", flush=True)


def write_error_reaches_every_rank() -> None:
    blocker = tmp / "not_a_dir"
    if R == 0:
        blocker.write_text("a file where the checkpoint directory should be")
    comm.barrier()
    dp, opt, loader = make(sizes=(64, 16, 10))
    ck = Checkpointer(blocker / "ckpt", comm, every=2)
    try:
        fit(dp, opt, loader, 4, checkpoint=ck, progress=False)
    except CheckpointError as exc:
        msg = str(exc)
        assert "writing failed" in msg and str(blocker) in msg, msg
        if R != 0:
            assert "rank 0" in msg, msg
    else:
        raise AssertionError("no CheckpointError on this rank")


def corrupt_checkpoint_detected() -> None:
    d = tmp / "corrupt"
    dp, opt, loader = make(sizes=(64, 16, 10))
    fit(dp, opt, loader, 4, checkpoint=Checkpointer(d, comm, every=2), progress=False)
    newest = d / "ckpt-00000004.npz"
    if R == 0:
        raw = bytearray(newest.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one flipped bit in the middle of the file
        newest.write_bytes(bytes(raw))
    comm.barrier()
    dp, opt, loader = make(sizes=(64, 16, 10))
    try:
        fit(dp, opt, loader, 6, checkpoint=Checkpointer(d, comm, every=2), resume=True, progress=False)
    except CheckpointCorruptError as exc:
        assert str(newest) in str(exc) and "SHA-256" in str(exc), str(exc)
        assert "ckpt-00000002.npz" in str(exc), f"the message should name the previous checkpoint: {exc}"
    else:
        raise AssertionError("a corrupted checkpoint was loaded")


def digest(dp: DataParallel) -> int:
    h = 0
    for b in dp.buckets:
        h = zlib.crc32(b.data.view(np.uint8), h)
    return h


def fp16_compression() -> None:
    dp, opt, loader = make(bucket_mb=0.5, hook=fp16_compress_wrapper())
    ref, ropt, _ = make(bucket_mb=0.5)
    losses = []
    for s in range(20):
        if s == 0:  # one step's gradients: compressed vs full precision
            dp.forward_backward(*loader.batch(s), s)
            ref.forward_backward(*loader.batch(s), s)
            dp.buckets.wait_all()
            ref.buckets.wait_all()
            for a, b in zip(dp.buckets, ref.buckets):
                err = float(np.abs(a.grad - b.grad).max() / max(np.abs(b.grad).max(), 1e-30))
                assert err < 1e-2, f"bucket {a.index}: fp16 gradient relative error {err}"
            for i in range(len(dp.buckets)):
                opt.update(i)
                ropt.update(i)
            opt.end_step()
            ropt.end_step()
            continue
        losses.append(dp.train_step(*loader.batch(s), s, opt).loss)
        every = comm.allgather(np.array([digest(dp)], np.int64))
        assert (every == every[0]).all(), f"fp16: ranks' parameters differ after step {s + 1}"
    assert losses[-1] < losses[0], losses
    assert sum(b.fallbacks for b in dp.buckets) == 0


def fp16_fallback_on_overflow() -> None:
    def buckets(hook=None) -> tuple[GradBuckets, list[Parameter]]:
        ps = [Parameter(np.zeros(1000, np.float32), f"p{i}") for i in range(3)]
        return GradBuckets(ps, comm, bucket_mb=0.002, first_bucket_mb=0.002, hook=hook), ps

    def run(gb: GradBuckets, ps: list[Parameter]) -> None:
        gb.begin()
        for i, p in enumerate(ps):
            p.grad[...] = (np.arange(1000) % 7 - 3 + R).astype(np.float32)
            if i == 1:
                p.grad[5] = 1e5 * (R + 1)  # |sum / P| < 65504 fails for this bucket -> inf in float16
        for p in reversed(ps):
            gb.mark_ready(None, [p])
        gb.finish()
        gb.wait_all()

    gb, ps = buckets(fp16_compress_wrapper())
    ref, rps = buckets()
    run(gb, ps)
    run(ref, rps)
    assert len(gb) == 3
    fb = [b.fallbacks for b in gb]
    assert fb == [0, 1, 0] or (P == 1), f"fallbacks per bucket {fb}, expected only the overflowing one"
    assert np.array_equal(ps[1].grad, rps[1].grad), "the fallback must equal the full-precision average bitwise"
    for i in (0, 2):
        assert np.allclose(ps[i].grad, rps[i].grad, rtol=1e-3, atol=1e-3)


def launch_order() -> None:
    ps = [Parameter(np.full(300, float(i), np.float64), f"p{i}") for i in range(4)]
    gb = GradBuckets(ps, comm, bucket_mb=0.002, first_bucket_mb=0.002)
    assert len(gb) == 4 and [b.params[0].name for b in gb] == ["p3", "p2", "p1", "p0"]
    gb.begin()
    for p in ps:
        p.grad[...] = R + 1
    launched = []
    gb.mark_ready(None, [ps[1]])  # bucket 2 is ready first, but must wait for buckets 0 and 1
    launched.append([b.future is not None for b in gb])
    gb.mark_ready(None, [ps[3]])
    launched.append([b.future is not None for b in gb])
    gb.mark_ready(None, [ps[2]])
    launched.append([b.future is not None for b in gb])
    gb.mark_ready(None, [ps[0]])
    gb.finish()
    gb.wait_all()
    assert launched == [[False] * 4, [True, False, False, False], [True, True, True, False]], launched
    want = sum(r + 1 for r in range(P)) / P
    for p in ps:
        assert np.all(p.grad == want), (p.name, p.grad[:3], want)


def layout_mismatch() -> None:
    sizes = [8, 16, 4] if R == 0 else [8, 17, 4]
    # Also with a collective (shared-memory) allocator: the check comes before any allocation.
    for alloc in (None, getattr(comm, "alloc", None)):
        try:
            DataParallel(mlp(sizes), comm, allocator=alloc)
        except ValueError as exc:
            assert "differ between rank 0" in str(exc), str(exc)
        else:
            raise AssertionError("different models on different ranks were not detected")


def shared_buckets() -> None:
    """Buckets in the node's shared window (comm.alloc) train like plain ones."""
    if not hasattr(comm, "alloc"):
        return
    dp, opt, loader = make(bucket_mb=0.5, allocator=comm.alloc)
    ref, ropt, _ = make(bucket_mb=0.5)
    for s in range(5):
        a = dp.train_step(*loader.batch(s), s, opt).loss
        b = ref.train_step(*loader.batch(s), s, ropt).loss
        assert abs(a - b) <= 1e-5 * abs(b), (s, a, b)
    every = comm.allgather(np.array([digest(dp)], np.int64))
    assert (every == every[0]).all(), "shared buckets: ranks' parameters differ"


cases.run("no per-step allocation", no_per_step_allocation)
cases.run("checkpoint write error reaches every rank", write_error_reaches_every_rank)
cases.run("corrupted checkpoint detected on resume", corrupt_checkpoint_detected)
cases.run("fp16 compression", fp16_compression)
cases.run("fp16 fallback on overflow", fp16_fallback_on_overflow)
cases.run("launch in bucket order", launch_order)
cases.run("layout mismatch", layout_mismatch)
cases.run("buckets in comm.alloc memory", shared_buckets)
cases.finish()
