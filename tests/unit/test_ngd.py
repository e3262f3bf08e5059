"""SP-NGD math against independent references: per-example Fisher blocks, brute-force loops over
patches, explicit Kronecker systems, hand-computed updates."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hpcngd.config import NgdConfig, OptimConfig
from hpcngd.models import resnet
from hpcngd.ngd import Preconditioner, curvature, factors, inverse
from hpcngd.ngd.preconditioner import StepReport
from hpcngd.ngd.stale import StaleInterval, relative_change
from hpcngd.optim import SPNGD, damping_at, param_groups, rescale_weights


@pytest.fixture(autouse=True, scope="module")
def _fp64() -> object:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def per_example_grads(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Gradient of each example's own loss term, from the batched forward, by a loop of backward passes."""
    losses = F.cross_entropy(model(x), y, reduction="none")
    return [list(torch.autograd.grad(losses[i], params, retain_graph=True)) for i in range(len(x))]


def test_linear_one_example_kron_is_exact_fisher_block() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(1, 5), torch.tensor([2])
    layer = model[0]
    ((dw, db),) = per_example_grads(model, [layer.weight, layer.bias], x, y)
    vec = torch.cat([dw, db[:, None]], dim=1).reshape(-1)  # row-major [dW | db]
    c = curvature(model, x, y, dtype=torch.float64)["0"]
    assert c.A is not None and c.G is not None
    torch.testing.assert_close(torch.kron(c.G, c.A), torch.outer(vec, vec), rtol=1e-10, atol=1e-14)


def test_linear_batch_factors_are_per_example_averages() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(7, 4), torch.randint(3, (7,))
    c = curvature(model, x, y, dtype=torch.float64)["2"]
    hidden = torch.relu(model[0](x))
    a = torch.cat([hidden, torch.ones(7, 1)], dim=1)
    gh = torch.softmax(model(x), 1) - F.one_hot(y, 3)  # per-example dloss/dlogits
    torch.testing.assert_close(c.A, a.T @ a / 7, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(c.G, gh.T @ gh / 7, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "bias"),
    [(3, 2, 1, True), ((2, 3), 1, 0, False), (1, 1, 0, True)],
)
def test_conv_factors_equal_loops_over_patches(kernel: object, stride: int, padding: int, bias: bool) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, bias=bias)  # type: ignore[arg-type]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(4))
    n = 3
    x, y = torch.randn(n, 2, 5, 6), torch.randint(4, (n,))
    model(x)  # materialize the lazy layer
    out = conv(x)
    grad_out = torch.autograd.grad(F.cross_entropy(model[1:](out), y), out)[0] * n  # gh
    c = curvature(model, x, y, dtype=torch.float64)["0"]
    kh, kw = conv.kernel_size
    xp = F.pad(x, (padding, padding, padding, padding))
    _, _, ho, wo = out.shape
    d = 2 * kh * kw + (1 if bias else 0)
    a_ref, g_ref = torch.zeros(d, d), torch.zeros(3, 3)
    for i in range(n):
        for oh in range(ho):
            for ow in range(wo):
                patch = xp[i, :, oh * stride : oh * stride + kh, ow * stride : ow * stride + kw].reshape(-1)
                if bias:
                    patch = torch.cat([patch, torch.ones(1)])
                a_ref += torch.outer(patch, patch)
                g = grad_out[i, :, oh, ow]
                g_ref += torch.outer(g, g)
    torch.testing.assert_close(c.A, a_ref / n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.G, g_ref / (n * ho * wo), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "channels_last", "bias"),
    [
        (3, 1, 1, 1, True, False),
        (3, 2, 1, 1, False, True),
        ((3, 2), (2, 1), (1, 0), (2, 1), True, True),
        (1, 2, 0, 1, True, False),
        (1, 1, 0, 1, False, True),
        (1, 1, 1, 1, True, False),
        (7, 2, 3, 1, True, False),
        ((2, 3), 1, (1, 2), 2, False, True),
    ],
)
def test_conv_patches_are_unfold_columns(
    kernel: object, stride: object, padding: object, dilation: object, channels_last: bool, bias: bool
) -> None:
    """The (n, h, w, c) patch rows, put in the weight's column order, are F.unfold's im2col rows, and A
    is their Gram matrix (an independent reference: unfold's own patch extraction)."""
    torch.manual_seed(12)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)  # type: ignore[arg-type]
    x = torch.randn(2, 3, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    ref = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if bias:
        ref = torch.cat([ref, torch.ones(len(ref), 1)], 1)
    rows, offsets = factors.patches(conv, x)
    assert offsets == conv.kernel_size[0] * conv.kernel_size[1]
    d = rows.shape[1] - (1 if bias else 0)  # the columns come (offset, channel): put them (channel, offset)
    rows = torch.cat(
        [rows[:, :d].unflatten(1, (offsets, d // offsets)).transpose(1, 2).flatten(1), rows[:, d:]], 1
    )
    torch.testing.assert_close(rows, ref, rtol=0, atol=0)
    torch.testing.assert_close(
        factors.a_sum(conv, x, torch.float64).total, ref.T @ ref, rtol=1e-12, atol=1e-12
    )
    assert conv(x).shape[2] * conv(x).shape[3] * 2 == ref.shape[0]


@pytest.mark.parametrize(("outer", "inner"), [(3, 4), (1, 5), (5, 1), (9, 2)])
def test_swap_blocks_renumbers_rows_and_columns(outer: int, inner: int) -> None:
    """Entry ((i, o), (j, p)) of the result is entry ((o, i), (p, j)): against index arithmetic."""
    torch.manual_seed(14)
    d = outer * inner
    m = torch.randn(d, d)
    new_to_old = [o * inner + i for i in range(inner) for o in range(outer)]
    expected = m[new_to_old][:, new_to_old]
    torch.testing.assert_close(factors.swap_blocks(m, outer, inner), expected, rtol=0, atol=0)
    torch.testing.assert_close(factors.swap_blocks(expected, inner, outer), m, rtol=0, atol=0)  # the inverse


def test_g_sum_applies_the_gradient_scale_to_the_sum() -> None:
    torch.manual_seed(13)
    conv = nn.Conv2d(3, 5, 3, padding=(1, 1))
    g = torch.randn(4, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    gh = (g * 3.5).permute(0, 2, 3, 1).reshape(-1, 5)
    s = factors.g_sum(conv, g, 3.5, torch.float64)
    assert s.count == 4
    torch.testing.assert_close(s.total, gh.T @ gh / 42, rtol=1e-12, atol=1e-12)


def test_half_precision_rows_multiply_as_their_fp32_copies() -> None:
    """gram of fp16/bf16 rows (on a CPU: converted first) equals the fp64 product of the same values to
    fp32 rounding (fp16 rounding would be 500x worse); the GPU path (tests/gpu) is held to the same bound."""
    torch.manual_seed(14)
    for half in (torch.float16, torch.bfloat16):
        rows = (torch.randn(3000, 40) * 50).to(half)
        exact = rows.double().T @ rows.double()
        got = factors.gram(rows, torch.float32)
        assert got.dtype == torch.float32
        scale = (rows.double().abs().T @ rows.double().abs()).max()  # off-diagonal sums cancel
        assert float((got.double() - exact).abs().max() / scale) < 1e-6


def test_unit_wise_bn_blocks_equal_per_example_gradients() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 9, 3)
    )
    nn.init.normal_(model[1].weight)
    nn.init.normal_(model[1].bias)
    x, y = torch.randn(5, 2, 5, 5), torch.randint(3, (5,))
    per_ex = per_example_grads(model, [model[1].weight, model[1].bias], x, y)
    u = torch.stack([torch.stack([gg, gb], dim=1) for gg, gb in per_ex])  # (n, C, 2)
    ref = torch.einsum("nci,ncj->cij", u, u) / 5
    blocks = curvature(model, x, y, dtype=torch.float64)["1"].blocks
    assert blocks is not None and blocks.shape == (4, 2, 2)
    torch.testing.assert_close(blocks, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("captured", [torch.float32, torch.bfloat16, torch.float16])
def test_bn_blocks_leave_the_captured_tensors_untouched_and_match_fp64(
    captured: torch.dtype, compiled: bool
) -> None:
    """The BatchNorm statistic centres a copy of the input in place and reads the gradient as it is: an
    fp32 input (whose conversion to fp32 would be no copy) and the gradient are not changed, and the fp32
    blocks of fp32 or 16-bit captured values (AMP's) agree with fp64 ones of the same values, eager and
    through torch.compile."""
    torch.manual_seed(15)
    bn = nn.BatchNorm2d(8)
    x = (torch.randn(16, 8, 12, 12) * 0.5 + 3.0).to(captured).contiguous(memory_format=torch.channels_last)
    g = (torch.randn(16, 8, 12, 12) * 300).to(captured)
    before = x.clone(), g.clone()
    got = factors.bn_sum(bn, x, g, 1 / 512, torch.float32, compiled)
    assert factors.bn_compile_failure() is None
    assert torch.equal(x, before[0]) and torch.equal(g, before[1])
    assert got.total.dtype == torch.float32 and got.count == 16
    exact = factors.bn_sum(bn, x.double(), g.double(), 1 / 512, torch.float64).total
    assert float((got.total.double() - exact).abs().max() / exact.abs().max()) < 1e-5


def test_a_failing_compiler_leaves_the_bn_statistic_to_the_eager_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch.compile failing (here: made to raise at its first call) is said once, with its reason and
    the key that skips it, and the statistic is the eager one, then and at every later call, which does
    not try to compile again."""
    calls = []

    def broken(*args: object) -> torch.Tensor:
        calls.append(args)
        raise RuntimeError("InductorError: no working C++ compiler found\ndetails")

    monkeypatch.setattr(factors, "_compiled_gradient_sums", lambda: broken)
    monkeypatch.setattr(factors, "_compile_failed", [])
    torch.manual_seed(16)
    bn = nn.BatchNorm2d(4)
    x, g = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    eager = factors.bn_per_example(bn, x, g, 0.5, torch.float32)
    with caplog.at_level("WARNING", logger="hpcngd.ngd.factors"):
        for _ in range(2):
            assert torch.equal(factors.bn_per_example(bn, x, g, 0.5, torch.float32, compiled=True), eager)
    assert len(calls) == 1
    assert factors.bn_compile_failure() == "RuntimeError: InductorError: no working C++ compiler found"
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "SP-NGD: torch.compile of the BatchNorm statistic failed (RuntimeError: InductorError: no working "
        "C++ compiler found); computing it eagerly (set ngd.compile_bn = false to skip compiling)"
    ]


def test_ngd_compile_bn_gives_the_eager_blocks_through_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """ngd.compile_bn reaches the capture hooks: the compiled function computes every BatchNorm layer's
    statistic, a ResNet's blocks (bf16 autocast, as on a CPU rank) are the eager ones to fp32 rounding,
    and it is off by default."""
    assert NgdConfig().compile_bn is False
    compiled_fn = factors._compiled_gradient_sums()
    calls: list[int] = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return compiled_fn(*args)

    monkeypatch.setattr(factors, "_compiled_gradient_sums", lambda: counted)
    blocks = {}
    for compiled in (False, True):
        torch.manual_seed(17)
        model = resnet.build("resnet8", 5)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(5, (8,))
        pre = Preconditioner(model, NgdConfig(compile_bn=compiled))
        assert pre.capture.compile_bn is compiled and pre.begin(0, grad_scale=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        blocks[compiled] = {k: v for k, v in pre.take_factors().items() if k[1] == "F"}
    assert len(blocks[True]) == 9 and blocks[True].keys() == blocks[False].keys()  # resnet8: 9 BatchNorms
    assert len(calls) == 9  # the compiled run's, none of the eager run's
    for key, eager in blocks[False].items():
        assert float((blocks[True][key] - eager).abs().max() / eager.abs().max()) < 1e-5, key
    assert factors.bn_compile_failure() is None


def test_out_of_memory_in_the_compiled_statistic_is_not_taken_for_a_compiler_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(*args: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(factors, "_compiled_gradient_sums", lambda: out_of_memory)
    monkeypatch.setattr(factors, "_compile_failed", [])
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(torch.OutOfMemoryError):
        factors.bn_per_example(nn.BatchNorm2d(3), x, x, 1.0, torch.float32, compiled=True)
    assert factors.bn_compile_failure() is None
    assert factors.bn_statistic_path(True) == "compiled"
    assert factors.bn_statistic_path(False) == "eager (ngd.compile_bn = false)"


def test_the_statistic_compiles_in_the_calling_thread_without_a_worker_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inductor's settings are per thread, and a GPU's backward hooks run in autograd's device thread:
    one compile thread (no pool of worker processes) is set in the thread that calls the statistic."""
    import threading

    from torch._inductor import config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    seen: list[object] = []

    def hook_thread() -> None:
        x = torch.randn(4, 3, 5, 5)
        seen.append(factors.bn_per_example(nn.BatchNorm2d(3), x, x, 1.0, torch.float32, compiled=True))
        seen.append(inductor_config.compile_threads)

    worker = threading.Thread(target=hook_thread)
    worker.start()
    worker.join()
    assert isinstance(seen[0], torch.Tensor) and seen[1] == 1 and factors.bn_compile_failure() is None


def test_mc_fisher_keeps_a_and_samples_g() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(64, 4), torch.randint(3, (64,))
    emp = curvature(model, x, y)["2"]
    mc = curvature(model, x, y, fisher="mc", generator=torch.Generator().manual_seed(0))["2"]
    torch.testing.assert_close(mc.A, emp.A)
    assert not torch.allclose(mc.G, emp.G)
    # Expected MC Fisher of the logits: E_y~p[(p - e_y)(p - e_y)^T] = diag(p) - p p^T, averaged.
    p = torch.softmax(model(x), 1).detach()
    exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    draws = [
        curvature(model, x, y, "mc", torch.float64, torch.Generator().manual_seed(s))["2"].G
        for s in range(40)
    ]
    torch.testing.assert_close(torch.stack(draws).mean(0)[:3, :3], exact, atol=0.02, rtol=0.1)


def test_pi_corrected_damping() -> None:
    a, g = torch.diag(torch.tensor([4.0, 2.0])), torch.diag(torch.tensor([0.5, 0.5, 0.5]))
    pi = math.sqrt(3.0 / 0.5)
    assert inverse.pi_correction(a, g) == pytest.approx(pi)
    add_a, add_g = inverse.damping_terms(a, g, 1e-2)
    assert (add_a, add_g) == (pytest.approx(pi * 0.1), pytest.approx(0.1 / pi))
    assert inverse.damping_terms(a, torch.zeros(3, 3), 1e-2) == (pytest.approx(0.1), pytest.approx(0.1))
    assert inverse.damping_terms(a, g, 1e-30) == (1e-7, 1e-7)  # floors


def test_preconditioned_gradient_solves_damped_kronecker_system() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(6, 2, 4, 4), torch.randint(4, (6,))
    pre = Preconditioner(model, NgdConfig(dtype="fp64"))
    assert pre.begin(0, grad_scale=6)
    F.cross_entropy(model(x), y).backward()
    grads = {n: (m.weight.grad.clone(), m.bias.grad.clone()) for n, m in (("0", model[0]), ("3", model[3]))}
    report = pre.step(0, damping=0.03)
    assert report.refreshed == 4 and report.inverted == 4 and report.failed == 0
    for name, module in (("0", model[0]), ("3", model[3])):
        a, g = pre.stats[(name, "A")].value, pre.stats[(name, "G")].value
        add_a, add_g = inverse.damping_terms(a, g, 0.03)
        a_d = a + add_a * torch.eye(a.shape[0])
        g_d = g + add_g * torch.eye(g.shape[0])
        dw, db = grads[name]
        m = torch.cat([dw.reshape(dw.shape[0], -1), db[:, None]], dim=1)
        solved = torch.linalg.solve(torch.kron(g_d, a_d), m.reshape(-1)).reshape(m.shape)
        got = torch.cat([module.weight.grad.reshape(dw.shape[0], -1), module.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(got, solved, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "tf32x3"])
def test_tf32_is_on_for_the_preconditioning_products_only(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """ngd.precondition_precision lets CUDA's fp32 products of the conv/fc layers use TF32 where there are
    tensor cores (forced here: the CPU has none, and there nothing is touched) and restores torch's
    setting after them; otherwise it touches nothing (torch refuses to mix its two TF32 APIs, so a
    needless write could break a caller's reads)."""
    from hpcngd.ngd.preconditioner import tf32_matmuls_on

    seen: list[bool] = []
    set_grad_matrix = factors.set_grad_matrix

    def recorded(module: nn.Module, matrix: torch.Tensor) -> None:
        seen.append(tf32_matmuls_on())
        set_grad_matrix(module, matrix)

    flags = torch.backends.cuda.matmul
    writes: list[str] = []
    real_setattr = type(flags).__setattr__

    def counted_setattr(obj: object, name: str, value: object) -> None:
        writes.append(name)
        real_setattr(obj, name, value)

    monkeypatch.setattr(factors, "set_grad_matrix", recorded)
    monkeypatch.setattr(type(flags), "__setattr__", counted_setattr)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    pre = Preconditioner(model, NgdConfig(precondition_precision=precision))
    assert not pre.tf32  # no tensor cores here
    pre.tf32 = precision != "fp32"  # as on a GPU that has them
    assert pre.begin(0, grad_scale=6) and not tf32_matmuls_on()
    F.cross_entropy(model(torch.randn(6, 2, 4, 4)), torch.randint(4, (6,))).backward()
    pre.step(0, damping=0.03)
    on = precision != "fp32"
    assert seen == [on, on] and not tf32_matmuls_on()
    assert len(writes) == (2 if on else 0)  # set and restored once a step, or never
    torch.get_float32_matmul_precision()  # still readable: the APIs were not mixed


def rounded_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """What a TF32 tensor core keeps of an fp32 input: 11 significant bits (computed independently of
    the bit arithmetic of ``split_tf32``)."""
    mantissa, exponent = torch.frexp(t.double())  # |mantissa| in [0.5, 1)
    return torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent).float()


def test_tf32x3_splits_exactly_and_keeps_fp32_accuracy_where_one_tf32_product_loses_it() -> None:
    from hpcngd.ngd.preconditioner import matmul_tf32x3, split_tf32

    torch.manual_seed(0)
    x = (torch.randn(64, 300) * torch.logspace(-3, 3, 300)).float()  # this module's default is fp64
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x) and torch.equal(rounded_to_tf32(hi), hi)  # hi: exact in TF32
    assert bool((lo.abs() < x.abs() * 2**-10).all()) and bool((lo != 0).any())
    # A product that cancels (as the preconditioning products of some layers do): |x y| << |x| |y|
    y = torch.randn(300, 200, dtype=torch.float32)
    y = y - torch.linalg.lstsq(x, x @ y).solution * 0.999  # x @ y shrinks by about 1000
    exact = x.double() @ y.double()

    def error(p: torch.Tensor) -> float:
        return float((p.double() - exact).norm() / exact.norm())

    one_tf32 = rounded_to_tf32(x) @ rounded_to_tf32(y)  # what TF32 tensor cores compute
    (xh, xl), (yh, yl) = split_tf32(x), split_tf32(y)
    three = matmul_tf32x3((xh, rounded_to_tf32(xl)), (yh, rounded_to_tf32(yl)))
    assert error(one_tf32) > 100 * error(x @ y)
    assert error(three) < 4 * error(x @ y) + 1e-7


def test_tf32x3_preconditioning_reuses_each_inverse_split_until_it_is_inverted_again() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(6, 2, 4, 4), torch.randint(4, (6,))
    results = {}
    for precision in ("fp32", "tf32x3"):
        m = copy.deepcopy(model)
        pre = Preconditioner(m, NgdConfig(precondition_precision=precision, stale_threshold=10.0))
        pre.tf32 = precision == "tf32x3"  # forced: the CPU has no tensor cores, so the products are fp32
        for step in range(3):  # refreshes at 0 and 1, not at 2
            pre.begin(step, grad_scale=6)
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            pre.step(step, damping=0.03)
            if step == 1 and precision == "tf32x3":
                kept = {k: v[1] for k, v in pre._splits.items()}
        results[precision] = [p.grad.clone() for p in m.parameters()]
    assert set(kept) == {("0", "A"), ("0", "G"), ("3", "A"), ("3", "G")}
    assert all(pre._splits[k][1] is v for k, v in kept.items())  # step 2 reused them
    for a, b in zip(*results.values(), strict=True):  # on the CPU the three products are fp32 products
        assert float((b - a).norm() / a.norm()) < 1e-5


def test_channels_last_gradients_are_preconditioned_in_place_as_contiguous_ones() -> None:
    """A channels_last conv's gradient is preconditioned in its own memory, its columns in (kh, kw, c)
    order against a reordered A^-1: the same values as a contiguous model's, in the same tensors, and
    on later steps as few kernels (the reordered inverse is kept until the next inversion)."""
    torch.manual_seed(16)
    model = resnet.build("resnet8", 10)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x, y = torch.randn(4, 3, 8, 8), torch.randint(10, (4,))
    grads, kernels = {}, {}
    for key, m in (("contiguous", model), ("channels_last", last)):
        fmt = torch.channels_last if key == "channels_last" else torch.contiguous_format
        pre = Preconditioner(m, NgdConfig(dtype="fp64"))
        pre.begin(0, grad_scale=4)
        F.cross_entropy(m(x.contiguous(memory_format=fmt)), y).backward()
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        assert all(c.weight.grad.is_contiguous(memory_format=fmt) for c in convs)
        memory = [c.weight.grad.data_ptr() for c in convs]
        pre.step(0, damping=1e-2)
        assert [c.weight.grad.data_ptr() for c in convs] == memory
        grads[key] = [p.grad.clone() for p in m.parameters()]
        kernels[key] = kernel_ops(lambda pre=pre: pre.step(1, damping=1e-2, fresh={}))
        pre.close()
    assert any(g.dim() == 4 and g.shape[-1] == 3 for g in grads["contiguous"])
    assert kernels["channels_last"] == kernels["contiguous"]  # the reordered A^-1 is kept, no copies
    for a, b in zip(grads["contiguous"], grads["channels_last"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("bn_damping", "added"), [(0.2, 0.2), (0.0, 16 * 1e-3)])
def test_bn_preconditioning_uses_damped_block_inverse(bn_damping: float, added: float) -> None:
    """Two BatchNorm layers of different widths, preconditioned together: each channel by its own block,
    damped by ngd.bn_damping or, when it is 0, by 16 times the step's damping (the released system's)."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Flatten(),
        nn.Linear(3 * 4, 3),
    )  # fmt: skip
    x, y = torch.randn(5, 1, 4, 4), torch.randint(3, (5,))
    pre = Preconditioner(model, NgdConfig(dtype="fp64", bn_damping=bn_damping, exclude=("0", "2", "5")))
    assert set(pre.layers) == {"1", "3"}
    pre.begin(0, grad_scale=5)
    F.cross_entropy(model(x), y).backward()
    before = {n: torch.stack([model[n].weight.grad.clone(), model[n].bias.grad.clone()], 1) for n in (1, 3)}
    pre.step(0, damping=1e-3)
    for n in (1, 3):
        blocks, bn = pre.stats[(str(n), "F")].value, model[n]
        expected = torch.stack(
            [torch.linalg.solve(blocks[c] + added * torch.eye(2), before[n][c]) for c in range(len(blocks))]
        )
        got = torch.stack([bn.weight.grad, bn.bias.grad], 1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def kernel_ops(fn: Callable[[], object]) -> int:
    """How many operators that compute (views left out) ``fn`` runs: on a GPU, about its kernel launches."""

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_the_update_runs_a_fixed_number_of_kernels_and_bn_layers_add_none() -> None:
    """SP-NGD's extra work on a step without refresh costs host time per operator on a GPU: the update
    and the weight rescaling are multi-tensor operations (the same number of operators for 10 or 22
    layers), and all BatchNorm layers are preconditioned together (each bias-free conv layer adds its
    two matrix products, the second written straight into its gradient; each BatchNorm layer nothing)."""
    counts = {}
    for arch in ("resnet8", "resnet20"):
        torch.manual_seed(3)
        model = resnet.build(arch, 10).float()  # as the factors (this module's default dtype is fp64)
        x, y = torch.randn(4, 3, 8, 8, dtype=torch.float32), torch.randint(10, (4,))
        pre = Preconditioner(model, NgdConfig())
        pre.begin(0, grad_scale=4)
        F.cross_entropy(model(x), y).backward()
        pre.step(0, damping=1e-3)  # every inverse exists
        opt = SPNGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)
        opt.step()  # the velocities exist
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        counts[arch] = (
            len(layers),
            kernel_ops(lambda pre=pre: pre.step(1, damping=1e-3, fresh={})),
            kernel_ops(opt.step),
            kernel_ops(lambda model=model: rescale_weights(model)),
        )
        pre.close()
    (layers8, pre8, opt8, rescale8), (layers20, pre20, opt20, rescale20) = counts.values()
    assert layers20 - layers8 == 12
    assert pre20 - pre8 == 2 * (layers20 - layers8)
    assert opt8 == opt20 < 10 and rescale8 == rescale20 < 5


def test_a_refresh_step_reads_the_device_a_fixed_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU each read of a value (``float()``, ``bool()``, ``tolist()``) waits for every queued kernel.
    Refreshing every statistic reads the relative changes, the traces for the damping and the inverses'
    checks once each for all layers, and the BatchNorm blocks' failed channels once for all BatchNorm
    layers (after the checks, so it waits for nothing more): the same number of reads for 10 or 22
    conv/fc layers (and their BatchNorm layers), where the reads of one factor at a time were about a
    dozen a layer."""
    reads = {"tolist": 0, "scalar": 0}
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> object:
        reads["tolist"] += 1
        return tolist(self)

    class Scalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            reads["scalar"] += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    seen = {}
    for arch in ("resnet8", "resnet20"):
        torch.manual_seed(3)
        model = resnet.build(arch, 10).float()
        x, y = torch.randn(4, 3, 8, 8, dtype=torch.float32), torch.randint(10, (4,))
        pre = Preconditioner(model, NgdConfig())
        for step in (0, 1):  # step 1 also computes every relative change
            model.zero_grad()
            pre.begin(step, grad_scale=4)
            F.cross_entropy(model(x), y).backward()
            fresh = pre.take_factors()
            reads.update(tolist=0, scalar=0)
            with Scalars():
                report = pre.step(step, damping=1e-3, fresh=fresh)
            assert report.refreshed == len(fresh) == len(pre.stats) and report.failed == 0
        seen[arch] = dict(reads)
        pre.close()
    assert seen["resnet8"] == seen["resnet20"] == {"tolist": 4, "scalar": 0}


def test_tf32x3_adds_eight_kernels_a_layer_and_splits_each_inverse_once() -> None:
    """tf32x3 on a step without refresh: per conv/fc layer two splits of two kernels (gradient and the
    left product) and three fused products for each of the two products, instead of two products; and
    the copy back into the gradient, which fp32 writes straight into a bias-free layer's gradient. The
    inverses' splits are made once, on the first step after their inversion."""
    torch.manual_seed(3)
    model = resnet.build("resnet8", 10).float()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float32), torch.randint(10, (4,))
    counts = {}
    for precision in ("fp32", "tf32x3"):
        pre = Preconditioner(model, NgdConfig(precondition_precision=precision))
        pre.tf32 = precision == "tf32x3"  # as with tensor cores (the CPU computes the same in fp32)
        pre.begin(0, grad_scale=4)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(0, damping=1e-3)  # inverts, and (tf32x3) splits the inverses
        counts[precision] = kernel_ops(lambda pre=pre: pre.step(1, damping=1e-3, fresh={}))
        pre.close()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    bias_free = sum(m.bias is None for m in layers)
    assert counts["tf32x3"] - counts["fp32"] == 8 * len(layers) + bias_free


def test_bn_block_inverse_closed_form() -> None:
    blocks = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[float("nan"), 0.0], [0.0, 1.0]]])
    inv, bad = inverse.bn_block_inverse(blocks, 0.1)
    torch.testing.assert_close(inv[0], torch.linalg.inv(blocks[0] + 0.1 * torch.eye(2)))
    # a non-finite channel never gives NaN: its plain gradient when it has no inverse yet (not I/0.1,
    # a step 10x the gradient), else its previous inverse
    torch.testing.assert_close(inv[1], torch.eye(2))
    assert bad.tolist() == [False, True]
    previous = torch.full((2, 2, 2), 3.0)
    inv, bad = inverse.bn_block_inverse(blocks, 0.1, previous)
    assert torch.equal(inv[1], previous[1]) and bad.tolist() == [False, True]


def second_step_with_an_inf(
    model: nn.Module, x: torch.Tensor, cfg: NgdConfig, key: tuple[str, str], at: tuple[int, ...]
) -> tuple[Preconditioner, StepReport, torch.Tensor]:
    """Two steps of a Preconditioner, the second with ``inf`` at ``at`` in the statistic ``key``'s sum;
    returns it, the second step's report and ``key``'s inverse from the first step."""
    torch.manual_seed(8)
    y = torch.randint(2, (len(x),))
    pre = Preconditioner(model, cfg)
    for step in range(2):
        model.zero_grad()
        pre.begin(step, grad_scale=len(x))
        F.cross_entropy(model(x), y).backward()
        if step == 1:
            previous = pre.stats[key].inverse.clone()
            pre.capture.sums[key].total[at] = float("inf")
        report = pre.step(step, damping=1e-3)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return pre, report, previous


def test_non_finite_batchnorm_block_keeps_the_channel_s_previous_inverse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(8, 2, 4, 4)
    pre, report, previous = second_step_with_an_inf(
        model, x, NgdConfig(bn_damping=1e-4), ("1", "F"), (1, 0, 0)
    )
    assert report.failed == 1 and pre.failures["1.F"] == 1
    # the old code gave I/1e-4: a step 10^4 times the gradient
    assert torch.equal(pre.stats[("1", "F")].inverse[1], previous[1])
    assert "inverting 1.F failed for 1 of 3 channels" in caplog.text


def test_ill_conditioned_factor_is_retried_in_fp64() -> None:
    n = 9  # the 9x9 Hilbert matrix (condition ~5e11) is SPD in fp64, not numerically in fp32
    m = torch.tensor([[1.0 / (i + j + 1) for j in range(n)] for i in range(n)], dtype=torch.float32)
    assert inverse.cholesky_inverse(m) is None
    inv, how = inverse.robust_inverse(m)
    assert (
        how == "fp64" and inv is not None and inv.dtype == torch.float32 and bool(torch.isfinite(inv).all())
    )
    torch.testing.assert_close(inv, torch.linalg.inv(m.double()).float(), rtol=1e-3, atol=0.0)
    nan = torch.full((3, 3), float("nan"))
    assert inverse.robust_inverse(nan) == (None, "failed")
    assert inverse.robust_inverse(-torch.eye(3)) == (None, "failed")
    # exact zero pivots (rank-deficient, damping below fp32's and fp64's resolution) fail, not raise,
    # and the rest of the list is inverted
    singular = [torch.ones(2, 2), torch.zeros(3, 3), inverse.add_diagonal(torch.full((4, 4), 1e17), 1e-3)]
    got = inverse.robust_inverses([*singular, 2 * torch.eye(2)])
    assert [how for _, how in got] == ["failed", "failed", "failed", "ok"]
    torch.testing.assert_close(got[3][0], torch.eye(2) / 2)


def test_non_finite_factor_keeps_previous_inverse(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre, report, previous = second_step_with_an_inf(model, torch.randn(8, 3), NgdConfig(), ("0", "A"), (0, 0))
    assert report.failed == 1 and pre.failures["0.A"] == 1
    assert torch.equal(pre.stats[("0", "A")].inverse, previous)
    assert "inverting 0.A failed" in caplog.text


def test_stale_interval_doubles_and_resets() -> None:
    s = StaleInterval(threshold=0.1, max_interval=4)
    seen = []
    for step, change in [(0, math.inf), (1, 0.05), (3, 0.05), (7, 0.01), (11, 0.5), (12, 0.0)]:
        assert s.due(step) and (step == 0 or not s.due(step - 1))
        s.refreshed(step, change)
        seen.append((s.interval, s.next_step))
    assert seen == [(1, 1), (2, 3), (4, 7), (4, 11), (1, 12), (2, 14)]
    assert relative_change(torch.ones(2), torch.zeros(2)) == math.inf
    assert relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(4 / 3)


def test_skipped_statistics_cost_nothing_and_reuse_inverses() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(2, (16,))
    pre = Preconditioner(model, NgdConfig(stale_threshold=10.0, stale_max_interval=8))
    refreshed = []
    for step in range(6):
        model.zero_grad()
        armed = pre.begin(step, grad_scale=16)
        F.cross_entropy(model(x), y).backward()
        cached = {k: s.inverse for k, s in pre.stats.items()}
        report = pre.step(step, damping=1e-3)
        refreshed.append(report.refreshed)
        if not armed:
            assert not pre.capture.sums and report.inverted == 0
            assert all(pre.stats[k].inverse is cached[k] for k in cached)  # the same tensors, untouched
    # Same data every step: changes are tiny, so intervals go 1, 2, 4: refreshes at steps 0, 1, 3.
    assert refreshed == [4, 4, 0, 4, 0, 0]


def test_spngd_update_with_momentum_correction() -> None:
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = SPNGD([{"params": [w], "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    g1, g2, g3 = torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([1.0, 1.0])
    for lr, g in ((0.1, g1), (0.05, g2), (0.05, g3)):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = g.clone()
        opt.step()
    v1 = -0.1 * g1
    v2 = 0.9 * (0.05 / 0.1) * v1 - 0.05 * g2  # lr dropped: momentum scaled by lr_t / lr_{t-1}
    v3 = 0.9 * v2 - 0.05 * g3  # lr unchanged: plain momentum
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -1.0]) + v1 + v2 + v3)


def test_spngd_decoupled_weight_decay_skips_bn_and_bias() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = SPNGD(param_groups(model, 0.5), lr=0.1, momentum=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), before[0] * (1 - 0.1 * 0.5))
    assert all(
        torch.equal(p.detach(), b) for p, b in zip(list(model.parameters())[1:], before[1:], strict=True)
    )


def test_weight_rescaling() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Conv2d(1, 8, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # norm sqrt(6) > sqrt(2 * 2) = 2
        model[0].bias.fill_(5.0)
        model[1].weight.fill_(0.5)  # norm sqrt(8 * 0.25) = sqrt(2) < sqrt(16)
    rescale_weights(model)
    assert float(torch.linalg.vector_norm(model[0].weight.detach())) == pytest.approx(2.0)
    torch.testing.assert_close(model[0].weight.detach(), torch.full((2, 3), 2 / math.sqrt(6)))
    assert torch.equal(model[0].bias.detach(), torch.full((2,), 5.0))
    assert torch.equal(model[1].weight.detach(), torch.full((8, 1, 1, 1), 0.5))


def test_damping_schedule() -> None:
    assert damping_at(1e-3, 0.0, 50, 100) == 1e-3
    assert damping_at(1e-2, 1e-4, 0, 101) == pytest.approx(1e-2)
    assert damping_at(1e-2, 1e-4, 50, 101) == pytest.approx(1e-3)
    assert damping_at(1e-2, 1e-4, 100, 101) == pytest.approx(1e-4)


def test_optim_config_accepts_spngd() -> None:
    assert OptimConfig(name="spngd", weight_rescaling=True).name == "spngd"


def test_running_average_weights_the_new_value() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 2))
    pre = Preconditioner(model, NgdConfig(ema_decay=0.25, dtype="fp64"))
    values = []
    for step in range(2):
        x, y = torch.randn(8, 3), torch.randint(2, (8,))
        model.zero_grad()
        pre.begin(step, grad_scale=8)
        F.cross_entropy(model(x), y).backward()
        a = torch.cat([x, torch.ones(8, 1)], dim=1)
        values.append(a.T @ a / 8)
        pre.step(step, damping=1e-3)
    torch.testing.assert_close(pre.stats[("0", "A")].value, 0.75 * values[0] + 0.25 * values[1])


def test_factors_stay_fp32_with_half_precision_activations() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    x, y = torch.randn(8, 6, dtype=torch.bfloat16), torch.randint(3, (8,))
    c = curvature(model, x, y, dtype=torch.float32)["0"]
    assert c.A is not None and c.G is not None
    assert c.A.dtype == torch.float32 and c.G.dtype == torch.float32
    a = torch.cat([x.float(), torch.ones(8, 1, dtype=torch.float32)], dim=1)
    torch.testing.assert_close(c.A, a.T @ a / 8, rtol=1e-6, atol=1e-6)  # inputs exact in bf16 -> fp32
