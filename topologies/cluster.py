"""The physical layout of a job: which ranks share a node, and the link costs between them; the topology file format."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Cluster", "LinkCost", "SharedLinkCost", "TopologyFileError", "TOPOLOGY_ENV", "parse_topology", "load_topology",
]

#: The environment variable naming a topology file (see :func:`parse_topology`).
TOPOLOGY_ENV = "COLLECTIVE_TOPOLOGY"


@dataclass(frozen=True)
class LinkCost:
    """Alpha-beta cost of one kind of link: ``alpha + nbytes * beta`` seconds per message.

    Attributes:
        alpha: latency per message, seconds.
        beta: inverse bandwidth, seconds per byte.
    """

    alpha: float
    beta: float


@dataclass(frozen=True)
class SharedLinkCost(LinkCost):
    """An intra-node LinkCost that also knows what the node's transfers share.

    Attributes:
        shared_beta: seconds per byte of the node as a whole: every transfer
            inside the node at the same time queues for it (the cores, when
            ranks outnumber them, and memory bandwidth). 0 means no limit
            beyond each rank's own ``beta``.
    """

    shared_beta: float = 0.0


@dataclass(frozen=True)
class Cluster:
    """Which node each rank sits on, plus measured link costs once calibrated.

    Attributes:
        node_of_rank: node index of each rank; nodes are numbered by their
            lowest rank, so node 0 holds rank 0.
        intra: cost of a link inside a node (None until calibrated).
        inter: cost of a link between nodes (None until calibrated).
        gamma: seconds per byte to reduce two buffers locally (None until calibrated).
        source: where the layout (and the links) came from, for messages.
        links_declared: the link costs come from a topology file, so they are
            not measured (``collective.calibrate`` leaves them alone).
    """

    node_of_rank: tuple[int, ...]
    intra: LinkCost | None = None
    inter: LinkCost | None = None
    gamma: float | None = None
    source: str = field(default="mpi", compare=False)
    links_declared: bool = field(default=False, compare=False)

    @property
    def size(self) -> int:
        """Number of ranks."""
        return len(self.node_of_rank)

    @property
    def nnodes(self) -> int:
        """Number of nodes."""
        return len(set(self.node_of_rank))

    def ranks_of_node(self, node: int) -> tuple[int, ...]:
        """The ranks on ``node``, ascending."""
        return tuple(r for r, n in enumerate(self.node_of_rank) if n == node)

    @classmethod
    def from_node_size(cls, size: int, node_size: int) -> Cluster:
        """Fake nodes of ``node_size`` consecutive ranks (what COLLECTIVE_NODE_SIZE asks for)."""
        if node_size < 1:
            raise ValueError(f"node size must be >= 1, got {node_size}")
        return cls(tuple(r // node_size for r in range(size)), source=f"COLLECTIVE_NODE_SIZE={node_size}")


# -- the topology file ------------------------------------------------------------------------------------------------
#
# A small JSON object (no pickle, nothing executable). Exactly one of
#
#   "nodes":        [[0, 1], [2, 3]]     each node's ranks; every rank 0..P-1 exactly once
#   "node_of_rank": [0, 0, 1, 1]         one label per rank (integers >= 0 or strings, e.g. host names)
#
# and, optionally, the link costs, which then replace calibration at init():
#
#   "links": {"intra": {"alpha_us": 10, "GBps": 3.0, "node_GBps": 6.0},
#             "inter": {"alpha_us": 50, "GBps": 1.1},
#             "reduce_GBps": 3.0}
#
# alpha_us is a message's latency in microseconds (>= 0); GBps a link's bandwidth in 10^9 bytes per
# second (> 0), the units comm.explain prints. node_GBps (intra only, optional) is what all transfers
# inside one node share (SharedLinkCost.shared_beta); reduce_GBps (optional) the local reduction rate,
# topologies.cost.DEFAULT_GAMMA when absent. "intra" is required when some node has two ranks or more,
# "inter" when there are two nodes or more. Unknown keys are errors, so a misspelt key never goes unseen.

_TOP_KEYS = ("nodes", "node_of_rank", "links")
_LINKS_KEYS = ("intra", "inter", "reduce_GBps")
_LINK_KEYS = {"intra": ("alpha_us", "GBps", "node_GBps"), "inter": ("alpha_us", "GBps")}


class TopologyFileError(ValueError):
    """A topology file is unreadable or malformed, or does not fit the job; the message names the file and field."""


def _fail(where: str, fieldname: str, expected: str, got: Any) -> TopologyFileError:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return TopologyFileError(f"{where}: field {fieldname!r}: expected {expected}, got {shown}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"field {k!r} appears twice in one object")
        d[k] = v
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed: numbers must be finite")


def _check_keys(where: str, fieldname: str, obj: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    top = fieldname == ""
    if not isinstance(obj, dict):
        if top:
            raise TopologyFileError(f"{where}: expected a JSON object ({{...}}) at the top, got {type(obj).__name__}")
        raise _fail(where, fieldname, "a JSON object", obj)
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        prefix = "" if top else f"{fieldname}."
        raise TopologyFileError(f"{where}: unknown field {prefix + unknown[0]!r}; the fields are {', '.join(allowed)}")
    return obj


#: Plausible ranges of the link fields. Outside them a value is a typo or a damaged file, and would make the
#: cost model's arithmetic overflow (a bandwidth of 5e-324 GB/s is an infinite time per byte).
ALPHA_US_RANGE = (0.0, 1e6)       # up to a second per message
GBPS_RANGE = (1e-6, 1e6)          # 1 kB/s to 1 PB/s
#: Ranks and node labels beyond this are not a real job's (an MPI rank is a C int).
MAX_RANK = (1 << 31) - 1


def _number(where: str, fieldname: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    expected = f"a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(where, fieldname, expected, v)
    try:
        f = float(v)  # a 400-digit integer overflows here
    except OverflowError:
        raise _fail(where, fieldname, expected, v) from None
    if not math.isfinite(f) or not (f > lo if lo_open else f >= lo) or f > hi:
        raise _fail(where, fieldname, expected, v)
    return f


def _rank(where: str, fieldname: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_RANK:
        raise _fail(where, fieldname, f"a rank (an integer from 0 to {MAX_RANK})", v)
    return v


def _layout(where: str, d: dict[str, Any], nranks: int | None) -> tuple[int, ...]:
    """node_of_rank from "nodes" or "node_of_rank", nodes renumbered by their lowest rank."""
    if ("nodes" in d) == ("node_of_rank" in d):
        raise TopologyFileError(f"{where}: give exactly one of the fields 'nodes' (each node's ranks) and "
                                "'node_of_rank' (one node label per rank)")
    if "nodes" in d:
        nodes = d["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise _fail(where, "nodes", "a non-empty list of lists of ranks", nodes)
        owner: dict[int, int] = {}
        for i, ranks in enumerate(nodes):
            if not isinstance(ranks, list) or not ranks:
                raise _fail(where, f"nodes[{i}]", "a non-empty list of ranks", ranks)
            for r in ranks:
                r = _rank(where, f"nodes[{i}]", r)
                if r in owner:
                    raise TopologyFileError(f"{where}: field 'nodes': rank {r} is listed twice "
                                            f"(nodes[{owner[r]}] and nodes[{i}])")
                owner[r] = i
        P = len(owner)
        missing = sorted(set(range(P)) - set(owner))
        if missing:
            raise TopologyFileError(f"{where}: field 'nodes': ranks must be 0..{P - 1} with none missing; "
                                    f"rank {missing[0]} is not listed (the largest listed is {max(owner)})")
        labels: list[Any] = [owner[r] for r in range(P)]
    else:
        labels = d["node_of_rank"]
        if not isinstance(labels, list) or not labels:
            raise _fail(where, "node_of_rank", "a non-empty list with one node label per rank", labels)
        for r, lab in enumerate(labels):
            if isinstance(lab, bool) or not (isinstance(lab, str) or (isinstance(lab, int) and 0 <= lab <= MAX_RANK)):
                raise _fail(where, f"node_of_rank[{r}]", f"a node label (an integer from 0 to {MAX_RANK}, or a "
                            "string)", lab)
    key = "nodes" if "nodes" in d else "node_of_rank"
    if nranks is not None and len(labels) != nranks:
        raise TopologyFileError(f"{where}: field {key!r} describes {len(labels)} ranks, but this job has {nranks}; "
                                "write the file for this job's size (or unset the variable)")
    first: dict[Any, int] = {}
    return tuple(first.setdefault(lab, len(first)) for lab in labels)


def _link(where: str, kind: str, obj: Any) -> LinkCost:
    fieldname = f"links.{kind}"
    obj = _check_keys(where, fieldname, obj, _LINK_KEYS[kind])
    for k in ("alpha_us", "GBps"):
        if k not in obj:
            raise TopologyFileError(f"{where}: field {fieldname!r} lacks {k!r} (the fields are "
                                    f"{', '.join(_LINK_KEYS[kind])})")
    alpha = _number(where, f"{fieldname}.alpha_us", obj["alpha_us"], *ALPHA_US_RANGE) * 1e-6
    beta = 1e-9 / _number(where, f"{fieldname}.GBps", obj["GBps"], *GBPS_RANGE)
    if kind == "intra":
        shared = 0.0
        if "node_GBps" in obj:
            shared = 1e-9 / _number(where, f"{fieldname}.node_GBps", obj["node_GBps"], *GBPS_RANGE)
        return SharedLinkCost(alpha, beta, shared)
    return LinkCost(alpha, beta)


def parse_topology(text: str | bytes, where: str = TOPOLOGY_ENV, nranks: int | None = None) -> Cluster:
    """The Cluster a topology file describes (see the format above), checked field by field.

    Args:
        text: the file's contents (JSON).
        where: what to call the file in messages, e.g. ``"COLLECTIVE_TOPOLOGY=/etc/topo.json"``.
        nranks: the job's number of ranks; the layout must describe exactly that many (None: not checked).

    Returns:
        A Cluster whose ``source`` is ``where``; with ``links`` given, its
        ``intra``/``inter``/``gamma`` are set and ``links_declared`` is True.

    Raises:
        TopologyFileError: the text is not JSON, a field is missing, unknown or
            out of range, or the layout does not have ``nranks`` ranks; the
            message names ``where``, the field and what was expected.

    Example::

        cl = parse_topology('{"nodes": [[0, 1], [2, 3]]}', nranks=4)
        cl.node_of_rank, cl.nnodes     # (0, 0, 1, 1), 2
        parse_topology('{"node_of_rank": ["a", "a", "b"], "links": {"intra": {"alpha_us": 5, "GBps": 8}, '
                       '"inter": {"alpha_us": 40, "GBps": 1.2}}}').inter   # LinkCost(4e-05, 8.3e-10)
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TopologyFileError(f"{where}: not UTF-8 text ({exc})") from None
    try:
        d = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise TopologyFileError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise TopologyFileError(f"{where}: nested too deeply to be a topology file") from None
    except ValueError as exc:  # a duplicate field, NaN/Infinity, an integer of more digits than Python converts
        raise TopologyFileError(f"{where}: {exc}") from None
    d = _check_keys(where, "", d, _TOP_KEYS)
    node_of_rank = _layout(where, d, nranks)
    if "links" not in d:
        return Cluster(node_of_rank, source=where)
    links = _check_keys(where, "links", d["links"], _LINKS_KEYS)
    cl = Cluster(node_of_rank)
    needed = []
    if any(len(cl.ranks_of_node(m)) > 1 for m in range(cl.nnodes)):
        needed.append(("intra", "a node has two ranks or more"))
    if cl.nnodes > 1:
        needed.append(("inter", f"there are {cl.nnodes} nodes"))
    for kind, why in needed:
        if kind not in links:
            raise TopologyFileError(f"{where}: field 'links' lacks {kind!r}, needed because {why}")
    intra = _link(where, "intra", links["intra"]) if "intra" in links else None
    inter = _link(where, "inter", links["inter"]) if "inter" in links else None
    gamma = None
    if "reduce_GBps" in links:
        gamma = 1e-9 / _number(where, "links.reduce_GBps", links["reduce_GBps"], *GBPS_RANGE)
    return Cluster(node_of_rank, intra=intra, inter=inter, gamma=gamma, source=where, links_declared=True)


def load_topology(path: str, nranks: int | None = None) -> Cluster:
    """Read and parse the topology file at ``path`` (see :func:`parse_topology`), called ``COLLECTIVE_TOPOLOGY=path``.

    Raises:
        TopologyFileError: the file cannot be read, or :func:`parse_topology` rejects it.

    Example::

        cl = load_topology("topo.json", nranks=4)
    """
    where = f"{TOPOLOGY_ENV}={path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TopologyFileError(f"{where}: cannot read the file: {exc.strerror or exc}") from None
    return parse_topology(data, where, nranks)
