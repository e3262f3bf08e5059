"""Architectures: torchvision's ResNet-50 parameter count and names; the small nets' shapes."""

from __future__ import annotations

import pytest
import torch

from hpcngd.config import MODEL_ARCHS, MODEL_HALVINGS
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


@pytest.mark.parametrize("arch", ["resnet50", "resnet20"])
def test_fan_in_init_starts_every_weight_at_the_rescaling_cap(arch: str) -> None:
    """init = fan_in: every conv/fc weight's norm is about sqrt(2 c_out), what weight rescaling caps; the
    default (torchvision's fan-out convs) starts a conv at sqrt(2 c_in), the stem at 0.2 of the cap."""
    torch.manual_seed(0)
    for init in ("fan_in", "fan_out"):
        model = build(arch, 1000 if arch == "resnet50" else 10, init=init)
        ratios = {
            name: float(m.weight.detach().norm()) / (2 * m.weight.shape[0]) ** 0.5
            for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        }
        if init == "fan_in":
            assert all(0.9 < r < 1.1 for r in ratios.values()), ratios
            assert float(model.fc.bias.detach().abs().max()) == 0.0
        else:
            want = (model.conv1.in_channels / model.conv1.out_channels) ** 0.5
            assert ratios["conv1"] == pytest.approx(want, rel=0.1)


def test_resnet50d_stem_and_shortcuts() -> None:
    """ResNet-50-D (the released SP-NGD system's model): three 3x3 convs in the stem, and where a block
    strides, a 2x2 average pool before an unstrided 1x1 shortcut conv."""
    model = build("resnet50d", 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_576_264
    convs = [m for m in model.conv1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 32, 2),
        (32, 32, 1),
        (32, 64, 1),
    ]
    for stage, stride in ((model.layer1, 1), (model.layer2, 2), (model.layer4, 2)):
        pool, conv, _ = stage[0].downsample if stride > 1 else (None, *stage[0].downsample)
        assert conv.stride == (1, 1) and (pool is None or pool.stride == 2)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_halvings_before_the_last_batchnorm(arch: str) -> None:
    """config.MODEL_HALVINGS (run files are checked without building a model) against the model: one
    image of side 2^k leaves the last BatchNorm one value per channel, one of 2^k + 1 does not."""
    assert set(ARCHS) == set(MODEL_ARCHS)
    side = 2 ** MODEL_HALVINGS[arch]
    with torch.device("meta"):
        model = build(arch, 10).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.empty(1, 3, side, side, device="meta"))
    assert model(torch.empty(1, 3, side + 1, side + 1, device="meta")).shape == (1, 10)
