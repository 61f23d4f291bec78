"""collective.horovod.torch: Horovod's PyTorch API, checked under real mpiexec at P=2 and P=3."""
from __future__ import annotations

import pytest
from mpi_util import check, count_passed, mpirun

pytest.importorskip("torch", reason="torch is not installed (pip install 'pycollective[torch]')")


@pytest.mark.parametrize("nprocs", [2, 3])
def test_horovod_api(nprocs: int) -> None:
    """Every call with exact answers, matching rules, join, helpers, DistributedOptimizer vs one process."""
    res = mpirun("horovod_api.py", nprocs, timeout=240)
    check(res, f"horovod api at P={nprocs}")
    assert count_passed(res) == 22, res.output[-2000:]


def test_import_without_mpi_job() -> None:
    """The module imports and answers its static queries without initializing anything."""
    import collective.horovod.torch as hvd

    assert not hvd.is_initialized()
    assert hvd.mpi_built() and not hvd.gloo_built() and hvd.nccl_built() == 0
    assert (hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max, hvd.Product) == (0, 1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="not been initialized"):
        hvd.rank()
    with pytest.raises(ValueError, match="not been initialized"):
        hvd.allreduce(__import__("torch").ones(2))
    assert issubclass(hvd.HorovodInternalError, RuntimeError)

