"""Collectives over torch CPU tensors on an explicit communicator, with byte counting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mpi4py import MPI
from torch import Tensor

from hpcngd.comm import packing
from hpcngd.comm.hierarchical import WireReducer


class FusedAllreduce:
    """Average a fixed list of tensors over all ranks in fused buckets of ``bucket_mb`` MiB.

    The buckets and their flat buffers (of ``dtype``, where ``reducer`` wants them: see
    :meth:`WireReducer.new_buffer`) are planned once for the tensor shapes; each call packs every
    bucket, has ``reducer`` average it (flat or hierarchical, in its wire format: one collective per
    bucket and level, never one per tensor) and unpacks.

    Staged (GPU tensors, host buffers): every bucket's device-to-host copy is queued at once and an
    event marks its end; the reduction of bucket i waits only for copy i, so copying bucket i+1 overlaps
    reducing bucket i, and the copy back of bucket i is queued while bucket i+1 is reduced.
    """

    def __init__(
        self,
        reducer: WireReducer,
        shapes: Sequence[torch.Size],
        bucket_mb: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.reducer = reducer
        numels = [s.numel() for s in shapes]
        item = torch.empty(0, dtype=dtype).element_size()
        self.buckets = packing.plan_buckets(numels, max(1, int(bucket_mb * 2**20) // item))
        self.buffers = [reducer.new_buffer(sum(numels[i] for i in b), dtype) for b in self.buckets]
        self.num_tensors = len(shapes)

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace every tensor by its mean over the ranks (in place)."""
        if self.reducer.topo.size == 1:
            return
        if len(tensors) != self.num_tensors:
            raise RuntimeError(f"FusedAllreduce planned for {self.num_tensors} tensors, got {len(tensors)}")
        # fp16 only: each tensor gets its own power-of-two scale (one MAX allreduce for all of them);
        # a bucket mixes tensors whose magnitudes differ by orders (A and G factors, layers' gradients).
        scales = self.reducer.scales(list(tensors))
        scaled = [i for i, s in enumerate(scales) if s != 1.0]
        for i in scaled:
            tensors[i].mul_(scales[i])  # exact: a power of two
        copied = []
        for bucket, buf in zip(self.buckets, self.buffers, strict=True):
            packing.pack([tensors[i] for i in bucket], buf, non_blocking=True)
            copied.append(_copy_done(buf, [tensors[i] for i in bucket]))
        for bucket, buf, done in zip(self.buckets, self.buffers, copied, strict=True):
            if done is not None:
                done.synchronize()
            self.reducer.average_(buf)
            packing.unpack(buf, [tensors[i] for i in bucket], non_blocking=True)
        for i in scaled:
            tensors[i].div_(scales[i])


def _copy_done(buf: Tensor, sources: Sequence[Tensor]) -> torch.cuda.Event | None:
    """An event recorded after queued GPU-to-host copies into ``buf`` (None: nothing was queued)."""
    gpu = next((t.device for t in sources if t.is_cuda), None)
    if buf.is_cuda or gpu is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(gpu))  # the copies' stream, whatever the current device
    return event


def _square(m: Tensor) -> bool:
    return m.ndim == 2 and m.shape[0] == m.shape[1]


def pack_factors(matrices: Sequence[Tensor]) -> list[Tensor]:
    """Wire form of factors: square matrices (assumed symmetric) as packed lower triangles."""
    return [packing.pack_triangle(m) if _square(m) else m.reshape(-1) for m in matrices]


def unpack_factors(packed: Sequence[Tensor], matrices: Sequence[Tensor]) -> None:
    """Write :func:`pack_factors` output back into ``matrices`` (in place)."""
    for m, p in zip(matrices, packed, strict=True):
        m.copy_(packing.unpack_triangle(p, m.shape[0]) if _square(m) else p.view_as(m))


def average_symmetric_(matrices: Sequence[Tensor], reducer: WireReducer, bucket_mb: float) -> None:
    """Average factors over ranks in one fused pass, square ones as packed lower triangles."""
    if reducer.topo.size == 1 or not matrices:
        return
    packed = pack_factors(matrices)
    FusedAllreduce(reducer, [p.shape for p in packed], bucket_mb, matrices[0].dtype).average_(packed)
    unpack_factors(packed, matrices)


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
