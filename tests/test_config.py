"""collective.config: the table covers every COLLECTIVE_* name in the tree, the parser accepts and refuses what it
documents, the docs page is the rendered table, and must-match settings are agreed on under real mpiexec."""
from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from collective import config
from collective.errors import CollectiveConfigError, CollectiveValueError
from mpi_util import ROOT, _app_contexts, check, count_passed, mpirun

#: COLLECTIVE_ names in the source that are not environment variables: a Python constant, and the typo that
#: config.warn_unknown's docstring shows.
NOT_VARIABLES = {"COLLECTIVE_NAMES", "COLLECTIVE_ALGORITM"}
SOURCES = ("collective", "trainer", "bench", "topologies", "examples", "tests", "docs", "README.md", "Makefile")


def _source_files() -> list[Path]:
    out = []
    for top in SOURCES:
        p = ROOT / top
        if p.is_file():
            out.append(p)
        else:
            out += [f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".md", ".sh", ".json", ".toml")]
    return out


def test_every_name_in_the_tree_is_declared() -> None:
    found: dict[str, str] = {}
    for f in _source_files():
        if f.name in ("test_config.py", "config_agree.py"):  # they make up typos on purpose
            continue
        for m in re.finditer(r"\bCOLLECTIVE_[A-Z0-9_]*[A-Z0-9]\b", f.read_text(errors="replace")):
            found.setdefault(m.group(0), str(f.relative_to(ROOT)))
    unknown = {n: where for n, where in found.items() if n not in config.SETTINGS and n not in NOT_VARIABLES}
    assert not unknown, f"COLLECTIVE_ names used but not declared in collective/config.py: {unknown}"


def test_every_declared_variable_is_read_somewhere() -> None:
    """No dead rows: each variable is read through config (by its short or full name) outside config.py."""
    text = "\n".join(f.read_text(errors="replace") for f in _source_files()
                     if f.suffix == ".py" and f.name != "config.py" and "tests" not in f.parts)
    for s in config.SETTINGS.values():
        assert f'"{s.short}"' in text or f"'{s.short}'" in text or f'"{s.name}"' in text, f"{s.name} is never read"


def test_table_is_well_formed() -> None:
    kinds = {"bool", "int", "float", "size", "duration", "choice", "path", "string"}
    for name, s in config.SETTINGS.items():
        assert name == s.name and name.startswith("COLLECTIVE_") and s.kind in kinds, s
        assert s.meaning.endswith(".") and len(s.meaning) > 20, s
        if s.kind == "choice":
            assert s.default in config.choices_of(s), s
        if s.default is not None and s.kind in ("int", "float", "size", "duration"):
            config._in_range(s, str(s.default), float(s.default))  # the default is inside its own range
        if s.kind in ("int", "size"):
            assert s.low is not None and s.high is not None, f"{name}: numbers need a range"
    # Defaults that live elsewhere as constants agree with the table.
    from collective import ALGORITHMS
    from collective.backends import BACKENDS
    from collective.shm import DEFAULT_CHUNK_BYTES, SHM_WAITS
    from collective.trainer.buckets import DEFAULT_BUCKET_MB
    from collective.topologies.cluster import TOPOLOGY_ENV

    assert config.get("SHM_CHUNK_BYTES", env={}) == DEFAULT_CHUNK_BYTES
    assert config.get("BUCKET_MB", env={}) == DEFAULT_BUCKET_MB
    assert config.choices_of(config.setting("ALGORITHM")) == ALGORITHMS
    assert config.choices_of(config.setting("BACKEND")) == BACKENDS
    assert config.choices_of(config.setting("SHM_WAIT")) == SHM_WAITS
    assert TOPOLOGY_ENV in config.SETTINGS
    must = {s.short for s in config.SETTINGS.values() if s.same_on_all_ranks}
    assert {"TOPOLOGY", "NODE_SIZE", "CALIBRATE", "CHECK", "ALGORITHM", "SEGMENT_BYTES", "SHM_CHUNK_BYTES",
            "TUNING", "NAN_CHECK", "DEBUG", "BACKEND"} <= must
    assert not must & {"TIMEOUT", "STALL_WARN", "TIMELINE", "CUDA_DEVICE", "CALIBRATION_FILE"}
    assert {s.short for s in config.SETTINGS.values() if s.test_hook} == {"BENCH_TEST_BROKEN", "BENCH_TEST_HOST_GPU",
                                                                          "ELASTIC_TEST_KILL"}


def test_docs_page_is_the_rendered_table() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config.markdown(), "docs/configuration.md is stale: python -m collective.config --markdown > " \
                                      "docs/configuration.md"
    for name in config.SETTINGS:
        assert f"`{name}`" in page
    res = subprocess.run([sys.executable, "-m", "collective.config", "--check", str(ROOT / "docs/configuration.md")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------------- the parser
@pytest.mark.parametrize("text, want", [
    ("1", True), ("0", False), ("true", True), ("FALSE", False), ("Yes", True), ("no", False), ("ON", True),
    ("off", False), (" on ", True)])
def test_bool(text: str, want: bool) -> None:
    assert config.parse("CHECK", text) is want
    assert config.get("NAN_CHECK", env={"COLLECTIVE_NAN_CHECK": text}) is want


@pytest.mark.parametrize("text", ["2", "-1", "maybe", "enabled", "y", "t", "1.0"])
def test_bool_rejects(text: str) -> None:
    with pytest.raises(CollectiveConfigError) as ei:
        config.parse("NAN_CHECK", text)
    msg = str(ei.value)
    assert f"COLLECTIVE_NAN_CHECK={text!r}" in msg and "true/false" in msg and "on/off" in msg


def test_issue_cases() -> None:
    """The settings a user's first week got wrong."""
    assert config.get("NAN_CHECK", env={"COLLECTIVE_NAN_CHECK": "false"}) is False
    assert config.get("CHECK", env={"COLLECTIVE_CHECK": "off"}) is False
    assert config.get("TIMEOUT", env={"COLLECTIVE_TIMEOUT": "5s"}) == 5.0
    for name, bad in (("SEGMENT_BYTES", "-1"), ("SEGMENT_BYTES", "0"), ("SHM_CHUNK_BYTES", "-4096"),
                      ("SHM_CHUNK_BYTES", "-1M"), ("TIMEOUT", "0"), ("TIMEOUT", "-5s")):
        with pytest.raises(CollectiveConfigError, match=f"COLLECTIVE_{name}='{bad}': too small"):
            config.get(name, env={f"COLLECTIVE_{name}": bad})
    # Still a ValueError for callers that catch that, and one of ours.
    with pytest.raises(ValueError):
        config.get("TIMEOUT", env={"COLLECTIVE_TIMEOUT": "soon"})
    assert issubclass(CollectiveConfigError, CollectiveValueError)


@pytest.mark.parametrize("text, want", [
    ("300", 300.0), ("5s", 5.0), ("5 s", 5.0), ("2.5", 2.5), ("250ms", 0.25), ("10min", 600.0), ("1h", 3600.0),
    ("1e3", 1000.0), ("inf", math.inf), ("INF", math.inf), ("5sec", 5.0)])
def test_duration(text: str, want: float) -> None:
    assert config.parse("TIMEOUT", text) == want


@pytest.mark.parametrize("text, why", [
    ("5m", "not a duration"), ("soon", "not a duration"), ("5 days", "not a duration"), ("0", "too small"),
    ("-1", "too small"), ("nan", "not a duration"), ("1e9", "too large"), ("-inf", "out of range")])
def test_duration_rejects(text: str, why: str) -> None:
    with pytest.raises(CollectiveConfigError, match=re.escape(f"COLLECTIVE_TIMEOUT={text!r}: {why}")):
        config.parse("TIMEOUT", text)


def test_duration_inf_only_where_allowed() -> None:
    with pytest.raises(CollectiveConfigError, match="no limit is not allowed"):
        config.parse("EMULATE_TBF_LATENCY", "inf")
    assert config.parse("EMULATE_TBF_LATENCY", "20ms") == pytest.approx(0.02)


@pytest.mark.parametrize("text, want", [
    ("262144", 262144), ("256K", 256 << 10), ("256k", 256 << 10), ("4M", 4 << 20), ("4MiB", 4 << 20),
    ("64KB", 64 << 10), ("1G", 1 << 30), ("1.5M", 3 << 19), ("24", 24), (" 8 K ", 8 << 10), ("100B", 100)])
def test_size(text: str, want: int) -> None:
    v = config.parse("SEGMENT_BYTES", text)
    assert v == want and isinstance(v, int)


@pytest.mark.parametrize("text, why", [
    ("-1", "too small"), ("0", "too small"), ("2G", "too large"), ("1T", "too large"), ("lots", "not a size"),
    ("4X", "not a size"), ("1.3K", "not a whole number"), ("0x100", "not a size"), ("nan", "not a size")])
def test_size_rejects(text: str, why: str) -> None:
    with pytest.raises(CollectiveConfigError, match=re.escape(f"COLLECTIVE_SEGMENT_BYTES={text!r}: {why}")) as ei:
        config.parse("SEGMENT_BYTES", text)
    assert "K/M/G" in str(ei.value) and "from 1 to 1G" in str(ei.value)


def test_int_and_float() -> None:
    assert config.parse("NODE_SIZE", "4") == 4 and config.parse("TRACE_BUFFER", " 30 ") == 30
    assert config.parse("CUDA_DEVICE", "0") == 0
    for name, bad, why in (("NODE_SIZE", "0", "too small"), ("NODE_SIZE", "-2", "too small"),
                           ("NODE_SIZE", "2.5", "not an integer"), ("NODE_SIZE", "x", "not an integer"),
                           ("TRACE_BUFFER", "0", "too small"), ("TRACE_BUFFER", "99999999999", "too large"),
                           ("CUDA_DEVICE", "-1", "too small")):
        with pytest.raises(CollectiveConfigError, match=re.escape(f"COLLECTIVE_{name}={bad!r}: {why}")):
            config.parse(name, bad)
    assert config.parse("BUCKET_MB", "0.5") == 0.5 and config.parse("BUCKET_MB", "25") == 25.0
    for bad, why in (("0", "too small"), ("-3", "too small"), ("nan", "not a number"), ("inf", "no limit is not allowed"),
                     ("1e9", "too large"), ("lots", "not a number")):
        with pytest.raises(CollectiveConfigError, match=re.escape(f"COLLECTIVE_BUCKET_MB={bad!r}: {why}")):
            config.parse("BUCKET_MB", bad)


def test_choice_path_string() -> None:
    assert config.parse("ALGORITHM", "Ring") == "ring" and config.parse("DEBUG", "DETAIL") == "detail"
    with pytest.raises(CollectiveConfigError, match="COLLECTIVE_ALGORITHM='rign'; expected one of auto, native, ring"):
        config.parse("ALGORITHM", "rign")
    with pytest.raises(CollectiveConfigError, match="COLLECTIVE_SHM_WAIT='sometimes'; expected one of auto, spin"):
        config.get("SHM_WAIT", env={"COLLECTIVE_SHM_WAIT": "sometimes"})
    assert config.parse("TOPOLOGY", " /a b/t.json") == " /a b/t.json"  # paths as written


def test_get_reads_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLLECTIVE_TIMEOUT", raising=False)
    assert config.get("TIMEOUT") == 1800.0 and not config.is_set("TIMEOUT") and config.raw("TIMEOUT") is None
    monkeypatch.setenv("COLLECTIVE_TIMEOUT", "2min")
    assert config.get("COLLECTIVE_TIMEOUT") == 120.0 and config.raw("TIMEOUT") == "2min"
    monkeypatch.setenv("COLLECTIVE_TIMEOUT", "")  # empty means unset
    assert config.get("TIMEOUT") == 1800.0 and not config.is_set("TIMEOUT")
    with pytest.raises(KeyError, match="COLLECTIVE_NOPE is not declared"):
        config.get("NOPE")


def test_readers_use_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The places that parsed variables themselves now raise the table's error (one parse of the timeout)."""
    from collective import calibrate
    from collective.watchdog import Watchdog, deadline
    from collective.trainer.buckets import bucket_caps

    monkeypatch.setenv("COLLECTIVE_TIMEOUT", "5s")
    wd = Watchdog(0, 1)
    assert wd.timeout == 5.0
    monkeypatch.setenv("COLLECTIVE_TIMEOUT", "5 parsecs")
    with pytest.raises(CollectiveConfigError, match="COLLECTIVE_TIMEOUT='5 parsecs'"):
        Watchdog(0, 1)
    with pytest.raises(CollectiveConfigError, match="COLLECTIVE_TIMEOUT"):
        with deadline("x"):
            pass
    monkeypatch.delenv("COLLECTIVE_TIMEOUT")
    import collective as col

    monkeypatch.setenv("COLLECTIVE_NAN_CHECK", "false")
    assert col.Communicator().checking is False  # one rank: the NaN scan is the only check there is
    monkeypatch.setenv("COLLECTIVE_NAN_CHECK", "on")
    assert col.Communicator().checking is True
    monkeypatch.delenv("COLLECTIVE_NAN_CHECK")
    monkeypatch.setenv("COLLECTIVE_CALIBRATE", "Off")
    assert calibrate.enabled() is False
    monkeypatch.setenv("COLLECTIVE_CALIBRATE", "sometimes")
    with pytest.raises(CollectiveConfigError):
        calibrate.enabled()
    monkeypatch.delenv("COLLECTIVE_CALIBRATE")
    monkeypatch.setenv("COLLECTIVE_BUCKET_MB", "-1")
    with pytest.raises(CollectiveConfigError, match="COLLECTIVE_BUCKET_MB='-1': too small"):
        bucket_caps()


def test_unknown_names_warned_once_with_the_closest() -> None:
    env = {"COLLECTIVE_ALGORITM": "ring", "COLLECTIVE_TIMOUT": "5", "COLLECTIVE_ZZZZZZZZZZZZ": "1",
           "COLLECTIVE_CHECK": "1", "OTHER_ALGORITM": "x"}
    assert config.unknown_names(env) == [("COLLECTIVE_ALGORITM", "COLLECTIVE_ALGORITHM"),
                                         ("COLLECTIVE_TIMOUT", "COLLECTIVE_TIMEOUT"),
                                         ("COLLECTIVE_ZZZZZZZZZZZZ", None)]
    config._warned.discard("COLLECTIVE_TIMOUT")
    config._warned.discard("COLLECTIVE_ALGORITM")
    config._warned.discard("COLLECTIVE_ZZZZZZZZZZZZ")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        first = config.warn_unknown(env)
        again = config.warn_unknown(env)
    assert again == [] and len(got) == 3 and all(w.category is config.CollectiveConfigWarning for w in got)
    assert "COLLECTIVE_ALGORITM is not a variable of collective (did you mean COLLECTIVE_ALGORITHM?)" in first[0]
    assert "docs/configuration.md" in first[2]


def test_local_values() -> None:
    env = {"COLLECTIVE_CHECK": "off", "COLLECTIVE_SEGMENT_BYTES": "64K", "COLLECTIVE_TIMEOUT": "1"}
    vals = {v.name: v for v in config.local_values({"ALGORITHM": "ring"}, env=env)}
    assert "COLLECTIVE_TIMEOUT" not in vals  # may differ across ranks
    assert vals["COLLECTIVE_CHECK"].key == b"False" and vals["COLLECTIVE_CHECK"].shown == "'off' (False)"
    assert vals["COLLECTIVE_SEGMENT_BYTES"].key == b"65536"
    assert vals["COLLECTIVE_ALGORITHM"].shown == "'ring' (argument)"
    assert vals["COLLECTIVE_NODE_SIZE"].shown == "unset"
    # the same values spelled another way give the same keys
    other = {v.name: v.key for v in config.local_values({"ALGORITHM": "ring"}, env={
        "COLLECTIVE_CHECK": "no", "COLLECTIVE_SEGMENT_BYTES": "65536"})}
    assert other == {n: v.key for n, v in vals.items()}
    with pytest.raises(CollectiveConfigError, match="COLLECTIVE_CHECK='sure'"):
        config.local_values(env={"COLLECTIVE_CHECK": "sure"})


def test_app_contexts() -> None:
    prog = ["python", "job.py"]
    assert _app_contexts(3, prog, {}) == ["-n", "3", *prog]
    assert _app_contexts(3, prog, {1: {"A": "1", "B": None}}) == [
        "-n", "1", *prog, ":", "-n", "1", "env", "-u", "B", "A=1", *prog, ":", "-n", "1", *prog]
    assert _app_contexts(2, prog, {0: {"A": "x"}, 1: {"A": "x"}}) == ["-n", "2", "env", "A=x", *prog]


# ------------------------------------------------------------------------------------------- under mpiexec
@pytest.mark.parametrize("nprocs", [2, 3])
def test_settings_agreed_across_ranks(nprocs: int) -> None:
    """A must-match setting on one rank only: every rank raises at init naming it and the ranks, in seconds."""
    res = mpirun("config_agree.py", nprocs, timeout=240, rank_env={1: {"COLLECTIVE_CHECK": "0"}})
    check(res, f"config agreement at P={nprocs}")
    assert count_passed(res) == 15, res.output[-3000:]
