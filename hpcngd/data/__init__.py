"""Data sources: every loader shards by rank and is a pure function of (seed, epoch, rank)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from hpcngd.config import DataConfig
from hpcngd.data import dali
from hpcngd.data.folder import ImageFolder, samples_of
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


def check_loader_device(cfg: DataConfig, device: str) -> None:
    """UserError when DALI is to decode on a GPU that this rank (on ``device``: "cpu", "cuda:0") lacks."""
    if cfg.dali_device == "gpu" and not device.startswith("cuda") and resolve_source(cfg) == "dali":
        why = "" if cfg.source == "dali" else ' (data.source = "auto" chose DALI, which is installed)'
        raise UserError(
            f'data.dali_device = "gpu": this rank runs on {device}{why}; set data.dali_device = "cpu" '
            f'or data.source = "folder"'
        )


Listing = tuple[list[tuple[str, int]], list[tuple[str, int]]]


def list_samples(cfg: DataConfig, num_classes: int) -> Listing | None:
    """The (path, label) pairs of the train and val splits that the [data] section names (None for
    synthetic data). On a parallel file system, listing a tree of a million images is a metadata storm
    when every rank does it: one rank lists and sends the result (see the CLI)."""
    if resolve_source(cfg) == "synthetic":
        return None
    return samples_of(cfg, "train", num_classes), samples_of(cfg, "val", num_classes)


def build_datasets(
    cfg: DataConfig, num_classes: int, seed: int, listing: Listing | None = None
) -> tuple[Dataset, Dataset]:
    """The (train, validation) sets the [data] section names; UserError when unusable.

    ``listing``: what :func:`list_samples` returned (on another rank, say); None lists them here.
    """
    sets: tuple[Dataset, Dataset]
    if resolve_source(cfg) != "synthetic":
        if listing is None:
            listing = list_samples(cfg, num_classes)
            assert listing is not None
        elif not Path(cfg.path).is_dir():  # listed elsewhere: is the data visible here (node-local)?
            raise UserError(f"data.path = {cfg.path!r}: folder not found on {socket.gethostname()}")
        sets = (
            ImageFolder(cfg, "train", num_classes, seed, listing[0]),
            ImageFolder(cfg, "val", num_classes, seed, listing[1]),
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


__all__ = [
    "Dataset",
    "Listing",
    "TrainLoader",
    "build_datasets",
    "check_loader_device",
    "evaluation_batches",
    "list_samples",
    "resolve_source",
    "train_loader",
]
