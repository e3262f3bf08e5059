"""Damping and inverses, pure.

Kronecker pair (pi-corrected factored Tikhonov damping, Martens & Grosse 2015):
``pi = sqrt((tr A / dim A) / (tr G / dim G))``, ``r = sqrt(lambda)``,
``A_d = A + max(pi r, 1e-7) I`` and ``G_d = G + max(r / pi, 1e-7) I``. If either trace is not positive
and finite, ``pi = 1``.

Inverse: Cholesky in fp32 with a success and finiteness check, then in fp64; if both fail the caller
keeps the previous inverse (:func:`robust_inverse` returns ``None``). A non-finite inverse is never
returned. The list forms (:func:`mean_traces`, :func:`robust_inverses`) read what they need from the
device in one transfer for all the matrices: a GPU is waited for a few times a step, not a few times a
factor.

BatchNorm unit-wise blocks: ``(F_c + lambda_bn I)^-1`` of each 2x2 block in closed form, with the same
finiteness rule per channel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DAMPING_FLOOR = 1e-7


def mean_traces(ms: list[Tensor]) -> list[float]:
    """``tr M / dim M`` of each matrix, read from the device in one transfer."""
    if not ms:
        return []
    return torch.stack([m.diagonal().sum() / m.shape[0] for m in ms]).tolist()


def pi_from_traces(ta: float, tg: float) -> float:
    """``sqrt(ta / tg)`` of the mean traces, or 1 when one is not positive and finite."""
    if not (math.isfinite(ta) and math.isfinite(tg) and ta > 0 and tg > 0):
        return 1.0
    return math.sqrt(ta / tg)


def pi_correction(a: Tensor, g: Tensor) -> float:
    """``sqrt((tr A / dim A) / (tr G / dim G))``, or 1 when a trace is not positive and finite."""
    ta, tg = mean_traces([a, g])
    return pi_from_traces(ta, tg)


def terms_from_traces(ta: float, tg: float, damping: float) -> tuple[float, float]:
    """The values added to the diagonals of A and of G, from their mean traces."""
    pi = pi_from_traces(ta, tg)
    r = math.sqrt(damping)
    return max(pi * r, DAMPING_FLOOR), max(r / pi, DAMPING_FLOOR)


def damping_terms(a: Tensor, g: Tensor, damping: float) -> tuple[float, float]:
    """The values added to the diagonals of A and of G."""
    ta, tg = mean_traces([a, g])
    return terms_from_traces(ta, tg, damping)


def add_diagonal(m: Tensor, value: float) -> Tensor:
    """``m + value * I`` (a new tensor)."""
    out = m.clone()
    out.diagonal().add_(value)
    return out


def cholesky_inverses(ms: list[Tensor]) -> list[Tensor | None]:
    """Inverses of symmetric positive definite matrices by Cholesky, each in its dtype; None where it fails
    or the matrix or its inverse is not finite. Every factorization is queued first and all the checks
    are read in one transfer: on a GPU, one wait for the whole list, not three a matrix."""
    invs: list[Tensor] = []
    checks: list[Tensor] = []
    for m in ms:
        chol, info = torch.linalg.cholesky_ex(m)
        # a failed factor (info > 0) is replaced by I before the inversion, which on a CPU would raise on
        # its zero pivot; the check below still marks it failed, and nothing waits for ``info``
        chol = torch.where(info == 0, chol, torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
        inv = torch.cholesky_inverse(chol)
        invs.append(inv)
        checks.append((info == 0) & torch.isfinite(m).all() & torch.isfinite(inv).all())
    ok = torch.stack(checks).tolist() if checks else []
    return [inv if good else None for inv, good in zip(invs, ok, strict=True)]


def cholesky_inverse(m: Tensor) -> Tensor | None:
    """Inverse of a symmetric positive definite matrix by Cholesky, or None if it fails or is not finite."""
    return cholesky_inverses([m])[0]


def robust_inverses(ms: list[Tensor]) -> list[tuple[Tensor | None, str]]:
    """Invert each in its dtype, retry a failure in fp64; (inverse in m's dtype or None, how) for each."""
    out: list[tuple[Tensor | None, str]] = []
    for m, inv in zip(ms, cholesky_inverses(ms), strict=True):
        if inv is not None:
            out.append((inv, "ok"))
            continue
        if m.dtype != torch.float64:
            inv = cholesky_inverse(m.double())
            if inv is not None:
                inv = inv.to(m.dtype)
                if bool(torch.isfinite(inv).all()):
                    out.append((inv, "fp64"))
                    continue
        out.append((None, "failed"))
    return out


def robust_inverse(m: Tensor) -> tuple[Tensor | None, str]:
    """Invert in ``m``'s dtype, retry in fp64; returns (inverse in m's dtype or None, how)."""
    return robust_inverses([m])[0]


def bn_block_inverse(blocks: Tensor, damping: float, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Closed-form ``(F_c + damping I)^-1`` of (C, 2, 2) blocks, and which channels failed.

    A channel whose block is not finite (or not positive definite) keeps its ``previous`` inverse, or
    gets the identity (its plain gradient, as a layer without curvature yet); returns (inverses, a (C,)
    bool tensor of the failed channels), without reading it: nothing waits for the device here.
    """
    a = blocks[:, 0, 0] + damping
    b = blocks[:, 0, 1]
    c = blocks[:, 1, 0]
    d = blocks[:, 1, 1] + damping
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]
    bad = ~torch.isfinite(inv).all(dim=(1, 2)) | ~(det > 0)
    if previous is None:
        previous = torch.eye(2, dtype=blocks.dtype, device=blocks.device).expand_as(inv)
    return torch.where(bad[:, None, None], previous, inv), bad
