"""``hpcngd eval``: a checkpoint's model evaluated at fp32, fp16 or bf16, and timed layer by layer. No MPI.

One process, on the device ``run.device`` selects. The weights stay fp32 and only the forward runs
under autocast, as in training (:mod:`hpcngd.precision`), so the figures are what a low-precision
forward costs and gains for the model a run trained. fp16 has a narrow range: the logits of a barely
trained model may overflow, so :class:`Accuracy` counts non-finite logits instead of hiding them.

Per-layer latency (:class:`LayerTimer`): a forward pre-hook and a post-hook on every timed layer (the
leaves that own parameters, i.e. Conv2d, BatchNorm2d and Linear here, plus ReLU and pooling leaves)
read a clock between device synchronisations, so a layer's time holds its own kernels only. A layer
module called more than once per forward (a block's one ReLU is called twice) adds its calls up. The
sum of the layers leaves out what runs outside them (residual adds, flatten) and adds the hooks' and
synchronisations' own cost, so the whole forward is also timed without hooks.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hpcngd.checkpoint import Reader
from hpcngd.config import Config, ModelConfig
from hpcngd.data import build_datasets, evaluation_batches
from hpcngd.device import bind
from hpcngd.errors import UserError
from hpcngd.models.resnet import build
from hpcngd.precision import autocast

TIMED_TYPES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def load_model(path: Path, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """The run file's ``[model]`` with the weights of checkpoint ``path``, on ``device``, in eval mode.

    Raises:
        CheckpointError: the file is unreadable or holds another model (header arch or num_classes,
            a tensor's name or shape); the one-line message names the file and the key.
    """
    with Reader(path) as reader:
        for key in ("arch", "num_classes"):
            if (stored := reader.attrs.get(key)) != (wanted := getattr(cfg, key)):
                raise reader.fail(
                    f"holds a model with {key} = {stored!r}; the run file has model.{key} = {wanted!r}"
                )
        model = build(cfg.arch, cfg.num_classes, cfg.zero_init_residual)
        tensors = model.state_dict()
        stored_names = (
            {n.removeprefix("model/") for n in reader.names("model")} if reader.has("model") else set()
        )
        if lacking := sorted(set(tensors) - stored_names):
            raise reader.fail(f"lacks model/{lacking[0]} ({len(lacking)} tensor(s) of {cfg.arch} missing)")
        if extra := sorted(stored_names - set(tensors)):
            raise reader.fail(f"holds model/{extra[0]}, which model.arch = {cfg.arch!r} does not have")
        with torch.no_grad():
            for name, t in tensors.items():
                array = reader.array(f"model/{name}")
                if array.shape != tuple(t.shape):
                    raise reader.fail(
                        f"model/{name} has shape {list(array.shape)}; model.arch = {cfg.arch!r} needs {list(t.shape)}"
                    )
                t.copy_(torch.from_numpy(array))
    return model.to(device).eval()


def to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch as the model takes it: fp32 (DALI may hand fp16; autocast casts), in its memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device=device, dtype=torch.float32, memory_format=fmt)


@dataclass
class Accuracy:
    """Validation figures at one precision (loss is NaN or inf when some logits are)."""

    precision: str
    images: int = 0
    loss: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    nonfinite_logits: int = 0  # logit values that are inf or NaN (fp16 overflow)
    nonfinite_images: int = 0  # images with at least one


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    precision: str,
    device: torch.device,
    channels_last: bool = False,
) -> Accuracy:
    """Mean cross-entropy, top-1 and top-5 (%) of ``model`` over ``batches``, the forward under autocast."""
    acc, sums = Accuracy(precision), [0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits
    for x, y in batches:
        x, y = to_device(x, device, channels_last), y.to(device)
        with autocast(precision, device):
            logits = model(x)
        bad = ~torch.isfinite(logits)
        acc.nonfinite_logits += int(bad.sum())
        acc.nonfinite_images += int(bad.any(dim=1).sum())
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        # The loss in fp32, as training's evaluation computes it.
        sums[0] += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        sums[1] += float(hits[:, 0].sum())
        sums[2] += float(hits.any(dim=1).sum())
        acc.images += len(y)
    n = max(acc.images, 1)
    acc.loss, acc.top1, acc.top5 = sums[0] / n, 100 * sums[1] / n, 100 * sums[2] / n
    return acc


def timed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers :class:`LayerTimer` times: leaves that own parameters, ReLU and pooling leaves."""
    return {
        name: m
        for name, m in model.named_modules()
        if next(m.children(), None) is None
        and (next(m.parameters(recurse=False), None) is not None or isinstance(m, TIMED_TYPES))
    }


class LayerTimer:
    """Forward hooks timing each of :func:`timed_layers` (ms); a context manager that removes them again.

    Args:
        model: the model whose layers are timed.
        sync: waits for the device's queued work (``torch.cuda.synchronize``); None on the CPU, which
            computes synchronously.
    """

    def __init__(self, model: nn.Module, sync: Callable[[], None] | None = None) -> None:
        self.layers = timed_layers(model)
        self.sync = sync or (lambda: None)
        self.ms: dict[str, float] = dict.fromkeys(self.layers, 0.0)  # since the last take()
        self.shapes: dict[str, tuple[int, ...]] = {}  # output shape of each layer's first call
        self.calls: Counter[str] = Counter()  # calls since the hooks were set
        self._start: dict[str, float] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerTimer:
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(partial(self._pre, name)))
            self._handles.append(m.register_forward_hook(partial(self._post, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.sync()  # the layers before this one are not its time
        self._start[name] = time.perf_counter()

    def _post(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self.sync()
        self.ms[name] += 1e3 * (time.perf_counter() - self._start.pop(name))
        self.shapes.setdefault(name, tuple(output.shape))
        self.calls[name] += 1

    def take(self) -> dict[str, float]:
        """Milliseconds per layer since the last call (every timed layer; 0.0 if it did not run)."""
        ms, self.ms = self.ms, dict.fromkeys(self.layers, 0.0)
        return ms


@dataclass
class Latency:
    """Medians over repeated forwards of one batch at one precision, in milliseconds."""

    precision: str
    rows: list[dict[str, Any]]  # per layer in forward order: name, type, shape, calls, ms
    forward_ms: float  # the whole forward, without hooks

    @property
    def layers_ms(self) -> float:
        return sum(r["ms"] for r in self.rows)


@torch.no_grad()
def layer_latency(
    model: nn.Module, images: Tensor, precision: str, device: torch.device, repeats: int
) -> Latency:
    """Time ``model``'s forward on ``images`` under ``precision``: layer by layer (hooked), then whole."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward() -> float:
        sync()
        t0 = time.perf_counter()
        with autocast(precision, device):  # one context a pass: the weight casts are paid every pass
            model(images)
        sync()
        return 1e3 * (time.perf_counter() - t0)

    forward()  # warm-up: first-call costs (oneDNN primitives, cuDNN algorithm choice) are not latency
    per_layer: dict[str, list[float]] = {}
    with LayerTimer(model, sync) as timer:
        for _ in range(repeats):
            forward()
            for name, ms in timer.take().items():
                per_layer.setdefault(name, []).append(ms)
    whole = statistics.median(forward() for _ in range(repeats))
    rows = [
        {
            "name": name,
            "type": type(m).__name__,
            "shape": list(timer.shapes.get(name, ())),
            "calls": timer.calls[name] // repeats,
            "ms": statistics.median(per_layer[name]),
        }
        for name, m in timer.layers.items()
    ]
    return Latency(precision, rows, whole)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def latency_rows(fp32: Latency, low: Latency) -> list[dict[str, Any]]:
    """The per-layer comparison: name, type, output shape, calls, fp32_ms, low_ms, speedup."""
    return [
        {
            **{k: v for k, v in a.items() if k != "ms"},
            "fp32_ms": a["ms"],
            "low_ms": b["ms"],
            "speedup": _ratio(a["ms"], b["ms"]),
        }
        for a, b in zip(fp32.rows, low.rows, strict=True)
    ]


def format_accuracy(acc: Accuracy) -> str:
    line = f"{acc.precision}: top1 {acc.top1:.2f}% top5 {acc.top5:.2f}% loss {acc.loss:.4f} ({acc.images} images)"
    if acc.nonfinite_logits:
        line += f"; {acc.nonfinite_logits} non-finite logits in {acc.nonfinite_images} image(s)"
    return line


def format_latency(fp32: Latency, low: Latency) -> str:
    """The per-layer table, then the sum of the layers and the whole forward without hooks."""
    lines = [
        f"{'layer':<22} {'type':<18} {'output shape':<20} {'fp32 ms':>9} {low.precision + ' ms':>9} speed-up"
    ]
    for r in latency_rows(fp32, low):
        shape = "x".join(map(str, r["shape"])) + (f" (x{r['calls']})" if r["calls"] > 1 else "")
        lines.append(
            f"{r['name']:<22} {r['type']:<18} {shape:<20} {r['fp32_ms']:>9.3f} {r['low_ms']:>9.3f} "
            f"{r['speedup']:>7.2f}x"
        )
    for label, a, b in (
        ("sum of layers", fp32.layers_ms, low.layers_ms),
        ("whole forward (no hooks)", fp32.forward_ms, low.forward_ms),
    ):
        lines.append(f"{label:<62} {a:>9.3f} {b:>9.3f} {_ratio(a, b):>7.2f}x")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _finite_or_null(value: Any) -> Any:
    """Strict JSON has no NaN or inf: they become null (the non-finite counts say why)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def study(
    cfg: Config,
    checkpoint: Path,
    precision: str,
    per_layer: bool = False,
    batch_size: int = 0,
    max_batches: int = 0,
    repeats: int = 5,
    json_path: Path | None = None,
) -> None:
    """What ``hpcngd eval`` prints, and writes to ``json_path`` (None: nowhere).

    Args:
        cfg: the run file; its [model] must match the checkpoint, its [data] gives the validation set.
        checkpoint: the checkpoint file.
        precision: "fp32", "fp16" or "bf16" (autocast; the weights stay fp32).
        per_layer: also evaluate at fp32, and time every layer at both precisions on the first batch.
        batch_size: images a forward (0: ``data.micro_batch_size``, else ``data.batch_size`` up to 256:
            one process has no world size to divide the global batch by).
        max_batches: evaluate on the first this many batches only (0: all).
        repeats: timed forwards per precision (medians are reported), after one warm-up forward.
    """
    device = bind(cfg.run.device, 0)
    model = load_model(checkpoint, cfg.model, device)
    if cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
    batch_size = batch_size or cfg.data.micro_batch_size or min(cfg.data.batch_size, 256)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        found = evaluation_batches(cfg.data, val_set, batch_size, rank=0, world_size=1)
        return itertools.islice(found, max_batches or None)

    print(
        f"hpcngd eval: {checkpoint} ({cfg.model.arch}) on {device} ({device_name(device)}, "
        f"{torch.get_num_threads()} thread(s)) | {len(val_set)} val images, batch {batch_size}"
        + (f", first {max_batches} batch(es)" if max_batches else "")
        + f" | torch {torch.__version__}"
    )
    precisions = dict.fromkeys(["fp32", precision] if per_layer else [precision])  # ordered, no repeat
    accuracy = {p: evaluate(model, batches(), p, device, cfg.run.channels_last) for p in precisions}
    print("\n".join(format_accuracy(acc) for acc in accuracy.values()))
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "arch": cfg.model.arch,
        "precision": precision,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "torch": torch.__version__,
        "accuracy": {p: asdict(a) for p, a in accuracy.items()},
    }
    if per_layer:
        first = next(batches(), None)
        if first is None:
            raise UserError("--per-layer: the validation set is empty, there is no batch to time")
        images = to_device(first[0], device, cfg.run.channels_last)
        fp32, low = (layer_latency(model, images, p, device, repeats) for p in ("fp32", precision))
        change = accuracy[precision].top1 - accuracy["fp32"].top1
        print(f"per-layer forward latency, batch of {len(images)}, median of {repeats}:")
        print(format_latency(fp32, low))
        print(f"top-1 change {precision} - fp32: {change:+.2f} percentage points")
        out.update(repeats=repeats, top1_change_pp=change, layers=latency_rows(fp32, low))
        out["total"] = {
            "layers_fp32_ms": fp32.layers_ms,
            "layers_low_ms": low.layers_ms,
            "layers_speedup": _ratio(fp32.layers_ms, low.layers_ms),
            "forward_fp32_ms": fp32.forward_ms,
            "forward_low_ms": low.forward_ms,
            "forward_speedup": _ratio(fp32.forward_ms, low.forward_ms),
        }
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(_finite_or_null(out), indent=1, allow_nan=False) + "\n")
        except OSError as exc:
            raise UserError(f"--json {json_path}: cannot write: {exc.strerror or exc}") from None
