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


def pack(tensors: Sequence[Tensor], out: Tensor, non_blocking: bool = False) -> Tensor:
    """Copy ``tensors`` one after another into the 1-D buffer ``out`` (dtype cast on copy).

    ``non_blocking``: copies between a GPU and pinned host memory are queued, not waited for.
    """
    offset = 0
    for t in tensors:
        n = t.numel()
        out[offset : offset + n].copy_(t.reshape(-1), non_blocking=non_blocking)
        offset += n
    if offset != out.numel():
        raise RuntimeError(f"pack: {offset} elements into a buffer of {out.numel()}")
    return out


def unpack(flat: Tensor, tensors: Sequence[Tensor], non_blocking: bool = False) -> None:
    """Copy the 1-D buffer ``flat`` back into ``tensors`` in place (inverse of :func:`pack`)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t), non_blocking=non_blocking)
        offset += n
    if offset != flat.numel():
        raise RuntimeError(f"unpack: {flat.numel()} elements into tensors of {offset}")


def flat_buffer(tensors: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """A new 1-D buffer big enough for ``tensors``."""
    return torch.empty(sum(t.numel() for t in tensors), dtype=dtype)


def triangle_size(n: int) -> int:
    """Values in the packed lower triangle of an n x n matrix."""
    return n * (n + 1) // 2


def pack_triangle(m: Tensor) -> Tensor:
    """The lower triangle of a symmetric n x n matrix as n(n+1)/2 values, with no index tensors.

    A rectangular packing (after LAPACK's RFP format): with k1 = ceil(n/2) and k2 = floor(n/2) the
    lower triangle splits into a k1 x k1 triangle L11, a k2 x k1 block L21 and a k2 x k2 triangle L22.
    L11 (on and below the diagonal) and L22 transposed and shifted one column right (strictly above the
    diagonal) tile one k1 x (k2 + 1) rectangle; the packed vector is that rectangle then L21. Every
    step is a dense slice, tril or triu, so packing costs a few passes over memory.
    """
    n = m.shape[0]
    k1, k2 = (n + 1) // 2, n // 2
    rect = m.new_zeros(k1, k2 + 1)
    rect[:, :k1] += torch.tril(m[:k1, :k1])
    rect[:k2, 1:] += torch.triu(m[k1:, k1:].T)
    return torch.cat([rect.reshape(-1), m[k1:, :k1].reshape(-1)])


def unpack_triangle(flat: Tensor, n: int) -> Tensor:
    """The full symmetric n x n matrix from :func:`pack_triangle`'s output."""
    k1, k2 = (n + 1) // 2, n // 2
    if flat.numel() != triangle_size(n):
        raise RuntimeError(f"unpack_triangle: {flat.numel()} values for n = {n}")
    rect = flat[: k1 * (k2 + 1)].reshape(k1, k2 + 1)
    l21 = flat[k1 * (k2 + 1) :].reshape(k2, k1)
    out = flat.new_empty(n, n)
    # Block by block (quarter-size transposes instead of one full-size one).
    l11 = torch.tril(rect[:, :k1])
    out[:k1, :k1] = l11 + torch.tril(l11, -1).T
    u22 = torch.triu(rect[:k2, 1:])  # L22 transposed: its upper triangle
    out[k1:, k1:] = u22 + torch.triu(u22, 1).T
    out[k1:, :k1] = l21
    out[:k1, k1:] = l21.T
    return out
