"""One SP-NGD preconditioning step over a model's Conv2d, Linear and BatchNorm2d layers.

Phases:
  a. :meth:`Preconditioner.take_factors`: the factor sums that :class:`~hpcngd.ngd.capture.Capture`
     collected for the due statistics become means (A, G per Conv2d/Linear; unit-wise 2x2 blocks F per
     BatchNorm2d);
  b. the caller averages them over ranks (the trainer fuses them with the gradients in one pass);
then :meth:`Preconditioner.step`:
  c. optional running average (``ema_decay``: weight on the new value), stale-interval bookkeeping,
     damping and inversion of the refreshed statistics of the layers this rank owns (a failed
     inversion keeps the previous inverse);
  d. every owned layer's gradient ``[dW | db]`` becomes ``G_d^-1 [dW | db] A_d^-1`` (on a GPU with TF32
     tensor cores, plain or split in three, as ``precondition_precision`` says) and every
     BatchNorm channel's ``(dgamma, dbeta)`` becomes ``(F_c + lambda_bn I)^-1 (dgamma, dbeta)``, with the
     cached inverses (computed at the statistic's last refresh).
Damping enters at inversion time: a statistic is re-damped only when it is refreshed. Sharing the
owners' preconditioned gradients with the other ranks is the caller's (one allgatherv, see train.py).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hpcngd.config import NgdConfig
from hpcngd.ngd import factors, inverse
from hpcngd.ngd.capture import Capture, Key
from hpcngd.ngd.stale import StaleInterval, relative_changes

log = logging.getLogger(__name__)
PRECONDITIONED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
# BatchNorm blocks' damping over ngd.damping unless ngd.bn_damping sets it: the released system adds
# stab_coeff * lambda (16, tyohei/chainerkfac's KFAC default) to their diagonal.
BN_DAMPING_FACTOR = 16.0


@contextmanager
def tf32_matmuls(on: bool) -> Iterator[None]:
    """fp32 matrix products on CUDA use TF32 tensor cores inside the block when ``on``; off, nothing is
    touched. The setting is the process's: it is restored on leaving (torch's ``fp32_precision`` where
    it has one; torch refuses reads of its older ``allow_tf32`` while that is set)."""
    flags = torch.backends.cuda.matmul
    if not on:
        yield
        return
    name, value = ("fp32_precision", "tf32") if hasattr(flags, "fp32_precision") else ("allow_tf32", True)
    before = getattr(flags, name)
    setattr(flags, name, value)
    try:
        yield
    finally:
        setattr(flags, name, before)


def tf32_matmuls_on() -> bool:
    """Whether fp32 matrix products on CUDA may use TF32 now."""
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision") and flags.fp32_precision != "none":
        return bool(flags.fp32_precision == "tf32")
    return bool(flags.allow_tf32)


def has_tf32(device: torch.device) -> bool:
    """Whether ``device`` has TF32 tensor cores (a CUDA GPU of compute capability 8.0 or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def split_tf32(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` (fp32) as ``hi + lo``: ``hi`` truncated to TF32's 10 mantissa bits (exact on tensor cores),
    ``lo`` the exact remainder (below 2^-10 of ``t``). Two kernels."""
    assert t.dtype == torch.float32, t.dtype
    hi = (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    return hi, t - hi


def matmul_tf32x3(x: tuple[Tensor, Tensor], y: tuple[Tensor, Tensor]) -> Tensor:
    """``x @ y`` from split operands in three products, ``hi hi + (hi lo + lo hi)``, the small terms
    summed first (three kernels). On TF32 tensor cores only ``lo`` is rounded: the result is off by
    about 2^-20 of the product plus fp32's sums (on ResNet-50, measured as close to fp32's as fp32 is to
    fp64; see benchmarks/precondition_precision.py)."""
    (x_hi, x_lo), (y_hi, y_lo) = x, y
    return torch.addmm(torch.addmm(x_hi @ y_lo, x_lo, y_hi), x_hi, y_hi)


@dataclass
class Statistic:
    """One factor (A, G or F) of one layer: its current value, its interval and its inverse."""

    schedule: StaleInterval
    value: Tensor | None = None
    inverse: Tensor | None = None


@dataclass
class StepReport:
    """What one step did, for the metrics."""

    refreshed: int = 0
    inverted: int = 0
    retried_fp64: int = 0
    failed: int = 0
    inverse_seconds: float = 0.0
    precondition_seconds: float = 0.0


def select_layers(model: nn.Module, exclude: Sequence[str]) -> dict[str, nn.Module]:
    """Conv2d, Linear and BatchNorm2d modules by name, minus those matching an ``exclude`` pattern."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, PRECONDITIONED) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }


def statistic_keys(layers: dict[str, nn.Module]) -> list[Key]:
    """(name, "A"), (name, "G") of each Conv2d/Linear and (name, "F") of each BatchNorm2d."""
    return [
        (name, kind)
        for name, m in layers.items()
        for kind in (("F",) if isinstance(m, nn.BatchNorm2d) else ("A", "G"))
    ]


class Preconditioner:
    """SP-NGD state and step for one model replica.

    Args:
        model: the network (hooks are attached to it).
        cfg: the [ngd] section.
        owned: the layers this rank inverts and preconditions (model-parallel inversion, see
            :mod:`hpcngd.ngd.plan`); None = all. Factors and refresh intervals are kept for every layer,
            identical on all ranks, so that all ranks agree on which statistics are due.
        sync: waits for queued device work before the inversion and preconditioning times are read
            (``torch.cuda.synchronize`` on a GPU; the capture times its hooks with CUDA events instead).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: NgdConfig,
        owned: set[str] | None = None,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.dtype = torch.float64 if cfg.dtype == "fp64" else torch.float32
        self.layers = select_layers(model, cfg.exclude)
        self.owned = set(self.layers) if owned is None else owned
        self.sync = sync or (lambda: None)  # before reading the clock (GPU: wait for queued kernels)
        self.capture = Capture(self.layers, self.dtype, cfg.compile_bn)
        self.stats = {
            key: Statistic(StaleInterval(cfg.stale_threshold, cfg.stale_max_interval))
            for key in statistic_keys(self.layers)
        }
        self.failures: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._splits: dict[Key, tuple[Tensor, Tensor, Tensor]] = {}  # tf32x3: inverse, hi, lo
        self._orders: dict[Key, tuple[Tensor, Tensor]] = {}  # channels_last convs: inverse, reordered
        # TF32 needs tensor cores and fp32 factors; elsewhere precondition_precision changes nothing
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.tf32 = cfg.precondition_precision != "fp32" and self.dtype == torch.float32 and has_tf32(device)

    def due(self, step: int) -> set[Key]:
        """The statistics recomputed at ``step``."""
        return {k for k, s in self.stats.items() if s.schedule.due(step)}

    def begin(self, step: int, grad_scale: float) -> bool:
        """Arm the hooks for the statistics due at ``step``; returns whether any is due."""
        want = self.due(step)
        if want:
            self.capture.arm(want, grad_scale)
        else:
            self.capture.disarm()
        return bool(want)

    def take_factors(self) -> dict[Key, Tensor]:
        """Phase a: this step's factors (means over the rank's examples), in a fixed order."""
        return {k: s.mean() for k, s in sorted(self.capture.take().items())}

    def step(self, step: int, damping: float, fresh: dict[Key, Tensor] | None = None) -> StepReport:
        """Phases c and d above for the factors ``fresh`` (default: :meth:`take_factors`, one rank)."""
        report = StepReport()
        if fresh is None:
            fresh = self.take_factors()
        self.sync()
        t1 = time.perf_counter()
        values = dict(fresh)  # c
        old = {k: v for k in values if (v := self.stats[k].value) is not None}
        if old and self.cfg.ema_decay < 1.0:  # (1 - decay) * old + decay * new, one multi-tensor op
            averaged = torch._foreach_lerp(list(old.values()), [values[k] for k in old], self.cfg.ema_decay)
            values.update(zip(old, averaged, strict=True))
        changes = dict(zip(old, relative_changes([(values[k], v) for k, v in old.items()]), strict=True))
        for key, value in values.items():
            stat = self.stats[key]
            stat.schedule.refreshed(step, changes.get(key, math.inf))
            stat.value = value
            report.refreshed += 1
        self._invert([key for key in fresh if key[0] in self.owned], damping, report)
        self.sync()
        t2 = time.perf_counter()
        owned = [(name, m) for name, m in self.layers.items() if name in self.owned]  # d
        with tf32_matmuls(self.tf32):
            for name, module in owned:
                if not isinstance(module, nn.BatchNorm2d):
                    self._precondition(name, module)
        self._precondition_bn([(name, m) for name, m in owned if isinstance(m, nn.BatchNorm2d)])
        report.inverse_seconds = t2 - t1
        self.sync()
        report.precondition_seconds = time.perf_counter() - t2
        return report

    def _invert(self, keys: list[Key], damping: float, report: StepReport) -> None:
        """Damp and invert the refreshed statistics ``keys``; a stale partner keeps its inverse untouched.
        The traces for the damping (once a layer) and the inverses' checks are read once for all."""
        pairs: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> its current (A, G)
        due: list[Key] = []
        bn_failed: list[tuple[str, Tensor]] = []  # layer -> its failed channels (read once, below)
        for key in keys:
            name, kind = key
            stat = self.stats[key]
            assert stat.value is not None
            if kind == "F":
                stat.inverse, bad = inverse.bn_block_inverse(
                    stat.value, self.cfg.bn_damping or BN_DAMPING_FACTOR * damping, stat.inverse
                )
                bn_failed.append((name, bad))
                report.inverted += 1
                continue
            a, g = self.stats[(name, "A")].value, self.stats[(name, "G")].value
            if a is not None and g is not None:  # step 0 refreshes both: else a pass missed the layer
                pairs[name] = (a, g)
                due.append(key)
        traces = inverse.mean_traces([m for pair in pairs.values() for m in pair])
        terms = {
            name: inverse.terms_from_traces(traces[2 * i], traces[2 * i + 1], damping)
            for i, name in enumerate(pairs)
        }
        side = {"A": 0, "G": 1}
        damped = [
            inverse.add_diagonal(pairs[name][side[kind]], terms[name][side[kind]]) for name, kind in due
        ]
        for key, (inv, how) in zip(due, inverse.robust_inverses(damped), strict=True):
            name, kind = key
            report.inverted += 1
            report.retried_fp64 += how == "fp64"
            if inv is None:
                self._failed(report, name, kind, "failed in fp32 and fp64; keeping the previous one")
                continue
            self.stats[key].inverse = inv
        if bn_failed:  # one read for every BatchNorm layer (after the matrices' checks: no extra wait)
            counts = torch.stack([bad.sum() for _, bad in bn_failed]).tolist()
            for (name, bad), count in zip(bn_failed, counts, strict=True):
                if count:
                    why = (
                        f"failed for {count} of {len(bad)} channels (not finite); keeping their previous ones"
                    )
                    self._failed(report, name, "F", why)

    def _failed(self, report: StepReport, name: str, kind: str, why: str) -> None:
        """Count a failed inversion; warn once a layer."""
        report.failed += 1
        self.failures[f"{name}.{kind}"] += 1
        if name not in self._warned:
            self._warned.add(name)
            log.warning("SP-NGD: inverting %s.%s %s", name, kind, why)

    def _precondition(self, name: str, module: nn.Module) -> None:
        assert isinstance(module, (nn.Conv2d, nn.Linear))
        a_inv, g_inv = self.stats[(name, "A")].inverse, self.stats[(name, "G")].inverse
        if a_inv is None or g_inv is None or module.weight.grad is None:
            return  # no curvature yet: the plain gradient is used
        if self.tf32 and self.cfg.precondition_precision == "tf32x3":
            grad = factors.grad_matrix(module).to(a_inv.dtype)
            left = matmul_tf32x3(self._split((name, "G"), g_inv), split_tf32(grad))
            factors.set_grad_matrix(module, matmul_tf32x3(split_tf32(left), self._split((name, "A"), a_inv)))
            return
        in_place = factors.grad_matrix_view(module, a_inv.dtype)
        if in_place is None:
            grad = factors.grad_matrix(module).to(a_inv.dtype)
            factors.set_grad_matrix(module, g_inv @ grad @ a_inv)
            return
        matrix, channels_last = in_place  # the gradient's own memory
        if channels_last:
            a_inv = self._reordered((name, "A"), a_inv, module.weight)
        torch.mm(g_inv @ matrix, a_inv, out=matrix)

    def _reordered(self, key: Key, inv: Tensor, weight: Tensor) -> Tensor:
        """``inv`` with rows and columns in a channels_last conv gradient's column order, made once per
        inversion (one copy of the matrix; its memory is kept until the next inversion)."""
        cached = self._orders.get(key)
        if cached is None or cached[0] is not inv:
            cached = self._orders[key] = (inv, factors.channels_last_order(inv, weight))
        return cached[1]

    def _split(self, key: Key, inv: Tensor) -> tuple[Tensor, Tensor]:
        """The TF32 split of an inverse, made once per inversion (it costs a pass over the matrix)."""
        cached = self._splits.get(key)
        if cached is None or cached[0] is not inv:
            cached = self._splits[key] = (inv, *split_tf32(inv))
        return cached[1], cached[2]

    def _precondition_bn(self, layers: list[tuple[str, nn.Module]]) -> None:
        """The channels of all these BatchNorm layers together (a few kernels on a GPU, not four a layer):
        each channel's ``(dgamma, dbeta)`` becomes ``inverse_c (dgamma, dbeta)``."""
        invs: list[Tensor] = []
        d_gamma: list[Tensor] = []
        d_beta: list[Tensor] = []
        for name, m in layers:
            inv = self.stats[(name, "F")].inverse
            assert isinstance(m, nn.BatchNorm2d)
            if inv is not None and m.weight.grad is not None and m.bias.grad is not None:
                invs.append(inv)
                d_gamma.append(m.weight.grad)
                d_beta.append(m.bias.grad)
        if not invs:
            return
        inv = torch.cat(invs)  # (channels, 2, 2)
        grads = torch.stack([torch.cat(d_gamma), torch.cat(d_beta)], 1).to(inv.dtype)  # (channels, 2)
        out = torch.einsum("cij,cj->ic", inv, grads).contiguous()  # (2, channels)
        sizes = [len(g) for g in d_gamma]
        torch._foreach_copy_(d_gamma + d_beta, [*out[0].split(sizes), *out[1].split(sizes)])

    def close(self) -> None:
        self.capture.remove()
