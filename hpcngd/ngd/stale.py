"""Stale statistics: when to refresh each factor, pure.

(ours; SPNGD.md: the exact published rule is not public.) Every statistic X (A and G of a layer, F of a
BatchNorm layer) has an interval D, starting at 1. At each refresh, with the previous refreshed value
X_prev, ``d = ||X - X_prev||_F / ||X_prev||_F``; if ``d < threshold`` the interval doubles up to
``max_interval``, otherwise it falls back to 1. The next refresh is ``D`` steps later. Between refreshes
the statistic is not computed, communicated or inverted, and its cached inverse is reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def relative_changes(pairs: list[tuple[Tensor, Tensor]]) -> list[float]:
    """``||new - old||_F / ||old||_F`` of each (new, old) pair (inf where ``old`` is zero), as a few
    multi-tensor operations (not three a pair) read from the device in one transfer."""
    if not pairs:
        return []
    new, old = [n for n, _ in pairs], [o for _, o in pairs]
    diffs = torch._foreach_norm(torch._foreach_sub(new, old))
    norms = torch.stack([torch.stack(diffs), torch.stack(torch._foreach_norm(old))], dim=1).tolist()
    return [math.inf if denom == 0.0 else diff / denom for diff, denom in norms]


def relative_change(new: Tensor, old: Tensor) -> float:
    """``||new - old||_F / ||old||_F`` (inf when ``old`` is zero)."""
    return relative_changes([(new, old)])[0]


@dataclass
class StaleInterval:
    """Refresh schedule of one statistic.

    Args:
        threshold: relative change below which the interval doubles (0 = refresh every step).
        max_interval: the largest interval in steps.
    """

    threshold: float
    max_interval: int
    interval: int = 1
    next_step: int = 0

    def due(self, step: int) -> bool:
        """Whether the statistic is recomputed at ``step``."""
        return step >= self.next_step

    def refreshed(self, step: int, change: float) -> None:
        """Record a refresh at ``step`` whose relative change was ``change``."""
        if change < self.threshold:
            self.interval = min(2 * self.interval, self.max_interval)
        else:
            self.interval = 1
        self.next_step = step + self.interval
