"""Horovod's exception types, as Horovod users catch them, rooted in collective's error hierarchy."""
from __future__ import annotations

from ..errors import CollectiveError

__all__ = ["HorovodInternalError", "HorovodVersionMismatchError", "HostsUpdatedInterrupt"]


class HorovodInternalError(CollectiveError, RuntimeError):
    """A collective failed on this rank: ranks disagreed on a named op (shape, dtype, op, root), a rank
    joined or shut down while others still needed it, or the data movement itself failed.

    Raised on every rank that took part, never left hanging. A ``RuntimeError``, as in Horovod.
    """


class HostsUpdatedInterrupt(RuntimeError):
    """The set of hosts changed during elastic training (Horovod's type; raised by the elastic machinery)."""

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__("hosts updated")
        self.skip_sync = skip_sync


class HorovodVersionMismatchError(ImportError):
    """Horovod's type for a framework version mismatch; kept so ``except`` clauses that name it still import."""
