"""collective-run: the installed mpiexec plus the flags a user would otherwise look up (oversubscription, root)."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .launcher import find_mpiexec

__all__ = ["main", "mpiexec_command", "find_mpiexec", "horovodrun_args", "elastic_args", "torchrun_args",
           "TorchrunOptions", "rank_env_command"]

#: How many values follow each option collective-run reads or passes on: mpiexec's (Open MPI's, in both
#: spellings, and MPICH/Hydra's common ones), torchrun's (in its underscore spelling, see _torchrun_name),
#: horovodrun's and collective-run's own. The one table the line is split by (see _split).
_ARITY: dict[str, int] = {
    # mpiexec
    "-n": 1, "-np": 1, "--n": 1, "--np": 1, "-c": 1, "-N": 1, "--npernode": 1, "-npernode": 1, "--ppn": 1,
    "-ppn": 1, "--host": 1, "-host": 1, "--hostfile": 1, "-hostfile": 1, "--machinefile": 1, "-machinefile": 1,
    "--default-hostfile": 1, "--add-host": 1, "--add-hostfile": 1, "--rankfile": 1, "-rf": 1, "-x": 1,
    "--env": 1, "-genv": 2, "-env": 2, "-genvlist": 1, "-envlist": 1, "--map-by": 1, "-map-by": 1,
    "--bind-to": 1, "-bind-to": 1, "--rank-by": 1, "-rank-by": 1, "--cpus-per-proc": 1, "-cpus-per-proc": 1,
    "--cpus-per-rank": 1, "--output-filename": 1, "-output-filename": 1, "--output": 1, "--wdir": 1, "-wdir": 1,
    "--wd": 1, "-wd": 1, "--path": 1, "--prefix": 1, "--display": 1, "--timeout": 1, "--runtime-options": 1,
    "--preload-files": 1, "--stream-buffering": 1, "--tune": 1, "--personality": 1, "--pset": 1,
    "--initial-errhandler": 1, "--with-ft": 1, "--mca": 2, "-mca": 2, "--gmca": 2, "-gmca": 2, "--prtemca": 2,
    "--pmixmca": 2, "--am": 1, "--tmpdir": 1, "--report-pid": 1, "--report-uri": 1,
    "--oversubscribe": 0, "-oversubscribe": 0, "--tag-output": 0, "-tag-output": 0, "--timestamp-output": 0,
    "--merge-stderr-to-stdout": 0, "--report-bindings": 0, "-report-bindings": 0, "--display-map": 0,
    "--display-allocation": 0, "--allow-run-as-root": 0, "--use-hwthread-cpus": 0, "-v": 0, "--verbose": 0,
    "-q": 0, "--quiet": 0, "--enable-recovery": 0, "--disable-recovery": 0, "--noprefix": 0, "-l": 0,
    "-prepend-rank": 0, "-print-all-exitcodes": 0, "-verbose": 0,
    # torchrun's (collective-run translates or refuses them)
    "--nproc_per_node": 1, "--nnodes": 1, "--node_rank": 1, "--master_addr": 1, "--master_port": 1,
    "--standalone": 0, "--no_python": 0, "--rdzv_backend": 1, "--rdzv_endpoint": 1, "--rdzv_id": 1,
    "--rdzv_conf": 1, "--max_restarts": 1, "--monitor_interval": 1, "--start_method": 1, "--role": 1,
    "--run_path": 0, "--log_dir": 1, "--redirects": 1, "--tee": 1, "--local_addr": 1, "--logs_specs": 1,
    # horovodrun's
    "--num-proc": 1, "-H": 1, "--hosts": 1, "--network-interface": 1, "--mpi-args": 1, "--mpi": 0, "--gloo": 0,
    # collective-run's own
    "--elastic": 0, "--min-ranks": 1, "--max-ranks": 1, "--emulate": 1, "--link": 1,
}
#: torchrun's -m: the rest of the line is the module and its arguments.
_MODULE_FLAGS = ("-m", "--module")
_NP_FLAGS = ("-n", "-np", "--n", "--np", "-c")
_HOST_FLAGS = ("--host", "-host", "-H", "--hosts", "--hostfile", "-hostfile", "--machinefile", "-machinefile",
               "--default-hostfile", "--rankfile", "-rf")


@dataclass
class _Line:
    """A launch line split once: its options (each a list of words: the flag, then its values) and the program.

    Attributes:
        options: the options before the program, e.g. ``[["-n", "2"], ["--host=a,b"], ["--oversubscribe"]]``.
        program: the program and its arguments (MPMD contexts after a ``:`` included, as given).
        marked: a ``--`` stood before the program: where it starts is known exactly.
    """

    options: list[list[str]]
    program: list[str]
    marked: bool = False

    def words(self) -> list[str]:
        """The line again: options, ``--`` where there was one, program."""
        return [*(w for o in self.options for w in o), *(["--"] if self.marked else []), *self.program]

    def flags(self) -> list[str]:
        """Each option's flag, without an ``=value``."""
        return [o[0].partition("=")[0] for o in self.options]

    def value(self, names: Sequence[str]) -> str | None:
        """The value of the first option named in ``names`` (inline or the next word); None if absent."""
        for o in self.options:
            flag, eq, inline = o[0].partition("=")
            if flag in names:
                return inline if eq else (o[1] if len(o) > 1 else None)
        return None


def _arity(flag: str) -> int:
    """The values that follow ``flag`` (0 for one this table does not know: the program may follow it)."""
    k = _ARITY.get(flag)
    return _ARITY.get(_torchrun_name(flag), 0) if k is None else k


def _split(args: Sequence[str]) -> _Line:
    """``args`` split into options and the program by :data:`_ARITY`: the program begins after ``--``, after
    torchrun's ``-m``, or at the first word that is neither an option nor one of its values."""
    options: list[list[str]] = []
    i, n = 0, len(args)
    while i < n:
        a = args[i]
        if a == "--":
            return _Line(options, list(args[i + 1:]), True)
        if not a.startswith("-") or a == "-":
            break
        flag, eq, _ = a.partition("=")
        k = 0 if eq else _arity(flag)
        options.append(list(args[i:i + 1 + k]))
        i += 1 + k
        if _torchrun_name(flag) in _MODULE_FLAGS:
            break
    return _Line(options, list(args[i:]))


def _needs_values(line: _Line) -> None:
    """Exit with a message if an option of ``line`` lacks its values."""
    for o in line.options:
        if "=" not in o[0] and len(o) < 1 + _arity(o[0]):
            raise SystemExit(f"collective-run: {o[0]} needs a value")


def _nprocs(args: Sequence[str] | _Line) -> int | None:
    """The number of processes mpiexec's options ask for (the program's own arguments are not read)."""
    line = args if isinstance(args, _Line) else _split(args)
    raw = line.value(_NP_FLAGS)
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def _has_host(line: _Line) -> bool:
    """The options name hosts (``--host``, ``--hosts``, ``--hostfile``, ... in either form)."""
    return any(f in _HOST_FLAGS for f in line.flags())


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
    return _horovodrun(_split(args)).words()


def _horovodrun(line: _Line) -> _Line:
    import shlex

    _needs_values(line)
    out: list[list[str]] = []
    for o in line.options:
        flag, eq, inline = o[0].partition("=")
        v = inline if eq else (o[1] if len(o) > 1 else "")
        if flag in ("-np", "--num-proc"):
            out.append(["-n", v])
        elif flag in ("-H", "--hosts"):
            out.append(["--host", v])
        elif flag == "--hostfile":
            out.append(["--hostfile", v])
        elif flag == "--network-interface":
            out.append(["--mca", "btl_tcp_if_include", v])
        elif flag == "--mpi-args":
            out.extend(_split([*shlex.split(v), "--"]).options)
        elif flag == "--mpi":
            continue
        elif flag == "--gloo":
            raise SystemExit("collective-run: --gloo is not supported; collective runs over MPI (drop the flag)")
        else:
            out.append(o)
    return _Line(out, line.program, line.marked)


def elastic_args(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``args`` without ``--elastic``, ``--min-ranks N``, ``--max-ranks M`` (read before the program only),
    and the variables they set for the ranks (empty without ``--elastic``).

    ``--elastic`` launches with Open MPI's fault tolerance (``--with-ft ulfm``)
    and sets ``COLLECTIVE_ELASTIC=1``: a lost rank raises RanksLostError on
    the survivors instead of ending the job (see docs/guides/elastic.md).

    Raises:
        SystemExit: a flag lacks its value or it is not a positive integer, ``--min-ranks`` or
            ``--max-ranks`` without ``--elastic``, or min above max.

    Example::

        elastic_args(["--elastic", "--min-ranks", "2", "-n", "4", "python", "t.py"])
        # (['--with-ft', 'ulfm', '-x', 'COLLECTIVE_ELASTIC', '-x', 'COLLECTIVE_MIN_RANKS', '-n', '4', 'python',
        #   't.py'], {'COLLECTIVE_ELASTIC': '1', 'COLLECTIVE_MIN_RANKS': '2'})
    """
    line, env = _elastic(_split(args))
    return line.words(), env


def _elastic(line: _Line) -> tuple[_Line, dict[str, str]]:
    out: list[list[str]] = []
    found: dict[str, str] = {}
    elastic = False
    for o in line.options:
        flag, eq, inline = o[0].partition("=")
        if o[0] == "--elastic":
            elastic = True
        elif flag in ("--min-ranks", "--max-ranks"):
            if not eq and len(o) < 2:
                raise SystemExit(f"collective-run: {flag} needs a value")
            v = inline if eq else o[1]
            if not v.isdigit() or int(v) < 1:
                raise SystemExit(f"collective-run: {flag} {v!r} must be a positive integer")
            found[flag] = v
        else:
            out.append(o)
    if not elastic:
        if found:
            raise SystemExit(f"collective-run: {', '.join(found)} only apply with --elastic")
        return line, {}
    if "--min-ranks" in found and "--max-ranks" in found and int(found["--min-ranks"]) > int(found["--max-ranks"]):
        raise SystemExit(f"collective-run: --min-ranks {found['--min-ranks']} is above --max-ranks "
                         f"{found['--max-ranks']}")
    env = {"COLLECTIVE_ELASTIC": "1"}
    if "--min-ranks" in found:
        env["COLLECTIVE_MIN_RANKS"] = found["--min-ranks"]
    if "--max-ranks" in found:
        env["COLLECTIVE_MAX_RANKS"] = found["--max-ranks"]
    exports = [["-x", v] for v in env]  # exported to every host, not only this one's ranks
    return _Line([["--with-ft", "ulfm"], *exports, *out], line.program, line.marked), env


@dataclass
class TorchrunOptions:
    """What torchrun's flags asked for (see :func:`torchrun_args`).

    Attributes:
        nproc_per_node: processes on each node.
        nnodes: nodes.
        master_addr, master_port: ``--master_addr`` / ``--master_port``, None when not given.
        by_node: collective-run placed ``nproc_per_node`` consecutive ranks on each node (``--map-by ppr:N:node``,
            added for ``--nnodes`` above 1 unless the user gave a ``--map-by`` of their own), so a rank's node
            index is ``rank // nproc_per_node``.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    by_node: bool = False


#: torchrun's flags that collective-run translates (either spelling: ``--nproc_per_node``, ``--nproc-per-node``).
_TORCHRUN_VALUED = ("--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port")
_TORCHRUN_SWITCHES = ("--standalone", "--no_python", *_MODULE_FLAGS)
#: torchrun's flags with no meaning under MPI (one command starts every node; no restarts): refused, with why.
_TORCHRUN_REFUSED = {
    "--rdzv_backend": "MPI's launcher is the rendezvous", "--rdzv_endpoint": "MPI's launcher is the rendezvous",
    "--rdzv_id": "MPI's launcher is the rendezvous", "--rdzv_conf": "MPI's launcher is the rendezvous",
    "--max_restarts": "a failed rank ends the MPI job (see collective-run --elastic for recovery)",
    "--monitor_interval": "MPI's launcher watches the processes", "--start_method": "MPI starts the processes",
    "--role": "every process runs the same program", "--run_path": "give the program as usual",
    "--log_dir": "mpiexec's --output-filename DIR writes each rank's output to a file",
    "--redirects": "mpiexec's --output-filename DIR writes each rank's output to a file",
    "--tee": "mpiexec's --output-filename DIR writes each rank's output to a file",
    "--local_addr": "MPI finds the addresses", "--logs_specs": "MPI's launcher writes the output",
}


def _torchrun_name(flag: str) -> str:
    """torchrun's flags in their underscore spelling (torchrun accepts ``--nproc-per-node`` too)."""
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def torchrun_args(args: Sequence[str]) -> tuple[list[str], TorchrunOptions | None]:
    """``args`` with torchrun's launcher flags rewritten as mpiexec's, and the options they gave.

    So a script written for torchrun runs unchanged, with the same first word changed:
    ``torchrun --nproc_per_node 4 train.py --lr 0.1`` becomes
    ``collective-run --nproc_per_node 4 train.py --lr 0.1``. As under torchrun,
    the program is a Python script run by this Python (``-m`` a module;
    ``--no_python`` any program), and each process gets ``OMP_NUM_THREADS=1``
    unless it is set. Only the options before the program are read.

    ===============================================  ==============================================
    torchrun                                         mpiexec
    ===============================================  ==============================================
    ``--nproc_per_node N`` (``--nproc-per-node``)    ``-n N`` (``cpu`` or ``auto``: one per core)
    ``--nnodes M`` (with ``--host``/``--hostfile``)  ``-n N*M --map-by ppr:N:node``
    ``--master_addr A``, ``--master_port P``         each rank's ``MASTER_ADDR``, ``MASTER_PORT``
    ``--standalone``, ``--node_rank 0``              nothing to do
    ``-m module``, ``--no_python``                   ``python -m module``, the program as given
    ===============================================  ==============================================

    Args:
        args: collective-run's arguments.

    Returns:
        (the arguments for mpiexec, the options), or (``args`` unchanged, None) when no torchrun flag is given.

    Raises:
        SystemExit: a flag lacks its value or has a bad one; ``-n`` and ``--nproc_per_node`` are both given;
            ``--nnodes`` above 1 without the hosts; ``--node_rank`` on several nodes (one command starts them
            all); an elastic range of nodes; a torchrun flag with no meaning under MPI (``--rdzv_endpoint``,
            ``--max_restarts``, ...).

    Example::

        torchrun_args(["--nproc_per_node", "2", "train.py"])
        # (['-n', '2', '--', '/usr/bin/python3', 'train.py'], TorchrunOptions(nproc_per_node=2, ...))
    """
    line, opts = _torchrun(_split(args))
    return line.words(), opts


def _torchrun(line: _Line) -> tuple[_Line, TorchrunOptions | None]:
    rest: list[list[str]] = []
    seen: dict[str, str] = {}
    program = line.program
    for o in line.options:
        flag, eq, inline = o[0].partition("=")
        name = _torchrun_name(flag)
        if name in _TORCHRUN_REFUSED:
            raise SystemExit(f"collective-run: torchrun's {flag} has no collective-run equivalent: "
                             f"{_TORCHRUN_REFUSED[name]}; drop it")
        if name in _TORCHRUN_VALUED:
            if not eq and len(o) < 2:
                raise SystemExit(f"collective-run: {flag} needs a value")
            seen[name] = inline if eq else o[1]
        elif name in _TORCHRUN_SWITCHES:
            seen[name] = ""
        else:
            rest.append(o)
    if not any(f in seen for f in ("--nproc_per_node", "--nnodes", "--standalone", "--no_python", "-m", "--module")):
        if seen:
            given = ", ".join(seen)
            raise SystemExit(f"collective-run: {given}: torchrun's, for a torchrun-style launch: give "
                             "--nproc_per_node N too (or mpiexec's -n N without them)")
        return line, None
    kept = _Line(rest, [])
    if _nprocs(kept) is not None:
        raise SystemExit("collective-run: give the number of processes once: -n N (mpiexec) or --nproc_per_node N "
                         "(torchrun), not both")
    opts = TorchrunOptions()
    raw = seen.get("--nproc_per_node", "1")
    if raw in ("cpu", "auto"):
        opts.nproc_per_node = os.cpu_count() or 1
    else:
        opts.nproc_per_node = _positive(raw, "--nproc_per_node")
    raw = seen.get("--nnodes", "1")
    lo, colon, hi = raw.partition(":")
    if colon and lo != hi:
        raise SystemExit(f"collective-run: --nnodes {raw} is an elastic range; give one number of nodes")
    opts.nnodes = _positive(lo, "--nnodes")
    if opts.nnodes > 1 and not _has_host(kept) and not _allocated_nodes():
        raise SystemExit(f"collective-run: --nnodes {opts.nnodes} needs the hosts (--host a,b or --hostfile FILE): "
                         "one collective-run starts the processes of every node")
    if "--node_rank" in seen and (opts.nnodes > 1 or seen["--node_rank"] != "0"):
        raise SystemExit("collective-run: one collective-run starts the processes of every node: run it once, "
                         "on one machine, with --host or --hostfile, and drop --node_rank")
    if "--master_addr" in seen:
        opts.master_addr = seen["--master_addr"]
    if "--master_port" in seen:
        opts.master_port = _positive(seen["--master_port"], "--master_port")
    if not program:
        raise SystemExit("collective-run: no program given; e.g. collective-run --nproc_per_node 2 train.py")
    if "--no_python" in seen:
        run = program
    elif "-m" in seen or "--module" in seen:
        run = [sys.executable, "-m", *program]
    else:
        run = [sys.executable, *program]
    opts.by_node = opts.nnodes > 1 and not any(f in ("--map-by", "-map-by") for f in kept.flags())
    placement = [["--map-by", f"ppr:{opts.nproc_per_node}:node"]] if opts.by_node else []
    return _Line([["-n", str(opts.nproc_per_node * opts.nnodes)], *placement, *rest], run, True), opts


def _positive(raw: str, flag: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v < 1:
        raise SystemExit(f"collective-run: {flag} {raw!r} must be a whole number >= 1")
    return v


def _allocated_nodes() -> int:
    """The nodes of the batch allocation this runs in (Slurm, PBS, LSF), 0 outside one; mpiexec reads it."""
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            pass
    path = os.environ.get("PBS_NODEFILE")
    if path:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return len({ln.strip() for ln in f if ln.strip()})
        except OSError:
            return 0
    hosts = os.environ.get("LSB_MCPU_HOSTS", "").split()
    return len(hosts) // 2


# Each rank's torchrun environment, from its MPI launcher's variables (Open MPI, then MPICH/Hydra), set by a
# POSIX shell in front of the program: no Python path on the remote nodes is assumed. Arguments: the number of
# nodes (0: unknown, GROUP_RANK unset), MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS ("" leaves a variable
# alone), then the program. Where every node runs its ranks consecutively (one node, or torchrun's --nnodes,
# placed by --map-by ppr:N:node), GROUP_RANK is the node's index and LOCAL_RANK follows torchrun's
# RANK = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK (MPI's own local rank may number a node's ranks in
# another order; elsewhere it is what LOCAL_RANK gets).
_RANK_ENV_SH = r"""
r=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-$PMIX_RANK}}
n=${OMPI_COMM_WORLD_SIZE:-$PMI_SIZE}
lr=${OMPI_COMM_WORLD_LOCAL_RANK:-$MPI_LOCALRANKID}
ln=${OMPI_COMM_WORLD_LOCAL_SIZE:-$MPI_LOCALNRANKS}
if [ -n "$r" ] && [ -n "$n" ]; then export RANK="$r" WORLD_SIZE="$n" ROLE_RANK="$r" ROLE_WORLD_SIZE="$n"; fi
if [ -n "$lr" ] && [ -n "$ln" ]; then export LOCAL_RANK="$lr" LOCAL_WORLD_SIZE="$ln"; fi
if [ "$1" -gt 0 ] && [ -n "$r" ] && [ -n "$ln" ] && [ "$ln" -gt 0 ]; then
  g=$((r / ln)); export GROUP_RANK="$g" NODE_RANK="$g" GROUP_WORLD_SIZE="$1" LOCAL_RANK=$((r - g * ln))
fi
if [ -n "$2" ]; then export MASTER_ADDR="$2"; fi
if [ -n "$3" ]; then export MASTER_PORT="$3"; fi
if [ -n "$4" ]; then export OMP_NUM_THREADS="$4"; fi
shift 4
exec "$@"
"""


def _contexts(line: _Line) -> list[_Line]:
    """The MPMD app contexts of ``line`` (``a : b``), each split into its options and program."""
    out = [line]
    while ":" in out[-1].program:
        last = out[-1]
        k = last.program.index(":")
        out[-1] = _Line(last.options, last.program[:k], last.marked)
        out.append(_split(last.program[k + 1:]))
    return out


def _program_at(ctx: _Line) -> int | None:
    """Where the program begins in the words of one app context (a ``--`` there included), if known exactly.

    Known after a ``--``, or when every option is in :data:`_ARITY`: an
    option it does not know may take values (``-someflag a,b``), so a word
    that does not start with ``-`` may still be one of them. Returns the
    index of the ``--`` or of the program's first word; None if unknown.
    """
    if ctx.marked or (ctx.program and all(f in _ARITY or _torchrun_name(f) in _ARITY for f in ctx.flags())):
        return sum(len(o) for o in ctx.options)
    return None


def _first_host(line: _Line) -> str | None:
    """The first host of ``--host``/``-H`` or of ``--hostfile`` (rank 0's under mpiexec's default placement)."""
    value = line.value(("--host", "-host", "-H", "--hosts"))
    if value:
        return value.split(",")[0].split(":")[0]
    value = line.value(("--hostfile", "-hostfile", "--machinefile", "-machinefile"))
    if value:
        try:
            with open(value, encoding="utf-8", errors="replace") as f:
                for text in f:
                    words = text.split("#")[0].split()
                    if words:
                        return words[0]
        except OSError:
            return None
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env_command(args: Sequence[str], opts: TorchrunOptions | None = None,
                     env: dict[str, str] | None = None) -> list[str]:
    """mpiexec's ``args`` with each program started under torchrun's environment for its rank.

    Every rank gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``
    (and ``ROLE_RANK``, ``ROLE_WORLD_SIZE``) from its MPI launcher;
    ``GROUP_RANK``/``NODE_RANK`` and ``GROUP_WORLD_SIZE`` where the node of a
    rank is known (one node, or torchrun's ``--nnodes``); ``MASTER_ADDR`` and
    ``MASTER_PORT`` for torch's ``env://`` rendezvous (gloo; backend
    "collective" needs neither): the flags, else this environment's, else
    127.0.0.1 and a free port on one node, the first host and port 29500 on
    several. torchrun-style launches also get ``OMP_NUM_THREADS=1`` unless it
    is set. Each MPMD app context (``a : b``) gets the same.

    Args:
        args: mpiexec's arguments (options, program, its arguments).
        opts: what torchrun's flags gave (:func:`torchrun_args`), None for an mpiexec-style launch.
        env: the launcher's environment (default ``os.environ``).

    The program's start is known after a ``--`` (which torchrun-style
    launches put there) or when collective-run knows every option before it;
    an app context with an option it does not know (it might take values) is
    left as it is, with a note on stderr.

    Returns:
        The arguments with ``sh -c SCRIPT collective-run NODES ADDR PORT THREADS`` before each program (in
        place of its ``--``).
    """
    return _rank_env(_split(args), opts, env)


def _rank_env(line: _Line, opts: TorchrunOptions | None, env: dict[str, str] | None) -> list[str]:
    e = os.environ if env is None else env
    contexts = _contexts(line)
    on_hosts = any(_has_host(c) for c in contexts) or _allocated_nodes() > 1
    if opts is not None and opts.by_node:
        nodes = opts.nnodes
    else:
        nodes = 0 if on_hosts else 1
    addr = (opts.master_addr if opts is not None else None) or e.get("MASTER_ADDR") or (
        (_first_host(contexts[0]) or "") if on_hosts else "127.0.0.1")
    port = (opts.master_port if opts is not None else None) or e.get("MASTER_PORT") or (
        29500 if on_hosts else _free_port())
    threads = "1" if opts is not None and opts.nproc_per_node > 1 and "OMP_NUM_THREADS" not in e else ""
    out: list[str] = []
    unmarked = False
    for k, ctx in enumerate(contexts):
        if k:
            out.append(":")
        words = ctx.words()
        at = _program_at(ctx)
        if at is None:
            unmarked = unmarked or bool(words)
            out.extend(words)
            continue
        out.extend([*words[:at], "sh", "-c", _RANK_ENV_SH, "collective-run", str(nodes), addr, str(port), threads,
                    *words[at + ctx.marked:]])
    if unmarked:
        print("collective-run: RANK, LOCAL_RANK, ... (torchrun's environment) were not set: an mpiexec option here "
              "is unknown to collective-run; put -- right after mpiexec's options to get them "
              "(collective-run -n 2 --someflag v -- python train.py)", file=sys.stderr)
    return out


def mpiexec_command(args: Sequence[str], env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command line and environment for ``args`` (everything is passed through).

    Adds ``--oversubscribe`` when more ranks are asked for than this machine
    has cores, and the run-as-root variables when running as root.
    """
    cmd, env = _mpiexec(_split(args), env)
    return [*cmd, *args], env


def _mpiexec(line: _Line, env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """mpiexec and the options it gets in front of ``line``, and the environment (see :func:`mpiexec_command`)."""
    env = dict(os.environ if env is None else env)
    cmd = [find_mpiexec()]
    contexts = _contexts(line)
    counts = [_nprocs(c) for c in contexts]
    n = None if None in counts else sum(c for c in counts if c is not None)
    flags = [f for c in contexts for f in c.flags()]
    if n is not None and n > (os.cpu_count() or 1) and not any(_has_host(c) for c in contexts) and \
            "--oversubscribe" not in flags:
        cmd.append("--oversubscribe")
        # Busy-polling ranks that outnumber cores starve each other; let idle ranks yield.
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return cmd, env


_EMULATE_USAGE = (
    "usage: collective-run --emulate HxR [--link RATE] [mpiexec options] [--] program [args...]\n"
    "Runs the program on an emulated cluster of H hosts x R ranks on this machine (network namespaces on a\n"
    "bridge, each host its own hostname; MPI over TCP between hosts, shared memory inside). --link shapes each\n"
    "host's link with tc, e.g. 1gbit or 200mbit (default unshaped). Needs root. Everything is removed afterwards."
)


def _emulate(line: _Line) -> int:
    """``--emulate HxR [--link RATE] [mpiexec options] [--] program...``: run on an emulated cluster."""
    from . import emulate

    shape, rate = line.value(("--emulate",)), line.value(("--link",))
    kept = _Line([o for o in line.options if o[0].partition("=")[0] not in ("--emulate", "--link")], line.program,
                 line.marked)
    rest = kept.words() if kept.program else []
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
    kept, extra = _elastic(kept)
    os.environ.update(extra)  # the ranks inherit the launcher's environment (and -x exports it to every host)
    try:
        return emulate.run(hosts, per_host, rate, kept.words())
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
        print("usage: collective-run [mpiexec options] [--] program [args...]\n"
              "       collective-run --nproc_per_node N [--nnodes M --host/--hostfile ...] script.py [args...]\n"
              "Runs the installed mpiexec, adding --oversubscribe when ranks exceed cores and the\n"
              "run-as-root settings when run as root. Each process gets torchrun's environment: RANK,\n"
              "WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and GROUP_RANK/NODE_RANK where a\n"
              "rank's node is known), unless an mpiexec option unknown to collective-run comes before the program\n"
              "with no -- after it. horovodrun's\n"
              "-np/--num-proc, -H/--hosts, --hostfile, --network-interface, --mpi-args and --mpi are\n"
              "translated, and so are torchrun's --nproc_per_node, --nnodes, --master_addr, --master_port,\n"
              "--standalone, -m and --no_python\n"
              "(the program is then a Python script, as under torchrun); everything else is passed through.\n"
              "--elastic [--min-ranks N] [--max-ranks M]: a lost rank raises RanksLostError on the survivors,\n"
              "which continue with comm.shrink() (Open MPI's --with-ft ulfm; see docs/guides/elastic.md).\n\n"
              + _EMULATE_USAGE, file=sys.stdout if args else sys.stderr)
        if not args:
            print("collective-run: no program given; e.g. collective-run -n 4 python train.py", file=sys.stderr)
            sys.exit(2)
        return
    line = _split(args)
    if "--emulate" in line.flags():
        sys.exit(_emulate(line))
    line, extra = _elastic(line)
    line, torchrun = _torchrun(line)
    line = _horovodrun(line)
    cmd, env = _mpiexec(line, {**os.environ, **extra})
    cmd = [*cmd, *_rank_env(line, torchrun, env)]
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
