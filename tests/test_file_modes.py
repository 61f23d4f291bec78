"""Checkpoints and the calibration cache are written owner-only unless a mode is asked for."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from collective.calibrate import _load, _save
from collective.topologies.cluster import Cluster
from collective.trainer.checkpoint import FORMAT, Checkpointer, read_checkpoint, write_checkpoint


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # the usual default, under which plain open() gives 0644
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_checkpoint_owner_only_by_default(tmp_path, loose_umask) -> None:
    p = tmp_path / "ckpt-00000001.npz"
    write_checkpoint(p, {"w": np.arange(4.0)}, {"step": 1, "format": FORMAT})
    assert _mode(p) == 0o600
    arrays, meta = read_checkpoint(p)
    assert meta["step"] == 1 and arrays["w"].tolist() == [0, 1, 2, 3]
    ck = Checkpointer(tmp_path / "run")
    path = ck.save(3, {"w": np.ones(2)}, {})
    assert _mode(path) == 0o600


def test_checkpoint_explicit_mode(tmp_path, loose_umask) -> None:
    ck = Checkpointer(tmp_path / "run", mode=0o640)
    assert _mode(ck.save(1, {"w": np.ones(2)}, {})) == 0o640
    with pytest.raises(ValueError, match="mode"):
        Checkpointer(tmp_path / "x", mode=0o4777)


def test_calibration_file_owner_only(tmp_path, loose_umask) -> None:
    cl = Cluster.from_node_size(2, 2)
    p = str(tmp_path / "links.json")
    vals = np.array([1e-6, 1e-10, 2e-6, 2e-10, 1e-10, 1e-10])
    _save(p, cl, vals)
    assert _mode(p) == 0o600
    assert np.allclose(_load(p, cl), vals)
