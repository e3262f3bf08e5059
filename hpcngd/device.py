"""Which device each rank computes on (``run.device``), and the log lines that say so.

``cuda``: a rank takes GPU ``local_rank % n`` of the ``n`` GPUs it can see, so the ranks of a node
spread over its GPUs whether the launcher shows every rank all the GPUs of the node or (Slurm
``--gpus-per-task``, a ``CUDA_VISIBLE_DEVICES`` per rank) one GPU each. ``auto`` means ``cuda`` when
a GPU is visible, else ``cpu``. The decision (:func:`choose`) is pure; :func:`bind` asks torch and
makes the choice the current CUDA device. :func:`placement_lines` summarises, for rank 0's log, which
rank of which host uses which physical GPU, and warns when two ranks of one host share a GPU.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hpcngd.errors import UserError


def visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """The physical GPU ids of ``CUDA_VISIBLE_DEVICES`` in order (None when it is not set)."""
    text = env.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def choose(requested: str, local_rank: int, num_gpus: int, env: Mapping[str, str]) -> str:
    """``"cpu"`` or ``"cuda:i"`` for one rank.

    Args:
        requested: ``run.device``: "auto", "cpu" or "cuda".
        local_rank: this rank's index on its node.
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
    return f"cuda:{local_rank % num_gpus}"


def physical_id(device: str, env: Mapping[str, str]) -> str:
    """The GPU's id as the node knows it (through CUDA_VISIBLE_DEVICES), or "cpu"."""
    if device == "cpu":
        return "cpu"
    index = int(device.split(":")[1])
    visible = visible_devices(env)
    return visible[index] if visible is not None and index < len(visible) else str(index)


def bind(requested: str, local_rank: int) -> torch.device:
    """Choose this rank's device (see :func:`choose`) and make it torch's current CUDA device."""
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(choose(requested, local_rank, num_gpus, os.environ))
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


def placement(device: torch.device) -> tuple[str, str, str]:
    """(host, device, physical GPU id) of this rank, to be gathered for :func:`placement_lines`."""
    name = str(device) if device.type == "cpu" else f"cuda:{device.index}"
    gpu = physical_id(name, os.environ)
    if device.type == "cuda":
        gpu = f"{gpu} {torch.cuda.get_device_name(device)}"
    return os.uname().nodename, name, gpu


def placement_lines(rows: Sequence[tuple[str, str, str]], max_hosts: int = 4) -> list[str]:
    """Rank 0's log lines from every rank's :func:`placement` (index = rank).

    One line per host (the first ``max_hosts`` hosts, then a count), and a warning line for every
    host where two ranks use the same physical GPU.
    """
    hosts: dict[str, list[int]] = defaultdict(list)
    for rank, (host, _, _) in enumerate(rows):
        hosts[host].append(rank)
    lines = []
    for host, ranks in list(hosts.items())[:max_hosts]:
        parts = ", ".join(f"rank {r} -> {rows[r][1]} ({rows[r][2]})" for r in ranks)
        lines.append(f"devices on {host}: {parts}")
    if len(hosts) > max_hosts:
        lines.append(f"devices: ... and {len(hosts) - max_hosts} more host(s)")
    for host, ranks in hosts.items():
        users: dict[str, list[int]] = defaultdict(list)
        for r in ranks:
            if rows[r][1] != "cpu":
                users[rows[r][2]].append(r)
        for gpu, sharing in users.items():
            if len(sharing) > 1:
                lines.append(
                    f"warning: ranks {', '.join(map(str, sharing))} on {host} share GPU {gpu} "
                    "(more ranks than visible GPUs on that node)"
                )
    return lines
