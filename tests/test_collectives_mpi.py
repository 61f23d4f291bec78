"""The foundation's correctness suite under real mpiexec, at P = 1, 2, 3, 4, 5 and 8."""
from __future__ import annotations

import pytest

from mpi_util import check, count_passed, mpirun

pytestmark = pytest.mark.mpi


# At P=8 (four ranks a core here) the quick run takes the dtypes whose paths differ (int32 also runs every root;
# float16 has no MPI datatype; complex has no min/max) and the small sizes: the other dtypes and the large sizes
# take the same paths at any P and run at P <= 5. test_every_algorithm_collective_op_dtype_size_p8_full has it all.
P8_DTYPES = "int32,float16,float64,complex64"


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5, 8])
def test_every_algorithm_collective_op_dtype_size(nprocs: int) -> None:
    """Exact answers, in-place == out-of-place, inputs untouched, bitwise identical ranks, async, bad args."""
    args = ["--large"] if nprocs in (1, 2, 3, 4) else ["--dtypes", P8_DTYPES] if nprocs == 8 else []
    res = mpirun("correctness.py", nprocs, args, timeout=400)
    check(res, f"correctness at P={nprocs}")
    assert count_passed(res) > 1000


@pytest.mark.slow
def test_every_algorithm_collective_op_dtype_size_p8_full() -> None:
    """The whole correctness job at P=8: every dtype, and the 1 MiB and 16 MiB sizes."""
    res = mpirun("correctness.py", 8, ["--large"], timeout=900)
    check(res, "correctness at P=8, every dtype and the large sizes")
    assert count_passed(res) > 1000


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 5, 8])
def test_alltoall_gather_scatter_allgatherv(nprocs: int) -> None:
    """Exact answers for every algorithm, dtype, size (0 rows, 1, uneven, a few MiB) and root; bad input raises."""
    args = ["--large"] if nprocs in (2, 3, 4) else []
    res = mpirun("variable.py", nprocs, args, timeout=300)
    check(res, f"variable-size collectives at P={nprocs}")
    assert count_passed(res) > 300
    if nprocs == 3:  # shm in many rounds of a 4 KiB chunk; every read out of an alloc window streamed
        res = mpirun("variable.py", nprocs, timeout=300,
                     env={"COLLECTIVE_SHM_CHUNK_BYTES": "4096", "COLLECTIVE_SHM_STREAM_BYTES": "1"})
        check(res, f"variable-size collectives at P={nprocs} with 4 KiB shm chunks and streaming window reads")


@pytest.mark.parametrize("nprocs", [2, 3, 5])
def test_subcommunicators_and_point_to_point(nprocs: int) -> None:
    """split (parity, halves, nested, one rank out) and subgroup with every algorithm, interleaved with the
    parent; errors naming world ranks; send/recv, any source, a message that does not fit, a receive timing out."""
    res = mpirun("subcomm_p2p.py", nprocs, timeout=300)
    check(res, f"sub-communicators and point-to-point at P={nprocs}")
    assert count_passed(res) == 5


@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_every_allreduce_route_agrees_across_ranks(nprocs: int) -> None:
    """One-phase shm, window, native, Schedules, async and the device path: same records and check verdicts."""
    res = mpirun("routes.py", nprocs, timeout=200)
    check(res, f"allreduce routes at P={nprocs}")
    assert count_passed(res) == (3 if nprocs == 1 else 6)


@pytest.mark.parametrize("nprocs", [2, 3])
def test_shm_quick_paths_give_the_plain_paths_bits(nprocs: int) -> None:
    """ShmArena.quick_allreduce and SharedArrays.quick_allreduce, bit for bit against the paths they stand for."""
    res = mpirun("shm_paths.py", nprocs, timeout=200)
    check(res, f"shm quick paths at P={nprocs}")
    assert count_passed(res) == 32


@pytest.mark.parametrize("nprocs", [2, 3])
def test_shm_single_copy(nprocs: int) -> None:
    """Large shm allreduces and the variable-size calls by cross-memory attach: the probe, the copy-in path's bits,
    repeats, the switch, the guards."""
    res = mpirun("shm_single_copy.py", nprocs, timeout=300)
    check(res, f"shm single copy at P={nprocs}")
    if "SINGLE_COPY no" in res.output:
        assert count_passed(res) == 3
        pytest.skip("this machine forbids cross-memory attach between processes (the probe and a direct "
                    "process_vm_readv agree): the copy-in path ran")
    assert "SINGLE_COPY yes" in res.output
    assert count_passed(res) == 31


@pytest.mark.parametrize("nprocs", [3, 4])
def test_multi_segment_path(nprocs: int) -> None:
    """Tiny segments force every transfer through the segmented, overlapped receive-and-reduce path."""
    # The bitwise cases' 65537 elements would be ~22,000 segments a transfer: the unsegmented jobs have that size.
    res = mpirun("correctness.py", nprocs, ["--algorithms", "ring,tree,star", "--dtypes", "int8,float16,float64",
                                            "--bitwise-sizes", "P+1,1009"],
                 timeout=300, env={"COLLECTIVE_SEGMENT_BYTES": "24"})
    check(res, f"segmented correctness at P={nprocs}")
    assert count_passed(res) > 500


@pytest.mark.parametrize("nprocs", [2, 3, 5])
def test_shm_small_chunks_and_alloc(nprocs: int) -> None:
    """The shm algorithm with 4 KiB chunks (many chunks per call, both regions reused) and comm.alloc arrays.

    At P=5 (five ranks on the machine's cores: the slowest job) the narrowest and the widest dtype only; the
    NaN-check-only run at P=3."""
    env = {"COLLECTIVE_SHM_CHUNK_BYTES": "4096"}
    dtypes = "int8,complex128" if nprocs == 5 else "int8,float16,float64,complex128"
    res = mpirun("correctness.py", nprocs, ["--algorithms", "shm", "--dtypes", dtypes], timeout=300, env=env)
    check(res, f"shm with small chunks at P={nprocs}")
    res = mpirun("shm_alloc.py", nprocs, timeout=300, env=env)
    check(res, f"alloc at P={nprocs}")
    assert count_passed(res) == 28
    if nprocs == 3:
        # The NaN check alone (no fingerprint exchange) must not stand in for shm's first synchronisation.
        res = mpirun("shm_alloc.py", nprocs, timeout=300,
                     env={"COLLECTIVE_CHECK": "0", "COLLECTIVE_NAN_CHECK": "1"})
        check(res, f"alloc at P={nprocs} with only the NaN check")


@pytest.mark.parametrize("nprocs,wait", [(2, "barrier"), (3, "spin"), (2, None), (3, None)])
def test_shm_wait_modes(nprocs: int, wait: str | None) -> None:
    """Phases waiting on flags and in MPI's barrier, each forced where auto would pick the other (2 CI cores):
    the same answers; the ranks agree on one way even when they ask for different ones. The spinning case also
    fences every phase, as on processors without total store order (elsewhere x86-64 leaves the fences out)."""
    env = {"COLLECTIVE_SHM_WAIT": wait} if wait else {}
    if wait == "spin":
        env["COLLECTIVE_SHM_FENCES"] = "always"
    res = mpirun("shm_wait.py", nprocs, timeout=120, env=env)
    check(res, f"shm wait {wait or 'auto'} at P={nprocs}")
    assert count_passed(res) == 4
    if wait is None:
        return
    res = mpirun("correctness.py", nprocs, ["--algorithms", "shm,auto", "--dtypes", "int8,float32,float64"],
                 timeout=300, env=env)
    check(res, f"shm correctness, wait {wait}, P={nprocs}")
    assert count_passed(res) > 500
    res = mpirun("shm_alloc.py", nprocs, timeout=300, env=env)
    check(res, f"alloc, wait {wait}, P={nprocs}")
    assert count_passed(res) == 28


def test_memory_flat_over_1000_calls() -> None:
    """No allocation per call in steady state, for every algorithm and for comm.alloc buffers."""
    # The flight recorder is a bounded ring (COLLECTIVE_TRACE_BUFFER entries); keep it small so that it is
    # full before the measurement starts and its own fill-up does not read as growth.
    res = mpirun("memory_flat.py", 2, timeout=300, env={"COLLECTIVE_TRACE_BUFFER": "8"})
    check(res, "memory flat")
    print(res.output)
    assert count_passed(res) == 7


def test_bfloat16_everywhere_but_native() -> None:
    """bfloat16 (ml_dtypes) through every Schedule algorithm and shm; MPI itself has no bfloat16 type."""
    pytest.importorskip("ml_dtypes")
    res = mpirun("correctness.py", 3, ["--algorithms", "ring,tree,star,hierarchical,shm,auto", "--dtypes", "bfloat16"],
                 timeout=300)
    check(res, "bfloat16 at P=3")
    assert count_passed(res) > 300
