"""Steps to a target validation top-1 at a large batch: SP-NGD vs SGD (best of a learning-rate sweep).

    hpcngd data demo data/demo
    mpiexec -n 2 python benchmarks/convergence.py --batch 1000 --target 90

On the demo set (3,000 training images) a batch of 1,000 is a third of the training set, 3 steps an
epoch. Every run starts from the same seed, uses the run file's data and model with a poly schedule
(power 2, one warm-up epoch) that ends at --max-steps, evaluates the whole validation set after every
step, and stops at the first step whose top-1 reaches --target. Prints one line per run and a table.
"""

from __future__ import annotations

import argparse
import math
import time

from mpi4py import MPI

from hpcngd import config
from hpcngd.comm.topology import Topology
from hpcngd.data import build_datasets
from hpcngd.metrics import MetricsLog
from hpcngd.train import Trainer


def steps_to_target(
    world: MPI.Comm, run_file: str, overrides: list[str], target: float, max_steps: int
) -> tuple[int | None, float, float]:
    """(first step reaching target or None, best top-1, seconds)."""
    cfg = config.load(run_file, overrides)
    config.check_world_size(cfg, world.size)
    t0 = time.perf_counter()
    best = 0.0
    with Topology(world) as topo:
        train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
        trainer = Trainer(cfg, topo, train_set, val_set, MetricsLog(None, active=False))
        batches = trainer.loader.batches(0, 0, cfg.run.epochs)
        for _, _, x, y in batches:
            loss = trainer.train_step(x, y)
            top1 = trainer.evaluate()["val_top1"]  # reduced over ranks: every rank decides alike
            best = max(best, top1)
            if world.rank == 0:
                print(f"    step {trainer.step:3d} loss {loss:.3f} val top-1 {top1:5.1f}%", flush=True)
            if top1 >= target or trainer.step >= max_steps or not math.isfinite(loss):
                break
        batches.close()
        reached = trainer.step if best >= target else None
        if trainer.ngd is not None:
            trainer.ngd.close()
    return reached, best, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-file", default="runs/quickstart.toml")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--target", type=float, default=90.0, help="validation top-1 in percent")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--sgd-lrs", default="0.2,0.4,0.8,1.6")
    p.add_argument("--spngd-lrs", default="0.1")
    p.add_argument("--damping", type=float, default=1e-3)
    args = p.parse_args()
    world = MPI.COMM_WORLD
    base = config.load(args.run_file)
    steps_per_epoch = len(build_datasets(base.data, base.model.num_classes, base.run.seed)[0]) // args.batch
    common = [
        f"data.batch_size={args.batch}",
        f"run.epochs={math.ceil(args.max_steps / steps_per_epoch)}",
        "optim.schedule=poly",
        "optim.power=2.0",
        "optim.warmup_epochs=1.0",
        f"optim.e_end={args.max_steps / steps_per_epoch}",
    ]
    runs: list[tuple[str, list[str]]] = [
        (
            f"sgd lr {lr}",
            ["optim.name=sgd", f"optim.lr={lr}", "optim.momentum=0.9", "optim.weight_decay=5e-4"],
        )
        for lr in args.sgd_lrs.split(",")
    ] + [
        (
            f"spngd lr {lr}",
            [
                "optim.name=spngd",
                f"optim.lr={lr}",
                "optim.momentum=0.9",
                "optim.weight_decay=0.0",
                "optim.weight_rescaling=true",
                f"ngd.damping={args.damping}",
            ],
        )
        for lr in args.spngd_lrs.split(",")
    ]
    results = []
    for label, overrides in runs:
        if world.rank == 0:
            print(f"== {label}", flush=True)
        reached, best, seconds = steps_to_target(
            world, args.run_file, common + overrides, args.target, args.max_steps
        )
        results.append((label, reached, best, seconds))
    if world.rank == 0:
        setting = f"batch {args.batch} ({steps_per_epoch} steps/epoch), {world.size} ranks"
        print(f"\n{setting}, target val top-1 {args.target}%")
        print(f"{'run':18s} {'steps to target':>16s} {'best top-1':>11s} {'seconds':>8s}")
        for label, reached, best, seconds in results:
            shown = str(reached) if reached is not None else f">{args.max_steps}"
            print(f"{label:18s} {shown:>16s} {best:10.1f}% {seconds:8.0f}")
        sgd = [r for lab, r, _, _ in results if lab.startswith("sgd") and r is not None]
        ngd = [r for lab, r, _, _ in results if lab.startswith("spngd") and r is not None]
        if sgd and ngd:
            print(f"SP-NGD / best SGD steps: {min(ngd)} / {min(sgd)} = {min(ngd) / min(sgd):.2f}")


if __name__ == "__main__":
    main()
