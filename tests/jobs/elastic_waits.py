"""Elastic mode's polling waits (MPIBackend.watch_failures) on 2 ranks, without failures: how they spend the core.

Rank 0 waits for a message rank 1 sends 200 ms later: the wait must nap rather than spin (its thread's CPU time
well below the wall time), run the peer watch about every interval but not before the first interval has passed,
and still deliver the message. Each rank prints PASSED n.
"""
from __future__ import annotations

import time

import numpy as np

from collective.backends.mpi import MPIBackend, require_mpi

MPI = require_mpi()
be = MPIBackend(MPI.COMM_WORLD)
watched: list[float] = []
be.watch_failures(lambda: watched.append(time.monotonic()))
R = be.rank
passed = 0
DELAY = 0.2


def main() -> None:
    global passed
    for _ in range(3):
        buf = np.zeros(8, np.uint8)
        be.barrier()
        if R == 1:
            time.sleep(DELAY)
            be.waitall([be.isend(np.full(8, 7, np.uint8), 0, 11)])
            continue
        watched.clear()
        req = be.irecv(buf, 1, 11)
        t0, c0 = time.monotonic(), time.thread_time()
        be.wait(req)
        wall, cpu = time.monotonic() - t0, time.thread_time() - c0
        assert (buf == 7).all(), buf
        assert wall >= 0.9 * DELAY, wall
        assert cpu < 0.5 * wall, f"the wait took {cpu:.3f} s of CPU in {wall:.3f} s: it spins instead of napping"
        assert watched and watched[0] - t0 >= 0.0019, f"first peer watch {1e3 * (watched[0] - t0):.2f} ms into the wait"
        assert 10 <= len(watched) <= wall / 0.002 + 2, f"{len(watched)} peer watches in {wall:.3f} s"
        passed += 1


try:
    main()
except BaseException as exc:  # noqa: BLE001 - end the job at once, naming the failure
    print(f"FAIL rank {R}: {exc!r}", flush=True)
    MPI.COMM_WORLD.Abort(1)
be.barrier()
print(f"rank {R}: PASSED {passed if R == 0 else 3}", flush=True)
