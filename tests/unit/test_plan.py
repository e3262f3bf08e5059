"""The layer-to-rank plan: deterministic, every rank used, balance within the greedy (LPT) bound."""

from __future__ import annotations

import pytest
import torch

from hpcngd.models.resnet import build
from hpcngd.ngd.plan import layer_costs, make_plan
from hpcngd.ngd.preconditioner import select_layers
from hpcngd.report import factor_values


@pytest.fixture(scope="module")
def resnet50_costs() -> dict[str, float]:
    return layer_costs(select_layers(build("resnet50", 1000), ()))


def test_costs(resnet50_costs: dict[str, float]) -> None:
    assert len(resnet50_costs) == 54 + 53  # conv/fc layers and BatchNorm layers
    assert resnet50_costs["layer4.0.conv2"] == 4608.0**3 + 512.0**3
    assert resnet50_costs["fc"] == 2049.0**3 + 1000.0**3  # bias column
    assert resnet50_costs["bn1"] == 8.0 * 64


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 16, 107, 1024])
def test_plan_properties(resnet50_costs: dict[str, float], world_size: int) -> None:
    plan = make_plan(resnet50_costs, world_size)
    assert plan == make_plan(resnet50_costs, world_size)  # deterministic
    assert [n for n, _ in plan.owners] == list(resnet50_costs)
    assert sum(plan.loads) == pytest.approx(sum(resnet50_costs.values()))
    if len(resnet50_costs) >= world_size:
        assert plan.idle_ranks == 0  # every rank owns at least one layer
    else:
        assert plan.idle_ranks == world_size - len(resnet50_costs)
    # Greedy largest-first: the busiest rank carries at most the mean plus the largest single layer.
    mean = sum(resnet50_costs.values()) / world_size
    assert max(plan.loads) <= mean + max(resnet50_costs.values()) + 1e-6 * mean
    assert sorted(n for r in range(world_size) for n in plan.owned_by(r)) == sorted(resnet50_costs)


def test_resnet50_balance_at_16_ranks(resnet50_costs: dict[str, float]) -> None:
    plan = make_plan(resnet50_costs, 16)
    # Three layers (layer4.*.conv2, A is 4608 wide) each cost 22% of the total: no plan can load the
    # busiest rank with less than one of them, so max/mean >= 16 * 0.216 = 3.46, and greedy meets it.
    largest = max(resnet50_costs.values())
    floor = largest / (sum(resnet50_costs.values()) / 16)
    assert plan.imbalance == pytest.approx(floor, rel=1e-9)
    assert 3.4 < plan.imbalance < 3.5
    assert make_plan(resnet50_costs, 2).imbalance < 1.01 and make_plan(resnet50_costs, 4).imbalance < 1.01


def test_factor_bytes_fp16_triangles_are_a_quarter_of_fp32_full() -> None:
    layers = select_layers(build("resnet50", 1000), ())
    packed, full = factor_values(layers, packed=True), factor_values(layers, packed=False)
    assert full == sum(
        (m.weight[0].numel() + (m.bias is not None)) ** 2 + m.weight.shape[0] ** 2
        for m in layers.values()
        if not isinstance(m, torch.nn.BatchNorm2d)
    ) + sum(4 * m.num_features for m in layers.values() if isinstance(m, torch.nn.BatchNorm2d))
    ratio = (packed * 2) / (full * 4)
    assert abs(ratio - 0.25) / 0.25 < 0.01
