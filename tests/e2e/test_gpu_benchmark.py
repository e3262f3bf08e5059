"""The GPU benchmark and check script stay runnable: the benchmark, and every step of
scripts/gpu_check.sh, on the CPU with tiny models."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import ENV, MPIEXEC, ROOT

from hpcngd import config
from hpcngd.metrics import PHASES

BENCHMARK = ROOT / "benchmarks" / "gpu.py"
CHECK = ROOT / "scripts" / "gpu_check.sh"
AMORTIZED = ("spngd_amortized", "spngd_amortized_tf32", "spngd_amortized_tf32x3")
CONFIGS = ("sgd_fp32", "sgd_amp", "spngd_refresh", *AMORTIZED)


def test_the_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # fmt: off
    cmd = [
        sys.executable, str(BENCHMARK), "--device", "cpu", "--arch", "resnet8", "--image-size", "32",
        "--num-classes", "10", "--batch", "8", "--steps", "2", "--ngd-steps", "2", "--warmup", "1",
        "--json", str(out), "--save-checkpoint", str(tmp_path / "ckpt"),
    ]
    # fmt: on
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "goals:" in proc.stdout and "SP-NGD amortized" in proc.stdout
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert report["settings"]["batch"] == 8 and report["settings"]["amortization_interval"] == 20
    assert list(report["configs"]) == list(CONFIGS) and report["complete"] is True
    for key, r in report["configs"].items():
        assert r["status"] == "ok", (key, r)
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["timed_steps"] >= 1, key
        assert set(r["phases_ms"]) == set(PHASES) and r["phases_ms"]["fwd_bwd"] > 0, key
    assert report["configs"]["spngd_refresh"]["phases_ms"]["inverse"] > 0
    assert report["bn_statistic"] == "eager (ngd.compile_bn = false)"  # the default
    for key in AMORTIZED:
        amortized = report["configs"][key]
        pre, full = amortized["precondition_only"], amortized["refresh"]
        assert pre["timed_steps"] >= 1 and full["timed_steps"] >= 1
        assert amortized["step_ms"] == pytest.approx(pre["step_ms"] + (full["step_ms"] - pre["step_ms"]) / 20)
        assert pre["phases_ms"]["factors"] == 0 < full["phases_ms"]["factors"]
        assert report["goals"][f"{key}_over_sgd_amp"]["value"] > 0
    for how in ("tf32", "tf32x3"):
        overrides = report["configs"][f"spngd_amortized_{how}"]["overrides"]
        assert f"ngd.precondition_precision={how}" in overrides
    assert set(report["goals"]) == {"sgd_amp_images_per_s", *(f"{k}_over_sgd_amp" for k in AMORTIZED)}
    checkpoint = Path(report["checkpoint"])
    assert checkpoint.is_file() and checkpoint.parent == tmp_path / "ckpt"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == checkpoint.name


def test_as_the_busiest_rank_of_a_large_job_sp_ngd_inverts_only_its_layers(tmp_path: Path) -> None:
    """--plan-world: the SP-NGD configurations invert and precondition only the layers that the plan
    gives its busiest rank; SGD is untouched. resnet8 has 19 layers: of 1,024 ranks, one owns the
    widest conv (both its factors) and most own none."""
    reports = {}
    for world in (1, 1024):
        out = tmp_path / f"bench{world}.json"
        # fmt: off
        cmd = [
            sys.executable, str(BENCHMARK), "--device", "cpu", "--arch", "resnet8", "--image-size", "16",
            "--num-classes", "10", "--batch", "4", "--steps", "3", "--warmup", "1", "--json", str(out),
            "--only", "sgd_amp,spngd_amortized", "--plan-world", str(world),
        ]
        # fmt: on
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports[world] = json.loads(out.read_text())["configs"]
    whole, share = reports[1]["spngd_amortized"], reports[1024]["spngd_amortized"]
    assert "owned" not in whole and "owned" not in reports[1024]["sgd_amp"]
    owned = share["owned"]
    assert owned["world"] == 1024 and owned["layers"] == ["layer3.0.conv2"] and owned["of_layers"] == 19
    assert owned["idle_ranks"] == 1024 - 19 and 0.5 < owned["share_of_inversion_cost"] < 1
    # both runs refresh at the same steps (0, 1, 3); the share inverts 2 factors each time, not 2 x 10 + 9
    refreshes = whole["ngd_counts"]["inverted"] // 29
    assert whole["ngd_counts"]["inverted"] == 29 * refreshes and refreshes >= 2
    assert share["ngd_counts"]["inverted"] == 2 * refreshes
    assert share["refresh"]["phases_ms"]["factors"] > 0  # each rank computes every statistic


def load_benchmark(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/gpu.py as a module (registered while the test runs: its dataclass needs that)."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def tiny_args(**changes: object) -> argparse.Namespace:
    """benchmarks/gpu.py's parsed arguments for resnet8 on the CPU, as run_config takes them."""
    args = argparse.Namespace(
        arch="resnet8", num_classes=10, image_size=32, batch=8, steps=2, ngd_steps=2, warmup=1,
        device="cpu", channels_last=False, lr=0.01, save_checkpoint=None, amp="fp16", plan_world=1,
    )  # fmt: skip
    vars(args).update(changes)
    return args


def test_as_a_rank_of_a_large_job_sgd_throughput_is_not_judged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SGD AMP img/s goal is one GPU's own throughput: as the busiest rank of 1,024 (32 images a
    GPU) it is not judged, where the ratios still are; on one GPU it is."""
    bench = load_benchmark(monkeypatch)
    results = {
        "sgd_amp": {"label": "SGD AMP fp16", "status": "ok", "images_per_s": 3000.0, "elapsed_s": 1.0},
        "spngd_amortized": {"label": "SP-NGD", "status": "ok", "images_per_s": 2910.0, "elapsed_s": 1.0},
    }
    whole = bench.goals(results, "NVIDIA H100 80GB HBM3")
    rank = bench.goals(results, "NVIDIA H100 80GB HBM3", plan_world=1024)
    assert (
        whole["sgd_amp_images_per_s"]["met"] is True
        and "not judged" not in whole["sgd_amp_images_per_s"]["goal"]
    )
    assert rank["sgd_amp_images_per_s"]["met"] is None and rank["sgd_amp_images_per_s"]["value"] == 3000.0
    assert whole["spngd_amortized_over_sgd_amp"]["met"] is rank["spngd_amortized_over_sgd_amp"]["met"] is True
    bench.print_goals(rank)
    printed = capsys.readouterr().out
    assert "as a rank of 1024): 3,000 img/s -> not judged" in printed
    assert "ratio >= 0.95 (as the busiest rank of 1024, computation only): 0.970 -> met" in printed


def test_out_of_memory_is_reported_and_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark(monkeypatch)

    def out_of_memory(*args: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "measure", out_of_memory)
    args = tiny_args(batch=96)
    result = bench.run_config(args, "spngd_refresh", (torch.zeros(1), torch.zeros(1)))
    assert result["status"] == "oom" and result["message"] == "OOM at batch 96"
    results = {
        k: {"label": k, "status": "oom", "message": "OOM at batch 96", "elapsed_s": 1.0} for k in CONFIGS
    }
    goals = bench.goals(results, "NVIDIA H100 80GB HBM3")
    assert not any(g["met"] for g in goals.values())
    bench.print_table(results, goals)  # a table of failures prints


def test_a_configuration_whose_every_timed_step_overflowed_is_an_error_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = load_benchmark(monkeypatch)

    def all_skipped(cfg: object, batch: object, num_steps: int, plan_world: int) -> tuple[object, ...]:
        return [bench.Step(i, 0.1, {}, 0, skipped=i > 0) for i in range(num_steps)], "", {}, None

    monkeypatch.setattr(bench, "measure", all_skipped)
    args = tiny_args(steps=3)
    for key in CONFIGS:
        result = bench.run_config(args, key, (torch.zeros(1), torch.zeros(1)))
        assert result["status"] == "error" and "skipped for an fp16 overflow" in result["message"], key
        assert result["skipped_steps"] == result["steps_run"] - 1
    results = {k: bench.run_config(args, k, (torch.zeros(1), torch.zeros(1))) for k in CONFIGS}
    bench.print_table(results, bench.goals(results, "cpu"))  # prints, no KeyError


def test_an_exception_in_one_configuration_is_its_error_row_and_the_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failure the benchmark cannot foresee (a cuSOLVER error, say) ends that configuration only: the
    others run, the JSON has them all, the exit status is 1."""
    bench = load_benchmark(monkeypatch)
    measure = bench.measure

    def solver_fails(cfg: config.Config, batch: object, num_steps: int, plan_world: int) -> object:
        if cfg.optim.name == "spngd" and cfg.ngd.stale_threshold == 0:
            raise RuntimeError("cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED")
        return measure(cfg, batch, num_steps, plan_world)

    monkeypatch.setattr(bench, "measure", solver_fails)
    out = tmp_path / "bench.json"
    # fmt: off
    argv = [
        "gpu.py", "--device", "cpu", "--arch", "resnet8", "--image-size", "16", "--num-classes", "10",
        "--batch", "4", "--steps", "2", "--ngd-steps", "1", "--warmup", "1", "--json", str(out),
    ]
    # fmt: on
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 1
    assert "CUSOLVER_STATUS_EXECUTION_FAILED" in capsys.readouterr().err  # the traceback
    configs = json.loads(out.read_text())["configs"]
    assert [r["status"] for r in configs.values()] == ["ok", "ok", "error", "ok", "ok", "ok"]
    failure = configs["spngd_refresh"]["message"]
    assert failure == "RuntimeError: cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED"
    for key in ("sgd_fp32", "spngd_amortized"):  # the losses and inversion counts are recorded
        r = configs[key]
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]), key
    assert configs["sgd_fp32"]["ngd_counts"] == {}
    assert configs["spngd_amortized"]["ngd_counts"]["inverted"] > 0
    assert configs["spngd_amortized"]["ngd_counts"]["failed"] == 0


def test_figures_measured_before_a_crash_are_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON is rewritten after each configuration: a run killed at the check script's time limit
    (or crashing) keeps what it measured."""
    bench = load_benchmark(monkeypatch)

    def first_only(args: argparse.Namespace, key: str, batch: object) -> dict[str, object]:
        if key != "sgd_fp32":
            raise RuntimeError(f"{key} crashed")
        return {"label": key, "status": "ok", "images_per_s": 123.0, "elapsed_s": 1.0}

    monkeypatch.setattr(bench, "run_config", first_only)
    out = tmp_path / "bench.json"
    argv = ["gpu.py", "--device", "cpu", "--arch", "resnet8", "--image-size", "8", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(RuntimeError, match="sgd_amp crashed"):
        bench.main()
    report = json.loads(out.read_text())
    assert report["complete"] is False and list(report["configs"]) == ["sgd_fp32"]
    assert report["configs"]["sgd_fp32"]["images_per_s"] == 123.0
    assert report["goals"]["sgd_amp_images_per_s"]["value"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no partial file left behind


def gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CHECK)],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHON": sys.executable, "MPIEXEC": str(MPIEXEC), "OUT": str(out), **env},
        timeout=400,
        cwd=ROOT,
    )


def test_the_gpu_check_script_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    """CHECK_DEVICE=cpu: the script's every step, with tiny models, so that the one command a GPU
    session gets is known to work up to the device itself."""
    out, work, wheels = tmp_path / "check", tmp_path / "work", tmp_path / "wheels"
    path = f"{MPIEXEC.parent}:{ENV.get('PATH', '')}"
    proc = gpu_check(out, CHECK_DEVICE="cpu", WHEELS=str(wheels), PATH=path, CHECK_WORK=str(work))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "every step passed" in proc.stdout, log
    # carried MPI wheels are installed only where this Python's MPI does not run
    assert f"WHEELS={wheels}: not installed, this Python's mpi4py loads and mpiexec is on PATH" in log
    steps = [
        "versions", "MPI CUDA support", "GPU tests", "benchmark", "benchmark as a rank of 1024",
        "preconditioning precision", "factor statistics", "factor statistics at 4 images", "inversion",
        "inference fp16", "inference bf16", "two ranks: staged buckets test",
        "four ranks: training, comm.cuda_aware=false",
    ]  # fmt: skip
    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
        steps += ["DALI GPU training: data", "DALI GPU training: sgd", "DALI GPU training: spngd"]
    for name in steps:
        assert f"---- {name}: exit 0 after" in proc.stdout, (name, log)
    # the GPU tests are collected and every one skips without CUDA (no error, no failure)
    assert re.search(r"^\d+ skipped(, \d+ deselected)? in [\d.]+s$", proc.stdout, re.MULTILINE), log
    assert proc.stdout.count("2 passed") == 2  # the staged test on each of the two ranks
    assert "tf32x3: relative error median" in proc.stdout and "TF32 emulated on the CPU" in proc.stdout
    # what capturing the statistics costs a forward and backward, at the benchmark's batch and a rank's
    assert proc.stdout.count("capturing every statistic, wall ms of a forward and backward") == 2, log
    assert proc.stdout.count("on, hooks untimed") == 2 == proc.stdout.count("host time to queue it"), log
    report = json.loads((out / "gpu_benchmark.json").read_text())
    assert report["device"]["type"] == "cpu" and report["settings"]["amp"] == "bf16" and report["complete"]
    assert all(r["status"] == "ok" for r in report["configs"].values()), report["configs"]
    rank = json.loads((out / "gpu_benchmark_rank.json").read_text())
    assert rank["settings"]["plan_world"] == 1024 and rank["settings"]["batch"] == 4
    assert rank["configs"]["spngd_amortized"]["owned"]["layers"] == ["layer3.0.conv2"]
    for precision in ("fp16", "bf16"):
        study = json.loads((out / f"inference_{precision}.json").read_text())
        assert study["precision"] == precision and study["checkpoint"] == report["checkpoint"]
        assert study["accuracy"]["fp32"]["images"] == study["accuracy"][precision]["images"] == 32
        assert len(study["layers"]) > 10 and study["total"]["forward"]["low_ms"] > 0
    # four SP-NGD ranks as two simulated nodes (the two-level allreduce ran) learn: the last logged loss
    # is below the first
    assert "4 ranks on 2 nodes (2 per node)" in proc.stdout, log
    losses = [float(line.split(" loss ")[1].split()[0]) for line in proc.stdout.splitlines()
              if line.startswith("epoch") and "/6 loss" in line]  # fmt: skip
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    # OUT holds the results, run files and logs (what a lent machine sends back); the rest is in CHECK_WORK
    results = {"gpu_benchmark.json", "gpu_benchmark_rank.json", "inference_fp16.json", "inference_bf16.json"}
    runs = {"inference.toml", "ranks.toml", "ranks"}
    assert {p.name for p in out.iterdir()} - {"dali.toml", "dali"} == results | runs
    assert (out / "ranks" / "metrics.jsonl").is_file() and (work / "ckpt" / "latest").is_file()
    assert not [p for p in out.rglob("*.h5")]


def test_the_gpu_check_script_rejects_an_unknown_device(tmp_path: Path) -> None:
    proc = gpu_check(tmp_path, CHECK_DEVICE="tpu")
    assert proc.returncode == 2 and "CHECK_DEVICE must be cuda or cpu, not 'tpu'" in proc.stdout


def test_the_gpu_check_script_fails_naming_the_modules_its_python_lacks(tmp_path: Path) -> None:
    """A Python whose mpi4py finds no MPI library (as a bare GPU image may have): the steps that need MPI
    skip, and the summary says why and fails, rather than only the two inference steps failing."""
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("cannot load MPI library")\n')
    env = {"CHECK_DEVICE": "cpu", "PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"}
    proc = gpu_check(tmp_path / "check", **env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "needed by the tests, benchmarks and rank steps: mpi4py (WHEELS=DIR" in proc.stdout, log
    assert proc.stdout.rstrip().splitlines()[-1].startswith("failed: missing modules: mpi4py, "), log
    assert "skipped: needs pytest torch mpi4py h5py numpy" in proc.stdout, log


def test_the_precondition_precision_benchmark_runs_on_the_cpu() -> None:
    """benchmarks/precondition_precision.py with TF32 emulated: tf32x3 keeps fp32's error, tf32 does not."""
    script = ROOT / "benchmarks" / "precondition_precision.py"
    cmd = [sys.executable, str(script), "--arch", "resnet8", "--batch", "8", "--image-size", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "10 conv/fc layers" in proc.stdout and "TF32 emulated on the CPU" in proc.stdout
    medians = {
        line.split(":")[0]: float(line.split("median ")[1].split(",")[0])
        for line in proc.stdout.splitlines()
        if "relative error median" in line
    }
    assert set(medians) == {"fp32", "tf32", "tf32x3"}
    assert medians["tf32"] > 100 * medians["fp32"] and medians["tf32x3"] < 2 * medians["fp32"]
