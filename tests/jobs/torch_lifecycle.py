"""The lifecycle of "collective" process groups under mpiexec: destroy_process_group closes their communicators,
and a group's timeout= bounds a stalled call (also after collective.init()) with a report naming the torch call.

Usage:
  python torch_lifecycle.py destroy            cases; exits 0 when every rank passed them
  python torch_lifecycle.py stall world        rank 1 never calls all_reduce on the default group (timeout=3 s)
  python torch_lifecycle.py stall subgroup     rank 1 never calls all_reduce on new_group([0, 1], timeout=3 s)
In the stall modes rank 0's call raises at the group's deadline (a group given a timeout= has gloo's semantics)
after the watchdog's report; left uncaught, the error ends the job. The test reads the report and the time.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from harness import Cases

import collective as col
import collective.torch as ctorch

torch.set_num_threads(1)
MODE = sys.argv[1]
comm = col.init()  # first, with COLLECTIVE_TIMEOUT's deadline: the groups' timeout= must still hold
P, R = comm.size, comm.rank


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_round() -> list:
    """A default group and new_groups of every kind, each used once; their communicators."""
    dist.init_process_group("collective")
    world = dist.group.WORLD
    groups = [world, dist.new_group(list(range(P)))]
    pair = dist.new_group([0, 1])
    if R < 2:
        groups.append(pair)
    mine, _ = dist.new_subgroups(group_size=1)
    groups.append(mine)
    for g in groups:
        t = torch.ones(4)
        dist.all_reduce(t, group=g)
        assert t.tolist() == [float(dist.get_world_size(g))] * 4, (t, g)
    comms = [g.communicator for g in groups]
    assert len({id(c) for c in comms}) == len(comms), "every group has a communicator of its own"
    assert all(c is not comm for c in comms), "torch's groups never run on the user's default communicator"
    dist.destroy_process_group()
    return comms


def case_destroy_closes_every_group() -> None:
    comms = one_round()
    assert all(c.closed for c in comms), [c.closed for c in comms]
    assert not comm.closed, "the default communicator is the user's: destroy_process_group leaves it open"
    x = comm.allreduce(torch.ones(3).numpy())
    assert x.tolist() == [float(P)] * 3


def case_rounds_leak_nothing() -> None:
    import threading

    one_round()  # the first round may open what stays for the process (MPI's own files)
    fds, threads = open_fds(), threading.active_count()
    for _ in range(4):
        one_round()
    ctorch.join_closing()
    grown = open_fds() - fds
    assert grown <= 0, f"{grown} more open files after 4 rounds of init_process_group / new_group / destroy"
    time.sleep(0.2)  # completion threads end once they reach their last item
    more = threading.active_count() - threads
    assert more <= 0, f"{more} more threads after 4 rounds: {[t.name for t in threading.enumerate()]}"


def case_destroy_one_group() -> None:
    dist.init_process_group("collective")
    g = dist.new_group(list(range(P)))
    c = g.communicator
    dist.destroy_process_group(g)
    ctorch.join_closing()
    assert c.closed and not dist.group.WORLD.communicator.closed
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [float(P)] * 2
    dist.destroy_process_group()


def case_timeout_given_and_not() -> None:
    dist.init_process_group("collective", timeout=datetime.timedelta(seconds=7))
    assert dist.group.WORLD.communicator.watchdog.timeout == 7.0
    g = dist.new_group(list(range(P)))  # inherits the default group's deadline
    h = dist.new_group(list(range(P)), timeout=datetime.timedelta(seconds=5))
    assert g.communicator.watchdog.timeout == 7.0 and h.communicator.watchdog.timeout == 5.0
    assert comm.watchdog.timeout == float(os.environ["COLLECTIVE_TIMEOUT"]), "the user's own deadline is untouched"
    for bad in (0, -1.0, "5", True):
        try:
            comm.subgroup(list(range(P)), timeout=bad)
        except col.CollectiveValueError as exc:
            assert "timeout=" in str(exc) and "subgroup" in str(exc), str(exc)
        else:
            raise AssertionError(f"subgroup(timeout={bad!r}) accepted")
    dist.destroy_process_group()
    dist.init_process_group("collective")  # no timeout=: the default communicator's deadline
    assert dist.group.WORLD.communicator.watchdog.timeout == comm.watchdog.timeout
    dist.destroy_process_group()


if MODE == "destroy":
    cases = Cases(comm)
    cases.run("destroy_process_group closes every group's communicator", case_destroy_closes_every_group)
    cases.run("rounds of groups leak no files or threads", case_rounds_leak_nothing)
    cases.run("destroying one group closes it alone", case_destroy_one_group)
    cases.run("timeout= given and not", case_timeout_given_and_not)
    cases.finish()
elif MODE == "stall":
    where = sys.argv[2]
    dist.init_process_group("collective", timeout=datetime.timedelta(seconds=3 if where == "world" else 600))
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3)) if where == "subgroup" else None
    t = torch.ones(8)
    dist.all_reduce(t, group=group)  # both arrive: the group works
    if R == 0:
        print(f"STALL START {time.time():.3f}", flush=True)
        dist.all_reduce(t, group=group)  # rank 1 never comes: it raises at the group's deadline, uncaught
    elif R == 1:
        time.sleep(120)
    else:
        time.sleep(120)
    print("STALL NOT ENDED", flush=True)
else:
    raise SystemExit(f"unknown mode {MODE!r}")
