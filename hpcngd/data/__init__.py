"""Data sources: every loader shards by rank and is a pure function of (seed, epoch, rank)."""

from __future__ import annotations

from hpcngd.config import DataConfig
from hpcngd.data.folder import ImageFolder
from hpcngd.data.loader import Dataset, TrainLoader, eval_batches
from hpcngd.data.synthetic import SyntheticImages


def build_datasets(cfg: DataConfig, num_classes: int, seed: int) -> tuple[Dataset, Dataset]:
    """The (train, validation) sets the [data] section names; UserError when unusable."""
    if cfg.source == "folder":
        return (
            ImageFolder(cfg, "train", num_classes, seed),
            ImageFolder(cfg, "val", num_classes, seed),
        )
    return (
        SyntheticImages(cfg.synthetic_train_samples, cfg.image_size, num_classes, seed),
        SyntheticImages(cfg.synthetic_val_samples, cfg.image_size, num_classes, seed + 1),
    )


__all__ = ["Dataset", "TrainLoader", "build_datasets", "eval_batches"]
