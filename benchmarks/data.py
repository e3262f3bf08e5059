"""Images/s of the input pipelines on this machine: DALI's CPU pipeline against the folder reader.

    python benchmarks/data.py                    # 224 px crops, 1 and 2 workers/threads
    python benchmarks/data.py --images 512 --size 224 --workers 1 2 4

Writes a JPEG set of ImageNet-like sizes (about 500 x 375, quality 90, smooth shapes plus grain) into
a temporary folder, then times whole epochs of training batches (random resized crop, flip, normalize)
through each loader: the folder reader decodes with Pillow in ``workers`` processes, DALI in
``workers`` threads. Prints the median images/s of --repeats epochs (the first batch, which pays for
start-up, is left out of the timing) and the DALI / folder ratio.

First it times the sample plan alone at ImageNet's size (1,281,167 images, global batch 32,768,
90 epochs, rank 0 of 1,024, tiny synthetic images): the seconds to the first batch, and the
milliseconds a batch after it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hpcngd.config import DataConfig
from hpcngd.data import TrainLoader, build_datasets, sharding, train_loader
from hpcngd.data.synthetic import SyntheticImages


def write_set(root: Path, images: int, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        w, h = (500, 375) if i % 3 else (375, 500)
        base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w * h).reshape(h, w, 3)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(10, 120))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        for split in ("train", "val"):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" or i < classes:
                img.save(folder / f"{i:05d}.jpg", quality=90)


def images_per_s(cfg: DataConfig, classes: int, repeats: int) -> float:
    train, _ = build_datasets(cfg, classes, seed=0)
    loader = train_loader(cfg, train, 0, 1, seed=0)
    rates, steps = [], len(train) // cfg.batch_size  # about an epoch
    for repeat in range(repeats):
        batches = loader.batches(repeat * steps, (repeat + 1) * steps)
        next(batches)
        t0 = time.perf_counter()
        count = sum(len(labels) for _, _, labels in batches)
        rates.append(count / (time.perf_counter() - t0))
    return statistics.median(rates)


def plan_start_up(batches: int = 200) -> tuple[float, float]:
    """Seconds to the first batch of an ImageNet-sized 90-epoch run, and ms a batch after it."""
    loader = TrainLoader(SyntheticImages(1_281_167, 2, 1000, 0), 32768, 0, 1024, seed=0, workers=0)
    t0 = time.perf_counter()
    run = loader.batches(0, sharding.run_steps(1_281_167, 32768, 90))
    next(run)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(run)
    return first, (time.perf_counter() - t0) / batches * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    first, per_batch = plan_start_up()
    print(
        f"ImageNet-sized plan (batch 32,768, 90 epochs, rank 0 of 1,024): first batch after "
        f"{first:.2f} s, then {per_batch:.2f} ms a batch"
    )
    with tempfile.TemporaryDirectory(prefix="hpcngd-data-") as tmp:
        write_set(Path(tmp), args.images)
        sizes = [Image.open(f).size for f in list(Path(tmp).rglob("*.jpg"))[:50]]
        mean_kib = np.mean([f.stat().st_size for f in Path(tmp).rglob("*.jpg")]) / 1024
        print(
            f"{args.images} JPEGs, e.g. {sizes[0]} and {sizes[1]}, {mean_kib:.0f} KiB on average; "
            f"{args.size} px crops, batch {args.batch}, median of {args.repeats} epochs"
        )
        print(f"{'workers':>7} {'folder img/s':>13} {'dali cpu img/s':>15} {'ratio':>6}")
        for workers in args.workers:
            common: dict[str, Any] = {
                "path": tmp,
                "image_size": args.size,
                "batch_size": args.batch,
                "workers": workers,
            }
            folder = images_per_s(DataConfig(source="folder", **common), 4, args.repeats)
            dali = images_per_s(DataConfig(source="dali", **common), 4, args.repeats)
            print(f"{workers:>7} {folder:>13.0f} {dali:>15.0f} {dali / folder:>6.2f}")


if __name__ == "__main__":
    main()
