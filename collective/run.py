"""collective-run: the installed mpiexec plus the flags a user would otherwise look up (oversubscription, root)."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from .launcher import find_mpiexec

__all__ = ["main", "mpiexec_command", "find_mpiexec"]

_NP_FLAGS = ("-n", "-np", "--n", "--np", "-c")


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


_EMULATE_USAGE = (
    "usage: collective-run --emulate HxR [--link RATE] [mpiexec options] [--] program [args...]\n"
    "Runs the program on an emulated cluster of H hosts x R ranks on this machine (network namespaces on a\n"
    "bridge, each host its own hostname; MPI over TCP between hosts, shared memory inside). --link shapes each\n"
    "host's link with tc, e.g. 1gbit or 200mbit (default unshaped). Needs root. Everything is removed afterwards."
)


def _emulate(args: list[str]) -> int:
    """``--emulate HxR [--link RATE] [mpiexec options] [--] program...``: run on an emulated cluster."""
    from . import emulate

    shape, rate, rest = None, None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--emulate", "--link") and i + 1 < len(args):
            if a == "--emulate":
                shape = args[i + 1]
            else:
                rate = args[i + 1]
            i += 2
        elif a.startswith("--emulate=") or a.startswith("--link="):
            key, val = a.split("=", 1)
            shape, rate = (val, rate) if key == "--emulate" else (shape, val)
            i += 1
        elif a == "--":
            rest.extend(args[i + 1:])
            break
        else:
            rest.append(a)
            i += 1
    if shape is None or not rest:
        print(_EMULATE_USAGE, file=sys.stderr)
        return 2
    try:
        hosts, per_host = emulate.parse_shape(shape)
    except ValueError as exc:
        print(f"collective-run: {exc}", file=sys.stderr)
        return 2
    why = emulate.unavailable()
    if why is not None:
        print(f"collective-run --emulate: {why}", file=sys.stderr)
        return 2
    try:
        return emulate.run(hosts, per_host, rate, rest)
    except emulate.EmulationError as exc:
        print(f"collective-run: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``collective-run -n 4 python train.py`` (all arguments go to mpiexec).

    ``collective-run --emulate 2x2 --link 1gbit -- python script.py`` runs on an
    emulated cluster instead (see ``collective.emulate``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        # Asked for, the usage is the answer (status 0); with nothing to run it is an error (status 2).
        print("usage: collective-run [mpiexec options] program [args...]\n"
              "Runs the installed mpiexec, adding --oversubscribe when ranks exceed cores and the\n"
              "run-as-root settings when run as root. Everything else is passed through.\n\n" + _EMULATE_USAGE,
              file=sys.stdout if args else sys.stderr)
        if not args:
            print("collective-run: no program given; e.g. collective-run -n 4 python train.py", file=sys.stderr)
            sys.exit(2)
        return
    if any(a == "--emulate" or a.startswith("--emulate=") for a in args):
        sys.exit(_emulate(args))
    cmd, env = mpiexec_command(args)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
