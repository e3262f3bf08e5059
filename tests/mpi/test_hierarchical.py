"""Hierarchical and flat averaging in every wire format against the sum of all ranks' data computed
here with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcngd.comm.collectives import FusedAllreduce
from hpcngd.comm.hierarchical import WIRE_DTYPES, WireReducer
from hpcngd.comm.topology import Topology

TOLERANCE = {"fp32": 1e-6, "fp16": 2e-3, "bf16": 1.6e-2}  # relative, about 2 ulps of the format


def rank_data(rank: int, numel: int) -> np.ndarray:
    return np.random.default_rng((rank, numel)).normal(size=numel).astype(np.float32) * 100.0


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("hierarchical", [True, False], ids=["hier", "flat"])
@pytest.mark.parametrize("ranks_per_node", [1, 2])
@pytest.mark.parametrize("numel", [1, 7, 1001, 0])
def test_mean_matches_numpy(
    comm: MPI.Comm, wire: str, hierarchical: bool, ranks_per_node: int, numel: int
) -> None:
    if comm.size % ranks_per_node:
        pytest.skip("ranks_per_node must divide the rank count")
    with Topology(comm, ranks_per_node) as topo:
        reducer = WireReducer(topo, wire, hierarchical)
        flat = torch.from_numpy(rank_data(comm.rank, numel))
        reducer.average_(flat)
        expected = np.mean([rank_data(r, numel).astype(np.float64) for r in range(comm.size)], axis=0)
        scale = np.abs(expected).max() if numel else 1.0
        assert np.abs(flat.numpy() - expected).max(initial=0.0) <= TOLERANCE[wire] * max(scale, 1.0) * 4
        gathered = comm.allgather(flat.numpy().tobytes())
        assert len(set(gathered)) == 1  # every rank holds the same bits
        if comm.size > 1 and numel:
            levels = set(reducer.bytes_sent)
            two_level = hierarchical and topo.num_nodes > 1 and topo.local_size > 1
            assert levels == (
                {"node", "node_bcast"} | ({"leaders"} if topo.leaders else set()) if two_level else {"world"}
            )
            item = 4 if wire == "fp32" else 2
            assert reducer.bytes_sent["node" if two_level else "world"] == numel * item


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("hierarchical", [True, False], ids=["hier", "flat"])
def test_16bit_mean_is_rounded_once_a_level(comm: MPI.Comm, wire: str, hierarchical: bool) -> None:
    """Bit for bit: a level's result is the exact mean of its 16-bit inputs, rounded once to 16 bits.

    No partial sum is rounded, so the result does not depend on the rank count's tree or on MPI's
    algorithm (a ring of 16-bit partial sums over 256 ranks lost 3% of a bf16 mean). At 4 ranks the flat
    case is where rounded partial sums differ from this reference; the two-level case (2 nodes of 2
    here) checks the gatherv, leaders and broadcast wiring, whose levels of 2 round alike either way.
    """
    dtype, numel = WIRE_DTYPES[wire], 4099

    def values(rank: int) -> torch.Tensor:
        """Multiples of 2^-6 below 2^10: sums of a few of them, as 16-bit words, are exact in fp32."""
        return torch.from_numpy(np.round(rank_data(rank, numel) * 64) / 64)

    def wire_values(ranks: range) -> torch.Tensor:
        """Those ranks' values as they go on the wire, exactly, in fp64 (one row a rank)."""
        return torch.stack([values(r).to(dtype).double() for r in ranks])

    with Topology(comm, 2 if comm.size % 2 == 0 else 1) as topo:
        reducer = WireReducer(topo, wire, hierarchical)
        flat = values(comm.rank)
        reducer.average_(flat)
        if comm.size == 1:
            expected = values(0)  # nothing travels, nothing is rounded
        elif reducer.hierarchical:
            k = topo.local_size
            node_means = [
                wire_values(range(n * k, n * k + k)).mean(0).to(dtype) for n in range(comm.size // k)
            ]
            expected = torch.stack(node_means).double().mean(0).to(dtype).float()
        else:
            expected = wire_values(range(comm.size)).mean(0).to(dtype).float()
        assert torch.equal(flat, expected)
        assert reducer.calls["node" if reducer.hierarchical else "world"] == (2 if comm.size > 1 else 0)


class UnevenNodes(MPI.Intracomm):
    """The world, whose shared-memory nodes are all ranks but the last, and the last (as a job of 10
    ranks placed 4 + 4 + 2 has nodes of unequal sizes)."""

    def Split_type(self, split_type: int, key: int = 0, info: MPI.Info = MPI.INFO_NULL) -> MPI.Intracomm:
        return self.Split(color=int(self.rank == self.size - 1), key=key)


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_nodes_of_unequal_sizes_average_flat(comm: MPI.Comm, wire: str) -> None:
    """Equal weights for node means of 3 and 1 ranks gave 2.25 for the mean 1.5 of 0..3; a node of one
    rank went flat while the other reduced inside its node, and the job hung."""
    with Topology(UnevenNodes(comm)) as topo:
        reducer = WireReducer(topo, wire, hierarchical=True)
        flat = torch.full((6,), float(comm.rank))
        reducer.average_(flat)
        assert torch.equal(flat, torch.full((6,), (comm.size - 1) / 2))
        assert topo.uniform == (comm.size <= 2) and not reducer.hierarchical
        if comm.size > 2:
            assert (
                topo.describe()
                == f"{comm.size} ranks on 2 nodes of unequal sizes (1/{comm.size - 1}: communication is flat)"
            )


def test_fp16_mean_of_values_near_the_maximum_does_not_overflow(comm: MPI.Comm) -> None:
    with Topology(comm, 2 if comm.size % 2 == 0 else 1) as topo:
        flat = torch.full((5,), 60000.0)  # near fp16's max 65504: a plain sum of 2+ ranks overflows
        WireReducer(topo, "fp16", hierarchical=True).average_(flat)
        assert bool(torch.isfinite(flat).all())
        torch.testing.assert_close(flat, torch.full((5,), 60000.0), rtol=1e-3, atol=0)


def test_fp16_scaling_keeps_tiny_values(comm: MPI.Comm) -> None:
    """Gradients of 1e-9..1e-7 are fp16 subnormals or zero; the agreed scale keeps them."""
    with Topology(comm, 2 if comm.size % 2 == 0 else 1) as topo:
        wire = WireReducer(topo, "fp16", hierarchical=True)
        tiny = [torch.from_numpy(rank_data(r, 300) * 1e-9) for r in range(comm.size)]
        reducer = FusedAllreduce(wire, [torch.Size([300])], bucket_mb=8.0)
        mine = tiny[comm.rank].clone()
        reducer.average_([mine])
        expected = torch.stack(tiny).double().mean(0)
        err = (mine.double() - expected).abs().max() / expected.abs().max()
        assert float(err) <= 2e-3
        assert wire.calls["scale"] == (1 if comm.size > 1 else 0)  # one MAX allreduce for the pass


def test_fp16_scales_each_tensor_of_a_bucket(comm: MPI.Comm) -> None:
    """A bucket holding an A-like (~100) and a G-like (~1e-8) tensor keeps both to fp16 precision."""
    with Topology(comm, 2 if comm.size % 2 == 0 else 1) as topo:
        big = [torch.from_numpy(rank_data(r, 50)) for r in range(comm.size)]
        tiny = [torch.from_numpy(rank_data(r, 60) * 1e-10) for r in range(comm.size)]
        mine = [big[comm.rank].clone(), tiny[comm.rank].clone()]
        reducer = FusedAllreduce(WireReducer(topo, "fp16", hierarchical=True), [t.shape for t in mine], 8.0)
        assert len(reducer.buckets) == 1
        reducer.average_(mine)
        for got, every in zip(mine, (big, tiny), strict=True):
            expected = torch.stack(every).double().mean(0)
            assert float((got.double() - expected).abs().max() / expected.abs().max()) <= 2e-3
