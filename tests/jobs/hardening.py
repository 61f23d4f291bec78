"""Jobs of the hardening tests (tests/test_hardening.py); argv[1] names the case."""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import numpy as np

faulthandler.register(signal.SIGUSR1)

import collective as col  # noqa: E402


def busy_rank() -> None:
    """Default deadline: rank 0 busy for longer than the stall warning; the job survives and says why it waits."""
    comm = col.init()
    assert comm.watchdog.timeout == 1800.0, comm.watchdog.timeout
    x = np.full(1000, comm.rank + 1, np.float32)
    comm.allreduce(x, out=x)
    if comm.rank == 0:
        time.sleep(float(sys.argv[2]))  # "evaluation" on rank 0
    y = comm.allreduce(np.ones(1000, np.float32))
    assert (y == comm.size).all()
    print(f"rank {comm.rank}: PASSED 1", flush=True)


def gone_rank() -> None:
    """Default deadline: a rank whose program ends while the other waits ends the job at once."""
    comm = col.init()
    comm.allreduce(np.ones(10, np.float32))
    if comm.rank == 1:
        sys.exit(0)
    comm.allreduce(np.ones(10, np.float32))


if __name__ == "__main__":
    {"busy_rank": busy_rank, "gone_rank": gone_rank}[sys.argv[1]]()
