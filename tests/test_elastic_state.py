"""The elastic state without failures, in one process: double-buffered updates, commit and rollback, resharding."""
from __future__ import annotations

import numpy as np
import pytest

from collective.trainer import SGD, Adam, DataParallel, ElasticState, ShardedLoader, ShardedSampler, fit, mlp
from collective.trainer.elastic import KILL_POINTS, _parse_kills


def _data(n: int = 384, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = (x[:, :3].sum(axis=1) > 0).astype(np.int64) + 2 * (x[:, 3] > 0)
    return x, y


OPTIMIZERS = {
    "sgd": lambda b: SGD(b, lr=0.05),
    "sgd-momentum-wd": lambda b: SGD(b, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-dampening": lambda b: SGD(b, lr=0.05, momentum=0.9, dampening=0.3),
    "sgd-nesterov": lambda b: SGD(b, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda b: Adam(b, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda b: Adam(b, lr=1e-2, weight_decay=1e-2, decoupled=True),
}


def _setup(make_opt, dtype=np.float32, double: bool = False, dropout: float = 0.1):
    model = mlp([12, 32, 24, 4], dropout=dropout, seed=7, dtype=dtype)
    dp = DataParallel(model, None, bucket_mb=0.002, first_bucket_mb=0.001, seed=7)
    opt = make_opt(dp.buckets)
    if double:
        opt.double_buffer()
    x, y = _data()
    loader = ShardedLoader(x, y, 48, seed=3, dtype=dtype)
    return dp, opt, loader


def _snapshot(dp: DataParallel, opt) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in dp.state_arrays(opt).items()}


def _steps(dp, opt, loader, a: int, b: int) -> None:
    for s in range(a, b):
        dp.train_step(*loader.batch(s), s, opt)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_double_buffered_updates_are_bitwise_the_in_place_ones(name: str) -> None:
    """Writing the twin buffers and swapping gives exactly the in-place optimizer's parameters and state."""
    ref = _setup(OPTIMIZERS[name])
    dbl = _setup(OPTIMIZERS[name], double=True)
    assert len(ref[0].buckets) >= 3
    for s in range(6):
        _steps(*ref, s, s + 1)
        _steps(*dbl, s, s + 1)
        a, b = _snapshot(ref[0], ref[1]), _snapshot(dbl[0], dbl[1])
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{name}: {k} differs after step {s + 1}"
    # The model's parameters are views of the current buffers after every swap.
    for bkt in dbl[0].buckets:
        for p, (lo, hi) in zip(bkt.params, bkt.offsets):
            assert np.shares_memory(p.data, bkt.data)
            assert np.array_equal(p.data.reshape(-1), bkt.data[lo:hi])


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adam"])
def test_rollback_one_step_and_after_a_half_finished_step(name: str) -> None:
    """The state of the step before the last stays in memory; a step that failed half-way through its updates
    leaves the last finished step's state intact."""
    dp, opt, loader = _setup(OPTIMIZERS[name], double=True)
    snaps = {}
    for s in range(5):
        _steps(dp, opt, loader, s, s + 1)
        snaps[s + 1] = _snapshot(dp, opt)
    # Back one step: exactly the state after 4 steps, with no copy.
    before = [b.data for b in dp.buckets]
    opt.use_generation(4)
    assert opt.t == 4
    assert any(b.data is not d for b, d in zip(dp.buckets, before))
    for k, v in _snapshot(dp, opt).items():
        assert np.array_equal(v, snaps[4][k]), k
    # Redo step 5 from there: the same result as the first time.
    _steps(dp, opt, loader, 4, 5)
    for k, v in _snapshot(dp, opt).items():
        assert np.array_equal(v, snaps[5][k]), k
    # Step 6 fails after the first bucket's update: step 5's state is untouched, step 4's is gone.
    dp.forward_backward(*loader.batch(5), 5)
    dp.buckets.wait(0)
    opt.update(0)
    with pytest.raises(ValueError, match="not in memory"):
        opt.use_generation(4)
    opt.use_generation(5)
    for k, v in _snapshot(dp, opt).items():
        assert np.array_equal(v, snaps[5][k]), k
    dp.buckets.wait_all()  # the failed step's futures, so the next step may begin


def test_elastic_state_commit_restore_and_extra() -> None:
    dp, opt, loader = _setup(OPTIMIZERS["sgd-momentum-wd"])
    st = ElasticState(dp, opt, loader, extra={"lr": 0.05, "ema": np.zeros(3)})
    assert opt.double_buffered and st.committed_step == 0
    snaps = {}
    for s in range(3):
        st.begin_step(s)
        dp.train_step(*loader.batch(s), s, opt)
        st.extra["lr"] = 0.05 / (s + 2)
        st.extra["ema"] = st.extra["ema"] + s + 1
        st.commit(s + 1)
        snaps[s + 1] = (_snapshot(dp, opt), st.extra["lr"], st.extra["ema"].copy())
    assert st.committed_step == 3 and st.agree() == 3
    st.restore(2)
    assert st.committed_step == 2 and opt.t == 2
    state, lr, ema = snaps[2]
    assert st.extra["lr"] == lr and np.array_equal(st.extra["ema"], ema)
    for k, v in _snapshot(dp, opt).items():
        assert np.array_equal(v, state[k]), k
    with pytest.raises(ValueError, match="step 1 is not committed"):
        st.restore(1)


def test_fit_elastic_equals_plain_fit_bitwise() -> None:
    """One process: fit(elastic=True) commits every step and trains exactly like fit()."""
    out = []
    for elastic in (False, True):
        dp, opt, loader = _setup(OPTIMIZERS["adamw"], dtype=np.float64)
        res = fit(dp, opt, loader, 12, progress=False, elastic=elastic)
        assert res.steps == 12 and not res.recoveries
        out.append(_snapshot(dp, opt))
    for k in out[0]:
        assert np.array_equal(out[0][k], out[1][k]), k


def test_resharding_keeps_the_global_batches_4_3_2() -> None:
    """Global batch 96 over 4, then 3, then 2 ranks: at every step the ranks' shards, in rank order, are the
    global batch one process would use; every sample of an epoch is used once."""
    n, gb = 1000, 96
    one = ShardedSampler(n, gb, 0, 1, seed=11)
    ranks = [ShardedSampler(n, gb, r, 4, seed=11) for r in range(4)]
    schedule = {0: 4, 4: 3, 7: 2, 12: 3, 15: 4}
    size = 4
    seen: dict[int, list[int]] = {}
    for step in range(2 * one.steps_per_epoch):
        if step in schedule:
            size = schedule[step]
            for r, s in enumerate(ranks[:size]):
                s.reshard(r, size)
        shards = [ranks[r].indices(step) for r in range(size)]
        assert all(len(s) == gb // size for s in shards)
        assert np.array_equal(np.concatenate(shards), one.global_indices(step)), f"step {step} at P={size}"
        seen.setdefault(one.position(step)[0], []).extend(np.concatenate(shards).tolist())
    for epoch, ids in seen.items():
        assert len(ids) == len(set(ids)) == one.steps_per_epoch * gb, f"epoch {epoch}"


def test_reshard_refuses_an_uneven_split() -> None:
    s = ShardedSampler(1000, 96, 0, 4)
    with pytest.raises(ValueError, match="96 cannot be split evenly over 5 ranks"):
        s.reshard(0, 5)
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        s.reshard(3, 3)
    assert s.size == 4 and s.local_batch == 24


def test_kill_spec_parsing() -> None:
    assert _parse_kills("0:5:allreduce, 2:7:commit") == [(0, 5, "allreduce"), (2, 7, "commit")]
    assert _parse_kills(None) == []
    assert set(KILL_POINTS) >= {"allreduce", "commit", "update", "checkpoint"}
    with pytest.raises(ValueError, match="RANK:STEP:POINT"):
        _parse_kills("0:5:nowhere")
