"""What a run reports (hpcngd.records): the target record, the time to accuracy. No MPI."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

from hpcngd.metrics import MetricsLog, RunClock
from hpcngd.records import first_reaching, log_eval


def test_the_first_evaluation_that_reaches_the_target_is_timed_once(tmp_path: Path) -> None:
    tops = iter([40.0, 60.0, 55.0, 70.0])
    console = io.StringIO()
    t = SimpleNamespace(
        cfg=SimpleNamespace(log=SimpleNamespace(target_top1=55.0)),
        log=MetricsLog(tmp_path / "metrics.jsonl", active=True, stream=console),
        clock=RunClock(),
        evals=[],
        step=0,
    )
    t.evaluate = lambda: {
        "val_loss": 1.0, "val_top1": next(tops), "val_top5": 90.0, "val_images": 8, "val_nonfinite_images": 0
    }  # fmt: skip
    for step in (10, 20, 30, 40):
        t.step = step
        t.clock.load(step / 2, step)  # as if step s took 0.5 s, and s s with evaluations
        log_eval(t, step / 10)
    t.log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    targets = [r for r in records if r["kind"] == "target"]
    got = [(r["step"], r["epoch"], r["target_top1"], r["val_top1"]) for r in targets]
    assert got == [(20, 2.0, 55.0, 60.0)]
    assert (targets[0]["train_s"], targets[0]["elapsed_s"]) == (10.0, 20.0)
    assert all({"train_s", "elapsed_s"} <= set(r) for r in records)
    assert first_reaching(t.evals, 55.0)[0] == 20
    assert t.evals == [
        (s, s / 10, top, s / 2, float(s)) for s, top in [(10, 40), (20, 60), (30, 55), (40, 70)]
    ]
    assert "target top1 55% reached at step 20 (epoch 2.00) after 10.0 s of training, 20.0 s with " in (
        console.getvalue()
    )
    assert console.getvalue().count("target top1") == 1


def test_no_target_no_target_record(tmp_path: Path) -> None:
    t = SimpleNamespace(
        cfg=SimpleNamespace(log=SimpleNamespace(target_top1=0.0)),
        log=MetricsLog(tmp_path / "metrics.jsonl", active=True, stream=io.StringIO()),
        clock=RunClock(),
        evals=[],
        step=5,
    )
    t.evaluate = lambda: {
        "val_loss": 1.0, "val_top1": 100.0, "val_top5": 100.0, "val_images": 8, "val_nonfinite_images": 0
    }  # fmt: skip
    log_eval(t, 1.0)
    t.log.close()
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["eval"] and first_reaching(t.evals, 0.0) is None
