"""DALI's GPU pipeline (mixed nvJPEG decoder) against its CPU pipeline. Marker ``gpu``: skipped without
CUDA or DALI; run ``pytest -m gpu tests/gpu`` on a GPU machine that has DALI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpcngd.config import DataConfig
from hpcngd.data import train_loader
from hpcngd.data.demo import generate
from hpcngd.data.folder import ImageFolder

pytest.importorskip("nvidia.dali")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_pipeline_matches_the_cpu_pipeline(tmp_path: Path) -> None:
    generate(tmp_path, train_per_class=4, val_per_class=1, size=64)
    batches = {}
    for device in ("cpu", "gpu"):
        cfg = DataConfig(source="dali", path=str(tmp_path), image_size=32, batch_size=8, dali_device=device)
        loader = train_loader(cfg, ImageFolder(cfg, "train", 10, seed=1), 0, 1, seed=1)
        batches[device] = list(loader.batches(0, 5))
    assert len(batches["gpu"]) == len(batches["cpu"]) == 5
    for (_, x, y), (_, cx, cy) in zip(batches["gpu"], batches["cpu"], strict=True):
        assert x.is_cuda and x.shape == cx.shape and x.dtype == torch.float32
        assert torch.equal(y.cpu(), cy)
        assert (x.cpu() - cx).abs().mean() < 0.1  # nvJPEG and libjpeg-turbo round differently
