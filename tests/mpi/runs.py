"""Run files and a Trainer builder shared by the MPI tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from mpi4py import MPI

from hpcngd import config
from hpcngd.comm.topology import Topology
from hpcngd.data import build_datasets
from hpcngd.metrics import MetricsLog
from hpcngd.train import Trainer

RUN = """
[run]
seed = 11
epochs = 4
[model]
arch = "resnet8"
num_classes = 5
[data]
source = "synthetic"
image_size = 12
batch_size = 16
micro_batch_size = 4     # the BatchNorm batch: the same at 1, 2 and 4 ranks
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


@contextmanager
def make_trainer(
    comm: MPI.Comm, overrides: list[str], log: MetricsLog | None = None, checkpoints: bool = False
) -> Iterator[Trainer]:
    """A fresh Trainer for RUN with ``overrides`` on ``comm`` (its communicators freed afterwards)."""
    cfg = config.loads(RUN, overrides=overrides)
    with Topology(comm, cfg.comm.ranks_per_node if comm.size > 1 else 0) as topo:
        train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
        yield Trainer(cfg, topo, train_set, val_set, log or MetricsLog(None, active=False), checkpoints)


@contextmanager
def trained(comm: MPI.Comm, overrides: list[str], num_steps: int) -> Iterator[tuple[Trainer, list[float]]]:
    """A Trainer on ``comm`` after ``num_steps`` steps of RUN with ``overrides``, and its losses."""
    with make_trainer(comm, overrides) as trainer:
        batches = trainer.loader.batches(0, 0, trainer.cfg.run.epochs)
        losses = [trainer.train_step(x, y) for _, _, x, y in itertools.islice(batches, num_steps)]
        batches.close()
        yield trainer, losses
