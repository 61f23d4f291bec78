"""The cross-rank check of every call: fingerprints, the optional NaN scan, and where the check runs (MPI or shm).

Terms (the names below follow them):

* **check** -- before any of a call's data moves, every rank proves it makes
  the same call (:mod:`collective.fingerprint`); with ``COLLECTIVE_NAN_CHECK``
  the input is also scanned for NaN and Inf.
* **fenced** -- once every rank of the communicator shares one node and the
  node's shm arena exists, the check is a phase of that arena
  (``ShmArena.exchange``): a fence, a flag wait and P reads instead of an MPI
  allreduce. This module owns that rule: :meth:`CrossRankCheck.attach_arena`
  switches it on for every rank at the same call.
* **first phase** -- an shm collective begins with a phase that only says
  "every rank has arrived"; a fenced check says the same, so it *is* that
  phase (:meth:`CrossRankCheck.gate` hands it to the shm path).
* **quick** -- with the check fenced and nothing else to do per call (no NaN
  scan, no DETAIL records), a repeated small shm allreduce posts its
  fingerprint and its data in one phase (``ShmArena.quick_allreduce``);
  :attr:`CrossRankCheck.quick_arena` is that arena, else None.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .fingerprint import Fingerprints, Poison

__all__ = ["CrossRankCheck"]


class CrossRankCheck:
    """The per-call check of one communicator.

    Args:
        comm: the private mpi4py communicator (the check's allreduce runs on it).
        rank, size: this rank and the number of ranks.
        fingerprints: check that every rank makes the same call (``COLLECTIVE_CHECK``).
        detail: gather every rank's record on every call (``COLLECTIVE_DEBUG=DETAIL``).
        nan_check: scan inputs for NaN and Inf (``COLLECTIVE_NAN_CHECK``).

    Example::

        chk = CrossRankCheck(mpi_comm, rank, size)
        if chk.on:
            chk.check(rec, call)   # CollectiveMismatchError on every rank if the calls differ
    """

    def __init__(self, comm: Any, rank: int, size: int, *, fingerprints: bool = True, detail: bool = False,
                 nan_check: bool = False) -> None:
        self.rank, self.size = rank, size
        self.fingerprints: Fingerprints | None = (Fingerprints(comm, rank, size, detail)
                                                  if fingerprints and size > 1 and comm is not None else None)
        self.nan_check = nan_check
        #: Whether any check runs per call (False: one rank, or the check and the NaN scan both off).
        self.on: bool = self.fingerprints is not None or nan_check
        #: ``check(rec, call) -> bool``: True when it synchronised every rank (a barrier needs nothing more).
        self.check: Callable[[Any, Any], bool] = self._check
        if self.fingerprints is not None and not nan_check:
            self.check = self.fingerprints.check_call  # one frame less per call
        #: The shm arena the check is fenced in, once attached; None before and when it cannot be.
        self.arena: Any = None
        #: The arena when repeated small shm allreduces may run in one phase (see the module docstring).
        self.quick_arena: Any = None

    @property
    def detail(self) -> bool:
        """True with ``COLLECTIVE_DEBUG=DETAIL`` (records gathered on every call)."""
        return self.fingerprints is not None and self.fingerprints.detail

    def attach_arena(self, arena: Any, covers_all: bool) -> None:
        """Fence the check in ``arena`` from the next call on (every rank attaches it in the same call).

        ``covers_all``: the arena's node holds every rank of the communicator;
        otherwise the check stays an MPI allreduce.
        """
        fp = self.fingerprints
        if fp is None or not covers_all:
            return
        fp.exchange = arena.exchange
        fp.exchange_pairs = arena.exchange_pairs
        arena.check_fenced = not fp.detail  # DETAIL checks by an MPI allgather instead
        self.arena = arena
        if not fp.detail and not self.nan_check:
            self.quick_arena = arena

    def detach_arena(self) -> None:
        """Check by MPI again (the arena is about to be freed)."""
        if self.fingerprints is not None:
            self.fingerprints.exchange = None
            self.fingerprints.exchange_pairs = None
        self.arena = self.quick_arena = None

    def gate(self, rec: Any, c: Any) -> Callable[[], Any] | None:
        """Check call ``c`` (record ``rec``) now and return None, or return the check as its first shm phase.

        The check becomes the first phase when it is fenced in the arena and
        the call's shm path begins with a phase that only marks arrival
        (every shm collective with data but broadcast).
        """
        if c.name == "barrier":  # the barrier runs it between its fences, and needs to know if it synchronised
            return functools.partial(self.check, rec, c)
        if (self.arena is not None and (c.algorithm == "shm" or c.views is not None) and c.name != "broadcast"
                and c.xf is not None and c.xf.size):
            return functools.partial(self.check, rec, c)
        self.check(rec, c)
        return None

    def mismatch(self, seq: int, fields: list[str], thread: str) -> None:
        """Raise the mismatch report of call ``seq`` (issued by thread ``thread``) on every rank, after a quick path
        saw differing fingerprints."""
        self.fingerprints.report(seq, fields, thread)  # type: ignore[union-attr]

    def _check(self, rec: Any, c: Any) -> bool:
        poison = c.error if type(c) is Poison else None
        if self.nan_check and poison is None:
            xf = getattr(c, "xf", None)
            if xf is not None and not (rec.op == "broadcast" and rec.root != self.rank):  # only the root's input
                self._nan(rec, xf)
        fp = self.fingerprints
        if fp is None:
            if poison is not None:
                raise poison
            return False
        op, shape, dtype, algorithm, root = rec.what
        fp.check(rec.seq, op, algorithm, getattr(c, "rop", None), dtype, shape, root, poison,
                 None if poison is not None else c, thread=rec.thread)
        return True

    def _nan(self, rec: Any, xf: np.ndarray) -> None:
        if xf.dtype.kind in "iub" or xf.size == 0:
            return
        try:
            finite = np.isfinite(xf)
        except TypeError:  # a dtype without isfinite
            return
        if finite.all():
            return
        nans = int(np.count_nonzero(np.isnan(xf)))
        infs = int(xf.size - np.count_nonzero(finite) - nans)
        first = int(np.flatnonzero(~finite)[0])
        sys.stderr.write(f"collective: rank {self.rank} of {self.size}: COLLECTIVE_NAN_CHECK: the input of "
                         f"{rec.describe(False)} holds {nans} NaN and {infs} Inf (first at flat element {first}); "
                         "they propagate to the result as IEEE 754 says\n")
        sys.stderr.flush()
