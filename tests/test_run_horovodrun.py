"""collective-run accepts horovodrun's launcher flags: the mpiexec command it builds from them."""
from __future__ import annotations

import pytest

from collective.run import horovodrun_args, mpiexec_command


def _cmd(args: list[str]) -> list[str]:
    cmd, _ = mpiexec_command(horovodrun_args(args), env={})
    return cmd[1:]  # without the mpiexec path


def test_np_and_hosts_become_mpiexec_flags() -> None:
    assert _cmd(["-np", "4", "-H", "a:2,b:2", "python", "train.py"]) == [
        "-n", "4", "--host", "a:2,b:2", "python", "train.py"]
    assert _cmd(["--num-proc", "2", "--hosts", "localhost:2", "python", "t.py"]) == [
        "-n", "2", "--host", "localhost:2", "python", "t.py"]
    assert _cmd(["--num-proc=3", "--hosts=h:3", "python", "t.py"]) == ["-n", "3", "--host", "h:3", "python", "t.py"]


def test_hosts_never_get_oversubscribe() -> None:
    # Many ranks on named hosts: the slots decide, not this machine's cores.
    assert "--oversubscribe" not in _cmd(["-np", "64", "-H", "a:32,b:32", "python", "t.py"])
    assert "--oversubscribe" in _cmd(["-np", "64", "python", "t.py"])


def test_hostfile_interface_mpi_args() -> None:
    assert _cmd(["-np", "8", "--hostfile", "hosts.txt", "python", "t.py"]) == [
        "-n", "8", "--hostfile", "hosts.txt", "python", "t.py"]
    assert _cmd(["--hostfile=hosts.txt", "-np", "2", "python", "t.py"]) == [
        "--hostfile", "hosts.txt", "-n", "2", "python", "t.py"]
    assert _cmd(["-np", "2", "--network-interface", "eth0", "--mpi-args=--bind-to none -x FOO", "--mpi",
                 "python", "t.py"]) == ["-n", "2", "--mca", "btl_tcp_if_include", "eth0", "--bind-to", "none",
                                        "-x", "FOO", "python", "t.py"]


def test_program_arguments_and_mpiexec_options_untouched() -> None:
    # The program's own -np, and mpiexec options with values, are passed through as they are.
    assert _cmd(["-x", "A", "--mca", "btl", "self,tcp", "-np", "2", "python", "t.py", "-np", "5", "-H", "z"]) == [
        "-x", "A", "--mca", "btl", "self,tcp", "-n", "2", "python", "t.py", "-np", "5", "-H", "z"]
    assert horovodrun_args(["-n", "2", "--", "python", "-H"]) == ["-n", "2", "--", "python", "-H"]


def test_bad_flags_exit_with_a_message() -> None:
    with pytest.raises(SystemExit, match="--gloo is not supported"):
        horovodrun_args(["-np", "2", "--gloo", "python", "t.py"])
    with pytest.raises(SystemExit, match="-np needs a value"):
        horovodrun_args(["-np"])
