"""An emulated cluster on one machine: H hosts as network namespaces on a bridge, shaped links, MPI launched into them.

Terms (the names below follow them):

* **host** -- one network namespace ``<prefix>h<i>`` with one veth into the
  bridge, address ``<subnet>.<i+1>``, and its own hostname ``emu<i>`` (its
  processes run under ``unshare -u``). MPI sees each host as a node: ranks of a
  host share memory (``btl sm``), ranks of different hosts talk TCP over the
  veths (``btl tcp``), because each host has its own PRRTE daemon.
* **bridge** -- ``<prefix>br`` in the root namespace, address ``<subnet>.254``:
  the launcher (mpiexec, in the root namespace) reaches the daemons through it.
  Every address is in one private /24 (``10.77.N.0/24``, the first N no
  interface here uses), so no traffic leaves this machine.
* **link** -- a ``tc tbf`` rate limit on both ends of each host's veth, so each
  host has ``rate`` out and ``rate`` in (netem is not available in this kernel).
  Its queue holds ``COLLECTIVE_EMULATE_TBF_LATENCY`` (default 20ms) of traffic.
* **agent** -- the script PRRTE runs instead of ssh (``plm_ssh_agent``): it gets
  ``HOST COMMAND...`` and runs the command inside that host's namespace.

Creating namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); :func:`unavailable`
says why it cannot be done here. :class:`EmulatedCluster` is a context manager:
whatever happens inside (a failed job, Ctrl-C), leaving it removes the
processes still in its namespaces, the namespaces, the veths and the bridge.

Example::

    with EmulatedCluster(hosts=2, ranks_per_host=2, rate="1gbit") as emu:
        subprocess.run(emu.mpiexec(["python", "train.py"]), env=emu.env(), check=True)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

from . import config
from .launcher import find_mpiexec

__all__ = ["EmulatedCluster", "EmulationError", "unavailable", "parse_shape", "run"]


class EmulationError(RuntimeError):
    """The emulated cluster could not be created (the message says which command failed and why)."""


def _cmd(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command (inside namespace ``ns`` when given); EmulationError with its stderr if it fails."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise EmulationError(f"emulated cluster: `{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def unavailable() -> str | None:
    """Why an emulated cluster cannot be made here, or None when it can (tries a throwaway namespace).

    Example::

        if (why := unavailable()) is not None:
            pytest.skip(why)
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces, veths, tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"the emulated cluster needs `{tool}` (iproute2 / util-linux)"
    name = f"colprobe{os.getpid() % 100000}"
    try:
        res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if res.returncode != 0:
            return f"`ip netns add` fails here: {res.stderr.strip()}"
        res = subprocess.run(["ip", "netns", "exec", name, "unshare", "-u", "true"], capture_output=True, text=True)
        if res.returncode != 0:
            return f"`unshare -u` fails inside a namespace here: {res.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def parse_shape(text: str) -> tuple[int, int]:
    """``"2x4"`` -> (2 hosts, 4 ranks per host).

    Example::

        parse_shape("2x2")   # (2, 2)
    """
    try:
        h, r = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--emulate wants HOSTSxRANKS such as 2x2, got {text!r}") from None
    if h < 1 or r < 1 or h > 200:
        raise ValueError(f"--emulate {text}: need 1..200 hosts and at least one rank per host")
    return h, r


def _free_subnet() -> str:
    used = _cmd("ip", "-o", "-4", "addr", "show").stdout
    for n in range(256):
        net = f"10.77.{n}"
        if f" {net}." not in used:
            return net
    raise EmulationError("emulated cluster: every 10.77.N.0/24 is in use here")


_AGENT = """#!/bin/sh
# PRRTE's ssh replacement for the emulated cluster: agent [ssh options] HOST COMMAND...
while [ $# -gt 0 ]; do
  case "$1" in
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"; shift
case "$host" in
{cases}
  *) echo "emulated cluster agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare -u sh -c 'hostname "$0" && exec sh -c "$1"' "$name" "$*"
"""


class EmulatedCluster:
    """H hosts x R ranks on this machine; see the module docstring.

    Args:
        hosts: number of hosts (namespaces).
        ranks_per_host: MPI ranks on each host.
        rate: tc rate of each host's link, each way ("1gbit", "500mbit"); None leaves it unshaped.

    Example::

        with EmulatedCluster(2, 2, "1gbit") as emu:
            print(emu.mpiexec(["python", "x.py"]))
    """

    def __init__(self, hosts: int, ranks_per_host: int, rate: str | None = None) -> None:
        self.hosts, self.ranks_per_host, self.rate = hosts, ranks_per_host, rate
        self.prefix = f"c{os.getpid() % 100000}"
        self.bridge = f"{self.prefix}br"
        self.subnet = ""
        self.namespaces: list[str] = []
        self._links: list[str] = []
        self._dir: str | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> EmulatedCluster:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def address(self, host: int) -> str:
        """The address of host ``host`` (0-based)."""
        return f"{self.subnet}.{host + 1}"

    def setup(self) -> None:
        """Create the bridge, the hosts, their veths and shaping, the agent script and the hostfile."""
        why = unavailable()
        if why is not None:
            raise EmulationError(why)
        self.subnet = _free_subnet()
        self._dir = tempfile.mkdtemp(prefix="collective-emulate-")
        _cmd("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _cmd("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _cmd("ip", "link", "set", self.bridge, "up")
        for i in range(self.hosts):
            ns, outer, inner = f"{self.prefix}h{i}", f"{self.prefix}v{i}", f"{self.prefix}e{i}"
            _cmd("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _cmd("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            self._links.append(outer)
            _cmd("ip", "link", "set", inner, "netns", ns)
            _cmd("ip", "link", "set", outer, "master", self.bridge)
            _cmd("ip", "link", "set", outer, "up")
            _cmd("ip", "link", "set", "lo", "up", ns=ns)
            _cmd("ip", "addr", "add", f"{self.address(i)}/24", "dev", inner, ns=ns)
            _cmd("ip", "link", "set", inner, "up", ns=ns)
            if self.rate:
                self._shape(outer, None, self.rate)  # toward the host: its ingress
                self._shape(inner, ns, self.rate)  # out of the host: its egress
        cases = "\n".join(f'  {self.address(i)}) ns={self.prefix}h{i}; name=emu{i} ;;' for i in range(self.hosts))
        agent = os.path.join(self._dir, "agent.sh")
        with open(agent, "w") as f:
            f.write(_AGENT.format(cases=cases))
        os.chmod(agent, 0o755)
        with open(os.path.join(self._dir, "hostfile"), "w") as f:
            for i in range(self.hosts):
                f.write(f"{self.address(i)} slots={self.ranks_per_host}\n")
        # The hosts must reach each other before MPI starts: wait for every bridge port to forward (state 3).
        for i in range(self.hosts):
            state = f"/sys/class/net/{self.prefix}v{i}/brport/state"
            for _ in range(100):
                try:
                    with open(state) as f:
                        if f.read().strip() == "3":
                            break
                except OSError:
                    break  # no sysfs view of the bridge: go on and let MPI retry its connections
                time.sleep(0.05)

    def _shape(self, dev: str, ns: str | None, rate: str) -> None:
        # tbf needs a bucket of at least rate/HZ bytes to reach its rate; 4 ms worth, 64 KiB at least.
        burst = max(64 << 10, int(_rate_bits(rate) / 8 * 0.004))
        _cmd("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
            "latency", f"{round(config.get('EMULATE_TBF_LATENCY') * 1e6)}us", ns=ns)

    def teardown(self) -> None:
        """Kill what still runs in the hosts, delete them, the veths and the bridge. Safe to call twice."""
        for ns in self.namespaces:
            pids = _cmd("ip", "netns", "pids", ns, check=False).stdout.split()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                alive = False
                for p in pids:
                    try:
                        os.kill(int(p), sig)
                        alive = True
                    except (OSError, ValueError):
                        pass
                if not alive:
                    break
                time.sleep(0.3)
        for ns in self.namespaces:
            _cmd("ip", "netns", "del", ns, check=False)
        for link in reversed(self._links):  # deleting a namespace removes its veth pair; the bridge is left
            _cmd("ip", "link", "del", link, check=False)
        self.namespaces, self._links = [], []
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # --------------------------------------------------------------- launch
    def mpiexec(self, program: Sequence[str], mpiexec: str | None = None, extra: Sequence[str] = ()) -> list[str]:
        """The mpiexec command line that runs ``program`` on every rank of the emulated hosts.

        Ranks fill host 0 first (ranks 0..R-1), then host 1, and so on.
        """
        assert self._dir is not None, "setup() first"
        net = f"{self.subnet}.0/24"
        return [
            mpiexec or find_mpiexec(),
            "--hostfile", os.path.join(self._dir, "hostfile"),
            "-n", str(self.hosts * self.ranks_per_host),
            "--map-by", f"ppr:{self.ranks_per_host}:node",
            "--prtemca", "plm_ssh_agent", os.path.join(self._dir, "agent.sh"),
            "--prtemca", "prte_if_include", net,
            "--mca", "btl", "self,sm,tcp",
            "--mca", "btl_tcp_if_include", net,
            "--mca", "pml", "ob1",
            *extra,
            *program,
        ]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for mpiexec: run-as-root allowed, idle ranks yield (oversubscribed ranks
        busy-polling otherwise starve the kernel's network processing), and no per-host Python bytecode races."""
        e = dict(os.environ if base is None else base)
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        e["OMPI_MCA_mpi_yield_when_idle"] = "1"
        return e


def _rate_bits(rate: str) -> float:
    """tc rate text -> bits per second ("1gbit" -> 1e9; "100mbit"; "125mbps" is bytes)."""
    t = rate.strip().lower()
    units = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("gbps", 8e9), ("mbps", 8e6), ("kbps", 8e3), ("bit", 1.0),
             ("bps", 8.0)]
    for u, f in units:
        if t.endswith(u):
            return float(t[: -len(u)]) * f
    return float(t)


def run(hosts: int, ranks_per_host: int, rate: str | None, program: Sequence[str],
        timeout: float | None = None) -> int:
    """Set up the emulated cluster, run ``program`` on it with mpiexec, tear it down; return the exit code.

    The teardown runs on every path: a failing program, an exception, Ctrl-C or SIGTERM.

    Example::

        run(2, 2, "1gbit", ["python", "bench.py"])
    """
    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        with EmulatedCluster(hosts, ranks_per_host, rate) as emu:
            cmd = emu.mpiexec(list(program))
            p = subprocess.Popen(cmd, env=emu.env(), start_new_session=True)
            try:
                return p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop(p)
                return 124
            except KeyboardInterrupt:
                _stop(p)
                return 130
            finally:
                if p.poll() is None:
                    _stop(p)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _stop(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except OSError:
            return
        try:
            p.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            continue


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

