"""Loss scaling state machine, unscaling, and training steps under bf16 and fp16 autocast on the CPU."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from hpcngd.errors import Diverged
from hpcngd.precision import LossScaler, autocast, unscale_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
from runs import SPNGD_LEARNING, make_trainer, trained


def test_overflow_skips_and_backs_off_growth_needs_an_interval_in_a_row() -> None:
    s = LossScaler(init_scale=1024.0, growth_interval=3, enabled=True, max_skips_in_a_row=4)
    s.update(False)
    s.update(False)
    assert (s.scale, s.good_steps) == (1024.0, 2)
    s.update(True)  # overflow: halve, and the run of good steps starts again
    assert (s.scale, s.good_steps, s.skipped) == (512.0, 0, 1)
    s.update(False)
    s.update(False)
    assert s.scale == 512.0
    s.update(False)  # three good steps in a row
    assert (s.scale, s.good_steps) == (1024.0, 0)
    assert s.take_skipped() == 1 and s.take_skipped() == 0
    state = s.state()
    other = LossScaler(init_scale=1.0, growth_interval=3, enabled=True)
    other.load(state)
    assert other.state() == state


def test_a_diverged_run_stops_instead_of_skipping_forever() -> None:
    s = LossScaler(init_scale=2.0**16, growth_interval=10, enabled=True, max_skips_in_a_row=3)
    s.update(True)
    s.update(True)
    s.update(False)  # a good step resets the count in a row
    s.update(True)
    s.update(True)
    message = r"^the run diverged: fp16 gradients overflowed on 3 steps in a row .*run.precision = \"bf16\""
    with pytest.raises(Diverged, match=message):
        s.update(True)


def test_disabled_scaler_is_one_and_never_overflows() -> None:
    s = LossScaler(init_scale=2.0**16, growth_interval=1, enabled=False)
    for _ in range(3):
        s.update(False)
    assert s.scale == 1.0
    with pytest.raises(RuntimeError):
        s.update(True)


def test_unscale_divides_and_finds_inf_and_nan() -> None:
    grads = [torch.full((3,), 8.0), torch.full((2, 2), 4.0)]
    assert unscale_(grads, 4.0) is False
    assert grads[0].tolist() == [2.0] * 3 and grads[1].sum() == 4.0
    assert unscale_([torch.ones(2), torch.tensor([1.0, float("inf")])], 2.0) is True
    assert unscale_([torch.tensor([float("nan")], dtype=torch.float64)], 1.0) is True
    assert unscale_([], 2.0) is False


def test_autocast_contexts() -> None:
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("fp32", torch.device("cpu")):
        assert (x @ w).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert (x @ w).dtype == torch.bfloat16
    with autocast("fp16", torch.device("cpu")):
        assert (x @ w).dtype == torch.float16


@pytest.mark.parametrize("optim", [[], SPNGD_LEARNING], ids=["sgd", "spngd"])
def test_bf16_steps_learn_and_keep_fp32_state(optim: list[str]) -> None:
    """bf16 autocast: the loss falls like fp32's, weights/optimizer state/factors stay fp32."""
    steps = 8
    with trained(MPI.COMM_SELF, [*optim, "run.precision=bf16"], steps, learnable=True) as (t, losses):
        assert losses[-1] < 0.8 * losses[0]
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for v in s.values())
        if t.ngd is not None:
            assert {s.value.dtype for s in t.ngd.stats.values() if s.value is not None} == {torch.float32}
            assert all(s.inverse is not None for s in t.ngd.stats.values())
        assert t.scaler.scale == 1.0  # no loss scaling under bf16
    with trained(MPI.COMM_SELF, optim, steps, learnable=True) as (_, ref):
        # bf16 has 8 mantissa bits: the same run within a few percent, not bit for bit
        assert max(abs(a - b) / b for a, b in zip(losses, ref, strict=True)) < 0.05


def test_fp16_overflow_skips_the_step_and_the_due_factors_stay_due() -> None:
    """An inf in one gradient: no update, scale halved, nothing refreshed, the next step refreshes."""
    overrides = [*SPNGD_LEARNING, "run.precision=fp16", "run.loss_scale_init=1024", "model.arch=resnet8"]
    with make_trainer(MPI.COMM_SELF, overrides, learnable=True) as t:
        batches = t.loader.batches(0, t.total_steps)
        _, x, y = next(batches)
        t.train_step(x, y)
        assert t.scaler.scale == 1024.0 and t.ngd_counts["refreshed"] > 0
        refreshed = t.ngd_counts["refreshed"]
        before = [p.detach().clone() for p in t.model.parameters()]
        velocity = [v.clone() for s in t.optimizer.state.values() for v in s.values()]
        schedules = {k: (s.schedule.interval, s.schedule.next_step) for k, s in t.ngd.stats.items()}
        fc = t.model.fc.weight
        handle = fc.register_hook(lambda g: g * float("inf"))
        _, x, y = next(batches)
        t.train_step(x, y)
        handle.remove()
        assert t.step == 2 and t.scaler.scale == 512.0 and t.scaler.skipped == 1
        assert t.ngd.capture.take_seconds() == 0.0  # the skipped step's hook time went to its own phases
        assert all(torch.equal(a, p) for a, p in zip(before, t.model.parameters(), strict=True))
        assert all(
            torch.equal(a, v)
            for a, v in zip(
                velocity, [v for s in t.optimizer.state.values() for v in s.values()], strict=True
            )
        )
        assert t.ngd_counts["refreshed"] == refreshed  # nothing refreshed at the skipped step
        assert {k: (s.schedule.interval, s.schedule.next_step) for k, s in t.ngd.stats.items()} == schedules
        _, x, y = next(batches)
        t.train_step(x, y)  # due again: every statistic (threshold 0) refreshes
        assert t.ngd_counts["refreshed"] == 2 * refreshed
        assert not all(torch.equal(a, p) for a, p in zip(before, t.model.parameters(), strict=True))
        batches.close()


def test_fp16_factors_do_not_depend_on_the_loss_scale() -> None:
    """The scale is divided out of the factors: scales 1, 2^12 and 2^16 give the same factors (up to
    fp16 underflow at scale 1), and those are within 16-bit rounding of the fp32 run's."""
    base = [*SPNGD_LEARNING, "model.arch=resnet8"]

    def factors(overrides: list[str]) -> dict[tuple[str, str], torch.Tensor]:
        with trained(MPI.COMM_SELF, base + overrides, 1, learnable=True) as (t, _):
            assert t.ngd is not None
            return {k: s.value.clone() for k, s in t.ngd.stats.items() if s.value is not None}

    def worst(a: dict[tuple[str, str], torch.Tensor], b: dict[tuple[str, str], torch.Tensor]) -> float:
        return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)

    unscaled = factors(["run.precision=fp16", "run.loss_scale_init=1"])
    for scale in (4096, 65536):
        # measured 6.7e-4 (both scales); a scale left in would be off by 4095x, or 4096^2 x for G
        assert worst(factors(["run.precision=fp16", f"run.loss_scale_init={scale}"]), unscaled) < 5e-3
    # measured: A <= 6.4e-4, G <= 3.9e-2, BatchNorm F <= 5.2e-2 (sums of gh * xhat cancel)
    assert worst(unscaled, factors([])) < 0.1


def test_an_fp16_evaluation_that_overflows_says_so() -> None:
    """A weight above fp16's largest value (65504) is inf once autocast casts it: every image's logits
    overflow under fp16, none under fp32, and the eval figures count them."""
    with make_trainer(MPI.COMM_SELF, ["model.arch=resnet8"]) as t:
        with torch.no_grad():
            t.model.fc.weight[0, 0] = 7e4
        fp32 = t.evaluate()
        assert fp32["val_nonfinite_images"] == 0 and math.isfinite(fp32["val_loss"])
    with make_trainer(MPI.COMM_SELF, ["model.arch=resnet8", "run.precision=fp16"]) as t:
        with torch.no_grad():
            t.model.fc.weight[0, 0] = 7e4
        fp16 = t.evaluate()
        assert fp16["val_nonfinite_images"] == fp16["val_images"] == 20
        assert not math.isfinite(fp16["val_loss"])
