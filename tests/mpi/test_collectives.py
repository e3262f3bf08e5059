"""Fused allreduce and broadcast against values computed independently on one process."""

from __future__ import annotations

from pathlib import Path

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
        # devices and threads are the host's, simulated nodes or not
        assert (topo.host_rank, topo.host_size, topo.host.allreduce(1)) == (comm.rank, comm.size, comm.size)
    assert topo.leaders is None


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wire_dtype", ["fp32", "fp16"])
def test_staged_buckets_equal_one_tensor_at_a_time(comm: MPI.Comm, device: str, wire_dtype: str) -> None:
    """The pipelined bucket path (GPU: pinned host buffers, copies queued ahead of the reductions)
    gives the bits of reducing each tensor on its own through the same wire; both near the exact mean."""
    from hpcngd.comm.gpu import mpi_cuda_support

    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    topo = Topology(comm)
    staged = WireReducer(topo, wire_dtype, hierarchical=False, device=dev, direct=False)
    assert staged.new_buffer(3).device.type == "cpu"
    assert staged.new_buffer(3).is_pinned() == (device == "cuda")
    tensors = [t.to(dev) for t in rank_tensors(comm.rank)]
    FusedAllreduce(staged, SHAPES, 1e-4).average_(tensors)  # 4 buckets
    one_by_one = [t.to(dev) for t in rank_tensors(comm.rank)]
    for i, t in enumerate(one_by_one):
        FusedAllreduce(WireReducer(topo, wire_dtype, False, dev), [SHAPES[i]], 8.0).average_([t])
    every_rank = [rank_tensors(r) for r in range(comm.size)]
    tol = 1e-6 if wire_dtype == "fp32" else 2e-3
    for i, (got, alone) in enumerate(zip(tensors, one_by_one, strict=True)):
        assert got.device == dev
        if wire_dtype == "fp32":
            assert torch.equal(got, alone)  # fp16 scales are per fused pass, so only fp32 is bit-equal
        expected = torch.stack([ts[i] for ts in every_rank]).double().mean(0).float()
        torch.testing.assert_close(got.cpu(), expected, rtol=tol, atol=tol)
    if device == "cuda" and wire_dtype == "fp32" and mpi_cuda_support()[0]:
        direct = [t.to(dev) for t in rank_tensors(comm.rank)]
        FusedAllreduce(WireReducer(topo, "fp32", False, dev, direct=True), SHAPES, 1e-4).average_(direct)
        assert all(torch.equal(a, b) for a, b in zip(direct, tensors, strict=True))
    topo.close()


def test_rank_0_alone_lists_the_images_and_every_rank_gets_the_list(
    comm: MPI.Comm, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree of a million images listed by every rank is a metadata storm on a shared file system:
    only rank 0 lists it; bad data stops every rank with the same one line."""
    from hpcngd import cli, config
    from hpcngd.data import folder as folder_reader
    from hpcngd.data.demo import generate
    from hpcngd.errors import AgreedError, UserError

    if comm.rank == 0:
        generate(folder / "data", train_per_class=2, val_per_class=1, size=16)
    comm.Barrier()
    cfg = config.loads(
        "", overrides=[f"data.path={folder / 'data'}", "data.source=folder", "data.batch_size=4"]
    )
    scan = folder_reader.scan

    def refused(*args: object) -> None:  # a UserError: every rank then fails, none waits for it
        raise UserError(f"rank {comm.rank} listed the images")

    with monkeypatch.context() as m:
        if comm.rank:
            m.setattr(folder_reader, "scan", refused)
        train, val = cli.datasets(comm, cfg)
    listed_here = scan(folder / "data" / "train", folder_reader.class_names(folder / "data" / "train"))
    assert train.samples == listed_here and len(val) == 10
    bad = config.loads("", overrides=[f"data.path={folder / 'nothing'}", "data.source=folder"])
    with pytest.raises(AgreedError, match=r"data\.path = .*nothing.*: folder not found"):
        cli.datasets(comm, bad)
