"""Learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from hpcngd.config import OptimConfig
from hpcngd.optim import learning_rate


def lr(step: int, spe: int = 10, epochs: float = 10, **kw: object) -> float:
    return learning_rate(OptimConfig(**kw), step, spe, epochs)  # type: ignore[arg-type]


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
