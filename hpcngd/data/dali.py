"""NVIDIA DALI input pipelines (optional: ``pip install hpcngd[dali]``).

The division of labour keeps DALI and the folder reader interchangeable:
- Python decides *what*: which samples a rank takes at a step (:mod:`hpcngd.data.sharding`), their
  labels (the folder reader's sample list, :func:`hpcngd.data.folder.samples_of`), and each training
  crop box and flip (the folder reader's :func:`~hpcngd.data.folder.random_resized_box` drawn from the
  sample's own RNG keyed by seed, epoch and index; the box needs only the image size, read from the
  file header).
- DALI does the work: it receives the encoded files, boxes and flips through an external source and
  decodes only the box (``decoders.image_slice``; ``mixed`` = nvJPEG on the GPU with
  ``data.dali_device = "gpu"``), resizes, flips and normalizes, in ``data.workers`` threads.
So both loaders give the same samples in the same order with the same labels and boxes at any rank
count, and resuming at a step continues the stream exactly (nothing repeated or skipped).
Validation: shorter side resized to ``data.val_resize``, then a center crop.

A file DALI cannot decode is found again with Pillow and named in a one-line error.
"""

from __future__ import annotations

import importlib.util
import io
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hpcngd.config import DataConfig
from hpcngd.data import sharding
from hpcngd.data.folder import ImageFolder, random_resized_box
from hpcngd.data.loader import TrainLoader
from hpcngd.errors import UserError

INSTALL_HINT = "pip install 'hpcngd[dali]' (NVIDIA DALI for CUDA 12), or use data.source = \"folder\""


def available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    return (
        importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    )


def _encoded(path: str) -> tuple[np.ndarray, int, int]:
    """The file's bytes and the image's (width, height) from its header; one clear error if unusable."""
    from PIL import Image  # imported here: synthetic runs need no Pillow

    try:
        data = np.fromfile(path, dtype=np.uint8)
        with Image.open(io.BytesIO(data.tobytes())) as img:
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot read image: {exc}") from None
    return data, width, height


def _culprit(paths: Sequence[str], exc: Exception) -> UserError | None:
    """The one-line error for a batch DALI failed on: the first file Pillow cannot decode either.

    None when Pillow reads them all: then the failure is not the data's (out of memory, a DALI or
    nvJPEG error) and the caller re-raises it as it came.
    """
    from PIL import Image  # imported here: synthetic runs need no Pillow

    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as bad:
            return UserError(f"{path}: cannot read image: {bad} (DALI: {reason})")
    return None


class _Pipeline:
    """One DALI pipeline fed batch by batch from ``feed`` (lists of encoded images, labels, boxes, flips)."""

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        feed: Iterator[tuple[list[Any], ...]],
        train: bool,
        channels_last: bool = False,
    ) -> None:
        dali_mod: Any = importlib.import_module("nvidia.dali")  # untyped for mypy: DALI's stubs are partial
        fn, types, pipeline_def = dali_mod.fn, dali_mod.types, dali_mod.pipeline_def
        dali_torch: Any = importlib.import_module("nvidia.dali.plugin.pytorch")

        self.fed: deque[list[str]] = deque(maxlen=4)  # files of the batches DALI may be working on
        self.feed = feed
        gpu = cfg.dali_device == "gpu"
        size = cfg.image_size
        layout = "HWC" if channels_last else "CHW"
        dtype = types.FLOAT16 if cfg.dali_fp16 else types.FLOAT
        mean = [255.0 * m for m in cfg.mean]
        std = [255.0 * s for s in cfg.std]

        @pipeline_def(
            batch_size=batch_size,
            num_threads=max(1, cfg.workers),
            device_id=torch.cuda.current_device() if gpu else None,
            prefetch_queue_depth=2,
        )
        def pipeline() -> tuple[Any, Any]:
            decoder = "mixed" if gpu else "cpu"
            if train:
                encoded, labels, anchor, shape, flip = fn.external_source(
                    source=self._next, num_outputs=5, batch=True
                )
                images = fn.decoders.image_slice(
                    encoded,
                    anchor,
                    shape,
                    device=decoder,
                    output_type=types.RGB,
                    normalized_anchor=False,
                    normalized_shape=False,
                    axis_names="WH",
                )
                images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_TRIANGULAR)
                images = fn.crop_mirror_normalize(
                    images, mirror=flip, mean=mean, std=std, output_layout=layout, dtype=dtype
                )
            else:
                encoded, labels = fn.external_source(source=self._next, num_outputs=2, batch=True)
                images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
                images = fn.resize(
                    images,
                    resize_shorter=cfg.val_resize or round(size / 0.875),
                    interp_type=types.INTERP_TRIANGULAR,
                )
                images = fn.crop_mirror_normalize(
                    images, crop=(size, size), mean=mean, std=std, output_layout=layout, dtype=dtype
                )
            return images, labels

        self.make_iterator = lambda: dali_torch.DALIGenericIterator([pipeline()], ["images", "labels"])

    def _next(self) -> tuple[list[Any], ...]:
        paths, *outputs = next(self.feed)  # StopIteration ends the pipeline
        self.fed.append(paths)
        return tuple(outputs)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        iterator = None
        while True:
            try:
                if iterator is None:
                    iterator = self.make_iterator()  # runs the first batches already
                out = next(iterator)[0]
            except StopIteration:
                return
            except RuntimeError as exc:
                bad_file = _culprit([p for batch in self.fed for p in batch], exc)
                if bad_file is None:
                    raise
                raise bad_file from None
            images = out["images"]
            if images.dim() == 4 and images.shape[-1] == 3:  # HWC: an NCHW view in channels-last strides
                images = images.permute(0, 3, 1, 2)
            yield images, out["labels"].reshape(-1).long()


class DaliTrainLoader(TrainLoader):
    """:class:`~hpcngd.data.loader.TrainLoader`'s shards and order, decoded and augmented by DALI."""

    def __init__(
        self,
        dataset: ImageFolder,
        cfg: DataConfig,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        channels_last: bool = False,
    ) -> None:
        super().__init__(dataset, batch_size, rank, world_size, seed, cfg.workers)
        self.folder = dataset
        self.cfg = cfg
        self.channels_last = channels_last

    def _feed(self, steps: Iterable[int]) -> Iterator[tuple[list[Any], ...]]:
        cfg = self.cfg
        for keys in self.plans(steps):
            paths, encoded, labels, anchors, shapes, flips = [], [], [], [], [], []
            for index, epoch in keys:
                path, label = self.folder.samples[index]
                data, width, height = _encoded(path)
                rng = sharding.sample_rng(self.seed, epoch, index)
                x0, y0, x1, y1 = random_resized_box(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
                flip = cfg.flip and rng.random() < 0.5
                paths.append(path)
                encoded.append(data)
                labels.append(np.array(label, dtype=np.int64))
                anchors.append(np.array([x0, y0], dtype=np.float32))
                shapes.append(np.array([x1 - x0, y1 - y0], dtype=np.float32))
                flips.append(np.array(int(flip), dtype=np.int32))
            yield paths, encoded, labels, anchors, shapes, flips

    def _decoded(self, steps: Iterable[int]) -> Iterator[tuple[Tensor, Tensor]]:
        batch = self.batch_size // self.world_size
        return iter(_Pipeline(self.cfg, batch, self._feed(steps), True, self.channels_last))


def dali_eval_batches(
    dataset: ImageFolder, cfg: DataConfig, batch_size: int, rank: int, world_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's slice of the validation set through DALI (resize shorter side, center crop)."""
    chunks = sharding.eval_chunks(len(dataset), batch_size, rank, world_size)

    def feed() -> Iterator[tuple[list[Any], ...]]:
        for chunk in chunks:
            samples = [dataset.samples[int(i)] for i in chunk]
            encoded = [_encoded(path)[0] for path, _ in samples]
            labels = [np.array(label, dtype=np.int64) for _, label in samples]
            yield [path for path, _ in samples], encoded, labels

    if chunks:
        yield from _Pipeline(cfg, batch_size, feed(), train=False)
