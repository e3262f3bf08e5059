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
Everything is computed in ``dtype`` (fp32 by default, fp64 on request) whatever the activations' dtype:
A and G as fp32 (fp64) products of the captured values (see :func:`gram` for fp16/bf16 ones on a GPU).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# torch.mm(..., out_dtype=) exists, and with fp16/bf16 inputs and fp32 output (CUDA; not ROCm)
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and torch.version.hip is None


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


def swap_blocks(m: Tensor, outer: int, inner: int) -> Tensor:
    """A square matrix whose rows and columns are numbered (outer, inner), row-major, renumbered (inner,
    outer): entry ((i, o), (j, p)) of the result is entry ((o, i), (p, j)) of ``m``. One copy through a
    view (none where ``outer`` or ``inner`` is 1), with no index tensors to build: for ResNet-50's 3x3
    convs' A, 1.8-5x faster than a gather on a CPU, 2.8-4.4x on an H200 (0.036-0.090 ms against
    0.104-0.398)."""
    d = outer * inner
    return m.view(outer, inner, outer, inner).permute(1, 0, 3, 2).reshape(d, d)


def patches(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Rows ``a`` of the layer's input in ``x``'s dtype, shape (n * T, d_in [+1 for bias]), and the
    number of kernel offsets ``k`` their columns are grouped by: 1 when the columns are in the weight's
    order, else the rows hold ``k`` blocks of ``c_in`` channels, (k, c_in) where the weight has
    (c_in, k), and the bias's 1 (if any) stays last.

    Conv2d: im2col patches with the layer's kernel, stride, padding and dilation, built in the (n, h, w, c)
    layout, which is a view of a channels_last input. A 1x1 kernel without padding takes strided views
    (no copy of a channels_last input with stride 1); a larger one writes each kernel offset's view as one
    contiguous block of channels, so its columns come ordered (kh, kw, c) where the weight has (c, kh, kw).
    """
    x = x.detach()
    offsets = 1
    if not isinstance(module, nn.Conv2d):
        rows = x.reshape(-1, x.shape[-1])
    else:
        if module.groups != 1:
            raise RuntimeError(f"grouped convolution (groups={module.groups}) is not supported")
        if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
            raise RuntimeError(
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r} is not supported; "
                "use explicit zero padding"
            )
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
        )
        _, c, h, w = x.shape
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        nhwc = x.permute(0, 2, 3, 1)
        if ph or pw:
            nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph))
        views = [
            nhwc[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        offsets = len(views)
        rows = views[0].reshape(-1, c) if offsets == 1 else torch.stack(views, dim=3).reshape(-1, offsets * c)
    if getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows, offsets


def gram(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``rows^T rows`` in ``dtype``.

    fp16/bf16 rows on an NVIDIA GPU, with fp32 asked for (activations and gradients under AMP), are
    multiplied on the tensor cores as they are, with fp32 output: a product of two fp16 (bf16) numbers has
    at most 22 (16) significant bits, so every product is exact in fp32, as with fp32 copies, and the sums
    are kept in the tensor cores' fp32 accumulators. Those do not round as IEEE fp32 adds do (they
    truncate), so long sums can drift a little more than fp32 units' (``benchmarks/factors.py`` prints the
    drift on ResNet-50's longest sum). Anything else is converted to ``dtype`` first: other dtypes, CPUs,
    ROCm, a torch without ``mm``'s ``out_dtype`` (before 2.8), and fp16 reductions allowed in cuBLAS
    (``torch.backends.cuda.matmul.allow_fp16_accumulation``, which that ``mm`` refuses).
    """
    if (
        MM_OUT_DTYPE
        and rows.is_cuda
        and dtype == torch.float32
        and rows.dtype in (torch.float16, torch.bfloat16)
        and not getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False)
    ):
        return torch.mm(rows.T, rows, out_dtype=torch.float32)
    rows = rows.to(dtype)
    return rows.T @ rows


def a_sum(module: nn.Module, x: Tensor, dtype: torch.dtype = torch.float32) -> FactorSum:
    """Sum over examples of ``sum_t a a^T`` for a Conv2d or Linear input ``x``."""
    rows, offsets = patches(module, x)
    total = gram(rows, dtype)
    if offsets > 1:  # the columns (k, c_in) into the weight's (c_in, k)
        total = weight_order(total, offsets, getattr(module, "bias", None) is not None)
    return FactorSum(total, x.shape[0])


def weight_order(total: Tensor, offsets: int, bias: bool) -> Tensor:
    """A of :func:`patches`' column order, (k, c_in) [+ bias], in the weight's, (c_in, k) [+ bias]."""
    if not bias:
        return swap_blocks(total, offsets, len(total) // offsets)
    d = len(total) - 1
    out = torch.empty_like(total)
    out[:d, :d] = swap_blocks(total[:d, :d], offsets, d // offsets)
    out[:d, d] = out[d, :d] = total[d, :d].view(offsets, d // offsets).T.reshape(-1)
    out[d, d] = total[d, d]
    return out


def output_grads(module: nn.Module, g: Tensor) -> tuple[Tensor, int]:
    """Output gradients as rows (n * T, d_out) in ``g``'s dtype (a view of a channels_last ``g``), and T."""
    g = g.detach()
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]), g.shape[2] * g.shape[3]
    return g.reshape(-1, g.shape[-1]), 1


def g_sum(module: nn.Module, g: Tensor, grad_scale: float, dtype: torch.dtype = torch.float32) -> FactorSum:
    """Sum over examples of ``(1/T) sum_t gh gh^T`` for a Conv2d or Linear output gradient ``g``, with
    ``gh = grad_scale * g`` (the scale is applied to the sum: the captured fp16 values multiply exactly)."""
    rows, positions = output_grads(module, g)
    return FactorSum(gram(rows, dtype) * (grad_scale * grad_scale / positions), g.shape[0])


def bn_gradient_sums(x: Tensor, g: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Per-example ``(sum_t g * xhat, sum_t g)`` of every channel, shape (n, C, 2), in ``dtype``, with
    ``xhat`` recomputed from the input and its batch statistics (training mode); ``g`` unscaled.

    Eagerly, in few passes over the activations: one copy of ``x`` is centred and multiplied by ``g`` in
    place (``g`` is read as it is, fp16 too: the multiply and the sums are in ``dtype``), and the
    division by the standard deviation is applied to the per-channel sums. Under ``torch.compile``
    (:func:`bn_per_example`) the same arithmetic becomes fused reductions that read ``x`` twice (its
    batch statistics, then the product) and ``g`` once, and write no copy of either.
    """
    centred = x.to(dtype, copy=True)  # the captured input itself stays untouched
    var, mean = torch.var_mean(centred, dim=(0, 2, 3), unbiased=False, keepdim=True)
    d_beta = g.sum(dim=(2, 3), dtype=dtype)
    d_gamma = centred.sub_(mean).mul_(g).sum(dim=(2, 3)) / torch.sqrt(var.flatten() + eps)
    return torch.stack([d_gamma, d_beta], dim=2)


@functools.cache
def _compiled_gradient_sums() -> Callable[[Tensor, Tensor, float, torch.dtype], Tensor]:
    """:func:`bn_gradient_sums` under ``torch.compile``, made once a process, shapes symbolic: one
    compilation a dtype and memory layout, and one more where a dimension is 1 (ResNet-50's layer4 at
    32 px) or two sizes happen to be equal."""
    return torch.compile(bn_gradient_sums, dynamic=True)


def _compile_in_this_process() -> None:
    """Inductor compiles in the calling process, without the pool of up to 32 worker processes it
    otherwise starts in every process where Triton is installed: a rank compiles a few small kernels, and
    a node's ranks would start dozens. Inductor's settings are per thread (torch 2.12 and later) and a
    GPU's backward hooks run in autograd's device thread, so this is set where the compiled function is
    called. ``TORCHINDUCTOR_COMPILE_THREADS`` in the environment overrides it."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        from torch._inductor import config as inductor_config

        if inductor_config.compile_threads != 1:
            inductor_config.compile_threads = 1


_compile_failed: list[str] = []  # the first failure of torch.compile in this process, if any


def bn_compile_failure() -> str | None:
    """Why compiling the BatchNorm statistic failed in this process (it is then eager), or None."""
    return _compile_failed[0] if _compile_failed else None


def bn_statistic_path(compile_bn: bool) -> str:
    """How this process computes the BatchNorm statistic, for reports: ``compiled``, or eager and why."""
    if not compile_bn:
        return "eager (ngd.compile_bn = false)"
    failure = bn_compile_failure()
    return "compiled" if failure is None else f"eager, compiling failed: {failure}"


def bn_per_example(
    module: nn.BatchNorm2d,
    x: Tensor,
    g: Tensor,
    grad_scale: float,
    dtype: torch.dtype,
    compiled: bool = False,
) -> Tensor:
    """Per-example (gamma, beta) gradients of every channel, shape (n, C, 2): ``sum_t gh * xhat`` and
    ``sum_t gh`` (:func:`bn_gradient_sums` times ``grad_scale``).

    ``compiled``: through ``torch.compile`` (``ngd.compile_bn``). Where compiling fails (no C compiler on
    the node, say), a warning says why once and this process computes the statistic eagerly from then on.
    """
    x, g = x.detach(), g.detach()
    if compiled and not _compile_failed:
        try:
            _compile_in_this_process()
            return _compiled_gradient_sums()(x, g, module.eps, dtype) * grad_scale
        except torch.OutOfMemoryError:
            raise  # the device's memory, not the compiler: the eager path would need more
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same
            first_line = next(iter(str(e).strip().splitlines()), "")
            _compile_failed.append(f"{type(e).__name__}: {first_line}")
            log.warning(
                "SP-NGD: torch.compile of the BatchNorm statistic failed (%s); computing it eagerly "
                "(set ngd.compile_bn = false to skip compiling)",
                _compile_failed[0],
            )
    return bn_gradient_sums(x, g, module.eps, dtype) * grad_scale


def bn_sum(
    module: nn.BatchNorm2d,
    x: Tensor,
    g: Tensor,
    grad_scale: float,
    dtype: torch.dtype = torch.float32,
    compiled: bool = False,
) -> FactorSum:
    """Sum over examples of the unit-wise blocks ``u u^T``, shape (C, 2, 2)."""
    u = bn_per_example(module, x, g, grad_scale, dtype, compiled)
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


def grad_matrix_view(module: Layer, dtype: torch.dtype) -> tuple[Tensor, bool] | None:
    """The gradient ``dW`` as a matrix that *is* its memory, so that a product can be written straight
    into it, and whether its columns come in a channels_last conv's (kh, kw, c_in) order (see
    :func:`channels_last_order`) rather than the weight's (c_in, kh, kw). None where there is no such
    view: a bias (``[dW | db]`` is two tensors), another dtype, or another layout."""
    grad = module.weight.grad
    assert grad is not None
    if getattr(module, "bias", None) is not None or grad.dtype != dtype:
        return None
    if grad.is_contiguous():
        return grad.view(grad.shape[0], -1), False
    if grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last):
        return grad.permute(0, 2, 3, 1).view(grad.shape[0], -1), True
    return None


def channels_last_order(a: Tensor, weight: Tensor) -> Tensor:
    """``a`` (rows and columns in the weight's (c_in, kh, kw) order) in a channels_last conv gradient's
    (kh, kw, c_in) column order."""
    _, c, kh, kw = weight.shape
    return swap_blocks(a, c, kh * kw)


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
