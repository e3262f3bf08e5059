"""Collectives over torch CPU tensors on an explicit communicator, with byte counting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mpi4py import MPI
from torch import Tensor

from hpcngd.comm import packing


class FusedAllreduce:
    """Average a fixed list of tensors over ``comm`` in fused buckets of ``bucket_mb`` MiB.

    The buckets and their flat buffers (of ``dtype``, fp32 by default) are planned once for the tensor
    shapes; each call packs, runs one in-place ``Allreduce`` per bucket, divides by the rank count and
    unpacks. ``bytes_sent`` counts the payload handed to MPI.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        shapes: Sequence[torch.Size],
        bucket_mb: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.comm = comm
        numels = [s.numel() for s in shapes]
        item = torch.empty(0, dtype=dtype).element_size()
        self.buckets = packing.plan_buckets(numels, max(1, int(bucket_mb * 2**20) // item))
        self.buffers = [torch.empty(sum(numels[i] for i in b), dtype=dtype) for b in self.buckets]
        self.num_tensors = len(shapes)
        self.bytes_sent = 0

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace every tensor by its mean over the ranks (in place)."""
        if len(tensors) != self.num_tensors:
            raise RuntimeError(f"FusedAllreduce planned for {self.num_tensors} tensors, got {len(tensors)}")
        for bucket, buf in zip(self.buckets, self.buffers, strict=False):
            group = [tensors[i] for i in bucket]
            packing.pack(group, buf)
            if self.comm.size > 1:
                self.comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
                buf.div_(self.comm.size)
                self.bytes_sent += buf.numel() * buf.element_size()
            packing.unpack(buf, group)


def average_(tensors: Sequence[Tensor], comm: MPI.Comm, bucket_mb: float) -> int:
    """Average tensors of any shapes over ranks (buckets planned for this call); returns bytes sent."""
    if comm.size == 1 or not tensors:
        return 0
    reducer = FusedAllreduce(comm, [t.shape for t in tensors], bucket_mb, tensors[0].dtype)
    reducer.average_(tensors)
    return reducer.bytes_sent


def broadcast_(tensors: Sequence[Tensor], comm: MPI.Comm, root: int = 0) -> None:
    """Overwrite ``tensors`` on every rank by root's values, in one fused fp32 broadcast."""
    if comm.size == 1 or not tensors:
        return
    floats = [t for t in tensors if t.is_floating_point()]
    others = [t for t in tensors if not t.is_floating_point()]
    for group, dtype in ((floats, torch.float64), (others, torch.int64)):
        if group:
            buf = packing.pack(group, packing.flat_buffer(group, dtype))
            comm.Bcast(buf.numpy(), root=root)
            packing.unpack(buf, group)


def allreduce_sum(values: Sequence[float], comm: MPI.Comm) -> list[float]:
    """Sum a few Python numbers over ranks (fp64), e.g. evaluation counts."""
    buf = torch.tensor(list(values), dtype=torch.float64)
    if comm.size > 1:
        comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
    return buf.tolist()
