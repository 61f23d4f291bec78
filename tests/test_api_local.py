"""Single-process checks of the API (P=1 inside pytest itself): arguments, dtypes, shapes, the launcher."""
from __future__ import annotations

import os

import numpy as np
import pytest

import collective as col
from collective.ops import OPS, check_dtype, get_op
from collective.run import _nprocs, mpiexec_command


@pytest.fixture(scope="module")
def comm() -> col.Communicator:
    return col.Communicator()


def test_single_rank_is_identity(comm: col.Communicator) -> None:
    x = np.arange(10, dtype=np.float32)
    for alg in col.ALGORITHMS:
        np.testing.assert_array_equal(comm.allreduce(x, algorithm=alg), x)
        np.testing.assert_array_equal(comm.allreduce(x, op="avg", algorithm=alg), x)
        np.testing.assert_array_equal(comm.allgather(x, algorithm=alg), x)
        np.testing.assert_array_equal(comm.reduce_scatter(x, algorithm=alg), x)
    assert comm.rank == 0 and comm.size == 1 and comm.local_rank == 0 and comm.local_size == 1


def test_integer_avg_floor_divides() -> None:
    assert get_op("AVG").average and get_op("sum").ufunc is np.add
    assert get_op("median") is None


@pytest.mark.parametrize("dt", ["int8", "uint16", "int64", "float16", "float32", "float64", "longdouble", "complex64", "complex128"])
def test_numeric_dtypes_accepted(dt: str) -> None:
    assert check_dtype(np.dtype(dt), OPS["sum"]) is None


def test_bool_object_and_complex_order_refused() -> None:
    assert "bool" in check_dtype(np.dtype(bool), OPS["sum"])
    assert check_dtype(np.dtype(bool), None) is None  # moved (broadcast, gather, ...), never reduced
    assert "object" in check_dtype(np.dtype(object), None)
    assert "object" in check_dtype(np.dtype(object), OPS["sum"])
    assert "complex" in check_dtype(np.dtype("complex64"), OPS["max"])
    assert check_dtype(np.dtype("complex64"), OPS["prod"]) is None


def test_messages_name_op_rank_shape_dtype_algorithm(comm: col.Communicator) -> None:
    with pytest.raises(col.CollectiveValueError) as e:
        comm.allreduce(np.ones((2, 3), np.float32), op="median", algorithm="ring")
    msg = str(e.value)
    for word in ("allreduce", "rank 0", "(2, 3)", "float32", "ring", "median"):
        assert word in msg, msg


def test_out_checks(comm: col.Communicator) -> None:
    x = np.ones(6, np.float64)
    with pytest.raises(col.CollectiveValueError, match="contiguous"):
        comm.allreduce(x, out=np.empty(12)[::2])
    ro = np.empty(6)
    ro.flags.writeable = False
    with pytest.raises(col.CollectiveValueError, match="read-only"):
        comm.allreduce(x, out=ro)
    with pytest.raises(col.CollectiveValueError, match="overlaps"):
        big = np.ones(7)
        comm.allreduce(big[:6], out=big[1:])
    y = x.copy()
    assert comm.allreduce(y, out=y) is y


def test_async_handle(comm: col.Communicator) -> None:
    x = np.arange(5.0)
    w = comm.allreduce_async(x)
    np.testing.assert_array_equal(w.wait(), x)
    assert w.done()


def test_launcher_adds_oversubscribe_and_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cmd, env = mpiexec_command(["-n", "8", "python", "x.py"], env={})
    assert "--oversubscribe" in cmd
    assert cmd[-4:] == ["-n", "8", "python", "x.py"]
    cmd2, _ = mpiexec_command(["-n", "2", "python", "x.py"], env={})
    assert "--oversubscribe" not in cmd2
    if os.geteuid() == 0:
        assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert _nprocs(["--np=3", "a"]) == 3 and _nprocs(["a"]) is None


def test_launcher_without_a_program_prints_usage_and_fails(capsys) -> None:
    """`collective-run` alone is a usage error (status 2, usage on stderr); `--help` is an answer (status 0)."""
    from collective.run import main

    with pytest.raises(SystemExit) as exc:
        main([])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: collective-run") and "no program given" in err
    assert main(["--help"]) is None
    cap = capsys.readouterr()
    assert cap.out.startswith("usage: collective-run") and "--emulate" in cap.out and cap.err == ""


def test_launcher_does_not_initialise_mpi() -> None:
    """collective-run only launches: importing it must not make the launcher an MPI process."""
    import subprocess
    import sys

    code = "import sys, collective.run, collective; print('mpi4py.MPI' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr


def test_launcher_leaves_no_shared_memory_files() -> None:
    """collective-run and a job that dies (a rank kills itself) leave nothing in /dev/shm.

    The launcher must not import mpi4py.MPI (through the package): that would
    make it an MPI singleton whose shared-memory file Open MPI never removes.
    """
    import sys

    from mpi_util import run_with_private_shm

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    before = set(os.listdir("/dev/shm"))
    code = ("import os, signal, numpy as np, collective; c = collective.init(); c.allreduce(np.ones(4)); "
            "os.kill(os.getpid(), signal.SIGKILL) if c.rank == 1 else c.barrier()")
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_btl_sm_backing_directory"}
    env["COLLECTIVE_TIMEOUT"] = "20"
    res, left = run_with_private_shm([sys.executable, "-m", "collective.run", "-n", "2", sys.executable, "-c", code],
                                     env, 120)
    assert res.returncode != 0, res.stdout + res.stderr
    if left is None:  # no private /dev/shm here: Open MPI's own files only, as other jobs may run meanwhile
        left = sorted(f for f in set(os.listdir("/dev/shm")) - before if f.startswith("sm_segment"))
    assert not left, f"left in /dev/shm: {left}"


def test_singleton_leaves_no_shared_memory_files() -> None:
    """``python script.py`` without a launcher (an MPI singleton) leaves nothing in /dev/shm either."""
    import sys

    from mpi_util import run_with_private_shm

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    before = set(os.listdir("/dev/shm"))
    code = "import numpy as np, collective; c = collective.init(); assert c.allreduce(np.ones(4))[0] == 1"
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_btl_sm_backing_directory"}
    res, left = run_with_private_shm([sys.executable, "-c", code], env, 120)
    assert res.returncode == 0, res.stdout + res.stderr
    if left is None:
        left = sorted(f for f in set(os.listdir("/dev/shm")) - before if f.startswith(("sm_segment", "collective-")))
    assert not left, f"left in /dev/shm: {left}"
