"""An uncaught error of ours raised inside the library ends with the user's own line and our message, not with the
library's internal frames; COLLECTIVE_TRACEBACK=full shows them; other exceptions keep Python's report; on several
ranks the job is still aborted."""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from collective import config
from collective.errors import CollectiveConfigError, CollectiveValueError, format_uncaught
from mpi_util import ROOT, mpirun

BAD_OP = """\
import numpy as np
import collective as col

comm = col.init()
x = np.ones(4, np.float32)
comm.allreduce(x, op="bogus")  # the user's line
"""


def _caught(fn) -> tuple[type[BaseException], BaseException, object]:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return type(exc), exc, exc.__traceback__
    raise AssertionError("no exception")


def _library_frames(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip().startswith("File ") and
            any(f"{os.sep}{p}{os.sep}" in ln for p in ("collective", "topologies", "trainer", "bench"))]


def test_our_error_from_inside_the_library_shows_the_callers_frames_only() -> None:
    exc = _caught(lambda: config.parse("COLLECTIVE_TIMEOUT", "soon"))
    assert issubclass(exc[0], CollectiveConfigError)
    short = format_uncaught(*exc)
    lines = short.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "test_excepthook.py" in short and "config.parse(" in short  # this test's own line stays
    assert _library_frames(short) == [], short
    assert lines[-2].startswith("collective.errors.CollectiveConfigError: ") and "COLLECTIVE_TIMEOUT" in lines[-2]
    assert lines[-1].startswith("(") and "COLLECTIVE_TRACEBACK=full" in lines[-1]
    full = format_uncaught(*exc, full=True)
    assert full == "".join(traceback.format_exception(*exc)) and _library_frames(full), full


def test_other_exceptions_and_our_errors_raised_by_the_user_keep_the_whole_report() -> None:
    def users_own() -> None:
        raise CollectiveValueError("raised by the program itself")

    for exc in (_caught(users_own), _caught(lambda: config.no_such_function())):  # type: ignore[attr-defined]
        assert format_uncaught(*exc) == "".join(traceback.format_exception(*exc))


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "bad_op.py"
    p.write_text(BAD_OP)
    return p


@pytest.mark.parametrize("mode", ["short", "full"])
def test_one_rank_program_ends_with_our_message(tmp_path: Path, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLLECTIVE_TRACEBACK": mode}
    res = subprocess.run([sys.executable, str(_script(tmp_path))], capture_output=True, text=True, timeout=120,
                         env=env, check=False)
    assert res.returncode == 1, res.stderr
    err = res.stderr.strip().splitlines()
    assert any('comm.allreduce(x, op="bogus")' in ln for ln in err), res.stderr
    if mode == "short":
        assert _library_frames(res.stderr) == [], res.stderr
        assert err[-2].startswith("collective.errors.CollectiveValueError: allreduce on rank 0 of 1")
        assert "unknown op 'bogus'" in err[-2] and "COLLECTIVE_TRACEBACK=full" in err[-1]
    else:
        assert len(_library_frames(res.stderr)) >= 2, res.stderr


@pytest.mark.mpi
def test_two_ranks_still_abort_with_the_short_report(tmp_path: Path) -> None:
    res = mpirun(_script(tmp_path), 2, timeout=120)
    assert not res.timed_out and res.returncode != 0, res.output[-3000:]
    out = res.output
    assert "died of an uncaught exception; aborting the job" in out and "MPI_ABORT was invoked" in out, out[-3000:]
    assert "unknown op 'bogus'" in out and 'comm.allreduce(x, op="bogus")' in out
    assert _library_frames(out) == [], out[-3000:]


TORCH_RAISES = """\
import torch.distributed as dist
import collective.torch

dist.init_process_group("collective")
if dist.get_rank() == 1:
    raise ValueError("boom on rank 1")
dist.barrier()
"""


@pytest.mark.mpi
def test_the_report_survives_torch_distributeds_excepthook(tmp_path: Path) -> None:
    """torch.distributed's excepthook runs ours with sys.stderr swapped for a StringIO that it prints once ours
    returns, which an aborting rank never does: the report goes to the real stderr."""
    pytest.importorskip("torch")
    p = tmp_path / "torch_raises.py"
    p.write_text(TORCH_RAISES)
    res = mpirun(p, 2, timeout=120)
    assert not res.timed_out and res.returncode != 0, res.output[-3000:]
    out = res.output
    assert "rank 1 of 2 died of an uncaught exception" in out and "ValueError: boom on rank 1" in out, out[-3000:]


class _Tee:
    """A program's log tee in place of sys.stderr: a file-like object without a file descriptor."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_reports_go_where_the_program_points_stderr_unless_the_process_is_ending(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """A report of a process that goes on (a stall warning, a withdrawn call) reaches the stand-in the program put
    in sys.stderr; an aborting process's report reaches the real stderr, since nothing prints the stand-in then."""
    from collective import watchdog

    tee = _Tee()
    monkeypatch.setattr(sys, "stderr", tee)
    watchdog._say("collective: rank 0 of 2: #7 allreduce has been stalled for 60.0 s")
    assert tee.text == "collective: rank 0 of 2: #7 allreduce has been stalled for 60.0 s\n"
    watchdog._say("collective: rank 0 of 2: the job is aborted", dying=True)
    assert "aborted" not in tee.text
    assert "collective: rank 0 of 2: the job is aborted\n" in capfd.readouterr().err
