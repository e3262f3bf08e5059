"""Training on a CUDA GPU: the same steps as on the CPU, and mixed precision that learns. Marker ``gpu``:
skipped without CUDA; run ``pytest -m gpu tests/gpu`` on a GPU machine. One plain process is a one-rank
MPI world (mpi4py initializes a singleton), so neither mpiexec nor pytest-mpi is needed.

The device comparisons train with SiLU in place of ReLU. A ReLU is a step in the gradient: the GPU and
the CPU round differently (~1e-6 relative after a few layers), which flips about one of resnet8's
pre-activations from just above zero to just below, and that one flip moves a whole step's update by
~0.5% (1-3% of a BatchNorm bias's). Measured on the CPU with 1e-6 relative noise on the input: one flip
at layer1's output, the gradient below it changed by 4e-3 of its norm, the step failed the bounds below
by 30x; with SiLU the same noise moves each tensor's update by at most 3e-5. The trainer's path (factors,
inversion, preconditioning, update) does not depend on the activation. The CPU tests at the end check
these bounds against that noise and against the CPU's two convolution kernels, a real rounding
difference (with ReLU it fails them here too), so CI keeps them honest where no GPU runs."""

from __future__ import annotations

import copy
import itertools
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mpi4py import MPI
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mpi"))  # the MPI tests' run files
from hpcngd import config
from hpcngd.ngd import LayerCurvature, curvature
from hpcngd.train import Trainer
from runs import RUN, SPNGD_LEARNING, make_trainer

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """Marker ``gpu``, skipped without CUDA."""
    for mark in GPU:
        test = mark(test)
    return test


OPTIMIZERS = {"sgd": ["optim.name=sgd"], "spngd": SPNGD_LEARNING}  # SP-NGD refreshes every step
# runs.RUN (resnet8, 5 classes) at 32 px, one forward pass of 16 images a step, a constant lr from step 0
PARITY = [
    "data.image_size=32",
    "data.micro_batch_size=0",
    "optim.schedule=constant",
    "optim.warmup_epochs=0",
    "run.precision=fp32",
]
# The learnable Prototypes set: 8 steps an epoch; the loss scale may double every 4 good steps.
LEARNING = [
    "data.image_size=16",
    "data.batch_size=32",
    "data.micro_batch_size=0",
    "data.synthetic_train_samples=256",
    "optim.schedule=constant",
    "optim.warmup_epochs=0",
    "optim.lr=0.1",
    "run.loss_scale_growth_interval=4",
]
LEARNING_STEPS = 30


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Plain fp32 matmuls and convolutions on the GPU (TF32 keeps only 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def perturbed(x: torch.Tensor, noise: float, draw: torch.Generator) -> torch.Tensor:
    """``x`` with each value multiplied by ``1 + noise * N(0, 1)``, to play another device's rounding."""
    return x * (1 + noise * torch.randn(x.shape, generator=draw)) if noise else x


def steps(trainer: Trainer, num_steps: int, noise: float = 0.0) -> list[float]:
    """The losses of ``num_steps`` training steps; ``noise``: see :func:`perturbed` (a fixed draw)."""
    batches = trainer.loader.batches(0, trainer.total_steps)
    draw = torch.Generator().manual_seed(0)
    losses = [
        trainer.train_step(perturbed(x, noise, draw), y) for _, x, y in itertools.islice(batches, num_steps)
    ]
    batches.close()
    return losses


def smooth(model: nn.Module) -> None:
    """Every ReLU of a ResNet replaced by SiLU (see the module's docstring)."""
    for module in model.modules():
        if isinstance(getattr(module, "relu", None), nn.ReLU):
            module.relu = nn.SiLU()


Trained = tuple[list[torch.Tensor], list[torch.Tensor], list[float]]


def trained(overrides: list[str], num_steps: int, noise: float = 0.0) -> Trained:
    """(initial parameters, parameters after ``num_steps`` steps, losses) of the smoothed model, the
    parameters copied to the CPU; ``noise``: see :func:`steps`."""
    with make_trainer(MPI.COMM_WORLD, overrides) as trainer:
        smooth(trainer.model)
        init = [p.detach().cpu().clone() for p in trainer.params]
        losses = steps(trainer, num_steps, noise)
        return init, [p.detach().cpu().clone() for p in trainer.params], losses


def assert_same_steps(got: Trained, want: Trained, what: str) -> None:
    """Tolerance: 1e-4 of each parameter tensor's largest value, and 1e-3 of each tensor's update.

    The devices add in different orders (and cuDNN picks other convolution algorithms), ~1e-7 relative
    a kernel; 1e-5 relative noise on the input (more than that) moves the smoothed steps by at most 6e-5
    of any tensor's update (CPU, both optimizers). A real difference (a gradient not averaged or not
    preconditioned, the damping) moves a tensor by the size of its update; the learning rate 1% off
    moves every tensor's update by 1e-2.
    """
    (g_init, g_end, g_losses), (c_init, c_end, c_losses) = got, want
    assert g_losses == pytest.approx(c_losses, rel=1e-4), f"{what}: losses"
    for i, (g0, c0, g, c) in enumerate(zip(g_init, c_init, g_end, c_end, strict=True)):
        where = f"{what}: parameter {i} {tuple(c.shape)}"
        assert torch.equal(g0, c0), f"{where}: another init"
        off = float((g - c).abs().max()) / float(c.abs().max())
        assert off <= 1e-4, f"{where} differs by {off:.1e} of its largest value"
        update = float((c - c0).norm())
        assert update > 0, f"{where} did not move"
        moved = float(((g - g0) - (c - c0)).norm()) / update
        assert moved <= 1e-3, f"{where}: another update ({moved:.1e} of it)"


@on_gpu
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_a_gpu_step_is_the_cpu_step(optim: str, no_tf32: None) -> None:
    """Two steps from the same init (the model is built on the CPU, then moved) on the same batches."""
    cpu = trained([*PARITY, *OPTIMIZERS[optim], "run.device=cpu"], 2)
    gpu = trained([*PARITY, *OPTIMIZERS[optim], "run.device=cuda"], 2)
    assert_same_steps(gpu, cpu, f"{optim} on the GPU")


def learn(precision: str, optim: str) -> tuple[Trainer, list[float], int, list[float]]:
    """A trainer after LEARNING_STEPS steps, its losses, its skipped steps and its loss scale after each."""
    overrides = [*LEARNING, *OPTIMIZERS[optim], f"run.precision={precision}", "run.device=cuda"]
    with make_trainer(MPI.COMM_WORLD, overrides, learnable=True) as trainer:
        skipped = 0
        losses = []
        scales = []
        batches = trainer.loader.batches(0, trainer.total_steps)
        for _, x, y in itertools.islice(batches, LEARNING_STEPS):  # step by step: the scale after each
            losses.append(trainer.train_step(x, y))
            skipped += trainer.scaler.take_skipped()
            scales.append(trainer.scaler.scale)
        batches.close()
        assert next(trainer.model.parameters()).is_cuda
        return trainer, losses, skipped, scales


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@on_gpu
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_fp16_learns_with_a_dynamic_loss_scale(optim: str) -> None:
    trainer, losses, skipped, scales = learn("fp16", optim)  # Diverged if it diverged
    assert all(math.isfinite(v) for v in losses)
    # 5 classes with label smoothing 0.1: chance is ~1.6; fp32 on the CPU reaches ~0.45
    assert mean(losses[-5:]) < 0.6 * mean(losses[:5]), losses
    scaler = trainer.scaler
    assert scaler.enabled and math.isfinite(scaler.scale) and scaler.scale >= 1.0
    # it grew (every 4 good steps) or backed off at some step (the last step may land on the first value)
    assert len(set(scales)) > 1, scales
    assert skipped < LEARNING_STEPS // 3, f"{skipped} of {LEARNING_STEPS} steps skipped for overflow"


@on_gpu
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_bf16_learns_without_loss_scaling(optim: str) -> None:
    trainer, losses, skipped, _ = learn("bf16", optim)
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-5:]) < 0.6 * mean(losses[:5]), losses
    assert not trainer.scaler.enabled and trainer.scaler.scale == 1.0 and skipped == 0


@on_gpu
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_channels_last_fp16_steps_run(optim: str) -> None:
    overrides = [
        *PARITY,
        *OPTIMIZERS[optim],
        "run.device=cuda",
        "run.channels_last=true",
        "run.precision=fp16",
        "run.loss_scale_init=1024",  # no overflow at the first step: the update is taken
    ]
    with make_trainer(MPI.COMM_WORLD, overrides) as trainer:
        conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
        before = [p.detach().clone() for p in trainer.params]
        losses = steps(trainer, 2)
        assert all(math.isfinite(v) for v in losses)
        assert trainer.scaler.take_skipped() == 0
        after = list(trainer.params)
        assert all(bool(torch.isfinite(p).all()) for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
        if optim == "spngd":
            assert trainer.ngd is not None and all(s.inverse is not None for s in trainer.ngd.stats.values())


@on_gpu
def test_mc_fisher_factors_on_the_gpu_are_the_cpu_factors(no_tf32: None) -> None:
    """The reference curvature with sampled labels: the same CPU generator draws the same labels
    whatever device the model is on, so the factors agree to fp64 rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(5, (8,))
    on = {
        dev: curvature(
            model.to(dev), x.to(dev), y.to(dev), "mc", torch.float64, torch.Generator().manual_seed(1)
        )
        for dev in ("cpu", "cuda")
    }
    for name, cpu_c in on["cpu"].items():
        gpu_c = on["cuda"][name]
        assert gpu_c.A is not None and gpu_c.G is not None and gpu_c.A.is_cuda
        torch.testing.assert_close(gpu_c.A.cpu(), cpu_c.A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gpu_c.G.cpu(), cpu_c.G, rtol=1e-5, atol=1e-7)


def resnet_factors(device: str, noise: float = 0.0, smoothed: bool = True) -> dict[str, LayerCurvature]:
    """The fp32 curvature of resnet8 (smoothed, or with its ReLUs) in training mode on one batch,
    computed on ``device``; ``noise``: see :func:`perturbed` (a fixed draw)."""
    from hpcngd.models.resnet import build

    torch.manual_seed(6)
    model = build("resnet8", 5).train()
    if smoothed:
        smooth(model)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(5, (16,))
    x = perturbed(x, noise, torch.Generator().manual_seed(0))
    return curvature(model.to(device), x.to(device), y.to(device), "empirical", torch.float32)


def assert_same_factors(got: dict[str, LayerCurvature], want: dict[str, LayerCurvature], what: str) -> None:
    """Every A, G and BatchNorm block within 1e-4 of its largest entry. 1e-5 relative noise on the input
    moves the smoothed resnet8's by at most 1e-5 of it (with ReLU: 5e-3)."""
    for name, c in want.items():
        for kind, expected in (("A", c.A), ("G", c.G), ("F", c.blocks)):
            actual = {"A": got[name].A, "G": got[name].G, "F": got[name].blocks}[kind]
            if expected is None:
                continue
            assert actual is not None, f"{what}: {name}.{kind} missing"
            off = float((actual.cpu() - expected).abs().max() / expected.abs().max())
            assert off < 1e-4, f"{what}: {name}.{kind} differs by {off:.1e} of its largest entry"


@on_gpu
def test_fp32_factors_of_a_resnet_on_the_gpu_are_the_cpu_factors(no_tf32: None) -> None:
    """Every A, G and BatchNorm block of a smoothed ResNet, fp32, one batch: the GPU's are the CPU's (the
    devices add in different orders, ~1e-6). Names the statistic that differs, to tell a factor from the
    update when the step comparison fails."""
    gpu = resnet_factors("cuda")
    assert all(c.A is None or c.A.is_cuda for c in gpu.values())
    assert_same_factors(gpu, resnet_factors("cpu"), "on the GPU")


@on_gpu
def test_tf32_preconditioning_moves_a_wide_layer_by_its_rounding_and_tf32x3_does_not() -> None:
    """ngd.precondition_precision on a GPU: against fp64, the fp32 and tf32x3 products of a wide layer
    agree to fp32 rounding; tf32's move by about TF32's rounding (10 mantissa bits); the process-wide
    TF32 setting is off again afterwards. (torch's default: fp32 matmuls without TF32; the no_tf32
    fixture is not used, as its legacy flags would mix with the setting the preconditioner uses.)"""
    from hpcngd.config import NgdConfig
    from hpcngd.ngd import Preconditioner
    from hpcngd.ngd.preconditioner import tf32_matmuls_on

    torch.manual_seed(4)
    x, y = torch.randn(256, 1024).cuda(), torch.randint(512, (256,)).cuda()
    start = nn.Linear(1024, 512).cuda()
    grads = {}
    for precision in ("fp64", "fp32", "tf32", "tf32x3"):
        layer = copy.deepcopy(start)
        dtype, how = ("fp64", "fp32") if precision == "fp64" else ("fp32", precision)
        pre = Preconditioner(layer, NgdConfig(dtype=dtype, precondition_precision=how))
        assert pre.begin(0, grad_scale=256)
        nn.functional.cross_entropy(layer(x), y).backward()
        pre.step(0, damping=1e-3)
        grads[precision] = layer.weight.grad.double().cpu()
    error = {k: float((grads[k] - grads["fp64"]).norm() / grads["fp64"].norm()) for k in grads}
    assert error["fp32"] < 1e-4 and error["tf32x3"] < 1e-4, error
    assert 1e-5 < error["tf32"] < 3e-2, error
    assert not tf32_matmuls_on()


@on_gpu
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_factors_are_fp32_products_of_the_captured_values(half: torch.dtype) -> None:
    """A and G from fp16/bf16 activations and gradients on the GPU (tensor cores with fp32 output, where
    torch has mm's out_dtype) agree with the fp64 products of the same values, built from F.unfold on the
    CPU, to fp32 rounding: 2e-5 of the largest entry, where a result rounded to fp16 is off by 5e-4."""
    import torch.nn.functional as F

    from hpcngd.ngd import factors

    torch.manual_seed(5)
    conv = nn.Conv2d(64, 32, 3, stride=(2, 2), padding=(1, 1)).cuda()
    x = (
        (torch.randn(16, 64, 28, 28, device="cuda") * 3)
        .to(half)
        .contiguous(memory_format=torch.channels_last)
    )
    g = (
        (torch.randn(16, 32, 14, 14, device="cuda") * 300)
        .to(half)
        .contiguous(memory_format=torch.channels_last)
    )
    cols = F.unfold(x.cpu().double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    a_rows = torch.cat([cols.transpose(1, 2).reshape(-1, cols.shape[1]), torch.ones(16 * 196, 1).double()], 1)
    g_rows = g.cpu().double().permute(0, 2, 3, 1).reshape(-1, 32) * 0.25
    for got, rows, per in (
        (factors.a_sum(conv, x).total, a_rows, 1),
        (factors.g_sum(conv, g, 0.25).total, g_rows, 196),
    ):
        assert got.dtype == torch.float32 and got.is_cuda
        exact = rows.T @ rows / per
        scale = (rows.abs().T @ rows.abs()).max() / per
        assert float((got.cpu().double() - exact).abs().max() / scale) < 2e-5


@on_gpu
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_the_compiled_bn_statistic_in_a_gpu_backward_hook_matches_fp64(half: torch.dtype) -> None:
    """ngd.compile_bn on a GPU: the statistic compiled (Triton) inside a tensor hook, which runs in
    autograd's CUDA thread as in training, from 16-bit channels_last values; the blocks agree with fp64
    ones of the same values, and nothing fell back to the eager path."""
    from hpcngd.ngd import factors

    torch.manual_seed(7)
    bn = nn.BatchNorm2d(32).cuda()
    x = torch.randn(16, 32, 28, 28, device="cuda") + 2
    x = x.to(half).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(g: torch.Tensor) -> None:
        fisher = factors.bn_sum(bn, x.detach(), g, 1 / 16, torch.float32, compiled=True)
        seen.append((g.detach().clone(), fisher.total))

    y = x * 3
    y.register_hook(hook)
    (y * torch.randn_like(y)).sum().backward()
    assert factors.bn_compile_failure() is None and len(seen) == 1
    g, got = seen[0]
    assert got.is_cuda and got.dtype == torch.float32
    exact = factors.bn_sum(bn, x.detach().cpu().double(), g.cpu().double(), 1 / 16, torch.float64).total
    assert float((got.cpu().double() - exact).abs().max() / exact.abs().max()) < 1e-5


@on_gpu
def test_the_placement_of_a_gpu_rank_names_the_cores_near_its_gpu() -> None:
    """The GPU's PCI address from torch finds its entry in Linux's sysfs, where sysfs shows NVIDIA GPUs,
    and the cores local to it are read from there (none where sysfs lists none, as in some VMs)."""
    from hpcngd.device import parse_cpus, placement

    here = placement(torch.device("cuda", 0))
    assert here.device == "cuda:0" and torch.cuda.get_device_name(0) in here.gpu
    if not hasattr(torch.cuda.get_device_properties(0), "pci_bus_id"):  # an older torch does not say
        return
    found = re.search(r" at ([0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.0)$", here.gpu)  # VMD domains: 5 digits
    assert found, here.gpu
    shown = [
        d.name
        for d in Path("/sys/bus/pci/devices").glob("*")
        if (d / "vendor").is_file()
        and (d / "vendor").read_text().strip() == "0x10de"
        and (d / "class").read_text().startswith("0x03")  # a display or 3D controller
    ]
    if shown:
        address = found.group(1)
        assert address in shown, f"torch's PCI address {address} is not among sysfs's NVIDIA GPUs {shown}"
        listed = Path("/sys/bus/pci/devices", address, "local_cpulist").read_text().strip()
        assert here.gpu_cores == (parse_cpus(listed) if listed else None), (listed, here.gpu_cores)
        if here.gpu_cores is not None:
            assert here.gpu_cores <= parse_cpus(Path("/sys/devices/system/cpu/possible").read_text())


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_the_device_comparison_holds_under_rounding_noise_and_fails_on_a_real_difference(optim: str) -> None:
    """On the CPU, as CI has no GPU: 1e-5 relative noise on the input (a GPU's rounding is ~1e-6 after a
    few layers) passes ``assert_same_steps``; the learning rate 1% off fails it."""
    overrides = [*PARITY, *OPTIMIZERS[optim], "run.device=cpu"]
    reference = trained(overrides, 2)
    assert_same_steps(trained(overrides, 2, noise=1e-5), reference, "noisy input")
    lr = config.loads(RUN, overrides=overrides).optim.lr
    with pytest.raises(AssertionError, match="lr 1% off"):
        assert_same_steps(trained([*overrides, f"optim.lr={lr * 1.01}"], 2), reference, "lr 1% off")


def test_the_factor_comparison_holds_under_rounding_noise() -> None:
    """On the CPU: 1e-5 relative noise on the input passes ``assert_same_factors``; with ResNet's ReLUs
    (not smoothed) the same noise fails it."""
    assert_same_factors(resnet_factors("cpu", noise=1e-5), resnet_factors("cpu"), "noisy input")
    relu = resnet_factors("cpu", smoothed=False)
    with pytest.raises(AssertionError, match="noisy input with ReLU"):
        assert_same_factors(resnet_factors("cpu", 1e-5, smoothed=False), relu, "noisy input with ReLU")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch's oneDNN convolutions")
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_the_comparisons_hold_across_convolution_kernels(optim: str) -> None:
    """A real rounding difference, on the CPU: the same steps and factors with oneDNN's convolutions and
    with torch's own (im2col and one matrix product), as the GPU's cuDNN kernels differ from the CPU's.
    Here (2026-11-27) the smoothed steps moved by 2.5e-5 of an update and the factors by 1.7e-6 of their
    largest entry; with ResNet's ReLUs the same switch moved the factors by 2.9e-3 and SGD's first conv
    by 6.6e-4 of its largest weight, past both bounds (not asserted: whether a pre-activation flips
    depends on the CPU's kernels)."""
    overrides = [*PARITY, *OPTIMIZERS[optim], "run.device=cpu"]
    reference, reference_factors = trained(overrides, 2), resnet_factors("cpu")
    saved = torch.backends.mkldnn.enabled  # (its flags() context warns about oneDNN's TF32 on Intel GPUs)
    torch.backends.mkldnn.enabled = False
    try:
        other, other_factors = trained(overrides, 2), resnet_factors("cpu")
    finally:
        torch.backends.mkldnn.enabled = saved
    assert any(not torch.equal(a, b) for a, b in zip(other[1], reference[1], strict=True)), "same kernels"
    assert_same_steps(other, reference, "torch's convolutions")
    assert_same_factors(other_factors, reference_factors, "torch's convolutions")
