"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcngd.data.demo import generate


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo data set (4 training and 2 validation images per class, 24 px)."""
    root = tmp_path_factory.mktemp("demo")
    generate(root, train_per_class=4, val_per_class=2, size=24)
    return root
