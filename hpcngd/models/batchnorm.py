"""BatchNorm running statistics that advance once a step, from every micro-batch of the global batch.

torch's BatchNorm moves its running mean and variance towards each forward pass's batch statistics. With
micro-batches, a rank would then take ``k`` such moves a step from its own micro-batches alone, and ``k``
and the micro-batches a rank sees depend on the rank count: the same run would evaluate differently on
1 and on N ranks. Here each layer's momentum is set to 1 (after a forward pass its running buffers hold
exactly that pass's batch statistics, with no extra pass over the activations); the statistics of a
rank's micro-batches are summed, averaged (the caller then averages them over ranks, which hold equally
many micro-batches; in fp32 whatever the wire, as a 16-bit rounding of running statistics every step
would part N ranks from 1, whose statistics never travel), and
at the end of the step the running buffers move once, by the layer's own momentum, towards that mean
over all micro-batches of the global batch. With a fixed
``data.micro_batch_size`` the set of micro-batches does not depend on the rank count, so neither do the
running statistics. A skipped step (fp16 overflow) leaves them as they were. Pure torch, no MPI.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StepRunningStatistics:
    """Running statistics of ``model``'s BatchNorm layers, advanced once a step.

    Per step: :meth:`begin`, then :meth:`collect` after each micro-batch's forward pass, then
    :meth:`means` (to be averaged over ranks in place), then :meth:`finish`.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.momenta: list[float] = []
        self.running: list[Tensor] = []  # each layer's running mean and running variance
        for m in layers:
            if m.momentum is None:
                raise ValueError(
                    f"{type(m).__name__} with momentum None (a cumulative average) is not supported"
                )
            self.momenta += [float(m.momentum)] * 2
            assert m.running_mean is not None and m.running_var is not None
            self.running += [m.running_mean, m.running_var]
            m.momentum = 1.0  # a forward pass leaves its batch statistics in the running buffers
        self.before = [torch.empty_like(t) for t in self.running]
        self.sums = [torch.zeros_like(t) for t in self.running]
        self.count = 0

    def begin(self) -> None:
        """Before the step's first forward pass."""
        if self.running:
            torch._foreach_copy_(self.before, self.running)
            torch._foreach_zero_(self.sums)
        self.count = 0

    def collect(self) -> None:
        """After each micro-batch's forward pass (in training mode)."""
        if self.running:
            torch._foreach_add_(self.sums, self.running)
        self.count += 1

    def means(self) -> list[Tensor]:
        """This rank's mean statistics of the step, as tensors the caller may average over ranks in place."""
        if self.running and self.count:
            torch._foreach_div_(self.sums, float(self.count))
        return self.sums

    def finish(self, keep: bool) -> None:
        """After the step: each running buffer moves towards the (rank-averaged) means by its layer's
        momentum, or, unless ``keep``, returns to its value before the step."""
        if not self.running:
            return
        if keep and self.count:
            if len(set(self.momenta)) == 1:  # the usual case: one multi-tensor operation
                torch._foreach_lerp_(self.before, self.sums, self.momenta[0])
            else:
                for before, mean, momentum in zip(self.before, self.sums, self.momenta, strict=True):
                    before.lerp_(mean, momentum)
        torch._foreach_copy_(self.running, self.before)
