"""Who shares a node with whom: world, node-local and leaders communicators.

A node is the set of ranks that share memory (``MPI.COMM_TYPE_SHARED``) unless ``ranks_per_node``
forces consecutive blocks of that many ranks, which simulates several nodes on one host. The leader of
a node is its local rank 0; ``leaders`` is a communicator of the leaders only (``None`` elsewhere).
Nodes may hold unequal numbers of ranks (a job of 10 ranks placed 4 + 4 + 2): ``node_sizes`` says so on
every rank, and the two-level reduction, whose leaders average node means with equal weights, is then
not used (:class:`~hpcngd.comm.hierarchical.WireReducer`).
``host`` is always the set of ranks that share memory, simulated nodes or not: a host's GPUs and cores
are shared among its ranks (device binding, threads), whatever the two-level reduction is told.
The Topology frees the communicators it derives (``close()`` or ``with``).
"""

from __future__ import annotations

from types import TracebackType

from mpi4py import MPI


class Topology:
    """World, node, leaders and host communicators.

    Args:
        world: the job's communicator (not freed by the Topology).
        ranks_per_node: force this node size (0 = detect ranks that share memory).
    """

    def __init__(self, world: MPI.Comm, ranks_per_node: int = 0) -> None:
        self.world = world
        if ranks_per_node:
            if world.size % ranks_per_node:
                raise ValueError(
                    f"comm.ranks_per_node = {ranks_per_node}: must divide the {world.size} ranks"
                )
            self.node = world.Split(color=world.rank // ranks_per_node, key=world.rank)
            self.host = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
        else:
            self.node = self.host = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
        is_leader = self.node.rank == 0
        leaders = world.Split(color=0 if is_leader else MPI.UNDEFINED, key=world.rank)
        self.leaders: MPI.Comm | None = leaders if is_leader else None
        # Node index = rank of this node's leader among the leaders, told to the whole node.
        self.node_index: int = self.node.bcast(self.leaders.rank if self.leaders else None, root=0)
        self.num_nodes: int = self.node.bcast(self.leaders.size if self.leaders else None, root=0)
        self.node_sizes: list[int] = sorted(set(world.allgather(self.node.size)))  # the distinct ones

    @property
    def rank(self) -> int:
        return int(self.world.rank)

    @property
    def size(self) -> int:
        return int(self.world.size)

    @property
    def local_rank(self) -> int:
        return int(self.node.rank)

    @property
    def local_size(self) -> int:
        return int(self.node.size)

    @property
    def host_rank(self) -> int:
        """This rank's index among the ranks of its host (= ``local_rank`` unless nodes are simulated)."""
        return int(self.host.rank)

    @property
    def host_size(self) -> int:
        return int(self.host.size)

    @property
    def uniform(self) -> bool:
        """Every node holds the same number of ranks (the same answer on every rank)."""
        return len(self.node_sizes) == 1

    def describe(self) -> str:
        """One line for the log."""
        if self.uniform:
            nodes = _count(self.num_nodes, "node")
            return f"{_count(self.size, 'rank')} on {nodes} ({self.local_size} per node)"
        sizes = "/".join(map(str, self.node_sizes))
        return (
            f"{self.size} ranks on {self.num_nodes} nodes of unequal sizes ({sizes}: communication is flat)"
        )

    def close(self) -> None:
        """Free the derived communicators (collective)."""
        if self.leaders is not None:
            self.leaders.Free()
            self.leaders = None
        if self.host != MPI.COMM_NULL and self.host is not self.node:
            self.host.Free()
        if self.node != MPI.COMM_NULL:
            self.node.Free()

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
