"""Averaging a flat fp32 buffer over all ranks, flat or in two levels, in an fp32 or 16-bit wire format.

Hierarchical (``comm.hierarchical = true``): reduce inside each node to its leader, allreduce among the
leaders, broadcast inside each node. Flat: one allreduce over the world (the baseline).

Wire formats (``comm.dtype``): ``fp32``, where MPI sums and the values are divided by the number of
contributions before each level's sum; ``fp16`` and ``bf16`` travel as 16-bit words, and MPI never
adds them. A 16-bit level is a reduce-scatter done as one alltoallv (rank r receives every rank's r-th
share of the buffer), a sum of the shares in fp32 on rank r, divided by their count and rounded once to
16 bits, then an allgatherv of the shares (a gatherv to the leader at the node level). That moves the
bytes of a ring allreduce, but no partial sum is ever rounded to 16 bits. An MPI sum of 16-bit partial
sums (a ring adds one rank after another) loses what falls below half a unit in the last place of the
running sum: on Open MPI's ring a bf16 mean over 256 ranks was off by 7.4e-2 (a 3% bias), against
1.7e-3 for one rounding. Here the error of a level is one rounding, plus the fp32 sum's (at most
1,023 x 2^-24 of the sum of the values' magnitudes at 1,024 ranks: negligible unless the values cancel),
whatever the number of ranks, and all ranks get the same bits.

fp16 tensors are multiplied by powers of two agreed over all ranks (:meth:`WireReducer.scales`, one per
tensor) that put each tensor's largest value near 2^14, far from fp16's subnormals (bf16 has fp32's
range and needs none); a mean never exceeds the largest value, so it cannot overflow.
``bytes_sent`` counts the payload of each level (the buffer being averaged there).

Buffers live where :meth:`WireReducer.new_buffer` puts them: on the GPU when MPI takes device memory
(``direct``, :mod:`hpcngd.comm.gpu`), else in host memory, pinned when the tensors are on a GPU.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import torch
from mpi4py import MPI
from torch import Tensor

from hpcngd.comm.topology import Topology

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class WireReducer:
    """In-place mean of flat fp32 (or fp64) buffers over all ranks of a Topology.

    Args:
        topo: world, node and leaders communicators.
        wire: "fp32", "fp16" or "bf16".
        hierarchical: two levels (node, leaders) instead of one flat allreduce; with one node, one rank
            a node, or nodes of unequal sizes (whose means would weigh alike) the flat allreduce is used.
        device: where the tensors to average live.
        direct: MPI takes ``device`` memory (CUDA-aware MPI, fp32 wire only); False stages through host.
    """

    def __init__(
        self,
        topo: Topology,
        wire: str = "fp32",
        hierarchical: bool = True,
        device: torch.device | None = None,
        direct: bool = False,
    ) -> None:
        if wire not in WIRE_DTYPES:
            raise RuntimeError(f"unknown wire dtype {wire!r}")
        device = device or torch.device("cpu")
        if direct and wire != "fp32":
            raise RuntimeError("16-bit wires sum on the host: they cannot hand device buffers to MPI")
        self.buffer_device = device if direct else torch.device("cpu")
        self.pinned = device.type == "cuda" and not direct
        self.topo = topo
        self.dtype = WIRE_DTYPES[wire]
        self.native = wire == "fp32"  # send the buffer's own dtype (fp32, or fp64 factors)
        # Decided alike on every rank: one rank going flat while its node reduces would hang the job.
        self.hierarchical = hierarchical and topo.num_nodes > 1 and topo.uniform and topo.local_size > 1
        self.bytes_sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def new_buffer(self, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """A 1-D buffer where this reducer's MPI calls read and write (device, or pinned host)."""
        return torch.empty(numel, dtype=dtype, device=self.buffer_device, pin_memory=self.pinned)

    def scales(self, buffers: list[Tensor]) -> list[float]:
        """Per-tensor power-of-two factors that put each tensor's largest value over all ranks near 2^14.

        Needed for fp16 only (its smallest normal is 6e-5, and gradients and G factors are often far
        smaller); one MAX allreduce over the world for all tensors of a fused pass. 1.0 otherwise.
        """
        if self.dtype != torch.float16 or self.topo.size == 1 or not buffers:
            return [1.0] * len(buffers)
        local = _abs_max(buffers)
        self.topo.world.Allreduce(MPI.IN_PLACE, [local.numpy(), MPI.DOUBLE], op=MPI.MAX)
        self.calls["scale"] += 1
        return [
            2.0 ** math.floor(math.log2(2.0**14 / m)) if 0 < m < math.inf else 1.0 for m in local.tolist()
        ]

    def average_(self, flat: Tensor) -> None:
        """Replace the 1-D fp32 (or fp64) tensor ``flat`` by its mean over all ranks.

        Under ``wire = "fp32"`` an fp64 buffer travels as fp64. fp16 callers scale the values first
        (:meth:`scales`; :class:`~hpcngd.comm.collectives.FusedAllreduce` does it per tensor).
        """
        topo = self.topo
        if topo.size == 1:
            return
        if not self.hierarchical:
            self._allreduce(flat, topo.world, "world")
            return
        node, leaders = topo.node, topo.leaders
        if self.native:
            flat.div_(node.size)
            if node.rank == 0:
                node.Reduce(MPI.IN_PLACE, _msg(flat), op=MPI.SUM, root=0)
            else:
                node.Reduce(_msg(flat), None, op=MPI.SUM, root=0)
            self._count("node", flat)
            wire = flat
        else:
            wire = flat.to(self.dtype)
            share, counts, displs = self._mean_scatter(wire, node, "node")
            node.Gatherv(
                _msg(share), [_memory(wire.view(torch.int16)), (counts, displs), MPI.INT16_T], root=0
            )
        if leaders is not None:
            self._from_wire(wire, flat)
            self._allreduce(flat, leaders, "leaders")
            wire = flat if self.native else flat.to(self.dtype)  # exact: the same bits
        node.Bcast(_msg(wire), root=0)
        self._count("node_bcast", wire)
        self._from_wire(wire, flat)

    def allgatherv(self, mine: Tensor, counts: list[int]) -> Tensor:
        """Every rank's 1-D fp32 ``mine`` (``counts[r]`` values from rank r), concatenated, on all ranks.

        Used for the preconditioned gradients that each owner computed. 16-bit wires cast once (fp16
        with the agreed scale); every rank, the sender included, keeps the values as they travelled.
        """
        world = self.topo.world
        if world.size == 1:
            return mine
        scale = self.scales([mine])[0]
        wire = mine if self.native else (mine * scale).to(self.dtype)
        out = torch.empty(sum(counts), dtype=wire.dtype, device=wire.device, pin_memory=self.pinned)
        displs = _offsets(counts)
        if self.native:
            world.Allgatherv(_msg(wire), [_memory(out), (counts, displs), _msg(wire)[1]])
        else:
            world.Allgatherv(_msg(wire), [_memory(out.view(torch.int16)), (counts, displs), MPI.INT16_T])
        self._count("allgatherv", wire)
        return out if self.native else out.to(mine.dtype).div_(scale)

    def _allreduce(self, flat: Tensor, comm: MPI.Comm, level: str) -> None:
        if self.native:
            comm.Allreduce(MPI.IN_PLACE, _msg(flat.div_(comm.size)), op=MPI.SUM)
            self._count(level, flat)
            return
        wire = flat.to(self.dtype)
        share, counts, displs = self._mean_scatter(wire, comm, level)
        comm.Allgatherv(_msg(share), [_memory(wire.view(torch.int16)), (counts, displs), MPI.INT16_T])
        self._from_wire(wire, flat)

    def _mean_scatter(self, wire: Tensor, comm: MPI.Comm, level: str) -> tuple[Tensor, list[int], list[int]]:
        """This rank's share of the mean over ``comm`` of the 16-bit vector ``wire``, rounded once.

        Rank r owns ``counts[r]`` values from offset ``displs[r]``. One alltoallv brings it every rank's
        values there; they are summed in fp32 (off by at most (n - 1) 2^-24 of the sum of magnitudes for
        n ranks, far below a 16-bit rounding unless the values cancel; fp64 took twice the time) and
        divided by the rank count before the one rounding to 16 bits. Two collectives make a
        level: this one and the caller's allgatherv (or gatherv).
        """
        size, n = comm.size, wire.numel()
        counts = [n // size + (r < n % size) for r in range(size)]
        displs = _offsets(counts)
        mine = counts[comm.rank]
        received = torch.empty(size * mine, dtype=wire.dtype)
        comm.Alltoallv(
            [_memory(wire.view(torch.int16)), (counts, displs), MPI.INT16_T],
            [
                received.view(torch.int16).numpy(),
                ([mine] * size, [mine * r for r in range(size)]),
                MPI.INT16_T,
            ],
        )
        share = received.view(size, mine).sum(0, dtype=torch.float32).div_(size).to(self.dtype)
        self._count(level, wire, calls=2)
        return share, counts, displs

    def _from_wire(self, wire: Tensor, flat: Tensor) -> None:
        if wire is not flat:
            flat.copy_(wire)

    def _count(self, level: str, wire: Tensor, calls: int = 1) -> None:
        self.bytes_sent[level] += wire.numel() * wire.element_size()
        self.calls[level] += calls


def _offsets(counts: list[int]) -> list[int]:
    """Where each of consecutive blocks of ``counts`` values starts."""
    return [0, *itertools.accumulate(counts[:-1])]


def _memory(t: Tensor) -> object:
    """What mpi4py reads as a buffer: a NumPy view of host memory, or the CUDA tensor itself (mpi4py
    takes objects with ``__cuda_array_interface__``), once the kernels queued on it have run (MPI does
    not follow torch's stream)."""
    if not t.is_cuda:
        return t.numpy()
    torch.cuda.current_stream(t.device).synchronize()
    return t


def _msg(t: Tensor) -> list[object]:
    """An mpi4py buffer spec of a 1-D fp32, fp64 or 16-bit tensor (16-bit words travel as int16)."""
    if t.dtype == torch.float32:
        return [_memory(t), MPI.FLOAT]
    if t.dtype == torch.float64:
        return [_memory(t), MPI.DOUBLE]
    return [_memory(t.view(torch.int16)), MPI.INT16_T]


def _abs_max(buffers: list[Tensor]) -> Tensor:
    """Largest absolute value of each tensor, as fp64 on the host: one transfer per device, not per tensor."""
    out = torch.zeros(len(buffers), dtype=torch.float64)
    by_device: dict[torch.device, list[int]] = {}
    for i, b in enumerate(buffers):
        if b.numel():
            by_device.setdefault(b.device, []).append(i)
    for indices in by_device.values():
        maxes = torch.stack([buffers[i].detach().abs().amax().double() for i in indices])
        out[indices] = maxes.cpu()
    return out
