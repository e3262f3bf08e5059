"""Mixed precision (``run.precision``): autocast and fp16 dynamic loss scaling. No MPI.

Weights, gradients, optimizer state and SP-NGD factors stay fp32 (factors are computed from fp32
copies of the captured activations and output gradients, :mod:`hpcngd.ngd.factors`); only the
forward and backward arithmetic runs in fp16 or bf16 under ``torch.autocast``.

fp16 has a narrow range, so the loss is multiplied by a scale ``S`` before backward and the gradients
are divided by ``S`` afterwards (:func:`unscale_`, which also says whether any gradient is inf/NaN).
The captured output gradients carry ``S`` too, and the trainer divides it out of the factors
(``grad_scale = n / S``, ../shared/SPNGD.md). :class:`LossScaler` is the state machine: an overflow
halves ``S`` and the step is skipped; ``growth_interval`` steps in a row without one double it. The
trainer agrees on the overflow over all ranks before acting, so a step skipped on one rank is skipped
on every rank. bf16 has fp32's range and needs no scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from hpcngd.errors import Diverged

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The forward/backward context of ``precision`` on ``device`` (fp32: nothing)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def unscale_(grads: Sequence[Tensor], scale: float) -> bool:
    """Divide ``grads`` by ``scale`` in place; True when any value is inf or NaN (this rank only)."""
    if not grads:
        return False
    found = torch.zeros(1, device=grads[0].device)
    inv = torch.full((1,), 1.0 / scale, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(list(grads), found, inv)
    return bool(found.item())


class LossScaler:
    """Dynamic loss scale for fp16 (``enabled``); with it off, the scale is 1 and never changes.

    Args:
        init_scale: the first scale (a power of two keeps scaling exact).
        growth_interval: steps in a row without overflow after which the scale doubles.
        enabled: False for fp32 and bf16.
        max_skips_in_a_row: this many skipped steps in a row means the run diverged, not a bad scale.
    """

    GROWTH = 2.0
    BACKOFF = 0.5

    def __init__(
        self, init_scale: float, growth_interval: int, enabled: bool, max_skips_in_a_row: int = 32
    ) -> None:
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.max_skips_in_a_row = max_skips_in_a_row
        self.good_steps = 0  # steps without overflow since the last change of scale
        self.skips_in_a_row = 0
        self.skipped = 0  # skipped steps since the metrics last took the count

    def update(self, overflow: bool) -> None:
        """Record one step's agreed outcome: back off and count on overflow, else maybe grow."""
        if not self.enabled:
            if overflow:
                raise RuntimeError("LossScaler.update(overflow=True) without loss scaling")
            return
        if overflow:
            self.scale *= self.BACKOFF
            self.good_steps = 0
            self.skipped += 1
            self.skips_in_a_row += 1
            if self.skips_in_a_row >= self.max_skips_in_a_row:
                raise Diverged(
                    f"the run diverged: fp16 gradients overflowed on {self.skips_in_a_row} steps in a row "
                    f'(loss scale now {self.scale:g}); try a lower optim.lr or run.precision = "bf16"'
                )
            return
        self.skips_in_a_row = 0
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.GROWTH
            self.good_steps = 0

    def take_skipped(self) -> int:
        """Skipped steps since the last call (for a metrics record)."""
        n, self.skipped = self.skipped, 0
        return n

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps (the pending skip count travels with the metrics instead)."""
        return {"scale": self.scale, "good_steps": self.good_steps, "skips_in_a_row": self.skips_in_a_row}

    def load(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skips_in_a_row = int(state["skips_in_a_row"])
