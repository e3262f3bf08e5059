"""``hpcngd plan``: what a run would do at a given scale, computed on a laptop without MPI.

Prints the layer-to-rank inversion plan (:mod:`hpcngd.ngd.plan`) and the bytes per step each rank hands
to MPI at each level, in the run's wire format, for gradients, SP-NGD factors and the preconditioned
gradients every owner shares (plus the fp32 pass of the loss, flags and BatchNorm statistics). Payload is
the buffer a rank averages at a level; how many bytes cross the network depends on the MPI algorithm (a
ring allreduce moves about twice the payload, as does a 16-bit level's alltoallv and allgatherv).
"""

from __future__ import annotations

from torch import nn

from hpcngd.comm.packing import triangle_size
from hpcngd.config import Config
from hpcngd.models.resnet import build
from hpcngd.ngd.plan import Plan, layer_costs, make_plan, owned_parameters
from hpcngd.ngd.preconditioner import select_layers

WIRE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def factor_values(layers: dict[str, nn.Module], packed: bool) -> int:
    """Values of all factors of ``layers``: packed triangles (or full matrices) plus 2x2 BN blocks."""
    total = 0
    for m in layers.values():
        if isinstance(m, nn.BatchNorm2d):
            total += 4 * m.num_features
            continue
        assert isinstance(m, (nn.Conv2d, nn.Linear))
        for d in (m.weight[0].numel() + (1 if m.bias is not None else 0), m.weight.shape[0]):
            total += triangle_size(d) if packed else d * d
    return total


def shared_values(layers: dict[str, nn.Module], plan: Plan) -> list[int]:
    """Values each rank hands to the allgatherv of preconditioned gradients every step: its own layers'
    parameters (:meth:`hpcngd.train.Trainer._share_preconditioned`)."""
    return [sum(p.numel() for p in params) for params in owned_parameters(layers, plan)]


def _mb(n_bytes: float, width: int = 10) -> str:
    """MiB to the KiB: fine enough to check against a run's comm_bytes_* (bytes, in metrics.jsonl)."""
    return f"{n_bytes / 2**20:{width}.3f} MiB"


def print_plan(cfg: Config, world_size: int, ranks_per_node: int) -> None:
    """Print the plan and the wire volume of ``cfg`` at ``world_size`` ranks."""
    model = build(cfg.model.arch, cfg.model.num_classes)
    spngd = cfg.optim.name == "spngd"
    layers = select_layers(model, cfg.ngd.exclude) if spngd else {}
    nodes = max(1, world_size // ranks_per_node)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in layers.values())
    print(
        f"{cfg.model.arch}: {len(layers)} preconditioned layers ({len(layers) - n_bn} conv/fc, {n_bn} "
        f"BatchNorm) on {world_size} ranks ({nodes} nodes of {ranks_per_node})"
    )
    plan = make_plan(layer_costs(layers), world_size) if layers else None
    if plan is not None:
        _print_inversion(plan)
    else:
        why = "ngd.exclude matches every layer" if spngd else f'optim.name = "{cfg.optim.name}"'
        print(f"{why}: nothing is inverted and no factors travel")
    _print_payload(cfg, model, layers, plan, nodes, ranks_per_node)


def _print_inversion(plan: Plan) -> None:
    world_size = plan.world_size
    mean = sum(plan.loads) / world_size
    print(
        f"inversion cost per rank (d^3 units): max {max(plan.loads):.3g}, mean {mean:.3g}, "
        f"min {min(plan.loads):.3g}; imbalance max/mean {plan.imbalance:.2f}; idle ranks {plan.idle_ranks}"
    )
    busiest = sorted(range(world_size), key=lambda r: -plan.loads[r])
    shown = busiest if world_size <= 16 else busiest[:8]
    for rank in sorted(shown):
        owned = plan.owned_by(rank)
        print(
            f"  rank {rank:5d}: {plan.loads[rank]:10.3g}  {len(owned):3d} layers  {', '.join(owned[:4])}"
            + (" ..." if len(owned) > 4 else "")
        )
    if len(shown) < world_size:
        print(f"  ... {world_size - len(shown)} more ranks (the 8 busiest are shown)")


def _print_payload(
    cfg: Config,
    model: nn.Module,
    layers: dict[str, nn.Module],
    plan: Plan | None,
    nodes: int,
    ranks_per_node: int,
) -> None:
    item = WIRE_BYTES[cfg.comm.dtype]
    grads = sum(p.numel() for p in model.parameters()) * item
    # the loss and 4 control values (train.py) ride with the BatchNorm means and variances
    exact = (5 + 2 * sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))) * 4
    factors = factor_values(layers, packed=True) * item
    full = factor_values(layers, packed=False) * 4
    two_level = cfg.comm.hierarchical and nodes > 1 and ranks_per_node > 1
    print(
        f"payload per step handed to MPI by each rank, comm.dtype = {cfg.comm.dtype}, "
        f"{'hierarchical' if two_level else 'flat'}:"
    )
    sizes = [("gradients", grads, item), ("loss, flags, BN stats", exact, 4)]
    sizes += [("factors, all refreshed", factors, item)] if layers else []
    for what, size, width in sizes:
        # a 16-bit level is an alltoallv of shares and their gather (hpcngd/comm/hierarchical.py)
        reduce, allreduce = (
            ("reduce", "allreduce") if width == 4 else ("alltoallv+gatherv", "alltoallv+allgatherv")
        )
        if two_level:
            print(
                f"  {what:24s} node {reduce} {_mb(size)} | leaders {allreduce} {_mb(size)} (leaders only)"
                f" | node broadcast {_mb(size)}"
            )
        else:
            print(f"  {what:24s} world {allreduce} {_mb(size)}")
    if plan is not None and plan.world_size > 1:
        shared = [n * item for n in shared_values(layers, plan)]
        top = max(range(len(shared)), key=shared.__getitem__)
        print(
            f"  {'preconditioned grads':24s} world allgatherv: sends {_mb(shared[0], 0)} (rank 0; at "
            f"most {_mb(shared[top], 0)}, rank {top}), receives {_mb(sum(shared), 0)}"
        )
    if layers:
        print(
            f"  factors as full fp32 matrices would be {_mb(full)}: packed {cfg.comm.dtype} triangles are "
            f"{factors / full:.3f} of that"
        )
