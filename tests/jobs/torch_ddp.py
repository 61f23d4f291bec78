"""PyTorch adapter under mpiexec: our DDP and comm hook against torch DDP(gloo), no_sync, unused params, interop.

Every case trains copies of one model from one seed on the same global batch
(each rank its own shard) and compares the parameters after the steps with
torch's own DistributedDataParallel over Gloo; our ranks must agree bitwise.
"""
from __future__ import annotations

import contextlib

import sys
import zlib

import numpy as np
import torch
from mpi4py import MPI

import collective as col
from collective.bench.gloo import GlooGroup
from harness import Cases
from collective.trainer.torch import CommHookState, DistributedDataParallel, allreduce_hook

# --only ddp,more,shard,interop: some groups of cases (ddp: the equivalence runs; shard: shard_optimizer;
# interop: torch/JAX/CuPy arrays)
ONLY = set(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else None
torch.set_num_threads(1)
comm = col.init()
P, R = comm.size, comm.rank
cases = Cases(comm)
gloo = GlooGroup(MPI.COMM_WORLD, single_node=comm.single_node)
STEPS = 20


def run(group: str, name: str, fn: object) -> None:
    if ONLY is None or group in ONLY:
        cases.run(name, fn)  # type: ignore[arg-type]

TOL = 1e-6


class Net(torch.nn.Module):
    """An MLP, with an optional head that only some steps use (for find_unused_parameters)."""

    def __init__(self, sizes: tuple[int, ...], extra: bool) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers[:-1])
        self.head = torch.nn.Linear(sizes[-1], 1) if extra else None

    def forward(self, x: torch.Tensor, use_head: bool = False) -> torch.Tensor:
        out = self.body(x)
        return out + self.head(out) if use_head else out


def mlp(sizes: tuple[int, ...], seed: int = 0, extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = Net(sizes, extra)
    if R:  # ranks start different: the wrappers must broadcast rank 0's parameters
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * R)
    return m


def batches(sizes: tuple[int, ...], steps: int, per_rank: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """This rank's shard of each step's global batch (the same global batch on every rank)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(P * per_rank, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (P * per_rank,), generator=g)
        out.append((x[R * per_rank:(R + 1) * per_rank], y[R * per_rank:(R + 1) * per_rank]))
    return out


def train(model: torch.nn.Module, data: list, opt_name: str = "sgd", accumulate: int = 1, set_to_none: bool = True,
          use_extra: bool | str = False, shard: bool = False, no_sync: bool = True,
          clip: float | None = None) -> torch.nn.Module:
    """Train on ``data``; ``use_extra``: the head on even steps (True), or on rank 0 only ("rank0")."""
    cls, kw = ((torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}) if opt_name == "sgd"
               else (torch.optim.Adam, {"lr": 1e-3}))
    opt = model.shard_optimizer(cls, **kw) if shard else cls(model.parameters(), **kw)
    loss_fn = torch.nn.functional.cross_entropy
    for s in range(0, len(data), accumulate):
        opt.zero_grad(set_to_none=set_to_none)
        for j in range(accumulate):
            x, y = data[s + j]
            ctx = model.no_sync() if no_sync and j < accumulate - 1 else _nullcontext()
            with ctx:
                head = R == 0 if use_extra == "rank0" else bool(use_extra) and (s // accumulate) % 2 == 0
                loss_fn(model(x, use_head=head), y).backward()
        if clip is not None:
            if shard:
                opt.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def params_of(m: torch.nn.Module) -> list[torch.Tensor]:
    inner = m.module if hasattr(m, "module") else m
    return [p.detach() for p in inner.parameters()]


def crc(m: torch.nn.Module) -> int:
    c = 0
    for p in params_of(m):
        c = zlib.crc32(p.contiguous().numpy().tobytes(), c)
    return c


def assert_close(ours: torch.nn.Module, ref: torch.nn.Module, what: str) -> None:
    worst = max(float((a - b).abs().max()) for a, b in zip(params_of(ours), params_of(ref)))
    assert worst <= TOL, f"{what}: max |ours - torch DDP| = {worst:.3g} > {TOL}"


def assert_ranks_identical(m: torch.nn.Module, what: str) -> None:
    every = comm.allgather(np.array([crc(m)], np.int64))
    assert len(set(every.tolist())) == 1, f"{what}: parameter checksums differ across ranks: {every.tolist()}"


def must_raise(cls: type, words: str, fn: object, what: str) -> None:
    """``fn()`` must raise ``cls`` with ``words`` in its message."""
    try:
        fn()  # type: ignore[operator]
    except cls as exc:
        assert words in str(exc), exc
    else:
        raise AssertionError(f"{what} was accepted")


def torch_ddp(model: torch.nn.Module, **kw: object) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model, **kw)


def equivalence(sizes: tuple[int, ...], opt: str, bucket_mb: float | None, first_mb: float | None,
                overlap: bool | None = None, shared_memory: bool | None = None) -> None:
    data = batches(sizes, STEPS)
    ours = train(DistributedDataParallel(mlp(sizes), comm, bucket_mb=bucket_mb, first_bucket_mb=first_mb,
                                         overlap=overlap, shared_memory=shared_memory), data, opt)
    ref = train(torch_ddp(mlp(sizes)), data, opt)
    assert_close(ours, ref, f"{sizes} {opt}")
    assert_ranks_identical(ours, f"{sizes} {opt}")


SMALL = (20, 64, 48, 10)
MEDIUM = (256, 512, 512, 10)  # ~1.6 MB of gradients: spans the 1 MB first bucket and a second one

run("ddp", "ddp sgd default buckets", lambda: equivalence(MEDIUM, "sgd", None, None))
run("ddp", "ddp adam tiny buckets, overlap on the comm thread", lambda: equivalence(SMALL, "adam", 0.004, 0.001, True))
run("ddp", "ddp sgd no overlap, private memory", lambda: equivalence(SMALL, "sgd", 0.004, 0.001, False, False))


def bucket_layout() -> None:
    total = 4 * sum(p.numel() for p in mlp(MEDIUM).parameters())
    one = DistributedDataParallel(mlp(MEDIUM), comm, overlap=False)  # inline: one meeting of the ranks per step
    assert one.bucket_sizes == [total], one.bucket_sizes
    default = DistributedDataParallel(mlp(MEDIUM), comm)
    assert len(default.bucket_sizes) == (2 if default.overlap else 1), (default.overlap, default.bucket_sizes)
    m = DistributedDataParallel(mlp(MEDIUM), comm, overlap=True)
    sizes = m.bucket_sizes
    assert sizes[0] <= 1 << 20 and len(sizes) == 2, sizes
    assert sum(sizes) == total, sizes
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, MEDIUM[0], generator=g)
    m(x).sum().backward()
    for p in m.module.parameters():  # every grad is a view into a bucket (no copy after the allreduce)
        assert any(p.grad.data_ptr() >= b.flat.data_ptr() and p.grad.data_ptr() < b.flat.data_ptr() + b.array.nbytes
                   for b in m._buckets)


run("more", "bucket layout and grads as views", bucket_layout)


def env_bucket_mb() -> None:
    import os

    os.environ["COLLECTIVE_BUCKET_MB"] = "0.5"
    try:
        m = DistributedDataParallel(mlp(MEDIUM), comm)
    finally:
        del os.environ["COLLECTIVE_BUCKET_MB"]
    assert max(m.bucket_sizes) <= (1 << 20) and len(m.bucket_sizes) >= 3, m.bucket_sizes


run("more", "COLLECTIVE_BUCKET_MB", env_bucket_mb)


def overlap_agreed() -> None:
    """Ranks that see a spare core differently still build one bucket layout (the default overlap is agreed)."""
    import collective.trainer.torch as tt

    real = tt._spare_core
    tt._spare_core = lambda comm: comm.rank == 0  # only rank 0 thinks it has a core to spare
    try:
        m = DistributedDataParallel(mlp(MEDIUM), comm)
    finally:
        tt._spare_core = real
    assert not m.overlap, "rank 0 alone had a spare core, so nobody overlaps"
    layouts = comm.mpi_comm.allgather(tuple(m.bucket_sizes))
    assert len(set(layouts)) == 1, layouts


run("more", "default overlap agreed across ranks", overlap_agreed)


def no_sync() -> None:
    data = batches(SMALL, 12)
    ours = train(DistributedDataParallel(mlp(SMALL), comm, bucket_mb=0.004, first_bucket_mb=0.001), data,
                 accumulate=3)
    ref = train(torch_ddp(mlp(SMALL)), data, accumulate=3)
    assert_close(ours, ref, "no_sync")
    assert_ranks_identical(ours, "no_sync")


run("more", "no_sync accumulation", no_sync)


def keep_grads() -> None:
    data = batches(SMALL, 8)
    ours = train(DistributedDataParallel(mlp(SMALL), comm), data, set_to_none=False)
    ref = train(torch_ddp(mlp(SMALL)), data, set_to_none=False)
    assert_close(ours, ref, "zero_grad(set_to_none=False)")


run("more", "zero_grad(set_to_none=False)", keep_grads)


def own_slice_bitwise() -> None:
    """Buckets reduced inline in the window take this rank's own slice straight from autograd's gradients: the
    parameters must be bitwise those of plain buckets (every part copied in), with no_sync, with unused parameters
    (find_unused_parameters), and with rank 1 falling back to copying everything in while the others do not."""
    used: list[bool] = []
    real = comm.allreduce_in_window

    def counting(*a: object, **k: object) -> bool:
        ok = real(*a, **k)
        used.append(ok)
        return ok

    def refusing(*a: object, **k: object) -> bool:  # as when the call would not run in the window
        used.append(False)
        return False

    def plain(m: torch.nn.Module, **kw: object) -> torch.nn.Module:
        return DistributedDataParallel(m, comm, overlap=False, shared_memory=False, find_unused_parameters=True, **kw)

    try:
        for bucket_mb, fallback in ((None, False), (0.5, False), (None, True)):
            comm.allreduce_in_window = refusing if (fallback and R == 1) else counting  # type: ignore[method-assign]
            data = batches(MEDIUM, 6)
            model = DistributedDataParallel(mlp(MEDIUM, extra=True), comm, overlap=False, bucket_mb=bucket_mb,
                                            find_unused_parameters=True)
            fused = train(model, data, accumulate=2, use_extra=True)
            assert used and (all(used) if not (fallback and R == 1) else not any(used)), used
            used.clear()
            comm.allreduce_in_window = counting  # type: ignore[method-assign]
            ref = train(plain(mlp(MEDIUM, extra=True), bucket_mb=bucket_mb), data, accumulate=2, use_extra=True)
            assert not used, "plain buckets took the own-slice path"
            for a_, b_ in zip(params_of(fused), params_of(ref)):
                assert torch.equal(a_, b_), f"bucket_mb={bucket_mb} fallback={fallback}: own-slice and copied differ"
            assert_ranks_identical(fused, "own-slice path")
    finally:
        comm.allreduce_in_window = real  # type: ignore[method-assign]


run("more", "own slice reduced from autograd's gradients: bitwise as copied", own_slice_bitwise)


def backward_raises(model: torch.nn.Module, batch: tuple, words: str) -> None:
    """One forward and backward that must raise a RuntimeError containing ``words``."""
    x, y = batch
    try:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    except RuntimeError as exc:
        assert words in str(exc), exc
    else:
        raise AssertionError(f"backward did not raise (expected {words!r})")


def failed_backward_recovers() -> None:
    """A backward that raises half-way (autograd then skips the wrapper's end-of-backward callback) must not
    break the next step: the next forward starts it afresh."""
    data = batches(MEDIUM, 4)
    model = DistributedDataParallel(mlp(MEDIUM), comm, overlap=False)
    first = next(model.module.parameters())  # the first layer's weight: its gradient comes last

    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in a gradient hook")

    handle = first.register_hook(boom)
    backward_raises(model, data[0], "boom")
    handle.remove()
    ours = train(model, data)
    ref = train(torch_ddp(mlp(MEDIUM)), data)
    assert_close(ours, ref, "after a failed backward")
    assert_ranks_identical(ours, "after a failed backward")


run("more", "a failed backward does not break the next step", failed_backward_recovers)


def unused() -> None:
    data = batches(SMALL, 6)
    ours = train(DistributedDataParallel(mlp(SMALL, extra=True), comm, find_unused_parameters=True), data,
                 use_extra=True)
    ref = train(torch_ddp(mlp(SMALL, extra=True), find_unused_parameters=True), data, use_extra=True)
    assert_close(ours, ref, "find_unused_parameters")
    # Unused on every rank: no gradient at all (an optimizer skips the parameter), as torch DDP leaves it; unused
    # here but used under no_sync before: what no_sync accumulated is this rank's part.
    m = DistributedDataParallel(mlp(SMALL, extra=True), comm, find_unused_parameters=True)
    x, y = data[0]
    torch.nn.functional.cross_entropy(m(x, use_head=False), y).backward()
    assert m.module.head.weight.grad is None, "a parameter no rank used got a gradient"
    with m.no_sync():
        torch.nn.functional.cross_entropy(m(x, use_head=True), y).backward()
    local = m.module.head.weight.grad.clone()
    torch.nn.functional.cross_entropy(m(x, use_head=False), y).backward()
    want = comm.allreduce(local.contiguous(), op="avg")
    assert torch.allclose(m.module.head.weight.grad, want, rtol=1e-5, atol=1e-12), "no_sync's gradient was dropped"
    m = DistributedDataParallel(mlp(SMALL, extra=True), comm)
    backward_raises(m, batches(SMALL, 1)[0], "find_unused_parameters")
    for overlap in (False, True):  # used on rank 0 only: its bucket is reduced in backward there, at the end elsewhere
        ours = train(DistributedDataParallel(mlp(SMALL, extra=True), comm, find_unused_parameters=True,
                                             overlap=overlap), data, use_extra="rank0")
        ref = train(torch_ddp(mlp(SMALL, extra=True), find_unused_parameters=True), data, use_extra="rank0")
        assert_close(ours, ref, f"head used on rank 0 only, overlap={overlap}")


run("more", "find_unused_parameters", unused)


def layout_mismatch() -> None:
    sizes = SMALL if R == 0 else (20, 64, 49, 10)
    must_raise(ValueError, "differ between rank 0", lambda: DistributedDataParallel(mlp(sizes), comm),
               "differing models")


if P > 1:
    run("more", "differing models raise on every rank", layout_mismatch)


def comm_hook() -> None:
    data = batches(MEDIUM, 10)
    hooked = torch_ddp(mlp(MEDIUM), bucket_cap_mb=0.5)
    hooked.register_comm_hook(CommHookState(comm), allreduce_hook)
    ours = train(hooked, data)
    ref = train(torch_ddp(mlp(MEDIUM), bucket_cap_mb=0.5), data)
    assert_close(ours, ref, "comm hook")
    assert_ranks_identical(ours, "comm hook")


run("more", "torch DDP with our comm hook", comm_hook)


# ------------------------------------------------------------------ shard_optimizer
def sharded(sizes: tuple[int, ...], opt: str, extra: bool = False, **kw: object) -> None:
    """shard_optimizer trains as torch DDP does (accumulation with and without no_sync, unused parameters)."""
    for accumulate, no_sync_ in ((1, True), (3, True), (2, False)):
        data = batches(sizes, 6 * accumulate)
        ours = train(DistributedDataParallel(mlp(sizes, extra=extra), comm, find_unused_parameters=extra, **kw), data,
                     opt, accumulate=accumulate, use_extra=extra, shard=True, no_sync=no_sync_)
        ref = train(torch_ddp(mlp(sizes, extra=extra), find_unused_parameters=extra), data, opt,
                    accumulate=accumulate, use_extra=extra, no_sync=no_sync_)
        what = f"sharded {sizes} {opt} accumulate={accumulate} no_sync={no_sync_}"
        assert_close(ours, ref, what)
        assert_ranks_identical(ours, what)


# (The unused head's gradients are ~1e-9, differences of O(1) terms: Adam would scale rounding up to 1e-5.)
run("shard", "shard_optimizer sgd, default buckets, unused head", lambda: sharded(MEDIUM, "sgd", True))
run("shard", "shard_optimizer adam, tiny buckets",
    lambda: sharded(SMALL, "adam", bucket_mb=0.004, first_bucket_mb=0.001))


def sharded_more() -> None:
    """A head used on rank 0 only; clip_grad_norm_ against torch's clip after a torch DDP backward."""
    data = batches(MEDIUM, 6)
    for extra, clip in (("rank0", None), (False, 0.05), (False, float("inf"))):
        ours = train(DistributedDataParallel(mlp(MEDIUM, extra=bool(extra)), comm, find_unused_parameters=bool(extra)),
                     data, use_extra=extra, shard=True, clip=clip)
        ref = train(torch_ddp(mlp(MEDIUM, extra=bool(extra)), find_unused_parameters=bool(extra)), data,
                    use_extra=extra, clip=clip)
        assert_close(ours, ref, f"sharded, head {extra}, clip {clip}")


run("shard", "shard_optimizer: head on rank 0 only, gradient clipping", sharded_more)


def shard_layout() -> None:
    """One copy of the parameters on the node; every parameter has one owner; the owner's share of the state."""
    model = DistributedDataParallel(mlp(MEDIUM), comm)
    opt = model.shard_optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
    owned = np.zeros(len(model._params), np.int64)
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    for i, p in enumerate(model._params):
        owned[i] = 1 if id(p) in mine else 0
    every = comm.allreduce(owned)
    assert (every == 1).all(), f"owners per parameter: {every.tolist()}"
    first = next(model.module.parameters())
    comm.barrier()
    if R == 0:
        with torch.no_grad():
            first[0, 0] = 12345.0  # written once, by one rank ...
    comm.barrier()
    assert float(first[0, 0]) == 12345.0, "parameters are not shared: rank 0's write is not seen here"
    x, y = batches(MEDIUM, 1)[0]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for p in model._params:  # ... and gradients stay only with their owner, averaged at the step
        assert (p.grad is not None) == (id(p) in mine), "a gradient left with a rank that does not own it"
    opt.step()
    assert len(opt.state_dict().get("state", {})) == len(mine)
    a = comm.alloc(16)
    assert comm.alloc_views(a)[comm.local_rank].__array_interface__["data"][0] == a.__array_interface__["data"][0]
    must_raise(col.CollectiveValueError, "contiguous leading slice", lambda: comm.alloc_views(a[::2]), "a strided view")


run("shard", "shard_optimizer: one copy, one owner each", shard_layout)


def shard_refusals() -> None:
    model = DistributedDataParallel(mlp(SMALL), comm)
    must_raise(ValueError, "another optimizer or other arguments",
               lambda: model.shard_optimizer(torch.optim.SGD, lr=0.05 if R == 0 else 0.1),
               "differing optimizer arguments")
    model = DistributedDataParallel(mlp(SMALL), comm)
    opt = model.shard_optimizer(torch.optim.SGD, lr=0.05)
    x, y = batches(SMALL, 1)[0]
    if R != 0:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    must_raise(RuntimeError, "rank(s) [0] step without a backward", opt.step, "a step after no backward on rank 0")
    opt.zero_grad()  # every rank starts over: the next step works
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert_ranks_identical(model, "after a refused step")
    must_raise(ValueError, "already sharded", lambda: model.shard_optimizer(torch.optim.SGD, lr=0.05), "sharding twice")
    loss = torch.nn.functional.cross_entropy
    held = [q.grad for q in model.parameters()]  # noqa: F841 - held: autograd then accumulates out of place
    loss(model(x), y).backward()  # no zero_grad since the last step (on rank 1 only)
    if R != 1:
        opt.zero_grad()
        loss(model(x), y).backward()
    must_raise(RuntimeError, "rank(s) [1] did not zero the gradients", opt.step, "gradients accumulated across steps")
    opt.zero_grad()
    loss(model(x), y).backward()
    if R == 0:
        with model.no_sync():
            loss(model(x), y).backward()
    must_raise(RuntimeError, "rank(s) [0] hold gradients of a no_sync() backward", opt.step, "a no_sync gradient")
    opt.zero_grad()
    loss(model(x), y).backward()
    real = opt.optimizer.step if opt.optimizer is not None else None
    if R == 1 and real is not None:
        def broken() -> None:
            raise FloatingPointError("optimizer broke on rank 1")
        opt.optimizer.step = broken
    must_raise(Exception, "rank", opt.step, "an optimizer failing on rank 1")  # rank 1 its own, the others naming it
    if real is not None:
        opt.optimizer.step = real
    opt.zero_grad()
    loss(model(x), y).backward()
    opt.step()
    assert_ranks_identical(model, "after the refusals")


if P > 1:
    run("shard", "shard_optimizer refusals on every rank", shard_refusals)


# ------------------------------------------------------------------ interop at P ranks
def tensors_on(device: str) -> None:
    """Type, device and values back, out= and in place, avg, async, allgather: for tensors on ``device``."""
    t = torch.arange(12, dtype=torch.float32, device=device).reshape(3, 4) + R
    want = P * torch.arange(12, dtype=torch.float32).reshape(3, 4) + P * (P - 1) / 2

    def same(a: torch.Tensor, w: torch.Tensor = want) -> bool:
        return type(a) is torch.Tensor and a.device == t.device and a.dtype == w.dtype and torch.equal(a.cpu(), w)

    assert same(comm.allreduce(t))
    assert torch.allclose(comm.allreduce(t, op="avg").cpu(), want / P)
    o = torch.empty_like(t)
    assert comm.allreduce(t, out=o) is o and same(o)
    i = t.clone()  # just made (on a GPU maybe still being made): the collective must see it finished
    r = comm.allreduce(i, out=i)
    assert r is i, type(r)
    assert same(i), (i, want)
    w = comm.allreduce_async(t.to(torch.int64))
    assert same(w.wait(), want.to(torch.int64))
    g = comm.allgather(torch.full((2,), float(R), device=device))
    assert type(g) is torch.Tensor and g.device == t.device
    assert g.tolist() == [float(r) for r in range(P) for _ in range(2)]


def torch_tensors() -> None:
    tensors_on("cpu")
    col_t = col.allreduce(torch.ones(5, dtype=torch.float64))
    assert type(col_t) is torch.Tensor and col_t.dtype == torch.float64 and (col_t == P).all()


run("interop", "torch tensors: type, values, out=, async, module-level", torch_tensors)


def bf16() -> None:
    from collective.ops import BFLOAT16

    t = torch.full((7,), 1.5, dtype=torch.bfloat16)
    if BFLOAT16 is None:
        try:
            comm.allreduce(t)
        except col.CollectiveTypeError as exc:
            assert "ml_dtypes" in str(exc)
        else:
            raise AssertionError("bfloat16 without ml_dtypes did not raise")
        return
    y = comm.allreduce(t)
    assert y.dtype == torch.bfloat16 and (y == 1.5 * P).all()


run("interop", "torch bfloat16", bf16)


def jax_arrays() -> None:
    try:
        import jax.numpy as jnp
    except ImportError:
        if R == 0:
            print("SKIP jax arrays: jax is not installed", flush=True)
        return
    x = jnp.arange(6.0, dtype=jnp.float32) + R
    y = comm.allreduce(x)
    assert type(y) is type(x), type(y)
    assert np.array_equal(np.asarray(y), P * np.arange(6.0) + P * (P - 1) / 2)
    z = comm.allreduce(x, out=x)  # immutable: a new array, x untouched
    assert z is not x and np.array_equal(np.asarray(z), np.asarray(y))
    assert np.array_equal(np.asarray(x), np.arange(6.0) + R)


run("interop", "jax arrays", jax_arrays)


def cupy_arrays() -> None:
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no CuPy or no GPU
        if R == 0:
            print(f"SKIP cupy arrays: no CuPy with a GPU here ({type(exc).__name__})", flush=True)
        return
    try:
        comm.allreduce(cupy.ones(4, cupy.float32))
    except col.CollectiveTypeError as exc:
        assert "GPU backend" in str(exc), exc
        if R == 0:
            print("SKIP cupy arrays: the MPI backend refuses device memory (a GPU backend is needed)", flush=True)
        return
    y = comm.allreduce(cupy.ones(4, cupy.float32))
    assert type(y) is cupy.ndarray and bool((y == P).all())


run("interop", "cupy arrays", cupy_arrays)


def torch_cuda_tensors() -> None:
    try:
        import cupy  # noqa: F401 - device memory moves through CuPy
    except ImportError:
        cupy = None
    if cupy is None or not torch.cuda.is_available():
        if R == 0:
            print("SKIP torch CUDA tensors: no CuPy with a CUDA device here", flush=True)
        return
    tensors_on("cuda")
    # Tensors still being written when the call comes: torch names no stream in __cuda_array_interface__, so the
    # collective must wait for torch's current stream (the default one, and a side stream inside its context).
    for side in (None, torch.cuda.Stream()):
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            x = torch.zeros(1 << 22, device="cuda")
            for _ in range(20):
                x += 1
            y = comm.allreduce(x)
            assert torch.equal(y, torch.full_like(x, 20.0 * P)), (side, y[:4], y[-4:])


run("interop", "torch CUDA tensors", torch_cuda_tensors)

gloo.close()
cases.finish()
sys.exit(0)
