"""Random erasing and running mixup: hand-checked values and independence from how the batch is split."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcngd.data.mixing import RunningMixup, erase_, mixup_lambdas

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))
from runs import AUGMENT, make_trainer


def test_erasing_is_independent_of_the_split() -> None:
    images = torch.randn(8, 3, 16, 16)
    whole = erase_(images.clone(), seed=1, step=4, first_position=0, p=0.5)
    parts = [erase_(images[r * 2 : r * 2 + 2].clone(), 1, 4, r * 2, 0.5) for r in range(4)]
    assert torch.equal(whole, torch.cat(parts))


def test_erasing_areas_probability_and_both_orientations() -> None:
    images = torch.ones(400, 1, 20, 20)
    erase_(images, seed=0, step=0, first_position=0, p=0.5, area=(0.02, 0.25), aspect=(0.3, 1.0))
    erased = (images == 0).flatten(1).float().mean(1)
    hit = erased > 0
    assert 0.4 < float(hit.float().mean()) < 0.6
    assert float(erased[hit].min()) >= 0.01 and float(erased[hit].max()) <= 0.3  # rounding of h, w
    rows, cols = (images == 0).any(3).sum((1, 2)), (images == 0).any(2).sum((1, 2))
    tall, wide = int((rows[hit] > cols[hit]).sum()), int((rows[hit] < cols[hit]).sum())
    assert tall > 50 and wide > 50, (tall, wide)  # aspect in [0.3, 1] or its inverse, half each
    untouched = torch.ones(5, 1, 8, 8)
    assert torch.equal(erase_(untouched, 0, 0, 0, p=0.0), torch.ones(5, 1, 8, 8))


def test_running_mixup_mixes_each_image_with_the_previous_mixed_batch() -> None:
    mix = RunningMixup(alpha=0.6, num_classes=3, seed=2)
    x0, x1, x2 = torch.randn(3, 4, 2)
    y = torch.tensor([0, 1, 2, 1])
    m0, t0 = mix(x0, y, step=0, first_position=8)
    assert torch.equal(m0, x0)
    assert torch.equal(t0, torch.nn.functional.one_hot(y, 3).float())  # first step: not mixed
    m1, t1 = mix(x1, y.flip(0), step=1, first_position=8)
    torch.testing.assert_close(t1.sum(1), torch.ones(4))
    lam1 = torch.from_numpy(mixup_lambdas(2, 1, 8, 4, 0.6)).float()[:, None]
    assert bool((lam1 >= 0.5).all()) and len(set(lam1.flatten().tolist())) == 4  # one an image
    torch.testing.assert_close(m1, lam1 * x1 + (1 - lam1) * m0)
    m2, t2 = mix(x2, y, step=2, first_position=8)
    lam2 = torch.from_numpy(mixup_lambdas(2, 2, 8, 4, 0.6)).float()[:, None]
    torch.testing.assert_close(m2, lam2 * x2 + (1 - lam2) * m1)  # the previous *mixed* batch
    torch.testing.assert_close(t2, lam2 * torch.nn.functional.one_hot(y, 3).float() + (1 - lam2) * t1)
    torch.testing.assert_close(t2.sum(1), torch.ones(4))


def test_mixup_is_independent_of_the_split() -> None:
    batches = [(torch.randn(6, 3, 2, 2), torch.randint(4, (6,))) for _ in range(3)]
    whole, halves = RunningMixup(1.0, 4, 0), [RunningMixup(1.0, 4, 0) for _ in range(2)]
    for step, (x, y) in enumerate(batches):
        wx, wy = whole(x, y, step, 0)
        parts = [h(x[r * 3 : r * 3 + 3], y[r * 3 : r * 3 + 3], step, r * 3) for r, h in enumerate(halves)]
        assert torch.equal(wx, torch.cat([p[0] for p in parts]))
        assert torch.equal(wy, torch.cat([p[1] for p in parts]))


def test_the_trainer_erases_the_mixed_batch() -> None:
    """Mixup first, then erasing, as released: an erased rectangle is 0 in what the model sees (erased
    before mixing it would hold (1 - lam) times the previous batch), and the next step mixes with it."""
    with make_trainer(MPI.COMM_SELF, [*AUGMENT, "data.random_erasing=1.0"]) as t:
        labels = torch.arange(16) % 5
        for step in range(2):
            t.step = step
            images, _ = t.augment(torch.randn(16, 3, 12, 12) + 3.0, labels)
            zeros = (images == 0).all(1).flatten(1).sum(1)
            assert bool((zeros >= 2).all()), zeros  # every image: at least 2% of 144 pixels
            assert t.mixup is not None and t.mixup.prev is not None and t.mixup.prev[0] is images
