"""Run files: a frozen dataclass tree read from TOML.

Every section is a frozen dataclass; every key is a field whose metadata says what is allowed
(``choices``, ``ge``/``gt``/``le``/``lt``) and documents it (``help``); the machinery is in
:mod:`hpcngd.schema`. Construction validates, so a ``Config`` that exists is a valid one. Any
problem raises :class:`ConfigError` with one line that names ``section.key``, the bad value and what
is allowed.

Checks that need the world size (the batch must split evenly over ranks) live in
:func:`check_world_size`, called by the driver before any rank computes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcngd.errors import ConfigError, InvalidToml
from hpcngd.schema import Section, opt, show, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

MODEL_ARCHS = ("resnet8", "resnet20", "resnet32", "resnet18", "resnet34", "resnet50", "resnet50d")
# How many times each architecture halves an image's side (rounding up) before its last BatchNorm: at
# image_size <= 2 ** that, the last map is 1x1 (tests/unit/test_models.py checks it against the models).
MODEL_HALVINGS = dict.fromkeys(MODEL_ARCHS[:3], 2) | dict.fromkeys(MODEL_ARCHS[3:], 5)


@dataclass(frozen=True)
class RunConfig(Section):
    """[run]: what the run is called, where it writes, how long it lasts."""

    SECTION = "run"
    name: str = opt("run", "Run name; the run directory is output_dir/name.")
    output_dir: str = opt("out", "Folder that holds run directories (relative to the working dir).")
    seed: int = opt(0, "Seed of model init, data order and augmentation.", ge=0, le=2**31 - 1)
    epochs: int = opt(1, "Number of training epochs.", ge=1)
    max_steps: int = opt(0, "Stop after this many steps in all (0 = run every epoch).", ge=0)
    threads: int = opt(0, "Torch threads per rank (0 = OMP_NUM_THREADS or cores / ranks on this host).", ge=0)
    device: str = opt(
        "auto",
        "Where each rank computes: cuda (a GPU of its node, near its cores), cpu, or auto (cuda if present).",
        choices=("auto", "cpu", "cuda"),
    )
    precision: str = opt(
        "fp32",
        "Forward/backward precision: fp32, or autocast to fp16 (dynamic loss scaling) or bf16; weights, "
        "optimizer state and SP-NGD factors stay fp32.",
        choices=("fp32", "fp16", "bf16"),
    )
    channels_last: bool = opt(False, "Model and batches in channels-last memory format (NHWC strides).")
    loss_scale_init: float = opt(65536.0, "fp16: initial loss scale.", gt=0.0)
    loss_scale_growth_interval: int = opt(
        2000, "fp16: double the loss scale after this many steps without overflow.", ge=1
    )
    lock_renew_s: float = opt(
        30.0,
        "Seconds between renewals of <run dir>/run.lock (and <checkpoint.dir>/run.lock when elsewhere), "
        "which keeps a second run out of this run's folders: 0 (no lock) or 1 to 300. A run finding "
        "another's lock watches it for 3 of its renewals and takes it over if it is not renewed (at once "
        "if its process is gone: same machine, or a Slurm requeue).",
        ge=0.0,
        le=300.0,
    )

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name) or self.name in (".", ".."):
            self.fail(
                "name",
                "must be non-empty, use only letters, digits, '.', '_' and '-', and not be '.' or '..'",
            )
        if 0 < self.lock_renew_s < 1:
            self.fail("lock_renew_s", "must be 0 (no lock) or 1 to 300 seconds")


@dataclass(frozen=True)
class ModelConfig(Section):
    """[model]: the network."""

    SECTION = "model"
    arch: str = opt("resnet20", "Architecture.", choices=MODEL_ARCHS)
    num_classes: int = opt(10, "Number of classes (must match the data set).", ge=2)
    zero_init_residual: bool = opt(False, "Zero-init the last BN gamma of each residual block.")
    init: str = opt(
        "fan_out",
        "Weight initialization: fan_out (torchvision's: Kaiming-normal fan-out convs, torch's default "
        "Linear) or fan_in (the released SP-NGD system's: He-normal fan-in convs, fc weights N(0, 2/c_in) "
        "and bias 0, so every conv/fc weight starts at the norm sqrt(2 c_out) that optim.weight_rescaling "
        "caps).",
        choices=("fan_out", "fan_in"),
    )


@dataclass(frozen=True)
class DataConfig(Section):
    """[data]: where images come from and how batches are formed."""

    SECTION = "data"
    source: str = opt(
        "synthetic",
        "Data source: folder (Pillow decoding in worker processes), dali (NVIDIA DALI: pip install "
        "hpcngd[dali]), auto (dali when it is installed, else folder) or synthetic (random tensors).",
        choices=("synthetic", "folder", "dali", "auto"),
    )
    path: str = opt("", "Root holding train/<class>/*.jpg and val/<class>/*.jpg (folder, dali, auto).")
    train_list: str = opt(
        "", "File list instead of the train/ tree: lines 'relative/path label', relative to data.path."
    )
    val_list: str = opt("", "File list instead of the val/ tree (same format as data.train_list).")
    dali_device: str = opt(
        "cpu",
        "DALI: decode and augment on the cpu, or on the gpu (mixed nvJPEG decoder).",
        choices=("cpu", "gpu"),
    )
    dali_fp16: bool = opt(False, "DALI: output float16 images (the trainer casts to the model's dtype).")
    image_size: int = opt(32, "Training crop and validation crop size in pixels.", ge=8, le=2048)
    val_resize: int = opt(
        0,
        "Validation: shorter side resized to this (0 = image_size / 0.875; else >= image_size).",
        ge=0,
        le=4096,
    )
    batch_size: int = opt(128, "Global mini-batch: images per step over all ranks.", ge=1)
    micro_batch_size: int = opt(
        0,
        "Images per forward pass on a rank (also the BatchNorm batch); the rest is accumulated. "
        "0 = batch_size / world size. Fix it to make each step and the BatchNorm statistics the same "
        "at any rank count.",
        ge=0,
    )
    workers: int = opt(
        2, "Decoding worker processes per rank (folder; 0 = in-process); DALI threads (dali; 0 = 1).", ge=0
    )
    crop_scale: tuple[float, ...] = opt((0.08, 1.0), "Random resized crop area range.", gt=0.0, le=1.0)
    crop_ratio: tuple[float, ...] = opt((3 / 4, 4 / 3), "Random resized crop aspect range.", gt=0.0)
    flip: bool = opt(True, "Random horizontal flip in training.")
    mean: tuple[float, ...] = opt((0.485, 0.456, 0.406), "Per-channel mean for normalization.")
    std: tuple[float, ...] = opt((0.229, 0.224, 0.225), "Per-channel std for normalization.", gt=0.0)
    mixup_alpha: float = opt(
        0.0,
        "Running mixup: each image mixed with the previous step's mixed image at its position, lambda ~ "
        "Beta(alpha, alpha) drawn per image (0 = off); soft targets go into the loss.",
        ge=0.0,
    )
    random_erasing: float = opt(
        0.0, "Probability of random erasing per image, after mixup (0 = off).", ge=0.0, le=1.0
    )
    erasing_area: tuple[float, ...] = opt(
        (0.02, 0.25), "Random erasing: area fraction range.", gt=0.0, lt=1.0
    )
    erasing_aspect: tuple[float, ...] = opt(
        (0.3, 1.0), "Random erasing: aspect (height / width) range, or its inverse half of the time.", gt=0.0
    )
    synthetic_train_samples: int = opt(1024, "Training set size for source = synthetic.", ge=1)
    synthetic_val_samples: int = opt(256, "Validation set size for source = synthetic.", ge=0)

    def check(self) -> None:
        if self.source != "synthetic" and not self.path:
            self.fail("path", f'is required when data.source = "{self.source}"')
        if self.source == "synthetic" and (self.train_list or self.val_list):
            self.fail(
                "train_list" if self.train_list else "val_list", 'needs data.source = "folder" or "dali"'
            )
        for key in ("crop_scale", "crop_ratio", "erasing_area", "erasing_aspect"):
            pair = getattr(self, key)
            if len(pair) != 2 or pair[0] > pair[1]:
                self.fail(key, "must be [low, high] with low <= high")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                self.fail(key, "must have 3 values (R, G, B)")
        if 0 < self.val_resize < self.image_size:
            self.fail("val_resize", f"must be 0 or >= data.image_size = {self.image_size} (the center crop)")
        if self.micro_batch_size > self.batch_size:
            self.fail("micro_batch_size", f"must be <= data.batch_size = {self.batch_size}")


@dataclass(frozen=True)
class OptimConfig(Section):
    """[optim]: update rule and learning-rate schedule (epochs may be fractional)."""

    SECTION = "optim"
    name: str = opt(
        "sgd",
        "Optimizer: sgd (momentum SGD) or spngd (SP-NGD: preconditioned by [ngd], v <- m v - lr g, "
        "w <- w + v, momentum corrected when lr drops).",
        choices=("sgd", "spngd"),
    )
    lr: float = opt(0.1, "Peak learning rate (for the global batch; no automatic scaling).", gt=0.0)
    momentum: float = opt(0.9, "Momentum.", ge=0.0, lt=1.0)
    nesterov: bool = opt(False, "Nesterov momentum.")
    weight_decay: float = opt(
        5e-5,
        "Weight decay of conv/fc weights (never BN or bias): L2 in the gradient for sgd, decoupled "
        "(w <- w - lr wd w) for spngd.",
        ge=0,
    )
    weight_rescaling: bool = opt(
        False, "After each update, scale every conv/fc weight with norm > sqrt(2 c_out) down to it."
    )
    label_smoothing: float = opt(0.0, "Label smoothing of the cross-entropy.", ge=0.0, lt=1.0)
    schedule: str = opt("poly", "LR shape.", choices=("constant", "poly", "cosine", "step"))
    warmup_epochs: float = opt(0.0, "Linear warmup from warmup_init_lr to lr.", ge=0.0)
    warmup_init_lr: float = opt(0.0, "LR at step 0 when warmup_epochs > 0.", ge=0.0)
    e_start: float = opt(
        0.0,
        "poly: constant lr until this epoch (below warmup_epochs the rate drops at the warmup's end).",
        ge=0.0,
    )
    e_end: float = opt(0.0, "poly: lr reaches 0 at this epoch (0 = end of the run).", ge=0.0)
    power: float = opt(2.0, "poly: exponent.", gt=0.0)
    min_lr: float = opt(0.0, "cosine: final lr.", ge=0.0)
    milestones: tuple[float, ...] = opt((), "step: epochs at which lr is multiplied by gamma.", ge=0)
    gamma: float = opt(0.1, "step: factor at each milestone.", gt=0.0, le=1.0)

    def check(self) -> None:
        if self.nesterov and self.momentum == 0.0:
            self.fail("nesterov", "needs optim.momentum > 0")
        if self.nesterov and self.name == "spngd":
            self.fail("nesterov", 'is not part of the SP-NGD update (optim.name = "spngd")')
        if self.e_end and self.e_end <= self.e_start:
            self.fail("e_end", f"must be > optim.e_start = {self.e_start} (or 0 for the end of the run)")
        if list(self.milestones) != sorted(self.milestones):
            self.fail("milestones", "must be increasing")
        if self.warmup_epochs and self.warmup_init_lr > self.lr:
            self.fail("warmup_init_lr", f"must be <= optim.lr = {self.lr}")


@dataclass(frozen=True)
class NgdConfig(Section):
    """[ngd]: SP-NGD curvature, damping and stale statistics (used when optim.name = "spngd")."""

    SECTION = "ngd"
    fisher: str = opt(
        "empirical",
        "Fisher: empirical (loss gradients; no extra pass) or mc (labels sampled from the model; "
        "one extra backward on refresh steps).",
        choices=("empirical", "mc"),
    )
    damping: float = opt(1e-3, "Tikhonov damping lambda of the Kronecker factors (pi-corrected).", gt=0.0)
    damping_end: float = opt(
        0.0, "Damping at the end of the run, reached geometrically from ngd.damping (0 = constant).", ge=0.0
    )
    bn_damping: float = opt(
        0.0,
        "Damping of the unit-wise BatchNorm blocks (0 = 16 x ngd.damping, following its schedule: the "
        "released system's BatchNorm damping, its stab_coeff 16).",
        ge=0.0,
    )
    ema_decay: float = opt(
        1.0, "Running average of factors: weight on the new value (1 = no average).", gt=0.0, le=1.0
    )
    stale_threshold: float = opt(
        0.0,
        "Stale statistics: a relative change below this doubles the refresh interval (0 = every step).",
        ge=0.0,
    )
    stale_max_interval: int = opt(20, "Stale statistics: longest refresh interval in steps.", ge=1)
    exclude: tuple[str, ...] = opt((), "Layer name patterns (fnmatch) left unpreconditioned, e.g. fc.")
    dtype: str = opt("fp32", "Precision of factors and inverses.", choices=("fp32", "fp64"))
    precondition_precision: str = opt(
        "fp32",
        "Products G^-1 dW A^-1 of fp32 factors on a GPU with TF32 (compute capability >= 8.0): fp32 "
        "units; tf32 (tensor cores, inputs rounded to 10 mantissa bits: errors up to 16% where the product "
        "cancels); or tf32x3 (each operand split in two TF32 parts, three tensor-core products: about "
        "fp32's accuracy; keeps the inverses' splits, twice their memory). Elsewhere always fp32.",
        choices=("fp32", "tf32", "tf32x3"),
    )
    compile_bn: bool = opt(
        False,
        "Compute the BatchNorm statistic with torch.compile: fused reductions that read the captured input "
        "twice and its gradient once and write no copy (ResNet-50's, 16 images, CPU: 7x faster), compiled "
        "at the first refresh (about 20 s in a fresh cache, then reused). A compiler that fails falls back "
        "to the eager form with a warning. Off by default until measured on a GPU.",
    )

    def check(self) -> None:
        if self.damping_end > self.damping:
            self.fail("damping_end", f"must be <= ngd.damping = {self.damping} (damping decays)")


@dataclass(frozen=True)
class CommConfig(Section):
    """[comm]: how ranks talk."""

    SECTION = "comm"
    ranks_per_node: int = opt(
        0,
        "Ranks per node of the two-level reduction (0 = ranks that share memory); fewer simulates nodes "
        "on one host (its GPUs and cores are still shared by all its ranks).",
        ge=0,
    )
    bucket_mb: float = opt(8.0, "Size of one fused buffer (gradients, factors) in MiB.", gt=0.0)
    hierarchical: bool = opt(
        True, "Average in two levels (inside each node, then among node leaders) instead of one allreduce."
    )
    check_replicas: int = opt(
        0, "Debug: compare a hash of parameters and optimizer state over ranks every N steps (0 = off).", ge=0
    )
    dtype: str = opt(
        "fp32",
        "Wire format of gradients and factors: fp32, or fp16/bf16 "
        "(each level's mean summed in fp32, rounded once).",
        choices=("fp32", "fp16", "bf16"),
    )
    cuda_aware: str | bool = opt(
        "auto",
        "GPU runs: hand GPU buffers straight to MPI (true), stage them through pinned host buffers "
        "(false), or auto (true when the MPI library reports CUDA support).",
        choices=("auto", True, False),
    )


# Keys whose change makes a checkpoint's state meaningless unless checkpoint.allow_changes lists them
# (model.init and model.zero_init_residual only set weights that a resume overwrites).
TRAJECTORY_KEYS = ("model.arch", "model.num_classes", "data.batch_size", "optim.name", "run.seed")
# Keys that place the run directory: a checkpoint.dir outside it that holds checkpoints written from
# another run directory is refused (state.check_folder_owner), unless checkpoint.allow_changes lists one.
IDENTITY_KEYS = ("run.name", "run.output_dir")


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """[checkpoint]: when state is saved (HDF5) and how a run resumes."""

    SECTION = "checkpoint"
    every_steps: int = opt(0, "Save every this many steps (0 = off).", ge=0)
    every_minutes: float = opt(
        0.0, "Save when this many minutes passed since the last save (0 = off).", ge=0.0
    )
    at_end: bool = opt(True, "Save after the last step.")
    keep_last: int = opt(
        2, "Complete checkpoints kept; older ones are removed after a new one is written.", ge=1
    )
    dir: str = opt("", 'Folder of the checkpoints ("" = <run dir>/checkpoints).')
    resume: str = opt(
        "auto",
        '"auto" = newest complete checkpoint in dir (none: start fresh), "never", or a checkpoint path.',
    )
    mixup_max_mib: float = opt(
        1024.0,
        "Largest running-mixup previous batch (all ranks, MiB) saved; a larger one is left out and mixing "
        "restarts at the resume step (the run is then not bit-exact).",
        ge=0.0,
    )
    allow_changes: tuple[str, ...] = opt(
        (),
        "Run-file keys (section.key) that may differ from the checkpoint's although they change the "
        "trajectory: model.arch, model.num_classes, data.batch_size, optim.name, run.seed; with a "
        "checkpoint.dir outside the run directory also run.name and run.output_dir (the folder may be "
        "another run's).",
    )

    def check(self) -> None:
        if not self.resume:
            self.fail("resume", 'must be "auto", "never" or the path of a checkpoint file')
        for item in self.allow_changes:
            section, _, key = item.partition(".")
            known = SECTIONS.get(section)
            keys = {"*", *(f.name for f in dataclasses.fields(known))} if known else set()  # type: ignore[arg-type]
            if key not in keys:
                self.fail("allow_changes", f"{item!r} is not a section.key (or section.*) of the run file")


@dataclass(frozen=True)
class LogConfig(Section):
    """[log]: progress lines, metrics.jsonl and evaluation."""

    SECTION = "log"
    every_steps: int = opt(10, "Progress line and metrics.jsonl record every this many steps.", ge=1)
    eval_every_epochs: int = opt(1, "Evaluate every this many epochs (0 = only at the end).", ge=0)
    target_top1: float = opt(
        0.0,
        'Validation top-1 (%) to time (0 = off): the first evaluation that reaches it writes a "target" '
        "record and line with the steps, epochs and seconds it took. Training goes on.",
        ge=0.0,
        le=100.0,
    )


SECTIONS: dict[str, type[Section]] = {
    cls.SECTION: cls
    for cls in (
        RunConfig,
        ModelConfig,
        DataConfig,
        OptimConfig,
        NgdConfig,
        CommConfig,
        CheckpointConfig,
        LogConfig,
    )
}


@dataclass(frozen=True)
class Config:
    """The whole run file. Components receive only their own section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ngd: NgdConfig = field(default_factory=NgdConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        """The folder this run writes into."""
        return Path(self.run.output_dir) / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        """The folder of this run's checkpoints."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def checkpoints_apart(self) -> bool:
        """Whether ``checkpoint.dir`` puts the checkpoints outside the run directory, where other runs may
        put theirs too (the default folder is the run's own, even when it is a link to elsewhere)."""
        inside = self.checkpoint_dir.resolve().is_relative_to(self.run_dir.resolve())
        return bool(self.checkpoint.dir) and not inside


# --------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------


def _section(section: str) -> type[Section]:
    if section not in SECTIONS:
        raise ConfigError(f"[{section}] is not a known section: sections are {', '.join(SECTIONS)}")
    return SECTIONS[section]


def _field_of(section: str, key: str) -> dataclasses.Field[Any]:
    fields = {f.name: f for f in dataclasses.fields(_section(section))}  # type: ignore[arg-type]
    if key not in fields:
        allowed = ", ".join(fields) or "none yet"
        raise ConfigError(f"{section}.{key} is not a known key: keys of [{section}] are {allowed}")
    return fields[key]


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value typed by the schema)."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    f = _field_of(section, key)
    hint = typing.get_type_hints(SECTIONS[section])[f.name]
    text = text.strip()
    union = isinstance(hint, types.UnionType)  # e.g. str | bool: true/false are booleans
    takes_str = hint is str or (union and str in typing.get_args(hint))
    if takes_str and not text.startswith(('"', "'")) and not (union and text in ("true", "false")):
        return section, key, text
    try:
        return section, key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--set {name}={text}: not a valid value (TOML syntax)") from None


# Keys that moved: (old section, key) -> new section. Run files and the run files stored in checkpoints
# written before the move keep working.
MOVED = {("data", "channels_last"): "run"}


def from_dict(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated Config from parsed TOML plus ``section.key=value`` overrides."""
    merged: dict[str, dict[str, Any]] = {}
    for section, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{section} = {show(body)}: top-level keys must be [sections]")
        _section(section)
        body = dict(body)
        for (old, key), new in MOVED.items():
            if old == section and key in body:
                value = body.pop(key)
                raw_new = raw.get(new, {})
                if isinstance(raw_new, dict) and key in raw_new and raw_new[key] != value:
                    raise ConfigError(
                        f"{section}.{key} = {show(value)}: moved to {new}.{key}, which says otherwise"
                    )
                merged.setdefault(new, {}).setdefault(key, value)
        for key in body:
            _field_of(section, key)
        merged.setdefault(section, {}).update(body)
    for item in overrides:
        section, key, value = _parse_override(item)
        merged.setdefault(section, {})[key] = value
    sections: dict[str, Any] = {name: cls(**merged.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(**sections)


def loads(text: str, source: str = "<run file>", overrides: typing.Sequence[str] = ()) -> Config:
    """Parse a run file's text; errors name ``source``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidToml(f"{source}: not valid TOML: {exc}") from None
    try:
        return from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_text(path: str | Path) -> str:
    """Read a run file, turning a missing or unreadable file into one clear error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read run file: {exc.__class__.__name__}: {exc}") from None


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read and validate a run file."""
    return loads(read_text(path), str(path), overrides)


def check_world_size(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks; raise ConfigError naming the key."""
    data = cfg.data
    if data.batch_size % world_size:
        raise ConfigError(f"data.batch_size = {data.batch_size}: must be divisible by the {world_size} ranks")
    rpn = cfg.comm.ranks_per_node
    if rpn and world_size % rpn:
        raise ConfigError(f"comm.ranks_per_node = {rpn}: must divide the {world_size} ranks")
    local = data.batch_size // world_size
    if data.micro_batch_size and local % data.micro_batch_size:
        raise ConfigError(
            f"data.micro_batch_size = {data.micro_batch_size}: must divide the per-rank batch "
            f"data.batch_size / ranks = {data.batch_size} / {world_size} = {local}"
        )
    one_by_one = 2 ** MODEL_HALVINGS[cfg.model.arch]  # the largest image side whose last map is 1x1
    if (data.micro_batch_size or local) == 1 and data.image_size <= one_by_one:
        key = "data.micro_batch_size = 1" if data.micro_batch_size else f"data.batch_size / ranks = {local}"
        raise ConfigError(
            f"{key} image a forward pass at data.image_size = {data.image_size}: {cfg.model.arch}'s last "
            "BatchNorm would see one value per channel (a 1x1 map), which training cannot normalize; use "
            f"2 or more images a forward pass, or data.image_size > {one_by_one}"
        )


def to_toml(cfg: Config) -> str:
    """The fully resolved run file, every key written, readable back by :func:`loads`."""
    lines: list[str] = []
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {toml_value(getattr(section, f.name))}  # {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


def differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(section.key, old value, new value)`` for every key that differs, in schema order."""
    return [
        (f"{name}.{f.name}", getattr(getattr(old, name), f.name), getattr(getattr(new, name), f.name))
        for name in SECTIONS
        for f in dataclasses.fields(getattr(old, name))
        if getattr(getattr(old, name), f.name) != getattr(getattr(new, name), f.name)
    ]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def reference() -> str:
    """The run-file reference in Markdown, generated from the schema (README embeds it)."""
    lines: list[str] = []
    for name, cls in SECTIONS.items():
        lines += [
            f"#### [{name}]",
            "",
            _sentence((cls.__doc__ or "").strip().removeprefix(f"[{name}]: ")),
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            rules = (
                [f"one of {', '.join(toml_value(c) for c in meta['choices'])}"] if "choices" in meta else []
            )
            rules += [
                f"{sign} {meta[op]}"
                for op, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                if op in meta
            ]
            extra = f" ({'; '.join(rules)})" if rules else ""
            text = f"{meta['help']}{extra}".replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{toml_value(f.default)}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hpcngd.config: print the reference
    print(reference(), end="")
