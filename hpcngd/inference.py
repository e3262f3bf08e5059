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

from hpcngd import config
from hpcngd.checkpoint import Reader, followed
from hpcngd.config import Config, ModelConfig
from hpcngd.data import build_datasets, check_loader_device, evaluation_batches
from hpcngd.device import bind, to_device
from hpcngd.errors import UserError
from hpcngd.models.resnet import build
from hpcngd.precision import autocast

TIMED_TYPES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# The run-file keys an evaluation depends on: a difference from the training run's is noted (model.arch
# and model.num_classes must match: load_model refuses others).
EVAL_KEYS = (
    *(f"data.{k}" for k in ("source", "path", "val_list", "image_size", "val_resize", "mean", "std")),
    "run.precision",
    "run.channels_last",
)


def load_model(path: Path, cfg: ModelConfig, device: torch.device) -> tuple[nn.Module, str | None]:
    """The run file's ``[model]`` with the weights of checkpoint ``path``, on ``device``, in eval mode,
    and the run file stored with them (None in a file without one).

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
        model = build(cfg.arch, cfg.num_classes, cfg.zero_init_residual, cfg.init)
        tensors = model.state_dict()
        stored_names = (
            {n.removeprefix("model/") for n in reader.names("model")} if reader.has("model") else set()
        )
        if differ := sorted(stored_names ^ set(tensors)):
            side = "lacks" if differ[0] in tensors else "has an extra"
            raise reader.fail(
                f"{side} model/{differ[0]} for model.arch = {cfg.arch!r} ({len(differ)} differ)"
            )
        with torch.no_grad():
            for name, t in tensors.items():
                array = reader.array(f"model/{name}")
                if array.shape != tuple(t.shape):
                    raise reader.fail(
                        f"model/{name} has shape {list(array.shape)}; model.arch = {cfg.arch!r} needs "
                        f"{list(t.shape)}"
                    )
                t.copy_(torch.from_numpy(array))
        stored = reader.attrs.get("run_file")
    return model.to(device).eval(), stored if isinstance(stored, str) else None


def evaluation_changes(stored: str | None, cfg: Config, checkpoint: Path) -> list[str]:
    """Notes on how ``cfg`` (the evaluation's settings) differs from the training run's ``stored`` run
    file in what evaluation depends on (:data:`EVAL_KEYS`)."""
    if stored is None:
        return []
    try:
        saved = config.loads(stored, f"run file stored in {checkpoint}")
    except config.ConfigError as exc:  # another hpcngd version's keys, say
        return [f"the checkpoint's run file does not load here, so no comparison: {exc}"]
    changed = [
        f"{key} {old!r} -> {new!r}" for key, old, new in config.differences(saved, cfg) if key in EVAL_KEYS
    ]
    return [f"evaluated with settings other than the training run's: {', '.join(changed)}"] if changed else []


@dataclass
class Accuracy:
    """Validation figures at one precision (loss is NaN or inf when some logits are); the sums are what
    ranks add up (the trainer's evaluation), the means what one process reports."""

    precision: str
    images: int = 0
    loss_sum: float = 0.0
    top1_hits: int = 0
    top5_hits: int = 0
    loss: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    nonfinite_logits: int = 0  # logit values that are inf or NaN (fp16 overflow)
    nonfinite_images: int = 0  # images with at least one


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], precision: str, device: torch.device
) -> Accuracy:
    """Mean cross-entropy, top-1 and top-5 (%) of ``model`` over ``batches``, the forward under autocast."""
    acc = Accuracy(precision)
    for x, y in batches:
        with autocast(precision, device):
            logits = model(x)
        bad = ~torch.isfinite(logits)
        acc.nonfinite_logits += int(bad.sum())
        acc.nonfinite_images += int(bad.any(dim=1).sum())
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        # The loss in fp32, as training's evaluation computes it.
        acc.loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        acc.top1_hits += int(hits[:, 0].sum())
        acc.top5_hits += int(hits.any(dim=1).sum())
        acc.images += len(y)
    n = max(acc.images, 1)
    acc.loss, acc.top1, acc.top5 = acc.loss_sum / n, 100 * acc.top1_hits / n, 100 * acc.top5_hits / n
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
    """Hooks timing :func:`timed_layers` of ``model`` (ms); a context manager that removes them again.

    ``sync`` waits for the device's queued work (``torch.cuda.synchronize``); None on the CPU, which
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
    rows: list[dict[str, Any]]  # per timed layer in forward order: name, type, shape, calls, ms
    forward_ms: float  # the whole forward, without hooks


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


def compare(fp32: Latency, low: Latency) -> dict[str, Any]:
    """fp32 against ``low`` as ``--json`` writes it: per-layer rows and totals, with speed-ups."""

    def times(a: float, b: float) -> dict[str, float]:
        return {"fp32_ms": a, "low_ms": b, "speedup": a / b if b > 0 else math.inf}

    layers = [
        {**{k: v for k, v in a.items() if k != "ms"}, **times(a["ms"], b["ms"])}
        for a, b in zip(fp32.rows, low.rows, strict=True)
    ]
    sums = (sum(r["ms"] for r in fp32.rows), sum(r["ms"] for r in low.rows))
    return {
        "layers": layers,
        "total": {"layers": times(*sums), "forward": times(fp32.forward_ms, low.forward_ms)},
    }


def format_accuracy(acc: Accuracy) -> str:
    line = f"{acc.precision}: top1 {acc.top1:.2f}% top5 {acc.top5:.2f}% loss {acc.loss:.4f}"
    line += f" ({acc.images} images)"
    if acc.nonfinite_logits:
        line += f"; {acc.nonfinite_logits} non-finite logits in {acc.nonfinite_images} image(s)"
    return line


def format_latency(comparison: dict[str, Any], precision: str) -> str:
    """The per-layer table of :func:`compare`, then the sum of the layers and the whole forward."""
    cells = "{fp32_ms:>9.3f} {low_ms:>9.3f} {speedup:>7.2f}x"
    lines = [
        f"{'layer':<22} {'type':<18} {'output shape':<20} {'fp32 ms':>9} {precision + ' ms':>9} speed-up"
    ]
    for r in comparison["layers"]:
        shape = "x".join(map(str, r["shape"])) + (f" (x{r['calls']})" if r["calls"] > 1 else "")
        lines.append(f"{r['name']:<22} {r['type']:<18} {shape:<20} " + cells.format(**r))
    total = comparison["total"]
    lines.append(f"{'sum of layers':<62} " + cells.format(**total["layers"]))
    lines.append(f"{'whole forward (no hooks)':<62} " + cells.format(**total["forward"]))
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = (line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return next(names, platform.machine() or "cpu")


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
    check_loader_device(cfg.data, str(device))
    checkpoint = followed(checkpoint)  # a `latest` pointer: say which checkpoint it named
    model, stored = load_model(checkpoint, cfg.model, device)
    notes = evaluation_changes(stored, cfg, checkpoint)  # --precision is asked for: not noted
    fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)  # type: ignore[call-overload]
    _, val_set = build_datasets(cfg.data, cfg.model.num_classes, cfg.run.seed)
    batch_size = batch_size or cfg.data.micro_batch_size or min(cfg.data.batch_size, 256)
    batch_size = min(batch_size, len(val_set)) or batch_size  # what a batch holds (the timed one too)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        found = evaluation_batches(cfg.data, val_set, batch_size, rank=0, world_size=1)
        for x, y in itertools.islice(found, max_batches or None):
            yield to_device(x, y, device, cfg.run.channels_last)  # as training feeds them

    out: dict[str, Any] = {"checkpoint": str(checkpoint), "arch": cfg.model.arch, "precision": precision}
    out.update(device=str(device), device_name=device_name(device), threads=torch.get_num_threads())
    out.update(
        val_images=len(val_set), batch_size=batch_size, max_batches=max_batches, torch=torch.__version__
    )
    print(
        "hpcngd eval: {checkpoint} ({arch}) on {device} ({device_name}, {threads} thread(s)) | {val_images} "
        "val images, batch {batch_size} | torch {torch}".format(**out)
        + (f" | first {max_batches} batch(es) only" if max_batches else "")
    )
    for note in notes:
        print(f"note: {note}")
    out["notes"] = notes
    precisions = dict.fromkeys(["fp32", precision] if per_layer else [precision])  # ordered, no repeat
    accuracy = {p: evaluate(model, batches(), p, device) for p in precisions}
    print("\n".join(format_accuracy(acc) for acc in accuracy.values()))
    out["accuracy"] = {p: asdict(a) for p, a in accuracy.items()}
    if per_layer:
        first = next(batches(), None)
        if first is None:
            raise UserError("--per-layer: the validation set is empty, there is no batch to time")
        images = first[0]
        fp32, low = (layer_latency(model, images, p, device, repeats) for p in ("fp32", precision))
        change = accuracy[precision].top1 - accuracy["fp32"].top1
        comparison = compare(fp32, low)
        print(f"per-layer forward latency, batch of {len(images)}, median of {repeats}:")
        print(format_latency(comparison, precision))
        print(f"top-1 change {precision} - fp32: {change:+.2f} percentage points")
        out.update(repeats=repeats, top1_change_pp=change, **comparison)
    if json_path is not None:
        try:
            # Strict JSON has no NaN or inf: they become null (the non-finite counts say why).
            strict = json.loads(json.dumps(out), parse_constant=lambda _: None)
            json_path.write_text(json.dumps(strict, indent=1, allow_nan=False) + "\n")
        except OSError as exc:
            raise UserError(f"--json {json_path}: cannot write: {exc.strerror or exc}") from None
