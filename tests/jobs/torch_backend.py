"""torch.distributed on the backend "collective" under mpiexec: every dist.* call with exact answers, ops, dtypes,
async, a group's timeout= (gloo's semantics), DDP and FSDP2 against single-process references, DeviceMesh/DTensor,
and cross-rank mismatches.

Usage: python torch_backend.py [--only calls,ddp,fsdp,mismatch]
"""
from __future__ import annotations

import datetime
import gc
import os
import re
import sys
import time
import warnings
import weakref

import torch
import torch.distributed as dist
from harness import Cases

import collective as col
import collective.torch as ctorch

ONLY = set(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else None
torch.set_num_threads(1)
RO = dist.ReduceOp

# ---- init: a rank that disagrees with MPI is refused; then the plain call works with no MASTER_ADDR
assert "MASTER_ADDR" not in os.environ, "this job checks the launch without torch's rendezvous variables"
comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
try:
    dist.init_process_group("collective", init_method="collective://", rank=(R + 1) % P if P > 1 else 5,
                            world_size=P)
    bad_init = "init_process_group accepted a rank that disagrees with MPI"
except col.CollectiveValueError as exc:
    bad_init = None if "MPI says rank" in str(exc) else f"unclear message: {exc}"
dist.init_process_group("collective", timeout=datetime.timedelta(seconds=60))


def run(group: str, name: str, fn: object) -> None:
    if ONLY is None or group in ONLY:
        cases.run(name, fn)  # type: ignore[arg-type]


def case_init() -> None:
    assert bad_init is None, bad_init
    assert dist.get_rank() == R and dist.get_world_size() == P
    assert dist.get_backend() == "collective"
    assert isinstance(dist.group.WORLD, ctorch.CollectiveProcessGroup)


run("calls", "init", case_init)

# ------------------------------------------------------------------ values
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
COMPLEX = (torch.complex64, torch.complex128)


def value(r: int, dtype: torch.dtype, n: int = 7, op: object = None) -> torch.Tensor:
    """Rank r's input: small integers, exact in every dtype and under every op used here."""
    base = (torch.arange(n, dtype=torch.int64) * 3 + r * 5) % 7 + 1
    if dtype is torch.bool:
        return ((base + r) % 3 == 0)
    if op == RO.PRODUCT:
        base = base % 2 + 1
    if dtype in COMPLEX:
        return (base + 1j * (base % 3)).to(dtype)
    return base.to(dtype)


def reference(dtype: torch.dtype, op: object, n: int = 7, factor: float | None = None) -> torch.Tensor:
    xs = [value(r, dtype, n, op) for r in range(P)]
    acc = xs[0].clone()
    if dtype is torch.bool:
        for x in xs[1:]:
            if op in (RO.SUM, RO.MAX, RO.BOR):
                acc |= x
            elif op in (RO.PRODUCT, RO.MIN, RO.BAND):
                acc &= x
            else:
                acc ^= x
        return acc
    if factor is not None:
        acc = acc * factor
    for x in xs[1:]:
        if factor is not None:
            acc = acc + x * factor
        elif op in (RO.SUM, RO.AVG):
            acc = acc + x
        elif op == RO.PRODUCT:
            acc = acc * x
        elif op == RO.MIN:
            acc = torch.minimum(acc, x)
        elif op == RO.MAX:
            acc = torch.maximum(acc, x)
        elif op == RO.BAND:
            acc &= x
        elif op == RO.BOR:
            acc |= x
        elif op == RO.BXOR:
            acc ^= x
    if op == RO.AVG:
        acc = torch.div(acc, P, rounding_mode="floor") if dtype in INTS else acc / P
    return acc.to(dtype)


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a, b), f"{what}: got {a.tolist()} expected {b.tolist()}"


def ops_for(dtype: torch.dtype) -> list:
    if dtype is torch.bool:
        return [RO.SUM, RO.PRODUCT, RO.MIN, RO.MAX, RO.BAND, RO.BOR, RO.BXOR]
    if dtype in INTS:
        return [RO.SUM, RO.AVG, RO.PRODUCT, RO.MIN, RO.MAX, RO.BAND, RO.BOR, RO.BXOR]
    if dtype in COMPLEX:  # torch itself refuses the others on complex tensors
        return [RO.SUM, RO.AVG]
    return [RO.SUM, RO.AVG, RO.PRODUCT, RO.MIN, RO.MAX]


def case_all_reduce_ops_dtypes() -> None:
    for dtype in (*FLOATS, *INTS, *COMPLEX, torch.bool):
        for op in ops_for(dtype):
            for async_op in (False, True):
                t = value(R, dtype, op=op)
                w = dist.all_reduce(t, op=op, async_op=async_op)
                if async_op:
                    w.wait()
                    got = w.get_future().value()[0]  # torch hands complex tensors over as view_as_real
                    reduced(torch.view_as_complex(got) if dtype in COMPLEX else got, dtype, op, "future")
                reduced(t, dtype, op, f"async={async_op}")


def reduced(t: torch.Tensor, dtype: torch.dtype, op: object, what: str) -> None:
    want = reference(dtype, op)
    if op == RO.AVG and dtype in COMPLEX:  # the reference divides as complex numbers: last-bit differences
        assert torch.allclose(t, want, rtol=1e-6, atol=0), f"avg {dtype} {what}: {t} vs {want}"
    else:
        same(t, want, f"all_reduce {dtype} {op} {what}")


def case_premul_sum() -> None:
    for dtype in (torch.float32, torch.float64):
        t = value(R, dtype)
        dist.all_reduce(t, op=dist._make_nccl_premul_sum(0.5))
        same(t, reference(dtype, RO.SUM, factor=0.5), f"premul_sum {dtype}")


def case_non_contiguous() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.int32, torch.bool):
        base = torch.stack([value(R, dtype, 6), value(R + 1, dtype, 6)])  # (2, 6)
        t = base.t()  # (6, 2), strides (1, 6)
        assert not t.is_contiguous()
        want = torch.stack([_fold([value(r, dtype, 6) for r in range(P)], RO.MAX, dtype),
                            _fold([value(r + 1, dtype, 6) for r in range(P)], RO.MAX, dtype)]).t()
        dist.all_reduce(t, op=RO.MAX)
        same(t, want, f"non-contiguous {dtype}")
        same(base, want.t(), f"non-contiguous {dtype}: the base tensor")
        s = torch.zeros(10)
        v = s[::2]
        v.fill_(R + 1.0)
        dist.all_reduce(v)
        same(s[::2], torch.full((5,), P * (P + 1) / 2), "strided slice")
        same(s[1::2], torch.zeros(5), "the gaps of a strided slice are untouched")


def case_requires_grad_and_empty() -> None:
    p = torch.nn.Parameter(torch.full((3,), float(R)))
    dist.all_reduce(p.data)
    dist.all_reduce(p)
    same(p.detach(), torch.full((3,), float(sum(range(P)) * P)), "parameter")
    e = torch.empty(0)
    dist.all_reduce(e)
    assert e.numel() == 0


def case_repeated_small_tensors() -> None:
    """all_reduce keeps small tensors' NumPy views between calls: a tensor changed in place between calls (its
    shape, storage or dtype) is reduced as it is now, and a repeat whose shape differs on one rank still raises
    on every rank. The communicator's repeat path takes torch tensors too."""
    S = sum(range(P))
    t = torch.zeros(4)
    for k in range(3):
        t.fill_(R + k)
        dist.all_reduce(t)
        same(t, torch.full((4,), float(S + P * k)), f"repeat {k}")
    t.unsqueeze_(0)  # the same memory, another shape
    t.fill_(1.0)
    dist.all_reduce(t)
    same(t, torch.full((1, 4), float(P)), "after unsqueeze_")
    t.set_(torch.full((6,), float(R)))  # other memory
    dist.all_reduce(t)
    same(t, torch.full((6,), float(S)), "after set_")
    t.data = t.view(torch.int32)  # the same memory and shape, another dtype
    t.fill_(R + 1)
    dist.all_reduce(t)
    same(t, torch.full((6,), S + P, dtype=torch.int32), "after a dtype change through .data")
    u = torch.ones(3)
    for _ in range(3):
        dist.all_reduce(u)
    if R == 0:
        u.unsqueeze_(0)
    expect_error(lambda: dist.all_reduce(u), col.CollectiveMismatchError, "shape", "a repeat whose shape differs")
    v = torch.ones(5)
    for _ in range(3):
        dist.all_reduce(v)
    expect_error(lambda: dist.all_reduce(v, op=RO.MAX if R == 0 else RO.SUM), col.CollectiveMismatchError, "op",
                 "a repeat whose op differs")
    for op, want in ((RO.MIN, 0.0), (RO.MAX, P - 1.0), (RO.AVG, S / P), (RO.SUM, float(S))):
        for k in range(3):
            v.fill_(R)
            dist.all_reduce(v, op=op)
            same(v, torch.full((5,), want), f"repeat {k} of {op}")
    g = torch.ones(3)
    gone = weakref.ref(g)
    for _ in range(3):
        dist.all_reduce(g)
    del g
    gc.collect()
    assert gone() is None, "the group keeps a reduced tensor alive"
    comm = dist.group.WORLD.communicator
    x = torch.arange(4, dtype=torch.float64) + R
    want = torch.arange(4, dtype=torch.float64) * P + S
    for k in range(3):
        y = comm.allreduce(x)
        assert type(y) is torch.Tensor and y.data_ptr() != x.data_ptr(), f"comm.allreduce repeat {k}: {type(y)}"
        same(y, want, f"comm.allreduce repeat {k}")
        same(x, torch.arange(4, dtype=torch.float64) + R, f"comm.allreduce repeat {k} left its input")
    for k in range(2):
        z = torch.full((5,), float(R + k))
        assert comm.allreduce(z, out=z) is z
        same(z, torch.full((5,), float(S + P * k)), f"comm.allreduce in place {k}")
    z = torch.zeros(5)
    comm.allreduce(z, out=z)
    z.set_(torch.full((7,), float(R)))  # the same tensor object, other memory: its kept view must not be used
    assert comm.allreduce(z, out=z) is z
    same(z, torch.full((7,), float(S)), "comm.allreduce in place after set_")
    z.data = z.view(torch.int32)  # the same memory and shape, another dtype
    z.fill_(R + 1)
    comm.allreduce(z, out=z)
    same(z, torch.full((7,), S + P, dtype=torch.int32), "comm.allreduce after a dtype change through .data")
    w = comm.alloc((6,), "float32")  # a tensor in a window, reduced again and again where it lies
    tw = torch.from_numpy(w)
    for k in range(3):
        tw.fill_(R + k)
        assert comm.allreduce(tw, out=tw) is tw
        same(tw, torch.full((6,), float(S + P * k)), f"comm.allreduce of a tensor in a window, repeat {k}")
    del tw
    comm.free(w)  # drops the communicator's templates: a tensor reduced again and again before goes on
    for k in range(3):
        v.fill_(R + k)
        dist.all_reduce(v)
        same(v, torch.full((5,), float(S + P * k)), f"repeat {k} after comm.free")
    b = torch.ones(4, dtype=torch.bfloat16)
    same(comm.allreduce(b), torch.full((4,), float(P), dtype=torch.bfloat16), "comm.allreduce bfloat16")
    expect_error(lambda: comm.allreduce(torch.ones(4 if R else 3, dtype=torch.float64)), col.CollectiveMismatchError,
                 "shape", "comm.allreduce of tensors whose shape differs")


def case_broadcast_reduce() -> None:
    for root in sorted({0, P - 1}):
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64):
            t = value(R, dtype)
            dist.broadcast(t, src=root)
            same(t, value(root, dtype), f"broadcast {dtype} root {root}")
            t = value(R, dtype)
            w = dist.broadcast(t, src=root, async_op=True)
            w.wait()
            same(t, value(root, dtype), f"broadcast async {dtype} root {root}")
        for op in (RO.SUM, RO.MAX, RO.BXOR):
            t = value(R, torch.int32)
            dist.reduce(t, dst=root, op=op)
            if R == root:
                same(t, reference(torch.int32, op), f"reduce {op} root {root}")


def case_all_gather() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.complex128):
        x = value(R, dtype, 5).reshape(5, 1)
        outs = [torch.empty(5, 1, dtype=dtype) for _ in range(P)]
        dist.all_gather(outs, x)
        for r in range(P):
            same(outs[r], value(r, dtype, 5).reshape(5, 1), f"all_gather {dtype} from {r}")
        o = torch.empty(P * 5, 1, dtype=dtype)
        dist.all_gather_into_tensor(o, x)
        same(o, torch.cat([value(r, dtype, 5).reshape(5, 1) for r in range(P)]), f"all_gather_into_tensor {dtype}")
        o = torch.empty(P, 5, 1, dtype=dtype)
        w = dist.all_gather_into_tensor(o, x, async_op=True)
        w.wait()
        same(o, torch.stack([value(r, dtype, 5).reshape(5, 1) for r in range(P)]), f"stacked {dtype}")
    objs: list = [None] * P
    dist.all_gather_object(objs, {"rank": R, "s": "x" * R})
    assert objs == [{"rank": r, "s": "x" * r} for r in range(P)], objs
    lst = [{"k": R}, [1, 2, R]] if R == 0 else [None, None]
    dist.broadcast_object_list(lst, src=0)
    assert lst == [{"k": 0}, [1, 2, 0]], lst


def case_reduce_scatter() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        for op in ((RO.SUM, RO.MAX, RO.BAND) if dtype in (torch.int64, torch.bool) else (RO.SUM, RO.AVG, RO.MIN)):
            full = torch.cat([value(R * P + j, dtype, 3) for j in range(P)])  # rank R's input, P blocks of 3
            out = torch.empty(3, dtype=dtype)
            dist.reduce_scatter_tensor(out, full, op=op)
            xs = [torch.cat([value(r * P + j, dtype, 3) for j in range(P)])[R * 3:(R + 1) * 3] for r in range(P)]
            same(out, _fold(xs, op, dtype), f"reduce_scatter_tensor {dtype} {op}")
            assert torch.equal(full, torch.cat([value(R * P + j, dtype, 3) for j in range(P)])), "input changed"
            out2 = torch.empty(3, dtype=dtype)
            w = dist.reduce_scatter(out2, [value(R * P + j, dtype, 3) for j in range(P)], op=op, async_op=True)
            w.wait()
            same(out2, out, f"reduce_scatter (list) {dtype} {op}")
    # The output a view of the input's own block (torch's in-place form), or of another shape, sync and async.
    for async_op in (False, True):
        full = torch.arange(P * 4, dtype=torch.float32) + 100 * R
        out = full[R * 4:(R + 1) * 4]
        w = dist.reduce_scatter_tensor(out, full, async_op=async_op)
        if async_op:
            w.wait()
        mine = torch.arange(R * 4, R * 4 + 4, dtype=torch.float32)
        same(out, mine * P + 100 * sum(range(P)), f"reduce_scatter_tensor into its own block async={async_op}")
        out = torch.full((2, 2), -1.0)
        w = dist.reduce_scatter_tensor(out, torch.arange(P * 4, dtype=torch.float32).reshape(P * 2, 2) + R,
                                       op=RO.MAX, async_op=async_op)
        if async_op:
            w.wait()
        same(out, (mine + P - 1).reshape(2, 2), f"reduce_scatter_tensor into a 2x2 output async={async_op}")


def _fold(xs: list, op: object, dtype: torch.dtype) -> torch.Tensor:
    acc = xs[0].clone()
    for x in xs[1:]:
        if dtype is torch.bool:
            acc = acc | x if op in (RO.SUM, RO.MAX) else acc & x
        elif op in (RO.SUM, RO.AVG):
            acc = acc + x
        elif op == RO.MAX:
            acc = torch.maximum(acc, x)
        elif op == RO.MIN:
            acc = torch.minimum(acc, x)
        elif op == RO.BAND:
            acc = acc & x
    return (acc / P if op == RO.AVG else acc).to(dtype)


def case_coalesced_and_barrier() -> None:
    ts = [torch.full((3,), float(R)), torch.full((2, 2), float(R + 1))]
    dist.all_reduce_coalesced(ts)
    same(ts[0], torch.full((3,), float(sum(range(P)))), "coalesced 0")
    same(ts[1], torch.full((2, 2), float(sum(range(1, P + 1)))), "coalesced 1")
    bufs = [torch.full((4,), float(R)), torch.full((2,), float(R) + 10)]
    dist._broadcast_coalesced(dist.group.WORLD, bufs, 1 << 20, 0)
    same(bufs[0], torch.zeros(4), "broadcast_coalesced")
    same(bufs[1], torch.full((2,), 10.0), "broadcast_coalesced 1")
    dist.barrier()
    w = dist.barrier(async_op=True)
    w.wait()


def case_async_semantics() -> None:
    # A Future that our thread completes: callbacks run, values chain; wait(timeout) raises while a peer is late.
    t = torch.full((4,), float(R))
    fut = dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0] * 2)
    same(fut.wait(), torch.full((4,), 2.0 * sum(range(P))), "future chain")
    if P > 1:
        t = torch.ones(2)
        if R == 1:
            time.sleep(1.5)
        w = dist.all_reduce(t, async_op=True)
        if R == 0:
            t0 = time.monotonic()
            try:
                w.wait(timeout=datetime.timedelta(seconds=0.3))
                raise AssertionError("wait(timeout) returned while rank 1 had not called all_reduce yet")
            except dist.DistBackendError as exc:  # what torch code catches from gloo and NCCL
                assert isinstance(exc, col.CollectiveTimeoutError) and isinstance(exc, RuntimeError), type(exc)
                assert time.monotonic() - t0 < 1.2
            assert not w.is_completed()
        w.wait()
        assert w.is_completed() and w.is_success()
        same(t, torch.full((2,), float(P)), "after the late rank")
    # Reported complete means the future holds the outcome: a value for a success, the error for a failure.
    for k in range(100):
        w = dist.all_reduce(torch.ones(1), async_op=True)
        while not w.is_completed():
            pass
        assert w.get_future().done() and w.is_success(), f"completed, but the future is not done (call {k})"
        same(w.get_future().value()[0], torch.full((1,), float(P)), "the completed future's value")
    if P > 1:  # shapes that differ across the ranks: the Work fails on every rank
        w = dist.all_reduce(torch.ones(R + 1), async_op=True)
        while not w.is_completed():
            pass
        assert not w.is_success() and isinstance(w.exception(), col.CollectiveMismatchError), w.exception()
        expect_error(lambda: w.get_future().value(), col.CollectiveMismatchError, "shape differs",
                     "a failed Work's future")
    # Many in flight at once, completed in order.
    ts = [torch.full((1000,), float(R + k)) for k in range(20)]
    ws = [dist.all_reduce(x, async_op=True) for x in ts]
    for k, (x, w) in enumerate(zip(ts, ws)):
        w.wait()
        same(x, torch.full((1000,), float(sum(range(P)) + P * k)), f"in flight {k}")


GSDT = (torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64)


def case_gather_scatter() -> None:
    for root in sorted({0, P - 1}):
        for dtype in GSDT:
            for async_op in (False, True):
                what = f"{dtype} root {root} async={async_op}"
                x = value(R, dtype, 4)
                outs = [torch.empty(4, dtype=dtype) for _ in range(P)] if R == root else None
                w = dist.gather(x, outs, dst=root, async_op=async_op)
                if async_op:
                    w.wait()
                if R == root:
                    for r in range(P):
                        same(outs[r], value(r, dtype, 4), f"gather {what} from {r}")
                out = torch.full((2, 2), 0, dtype=dtype)
                ins = [value(r + 10, dtype, 4).reshape(2, 2) for r in range(P)] if R == root else None
                w = dist.scatter(out, ins, src=root, async_op=async_op)
                if async_op:
                    w.wait()
                same(out, value(R + 10, dtype, 4).reshape(2, 2), f"scatter {what}")
        # Uneven sizes: rank r sends r + 1 elements (the root's outputs say so); scatter's pieces differ the same way.
        x = torch.arange(R + 1, dtype=torch.float64) + 10 * R
        outs = [torch.empty(r + 1, dtype=torch.float64) for r in range(P)] if R == root else None
        dist.gather(x, outs, dst=root)
        if R == root:
            for r in range(P):
                same(outs[r], torch.arange(r + 1, dtype=torch.float64) + 10 * r, f"uneven gather from {r}")
        out = torch.empty(R + 1, dtype=torch.int32)
        dist.scatter(out, [torch.full((r + 1,), r * 3, dtype=torch.int32) for r in range(P)] if R == root else None,
                     src=root)
        same(out, torch.full((R + 1,), R * 3, dtype=torch.int32), "uneven scatter")
        # Object forms (torch pickles them; what moves is bytes of different lengths per rank).
        got = [None] * P if R == root else None
        dist.gather_object({"rank": R, "pad": "y" * (7 * R)}, got, dst=root)
        if R == root:
            assert got == [{"rank": r, "pad": "y" * (7 * r)} for r in range(P)], got
        mine = [None]
        dist.scatter_object_list(mine, [("to", r, list(range(r))) for r in range(P)] if R == root else None, src=root)
        assert mine == [("to", R, list(range(R)))], mine
    # Outputs on the root that do not match what the ranks send: every rank raises before anything moves, and no
    # output is written, sync and async; also where the total fits but rank 0 sends more and rank 1 less than the
    # root expects (which would otherwise cut the root's outputs in the wrong places).
    if P > 1:
        for async_op in (False, True):
            for mine, want in ((3, [2] * P), (5 if R == 0 else 3 if R == 1 else 4, [4] * P)):
                x = torch.full((mine,), float(R))
                outs = [torch.full((n,), -1.0) for n in want] if R == 0 else None
                exc = error_of(lambda: dist.gather(x, outs, dst=0, async_op=async_op), async_op,
                               f"gather of {mine} elements into outputs of {want}")
                assert isinstance(exc, col.CollectiveValueError), repr(exc)
                assert f"gather on rank {R} of {P}" in str(exc) and "root's outputs hold" in str(exc), str(exc)
                assert R != 0 or all((o == -1).all() for o in outs), outs
        # A scatter whose piece for rank 1 does not fit rank 1's output: every rank raises before anything moves
        # (rank 1 naming its output), and no output is written.
        out = torch.full((2,), -1.0)
        ins = [torch.ones(3 if r == 1 else 2) for r in range(P)] if R == 0 else None
        try:
            dist.scatter(out, ins, src=0)
            raise AssertionError(f"scatter into an output of the wrong size did not raise on rank {R}")
        except col.CollectiveError as exc:
            assert "scatter" in str(exc) and "rank 1: out has 2 rows, the result has 3" in str(exc), str(exc)
            assert isinstance(exc, col.CollectiveValueError) == (R == 1), (R, type(exc))
        assert (out == -1).all(), out
        # The same for outputs that the library cannot receive into directly: bfloat16, bool, strided, empty.
        for dtype, strided, n in ((torch.bfloat16, False, 2), (torch.bool, False, 2), (torch.float32, True, 2),
                                  (torch.float32, False, 0)):
            for async_op in (False, True):
                base = torch.zeros((n if R == 1 else 2, 2), dtype=dtype)
                out = base[:, 0] if strided else base.reshape(-1)[:n if R == 1 else 2]
                ins = [torch.ones(3 if r == 1 else 2, dtype=dtype) for r in range(P)] if R == 0 else None
                what = f"scatter into a {dtype} output (strided {strided}, {n} elements on rank 1) async={async_op}"
                exc = error_of(lambda: dist.scatter(out, ins, src=0, async_op=async_op), async_op, what)
                assert "scatter" in str(exc) and "rank 1: out has" in str(exc), (what, str(exc))
                assert not base.any(), (what, base)


def error_of(call: object, async_op: bool, what: str) -> col.CollectiveError:
    """The library error that ``call()`` (waited on when ``async_op``) raises on this rank; fails if none."""
    try:
        w = call()  # type: ignore[operator]
        if async_op:
            w.wait()
    except col.CollectiveError as exc:
        return exc
    raise AssertionError(f"{what} did not raise on rank {R}")


def case_all_gather_uneven() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.int16, torch.bool, torch.complex128):
        for async_op in (False, True):
            x = value(R, dtype, 2 * (R + 1)).reshape(R + 1, 2)  # rank r: r + 1 rows
            outs = [torch.empty(r + 1, 2, dtype=dtype) for r in range(P)]
            w = dist.all_gather(outs, x, async_op=async_op)
            if async_op:
                w.wait()
            for r in range(P):
                same(outs[r], value(r, dtype, 2 * (r + 1)).reshape(r + 1, 2), f"uneven all_gather {dtype} from {r}")
    e = [torch.empty(0 if r == 0 else 3) for r in range(P)]
    dist.all_gather(e, torch.full((0 if R == 0 else 3,), float(R)))
    for r in range(1, P):
        same(e[r], torch.full((3,), float(r)), f"all_gather with an empty rank 0, from {r}")
    # Outputs that disagree with what the ranks send (right total, wrong cut) raise on every rank, before the data.
    if P > 1:
        x = torch.full((R + 1,), float(R))
        sizes = [r + 1 for r in range(P)]
        if R == P - 1:
            sizes[0], sizes[1] = sizes[1], sizes[0]
        expect_error(lambda: dist.all_gather([torch.empty(n) for n in sizes], x), col.CollectiveValueError,
                     "expect other sizes", "uneven all_gather with outputs of the wrong sizes")
        # Rank 0 believes the sizes even (its own everywhere), the others know better: still an error on every rank.
        n = 2 if R == 0 else R + 2
        sizes = [2] * P if R == 0 else [2] + [r + 2 for r in range(1, P)]
        expect_error(lambda: dist.all_gather([torch.empty(k, dtype=torch.int64) for k in sizes],
                                             torch.full((n,), R, dtype=torch.int64)), col.CollectiveError, "rank",
                     "all_gather that rank 0 takes for even")
        t = torch.full((2,), float(R))
        dist.all_reduce(t)
        same(t, torch.full((2,), float(sum(range(P)))), "a call after the all_gather mismatches")


def _sparse(r: int) -> torch.Tensor:
    """Rank r's sparse (3, P + 1) tensor: r + 1 entries in row r % 3; rows overlap across ranks."""
    idx = torch.tensor([[r % 3] * (r + 1), list(range(r + 1))])
    return torch.sparse_coo_tensor(idx, torch.arange(r + 1, dtype=torch.float64) + r + 1, (3, P + 1))


def case_sparse_all_reduce() -> None:
    want = sum(_sparse(r).to_dense() for r in range(P))
    for async_op in (False, True):
        t = _sparse(R)
        w = dist.all_reduce(t, async_op=async_op)
        if async_op:
            w.wait()
        assert t.is_sparse and t.is_coalesced()  # as gloo returns it
        same(t.to_dense(), want, f"sparse all_reduce async={async_op}")
    expect_error(lambda: dist.all_reduce(_sparse(R), op=RO.MAX), col.CollectiveValueError, "SUM only",
                 "sparse all_reduce with MAX")


def case_all_to_all() -> None:
    for dtype in (torch.int64, torch.float32, torch.bfloat16, torch.bool):
        for async_op in (False, True):
            inp = value(R, dtype, P * 3)  # 3 elements for each rank
            out = torch.empty(P * 3, dtype=dtype)
            w = dist.all_to_all_single(out, inp, async_op=async_op)
            if async_op:
                w.wait()
                # The group's own Work (torch's ProcessGroup.all_to_all_single would wrap it in one that never
                # reports completion).
                assert w.is_completed() and w.is_success(), f"all_to_all_single {dtype}: Work not complete after wait"
            same(out, torch.cat([value(r, dtype, P * 3)[R * 3:(R + 1) * 3] for r in range(P)]),
                 f"all_to_all_single {dtype} async={async_op}")
    # Uneven splits, rows of 3: rank R sends j + R + 1 rows to rank j; row k from rank r to rank j is 100r + 10j + k.
    def rows(r: int, j: int) -> torch.Tensor:
        n = j + r + 1
        return (100 * r + 10 * j + torch.arange(n, dtype=torch.float64)).reshape(n, 1).expand(n, 3)

    for async_op in (False, True):
        inp = torch.cat([rows(R, j) for j in range(P)])
        out = torch.empty(sum(R + r + 1 for r in range(P)), 3, dtype=torch.float64)
        w = dist.all_to_all_single(out, inp, output_split_sizes=[R + r + 1 for r in range(P)],
                                   input_split_sizes=[j + R + 1 for j in range(P)], async_op=async_op)
        if async_op:
            w.wait()
        same(out, torch.cat([rows(r, R) for r in range(P)]), f"uneven all_to_all_single async={async_op}")
        outs = [torch.empty(R + 1, dtype=torch.int64) for _ in range(P)]
        w = dist.all_to_all(outs, [torch.full((j + 1,), R * 10 + j, dtype=torch.int64) for j in range(P)],
                            async_op=async_op)
        if async_op:
            w.wait()
        for r in range(P):
            same(outs[r], torch.full((R + 1,), r * 10 + R, dtype=torch.int64), f"all_to_all from {r}")
    # Rank 0 sends nothing (input (0, 3), as an MoE rank with no tokens routed) but receives, and the last rank
    # receives nothing (output (0, 3)): rank r sends r rows to every rank but the last; each side's row size is
    # its own tensor's.
    def count(r: int, j: int) -> int:
        return r if j != P - 1 else 0

    def sent(r: int, j: int) -> torch.Tensor:
        n = count(r, j)
        return (100 * r + 10 * j + torch.arange(n, dtype=torch.float32)).reshape(n, 1).expand(n, 3)

    for async_op in (False, True):
        inp = torch.cat([sent(R, j) for j in range(P)])
        out = torch.empty(sum(count(r, R) for r in range(P)), 3)
        w = dist.all_to_all_single(out, inp, output_split_sizes=[count(r, R) for r in range(P)],
                                   input_split_sizes=[count(R, j) for j in range(P)], async_op=async_op)
        if async_op:
            w.wait()
        same(out, torch.cat([sent(r, R) for r in range(P)]), f"all_to_all_single with empty sides async={async_op}")
    # Equal blocks both ways take the direct path; explicit equal splits too, and a rank whose output is not
    # contiguous (its own path) meets the others' direct path in the same call.
    for async_op in (False, True):
        inp = torch.arange(P * 4, dtype=torch.float32) + 100 * R
        want = torch.cat([torch.arange(R * 4, R * 4 + 4, dtype=torch.float32) + 100 * r for r in range(P)])
        out = torch.empty(P * 4)
        w = dist.all_to_all_single(out, inp, output_split_sizes=[4] * P, input_split_sizes=[4] * P,
                                   async_op=async_op)
        if async_op:
            w.wait()
        same(out, want, f"all_to_all_single with explicit equal splits async={async_op}")
        wide = torch.full((P * 4, 2), -1.0)
        out = wide[:, 0] if R == 0 else torch.empty(P * 4)  # rank 0: a strided view
        w = dist.all_to_all_single(out, inp, async_op=async_op)
        if async_op:
            w.wait()
        same(out, want, f"all_to_all_single, rank 0's output strided async={async_op}")
    if P > 1:
        # Every rank's blocks equal on its own, but rank 0's hold 2 elements and the others' 3: every rank raises
        # before anything is received (rank 0's output would take 2 + 3 (P-1) elements, not 2P).
        b = 2 if R == 0 else 3
        out = torch.full((P * b,), -1.0)
        expect_error(lambda: dist.all_to_all_single(out, torch.zeros(P * b)), col.CollectiveError, "rows",
                     "all_to_all_single with blocks that differ across ranks")
        assert (out == -1).all(), out
    # Output splits that disagree with what arrives raise on every rank before anything moves, outputs untouched.
    if P > 1:
        inp = torch.cat([torch.full((j + 1,), float(R)) for j in range(P)])
        want = [R + 1] * P
        want[0], want[1] = want[0] + 1, want[1] - 1
        out = torch.full((P * (R + 1),), -1.0)
        expect_error(lambda: dist.all_to_all_single(out, inp, output_split_sizes=want,
                                                    input_split_sizes=[j + 1 for j in range(P)]),
                     col.CollectiveMismatchError, "expects", "all_to_all_single with wrong output splits")
        assert (out == -1).all(), out
        outs = [torch.full((w,), -1.0) for w in want]
        expect_error(lambda: dist.all_to_all(outs, list(torch.split(inp, [j + 1 for j in range(P)]))),
                     col.CollectiveMismatchError, "expects", "all_to_all with wrong output sizes")
        assert all((o == -1).all() for o in outs), outs
    # Rank 0's blocks equal both ways (the direct path), the others' not, every total right: rank 0 gets 1 element
    # from rank 1 and 3 from the last rank where it expects 2 from each, and every rank raises, nothing written.
    if P > 2:
        sp = [2] * P
        if R == 1:
            sp[0], sp[-1] = 1, 3
        elif R == P - 1:
            sp[0], sp[-1] = 3, 1
        got = [2] * P
        if R == P - 1:
            got[1], got[-1] = 3, 1
        for async_op in (False, True):
            out = torch.full((2 * P,), -1.0)
            if R == 0:
                call = lambda: dist.all_to_all_single(out, torch.zeros(2 * P), async_op=async_op)  # noqa: E731
            else:
                call = lambda: dist.all_to_all_single(out, torch.zeros(2 * P), output_split_sizes=got,  # noqa: E731
                                                      input_split_sizes=sp, async_op=async_op)

            def run_and_wait(call=call) -> None:
                w = call()
                if w is not None:
                    w.wait()
            expect_error(run_and_wait, col.CollectiveMismatchError, "expects",
                         f"all_to_all_single, per-sender counts wrong, totals right, async={async_op}")
            assert (out == -1).all(), out


def expect_error(fn: object, kind: type, text: str, what: str) -> None:
    try:
        fn()  # type: ignore[operator]
    except kind as exc:
        assert text in str(exc) and f"rank {R}" in str(exc), f"{what}: {exc}"
        return
    raise AssertionError(f"{what}: no {kind.__name__} on rank {R}")


def case_send_recv() -> None:
    if P < 2:
        return
    nxt, prv = (R + 1) % P, (R - 1) % P
    # A ring, in both blocking and nonblocking forms, several dtypes, a tag per dtype.
    for tag, dtype in enumerate((torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64)):
        got = torch.empty(5, dtype=dtype)
        if R % 2 == 0:
            dist.send(value(R, dtype, 5), dst=nxt, tag=tag)
            dist.recv(got, src=prv, tag=tag)
        else:
            dist.recv(got, src=prv, tag=tag)
            dist.send(value(R, dtype, 5), dst=nxt, tag=tag)
        same(got, value(prv, dtype, 5), f"send/recv ring {dtype}")
        got = torch.empty(5, dtype=dtype)
        rw = dist.irecv(got, src=prv, tag=tag + 10)
        sw = dist.isend(value(R + 1, dtype, 5), dst=nxt, tag=tag + 10)
        sw.wait()
        rw.wait()
        same(got, value(prv + 1, dtype, 5), f"isend/irecv ring {dtype}")
    # Tags keep two messages between the same pair apart, received in the other order.
    if R == 0:
        dist.send(torch.full((2,), 1.0), dst=1, tag=1)
        dist.send(torch.full((2,), 2.0), dst=1, tag=2)
    elif R == 1:
        b2, b1 = torch.empty(2), torch.empty(2)
        dist.recv(b2, src=0, tag=2)
        dist.recv(b1, src=0, tag=1)
        same(b1, torch.full((2,), 1.0), "tag 1")
        same(b2, torch.full((2,), 2.0), "tag 2")
    # A non-contiguous receive buffer gets the data in its own layout.
    if R == 1:
        dist.send(torch.arange(6.0).reshape(2, 3), dst=0, tag=5)
    elif R == 0:
        t = torch.zeros(3, 2).t()
        assert not t.is_contiguous()
        dist.recv(t, src=1, tag=5)
        same(t, torch.arange(6.0).reshape(2, 3), "recv into a transposed tensor")
    # From any rank: rank 0 learns each sender from recv's return value (and from an irecv's work).
    if R == 0:
        seen = []
        for _ in range(P - 1):
            b = torch.empty(3)
            src = dist.recv(b, tag=7)
            same(b, torch.full((3,), float(src)), f"any-source recv from {src}")
            seen.append(src)
        assert sorted(seen) == list(range(1, P)), seen
        b = torch.empty(2, dtype=torch.int64)
        w = dist.irecv(b, tag=8)
        w.wait()
        src = w._source_rank()
        same(b, torch.full((2,), src * 7, dtype=torch.int64), "any-source irecv")
        assert src == P - 1, src
    else:
        dist.send(torch.full((3,), float(R)), dst=0, tag=7)
        if R == P - 1:
            dist.send(torch.full((2,), R * 7, dtype=torch.int64), dst=0, tag=8)
    # batch_isend_irecv: both ring directions at once, tags per direction; the list's order does not matter.
    fwd, bwd = torch.empty(4), torch.empty(4, dtype=torch.int32)
    ops = [dist.P2POp(dist.irecv, fwd, prv, tag=1), dist.P2POp(dist.irecv, bwd, nxt, tag=2),
           dist.P2POp(dist.isend, torch.full((4,), float(R)), nxt, tag=1),
           dist.P2POp(dist.isend, torch.full((4,), R, dtype=torch.int32), prv, tag=2)]
    if R % 2:
        ops.reverse()
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    same(fwd, torch.full((4,), float(prv)), "batch_isend_irecv forward")
    same(bwd, torch.full((4,), nxt, dtype=torch.int32), "batch_isend_irecv backward")
    # A message that does not fit the receive buffer raises on the receiver, naming both ranks; the sender finishes.
    if R == 1:
        dist.send(torch.ones(3), dst=0, tag=9)
    elif R == 0:
        expect_error(lambda: dist.recv(torch.empty(4), src=1, tag=9), col.CollectiveError, "rank 1",
                     "recv of a message of another size")
    dist.barrier()


_gloo = None


def gloo_group() -> object:
    global _gloo
    if _gloo is None:
        _gloo = dist.new_group(list(range(P)), backend="gloo")
    return _gloo


def case_monitored_barrier() -> None:
    pg = dist.group.WORLD
    pg.monitored_barrier(datetime.timedelta(seconds=30))
    pg.monitored_barrier(datetime.timedelta(seconds=30), wait_all_ranks=True)
    # torch's own function refuses every backend but gloo by name; import collective.torch lets ours through
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    with warnings.catch_warnings(record=True) as seen:  # seconds, as torch's function takes them, with its warning
        warnings.simplefilter("always")
        dist.monitored_barrier(dist.group.WORLD, 30.0, wait_all_ranks=True)
    assert any("timedelta" in str(w.message) for w in seen), [str(w.message) for w in seen]
    expect_error(lambda: dist.monitored_barrier(timeout="30s"), TypeError, "timedelta", "a timeout in a string")
    expect_error(lambda: dist.monitored_barrier(timeout=30), TypeError, "timedelta", "a timeout in int seconds")
    dist.monitored_barrier(gloo_group(), timeout=datetime.timedelta(seconds=30))  # a gloo group: torch's own
    if P < 2:
        return
    if R != 0:  # the group's own method and torch's function are the same barrier
        pg.monitored_barrier(datetime.timedelta(seconds=30))
    else:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    # The last rank stays away: rank 0 names it within the timeout, the others hear that rank 0 failed.
    if R != P - 1:
        t0 = time.monotonic()
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=1.0), wait_all_ranks=R == 0 and P > 2)
            raise AssertionError(f"monitored_barrier passed on rank {R} although rank {P - 1} never came")
        except ctorch.MonitoredBarrierError as exc:
            assert isinstance(exc, RuntimeError) and time.monotonic() - t0 < 10, exc
            if R == 0:
                assert f"{P - 1} failed to pass monitoredBarrier" in str(exc), str(exc)
            else:
                assert f"Rank {R} successfully reached monitoredBarrier" in str(exc), str(exc)
    if R == 0:  # a timeout of zero runs out before rank 0 hears from anyone (and posts nothing)
        try:
            pg.monitored_barrier(datetime.timedelta(seconds=0))
            raise AssertionError("monitored_barrier with a zero timeout passed")
        except ctorch.MonitoredBarrierError as exc:
            assert "Rank 0 timed out in monitoredBarrier" in str(exc), str(exc)
    dist.barrier()
    pg.monitored_barrier(datetime.timedelta(seconds=30))  # and it works again
    # The last rank comes to a monitored barrier that rank 0 is not in (it gives up, as a rank does that arrives
    # after rank 0 gave up): its arrival must not pass the group's next one, where it comes a second late.
    if R == P - 1:
        try:
            pg.monitored_barrier(datetime.timedelta(seconds=0.5))
            raise AssertionError(f"rank {R} passed a monitored barrier rank 0 is not in")
        except ctorch.MonitoredBarrierError as exc:
            assert f"Rank {R} successfully reached monitoredBarrier" in str(exc), str(exc)
    dist.barrier()
    if R == P - 1:
        time.sleep(0.5)
    came = time.monotonic()  # one clock for every process of the node
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    passed = time.monotonic()
    last_came = torch.tensor([came], dtype=torch.float64)
    dist.broadcast(last_came, src=P - 1)
    assert R != 0 or passed > float(last_came), \
        f"rank 0 passed {float(last_came) - passed:.3f} s before rank {P - 1} came: it took an earlier call's arrival"
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    if P < 3:
        return
    # Rank 1 stays away and rank 0 fails the call before it reads rank 2's arrival: rank 2, still waiting in that
    # call, must fail it too (rank 0 tells it), not pass it when rank 0's next call comes.
    dist.barrier()
    if R == 1:
        time.sleep(2.5)
    else:
        time.sleep(0.2 if R >= 2 else 0)
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=2.0 if R == 0 else 10.0))
            raise AssertionError(f"rank {R} passed a monitored barrier that rank 0 failed")
        except ctorch.MonitoredBarrierError as exc:
            assert ("Rank 1 failed to pass monitoredBarrier" if R == 0 else
                    f"Rank {R} successfully reached monitoredBarrier") in str(exc), str(exc)
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))


def case_subgroups() -> None:
    if P < 2:
        return
    world = dist.group.WORLD
    # A proper subset, created by every rank (torch's default) and listed out of order (torch sorts it).
    members = list(range(P - 1, 0, -1))  # every rank but 0
    g = dist.new_group(members)
    ms = sorted(members)
    if R in ms:
        gr = ms.index(R)
        assert dist.get_rank(g) == gr and dist.get_world_size(g) == len(ms)
        assert dist.get_process_group_ranks(g) == ms
        t = torch.full((2,), float(R))
        dist.all_reduce(t, group=g)
        same(t, torch.full((2,), float(sum(ms))), "subgroup all_reduce")
        t = torch.full((3,), float(R))
        dist.broadcast(t, src=ms[-1], group=g)  # a global rank
        same(t, torch.full((3,), float(ms[-1])), "subgroup broadcast")
        outs = [torch.empty(m) for m in ms]
        dist.all_gather(outs, torch.full((R,), float(R)), group=g)  # uneven: rank r sends r elements
        for m, o in zip(ms, outs):
            same(o, torch.full((m,), float(m)), f"subgroup all_gather from {m}")
        got = [torch.empty(2) for _ in ms] if gr == 0 else None
        dist.gather(torch.full((2,), float(R)), got, group_dst=0, group=g)
        if gr == 0:
            for m, o in zip(ms, got):
                same(o, torch.full((2,), float(m)), f"subgroup gather from {m}")
        o = torch.empty(len(ms), dtype=torch.int64)
        dist.all_to_all_single(o, torch.arange(len(ms), dtype=torch.int64) + 10 * R, group=g)
        same(o, torch.tensor([10 * m + gr for m in ms]), "subgroup all_to_all_single")
        if len(ms) > 1:  # point to point in the group, by global rank
            if gr == 0:
                dist.send(torch.full((2,), 5.0), dst=ms[1], group=g)
            elif gr == 1:
                b = torch.empty(2)
                assert dist.recv(b, group=g) == ms[0]  # any source: the global rank of the sender
                same(b, torch.full((2,), 5.0), "subgroup send/recv")
        dist.barrier(group=g)
        objs = [None] * len(ms)
        dist.all_gather_object(objs, ("r", R), group=g)
        assert objs == [("r", m) for m in ms], objs
    else:
        assert dist.get_rank(g) == -1 and dist.get_world_size(g) == -1
        t = torch.full((2,), 9.0)
        assert dist.all_reduce(t, group=g) is None  # torch skips a group this rank is not in
        same(t, torch.full((2,), 9.0), "a rank outside the group keeps its tensor")
    # The world still works, and in between the subgroup's calls.
    t = torch.full((2,), 1.0)
    dist.all_reduce(t, group=world)
    same(t, torch.full((2,), float(P)), "world after the subgroup")
    # Created by the members alone (use_local_synchronization), and overlapping groups in turn.
    pairs = [[r, r + 1] for r in range(P - 1)]
    gs = [dist.new_group(p, use_local_synchronization=True) if R in p else None for p in pairs]
    for p, pg in zip(pairs, gs):
        if pg is not None:
            t = torch.full((1,), float(R + 1))
            dist.all_reduce(t, group=pg, op=RO.PRODUCT)
            same(t, torch.full((1,), float((p[0] + 1) * (p[1] + 1))), f"pair {p}")
    # new_subgroups: consecutive ranks; and by enumeration, a proper subset and the rest.
    cur, subs = dist.new_subgroups(group_size=1)
    assert len(subs) == P and dist.get_world_size(cur) == 1 and dist.get_process_group_ranks(cur) == [R]
    t = torch.full((2,), float(R))
    dist.all_reduce(t, group=cur)
    same(t, torch.full((2,), float(R)), "a group of one")
    parts = [[r for r in range(P) if r % 2 == 0], [r for r in range(P) if r % 2 == 1]]
    cur, subs = dist.new_subgroups_by_enumeration(parts)
    mine = parts[R % 2]
    assert dist.get_process_group_ranks(cur) == mine
    t = torch.full((3,), float(R + 1))
    dist.all_reduce(t, group=cur)
    same(t, torch.full((3,), float(sum(m + 1 for m in mine))), "new_subgroups_by_enumeration all_reduce")
    obj = [None]
    dist.broadcast_object_list(obj if R != mine[-1] else [{"from": R}], src=mine[-1], group=cur)
    if R != mine[-1]:
        assert obj == [{"from": mine[-1]}], obj
    dist.barrier()


def case_whole_world_group_and_mesh() -> None:
    g = dist.new_group(list(range(P)))
    t = torch.full((3,), float(R))
    dist.all_reduce(t, group=g)
    same(t, torch.full((3,), float(sum(range(P)))), "new_group over every rank")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (P,))
    full = torch.arange(P * 4 * 3, dtype=torch.float32).reshape(P * 4, 3)
    d = DTensor.from_local(full[R * 4:(R + 1) * 4], mesh, [Shard(0)])
    same(d.to_local(), full[R * 4:(R + 1) * 4], "DTensor shard")
    same(d.redistribute(mesh, [Replicate()]).to_local(), full, "Shard -> Replicate")
    part = DTensor.from_local(torch.full((2, 2), float(R + 1)), mesh, [Partial()])
    same(part.redistribute(mesh, [Replicate()]).to_local(), torch.full((2, 2), float(P * (P + 1) // 2)),
         "Partial -> Replicate")
    same(part.redistribute(mesh, [Shard(0)]).full_tensor(), torch.full((2, 2), float(P * (P + 1) // 2)),
         "Partial -> Shard")
    same(distribute_tensor(full, mesh, [Shard(0)]).to_local(), full[R * 4:(R + 1) * 4], "distribute_tensor")
    y = (d * 2).sum()
    same(y.full_tensor(), full.sum() * 2, "DTensor op")


def raises_within(fn: object, kind: type, lo: float, hi: float, what: str) -> str:
    """Call ``fn``; it must raise ``kind`` between ``lo`` and ``hi`` seconds in; the message."""
    t0 = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except kind as exc:
        took = time.monotonic() - t0
        assert lo <= took < hi, f"{what}: raised after {took:.2f} s (expected {lo}-{hi} s): {exc}"
        return str(exc)
    raise AssertionError(f"{what}: no {kind.__name__} on rank {R}")


def case_group_timeout_withdraws() -> None:
    """Groups given timeout=1 s that rank 0 alone enters (a barrier; a repeated all_reduce): rank 0's call raises
    at the deadline, as gloo's does, and the group is broken on rank 0 (its next call raises at once, naming the
    call that timed out) and, once they try it, on the others; the default group goes on with exact answers."""
    if P < 2:
        return
    one = datetime.timedelta(seconds=1)
    g, h = dist.new_group(list(range(P)), timeout=one), dist.new_group(list(range(P)), timeout=one)
    for grp, what in ((g, "g"), (h, "h"), (h, "h again")):  # h's second all_reduce is a repeat (one shm phase)
        t = torch.full((4,), float(R + 1))
        dist.all_reduce(t, group=grp)
        same(t, torch.full((4,), float(P * (P + 1) // 2)), f"all_reduce on {what} before the timeout")
    others = f"rank {1}, which has" if P == 2 else f"ranks 1 and {P - 1}, which have" if P == 3 else "ranks 1-"
    if R == 0:
        # Past the deadline (1 s) by the watchdog's interval and the other ranks' answers to its report.
        msg = raises_within(lambda: dist.barrier(group=g), col.CollectiveTimeoutError, 1.0, 8.0, "barrier on g")
        assert re.search(" (Timed out|closed|timeout) ", msg), f"torch's own test's pattern: {msg}"
        assert ("#3 barrier" in msg and "[barrier via torch.distributed" in msg and f"on rank 0 of {P} timed out" in msg
                and others in msg and "not arrived" in msg and "timeout is 1 s" in msg and "broken" in msg), msg
        msg = raises_within(lambda: dist.all_reduce(torch.full((4,), 1.0), group=h), col.CollectiveTimeoutError,
                            1.0, 8.0, "a repeated all_reduce on h")
        assert "#4 allreduce shape (4,) float32" in msg and others in msg, msg
        late = raises_within(lambda: dist.all_reduce(torch.ones(2), group=g), col.CollectiveError, 0, 0.9,
                             "a later call on g")
        assert not isinstance(late, col.CollectiveTimeoutError)
        assert "broken" in late and "#3 barrier" in late and "timed out on this rank" in late, late
    dist.barrier()  # the default group, while rank 0 waited out its deadlines
    t = torch.full((5,), float(R + 1), dtype=torch.float64)
    dist.all_reduce(t)
    same(t, torch.full((5,), float(P * (P + 1) // 2), dtype=torch.float64), "default group all_reduce")
    outs = [torch.empty(3, dtype=torch.int64) for _ in range(P)]
    dist.all_gather(outs, torch.full((3,), R * 10, dtype=torch.int64))
    for q, o in enumerate(outs):
        same(o, torch.full((3,), q * 10, dtype=torch.int64), f"default group all_gather from {q}")
    b = torch.full((2,), float(R))
    dist.broadcast(b, src=P - 1)
    same(b, torch.full((2,), float(P - 1)), "default group broadcast")
    if R != 0:  # rank 0 left both groups' calls: the others' next call there raises at once
        msg = raises_within(lambda: dist.all_reduce(torch.ones(2), group=g), col.CollectiveTimeoutError, 0, 0.9,
                            "a call on g after rank 0 left it")
        assert "rank 0 reached its timeout waiting in it" in msg, msg
        msg = raises_within(lambda: dist.barrier(group=h), col.CollectiveTimeoutError, 0, 0.9, "barrier on h")
        assert "rank 0 reached its timeout waiting in it" in msg, msg
        late = raises_within(lambda: dist.all_reduce(torch.ones(2), group=g), col.CollectiveError, 0, 0.9,
                             "a later call on g")
        assert "broken" in late, late
    assert g.communicator.broken and h.communicator.broken
    dist.destroy_process_group(g)
    dist.destroy_process_group(h)
    ctorch.join_closing()
    assert g.communicator.closed and h.communicator.closed
    t = torch.ones(3)
    dist.all_reduce(t)
    same(t, torch.full((3,), float(P)), "default group after the broken groups closed")


run("calls", "all_reduce: every op x dtype, sync and async", case_all_reduce_ops_dtypes)
run("calls", "premul_sum", case_premul_sum)
run("calls", "non-contiguous", case_non_contiguous)
run("calls", "requires_grad and empty", case_requires_grad_and_empty)
run("calls", "repeated small tensors, changed in place; the communicator on tensors", case_repeated_small_tensors)
run("calls", "broadcast and reduce", case_broadcast_reduce)
run("calls", "all_gather family and objects", case_all_gather)
run("calls", "reduce_scatter family", case_reduce_scatter)
run("calls", "coalesced and barrier", case_coalesced_and_barrier)
run("calls", "async semantics", case_async_semantics)
run("calls", "gather and scatter, tensors and objects", case_gather_scatter)
run("calls", "all_gather with uneven sizes", case_all_gather_uneven)
run("calls", "sparse all_reduce", case_sparse_all_reduce)
run("calls", "all_to_all and all_to_all_single, even and uneven", case_all_to_all)
run("calls", "send/recv/isend/irecv, any source, batch_isend_irecv", case_send_recv)
run("calls", "new_group and new_subgroups over proper subsets", case_subgroups)
run("calls", "monitored_barrier on the group", case_monitored_barrier)
run("calls", "a group's timeout=: the call raises, the group is broken, the job goes on", case_group_timeout_withdraws)
run("calls", "whole-world group, DeviceMesh, DTensor", case_whole_world_group_and_mesh)

# ------------------------------------------------------------------ DDP
B, STEPS = 8, 6


class Net(torch.nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(12, 16)
        self.b = torch.nn.Linear(16, 4)
        self.head = torch.nn.Linear(4, 1) if extra else None  # used on odd steps only (find_unused_parameters)

    def forward(self, x: torch.Tensor, use_head: bool = False) -> torch.Tensor:
        y = self.b(torch.tanh(self.a(x)))
        return self.head(y) if use_head else y


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(P * B, 12, generator=g, dtype=torch.float64), torch.randn(P * B, 4, generator=g,
                                                                                  dtype=torch.float64)


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y[:, : out.shape[1]]) ** 2).mean()


def reference_run(unused: bool, accumulate: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    m = Net(unused).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(STEPS):
        opt.zero_grad()
        for k in range(accumulate):
            x, y = batch(s * accumulate + k)
            loss_of(m(x, unused and s % 2 == 1), y).backward()
        opt.step()
    return m


def ddp_run(unused: bool, accumulate: int = 1, hook: object = None, state: object = None,
            pg: object = None, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    m = Net(unused).double()
    if R:  # DDP must broadcast rank 0's parameters
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
    d = torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=unused, process_group=pg,
                                                  bucket_cap_mb=0.001, **kw)
    if hook is not None:
        d.register_comm_hook(state, hook)
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    for s in range(STEPS):
        opt.zero_grad()
        for k in range(accumulate):
            x, y = batch(s * accumulate + k)
            sl = slice(R * B, (R + 1) * B)
            if k < accumulate - 1:
                with d.no_sync():
                    loss_of(d(x[sl], unused and s % 2 == 1), y[sl]).backward()
            else:
                loss_of(d(x[sl], unused and s % 2 == 1), y[sl]).backward()
        opt.step()
    return m


def close(a: torch.nn.Module, b: torch.nn.Module, tol: float, what: str) -> None:
    worst = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert worst <= tol, f"{what}: max |difference| {worst:.3g} > {tol}"


def case_ddp_plain() -> None:
    close(ddp_run(False), reference_run(False), 1e-6, "DDP")


def case_ddp_bucket_view() -> None:
    close(ddp_run(False, gradient_as_bucket_view=True), reference_run(False), 1e-6, "gradient_as_bucket_view")


def case_ddp_no_sync() -> None:
    # no_sync accumulates local gradients of 2 micro-batches; the reference sums the 2 full-batch gradients.
    close(ddp_run(False, accumulate=2), reference_run(False, accumulate=2), 1e-6, "no_sync")


def case_ddp_unused() -> None:
    close(ddp_run(True), reference_run(True), 1e-6, "find_unused_parameters")


def case_ddp_hooks() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as dh
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    # The compress hook rounds to 16 bits: against the reference at that rounding, and bitwise against the same
    # hook on gloo where the sum order cannot differ (P = 2). (torch's bf16_compress_hook refuses to run
    # without CUDA and NCCL, whatever the backend.)
    tol_gloo = 1e-6 if P == 2 else 2e-3
    for name, hook in (("fp16", dh.fp16_compress_hook),):
        ours = ddp_run(False, hook=hook)
        close(ours, ddp_run(False, hook=hook, pg=gloo_group()), tol_gloo, f"{name} compress vs the same on gloo")
        close(ours, reference_run(False), 3e-2 if name == "bf16" else 5e-3, f"{name} compress vs the reference")
    for use_err in (True, False):
        st = [ps.PowerSGDState(process_group=g, matrix_approximation_rank=2, start_powerSGD_iter=2,
                               use_error_feedback=use_err, warm_start=True, random_seed=7)
              for g in (None, gloo_group())]
        close(ddp_run(False, hook=ps.powerSGD_hook, state=st[0]),
              ddp_run(False, hook=ps.powerSGD_hook, state=st[1], pg=gloo_group()), 1e-6 if P == 2 else 1e-5,
              f"PowerSGD (error feedback {use_err}) vs the same on gloo")


run("ddp", "DDP vs the global-batch reference", case_ddp_plain)
run("ddp", "DDP gradient_as_bucket_view", case_ddp_bucket_view)
run("ddp", "DDP no_sync", case_ddp_no_sync)
run("ddp", "DDP find_unused_parameters", case_ddp_unused)
run("ddp", "DDP fp16 compress and PowerSGD hooks", case_ddp_hooks)


# ------------------------------------------------------------------ FSDP2
def case_fsdp2() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (P,))
    torch.manual_seed(0)
    m = Net().double()
    fully_shard(m.a, mesh=mesh)
    fully_shard(m.b, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(STEPS):
        opt.zero_grad()
        x, y = batch(s)
        sl = slice(R * B, (R + 1) * B)
        loss_of(m(x[sl]), y[sl]).backward()
        opt.step()
    ref = reference_run(False)
    worst = 0.0
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        full = p.full_tensor()
        worst = max(worst, float((full - q).abs().max()))
    assert worst <= 1e-5, f"FSDP2: max |difference| {worst:.3g}"


run("fsdp", "FSDP2 fully_shard vs the global-batch reference", case_fsdp2)


# ------------------------------------------------------------------ mismatches
def expect_mismatch(fn: object, what: str) -> None:
    t0 = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except col.CollectiveError as exc:
        took = time.monotonic() - t0
        assert took < 30, f"{what}: raised after {took:.1f} s"
        assert "rank" in str(exc), str(exc)
        return
    raise AssertionError(f"{what}: no error on rank {R}")


def case_mismatch_shape() -> None:
    expect_mismatch(lambda: dist.all_reduce(torch.ones(4 + R)), "all_reduce shapes differ")


def case_mismatch_dtype() -> None:
    expect_mismatch(lambda: dist.all_reduce(torch.ones(4, dtype=torch.float32 if R else torch.float64)),
                    "all_reduce dtypes differ")


def case_mismatch_async() -> None:
    expect_mismatch(lambda: dist.all_reduce(torch.ones(3 + R), async_op=True).wait(), "async shapes differ")


def case_mismatch_op() -> None:
    expect_mismatch(lambda: dist.all_reduce(torch.ones(4), op=RO.SUM if R else RO.MAX), "ops differ")


def case_mismatch_coalesced() -> None:
    """all_reduce_coalesced lists that differ in count or in a later tensor: every rank raises, nothing written."""
    for async_op in (False, True):
        for ts in ([torch.ones(4) for _ in range(2 + (R == 1))], [torch.ones(4), torch.ones(3 + (R == 1))]):
            before = [t.clone() for t in ts]

            def call() -> None:
                w = dist.all_reduce_coalesced(ts, async_op=async_op)
                if async_op:
                    w.wait()
            expect_mismatch(call, f"all_reduce_coalesced of {[tuple(t.shape) for t in ts]} async={async_op}")
            assert all(torch.equal(a, b) for a, b in zip(ts, before)), f"written before the error: {ts}"


def case_refused_arguments() -> None:
    """One rank's arguments refused by the backend itself (an op its dtype has not, list lengths, the root's
    outputs), sync and async: that rank raises its error at once, every other rank a mismatch naming it at once
    (not at the deadline), and the group goes on in step."""
    if P == 1:
        return
    bad = R == P - 1
    calls = {
        "BAND on floats": lambda a: dist.all_reduce(torch.ones(4), op=RO.BAND if bad else RO.SUM, async_op=a),
        "all_to_all list": lambda a: dist.all_to_all([torch.empty(1) for _ in range(P + bad)],
                                                     [torch.ones(1) for _ in range(P)], async_op=a),
        "all_gather list": lambda a: dist.all_gather([torch.empty(2) for _ in range(P + bad)], torch.ones(2),
                                                     async_op=a),
        "the root's gather outputs": lambda a: dist.gather(
            torch.ones(2), [torch.empty(2) for _ in range(P - 1)] if R == 0 else None, dst=0, async_op=a),
    }
    for what, call in calls.items():
        for async_op in (False, True):
            def go(call=call, async_op=async_op) -> None:
                w = call(async_op)
                if async_op and w is not None:
                    w.wait()
            t0 = time.monotonic()
            try:
                go()
            except col.CollectiveError as exc:
                took = time.monotonic() - t0
                assert took < 5, f"{what}: raised after {took:.1f} s"
                refuser = 0 if what == "the root's gather outputs" else P - 1
                if R != refuser:
                    assert isinstance(exc, col.CollectiveMismatchError) and f"rank {refuser}" in str(exc), str(exc)
            else:
                raise AssertionError(f"{what} async={async_op}: no error on rank {R}")
    t = torch.ones(2)
    dist.all_reduce(t)
    same(t, torch.full((2,), float(P)), "a call after the refusals")


def case_after_mismatch() -> None:
    t = torch.ones(2)
    dist.all_reduce(t)
    same(t, torch.full((2,), float(P)), "a call after the mismatches")


if P > 1:
    run("mismatch", "mismatch: shape", case_mismatch_shape)
    run("mismatch", "mismatch: dtype", case_mismatch_dtype)
    run("mismatch", "mismatch: async shape", case_mismatch_async)
    run("mismatch", "mismatch: op", case_mismatch_op)
    run("mismatch", "mismatch: all_reduce_coalesced lists", case_mismatch_coalesced)
    run("mismatch", "arguments one rank refuses", case_refused_arguments)
    run("mismatch", "a call after the mismatches", case_after_mismatch)

cases.finish()
dist.destroy_process_group()
