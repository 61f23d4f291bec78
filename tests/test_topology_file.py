"""The topology file (COLLECTIVE_TOPOLOGY): its format, every validation error, and how init() and explain use it."""
from __future__ import annotations

import json

import pytest

from collective.topologies.cluster import Cluster, LinkCost, TopologyFileError, load_topology, parse_topology
from collective.topologies.cost import SharedLinkCost, choose, explain, links, predict

LINKS = {"intra": {"alpha_us": 7, "GBps": 2.5, "node_GBps": 4}, "inter": {"alpha_us": 80, "GBps": 0.4},
         "reduce_GBps": 5}


def test_nodes_and_node_of_rank_say_the_same() -> None:
    a = parse_topology('{"nodes": [[0, 1], [2, 3]]}', nranks=4)
    b = parse_topology('{"node_of_rank": [0, 0, 1, 1]}', nranks=4)
    assert a.node_of_rank == b.node_of_rank == (0, 0, 1, 1) and a.nnodes == 2
    assert not a.links_declared and a.intra is None and a.inter is None and a.gamma is None


def test_nodes_are_renumbered_by_lowest_rank() -> None:
    assert parse_topology('{"nodes": [[3, 1], [2, 0]]}').node_of_rank == (0, 1, 0, 1)
    assert parse_topology('{"node_of_rank": ["hostB", "hostA", "hostB"]}').node_of_rank == (0, 1, 0)
    assert parse_topology('{"node_of_rank": [7, 7, 2, 9]}').node_of_rank == (0, 0, 1, 2)


def test_links_in_the_units_explain_prints() -> None:
    cl = parse_topology(json.dumps({"nodes": [[0, 1], [2, 3]], "links": LINKS}), "topo.json", nranks=4)
    assert cl.links_declared and cl.source == "topo.json"
    assert isinstance(cl.intra, SharedLinkCost)
    assert cl.intra.alpha == pytest.approx(7e-6) and cl.intra.beta == pytest.approx(1 / 2.5e9)
    assert cl.intra.shared_beta == pytest.approx(1 / 4e9)
    assert cl.inter == LinkCost(pytest.approx(80e-6), pytest.approx(1 / 0.4e9))
    assert cl.gamma == pytest.approx(1 / 5e9)
    text = explain(choose("allreduce", 1 << 20, cl), cl)
    assert "links from topo.json:" in text
    assert "intra alpha 7.0 us, 2.50 GB/s; inter alpha 80.0 us, 0.40 GB/s; reduce 5.00 GB/s" in text
    # The declared links are what the model prices with.
    calibrated = Cluster((0, 0, 1, 1), intra=cl.intra, inter=cl.inter, gamma=cl.gamma)
    assert predict("allreduce", 1 << 20, cl, "hierarchical") == predict("allreduce", 1 << 20, calibrated,
                                                                        "hierarchical")


def test_optional_link_fields() -> None:
    # One node: inter is not needed; no reduce rate means the documented default; no node_GBps means no node limit.
    cl = parse_topology('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 0, "GBps": 3}}}')
    assert cl.inter is None and cl.gamma is None and cl.intra.shared_beta == 0.0 and cl.intra.alpha == 0.0
    from collective.topologies.cost import DEFAULT_GAMMA
    assert links(cl)[2] == DEFAULT_GAMMA
    # One rank per node: intra is not needed.
    cl = parse_topology('{"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 9, "GBps": 1}}}')
    assert cl.intra is None and cl.inter.alpha == pytest.approx(9e-6)


def _bad(doc: object) -> str:
    return json.dumps(doc) if not isinstance(doc, str) else doc


@pytest.mark.parametrize(
    "doc, match",
    [
        ("{nodes: 1}", "not valid JSON"),
        ('{"nodes": [[0, 1]], "nodes": [[0, 1]]}', "'nodes' appears twice"),
        ('{"nodes": [[0], [1]], "links": {"inter": {"alpha_us": NaN, "GBps": 1}}}', "NaN is not allowed"),
        ([[0, 1]], "expected a JSON object"),
        ({}, "exactly one of the fields 'nodes'"),
        ({"nodes": [[0, 1]], "node_of_rank": [0, 0]}, "exactly one of the fields 'nodes'"),
        ({"nodes": [[0, 1]], "hosts": 2}, "unknown field 'hosts'; the fields are nodes, node_of_rank, links"),
        ({"nodes": []}, "field 'nodes': expected a non-empty list"),
        ({"nodes": [[0, 1], []]}, r"field 'nodes\[1\]': expected a non-empty list of ranks"),
        ({"nodes": [[0, 1], 2]}, r"field 'nodes\[1\]'"),
        ({"nodes": [[0, -1]]}, r"field 'nodes\[0\]': expected a rank \(an integer from 0 to 2147483647\), got -1"),
        ({"nodes": [[0, 1.5]]}, r"field 'nodes\[0\]': expected a rank"),
        ({"nodes": [[0, True]]}, r"field 'nodes\[0\]': expected a rank"),
        ({"nodes": [[0, 1], [1, 2]]}, r"rank 1 is listed twice \(nodes\[0\] and nodes\[1\]\)"),
        ({"nodes": [[0, 1], [3]]}, "rank 2 is not listed"),
        ({"node_of_rank": 4}, "field 'node_of_rank': expected a non-empty list"),
        ({"node_of_rank": [0, None]}, r"field 'node_of_rank\[1\]': expected a node label"),
        ({"node_of_rank": [0, -2]}, r"field 'node_of_rank\[1\]'"),
        ({"nodes": [[0], [1]], "links": [1]}, "field 'links': expected a JSON object"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 1, "GBps": 1}, "gamma": 1}},
         "unknown field 'links.gamma'; the fields are intra, inter, reduce_GBps"),
        ({"nodes": [[0, 1], [2]], "links": {"inter": {"alpha_us": 1, "GBps": 1}}},
         "lacks 'intra', needed because a node has two ranks or more"),
        ({"nodes": [[0], [1]], "links": {"intra": {"alpha_us": 1, "GBps": 1}}},
         "lacks 'inter', needed because there are 2 nodes"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 1}}}, "field 'links.inter' lacks 'GBps'"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 1, "gbps": 1}}}, "unknown field 'links.inter.gbps'"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 1, "GBps": 1, "node_GBps": 2}}},
         "unknown field 'links.inter.node_GBps'"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": -1, "GBps": 1}}},
         r"field 'links.inter.alpha_us': expected a number >= 0 and <= 1e\+06, got -1"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 1, "GBps": 0}}},
         r"field 'links.inter.GBps': expected a number >= 1e-06 and <= 1e\+06, got 0"),
        ({"nodes": [[0], [1]], "links": {"inter": {"alpha_us": 1, "GBps": "fast"}}}, "links.inter.GBps"),
        ({"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 1, "GBps": 1, "node_GBps": 0}}},
         "links.intra.node_GBps"),
        ({"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 1, "GBps": 1}, "reduce_GBps": -3}},
         "links.reduce_GBps"),
    ],
)
def test_bad_files_name_the_file_and_field(doc: object, match: str) -> None:
    with pytest.raises(TopologyFileError, match=match) as info:
        parse_topology(_bad(doc), "COLLECTIVE_TOPOLOGY=/x/topo.json")
    assert str(info.value).startswith("COLLECTIVE_TOPOLOGY=/x/topo.json: ")


def test_rank_count_must_match_the_job() -> None:
    with pytest.raises(TopologyFileError, match="'nodes' describes 4 ranks, but this job has 8"):
        parse_topology('{"nodes": [[0, 1], [2, 3]]}', nranks=8)
    with pytest.raises(TopologyFileError, match="'node_of_rank' describes 3 ranks, but this job has 2"):
        parse_topology('{"node_of_rank": [0, 0, 1]}', nranks=2)
    assert parse_topology('{"node_of_rank": [0, 0, 1]}', nranks=3).nnodes == 2


def test_load_from_a_file(tmp_path) -> None:
    p = tmp_path / "topo.json"
    p.write_text(json.dumps({"nodes": [[0, 1], [2, 3]], "links": LINKS}))
    cl = load_topology(str(p), nranks=4)
    assert cl.source == f"COLLECTIVE_TOPOLOGY={p}" and cl.links_declared and cl.nnodes == 2
    with pytest.raises(TopologyFileError, match=f"COLLECTIVE_TOPOLOGY={tmp_path}/missing.json: cannot read"):
        load_topology(str(tmp_path / "missing.json"))
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(TopologyFileError, match="not UTF-8"):
        load_topology(str(p))


# -- init() at P=1, in this process ----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("COLLECTIVE_TOPOLOGY", "COLLECTIVE_NODE_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_init_uses_the_file_and_skips_calibration(clean_env: pytest.MonkeyPatch, tmp_path) -> None:
    import collective as col

    p = tmp_path / "topo.json"
    p.write_text(json.dumps({"nodes": [[0]], "links": {"intra": {"alpha_us": 3, "GBps": 1.5}, "reduce_GBps": 2}}))
    clean_env.setenv("COLLECTIVE_TOPOLOGY", str(p))
    comm = col.Communicator()
    try:
        assert comm.cluster.source == f"COLLECTIVE_TOPOLOGY={p}" and comm.cluster.links_declared
        assert comm.cluster.gamma == pytest.approx(0.5e-9)  # declared, not measured
        assert f"links from COLLECTIVE_TOPOLOGY={p}:" in comm.explain("allreduce", 4096)
    finally:
        comm.close()


@pytest.mark.parametrize(
    "doc, env, match",
    [
        ({"nodes": [[0], [1]]}, {}, "'nodes' describes 2 ranks, but this job has 1"),
        ({"nodes": [[0]]}, {"COLLECTIVE_NODE_SIZE": "2"}, "both COLLECTIVE_TOPOLOGY=.* and COLLECTIVE_NODE_SIZE=2"),
        (None, {}, r"\(read by rank 0\): cannot read the file"),
        ("[1, 2", {}, "not valid JSON"),
    ],
)
def test_init_refuses_a_bad_file(clean_env: pytest.MonkeyPatch, tmp_path, doc: object, env: dict, match: str) -> None:
    import collective as col

    p = tmp_path / "topo.json"
    if doc is not None:
        p.write_text(_bad(doc))
    clean_env.setenv("COLLECTIVE_TOPOLOGY", str(p))
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(col.CollectiveValueError, match=match) as info:
        col.Communicator()
    assert "init on rank 0 of 1" in str(info.value)


@pytest.mark.parametrize("text, words", [
    ('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": ' + "9" * 400 + ', "GBps": 1}}}',
     "links.intra.alpha_us"),
    ('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 1e308, "GBps": 1}}}', "links.intra.alpha_us"),
    ('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 5, "GBps": 5e-324}}}', "links.intra.GBps"),
    ('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 5, "GBps": 1e300}}}', "links.intra.GBps"),
    ('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 5, "GBps": 1, "node_GBps": 1e-300}}}',
     "links.intra.node_GBps"),
    ('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 5, "GBps": 1}, "reduce_GBps": 5e-324}}',
     "links.reduce_GBps"),
    ('{"nodes": [[0, ' + "1" * 400 + ']]}', "nodes[0]"),
    ('{"node_of_rank": [0, ' + "7" * 400 + ']}', "node_of_rank[1]"),
    ('{"nodes": [[0, ' + "1" * 5000 + ']]}', "digits"),
    ('{"nodes": ' + "[" * 100000 + "]" * 100000 + '}', "nested too deeply"),
])
def test_absurd_and_hostile_files_get_the_library_error(text: str, words: str, tmp_path) -> None:
    p = tmp_path / "topo.json"
    p.write_text(text)
    with pytest.raises(TopologyFileError) as ei:
        load_topology(str(p), nranks=2)
    assert str(p) in str(ei.value) and words in str(ei.value)
    assert len(str(ei.value)) < 400  # a 400-digit value is quoted cut short


def test_non_utf8_file_names_the_file(tmp_path) -> None:
    p = tmp_path / "topo.json"
    p.write_bytes(b'{"nodes": [[0, 1]], "x": "\xff\xfe"}')
    with pytest.raises(TopologyFileError, match=f"{p}.*not UTF-8"):
        load_topology(str(p), nranks=2)


def test_link_ranges_accept_real_values() -> None:
    cl = parse_topology('{"nodes": [[0, 1]], "links": {"intra": {"alpha_us": 0, "GBps": 0.001}, '
                        '"reduce_GBps": 100000}}')
    assert cl.intra.alpha == 0 and cl.intra.beta == pytest.approx(1e-6)
