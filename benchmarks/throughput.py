"""Training throughput of the core SGD step on synthetic data: median step time, images/s and phases.

    mpiexec -n 2 python benchmarks/throughput.py --arch resnet50 --image-size 224 --batch 16 --steps 6
    python benchmarks/throughput.py --arch resnet20 --image-size 32 --batch 256

Prints one table line per rank count it runs with (the job's); every figure is a median over the timed
steps (the first ``--warmup`` steps are not timed). Times are per step for the whole global batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mpi4py import MPI

from hpcngd import config
from hpcngd.comm.topology import Topology
from hpcngd.data import build_datasets
from hpcngd.metrics import PHASES, MetricsLog
from hpcngd.train import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = torch default)")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config.from_dict(
        {
            "model": {"arch": args.arch, "num_classes": 1000 if "50" in args.arch else 10},
            "data": {
                "source": "synthetic",
                "image_size": args.image_size,
                "batch_size": args.batch,
                "synthetic_train_samples": args.batch * (args.steps + args.warmup),
                "workers": 0,
            },
            "optim": {"schedule": "constant"},
        }
    )
    with Topology(world) as topo:
        train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
        trainer = Trainer(cfg, topo, train_set, val_set, MetricsLog(None, active=False))
        step_s: list[float] = []
        phases: dict[str, list[float]] = {k: [] for k in PHASES}
        for i, (_, x, y) in enumerate(trainer.loader.batches(0, trainer.total_steps)):
            world.Barrier()
            t0 = time.perf_counter()
            trainer.train_step(x, y)
            world.Barrier()
            elapsed = time.perf_counter() - t0
            _, _, ms = trainer.timer.take()
            if i >= args.warmup:
                step_s.append(elapsed)
                for k in PHASES:
                    phases[k].append(ms[k])
        if world.rank == 0:
            med = statistics.median(step_s)
            parts = " ".join(f"{k} {statistics.median(v):.0f}ms" for k, v in phases.items() if k != "data")
            print(
                f"{args.arch} {args.image_size}px global batch {args.batch} on {world.size} rank(s), "
                f"{torch.get_num_threads()} thread(s) each: median step {med * 1e3:.0f} ms, "
                f"{args.batch / med:.1f} img/s | {parts} | {len(step_s)} timed steps"
            )


if __name__ == "__main__":
    main()
