"""collective-bench: flag parsing, the nccl-tests table, JSON, plot, tuning output, and the #wrong column's exit status.

Formatting is tested on synthetic results; whole runs go in-process at P=1 and
in short mpiexec jobs (P=2 every collective, P=3 every collective with a broken
column and a root other than 0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from collective.bench.cli import (BROKEN_ENV, COLLECTIVES, busbw_factor, column_applies, default_algorithms, format_size,
                       parse_args, parse_size, size_sweep)
from collective.bench.core import (IP, OOP, CollectiveResult, JobInfo, SizeResult, Stat, allgatherv_counts, counts, expected,
                        modes_of, sendrecv_peer, values)
from collective.bench.predict import predicted_us
from collective.bench.report import TextReporter, fmt_time, footer_lines, to_json
from collective.bench.tune import best_algorithm, table_entries
from collective.tuning import Entry, load_table
from mpi_util import check, mpirun

try:
    import torch.distributed  # noqa: F401

    HAVE_TORCH = True
except Exception:  # noqa: BLE001
    HAVE_TORCH = False


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, n", [("0", 0), ("4096", 4096), ("4K", 4096), ("4k", 4096), ("64M", 64 << 20),
                                     ("1G", 1 << 30), ("4KB", 4096), ("4KiB", 4096), (" 2M ", 2 << 20)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "K", "4X", "-1", "1.5K", "4 K B x", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_size_sweep_and_format() -> None:
    assert size_sweep(4096, 65536, 4) == [4096, 16384, 65536]
    assert size_sweep(4096, 100000, 4) == [4096, 16384, 65536]  # stops below the max
    assert size_sweep(1024, 1024, 1) == [1024]
    assert size_sweep(0, 4, 2) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="-f must be >= 2"):
        size_sweep(1, 8, 1)
    with pytest.raises(ValueError, match="min size <= max size"):
        size_sweep(8, 1, 2)
    assert [format_size(n) for n in (0, 1536, 4096, 64 << 20, 1 << 30)] == ["0", "1536", "4K", "64M", "1G"]


def test_defaults_and_flags() -> None:
    o = parse_args([])
    assert o.sizes[0] == 4096 and o.sizes[-1] == 64 << 20 and o.iters == 20 and o.warmup == 5 and o.check
    assert o.op == "sum" and o.dtype == np.float32 and o.collectives == ("allreduce",) and not o.explicit
    assert o.algorithms == default_algorithms()
    assert o.algorithms[0] == "native" and "auto" in o.algorithms and o.algorithms[-2:] == ("gloo", "memcpy")
    o = parse_args(["-b", "1K", "-e", "16K", "-f", "2", "-n", "3", "-w", "0", "-c", "0", "-o", "MAX", "-d", "int32",
                    "-a", "ring,native,ring", "--collective", "reduce,allgather", "-r", "1", "-J", "x.json",
                    "--plot", "x.png", "--tune", "t.json"])
    assert o.sizes == [1024, 2048, 4096, 8192, 16384] and (o.iters, o.warmup, o.check) == (3, 0, False)
    assert o.op == "max" and o.dtype == np.int32 and o.algorithms == ("ring", "native") and o.explicit
    assert o.collectives == ("reduce", "allgather") and o.root == 1
    assert (o.json_path, o.plot_path, o.tune_path) == ("x.json", "x.png", "t.json")
    assert parse_args(["--collective", "all"]).collectives == ALL_TEN
    assert parse_args(["--collective", "sendrecv,alltoall,sendrecv"]).collectives == ("sendrecv", "alltoall")


@pytest.mark.parametrize("argv, words", [
    (["-b", "4X"], "is not a size"),
    (["-b", "64K", "-e", "4K"], "min size <= max size"),
    (["-n", "0"], "-n must be >= 1"),
    (["-w", "-1"], "-w must be >= 0"),
    (["-c", "2"], "invalid choice"),
    (["-o", "median"], "unknown op"),
    (["-d", "float99"], "not a NumPy dtype"),
    (["-d", "bool"], "bool"),
    (["-d", "complex64", "-o", "max"], "complex"),
    (["-a", "ring,bogus"], "unknown algorithm bogus"),
    (["-a", "broken"], "unknown algorithm broken"),
    (["--collective", "gatherv"], "unknown collective gatherv"),
    (["-r", "-1"], "-r must be >= 0"),
])
def test_bad_flags_exit_2_with_a_message(argv: list[str], words: str, capsys, monkeypatch) -> None:
    monkeypatch.delenv(BROKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as ei:
        parse_args(argv)
    assert ei.value.code == 2
    assert words in capsys.readouterr().err


def test_help_lists_every_default_column() -> None:
    """--help names every column the default run has, in the order the run prints them."""
    from collective.bench.cli import build_parser

    text = re.sub(r"\s+", " ", build_parser().format_help()).replace("- ", "-")  # undo argparse's line wrapping
    listed = re.search(r"default all, which is: ([^.]*)\.", text)
    assert listed, text
    assert tuple(listed.group(1).split(", ")) == default_algorithms()
    assert {"native-lib", "pipeline", "hierarchical", "shm", "alloc", "gloo", "memcpy"} <= set(default_algorithms())
    for c in ("native", "native-lib", "auto", "alloc", "gloo", "memcpy"):  # the columns that are not plain algorithms
        assert f"; {c}: " in text or f". {c}: " in text, c


def test_broken_only_under_the_test_variable(monkeypatch) -> None:
    monkeypatch.setenv(BROKEN_ENV, "1")
    assert parse_args(["-a", "native,broken"]).algorithms == ("native", "broken")
    assert "broken" not in default_algorithms()


ALL_TEN = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "alltoall", "gather", "scatter",
           "allgatherv", "sendrecv")


def test_busbw_factors_are_nccl_tests() -> None:
    assert busbw_factor("allreduce", 4) == 1.5 and busbw_factor("allreduce", 1) == 0
    assert busbw_factor("reduce_scatter", 4) == 0.75 and busbw_factor("allgather", 2) == 0.5
    assert busbw_factor("reduce", 8) == 1 and busbw_factor("broadcast", 8) == 1
    # nccl-tests: alltoall, gather, scatter (and allgatherv, as allgather) move (P-1)/P of the data; sendrecv 1
    for P in (1, 2, 3, 8):
        for c in ("alltoall", "gather", "scatter", "allgatherv"):
            assert busbw_factor(c, P) == pytest.approx((P - 1) / P), (c, P)
        assert busbw_factor("sendrecv", P) == 1
    assert COLLECTIVES == ALL_TEN


def test_wrong_counts_elements_and_missing_results() -> None:
    from collective.bench.core import _wrong

    want = np.arange(6, dtype=np.int32)
    assert _wrong(want.copy(), want) == 0 and _wrong(want.reshape(2, 3), want) == 0
    bad = want.copy()
    bad[[1, 4]] += 1
    assert _wrong(bad, want) == 2
    assert _wrong(None, want) == 6 and _wrong(want[:5], want) == 6 and _wrong(None, want[:0]) == 1


def test_gpu_bench_measures_allreduce_and_its_kin() -> None:
    from collective.bench.bench_gpu import _base_collectives

    assert _base_collectives(parse_args(["--collective", "all"])).collectives == ALL_TEN[:5]
    assert _base_collectives(parse_args(["--collective", "reduce"])).collectives == ("reduce",)
    with pytest.raises(SystemExit, match="--collective alltoall,sendrecv: measured on the CPU only"):
        _base_collectives(parse_args(["--collective", "allreduce,alltoall,sendrecv"]))


def test_columns_per_collective() -> None:
    """Each collective runs the library's algorithms it has; the references run everywhere they can."""
    assert column_applies("pairwise", "alltoall") and column_applies("bruck", "alltoall")
    assert not column_applies("ring", "alltoall") and not column_applies("pairwise", "allreduce")
    assert column_applies("tree", "gather") and column_applies("tree", "scatter") and not column_applies("star", "gather")
    assert column_applies("ring", "allgatherv") and not column_applies("tree", "allgatherv")
    for c in ("native", "native-lib", "memcpy", "broken"):
        assert all(column_applies(c, k) for k in ALL_TEN)
    assert [k for k in ALL_TEN if column_applies("gloo", k)] == ["allreduce", "alltoall", "gather", "scatter",
                                                                 "allgatherv"]
    assert [k for k in ALL_TEN if column_applies("auto", k)] == list(ALL_TEN[:-1])  # no algorithm for send/recv
    assert not column_applies("shm", "sendrecv") and not column_applies("alloc", "gather")
    assert [k for k in ALL_TEN if column_applies("alloc", k)] == ["allreduce", "alltoall", "allgatherv"]
    assert "pairwise" in default_algorithms() and "bruck" in default_algorithms()
    assert parse_args(["-a", "bruck,native"]).algorithms == ("bruck", "native")


def test_counts_and_expected_of_the_other_collectives() -> None:
    """Sizes follow nccl-tests (equal blocks rounded down to P); every answer is built independently here."""
    dt = np.dtype(np.int32)
    assert counts("alltoall", 4096, 4, 3) == (1023, 1023, 1023)
    assert counts("gather", 4096, 4, 3) == (1023, 341, 1023)
    assert counts("scatter", 4096, 4, 3) == (1023, 1023, 341)
    assert counts("allgatherv", 4096, 4, 3) == (1024, 341, 1024)
    assert counts("sendrecv", 4096, 4, 3) == (1024, 1024, 1024)
    # allgatherv: rank r contributes in proportion to r+1, every size differs, the total is exact
    for n, P in ((1024, 2), (1024, 3), (1000, 5), (7, 4), (0, 3), (5, 1)):
        c = allgatherv_counts(n, P)
        assert sum(c) == n and len(c) == P and all(v >= 0 for v in c)
        for r in range(P):
            assert abs(c[r] - n * 2 * (r + 1) / (P * (P + 1))) < 1, (n, P, c)
    assert allgatherv_counts(1024, 2) == [341, 683] and allgatherv_counts(999, 3) == [166, 333, 500]
    assert [sendrecv_peer(r, 4) for r in range(4)] == [1, 0, 3, 2]
    assert [sendrecv_peer(r, 3) for r in range(3)] == [1, 0, None] and sendrecv_peer(0, 1) is None
    P, n = 3, 12
    ins = [values(r, n, dt, "sum") for r in range(P)]
    for r in range(P):
        # alltoall: rank r receives block r (4 elements) of every rank's input, in rank order
        want = np.concatenate([ins[s].reshape(P, -1)[r] for s in range(P)])
        np.testing.assert_array_equal(expected("alltoall", n, dt, "sum", -1, r, P), want)
        np.testing.assert_array_equal(expected("scatter", n, dt, "sum", 2, r, P), ins[2][4 * r:4 * r + 4])
        got = expected("gather", 4, dt, "sum", 1, r, P)
        assert got is None if r != 1 else np.array_equal(got, np.concatenate([values(s, 4, dt, "sum")
                                                                              for s in range(P)]))
        gv = expected("allgatherv", n, dt, "sum", -1, r, P)  # shares 2, 4, 6
        np.testing.assert_array_equal(gv, np.concatenate([values(0, 2, dt, "sum"), values(1, 4, dt, "sum"),
                                                          values(2, 6, dt, "sum")]))
    np.testing.assert_array_equal(expected("sendrecv", n, dt, "sum", -1, 0, P), ins[1])
    np.testing.assert_array_equal(expected("sendrecv", n, dt, "sum", -1, 1, P), ins[0])
    assert expected("sendrecv", n, dt, "sum", -1, 2, P) is None  # the odd one out sits out
    # the inputs differ from rank to rank and block to block, so a misrouted block is seen
    assert not np.array_equal(ins[0][:4], ins[0][4:8]) and not np.array_equal(ins[0], ins[1])


def test_counts_and_expected() -> None:
    assert counts("allreduce", 4096, 4, 3) == (1024, 1024, 1024)
    assert counts("reduce_scatter", 4096, 4, 3) == (1023, 1023, 341)
    assert counts("allgather", 4096, 4, 3) == (1023, 341, 1023)
    assert counts("broadcast", 4099, 4, 3) == (1024, 1024, 1024)
    P, n, dt = 3, 12, np.dtype(np.float32)
    full = values(0, n, dt, "sum") + values(1, n, dt, "sum") + values(2, n, dt, "sum")
    np.testing.assert_array_equal(expected("allreduce", n, dt, "sum", -1, 1, P), full)
    np.testing.assert_array_equal(expected("reduce_scatter", n, dt, "sum", -1, 2, P), full[8:])
    assert expected("reduce", n, dt, "sum", 0, 1, P) is None
    np.testing.assert_array_equal(expected("broadcast", n, dt, "sum", 2, 0, P), values(2, n, dt, "sum"))
    assert expected("allgather", 4, dt, "sum", -1, 0, P).size == 12
    assert modes_of("ring", "allreduce") == (OOP, IP) and modes_of("memcpy", "allreduce") == (OOP,)
    assert modes_of("ring", "allgather") == (OOP,)
    assert predicted_us("ring", "allreduce", 4096) is None


# ------------------------------------------------------------------ formatting (synthetic results)
INFO = JobInfo("Open MPI v5.0.11", "3.1", "4.1.2", 4, [2, 2])


def synth(coll: str = "allreduce", cols: tuple[str, ...] = ("native", "ring", "memcpy"), sizes=(4096, 65536),
          pred: bool = False, wrong: int = 0, missing: tuple[str, str] | None = None) -> CollectiveResult:
    """native takes 10 us, the i-th column 10*(i+1) us (so ring = 0.5x native); iqr 25 %."""
    factor = busbw_factor(coll, INFO.nranks)
    modes = {c: modes_of(c, coll) for c in cols}
    res = CollectiveResult(coll, -1, factor, list(cols), modes, pred)
    for s in sizes:
        row = SizeResult(s, s // 4, s)
        for i, c in enumerate(cols):
            for m in modes[c]:
                if (c, m) == missing:
                    continue
                t = 10.0 * (i + 1)
                row.cells.setdefault(c, {})[m] = Stat(np.array([t, t, t, 2 * t]), s, 1.0 if c == "memcpy" else factor,
                                                      None if c == "memcpy" else (wrong if c == "ring" else 0))
        row.pred_us = {c: (123.0 if pred and c != "memcpy" else None) for c in cols}
        res.rows.append(row)
    return res


def _bars(line: str) -> list[int]:
    return [i for i, ch in enumerate(line) if ch == "|"]


def _render(res: CollectiveResult, argv: list[str] | None = None) -> list[str]:
    import io

    buf = io.StringIO()
    rep = TextReporter(buf)
    opts = parse_args(argv or ["-b", "4K", "-e", "64K", "-f", "16", "--wide"])
    rep.begin(INFO, opts, res)
    for row in res.rows:
        rep.row(res, row)
    rep.end(res)
    return buf.getvalue().splitlines()


def test_stat_numbers() -> None:
    s = Stat(np.array([10.0, 10.0, 10.0, 20.0]), 4096, 1.5, 0)
    assert s.median_us == 10.0 and s.iqr == pytest.approx(0.25)
    assert s.algbw == pytest.approx(0.4096) and s.busbw == pytest.approx(0.6144)
    j = s.to_json()
    assert j["time_us"] == 10.0 and j["min_us"] == 10.0 and j["max_us"] == 20.0 and j["samples_us"] == [10, 10, 10, 20]
    assert fmt_time(1.234) == "1.23" and fmt_time(1234.5) == "1234.5" and fmt_time(123456.7) == "123457"


def test_table_layout_lines_up() -> None:
    lines = _render(synth())
    head = [ln for ln in lines if ln.startswith("#")]
    assert head[0] == "# collective-bench: allreduce, float32, op sum"
    assert "Open MPI v5.0.11 (MPI 3.1, mpi4py 4.1.2)" in head[1]
    assert "nranks 4, ranks per node [2, 2] (2 nodes)" in head[2]
    assert any("2(P-1)/P = 1.500" in h for h in head)
    rows = [ln for ln in lines if not ln.startswith("#")]
    assert len(rows) == 2
    table_head = [ln for ln in lines if ln.startswith("#") and "|" in ln]
    assert len(table_head) == 4  # names, modes, column names, units
    assert "native" in table_head[0] and "ring" in table_head[0] and "memcpy" in table_head[0]
    assert table_head[1].count("out-of-place") == 2 and table_head[1].count("in-place") == 2
    assert table_head[2].count("#wrong") == 4 and table_head[2].count("busbw") == 4
    for h in table_head:
        assert _bars(h) == _bars(rows[0]) == _bars(rows[1])
    f = rows[0].split()
    assert f[:5] == ["4096", "1024", "float32", "sum", "-1"]
    # native out-of-place: 10 us, iqr 25 %, algbw 0.41, busbw 0.61, 0 wrong
    assert f[6:11] == ["10.00", "25", "0.41", "0.61", "0"]


def test_default_table_is_compact_and_wide_has_every_cell() -> None:
    """The default output gives one busbw per column and size (lines of a terminal's width for every default
    column); --wide keeps nccl-tests' full layout; the JSON is the same either way."""
    from collective.bench.cli import column_applies

    cols = [c for c in default_algorithms() if column_applies(c, "allreduce")]  # what an allreduce run has
    res = synth(cols=tuple(cols), wrong=2)
    compact = _render(res, ["-b", "4K", "-e", "64K", "-f", "16"])
    assert max(map(len, compact)) <= 150, max(compact, key=len)
    names = next(ln for ln in compact if ln.startswith("#") and "#wrong" in ln).split()
    assert names[1:4] == ["size", "type", "redop"] and names[-1] == "#wrong"
    assert names[4:-1] == [c if c != "alloc" or "out_of_place" in res.modes[c] else f"{c}:ip" for c in cols]
    rows = [ln.split() for ln in compact if not ln.startswith("#")]
    assert len(rows) == 2
    # native: 4096 B / 10 us * 1.5 = 0.61 GB/s; ring is the third column (30 us): 0.20; #wrong: ring's 2 per mode
    assert rows[0][:4] == ["4096", "float32", "sum", "0.61"] and rows[0][3 + cols.index("ring")] == "0.20"
    assert rows[0][-1] == "4" and "# Out of bounds values : 8 FAILED" in compact  # 4 per size, 2 sizes
    foot = compact[compact.index("# Out of bounds values : 8 FAILED"):]
    assert not any("in-place" in ln or ":ip " in ln for ln in foot if "native-lib" in ln)
    wide = _render(res, ["-b", "4K", "-e", "64K", "-f", "16", "--wide"])
    assert max(map(len, wide)) > 3 * max(map(len, compact))
    assert not parse_args([]).wide and parse_args(["--wide"]).wide
    assert to_json(INFO, parse_args([]), [res]) == to_json(INFO, parse_args(["--wide"]), [res])


def test_footer_average_and_ratio_vs_native() -> None:
    res = synth()
    foot = footer_lines(res)
    assert foot[0] == "# Out of bounds values : 0 OK"
    ring = next(ln for ln in foot if ln.startswith("#   ring"))
    # busbw 4096 B / 20 us * 1.5 = 0.307 and 65536 B / 20 us * 1.5 = 4.915 GB/s: mean 2.611
    assert "out-of-place 2.611" in ring and "in-place 2.611" in ring
    hdr = next(ln for ln in foot if "ring:ip" in ln)
    assert hdr.split()[1:] == ["size", "ring", "ring:ip", "memcpy"]
    ratios = [ln.split() for ln in foot if re.match(r"#\s+(4K|64K)\s", ln)]
    # memcpy (30 us): 4096 B / 30 us against native's busbw 4096 B / 10 us * 1.5 = 0.22x
    assert ratios[0] == ["#", "4K", "0.50x", "0.50x", "0.22x"]
    assert res.rows[0].ratio_vs_native("ring", OOP) == pytest.approx(0.5)


def test_wrong_na_and_pred_columns() -> None:
    res = synth(wrong=3, missing=("ring", IP), pred=True)
    lines = _render(res)
    assert "# Out of bounds values : 6 FAILED" in lines
    assert res.wrong == 6
    rows = [ln for ln in lines if not ln.startswith("#")]
    assert " n/a " in rows[0] + " "
    head = [ln for ln in lines if ln.startswith("#") and "|" in ln]
    assert head[2].count("pred") == 2 and _bars(head[2]) == _bars(rows[0])
    assert "123.00" in rows[0]
    assert "pred" not in "".join(_render(synth()))  # no numbers, no column


def test_reduce_scatter_has_no_in_place() -> None:
    lines = _render(synth("reduce_scatter"))
    assert not any("in-place" in ln for ln in lines if "|" in ln)
    assert any("(P-1)/P = 0.750" in ln for ln in lines)


@pytest.mark.parametrize("coll, text", [("alltoall", "(P-1)/P = 0.750"), ("gather", "(P-1)/P = 0.750"),
                                        ("scatter", "(P-1)/P = 0.750"), ("allgatherv", "(P-1)/P = 0.750"),
                                        ("sendrecv", "1 = 1.000")])
def test_other_collectives_header_and_modes(coll: str, text: str) -> None:
    lines = _render(synth(coll))
    assert any(f"busbw = algbw x {text}" in ln for ln in lines), lines[:6]
    assert not any("in-place" in ln for ln in lines if "|" in ln)
    assert all(modes_of(c, coll) == (OOP,) for c in ("native", "ring", "gloo"))


def test_json_document() -> None:
    doc = to_json(INFO, parse_args(["-b", "4K", "-e", "64K", "-f", "16"]), [synth(), synth("broadcast", wrong=1)],
                  ["-b", "4K"])
    json.dumps(doc, allow_nan=False)
    assert doc["tool"] == "collective-bench" and doc["nranks"] == 4 and doc["ranks_per_node"] == [2, 2]
    assert doc["wrong"] == 4 and doc["ok"] is False  # ring: 1 per size and mode and doc["argv"] == ["-b", "4K"]
    c = doc["collectives"][0]
    assert c["collective"] == "allreduce" and c["busbw_factor"] == 1.5 and c["wrong"] == 0
    s = c["sizes"][0]
    assert s["size"] == 4096 and s["count"] == 1024 and s["input_bytes"] == 4096
    assert s["results"]["native"]["out_of_place"]["time_us"] == 10.0
    assert s["results"]["ring"]["in_place"]["wrong"] == 0
    assert s["ratio_vs_native"]["ring"] == {"out_of_place": 0.5, "in_place": 0.5}
    assert "native" not in s["ratio_vs_native"] and s["pred_us"]["ring"] is None
    assert c["avg_busbw"]["memcpy"]["out_of_place"] > 0


def test_tuning_choice_from_results() -> None:
    res = synth(cols=("native", "ring", "auto", "broken"), sizes=(4096, 65536, 1 << 20))
    # Make ring win from 64K on; auto and broken are never candidates, nor a column with wrong elements.
    for row in res.rows[1:]:
        for m in row.cells["ring"].values():
            m.times_us = m.times_us / 100
    for row in res.rows:
        for m in row.cells["broken"].values():
            m.times_us = m.times_us / 1000
    assert [best_algorithm(r) for r in res.rows] == ["native", "ring", "ring"]
    assert table_entries(res) == [Entry(4096, "native"), Entry(None, "ring")]
    res.rows[2].cells["ring"][OOP].wrong = 1
    assert best_algorithm(res.rows[2]) == "native"


def test_tuning_never_names_alloc(tmp_path: Path) -> None:
    """alloc (shm on comm.alloc buffers) is the fastest column here, yet not an algorithm auto can pick for a user's
    array: the table names the fastest real algorithm, and a table naming alloc is refused when read."""
    from collective.tuning import TuningTableError, write_table

    res = synth(cols=("native", "shm", "alloc"), sizes=(4096, 65536))
    for row in res.rows:
        for c, scale in (("alloc", 1000), ("shm", 100)):
            for m in row.cells[c].values():
                m.times_us = m.times_us / scale
    assert [best_algorithm(r) for r in res.rows] == ["shm", "shm"]
    assert table_entries(res) == [Entry(None, "shm")]
    with pytest.raises(TuningTableError, match="'alloc', which is not a concrete algorithm"):
        write_table(str(tmp_path / "t.json"), 4, (2, 2), {"allreduce": [Entry(None, "alloc")]})


def test_bare_native_is_the_baseline_and_native_lib_what_auto_would_run() -> None:
    """The bare MPI call never wins a tuning entry or the auto table while the library's own native was measured."""
    from collective.bench.tables import auto_markdown

    res = synth(cols=("native", "native-lib", "ring", "auto"), sizes=(4096, 65536))
    # bare native 10 us, native-lib 20, ring 30, auto 40: native-lib is the best auto could have run
    assert [best_algorithm(r) for r in res.rows] == ["native", "native"]
    for row in res.rows[1:]:
        for m in row.cells["ring"].values():
            m.times_us = m.times_us / 2  # ring 15 us: beats native-lib (20) though not the bare call (10)
    assert [best_algorithm(r) for r in res.rows] == ["native", "ring"]
    from collective.bench.report import to_json

    doc = json.loads(json.dumps(to_json(INFO, parse_args(["-b", "4K", "-e", "64K"]), [res])))
    rows = auto_markdown(doc).splitlines()[2:]
    assert "| native-lib | 20.0 |" in rows[0] and "| ring | 15.0 |" in rows[1], rows


# ------------------------------------------------------------------ whole runs at P=1, in this process
def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from collective.bench.__main__ import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_run_p1_json_plot_tune(tmp_path: Path, capsys) -> None:
    j, png, tune = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "t.json"
    rc, out, _ = _run(["-b", "1K", "-e", "16K", "-f", "4", "-n", "3", "-w", "1", "-a", "native,ring,tree,auto,memcpy",
                    "--collective", "all", "-J", str(j), "--plot", str(png), "--tune", str(tune)], capsys)
    assert rc == 0, out
    assert out.count("# collective-bench: ") == 10
    data_rows = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert len(data_rows) == 30  # 3 sizes x 10 collectives
    doc = json.loads(j.read_text())
    assert doc["ok"] and doc["wrong"] == 0 and doc["nranks"] == 1
    assert [c["collective"] for c in doc["collectives"]] == list(ALL_TEN)
    for c in doc["collectives"][5:]:  # one rank: the others' native calls run (sendrecv needs a partner)
        assert c["busbw_factor"] == (1.0 if c["collective"] == "sendrecv" else 0.0)
        for s in c["sizes"]:
            nat = s["results"]["native"]
            assert (nat == {}) == (c["collective"] == "sendrecv"), (c["collective"], nat)
            assert all(r["wrong"] == 0 for col, m in s["results"].items() if col != "memcpy" for r in m.values())
    assert "native out-of-place: n/a (needs 2 ranks or more" in out  # sendrecv at P=1
    from collective.bench.tables import markdown

    rows = markdown(doc, "sendrecv").splitlines()[2:]  # no native cell at P=1: n/a, not a crash
    assert len(rows) == 3 and all(ln.split(" | ")[1] == "n/a" for ln in rows), rows
    assert len(markdown(doc, "alltoall").splitlines()) == 5  # header, rule, 3 sizes
    assert "ring: not an algorithm of alltoall; absent" in out  # -a named it: said so
    ar = doc["collectives"][0]
    assert ar["columns"] == ["native", "ring", "tree", "auto", "memcpy"]
    for s in ar["sizes"]:
        for c in ("native", "ring", "tree", "auto"):
            for m in ("out_of_place", "in_place"):
                r = s["results"][c][m]
                assert r["wrong"] == 0 and len(r["samples_us"]) == 3 and r["time_us"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = load_table(tune)
    assert t.nranks == 1 and t.ranks_per_node == (1,) and set(t.table) == {"allreduce", "reduce", "broadcast",
                                                                           "reduce_scatter", "allgather"}
    assert "tune: alltoall has no tuning table; left out" in out
    assert all(e.algorithm in ("native", "ring", "tree") for es in t.table.values() for e in es)
    assert t.choose("allreduce", 4096, 1) in ("native", "ring", "tree")
    assert f"COLLECTIVE_TUNING={tune}" in out
    # A second --tune of one collective keeps the other four.
    rc, out, _ = _run(["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-a", "native", "--tune", str(tune)], capsys)
    assert rc == 0
    t2 = load_table(tune)
    assert t2.table["allreduce"] == (Entry(None, "native"),) and t2.table["allgather"] == t.table["allgather"]


def test_plot_without_matplotlib_stops_before_measuring(tmp_path: Path, capsys, monkeypatch) -> None:
    """--plot without matplotlib: one message, prefixed once, status 2, and no size measured first."""
    import sys

    from collective.bench import core as bench_core

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like to imports
    monkeypatch.setattr(bench_core, "run", lambda *a, **k: pytest.fail("measured before checking --plot"))
    png = tmp_path / "r.png"
    rc, out, err = _run(["-b", "1K", "-e", "1K", "-n", "1", "-a", "native", "--plot", str(png)], capsys)
    assert rc == 2 and out == "" and not png.exists()
    assert err.count("collective-bench:") == 1 and "--plot needs matplotlib" in err, err


def test_plot_gives_every_default_column_its_own_colour() -> None:
    """native and gloo (and every other default column) get different colours; memcpy alone is grey."""
    pytest.importorskip("matplotlib")
    from collective.bench.plot import column_colors, figure

    cols = default_algorithms()
    assert len(cols) > 10  # more than matplotlib's default colour cycle, which gave gloo native's colour
    colors = column_colors(cols)
    assert len(set(colors.values())) == len(cols) and colors["native"] != colors["gloo"]
    fig = figure(INFO, [synth(cols=tuple(cols))], "float32", "sum")
    lines = {ln.get_label(): ln.get_color() for ln in fig.axes[0].get_lines()}
    assert set(cols) <= set(lines), sorted(lines)
    drawn = [lines[c] for c in cols]
    assert len(set(drawn)) == len(drawn), lines
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_run_p1_broken_column_fails(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(BROKEN_ENV, "1")
    j = tmp_path / "r.json"
    rc, out, _ = _run(["-b", "64", "-e", "256", "-f", "4", "-n", "2", "-w", "0", "-a", "native,broken",
                    "-d", "int32", "-J", str(j)], capsys)
    assert rc == 1
    assert "# Out of bounds values : 4 FAILED" in out
    doc = json.loads(j.read_text())
    s = doc["collectives"][0]["sizes"][0]["results"]
    assert s["broken"]["out_of_place"]["wrong"] == 1 and s["broken"]["in_place"]["wrong"] == 1
    assert s["native"]["out_of_place"]["wrong"] == 0 and not doc["ok"]


def test_run_p1_check_off(capsys) -> None:
    rc, out, _ = _run(["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-c", "0", "-a", "native", "-d", "float16",
                    "-o", "avg"], capsys)
    assert rc == 0
    row = next(ln for ln in out.splitlines() if ln and not ln.startswith("#"))
    assert "N/A" in row and "float16" in row and " avg " in row


def test_run_p1_dtype_mpi_lacks(capsys) -> None:
    """bfloat16 (no MPI datatype): the bare native column is n/a, the library's algorithms run."""
    pytest.importorskip("ml_dtypes")
    rc, out, _ = _run(["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-a", "native,ring", "-d", "bfloat16"], capsys)
    assert rc == 0, out
    row = next(ln for ln in out.splitlines() if ln and not ln.startswith("#"))
    assert "bfloat16" in row and " n/a " in row + " ", row


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: the gloo column is absent")
def test_run_p1_gloo_column(tmp_path: Path, capsys) -> None:
    j = tmp_path / "g.json"
    rc, out, _ = _run(["-b", "1K", "-e", "4K", "-n", "2", "-w", "0", "-a", "native,gloo", "-J", str(j),
                       "--collective", "allreduce,alltoall,gather,scatter,allgatherv,sendrecv"], capsys)
    assert rc == 0, out
    colls = json.loads(j.read_text())["collectives"]
    s = colls[0]["sizes"][0]["results"]["gloo"]
    assert s["out_of_place"]["wrong"] == 0 and s["in_place"]["wrong"] == 0
    for c in colls[1:5]:
        assert "gloo" in c["columns"]
        for row in c["sizes"]:
            assert row["results"]["gloo"]["out_of_place"]["wrong"] == 0, c["collective"]
    assert "gloo" not in colls[5]["columns"] and "gloo: measured for allreduce, alltoall" in out


def test_run_p1_library_columns_run_or_say_why(tmp_path: Path, capsys) -> None:
    """The library's columns of the other collectives are exact, or n/a saying this version lacks the call."""
    from collective import Communicator

    j = tmp_path / "l.json"
    cols = "native,native-lib,pairwise,bruck,tree,ring,auto"
    rc, out, _ = _run(["-b", "1K", "-e", "1K", "-n", "2", "-w", "0", "-a", cols, "-J", str(j), "--collective",
                       "alltoall,gather,scatter,allgatherv"], capsys)
    assert rc == 0, out
    for c in json.loads(j.read_text())["collectives"]:
        call = {"allgatherv": "gather"}.get(c["collective"], c["collective"])
        have = hasattr(Communicator, call)
        for col in c["columns"]:
            r = c["sizes"][0]["results"][col]
            if col == "native" or have:
                assert r["out_of_place"]["wrong"] == 0, (c["collective"], col)
            else:
                assert r == {} and any("not available in this version of collective" in n and n.startswith(col)
                                       for n in c["notes"]), (c["collective"], col, c["notes"])
        assert c["columns"][:2] == ["native", "native-lib"] and "auto" in c["columns"]
    assert "ring: not an algorithm of alltoall; absent" in out and "tree: not an algorithm of allgatherv" in out


def test_gloo_named_without_torch_is_an_error(capsys, monkeypatch) -> None:
    from collective.bench import gloo as bench_gloo

    monkeypatch.setattr(bench_gloo, "unavailable_reason", lambda: "torch.distributed cannot be imported (test)")
    rc, _, err = _run(["-b", "1K", "-e", "1K", "-n", "1", "-a", "native,gloo"], capsys)
    assert rc == 2 and "-a gloo: torch.distributed cannot be imported (test)" in err
    rc, out, _ = _run(["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-a", "all"], capsys)
    assert rc == 0 and "gloo: column absent" in out


# ------------------------------------------------------------------ real mpiexec jobs
@pytest.mark.mpi
def test_mpi_p2_every_collective(tmp_path: Path) -> None:
    """Every collective and algorithm (gloo too when torch is here) checked exactly at P=2; JSON and tuning table."""
    j, tune = tmp_path / "p2.json", tmp_path / "tune.json"
    res = mpirun("bench_job.py", 2, ["-b", "1K", "-e", "64K", "-f", "8", "-n", "3", "-w", "1", "--collective", "all",
                                     "-J", str(j), "--tune", str(tune)], timeout=240)
    check(res, "collective-bench at P=2")
    doc = json.loads(j.read_text())
    assert doc["nranks"] == 2 and doc["ok"] and doc["wrong"] == 0
    ar = doc["collectives"][0]
    assert "native" in ar["columns"] and "memcpy" in ar["columns"] and ("gloo" in ar["columns"]) == HAVE_TORCH
    assert ar["busbw_factor"] == 1.0
    for c in doc["collectives"]:
        for s in c["sizes"]:
            for col, modes in s["results"].items():
                for m, r in modes.items():
                    assert col == "memcpy" or r["wrong"] == 0, (c["collective"], s["size"], col, m)
    t = load_table(tune)
    assert t.nranks == 2 and sum(t.ranks_per_node) == 2 and len(t.table) == 5
    assert res.output.count("# Out of bounds values : 0 OK") == 10
    _check_other_collectives(doc, 2)
    # what auto ran is recorded per size, and the auto-vs-best table is built from it
    picks = [s["auto_pick"] for s in ar["sizes"]]
    assert all(p in ("native", "shm") for p in picks), picks
    from collective.bench.tables import auto_markdown

    table = auto_markdown(doc).splitlines()
    assert table[0].startswith("| size | auto ran |") and len(table) == 2 + len(ar["sizes"])
    assert all(f"| {p} |" in row for p, row in zip(picks, table[2:]))


def _check_other_collectives(doc: dict, P: int) -> None:
    """alltoall ... sendrecv: nccl-tests' factors, the bare MPI (and gloo) columns ran, the library's ran or say why."""
    more = {c["collective"]: c for c in doc["collectives"][5:]}
    assert list(more) == list(ALL_TEN[5:])
    for name, c in more.items():
        assert c["busbw_factor"] == pytest.approx(1.0 if name == "sendrecv" else (P - 1) / P), name
        assert c["wrong"] == 0
        want = ["native"] + (["gloo"] if HAVE_TORCH and name != "sendrecv" else [])
        for s in c["sizes"]:
            for col in want:
                assert s["results"][col]["out_of_place"]["wrong"] == 0, (name, s["size"], col)
            for col, m in s["results"].items():
                assert m or any(n.startswith(f"{col} out-of-place: n/a (") for n in c["notes"]), (name, col, c["notes"])


@pytest.mark.mpi
def test_mpi_p2_explain() -> None:
    """--explain measures nothing: the cost model's prediction per algorithm and size, its choice, auto's pick."""
    res = mpirun("bench_job.py", 2, ["--explain", "-b", "4K", "-e", "4M", "-f", "32", "--collective",
                                     "allreduce,broadcast"], timeout=120)
    check(res, "collective-bench --explain at P=2")
    out = res.output
    assert out.count("<- chosen") == 6 and out.count("auto picks now:") == 6, out
    assert "## broadcast, 4194304 B" in out and "pipeline" in out and "Out of bounds" not in out


@pytest.mark.mpi
def test_mpi_p3_broken_algorithm_exits_non_zero(tmp_path: Path) -> None:
    """A wrong result shows as #wrong > 0 in its column only, and the job exits non-zero."""
    j = tmp_path / "p3.json"
    res = mpirun("bench_job.py", 3, ["-b", "1000", "-e", "4000", "-f", "4", "-n", "2", "-w", "0", "-a",
                                     "native,native-lib,ring,tree,pairwise,broken,gloo" if HAVE_TORCH else
                                     "native,native-lib,ring,tree,pairwise,broken", "-r", "1", "--collective",
                                     ",".join(c for c in ALL_TEN if c != "broadcast"), "-J", str(j)],
                 timeout=240, env={BROKEN_ENV: "1"})
    assert not res.timed_out and res.returncode != 0, res.output[-3000:]
    assert "FAILED" in res.output
    doc = json.loads(j.read_text())
    assert not doc["ok"]
    for c in doc["collectives"]:
        assert c["sizes"] and all("broken" in s["results"] and s["results"]["broken"] for s in c["sizes"])
        for s in c["sizes"]:
            for col, modes in s["results"].items():
                for m, r in modes.items():
                    assert (r["wrong"] > 0) == (col == "broken"), (c["collective"], s["size"], col, m, r["wrong"])
    rs = doc["collectives"][2]["sizes"][0]
    assert rs["size"] == 996 and rs["count"] == 249  # rounded down to a multiple of P elements
    by = {c["collective"]: c for c in doc["collectives"]}
    assert by["gather"]["root"] == 1 and by["scatter"]["root"] == 1 and by["alltoall"]["root"] == -1
    assert by["alltoall"]["sizes"][0]["count"] == 249 and by["allgatherv"]["sizes"][0]["count"] == 250
    assert "ring: not an algorithm of alltoall; absent" in by["alltoall"]["notes"]
    assert by["sendrecv"]["busbw_factor"] == 1.0 and by["gather"]["busbw_factor"] == pytest.approx(2 / 3)


def test_run_p1_gloo_dtype_and_pred_hook(capsys, monkeypatch) -> None:
    from collective.bench import core as bench_core

    rc, out, _ = _run(["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-a", "all", "-d", "int16"], capsys)
    assert rc == 0 and "gloo: column absent" in out
    monkeypatch.setattr(bench_core, "predicted_us", lambda alg, coll, nbytes, cluster=None: nbytes / 1e3)
    rc, out, _ = _run(["-b", "2K", "-e", "2K", "-n", "1", "-w", "0", "-a", "native,ring", "--wide"], capsys)
    assert rc == 0
    assert [ln for ln in out.splitlines() if "#wrong" in ln][0].count("pred") == 2
    row = next(ln for ln in out.splitlines() if ln and not ln.startswith("#"))
    assert row.count(" 2.05 ") == 2  # 2048 B -> 2.05 us predicted, in both groups
