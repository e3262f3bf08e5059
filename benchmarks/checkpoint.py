"""Size and wall time of writing and reading a checkpoint of a real SP-NGD run.

    python benchmarks/checkpoint.py                          # ResNet-50, SP-NGD, 1 rank
    mpiexec -n 2 python benchmarks/checkpoint.py             # 2 ranks (inverses live on their owners)
    python benchmarks/checkpoint.py --set data.mixup_alpha=0.4 --batch 256   # with running mixup

One training step at 32 px fills every piece of state (momentum, all factors and inverses, at the
model's real sizes; the image size does not change them), then the checkpoint is written --repeats
times and read back (SHA-256 seal checked, then checked and restored) as many times into a fresh
trainer: first with the file's pages dropped from the OS page cache before each read (a resume after
a preemption, on another node, reads from the file system; posix_fadvise DONTNEED, which a parallel file
system's client may ignore), then with them cached (a resume right after the save on the same node).
Prints the file size per group and the median wall time of save and of both restores (the slowest
rank's).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

from hpcngd import config, state
from hpcngd.checkpoint import describe
from hpcngd.comm.topology import Topology
from hpcngd.data import build_datasets
from hpcngd.metrics import MetricsLog
from hpcngd.train import Trainer


def drop_cached_pages(path: Path) -> None:
    """Ask the OS to forget the file's cached pages (they are clean: the writer fsyncs the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    world = MPI.COMM_WORLD
    folder = world.bcast(tempfile.mkdtemp(prefix="hpcngd-bench-") if world.rank == 0 else None)
    overrides = [
        f"model.arch={args.arch}",
        "model.num_classes=1000",
        "data.image_size=32",
        f"data.batch_size={args.batch}",
        f"data.synthetic_train_samples={args.batch}",
        "data.synthetic_val_samples=0",
        "optim.name=spngd",
        f"run.output_dir={folder}",
        "checkpoint.keep_last=1",
        *args.overrides,
    ]
    cfg = config.loads("", overrides=overrides)
    train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
    saves: list[float] = []
    loads: dict[bool, list[float]] = {False: [], True: []}
    with Topology(world, cfg.comm.ranks_per_node) as topo:
        log = MetricsLog(None, active=False)
        trainer = Trainer(cfg, topo, train_set, val_set, log, checkpoints=True)
        for _, x, y in itertools.islice(trainer.loader.batches(0, 1), 1):
            trainer.train_step(x, y)
        for _ in range(args.repeats):
            world.Barrier()
            t0 = time.perf_counter()
            path = state.save(trainer, cfg.checkpoint_dir, keep_last=1)
            saves.append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        fresh = Trainer(cfg, topo, train_set, val_set, log, checkpoints=True)
        state.resume(fresh)  # untimed: the first restore into a trainer also allocates its state
        for cached in (False, True):
            for _ in range(args.repeats):
                if not cached and world.rank == 0:
                    drop_cached_pages(path)
                world.Barrier()
                t0 = time.perf_counter()
                state.resume(fresh)
                loads[cached].append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if world.rank == 0:
        print(describe(Path(path)).split("run file:")[0].rstrip())
        print(
            f"{args.arch} SP-NGD, {world.size} rank(s), batch {args.batch}: "
            f"save {statistics.median(saves):.2f} s, restore {statistics.median(loads[False]):.2f} s "
            f"from the file system, {statistics.median(loads[True]):.2f} s from the page cache "
            f"(medians of {args.repeats}; restore = open and check the SHA-256, check, broadcast, load)"
        )
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
