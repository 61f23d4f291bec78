"""Run torch's own distributed suite (DistributedTest._DistTestBase, imported from the installed wheel) under mpiexec.

Driver (no MPI launcher around it): launches ``mpiexec -n NP`` on itself with the chosen tests, reads one
``RESULT name outcome detail`` line per test, and when a job dies (a test that hangs until a watchdog ends
the job) records that test as failed and relaunches with the tests after it.

Worker (under mpiexec): sets the variables the suite expects (BACKEND, WORLD_SIZE, TEMP_DIR, INIT_METHOD),
then per test: a fresh temporary directory, ``common_utils.set_rng_seed()``, torch's distributed debug level as
the job started with (torch's launcher starts each test in a fresh process, and its ``with_dist_debug_levels`` leaves
``TORCH_DISTRIBUTED_DEBUG=DETAIL`` behind), ``init_process_group`` as torch's own launcher does, the test,
``destroy_process_group``. ``unittest.SkipTest`` and the suite's skip exit codes
count as skips. Outcomes are agreed across ranks (a failure anywhere fails the test).

Usage::

    python tests/torch_suite_runner.py --backend collective --np 2             # every test of the suite
    python tests/torch_suite_runner.py --backend gloo --np 2 --tests test_all_reduce_sum,test_barrier
    python tests/torch_suite_runner.py --backend collective --gates-as gloo   # the tests gated to gloo, on ours
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="collective")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--tests", default="", help="comma-separated test names (default: every test_* of the suite)")
    p.add_argument("--gates-as", default="", help="the backend name the suite's own gates see (BACKEND), e.g. gloo: "
                   "runs the tests the suite reserves for gloo on --backend (default: --backend itself)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run (driver)")
    p.add_argument("--pg-timeout", type=float, default=60, help="process-group timeout of each test (seconds)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ worker
def _worker(a: argparse.Namespace) -> None:
    import numpy as np

    import collective as col

    comm = col.init()
    P, R = comm.size, comm.rank
    os.environ["BACKEND"] = a.gates_as or a.backend
    os.environ["WORLD_SIZE"] = str(P)
    import tempfile

    base = np.zeros(512, np.uint8)
    if R == 0:
        d = tempfile.mkdtemp(prefix="torch-suite-").encode()
        base[: len(d)] = np.frombuffer(d, np.uint8)
    comm.broadcast(base, root=0, out=base)
    top = bytes(base).rstrip(b"\0").decode()
    os.environ["TEMP_DIR"] = top
    os.makedirs(os.path.join(top, "barrier"), exist_ok=True)

    import datetime
    import unittest

    import torch.distributed as dist
    from torch.testing._internal import common_utils
    from torch.testing._internal.common_distributed import TEST_SKIPS
    from torch.testing._internal.distributed import distributed_test as dt

    if a.backend == "collective":
        import collective.torch  # noqa: F401 - registers the backend

    class Suite(dt.TestDistBackend, dt.DistributedTest._DistTestBase):
        pass

    skip_codes = {s.exit_code: s.message for s in TEST_SKIPS.values()}
    debug = os.environ.get("TORCH_DISTRIBUTED_DEBUG")
    names = [n for n in a.tests.split(",") if n] or sorted(n for n in dir(dt.DistributedTest._DistTestBase)
                                                             if n.startswith("test_"))
    for i, name in enumerate(names):
        sub = os.path.join(top, str(i))
        if R == 0:
            for s in ("barrier", "test_dir", "init_dir"):
                os.makedirs(os.path.join(sub, s), exist_ok=True)
        comm.barrier()
        port = np.zeros(1, np.int64)  # torch's launcher sets MASTER_ADDR/PORT for the tests that use env://
        if R == 0:
            with socket.socket() as so:
                so.bind(("127.0.0.1", 0))
                port[0] = so.getsockname()[1]
        comm.broadcast(port, root=0, out=port)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(int(port[0]))
        os.environ["TEMP_DIR"] = sub
        init_file = os.path.join(sub, "init_dir", "shared_init_file")
        os.environ["INIT_METHOD"] = "file://" + init_file
        t0 = time.monotonic()
        code, detail = 0, ""
        fn = getattr(Suite, name)
        if getattr(fn, "__unittest_skip__", False):  # unittest's own skip mark, as its runner honours it
            if R == 0:
                print(f"RESULT {name} skip 0.0s skip: {getattr(fn, '__unittest_skip_why__', '')}", flush=True)
            continue
        try:
            self = Suite(name)
            self.rank = R
            self.file_name = init_file
            dt.Barrier.barrier_id = 0
            common_utils.set_rng_seed()
            if debug is None:
                os.environ.pop("TORCH_DISTRIBUTED_DEBUG", None)
            else:
                os.environ["TORCH_DISTRIBUTED_DEBUG"] = debug
            dist.set_debug_level_from_env()
            timeout = datetime.timedelta(seconds=dt.CUSTOM_PG_TIMEOUT.get(name, a.pg_timeout))
            dist.init_process_group(init_method=self.init_method, backend=a.backend, world_size=P, rank=R,
                                    timeout=timeout)
            self._barrier()
            getattr(self, name)()
            self._barrier()
        except unittest.SkipTest as exc:
            code, detail = 1, f"skip: {exc}"
        except SystemExit as exc:
            if exc.code in skip_codes:
                code, detail = 1, f"skip: {skip_codes[exc.code]}"
            elif exc.code in (0, None):
                code = 0
            else:
                code, detail = 2, f"exit {exc.code}"
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, not raised
            code, detail = 2, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        finally:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - a test that broke its group must not stop the run
                if code == 0:
                    code, detail = 2, f"destroy_process_group: {type(exc).__name__}: {exc}"[:300]
        codes = comm.allgather(np.array([code], np.int64))
        details = comm.allgather(np.frombuffer(detail.encode()[:400].ljust(400, b" "), np.uint8).reshape(1, -1))
        worst = int(codes.max())
        who = int(np.argmax(codes))
        text = bytes(details[who]).decode(errors="replace").strip()
        if R == 0:
            outcome = ("pass", "skip", "fail")[worst]
            why = f"rank {who}: {text}" if worst else ""
            print(f"RESULT {name} {outcome} {time.monotonic() - t0:.1f}s {why}", flush=True)
    comm.barrier()
    if R == 0:
        print("RUNNER DONE", flush=True)


# ------------------------------------------------------------------ driver
def _all_tests() -> list[str]:
    os.environ.setdefault("BACKEND", "gloo")
    os.environ.setdefault("WORLD_SIZE", "2")
    os.environ.setdefault("TEMP_DIR", "/tmp")
    from torch.testing._internal.distributed import distributed_test as dt

    return sorted(n for n in dir(dt.DistributedTest._DistTestBase) if n.startswith("test_"))


def run(backend: str, nprocs: int, tests: list[str], timeout: float = 3600,
        env: dict[str, str] | None = None, gates_as: str = "") -> dict[str, tuple[str, str]]:
    """Run ``tests`` of torch's suite on ``backend`` at ``nprocs`` ranks; returns name -> (outcome, detail).

    ``gates_as``: the backend name the suite's skip conditions see (see ``--gates-as``).
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from mpi_util import mpirun

    results: dict[str, tuple[str, str]] = {}
    todo = list(tests)
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        res = mpirun(Path(__file__).resolve(), nprocs, ["--backend", backend, "--gates-as", gates_as,
                                                        "--tests", ",".join(todo)],
                     timeout=max(30.0, deadline - time.monotonic()), env=env)
        for line in res.output.splitlines():
            if line.startswith("RESULT "):
                parts = line.split(" ", 4)
                results[parts[1]] = (parts[2], " ".join(parts[3:]))
                print(line, flush=True)
        todo = [t for t in todo if t not in results]
        if todo and "RUNNER DONE" not in res.output:
            why = "job timed out" if res.timed_out else f"job ended (exit {res.returncode}) during this test"
            results[todo[0]] = ("fail", why)
            print(f"RESULT {todo[0]} fail {why}", flush=True)
            todo = todo[1:]
    return results


def main(argv: list[str]) -> int:
    a = _args(argv)
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        _worker(a)
        return 0
    tests = [n for n in a.tests.split(",") if n] or _all_tests()
    res = run(a.backend, a.np, tests, a.timeout, env={"COLLECTIVE_TIMEOUT": "90"}, gates_as=a.gates_as)
    counts = {k: sum(1 for o, _ in res.values() if o == k) for k in ("pass", "skip", "fail")}
    print(f"SUMMARY backend={a.backend} gates-as={a.gates_as or a.backend} P={a.np}: {counts['pass']} pass, {counts['skip']} skip, "
          f"{counts['fail']} fail of {len(tests)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
