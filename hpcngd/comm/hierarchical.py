"""Averaging a flat fp32 buffer over all ranks, flat or in two levels, in an fp32 or 16-bit wire format.

Hierarchical (``comm.hierarchical = true``): reduce inside each node to its leader, allreduce among the
leaders, broadcast inside each node. Flat: one allreduce over the world (the baseline).

Wire formats (``comm.dtype``): ``fp32``; ``fp16`` and ``bf16`` travel as 16-bit words. Before each cast
the values are divided by the number of contributions summed at that level (the node size, then the
node count; the world size when flat), so a sum never exceeds the largest input and cannot overflow.
MPI has no portable half-precision sum (Open MPI's fp16 SUM is scalar and slow; bf16 was silently
wrong), so 16-bit words are summed by a user-defined operation that adds in fp32 and rounds once per
pairwise combination. Results are cast back to fp32 by every rank from the same broadcast bits, so all
ranks hold identical values. ``bytes_sent`` counts the payload handed to MPI per level.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

from hpcngd.comm.topology import Topology

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_OPS: dict[torch.dtype, MPI.Op] = {}


def _sum16_op(dtype: torch.dtype) -> MPI.Op:
    """A commutative MPI sum of 16-bit words holding ``dtype`` values (created once per dtype)."""
    if dtype not in _OPS:

        def add(inbuf: Any, outbuf: Any, _datatype: MPI.Datatype) -> None:  # MPI buffers
            a = torch.from_numpy(np.frombuffer(inbuf, dtype=np.int16).copy()).view(dtype)
            b = torch.from_numpy(np.frombuffer(outbuf, dtype=np.int16)).view(dtype)
            b.copy_((a.float() + b.float()).to(dtype))

        _OPS[dtype] = MPI.Op.Create(add, commute=True)
    return _OPS[dtype]


class WireReducer:
    """In-place mean of flat fp32 buffers over all ranks of a Topology.

    Args:
        topo: world, node and leaders communicators.
        wire: "fp32", "fp16" or "bf16".
        hierarchical: two levels (node, leaders) instead of one flat allreduce.
    """

    def __init__(self, topo: Topology, wire: str = "fp32", hierarchical: bool = True) -> None:
        if wire not in WIRE_DTYPES:
            raise RuntimeError(f"unknown wire dtype {wire!r}")
        self.topo = topo
        self.dtype = WIRE_DTYPES[wire]
        self.hierarchical = hierarchical and topo.num_nodes > 1 and topo.local_size > 1
        self.bytes_sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def average_(self, flat: Tensor) -> None:
        """Replace the 1-D fp32 tensor ``flat`` by its mean over all ranks."""
        topo = self.topo
        if topo.size == 1:
            return
        if not self.hierarchical:
            self._allreduce(flat, topo.world, "world")
            return
        node, leaders = topo.node, topo.leaders
        wire = self._to_wire(flat, topo.local_size)
        if node.rank == 0:
            node.Reduce(MPI.IN_PLACE, self._msg(wire), op=self._op(), root=0)
        else:
            node.Reduce(self._msg(wire), None, op=self._op(), root=0)
        self._count("node", wire)
        if leaders is not None:
            flat.copy_(wire.to(torch.float32))
            self._allreduce(flat, leaders, "leaders")
            wire = flat.to(self.dtype) if self.dtype != torch.float32 else flat
        node.Bcast(self._msg(wire), root=0)
        self._count("node_bcast", wire)
        if wire is not flat:
            flat.copy_(wire.to(torch.float32))

    def _allreduce(self, flat: Tensor, comm: MPI.Comm, level: str) -> None:
        wire = self._to_wire(flat, comm.size)
        comm.Allreduce(MPI.IN_PLACE, self._msg(wire), op=self._op())
        self._count(level, wire)
        if wire is not flat:
            flat.copy_(wire.to(torch.float32))

    def _to_wire(self, flat: Tensor, contributions: int) -> Tensor:
        """Pre-divided by the number of values summed next, in the wire dtype (a new tensor if cast)."""
        if self.dtype == torch.float32:
            return flat.div_(contributions)
        return (flat / contributions).to(self.dtype)

    def _msg(self, t: Tensor) -> list[object]:
        if self.dtype == torch.float32:
            return [t.numpy(), MPI.FLOAT]
        return [t.view(torch.int16).numpy(), MPI.INT16_T]

    def _op(self) -> MPI.Op:
        return MPI.SUM if self.dtype == torch.float32 else _sum16_op(self.dtype)

    def _count(self, level: str, wire: Tensor) -> None:
        self.bytes_sent[level] += wire.numel() * wire.element_size()
        self.calls[level] += 1
