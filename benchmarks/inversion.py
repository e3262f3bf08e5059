"""Wall time to invert every SP-NGD factor of a model, on one rank or split over ranks by the plan.

    python benchmarks/inversion.py                       # 1 rank (torch's default threads)
    mpiexec -n 2 python benchmarks/inversion.py          # 2 ranks, each inverts the layers it owns
    python benchmarks/inversion.py --device cuda         # 1 GPU

Factors have the model's real sizes (ResNet-50: 108 factors, 64..4608 wide, and 53 BatchNorm layers)
and well-conditioned random SPD values; each is damped and inverted with the production path
(``robust_inverses``, Cholesky in fp32, all of a rank's factors queued before their checks are read).
Wall time is the slowest rank's, between two barriers (and a wait for the GPU); after one untimed run,
the median of --repeats runs is printed with the plan's imbalance, and beside it the same work done one
factor at a time (``robust_inverse`` on each: a wait for the device after every factor).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mpi4py import MPI
from torch import nn

from hpcngd.models.resnet import build
from hpcngd.ngd import inverse
from hpcngd.ngd.plan import layer_costs, make_plan
from hpcngd.ngd.preconditioner import select_layers


def spd(d: int, gen: torch.Generator) -> torch.Tensor:
    """A random symmetric matrix with eigenvalues in about [1, 3], built in O(d^2)."""
    r = torch.randn(d, d, generator=gen) * (0.5 / d**0.5)
    return 2.0 * torch.eye(d) + (r + r.T) / 2**0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    world = MPI.COMM_WORLD
    layers = select_layers(build(args.arch, 1000), ())
    plan = make_plan(layer_costs(layers), world.size)
    gen = torch.Generator().manual_seed(world.rank)
    mine: list[torch.Tensor] = []
    blocks: list[torch.Tensor] = []
    for name in plan.owned_by(world.rank):
        m = layers[name]
        if isinstance(m, nn.BatchNorm2d):
            blocks.append(torch.rand(m.num_features, 2, 2, generator=gen))
        else:
            assert isinstance(m, (nn.Conv2d, nn.Linear))
            d_a = m.weight[0].numel() + (1 if m.bias is not None else 0)
            mine += [spd(d_a, gen), spd(m.weight.shape[0], gen)]
    mine = [f.to(device) for f in mine]
    blocks = [b.to(device) for b in blocks]

    def all_at_once() -> None:
        for inv, how in inverse.robust_inverses([inverse.add_diagonal(f, 1e-3) for f in mine]):
            assert inv is not None and how == "ok"

    def one_at_a_time() -> None:
        for f in mine:
            inv, how = inverse.robust_inverse(inverse.add_diagonal(f, 1e-3))
            assert inv is not None and how == "ok"

    walls: dict[str, list[float]] = {"all at once": [], "one at a time": []}
    for _ in range(args.repeats + 1):  # one untimed run first (allocations; on a GPU, kernels loading)
        for label, invert in (("all at once", all_at_once), ("one at a time", one_at_a_time)):
            world.Barrier()
            sync()
            t0 = time.perf_counter()
            invert()
            for b in blocks:
                inverse.bn_block_inverse(b, 1e-3)
            sync()
            world.Barrier()
            walls[label].append(time.perf_counter() - t0)
    walls = {k: w[1:] for k, w in walls.items()}
    if world.rank == 0:
        where = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{torch.get_num_threads()} thread(s)"
        )
        median = {k: statistics.median(w) for k, w in walls.items()}
        runs = {k: ", ".join(f"{x:.3f}" for x in w) for k, w in walls.items()}
        print(
            f"{args.arch}: {sum(1 for _ in plan.owners)} layers on {world.size} rank(s), {where} each: "
            f"median wall {median['all at once']:.3f} s (runs: {runs['all at once']}); one factor at a time "
            f"{median['one at a time']:.3f} s (runs: {runs['one at a time']}); "
            f"plan imbalance {plan.imbalance:.3f}"
        )


if __name__ == "__main__":
    main()
