"""BatchNorm running statistics advanced once a step from all micro-batches, against torch's formulas
computed here directly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hpcngd.models.batchnorm import StepRunningStatistics


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.25), nn.ReLU(), nn.BatchNorm2d(4))


def step(model: nn.Module, stats: StepRunningStatistics, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    stats.begin()
    for x in parts:
        model(x)
        stats.collect()
    return stats.means()


def test_one_move_a_step_towards_the_mean_of_the_micro_batches() -> None:
    model = net()
    bn = model[1]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    stats = StepRunningStatistics(model)
    parts = list(torch.randn(12, 3, 6, 6).split(4))
    step(model, stats, parts)
    stats.finish(keep=True)
    conv = [model[0](x).detach() for x in parts]
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0)
    var = torch.stack([c.transpose(0, 1).reshape(4, -1).var(dim=1) for c in conv]).mean(0)  # unbiased
    torch.testing.assert_close(bn.running_mean, 0.75 * 0.5 + 0.25 * mean)
    torch.testing.assert_close(bn.running_var, 0.75 * 2.0 + 0.25 * var)
    assert model[3].momentum == 1.0 and stats.momenta[-1] == 0.1  # the layer's own momentum is kept


def test_ranks_holding_the_micro_batches_between_them_get_the_single_rank_statistics() -> None:
    parts = list(torch.randn(16, 3, 6, 6).split(4))
    one = net()
    alone = StepRunningStatistics(one)
    step(one, alone, parts)
    alone.finish(keep=True)
    ranks = [net() for _ in range(2)]
    shares = [StepRunningStatistics(m) for m in ranks]
    means = [step(m, s, parts[2 * r : 2 * r + 2]) for r, (m, s) in enumerate(zip(ranks, shares, strict=True))]
    for a, b in zip(*means, strict=True):  # what the allreduce does
        a.add_(b).div_(2)
        b.copy_(a)
    for s in shares:
        s.finish(keep=True)
    for m in ranks:
        for got, want in zip(m.buffers(), one.buffers(), strict=True):
            if want.is_floating_point():
                torch.testing.assert_close(got, want)


def test_a_skipped_step_leaves_them_as_they_were() -> None:
    model = net()
    stats = StepRunningStatistics(model)
    before = copy.deepcopy(model.state_dict())
    step(model, stats, [torch.randn(4, 3, 6, 6)])
    stats.finish(keep=False)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t, before[name]), name


def test_a_cumulative_average_is_refused() -> None:
    with pytest.raises(ValueError, match="momentum None"):
        StepRunningStatistics(nn.Sequential(nn.BatchNorm2d(2, momentum=None)))
