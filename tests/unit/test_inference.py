"""hpcngd.inference: layer-timing hooks, accuracy counting, and checkpoints of another model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcngd.checkpoint import Writer
from hpcngd.config import ModelConfig
from hpcngd.errors import CheckpointError
from hpcngd.inference import (
    Accuracy,
    LayerTimer,
    compare,
    evaluate,
    format_latency,
    layer_latency,
    load_model,
    timed_layers,
)
from hpcngd.models.resnet import build

CPU = torch.device("cpu")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build("resnet8", 10).eval()  # eval: BatchNorm must not change between the two forwards


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_timed_layers_are_the_parametrised_relu_and_pooling_leaves() -> None:
    layers = timed_layers(tiny())
    kinds = {type(m).__name__ for m in layers.values()}
    assert kinds == {"Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Linear"}
    assert "maxpool" not in layers  # nn.Identity in the CIFAR stem: nothing to time
    assert "layer1.0" not in layers and "layer2.0.downsample" not in layers  # containers are not leaves


def test_hooks_time_each_layer_once_leave_the_output_alone_and_go_away() -> None:
    model, x = tiny(), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
        with LayerTimer(model) as timer:
            hooked = model(x)
        ms = timer.take()
    assert torch.equal(hooked, plain)
    assert no_hooks(model)
    assert list(ms) == list(timed_layers(model)) and all(v >= 0 for v in ms.values())
    assert timer.calls["layer1.0.relu"] == 2 and timer.calls["conv1"] == 1  # a block's ReLU runs twice
    assert timer.shapes["fc"] == (4, 10) and timer.shapes["conv1"] == (4, 16, 16, 16)
    assert set(timer.take().values()) == {0.0}  # take() starts the next count


def test_layer_latency_rows_and_table() -> None:
    model, x = tiny(), torch.randn(4, 3, 16, 16)
    fp32, bf16 = (layer_latency(model, x, p, CPU, repeats=2) for p in ("fp32", "bf16"))
    assert no_hooks(model)
    names = [r["name"] for r in fp32.rows]
    assert names == list(timed_layers(model)) and len(set(names)) == len(names)
    assert all(r["ms"] >= 0 for r in fp32.rows + bf16.rows) and fp32.forward_ms > 0
    comparison = compare(fp32, bf16)
    assert [r["name"] for r in comparison["layers"]] == names
    assert comparison["total"]["layers"]["fp32_ms"] == pytest.approx(sum(r["ms"] for r in fp32.rows))
    table = format_latency(comparison, "bf16").splitlines()
    assert [line.split()[0] for line in table[1:-2]] == names
    assert table[0].split()[-2:] == ["ms", "speed-up"] and "bf16 ms" in table[0]


class Fixed(nn.Module):
    """Logits given in advance (one batch)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_evaluate_counts_hits_and_non_finite_logits() -> None:
    logits = torch.tensor(
        [[5.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, float("inf"), 1.0], [1.0, 0.0, float("nan")]]
    )
    labels = torch.tensor([0, 1, 1, 0])
    acc = evaluate(Fixed(logits), [(torch.zeros(4, 1), labels)], "fp32", CPU)
    assert isinstance(acc, Accuracy) and acc.images == 4
    assert acc.nonfinite_logits == 2 and acc.nonfinite_images == 2
    assert acc.top5 == 100.0  # 3 classes: every label is in the top 3
    assert acc.top1 == 50.0  # rows 0 and 2 (torch ranks inf, and NaN, above every number)
    assert not math.isfinite(acc.loss)  # the loss shows the non-finite logits too


def test_load_model_refuses_a_tensor_of_another_shape(tmp_path: Path) -> None:
    model = build("resnet8", 10)
    w = Writer(tmp_path, 1, {"arch": "resnet8", "num_classes": 10})
    for name, t in model.state_dict().items():
        array = t.numpy()
        w.put(f"model/{name}", np.zeros((3, 64), np.float32) if name == "fc.weight" else array)
    path = w.commit(keep_last=1)
    cfg = ModelConfig(arch="resnet8", num_classes=10)
    with pytest.raises(CheckpointError, match=r"model/fc.weight has shape \[3, 64\]; .* needs \[10, 64\]"):
        load_model(path, cfg, CPU)
    with pytest.raises(CheckpointError, match=r"num_classes = 10; the run file has model\.num_classes = 20"):
        load_model(path, ModelConfig(arch="resnet8", num_classes=20), CPU)
    good = Writer(tmp_path, 2, {"arch": "resnet8", "num_classes": 10})
    for name, t in model.state_dict().items():
        good.put(f"model/{name}", t.numpy())
    loaded, stored = load_model(good.commit(keep_last=1), cfg, CPU)
    assert stored is None  # written without a run file
    assert not loaded.training
    stored = model.state_dict()
    assert all(torch.equal(t, stored[name]) for name, t in loaded.state_dict().items())
