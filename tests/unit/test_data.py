"""Demo set, folder reader (layout, transforms, errors) and loaders (workers do not change batches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcngd.config import DataConfig
from hpcngd.data import TrainLoader, build_datasets, eval_batches
from hpcngd.data.demo import CLASSES, generate
from hpcngd.data.folder import ImageFolder, random_resized_box, samples_of
from hpcngd.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert generate(root, train_per_class=6, val_per_class=2, size=40) == 80
    return root


def folder_cfg(root: Path, **kw: object) -> DataConfig:
    kw.setdefault("batch_size", 8)
    return DataConfig(source="folder", path=str(root), image_size=24, **kw)  # type: ignore[arg-type]


def test_demo_layout_and_determinism(demo: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in (demo / "train").iterdir()) == sorted(CLASSES)
    assert len(list((demo / "val" / "disk").iterdir())) == 2
    generate(tmp_path, train_per_class=1, val_per_class=0, size=40)
    for name in CLASSES:
        file = f"train/{name}/{name}_00000.jpg"
        assert (tmp_path / file).read_bytes() == (demo / file).read_bytes()
    with pytest.raises(
        UserError, match=r"/train: not empty; remove it or write the demo set to a new folder"
    ):
        generate(tmp_path, train_per_class=2, val_per_class=0, size=24)  # would mix two sets
    assert len(list((tmp_path / "train" / "disk").iterdir())) == 1


def test_folder_reader_labels_and_shapes(demo: Path) -> None:
    train, val = build_datasets(folder_cfg(demo), 10, seed=0)
    assert isinstance(train, ImageFolder) and len(train) == 60 and len(val) == 20
    assert [label for _, label in train.samples] == [c for c in range(10) for _ in range(6)]
    image, label = train.item(0, epoch=0)
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and label == 0
    assert train.samples[0][0].endswith("checker/checker_00000.jpg")
    assert train.samples[-1][1] == 9
    # Train augmentation: same (epoch, index) -> same crop; another epoch -> another crop.
    assert torch.equal(train.item(5, 1)[0], train.item(5, 1)[0])
    assert not torch.equal(train.item(5, 1)[0], train.item(5, 2)[0])
    # Validation is deterministic and ignores the epoch.
    assert torch.equal(val.item(3, 0)[0], val.item(3, 9)[0])


def test_random_resized_box_stays_inside() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_box(50, 30, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x0 < x1 <= 50 + 1e-9 and 0 <= y0 < y1 <= 30 + 1e-9
        assert 3 / 4 - 1e-6 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 1e-6


def test_workers_do_not_change_batches(demo: Path) -> None:
    train, val = build_datasets(folder_cfg(demo), 10, seed=3)
    runs = []
    for workers in (0, 2):
        loader = TrainLoader(train, batch_size=12, rank=1, world_size=2, seed=3, workers=workers)
        runs.append(list(loader.batches(2, 10)))
    assert [s for s, _, _ in runs[0]] == list(range(2, 10))
    for (_, x0, y0), (_, x1, y1) in zip(*runs, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    labels = torch.cat([y for _, y in eval_batches(val, 3, rank=0, world_size=1, workers=2)])
    assert labels.tolist() == [label for _, label in val.samples]  # type: ignore[attr-defined]


def test_missing_and_bad_folders(tmp_path: Path, demo: Path) -> None:
    with pytest.raises(UserError, match=r"data.path = '.*nothing': folder not found"):
        build_datasets(folder_cfg(tmp_path / "nothing"), 10, 0)
    (tmp_path / "notrain").mkdir()
    with pytest.raises(
        UserError, match=r"notrain/train: data folder not found \(expected <class>/<image> folders\)"
    ):
        build_datasets(folder_cfg(tmp_path / "notrain"), 10, 0)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty/train: no class folders"):
        build_datasets(folder_cfg(tmp_path / "empty"), 10, 0)
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noval" / "train" / "a" / "x.txt").write_text("x")
    with pytest.raises(UserError, match=r"noval/train/a: class folder holds no images \(\.jpg, "):
        build_datasets(folder_cfg(tmp_path / "noval"), 1, 0)
    with pytest.raises(UserError, match=r"demo\d*/train: 10 class folders, but model.num_classes = 5"):
        build_datasets(folder_cfg(demo), 5, 0)


def test_a_bad_file_list_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    """data.train_list / val_list: 'relative/path label' lines (a path may hold spaces; blank lines are
    skipped); anything else is refused before training, naming the list file (and line)."""
    lst = tmp_path / "list.txt"
    c = folder_cfg(tmp_path, train_list="list.txt")
    lst.write_text("\ndir with space/a b.jpg 3\nc.png 0\n")
    assert samples_of(c, "train", 5) == [
        (str(tmp_path / "dir with space/a b.jpg"), 3),
        (str(tmp_path / "c.png"), 0),
    ]
    bad = [
        ("x.jpg 1\n\nno_label.jpg\n", rf"^{lst}:3: expected 'relative/path label', got 'no_label.jpg'$"),
        ("x.jpg one\n", rf"^{lst}:1: expected 'relative/path label', got 'x.jpg one'$"),
        (" 4\n", rf"^{lst}:1: expected 'relative/path label', got ' 4'$"),
        ("x.jpg -1\n", rf"^{lst}:1: expected 'relative/path label', got 'x.jpg -1'$"),
        ("\n  \n", rf"^{lst}: file list is empty$"),
        ("x.jpg 1\ny.jpg 7\n", rf"^{lst}: label 7 but model.num_classes = 5$"),
        (b"x.jpg 1\n\xff\xfe 2\n", rf"^{lst}: cannot read file list: 'utf-8' codec can't decode"),
        (None, rf"^{lst}: cannot read file list: \[Errno 2\] No such file"),
    ]
    for text, message in bad:
        if text is None:
            lst.unlink()
        else:
            lst.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError, match=message):
            samples_of(c, "train", 5)


def test_val_classes_are_matched_to_train_by_name(tmp_path: Path) -> None:
    """A val folder named differently would shift every label after it: refused, naming the folders."""
    generate(tmp_path, train_per_class=1, val_per_class=1, size=16)
    (tmp_path / "val" / "disk").rename(tmp_path / "val" / "zdisk")
    with pytest.raises(
        UserError, match=r"val: class folders differ from .*train's; missing: disk; not in train: zdisk"
    ):
        build_datasets(folder_cfg(tmp_path, batch_size=2), 10, 0)
    (tmp_path / "val" / "zdisk").rename(tmp_path / "val" / "disk")
    (tmp_path / "val" / "ring").rename(tmp_path / "ring")
    with pytest.raises(UserError, match=r"val: class folders differ .*; missing: ring$"):
        build_datasets(folder_cfg(tmp_path, batch_size=2), 10, 0)


def test_hidden_entries_are_skipped_and_bad_entries_named_when_listing(tmp_path: Path) -> None:
    generate(tmp_path, train_per_class=2, val_per_class=1, size=16)
    train = tmp_path / "train"
    (train / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    (train / "disk" / "._disk_00000.jpg").write_bytes(b"macOS metadata")  # nor a hidden file an image
    (train / "disk" / "scan.TIF").write_bytes((train / "disk" / "disk_00000.jpg").read_bytes())
    listed, _ = build_datasets(folder_cfg(tmp_path, batch_size=2), 10, 0)
    names = [Path(p).name for p, _ in listed.samples]  # type: ignore[attr-defined]
    assert len(names) == 21 and "scan.TIF" in names and "._disk_00000.jpg" not in names
    (train / "ring" / "missing.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(
        UserError, match=r"ring/missing.jpg: not a readable file \(a broken link, or a folder\)"
    ):
        build_datasets(folder_cfg(tmp_path, batch_size=2), 10, 0)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit PNG reads as its 8-bit counterpart, not as the white that Pillow's convert gives."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "flat.png")
    cfg = folder_cfg(tmp_path, mean=[0.0] * 3, std=[1.0] * 3)
    samples = [(str(tmp_path / "deep.png"), 0), (str(tmp_path / "flat.png"), 0)]
    reader = ImageFolder(cfg, "val", 1, 0, samples)
    deep, flat = reader.item(0, 0)[0], reader.item(1, 0)[0]
    assert float(flat.min()) < 0.1 and float(flat.max()) > 0.9
    torch.testing.assert_close(deep, flat, atol=1.5 / 255, rtol=0)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    generate(tmp_path, train_per_class=1, val_per_class=1, size=16)
    bad = tmp_path / "train" / "disk" / "disk_00000.jpg"
    bad.write_bytes(b"not a jpeg")
    train, _ = build_datasets(folder_cfg(tmp_path), 10, 0)
    index = [path for path, _ in train.samples].index(str(bad))  # type: ignore[attr-defined]
    with pytest.raises(UserError, match=r"disk_00000.jpg: cannot read image"):
        train.item(index, 0)


def test_batch_larger_than_training_set(demo: Path) -> None:
    with pytest.raises(UserError, match=r"data.batch_size = 61: larger than the 60 training images"):
        build_datasets(folder_cfg(demo, batch_size=61), 10, 0)


def test_synthetic_is_a_function_of_index() -> None:
    train, val = build_datasets(DataConfig(image_size=8, synthetic_train_samples=10, batch_size=2), 4, seed=1)
    assert torch.equal(train.item(3, 0)[0], train.item(3, 5)[0])
    assert not torch.equal(train.item(3, 0)[0], train.item(4, 0)[0])
    assert not torch.equal(train.item(3, 0)[0], val.item(3, 0)[0])
    assert train.item(0, 0)[0].shape == (3, 8, 8)


def test_plans_are_made_as_batches_are_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's sample plans are drawn lazily, one permutation per epoch: planning every step of a
    90-epoch ImageNet run up front, a permutation per step, took 75 s before the first step."""
    from hpcngd.data import sharding
    from hpcngd.data.synthetic import SyntheticImages

    drawn: list[int] = []
    permutation = sharding.epoch_permutation

    def counted(num_samples: int, seed: int, epoch: int) -> np.ndarray:
        drawn.append(epoch)
        return permutation(num_samples, seed, epoch)

    monkeypatch.setattr(sharding, "epoch_permutation", counted)
    loader = TrainLoader(SyntheticImages(40, 4, 3, 0), batch_size=12, rank=0, world_size=2, seed=5, workers=0)
    batches = loader.batches(3, 1000)  # 40 / 12 = 3.33 steps an epoch
    got = [next(batches)[0] for _ in range(5)]
    assert got == [3, 4, 5, 6, 7]
    assert drawn == [0, 1, 2]  # positions 36-41 (epochs 0 and 1) to 84-89 (epoch 2)
    for step, keys in zip([3, 9, 0], loader.plans([3, 9, 0]), strict=True):
        positions = range(step * 12, step * 12 + 6)  # rank 0's half of the global batch
        assert keys == [(int(permutation(40, 5, p // 40)[p % 40]), p // 40) for p in positions]


def test_a_listing_from_another_rank_needs_the_folder_here(demo: Path, tmp_path: Path) -> None:
    """Rank 0 lists the images for every rank; a rank on a node where data.path is missing (data staged
    to node-local disks, one node left out) says so by host name instead of failing at its first image."""
    import socket

    from hpcngd.data import list_samples

    listing = list_samples(folder_cfg(demo), 10)
    assert listing is not None
    train, val = build_datasets(folder_cfg(demo), 10, 0, listing)
    assert isinstance(train, ImageFolder) and train.samples == listing[0] and len(val) == 20
    with pytest.raises(UserError, match=f"folder not found on {socket.gethostname()}"):
        build_datasets(folder_cfg(tmp_path / "elsewhere"), 10, 0, listing)
    assert list_samples(DataConfig(source="synthetic"), 10) is None
