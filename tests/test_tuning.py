"""Tuning tables (collective/tuning.py): the file format, validation messages, the choice rule, writing, ranges."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from collective.errors import CollectiveValueError
from collective.tuning import Entry, TuningTable, TuningTableError, load_table, ranges_from_best, write_table

GOOD = {
    "version": 1, "nranks": 4, "ranks_per_node": [2, 2], "dtype": "float32", "op": "sum",
    "table": {
        "allreduce": [{"max_bytes": 65536, "algorithm": "native"}, {"max_bytes": 4194304, "algorithm": "ring"},
                      {"max_bytes": None, "algorithm": "star"}],
        "broadcast": [{"max_bytes": 1024, "algorithm": "tree"}],
    },
}


def _write(tmp_path: Path, data: object, name: str = "t.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def test_load_and_choose(tmp_path: Path) -> None:
    t = load_table(_write(tmp_path, GOOD))
    assert t.nranks == 4 and t.ranks_per_node == (2, 2) and t.dtype == "float32" and t.op == "sum"
    assert t.choose("allreduce", 0, 4) == "native"
    assert t.choose("allreduce", 65536, 4) == "native"  # max_bytes is inclusive
    assert t.choose("allreduce", 65537, 4) == "ring"
    assert t.choose("allreduce", 4194304, 4) == "ring"
    assert t.choose("allreduce", 1 << 40, 4) == "star"  # null = no upper bound
    assert t.choose("broadcast", 1024, 4) == "tree"
    assert t.choose("broadcast", 1025, 4) is None  # past the last bound: no say
    assert t.choose("reduce", 10, 4) is None  # collective absent
    assert t.choose("allreduce", 10, 2) is None  # measured for another P
    assert t.choose("allreduce", 10, 4, ranks_per_node=[4]) is None  # another layout
    assert t.choose("allreduce", 10, 4, ranks_per_node=(2, 2)) == "native"


def test_write_round_trip_and_atomic(tmp_path: Path) -> None:
    p = tmp_path / "w.json"
    t = write_table(p, 2, [2], {"allreduce": [Entry(4096, "native"), {"max_bytes": None, "algorithm": "ring"}]},
                    dtype="float16", op="avg")
    assert load_table(p) == t
    data = json.loads(p.read_text())
    assert data == {"version": 1, "nranks": 2, "ranks_per_node": [2], "dtype": "float16", "op": "avg",
                    "table": {"allreduce": [{"max_bytes": 4096, "algorithm": "native"},
                                            {"max_bytes": None, "algorithm": "ring"}]}}
    assert [q.name for q in tmp_path.iterdir()] == ["w.json"]  # no temporary left behind
    assert TuningTable.from_json(t.to_json()) == t


def test_write_refuses_bad_tables_and_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    with pytest.raises(TuningTableError, match="not a concrete algorithm"):
        write_table(p, 2, [2], {"allreduce": [Entry(None, "auto")]})
    with pytest.raises(TuningTableError, match="sums to 3"):
        write_table(p, 2, [3], {"allreduce": [Entry(None, "ring")]})
    assert not p.exists()


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(version=2), "'version'"),
    (lambda d: d.update(version=True), "'version'"),
    (lambda d: d.pop("nranks"), "lacks 'nranks'"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(nranks=0), "'nranks'"),
    (lambda d: d.update(nranks="4"), "'nranks'"),
    (lambda d: d.update(ranks_per_node=[]), "'ranks_per_node'"),
    (lambda d: d.update(ranks_per_node=[4, 0]), "'ranks_per_node'"),
    (lambda d: d.update(ranks_per_node=[3]), "sums to 3"),
    (lambda d: d.update(dtype=""), "'dtype'"),
    (lambda d: d.update(op=None), "'op'"),
    (lambda d: d.update(table=[]), "'table'"),
    (lambda d: d["table"].update(gather=[{"max_bytes": None, "algorithm": "ring"}]), "'gather'"),
    (lambda d: d["table"].update(reduce=[]), "non-empty list"),
    (lambda d: d["table"]["allreduce"].insert(0, {"max_bytes": 1}), "exactly 'max_bytes' and 'algorithm'"),
    (lambda d: d["table"]["allreduce"][0].update(max_bytes=-1), "max_bytes must be"),
    (lambda d: d["table"]["allreduce"][0].update(max_bytes="64K"), "max_bytes must be"),
    (lambda d: d["table"]["allreduce"][0].update(max_bytes=1.5), "max_bytes must be"),
    (lambda d: d["table"]["allreduce"][0].update(algorithm=""), "algorithm must be"),
    (lambda d: d["table"]["allreduce"][0].update(algorithm="gloo"), "not a concrete algorithm"),
    (lambda d: d["table"]["allreduce"][0].update(algorithm="memcpy"), "not a concrete algorithm"),
    (lambda d: d["table"]["allreduce"][1].update(max_bytes=65536), "sort entries"),
    (lambda d: d["table"]["allreduce"].append({"max_bytes": 1 << 30, "algorithm": "ring"}), "null must come last"),
])
def test_validation_names_file_and_field(tmp_path: Path, mutate, words: str) -> None:
    d = json.loads(json.dumps(GOOD))
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(TuningTableError) as ei:
        load_table(p)
    msg = str(ei.value)
    assert words in msg and str(p) in msg and "collective-bench --tune" in msg
    assert isinstance(ei.value, CollectiveValueError)


def test_unreadable_and_not_json(tmp_path: Path) -> None:
    with pytest.raises(TuningTableError, match="cannot read"):
        load_table(tmp_path / "missing.json")
    with pytest.raises(TuningTableError, match=r"not valid JSON \(line 1"):
        load_table(_write(tmp_path, "{nope"))
    with pytest.raises(TuningTableError, match="JSON object"):
        load_table(_write(tmp_path, [1, 2]))


def test_known_algorithms(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    assert load_table(p, known_algorithms=["native", "ring", "tree", "star"]).choose("allreduce", 1, 4) == "native"
    with pytest.raises(TuningTableError, match="'star' is not known here"):
        load_table(p, known_algorithms=["native", "ring", "tree"])


def test_ranges_from_best() -> None:
    assert ranges_from_best([]) == []
    assert ranges_from_best([(4096, "ring")]) == [Entry(None, "ring")]
    best = [(1 << 20, "ring"), (4096, "native"), (65536, "native"), (1 << 22, "ring"), (1 << 24, "tree")]
    assert ranges_from_best(best) == [Entry(65536, "native"), Entry(1 << 22, "ring"), Entry(None, "tree")]
    assert ranges_from_best([(10, "a"), (10, "b"), (20, "b")]) == [Entry(10, "a"), Entry(None, "b")]  # first per size
    # Alternating winners keep every boundary; the result is always a valid table.
    alt = ranges_from_best([(1, "ring"), (2, "tree"), (4, "ring")])
    assert alt == [Entry(1, "ring"), Entry(2, "tree"), Entry(None, "ring")]
    t = TuningTable.from_json({"version": 1, "nranks": 1, "ranks_per_node": [1], "dtype": "float32", "op": "sum",
                               "table": {"allreduce": [e.to_json() for e in alt]}})
    assert [t.choose("allreduce", n, 1) for n in (0, 1, 2, 3, 100)] == ["ring", "ring", "tree", "ring", "ring"]


def _good() -> dict:
    return {"version": 1, "nranks": 2, "ranks_per_node": [2], "dtype": "float32", "op": "sum",
            "table": {"allreduce": [{"max_bytes": 65536, "algorithm": "native"}, {"max_bytes": None,
                                                                                 "algorithm": "ring"}]}}


@pytest.mark.parametrize("text, words", [
    (json.dumps(_good()).replace('"nranks": 2', '"nranks": ' + "9" * 400), "'nranks'"),
    (json.dumps(_good()).replace('"max_bytes": 65536', '"max_bytes": ' + "9" * 400), "max_bytes"),
    (json.dumps(_good()).replace('"max_bytes": 65536', '"max_bytes": ' + "9" * 5000), "digits"),
    (json.dumps(_good()).replace('"max_bytes": 65536', '"max_bytes": NaN'), "NaN"),
    (json.dumps(_good()).replace('"ranks_per_node": [2]', '"ranks_per_node": [1, ' + "1" * 30 + "]"),
     "ranks_per_node"),
    ('{"table": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_hostile_files_get_the_library_error(tmp_path: Path, text: str, words: str) -> None:
    p = tmp_path / "t.json"
    p.write_text(text)
    with pytest.raises(TuningTableError) as ei:
        load_table(p)
    assert str(p) in str(ei.value) and words in str(ei.value)
    assert len(str(ei.value)) < 400


def test_non_utf8_table_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_bytes(json.dumps(_good()).encode().replace(b'"sum"', b'"s\xffm"'))
    with pytest.raises(TuningTableError, match=f"{p}.*not UTF-8"):
        load_table(p)
