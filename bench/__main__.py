"""Entry point of `collective-bench` and `python -m collective.bench`: parse, measure under MPI, print; write JSON, PNG, tuning."""
from __future__ import annotations

import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run collective-bench on every rank of the job; rank 0 prints and writes the files.

    Args:
        argv: the arguments (default ``sys.argv[1:]``); see ``collective-bench --help``.

    Returns:
        0 when every result was exact, 1 when some element was wrong (#wrong > 0),
        2 on a usage error or an output file that cannot be written.

    Example::

        collective-run -n 4 collective-bench -b 4K -e 64M -f 4 -J out.json
    """
    from .cli import parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    if "gpu" in args and any(a == "--device" or a.startswith("--device=") for a in args):
        from . import bench_gpu  # CuPy arrays over NCCL or MPI: the same columns

        return bench_gpu.main(args)
    opts = parse_args(args)  # before MPI starts: --help and bad flags need no MPI
    if opts.plot_path:
        from .cli import env_rank
        from .plot import unavailable

        why = unavailable()  # every rank sees the same installation, so all stop here together
        if why is not None:
            if env_rank() in (None, 0):
                print(f"collective-bench: {why}", file=sys.stderr)
            return 2

    import collective as col
    from mpi4py import MPI

    from .core import run
    from .report import TextReporter, to_json, write_json

    comm = col.init()
    if opts.explain:
        return _explain(comm, opts)
    # The benchmark's own communicator: barriers, time maxima and checks never share the library's.
    mpicomm = MPI.COMM_WORLD.Dup()
    rank0 = mpicomm.Get_rank() == 0
    try:
        try:
            info, results = run(opts, comm, mpicomm, TextReporter(sys.stdout) if rank0 else None)
        except SystemExit as exc:  # a usage problem found under MPI; every rank gets here
            if rank0 and isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            return 2 if isinstance(exc.code, str) else int(exc.code or 0)
    finally:
        mpicomm.Free()
    wrong = sum(r.wrong for r in results)
    status = 1 if wrong else 0
    if rank0:
        try:
            if opts.json_path:
                write_json(opts.json_path, to_json(info, opts, results, args))
            if opts.plot_path:
                from .plot import write_plot

                write_plot(opts.plot_path, info, results, str(opts.dtype), opts.op)
            if opts.tune_path:
                from .tune import write_tuning

                _, notes = write_tuning(opts.tune_path, info, results, str(opts.dtype), opts.op)
                for n in notes:
                    print(f"# {n}")
        except (OSError, SystemExit) as exc:
            print(f"collective-bench: {exc.code if isinstance(exc, SystemExit) else exc}", file=sys.stderr)
            status = max(status, 2)
        if wrong:
            print(f"collective-bench: FAILED: {wrong} wrong element(s); see the #wrong columns", file=sys.stderr)
        sys.stdout.flush()
    return status


def _explain(comm: object, opts: object) -> int:
    """``--explain``: rank 0 prints ``comm.explain`` for every collective and size (nccl-tests size convention)."""
    from collective import CollectiveError

    from .core import counts

    if comm.rank == 0:  # type: ignore[attr-defined]
        cl = comm.cluster  # type: ignore[attr-defined]
        print(f"# collective-bench --explain: {cl.size} ranks on {cl.nnodes} node(s) ({cl.source}), {opts.dtype}")  # type: ignore[attr-defined]
        for coll in opts.collectives:  # type: ignore[attr-defined]
            for size in opts.sizes:  # type: ignore[attr-defined]
                _, n_in, _ = counts(coll, size, opts.dtype.itemsize, comm.size)  # type: ignore[attr-defined]
                print(f"\n## {coll}, {size} B ({n_in * opts.dtype.itemsize} B input per rank)")  # type: ignore[attr-defined]
                try:
                    text = comm.explain(coll, n_in * opts.dtype.itemsize, opts.dtype, opts.root)  # type: ignore[attr-defined]
                except (CollectiveError, KeyError, ValueError) as exc:  # sendrecv, or one this version lacks
                    text = f"no model: {exc}"
                print(text)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
