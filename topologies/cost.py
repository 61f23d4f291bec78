"""Alpha-beta-gamma cost of any Schedule on a cluster's links, computed from its own steps; the choice for "auto"."""

# Terms (the names below follow them):
#
#   alpha  -- latency of one message on a link kind, seconds (per step, it is
#             paid once: a step's messages are posted together).
#   beta   -- inverse bandwidth of a link kind, seconds per byte.
#   gamma  -- seconds per byte to reduce an incoming buffer into the local one;
#             also what a local copy (Step.copies) costs per byte: both stream
#             the bytes through memory once.
#   kind   -- "intra" when both ranks of a message sit on one node, else "inter".
#   port   -- what a message occupies while its bytes move: the sending rank's
#             out-port and the receiving rank's in-port (each rank moves one
#             message's bytes at a time); for an inter-node message also its
#             source node's egress and its destination node's ingress (the
#             ranks of a node share its network link), for an intra-node one
#             its node's bus at ``SharedLinkCost.shared_beta`` (the ranks of a
#             node share its cores and memory).
#
# The replay follows the executor: a rank's step starts when its previous step
# has ended; it makes its local copies, then posts its sends. A message starts moving when its
# sender's step has started; each of its ports moves it in bytes * beta after
# what that port already has queued, and it lands alpha after the slowest. A step ends when its own sends have
# left, its receives have landed and at least alpha has passed, plus gamma for
# every byte it reduces (reductions are counted after the transfer: the
# executor overlaps them per segment, so this is an upper bound). Steps post in
# order of their start times, so ports are handed out first come, first served.
# The schedule's time is when its last step ends.
#
# The same replay prices every Schedule, so no algorithm has a hand-written
# formula. "native" (MPI's own collective, not a Schedule) is modelled by the
# schedule of what Open MPI's tuned component runs for it: recursive doubling,
# Rabenseifner's reduce-scatter + allgather, or ring for allreduce, a binomial tree or ring (scatter-allgather) for
# reduce and broadcast, ring or binomial for reduce_scatter and allgather;
# whichever is cheaper, in rank order, on the same links. For the in/out
# collectives: pairwise, Bruck or linear (every message posted at once) for
# alltoall; a binomial tree or linear for gather and scatter; ring or a
# binomial gather + broadcast for allgatherv. Our Schedules pay
# ``EXECUTOR_STEP`` of Python per step on top of the link's alpha; MPI's own
# steps do not.
from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import ALGORITHMS, ALGORITHMS_BY_COLLECTIVE, ALL_COLLECTIVES, build
from .cluster import Cluster, LinkCost
from .cluster import SharedLinkCost as SharedLinkCost  # defined with LinkCost; importable from here too
from .schedule import (
    INPUT,
    OUTPUT,
    Copy,
    Recv,
    Schedule,
    ScheduleError,
    Send,
    Step,
    alltoall_displacements,
    even_blocks,
    even_counts,
)

__all__ = [
    "DEFAULT_INTRA",
    "DEFAULT_INTER",
    "DEFAULT_GAMMA",
    "EXECUTOR_STEP",
    "CANDIDATES",
    "candidates_for",
    "Choice",
    "links",
    "cost",
    "traffic",
    "predict",
    "choose",
    "explain",
    "recursive_doubling_allreduce",
    "rabenseifner_allreduce",
    "linear_alltoall",
    "linear_gather",
    "linear_scatter",
]

#: Link costs used where a Cluster has none (COLLECTIVE_CALIBRATE=0, or no second node to measure): shared
#: memory through MPI on a small machine, as our Python path sees it ...
DEFAULT_INTRA = LinkCost(alpha=10e-6, beta=1 / 3e9)
#: ... and a 10 Gbit/s-class network. Both are rough orders of magnitude, good enough to rank algorithms; a
#: calibration or a topology file replaces them (docs/concepts/cost-model.md).
DEFAULT_INTER = LinkCost(alpha=50e-6, beta=1 / 1.1e9)
#: NumPy's float32 add, streaming both buffers through memory once (collective.calibrate measures it).
DEFAULT_GAMMA = 1 / 3e9
#: Software cost of one step of our executor beyond the link's alpha (posting the requests, waiting, the
#: bookkeeping in Python), set from a small ring allreduce against raw mpi4py Sendrecv on one node.
#: MPI's own collectives do not pay it, which is what makes "native" win small messages (the small-size rows
#: of docs/performance.md).
EXECUTOR_STEP = 8e-6
#: What ``choose`` compares by default for the collectives of ``COLLECTIVES``: every Schedule algorithm, and
#: MPI's own. ``candidates_for(collective)`` gives it for any collective.
CANDIDATES: tuple[str, ...] = ("native", *ALGORITHMS)


def candidates_for(collective: str) -> tuple[str, ...]:
    """"native" and every Schedule algorithm of ``collective`` (``ALGORITHMS_BY_COLLECTIVE``): what ``choose`` compares.

    Example::

        candidates_for("alltoall")   # ("native", "pairwise", "bruck")
    """
    if collective not in ALGORITHMS_BY_COLLECTIVE:
        raise ValueError(f"candidates_for: unknown collective {collective!r}; choose one of {tuple(ALL_COLLECTIVES)}")
    return ("native", *ALGORITHMS_BY_COLLECTIVE[collective])


@dataclass(frozen=True)
class Choice:
    """The cheapest algorithm and every candidate's predicted seconds, cheapest first."""

    collective: str
    nbytes: int
    best: str
    predictions: tuple[tuple[str, float], ...]

    def seconds(self, algorithm: str) -> float:
        """The predicted seconds of ``algorithm`` (KeyError if it was not a candidate)."""
        return dict(self.predictions)[algorithm]


def _shared(link: LinkCost) -> float:
    return getattr(link, "shared_beta", 0.0)


def links(cluster: Cluster) -> tuple[LinkCost, LinkCost, float]:
    """The (intra, inter, gamma) of ``cluster``, with the documented defaults where it is not calibrated."""
    return (cluster.intra or DEFAULT_INTRA, cluster.inter or DEFAULT_INTER,
            DEFAULT_GAMMA if cluster.gamma is None else cluster.gamma)


def cost(sched: Schedule, cluster: Cluster, itemsize: int = 4, overhead: float = 0.0) -> float:
    """Predicted seconds of ``sched`` on ``cluster``'s links, replayed step by step (see the comment at the top).

    Args:
        sched: any Schedule over ``cluster.size`` ranks.
        cluster: which node each rank is on, and the link costs (defaults where None).
        itemsize: bytes per element.
        overhead: seconds of software added to every step of every rank
            (``EXECUTOR_STEP`` for our Python executor; 0 for MPI's own).

    Returns:
        Seconds until the last rank finishes its last step (0.0 for no steps).

    Example::

        cl = Cluster((0, 0, 1, 1))
        cost(build("ring", "allreduce", 4, 1 << 20), cl) > cost(build("hierarchical", "allreduce", 4, 1 << 20,
                                                                        nodes=cl.node_of_rank), cl)
    """
    P = sched.nranks
    if P != cluster.size:
        raise ValueError(f"cost: {sched.algorithm} {sched.collective} has {P} ranks, the cluster {cluster.size}")
    intra, inter, gamma = links(cluster)
    node = cluster.node_of_rank
    free: dict[tuple, float] = {}  # port -> time it is next free
    arrivals: dict[tuple[int, int], list[float]] = {}  # channel -> landing times, in send order
    consumed: dict[tuple[int, int], int] = {}
    ptr = [0] * P
    done = [0.0] * P
    begun = [0.0] * P  # when the current step's copies are done and its sends are posted
    sends_end = [0.0] * P
    heap = [(0.0, r) for r in range(P) if sched.steps[r]]
    heapq.heapify(heap)
    waiting: set[int] = set()

    def ready(r: int) -> bool:
        need: dict[int, int] = {}
        for rv in sched.steps[r][ptr[r]].recvs:
            need[rv.peer] = need.get(rv.peer, 0) + 1
        return all(len(arrivals.get((p, r), ())) - consumed.get((p, r), 0) >= k for p, k in need.items())

    def finish(r: int) -> None:
        step = sched.steps[r][ptr[r]]
        t0 = begun[r]
        end = sends_end[r]
        lat = 0.0
        reduced = 0
        transfers: tuple[Send | Recv, ...] = (*step.sends, *step.recvs)
        for t in transfers:
            lat = max(lat, (intra if node[t.peer] == node[r] else inter).alpha)
        end = max(end, t0 + lat)
        for rv in step.recvs:
            k = consumed.get((rv.peer, r), 0)
            end = max(end, arrivals[(rv.peer, r)][k])
            consumed[(rv.peer, r)] = k + 1
            if rv.reduce:
                reduced += rv.stop - rv.start
        done[r] = end + reduced * itemsize * gamma + overhead
        ptr[r] += 1
        if ptr[r] < len(sched.steps[r]):
            heapq.heappush(heap, (done[r], r))

    while heap:
        t0, r = heapq.heappop(heap)
        step = sched.steps[r][ptr[r]]
        if step.copies:
            t0 += sum(c.stop - c.start for c in step.copies) * itemsize * gamma
        begun[r] = t0
        end = t0
        for s in step.sends:
            q = s.peer
            link = intra if node[q] == node[r] else inter
            nbytes = (s.stop - s.start) * itemsize
            if node[q] != node[r]:  # the nodes' shared links carry it at the inter-node rate
                ports = [(("out", r), link.beta), (("in", q), link.beta),
                         (("egress", node[r]), link.beta), (("ingress", node[q]), link.beta)]
            else:  # the ranks' own rate, and the node's aggregate shared by every transfer inside it
                ports = [(("out", r), link.beta), (("in", q), link.beta), (("bus", node[r]), _shared(link))]
            # Each port is its own queue (a fluid model): the message is through when its slowest
            # port has moved it. Reserving all ports for one interval instead fragments them badly.
            stop = t0
            for p, beta in ports:
                free[p] = max(free.get(p, 0.0), t0) + nbytes * beta
                stop = max(stop, free[p])
            arrivals.setdefault((r, q), []).append(stop + link.alpha)
            end = max(end, stop)
        sends_end[r] = end
        waiting.add(r)
        for w in sorted(waiting):
            if ready(w):
                waiting.discard(w)
                finish(w)
        # A rank finished above may start a step at once whose messages are all in: the heap picks it up.
    if waiting:
        stuck = {r: ptr[r] for r in sorted(waiting)}
        raise ScheduleError(f"{sched.algorithm} {sched.collective}: deadlock while pricing; rank: step = {stuck}")
    return max(done, default=0.0)


def traffic(sched: Schedule, nodes: Sequence[int]) -> dict[tuple[int, int], int]:
    """Elements each ordered pair of distinct nodes sends the other in ``sched``: {(from, to): elements}.

    Example::

        traffic(build("ring", "allreduce", 4, 400), (0, 0, 1, 1))   # {(0, 1): 600, (1, 0): 600}
    """
    out: dict[tuple[int, int], int] = {}
    for r in range(sched.nranks):
        for step in sched.steps[r]:
            for s in step.sends:
                a, b = nodes[r], nodes[s.peer]
                if a != b:
                    out[(a, b)] = out.get((a, b), 0) + s.stop - s.start
    return out


def _fold_in(steps: list[list[Step]], P: int, nelems: int) -> int:
    """Ranks past the largest power of two p send their buffer to rank - p, which reduces it; returns p."""
    p = 1 << (P.bit_length() - 1)
    for r in range(p, P):
        steps[r].append(Step(sends=(Send(r - p, 0, nelems),)))
        steps[r - p].append(Step(recvs=(Recv(r, 0, nelems, reduce=True),)))
    return p


def _fold_out(steps: list[list[Step]], P: int, nelems: int, p: int) -> None:
    """The folded-in ranks get the result back from rank - p."""
    for r in range(p, P):
        steps[r - p].append(Step(sends=(Send(r, 0, nelems),)))
        steps[r].append(Step(recvs=(Recv(r - p, 0, nelems),)))


def recursive_doubling_allreduce(nranks: int, nelems: int) -> Schedule:
    """The schedule of MPI's recursive-doubling allreduce, as a model of ``native`` (never executed).

    Ranks past the largest power of two p first fold into a partner (rank - p),
    the p ranks exchange whole buffers with partners at distance 1, 2, 4, ...
    and reduce, then the folded ranks get the result back. Each exchange sends
    and reduce-receives the same range in one step, which the executor's
    Schedules never do (the simulator rejects it): this one is for pricing only.

    Example::

        cost(recursive_doubling_allreduce(8, 1 << 20), Cluster((0,) * 8))
    """
    P = nranks
    steps: list[list[Step]] = [[] for _ in range(P)]
    if P > 1 and nelems:
        p = _fold_in(steps, P, nelems)
        full = (0, nelems)
        d = 1
        while d < p:
            for r in range(p):
                q = r ^ d
                steps[r].append(Step(sends=(Send(q, *full),), recvs=(Recv(q, *full, reduce=True),)))
            d *= 2
        _fold_out(steps, P, nelems, p)
    return Schedule("allreduce", "recursive-doubling", P, nelems, 0, even_blocks(nelems, P),
                    tuple(tuple(s) for s in steps))


def rabenseifner_allreduce(nranks: int, nelems: int) -> Schedule:
    """The schedule of MPI's reduce-scatter + allgather allreduce (Rabenseifner), as a model of ``native``.

    Open MPI's tuned component runs it for large messages: ranks past the
    largest power of two p fold in first (as in recursive doubling); then a
    reduce-scatter by recursive halving, partners at distance 1, 2, 4, ...
    each time exchanging half of the range still held, and an allgather by
    recursive doubling in the reverse order. With a node's ranks consecutive,
    the close (intra-node) partners move the big halves, so each node sends
    about N bytes across, like ``hierarchical``. For pricing only.

    Example::

        cost(rabenseifner_allreduce(4, 1 << 20), Cluster((0, 0, 1, 1)))
    """
    P = nranks
    steps: list[list[Step]] = [[] for _ in range(P)]
    if P > 1 and nelems:
        p = _fold_in(steps, P, nelems)
        full = (0, nelems)
        held = [full] * p
        history: list[list[tuple[int, tuple[int, int], tuple[int, int]]]] = [[] for _ in range(p)]
        d = 1
        while d < p:
            nxt = list(held)
            for r in range(p):
                q = r ^ d
                lo, hi = held[r]
                mid = (lo + hi) // 2
                keep, give = ((lo, mid), (mid, hi)) if r & d == 0 else ((mid, hi), (lo, mid))
                steps[r].append(Step(sends=(Send(q, *give),), recvs=(Recv(q, *keep, reduce=True),)))
                history[r].append((q, keep, give))
                nxt[r] = keep
            held = nxt
            d *= 2
        for r in range(p):
            for q, keep, give in reversed(history[r]):
                steps[r].append(Step(sends=(Send(q, *keep),), recvs=(Recv(q, *give),)))
        _fold_out(steps, P, nelems, p)
    return Schedule("allreduce", "rabenseifner", P, nelems, 0, even_blocks(nelems, P),
                    tuple(tuple(s) for s in steps))


def linear_alltoall(nranks: int, nelems: int) -> Schedule:
    """MPI's basic linear alltoall, as a model of ``native``: one step posting every send and receive at once.

    Every rank's share of ``nelems`` is cut evenly among the destinations (as
    ``build`` does without ``counts``); its own block is a local copy.

    Example::

        cost(linear_alltoall(8, 8 * 8 * 256), Cluster((0,) * 8))
    """
    P = nranks
    blocks = even_blocks(nelems, P)
    counts = even_counts(blocks)
    send, recv = alltoall_displacements(counts)
    steps = []
    for r in range(P):
        sends = tuple(Send(j, send[r][j], send[r][j + 1], INPUT) for j in range(P) if j != r and counts[r][j])
        recvs = tuple(Recv(i, recv[r][i], recv[r][i + 1], buf=OUTPUT) for i in range(P) if i != r and counts[i][r])
        own = counts[r][r]
        copies = (Copy(INPUT, send[r][r], send[r][r] + own, OUTPUT, recv[r][r]),) if own else ()
        steps.append((Step(sends, recvs, copies),) if sends or recvs or copies else ())
    extents = {INPUT: tuple(send[r][P] for r in range(P)), OUTPUT: tuple(recv[r][P] for r in range(P))}
    return Schedule("alltoall", "linear", P, nelems, 0, blocks, tuple(steps), counts, extents)


def _linear_rooted(collective: str, nranks: int, nelems: int, root: int) -> Schedule:
    P = nranks
    blocks = even_blocks(nelems, P)
    size = [blocks[r + 1] - blocks[r] for r in range(P)]
    steps: list[tuple[Step, ...]] = []
    hub = []
    for r in range(P):
        if r == root or not size[r]:
            steps.append(())
        elif collective == "gather":
            steps.append((Step(sends=(Send(root, 0, size[r], INPUT),)),))
            hub.append(Recv(r, blocks[r], blocks[r + 1], buf=OUTPUT))
        else:
            steps.append((Step(recvs=(Recv(root, 0, size[r], buf=OUTPUT),)),))
            hub.append(Send(r, blocks[r], blocks[r + 1], INPUT))  # type: ignore[arg-type]
    if collective == "gather":
        own = (Copy(INPUT, 0, size[root], OUTPUT, blocks[root]),) if size[root] else ()
        rs = tuple(hub)
        steps[root] = (Step(recvs=rs, copies=own),) if rs or own else ()  # type: ignore[arg-type]
        extents = {INPUT: tuple(size), OUTPUT: tuple(nelems if r == root else 0 for r in range(P))}
    else:
        own = (Copy(INPUT, blocks[root], blocks[root + 1], OUTPUT, 0),) if size[root] else ()
        ss = tuple(hub)
        steps[root] = (Step(sends=ss, copies=own),) if ss or own else ()  # type: ignore[arg-type]
        extents = {INPUT: tuple(nelems if r == root else 0 for r in range(P)), OUTPUT: tuple(size)}
    return Schedule(collective, "linear", P, nelems, root, blocks, tuple(steps), None, extents)


def linear_gather(nranks: int, nelems: int, root: int = 0) -> Schedule:
    """MPI's basic linear gather, as a model of ``native``: the root receives every rank's block in one step."""
    return _linear_rooted("gather", nranks, nelems, root)


def linear_scatter(nranks: int, nelems: int, root: int = 0) -> Schedule:
    """MPI's basic linear scatter, as a model of ``native``: the root sends every rank its block in one step."""
    return _linear_rooted("scatter", nranks, nelems, root)


def _native(collective: str, nelems: int, root: int, cluster: Cluster, itemsize: int) -> float:
    P = cluster.size
    if collective == "alltoall":
        models = [build("pairwise", collective, P, nelems), build("bruck", collective, P, nelems),
                  linear_alltoall(P, nelems)]
        return min(cost(m, cluster, itemsize) for m in models)
    if collective in ("gather", "scatter"):
        lin = linear_gather(P, nelems, root) if collective == "gather" else linear_scatter(P, nelems, root)
        return min(cost(m, cluster, itemsize) for m in (build("tree", collective, P, nelems, root), lin))
    if collective == "allgatherv":
        models = [build("ring", "allgatherv", P, nelems), build("tree", "allgather", P, nelems)]
        return min(cost(m, cluster, itemsize) for m in models)
    models = [build("ring", collective, P, nelems, root)]
    if collective == "allreduce":
        models.append(recursive_doubling_allreduce(P, nelems))
        models.append(rabenseifner_allreduce(P, nelems))
    else:
        models.append(build("tree", collective, P, nelems, root))
    return min(cost(m, cluster, itemsize) for m in models)


def _elems(collective: str, nbytes: int, itemsize: int, P: int) -> int:
    """A Schedule's ``nelems`` for a call whose per-rank input is ``nbytes``.

    allgather(v), gather and alltoall count every rank's input (P of them);
    scatter's ``nbytes`` is the root's whole input.
    """
    n = max(0, nbytes) // itemsize
    return n * P if collective in ("allgather", "allgatherv", "gather", "alltoall") else n


def predict(collective: str, nbytes: int, cluster: Cluster, algorithm: str, itemsize: int = 4, root: int = 0) -> float:
    """Predicted seconds of one call of ``collective`` by ``algorithm`` with ``nbytes`` per rank on ``cluster``.

    Args:
        collective: one of ``ALL_COLLECTIVES``.
        nbytes: bytes of one rank's input (``x.nbytes``; for allgather,
            allgatherv and gather the result is P times that; alltoall sends
            it in P equal blocks); for scatter the root's whole input.
        cluster: ranks, nodes and link costs.
        algorithm: "native" or one of ``ALGORITHMS_BY_COLLECTIVE[collective]``.
        itemsize: bytes per element.
        root: root of reduce, broadcast, gather and scatter.

    Example::

        predict("allreduce", 1 << 20, Cluster((0, 0, 1, 1)), "hierarchical")
        predict("alltoall", 4096, Cluster((0,) * 8), "bruck")
    """
    if collective not in ALL_COLLECTIVES:
        raise ValueError(f"predict: unknown collective {collective!r}; choose one of {tuple(ALL_COLLECTIVES)}")
    P = cluster.size
    n = _elems(collective, nbytes, itemsize, P)
    if algorithm == "native":
        return _native(collective, n, root, cluster, itemsize)
    return cost(build(algorithm, collective, P, n, root, nodes=cluster.node_of_rank), cluster, itemsize, EXECUTOR_STEP)


def choose(
    collective: str,
    nbytes: int,
    cluster: Cluster,
    itemsize: int = 4,
    candidates: Iterable[str] | None = None,
    root: int = 0,
) -> Choice:
    """The candidate with the least predicted time, and the table of predictions.

    Deterministic: the same arguments give the same choice on every rank (ties
    go to the earlier candidate), so ranks never disagree on the algorithm.

    Args:
        collective: one of ``ALL_COLLECTIVES``.
        nbytes: bytes of one rank's input (see :func:`predict`).
        cluster: ranks, nodes and link costs (``comm.cluster``).
        itemsize: bytes per element.
        candidates: algorithm names ("native" and/or
            ``ALGORITHMS_BY_COLLECTIVE[collective]``); None means
            ``candidates_for(collective)``.
        root: root of reduce, broadcast, gather and scatter.

    Example::

        c = choose("allreduce", 4 << 20, comm.cluster)
        c.best, c.predictions
        choose("alltoall", 256, comm.cluster, candidates=("pairwise", "bruck")).best   # "bruck"
    """
    cands = list(dict.fromkeys(candidates_for(collective) if candidates is None else candidates))
    if not cands:
        raise ValueError("choose: no candidates")
    table = [(a, predict(collective, nbytes, cluster, a, itemsize, root)) for a in cands]
    order = sorted(range(len(table)), key=lambda i: (table[i][1], i))
    ranked = tuple(table[i] for i in order)
    return Choice(collective, nbytes, ranked[0][0], ranked)


def _link_sources(cluster: Cluster) -> str:
    """Where explain's figures come from, link by link: measured, declared in a file, or the defaults.

    A figure the cluster lacks is a default, never "measured" (on one node nothing is measured between nodes);
    one that no message of this cluster uses says so.
    """
    got = f"from {cluster.source}" if cluster.links_declared else "measured"
    have = {"intra": cluster.intra is not None, "inter": cluster.inter is not None, "reduce": cluster.gamma is not None}
    if all(have.values()):
        return got
    if not any(have.values()):
        return "defaults (not calibrated)"
    unused = {"inter": " (not used: one node)" if cluster.nnodes == 1 else "",
              "intra": " (not used: one rank per node)" if cluster.nnodes == cluster.size else "", "reduce": ""}
    defaults = ", ".join(k + unused[k] for k, v in have.items() if not v)
    return f"{got}: {', '.join(k for k, v in have.items() if v)}; defaults: {defaults}"


def explain(choice: Choice, cluster: Cluster) -> str:
    """A few lines: the links used, each candidate's predicted time, and the choice.

    Example::

        print(explain(choose("allreduce", 1 << 20, cl), cl))
    """
    intra, inter, gamma = links(cluster)
    lines = [
        f"{choice.collective} of {choice.nbytes} bytes per rank on {cluster.size} ranks, {cluster.nnodes} node(s); "
        f"links {_link_sources(cluster)}:",
        f"  intra alpha {intra.alpha * 1e6:.1f} us, {1e-9 / intra.beta:.2f} GB/s; "
        f"inter alpha {inter.alpha * 1e6:.1f} us, {1e-9 / inter.beta:.2f} GB/s; reduce {1e-9 / gamma:.2f} GB/s",
    ]
    best = choice.predictions[0][1]
    for alg, t in choice.predictions:
        mark = "  <- chosen" if alg == choice.best else ""
        rel = f"{t / best:.2f}x" if best > 0 else "-"
        lines.append(f"  {alg:<14} {t * 1e6:12.1f} us  {rel:>7}{mark}")
    return "\n".join(lines)
