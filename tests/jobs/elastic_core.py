"""Elastic mode job: a rank kills itself (SIGKILL) at a chosen point; the survivors get RanksLostError, shrink,
and compute correctly on the new communicator (optionally twice, and growing back).

Usage: elastic_core.py --kill POINT:JOBRANK[+JOBRANK...] [--kill ...] [--die-in-shrink JOBRANK] [--grow]
                       [--times FILE] [--end exception|exit]

Several job ranks in one --kill die at the same point (both ranks of an emulated host); the survivors may see
them lost in one RanksLostError or in two (ULFM notices failures one by one), and shrink until all are gone.

POINT: native (in MPI's own allreduce), shm (mid-phase of a multi-chunk shm allreduce), cma (inside a large shm
allreduce's single-copy transfers, while the others read and write its arrays; mid-phase where the node has no
single copy), cross (inside a single-copy shm alltoall's reads, while the others read its input; in the
copy-in path's data phase where the node has no single copy), quick (a repeated small shm allreduce, its one
phase), window (an alloc'd array's window path),
broadcast (ring broadcast), check (the cross-rank check, before any data), p2p (the victim never sends what a
survivor receives), p2p-send (a survivor sends 16 MB to the victim, which dies as the data starts to arrive),
barrier, agree (the victim's successor waits for a message from it while the others are in comm.agree()).
Each rank prints PASSED n when every check held; FAIL lines otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from collections.abc import Callable

import numpy as np

import collective as col
from collective.communicator import take_parent
from collective.errors import CollectiveError, RanksLostError
from collective.shm import CMA_MIN_BYTES

passed = 0


def fail(msg: str) -> None:
    print(f"FAIL job rank {JOB}: {msg}", flush=True)
    sys.stdout.flush()
    os._exit(3)


def ok(cond: bool, msg: str) -> None:
    global passed
    if not cond:
        fail(msg)
    passed += 1


def die() -> None:
    print(f"job rank {JOB}: dying (SIGKILL)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(comm: col.Communicator, point: str) -> None:
    """On the victim: make the next call of ``point`` kill this process at the right moment."""
    real = comm._engine.execute
    if point in ("native", "broadcast", "async"):
        target = "broadcast" if point == "broadcast" else "allreduce"
        comm._engine.execute = lambda c, first, seq: die() if c.name == target else real(c, first, seq)
    elif point == "cma" and comm.node_arena().cma is not None:
        print(f"job rank {JOB}: dies in a single-copy transfer", flush=True)
        comm.node_arena().cma.read = lambda *args: die()  # at its first read: the others are in their transfers
    elif point in ("shm", "window", "cma"):
        arena = comm.node_arena()
        n = [0]

        def counted(real: Callable[..., None]) -> Callable[..., None]:
            def phase(*args: int) -> None:
                n[0] += 1
                if n[0] == 2:  # the second phase: the others are inside the call, waiting for this rank's flag
                    die()
                real(*args)
            return phase
        # A phase is ended by phase() or, where the check posts its fingerprint, by arrival(seq).
        arena.phase, arena.arrival = counted(arena.phase), counted(arena.arrival)
    elif point == "quick":
        arena = comm.node_arena()
        arena.quick_allreduce = lambda *args: die()
    elif point == "cross":  # after the check, as the others read its input by single copy (or wait for it to)
        arena = comm.node_arena()
        if arena.cma is not None:
            arena.cma.read = lambda *args: die()  # at its first read: the others are in their reads
        else:  # no cross-memory attach here: the copy-in path's data phase instead
            arena.scatter_bytes = lambda *args: die()
    elif point == "check":
        real_check = comm._check.check
        comm._check.check = lambda rec, c: die() if c.name == "allreduce" else real_check(rec, c)
    elif point in ("p2p", "p2p-send", "barrier", "agree"):
        pass  # the victim dies instead of making the call
    else:
        raise SystemExit(f"unknown point {point}")


def expected_sum(comm: col.Communicator, n: int) -> np.ndarray:
    return np.full(n, float(sum(j + 1 for j in comm.world_ranks)), np.float64)


def point_call(comm: col.Communicator, point: str, victims: set, bufs: dict) -> str:
    """Make the call ``point`` names (on the victim it dies inside); the op name the error must carry."""
    me = comm.world_rank
    x = np.full(1 << 16, me + 1.0)
    victim = min(v for v in victims if v in comm.world_ranks) if victims & set(comm.world_ranks) else -1
    if point == "native":
        comm.allreduce(x, algorithm="native")
        return "allreduce"
    if point == "async":  # on the communication thread; the handle's wait() raises
        w = comm.allreduce_async(x, algorithm="native")
        w2 = comm.allreduce_async(x, algorithm="ring")  # queued behind it: raises too
        for h in (w, w2):
            try:
                h.wait()
            except RanksLostError:
                if h is w2:
                    raise
        return "allreduce"
    if point == "shm":
        comm.allreduce(np.full(3 << 16, me + 1.0), algorithm="shm")  # several chunks of COLLECTIVE_SHM_CHUNK_BYTES
        return "allreduce"
    if point == "quick":
        comm.allreduce(np.full(64, me + 1.0), algorithm="shm")
        return "allreduce"
    if point == "cross":  # beyond one chunk per rank: single copy whether the ranks spin or share cores
        comm.alltoall(np.full((comm.size, 1 << 16), me + 1.0), algorithm="shm")
        return "alltoall"
    if point == "cma":
        comm.allreduce(np.full(2 * CMA_MIN_BYTES // 8, me + 1.0), algorithm="shm")
        return "allreduce"
    if point == "window":
        g = bufs["window"]
        comm.allreduce(g, out=g, algorithm="shm")
        return "allreduce"
    if point == "broadcast":
        comm.broadcast(x, root=next(r for r, j in enumerate(comm.world_ranks) if j not in victims), algorithm="ring")
        return "broadcast"
    if point == "check":
        comm.allreduce(x, algorithm="ring")
        return "allreduce"
    if point == "p2p":
        if me in victims:
            die()
        vr = comm.world_ranks.index(victim)
        if comm.rank == (vr + 1) % comm.size:
            comm.recv(np.empty(4), source=vr, tag=3)
            return "recv"
        comm.barrier()
        return "barrier"
    if point == "p2p-send":  # a large (rendezvous) send to the victim, which dies once its data receive is posted
        vr = comm.world_ranks.index(victim)
        src = (vr + 1) % comm.size
        big = np.full(1 << 21, float(me))
        if me in victims:
            w = comm.irecv(big, source=src, tag=4)
            t0 = time.monotonic()
            while not w.done() and time.monotonic() - t0 < 60:
                if w._recv[0] == "data":  # the header is in, the data is on its way
                    die()
            die()
        if comm.rank == src:
            comm.send(big, dest=vr, tag=4)
            return "send"
        comm.barrier()
        return "barrier"
    if point == "barrier":
        if me in victims:
            die()
        comm.barrier()
        return "barrier"
    if point == "agree":  # the victim's successor notices in a recv (and recovers) while the others agree
        if me in victims:
            die()
        vr = comm.world_ranks.index(victim)
        if comm.rank == (vr + 1) % comm.size:
            comm.recv(np.empty(4), source=vr, tag=3)
            return "recv"
        r = comm.agree(True)
        fail(f"agree returned {r} after job rank {victim} died")
    raise SystemExit(point)


def verify(comm: col.Communicator, label: str) -> None:
    """Collectives on ``comm`` compared with NumPy: native, ring, shm (plain, quick, window), broadcast, alloc."""
    me = comm.world_rank
    for alg in ("native", "ring", "tree", "shm", "auto"):
        for n in (1, 100, 3 << 16):
            if alg == "shm" and not comm.single_node:
                continue
            for _ in range(2):  # the second time takes the repeat path
                y = comm.allreduce(np.full(n, me + 1.0), algorithm=alg)
                ok(np.array_equal(y, expected_sum(comm, n)), f"{label}: allreduce {alg} n={n}: {y[:3]}")
    if col.get_default() is comm:  # the module-level calls use the default communicator
        y = col.allreduce(np.full(5, me + 1.0))
        ok(np.array_equal(y, expected_sum(comm, 5)), f"{label}: module-level allreduce")
    ok(comm.agree(True) is True and comm.agree(comm.rank != comm.size - 1) is False,
       f"{label}: agree")
    src = comm.world_ranks[-1]
    b = comm.broadcast(np.full(10, float(me)), root=comm.size - 1)
    ok(np.array_equal(b, np.full(10, float(src))), f"{label}: broadcast")
    g = comm.allgather(np.array([me]))
    ok(g.tolist() == list(comm.world_ranks), f"{label}: allgather {g}")
    if comm.single_node:
        a = comm.alloc(1 << 17, np.float64)
        for _ in range(3):
            a[:] = me + 1.0
            comm.allreduce(a, out=a, algorithm="shm")
            ok(np.array_equal(a, expected_sum(comm, a.size)), f"{label}: alloc'd window allreduce")
    if comm.size > 1:
        nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
        w = comm.isend(np.full(4, float(me)), nxt, tag=5)
        got = np.empty(4)
        comm.recv(got, prv, tag=5)
        w.wait()
        ok(np.array_equal(got, np.full(4, float(comm.world_ranks[prv]))), f"{label}: p2p ring")
    comm.barrier()


def lose(comm: col.Communicator, point: str, victims: set, times: list) -> col.Communicator:
    bufs = {}
    if point == "window":
        bufs["window"] = comm.alloc(1 << 17, np.float64)
        bufs["window"][:] = comm.world_rank + 1.0
        comm.allreduce(bufs["window"], out=bufs["window"], algorithm="shm")  # checked once: the repeat path next
        bufs["window"][:] = comm.world_rank + 1.0
    if point == "quick":
        for _ in range(3):  # checked, then given its regions: the one-phase path from the next call on
            comm.allreduce(np.full(64, comm.world_rank + 1.0), algorithm="shm")
    sub = comm.split(comm.world_rank % 2)  # a sub-communicator of the one that will lose ranks
    comm.barrier()
    if comm.world_rank in victims:  # after the barrier: a barrier on one node is itself a shm phase
        arm(comm, point)
    lost: set = set()
    first = True
    while lost != victims:
        t0 = time.monotonic()
        err = None
        where = None
        op = {"broadcast": "broadcast", "p2p": None, "p2p-send": None, "barrier": "barrier",
              "agree": None, "cross": "alltoall"}.get(point, "allreduce")
        try:
            if first:
                point_call(comm, point, victims, bufs)
            where = "later"
            comm.barrier()  # a survivor whose call completed before the failure raises here
            fail(f"{point}: no RanksLostError after job ranks {sorted(victims - lost)} died")
        except RanksLostError as e:
            err = e
            where = where or "call"
        dt = time.monotonic() - t0
        ok(set(err.lost_ranks) <= victims - lost and err.lost_ranks, f"{point}: lost_ranks {err.lost_ranks}, "
           f"expected some of {sorted(victims - lost)}")
        lost |= set(err.lost_ranks)
        ok(all(str(v) in str(err) for v in err.lost_ranks) and err.op in str(err), f"{point}: message {err}")
        if where == "call" and op is not None and first:
            ok(err.op == op, f"{point}: op {err.op} != {op}")
        # Every later call on the old communicator raises too, at once.
        for call in (lambda c=comm: c.allreduce(np.ones(3)), lambda c=comm: c.barrier(),
                     lambda c=comm: c.send(np.ones(1), 0)):
            try:
                call()
                fail(f"{point}: a call after the failure did not raise")
            except RanksLostError as e:
                ok(e.lost_ranks == err.lost_ranks, f"{point}: later call's lost ranks {e.lost_ranks}")
        old = comm
        dying = DIE_IN_SHRINK & set(old.world_ranks)
        DIE_IN_SHRINK.clear()
        if JOB in dying:  # dies inside the construction of the survivors' communicator, the others in it too
            import collective.communicator as cm

            cm.real_node_count = lambda *a: die()
        new = comm.shrink()
        gone = set(err.lost_ranks) | dying
        ok(new.size == old.size - len(gone), f"{point}: new size {new.size}, expected {old.size - len(gone)}")
        ok(not gone & set(new.world_ranks) and new.world_rank == old.world_rank,
           f"{point}: world ranks {new.world_ranks}")
        if dying:
            ok(all(str(j) in str(CollectiveError_of(old)) for j in dying), f"{point}: retired message")
        ok(col.get_default() is new if old is DEFAULT[0] else True, f"{point}: default communicator not replaced")
        DEFAULT[0] = col.get_default()
        try:
            old.allreduce(np.ones(3))
            fail(f"{point}: the old communicator still works after shrink")
        except RanksLostError:
            fail(f"{point}: the old communicator raised RanksLostError after shrink, not the retired error")
        except CollectiveError as e:
            ok("shrunk" in str(e), f"{point}: old comm message {e}")
        if sub is not None:  # sub-communicators of the old communicator raise too, whether they lost a rank or not
            try:
                sub.allreduce(np.ones(2))
                fail(f"{point}: a sub-communicator of the shrunk communicator still works")
            except CollectiveError as e:
                ok("sub-communicator" in str(e), f"{point}: sub-communicator message {e}")
            sub = None
        if "window" in bufs:  # the old communicator's alloc'd array: collectives on the new one refuse it
            for kw in ({}, {}, {"out": bufs["window"]}, {"out": bufs["window"]}):  # twice each: repeats too
                try:
                    new.allreduce(bufs["window"], algorithm="native", **kw)
                    fail(f"{point}: an alloc'd array of the old communicator was taken")
                except CollectiveError as e:
                    ok("replaced" in str(e) and "alloc" in str(e), f"{point}: old alloc'd array: {e}")
        rt = new.recovery_times
        ok(all(k in rt for k in ("revoke", "agree", "shrink", "rebuild", "total")), f"{point}: recovery {rt}")
        times.append({"point": point, "victim": sorted(err.lost_ranks)[0], "lost": list(err.lost_ranks),
                      "error_after": dt, **rt})
        comm = new
        first = False
    bufs.clear()
    return comm


DEFAULT: list = [None]
#: Job ranks that die inside the next comm.shrink() (--die-in-shrink).
DIE_IN_SHRINK: set = set()


def mapping_at(addr: int) -> str | None:
    """The mapping of this process that holds address ``addr`` (its range, device, inode and path), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                return " ".join([parts[0], *parts[3:]])
    return None


def CollectiveError_of(comm: col.Communicator) -> CollectiveError:
    """The error a call on a replaced communicator raises."""
    try:
        comm.barrier()
    except CollectiveError as e:
        return e
    fail("a call on a replaced communicator did not raise")
    raise AssertionError


def main() -> None:
    global JOB
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill", action="append", default=[])
    ap.add_argument("--grow", action="store_true")
    ap.add_argument("--times")
    ap.add_argument("--die-in-shrink", type=int, action="append", default=[],
                    help="this job rank dies while the first shrink builds the survivors' communicator")
    ap.add_argument("--end", choices=("exception", "exit"), help="end with an uncaught exception, or exit(5)")
    a = ap.parse_args()
    DIE_IN_SHRINK.update(a.die_in_shrink)
    comm = col.init()
    JOB = comm.world_rank
    if comm.is_replacement:
        verify(comm, "replacement")
        try:  # hvd.init() after collective.init() in a replacement: refused, not a wait for a join that never comes
            take_parent("a second init")
            fail("a second join of the grown job was not refused")
        except col.CollectiveError as e:
            ok("joins once" in str(e) and "collective.init()" in str(e), f"second join: {e}")
        print(f"job rank {JOB}: replacement PASSED {passed}", flush=True)
        return
    DEFAULT[0] = comm
    ok(comm.elastic, "comm.elastic is False under collective-run --elastic")
    verify(comm, "start")
    times: list = []
    for k in a.kill:
        point, victims = k.split(":")
        comm = lose(comm, point, {int(v) for v in victims.split("+")}, times)
        verify(comm, f"after {k}")
    if a.grow:
        top = os.environ.get("COLLECTIVE_MAX_RANKS")
        if top:  # past --max-ranks: refused on every rank before anything is spawned
            try:
                comm.grow(int(top) - comm.size + 1)
                fail("grow past COLLECTIVE_MAX_RANKS was not refused")
            except CollectiveError as e:
                ok("COLLECTIVE_MAX_RANKS" in str(e), f"grow past the maximum: {e}")
        want = len(comm.world_ranks) + len(a.kill)
        arena = comm.node_arena()
        shared = arena.size > 1  # a one-rank node's window may be private memory that MPI keeps
        addr = arena.segs[arena.rank].__array_interface__["data"][0]
        del arena
        before = mapping_at(addr)
        t0 = time.monotonic()
        old, comm = comm, comm.grow(len(a.kill))
        ok(comm.size == want and col.get_default() is comm, f"grow: size {comm.size}, want {want}")
        # The replaced communicator's node arena is freed by the grow: its window is no longer mapped here.
        after = mapping_at(addr)
        ok(before is not None and (not shared or after != before),
           f"the node arena of the communicator grow() replaced is still mapped: {after}")
        try:
            old.node_arena()
            fail("node_arena() of a replaced communicator did not raise")
        except CollectiveError as e:
            ok("grown" in str(e), f"node_arena() of a replaced communicator: {e}")
        times.append({"grow": time.monotonic() - t0})
        verify(comm, "grown")
    if a.times and comm.rank == 0:
        with open(a.times, "w") as f:
            json.dump(times, f)
    print(f"job rank {JOB}: PASSED {passed}", flush=True)
    if a.end:
        comm.barrier()  # every survivor has printed: mpiexec ends the others once one exits with a non-zero status
    if a.end == "exception":  # the exit status after a recovery must still be Python's (1)
        raise RuntimeError(f"job rank {JOB}: ending with an uncaught exception, as asked")
    if a.end == "exit":
        exit(5)  # noqa: PLR1722 - the builtin on purpose: it raises SystemExit itself


JOB = -1
if __name__ == "__main__":
    main()
