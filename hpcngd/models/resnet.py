"""ResNets: ImageNet ResNet-18/34/50 with torchvision's architecture and parameter names, and the
small CIFAR-style ResNet-8/20/32 of He et al. (2016) for CPU runs.

ResNet-50 here is torchvision's ``resnet50`` (v1.5: stride on the 3x3 conv of a bottleneck), with the
same module names (``conv1``, ``layer3.2.bn2``, ``fc`` ...), 25,557,032 parameters for 1000 classes, and
the same initialization (Kaiming-normal fan-out convs, BN gamma 1 / beta 0, torch's default Linear), or
with ``init="fan_in"`` the released SP-NGD system's (He-normal fan-in convs, fc weights N(0, 2/c_in) and
bias 0): a conv/fc weight's Frobenius norm then starts at about sqrt(2 c_out), the norm that SP-NGD's
weight rescaling caps, where fan-out convs start at sqrt(2 c_in) (a 2x cut at the first step for
layer4's 2048->512 convs, 0.2 of the cap for the stem).
ResNet-50-D (He et al., "Bag of Tricks", 2019), the released SP-NGD system's model, differs in its stem
(three 3x3 convs, to 32, 32 and 64 channels) and its strided shortcuts (a 2x2 average pool, then an
unstrided 1x1 conv): 25,576,264 parameters for 1000 classes.
The CIFAR nets use a 1x1-conv + BN projection shortcut when the shape changes (option B of the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int, avg_down: bool) -> nn.Module | None:
    """None (identity), a strided 1x1 conv + BN, or (``avg_down``, ResNet-D) a 2x2 average pool, then an
    unstrided 1x1 conv + BN, so the shortcut sees every input pixel."""
    if stride == 1 and c_in == c_out:
        return None
    if avg_down and stride > 1:
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        return nn.Sequential(pool, _conv1x1(c_in, c_out), nn.BatchNorm2d(c_out))
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs; used by ResNet-18/34 and the CIFAR nets."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, avg_down: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(c_in, width, stride, avg_down)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion; ResNet-50."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, avg_down: bool = False) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride, avg_down)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, fully connected classifier.

    Args:
        block: BasicBlock or Bottleneck.
        depths: blocks per stage.
        widths: base width per stage (the block's output is width * expansion).
        num_classes: classifier outputs.
        stem: ``cifar`` (one 3x3 conv), ``imagenet`` (7x7/2 conv + 3x3/2 max-pool) or ``deep`` (ResNet-D:
            3x3/2 conv to 32, 3x3 to 32, 3x3 to the first width, each but the last with BN and ReLU,
            then the max-pool).
        avg_down: ResNet-D's shortcuts (average pool, then an unstrided 1x1 conv) where blocks stride.
        zero_init_residual: start every block as identity by zeroing its last BN gamma.
        init: ``fan_out`` (torchvision's) or ``fan_in`` (the released SP-NGD system's), see above.
    """

    def __init__(
        self,
        block: Block,
        depths: list[int],
        widths: list[int],
        num_classes: int,
        stem: str,
        avg_down: bool = False,
        zero_init_residual: bool = False,
        init: str = "fan_out",
    ) -> None:
        super().__init__()
        c = widths[0]
        self.conv1: nn.Module
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False)
        elif stem == "deep":
            self.conv1 = nn.Sequential(
                _conv3x3(3, 32, 2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                _conv3x3(32, 32), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                _conv3x3(32, c),
            )  # fmt: skip
        else:
            self.conv1 = _conv3x3(3, c)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        pooled = stem in ("imagenet", "deep")
        self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1) if pooled else nn.Identity()
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c, width, stride=2 if (i > 0 and j == 0) else 1, avg_down=avg_down))
                c = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        if init not in ("fan_out", "fan_in"):
            raise RuntimeError(f"unknown init {init!r}; config validation should have caught it")
        mode: Literal["fan_in", "fan_out"] = "fan_in" if init == "fan_in" else "fan_out"
        if mode == "fan_in":
            nn.init.normal_(self.fc.weight, std=math.sqrt(2.0 / c))
            nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar(n: int) -> Callable[..., ResNet]:
    return lambda k, **kw: ResNet(BasicBlock, [n] * 3, [16, 32, 64], k, "cifar", **kw)


def _imagenet(block: Block, depths: list[int], d: bool = False) -> Callable[..., ResNet]:
    stem = "deep" if d else "imagenet"
    return lambda k, **kw: ResNet(block, depths, [64, 128, 256, 512], k, stem, d, **kw)


ARCHS: dict[str, Callable[..., ResNet]] = {
    "resnet8": _cifar(1),
    "resnet20": _cifar(3),
    "resnet32": _cifar(5),
    "resnet18": _imagenet(BasicBlock, [2, 2, 2, 2]),
    "resnet34": _imagenet(BasicBlock, [3, 4, 6, 3]),
    "resnet50": _imagenet(Bottleneck, [3, 4, 6, 3]),
    "resnet50d": _imagenet(Bottleneck, [3, 4, 6, 3], d=True),
}


def build(arch: str, num_classes: int, zero_init_residual: bool = False, init: str = "fan_out") -> ResNet:
    """Build a model by name (see ``ARCHS``)."""
    if arch not in ARCHS:
        raise RuntimeError(f"unknown arch {arch!r}; config validation should have caught it")
    return ARCHS[arch](num_classes, zero_init_residual=zero_init_residual, init=init)
