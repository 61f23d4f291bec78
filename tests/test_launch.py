"""collective.init() without a launcher, while the environment says several processes were meant, raises."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from collective.errors import CollectiveConfigError
from collective.launch import check_launch, expected_world

ROOT = Path(__file__).resolve().parent.parent


def test_expected_world_sources() -> None:
    assert expected_world({}) is None
    assert expected_world({"WORLD_SIZE": "1"}) is None
    assert expected_world({"WORLD_SIZE": "4"})[::2] == ("WORLD_SIZE", 4)
    assert expected_world({"SLURM_NTASKS": "8"}) is None  # a batch script: one process, not an srun task
    assert expected_world({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})[::2] == ("SLURM_NTASKS", 8)
    assert expected_world({"PMI_SIZE": "2"})[::2] == ("PMI_SIZE", 2)
    assert expected_world({"WORLD_SIZE": "many"}) is None
    check_launch(4, {"WORLD_SIZE": "4"})  # MPI sees the job: nothing to say
    with pytest.raises(CollectiveConfigError, match=r"WORLD_SIZE=4.*torchrun.*mpiexec -n N"):
        check_launch(1, {"WORLD_SIZE": "4"})


def _run(extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI", "SLURM_", "WORLD_SIZE", "HOROVOD_", "MV2_"))}
    env.update(extra, PYTHONPATH=str(ROOT), COLLECTIVE_CALIBRATE="0")
    code = ("import collective as col\n"
            "try:\n    c = col.init()\nexcept col.CollectiveConfigError as e:\n    print('REFUSED', e)\n"
            "else:\n    print('RAN', c.size)\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_init_refuses_a_lone_process_that_should_have_company() -> None:
    res = _run({"WORLD_SIZE": "2", "RANK": "0"})
    assert "REFUSED" in res.stdout and "WORLD_SIZE=2" in res.stdout, res.stdout + res.stderr
    res = _run({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"})
    assert "REFUSED" in res.stdout and "srun" in res.stdout, res.stdout + res.stderr
    res = _run({})
    assert "RAN 1" in res.stdout, res.stdout + res.stderr
