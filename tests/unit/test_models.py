"""Architectures: torchvision's ResNet-50 parameter count and names; the small nets' shapes."""

from __future__ import annotations

import pytest
import torch

from hpcngd.models.resnet import ARCHS, build


def test_resnet50_matches_torchvision() -> None:
    model = build("resnet50", 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 161 and len(model.state_dict()) == 320
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert names[-2:] == ["fc.weight", "fc.bias"]
    shapes = dict(model.named_parameters())
    assert shapes["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert shapes["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert shapes["layer4.2.bn3.weight"].shape == (2048,)
    assert "layer3.5.bn3.running_var" in model.state_dict()
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5


@pytest.mark.parametrize(("arch", "count"), [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_basic_block_imagenet_counts(arch: str, count: int) -> None:
    assert sum(p.numel() for p in build(arch, 1000).parameters()) == count


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_shapes(arch: str) -> None:
    size = 64 if arch in ("resnet18", "resnet34", "resnet50") else 16
    out = build(arch, 7)(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)


def test_zero_init_residual() -> None:
    model = build("resnet20", 10, zero_init_residual=True)
    assert all(
        float(b.bn2.weight.detach().abs().sum()) == 0 for stage in (model.layer1, model.layer2) for b in stage
    )
    model = build("resnet50", 10, zero_init_residual=True)
    assert float(model.layer1[0].bn3.weight.detach().abs().sum()) == 0
    assert float(model.layer1[0].bn2.weight.detach().abs().sum()) > 0
    assert float(build("resnet20", 10).layer1[0].bn2.weight.detach().sum()) == 16
