"""Fused allreduce and broadcast against values computed independently on one process."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcngd.comm import packing
from hpcngd.comm.collectives import FusedAllreduce, allreduce_sum, average_symmetric_, broadcast_
from hpcngd.comm.hierarchical import WireReducer
from hpcngd.comm.topology import Topology

SHAPES = [torch.Size(s) for s in [(3, 4), (17,), (2, 2, 5), (1,), (64, 3)]]


def rank_tensors(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("bucket_mb", [1e-4, 8.0])  # 26-float buckets and one bucket
def test_fused_average_equals_mean_of_rank_tensors(comm: MPI.Comm, bucket_mb: float) -> None:
    topo = Topology(comm)
    wire = WireReducer(topo, "fp32", hierarchical=False)
    reducer = FusedAllreduce(wire, SHAPES, bucket_mb)
    assert len(reducer.buckets) == (1 if bucket_mb == 8.0 else 4)  # 12 | 17 | 20+1 | 192
    tensors = rank_tensors(comm.rank)
    reducer.average_(tensors)
    every_rank = [rank_tensors(r) for r in range(comm.size)]  # computed here, without MPI
    for i, got in enumerate(tensors):
        expected = torch.stack([ts[i] for ts in every_rank]).double().mean(0).float()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    numel = sum(s.numel() for s in SHAPES)
    assert wire.bytes_sent["world"] == (4 * numel if comm.size > 1 else 0)
    assert wire.calls["world"] == (len(reducer.buckets) if comm.size > 1 else 0)  # one call per bucket
    topo.close()


@pytest.mark.parametrize("wire_dtype", ["fp32", "bf16"])
def test_symmetric_factors_travel_as_triangles(comm: MPI.Comm, wire_dtype: str) -> None:
    def factors(rank: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(7 + rank)
        mats = [torch.randn(n, n, generator=gen) for n in (1, 5, 12)]
        return [m + m.T for m in mats] + [torch.randn(3, 2, 2, generator=gen)]  # + BN blocks

    with Topology(comm, 2 if comm.size % 2 == 0 else 1) as topo:
        wire = WireReducer(topo, wire_dtype, hierarchical=True)
        mine = factors(comm.rank)
        average_symmetric_(mine, wire, bucket_mb=8.0)
        tol = 1e-6 if wire_dtype == "fp32" else 3e-2
        for i, got in enumerate(mine):
            expected = torch.stack([factors(r)[i] for r in range(comm.size)]).mean(0)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
            if got.ndim == 2:
                assert torch.equal(got, got.T)
        if comm.size > 1:
            values = sum(packing.triangle_size(n) for n in (1, 5, 12)) + 12
            level = "node" if wire.hierarchical else "world"
            assert wire.bytes_sent[level] == values * (4 if wire_dtype == "fp32" else 2)


def test_broadcast_overwrites_with_root_values(comm: MPI.Comm) -> None:
    tensors = [*rank_tensors(comm.rank), torch.tensor([comm.rank, 7], dtype=torch.int64)]
    broadcast_(tensors, comm, root=0)
    expected = [*rank_tensors(0), torch.tensor([0, 7])]
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))


def test_allreduce_sum(comm: MPI.Comm) -> None:
    assert allreduce_sum([1.0, comm.rank], comm) == [comm.size, sum(range(comm.size))]


@pytest.mark.parametrize("ranks_per_node", [0, 1, 2])
def test_topology(comm: MPI.Comm, ranks_per_node: int) -> None:
    if ranks_per_node and comm.size % ranks_per_node:
        with pytest.raises(ValueError, match=r"comm\.ranks_per_node = 2: must divide"):
            Topology(comm, ranks_per_node)
        return
    with Topology(comm, ranks_per_node) as topo:
        rpn = ranks_per_node or comm.size  # without forcing, all ranks here share one host
        assert (topo.local_size, topo.num_nodes) == (rpn, comm.size // rpn)
        assert (topo.node_index, topo.local_rank) == divmod(comm.rank, rpn)
        assert (topo.leaders is not None) == (topo.local_rank == 0)
        if topo.leaders is not None:
            assert topo.leaders.size == topo.num_nodes and topo.leaders.rank == topo.node_index
        assert topo.node.allreduce(1) == rpn
    assert topo.leaders is None
