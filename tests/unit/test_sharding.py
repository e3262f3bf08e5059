"""Which sample each rank sees: coverage, global batch independent of rank count, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from hpcngd.data import sharding


def stream_samples(num_samples: int, seed: int, steps: range, batch: int, world_size: int) -> list[int]:
    """The samples of ``steps`` in the order ranks 0, 1, ... take them, step after step."""
    out = []
    for step in steps:
        for rank in range(world_size):
            for p in sharding.local_positions(step, batch, rank, world_size).tolist():
                out.append(
                    int(sharding.epoch_permutation(num_samples, seed, p // num_samples)[p % num_samples])
                )
    return out


@pytest.mark.parametrize(("num_samples", "world_size"), [(96, 1), (96, 3), (100, 2), (100, 4), (100, 8)])
def test_every_sample_once_per_epoch(num_samples: int, world_size: int) -> None:
    """An epoch is N samples of the stream, so each epoch holds every sample once even when the batch
    (24) does not divide N: a step then ends one epoch and starts the next."""
    batch = 24
    steps = sharding.run_steps(num_samples, batch, 6)
    seen = stream_samples(num_samples, 7, range(steps), batch, world_size)
    assert len(seen) == steps * batch >= 6 * num_samples
    for epoch in range(6):
        assert sorted(seen[epoch * num_samples : (epoch + 1) * num_samples]) == list(range(num_samples))
    assert seen[: 2 * num_samples] != 2 * seen[:num_samples]  # a new order each epoch


def test_run_length_and_epochs_done() -> None:
    # ImageNet's 1,281,167 images: SPNGD.md's 45 epochs at 32K are 1,760 steps; 80 at 131K are 782
    assert sharding.run_steps(1_281_167, 32768, 45) == 1760
    assert sharding.run_steps(1_281_167, 131072, 80) == 782
    assert sharding.run_steps(96, 24, 3) == 12 and sharding.run_steps(100, 24, 3) == 13
    assert [sharding.epochs_done(s, 24, 100) for s in (0, 4, 5, 8, 9)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_global_batch_does_not_depend_on_rank_count(world_size: int) -> None:
    for step in range(3):
        single = sharding.local_positions(step, 64, 0, 1)
        parts = [sharding.local_positions(step, 64, r, world_size) for r in range(world_size)]
        np.testing.assert_array_equal(np.concatenate(parts), single)
    with pytest.raises(RuntimeError, match="does not split over 3 ranks"):
        sharding.local_positions(0, 64, 0, 3)


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = sharding.epoch_permutation(50, 1, 2)
    np.testing.assert_array_equal(a, sharding.epoch_permutation(50, 1, 2))
    assert not np.array_equal(a, sharding.epoch_permutation(50, 1, 3))
    assert not np.array_equal(a, sharding.epoch_permutation(50, 2, 2))
    assert sharding.sample_rng(0, 1, 2).random() == sharding.sample_rng(0, 1, 2).random()


@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 1), (10, 3), (7, 4), (3, 4)])
def test_eval_shards_cover_once(num_samples: int, world_size: int) -> None:
    parts = [sharding.eval_indices(num_samples, r, world_size) for r in range(world_size)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(num_samples))
