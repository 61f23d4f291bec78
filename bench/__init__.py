"""collective-bench: bandwidth of collective's algorithms against native MPI (and Gloo, memcpy), nccl-tests style."""
from __future__ import annotations

from .cli import Options, busbw_factor, parse_args, parse_size, size_sweep
from .predict import predicted_us

__all__ = ["Options", "busbw_factor", "parse_args", "parse_size", "size_sweep", "predicted_us", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see :func:`bench.__main__.main`)."""
    from .__main__ import main as _main

    return _main(argv)
