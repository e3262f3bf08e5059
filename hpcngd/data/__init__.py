"""Data sources: every loader shards by rank and is a pure function of (seed, epoch, rank)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from hpcngd.config import DataConfig
from hpcngd.data import dali
from hpcngd.data.folder import ImageFolder
from hpcngd.data.loader import Dataset, TrainLoader, eval_batches
from hpcngd.data.synthetic import SyntheticImages
from hpcngd.errors import UserError


def resolve_source(cfg: DataConfig) -> str:
    """The loader ``data.source`` means here: "synthetic", "folder" or "dali" ("auto" is decided)."""
    if cfg.source == "auto":
        return "dali" if dali.available() else "folder"
    if cfg.source == "dali" and not dali.available():
        raise UserError(f'data.source = "dali": NVIDIA DALI is not installed here; {dali.INSTALL_HINT}')
    return cfg.source


def build_datasets(cfg: DataConfig, num_classes: int, seed: int) -> tuple[Dataset, Dataset]:
    """The (train, validation) sets the [data] section names; UserError when unusable."""
    sets: tuple[Dataset, Dataset]
    if resolve_source(cfg) != "synthetic":
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


def train_loader(
    cfg: DataConfig,
    dataset: Dataset,
    rank: int,
    world_size: int,
    seed: int,
    channels_last: bool = False,
    pin_memory: bool = False,
) -> TrainLoader:
    """This rank's loader of the training set, DALI or not as the [data] section says.

    ``channels_last``: DALI writes NHWC batches (the other loaders' batches are converted on the device).
    ``pin_memory``: host batches in pinned memory, for asynchronous copies to a GPU.
    """
    if resolve_source(cfg) == "dali":
        assert isinstance(dataset, ImageFolder)
        return dali.DaliTrainLoader(dataset, cfg, cfg.batch_size, rank, world_size, seed, channels_last)
    return TrainLoader(dataset, cfg.batch_size, rank, world_size, seed, cfg.workers, pin_memory)


def evaluation_batches(
    cfg: DataConfig, dataset: Dataset, batch_size: int, rank: int, world_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's slice of the validation set in batches of at most ``batch_size``."""
    if resolve_source(cfg) == "dali":
        assert isinstance(dataset, ImageFolder)
        return dali.dali_eval_batches(dataset, cfg, batch_size, rank, world_size)
    return eval_batches(dataset, batch_size, rank, world_size, cfg.workers)


__all__ = ["Dataset", "TrainLoader", "build_datasets", "evaluation_batches", "resolve_source", "train_loader"]
