"""Which sample goes where: pure functions of (seed, epoch, step, rank, world size). No MPI, no I/O.

Training: each epoch is one permutation of the data set, a pure function of (seed, epoch). Step ``s``
takes the global batch ``perm[s*B:(s+1)*B]`` and rank ``r`` of ``W`` takes the ``r``-th contiguous
``B/W`` slice of it, so the global batch is the same whatever the rank count, and its order across
ranks is the order a single rank would see. The last ``N mod B`` samples of a permutation (different
ones each epoch) are left out so every step has a full batch.

Evaluation: rank ``r`` takes the ``r``-th of ``W`` nearly equal contiguous slices; the counts are summed
over ranks at the end, so every sample counts exactly once and no padding is needed.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (int64 array of length ``num_samples``)."""
    return np.random.default_rng((seed, epoch, 0x5EED)).permutation(num_samples)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full global batches in one epoch."""
    return num_samples // batch_size


def local_indices(perm: np.ndarray, step: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Sample indices rank ``rank`` trains on at ``step`` (``batch_size`` is the global batch)."""
    if batch_size % world_size:
        raise RuntimeError(f"global batch {batch_size} does not split over {world_size} ranks")
    local = batch_size // world_size
    start = step * batch_size + rank * local
    if start + local > len(perm) - len(perm) % batch_size:
        raise RuntimeError(f"step {step} is past the end of the epoch")
    return perm[start : start + local]


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
