"""Step time of SGD and SP-NGD by phase: ResNet-50 at 224x224 by default, --batch is the global batch.

    python benchmarks/step_time.py --batch 32
    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/step_time.py --batch 32   # 16 a rank, split inversion

SGD: median of the timed steps of two runs, one before and one after SP-NGD (a shared machine drifts;
the first run of a process also pays for allocating memory). SP-NGD runs with stale statistics forced
to grow (threshold 1e9), so all factors are refreshed at steps 0, 1, 3, 7, ... and none at steps 2, 4,
5, 6: the refresh steps give the cost of a step that recomputes, averages and inverts every factor
("refresh every step"), the others the cost of a step that only preconditions with cached inverses.
Step 0 (first touch of memory) is never timed. The amortized figure is what a step costs on average
when every statistic is refreshed once every D steps: ``precondition_only + (refresh -
precondition_only) / D``.
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


def run(args: argparse.Namespace, optim: list[str], steps: int) -> list[tuple[float, dict[str, float], int]]:
    """(seconds, ms per phase, factors refreshed) of steps 1..steps-1."""
    cfg = config.loads(
        "",
        overrides=[
            f"model.arch={args.arch}",
            f"model.num_classes={args.num_classes}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch}",
            f"data.synthetic_train_samples={args.batch * steps}",
            "data.workers=0",
            "optim.schedule=constant",
            *optim,
        ],
    )
    out = []
    with Topology(MPI.COMM_WORLD) as topo:
        train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
        trainer = Trainer(cfg, topo, train_set, val_set, MetricsLog(None, active=False))
        for i, (_, x, y) in enumerate(trainer.loader.batches(0, trainer.total_steps)):
            t0 = time.perf_counter()
            trainer.train_step(x, y)
            elapsed = time.perf_counter() - t0
            _, _, ms = trainer.timer.take()
            refreshed = trainer.ngd_counts.pop("refreshed", 0)
            if i > 0:
                out.append((elapsed, ms, refreshed))
            if topo.rank == 0:
                print(f"  step {i}: {elapsed:.2f} s, refreshed {refreshed}", flush=True)
    return out


def describe(label: str, rows: list[tuple[float, dict[str, float], int]]) -> float:
    med = statistics.median(r[0] for r in rows)
    phases = " ".join(
        f"{k} {statistics.median(r[1][k] for r in rows) / 1e3:.2f}s"
        for k in PHASES
        if k != "data" and any(r[1][k] for r in rows)
    )
    print(f"{label:34s} median {med:6.2f} s  ({len(rows)} steps) | {phases}")
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sgd-steps", type=int, default=4, help="SGD steps, the first not timed")
    args = p.parse_args()
    if args.sgd_steps < 2:
        p.error("--sgd-steps must be at least 2 (the first step is not timed)")
    threads, ranks = torch.get_num_threads(), MPI.COMM_WORLD.size
    say = print if MPI.COMM_WORLD.rank == 0 else (lambda *a, **k: None)
    say(f"{args.arch} {args.image_size}px global batch {args.batch} on {ranks} rank(s) x {threads} threads")
    sgd = run(args, ["optim.name=sgd"], args.sgd_steps)
    ngd_rows = run(
        args,
        ["optim.name=spngd", "ngd.stale_threshold=1e9", "ngd.stale_max_interval=1000"],
        7,
    )
    sgd += run(args, ["optim.name=sgd"], args.sgd_steps)
    if MPI.COMM_WORLD.rank != 0:
        return
    t_sgd = describe("SGD", sgd)
    t_full = describe("SP-NGD, every factor refreshed", [r for r in ngd_rows if r[2]])
    t_pre = describe("SP-NGD, preconditioning only", [r for r in ngd_rows if not r[2]])
    print(
        f"ratios to SGD: refresh every step {t_full / t_sgd:.2f}x, preconditioning only {t_pre / t_sgd:.2f}x"
    )
    for d in (10, 20, 100):
        amortized = t_pre + (t_full - t_pre) / d
        ratio = amortized / t_sgd
        print(f"amortized, each factor refreshed every {d:3d} steps: {amortized:6.2f} s = {ratio:.2f}x SGD")


if __name__ == "__main__":
    main()
