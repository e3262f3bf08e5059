"""An image-folder reader for the ImageNet layout, without DALI.

``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``; class indices are the sorted class folder
names of ``train`` (as torchvision's ImageFolder numbers them), and ``val`` must hold the same names.
Hidden entries (``.name``: ``.ipynb_checkpoints``, macOS's ``._x.jpg``) are skipped; an image name that
is not a readable file (a broken link, a folder) is an error when listing, not hours into a run.
Or a file list (``data.train_list``/``data.val_list``): lines ``relative/path label`` (DALI's format),
in that order, relative to ``data.path``. The DALI loader reads the same sample list
(:func:`samples_of`), so both number classes and order samples alike.
Training images get a random resized crop and a horizontal flip drawn from the sample's own RNG
(:func:`hpcngd.data.sharding.sample_rng`), validation images a resize of the shorter side and a center
crop. Images are decoded with Pillow in the loader's worker processes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from hpcngd.config import DataConfig
from hpcngd.data.sharding import sample_rng
from hpcngd.errors import UserError

if TYPE_CHECKING:
    from PIL.Image import Image as PilImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what Pillow and DALI decode


def class_names(split_dir: Path) -> list[str]:
    """The sorted, not hidden, sub-folder names of a split; one clear error if there are none."""
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: data folder not found (expected <class>/<image> folders)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir}: no class folders in it")
    return classes


def images_in(folder: Path) -> list[str]:
    """The sorted image paths of one class folder (hidden names skipped); an error if there are none or
    one is not a readable file. ``scandir`` knows regular files without a stat call per image."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if not entry.is_file():
                raise UserError(f"{entry.path}: not a readable file (a broken link, or a folder)")
            files.append(entry.path)
    if not files:
        raise UserError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files)


def scan(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) pairs of one split whose class folders must be named ``classes`` (label = index)."""
    found = class_names(split_dir)
    if found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise UserError(
            f"{split_dir}: class folders differ from {split_dir.parent / 'train'}'s"
            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            + (f"; not in train: {', '.join(extra[:5])}" if extra else "")
        )
    return [(f, label) for label, name in enumerate(classes) for f in images_in(split_dir / name)]


def random_resized_box(
    width: int, height: int, scale: tuple[float, ...], ratio: tuple[float, ...], rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """A crop box of random area fraction in ``scale`` and log-uniform aspect in ``ratio``.

    Ten tries, as in the Inception/torchvision recipe; otherwise the largest central box whose aspect is
    clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
    w, h = min(w, width), min(h, height)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return (x0, y0, x0 + w, y0 + h)


def read_list(root: Path, list_file: str) -> list[tuple[str, int]]:
    """(path, label) pairs of a file list; one clear error naming the file and line if unusable."""
    path = root / list_file
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read file list: {exc}") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, _, label = line.rstrip().rpartition(" ")
        if not name or not label.isdigit():
            raise UserError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        samples.append((str(root / name), int(label)))
    if not samples:
        raise UserError(f"{path}: file list is empty")
    return samples


def samples_of(cfg: DataConfig, split: str, num_classes: int) -> list[tuple[str, int]]:
    """The (path, label) pairs of ``split`` ("train" or "val") that the [data] section names."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise UserError(f"data.path = {cfg.path!r}: folder not found")
    list_file = cfg.train_list if split == "train" else cfg.val_list
    if list_file:
        samples = read_list(root, list_file)
        top = max(label for _, label in samples)
        if top >= num_classes:
            raise UserError(f"{root / list_file}: label {top} but model.num_classes = {num_classes}")
        return samples
    classes = class_names(root / "train")
    if len(classes) != num_classes:
        raise UserError(
            f"{root / 'train'}: {len(classes)} class folders, but model.num_classes = {num_classes}"
        )
    return scan(root / split, classes)


def rgb(img: PilImage) -> PilImage:
    """8-bit RGB of a decoded image. Integer grayscale of more than 8 bits (16-bit PNG and TIFF: modes
    ``I;16*`` and ``I``) is scaled from 0..65535, where Pillow's ``convert`` would clip it at 255."""
    from PIL import Image

    if img.mode.startswith("I"):
        values = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return img.convert("RGB")


class ImageFolder:
    """One split of an image folder with its transform.

    Args:
        cfg: the [data] section.
        split: "train" (random crop + flip) or "val" (resize + center crop).
        num_classes: expected class count (``model.num_classes``).
        seed: run seed for the per-sample augmentation RNG.
        samples: the split's (path, label) pairs when already listed (:func:`samples_of`), e.g. by
            another rank.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        num_classes: int,
        seed: int,
        samples: list[tuple[str, int]] | None = None,
    ) -> None:
        self.samples = samples_of(cfg, split, num_classes) if samples is None else samples
        self.cfg = cfg
        self.train = split == "train"
        self.seed = seed
        self.num_classes = num_classes
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def item(self, index: int, epoch: int) -> tuple[Tensor, int]:
        """Decoded, augmented, normalized image ``index`` of epoch ``epoch`` and its label."""
        from PIL import Image  # imported here: synthetic runs need no Pillow

        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                img = rgb(opened)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"{path}: cannot read image: {exc}") from None
        size = self.cfg.image_size
        if self.train:
            rng = sample_rng(self.seed, epoch, index)
            box = random_resized_box(img.width, img.height, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
            out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if self.cfg.flip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            # Shorter side -> val_resize, then a central size x size crop, in one resampling.
            resize = self.cfg.val_resize or round(size / 0.875)
            side = size * min(img.width, img.height) / resize
            x0, y0 = (img.width - side) / 2, (img.height - side) / 2
            out = img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        pixels = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float().div_(255.0) - self.mean) / self.std, label
