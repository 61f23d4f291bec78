"""pytest setup: the repo root on sys.path, bytecode caching, and the run-as-root settings for mpiexec jobs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Every rank of every job is a fresh Python process. Without bytecode caching (PYTHONDONTWRITEBYTECODE, set in
# some images) each would compile the library's modules again, a large part of a short job's CPU time: the
# processes cache bytecode under a prefix outside the source tree instead.
if "PYTHONPYCACHEPREFIX" not in os.environ:
    import tempfile

    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), f"collective-pycache-{os.getuid()}")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
if hasattr(os, "geteuid") and os.geteuid() == 0:
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")

# The in-process communicators (P=1) make pytest itself an MPI singleton, and Open MPI leaves a singleton's
# shared-memory file behind: keep it in a directory of this session, removed at exit. Jobs started by
# mpi_util.mpirun get a directory each (mpi_util.private_backing_dir).
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) and "OMPI_MCA_btl_sm_backing_directory" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _backing = tempfile.mkdtemp(prefix="collective-pytest-", dir="/dev/shm")
    os.environ["OMPI_MCA_btl_sm_backing_directory"] = _backing
    atexit.register(shutil.rmtree, _backing, True)
