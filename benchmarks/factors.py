"""Time of SP-NGD's statistics on a refresh step, by kind: A (input side), G (output side), BatchNorm F.

    python benchmarks/factors.py --device cuda                     # ResNet-50, 224 px, batch 128, AMP fp16
    python benchmarks/factors.py --arch resnet8 --image-size 32 --batch 8 --precision bf16   # a CPU smoke run

One model, one synthetic batch on the device (channels_last on a GPU), forward and backward under the
run's autocast with the capture hooks armed for one kind of statistic at a time; the hooks' own time
(CUDA events on a GPU, the host clock on a CPU: ``Capture.take_seconds``) is the median of --repeats
passes. The BatchNorm statistic is timed both ways: eagerly, as training computes it by default, and
through torch.compile (``ngd.compile_bn = true``; compiled in an untimed pass). Under fp16/bf16 AMP on a
GPU each kind is timed twice: as training computes it (the captured 16-bit values multiplied on tensor
cores with fp32 output, where torch has ``mm``'s ``out_dtype``) and through fp32 copies of them, the
arithmetic it replaces. Also prints the GFLOP of the A and G products
(``n T d^2`` each, two FLOP a multiply-add), and the drift of each way's sums on the layer with the
longest ones (most rows ``n T``; ResNet-50's layer1 3x3 convs, 401,408 rows at batch 128): A of the
input that autocast hands that layer, against fp64 products of the same values -- the mean signed error
of the diagonal (a tensor core's accumulator truncates, so its error has a sign) and the largest error,
both relative to the largest entry.

Then what capturing every statistic adds to a whole forward and backward, in wall time (the host waits
for the device after each pass; median of --repeats): capture off; on, as trained; on with the factor
arithmetic stubbed out (what is left: the hooks themselves, their timing and bookkeeping); on without
the hooks' timing (on a GPU a pair of CUDA events a hook); and how long the host takes to queue a pass,
off and on, before anything waits for the device: on a GPU, where that is about the pass's wall time,
the host's launches bound the pass (on a CPU the host does the work as it queues it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hpcngd.config import NgdConfig
from hpcngd.models.resnet import build
from hpcngd.ngd import Capture, factors, select_layers, statistic_keys

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gflop(layers: dict[str, nn.Module], model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """GFLOP of the A and G Gram products for one pass of ``x``."""
    rows: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: rows.__setitem__(n, o.numel() // o.shape[1]))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    flop = {"A": 0.0, "G": 0.0}
    for name, m in layers.items():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            d_in = m.weight[0].numel() + (m.bias is not None)
            flop["A"] += 2 * rows[name] * d_in**2
            flop["G"] += 2 * rows[name] * m.weight.shape[0] ** 2
    return {k: v / 1e9 for k, v in flop.items()}


def longest_sum_input(
    layers: dict[str, nn.Module], model: nn.Module, x: torch.Tensor, half: torch.dtype
) -> tuple[str, nn.Module, torch.Tensor, int]:
    """The conv/fc layer whose A sums the most rows of autocast's dtype (then the widest), its input as
    autocast hands it over, and the rows. (A stem conv sees the fp32 images: not a 16-bit sum.)"""
    seen: dict[str, tuple[int, int, torch.Tensor]] = {}  # rows, width, input

    def keep(name: str, m: nn.Conv2d | nn.Linear, x: torch.Tensor, out: torch.Tensor) -> None:
        seen[name] = (out.numel() // out.shape[1], m.weight[0].numel(), x.detach())

    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: keep(n, m, i[0], o))
        for n, m in layers.items()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad(), torch.autocast(x.device.type, dtype=half, enabled=half != torch.float32):
        model(x)
    for h in hooks:
        h.remove()
    pool = [n for n in seen if seen[n][2].dtype == half] or list(seen)
    name = max(pool, key=lambda n: seen[n][:2])
    return name, layers[name], seen[name][2], seen[name][0]


def drift(module: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(mean signed diagonal error, largest error) of gram's A against fp64, relative to the largest entry."""
    rows, _ = factors.patches(module, x)
    exact = rows.double().T @ rows.double()
    error = factors.gram(rows, torch.float32).double() - exact
    top = float(exact.abs().max())
    return float(error.diagonal().mean()) / top, float(error.abs().max()) / top


@contextmanager
def stubbed_arithmetic(device: torch.device) -> Iterator[None]:
    """The capture's factor functions return an empty sum at once: the hooks run, their work does not."""
    kept = factors.a_sum, factors.g_sum, factors.bn_sum

    def empty(*args: object, **kwargs: object) -> factors.FactorSum:
        return factors.FactorSum(torch.zeros(1, device=device), 1)

    factors.a_sum = factors.g_sum = factors.bn_sum = empty
    try:
        yield
    finally:
        factors.a_sum, factors.g_sum, factors.bn_sum = kept


@contextmanager
def untimed(capture: Capture) -> Iterator[None]:
    """The capture's hooks do their work (autocast off, as in training) with no timing around it."""

    @contextmanager
    def work(t: torch.Tensor) -> Iterator[None]:
        with torch.autocast(t.device.type, enabled=False):
            yield

    capture._hook_work = work  # type: ignore[method-assign]  # the instance's, over the class's
    try:
        yield
    finally:
        del capture._hook_work


def capture_cost(
    capture: Capture,
    forward_backward: Callable[[bool], None],
    finish: Callable[[bool], object],
    device: torch.device,
    repeats: int,
) -> None:
    """Prints the wall ms of a forward and backward (``forward_backward(armed)`` then ``finish(armed)``,
    which takes the sums and waits for the hooks' timing) with the capture off, on, stubbed and untimed;
    and the host's time to queue ``forward_backward``, before anything waits for the device (a GPU's
    pass is bound by the host's launches where that is about its wall time)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_pass(armed: bool) -> None:
        forward_backward(armed)
        finish(armed)

    def wall(armed: bool) -> float:
        one_pass(armed)  # untimed: a first pass of this kind (allocations, cuDNN's choices)
        ms = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            one_pass(armed)
            sync()
            ms.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ms)

    off = wall(False)
    on = wall(True)
    with stubbed_arithmetic(device):
        stub = wall(True)
    with untimed(capture):
        bare = wall(True)
    print(f"capturing every statistic, wall ms of a forward and backward (median of {repeats}):")
    print(f"  capture off {off:.1f} | on {on:.1f} (+{on - off:.1f})")
    print(f"  on, factor arithmetic stubbed {stub:.1f}: the hooks without their work cost {stub - off:.1f}")
    print(f"  on, hooks untimed {bare:.1f}: timing the hooks costs {on - bare:.1f}")
    queued: dict[bool, list[float]] = {False: [], True: []}  # on a CPU the host does the work as it goes
    for _ in range(repeats):
        for armed in (False, True):
            sync()
            t0 = time.perf_counter()
            forward_backward(armed)
            queued[armed].append((time.perf_counter() - t0) * 1e3)  # the host is done; a GPU may not be
            finish(armed)
            sync()
    off_q, on_q = (statistics.median(queued[a]) for a in (False, True))
    print(
        f"  host time to queue it, before anything waits for the device: capture off {off_q:.1f}, "
        f"on {on_q:.1f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", choices=list(DTYPES), default="fp16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = build(args.arch, 1000).to(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(1000, (args.batch,), device=device)
    half = DTYPES[args.precision]
    layers = select_layers(model, ())
    keys = statistic_keys(layers)
    as_trained = NgdConfig().compile_bn  # the BatchNorm statistic compiled or not, as training's default
    capture = Capture(layers, torch.float32, compile_bn=as_trained)
    flop = gflop(layers, model, x)

    def forward_backward(want: set[tuple[str, str]]) -> None:
        """A forward and backward with the statistics ``want`` captured (nothing waits for the device)."""
        if want:
            capture.arm(want, grad_scale=float(args.batch))
        with torch.autocast(device.type, dtype=half, enabled=half != torch.float32):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    def finish(want: set[tuple[str, str]]) -> float:
        """The pass's sums taken and gradients dropped; the hooks' seconds (waits for their kernels)."""
        model.zero_grad(set_to_none=True)
        assert set(capture.take()) == want
        return capture.take_seconds()

    def one_pass(want: set[tuple[str, str]]) -> float:
        forward_backward(want)
        return finish(want)

    def timed(kind: str) -> float:
        """Median ms of the hooks that compute ``kind`` over the repeats (one untimed pass first)."""
        want = {k for k in keys if k[1] == kind}
        return statistics.median([one_pass(want) * 1e3 for _ in range(args.repeats + 1)][1:])

    direct = device.type == "cuda" and half != torch.float32 and factors.MM_OUT_DTYPE
    paths = {"as trained": factors.MM_OUT_DTYPE}
    if direct:
        paths["through fp32 copies"] = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{args.arch} {args.image_size}px batch {args.batch} on {name} | autocast {args.precision} | "
        f"torch {torch.__version__} | 16-bit products, fp32 out: {'yes' if direct else 'no'} | "
        f"median of {args.repeats} | "
        f"A products {flop['A']:.0f} GFLOP, G products {flop['G']:.0f} GFLOP"
    )
    longest, module, layer_input, rows = longest_sum_input(layers, model, x, half)
    print(
        f"{'statistics':24s} {'A ms':>8s} {'G ms':>8s} {'BN F ms':>8s} {'total ms':>9s} {'A TFLOP/s':>10s} | "
        f"A of {longest} ({rows:,} rows) vs fp64: diagonal drift, largest error"
    )
    try:
        for label, fast in paths.items():
            factors.MM_OUT_DTYPE = fast
            ms = {kind: timed(kind) for kind in ("A", "G", "F")}
            rate = flop["A"] / ms["A"]  # GFLOP per ms = TFLOP/s
            cols = " ".join(f"{ms[kind]:8.1f}" for kind in ("A", "G", "F"))
            signed, largest = drift(module, layer_input)
            print(f"{label:24s} {cols} {sum(ms.values()):9.1f} {rate:10.2f} | {signed:+.1e}, {largest:.1e}")
        capture.compile_bn = not as_trained
        other = timed("F")
        setting = f"ngd.compile_bn = {str(capture.compile_bn).lower()}"
        print(f"{'BN F, the other way':24s} {'':8s} {'':8s} {other:8.1f}   {setting}")
        print(f"BatchNorm statistic with ngd.compile_bn = true: {factors.bn_statistic_path(True)}")
        capture.compile_bn = as_trained  # the BatchNorm statistic and the A, G products as training has them
        factors.MM_OUT_DTYPE = paths["as trained"]
        every = set(keys)
        capture_cost(
            capture,
            lambda armed: forward_backward(every if armed else set()),
            lambda armed: finish(every if armed else set()),
            device,
            args.repeats,
        )
    finally:
        factors.MM_OUT_DTYPE = paths["as trained"]
        capture.remove()


if __name__ == "__main__":
    main()
