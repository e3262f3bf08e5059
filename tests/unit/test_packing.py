"""Fused buckets and the one pack/unpack routine."""

from __future__ import annotations

import pytest
import torch

from hpcngd.comm import packing


def test_plan_buckets() -> None:
    assert packing.plan_buckets([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert packing.plan_buckets([1, 1, 1], 100) == [[0, 1, 2]]
    assert packing.plan_buckets([], 4) == []
    flat = [i for b in packing.plan_buckets([5, 2, 9, 1, 1, 7], 8) for i in b]
    assert flat == list(range(6))


def test_pack_unpack_round_trip() -> None:
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 5)]
    buf = packing.pack(tensors, packing.flat_buffer(tensors))
    assert torch.equal(buf[:6], tensors[0].reshape(-1)) and torch.equal(buf[-5:], tensors[2].reshape(-1))
    out = [torch.zeros_like(t) for t in tensors]
    packing.unpack(buf, out)
    assert all(torch.equal(a, b) for a, b in zip(tensors, out, strict=True))
    with pytest.raises(RuntimeError):
        packing.pack(tensors, torch.empty(3))


@pytest.mark.parametrize("n", range(1, 71))
def test_triangle_round_trip(n: int) -> None:
    a = torch.randn(n, n, dtype=torch.float64)
    m = a + a.T  # exactly symmetric (a @ a.T need not be, bit for bit)
    flat = packing.pack_triangle(m)
    assert flat.numel() == packing.triangle_size(n) == n * (n + 1) // 2
    assert torch.equal(packing.unpack_triangle(flat, n), m)
    # Only the lower triangle travels: the values are exactly its entries.
    rows, cols = torch.tril_indices(n, n)
    assert sorted(flat.tolist()) == sorted(m[rows, cols].tolist())
