"""collective-run: the installed mpiexec plus the flags a user would otherwise look up (oversubscription, root)."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .launcher import find_mpiexec

__all__ = ["main", "mpiexec_command", "find_mpiexec", "horovodrun_args"]

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


#: mpiexec options that take one value (two for the MCA settings): skipped whole while looking for horovodrun's.
_MPI_VALUED = {"-x": 1, "--map-by": 1, "--bind-to": 1, "--rank-by": 1, "--output-filename": 1, "--host": 1,
               "--hostfile": 1, "-hostfile": 1, "--machinefile": 1, "-n": 1, "-c": 1, "--n": 1, "--np": 1,
               "--mca": 2, "-mca": 2, "--gmca": 2, "--prtemca": 2, "--wdir": 1, "--env": 1}


def horovodrun_args(args: Sequence[str]) -> list[str]:
    """``args`` with horovodrun's launcher flags rewritten as mpiexec's; everything else unchanged.

    So ``horovodrun -np 4 -H a:2,b:2 python train.py`` becomes
    ``collective-run -np 4 -H a:2,b:2 python train.py`` by changing its first word.
    Only the options before the program are read.

    ===============================  =========================================
    horovodrun                       mpiexec
    ===============================  =========================================
    ``-np N``, ``--num-proc N``      ``-n N``
    ``-H h1:2,h2:2``, ``--hosts``    ``--host h1:2,h2:2``
    ``--hostfile F``                 ``--hostfile F`` (``host slots=N`` lines)
    ``--network-interface I1,I2``    ``--mca btl_tcp_if_include I1,I2``
    ``--mpi-args "..."``             its words, as they are
    ``--mpi``                        dropped (MPI is the only controller)
    ``--gloo``                       refused (there is no Gloo controller)
    ===============================  =========================================

    Raises:
        SystemExit: a flag lacks its value, or ``--gloo`` is given.

    Example::

        horovodrun_args(["-np", "4", "-H", "a:2,b:2", "python", "train.py"])
        # ['-n', '4', '--host', 'a:2,b:2', 'python', 'train.py']
    """
    import shlex

    out: list[str] = []
    i, n = 0, len(args)

    def value(flag: str) -> str:
        if i + 1 >= n:
            raise SystemExit(f"collective-run: {flag} needs a value")
        return args[i + 1]

    while i < n:
        a = args[i]
        flag, eq, inline = a.partition("=")
        if not a.startswith("-") or a == "--":
            out.extend(args[i:])
            break
        if flag in ("-np", "--num-proc", "-H", "--hosts", "--network-interface", "--mpi-args") or (
                flag == "--hostfile" and eq):
            v = inline if eq else value(flag)
            i += 1 if eq else 2
            if flag in ("-np", "--num-proc"):
                out += ["-n", v]
            elif flag in ("-H", "--hosts"):
                out += ["--host", v]
            elif flag == "--hostfile":
                out += ["--hostfile", v]
            elif flag == "--network-interface":
                out += ["--mca", "btl_tcp_if_include", v]
            else:
                out += shlex.split(v)
            continue
        if a == "--mpi":
            i += 1
            continue
        if a == "--gloo":
            raise SystemExit("collective-run: --gloo is not supported; collective runs over MPI (drop the flag)")
        k = _MPI_VALUED.get(flag, 0) if not eq else 0
        out.extend(args[i:i + 1 + k])
        i += 1 + k
    return out


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
              "run-as-root settings when run as root. horovodrun's -np/--num-proc, -H/--hosts, --hostfile,\n"
              "--network-interface, --mpi-args and --mpi are translated; everything else is passed through.\n\n"
              + _EMULATE_USAGE, file=sys.stdout if args else sys.stderr)
        if not args:
            print("collective-run: no program given; e.g. collective-run -n 4 python train.py", file=sys.stderr)
            sys.exit(2)
        return
    if any(a == "--emulate" or a.startswith("--emulate=") for a in args):
        sys.exit(_emulate(args))
    cmd, env = mpiexec_command(horovodrun_args(args))
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
