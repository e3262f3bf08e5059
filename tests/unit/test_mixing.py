"""Random erasing and running mixup: hand-checked values and independence from how the batch is split."""

from __future__ import annotations

import torch

from hpcngd.data.mixing import RunningMixup, erase_, mixup_lambda


def test_erasing_is_independent_of_the_split() -> None:
    images = torch.randn(8, 3, 16, 16)
    whole = erase_(images.clone(), seed=1, step=4, first_position=0, p=0.5)
    parts = [erase_(images[r * 2 : r * 2 + 2].clone(), 1, 4, r * 2, 0.5) for r in range(4)]
    assert torch.equal(whole, torch.cat(parts))


def test_erasing_areas_and_probability() -> None:
    images = torch.ones(400, 1, 20, 20)
    erase_(images, seed=0, step=0, first_position=0, p=0.5, area=(0.02, 0.25), aspect=(0.3, 1.0))
    erased = (images == 0).flatten(1).float().mean(1)
    hit = erased > 0
    assert 0.4 < float(hit.float().mean()) < 0.6
    assert float(erased[hit].min()) >= 0.01 and float(erased[hit].max()) <= 0.3  # rounding of h, w
    untouched = torch.ones(5, 1, 8, 8)
    assert torch.equal(erase_(untouched, 0, 0, 0, p=0.0), torch.ones(5, 1, 8, 8))


def test_running_mixup_mixes_with_the_previous_mixed_batch() -> None:
    mix = RunningMixup(alpha=0.6, num_classes=3, seed=2)
    x0, x1, x2 = torch.randn(3, 4, 2)
    y = torch.tensor([0, 1, 2, 1])
    m0, t0 = mix(x0, y, step=0)
    assert torch.equal(m0, x0)
    assert torch.equal(t0, torch.nn.functional.one_hot(y, 3).float())  # first step: not mixed
    m1, t1 = mix(x1, y.flip(0), step=1)
    torch.testing.assert_close(t1.sum(1), torch.ones(4))
    lam1 = mixup_lambda(2, 1, 0.6)
    assert lam1 >= 0.5
    torch.testing.assert_close(m1, lam1 * x1 + (1 - lam1) * m0)
    m2, t2 = mix(x2, y, step=2)
    lam2 = mixup_lambda(2, 2, 0.6)
    torch.testing.assert_close(m2, lam2 * x2 + (1 - lam2) * m1)  # the previous *mixed* batch
    torch.testing.assert_close(t2, lam2 * torch.nn.functional.one_hot(y, 3).float() + (1 - lam2) * t1)
    torch.testing.assert_close(t2.sum(1), torch.ones(4))


def test_mixup_is_independent_of_the_split() -> None:
    batches = [(torch.randn(6, 3), torch.randint(4, (6,))) for _ in range(3)]
    whole, halves = RunningMixup(1.0, 4, 0), [RunningMixup(1.0, 4, 0) for _ in range(2)]
    for step, (x, y) in enumerate(batches):
        wx, wy = whole(x, y, step)
        parts = [h(x[r * 3 : r * 3 + 3], y[r * 3 : r * 3 + 3], step) for r, h in enumerate(halves)]
        assert torch.equal(wx, torch.cat([p[0] for p in parts]))
        assert torch.equal(wy, torch.cat([p[1] for p in parts]))
