"""collective.horovod.torch under mpiexec: every call against values computed here from every rank's inputs.

Each rank's input is a function of its rank, so every rank computes every
other rank's input and the exact expected result locally. Cases cover the
ops (dtypes, reduction ops, scale factors, async, in place, grouped, uneven
allgather and reducescatter), autograd, name matching (out of order,
duplicates, mismatches raised on every rank), join, timeouts, object and
state helpers, DistributedOptimizer against a single-process reference,
SyncBatchNorm against BatchNorm on the global batch, alltoall (uneven splits,
gradients) and process sets (ops on a set, ranks outside it, removal).

Usage: horovod_api.py [--only ops,grad,match,helpers,optim,bn,alltoall,sets]
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
import torch
from harness import Cases

import collective as col
import collective.horovod.torch as hvd
from collective.horovod import HorovodInternalError
from collective.horovod.engine import Engine

ONLY = set(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else None
torch.set_num_threads(1)
hvd.init()
P, R = hvd.size(), hvd.rank()
cases = Cases(hvd.mpi_ops._state.comm)  # the harness's final tally runs after hvd.shutdown()

DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
          torch.float64]


def run(group: str, name: str, fn: object) -> None:
    if ONLY is None or group in ONLY:
        t0 = time.perf_counter()
        cases.run(name, fn)  # type: ignore[arg-type]
        if "--times" in sys.argv and R == 0:
            print(f"{name}: {time.perf_counter() - t0:.2f} s", flush=True)


def inp(r: int, shape: tuple = (3, 4), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank r's input: small integers (exact in every dtype) that differ per rank and element."""
    n = int(np.prod(shape))
    v = (np.arange(n) * 7 + r * 3 + 1) % 11 + r
    return torch.tensor(v.reshape(shape), dtype=torch.float64).to(dtype)


def eq(a: torch.Tensor, b: torch.Tensor, tol: float = 0.0) -> None:
    assert a.dtype == b.dtype, f"dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert d <= tol, f"max difference {d} > {tol}:\n{a}\n{b}"


def raises(exc: type, fn: object, match: str = "") -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except exc as e:
        assert match in str(e), f"{match!r} not in {e!r}"
        return e
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


# ------------------------------------------------------------------ ops
def c_basics() -> None:
    import os

    assert (R, P) == (int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"]))
    assert 0 <= hvd.local_rank() < hvd.local_size() <= P
    assert hvd.cross_size() >= 1 and 0 <= hvd.cross_rank() < hvd.cross_size()
    assert hvd.is_initialized() and hvd.mpi_built() and hvd.mpi_enabled() and hvd.mpi_threads_supported()
    assert not hvd.gloo_built() and not hvd.gloo_enabled() and not hvd.nccl_built() and not hvd.ccl_built()
    assert not hvd.ddl_built() and not hvd.cuda_built() and not hvd.rocm_built()
    assert hvd.is_homogeneous()
    assert hvd.allgather_object(R) == list(range(P))


def c_allreduce_ops() -> None:
    for dt in DTYPES:
        xs = [inp(r, (2, 3, 2), dt) for r in range(P)]
        wide = [x.double() for x in xs]
        exp = {hvd.Sum: sum(wide), hvd.Min: torch.stack(wide).min(0).values, hvd.Max: torch.stack(wide).max(0).values,
               hvd.Product: torch.stack(wide).prod(0)}
        if dt in (torch.uint8, torch.int8):
            exp[hvd.Sum] = sum(xs)  # wraps around exactly like the reduction
            exp[hvd.Product] = torch.stack(xs).prod(0, dtype=dt)
        for op, e in exp.items():
            got = hvd.allreduce(xs[R], op=op, name=f"ops.{dt}.{op}")
            eq(got, e.to(dt), 0.0)
        avg = hvd.allreduce(xs[R], name=f"avg.{dt}")  # Average is the default
        if dt in (torch.float32, torch.float64):  # the sum times 1 / size, as Horovod averages
            eq(avg, sum(wide).to(dt) * (1.0 / P), 0.0)
        elif dt.is_floating_point:
            eq(avg, (sum(wide) / P).to(dt), 1e-2 * P)
        else:
            eq(avg, torch.div(sum(xs) if dt in (torch.uint8, torch.int8) else sum(wide).to(dt), P,
                              rounding_mode="trunc").to(dt))
        assert torch.equal(xs[R], inp(R, (2, 3, 2), dt)), "allreduce modified its input"


def c_allreduce_flags() -> None:
    xs = [inp(r, (5,), torch.float64) for r in range(P)]
    s = sum(xs)
    eq(hvd.allreduce(xs[R], average=False), s)
    eq(hvd.allreduce(xs[R], average=True), s * (1.0 / P))
    raises(ValueError, lambda: hvd.allreduce(xs[R], average=True, op=hvd.Sum), "supersedes")
    eq(hvd.allreduce(xs[R], op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0), s * 1.5)
    eq(hvd.allreduce(xs[R], op=hvd.Average, postscale_factor=2.0), s * (2.0 / P))
    # integers scale in float64 and truncate, as in Horovod
    xi = [inp(r, (5,), torch.int32) for r in range(P)]
    pre = sum((x.double() * 0.3).to(torch.int32) for x in xi)
    eq(hvd.allreduce(xi[R], op=hvd.Sum, prescale_factor=0.3), pre)
    t = xs[R].clone()
    out = hvd.allreduce_(t, op=hvd.Sum)
    assert out is t
    eq(t, s)
    raises(NotImplementedError, lambda: hvd.allreduce(xs[R], op=hvd.Adasum), "Adasum")
    eq(hvd.allreduce(xs[R].float(), op=hvd.Sum, compression=hvd.Compression.fp16), s.float())
    assert hvd.Compression.fp16.compress(xs[R])[0].dtype == torch.float16


def c_in_place() -> None:
    """In-place results land in the caller's tensors: every dtype, scale factors, Average, fused and strided."""
    for dt in DTYPES:
        xs = [inp(r, (3, 5), dt) for r in range(P)]
        wide = [x.double() if dt.is_floating_point else x.long() for x in xs]
        for op, pre, post in ((hvd.Sum, 1.0, 1.0), (hvd.Average, 1.0, 1.0), (hvd.Sum, 0.5, 3.0)):
            want = hvd.allreduce(xs[R], op=op, prescale_factor=pre, postscale_factor=post, name=f"ref.{dt}")
            t = xs[R].clone()
            ptr = t.data_ptr()
            got = hvd.allreduce_(t, op=op, prescale_factor=pre, postscale_factor=post, name=f"ip.{dt}")
            assert got is t and t.data_ptr() == ptr, "allreduce_ did not return its own tensor"
            eq(t, want)
        if dt in (torch.float32, torch.float64):
            eq(want, (sum(wide) * 1.5).to(dt))
    # A finished handle's result is final: once poll() says done, the tensor holds the average (or the scaled sum)
    # before synchronize runs anything on this thread; one tensor alone and several fused.
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        for op, post in ((hvd.Average, 1.0), (hvd.Sum, 2.0), (hvd.Average, 3.0)):
            factor = post / P if op == hvd.Average else post
            xs = [[inp(r + k, (4, 3), dt) for k in range(3)] for r in range(P)]
            for group in (False, True):
                mine = [x.clone() for x in xs[R]]
                h = (hvd.grouped_allreduce_async_(mine, op=op, postscale_factor=post, name=f"poll.{dt}") if group
                     else hvd.allreduce_async_(mine[0], op=op, postscale_factor=post, name=f"poll.{dt}"))
                while not hvd.poll(h):
                    time.sleep(0.0005)
                if dt != torch.bfloat16:  # bfloat16 results come back through a copy, in synchronize
                    for k in range(3 if group else 1):
                        eq(mine[k], (sum(x[k].double() for x in xs) * factor).to(dt), tol=1e-4)
                hvd.synchronize(h)
                for k in range(3 if group else 1):
                    eq(mine[k], (sum(x[k].double() for x in xs) * factor).to(dt), tol=0.25 if dt == torch.bfloat16
                       else 1e-4)
    # several tensors of one dtype in one op travel in the engine's fusion buffer, reused from op to op
    for rnd in range(3):
        xs = [[inp(r + rnd, (k + 2, 3)) for k in range(5)] for r in range(P)]
        mine = [x.clone() for x in xs[R]]
        hvd.grouped_allreduce_(mine, op=hvd.Sum, name="ip.grouped")
        for k, got in enumerate(mine):
            eq(got, sum(x[k] for x in xs))
    # a strided tensor receives its result through a copy
    base = inp(R, (4, 6))
    view = base[:, ::2]
    hvd.allreduce_(view, op=hvd.Sum, name="ip.strided")
    eq(view, sum(inp(r, (4, 6))[:, ::2] for r in range(P)))
    eq(base[:, 1::2], inp(R, (4, 6))[:, 1::2])


def c_async_grouped() -> None:
    xs = [[inp(r, (4, k + 1), torch.float32) for k in range(4)] for r in range(P)]
    hs = [hvd.allreduce_async(xs[R][k], op=hvd.Sum, name=f"async.{k}") for k in range(4)]
    for k, h in enumerate(hs):
        eq(hvd.synchronize(h), sum(x[k] for x in xs))
        raises(ValueError, lambda h=h: hvd.poll(h), "unknown handle")
    h = hvd.allreduce_async(xs[R][0], op=hvd.Max)
    while not hvd.poll(h):
        pass
    eq(hvd.synchronize(h), torch.stack([x[0] for x in xs]).max(0).values)
    mixed = [inp(R, (3,), torch.int64), inp(R, (2, 2), torch.float32), inp(R, (1,), torch.float64)]
    want = [sum(inp(r, m.shape, m.dtype) for r in range(P)) for m in mixed]
    for got, w in zip(hvd.grouped_allreduce(mixed, op=hvd.Sum), want):
        eq(got, w)
    for got, w in zip(hvd.synchronize(hvd.grouped_allreduce_async(mixed, op=hvd.Sum)), want):
        eq(got, w)
    copies = [m.clone() for m in mixed]
    hvd.grouped_allreduce_(copies, op=hvd.Sum)
    for got, w in zip(copies, want):
        eq(got, w)
    copies = [m.clone() for m in mixed]
    for got, w in zip(hvd.synchronize(hvd.grouped_allreduce_async_(copies, op=hvd.Average)), want):
        # floats: the average and postscale are one factor, as in Horovod (sum * (postscale / size))
        eq(got, torch.div(w, P, rounding_mode="trunc") if not w.is_floating_point() else w * (1.0 / P))


def c_allgather() -> None:
    for dt in (torch.int16, torch.float32, torch.bfloat16, torch.bool):
        xs = [inp(r, (r + 1, 2, 3), torch.float32).to(dt) for r in range(P)]
        eq(hvd.allgather(xs[R]), torch.cat(xs))
    even = [inp(r, (2, 2)) for r in range(P)]
    eq(hvd.synchronize(hvd.allgather_async(even[R], name="ag.even")), torch.cat(even))
    # a rank with no rows at all
    xs = [inp(r, (0 if r == 0 else 2, 3)) for r in range(P)]
    eq(hvd.allgather(xs[R]), torch.cat(xs))
    group = [[inp(r, (r + 1,)), inp(r, (2, 1 + r % 2 * 0), torch.int64)] for r in range(P)]
    got = hvd.grouped_allgather(group[R])
    eq(got[0], torch.cat([g[0] for g in group]))
    eq(got[1], torch.cat([g[1] for g in group]))
    raises(ValueError, lambda: hvd.allgather(torch.tensor(1.0)), "0-d")


def c_broadcast() -> None:
    for root in range(P):
        xs = [inp(r, (3, 2), torch.float64) for r in range(P)]
        eq(hvd.broadcast(xs[R], root, name=f"bc.{root}"), xs[root])
        t = xs[R].clone()
        assert hvd.broadcast_(t, root) is t
        eq(t, xs[root])
        t = inp(R, (), torch.int64)
        hvd.synchronize(hvd.broadcast_async_(t, root))
        eq(t, inp(root, (), torch.int64))
    raises(ValueError, lambda: hvd.broadcast(inp(R), P), "root_rank")


def c_reducescatter() -> None:
    for rows in (2 * P, 2 * P + 1, P - 1):
        xs = [inp(r, (rows, 3), torch.float64) for r in range(P)]
        full = sum(xs)
        blocks = torch.tensor_split(full, P) if rows else [full] * P
        eq(hvd.reducescatter(xs[R], op=hvd.Sum), blocks[R])
        eq(hvd.reducescatter(xs[R]), blocks[R] / P)
        eq(hvd.reducescatter(xs[R], op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5), blocks[R])
    xi = [inp(r, (2 * P,), torch.int32) for r in range(P)]
    eq(hvd.synchronize(hvd.reducescatter_async(xi[R], op=hvd.Sum)), torch.tensor_split(sum(xi), P)[R])
    g = [[inp(r, (P, 2)), inp(r, (P + 1,), torch.float64)] for r in range(P)]
    got = hvd.grouped_reducescatter(g[R], op=hvd.Sum)
    eq(got[0], torch.tensor_split(sum(x[0] for x in g), P)[R])
    eq(got[1], torch.tensor_split(sum(x[1] for x in g), P)[R])
    raises(ValueError, lambda: hvd.reducescatter(torch.tensor(1.0)), "0-d")
    raises(NotImplementedError, lambda: hvd.reducescatter(inp(R), op=hvd.Adasum), "Adasum")


# ------------------------------------------------------------------ autograd
def c_grads() -> None:
    x = inp(R, (4, 2), torch.float64).requires_grad_()
    (hvd.allreduce(x, op=hvd.Sum) * (R + 1)).sum().backward()
    eq(x.grad, torch.full((4, 2), float(sum(r + 1 for r in range(P))), dtype=torch.float64))
    x = inp(R, (4, 2), torch.float64).requires_grad_()
    hvd.allreduce(x).sum().backward()  # Average: gradient averaged too
    eq(x.grad, torch.ones(4, 2, dtype=torch.float64))
    # allgather: d/dx of sum(w * gather(x)) is rank-averaged w restricted to this rank's rows
    rows = [r + 1 for r in range(P)]
    x = inp(R, (rows[R], 2), torch.float64).requires_grad_()
    w = torch.arange(sum(rows) * 2, dtype=torch.float64).reshape(-1, 2)
    (hvd.allgather(x) * w * (R + 1)).sum().backward()
    off = sum(rows[:R])
    eq(x.grad, w[off:off + rows[R]] * sum(r + 1 for r in range(P)) / P)
    # broadcast: the root gets the averaged gradient, the others zeros
    x = inp(R, (3,), torch.float64).requires_grad_()
    (hvd.broadcast(x, 0) * (R + 1)).sum().backward()
    eq(x.grad, torch.full((3,), sum(r + 1 for r in range(P)) / P if R == 0 else 0.0, dtype=torch.float64))
    # reducescatter(Sum): every rank's gradient is the allgather of the output gradients
    x = inp(R, (2 * P, 2), torch.float64).requires_grad_()
    (hvd.reducescatter(x, op=hvd.Sum) * (R + 1)).sum().backward()
    exp = torch.cat([torch.full((2, 2), float(r + 1), dtype=torch.float64) for r in range(P)]) * P
    eq(x.grad, exp)
    xs = [inp(R, (2,), torch.float64).requires_grad_(), inp(R, (3,), torch.float64).requires_grad_()]
    outs = hvd.grouped_allreduce(xs, op=hvd.Sum)
    (outs[0].sum() + 2 * outs[1].sum()).backward()
    eq(xs[0].grad, torch.full((2,), float(P), dtype=torch.float64))
    eq(xs[1].grad, torch.full((3,), 2.0 * P, dtype=torch.float64))


# ------------------------------------------------------------------ matching, errors
def c_matching() -> None:
    a, b = inp(R, (3,)), inp(R, (5,))
    names = ["m.a", "m.b"] if R % 2 == 0 else ["m.b", "m.a"]
    src = {"m.a": a, "m.b": b}
    hs = {n: hvd.allreduce_async(src[n], op=hvd.Sum, name=n) for n in names}
    eq(hvd.synchronize(hs["m.a"]), sum(inp(r, (3,)) for r in range(P)))
    eq(hvd.synchronize(hs["m.b"]), sum(inp(r, (5,)) for r in range(P)))
    h = hvd.allreduce_async(a, name="dup")
    raises(ValueError, lambda: hvd.allreduce_async(a, name="dup"), "already in flight")
    hvd.synchronize(h)
    # The same name straight after a first call that has already finished (the other ranks announced it
    # long before) is still refused: the name stays reserved until the caller has seen the op finish.
    if R == 0:
        first = hvd.allreduce_async(a, name="dup.late", op=hvd.Sum)
    hvd.barrier()
    if R != 0:
        first = hvd.allreduce_async(a, name="dup.late", op=hvd.Sum)
        time.sleep(0.3)  # ample time for the op to finish everywhere
        raises(ValueError, lambda: hvd.allreduce_async(a, name="dup.late"), "already in flight")
    eq(hvd.synchronize(first), sum(inp(r, (3,)) for r in range(P)))
    # poll returning True frees the name too
    h = hvd.allreduce_async(a, name="dup.poll", op=hvd.Sum)
    while not hvd.poll(h):
        time.sleep(0.001)
    h2 = hvd.allreduce_async(b, name="dup.poll", op=hvd.Sum)
    eq(hvd.synchronize(h), sum(inp(r, (3,)) for r in range(P)))
    eq(hvd.synchronize(h2), sum(inp(r, (5,)) for r in range(P)))
    # mismatches: raised on every rank, nothing moves, the next op works
    raises(HorovodInternalError, lambda: hvd.allreduce(inp(R, (3 + R,)), name="mm.shape"), "shape")
    raises(RuntimeError, lambda: hvd.allreduce(inp(R, (3,), torch.float32 if R else torch.float64)), "dtype")
    raises(HorovodInternalError, lambda: hvd.broadcast(inp(R), R), "root")
    raises(HorovodInternalError, lambda: hvd.allreduce(inp(R), op=hvd.Sum if R else hvd.Max, name="mm.op"), "op")
    raises(HorovodInternalError, lambda: hvd.allgather(inp(R, (2, 2 + R))), "beyond the first dimension")
    nm = "mm.kind"
    raises(HorovodInternalError, lambda: (hvd.allreduce(inp(R), name=nm) if R else hvd.allgather(inp(R), name=nm)),
           "called")
    eq(hvd.allreduce(a, op=hvd.Sum), sum(inp(r, (3,)) for r in range(P)))
    raises(ValueError, lambda: hvd.allreduce([1.0]), "torch.Tensor")


def c_timeout_names_missing_ranks() -> None:
    eng = Engine(col.Communicator())
    try:
        x = np.ones(3, np.float32)
        if R == 0:
            h = eng.submit("allreduce", "lonely", [x], op="sum")
            e = raises(HorovodInternalError, lambda: h.wait(1.0), "still waiting for rank(s)")
            assert str(list(range(1, P))) in str(e), e
        eng.submit("barrier", "b1", []).wait()
        if R != 0:
            eng.submit("allreduce", "lonely", [x], op="sum").wait()
        else:
            assert np.array_equal(h.wait(), [x * P])
        # An op whose deadline passed is withdrawn on every rank: its name is free again, and the
        # withdrawn data never meets a later op of the same name.
        if R == 0:
            eng.timeout = 1.0
            stale = eng.submit("allreduce", "gone", [np.full(3, 100.0, np.float32)], op="sum")
            raises(HorovodInternalError, stale.wait, "still waiting")
            eng.timeout = 60.0
        eng.submit("barrier", "b2", []).wait()
        got = eng.submit("allreduce", "gone", [x], op="sum").wait()
        assert np.array_equal(got, [x * P]), got
        # A withdrawn op that every rank had already requested still runs (the others need this rank's part):
        # with the data as it was at the deadline, and its result never lands in the caller's array, which the
        # caller owns again once told of the failure. The engine holds the op until rank 0's deadline passed:
        # rank 0's engine thread runs the tick that finds it ready (its caller waits only once that tick holds it).
        gate, entered = threading.Event(), threading.Event()
        run_ready = eng._run_ready

        def gated() -> None:
            with eng._lock:
                ready = "late" in eng._table and len(eng._table["late"].reqs) == P
            if ready:
                entered.set()
                gate.wait(60)
            run_ready()

        eng._run_ready = gated  # type: ignore[method-assign]
        mine = np.full(3, float(R + 1), np.float32)
        if R == 0:
            eng.timeout = 1.0
            late = eng.submit("allreduce", "late", [mine], outs=[mine], op="sum")
            assert entered.wait(60)
            raises(HorovodInternalError, late.wait, "not finished")
            eng.timeout = 60.0
            mine[:] = -1.0  # the caller reuses its array
            gate.set()
        else:
            gate.set()
            got = eng.submit("allreduce", "late", [mine], outs=[mine], op="sum").wait()
            assert np.array_equal(mine, np.full(3, P * (P + 1) / 2, np.float32)), mine
        eng.submit("barrier", "b3", []).wait()
        assert R != 0 or np.array_equal(mine, np.full(3, -1.0, np.float32)), mine
    finally:
        eng.shutdown()


def c_timeout_races_completion() -> None:
    """A wait whose time runs out while the engine thread completes its op returns the op's result.

    Rank 0's engine thread (not its caller) runs each op here; a hook holds it
    at the moment the race is about: between the op's completion (its outs
    written) and the publication of its handle's result, or inside the data
    collective once the op is taken. Rank 0's caller waits only once the hook
    holds the engine thread, so its deadline always passes inside the window.
    """
    from collective.horovod import engine as engmod

    eng = Engine(col.Communicator())
    finish, fused = engmod.Handle._finish, engmod._fused_allreduce
    entered = threading.Event()
    hold = {"finish": "", "fused": 0.0}

    def slow_finish(h: engmod.Handle, result: object, exc: BaseException | None) -> None:
        if h.engine is eng and h.name == hold["finish"]:
            entered.set()
            time.sleep(0.5)  # the engine thread descheduled between the op's completion and its publication
        finish(h, result, exc)

    def slow_fused(comm: object, arrays: list, *a: object, **kw: object) -> list:
        if comm is eng.comm and hold["fused"]:
            entered.set()
            time.sleep(hold["fused"])  # the data collective of a taken op outlasts the caller's deadline
        return fused(comm, arrays, *a, **kw)  # type: ignore[arg-type]

    engmod.Handle._finish = slow_finish  # type: ignore[method-assign]
    engmod._fused_allreduce = slow_fused
    try:
        want = np.full(3, P * (P + 1) / 2, np.float32)
        for name, how in (("raced_wait", "wait"), ("raced_deadline", "deadline"), ("raced_poll", "wait_done")):
            mine = np.full(3, float(R + 1), np.float32)
            if R == 0:
                entered.clear()
                hold["finish"] = name
                h = eng.submit("allreduce", name, [mine], outs=[mine], op="sum")  # the engine thread runs it
                assert entered.wait(60), name
                if how == "wait":
                    got = h.wait(0.05)
                elif how == "deadline":
                    eng.timeout = 0.05
                    got = h.wait()
                    eng.timeout = 60.0
                else:
                    assert h.wait_done(0.05), name
                    got = h.wait(0.0)
                hold["finish"] = ""
                assert np.array_equal(got[0], want), (name, got)
            else:
                eng.submit("allreduce", name, [mine], outs=[mine], op="sum").wait()
            assert np.array_equal(mine, want), (name, mine)
            eng.submit("barrier", "b_" + name, []).wait()
        # Taken: rank 0's deadline passes while its op's data collective runs. The op cannot be withdrawn any
        # more (every rank runs it, and it writes rank 0's array), so the wait returns its result.
        mine = np.full(3, float(R + 1), np.float32)
        if R == 0:
            entered.clear()
            hold["fused"] = 3.0
            h = eng.submit("allreduce", "taken", [mine], outs=[mine], op="sum")
            assert entered.wait(60)
            eng.timeout = 2.0
            got = h.wait()
            eng.timeout = 60.0
            hold["fused"] = 0.0
            assert np.array_equal(got[0], want), got
        else:
            eng.submit("allreduce", "taken", [mine], outs=[mine], op="sum").wait()
        assert np.array_equal(mine, want), mine
        eng.submit("barrier", "b_taken", []).wait()
    finally:
        engmod.Handle._finish = finish  # type: ignore[method-assign]
        engmod._fused_allreduce = fused
        eng.timeout = 60.0
        eng.shutdown()


def c_join() -> None:
    for first in range(P):
        if R == first:
            last = hvd.join()
        else:
            ha = hvd.allreduce_async(inp(R, (4,), torch.int32), name="join.a", op=hvd.Sum)
            hb = hvd.allreduce_async(inp(R, (2, 2), torch.float64), name="join.b")
            eq(hvd.synchronize(ha), sum(inp(r, (4,), torch.int32) for r in range(P) if r != first))
            eq(hvd.synchronize(hb), sum(inp(r, (2, 2), torch.float64) for r in range(P) if r != first) * (1.0 / P))
            if P > 1:
                # named: the joined rank skips this call, so auto-generated names would differ from here on
                raises(HorovodInternalError, lambda f=first: hvd.allgather(inp(R), name=f"join.ag.{f}"), "join")
            last = hvd.join()
        assert last != first or P == 1, (last, first)
        assert hvd.allgather_object(last) == [last] * P


def c_elastic_and_timeline() -> None:
    # hvd.elastic without a failure (tests/test_horovod_elastic.py kills ranks): run syncs rank 0's state first.
    state = hvd.elastic.TorchState(epoch=R, sampler=hvd.elastic.ElasticSampler(list(range(2 * P + 1))))
    got = hvd.elastic.run(lambda st, k: (st.epoch, len(st.sampler), k))(state, k=R)
    assert got == (0, 3, R), got
    raises(NotImplementedError, lambda: hvd.start_timeline("/tmp/x"), "timeline")


# ------------------------------------------------------------------ helpers
def c_helpers() -> None:
    torch.manual_seed(R)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    hvd.broadcast_parameters(model.state_dict(), root_rank=P - 1)
    got = hvd.allgather_object({k: v.clone() for k, v in model.state_dict().items()})
    for other in got:
        for k, v in model.state_dict().items():
            assert torch.equal(other[k], v), k
    opt = torch.optim.Adam(model.parameters(), lr=0.1 * (R + 1), betas=(0.8 + 0.01 * R, 0.99))
    if R == 0:  # only the root has state: the others create theirs
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    sd = hvd.broadcast_object(opt.state_dict(), root_rank=0)
    mine = opt.state_dict()
    assert mine["param_groups"][0]["lr"] == sd["param_groups"][0]["lr"] == 0.1
    assert mine["param_groups"][0]["betas"] == sd["param_groups"][0]["betas"]
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(mine["state"][pid][k]), torch.as_tensor(v)), (pid, k)
    obj = {"rank": R, "s": "x" * (R * 100)}
    assert hvd.broadcast_object(obj, root_rank=P - 1) == {"rank": P - 1, "s": "x" * ((P - 1) * 100)}
    assert hvd.allgather_object(obj) == [{"rank": r, "s": "x" * (r * 100)} for r in range(P)]
    hvd.barrier()


# ------------------------------------------------------------------ DistributedOptimizer
def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _train(opt_cls: type, kw: dict, passes: int, steps: int, dist: dict | None) -> list[torch.Tensor]:
    """Train; with ``dist`` each rank its shard through DistributedOptimizer, else one process on all shards."""
    model = _net()
    opt = opt_cls(model.parameters(), **kw)
    if dist is not None:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), backward_passes_per_step=passes,
                                       **dist)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batches = [[(torch.randn(4, 5, generator=g, dtype=torch.float64),
                     torch.randn(4, 3, generator=g, dtype=torch.float64)) for _ in range(passes)] for _ in range(P)]
        opt.zero_grad()
        if dist is not None:
            for x, y in batches[R]:
                torch.nn.functional.mse_loss(model(x), y).backward()
        else:  # sum over passes, mean over ranks: what DistributedOptimizer(op=Average) computes
            for r in range(P):
                for x, y in batches[r]:
                    (torch.nn.functional.mse_loss(model(x), y) / P).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def c_optimizer() -> None:
    for opt_cls, kw in ((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.01})):
        for passes in (1, 3):
            ref = _train(opt_cls, kw, passes, 4, None)
            for dist in ({}, {"groups": 2}, {"gradient_predivide_factor": 2.0}, {"groups": [[]]}):
                got = _train(opt_cls, kw, passes, 4, dist)
                for a, b in zip(got, ref):
                    eq(a, b, 1e-6)
    # op=Sum: the reference sums over ranks
    got = _train(torch.optim.SGD, {"lr": 0.05 / P}, 1, 3, {"op": hvd.Sum})
    ref = _train(torch.optim.SGD, {"lr": 0.05}, 1, 3, None)
    for a, b in zip(got, ref):
        eq(a, b, 1e-6)
    # fp16 compression: every rank ends with the same parameters, close to the reference
    got = _train(torch.optim.SGD, {"lr": 0.1}, 1, 3, {"compression": hvd.Compression.fp16})
    ref = _train(torch.optim.SGD, {"lr": 0.1}, 1, 3, None)
    for a, b in zip(got, ref):
        eq(a, b, 5e-3)
        assert all(torch.equal(a, o) for o in hvd.allgather_object(a))


def c_optimizer_rules() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    raises(ValueError, lambda: hvd.DistributedOptimizer(opt, named_parameters=named[:1]), "not named")
    raises(ValueError, lambda: hvd.DistributedOptimizer(opt, named_parameters=[named[0], named[0]] + named[1:]),
           "unique")
    raises(ValueError, lambda: hvd.DistributedOptimizer(opt, backward_passes_per_step=0), "> 0")
    raises(ValueError, lambda: hvd.DistributedOptimizer(opt, op=hvd.Sum, gradient_predivide_factor=2.0), "predivide")
    raises(NotImplementedError, lambda: hvd.DistributedOptimizer(opt, op=hvd.Adasum), "Adasum")
    d = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    raises(AssertionError, lambda: d.zero_grad(), "zero_grad")
    d.synchronize()
    with d.skip_synchronize():
        d.step()
    # a parameter unused on some ranks still gets the other ranks' gradient (every rank submits it)
    model = _net()
    d = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), named_parameters=model.named_parameters())
    before = model[2].weight.detach().clone()
    x = torch.randn(2, 5, dtype=torch.float64)
    (model(x).sum() if R == 0 else model[0](x).sum()).backward()
    d.step()
    got = hvd.allgather_object(model[2].weight.detach())
    assert all(torch.equal(g, got[0]) for g in got)
    assert not torch.equal(model[2].weight.detach(), before)


def c_sparse() -> None:
    for dense in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True).double()
        ref = torch.nn.Embedding(10, 3).double()
        ref.load_state_dict(emb.state_dict())
        opt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.5),
                                       named_parameters=emb.named_parameters(), sparse_as_dense=dense)
        ropt = torch.optim.SGD(ref.parameters(), lr=0.5)
        idx = [torch.tensor([r, (3 * r + 1) % 10, 2]) for r in range(P)]
        emb(idx[R]).sum().backward()
        opt.step()
        for r in range(P):
            (ref(idx[r]).sum() / P).backward()
        ropt.step()
        eq(emb.weight.detach(), ref.weight.detach(), 1e-12)


def c_sync_batch_norm() -> None:
    torch.manual_seed(3)
    xs = [torch.randn(3 + r, 4, 2, dtype=torch.float64) for r in range(P)]  # uneven per-rank batches
    bn = hvd.SyncBatchNorm(4).double()
    ref = torch.nn.BatchNorm1d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.arange(4.0) + 1)
        bn.bias.copy_(torch.arange(4.0))
        ref.load_state_dict(bn.state_dict())
    x = xs[R].clone().requires_grad_()
    y = bn(x)
    w = torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape)
    (y * w).sum().backward()
    xr = torch.cat(xs).requires_grad_()
    yr = ref(xr)
    off = sum(x.shape[0] for x in xs[:R])
    ws = [torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape) for t in xs]
    (yr * torch.cat(ws)).sum().backward()
    eq(y.detach(), yr[off:off + xs[R].shape[0]].detach(), 1e-10)
    eq(x.grad, xr.grad[off:off + xs[R].shape[0]], 1e-10)
    eq(bn.running_mean, ref.running_mean, 1e-12)
    eq(bn.running_var, ref.running_var, 1e-12)
    # each rank holds its rows' part of the affine gradients; summed they are the global batch's
    eq(hvd.allreduce(bn.weight.grad, op=hvd.Sum), ref.weight.grad, 1e-9)
    eq(hvd.allreduce(bn.bias.grad, op=hvd.Sum), ref.bias.grad, 1e-9)
    bn.eval()
    eq(bn(xs[R]), ref.eval()(xs[R]), 1e-12)


# ------------------------------------------------------------------ alltoall
def _a2a_input(r: int, splits: list[int], extra: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank r's alltoall input: small integers (exact in every dtype) that differ per rank and row; ``extra`` rows
    at the end are never sent."""
    rows = sum(splits) + extra
    return ((torch.arange(rows * 2, dtype=torch.float64).reshape(rows, 2) * 3 + 17 * r) % 120).to(dtype)


def _a2a_expected(splits_of: list[list[int]], me: int, members: list[int], dtype: torch.dtype) -> torch.Tensor:
    """What set rank ``me`` receives: from each member k (in set order), rows ``splits_of[k]`` routes to ``me``."""
    parts = []
    for k, r in enumerate(members):
        sp = splits_of[k]
        src = _a2a_input(r, sp, dtype=dtype)
        parts.append(src[sum(sp[:me]):sum(sp[:me]) + sp[me]])
    return torch.cat(parts)


def c_alltoall() -> None:
    everyone = list(range(P))
    # uneven splits, some zero, every dtype; the received splits come back as an int32 tensor
    for dt in DTYPES + [torch.int16, torch.bool]:
        splits_of = [[(q + r) % 3 for q in range(P)] for r in range(P)]
        x = _a2a_input(R, splits_of[R], dtype=dt)
        for sp in (splits_of[R], torch.tensor(splits_of[R], dtype=torch.int32)):
            out, recv = hvd.alltoall(x, splits=sp)
            assert recv.dtype == torch.int32 and recv.tolist() == [splits_of[r][R] for r in range(P)], recv
            eq(out, _a2a_expected(splits_of, R, everyone, dt))
    # equal split without splits: the output alone
    x = torch.arange(3 * P * 2, dtype=torch.int64).reshape(3 * P, 2) + 100 * R
    want = torch.cat([(torch.arange(3 * P * 2, dtype=torch.int64).reshape(3 * P, 2) + 100 * r)[3 * R:3 * R + 3]
                      for r in range(P)])
    eq(hvd.alltoall(x), want)
    out, recv = hvd.synchronize(hvd.alltoall_async(x, name="a2a.async"))
    eq(out, want)
    assert recv.tolist() == [3] * P
    # rows beyond sum(splits) are not sent; a rank may send nothing at all
    splits_of = [[0] * P if r == 0 else [1 + (r + q) % 2 for q in range(P)] for r in range(P)]
    out, recv = hvd.alltoall(_a2a_input(R, splits_of[R], extra=2), splits=splits_of[R])
    eq(out, _a2a_expected(splits_of, R, everyone, torch.float32))
    assert recv.tolist() == [splits_of[r][R] for r in range(P)]
    # 3-d rows
    x3 = torch.arange(2 * P * 6, dtype=torch.float64).reshape(2 * P, 2, 3) + 10 * R
    want3 = torch.cat([(torch.arange(2 * P * 6, dtype=torch.float64).reshape(2 * P, 2, 3) + 10 * r)[2 * R:2 * R + 2]
                       for r in range(P)])
    eq(hvd.alltoall(x3), want3)
    # gradient: each row's gradient is the upstream gradient at the place it landed on its destination
    splits_of = [[1 + (r + 2 * q) % 3 for q in range(P)] for r in range(P)]
    x = _a2a_input(R, splits_of[R], extra=1, dtype=torch.float64).requires_grad_()
    out, recv = hvd.alltoall(x, splits=splits_of[R])
    weight = lambda d, n: torch.arange(n * 2, dtype=torch.float64).reshape(n, 2) * (d + 1) + 0.5
    (out * weight(R, out.shape[0])).sum().backward()
    grad = torch.zeros_like(x)
    for d in range(P):
        landed = sum(splits_of[r][d] for r in range(R))  # rows rank d got from lower ranks first
        n_d = sum(splits_of[r][d] for r in range(P))
        lo = sum(splits_of[R][:d])
        grad[lo:lo + splits_of[R][d]] = weight(d, n_d)[landed:landed + splits_of[R][d]]
    eq(x.grad, grad)
    x = torch.arange(2 * P, dtype=torch.float64).requires_grad_()
    (hvd.alltoall(x) * (R + 1)).sum().backward()
    eq(x.grad, torch.tensor([float(d + 1) for d in range(P) for _ in range(2)], dtype=torch.float64))
    # bad input: raised here, before anything is sent
    raises(ValueError, lambda: hvd.alltoall(torch.ones(P + 1)), "multiple")
    raises(ValueError, lambda: hvd.alltoall(torch.ones(P), splits=torch.ones(P)), "int32")
    raises(ValueError, lambda: hvd.alltoall(torch.ones(P - 1), splits=[1] * P), "exceed")
    raises(ValueError, lambda: hvd.alltoall(torch.ones(P), splits=[1] * (P + 1)), "splits")
    raises(ValueError, lambda: hvd.alltoall(torch.tensor(1.0)), "0-d")
    # disagreements: raised on every rank, the next op works
    raises(HorovodInternalError, lambda: hvd.alltoall(torch.ones(P, 1 + R), name="a2a.mm"), "beyond the first")
    raises(HorovodInternalError, lambda: hvd.alltoall(torch.ones(P, dtype=torch.float32 if R else torch.float64)),
           "dtype")
    eq(hvd.alltoall(x.detach()), torch.cat([torch.arange(2 * P, dtype=torch.float64)[2 * R:2 * R + 2]] * P))


# ------------------------------------------------------------------ process sets
def c_process_sets() -> None:
    even = [r for r in range(P) if r % 2 == 0]
    odd = [r for r in range(P) if r % 2 == 1]
    tail = list(range(1, P)) if P > 1 else [0]
    sets = {}
    for ranks in (even, odd, tail):
        if ranks and tuple(ranks) not in sets:
            sets[tuple(ranks)] = hvd.add_process_set(ranks)
    ids = [ps.process_set_id for ps in sets.values()]
    assert len(set(ids)) == len(ids) and 0 not in ids, ids
    assert hvd.allgather_object(ids) == [ids] * P
    raises(ValueError, lambda: hvd.add_process_set(even), "already exists")
    raises(ValueError, lambda: hvd.add_process_set([0, P]), "distinct")
    for ranks, ps in sets.items():
        members = list(ranks)
        n = len(members)
        assert ps.size() == n and ps.included() == (R in members)
        assert ps.rank() == (members.index(R) if R in members else -1)
        x = inp(R, (2 * n + 1, 3), torch.float64)
        glob = f"both.all.{ps.process_set_id}"
        want_all = sum(inp(r, (4,), torch.float64) for r in range(P))
        if R not in members:  # a rank outside the set: refused here, nothing sent
            raises(ValueError, lambda ps=ps, x=x: hvd.allreduce(x, process_set=ps), "not a member")
            raises(ValueError, lambda ps=ps: hvd.barrier(process_set=ps), "not a member")
            eq(hvd.allreduce(inp(R, (4,), torch.float64), op=hvd.Sum, name=glob), want_all)
            continue
        me = members.index(R)
        xs = [inp(r, (2 * n + 1, 3), torch.float64) for r in members]
        eq(hvd.allreduce(x, op=hvd.Sum, process_set=ps), sum(xs))
        eq(hvd.allreduce(x, process_set=ps), sum(xs) / n)
        got = hvd.grouped_allreduce([x, x[0].int()], op=hvd.Max, process_set=ps)
        eq(got[0], torch.stack(xs).max(0).values)
        eq(got[1], torch.stack(xs).max(0).values[0].int())
        rows = [inp(r, (r + 1, 2), torch.int32) for r in members]  # uneven first dims
        eq(hvd.allgather(rows[me], process_set=ps), torch.cat(rows))
        root = members[-1]
        eq(hvd.broadcast(x, root, process_set=ps), xs[-1])
        outside = [r for r in range(P) if r not in members]
        if outside:
            raises(ValueError, lambda ps=ps, x=x, o=outside[0]: hvd.broadcast(x, o, process_set=ps), "not in process set")
        eq(hvd.reducescatter(x, op=hvd.Sum, process_set=ps), torch.tensor_split(sum(xs), n)[me])
        splits_of = [[1 + (k + q) % 2 for q in range(n)] for k in range(n)]
        out, recv = hvd.alltoall(_a2a_input(R, splits_of[me]), splits=splits_of[me], process_set=ps)
        assert recv.tolist() == [splits_of[k][me] for k in range(n)]
        eq(out, _a2a_expected(splits_of, me, members, torch.float32))
        assert hvd.allgather_object(R, process_set=ps) == members
        got = hvd.broadcast_object({"from": R} if R == root else None, root_rank=root, name="ps.obj", process_set=ps)
        assert got == {"from": root}, got
        hvd.barrier(process_set=ps)
        # gradients inside the set: allgather's backward averages over the set and keeps this rank's rows
        g = inp(R, (R + 1, 2), torch.float64).requires_grad_()
        w = torch.arange(sum(r + 1 for r in members) * 2, dtype=torch.float64).reshape(-1, 2)
        (hvd.allgather(g, process_set=ps) * w).sum().backward()
        off = sum(r + 1 for r in members[:me])
        eq(g.grad, w[off:off + R + 1])
        # a set's op and a global op in flight together, started in opposite orders on different ranks
        hs = {}
        for k in (["set", "all"] if R % 2 else ["all", "set"]):
            hs[k] = (hvd.allreduce_async(x, op=hvd.Sum, name=f"both.set.{ps.process_set_id}", process_set=ps)
                     if k == "set" else hvd.allreduce_async(inp(R, (4,), torch.float64), op=hvd.Sum, name=glob))
        eq(hvd.synchronize(hs["set"]), sum(xs))
        eq(hvd.synchronize(hs["all"]), want_all)
    # global ops interleave with set ops
    hvd.barrier()
    # removing: refused afterwards, a second removal is False, the same ranks can form a set again
    first = sets[tuple(even)]
    assert hvd.remove_process_set(first) is True
    assert first.process_set_id is None
    assert hvd.remove_process_set(first) is False
    raises(ValueError, lambda: hvd.allreduce(inp(R), process_set=first), "not registered")
    again = hvd.add_process_set(even)
    assert again.process_set_id not in ids
    if R in even:
        eq(hvd.allreduce(inp(R), op=hvd.Sum, process_set=again), sum(inp(r) for r in even))
    for ps in [again] + [ps for ps in sets.values() if ps is not first]:
        assert hvd.remove_process_set(ps) is True
    raises(ValueError, lambda: hvd.allreduce(inp(R), process_set=hvd.ProcessSet([0])), "not registered")
    # ranks that disagree on a set's members fail on every rank, and the ops after it work
    if P > 1:
        raises(HorovodInternalError, lambda: hvd.add_process_set([0] if R == 0 else list(range(P))), "ranks")
    eq(hvd.allreduce(inp(R), op=hvd.Sum), sum(inp(r) for r in range(P)))


def c_process_set_optimizer() -> None:
    """DistributedOptimizer on a set: its members train as one, the other ranks keep their own gradients."""
    members = list(range(P - 1)) if P > 2 else [0]
    ps = hvd.add_process_set(members)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2).double()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                       named_parameters=model.named_parameters(), process_set=ps)
        xs = [torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + r))
              for r in range(P)]
        opt.zero_grad()
        model(xs[R]).pow(2).sum().backward()
        opt.step()
        torch.manual_seed(0)
        ref = torch.nn.Linear(3, 2).double()
        ropt = torch.optim.SGD(ref.parameters(), lr=0.5)
        group = members if R in members else [R]
        for r in group:
            (ref(xs[r]).pow(2).sum() / len(group)).backward()
        ropt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            eq(a.detach(), b.detach(), 1e-12)
    finally:
        hvd.remove_process_set(ps)


run("ops", "basics", c_basics)
run("ops", "allreduce_ops", c_allreduce_ops)
run("ops", "allreduce_flags", c_allreduce_flags)
run("ops", "in_place", c_in_place)
run("ops", "async_grouped", c_async_grouped)
run("ops", "allgather", c_allgather)
run("ops", "broadcast", c_broadcast)
run("ops", "reducescatter", c_reducescatter)
run("grad", "grads", c_grads)
run("match", "matching", c_matching)
run("match", "timeout", c_timeout_names_missing_ranks)
run("match", "timeout_race", c_timeout_races_completion)
run("match", "join", c_join)
run("match", "elastic", c_elastic_and_timeline)
run("helpers", "helpers", c_helpers)
run("optim", "optimizer", c_optimizer)
run("optim", "optimizer_rules", c_optimizer_rules)
run("optim", "sparse", c_sparse)
run("bn", "sync_batch_norm", c_sync_batch_norm)
run("alltoall", "alltoall", c_alltoall)
run("sets", "process_sets", c_process_sets)
run("sets", "process_set_optimizer", c_process_set_optimizer)
hvd.shutdown()
assert not hvd.is_initialized()
cases.finish()
