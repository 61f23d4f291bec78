"""Which thread issued a collective, told apart the same way on every rank (the rule for threads of the op order).

Terms (the names below follow them):

* **issuer** -- the thread that called a collective: the caller's thread for
  a synchronous call, and for an ``*_async`` call the thread that called it
  (not the communication thread, which only runs it).
* **tag** -- an issuer as the cross-rank check sees it (:class:`ThreadTag`):
  the thread's name, which is comparable across ranks ("MainThread" on every
  rank; ``threading.Thread(name="loader")`` gives "loader" on every rank;
  Python numbers unnamed threads in the order each process creates them,
  "Thread-3 (work)"), and a 62-bit hash of that name. The fingerprint of every
  call includes the issuer's hash, so an op that one thread issues on one rank
  and another thread on another rank is a mismatch on every rank, never an
  exchange of the wrong data. A thread's tag is taken from its name when it
  first calls a collective, and kept for the thread's lifetime. A name is
  only comparable while one live thread bears it: a thread whose name another
  live thread of this process bears too (``Thread(name="worker")`` twice) gets
  a tag of its own instead, shown as ``worker (a second live thread so named,
  id N)`` and hashed with its ident, which no thread of another rank shares,
  so its collectives are a mismatch that says to name the threads apart,
  never a pairing of the two threads' data decided by timing.
* **library threads** -- threads of this library that issue collectives on a
  user's behalf (torch's completion callbacks, the Horovod engine) carry one
  fixed name each, so their tags agree across ranks too (:func:`set_name`).
* **ordered issuers** -- a communicator whose only caller orders the ops
  itself, whichever thread issues them (torch.distributed: a process group's
  ops run in the order torch issues them, from the caller's thread or a
  completion callback's), tags every thread with one name
  (:class:`OrderedIssuers`); each thread still has a tag object of its own,
  so two threads inside one op at once are still told apart.
"""
from __future__ import annotations

import threading
import zlib

__all__ = ["ThreadTag", "TAGS", "thread_tag", "set_name", "OrderedIssuers", "SHARED_NAME"]

_MASK62 = (1 << 62) - 1
#: Per thread: ``TAGS.tag`` is the thread's :class:`ThreadTag` once made (the repeat paths read it inline; an
#: AttributeError means not yet: call :func:`thread_tag`).
TAGS = threading.local()
#: In the tag name of a thread whose name another live thread bears too (see the module docstring).
SHARED_NAME = "a second live thread so named"


class ThreadTag:
    """One thread as the cross-rank check names it.

    Attributes:
        name: the thread's name when it first called a collective.
        h: a 62-bit hash of ``name`` (crc32 based: the same in every process), folded into fingerprints.
        ident: ``threading.get_ident()`` of the thread.
    """

    __slots__ = ("name", "h", "ident")

    def __init__(self, name: str, ident: int) -> None:
        self.name, self.ident = name, ident
        raw = name.encode("utf-8", "replace")
        self.h = (zlib.crc32(raw, 0x2545F491) | (zlib.crc32(raw, 0x9E3779B9) << 32)) & _MASK62

    def __repr__(self) -> str:
        return f"ThreadTag({self.name!r})"


def thread_tag() -> ThreadTag:
    """The calling thread's tag (made on its first call, then one thread-local lookup).

    A thread whose name another live thread bears too gets a tag of its own
    (see the module docstring): its collectives then mismatch on every rank.

    Example::

        thread_tag().name   # "MainThread"
    """
    try:
        return TAGS.tag
    except AttributeError:
        me = threading.current_thread()
        name, ident = me.name, threading.get_ident()
        if any(t is not me and t.name == name for t in threading.enumerate()):
            name = f"{name} ({SHARED_NAME}, id {ident})"
        t = TAGS.tag = ThreadTag(name, ident)
        return t


def set_name(name: str) -> None:
    """Name the calling thread ``name`` and make that its tag (for the library's own pool threads).

    A pool gives its threads numbered names, and which of them runs a task
    differs across ranks; one name for the whole pool keeps the tags of the
    collectives they issue comparable.
    """
    threading.current_thread().name = name
    TAGS.tag = ThreadTag(name, threading.get_ident())


class OrderedIssuers(threading.local):
    """Tags for a communicator whose caller orders its ops across threads: every thread's tag has one name.

    Used like the module's own :data:`TAGS` / :func:`thread_tag` pair: ``tag``
    is the calling thread's tag once made, :meth:`make` makes it.

    Example::

        issuers = OrderedIssuers("torch.distributed")
        issuers.make().name   # "torch.distributed", on any thread
    """

    tag: ThreadTag  # per thread, once made

    def __init__(self, name: str) -> None:
        self.name = name

    def make(self) -> ThreadTag:
        """The calling thread's tag (made on its first call)."""
        try:
            return self.tag
        except AttributeError:
            t = self.tag = ThreadTag(self.name, threading.get_ident())
            return t
