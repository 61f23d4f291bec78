"""Settings that must match across ranks: set on one rank only, every rank raises naming the variable, quickly.

Launched with COLLECTIVE_CHECK=0 on rank 1 only (tests/mpi_util.mpirun's
rank_env), as a variable exported on one host would be. Later cases set a
variable on one rank inside the process and build a new Communicator.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
from mpi4py import MPI

import collective as col
from collective import config
from collective.errors import CollectiveConfigError
from harness import Cases

world = MPI.COMM_WORLD
R, P = world.Get_rank(), world.Get_size()
FAST_S = 8.0  # far below COLLECTIVE_TIMEOUT (60 s under mpi_util), so no rank waited for the deadline


def expect_mismatch(names: list[str], build=lambda: col.Communicator(), also: tuple[str, ...] = ()) -> None:
    t0 = time.monotonic()
    try:
        build()
    except CollectiveConfigError as exc:
        dt = time.monotonic() - t0
        text = str(exc)
        for n in names:
            assert n in text, f"{n} not named: {text}"
        for w in also:
            assert w in text, f"{w!r} not in: {text}"
        assert f"on rank {R} of {P}" in text, text
        assert dt < FAST_S, f"took {dt:.1f} s"
    else:
        raise AssertionError(f"rank {R}: {names} set on one rank only was accepted")


# The launcher's: COLLECTIVE_CHECK=0 on rank 1, unset on the others. init() itself raises on every rank.
launched = os.environ.get("COLLECTIVE_CHECK")
assert (launched == "0") == (R == 1), f"rank {R}: launched with COLLECTIVE_CHECK={launched!r}"
t_init = time.monotonic()
try:
    col.init()
except CollectiveConfigError as exc:
    first = str(exc)
    first_s = time.monotonic() - t_init
else:
    first, first_s = "", 0.0
os.environ.pop("COLLECTIVE_CHECK", None)
comm = col.init()
cases = Cases(comm)


def launched_on_one_rank() -> None:
    assert "COLLECTIVE_CHECK differs across ranks" in first, first
    assert "rank 1: '0' (False)" in first and "unset (True)" in first, first
    assert first_s < FAST_S, f"init took {first_s:.1f} s to refuse"


cases.run("COLLECTIVE_CHECK=0 from the launcher on rank 1", launched_on_one_rank)


def on_one_rank(name: str, value: str, rank: int = P - 1):
    def case() -> None:
        if R == rank:
            os.environ[name] = value
        try:
            expect_mismatch([name], also=(f"rank {rank}: {value!r}",))
        finally:
            os.environ.pop(name, None)
    return case


topo = os.path.join(tempfile.gettempdir(), f"config-agree-{os.getppid()}.json")
if R == 0:
    with open(topo, "w") as f:
        json.dump({"nodes": [list(range(P))]}, f)
world.Barrier()
for name, value in (("COLLECTIVE_TOPOLOGY", topo), ("COLLECTIVE_NODE_SIZE", "1"), ("COLLECTIVE_CALIBRATE", "0"),
                    ("COLLECTIVE_CHECK", "off"), ("COLLECTIVE_ALGORITHM", "ring"), ("COLLECTIVE_SEGMENT_BYTES", "64K"),
                    ("COLLECTIVE_SHM_CHUNK_BYTES", "1M"), ("COLLECTIVE_NAN_CHECK", "1"),
                    ("COLLECTIVE_DEBUG", "detail")):
    cases.run(f"{name}={value} on one rank", on_one_rank(name, value))


def two_variables() -> None:
    """Several at once, on different ranks: each named, with its ranks."""
    if R == 0:
        os.environ["COLLECTIVE_CALIBRATE"] = "no"
    if R == P - 1:
        os.environ["COLLECTIVE_NODE_SIZE"] = "1"
    try:
        expect_mismatch(["COLLECTIVE_CALIBRATE", "COLLECTIVE_NODE_SIZE"], also=("rank 0: 'no' (False)",))
    finally:
        os.environ.pop("COLLECTIVE_CALIBRATE", None)
        os.environ.pop("COLLECTIVE_NODE_SIZE", None)


cases.run("two variables on different ranks", two_variables)


def same_value_other_spelling() -> None:
    """CHECK=on and CHECK unset, SEGMENT_BYTES=262144 and 256K: the same values, no error, and calls work."""
    os.environ["COLLECTIVE_CHECK"] = "on" if R == 0 else "1"
    os.environ["COLLECTIVE_SEGMENT_BYTES"] = "256K" if R % 2 else "262144"
    try:
        c = col.Communicator()
        y = c.allreduce(np.full(5, R + 1.0))
        assert (y == P * (P + 1) / 2).all(), y
        c.close()
    finally:
        os.environ.pop("COLLECTIVE_CHECK", None)
        os.environ.pop("COLLECTIVE_SEGMENT_BYTES", None)


cases.run("the same values spelled differently", same_value_other_spelling)


def argument_wins() -> None:
    """COLLECTIVE_ALGORITHM differs but every rank passes algorithm=: the argument is what must match."""
    os.environ["COLLECTIVE_ALGORITHM"] = "ring" if R == 0 else "tree"
    try:
        c = col.Communicator(algorithm="native")
        assert c.algorithm == "native"
        c.close()
        expect_mismatch(["COLLECTIVE_ALGORITHM"], also=("'ring'", "'tree'"))
    finally:
        os.environ.pop("COLLECTIVE_ALGORITHM", None)


cases.run("an argument replaces the variable", argument_wins)


def tuning() -> None:
    """COLLECTIVE_TUNING: unreadable on one rank, or another table on one rank: every rank raises at once."""
    from collective.tuning import write_table

    d = tempfile.mkdtemp(prefix=f"config-agree-{R}-")
    good = os.path.join(d, "t.json")
    write_table(good, P, [P], {"allreduce": [{"max_bytes": None, "algorithm": "ring"}]})
    other = os.path.join(d, "u.json")
    write_table(other, P, [P], {"allreduce": [{"max_bytes": None, "algorithm": "tree"}]})
    try:
        os.environ["COLLECTIVE_TUNING"] = good if R != P - 1 else os.path.join(d, "missing.json")
        expect_mismatch(["COLLECTIVE_TUNING"], also=(f"rank {P - 1} cannot use it", "cannot read"))
        os.environ["COLLECTIVE_TUNING"] = good if R != P - 1 else other
        expect_mismatch(["COLLECTIVE_TUNING differs across ranks"])
        os.environ["COLLECTIVE_TUNING"] = good  # paths differ (a directory per rank), tables equal: fine
        c = col.Communicator()
        assert c.allreduce(np.ones(3)).tolist() == [P] * 3
        c.close()
    finally:
        os.environ.pop("COLLECTIVE_TUNING", None)


cases.run("COLLECTIVE_TUNING", tuning)


def typo_warned() -> None:
    """An unknown COLLECTIVE_ name is warned about once, with the closest known name; the call goes on."""
    os.environ["COLLECTIVE_ALGORITM"] = "ring"
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            c1 = col.Communicator()
            c2 = col.Communicator()
        msgs = [str(w.message) for w in got if issubclass(w.category, config.CollectiveConfigWarning)]
        assert msgs == ["COLLECTIVE_ALGORITM is not a variable of collective (did you mean COLLECTIVE_ALGORITHM?); "
                        "it is ignored"], msgs
        c1.close()
        c2.close()
    finally:
        os.environ.pop("COLLECTIVE_ALGORITM", None)


cases.run("a typo is warned about", typo_warned)

if R == 0:
    os.unlink(topo)
cases.finish()
sys.exit(0)
