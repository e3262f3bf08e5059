"""Training throughput of ResNet-50 on one GPU (synthetic 224 px images): SGD against SP-NGD, fp32 and AMP.

    python benchmarks/gpu.py --json out/gpu_benchmark.json --save-checkpoint out/ckpt
    python benchmarks/gpu.py --device cpu --arch resnet8 --image-size 32 --batch 8 --steps 2 --warmup 1

One process, one device (no mpiexec). Six configurations, each a fresh Trainer:
  sgd_fp32         momentum SGD, fp32 (cuDNN's default TF32 convolutions on a GPU: see the JSON's settings)
  sgd_amp          momentum SGD, autocast fp16 with dynamic loss scaling
  spngd_refresh    SP-NGD, AMP fp16, every statistic recomputed, averaged and inverted every step
                   (ngd.stale_threshold = 0)
  spngd_amortized  SP-NGD, AMP fp16 with stale statistics, as benchmarks/step_time.py measures it: the
                   intervals are forced to grow (threshold 1e9), so every statistic is refreshed at steps
                   0, 1, 3, 7, 15, ... and none in between; the figure is ``precondition_only + (refresh -
                   precondition_only) / D`` with D = ngd.stale_max_interval's run-file default (20), i.e.
                   the cost of a step when each statistic is refreshed once every D steps.
  spngd_amortized_tf32    the same with ngd.precondition_precision = "tf32": the products G^-1 dW A^-1
                   (about 156 GFLOP a step for ResNet-50 on one GPU, which preconditions every layer) on
                   TF32 tensor cores instead of fp32 units;
  spngd_amortized_tf32x3  ... = "tf32x3": three TF32 products of split operands (fp32's accuracy).
Every figure is a median over timed steps: the first ``--warmup`` steps (never fewer than one: the first
step allocates memory and runs cuDNN's autotuning) and steps skipped for an fp16 overflow are not timed.
The batch is made once and stays on the device (as DALI's GPU pipeline hands it), so loading and
host-to-device copies are not measured. Phases (ms per step) come from the Trainer's timer, which waits
for queued GPU kernels at each phase boundary. A configuration that runs out of GPU memory is reported
as "OOM at batch N" and the next one runs; one that fails otherwise (its loss diverges, every timed step
overflows, or it raises: the traceback goes to stderr) is an error row with its message, the next one
runs, and the exit status is 1. Goals (issue #8): SGD AMP >= 2,500 img/s on an H100, and
SP-NGD amortized within 5% of SGD AMP (shown for each amortized configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mpi4py
import torch
from mpi4py import MPI

import hpcngd
from hpcngd import config
from hpcngd.comm.topology import Topology
from hpcngd.data import build_datasets
from hpcngd.errors import Diverged
from hpcngd.metrics import PHASES, MetricsLog
from hpcngd.ngd import factors
from hpcngd.ngd.plan import layer_costs, make_plan
from hpcngd.train import Trainer

INTERVAL = config.NgdConfig().stale_max_interval  # D of the amortized figure: the run-file default
SGD_AMP_GOAL = 2500.0  # img/s on one H100
AMORTIZED_GOAL = 0.95  # SP-NGD amortized img/s over SGD AMP img/s ("within 5%")
FP16 = "run.precision=fp16"
AMORTIZED = ["optim.name=spngd", FP16, "ngd.stale_threshold=1e9", "ngd.stale_max_interval=1000"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "sgd_fp32": ("SGD fp32", ["optim.name=sgd", "run.precision=fp32"]),
    "sgd_amp": ("SGD AMP fp16", ["optim.name=sgd", FP16]),
    "spngd_refresh": (
        "SP-NGD AMP fp16, refresh every step",
        ["optim.name=spngd", FP16, "ngd.stale_threshold=0"],
    ),
    "spngd_amortized": (f"SP-NGD AMP fp16, amortized D={INTERVAL}", AMORTIZED),
    "spngd_amortized_tf32": (
        f"SP-NGD AMP fp16, amort. D={INTERVAL}, tf32 precond",
        [*AMORTIZED, "ngd.precondition_precision=tf32"],
    ),
    "spngd_amortized_tf32x3": (
        f"SP-NGD AMP fp16, amort. D={INTERVAL}, tf32x3 prec.",
        [*AMORTIZED, "ngd.precondition_precision=tf32x3"],
    ),
}
AMORTIZED_KEYS = [k for k in CONFIGS if k.startswith("spngd_amortized")]


@dataclass
class Step:
    index: int
    seconds: float
    ms: dict[str, float]  # per phase
    refreshed: int  # SP-NGD statistics recomputed
    skipped: bool  # fp16 overflow: no update
    loss: float = float("nan")


def common_overrides(args: argparse.Namespace, num_steps: int) -> list[str]:
    return [
        f"model.arch={args.arch}",
        f"model.num_classes={args.num_classes}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.synthetic_train_samples={args.batch * num_steps}",
        "data.synthetic_val_samples=0",
        "data.workers=0",
        "optim.schedule=constant",
        f"optim.lr={args.lr}",  # irrelevant to the timing; low enough that no run diverges
        f"run.device={args.device}",
        f"run.channels_last={str(args.channels_last).lower()}",
    ]


def own_busiest_share(trainer: Trainer, world: int) -> dict[str, Any]:
    """Make ``trainer`` (one process) invert and precondition only the layers that the busiest rank of a
    ``world``-rank plan owns; what it owns."""
    assert trainer.ngd is not None
    plan = make_plan(layer_costs(trainer.ngd.layers), world)
    rank = max(range(world), key=lambda r: (plan.loads[r], -r))
    trainer.ngd.owned = set(plan.owned_by(rank))
    return {
        "world": world,
        "rank": rank,
        "layers": plan.owned_by(rank),
        "of_layers": len(trainer.ngd.layers),
        "share_of_inversion_cost": plan.loads[rank] / sum(plan.loads),
        "idle_ranks": plan.idle_ranks,
    }


def measure(
    cfg: config.Config, batch: tuple[torch.Tensor, torch.Tensor], num_steps: int, plan_world: int = 1
) -> tuple[list[Step], str, dict[str, int], dict[str, Any] | None]:
    """Every step of a fresh Trainer on ``batch``; the checkpoint path when cfg.checkpoint.dir is set;
    SP-NGD's inversion counts over the run (``fp64_retries`` would make refresh steps slower); and the
    share of the layers it owned as the busiest of ``plan_world`` ranks (SP-NGD with plan_world > 1)."""
    rows: list[Step] = []
    share = None
    with Topology(MPI.COMM_WORLD) as topo:
        train_set, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
        trainer = Trainer(
            cfg,
            topo,
            train_set,
            val_set,
            MetricsLog(None, active=False),
            checkpoints=bool(cfg.checkpoint.dir),
        )
        if trainer.ngd is not None and plan_world > 1:
            share = own_busiest_share(trainer, plan_world)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        x, y = batch
        for i in range(num_steps):
            sync()
            t0 = time.perf_counter()
            loss = trainer.train_step(x, y)
            sync()
            seconds = time.perf_counter() - t0
            _, _, ms = trainer.timer.take()
            refreshed = trainer.ngd_counts.pop("refreshed", 0)
            rows.append(Step(i, seconds, ms, refreshed, trainer.scaler.take_skipped() > 0, loss))
        path = str(trainer.save_checkpoint("benchmark")) if cfg.checkpoint.dir else ""
        counts = dict(trainer.ngd_counts)
        if trainer.ngd is not None:
            trainer.ngd.close()
    return rows, path, counts, share


def summary(rows: list[Step], batch: int) -> dict[str, Any]:
    """Median step time, img/s and median ms of every phase over ``rows``."""
    if not rows:
        return {"timed_steps": 0}
    step_ms = 1e3 * statistics.median(r.seconds for r in rows)
    return {
        "timed_steps": len(rows),
        "step_ms": step_ms,
        "images_per_s": 1e3 * batch / step_ms,
        "phases_ms": {k: statistics.median(r.ms[k] for r in rows) for k in PHASES},
    }


def amortized(pre: dict[str, Any], full: dict[str, Any], batch: int) -> dict[str, Any]:
    """``pre + (full - pre) / INTERVAL`` for the step time and every phase."""
    step_ms = pre["step_ms"] + (full["step_ms"] - pre["step_ms"]) / INTERVAL
    phases = {k: v + (full["phases_ms"][k] - v) / INTERVAL for k, v in pre["phases_ms"].items()}
    return {"step_ms": step_ms, "images_per_s": 1e3 * batch / step_ms, "phases_ms": phases}


def run_config(
    args: argparse.Namespace, key: str, batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Measure one configuration. Out of memory, a diverged run or any other exception of the training
    code (a cuSOLVER or cuDNN error, say) is this configuration's result, and the next one runs."""
    label, overrides = CONFIGS[key]
    if args.amp != "fp16":  # e.g. bf16: the CPU's fast low precision
        label = label.replace("fp16", args.amp)
        overrides = [f"run.precision={args.amp}" if o == FP16 else o for o in overrides]
    num_steps = args.warmup + (args.ngd_steps if key == "spngd_refresh" else args.steps)
    if key == "sgd_amp" and args.save_checkpoint:
        overrides = [*overrides, f"checkpoint.dir={args.save_checkpoint}"]
    overrides = common_overrides(args, num_steps) + overrides
    result: dict[str, Any] = {"label": label, "overrides": overrides, "steps_run": num_steps}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    failure = ""
    try:
        cfg = config.loads("", overrides=overrides)
        rows, path, counts, share = measure(cfg, batch, num_steps, args.plan_world)
    except torch.cuda.OutOfMemoryError:
        failure = f"OOM at batch {args.batch}"
    except Diverged as exc:  # a diverged run (NaN loss, fp16 overflowing every step)
        failure = f"diverged: {exc}"
    except Exception as exc:  # noqa: BLE001 -- reported in the JSON and the exit status, traceback on stderr
        traceback.print_exc()
        failure = f"{type(exc).__name__}: {exc}"
    # Out of the except block: the traceback (and the tensors its frames hold) is gone.
    result["elapsed_s"] = time.perf_counter() - t0
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if failure:
        return {**result, "status": "oom" if failure.startswith("OOM") else "error", "message": failure}
    timed = [r for r in rows if r.index >= max(1, args.warmup) and not r.skipped]
    result.update(skipped_steps=sum(r.skipped for r in rows), checkpoint=path or None)
    result.update(first_loss=rows[0].loss, last_loss=rows[-1].loss, ngd_counts=counts)
    if share is not None:
        result["owned"] = share
    if not timed:
        skipped = "every step after the warm-up was skipped for an fp16 overflow"
        return {**result, "status": "error", "message": skipped}
    result["status"] = "ok"
    if key not in AMORTIZED_KEYS:
        return {**result, **summary(timed, args.batch)}
    pre = summary([r for r in timed if not r.refreshed], args.batch)
    full = summary([r for r in timed if r.refreshed], args.batch)
    result.update(precondition_only=pre, refresh=full, interval=INTERVAL)
    if not (pre["timed_steps"] and full["timed_steps"]):
        return {
            **result,
            "status": "error",
            "message": "no timed refresh or precondition-only step: raise --steps",
        }
    return {**result, **amortized(pre, full, args.batch), "timed_steps": len(timed)}


def goals(
    results: dict[str, dict[str, Any]], device_name: str, plan_world: int = 1
) -> dict[str, dict[str, Any]]:
    """Each goal of issue #8: its text, the measured value and whether it is met. As a rank of
    ``plan_world`` > 1 (32 images a GPU in the check script), SGD AMP's images/s is not judged: the goal
    is one GPU's own throughput (``met`` is None, printed "not judged"); the ratios are."""
    amp = results.get("sgd_amp", {}).get("images_per_s")
    h100 = "H100" in device_name
    out = {
        "sgd_amp_images_per_s": {
            "goal": f"SGD AMP >= {SGD_AMP_GOAL:,.0f} img/s on an H100"
            + ("" if h100 else f" (this device: {device_name})")
            + (
                f" (one GPU's own throughput: not judged as a rank of {plan_world})" if plan_world > 1 else ""
            ),
            "value": amp,
            "met": None if plan_world > 1 else amp is not None and amp >= SGD_AMP_GOAL,
        },
    }
    for key in AMORTIZED_KEYS:
        how = key.removeprefix("spngd_amortized").replace("_", ", preconditioning in ")
        ngd = results.get(key, {}).get("images_per_s")
        out[f"{key}_over_sgd_amp"] = {
            "goal": f"SP-NGD amortized (D={INTERVAL}{how}) within 5% of SGD AMP: ratio >= {AMORTIZED_GOAL}"
            + (f" (as the busiest rank of {plan_world}, computation only)" if plan_world > 1 else ""),
            "value": ngd / amp if amp and ngd else None,
            "met": bool(amp and ngd and ngd / amp >= AMORTIZED_GOAL),
        }
    return out


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {
        "device": {
            "type": device,
            "name": name,
            "count": torch.cuda.device_count() if device == "cuda" else 0,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "mpi4py": mpi4py.__version__,
            "mpi": MPI.Get_library_version().strip("\x00 \n").splitlines()[0],
            "hpcngd": hpcngd.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "factor_products_16bit": factors.MM_OUT_DTYPE,  # AMP's A and G: 16-bit values, fp32 out
    }


def print_table(results: dict[str, dict[str, Any]], goal: dict[str, dict[str, Any]]) -> None:
    shown = [k for k in PHASES if k != "data"]
    print(
        f"\n{'configuration':42s} {'img/s':>8s} {'step ms':>8s} timed {'GiB':>5s} {'run s':>6s} | ms per step"
    )
    for r in results.values():
        peak = f"{r['peak_memory_gib']:5.1f}" if "peak_memory_gib" in r else f"{'-':>5s}"
        first = f"{peak} {r['elapsed_s']:6.1f}"  # peak memory and run time: on the configuration's line
        if r["status"] != "ok":
            print(f"{r['label']:42s} {r['message']:>23s} {first}")
            continue
        rows = [(r["label"], r, first)]
        if "precondition_only" in r:
            rows += [("  its precondition-only steps", r["precondition_only"], " " * 12)]
            rows += [("  its refresh steps", r["refresh"], " " * 12)]
        for label, row, extra in rows:
            ms = row["phases_ms"]
            phases = " ".join(f"{k} {ms[k]:.1f}" for k in shown if ms[k] or k == "fwd_bwd")
            figures = f"{row['images_per_s']:8.1f} {row['step_ms']:8.1f} {row['timed_steps']:5d}"
            print(f"{label:42s} {figures} {extra} | {phases}")
    for key in AMORTIZED_KEYS:
        ngd = results[key]
        if ngd["status"] == "ok":
            pre, full = ngd["precondition_only"]["step_ms"], ngd["refresh"]["step_ms"]
            print(
                f"{ngd['label']}: {pre:.1f} + ({full:.1f} - {pre:.1f}) / {INTERVAL} = {ngd['step_ms']:.1f} "
                f"ms a step = precondition-only + (refresh - precondition-only) / D, D = {INTERVAL} (the "
                "run-file default ngd.stale_max_interval)"
            )
    shares = {r["owned"]["rank"]: r["owned"] for r in results.values() if "owned" in r}
    for rank, share in shares.items():
        names = ", ".join(share["layers"])
        print(
            f"SP-NGD as rank {rank} of {share['world']} (the busiest): inverts and preconditions "
            f"{len(share['layers'])} of {share['of_layers']} layers ({names}), "
            f"{share['share_of_inversion_cost']:.1%} of the inversion cost; "
            f"{share['idle_ranks']} ranks own none"
        )
    print_goals(goal)


def print_goals(goal: dict[str, dict[str, Any]]) -> None:
    print("goals:")
    for key, g in goal.items():
        v = g["value"]
        value = "n/a" if v is None else f"{v:,.0f} img/s" if key.endswith("images_per_s") else f"{v:.3f}"
        verdict = "not judged" if g["met"] is None else "met" if g["met"] else "NOT met"
        print(f"  {g['goal']}: {value} -> {verdict}")


def bn_statistic(results: dict[str, dict[str, Any]]) -> str:
    """How the SP-NGD configurations computed the BatchNorm statistic (with ngd.compile_bn's default)."""
    ran = any(k.startswith("spngd") and r["status"] != "skipped" for k, r in results.items())
    return factors.bn_statistic_path(config.NgdConfig().compile_bn) if ran else "not run"


def write_report(
    args: argparse.Namespace, env: dict[str, Any], results: dict[str, dict[str, Any]], complete: bool
) -> None:
    """Every figure so far, to ``args.json``: after each configuration, so that a run stopped at a time
    limit still leaves the figures it measured (``complete`` says whether every configuration ran)."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(amortization_interval=INTERVAL, batch_on_device=True)
    report = {"benchmark": "gpu", **env, "settings": settings, "complete": complete, "configs": results}
    report["goals"] = goals(results, env["device"]["name"], args.plan_world)
    report["checkpoint"] = results.get("sgd_amp", {}).get("checkpoint")
    report["bn_statistic"] = bn_statistic(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_name(args.json.name + ".part")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(args.json)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="images per step on the one device")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the SGD and SP-NGD amortized runs")
    p.add_argument("--ngd-steps", type=int, default=5, help="timed steps of SP-NGD refreshing every step")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (at least 1 is never timed)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on cuda"
    )
    p.add_argument(
        "--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="cuDNN autotuning"
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--amp", choices=("fp16", "bf16"), default="fp16", help="the AMP configurations' dtype")
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations to run")
    p.add_argument("--json", type=Path, help="write every figure and the settings here")
    p.add_argument(
        "--plan-world",
        type=int,
        default=1,
        help="SP-NGD as the busiest rank of this many (inverting and preconditioning only its layers)",
    )
    p.add_argument(
        "--save-checkpoint", type=Path, help="checkpoint folder for the SGD AMP model (after its run)"
    )
    args = p.parse_args()
    if MPI.COMM_WORLD.size != 1:
        print("benchmarks/gpu.py runs as one process (no mpiexec)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    if args.plan_world < 1:
        p.error(f"--plan-world {args.plan_world}: must be >= 1")
    only = [k for k in args.only.split(",") if k]
    if unknown := [k for k in only if k not in CONFIGS]:
        p.error(f"--only: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = environment(args.device)
    print(
        f"{args.arch} {args.image_size}px batch {args.batch} on {env['device']['name']} ({args.device}) | "
        f"torch {torch.__version__} cuda {torch.version.cuda} | channels_last {args.channels_last} | "
        f"warmup {args.warmup}, timed {args.steps} (SP-NGD refresh every step: {args.ngd_steps})"
        + (f" | SP-NGD as the busiest rank of {args.plan_world}" if args.plan_world > 1 else ""),
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(args.num_classes, (args.batch,), generator=gen)
    device = torch.device(args.device)
    batch = (images.to(device, memory_format=fmt), labels.to(device))
    results: dict[str, dict[str, Any]] = {}
    for key in CONFIGS:
        if key not in only:
            results[key] = {
                "label": CONFIGS[key][0].replace("fp16", args.amp),
                "status": "skipped",
                "message": "not run (--only)",
                "elapsed_s": 0.0,
            }
            continue
        print(f"{CONFIGS[key][0].replace('fp16', args.amp)} ...", flush=True)
        results[key] = r = run_config(args, key, batch)
        figure = f"{r['images_per_s']:.1f} img/s" if r["status"] == "ok" else r["message"]
        print(f"  {figure} in {r['elapsed_s']:.1f} s", flush=True)
        if args.json:
            write_report(args, env, results, complete=False)
    goal = goals(results, env["device"]["name"], args.plan_world)
    print_table(results, goal)
    print(f"SP-NGD's BatchNorm statistic: {bn_statistic(results)}")
    checkpoint = results["sgd_amp"].get("checkpoint")
    if checkpoint:
        print(f"checkpoint of the SGD AMP model: {checkpoint}")
    if args.json:
        write_report(args, env, results, complete=True)
        print(f"wrote {args.json}")
    if errors := [k for k, r in results.items() if r["status"] == "error"]:
        print(f"failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
