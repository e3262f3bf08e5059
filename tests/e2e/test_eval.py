"""``hpcngd eval``: a trained run's checkpoint evaluated at fp32 and bf16, and the inputs it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import error_lines, hpcngd, write_run
from torch import nn

from hpcngd.models.resnet import build


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> tuple[Path, Path, dict[str, float]]:
    """A tiny fp32 run (resnet8, 2 epochs) that saved a checkpoint after its last step and evaluation:
    (run file, checkpoint, the run's final eval record)."""
    tmp_path = tmp_path_factory.mktemp("eval")
    run_file = write_run(tmp_path, demo)
    done = hpcngd(str(run_file))
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out/tiny/metrics.jsonl").read_text().splitlines()
    final = [r for r in map(json.loads, lines) if r["kind"] == "eval"][-1]
    return run_file, tmp_path / "out/tiny/checkpoints/ckpt-000000004.h5", final


def test_fp32_matches_the_runs_own_evaluation(trained: tuple[Path, Path, dict[str, float]]) -> None:
    # Single rank, the same weights and validation images, batch 20 either way (the run's per-rank
    # batch; eval's default min(batch_size, 256)): the same forward, so the same figures.
    run_file, ckpt, final = trained
    out = ckpt.parent.parent / "fp32.json"
    done = hpcngd("eval", str(run_file), "--checkpoint", str(ckpt), "--precision", "fp32", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert f"fp32: top1 {final['val_top1']:.2f}% top5 {final['val_top5']:.2f}%" in done.stdout
    acc = json.loads(out.read_text())["accuracy"]["fp32"]
    assert acc["top1"] == final["val_top1"] and acc["top5"] == final["val_top5"]
    nowhere = ckpt.parent.parent / "no/such/folder/e.json"  # refused before the evaluation, not after
    bad = hpcngd("eval", str(run_file), "--checkpoint", str(ckpt), "--json", str(nowhere))
    assert bad.returncode == 2 and "fp32: top1" not in bad.stdout
    assert error_lines(bad.stderr) == [
        f"hpcngd: error: --json {nowhere}: cannot write: {nowhere.parent} is not a writable folder"
    ]
    folder = hpcngd("eval", str(run_file), "--checkpoint", str(ckpt), "--json", str(ckpt.parent))
    assert folder.returncode == 2 and "fp32: top1" not in folder.stdout
    assert error_lines(folder.stderr) == [
        f"hpcngd: error: --json {ckpt.parent}: cannot write: it is a folder"
    ]
    assert acc["images"] == final["val_images"] == 20 and acc["nonfinite_logits"] == 0
    assert acc["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert "note:" not in done.stdout and json.loads(out.read_text())["notes"] == []  # the run's settings


def test_settings_other_than_the_runs_are_noted(trained: tuple[Path, Path, dict[str, float]]) -> None:
    """A top-1 that disagrees with the training log should explain itself: what evaluation depends on
    and differs from the run file stored in the checkpoint is one note (training-only keys are not)."""
    run_file, ckpt, _ = trained
    other = ["--set", "data.val_resize=24", "--set", "optim.lr=9.0", "--set", "data.mean=[0.5,0.5,0.5]"]
    other += ["--set", "run.channels_last=true", "--set", "model.init=fan_in"]
    latest = ckpt.parent / "latest"  # followed: the header names the checkpoint it pointed to
    done = hpcngd("eval", str(run_file), "--checkpoint", str(latest), "--precision", "bf16", *other)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"hpcngd eval: {ckpt} (resnet8)"), done.stdout
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    assert notes == [  # --precision is what the command is for: not noted
        "note: evaluated with settings other than the training run's: run.channels_last False -> True, "
        "data.val_resize 18 -> 24, data.mean (0.485, 0.456, 0.406) -> (0.5, 0.5, 0.5)"
    ], done.stdout


def test_bf16_per_layer_table_and_json(trained: tuple[Path, Path, dict[str, float]]) -> None:
    run_file, ckpt, _ = trained
    out = ckpt.parent.parent / "bf16.json"
    args = ["--precision", "bf16", "--per-layer", "--repeats", "2", "--json", str(out)]
    done = hpcngd("eval", str(run_file), "--checkpoint", str(ckpt), *args)
    assert done.returncode == 0, done.stderr
    convs = [name for name, m in build("resnet8", 10).named_modules() if isinstance(m, nn.Conv2d)]
    listed = [line.split()[0] for line in done.stdout.splitlines() if " Conv2d " in line]
    assert listed == convs
    assert "sum of layers" in done.stdout and "whole forward (no hooks)" in done.stdout
    assert "top-1 change bf16 - fp32: " in done.stdout
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and report["device"] == "cpu" and report["torch"]
    assert [r["name"] for r in report["layers"] if r["type"] == "Conv2d"] == convs
    assert all(r["fp32_ms"] > 0 and r["low_ms"] > 0 for r in report["layers"])
    assert all(t["fp32_ms"] > 0 and t["low_ms"] > 0 for t in report["total"].values())
    change = report["top1_change_pp"]
    assert math.isfinite(change)
    assert change == report["accuracy"]["bf16"]["top1"] - report["accuracy"]["fp32"]["top1"]


def test_bad_checkpoints_are_one_line_and_exit_2(trained: tuple[Path, Path, dict[str, float]]) -> None:
    run_file, ckpt, _ = trained
    truncated = ckpt.parent.parent / "truncated.h5"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    cases = [
        (["--checkpoint", str(ckpt), "--set", "model.arch=resnet20"], f"checkpoint {ckpt}: ", "arch"),
        (
            ["--checkpoint", str(ckpt.parent / "nope.h5")],
            f"checkpoint {ckpt.parent}/nope.h5: ",
            "no such file",
        ),
        (["--checkpoint", str(truncated)], f"checkpoint {truncated}: ", "truncated or extended: 4,488 bytes"),
    ]
    for args, where, what in cases:
        done = hpcngd("eval", str(run_file), *args)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        [line] = error_lines(done.stderr)
        assert line.startswith(f"hpcngd: error: {where}") and what in line, line
