"""The emulated cluster (network namespaces + veths + bridge + tc): setup, teardown on every path, MPI jobs on it.

Needs root and working `ip netns`; skipped with the reason otherwise.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from collective.emulate import EmulatedCluster, _rate_bits, parse_shape, unavailable
from mpi_util import JOBS, ROOT

WHY = unavailable()
needs_netns = pytest.mark.skipif(WHY is not None, reason=f"no emulated cluster here: {WHY}")


def test_parse_shape_and_rate() -> None:
    assert parse_shape("2x4") == (2, 4)
    for bad in ("2", "0x2", "axb", "2x0"):
        with pytest.raises(ValueError, match="--emulate"):
            parse_shape(bad)
    assert _rate_bits("1gbit") == 1e9 and _rate_bits("250mbit") == 250e6 and _rate_bits("10mbps") == 80e6


def _exists(prefix: str) -> bool:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    nss = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return f"{prefix}br" in links or f"{prefix}h" in nss


@needs_netns
def test_setup_and_teardown_also_on_failure() -> None:
    emu = EmulatedCluster(2, 1, "100mbit")
    with pytest.raises(RuntimeError, match="boom"):
        with emu:
            assert _exists(emu.prefix)
            assert emu.subnet.startswith("10.77.")
            qd = subprocess.run(["tc", "qdisc", "show", "dev", f"{emu.prefix}v0"], capture_output=True, text=True)
            assert "tbf" in qd.stdout and "100Mbit" in qd.stdout
            hostname = subprocess.run(["ip", "netns", "exec", emu.namespaces[1], "unshare", "-u", "sh", "-c",
                                       "hostname emu1 && hostname"], capture_output=True, text=True).stdout
            assert hostname.strip() == "emu1"
            assert os.uname().nodename != "emu1"  # the root namespace keeps its name
            raise RuntimeError("boom")
    assert not _exists(emu.prefix)


def _passed(out: str) -> int:
    m = re.findall(r"PASSED (\d+)", out)
    return int(m[-1]) if m else 0


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{JOBS}", COLLECTIVE_TIMEOUT="120")
    return subprocess.run([sys.executable, "-m", "collective.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


@needs_netns
@pytest.mark.mpi
def test_two_hosts_of_two_ranks() -> None:
    """Hostnames, node discovery by MPI's shared-memory split, calibration of both link kinds, data moved."""
    res = _run(["--emulate", "2x2", "--link", "1gbit", "--", sys.executable, str(JOBS / "emulated_layout.py"),
                "2x2"], timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert _passed(out) == 2, out[-2000:]
    assert "hierarchical" in out and "<- chosen" in out


@needs_netns
@pytest.mark.mpi
def test_correctness_suite_on_two_hosts() -> None:
    """The correctness suite across two emulated hosts: every algorithm but shm (one node only); 1-8 byte dtypes."""
    res = _run(["--emulate", "2x2", "--", sys.executable, str(JOBS / "correctness.py"),
                "--algorithms", "native,ring,tree,star,pipeline,hierarchical,auto", "--dtypes", "int8,int64,float16,float32,float64"],
               timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert _passed(out) > 1000, out[-2000:]


def test_bad_usage() -> None:
    res = _run(["--emulate", "2y2", "--", "true"], timeout=30)
    assert res.returncode == 2 and "HOSTSxRANKS" in res.stderr
    res = _run(["--emulate", "2x2"], timeout=30)
    assert res.returncode == 2 and "usage" in res.stderr
