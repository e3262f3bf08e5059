"""Which device each rank computes on (``run.device``), and the log lines that say so.

``cuda``: the ranks of a node, in local-rank order, each take of the GPUs it can see the one that the
fewest ranks before it took, of those the nearest to its cores (Linux's ``local_cpulist`` of the GPU's
PCI device), then the first (:func:`assign`). Without locality that is GPU ``host_rank % n`` of the
``n`` GPUs when every rank sees all of the node's; a rank shown one GPU (Slurm ``--gpus-per-task``, a
``CUDA_VISIBLE_DEVICES`` per rank) takes it. ``auto`` means ``cuda`` when a GPU is visible, else
``cpu``. The decisions (:func:`choose`, :func:`assign`) are pure; :func:`bind` asks torch and makes the
choice the current CUDA device. :func:`placement_lines` summarises, for rank 0's log, which
rank of which host uses which physical GPU on which cores, and warns when two ranks of one host share a
GPU or a rank runs on none of its GPU's local cores (Linux's ``local_cpulist`` of the GPU's PCI device).
A node here is a host, the ranks that share memory (``Topology.host``), also where ``comm.ranks_per_node``
simulates smaller nodes: those would otherwise each start at GPU 0.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from hpcngd.errors import UserError


def visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """The physical GPU ids of ``CUDA_VISIBLE_DEVICES`` in order (None when it is not set)."""
    text = env.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def choose(requested: str, host_rank: int, num_gpus: int, env: Mapping[str, str]) -> str:
    """``"cpu"`` or ``"cuda:i"`` for one rank.

    Args:
        requested: ``run.device``: "auto", "cpu" or "cuda".
        host_rank: this rank's index among the ranks of its host.
        num_gpus: GPUs this process can see (already filtered by CUDA_VISIBLE_DEVICES).
        env: the environment, for the error message.
    """
    if requested == "cpu" or (requested == "auto" and num_gpus == 0):
        return "cpu"
    if num_gpus == 0:
        shown = env.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None else "torch.cuda.device_count() = 0"
        raise UserError(
            f'run.device = "cuda": no CUDA GPU is visible to this process ({why}); '
            'use "auto" or "cpu" to run on the CPU'
        )
    if requested not in ("auto", "cuda"):
        raise RuntimeError(f"unknown device request {requested!r}")
    return f"cuda:{host_rank % num_gpus}"


def physical_id(device: str, env: Mapping[str, str]) -> str:
    """The GPU's id as the node knows it (through CUDA_VISIBLE_DEVICES), or "cpu"."""
    if device == "cpu":
        return "cpu"
    index = int(device.split(":")[1])
    visible = visible_devices(env)
    return visible[index] if visible is not None and index < len(visible) else str(index)


Gpus = list[tuple[str, frozenset[int] | None]]  # visible GPUs in CUDA order: (node-wide id, local cores)
View = tuple[frozenset[int], Gpus]  # a rank's cores and its GPUs, gathered over the node for assign


def view(requested: str) -> View:
    """This rank's cores and, unless ``requested`` is "cpu", the GPUs it sees: for :func:`assign`."""
    gpus: Gpus = []
    if requested != "cpu" and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            address, near = _pci(i)
            ident = physical_id(f"cuda:{i}", os.environ)  # a MIG instance: its UUID, on its GPU's address
            gpus.append((f"{address} {ident}" if address else ident, near))
    return frozenset(os.sched_getaffinity(0)), gpus


def _pci(index: int) -> tuple[str | None, frozenset[int] | None]:
    """CUDA device ``index``'s PCI address and the cores local to it (None where it is not known)."""
    props = torch.cuda.get_device_properties(index)
    domain, bus, slot = (getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device"))
    if not (isinstance(domain, int) and isinstance(bus, int) and isinstance(slot, int)):  # an older torch
        return None, None
    address = f"{domain:04x}:{bus:02x}:{slot:02x}.0"
    return address, pci_local_cpus(address)


def assign(node: Sequence[View]) -> list[int]:
    """For each local rank of a node (in order), the index among the GPUs it sees of the one it takes:
    the one the fewest ranks before it took, of those the nearest to its cores, then the first."""
    uses: dict[str, int] = defaultdict(int)
    chosen = []
    for cores, gpus in node:
        best = min(
            range(len(gpus)),
            key=lambda i: (uses[gpus[i][0]], not (cores & (gpus[i][1] or frozenset())), i),
            default=0,
        )
        if gpus:
            uses[gpus[best][0]] += 1
        chosen.append(best)
    return chosen


def bind(requested: str, host_rank: int, host: Sequence[View] | None = None) -> torch.device:
    """Choose this rank's device (:func:`choose`; the GPU by :func:`assign` from ``host``, every rank of
    the host's :func:`view`, else ``host_rank % n``) and make it torch's current CUDA device."""
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = choose(requested, host_rank, num_gpus, os.environ)
    if name != "cpu" and host is not None:
        name = f"cuda:{assign(host)[host_rank]}"
    device = torch.device(name)
    use(device)
    return device


def use(device: torch.device) -> None:
    """Make ``device`` torch's current CUDA device (streams, events and DALI follow it); CPU: nothing."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def to_device(
    images: Tensor, labels: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    """A batch on ``device``: images as fp32 (DALI may hand float16; autocast casts them again) in the
    model's memory format, labels as they are. Copies from pinned host memory are not waited for."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device=device, dtype=torch.float32, memory_format=fmt, non_blocking=True)
    return images, labels.to(device, non_blocking=True)


class Placement(NamedTuple):
    """Where one rank runs, gathered for :func:`placement_lines`."""

    host: str
    device: str  # "cpu" or "cuda:i"
    gpu: str  # the physical GPU id, name and PCI address (ids may repeat under cgroups), or "cpu"
    cores: frozenset[int]  # the CPUs this rank may run on
    gpu_cores: frozenset[int] | None  # the CPUs local to its GPU (None: CPU rank, or not known)


def placement(device: torch.device) -> Placement:
    """This rank's :class:`Placement`."""
    name = str(device) if device.type == "cpu" else f"cuda:{device.index}"
    gpu, gpu_cores = physical_id(name, os.environ), None
    if device.type == "cuda":
        address, gpu_cores = _pci(device.index if device.index is not None else torch.cuda.current_device())
        gpu = f"{gpu} {torch.cuda.get_device_name(device)}" + (f" at {address}" if address else "")
    return Placement(os.uname().nodename, name, gpu, frozenset(os.sched_getaffinity(0)), gpu_cores)


def pci_local_cpus(address: str, root: Path = Path("/sys")) -> frozenset[int] | None:
    """The CPUs Linux lists as local to PCI device ``address`` ("0000:1b:00.0"; None: it does not say)."""
    path = root / "bus" / "pci" / "devices" / address / "local_cpulist"
    try:
        return parse_cpus(path.read_text()) or None
    except (OSError, ValueError):
        return None


def parse_cpus(text: str) -> frozenset[int]:
    """A Linux CPU list ("0-7,16-23") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """A set of CPUs as a Linux CPU list ("0-7,16-23")."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def placement_lines(rows: Sequence[Placement], max_hosts: int = 4) -> list[str]:
    """Rank 0's log lines from every rank's :func:`placement` (index = rank).

    One line per host (the first ``max_hosts`` hosts, then a count); then warnings, a line per host (the
    first ``max_hosts`` of each kind, then a count): two ranks use the same physical GPU, or a rank runs
    on none of the cores local to its GPU.
    """
    hosts: dict[str, list[int]] = defaultdict(list)
    for rank, row in enumerate(rows):
        hosts[row.host].append(rank)
    lines = []
    for host, ranks in list(hosts.items())[:max_hosts]:
        parts = ", ".join(
            f"rank {r} -> {rows[r].device} ("
            + ("" if rows[r].device == "cpu" else f"{rows[r].gpu}, ")
            + f"cores {format_cpus(rows[r].cores)})"
            for r in ranks
        )
        lines.append(f"devices on {host}: {parts}")
    if len(hosts) > max_hosts:
        lines.append(f"devices: ... and {len(hosts) - max_hosts} more host(s)")
    shared: list[str] = []
    far: list[str] = []
    for host, ranks in hosts.items():
        users: dict[str, list[int]] = defaultdict(list)
        for r in ranks:
            if rows[r].device != "cpu":
                users[rows[r].gpu].append(r)
        shared.extend(
            f"warning: ranks {', '.join(map(str, sharing))} on {host} share GPU {gpu} "
            "(more ranks than visible GPUs on that node)"
            for gpu, sharing in users.items()
            if len(sharing) > 1
        )
        away = []
        for r in ranks:
            row = rows[r]
            if row.gpu_cores is not None and not row.cores & row.gpu_cores:
                near = format_cpus(row.gpu_cores)
                away.append(f"rank {r} on cores {format_cpus(row.cores)}, GPU {row.gpu} near {near}")
        if away:
            far.append(
                f"warning: on {host}, ranks run on none of the cores local to their GPU ({'; '.join(away)}): "
                "input and copies cross sockets; bind each rank near its GPU (README, Slurm)"
            )
    return lines + _first(shared, max_hosts) + _first(far, max_hosts)


def _first(warnings: list[str], n: int) -> list[str]:
    more = [f"warning: ... and the same on {len(warnings) - n} more host(s)"] if len(warnings) > n else []
    return warnings[:n] + more
