"""Synthetic images: random tensors of the real shapes, for throughput runs and tests.

Sample ``i`` is a pure function of (seed, i): the same on every rank count and every worker. Labels
are random; nothing here is learnable.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SyntheticImages:
    """``num_samples`` random normalized images of ``3 x image_size x image_size`` with labels."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int) -> None:
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (num_samples,), generator=gen).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def item(self, index: int, epoch: int) -> tuple[Tensor, int]:
        """Image ``index`` (the same every epoch: no augmentation) and its label."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        image = torch.randn(3, self.image_size, self.image_size, generator=gen)
        return image, self.labels[index]
