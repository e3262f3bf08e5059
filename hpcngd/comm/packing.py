"""Wire packing, pure (no MPI): group tensors into fused buckets and copy them in and out of flat
buffers. One packing routine for every collective that moves many tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def plan_buckets(numels: Sequence[int], bucket_elems: int) -> list[list[int]]:
    """Split tensor indices, in order, into groups of at most ``bucket_elems`` elements.

    A tensor larger than a bucket gets a bucket of its own; no tensor is split.
    """
    buckets: list[list[int]] = []
    filled = bucket_elems
    for i, n in enumerate(numels):
        if filled + n > bucket_elems:
            buckets.append([])
            filled = 0
        buckets[-1].append(i)
        filled += n
    return buckets


def pack(tensors: Sequence[Tensor], out: Tensor) -> Tensor:
    """Copy ``tensors`` one after another into the 1-D buffer ``out`` (dtype cast on copy)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        out[offset : offset + n].copy_(t.reshape(-1))
        offset += n
    if offset != out.numel():
        raise RuntimeError(f"pack: {offset} elements into a buffer of {out.numel()}")
    return out


def unpack(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy the 1-D buffer ``flat`` back into ``tensors`` in place (inverse of :func:`pack`)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise RuntimeError(f"unpack: {flat.numel()} elements into tensors of {offset}")


def flat_buffer(tensors: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """A new 1-D buffer big enough for ``tensors``."""
    return torch.empty(sum(t.numel() for t in tensors), dtype=dtype)
