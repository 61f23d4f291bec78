"""collective.horovod: Horovod's API on collective (``import collective.horovod.torch as hvd``).

Ops are matched across ranks by name as in Horovod, and every collective runs
on collective's Communicator, so its cross-rank checks and watchdog cover
every call. Errors are Horovod's types (:class:`HorovodInternalError` is also
a :class:`collective.CollectiveError`).
"""
from __future__ import annotations

from .exceptions import HorovodInternalError, HorovodVersionMismatchError, HostsUpdatedInterrupt

__all__ = ["HorovodInternalError", "HorovodVersionMismatchError", "HostsUpdatedInterrupt"]
