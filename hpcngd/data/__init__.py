"""Data sources: every loader shards by rank and is a pure function of (seed, epoch, rank)."""

from __future__ import annotations

from hpcngd.config import DataConfig
from hpcngd.data.folder import ImageFolder
from hpcngd.data.loader import Dataset, TrainLoader, eval_batches
from hpcngd.data.synthetic import SyntheticImages
from hpcngd.errors import UserError


def build_datasets(cfg: DataConfig, num_classes: int, seed: int) -> tuple[Dataset, Dataset]:
    """The (train, validation) sets the [data] section names; UserError when unusable."""
    sets: tuple[Dataset, Dataset]
    if cfg.source == "folder":
        sets = (
            ImageFolder(cfg, "train", num_classes, seed),
            ImageFolder(cfg, "val", num_classes, seed),
        )
    else:
        sets = (
            SyntheticImages(cfg.synthetic_train_samples, cfg.image_size, num_classes, seed),
            SyntheticImages(cfg.synthetic_val_samples, cfg.image_size, num_classes, seed + 1),
        )
    if len(sets[0]) < cfg.batch_size:
        raise UserError(f"data.batch_size = {cfg.batch_size}: larger than the {len(sets[0])} training images")
    return sets


__all__ = ["Dataset", "TrainLoader", "build_datasets", "eval_batches"]
