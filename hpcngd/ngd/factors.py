"""Kronecker factors and unit-wise BatchNorm Fisher blocks, pure functions of captured tensors.

Notation (../shared/SPNGD.md): ``n`` examples, ``T`` output positions, ``a`` an input patch (with a 1
appended when the layer has a bias), ``g`` the gradient of the *batch-mean* loss w.r.t. the layer output,
``gh = n * g`` the per-example gradient.

- Linear: ``A = (1/n) sum_i a a^T`` and ``G = (1/n) sum_i gh gh^T``.
- Conv2d (KFC, Grosse & Martens 2016): ``A = (1/n) sum_i sum_t a a^T`` and
  ``G = (1/(n T)) sum_i sum_t gh gh^T``.
- BatchNorm2d, unit-wise: per channel ``u_i = (sum_t gh * xhat, sum_t gh)`` and
  ``F_c = (1/n) sum_i u_i u_i^T``, a 2x2 block ordered (gamma, beta).

The functions below return *sums* over examples together with the example count, so that factors of
several micro-batches (and, later, of several ranks) combine exactly by adding sums and counts before
one division (:class:`FactorSum`). ``grad_scale`` turns the captured ``g`` into ``gh``: it is the
number of examples the loss was averaged over (and, under AMP, divided by the loss scale).
Everything is computed in ``dtype`` (fp32 by default, fp64 on request) whatever the activations' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FactorSum:
    """A running sum of per-example outer products and the number of examples in it."""

    total: Tensor
    count: int

    def add(self, other: FactorSum) -> None:
        self.total += other.total
        self.count += other.count

    def mean(self) -> Tensor:
        return self.total / self.count


def patches(module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows ``a`` of the layer's input, shape (n * T, d_in [+1 for bias]).

    Conv2d: im2col patches (``F.unfold`` with the layer's kernel, stride, padding and dilation).
    """
    x = x.detach().to(dtype)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise RuntimeError(f"grouped convolution (groups={module.groups}) is not supported")
        if not isinstance(module.padding, tuple):
            raise RuntimeError(f"padding={module.padding!r} is not supported; use explicit padding")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (n*T, c_in*kh*kw)
    else:
        rows = x.reshape(-1, x.shape[-1])
    if getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def a_sum(module: nn.Module, x: Tensor, dtype: torch.dtype = torch.float32) -> FactorSum:
    """Sum over examples of ``sum_t a a^T`` for a Conv2d or Linear input ``x``."""
    rows = patches(module, x, dtype)
    return FactorSum(rows.T @ rows, x.shape[0])


def output_grads(module: nn.Module, g: Tensor, grad_scale: float, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Per-example output gradients ``gh`` as rows (n * T, d_out), and T."""
    gh = g.detach().to(dtype) * grad_scale
    if isinstance(module, nn.Conv2d):
        positions = gh.shape[2] * gh.shape[3]
        return gh.permute(0, 2, 3, 1).reshape(-1, gh.shape[1]), positions
    return gh.reshape(-1, gh.shape[-1]), 1


def g_sum(module: nn.Module, g: Tensor, grad_scale: float, dtype: torch.dtype = torch.float32) -> FactorSum:
    """Sum over examples of ``(1/T) sum_t gh gh^T`` for a Conv2d or Linear output gradient ``g``."""
    rows, positions = output_grads(module, g, grad_scale, dtype)
    return FactorSum(rows.T @ rows / positions, g.shape[0])


def bn_xhat(module: nn.BatchNorm2d, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The normalized input, recomputed from the input with the batch statistics (training mode)."""
    x = x.detach().to(dtype)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps)


def bn_per_example(
    module: nn.BatchNorm2d, x: Tensor, g: Tensor, grad_scale: float, dtype: torch.dtype
) -> Tensor:
    """Per-example (gamma, beta) gradients of every channel, shape (n, C, 2)."""
    gh = g.detach().to(dtype) * grad_scale
    xhat = bn_xhat(module, x, dtype)
    return torch.stack([(gh * xhat).sum(dim=(2, 3)), gh.sum(dim=(2, 3))], dim=2)


def bn_sum(
    module: nn.BatchNorm2d, x: Tensor, g: Tensor, grad_scale: float, dtype: torch.dtype = torch.float32
) -> FactorSum:
    """Sum over examples of the unit-wise blocks ``u u^T``, shape (C, 2, 2)."""
    u = bn_per_example(module, x, g, grad_scale, dtype)
    return FactorSum(torch.einsum("nci,ncj->cij", u, u), x.shape[0])


Layer = nn.Conv2d | nn.Linear


def grad_matrix(module: Layer) -> Tensor:
    """The layer's gradient as one matrix ``[dW | db]`` of shape (d_out, d_in [+1])."""
    weight = module.weight
    assert weight.grad is not None
    dw = weight.grad.reshape(weight.shape[0], -1)
    bias = getattr(module, "bias", None)
    if bias is not None:
        assert bias.grad is not None
        dw = torch.cat([dw, bias.grad.reshape(-1, 1)], dim=1)
    return dw


def set_grad_matrix(module: Layer, matrix: Tensor) -> None:
    """Write ``[dW | db]`` back into the parameters' ``.grad``."""
    weight = module.weight
    assert weight.grad is not None
    bias = getattr(module, "bias", None)
    d_w = weight[0].numel()
    weight.grad.copy_(matrix[:, :d_w].reshape(weight.shape))
    if bias is not None:
        assert bias.grad is not None
        bias.grad.copy_(matrix[:, d_w])
