"""Fault tolerance over ULFM (Open MPI's MPI_Comm_revoke/agree/shrink): a lost rank becomes RanksLostError.

Terms (the names below follow them):

* **elastic mode** -- ``COLLECTIVE_ELASTIC=1`` under ``mpiexec --with-ft
  ulfm`` (``collective-run --elastic``). The communicator's MPI objects
  return errors instead of aborting, and any MPI error inside a call is taken
  as a possible failure of a peer.
* **job rank** -- a rank's number in the original job: its rank in
  ``MPI.COMM_WORLD`` at launch; replacements spawned by ``comm.grow()`` count
  on from the highest job rank ever used. Errors name lost ranks by it, so a
  rank keeps its name through every shrink.
* **recovery** -- what the first call to notice a failure does, once per
  communicator (:meth:`FailureState.recover`): *revoke* the MPI communicator
  (every survivor's pending and next call on it fails too, so none waits for
  the dead), *agree* (acknowledge the failures and run ``MPI_Comm_agree``
  until it completes among the survivors), then *shrink* (``MPI_Comm_shrink``:
  the survivors' communicator, the same on every survivor). The lost ranks
  are the ranks missing from it, so every survivor names the same ones.
* **agreement** -- ``MPI_Comm_agree`` on the communicator, after
  acknowledging the failures this rank knows of: its outcome (value and
  error) is the same on every survivor. The value carries two bits, the
  caller's flag and "this rank knows of no failure"
  (:meth:`FailureState.agree`); recovery and :meth:`Communicator.agree
  <collective.Communicator.agree>` contribute to the same agreements, so a
  survivor in recovery and one asking for a uniform outcome meet in one and
  both learn of the failure.
* **peer watch** -- shm phases wait on flags in shared memory, which no MPI
  error interrupts; in elastic mode such a wait checks, every few
  milliseconds, whether a peer's process is gone or the communicator was
  revoked (:meth:`FailureState.watch`), and raises :class:`PeerLost`.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from .errors import CollectiveConfigError, CollectiveError, RanksLostError, raise_lost

__all__ = ["FailureState", "PeerLost", "exit_status", "is_failure", "keep_connected", "leave_without_finalize",
           "raise_lost", "require_ulfm", "ulfm_enabled"]

_TRUE = ("1", "true", "yes", "on")

#: Bits of an agreement's value (MPI_Comm_agree ANDs them over the survivors): the caller's flag, and "this rank
#: knows of no failed process" (so the AND has it only when no survivor knows of one).
AGREE_FLAG, AGREE_CLEAN = 1, 2


def ulfm_enabled(environ: Any = None) -> bool:
    """Whether this process was launched with Open MPI's fault tolerance (``mpiexec --with-ft ulfm``).

    mpiexec sets ``OMPI_MCA_mpi_ft_enable=1`` in every rank it starts so;
    without it a failed rank ends the whole job whatever the error handlers.
    """
    env = os.environ if environ is None else environ
    return str(env.get("OMPI_MCA_mpi_ft_enable", "")).strip().lower() in _TRUE


def require_ulfm(MPI: Any, where: str) -> None:
    """Raise CollectiveConfigError unless MPI can survive a lost rank here (elastic mode's precondition)."""
    missing = [n for n in ("Revoke", "Shrink", "Agree", "Ack_failed") if not hasattr(MPI.Comm, n)]
    if missing:
        raise CollectiveConfigError(f"{where}: COLLECTIVE_ELASTIC=1 needs MPI's fault tolerance (ULFM), but this "
                                    f"mpi4py lacks {', '.join('Comm.' + n for n in missing)}; install mpi4py 4 or "
                                    "newer over Open MPI 5, or unset COLLECTIVE_ELASTIC")
    if not ulfm_enabled():
        raise CollectiveConfigError(f"{where}: COLLECTIVE_ELASTIC=1, but the job was not launched with fault "
                                    "tolerance, so a lost rank would end it anyway: launch with `collective-run "
                                    "--elastic -n N ...` (or `mpiexec --with-ft ulfm ...`), or unset "
                                    "COLLECTIVE_ELASTIC")


class PeerLost(Exception):
    """A wait outside MPI (an shm flag) found a peer's process gone or the communicator revoked."""


def is_failure(exc: BaseException, MPI: Any) -> bool:
    """Whether ``exc``, raised inside a call in elastic mode, may mean a lost peer (then recovery decides)."""
    return isinstance(exc, (MPI.Exception, PeerLost))


class FailureState:
    """Failure handling of one communicator in elastic mode: recovery, once, and what it found.

    Args:
        comm: the communicator's private mpi4py communicator.
        MPI: the mpi4py.MPI module.
        job_ranks: the job rank of each rank of ``comm``.
        rank: this rank in ``comm``.

    Example::

        fs = FailureState(mpi_comm, MPI, (0, 1, 2, 3), rank)
        try:
            mpi_comm.Allreduce(x, y)
        except MPI.Exception as exc:
            raise fs.recover("allreduce", exc) from exc   # RanksLostError naming the lost ranks
    """

    #: Rounds of ack + agree before recovery goes on to shrink anyway (more failures keep arriving).
    AGREE_ROUNDS = 8

    def __init__(self, comm: Any, MPI: Any, job_ranks: tuple[int, ...], rank: int) -> None:
        self.comm, self.MPI = comm, MPI
        self.job_ranks = job_ranks
        self.rank = rank
        #: The error of the first failure (None while there was none).
        self.error: RanksLostError | None = None
        #: The survivors' mpi4py communicator from MPI_Comm_shrink (None before recovery).
        self.survivors: Any = None
        #: Job ranks of the survivors, in the survivors' rank order.
        self.survivor_jobs: tuple[int, ...] = ()
        #: Seconds each part of recovery took: detect (from the start of the call that noticed the failure, when
        #: one did), revoke, agree, shrink; and ``noticed_at`` (``time.time()`` when it was noticed).
        self.times: dict[str, float] = {}
        #: Set when recovery itself failed (MPI_Comm_shrink raised): every later recovery raises it again.
        self.broken: CollectiveError | None = None
        self._lock = threading.Lock()
        self._more = ""
        self._pids: list[tuple[int, int]] = []

    # ---------------------------------------------------------------- watch
    def watch_pids(self, node_comm: Any) -> None:
        """Remember the node's processes (collective over ``node_comm``), so shm waits can see one die."""
        me = (os.getpid(), _pid_namespace())
        every = node_comm.allgather(me)
        self._pids = [(pid, ns) for pid, ns in every if ns == me[1] and pid != me[0]]

    def watch(self, probe: Any = None) -> None:
        """Raise PeerLost if a node peer's process is gone, or if ``probe`` (a communicator) reports a failure.

        Called every few milliseconds by a rank waiting on shm flags. A probe
        for any message on ``probe`` lets MPI notice failures and revocations:
        under ULFM it fails once a peer is known dead or the communicator was
        revoked.
        """
        for pid, _ in self._pids:
            if not _alive(pid):
                raise PeerLost(f"process {pid} on this node is gone")
        if probe is not None:
            try:
                probe.Iprobe(self.MPI.ANY_SOURCE, self.MPI.ANY_TAG)
            except self.MPI.Exception as exc:
                raise PeerLost(f"MPI reports {exc.Get_error_string().strip()}") from exc

    # ------------------------------------------------------------ agreement
    def agree(self, flag: bool, failed: bool = False) -> tuple[bool, bool]:
        """Fault-tolerant agreement over the communicator: (AND of every survivor's ``flag``, whether any knew of a
        failure). Collective; the outcome is the same on every survivor.

        Each round acknowledges the failures this rank knows of and runs
        ``MPI_Comm_agree``, whose outcome (value and error) ULFM makes uniform:
        an error (a process failed and not every survivor had acknowledged it)
        comes to every survivor, which all go round again, so every survivor
        runs the same rounds. ``failed``: this rank knows of a failure already
        (recovery contributes so).

        Raises:
            CollectiveError: failures kept arriving for :attr:`AGREE_ROUNDS` rounds.
        """
        MPI, comm = self.MPI, self.comm
        for _ in range(self.AGREE_ROUNDS):
            try:
                known = comm.Ack_failed()
            except MPI.Exception:  # refused: count it as a failure known, the agreement decides the rest
                known = 1
            value = (AGREE_FLAG if flag else 0) | (0 if failed or known else AGREE_CLEAN)
            try:
                out = comm.Agree(value)
            except MPI.Exception:  # a failure some survivor had not acknowledged: raised on every survivor alike
                failed = True
                continue
            return bool(out & AGREE_FLAG), failed or not out & AGREE_CLEAN
        raise CollectiveError(f"{self._where('agreement')}: MPI_Comm_agree failed {self.AGREE_ROUNDS} times in a "
                              "row (processes kept failing during it); the job cannot agree on its survivors")

    # ------------------------------------------------------------- recovery
    def recover(self, op: str, exc: BaseException | None, started: float | None = None,
                agreed: bool = False) -> RanksLostError:
        """Revoke, agree and shrink (once; later callers get the same outcome); the error for call ``op``.

        Collective over the survivors: every survivor gets here, through a
        failed call (the revocation fails the pending and next call of each)
        or through ``comm.shrink()``.

        Args:
            op: the call that noticed the failure.
            exc: what it raised (None: no call noticed one, e.g. ``shrink()`` called first).
            started: ``time.monotonic()`` when that call began (for the detection time).
            agreed: the call was an agreement (:meth:`agree`) that found the failure: its survivors took part in
                it already, those in recovery included, so recovery goes on to shrink without another.

        Raises:
            CollectiveError: recovery failed (the agreement kept failing, or MPI_Comm_shrink raised); the
                survivors cannot go on together.
        """
        with self._lock:
            if self.broken is not None:
                raise CollectiveError(str(self.broken))
            if self.error is None:
                self._recover(op, exc, started, agreed)
            err = self.error
        assert err is not None
        # A new error for each caller: callers on several threads raise it ``from`` their own exception, which
        # sets its __cause__ and __traceback__.
        return RanksLostError(op, err.lost_ranks, err.survivors, where=self._where(op), more=self._more)

    def _where(self, op: str) -> str:
        return f"{op} on job rank {self.job_ranks[self.rank]} (rank {self.rank} of {len(self.job_ranks)})"

    def _recover(self, op: str, exc: BaseException | None, started: float | None, agreed: bool) -> None:
        MPI, comm = self.MPI, self.comm
        t0 = time.monotonic()
        times = self.times
        times["noticed_at"] = time.time()
        if started is not None:
            times["detect"] = t0 - started
        try:
            comm.Revoke()
        except MPI.Exception:  # revoked already (by a peer), or the call itself is refused: shrink decides
            pass
        t1 = time.monotonic()
        times["revoke"] = t1 - t0
        if not agreed:
            # MPI_Comm_shrink agrees on the failed processes by itself; this agreement is for the survivors whose
            # last call completed and who are now in Communicator.agree() on this communicator (a revocation does
            # not interrupt an agreement): meeting them in one makes their call raise too. Its outcome is uniform,
            # so every survivor runs the same rounds (and raises CollectiveError alike when they run out).
            self.agree(True, failed=True)
        t2 = time.monotonic()
        times["agree"] = t2 - t1
        try:
            surv = comm.Shrink()
        except MPI.Exception as exc:
            leave_without_finalize()
            self.broken = CollectiveError(
                f"{self._where(op)}: a rank was lost, and MPI_Comm_shrink failed ({_mpi_text(exc, MPI)}), so the "
                "survivors cannot go on together; end the job and restart it (from the last disk checkpoint)")
            raise self.broken from exc
        surv.Set_errhandler(MPI.ERRORS_RETURN)
        t3 = time.monotonic()
        times["shrink"] = t3 - t2
        old, new = comm.Get_group(), surv.Get_group()
        kept = MPI.Group.Translate_ranks(new, list(range(new.Get_size())), old)
        old.Free()
        new.Free()
        self.survivors = surv
        self.survivor_jobs = tuple(self.job_ranks[k] for k in kept)
        lost = tuple(j for i, j in enumerate(self.job_ranks) if i not in set(kept))
        why = ""
        if not lost:
            why = (f" (no process was lost, but {type(exc).__name__ if exc is not None else 'a peer'} ended the "
                   "communicator: " + (_mpi_text(exc, MPI) if exc is not None else "revoked by a peer") + ")")
        self._more = why
        self.error = RanksLostError(op, lost, len(kept), where=self._where(op), more=why)
        leave_without_finalize()


_CONNECTED: list[Any] = []


def keep_connected(inter: Any, MPI: Any) -> None:
    """Keep intercommunicator ``inter`` (between growers and spawned processes) until this program ends, then
    disconnect it (collective over both sides) before MPI finalizes.

    MPI_Finalize is collective over every process this one is connected to,
    spawned jobs included (MPI standard, "Releasing Connections"); Open MPI's
    finalization of a process still connected to another job tries to reach
    processes whose addresses it never obtained and can crash. Disconnecting
    first makes the jobs independent, as the standard intends.
    """
    from . import watchdog

    _CONNECTED.append(inter)
    if len(_CONNECTED) == 1:
        watchdog.at_exit_last(_disconnect_all)


def _disconnect_all() -> None:
    while _CONNECTED:
        inter = _CONNECTED.pop()
        try:
            inter.Disconnect()
        except Exception:  # noqa: BLE001, S110 - a side already gone: nothing left to disconnect from
            pass


_LEAVING: list[int] = []


def leave_without_finalize() -> None:
    """After a lost rank, end this process at exit without MPI_Finalize (with the program's exit status).

    Open MPI's MPI_Finalize can wait forever once a rank of the job has
    failed (open-mpi #11404, reported across nodes; the same wait in
    finalization's fence can follow a failure on one node), and under
    ``--with-ft ulfm`` mpiexec accepts a process that exits without it. So the
    survivors flush their output and leave with ``os._exit``, after the exit
    notices and disconnects that precede MPI's finalization, with the status
    the program would have had: 0 when it simply ends, 1 after an uncaught
    exception (130 for KeyboardInterrupt), the code given to ``sys.exit``,
    ``exit``/``quit`` or :func:`exit_status`. A bare ``raise SystemExit(n)``
    reaching the top level cannot be seen from Python (the interpreter reads
    its code during finalization, with no hook): it ends with the status
    known until then.
    """
    if _LEAVING:
        return
    _LEAVING.append(0)
    import builtins

    from . import watchdog

    real_exit = sys.exit

    def exit_(status: Any = None) -> None:
        exit_status(status)
        real_exit(status)

    sys.exit = exit_  # type: ignore[assignment]
    for name in ("exit", "quit"):  # site's Quitter objects: they raise SystemExit themselves
        quitter = getattr(builtins, name, None)
        if quitter is not None:
            setattr(builtins, name, _Quitter(quitter))
    prev_hook = sys.excepthook

    def excepthook(etype: Any, value: Any, tb: Any) -> None:
        _LEAVING[0] = 130 if issubclass(etype, KeyboardInterrupt) else 1  # what Python itself exits with
        prev_hook(etype, value, tb)

    sys.excepthook = excepthook
    watchdog.at_exit_last(_leave)


def exit_status(code: Any) -> None:
    """Record the status this process ends with after a recovery, as Python derives it from ``SystemExit(code)``.

    ``sys.exit``, ``exit`` and ``quit`` record theirs; a program that ends with
    ``raise SystemExit(code)`` after a lost rank calls this first.
    """
    if _LEAVING:
        _LEAVING[0] = 0 if code is None else int(code) & 0xFF if isinstance(code, int) else 1


class _Quitter:
    """``exit``/``quit`` that record their code for :func:`_leave` (then raise SystemExit as the builtin does)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __repr__(self) -> str:
        return repr(self._real)

    def __call__(self, code: Any = None) -> None:
        exit_status(code)
        self._real(code)


def _leave() -> None:
    _disconnect_all()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001, S110 - leaving anyway
            pass
    os._exit(_LEAVING[0])


def _mpi_text(exc: BaseException, MPI: Any) -> str:
    if isinstance(exc, MPI.Exception):
        return exc.Get_error_string().strip()
    return str(exc)


def _pid_namespace() -> int:
    """An id of this process's PID namespace (pids of processes in another one cannot be checked)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
