"""Update rules and learning-rate schedules.

Schedules are pure functions of the step (no state, no MPI): ``learning_rate(cfg, step,
steps_per_epoch, total_epochs)``. Epochs are fractional: ``e = step / steps_per_epoch``.

- constant: ``lr``.
- poly: ``lr`` until ``e_start``, then ``lr * (1 - (e - e_start) / (e_end - e_start)) ** power``,
  0 after ``e_end`` (``e_end = 0`` means the end of the run), as SP-NGD's released runs use.
- cosine: from ``lr`` at the end of warmup to ``min_lr`` at the end of the run.
- step: ``lr * gamma ** (number of milestones <= e)``.

Linear warmup over ``warmup_epochs`` (from ``warmup_init_lr``) replaces the first part of any shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hpcngd.config import OptimConfig


def learning_rate(cfg: OptimConfig, step: int, steps_per_epoch: int, total_epochs: float) -> float:
    """The learning rate used at ``step`` (0-based)."""
    e = step / steps_per_epoch
    if e < cfg.warmup_epochs:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * e / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "poly":
        e_end = cfg.e_end or total_epochs
        if e < cfg.e_start:
            return cfg.lr
        return cfg.lr * max(0.0, 1.0 - (e - cfg.e_start) / (e_end - cfg.e_start)) ** cfg.power
    if cfg.schedule == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1e-12)
        frac = min(1.0, (e - cfg.warmup_epochs) / span)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if e >= m)
    raise RuntimeError(f"unknown schedule {cfg.schedule!r}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Conv/fc weights (ndim > 1) get weight decay; BatchNorm parameters and biases do not."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer the [optim] section names; set its lr every step with :func:`set_lr`."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )
    raise RuntimeError(f"unknown optimizer {cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use ``lr`` for every parameter group at the next ``step()``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
