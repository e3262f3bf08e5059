"""Communication of one SP-NGD step with ResNet-50's sizes: bytes, calls and time, side by side.

    mpiexec -n 2 python benchmarks/comm.py
    mpiexec -n 4 python benchmarks/comm.py --ranks-per-node 2      # 2 simulated nodes of 2

Gradients: ResNet-50's 161 parameter tensors (25.6M values). Factors: its 108 Kronecker factors (64 to
4608 wide) and 53 BatchNorm blocks. Gradient modes: one allreduce per tensor vs fused buckets, flat vs
hierarchical, fp32 vs fp16 vs bf16 wire. Factor modes: full fp32 matrices vs packed triangles in each
wire format. For each: the payload a rank hands to MPI at one level (every level of the hierarchical
scheme moves the same payload: node reduce, leaders allreduce, node broadcast), the collective calls
of one pass (all levels, fp16's scale agreement included) as rank 0 sees them, and the median wall time
of --repeats passes (slowest rank). The same script runs unchanged on a cluster.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from mpi4py import MPI
from torch import nn

from hpcngd.comm import packing
from hpcngd.comm.collectives import FusedAllreduce, average_symmetric_
from hpcngd.comm.hierarchical import WireReducer
from hpcngd.comm.topology import Topology
from hpcngd.models.resnet import build
from hpcngd.ngd.preconditioner import select_layers


def timed(world: MPI.Comm, fn: Callable[[], object], repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        world.Barrier()
        t0 = time.perf_counter()
        fn()
        world.Barrier()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks-per-node", type=int, default=0, help="0 = ranks that share memory")
    p.add_argument("--bucket-mb", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    world = MPI.COMM_WORLD
    model = build("resnet50", 1000)
    grads = [torch.randn(q.shape) for q in model.parameters()]
    factors: list[torch.Tensor] = []
    for m in select_layers(model, ()).values():
        if isinstance(m, nn.BatchNorm2d):
            factors.append(torch.rand(m.num_features, 2, 2))
        else:
            assert isinstance(m, (nn.Conv2d, nn.Linear))
            for d in (m.weight[0].numel() + (m.bias is not None), m.weight.shape[0]):
                r = torch.randn(d, d) / d**0.5
                factors.append(r + r.T)
    rows: list[tuple[str, int, int, float]] = []
    with Topology(world, args.ranks_per_node) as topo:

        def measure(label: str, wire: WireReducer, fn: Callable[[], object]) -> None:
            seconds = timed(world, fn, args.repeats)
            calls = sum(wire.calls.values()) // args.repeats
            # Every level moves the same payload; report one level's (node reduce, or the flat call).
            level = max(wire.bytes_sent.values(), default=0)
            rows.append((label, level // args.repeats, calls, seconds))

        def per_tensor() -> None:
            for g in grads:
                flat_wire.average_(g.view(-1))

        flat_wire = WireReducer(topo, "fp32", hierarchical=False)
        measure("grads fp32 flat, one call per tensor", flat_wire, per_tensor)
        for dtype in ("fp32", "fp16", "bf16"):
            for hier in (False, True):
                wire = WireReducer(topo, dtype, hierarchical=hier)
                fused = FusedAllreduce(wire, [g.shape for g in grads], args.bucket_mb)
                kind = "hierarchical" if wire.hierarchical else "flat"
                measure(f"grads {dtype} {kind}, fused", wire, partial(fused.average_, grads))
        full = WireReducer(topo, "fp32", hierarchical=False)
        full_fused = FusedAllreduce(full, [f.shape for f in factors], args.bucket_mb)
        measure("factors fp32 full matrices, flat, fused", full, lambda: full_fused.average_(factors))
        for dtype, hier in (("fp32", False), ("fp16", False), ("fp16", True)):
            wire = WireReducer(topo, dtype, hierarchical=hier)
            if hier and not wire.hierarchical:
                continue  # one level only: the flat row above is the same thing
            kind = "hierarchical" if wire.hierarchical else "flat"
            measure(
                f"factors {dtype} triangles, {kind}, fused",
                wire,
                partial(average_symmetric_, factors, wire, args.bucket_mb),
            )
        squares = [f for f in factors if f.ndim == 2]
        pack_s = timed(
            world, lambda: [packing.unpack_triangle(packing.pack_triangle(f), f.shape[0]) for f in squares], 1
        )
        if world.rank == 0:
            print(f"{topo.describe()}, bucket {args.bucket_mb} MiB, median of {args.repeats} passes")
            print(f"{'what':46s} {'MiB/level':>9s} {'calls':>6s} {'seconds':>8s}")
            for label, nbytes, calls, seconds in rows:
                print(f"{label:46s} {nbytes / 2**20:9.1f} {calls:6d} {seconds:8.3f}")
            by = {label: nbytes for label, nbytes, _, _ in rows}
            full_bytes = by["factors fp32 full matrices, flat, fused"]
            tri16 = by["factors fp16 triangles, flat, fused"]
            print(f"factor bytes, fp16 triangles / fp32 full: {tri16 / full_bytes:.4f}")
            print(f"(packing and unpacking every factor, no communication: {pack_s:.3f} s)")


if __name__ == "__main__":
    main()
