"""collective-bench --device gpu under mpiexec: ``python gpu_bench_job.py [flags]`` runs bench.bench_gpu.main(flags)."""
from __future__ import annotations

import sys

from collective.bench.bench_gpu import main

sys.exit(main(sys.argv[1:]))
