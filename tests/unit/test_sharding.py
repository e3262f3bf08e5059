"""Which sample each rank sees: coverage, global batch independent of rank count, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from hpcngd.data import sharding


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_sample_once_per_epoch(world_size: int) -> None:
    num_samples, batch = 96, 24
    for epoch in range(3):
        perm = sharding.epoch_permutation(num_samples, seed=7, epoch=epoch)
        seen = [
            i
            for step in range(sharding.steps_per_epoch(num_samples, batch))
            for rank in range(world_size)
            for i in sharding.local_indices(perm, step, batch, rank, world_size)
        ]
        assert sorted(seen) == list(range(num_samples))


def test_remainder_dropped_and_varies_by_epoch() -> None:
    num_samples, batch = 100, 24  # 4 steps of 24; 4 samples left out, different ones each epoch
    left_out = []
    for epoch in range(2):
        perm = sharding.epoch_permutation(num_samples, 0, epoch)
        seen = {int(i) for s in range(4) for i in sharding.local_indices(perm, s, batch, 0, 1)}
        assert len(seen) == 96
        left_out.append(set(range(num_samples)) - seen)
    assert left_out[0] != left_out[1]
    with pytest.raises(RuntimeError, match="past the end"):
        sharding.local_indices(sharding.epoch_permutation(num_samples, 0, 0), 4, batch, 0, 1)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_global_batch_does_not_depend_on_rank_count(world_size: int) -> None:
    perm = sharding.epoch_permutation(1000, 3, 5)
    for step in range(3):
        single = sharding.local_indices(perm, step, 64, 0, 1)
        parts = [sharding.local_indices(perm, step, 64, r, world_size) for r in range(world_size)]
        np.testing.assert_array_equal(np.concatenate(parts), single)


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
