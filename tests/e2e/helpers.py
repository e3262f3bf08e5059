"""Running the ``hpcngd`` command as a user does, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}
TINY = """
[run]
name = "tiny"
output_dir = "{out}"
epochs = 2
device = "cpu"
[model]
arch = "resnet8"
num_classes = 10
[data]
source = "folder"
path = "{data}"
image_size = 16
val_resize = 18
batch_size = 20
workers = {workers}
[optim]
lr = 0.1
[log]
every_steps = 2
eval_every_epochs = 1
"""


def command(*args: str, ranks: int = 0) -> list[str]:
    cmd = [str(BIN / "hpcngd"), *args]
    return [str(MPIEXEC), "-n", str(ranks), *cmd] if ranks else cmd


def hpcngd(
    *args: str, ranks: int = 0, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args, ranks=ranks),
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "hpcngd: error" in line]


def write_run(tmp_path: Path, demo: Path, workers: int = 0, extra: str = "") -> Path:
    run_file = tmp_path / "tiny.toml"
    run_file.write_text(TINY.format(out=tmp_path / "out", data=demo, workers=workers) + extra)
    return run_file


def with_sitecustomize(tmp_path: Path, code: str) -> dict[str, str]:
    """ENV with a ``sitecustomize.py`` of ``code`` first on PYTHONPATH: every Python process of the
    command (each rank) runs it at start-up. It also leaves a file ``ran.PID`` beside itself."""
    site = tmp_path / "site"
    site.mkdir()
    mark = 'import os, pathlib\npathlib.Path(__file__).with_name(f"ran.{os.getpid()}").touch()\n'
    (site / "sitecustomize.py").write_text(mark + code)
    return {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), ENV.get("PYTHONPATH")]))}
