"""Launcher detection: refuse to run as a lone process when the environment says several were meant."""
from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import CollectiveConfigError

__all__ = ["expected_world", "check_launch"]

# (variable, who sets it, the variable that must also be present for it to count: None if none). Each is set
# by a launcher in every process it starts, to the number of processes of the job (or of the step).
_SOURCES: tuple[tuple[str, str, str | None], ...] = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun", None),
    ("PMI_SIZE", "a PMI launcher (MPICH's mpiexec, Intel MPI, srun --mpi=pmi2)", None),
    ("PMIX_SIZE", "a PMIx launcher", None),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH's mpirun_rsh", None),
    ("WORLD_SIZE", "torchrun (torch.distributed.run)", None),
    # A batch script also sees SLURM_NTASKS while running one process; srun's tasks also have SLURM_PROCID.
    ("SLURM_STEP_NUM_TASKS", "Slurm's srun", "SLURM_PROCID"),
    ("SLURM_NTASKS", "Slurm's srun", "SLURM_PROCID"),
    ("HOROVOD_SIZE", "horovodrun", None),
)


def expected_world(environ: Mapping[str, str] | None = None) -> tuple[str, str, int] | None:
    """The first launcher variable that asks for more than one process: (variable, launcher, processes), or None.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        None when no launcher variable names a job of several processes (or the value is not a number).

    Example::

        expected_world({"WORLD_SIZE": "4"})   # ("WORLD_SIZE", "torchrun (torch.distributed.run)", 4)
    """
    env = os.environ if environ is None else environ
    for var, who, needs in _SOURCES:
        raw = env.get(var)
        if raw is None or (needs is not None and needs not in env):
            continue
        try:
            n = int(raw.strip().split("(")[0])  # Slurm may write "4(x2)"-style counts in some variables
        except ValueError:
            continue
        if n > 1:
            return var, who, n
    return None


def check_launch(world_size: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise when MPI sees ``world_size == 1`` processes while a launcher's variable says several were started.

    Without this, ``python train.py`` under torchrun, or an ``srun`` whose MPI
    cannot reach Slurm's PMI, silently runs N independent one-rank jobs that
    each train alone.

    Args:
        world_size: ``MPI.COMM_WORLD``'s size.
        environ: the environment to read (default ``os.environ``).

    Raises:
        CollectiveConfigError: naming the variable, its value and how to launch instead.
    """
    if world_size != 1:
        return
    found = expected_world(environ)
    if found is None:
        return
    var, who, n = found
    raise CollectiveConfigError(
        f"init: MPI started this process as a job of 1 rank, but {var}={n} says {who} meant {n} processes: "
        "each would run alone. Launch through MPI instead (`mpiexec -n N python script.py` or "
        "`collective-run -n N python script.py`; under Slurm `srun --mpi=pmix` or `--mpi=pmi2`, with an MPI "
        f"built for Slurm), or, to really run one process, unset {var}")
