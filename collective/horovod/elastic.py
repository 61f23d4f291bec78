"""Horovod's framework-neutral elastic pieces on collective: State, ObjectState and the retry loop of hvd.elastic.run.

Terms (Horovod's; the names below follow them). A *state* is what training
must not lose when a rank dies: it lives in memory on every rank. *commit*
saves a copy of it (``save``); *restore* rolls the live objects back to that
copy; *sync* makes every rank's state rank 0's (a broadcast). A *reset* is
what follows a lost rank: Horovod goes on over the survivors (the framework
module supplies it), then the state's reset callbacks run. *Hosts updated*:
ranks were added; a commit after a recovery grows the job back to
``COLLECTIVE_MAX_RANKS`` (the framework module's check, see
:func:`set_host_check`) and raises ``HostsUpdatedInterrupt``, as Horovod's
commit does when hosts are added.

The loop (:func:`run_fn`): sync, call the training function; when a rank is
lost (``HorovodInternalError`` caused by ``RanksLostError``, or
``RanksLostError`` itself), restore the last commit, reset, and go round
again, so every survivor starts the function from rank 0's last commit.
On ``HostsUpdatedInterrupt`` (raised by a commit that added ranks, or by the
user's code), run the reset callbacks, sync (so the new ranks take rank 0's
committed state) and go round again. Any other error propagates: the same
call would only fail again.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from ..errors import RanksLostError
from .exceptions import HorovodInternalError, HostsUpdatedInterrupt

__all__ = ["ObjectState", "State", "lost_ranks_in", "run_fn", "set_host_check"]

#: The framework module's ``check() -> bool``: collective, True when it added ranks (see :func:`set_host_check`).
_host_check: Callable[[], bool] | None = None


def set_host_check(check: Callable[[], bool] | None) -> None:
    """Install the check that every :meth:`State.commit` makes for added ranks (the framework module does it).

    Args:
        check: collective over the ranks, ``check() -> bool``: True when ranks were added (Horovod's size and
            ranks changed), which makes the commit raise ``HostsUpdatedInterrupt``; None removes it.
    """
    global _host_check
    _host_check = check


class State:
    """The base of Horovod's elastic states: commit/restore/sync and the reset callbacks.

    Args:
        bcast_object: ``f(obj) -> obj`` broadcasting a picklable object from rank 0.
        get_rank: ``f() -> int``, this process's rank now.
    """

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int]) -> None:
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._reset_callbacks: list[Callable[[], Any]] = []

    def register_reset_callbacks(self, callbacks: list[Callable[[], Any]]) -> None:
        """Add functions to call after every reset (ranks lost), e.g. to rescale the learning rate to ``hvd.size()``.

        Example::

            state.register_reset_callbacks([lambda: set_lr(base_lr * hvd.size())])
        """
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        """Called by :func:`run_fn` after a reset: :meth:`reset`, then every registered callback in order."""
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Save a copy of the state in host memory (:meth:`save`), then check for added ranks (collective).

        As in Horovod, a commit is where new ranks join: the first commit
        after a recovery from lost ranks spawns replacements up to
        ``COLLECTIVE_MAX_RANKS`` (``collective-run --max-ranks``) and raises
        ``HostsUpdatedInterrupt``; ``hvd.elastic.run`` catches it, runs the reset
        callbacks and syncs, so the new ranks start from this commit. (Lost
        ranks need no check: the failed collective itself reports them.)
        Every other commit sends no message. Each commit copies the state:
        commit every few steps when that copy is costly.

        Raises:
            HostsUpdatedInterrupt: ranks were added (every rank raises it alike).
        """
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Collective: raise ``HostsUpdatedInterrupt`` if ranks were added here (see :meth:`commit`).

        Raises:
            HostsUpdatedInterrupt: replacements joined (``skip_sync`` False: they need the state).
        """
        if _host_check is not None and _host_check():
            raise HostsUpdatedInterrupt(skip_sync=False)

    def save(self) -> None:
        """Save the state in host memory."""
        raise NotImplementedError(f"{type(self).__name__}.save")

    def restore(self) -> None:
        """Put the last saved state back, undoing every change since."""
        raise NotImplementedError(f"{type(self).__name__}.restore")

    def sync(self) -> None:
        """Collective: every rank takes rank 0's state."""
        raise NotImplementedError(f"{type(self).__name__}.sync")

    def reset(self) -> None:
        """Adjust objects after a reset, before the sync (nothing by default)."""


class ObjectState(State):
    """Plain Python values tracked as attributes: ``ObjectState(bcast, rank, epoch=0)`` has ``.epoch``.

    Values are copied (``copy.deepcopy``) on save and restore, so mutating an
    attribute in place never changes the saved copy; they travel pickled on
    sync (trusted peers only, like every object collective).

    Args:
        bcast_object: ``f(obj) -> obj`` broadcasting a picklable object from rank 0.
        get_rank: ``f() -> int``, this process's rank now.
        kwargs: the values to track, by attribute name.
    """

    def __init__(self, bcast_object: Callable[[Any], Any], get_rank: Callable[[], int], **kwargs: Any) -> None:
        self._bcast_object = bcast_object
        self._saved_state = copy.deepcopy(kwargs)
        self._set_attrs()
        super().__init__(bcast_object=bcast_object, get_rank=get_rank)

    def save(self) -> None:
        """Copy the tracked values."""
        self._saved_state = {k: copy.deepcopy(getattr(self, k)) for k in self._saved_state}

    def restore(self) -> None:
        """Set the attributes back to the saved copies."""
        self._set_attrs()

    def sync(self) -> None:
        """Collective: every rank takes rank 0's saved values."""
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for k, v in self._saved_state.items():
            setattr(self, k, copy.deepcopy(v))


def lost_ranks_in(exc: BaseException) -> RanksLostError | None:
    """The ``RanksLostError`` that ``exc`` is or was caused by (following ``__cause__``/``__context__``), or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, RanksLostError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def run_fn(func: Callable[..., Any], reset: Callable[[], Any],
           lost_error: Callable[[BaseException], RanksLostError | None] = lost_ranks_in) -> Callable[..., Any]:
    """Horovod's elastic loop around ``func(state, *args, **kwargs)`` (see the module docstring).

    Args:
        func: the training function; its first argument is the :class:`State`.
        reset: collective over the survivors after a lost rank: go on over them.
        lost_error: the ``RanksLostError`` behind an exception, or None when it is no lost rank.

    Returns:
        The wrapped function; it returns ``func``'s result.
    """
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except (HorovodInternalError, RanksLostError) as exc:
                if lost_error(exc) is None:
                    raise  # not a lost rank: calling again would fail the same way
                state.restore()
                skip_sync = False
                reset()
            except HostsUpdatedInterrupt as exc:  # ranks added by a commit, or user code: re-sync unless told not to
                skip_sync = exc.skip_sync
            state.on_reset()
    return wrapper
