"""Mixed precision over ranks: an fp16 overflow on one rank is skipped by all, and W ranks equal 1 rank
(the 1-rank run computed here too, with the same overflow)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch
from mpi4py import MPI

from runs import SPNGD_LEARNING, make_trainer

OVERFLOW_STEP = 2
STEPS = 6


def run(
    comm: MPI.Comm, precision: str, overflow_on: int | None
) -> tuple[list[float], torch.Tensor, list[float]]:
    """Losses, final parameters and loss scales per step; ``overflow_on``: the global position (image
    index in the global batch) whose rank gets an inf gradient at OVERFLOW_STEP."""
    overrides = [*SPNGD_LEARNING, f"run.precision={precision}", "run.loss_scale_init=1024"]
    with make_trainer(comm, overrides, learnable=True) as t:
        poisoned = overflow_on is not None and overflow_on // t.local_batch == comm.rank
        t.model.fc.weight.register_hook(
            lambda g: g * float("inf") if poisoned and t.step == OVERFLOW_STEP else g
        )
        losses, scales = [], []
        batches = t.loader.batches(0, 0, t.cfg.run.epochs)  # 3 steps an epoch
        for _, _, x, y in itertools.islice(batches, STEPS):
            losses.append(t.train_step(x, y))
            scales.append(t.scaler.scale)
        batches.close()
        assert t.scaler.skipped == (overflow_on is not None)  # counted on every rank
        params = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
        return losses, params, scales


@pytest.mark.parametrize(("precision", "overflow"), [("fp16", True), ("fp16", False), ("bf16", False)])
def test_overflow_on_one_rank_is_skipped_by_all_and_matches_one_rank(
    comm: MPI.Comm, precision: str, overflow: bool
) -> None:
    last_image = 16 - 1  # held by the last rank
    losses, params, scales = run(comm, precision, last_image if overflow else None)
    ref_losses, ref_params, ref_scales = run(MPI.COMM_SELF, precision, last_image if overflow else None)
    if precision == "fp16":
        expected = [1024.0] * STEPS
        if overflow:
            expected = [1024.0] * OVERFLOW_STEP + [512.0] * (STEPS - OVERFLOW_STEP)
        assert scales == ref_scales == expected
    assert losses[-1] < losses[0]
    # the same micro-batches in the same precision; only the order of the rank sum differs
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    drift = float((params - ref_params).norm() / ref_params.norm())
    # measured at 2 and 4 ranks: bf16 1e-8; fp16 2.6e-4 (no overflow), 1e-6 to 6e-5 (overflow). A rank
    # sum in another order moves the fp32 weights by 1e-7, which flips some fp16 roundings of activations.
    assert drift < 2e-3
    digest = hashlib.sha256(params.numpy().tobytes()).hexdigest()
    assert len(set(comm.allgather(digest))) == 1  # replicas identical: every rank skipped the same step
