"""Inside an mpiexec job: run collective-bench with the given arguments and exit with its status."""
from __future__ import annotations

import faulthandler
import signal
import sys

faulthandler.register(signal.SIGUSR1, all_threads=True)  # mpi_util dumps stacks this way on a timeout

from collective.bench.__main__ import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
