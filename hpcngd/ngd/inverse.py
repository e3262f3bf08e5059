"""Damping and inverses, pure.

Kronecker pair (pi-corrected factored Tikhonov damping, Martens & Grosse 2015):
``pi = sqrt((tr A / dim A) / (tr G / dim G))``, ``r = sqrt(lambda)``,
``A_d = A + max(pi r, 1e-7) I`` and ``G_d = G + max(r / pi, 1e-7) I``. If either trace is not positive
and finite, ``pi = 1``.

Inverse: Cholesky in fp32 with a success and finiteness check, then in fp64; if both fail the caller
keeps the previous inverse (:func:`robust_inverse` returns ``None``). A non-finite inverse is never
returned.

BatchNorm unit-wise blocks: ``(F_c + lambda_bn I)^-1`` of each 2x2 block in closed form, with the same
finiteness rule per channel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DAMPING_FLOOR = 1e-7


def pi_correction(a: Tensor, g: Tensor) -> float:
    """``sqrt((tr A / dim A) / (tr G / dim G))``, or 1 when a trace is not positive and finite."""
    ta = float(torch.diagonal(a).sum()) / a.shape[0]
    tg = float(torch.diagonal(g).sum()) / g.shape[0]
    if not (math.isfinite(ta) and math.isfinite(tg) and ta > 0 and tg > 0):
        return 1.0
    return math.sqrt(ta / tg)


def damping_terms(a: Tensor, g: Tensor, damping: float) -> tuple[float, float]:
    """The values added to the diagonals of A and of G."""
    pi = pi_correction(a, g)
    r = math.sqrt(damping)
    return max(pi * r, DAMPING_FLOOR), max(r / pi, DAMPING_FLOOR)


def add_diagonal(m: Tensor, value: float) -> Tensor:
    """``m + value * I`` (a new tensor)."""
    out = m.clone()
    out.diagonal().add_(value)
    return out


def cholesky_inverse(m: Tensor) -> Tensor | None:
    """Inverse of a symmetric positive definite matrix by Cholesky, or None if it fails or is not finite."""
    if not bool(torch.isfinite(m).all()):
        return None
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        return None
    inv = torch.cholesky_inverse(chol)
    return inv if bool(torch.isfinite(inv).all()) else None


def robust_inverse(m: Tensor) -> tuple[Tensor | None, str]:
    """Invert in ``m``'s dtype, retry in fp64; returns (inverse in m's dtype or None, how)."""
    inv = cholesky_inverse(m)
    if inv is not None:
        return inv, "ok"
    if m.dtype != torch.float64:
        inv = cholesky_inverse(m.double())
        if inv is not None:
            inv = inv.to(m.dtype)
            if bool(torch.isfinite(inv).all()):
                return inv, "fp64"
    return None, "failed"


def bn_block_inverse(blocks: Tensor, damping: float) -> Tensor:
    """Closed-form ``(F_c + damping I)^-1`` of (C, 2, 2) blocks; a non-finite channel gets ``I/damping``."""
    a = blocks[:, 0, 0] + damping
    b = blocks[:, 0, 1]
    c = blocks[:, 1, 0]
    d = blocks[:, 1, 1] + damping
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]
    bad = ~torch.isfinite(inv).all(dim=(1, 2)) | (det <= 0)
    if bool(bad.any()):
        eye = torch.eye(2, dtype=blocks.dtype, device=blocks.device) / damping
        inv[bad] = eye
    return inv
