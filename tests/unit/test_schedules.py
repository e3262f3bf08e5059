"""Learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from hpcngd.config import OptimConfig
from hpcngd.models.resnet import build
from hpcngd.optim import build_optimizer, learning_rate, param_groups


def lr(step: int, spe: float = 10, epochs: float = 10, **kw: object) -> float:
    return learning_rate(OptimConfig(**kw), step / spe, epochs)  # type: ignore[arg-type]


def test_constant() -> None:
    assert lr(0, schedule="constant", lr=0.3) == 0.3
    assert lr(99, schedule="constant", lr=0.3) == 0.3


def test_poly_matches_spngd_formula() -> None:
    kw = dict(schedule="poly", lr=0.03, e_start=1.5, e_end=49.5, power=3.5)
    assert lr(14, epochs=45, **kw) == 0.03  # epoch 1.4 < e_start
    # epoch 20: 0.03 * (1 - 18.5 / 48) ** 3.5
    assert lr(200, epochs=45, **kw) == pytest.approx(0.03 * (1 - 18.5 / 48) ** 3.5, rel=1e-12)
    assert lr(600, epochs=45, **kw) == 0.0  # past e_end


def test_poly_defaults_to_end_of_run() -> None:
    assert lr(50, schedule="poly", lr=1.0, power=2.0) == pytest.approx(0.25)
    assert lr(100, schedule="poly", lr=1.0, power=2.0) == 0.0


def test_warmup_then_shape() -> None:
    kw = dict(schedule="constant", lr=1.0, warmup_epochs=2.0, warmup_init_lr=0.1)
    assert lr(0, **kw) == pytest.approx(0.1)
    assert lr(10, **kw) == pytest.approx(0.55)
    assert lr(20, **kw) == 1.0


def test_cosine() -> None:
    kw = dict(schedule="cosine", lr=1.0, min_lr=0.0, warmup_epochs=2.0)
    assert lr(20, **kw) == pytest.approx(1.0)
    assert lr(60, **kw) == pytest.approx(0.5)  # halfway between epoch 2 and 10
    assert lr(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr(40, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_step() -> None:
    kw = dict(schedule="step", lr=1.0, milestones=(3.0, 6.0), gamma=0.1)
    assert lr(29, **kw) == 1.0
    assert lr(30, **kw) == pytest.approx(0.1)
    assert lr(65, **kw) == pytest.approx(0.01)


def test_weight_decay_skips_batchnorm_and_biases() -> None:
    model = build("resnet8", 10)
    decay, no_decay = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])  # type: ignore[attr-defined]
    skipped = sorted(names[id(p)] for p in no_decay["params"])  # type: ignore[attr-defined]
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert "fc.weight" in decayed and "conv1.weight" in decayed and "layer2.0.downsample.0.weight" in decayed
    assert "fc.bias" in skipped and "bn1.weight" in skipped and "layer1.0.bn2.bias" in skipped
    assert all(".bn" not in n and not n.startswith("bn") for n in decayed)
    assert len(decayed) + len(skipped) == len(names)


def test_sgd_step_matches_hand_computed_update() -> None:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    opt = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.01))
    for _ in range(2):
        opt.zero_grad()
        model.weight.grad = torch.tensor([[0.2, 0.4]])
        model.bias.grad = torch.tensor([1.0])
        opt.step()
    # weight: g = grad + wd * w; v1 = g1; w1 = w0 - lr v1; v2 = 0.9 v1 + g2; w2 = w1 - lr v2.
    w0 = torch.tensor([1.0, -2.0])
    v1 = torch.tensor([0.2, 0.4]) + 0.01 * w0
    w1 = w0 - 0.1 * v1
    w2 = w1 - 0.1 * (0.9 * v1 + torch.tensor([0.2, 0.4]) + 0.01 * w1)
    torch.testing.assert_close(model.weight.detach()[0], w2)
    assert float(model.bias.detach()) == pytest.approx(
        0.5 - 0.1 * 1.0 - 0.1 * (0.9 + 1.0)
    )  # no decay on bias
