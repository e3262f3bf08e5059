"""Steps to a target validation top-1 at a large batch: SP-NGD vs SGD (best of a learning-rate sweep).

    hpcngd data demo data/demo
    mpiexec -n 2 python benchmarks/convergence.py --batch 1000 --targets 50,70,80,90

On the demo set (3,000 training images) a batch of 1,000 is a third of the training set, 3 steps an
epoch. SGD runs take everything else from --sgd-run-file and SP-NGD runs from --spngd-run-file (the two
quickstarts: same data and model; SP-NGD's damping, init and weight rescaling as there). Every run starts
from the same seed with a poly schedule (one warm-up epoch, then power 2 down to 0 at --max-steps),
evaluates the whole validation set after every step, and stops at the first step whose top-1 reaches
the highest target (9 runs at --max-steps 45: about 25 minutes on 2 cores). Prints one line per step,
then a table of the first step reaching each target and of the training loss at fixed steps. Its
"wall s" column is each run's whole wall time: set-up, training and the evaluation after every step (a
comparison of steps, not of time to accuracy; benchmarks/step_time.py times the steps).
"""

from __future__ import annotations

import argparse
import math
import time

from mpi4py import MPI

from hpcngd import config
from hpcngd.comm.topology import Topology
from hpcngd.data import build_datasets
from hpcngd.errors import Diverged
from hpcngd.metrics import MetricsLog
from hpcngd.train import Trainer


def run_to_target(
    world: MPI.Comm, run_file: str, overrides: list[str], target: float, max_steps: int
) -> tuple[list[tuple[float, float]], float]:
    """([(train loss, val top-1) after each step], wall seconds of the whole run: set-up, steps and
    evaluations); stops once top-1 reaches ``target``."""
    cfg = config.load(run_file, overrides)
    t0 = time.perf_counter()
    history: list[tuple[float, float]] = []
    with Topology(world) as topo:
        train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
        trainer = Trainer(cfg, topo, train_set, val_set, MetricsLog(None, active=False))
        batches = trainer.loader.batches(0, trainer.total_steps)
        for _, x, y in batches:
            try:
                loss = trainer.train_step(x, y)
            except Diverged:  # a learning rate too high for the sweep: on every rank at once
                history.append((math.nan, math.nan))
                break
            top1 = trainer.evaluate()["val_top1"]  # reduced over ranks: every rank decides alike
            history.append((loss, top1))
            if world.rank == 0:
                print(f"    step {trainer.step:3d} loss {loss:.3f} val top-1 {top1:5.1f}%", flush=True)
            if top1 >= target or trainer.step >= max_steps:
                break
        batches.close()
        if trainer.ngd is not None:
            trainer.ngd.close()
    return history, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sgd-run-file", default="runs/quickstart.toml")
    p.add_argument("--spngd-run-file", default="runs/quickstart_spngd.toml")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--targets", default="50,70,80,90", help="validation top-1 targets in percent")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--sgd-lrs", default="0.1,0.2,0.4,0.8,1.6")
    p.add_argument("--spngd-lrs", default="0.025,0.05,0.1,0.2")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    base = config.load(args.sgd_run_file)
    if config.load(args.spngd_run_file).data != base.data:
        raise SystemExit(
            f"{args.sgd_run_file} and {args.spngd_run_file}: [data] differs; compare on the same data"
        )
    steps_per_epoch = len(build_datasets(base.data, base.model.num_classes, base.run.seed)[0]) / args.batch
    common = [
        f"data.batch_size={args.batch}",
        f"run.epochs={math.ceil(args.max_steps / steps_per_epoch)}",
        "optim.schedule=poly",
        "optim.power=2.0",
        "optim.warmup_epochs=1.0",
        "optim.e_start=1.0",
        f"optim.e_end={args.max_steps / steps_per_epoch}",
    ]
    runs: list[tuple[str, str, list[str]]] = [
        (f"sgd lr {lr}", args.sgd_run_file, ["optim.name=sgd", f"optim.lr={lr}"])
        for lr in args.sgd_lrs.split(",")
    ] + [
        (f"spngd lr {lr}", args.spngd_run_file, ["optim.name=spngd", f"optim.lr={lr}"])
        for lr in args.spngd_lrs.split(",")
    ]
    targets = [float(t) for t in args.targets.split(",")]
    results = []
    for label, run_file, overrides in runs:
        if world.rank == 0:
            print(f"== {label} ({run_file})", flush=True)
        history, seconds = run_to_target(world, run_file, common + overrides, max(targets), args.max_steps)
        results.append((label, history, seconds))
    if world.rank != 0:
        return
    setting = f"batch {args.batch} ({steps_per_epoch:.2f} steps/epoch), {world.size} ranks"
    print(f"\n{setting}, budget {args.max_steps} steps")
    marks = [s for s in (10, 20, 30, 40) if s <= args.max_steps]
    head = "".join(f"{f'top-1 {t:g}%':>12s}" for t in targets) + "".join(f"{f'loss@{s}':>9s}" for s in marks)
    print(f"{'run':14s}{head}{'best top-1':>11s}{'wall s':>9s}")
    first: dict[str, list[int | None]] = {}
    for label, history, seconds in results:
        first[label] = [next((i + 1 for i, (_, v) in enumerate(history) if v >= t), None) for t in targets]
        cells = "".join(f"{(str(s) if s else '>' + str(len(history))):>12s}" for s in first[label])
        cells += "".join(f"{history[s - 1][0]:9.3f}" if s <= len(history) else f"{'-':>9s}" for s in marks)
        print(f"{label:14s}{cells}{max(v for _, v in history):10.1f}%{seconds:9.0f}")
    for i, t in enumerate(targets):
        sgd = [s for lab, f in first.items() if lab.startswith("sgd") and (s := f[i]) is not None]
        ngd = [s for lab, f in first.items() if lab.startswith("spngd") and (s := f[i]) is not None]
        if sgd and ngd:
            print(
                f"top-1 {t:g}%: SP-NGD / best SGD steps = {min(ngd)} / {min(sgd)} = {min(ngd) / min(sgd):.2f}"
            )
        else:
            print(f"top-1 {t:g}%: SGD reached it: {bool(sgd)}, SP-NGD reached it: {bool(ngd)}")


if __name__ == "__main__":
    main()
