"""SP-NGD's statistics and preconditioned gradients of one step, written from ../shared/SPNGD.md alone.

Nothing here uses hpcngd's math: patches come from ``F.unfold``, output gradients from ``retain_grad``,
BatchNorm's x-hat is recomputed from the layer's input, and the damped Kronecker system is solved with
``torch.linalg.solve`` in fp64. The MPI tests compare a W-rank trainer's step with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Key = tuple[str, str]


def statistics(
    model: nn.Module, batch: Tensor, labels: Tensor, micro: int, label_smoothing: float
) -> tuple[dict[Key, Tensor], dict[str, Tensor], dict[str, nn.Module]]:
    """(A, G per conv/fc layer and BatchNorm blocks F, in fp64; the gradients of the batch's mean loss;
    the layers) of ``model`` (a model without hooks; it keeps its gradients) over ``batch`` in
    micro-batches of ``micro`` (fp32 forward, as training does)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # keep every layer's output for its gradient
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            output.retain_grad()
            seen[name] = (inputs[0].detach().double(), output)

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    sums: dict[Key, Tensor] = {}
    n = len(batch)
    model.zero_grad()
    for x, y in zip(batch.split(micro), labels.split(micro), strict=True):
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing) * (len(x) / n)
        loss.backward()
        for name, m in layers.items():
            inp, out = seen[name]
            gh = n * out.grad.double()  # per-example gradients of the batch-mean loss
            if isinstance(m, nn.BatchNorm2d):
                mean = inp.mean(dim=(0, 2, 3), keepdim=True)
                var = inp.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
                xhat = (inp - mean) / torch.sqrt(var + m.eps)
                u = torch.stack([(gh * xhat).sum((2, 3)), gh.sum((2, 3))], 2)  # (examples, C, 2)
                parts = {"F": torch.einsum("nci,ncj->cij", u, u)}
            else:
                if isinstance(m, nn.Conv2d):
                    cols = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, d, T)
                    a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
                    positions = out.shape[2] * out.shape[3]
                    g = gh.permute(0, 2, 3, 1).reshape(-1, gh.shape[1])
                else:
                    a, g, positions = inp, gh, 1
                if m.bias is not None:
                    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
                parts = {"A": a.T @ a, "G": g.T @ g / positions}
            for kind, value in parts.items():
                sums[(name, kind)] = sums.get((name, kind), 0) + value
    for h in handles:
        h.remove()
    grads = {name: p.grad.double() for name, p in model.named_parameters()}
    return {k: v / n for k, v in sums.items()}, grads, layers


def preconditioned(
    stats: dict[Key, Tensor],
    grads: dict[str, Tensor],
    layers: dict[str, nn.Module],
    damping: float,
    bn_damping: float,
) -> dict[str, Tensor]:
    """Every parameter's ``G_d^-1 [dW | db] A_d^-1`` (pi-corrected damping, floors 1e-7), and every
    BatchNorm channel's ``(F_c + bn_damping I)^-1 (dgamma, dbeta)``."""
    out: dict[str, Tensor] = {}
    for name, m in layers.items():
        if isinstance(m, nn.BatchNorm2d):
            blocks = stats[(name, "F")] + bn_damping * torch.eye(2, dtype=torch.float64)
            pair = torch.stack([grads[f"{name}.weight"], grads[f"{name}.bias"]], 1)
            solved = torch.linalg.solve(blocks, pair[..., None])[..., 0]
            out[f"{name}.weight"], out[f"{name}.bias"] = solved[:, 0], solved[:, 1]
            continue
        a, g = stats[(name, "A")], stats[(name, "G")]
        pi = math.sqrt((torch.trace(a) / len(a)) / (torch.trace(g) / len(g)))
        r = math.sqrt(damping)
        a_d = a + max(pi * r, 1e-7) * torch.eye(len(a), dtype=a.dtype)
        g_d = g + max(r / pi, 1e-7) * torch.eye(len(g), dtype=g.dtype)
        w = grads[f"{name}.weight"]
        matrix = w.reshape(len(w), -1)
        if m.bias is not None:
            matrix = torch.cat([matrix, grads[f"{name}.bias"][:, None]], 1)
        solved = torch.linalg.solve(a_d, torch.linalg.solve(g_d, matrix).T).T  # A_d symmetric
        out[f"{name}.weight"] = solved[:, : w[0].numel()].reshape(w.shape)
        if m.bias is not None:
            out[f"{name}.bias"] = solved[:, -1]
    return out
