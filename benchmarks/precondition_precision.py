"""How far TF32 moves SP-NGD's preconditioned gradients: ResNet-50's conv/fc layers after one step.

    python benchmarks/precondition_precision.py                    # CPU: TF32 emulated
    python benchmarks/precondition_precision.py --device cuda      # the GPU's own TF32 tensor cores

One SP-NGD step on synthetic images computes every layer's factors and fp32 inverses; then each layer's
product ``G^-1 dW A^-1`` is formed from the same fp32 inverses and gradient in fp64 (the reference) and
as each ``ngd.precondition_precision`` does it: fp32, tf32 and tf32x3. On the CPU, which has no TF32,
each TF32 product's inputs are rounded to TF32's 10 mantissa bits and summed in fp32. Prints each
precision's relative error ``|P - P_fp64| / |P_fp64|`` (median and largest over layers), the worst
layers, and the products' GFLOP a step.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcngd.config import NgdConfig
from hpcngd.models.resnet import build
from hpcngd.ngd import Preconditioner, factors
from hpcngd.ngd.preconditioner import matmul_tf32x3, split_tf32, tf32_matmuls


def rounded_to_tf32(t: Tensor) -> Tensor:
    """``t`` (fp32) with its mantissa rounded to TF32's 10 bits (to nearest)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_product(g_inv: Tensor, grad: Tensor, a_inv: Tensor) -> Tensor:
    if g_inv.is_cuda:
        with tf32_matmuls(True):
            return g_inv @ grad @ a_inv
    t = rounded_to_tf32
    return t(t(g_inv) @ t(grad)) @ t(a_inv)


def tf32x3_product(g_inv: Tensor, grad: Tensor, a_inv: Tensor) -> Tensor:
    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        hi, lo = split_tf32(x)
        return hi, lo if x.is_cuda else rounded_to_tf32(lo)  # the tensor cores round lo

    with tf32_matmuls(True):
        return matmul_tf32x3(split(matmul_tf32x3(split(g_inv), split(grad))), split(a_inv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--damping", type=float, default=NgdConfig().damping)
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(args.arch, 1000).to(device)
    pre = Preconditioner(model, NgdConfig())
    pre.begin(0, grad_scale=args.batch)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    F.cross_entropy(model(x), torch.randint(1000, (args.batch,), device=device)).backward()
    layers = {n: m for n, m in pre.layers.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    grads = {n: factors.grad_matrix(m).clone() for n, m in layers.items()}
    pre.step(0, damping=args.damping)
    errors: dict[str, dict[str, float]] = {}
    gflop = 0.0
    for name, grad in grads.items():
        a_inv, g_inv = pre.stats[(name, "A")].inverse, pre.stats[(name, "G")].inverse
        assert a_inv is not None and g_inv is not None
        ref = g_inv.double() @ grad.double() @ a_inv.double()
        scale = ref.norm()
        errors[name] = {
            "fp32": float(((g_inv @ grad @ a_inv).double() - ref).norm() / scale),
            "tf32": float((tf32_product(g_inv, grad, a_inv).double() - ref).norm() / scale),
            "tf32x3": float((tf32x3_product(g_inv, grad, a_inv).double() - ref).norm() / scale),
        }
        o, d = grad.shape
        gflop += 2 * (o * o * d + o * d * d) / 1e9
    how = "the GPU's TF32" if args.device == "cuda" else "TF32 emulated on the CPU"
    print(
        f"{args.arch}, {len(errors)} conv/fc layers, batch {args.batch} of {args.image_size} px, "
        f"damping {args.damping}: the products take {gflop:.0f} GFLOP a step; TF32 = {how}"
    )
    for kind in ("fp32", "tf32", "tf32x3"):
        values = [e[kind] for e in errors.values()]
        print(
            f"{kind}: relative error median {statistics.median(values):.1e}, largest {max(values):.1e}, "
            f"above 1e-2 in {sum(v > 1e-2 for v in values)} of {len(values)} layers"
        )
    print("largest TF32 errors:")
    for name in sorted(errors, key=lambda n: -errors[n]["tf32"])[:5]:
        e = errors[name]
        figures = "  ".join(f"{k} {v:.1e}" for k, v in e.items())
        print(f"  {name:16s} {tuple(grads[name].shape)!s:14s} {figures}")


if __name__ == "__main__":
    main()
