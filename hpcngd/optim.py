"""Update rules and learning-rate schedules.

Schedules are pure functions of the epoch (no state, no MPI): ``learning_rate(cfg, epoch,
total_epochs)``. Epochs are fractional: after ``s`` steps of ``B`` of ``N`` images, ``e = s B / N``.

- constant: ``lr``.
- poly: ``lr`` until ``e_start``, then ``lr * (1 - (e - e_start) / (e_end - e_start)) ** power``,
  0 after ``e_end`` (``e_end = 0`` means the end of the run), as SP-NGD's released runs use.
- cosine: from ``lr`` at the end of warmup to ``min_lr`` at the end of the run.
- step: ``lr * gamma ** (number of milestones <= e)``.

Linear warmup over ``warmup_epochs`` (from ``warmup_init_lr``) replaces the first part of any shape.

Update rules: ``sgd`` is torch's momentum SGD with L2 weight decay on conv/fc weights. ``spngd`` is the
SP-NGD rule on (already preconditioned) gradients: ``v <- m v - lr g``, ``w <- w + v``, where ``m`` is
multiplied by ``lr_t / lr_{t-1}`` on a step where the learning rate drops (momentum correction), and
weight decay, if any, is decoupled (``w <- w - lr wd w``). Either may be followed by weight rescaling:
a conv/fc weight whose Frobenius norm exceeds ``sqrt(2 c_out)`` is scaled down to that norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hpcngd.config import OptimConfig


def learning_rate(cfg: OptimConfig, e: float, total_epochs: float) -> float:
    """The learning rate of a step that starts ``e`` epochs into the run."""
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


def damping_at(start: float, end: float, step: int, total_steps: int) -> float:
    """Damping at ``step``: constant when ``end`` is 0, else geometric from ``start`` to ``end``."""
    if not end or total_steps <= 1:
        return start
    frac = min(1.0, step / (total_steps - 1))
    return start * (end / start) ** frac


class SPNGD(torch.optim.Optimizer):
    """The SP-NGD update on preconditioned gradients (see the module docstring).

    Momentum buffers ``v`` live in ``state[p]["velocity"]``; each parameter group remembers the learning
    rate of its previous step (``prev_lr``) for the momentum correction.
    """

    def __init__(self, params: list[dict[str, object]], lr: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "prev_lr": None})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, prev = group["lr"], group["prev_lr"]
            momentum = group["momentum"] * (lr / prev if prev and lr < prev else 1.0)
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params if p.grad is not None]
            velocity = [self._velocity(p) for p in params]
            # multi-tensor operations: on a GPU a few kernels for the whole group, not one per parameter
            # (elementwise, so the same result as the per-parameter loop)
            if params:
                torch._foreach_mul_(velocity, momentum)
                torch._foreach_add_(velocity, grads, alpha=-lr)
                torch._foreach_add_(params, velocity)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
            group["prev_lr"] = lr

    def _velocity(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "velocity" not in state:
            state["velocity"] = torch.zeros_like(p)
        v: Tensor = state["velocity"]
        return v


@torch.no_grad()
def rescale_weights(model: nn.Module) -> None:
    """Scale each conv/fc weight with ``||W||_F > sqrt(2 c_out)`` down to that norm.

    The norms come to the host together (one wait for the device, not one a layer) and the weights over
    their limit are scaled by one multi-tensor operation.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weights:
        return
    norms = torch.stack(torch._foreach_norm(weights)).tolist()
    limits = [math.sqrt(2.0 * w.shape[0]) for w in weights]
    over = [(w, limit / norm) for w, norm, limit in zip(weights, norms, limits, strict=True) if norm > limit]
    if over:
        torch._foreach_mul_([w for w, _ in over], [factor for _, factor in over])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer the [optim] section names; set its lr every step with :func:`set_lr`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "spngd":
        return SPNGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise RuntimeError(f"unknown optimizer {cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use ``lr`` for every parameter group at the next ``step()``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
