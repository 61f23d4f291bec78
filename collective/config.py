"""Every ``COLLECTIVE_*`` environment variable, declared once: its type, default, range, meaning and scope.

The table :data:`SETTINGS` is the one place a variable is declared. Code
reads a value with :func:`get`, which parses ``os.environ`` at call time
(tests and jobs set variables per process) with one parser per kind, and
raises :class:`~collective.errors.CollectiveConfigError` naming the
variable, the value and what is accepted. An empty value means unset.

Kinds:

* ``bool`` -- 1/0, true/false, yes/no, on/off (any case).
* ``int`` and ``float`` -- a number inside the row's range.
* ``size`` -- bytes, optionally with a binary suffix: ``262144``, ``256K``,
  ``4M``, ``1G``, ``4MiB``, ``64KB`` (K = 1024).
* ``duration`` -- seconds, optionally with a unit: ``300``, ``5s``,
  ``250ms``, ``10min``, ``2h``; ``inf`` where the row allows no limit.
* ``choice`` -- one of the row's words (any case).
* ``path`` and ``string`` -- taken as written.

Some settings must be the same on every rank (``same_on_all_ranks``):
they decide which messages a rank sends. :func:`agree` compares them at
communicator construction, before anything depends on them, and raises on
every rank naming the variable and which ranks hold which value.

Render the table as the documentation page with
``python -m collective.config --markdown > docs/configuration.md``.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import CollectiveConfigError

__all__ = [
    "Setting", "Kind", "SETTINGS", "PREFIX", "get", "raw", "is_set", "parse", "setting", "choices_of",
    "unknown_names", "warn_unknown", "CollectiveConfigWarning", "Local", "local_values", "agree", "markdown",
]

#: Every variable of the library starts with this.
PREFIX = "COLLECTIVE_"

Kind = Literal["bool", "int", "float", "size", "duration", "choice", "path", "string"]

_GIB = 1 << 30
#: Upper bound of the durations: about 115 days (``inf`` is the way to say "no limit").
_LONGEST_S = 1e7


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    Attributes:
        name: the full name, ``COLLECTIVE_...``.
        kind: how the value is parsed (see the module docstring).
        default: the value when unset (None: "not set" means something of its own, see ``meaning``).
        meaning: one paragraph for the documentation.
        low, high: inclusive bounds of numbers, sizes and durations (None: unbounded on that side).
        low_open: ``low`` itself is excluded (``> 0`` rather than ``>= 0``).
        allow_inf: a duration may be ``inf`` (no limit).
        choices: the words of a ``choice``; or ``"module:attribute"`` naming the tuple that owns
            them, imported when first needed.
        same_on_all_ranks: every rank must see the same value (checked by :func:`agree`).
        test_hook: only the library's tests set it.
        default_text: how the documentation shows the default, when ``default`` alone does not say it.
    """

    name: str
    kind: Kind
    default: Any
    meaning: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allow_inf: bool = False
    choices: tuple[str, ...] | str = ()
    same_on_all_ranks: bool = False
    test_hook: bool = False
    default_text: str | None = None

    @property
    def short(self) -> str:
        """The name without ``COLLECTIVE_``."""
        return self.name[len(PREFIX):]


def _rows() -> tuple[Setting, ...]:
    S = Setting
    return (
        S("COLLECTIVE_ALGORITHM", "choice", "auto", choices="collective.communicator:ALGORITHMS",
          same_on_all_ranks=True,
          meaning="Default algorithm of calls that name none (the `algorithm=` argument of `init()` or of a "
                  "call wins). `auto` picks per call from the tuning table, the node layout and the cost model."),
        S("COLLECTIVE_BACKEND", "choice", "auto", choices="collective.backends:BACKENDS", same_on_all_ranks=True,
          meaning="Transport of device arrays (CuPy, `__cuda_array_interface__`): `nccl`, `mpi`, or `auto` "
                  "(NCCL when every rank can use it). Host arrays always use MPI."),
        S("COLLECTIVE_TUNING", "path", None, same_on_all_ranks=True,
          meaning="A tuning table written by `collective-bench --tune`, read by `auto`. Every rank reads it "
                  "at `init()`; a rank that cannot, or a table that differs across ranks, is an error on every "
                  "rank (the paths may differ: the tables are compared)."),
        S("COLLECTIVE_TIMEOUT", "duration", 1800.0, low=0, low_open=True, high=_LONGEST_S, allow_inf=True,
          meaning="How long a collective (or `init()`) may wait for ranks that are alive but busy elsewhere "
                  "(rank 0 evaluating or writing a checkpoint while the others wait at the next collective) "
                  "before the job is aborted with a report of what every rank was doing; 30 minutes, as "
                  "torch.distributed's default. Ranks that are gone end the job at once instead: a rank whose "
                  "program ended sends an exit notice, and the launcher ends the job when a process dies. "
                  "`inf` disables the deadline."),
        S("COLLECTIVE_STALL_WARN", "duration", 60.0, low=0, low_open=True, high=_LONGEST_S, allow_inf=True,
          meaning="After this long a collective still in flight is reported once (which ranks it waits for, "
                  "and whether they answered, i.e. are alive and busy elsewhere); the job goes on until "
                  "`COLLECTIVE_TIMEOUT`."),
        S("COLLECTIVE_TRACE_BUFFER", "int", 1024, low=1, high=10_000_000,
          meaning="Ops kept per rank by the flight recorder, printed when the job is aborted."),
        S("COLLECTIVE_CHECK", "bool", True, same_on_all_ranks=True,
          meaning="The cross-rank check of every call (op, shape, dtype, root, algorithm, order). Off saves one "
                  "synchronisation per call; mismatched calls are then undefined."),
        S("COLLECTIVE_DEBUG", "choice", "off", choices=("off", "detail"), same_on_all_ranks=True,
          meaning="`detail` gathers every rank's full call description on every call, not only after a "
                  "mismatch."),
        S("COLLECTIVE_NAN_CHECK", "bool", False, same_on_all_ranks=True,
          meaning="Scan inputs (and the trainer's gradients) for NaN and Inf and name the rank and the op."),
        S("COLLECTIVE_ABORT_ON_EXCEPTION", "bool", True,
          meaning="An uncaught exception on any rank aborts the whole job (with its traceback and every "
                  "rank's state) instead of leaving the other ranks waiting."),
        S("COLLECTIVE_TRACEBACK", "choice", "short", choices=("short", "full"),
          meaning="How an uncaught error of ours raised inside the library (a wrong argument, a mismatch) is "
                  "reported: `short` shows the program's own frames down to the call, then our message; `full` "
                  "every frame inside the library too."),
        S("COLLECTIVE_ELASTIC", "bool", False, same_on_all_ranks=True,
          meaning="Elastic mode (`collective-run --elastic` sets it): a lost rank raises `RanksLostError` on "
                  "every survivor instead of ending the job, and `comm.shrink()` continues over the survivors. "
                  "Needs Open MPI's fault tolerance (`mpiexec --with-ft ulfm`); `init()` refuses a job "
                  "launched without it. See docs/guides/elastic.md."),
        S("COLLECTIVE_MIN_RANKS", "int", 1, low=1, high=1 << 24, same_on_all_ranks=True,
          meaning="Elastic mode: the fewest ranks the job may continue with (`collective-run --min-ranks`); "
                  "below it the elastic trainer stops with a clear message after saving its last commit."),
        S("COLLECTIVE_MAX_RANKS", "int", None, low=1, high=1 << 24, same_on_all_ranks=True,
          default_text="unset (the launched number of ranks)",
          meaning="Elastic mode: the most ranks `comm.grow()` may bring the job to (`collective-run "
                  "--max-ranks`); growing past it raises."),
        S("COLLECTIVE_SEGMENT_BYTES", "size", 256 << 10, low=1, high=_GIB, same_on_all_ranks=True,
          meaning="Largest single message of the Schedule algorithms (ring, tree, star, hierarchical, "
                  "pipeline); longer transfers are split so the reduction of one segment overlaps the "
                  "arrival of the next (the `segment_bytes=` argument wins)."),
        S("COLLECTIVE_SHM_CHUNK_BYTES", "size", 4 << 20, low=1, high=_GIB, same_on_all_ranks=True,
          meaning="Chunk of the `shm` algorithm (rounded up to a multiple of 64 bytes, at least 4 KiB). The "
                  "node's shared window holds two chunks per rank, so a smaller chunk needs less /dev/shm."),
        S("COLLECTIVE_SHM_SINGLE_COPY", "bool", True, same_on_all_ranks=True,
          meaning="`shm` allreduces, reduces, reduce_scatters and allgathers of 16 MiB and more, and larger "
                  "`shm` alltoall, allgather, gather and scatter calls (see docs/concepts/shm.md), move each byte "
                  "once, straight between the ranks' own arrays, by Linux cross-memory attach "
                  "(`process_vm_readv`/`process_vm_writev`) where the node allows it: tried between every pair "
                  "of ranks when the node's shared window is made (it needs ptrace permission over the other "
                  "ranks: the same user and Yama `ptrace_scope` 0, or CAP_SYS_PTRACE; a container's seccomp "
                  "policy may forbid it); where it fails anywhere on the node, or with this off, they copy "
                  "through the shared window."),
        S("COLLECTIVE_SHM_HUGE_PAGES", "bool", True,
          meaning="Where `shm` calls move bytes by cross-memory attach (`COLLECTIVE_SHM_SINGLE_COPY`), and for "
                  "MPI's own alltoall, allgather, gather and scatter on one node, which copy large messages the "
                  "same way, an array of 16 MiB or more that calls pass again and again (the same memory, a 16th "
                  "time: a DDP bucket, a Horovod fusion buffer, a tensor reduced every step) is put on transparent "
                  "huge pages once, in place (`madvise(MADV_COLLAPSE)`, Linux 6.1 and later; its contents stay; at "
                  "most 4 GiB per process; nothing where the node's transparent huge pages are `never`), since the "
                  "kernel pins every page it copies: see docs/concepts/shm.md. NumPy's large arrays are on huge "
                  "pages already; torch's CPU tensors are not. Off: arrays stay on the pages they have."),
        S("COLLECTIVE_SHM_WAIT", "choice", "auto", choices="collective.shm:SHM_WAITS",
          meaning="How a node's ranks wait for each other in `shm`: `spin` (watch each other's flags), "
                  "`barrier` (MPI's, which yields the core), or `auto`: spin when every rank can have a CPU "
                  "of its own within the ranks' affinities and a cgroup v2 CPU quota (`/sys/fs/cgroup/cpu.max`, as a "
                  "container sees it) allows that many. The ranks of a node "
                  "vote: they spin only if every one of them would, so ranks may differ here."),
        S("COLLECTIVE_SHM_FENCES", "choice", "auto", choices="collective.shm:SHM_FENCES",
          meaning="Where `shm` puts a memory fence (`MPI_Win_sync`) on each side of a rank's flag: `always`, or "
                  "`auto`: where the processor may reorder stores or loads (not on x86-64, whose total store "
                  "order already publishes what a rank wrote before its flag)."),
        S("COLLECTIVE_SHM_STREAM_BYTES", "size", 8 << 20, low=0, high=1 << 62,
          meaning="alltoall and allgather on `comm.alloc` arrays read every rank's input straight out of "
                  "the window; where that writes at least this many bytes into a rank's output, the rank copies "
                  "with streaming stores, which write around the caches instead of first reading every line of "
                  "the output into them: an output too large for the caches to keep moves at a memory transfer "
                  "a byte less (x86-64; a plain copy elsewhere, and where the package was built without a C "
                  "compiler). 0: plain copies only."),
        S("COLLECTIVE_NODE_SIZE", "int", None, low=1, high=1 << 20, same_on_all_ranks=True,
          default_text="unset (MPI's node layout)",
          meaning="Pretend nodes are this many consecutive ranks (to exercise node-aware algorithms on one "
                  "machine). An error together with `COLLECTIVE_TOPOLOGY`."),
        S("COLLECTIVE_TOPOLOGY", "path", None, same_on_all_ranks=True,
          meaning="A JSON file declaring which ranks share a node and optionally the link costs (which then "
                  "replace calibration). Rank 0 reads it and sends it to the others."),
        S("COLLECTIVE_CALIBRATE", "bool", True, same_on_all_ranks=True,
          meaning="Measure the links at `init()` for the cost model; off uses its documented defaults. Links "
                  "declared in `COLLECTIVE_TOPOLOGY` skip it too."),
        S("COLLECTIVE_CALIBRATION_FILE", "path", None,
          meaning="Cache the link measurements in this file (rank 0 reads and writes it) and reuse them for "
                  "the same layout."),
        S("COLLECTIVE_BUCKET_MB", "float", 25.0, low=0, low_open=True, high=1_000_000, same_on_all_ranks=True,
          meaning="Cap in MB of every gradient bucket but the first (1 MB) of the trainer and the torch "
                  "wrapper (the `bucket_mb=` argument wins). Unset and with nothing to overlap, one bucket."),
        S("COLLECTIVE_KEEP_MEMORY", "bool", True,
          meaning="Torch wrapper: keep freed blocks in glibc's malloc so that fresh gradients do not fault "
                  "their pages in every step; off leaves malloc's settings alone."),
        S("COLLECTIVE_TIMELINE", "path", None,
          meaning="Trainer: write a Chrome-trace (Perfetto) timeline per rank to this path, `.rank<r>` "
                  "inserted before the suffix."),
        S("COLLECTIVE_NCCL_BLOCKING", "bool", False,
          meaning="NCCL calls wait for completion instead of returning once enqueued on the stream."),
        S("COLLECTIVE_MPI_CUDA_AWARE", "bool", None, default_text="unset (probed)",
          meaning="Whether MPI takes device buffers directly; unset, the MPI library is asked, and device "
                  "data is staged through host memory unless it says yes."),
        S("COLLECTIVE_CUDA_DEVICE", "int", None, low=0, high=1023, default_text="unset (local rank modulo the "
          "visible devices)", meaning="The CUDA device this rank uses."),
        S("COLLECTIVE_EMULATE_TBF_LATENCY", "duration", 0.02, low=0, low_open=True, high=10.0,
          default_text="20ms",
          meaning="`collective-run --emulate --link`: how much traffic the shaped links queue, as time."),
        S("COLLECTIVE_BENCH_TEST_BROKEN", "bool", False, test_hook=True,
          meaning="Test hook: `collective-bench` offers a deliberately wrong `broken` column (to test its "
                  "check column)."),
        S("COLLECTIVE_BENCH_TEST_HOST_GPU", "bool", False, test_hook=True,
          meaning="Test hook: `collective-bench --device gpu` runs on host memory dressed as device arrays "
                  "through the MPI path (tests without a GPU)."),
        S("COLLECTIVE_ELASTIC_TEST_KILL", "string", None, test_hook=True,
          meaning="Test hook: `RANK:STEP:POINT[,...]` makes the rank of that original (job) rank SIGKILL itself "
                  "in that 0-based step of the elastic trainer, at POINT: `forward`, `allreduce` (bucket 0's "
                  "reduction just launched), `shm` (bucket 0's reduction running), `late-allreduce` (the last "
                  "bucket's), `update` (between buckets' "
                  "optimizer updates), `commit`, `checkpoint` (while rank 0 writes one) or `finish` (STEP the last: "
                  "just before the agreement that ends training)."),
    )


#: Every variable, by full name, in documentation order.
SETTINGS: Mapping[str, Setting] = {s.name: s for s in _rows()}

_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off"))
_SIZE_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*(?:([kmgt])(i?b)?|(b))?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_RE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|[+-]?inf(?:inity)?)\s*"
                          r"(s|sec|ms|min|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "min": 60.0, "h": 3600.0}


def setting(name: str) -> Setting:
    """The row of ``name`` (full, ``COLLECTIVE_TIMEOUT``, or short, ``TIMEOUT``).

    Raises:
        KeyError: no such variable (a bug in the caller, not the user's mistake).
    """
    full = name if name.startswith(PREFIX) else PREFIX + name
    try:
        return SETTINGS[full]
    except KeyError:
        raise KeyError(f"{full} is not declared in collective.config.SETTINGS") from None


def choices_of(s: Setting) -> tuple[str, ...]:
    """The words a ``choice`` row accepts (imports the owning tuple the first time)."""
    if isinstance(s.choices, str):
        module, _, attr = s.choices.partition(":")
        return tuple(getattr(importlib.import_module(module), attr))
    return s.choices


def _accepted(s: Setting) -> str:
    """What ``s`` accepts, for messages and the documentation."""
    if s.kind == "bool":
        return "1/0, true/false, yes/no or on/off"
    if s.kind == "choice":
        return "one of " + ", ".join(choices_of(s))
    if s.kind in ("path", "string"):
        return "any text"
    rng = _range_text(s)
    what = {"int": "an integer", "float": "a number",
            "size": "bytes, optionally with a K/M/G suffix (e.g. 262144, 256K, 4M)",
            "duration": "seconds, optionally with a unit s/ms/min/h (e.g. 300, 5s, 250ms, 10min)"}[s.kind]
    if s.allow_inf:
        what += ", or inf for no limit"
    return f"{what}, {rng}" if rng else what


def _num_text(s: Setting, v: float) -> str:
    if s.kind == "size":
        for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if v >= k and v % k == 0:
                return f"{int(v // k)}{unit}"
        return str(int(v))
    if s.kind == "duration":
        return f"{v:g} s" if v >= 1 or v == 0 else f"{v * 1e3:g} ms"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range_text(s: Setting) -> str:
    if s.low is not None and s.high is not None:
        return (f"more than {_num_text(s, s.low)}" if s.low_open else f"from {_num_text(s, s.low)}") + \
            f" to {_num_text(s, s.high)}"
    if s.low is not None:
        return (f"more than {_num_text(s, s.low)}" if s.low_open else f"at least {_num_text(s, s.low)}")
    if s.high is not None:
        return f"at most {_num_text(s, s.high)}"
    return ""


def _bad(s: Setting, text: str, why: str = "") -> CollectiveConfigError:
    return CollectiveConfigError(f"{s.name}={text!r}{': ' + why if why else ''}; expected {_accepted(s)}")


def _in_range(s: Setting, text: str, v: float) -> None:
    if math.isnan(v):
        raise _bad(s, text, "not a number")
    if math.isinf(v):
        if v > 0 and s.allow_inf:
            return
        raise _bad(s, text, "no limit is not allowed here" if v > 0 else "out of range")
    if s.low is not None and (v < s.low or (s.low_open and v == s.low)):
        raise _bad(s, text, "too small")
    if s.high is not None and v > s.high:
        raise _bad(s, text, "too large")


def parse(s: Setting | str, text: str) -> Any:
    """The value of ``text`` as the row ``s`` reads it.

    Args:
        s: the row, or a variable's name (full or short).
        text: the value as found in the environment (not empty).

    Returns:
        bool, int, float (durations: seconds; ``inf`` where allowed), str (choices: lower case).

    Raises:
        CollectiveConfigError: naming the variable, the value and what is accepted.

    Example::

        parse("TIMEOUT", "5min")          # 300.0
        parse("SEGMENT_BYTES", "64K")     # 65536
        parse("CHECK", "off")             # False
    """
    s = setting(s) if isinstance(s, str) else s
    t = text.strip()
    if s.kind == "bool":
        low = t.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _bad(s, text)
    if s.kind == "choice":
        low = t.lower()
        if low in choices_of(s):
            return low
        raise _bad(s, text)
    if s.kind in ("path", "string"):
        return text
    if s.kind == "int":
        try:
            v: Any = int(t)
        except ValueError:
            raise _bad(s, text, "not an integer") from None
    elif s.kind == "float":
        try:
            v = float(t)
        except ValueError:
            raise _bad(s, text, "not a number") from None
    elif s.kind == "size":
        m = _SIZE_RE.match(t)
        if m is None:
            raise _bad(s, text, "not a size")
        x = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
        if x != int(x):
            raise _bad(s, text, "not a whole number of bytes")
        v = int(x)
    elif s.kind == "duration":
        m = _DURATION_RE.match(t)
        if m is None:
            raise _bad(s, text, "not a duration")
        v = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    else:  # pragma: no cover - the table is checked by the tests
        raise AssertionError(f"{s.name}: unknown kind {s.kind!r}")
    _in_range(s, text, float(v))
    return v


def raw(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The variable's text in ``env`` (default ``os.environ``), None when unset or empty."""
    s = setting(name)
    v = (os.environ if env is None else env).get(s.name)
    return v if v else None


def is_set(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the variable is set to something non-empty."""
    return raw(name, env) is not None


def get(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The variable's value, parsed and checked, or its default when unset or empty.

    Reads the environment at every call (cheap: a dict lookup and a parse),
    so set variables before the code that reads them runs; hot paths keep the
    value they read at construction.

    Args:
        name: full (``COLLECTIVE_TIMEOUT``) or short (``TIMEOUT``) name of a declared variable.
        env: where to look instead of ``os.environ``.

    Raises:
        CollectiveConfigError: the value is malformed or out of range.

    Example::

        from collective import config
        timeout = config.get("TIMEOUT")        # 1800.0 unless COLLECTIVE_TIMEOUT says otherwise
    """
    s = setting(name)
    v = (os.environ if env is None else env).get(s.name)
    return parse(s, v) if v else s.default


# ------------------------------------------------------------------ unknown names
class CollectiveConfigWarning(UserWarning):
    """A ``COLLECTIVE_*`` variable is set that the library does not know (a typo, most likely)."""


_warned: set[str] = set()


def unknown_names(env: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``(name, closest known name or None)`` for every ``COLLECTIVE_*`` variable in ``env`` not in the table."""
    env = os.environ if env is None else env
    out = []
    for k in sorted(env):
        if k.startswith(PREFIX) and k not in SETTINGS:
            close = difflib.get_close_matches(k, list(SETTINGS), n=1, cutoff=0.6)
            out.append((k, close[0] if close else None))
    return out


def warn_unknown(env: Mapping[str, str] | None = None) -> list[str]:
    """Warn (once per name and process) about unknown ``COLLECTIVE_*`` variables; return the messages.

    Called when a communicator is made. Example: ``COLLECTIVE_ALGORITM=ring``
    gives "COLLECTIVE_ALGORITM is not a variable of collective (did you mean
    COLLECTIVE_ALGORITHM?); it is ignored".
    """
    msgs = []
    for name, close in unknown_names(env):
        if name in _warned:
            continue
        _warned.add(name)
        hint = f"did you mean {close}?" if close else "see docs/configuration.md for the known ones"
        msgs.append(f"{name} is not a variable of collective ({hint}); it is ignored")
        warnings.warn(msgs[-1], CollectiveConfigWarning, stacklevel=3)
    return msgs


# ------------------------------------------------------------------ same on every rank
@dataclass(frozen=True)
class Local:
    """One rank's view of a setting that must match across ranks.

    Attributes:
        name: the variable.
        key: what must be equal on every rank (a canonical form of the value).
        shown: this rank's value as a message shows it.
        ok: False when this rank could not use the setting at all (``shown`` says why).
    """

    name: str
    key: bytes
    shown: str
    ok: bool = True


def local_values(effective: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> list[Local]:
    """This rank's :class:`Local` for every ``same_on_all_ranks`` row, in table order.

    Args:
        effective: values that replace the environment's (an argument of the
            constructor wins over the variable), by full or short name; a
            :class:`Local` replaces the row's entry as it is (e.g. a file's contents).
        env: where to look instead of ``os.environ``.

    Raises:
        CollectiveConfigError: a value is malformed (before any rank communicates).
    """
    eff = {setting(k).name: v for k, v in (effective or {}).items()}
    out = []
    for s in SETTINGS.values():
        if not s.same_on_all_ranks:
            continue
        text = raw(s.name, env)
        if isinstance(eff.get(s.name), Local):
            out.append(eff[s.name])
            continue
        if s.name in eff:
            v, shown = eff[s.name], f"{eff[s.name]!r} (argument)"
        else:
            v = get(s.name, env)
            shown = f"{text!r} ({v!r})" if text is not None and repr(v) != repr(text) else \
                (repr(text) if text is not None else ("unset" if v is None else f"unset ({v!r})"))
        out.append(Local(s.name, repr(v).encode(), shown))
    return out


def agree(comm: Any, values: Sequence[Local], where: str) -> None:
    """Raise on every rank unless every rank has the same ``values`` (collective over ``comm``).

    One allgather of fixed-size digests; only when something differs, a
    second round gathers what each rank holds, for the message. Plain
    buffers, no pickle.

    Args:
        comm: an mpi4py communicator (every rank calls with the same number of values).
        values: this rank's values (:func:`local_values`, plus any the caller adds).
        where: the message prefix, e.g. ``describe("init", rank, size)``.

    Raises:
        CollectiveConfigError: on every rank, naming each differing variable and which ranks hold which value.

    Example::

        agree(comm, config.local_values({"ALGORITHM": alg}), "init on rank 0 of 4")
    """
    import numpy as np

    n, size = len(values), comm.Get_size()
    if size == 1 or n == 0:
        if any(not v.ok for v in values):
            bad = [v for v in values if not v.ok]
            raise CollectiveConfigError(f"{where}: " + "; ".join(f"{v.name}: {v.shown}" for v in bad))
        return
    mine = np.zeros((n, 3), np.uint64)
    for i, v in enumerate(values):
        d = hashlib.blake2b(v.key, digest_size=16).digest()
        mine[i, 0], mine[i, 1], mine[i, 2] = int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"), v.ok
    every = np.empty((size, n, 3), np.uint64)
    comm.Allgather(mine, every)
    differ = [i for i in range(n) if (every[:, i, :] != every[0, i, :]).any() or not every[:, i, 2].all()]
    if not differ:
        return
    blob = "\0".join(values[i].shown.replace("\0", " ") for i in differ).encode()
    lens = np.empty(size, np.int64)
    comm.Allgather(np.array([len(blob)], np.int64), lens)
    allb = np.empty(int(lens.sum()), np.uint8)
    comm.Allgatherv(np.frombuffer(blob, np.uint8).copy(), [allb, lens, np.concatenate(([0], np.cumsum(lens)[:-1])),
                                                           _mpi_byte()])
    shown: list[list[str]] = []
    off = 0
    for r in range(size):
        shown.append(allb[off:off + int(lens[r])].tobytes().decode(errors="replace").split("\0"))
        off += int(lens[r])
    from .fingerprint import rank_list

    parts = []
    for j, i in enumerate(differ):
        failed = [r for r in range(size) if not every[r, i, 2]]
        if failed:
            parts.append(f"{values[i].name}: " + "; ".join(f"{rank_list([r])} cannot use it: {shown[r][j]}"
                                                          for r in failed))
            continue
        groups: dict[tuple[int, int], list[int]] = {}
        for r in range(size):
            groups.setdefault((int(every[r, i, 0]), int(every[r, i, 1])), []).append(r)
        parts.append(f"{values[i].name} differs across ranks: " +
                     "; ".join(f"{rank_list(rs)}: {shown[rs[0]][j]}" for rs in groups.values()))
    raise CollectiveConfigError(f"{where}: " + ". ".join(parts) + ". These settings must be the same on every "
                                "rank: set them in the environment mpiexec starts every rank with "
                                "(or pass them with mpiexec -x NAME)")


def _mpi_byte() -> Any:
    from mpi4py import MPI

    return MPI.BYTE


# ------------------------------------------------------------------ documentation
def _default_text(s: Setting) -> str:
    if s.default_text is not None:
        return s.default_text
    if s.default is None:
        return "unset"
    if s.kind == "bool":
        return "on" if s.default else "off"
    if s.kind in ("size", "duration"):
        return _num_text(s, s.default)
    return f"{s.default}"


def markdown() -> str:
    """The documentation page of every variable (``docs/configuration.md``), rendered from :data:`SETTINGS`."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m collective.config --markdown > docs/configuration.md`; edit",
        "     collective/config.py, not this page. -->",
        "",
        "Arguments win over environment variables, which win over the defaults. Every variable of the",
        "library starts with `COLLECTIVE_`; an unknown one (a typo) is reported when a communicator is made,",
        "with the closest known name. An empty value means unset. A malformed or out-of-range value raises",
        "`CollectiveConfigError` naming the variable, the value and what is accepted.",
        "",
        "Values: booleans are `1`/`0`, `true`/`false`, `yes`/`no` or `on`/`off` (any case); sizes are bytes,",
        "optionally with a binary suffix (`256K`, `4M`, `1G`; K = 1024); durations are seconds, optionally",
        "with a unit (`5s`, `250ms`, `10min`, `2h`); choices are case-insensitive.",
        "",
        "Settings marked **same on every rank** decide which messages a rank sends. `init()` compares them",
        "across ranks before anything depends on them, and raises on every rank naming the variable and",
        "which ranks hold which value, rather than letting the ranks wait for each other until the timeout.",
        "",
        "| Variable | Type | Default | Accepted | Same on every rank | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS.values():
        same = "yes" if s.same_on_all_ranks else ""
        meaning = s.meaning.replace("|", "\\|")
        lines.append(f"| `{s.name}` | {s.kind} | {_default_text(s)} | {_accepted(s)} | {same} | {meaning} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m collective.config --markdown``: print the documentation page; ``--check PATH``: compare."""
    args = list(sys.argv[1:] if argv is None else argv)
    page = markdown()
    if args == ["--markdown"]:
        sys.stdout.write(page)
        return 0
    if len(args) == 2 and args[0] == "--check":
        with open(args[1], encoding="utf-8") as f:
            if f.read() == page:
                return 0
        print(f"{args[1]} is out of date: python -m collective.config --markdown > {args[1]}", file=sys.stderr)
        return 1
    print("usage: python -m collective.config --markdown | --check PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
