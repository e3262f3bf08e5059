"""SP-NGD math: factors, damping and inverses, stale statistics, capture hooks and the preconditioner.

No MPI here: averaging over ranks is injected. :func:`curvature` gives the curvature of one batch, with
no running average, for checking against other libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcngd.ngd.capture import Capture
from hpcngd.ngd.preconditioner import Preconditioner, select_layers, statistic_keys


@dataclass(frozen=True)
class LayerCurvature:
    """Kronecker factors ``A`` (input side) and ``G`` (output side) of a Conv2d/Linear layer, or the
    unit-wise ``blocks`` (C, 2, 2), ordered (gamma, beta), of a BatchNorm2d layer."""

    A: Tensor | None = None
    G: Tensor | None = None
    blocks: Tensor | None = None


def mc_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One class index per row drawn from ``softmax(logits)`` (Monte Carlo Fisher), on ``logits``' device.

    Drawn on the CPU from a CPU ``generator``: the same labels on any device, and a generator state that
    a checkpoint restores on any device. Rows with inf/NaN probabilities (an fp16 overflow) draw
    uniformly, so every rank still captures the same statistics (the overflow skips the step anyway).
    """
    probs = torch.softmax(logits.detach().float(), 1).cpu()
    probs = torch.where(torch.isfinite(probs), probs, 1.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def curvature(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher: str = "empirical",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, LayerCurvature]:
    """The SP-NGD curvature of one batch under the cross-entropy loss, keyed by module name.

    Args:
        model: the network, in the mode it should be in (training mode: BatchNorm uses batch statistics).
        inputs, targets: one batch and its class indices.
        fisher: "empirical" (gradients of the loss at ``targets``) or "mc" (labels drawn from the model's
            softmax, one sample per example).
        dtype: dtype of the factors.
        generator: CPU RNG for the "mc" labels (:func:`mc_labels`).
    """
    if fisher not in ("empirical", "mc"):
        raise ValueError(f"fisher = {fisher!r}: must be 'empirical' or 'mc'")
    layers = select_layers(model, ())
    capture = Capture(layers, dtype)
    try:
        capture.arm(set(statistic_keys(layers)), grad_scale=len(inputs))
        logits = model(inputs)
        if fisher == "mc":
            targets = mc_labels(logits, generator)
        loss = F.cross_entropy(logits, targets)
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        sums = capture.take()
    finally:
        capture.remove()
    out: dict[str, LayerCurvature] = {}
    for name, module in layers.items():
        if isinstance(module, nn.BatchNorm2d):
            out[name] = LayerCurvature(blocks=sums[(name, "F")].mean())
        else:
            out[name] = LayerCurvature(A=sums[(name, "A")].mean(), G=sums[(name, "G")].mean())
    return out


__all__ = ["LayerCurvature", "Preconditioner", "curvature"]
