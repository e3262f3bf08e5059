"""Run files and a Trainer builder shared by the MPI tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from mpi4py import MPI

from hpcngd import config
from hpcngd.comm.topology import Topology
from hpcngd.data import Dataset, build_datasets
from hpcngd.metrics import MetricsLog
from hpcngd.train import Trainer

# The BatchNorm batch: the same at every rank count of one session, so that N ranks and one rank normalize
# the same images together: 4, which the tests' tolerances were set at, and 2 at 8 ranks, which hold 2
# images each (all tests pass there; with 2 at 2 ranks, one fp16 and one bf16 comparison miss by ~10%).
MICRO_BATCH = 4 if MPI.COMM_WORLD.size <= 4 else 2

RUN = f"""
[run]
seed = 11
epochs = 4
device = "cpu"           # also on a GPU machine: these compare bits with CPU references
[model]
arch = "resnet8"
num_classes = 5
[data]
source = "synthetic"
image_size = 12
batch_size = 16
micro_batch_size = {MICRO_BATCH}
synthetic_train_samples = 56
synthetic_val_samples = 20
workers = 0
[optim]
lr = 0.2
momentum = 0.9
weight_decay = 1e-3
label_smoothing = 0.1
schedule = "poly"
warmup_epochs = 1.0
e_start = 1.0
"""
NUM_STEPS = 10


SPNGD = [
    "optim.name=spngd",
    "optim.lr=0.05",
    "optim.weight_rescaling=true",
    "ngd.damping=1e-2",
    "ngd.stale_threshold=0.3",  # some statistics go stale (refreshed per step: 29, 29, 17, 29, 21, ...)
    "ngd.stale_max_interval=4",
]


AUGMENT = ["data.mixup_alpha=0.6", "data.random_erasing=0.5"]

# Better conditioned, on the learnable Prototypes set (strong damping, a lower lr, no refresh threshold
# to flip): a 1e-6 relative kick to the weights after step 1 is 1e-4 to 3e-3 by step 20 (seeds 11-14);
# under SPNGD on random labels it is 3e-2 to 3e-1, as far apart as two unrelated runs.
SPNGD_LEARNING = [
    "optim.name=spngd",
    "optim.lr=0.02",
    "optim.weight_rescaling=true",
    "ngd.damping=1e-1",
    "ngd.stale_threshold=0",  # refresh decisions are thresholds that a 16-bit rounding can flip
]


def flat(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model`` in one vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Prototypes:
    """A learnable set: an image of class c is c's fixed random image (its prototype) plus as much noise."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int, split: int) -> None:
        self.num_classes = num_classes
        self.prototypes = torch.randn(
            num_classes, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)
        )
        self.seed = seed * 1_000_003 + split * 10_007
        gen = torch.Generator().manual_seed(self.seed)
        self.labels = torch.randint(num_classes, (num_samples,), generator=gen).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(self.seed + index + 1)
        noise = torch.randn(self.prototypes.shape[1:], generator=gen)
        return self.prototypes[self.labels[index]] + noise, self.labels[index]


@contextmanager
def make_trainer(
    comm: MPI.Comm,
    overrides: list[str],
    log: MetricsLog | None = None,
    checkpoints: bool = False,
    learnable: bool = False,
) -> Iterator[Trainer]:
    """A fresh Trainer for RUN with ``overrides`` on ``comm`` (its communicators freed afterwards).

    ``learnable``: :class:`Prototypes` instead of the synthetic source (random labels).
    """
    cfg = config.loads(RUN, overrides=overrides)
    with Topology(comm, cfg.comm.ranks_per_node if comm.size > 1 else 0) as topo:
        data, classes, seed = cfg.data, cfg.model.num_classes, cfg.run.seed
        train_set: Dataset
        val_set: Dataset
        if learnable:
            train_set = Prototypes(data.synthetic_train_samples, data.image_size, classes, seed, split=0)
            val_set = Prototypes(data.synthetic_val_samples, data.image_size, classes, seed, split=1)
        else:
            train_set, val_set = build_datasets(data, classes, seed)
        yield Trainer(cfg, topo, train_set, val_set, log or MetricsLog(None, active=False), checkpoints)


@contextmanager
def trained(
    comm: MPI.Comm, overrides: list[str], num_steps: int, learnable: bool = False
) -> Iterator[tuple[Trainer, list[float]]]:
    """A Trainer on ``comm`` after ``num_steps`` steps of RUN with ``overrides``, and its losses."""
    with make_trainer(comm, overrides, learnable=learnable) as trainer:
        batches = trainer.loader.batches(0, trainer.total_steps)
        losses = [trainer.train_step(x, y) for _, x, y in itertools.islice(batches, num_steps)]
        batches.close()
        yield trainer, losses
