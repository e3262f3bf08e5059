"""Whether MPI can take GPU buffers (``comm.cuda_aware``), and where each wire's buffers live.

CUDA-aware MPI reads and writes device memory itself; otherwise the trainer stages every fused bucket
through pinned host memory (:class:`~hpcngd.comm.collectives.FusedAllreduce` overlaps the copy of one
bucket with the reduction of the one before). Detection, in order (:func:`mpi_cuda_support`):

1. the MPI 4.1 key ``mpi_memory_alloc_kinds`` of ``MPI_INFO_ENV`` naming ``cuda``;
2. Open MPI's ``MPIX_Query_cuda_support()`` (1 only when built with CUDA and the runtime supports it);
3. MPICH's ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &ok)``.
The library is found among the shared objects this process has loaded (``/proc/self/maps``).

The 16-bit wires sum each rank's share of a level on the host, so they always stage.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from mpi4py import MPI


def _loaded_mpi_libraries() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8")
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "/libmpi" in line and ".so" in line}
    return sorted(p for p in paths if Path(p).name.startswith(("libmpi.", "libmpi_")))


@functools.cache  # the library does not change within a process; the trainer asks for each wire
def mpi_cuda_support() -> tuple[bool, str]:
    """(supported, how it was found out) for the MPI library this process runs with."""
    kinds = MPI.INFO_ENV.Get("mpi_memory_alloc_kinds") if MPI.INFO_ENV != MPI.INFO_NULL else None
    if kinds and any(kind.strip() in ("cuda", "cuda:device") for kind in kinds.split(",")):
        return True, f"MPI_INFO_ENV mpi_memory_alloc_kinds = {kinds!r}"
    for path in _loaded_mpi_libraries():
        lib = ctypes.CDLL(path)
        if hasattr(lib, "MPIX_Query_cuda_support"):
            query = lib.MPIX_Query_cuda_support
            query.restype = ctypes.c_int
            ok = query() == 1
            return ok, f"MPIX_Query_cuda_support() = {int(ok)} ({Path(path).name})"
        if hasattr(lib, "MPIX_GPU_query_support"):
            flag = ctypes.c_int(0)
            lib.MPIX_GPU_query_support(ctypes.c_int(0), ctypes.byref(flag))  # 0: MPIX_GPU_SUPPORT_CUDA
            return flag.value == 1, f"MPIX_GPU_query_support(CUDA) = {flag.value} ({Path(path).name})"
    return False, "the MPI library offers no CUDA-support query"


def direct_device_buffers(setting: str | bool, device: torch.device, wire: str) -> tuple[bool, str]:
    """Whether MPI gets device buffers for this run, and the log line that says why.

    Args:
        setting: ``comm.cuda_aware``: "auto", True or False.
        device: the rank's device.
        wire: ``comm.dtype``.
    """
    if device.type != "cuda":
        return False, "communication from host memory (CPU run)"
    if setting is False:
        return False, "staged through pinned host buffers (comm.cuda_aware = false)"
    if wire != "fp32":
        return False, f"staged through pinned host buffers (comm.dtype = {wire!r} sums on the host)"
    if setting is True:
        return True, "GPU buffers straight to MPI (comm.cuda_aware = true)"
    ok, how = mpi_cuda_support()
    if ok:
        return True, f"GPU buffers straight to MPI ({how})"
    return False, f"staged through pinned host buffers ({how})"
