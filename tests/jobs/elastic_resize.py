"""The elastic state over real MPI without failures (run at P=4): size changes 4 -> 3 -> 2 by subgroups keep the
global batch and the sample order (parameters equal to one process's), uneven commits roll back to the smallest,
and fit(elastic=True) trains bit for bit like fit().

Usage: mpiexec -n 4 python elastic_resize.py
"""
from __future__ import annotations

import numpy as np
from harness import Cases

import collective as col
from collective.trainer import SGD, Adam, DataParallel, ElasticState, ShardedLoader, fit, mlp

comm = col.init()
cases = Cases(comm)
GLOBAL_BATCH = 96
assert comm.size == 4, "run at P=4"

rng = np.random.default_rng(0)
X = rng.standard_normal((960, 16))
Y = (X[:, :4].sum(axis=1) > 0).astype(np.int64) + 2 * (X[:, 4] > 0)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))


def build(c, dtype, make_opt):
    model = mlp([16, 48, 32, 4], dropout=0.1, seed=5, dtype=dtype)
    dp = DataParallel(model, c, bucket_mb=0.004, first_bucket_mb=0.002, seed=5)
    opt = make_opt(dp.buckets)
    rank, size = (0, 1) if c is None else (c.rank, c.size)
    loader = ShardedLoader(X, Y, GLOBAL_BATCH, rank, size, seed=9, dtype=dtype)
    return dp, opt, loader


def params(dp) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in dp.parameter_arrays().items()}


def train(state: ElasticState, a: int, b: int) -> None:
    for s in range(a, b):
        state.begin_step(s)
        state.dp.train_step(*state.loader.batch(s), s, state.optimizer)
        state.commit(s + 1)


def resize_case(dtype, make_opt, tol: float):
    def case() -> None:
        ref_dp, ref_opt, ref_loader = build(None, dtype, make_opt)  # one process, uninterrupted
        for s in range(30):
            ref_dp.train_step(*ref_loader.batch(s), s, ref_opt)
        ref = params(ref_dp)

        dp, opt, loader = build(comm, dtype, make_opt)
        assert len(dp.buckets) >= 3
        state = ElasticState(dp, opt, loader)
        train(state, 0, 10)
        sub3 = comm.subgroup([0, 1, 2])
        if sub3 is None:
            return
        state.rebind(sub3)
        assert loader.sampler.size == 3 and loader.sampler.local_batch == 32 and dp.size == 3
        assert abs(dp.grad_scale - 1 / 3) < 1e-15
        train(state, 10, 21)
        # Uneven completion: step 21 finished everywhere, but rank 2 of the three had not committed it.
        state.dp.train_step(*loader.batch(21), 21, opt)
        if sub3.rank != 2:
            state.commit(22)
        agreed = state.agree()
        assert agreed == 21, agreed
        state.restore(agreed)
        sub2 = sub3.subgroup([1, 2])  # old rank 0 leaves: the lowest remaining rank becomes rank 0
        if sub2 is None:
            return
        state.rebind(sub2)
        assert dp.rank == sub3.rank - 1 and loader.sampler.local_batch == 48
        train(state, 21, 30)
        got = params(dp)
        for k in ref:
            d = rel(ref[k], got[k])
            assert d <= tol, f"{k}: max relative difference {d:.3g} > {tol:g} against one process"
        every = sub2.allgather(np.concatenate([v.reshape(-1) for v in got.values()]).astype(np.float64)[None])
        assert np.array_equal(every[0], every[1]), "the two ranks' parameters differ"

    return case


def fit_case() -> None:
    out = []
    for elastic in (False, True):
        dp, opt, loader = build(comm, np.float64, lambda b: Adam(b, lr=1e-2))
        fit(dp, opt, loader, 15, progress=False, elastic=elastic)
        out.append(params(dp))
    for k in out[0]:
        assert np.array_equal(out[0][k], out[1][k]), f"{k}: fit(elastic=True) differs from fit()"


cases.run("fit(elastic=True) == fit() at P=4", fit_case)
cases.run("4 -> 3 -> 2 float32 SGD", resize_case(np.float32, lambda b: SGD(b, lr=0.05, momentum=0.9,
                                                                           weight_decay=1e-4), 1e-5))
cases.run("4 -> 3 -> 2 float64 Adam", resize_case(np.float64, lambda b: Adam(b, lr=1e-2), 1e-10))
cases.finish()
