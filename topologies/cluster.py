"""The physical layout of a job: which ranks share a node, and the link costs between them."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Cluster", "LinkCost"]


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
class Cluster:
    """Which node each rank sits on, plus measured link costs once calibrated.

    Attributes:
        node_of_rank: node index of each rank; nodes are numbered by their
            lowest rank, so node 0 holds rank 0.
        intra: cost of a link inside a node (None until calibrated).
        inter: cost of a link between nodes (None until calibrated).
        gamma: seconds per byte to reduce two buffers locally (None until calibrated).
    """

    node_of_rank: tuple[int, ...]
    intra: LinkCost | None = None
    inter: LinkCost | None = None
    gamma: float | None = None
    source: str = field(default="mpi", compare=False)

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
    def from_node_size(cls, size: int, node_size: int) -> "Cluster":
        """Fake nodes of ``node_size`` consecutive ranks (what COLLECTIVE_NODE_SIZE asks for)."""
        if node_size < 1:
            raise ValueError(f"node size must be >= 1, got {node_size}")
        return cls(tuple(r // node_size for r in range(size)), source=f"COLLECTIVE_NODE_SIZE={node_size}")
