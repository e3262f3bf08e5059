"""The command line as a user runs it: plain and under mpiexec, good and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import BIN, ENV, MPIEXEC, ROOT, error_lines, hpcngd, with_sitecustomize, write_run

from hpcngd import config
from hpcngd.data.demo import generate
from hpcngd.models.resnet import build
from hpcngd.ngd.plan import layer_costs, make_plan
from hpcngd.ngd.preconditioner import select_layers
from hpcngd.report import shared_values


def test_version_and_module_entry() -> None:
    out = subprocess.run([sys.executable, "-m", "hpcngd", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("hpcngd ")


def test_a_misspelled_command_is_named() -> None:
    """`hpcngd RUN.toml` trains, so an unknown first word was taken for a run file: argparse then blamed
    the run file after it ("unrecognized arguments"), or the word was read as a missing run file."""
    for args in (["evaluate", "runs/quickstart.toml"], ["trian"], ["inspekt", "out/x/latest"]):
        res = hpcngd(*args)
        assert res.returncode == 2 and error_lines(res.stderr) == [
            f"hpcngd: error: unknown command {args[0]!r} (commands: train, validate, plan, inspect, eval, "
            "data; `hpcngd RUN.toml` trains)"
        ], res.stderr
    path = hpcngd("runs/nothere")  # a path is a run file, found or not
    assert path.returncode == 2 and "runs/nothere: cannot read run file" in path.stderr, path.stderr


def test_validate_prints_resolved_run_file() -> None:
    res = hpcngd("validate", "runs/quickstart.toml", "--set", "optim.lr=0.05", "--world-size", "2")
    assert res.returncode == 0, res.stderr
    resolved = config.loads(res.stdout)
    assert resolved == config.load(ROOT / "runs/quickstart.toml", ["optim.lr=0.05"])
    bad = hpcngd("validate", "runs/quickstart.toml", "--world-size", "3")
    assert bad.returncode == 2
    assert error_lines(bad.stderr) == [
        "hpcngd: error: data.batch_size = 128: must be divisible by the 3 ranks"
    ]


def test_plan_runs_without_mpi() -> None:
    res = hpcngd(
        "plan",
        "runs/quickstart_spngd.toml",
        "--world-size",
        "16",
        "--ranks-per-node",
        "4",
        "--set",
        "model.arch=resnet50",
        "--set",
        "model.num_classes=1000",
        "--set",
        "comm.dtype=fp16",
    )
    assert res.returncode == 0, res.stderr
    assert "107 preconditioned layers (54 conv/fc, 53 BatchNorm) on 16 ranks (4 nodes of 4)" in res.stdout
    assert "imbalance max/mean 3.46; idle ranks 0" in res.stdout
    assert "packed fp16 triangles are 0.250 of that" in res.stdout
    bn = [line for line in res.stdout.splitlines() if "loss, flags, BN stats" in line]  # 26,560 channels
    assert len(bn) == 1 and bn[0].count("     0.203 MiB") == 3, res.stdout
    assert "node reduce" in bn[0] and "node alltoallv+gatherv" in res.stdout  # fp32 pass; fp16 gradients
    assert (
        "preconditioned grads     world allgatherv: sends " in res.stdout
        and "receives 48.746 MiB" in res.stdout
    )
    bad = hpcngd("plan", "runs/quickstart.toml", "--world-size", "3")
    assert bad.returncode == 2 and "data.batch_size = 128: must be divisible by the 3 ranks" in bad.stderr
    bad = hpcngd("plan", "runs/quickstart.toml", "--world-size", "2", "--ranks-per-node", "4")
    assert bad.returncode == 2 and "comm.ranks_per_node = 4: must divide the 2 ranks" in bad.stderr
    for command in ("plan", "validate"):  # argparse's one-line usage error, not a traceback
        bad = hpcngd(command, "runs/quickstart.toml", "--world-size", "0")
        assert bad.returncode == 2 and "'0' is not a positive integer" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_plan_of_runs_that_invert_nothing_and_a_reader_that_stops() -> None:
    sgd = hpcngd("plan", "runs/quickstart.toml", "--world-size", "2")  # optim.name = "sgd"
    assert sgd.returncode == 0, sgd.stderr
    assert 'optim.name = "sgd": nothing is inverted and no factors travel' in sgd.stdout
    assert "gradients" in sgd.stdout and "factors" not in sgd.stdout.split("travel")[1]
    none = hpcngd("plan", "runs/quickstart_spngd.toml", "--world-size", "2", "--set", 'ngd.exclude=["*"]')
    assert none.returncode == 0, none.stderr
    assert "ngd.exclude matches every layer: nothing is inverted" in none.stdout
    # `plan | head`: the reader closes the pipe; no traceback, and SIGPIPE's status as other tools give
    proc = subprocess.run(
        f"{BIN / 'hpcngd'} plan runs/resnet50_32k.toml --world-size 1024 | head -c 8; "
        "echo \" ${PIPESTATUS[0]}\"",
        shell=True, executable="/bin/bash", capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.stdout == "resnet50 141\n" and proc.stderr == "", proc


def test_demo_data_set_arguments(tmp_path: Path) -> None:
    for args in (["--size", "0"], ["--train-per-class", "0"], ["--seed", "-1"]):
        bad = hpcngd("data", "demo", str(tmp_path / "d"), *args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert f"argument {args[0]}: '{args[1]}' is not a" in bad.stderr
    afile = tmp_path / "file"
    afile.write_text("")
    bad = hpcngd("data", "demo", str(afile), "--size", "8")
    assert bad.returncode == 2 and error_lines(bad.stderr) == [
        f"hpcngd: error: cannot write the demo data set to {afile}: Not a directory"
    ], bad.stderr


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_bad_run_file_is_one_line_exit_2_on_every_rank_count(tmp_path: Path, ranks: int) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = -1\n")
    t0 = time.monotonic()
    res = hpcngd(str(bad), ranks=ranks)
    assert res.returncode == 2
    assert error_lines(res.stderr) == [f"hpcngd: error: {bad}: optim.lr = -1.0: must be > 0.0"]
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60


def test_bad_input_found_at_setup_under_mpi(tmp_path: Path, demo: Path) -> None:
    run_file = write_run(tmp_path, demo)
    res = hpcngd(str(run_file), "--set", "data.batch_size=6", ranks=4)
    assert res.returncode == 2
    assert error_lines(res.stderr) == [
        f"hpcngd: error: {run_file}: data.batch_size = 6: must be divisible by the 4 ranks"
    ]
    res = hpcngd(str(run_file), "--set", f"data.path={tmp_path}/missing", ranks=2)
    assert res.returncode == 2
    assert error_lines(res.stderr) == [f"hpcngd: error: data.path = '{tmp_path}/missing': folder not found"]
    res = hpcngd(str(run_file), "--set", "model.num_classes=4", ranks=2)
    assert res.returncode == 2 and "but model.num_classes = 4" in res.stderr
    if not torch.cuda.is_available():
        res = hpcngd(str(run_file), "--set", "run.device=cuda", ranks=2)
        assert res.returncode == 2
        (line,) = error_lines(res.stderr)
        assert line.startswith('hpcngd: error: run.device = "cuda": no CUDA GPU is visible to this process')
    res = hpcngd(str(tmp_path / "absent.toml"), ranks=2)
    assert res.returncode == 2
    assert error_lines(res.stderr)[0].startswith(
        f"hpcngd: error: {tmp_path}/absent.toml: cannot read run file"
    )


def test_a_torch_or_h5py_older_than_the_floor_is_one_line_before_anything_is_written(
    tmp_path: Path, demo: Path
) -> None:
    """A cluster's own torch or h5py (spack, a module, `pip install --no-deps`) may be older than
    pyproject.toml's floors, which failed deep in a run (torch 2.1: SP-NGD's first step; h5py 3.10: every
    checkpoint read). Each command names the package in one line (rank 0 prints it once, every rank
    exits 2) and writes nothing."""
    code = "import h5py, torch\ntorch.__version__ = '2.3.1+cu121'\nh5py.__version__ = '3.10.0'\n"
    env = with_sitecustomize(tmp_path, code)
    torch_line = (
        "hpcngd: error: torch 2.3.1+cu121 is older than hpcngd needs (torch >= 2.4); "
        "install a newer one (pip install 'torch>=2.4')"
    )
    run_file = write_run(tmp_path, demo)
    res = hpcngd(str(run_file), ranks=2, env=env)
    assert res.returncode == 2 and error_lines(res.stderr) == [torch_line], res.stderr
    res = hpcngd("eval", str(run_file), "--checkpoint", str(tmp_path / "any.h5"), env=env)
    assert res.returncode == 2 and error_lines(res.stderr) == [torch_line], res.stderr
    res = hpcngd("inspect", str(tmp_path / "any.h5"), env=env)
    assert res.returncode == 2 and error_lines(res.stderr) == [
        "hpcngd: error: h5py 3.10.0 is older than hpcngd needs (h5py >= 3.11); "
        "install a newer one (pip install 'h5py>=3.11')"
    ], res.stderr
    assert not (tmp_path / "out").exists()


def test_training_run_writes_metrics_and_resolved_run_file(tmp_path: Path, demo: Path) -> None:
    run_file = write_run(tmp_path, demo, workers=1)
    res = hpcngd(str(run_file), "--set", "optim.lr=0.05", ranks=2)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "out" / "tiny"
    assert config.load(run_dir / "config.toml") == config.load(run_file, ["optim.lr=0.05"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4]
    assert train[-1]["step"] == 4 and train[-1]["epoch"] == 2.0  # 40 images / 20 = 2 steps an epoch
    for r in train:
        assert {"step", "epoch", "loss", "lr", "images_per_s", "data_ms", "fwd_bwd_ms", "comm_ms"} <= set(r)
        assert r["images_per_s"] > 0 and r["loss"] > 0
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["val_images"] == 20 and 0 <= r["val_top1"] <= 100 for r in evals)
    assert "eval  epoch   2.00 step 4" in res.stdout and res.stdout.count("hpcngd 0.1.0: run tiny") == 1
    assert "precision fp32 | wire fp32: communication from host memory (CPU run)" in res.stdout
    single = hpcngd(str(run_file), "--set", "run.name=one", "--set", "run.max_steps=1")
    assert single.returncode == 0, single.stderr
    assert "1 rank on 1 node (1 per node)" in single.stdout and "done: 1 steps" in single.stdout


def test_ranks_of_simulated_nodes_share_their_host_s_cores(tmp_path: Path, demo: Path) -> None:
    """comm.ranks_per_node splits a host into nodes for the reduction only: each rank takes its share of
    the host's cores over all the host's ranks (it took a simulated node's share: 2x the cores here)."""
    usable = len(os.sched_getaffinity(0))  # what each rank inherits under --bind-to none
    if usable < 2 or usable < (os.cpu_count() or usable):
        pytest.skip(f"{usable} usable of {os.cpu_count()} cores: hpcngd takes them all, whatever the split")
    run_file = write_run(tmp_path, demo)
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}  # the thread count is hpcngd's choice
    args = [str(run_file), "--set", "comm.ranks_per_node=1", "--set", "run.max_steps=1"]
    res = subprocess.run(
        [str(MPIEXEC), "--bind-to", "none", "-n", "2", str(BIN / "hpcngd"), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"2 ranks on 2 nodes (1 per node), {usable // 2} thread(s) each" in res.stdout, res.stdout


def test_spngd_run_reports_factor_counts(tmp_path: Path, demo: Path) -> None:
    run_file = write_run(tmp_path, demo)
    warmup = ["--set", "optim.warmup_epochs=0.5"]  # with the default e_start = 0
    res = hpcngd(str(run_file), "--set", "optim.name=spngd", "--set", 'ngd.exclude=["fc"]', *warmup)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in (tmp_path / "out/tiny/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # resnet8: 10 conv/fc layers less the excluded fc = 9 (A and G) + 9 BatchNorm (F) = 27 statistics.
    assert [r["ngd_refreshed"] for r in train] == [54, 54]
    assert all(r["ngd_inverted"] == r["ngd_refreshed"] and r["ngd_failed"] == 0 for r in train)
    assert all(r["factors_ms"] > 0 and r["inverse_ms"] > 0 and r["precondition_ms"] > 0 for r in train)
    assert "factors refreshed 54 inverted 54" in res.stdout
    assert "devices on " in res.stdout and "rank 0 -> cpu (cores " in res.stdout
    assert "precision fp32 | wire fp32: unused, one rank communicates nothing" in res.stdout
    assert "note: ngd.precondition_precision" not in res.stdout and "note: run.precision" not in res.stdout
    assert "note: optim.e_start = 0.0 < optim.warmup_epochs = 0.5: the poly decay starts inside" in res.stdout
    assert "note: optim.name = spngd without optim.weight_rescaling (weight_decay = 5e-05): SP-NGD's" in (
        res.stdout
    )
    tf32x3 = ["--set", "ngd.precondition_precision=tf32x3", "--set", "optim.weight_rescaling=true"]
    tf32x3 += ["--set", "model.init=fan_in"]  # rescaling's cap from the start: no note
    two = hpcngd(str(run_file), "--set", "optim.name=spngd", "--set", "run.name=two", *tf32x3, ranks=2)
    assert two.returncode == 0, two.stderr
    assert "weight_rescaling" not in two.stdout and "note: comm.dtype" not in two.stdout
    bf16 = hpcngd(
        str(run_file),
        "--set",
        "optim.name=spngd",
        "--set",
        "run.name=bf16",
        "--set",
        "comm.dtype=bf16",
        "--set",
        "run.max_steps=1",
        "--set",
        "optim.weight_rescaling=true",
        "--set",
        "optim.e_end=1.5",
        "--set",
        "data.val_resize=50",
        ranks=2,
    )
    assert bf16.returncode == 0, bf16.stderr
    assert "note: comm.dtype = bf16 rounds the Kronecker factors to 8 significant bits" in bf16.stdout
    assert "note: optim.weight_rescaling with model.init = fan_out: a conv weight starts at" in bf16.stdout
    assert "note: optim.e_end = 1.5 < run.epochs = 2: the learning rate is 0 for the last 0.5" in bf16.stdout
    assert "note: optim.e_end" not in res.stdout
    assert (
        "note: data.val_resize = 50 is 3.12 x data.image_size = 16: validation sees only the central 32% "
        in (bf16.stdout)
    )
    assert "data.val_resize" not in res.stdout
    # no tensor cores on a CPU: said once, and the products stay fp32
    assert two.stdout.count("note: ngd.precondition_precision = tf32x3 needs TF32 tensor cores") == 1
    lines = (tmp_path / "out/two/metrics.jsonl").read_text().splitlines()
    last = [r for r in map(json.loads, lines) if r["kind"] == "train"][-1]
    assert last["comm_bytes_world"] > 0 and last["comm_bytes_allgatherv"] > 0
    assert last["comm_bytes"] == last["comm_bytes_world"] + last["comm_bytes_allgatherv"]
    # every step, rank 0 shares its own layers' preconditioned gradients: what `hpcngd plan` prints
    cfg = config.load(tmp_path / "out/two/config.toml")
    layers = select_layers(build(cfg.model.arch, cfg.model.num_classes), cfg.ngd.exclude)
    sent = shared_values(layers, make_plan(layer_costs(layers), 2))[0] * 4
    assert 0 < sent < 4 * sum(p.numel() for m in layers.values() for p in m.parameters())
    assert last["comm_bytes_allgatherv"] == sent * last["step"], (last, sent)


@pytest.mark.parametrize(("ranks", "workers"), [(2, 0), (2, 2), (0, 2)])
def test_unreadable_image_during_training_ends_the_job(tmp_path: Path, ranks: int, workers: int) -> None:
    """One line naming the image, whether it was decoded in the rank or in a decoding worker. Without
    mpiexec nothing aborts the process: it exits, and its workers (which ignore SIGTERM) must not keep it
    waiting at exit."""
    data = tmp_path / "data"
    generate(data, train_per_class=4, val_per_class=1, size=24)
    for image in (data / "train" / "ring").iterdir():
        image.write_bytes(b"\xff\xd8 truncated")
    t0 = time.monotonic()
    res = hpcngd(str(write_run(tmp_path, data, workers=workers)), ranks=ranks, timeout=60)
    assert time.monotonic() - t0 < 30
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "cannot read image" in line]
    assert lines and "hpcngd: error on rank" in lines[0] and "/train/ring/ring_0000" in lines[0]
    assert "Traceback" not in res.stderr and "worker" not in res.stderr


def test_exception_on_one_rank_ends_the_job(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys\n"
        "from mpi4py import MPI\n"
        "from hpcngd.cli import run_guarded\n"
        "def work() -> int:\n"
        "    if MPI.COMM_WORLD.rank == 1:\n"
        "        raise RuntimeError('injected failure')\n"
        "    MPI.COMM_WORLD.Barrier()  # rank 0 would wait here forever\n"
        "    return 0\n"
        "sys.exit(run_guarded(MPI.COMM_WORLD, work))\n"
    )
    t0 = time.monotonic()
    res = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert time.monotonic() - t0 < 30
    assert res.returncode != 0
    assert "hpcngd: rank 1 of 2 failed: RuntimeError: injected failure; aborting all 2 ranks" in res.stderr
    assert "Traceback" in res.stderr


@pytest.mark.parametrize("every_steps", [0, 1])
def test_a_diverged_run_is_one_line_and_exit_4_on_every_rank(
    tmp_path: Path, demo: Path, every_steps: int
) -> None:
    """A non-finite global loss (or state, met by a checkpoint) is the same on every rank: one line, no
    traceback, no MPI_Abort (it was a traceback from every rank and exit 1); earlier checkpoints are kept."""
    run_file = write_run(tmp_path, demo, extra=f"\n[checkpoint]\nevery_steps = {every_steps}\n")
    res = hpcngd(str(run_file), "--set", "optim.lr=1e12", "--set", "optim.warmup_epochs=0", ranks=2)
    assert res.returncode == 4, res.stderr
    (line,) = error_lines(res.stderr)
    # the loss, or the weights when a checkpoint comes first: the same numbers on every rank either way
    assert line.startswith("hpcngd: error: the run diverged: ") and line.endswith("try a lower optim.lr)"), (
        line
    )
    assert "the loss is" in line or every_steps
    assert "Traceback" not in res.stderr and "MPI_ABORT" not in res.stderr
    kept = sorted(p.name for p in (tmp_path / "out/tiny/checkpoints").glob("ckpt-*.h5"))
    assert bool(kept) == bool(every_steps)
    if kept:
        assert hpcngd("inspect", str(tmp_path / "out/tiny/checkpoints" / kept[-1])).returncode == 0


def test_mixed_precision_run_reports_its_loss_scale(tmp_path: Path, demo: Path) -> None:
    """fp16 (CPU autocast here): every train record says the loss scale and how many steps it skipped."""
    run_file = write_run(tmp_path, demo)
    res = hpcngd(
        str(run_file), "--set", "run.precision=fp16", "--set", "run.loss_scale_growth_interval=1", ranks=2
    )
    assert res.returncode == 0, res.stderr
    assert "precision fp16 | wire fp32" in res.stdout
    assert res.stdout.count("note: run.precision = fp16 on a CPU") == 1  # rank 0 says it, once
    assert "note: optim.e_start" not in res.stdout
    records = [json.loads(line) for line in (tmp_path / "out/tiny/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # growth after every good step from 65536: 2 steps per record, less a halving per skipped step
    for r, before in zip(train, [65536.0, *(t["loss_scale"] for t in train)], strict=False):
        assert r["loss_scale"] == before * 4 / 4 ** r["amp_skipped"], r
    assert "loss scale" in res.stdout and "skipped" in res.stdout


def test_folders_that_cannot_be_written_stop_the_run_before_any_step(tmp_path: Path, demo: Path) -> None:
    """An output folder, checkpoint folder or metrics file that is in the way: one line naming the key
    on rank 0, exit 2 on every rank, before the first step (not at the first checkpoint)."""
    run_file = write_run(tmp_path, demo)
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    (tmp_path / "out/tiny/metrics.jsonl").mkdir(parents=True)
    cases = {
        "checkpoint.dir": ["--set", f"checkpoint.dir={blocker}", "--set", "run.name=ckpt"],
        "run.output_dir": ["--set", f"run.output_dir={blocker}"],
        "metrics.jsonl": [],
    }
    for key, sets in cases.items():
        res = hpcngd(str(run_file), *sets, ranks=2)
        assert res.returncode == 2, (key, res.stderr)
        (line,) = error_lines(res.stderr)
        assert key in line and "Traceback" not in res.stderr, (key, res.stderr)
        assert "step 2/" not in res.stdout, key  # no step ran
