"""Hooks that turn a forward and backward pass into factor sums, only for the statistics asked for.

Armed with the set of due statistics and ``grad_scale`` (see :mod:`hpcngd.ngd.factors`), the forward
hook of a Conv2d/Linear adds its A sum at once (the input is then not kept), and a tensor hook on the
layer's output adds the G sum when the output gradient arrives. A BatchNorm2d keeps its input until its
output gradient arrives and then adds its unit-wise blocks. Sums add up over micro-batches: factors of
accumulated micro-batches are averages over all the rank's examples. Disarmed, the hooks do nothing.

The hooks run inside the forward's autocast region; they turn autocast off, so that factors are fp32 (or
fp64) sums of exact products of the captured values, never fp16/bf16 sums (an fp16 A sum overflows).

A tensor hook (not a module backward hook) is used because the ResNets apply in-place ReLU to BN outputs;
a hook registered before an in-place change receives the gradient w.r.t. the value it was registered on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hpcngd.ngd import factors
from hpcngd.ngd.factors import FactorSum

Key = tuple[str, str]  # (layer name, "A" | "G" | "F")


class Capture:
    """Factor sums of the armed statistics of ``layers``.

    Args:
        layers: name -> Conv2d, Linear or BatchNorm2d module.
        dtype: dtype of the factors (fp32 or fp64), whatever the activations' dtype.
        compile_bn: BatchNorm statistics through ``torch.compile`` (:func:`factors.bn_per_example`).

    :meth:`take_seconds` is the time spent in the hooks: host time on a CPU; on a GPU the time of the
    hooks' kernels, measured with CUDA events where they run, so that timing never makes the host wait
    and forward and backward keep flowing.
    """

    def __init__(self, layers: dict[str, nn.Module], dtype: torch.dtype, compile_bn: bool = False) -> None:
        self.layers = layers
        self.dtype = dtype
        self.compile_bn = compile_bn
        self.want: set[Key] = set()
        self.collect_grads = True
        self.grad_scale = 1.0
        self.sums: dict[Key, FactorSum] = {}
        self._seconds = 0.0  # host-timed hooks
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # GPU-timed hooks
        self._bn_inputs: dict[str, list[Tensor]] = {}
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in layers.items()]

    def arm(self, want: set[Key], grad_scale: float) -> None:
        """Collect the statistics ``want`` from the next passes; clears previous sums."""
        self.want = set(want)
        self.grad_scale = grad_scale
        self.collect_grads = True
        self.sums = {}
        self._bn_inputs = {}

    def disarm(self) -> None:
        self.want = set()
        self._bn_inputs = {}

    def take(self) -> dict[Key, FactorSum]:
        """The collected sums; the capture is then disarmed and empty."""
        sums, self.sums = self.sums, {}
        self.disarm()
        return sums

    def _add(self, key: Key, value: FactorSum) -> None:
        if key in self.sums:
            self.sums[key].add(value)
        else:
            self.sums[key] = value

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.want or not torch.is_grad_enabled():
                return
            x = inputs[0]
            with self._hook_work(x):
                if isinstance(module, nn.BatchNorm2d):
                    if (name, "F") in self.want:
                        self._bn_inputs.setdefault(name, []).append(x.detach())
                        output.register_hook(self._bn_grad_hook(name, module))
                else:
                    if (name, "A") in self.want:
                        self._add((name, "A"), factors.a_sum(module, x, self.dtype))
                    if (name, "G") in self.want:
                        output.register_hook(self._g_hook(name, module))

        return hook

    def _g_hook(self, name: str, module: nn.Module) -> Any:
        def hook(grad: Tensor) -> None:
            if self.collect_grads and (name, "G") in self.want:
                with self._hook_work(grad):
                    self._add((name, "G"), factors.g_sum(module, grad, self.grad_scale, self.dtype))

        return hook

    def _bn_grad_hook(self, name: str, module: nn.BatchNorm2d) -> Any:
        def hook(grad: Tensor) -> None:
            stack = self._bn_inputs.get(name)
            if not stack:
                return
            x = stack.pop(0)  # micro-batches are backpropagated in forward order
            if self.collect_grads and (name, "F") in self.want:
                with self._hook_work(grad):
                    fisher = factors.bn_sum(module, x, grad, self.grad_scale, self.dtype, self.compile_bn)
                    self._add((name, "F"), fisher)

        return hook

    @contextmanager
    def _hook_work(self, t: Tensor) -> Iterator[None]:
        """A hook's work on ``t``'s device: with autocast off (factor arithmetic in fp32/fp64), timed by
        the host clock, or on a GPU by CUDA events that the host does not wait for."""
        if not t.is_cuda:
            t0 = time.perf_counter()
            with torch.autocast(t.device.type, enabled=False):
                yield
            self._seconds += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast(t.device.type, enabled=False):
            yield
        end.record()
        self._spans.append((start, end))

    def take_seconds(self) -> float:
        """Seconds spent in the hooks since the last call (waits for the GPU-timed hooks' kernels)."""
        if self._spans:
            self._spans[-1][1].synchronize()  # the last end event: every span before it is done too
        seconds = self._seconds + sum(a.elapsed_time(b) for a, b in self._spans) / 1e3
        self._seconds, self._spans = 0.0, []
        return seconds

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
