"""Communication of one SP-NGD step with ResNet-50's sizes: bytes, calls and time, side by side.

    mpiexec -n 2 python benchmarks/comm.py
    mpiexec -n 4 python benchmarks/comm.py --ranks-per-node 2      # 2 simulated nodes of 2
    mpiexec -n 32 python benchmarks/comm.py --model resnet20       # many ranks on one small host

Gradients: ResNet-50's 161 parameter tensors (25.6M values). Factors: its 108 Kronecker factors (64 to
4608 wide) and 53 BatchNorm blocks. Gradient modes: one allreduce per tensor vs fused buckets, flat vs
hierarchical, fp32 vs fp16 vs bf16 wire. Factor modes: full fp32 matrices vs packed triangles in each
wire format. For each: the payload a rank hands to MPI at one level (every level of the hierarchical
scheme moves the same payload: node reduce, leaders allreduce, node broadcast), the collective calls
of one pass (all levels, fp16's scale agreement included) as rank 0 sees them, and the median wall time
of --repeats passes (slowest rank). The same script runs unchanged on a cluster.

Error: each rank's values are a part shared by all ranks plus its own noise (as gradients and factors
of one model on different micro-batches are), and one pass of each mode is compared with the fp64 mean
of the values as sent (each rank's values rounded to the wire format, then an fp64 MPI sum):
||mean - fp64 mean|| / ||fp64 mean||. So the column shows the reduction's own rounding, not the
inputs': a flat 16-bit level rounds once (measured: 1.7e-3 in bf16, 2.2e-4 in fp16 at 4 and 8 ranks;
2.0e-3 and 2.5e-4 at 2, where the sum of two 16-bit values has one bit too many, so its rounding is
none or exactly half a unit), a hierarchical run rounds the node means and then their mean (2.3e-3 and
2.9e-4 on 2 nodes), and fp32 gives about 4e-8; more shows where partial sums were rounded.
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
    p.add_argument("--model", default="resnet50", help="whose tensor sizes: resnet50, or a small one")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    model = build(args.model, 1000)

    def draw(shape: tuple[int, ...], shared: torch.Generator, own: torch.Generator) -> torch.Tensor:
        """The same values on every rank, plus 10% of this rank's own noise."""
        return torch.randn(shape, generator=shared) + 0.1 * torch.randn(shape, generator=own)

    def generators() -> tuple[torch.Generator, torch.Generator]:
        return torch.Generator().manual_seed(0), torch.Generator().manual_seed(1 + world.rank)

    def make_grads() -> list[torch.Tensor]:
        shared, own = generators()
        return [draw(q.shape, shared, own) for q in model.parameters()]

    def make_factors() -> list[torch.Tensor]:
        shared, own = generators()
        factors: list[torch.Tensor] = []
        for m in select_layers(model, ()).values():
            if isinstance(m, nn.BatchNorm2d):
                factors.append(draw((m.num_features, 2, 2), shared, own).abs())
            else:
                assert isinstance(m, (nn.Conv2d, nn.Linear))
                for d in (m.weight[0].numel() + (m.bias is not None), m.weight.shape[0]):
                    r = draw((d, d), shared, own) / d**0.5
                    factors.append(r + r.T)
        return factors

    rows: list[tuple[str, int, int, float, float]] = []
    with Topology(world, args.ranks_per_node) as topo:

        def measure(
            label: str,
            wire: WireReducer,
            make: Callable[[], list[torch.Tensor]],
            run: Callable[[list[torch.Tensor]], object],
        ) -> None:
            """Error of one pass on fresh values against the fp64 mean of the values as sent, then the
            timed passes."""
            tensors = make()
            sent = torch.float32 if wire.native else wire.dtype
            ref = torch.cat([t.to(sent).double().reshape(-1) for t in tensors])
            world.Allreduce(MPI.IN_PLACE, ref.numpy(), op=MPI.SUM)
            ref /= world.size
            run(tensors)
            offset, squares = 0, 0.0
            for t in tensors:
                squares += float((t.double().reshape(-1) - ref[offset : offset + t.numel()]).square().sum())
                offset += t.numel()
            err = squares**0.5 / float(ref.norm())
            del ref
            wire.bytes_sent.clear()
            wire.calls.clear()
            seconds = timed(world, lambda: run(tensors), args.repeats)
            calls = sum(wire.calls.values()) // args.repeats
            # Every level moves the same payload; report one level's (node reduce, or the flat call).
            level = max(wire.bytes_sent.values(), default=0)
            rows.append((label, level // args.repeats, calls, seconds, err))

        def per_tensor(tensors: list[torch.Tensor]) -> None:
            for g in tensors:
                flat_wire.average_(g.view(-1))

        flat_wire = WireReducer(topo, "fp32", hierarchical=False)
        measure("grads fp32 flat, one call per tensor", flat_wire, make_grads, per_tensor)
        for dtype in ("fp32", "fp16", "bf16"):
            for hier in (False, True):
                wire = WireReducer(topo, dtype, hierarchical=hier)
                if hier and not wire.hierarchical:
                    continue  # one level only: the flat row is the same thing
                fused = FusedAllreduce(wire, [q.shape for q in model.parameters()], args.bucket_mb)
                kind = "hierarchical" if wire.hierarchical else "flat"
                measure(f"grads {dtype} {kind}, fused", wire, make_grads, fused.average_)
        full = WireReducer(topo, "fp32", hierarchical=False)
        factor_shapes = [f.shape for f in make_factors()]
        full_fused = FusedAllreduce(full, factor_shapes, args.bucket_mb)
        measure("factors fp32 full matrices, flat, fused", full, make_factors, full_fused.average_)
        for dtype in ("fp32", "fp16", "bf16"):
            for hier in (False, True):
                wire = WireReducer(topo, dtype, hierarchical=hier)
                if hier and not wire.hierarchical:
                    continue
                kind = "hierarchical" if wire.hierarchical else "flat"
                run = partial(average_symmetric_, reducer=wire, bucket_mb=args.bucket_mb)
                measure(f"factors {dtype} triangles, {kind}, fused", wire, make_factors, run)
        squares = [f for f in make_factors() if f.ndim == 2]
        pack_s = timed(
            world, lambda: [packing.unpack_triangle(packing.pack_triangle(f), f.shape[0]) for f in squares], 1
        )
        if world.rank == 0:
            print(f"{topo.describe()}, bucket {args.bucket_mb} MiB, median of {args.repeats} passes")
            print(f"{'what':46s} {'MiB/level':>9s} {'calls':>6s} {'seconds':>8s} {'error':>8s}")
            for label, nbytes, calls, seconds, err in rows:
                print(f"{label:46s} {nbytes / 2**20:9.1f} {calls:6d} {seconds:8.3f} {err:8.1e}")
            by = {label: nbytes for label, nbytes, _, _, _ in rows}
            full_bytes = by["factors fp32 full matrices, flat, fused"]
            tri16 = by["factors fp16 triangles, flat, fused"]
            print(f"factor bytes, fp16 triangles / fp32 full: {tri16 / full_bytes:.4f}")
            print(f"(packing and unpacking every factor, no communication: {pack_s:.3f} s)")


if __name__ == "__main__":
    main()
