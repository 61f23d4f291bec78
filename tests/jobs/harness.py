"""Inside an mpiexec job: run many named cases, report each failure with the rank, and exit non-zero if any failed."""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
import traceback
from typing import Callable

faulthandler.register(signal.SIGUSR1, all_threads=True)


class Cases:
    """Collects case results on this rank; ``finish()`` agrees on the outcome across ranks and exits."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.failed: list[str] = []
        self.passed = 0
        # CASE_TIMES=1: rank 0 prints each passed case's seconds ("CASETIME <s> <name>"), to find a job's slow cases.
        self.times = bool(os.environ.get("CASE_TIMES")) and comm.rank == 0

    def run(self, name: str, fn: Callable[[], None]) -> None:
        """Run one case; a failure is recorded (not raised) so later cases still run on every rank."""
        t0 = time.perf_counter()
        try:
            fn()
            self.passed += 1
            if self.times:
                print(f"CASETIME {time.perf_counter() - t0:.4f} {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the point is to report any failure
            tb = traceback.format_exc(limit=4)
            self.failed.append(name)
            print(f"rank {self.comm.rank}: FAIL {name}: {type(exc).__name__}: {exc}\n{tb}", flush=True)

    def finish(self) -> None:
        """Exit 0 only if every rank passed every case."""
        import numpy as np

        bad = np.array([len(self.failed)], np.int64)
        tot = np.empty(1, np.int64)
        self.comm.mpi_comm.Allreduce(bad, tot)
        if self.comm.rank == 0:
            print(f"PASSED {self.passed} cases on rank 0; {int(tot[0])} failures over all ranks", flush=True)
        sys.stdout.flush()
        if tot[0]:
            sys.exit(1)
