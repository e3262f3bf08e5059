"""Sharded batch iterators over any data set with ``item(index, epoch)``.

Decoding runs in ``workers`` processes of a torch DataLoader; which samples a rank gets, and their
augmentation, come from :mod:`hpcngd.data.sharding` alone, so the batches do not depend on the number
of workers.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from collections.abc import Generator, Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hpcngd.data import sharding
from hpcngd.errors import UserError
from hpcngd.stopping import STOP_SIGNALS

Keys = list[tuple[int, int]]

# Workers are forked (hpcngd runs on Linux), whatever the interpreter's default: Python 3.14 made it
# forkserver. A forkserver is one more process of the job that a scheduler's SIGTERM reaches (starting
# multiprocessing's resource tracker unblocks SIGTERM in this process, so the forkserver does not inherit
# it blocked): it dies of it, its workers (torch's watchdog watches their parent) follow, and the rank
# fails instead of checkpointing. A forked worker also inherits the sample list (1.28M paths for
# ImageNet) instead of unpickling it again at every epoch.
_START_METHOD = "fork"


class Dataset(Protocol):
    """What a loader needs of a data set."""

    num_classes: int

    def __len__(self) -> int: ...

    def item(self, index: int, epoch: int) -> tuple[Tensor, int]: ...


class _Keyed(torch.utils.data.Dataset[tuple[Tensor, int]]):
    """Adapts ``item(index, epoch)`` to the DataLoader's ``dataset[key]``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        return self.dataset.item(*key)


def _load(
    dataset: Dataset, batches: Iterable[Keys], workers: int, pin_memory: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Decode each batch of keys as the DataLoader asks for it (``batches`` is read lazily)."""
    loader = DataLoader(
        _Keyed(dataset),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_leave_stop_signals_to_the_trainer if workers else None,
        multiprocessing_context=_START_METHOD if workers else None,
    )
    if workers:
        _kill_workers_at_exit()
    # Workers start with the stop signals blocked (a forked child inherits the signal mask), so that one
    # arriving before they ignore them cannot kill them; this process gets a signal sent meanwhile on
    # unblocking.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        started = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield from started
    except UserError as exc:
        if not workers:
            raise
        # torch re-raises a worker's error here with the worker's traceback as its text; its last line
        # is "module.Class: message"
        last = str(exc).rstrip().splitlines()[-1]
        raise UserError(last.split(": ", 1)[-1]) from None


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A decoding worker ignores SIGTERM and SIGUSR1: a scheduler signals every process of the job, and
    torch's workers die of SIGTERM, which would end the run before it can write its checkpoint (the
    workers end with their loader, or when they see that the training process is gone)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@functools.cache  # registered once a process
def _kill_workers_at_exit() -> None:
    """At exit Python ends its daemonic children (torch's workers) with SIGTERM, which the workers
    ignore, and then waits for them: a process leaving on an error while a loader was still running,
    whose traceback keeps that loader alive, would wait forever. This kills them first (registered
    after multiprocessing's own exit handler, so it runs before it)."""

    def kill() -> None:
        # torch's SIGCHLD handler would report each killed worker as a failure, with a traceback
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill)


class TrainLoader:
    """This rank's share of every global training batch.

    Args:
        dataset: the training set.
        batch_size: global batch (all ranks together).
        rank, world_size: this rank and the rank count.
        seed: run seed (sample order and augmentation).
        workers: decoding processes (0 = in this process).
        pin_memory: batches in pinned host memory (for asynchronous copies to a GPU).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        workers: int,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.workers = workers
        self.pin_memory = pin_memory

    def plans(self, steps: Iterable[int]) -> Iterator[Keys]:
        """This rank's (index, epoch) keys of each step in ``steps``, made as they are asked for.

        An epoch's permutation is drawn once (about 20 ms for ImageNet's 1.28M images), not once per
        step, and no plan is made before its batch is loaded: a run of thousands of steps starts at once.
        """
        n, perms = len(self.dataset), dict[int, np.ndarray]()
        for step in steps:
            positions = sharding.local_positions(step, self.batch_size, self.rank, self.world_size)
            epochs, offsets = np.divmod(positions, n)
            perms = {e: perm for e, perm in perms.items() if e >= epochs[0]}  # B <= N: at most 2 epochs
            for epoch in np.unique(epochs).tolist():
                if epoch not in perms:
                    perms[epoch] = sharding.epoch_permutation(n, self.seed, epoch)
            yield [(int(perms[e][o]), e) for e, o in zip(epochs.tolist(), offsets.tolist(), strict=True)]

    def batches(self, start: int, stop: int) -> Generator[tuple[int, Tensor, Tensor], None, None]:
        """Yield (step, images, labels) for the steps from ``start`` to ``stop`` (excluded)."""
        steps = range(start, stop)
        for step, (images, labels) in zip(steps, self._decoded(steps), strict=True):
            yield step, images, labels

    def _decoded(self, steps: Iterable[int]) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's (images, labels) of each step in ``steps``, decoded and augmented."""
        return _load(self.dataset, self.plans(steps), self.workers, self.pin_memory)


def eval_batches(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's slice of the evaluation set, in batches of at most ``batch_size``."""
    chunks = sharding.eval_chunks(len(dataset), batch_size, rank, world_size)
    yield from _load(dataset, [[(int(i), 0) for i in c] for c in chunks], workers)


__all__ = ["Dataset", "TrainLoader", "eval_batches"]
