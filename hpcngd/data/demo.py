"""``hpcngd data demo OUT_DIR``: a small, learnable image-classification set in ImageNet layout.

Ten classes of shapes and textures (disk, square, triangle, plus, ring, horizontal / vertical /
diagonal stripes, checkerboard, dots), each drawn at a random position, size, phase and colour over a
noisy random background, saved as JPEG under ``OUT_DIR/train/<class>/`` and ``OUT_DIR/val/<class>/``.
Everything is a pure function of the seed, so two machines generate the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from hpcngd.errors import UserError

Grid = tuple[np.ndarray, np.ndarray]


def _disk(g: Grid, r: np.random.Generator) -> np.ndarray:
    x, y = g
    return (x**2 + y**2) < r.uniform(0.3, 0.6) ** 2


def _square(g: Grid, r: np.random.Generator) -> np.ndarray:
    x, y = g
    s = r.uniform(0.25, 0.5)
    return (abs(x) < s) & (abs(y) < s)


def _triangle(g: Grid, r: np.random.Generator) -> np.ndarray:
    x, y = g
    s = r.uniform(0.3, 0.6)
    return (y < s) & (y > 2 * abs(x) - s)


def _plus(g: Grid, r: np.random.Generator) -> np.ndarray:
    x, y = g
    s, w = r.uniform(0.35, 0.6), r.uniform(0.08, 0.15)
    return ((abs(x) < w) & (abs(y) < s)) | ((abs(y) < w) & (abs(x) < s))


def _ring(g: Grid, r: np.random.Generator) -> np.ndarray:
    x, y = g
    rad, w = r.uniform(0.35, 0.6), r.uniform(0.07, 0.12)
    return abs(np.sqrt(x**2 + y**2) - rad) < w


def _stripes(direction: tuple[float, float]) -> Callable[[Grid, np.random.Generator], np.ndarray]:
    def draw(g: Grid, r: np.random.Generator) -> np.ndarray:
        t = g[0] * direction[0] + g[1] * direction[1]
        return np.sin(t * r.uniform(9, 16) + r.uniform(0, 6.3)) > 0

    return draw


def _checker(g: Grid, r: np.random.Generator) -> np.ndarray:
    f, p = r.uniform(7, 12), r.uniform(0, 6.3)
    return (np.sin(g[0] * f + p) > 0) ^ (np.sin(g[1] * f + p) > 0)


def _dots(g: Grid, r: np.random.Generator) -> np.ndarray:
    f = r.uniform(8, 13)
    return (np.sin(g[0] * f) * np.sin(g[1] * f + r.uniform(0, 6.3))) > 0.55


CLASSES: dict[str, Callable[[Grid, np.random.Generator], np.ndarray]] = {
    "disk": _disk,
    "square": _square,
    "triangle": _triangle,
    "plus": _plus,
    "ring": _ring,
    "stripes_h": _stripes((0.0, 1.0)),
    "stripes_v": _stripes((1.0, 0.0)),
    "stripes_diag": _stripes((0.7071, 0.7071)),
    "checker": _checker,
    "dots": _dots,
}


def draw(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size x size x 3`` uint8 image of class ``label``."""
    axis = np.linspace(-1.0, 1.0, size)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    mask = list(CLASSES.values())[label]((x - cx, y - cy), rng)
    background = rng.uniform(0, 255, size=3)
    foreground = (background + rng.uniform(90, 165, size=3)) % 255  # always visibly different
    image = np.where(mask[..., None], foreground, background)
    image = image + rng.normal(0, 20, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(
    out_dir: str | Path,
    train_per_class: int = 300,
    val_per_class: int = 50,
    size: int = 64,
    seed: int = 0,
) -> int:
    """Write the demo set; returns the number of images written.

    Refuses a folder whose ``train`` or ``val`` already holds anything: a second set of another size or
    count written over the first would mix with it.
    """
    out = Path(out_dir)
    for split in ("train", "val"):
        if (out / split).is_dir() and any((out / split).iterdir()):
            raise UserError(f"{out / split}: not empty; remove it or write the demo set to a new folder")
    count = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng((seed, split == "val", label, i))
                Image.fromarray(draw(label, size, rng)).save(folder / f"{name}_{i:05d}.jpg", quality=90)
                count += 1
    return count
