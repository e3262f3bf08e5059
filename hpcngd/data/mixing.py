"""Batch-level augmentation in the trainer, on whatever device the batch lives on: running mixup, then
random erasing (../shared/SPNGD.md; the released system's order). No MPI.

Both are pure functions of (seed, step, global position in the batch), so a rank that holds slice
``r`` of the global batch does exactly what one rank holding the whole batch would do to that slice.

- Running mixup: ``x_t <- lam x_t + (1 - lam) x_{t-1}`` and the same for one-hot targets, where
  ``x_{t-1}`` is the previous *mixed* batch and each image draws its own ``lam ~ Beta(alpha, alpha)``,
  ``lam = max(lam, 1 - lam)``, as the released system does. The first step is not mixed.
- Random erasing: with probability ``p`` per image, a rectangle of area fraction in ``area`` and aspect
  (height / width) in ``aspect``, or its inverse with probability 1/2 (so a range below 1 gives wide
  and tall rectangles alike, as released), is set to 0 (the normalized mean). It runs in place on the
  mixed batch, which is also what the next step mixes with (in the released system too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def erase_(
    images: Tensor,
    seed: int,
    step: int,
    first_position: int,
    p: float,
    area: tuple[float, ...] = (0.02, 0.25),
    aspect: tuple[float, ...] = (0.3, 1.0),
) -> Tensor:
    """Random erasing in place; image ``j`` has global position ``first_position + j``."""
    _, _, height, width = images.shape
    for j in range(images.shape[0]):
        rng = np.random.default_rng((seed, step, first_position + j, 0xE4A5E))
        if rng.random() >= p:
            continue
        for _ in range(10):
            target = height * width * rng.uniform(area[0], area[1])
            ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])) * rng.choice((-1, 1)))
            h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < h < height and 0 < w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                images[j, :, top : top + h, left : left + w] = 0
                break
    return images


def mixup_lambdas(seed: int, step: int, first_position: int, count: int, alpha: float) -> np.ndarray:
    """The mixing weights of ``count`` images of ``step`` from global position ``first_position`` on:
    Beta(alpha, alpha), folded to >= 0.5, each from its own (seed, step, position)."""
    positions = range(first_position, first_position + count)
    lam = np.array([np.random.default_rng((seed, step, at, 0x313)).beta(alpha, alpha) for at in positions])
    return np.maximum(lam, 1.0 - lam)


class RunningMixup:
    """Mixes each batch with the previous mixed batch (state: that batch and its soft targets)."""

    def __init__(self, alpha: float, num_classes: int, seed: int) -> None:
        self.alpha = alpha
        self.num_classes = num_classes
        self.seed = seed
        self.prev: tuple[Tensor, Tensor] | None = None

    def __call__(
        self, images: Tensor, labels: Tensor, step: int, first_position: int
    ) -> tuple[Tensor, Tensor]:
        """Mixed images and soft targets (rows sum to 1) for ``step``; image ``j`` has global position
        ``first_position + j``."""
        targets = F.one_hot(labels, self.num_classes).to(images.dtype)
        if self.prev is not None and self.prev[0].shape == images.shape:
            lams = mixup_lambdas(self.seed, step, first_position, len(images), self.alpha)
            lam = torch.from_numpy(lams).to(images.device, images.dtype)
            at = lam.view(-1, *[1] * (images.dim() - 1))
            images = at * images + (1.0 - at) * self.prev[0]
            targets = lam[:, None] * targets + (1.0 - lam[:, None]) * self.prev[1]
        self.prev = (images, targets)
        return images, targets
