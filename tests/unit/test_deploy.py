"""What a cluster user is handed: the paper-scale presets, the Slurm and PBS scripts, spack.yaml and
the README's run-file reference, checked against each other so that they cannot drift apart."""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from hpcngd import config, versions
from hpcngd.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["resnet50_32k", "resnet50_65k", "resnet50_131k"]
HARDWARE = re.compile(r"^# hardware: (\d+) GPUs = (\d+) nodes x (\d+) GPUs, (\d+) images a GPU", re.M)


def hardware(preset: str) -> tuple[int, int, int, int]:
    match = HARDWARE.search((ROOT / "runs" / f"{preset}.toml").read_text())
    assert match, f"runs/{preset}.toml: no '# hardware: N GPUs = M nodes x K GPUs, B images a GPU' line"
    gpus, nodes, per_node, per_gpu = map(int, match.groups())
    assert gpus == nodes * per_node
    return gpus, nodes, per_node, per_gpu


def directives(path: Path, prefix: str) -> list[str]:
    return [line[len(prefix) :].strip() for line in path.read_text().splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fit_the_hardware_they_name(preset: str) -> None:
    cfg = config.load(ROOT / "runs" / f"{preset}.toml")
    gpus, _, _, per_gpu = hardware(preset)
    assert cfg.data.batch_size == per_gpu * gpus
    assert cfg.data.batch_size // 1000 == int(preset.split("_")[1].removesuffix("k"))  # 32k, 65k, 131k
    config.check_world_size(cfg, gpus)  # the batch splits over the ranks
    assert per_gpu == 32 and cfg.optim.name == "spngd" and cfg.comm.dtype == "fp16" and cfg.comm.hierarchical
    assert cfg.checkpoint.every_minutes > 0 and cfg.checkpoint.resume == "auto"
    with pytest.raises(config.ConfigError, match="must be divisible"):
        config.check_world_size(cfg, gpus * 3)


@pytest.mark.parametrize("preset", PRESETS)
def test_slurm_script_of_each_preset(preset: str) -> None:
    script = ROOT / "scripts" / "slurm" / f"{preset}.sbatch"
    opts = dict(d.lstrip("-").partition("=")[::2] for d in directives(script, "#SBATCH"))
    _, nodes, per_node, _ = hardware(preset)
    assert int(opts["nodes"]) == nodes and int(opts["ntasks-per-node"]) == per_node
    # all of a node's GPUs visible to each of its ranks (CUDA IPC between them), one per rank by local rank
    assert (
        opts["gpus-per-node"] == str(per_node)
        and "gpus-per-task" not in opts
        and "gpu-bind" not in opts
        and opts["signal"].startswith("B:USR1@")
        and "requeue" in opts
    )
    assert opts["open-mode"] == "append"
    text = script.read_text()
    assert f"RUN=${{RUN:-runs/{preset}.toml}}" in text
    assert 'launch srun --mpi=pmix --cpu-bind=cores hpcngd "$RUN" "$@"' in text
    assert 'source "${SLURM_SUBMIT_DIR:-.}/scripts/launch.sh"' in text


@pytest.mark.parametrize("preset", [*PRESETS, "quickstart"])
def test_pbs_scripts_parse(preset: str) -> None:
    script = ROOT / "scripts" / "pbs" / f"{preset}.pbs"
    opts = directives(script, "#PBS")
    select = next(o for o in opts if o.startswith("-l select="))
    chunks = dict(kv.split("=") for kv in select.removeprefix("-l select=").split(":")[1:])
    nodes = int(select.removeprefix("-l select=").split(":")[0])
    ranks = nodes * int(chunks["mpiprocs"])
    assert (
        "-r y" in opts
        and "-j oe" in opts
        and any(re.fullmatch(r"-l walltime=\d\d:\d\d:\d\d", o) for o in opts)
    )
    if preset == "quickstart":
        assert ranks == 2
    else:
        gpus, _, per_node, _ = hardware(preset)
        assert ranks == gpus and int(chunks["ngpus"]) == per_node
    launch = next(line for line in script.read_text().splitlines() if line.startswith("launch "))
    assert re.fullmatch(rf'launch mpirun -n {ranks}( .*)? hpcngd "\$RUN" \$\{{ARGS:-\}}', launch), launch
    assert f"RUN=${{RUN:-runs/{preset}.toml}}" in script.read_text()


def test_every_python_dependency_is_in_spack_yaml() -> None:
    project = config.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # localmpi: the site MPI replaces the PyPI wheel; dev: linters, not needed on a cluster.
    wanted = [*project["dependencies"], *extras["test"], *extras["dali"]]
    names = {re.split(r"[<>=!;\[ ]", dep, maxsplit=1)[0].lower() for dep in wanted}
    spack_names = {"torch": "py-torch", "pillow": "py-pillow", "nvidia-dali-cuda120": "py-nvidia-dali"}
    specs = yaml.safe_load((ROOT / "spack.yaml").read_text())["spack"]["specs"]
    listed = {spec.split()[0].split("@")[0] for spec in specs}
    missing = {n for n in names if spack_names.get(n, f"py-{n}") not in listed}
    assert not missing, f"spack.yaml lacks the spack packages of {sorted(missing)}"
    assert any(s.startswith("py-h5py") and "+mpi" in s for s in specs)
    assert any(s.startswith("py-torch") and "+cuda" in s for s in specs)


def test_the_run_time_version_floors_are_pyproject_s_and_spack_s() -> None:
    """hpcngd.versions checks what pip checked at install (a cluster's torch may bypass pip)."""
    project = config.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    simple = [re.fullmatch(r"([a-z0-9]+)>=([\d.]+)", d) for d in project["dependencies"]]
    floors = {m[1]: m[2] for m in simple if m}
    specs = yaml.safe_load((ROOT / "spack.yaml").read_text())["spack"]["specs"]
    for name, floor in versions.MINIMUM.items():
        assert floors[name] == ".".join(map(str, floor)), name
        assert any(s.startswith(f"py-{name}@{floors[name]}: ") for s in specs), name


@pytest.mark.parametrize(
    ("name", "version", "ok"),
    [
        ("torch", "2.13.0+cpu", True),
        ("torch", "2.4.0", True),
        ("torch", "2.4.0a0+git3bcc3cd", True),  # an NGC container's
        ("torch", "2.10.0.dev20261101", True),  # numbers, not text: 10 > 4
        ("torch", "unknown", True),  # nothing says it is older
        ("torch", "2.3.1+cu121", False),
        ("torch", "1.13", False),
        ("h5py", "3.11.0rc1", True),
        ("h5py", "3.10.0", False),
    ],
)
def test_a_package_older_than_its_floor_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, version: str, ok: bool
) -> None:
    module = importlib.import_module(name)
    monkeypatch.setattr(module, "__version__", version)
    if ok:
        versions.check("torch", "h5py")
    else:
        floor = ".".join(map(str, versions.MINIMUM[name]))
        with pytest.raises(
            UserError, match=rf"^{name} {re.escape(version)} is older than hpcngd needs \({name} >= {floor}\)"
        ):
            versions.check("torch", "h5py")


def test_readme_run_file_reference_is_generated_from_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- run-file-reference:start -->\n")[1].split("<!-- run-file-reference:end -->")[0]
    assert block == config.reference(), "README is stale: paste the output of `python -m hpcngd.config`"


@pytest.mark.parametrize(("signal_it", "code", "requeued"), [(True, 3, True), (False, 0, False)])
def test_launch_passes_the_warning_signal_on_and_requeues_on_exit_3(
    tmp_path: Path, signal_it: bool, code: int, requeued: bool
) -> None:
    fake = tmp_path / "hpcngd-fake"  # stands for hpcngd: exits 3 after a USR1, else 0
    fake.write_text("#!/bin/bash\ntrap 'exit 3' USR1\nfor i in $(seq 50); do sleep 0.1; done\n")
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/bash\necho "$*" > {tmp_path}/scontrol.log\n')
    for f in (fake, scontrol):
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{scontrol.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    job = subprocess.Popen(
        ["bash", "-c", f"source {ROOT}/scripts/launch.sh; launch {fake}"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if signal_it:
        time.sleep(1.0)
        job.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@T does to the batch shell
    out, _ = job.communicate(timeout=30)
    assert job.returncode == code, out
    assert (tmp_path / "scontrol.log").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
        assert "passing USR1 to the ranks" in out and "exit 3" in out


@pytest.mark.parametrize(("given", "expected"), [({"SLURM_CPUS_PER_TASK": "8"}, "8"), ({}, "unset")])
def test_launch_passes_the_jobs_cpus_per_task_on_to_srun(
    tmp_path: Path, given: dict[str, str], expected: str
) -> None:
    """Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task (sbatch(1)): without
    SRUN_CPUS_PER_TASK each rank of the presets' srun line was bound to one core (seen on Slurm 22.05.8
    with task/affinity)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env.update(given, SLURM_SUBMIT_DIR=str(tmp_path))
    out = subprocess.run(
        ["bash", "-c", f'source {ROOT}/scripts/launch.sh; echo "${{SRUN_CPUS_PER_TASK:-unset}}"'],
        env=env, stdout=subprocess.PIPE, text=True, check=True,
    ).stdout  # fmt: skip
    assert out == f"{expected}\n"
