"""Which rank inverts and preconditions which layer: a frozen value, pure (no MPI).

Cost model: inverting a d x d factor costs ~ d^3 (Cholesky + triangular inverse); a Conv2d/Linear layer
costs ``d_A^3 + d_G^3``, a BatchNorm layer ``8 C`` (closed-form 2x2 blocks). Greedy longest-processing-
time assignment: layers by decreasing cost (ties by name, so every rank computes the same plan) each go
to the least-loaded rank (ties to the lowest rank).

(ours) Both factors of a layer have the same owner: the owner needs both inverses to precondition the
layer, so splitting them would send one inverse across ranks every refresh. It costs little balance:
the largest single factor (ResNet-50's 4608-wide A of layer4's 3x3 convs) bounds the busiest rank
either way.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn


def layer_costs(layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Inversion cost of each layer (see the module docstring)."""
    costs: dict[str, float] = {}
    for name, m in layers.items():
        if isinstance(m, nn.BatchNorm2d):
            costs[name] = 8.0 * m.num_features
        else:
            assert isinstance(m, (nn.Conv2d, nn.Linear))
            d_a = m.weight[0].numel() + (1 if m.bias is not None else 0)
            d_g = m.weight.shape[0]
            costs[name] = float(d_a) ** 3 + float(d_g) ** 3
    return costs


@dataclass(frozen=True)
class Plan:
    """Owner rank of every layer and the load that results.

    Attributes:
        world_size: number of ranks planned for.
        owners: (layer name, owner rank) pairs in the model's layer order.
        loads: summed cost per rank.
    """

    world_size: int
    owners: tuple[tuple[str, int], ...]
    loads: tuple[float, ...]

    def owner(self, name: str) -> int:
        return dict(self.owners)[name]

    def owned_by(self, rank: int) -> list[str]:
        """Layers that ``rank`` inverts and preconditions, in model order."""
        return [name for name, owner in self.owners if owner == rank]

    @property
    def imbalance(self) -> float:
        """Busiest rank's load over the mean load (1.0 = perfect)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean else 1.0

    @property
    def idle_ranks(self) -> int:
        return sum(1 for load in self.loads if load == 0.0)


def owned_parameters(layers: Mapping[str, nn.Module], plan: Plan) -> list[list[nn.Parameter]]:
    """Each rank's layers' parameters, in model order: what it preconditions and shares every step."""
    return [
        [p for name in plan.owned_by(rank) for p in layers[name].parameters()]
        for rank in range(plan.world_size)
    ]


def make_plan(costs: Mapping[str, float], world_size: int) -> Plan:
    """Greedy largest-first assignment of layers to ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world size {world_size}: must be >= 1")
    heap = [(0.0, rank) for rank in range(world_size)]
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, rank = heapq.heappop(heap)
        owner[name] = rank
        heapq.heappush(heap, (load + costs[name], rank))
    loads = [0.0] * world_size
    for name, rank in owner.items():
        loads[rank] += costs[name]
    return Plan(world_size, tuple((name, owner[name]) for name in costs), tuple(loads))
