"""Which sample goes where: pure functions of (seed, epoch, step, rank, world size). No MPI, no I/O.

Training reads one endless stream of samples: the permutations of epochs 0, 1, 2, ... one after another,
each a pure function of (seed, epoch). Step ``s`` takes the global batch at stream positions
``[s*B, (s+1)*B)`` and rank ``r`` of ``W`` takes the ``r``-th contiguous ``B/W`` slice of it, so the
global batch is the same whatever the rank count, and its order across ranks is the order a single rank
would see. Position ``p`` is sample ``perm_e[p mod N]`` of epoch ``e = p // N``: every sample is seen
once an epoch, and when ``B`` does not divide ``N`` one step holds the end of an epoch and the start of
the next. An epoch is ``N`` samples, so after ``s`` steps ``s*B/N`` epochs are done (a fraction), as in
the released SP-NGD system (Chainer's ``epoch_detail``); a run of ``E`` epochs is ``ceil(E*N/B)`` steps.

Evaluation: rank ``r`` takes the ``r``-th of ``W`` nearly equal contiguous slices; the counts are summed
over ranks at the end, so every sample counts exactly once and no padding is needed.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (int64 array of length ``num_samples``)."""
    return np.random.default_rng((seed, epoch, 0x5EED)).permutation(num_samples)


def run_steps(num_samples: int, batch_size: int, epochs: int) -> int:
    """Steps of a run of ``epochs`` passes over ``num_samples`` samples: ``ceil(epochs * N / B)``."""
    return -(-epochs * num_samples // batch_size)


def epochs_done(step: int, batch_size: int, num_samples: int) -> int:
    """Whole epochs completed by the first ``step`` steps (``floor(step * B / N)``)."""
    return step * batch_size // num_samples


def local_positions(step: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Stream positions rank ``rank`` trains on at ``step`` (``batch_size`` is the global batch)."""
    if batch_size % world_size:
        raise RuntimeError(f"global batch {batch_size} does not split over {world_size} ranks")
    local = batch_size // world_size
    start = step * batch_size + rank * local
    return np.arange(start, start + local, dtype=np.int64)


def eval_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous slice of the evaluation set that ``rank`` scores."""
    return np.array_split(np.arange(num_samples), world_size)[rank]


def eval_chunks(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """``rank``'s evaluation slice in batches of at most ``batch_size`` (no empty ones)."""
    idx = eval_indices(num_samples, rank, world_size)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation RNG of one sample in one epoch: independent of rank count and workers."""
    return np.random.default_rng((seed, epoch, index))
