"""A run's state <-> a checkpoint file, across ranks (collective: every rank calls save and restore).

What is saved (all world-size independent except ``ranks/``):
  model/NAME              parameters and buffers (BatchNorm running statistics: the same on every
                          rank, see models/batchnorm.py)
  optim/PARAM/KEY         optimizer state per parameter (SGD momentum, SP-NGD velocity); the groups'
                          previous learning rates in the attributes of ``optim``
  ngd/LAYER/KIND/value    SP-NGD statistics (A, G or F), identical on every rank, with their refresh
                          interval and next refresh step as attributes; ``inverse``: the cached inverse,
                          sent to the writer by the rank that owns the layer (inverses are kept, not
                          recomputed, because each was damped at its own refresh step)
  mixup/images, targets   running mixup's previous global batch (mixed, then erased), gathered slice by slice
                          (when at most checkpoint.mixup_max_mib: at 32K images of 224 px it is 19.7 GB)
  log/pending_losses      losses since the last metrics record (the record after a resume is exact)
  log/evals               every evaluation so far: step, epoch, top-1 and the run's clock (the time to
                          log.target_top1 survives resumes); the clock itself (train_s, elapsed_s) and the
                          target (target_top1, target_step) are header attributes
  precision (attributes)  fp16 loss scale state (scale, good_steps, skips_in_a_row)
  ranks/KEY               every rank's random generators (torch, MC Fisher, numpy, Python) and SP-NGD
                          counts since the last record, row R for rank R (one dataset per key, not per
                          rank: 4,096 ranks' 28,672 datasets took 9 s to write): restored only when the world
                          size is the same. Schema 1 files (``ranks/R/KEY``) are read too.
The position is the step count: the images trained on (the data order is a function of seed and
stream position, see data/sharding.py). The writer is
rank 0 with serial h5py; other ranks send it what only they hold, one piece at a time, so its memory
stays bounded by the largest piece. Reading: rank 0 reads, checks, and broadcasts piece by piece.
"""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hpcngd import __version__, config
from hpcngd.checkpoint import (
    CorruptCheckpoint,
    NotPublished,
    Reader,
    Writer,
    candidates,
    header,
    resume_order,
    set_aside,
)
from hpcngd.errors import AgreedError, CheckpointError, Diverged, InvalidToml, agree
from hpcngd.metrics import NGD_COUNTS, clock_phrase
from hpcngd.records import first_reaching

if TYPE_CHECKING:
    from hpcngd.train import Trainer


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def rank_state(mc_rng: torch.Generator, ngd_counts: dict[str, int]) -> dict[str, np.ndarray]:
    """What only this rank holds: its random generators' states and SP-NGD counts since the last record."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": _np(torch.get_rng_state()),
        "mc": _np(mc_rng.get_state()),
        "numpy": np.asarray(keys, dtype=np.uint32),
        "numpy_extra": np.array([pos, has_gauss, gauss], dtype=np.float64),
        "python": np.asarray(internal, dtype=np.uint64),
        "python_extra": np.array([version, math.nan if gauss_next is None else gauss_next]),
        "ngd_counts": np.array([ngd_counts[k] for k in NGD_COUNTS], dtype=np.int64),
    }


def _set_rank_state(trainer: Trainer, s: dict[str, np.ndarray]) -> None:
    torch.set_rng_state(torch.from_numpy(s["torch"].copy()))
    trainer.mc_rng.set_state(torch.from_numpy(s["mc"].copy()))
    pos, has_gauss, gauss = s["numpy_extra"].tolist()
    np.random.set_state(("MT19937", s["numpy"], int(pos), int(has_gauss), gauss))
    version, gauss_next = s["python_extra"].tolist()
    trainer.ngd_counts.update(dict(zip(NGD_COUNTS, s["ngd_counts"].tolist(), strict=True)))
    random.setstate(
        (int(version), tuple(int(v) for v in s["python"]), None if math.isnan(gauss_next) else gauss_next)
    )


def _header(trainer: Trainer, clock: dict[str, float]) -> dict[str, Any]:
    cfg, topo = trainer.cfg, trainer.topo
    return {
        "hpcngd_version": __version__,
        "epoch": round(trainer.epoch_at(trainer.step), 4),
        "train_samples": trainer.num_samples,
        "batch_size": cfg.data.batch_size,
        "world_size": topo.size,
        "num_nodes": topo.num_nodes,
        "arch": cfg.model.arch,
        "num_classes": cfg.model.num_classes,
        "optimizer": cfg.optim.name,
        "run_file": config.to_toml(cfg),
        "run_dir": str(cfg.run_dir.resolve()),  # whose checkpoint it is, in a shared checkpoint.dir
        **clock,  # seconds trained so far, over all resumes
        "target_top1": cfg.log.target_top1,
        "target_step": trainer.target_step,  # where target_top1 was first reached (-1: not yet)
    }


def nonfinite(trainer: Trainer) -> str | None:
    """The first piece of this rank's state that holds NaN or Inf, or None."""
    for name, t in trainer.model.state_dict().items():
        if not _finite(t):
            return f"model {name}"
    names: dict[Any, str] = {p: n for n, p in trainer.model.named_parameters()}
    for p, st in trainer.optimizer.state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and not _finite(v):
                return f"optimizer {key} of {names[p]}"
    if trainer.ngd is not None:
        for (layer, kind), stat in trainer.ngd.stats.items():
            for what, t in (("statistic", stat.value), ("inverse", stat.inverse)):
                if t is not None and not _finite(t):
                    return f"SP-NGD {what} {layer}.{kind}"
    return None


def save(trainer: Trainer, directory: Path, keep_last: int, clock: dict[str, float] | None = None) -> Path:
    """Write the state of ``trainer`` as one checkpoint (collective); returns its path on every rank.

    ``clock``: the run's clock to keep (its :meth:`RunClock.fields`; None: as it reads now).

    Raises Diverged on every rank when the state holds NaN/Inf (nothing is written), AgreedError when the file
    cannot be written (the temporary file is removed), or rank 0 finds that another run took its run
    directory over (the file is dropped); earlier checkpoints are untouched either way.
    """
    comm, rank = trainer.topo.world, trainer.topo.rank
    bad = [b for b in comm.allgather(nonfinite(trainer)) if b]
    if bad:
        raise Diverged(
            f"the run diverged: {bad[0]} holds NaN or Inf at step {trainer.step}; its checkpoint is not "
            "written (earlier ones are kept; try a lower optim.lr)"
        )
    w = None
    if rank == 0:
        head = _header(trainer, clock or trainer.clock.fields())
        w = Writer(directory, trainer.step, head, _expected_bytes(trainer))
    if w is not None:
        for name, t in trainer.model.state_dict().items():
            w.put(f"model/{name}", _np(t))
        for name, p in trainer.model.named_parameters():
            for key, v in trainer.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    w.put(f"optim/{name}/{key}", _np(v))
        prev = [g.get("prev_lr") for g in trainer.optimizer.param_groups]
        w.set_attrs("optim", prev_lr=np.array([math.nan if v is None else v for v in prev]))
        w.put("log/pending_losses", np.asarray(trainer.pending_losses, dtype=np.float64))
        w.put("log/evals", np.asarray(trainer.evals, dtype=np.float64).reshape(-1, 5))
        if trainer.scaler.enabled:
            w.set_attrs("precision", **trainer.scaler.state())
    if trainer.ngd is not None:
        for (layer, kind), stat in trainer.ngd.stats.items():
            base = f"ngd/{layer}/{kind}"
            owner = trainer.plan.owner(layer)
            inv = _np(stat.inverse) if rank == owner and stat.inverse is not None else None
            if owner != 0:
                if rank == owner:
                    comm.send(inv, dest=0, tag=1)
                inv = comm.recv(source=owner, tag=1) if rank == 0 else None
            if w is not None:
                sched = stat.schedule
                if stat.value is not None:
                    w.put(f"{base}/value", _np(stat.value))
                w.set_attrs(base, interval=sched.interval, next_step=sched.next_step)
                if inv is not None:
                    w.put(f"{base}/inverse", inv)
    if trainer.mixup is not None and trainer.mixup.prev is not None:
        if _mixup_saved(trainer):
            _gather_rows(trainer, w, trainer.mixup.prev)
        elif w is not None:
            w.set_attrs("mixup", not_saved_mib=_mixup_bytes(trainer) / 2**20)
    states = comm.gather(rank_state(trainer.mc_rng, trainer.ngd_counts), root=0)
    if w is not None:
        write_rank_states(w, states or [])
    error, path = None, None
    if w is not None:
        try:  # not published once another run took the folder over (a suspended run that resumed)
            path = w.commit(keep_last, (lambda: trainer.holds_locks(strict=True)) if trainer.locks else None)
        except Exception as exc:  # noqa: BLE001 - rank 0 must reach the bcast below, whatever happened
            error = str(exc) if isinstance(exc, CheckpointError) else f"cannot write checkpoint: {exc!r}"
            if isinstance(exc, NotPublished) or not trainer.holds_locks():
                error = trainer.lost_message()  # the cause (its start removed this run's temporary file)
    error, path = comm.bcast((error, path), root=0)
    if error:
        raise AgreedError(error)
    return Path(path)


def _expected_bytes(trainer: Trainer) -> int:
    """About what :func:`save`'s arrays take (those of rank 0, with every rank's mixup rows and per-rank
    state, and an inverse the size of each statistic)."""
    total = _nbytes([*trainer.model.state_dict().values(), *trainer.optimizer_tensors()])
    total += trainer.topo.size * sum(
        a.nbytes for a in rank_state(trainer.mc_rng, trainer.ngd_counts).values()
    )
    if trainer.ngd is not None:
        total += 2 * _nbytes([s.value for s in trainer.ngd.stats.values() if s.value is not None])
    return total + (_mixup_bytes(trainer) if _mixup_saved(trainer) else 0)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)


def _mixup_bytes(trainer: Trainer) -> int:
    """Running mixup's previous batch over all ranks (0 when there is none)."""
    if trainer.mixup is None or trainer.mixup.prev is None:
        return 0
    return _nbytes(trainer.mixup.prev) * trainer.topo.size


def _mixup_saved(trainer: Trainer) -> bool:
    """Whether the checkpoint holds running mixup's previous batch (up to ``checkpoint.mixup_max_mib``)."""
    return _mixup_bytes(trainer) / 2**20 <= trainer.cfg.checkpoint.mixup_max_mib


def _gather_rows(trainer: Trainer, w: Writer | None, prev: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Each rank's slice of the previous mixed batch, written in global order."""
    comm, size = trainer.topo.world, trainer.topo.size
    for key, local in zip(("images", "targets"), prev, strict=True):
        if w is None:
            comm.send(_np(local), dest=0, tag=2)
            continue
        w.create(f"mixup/{key}", (len(local) * size, *local.shape[1:]), _np(local).dtype)
        for r in range(size):
            rows = _np(local) if r == 0 else comm.recv(source=r, tag=2)
            w.fill(f"mixup/{key}", r * len(local), rows)


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


def resume(trainer: Trainer) -> tuple[Path | None, list[str]]:
    """Restore ``trainer`` from the checkpoint ``checkpoint.resume`` names, if any (collective).

    Returns the checkpoint's path (None: a fresh start) and notes for the log (rank 0's are complete).
    Raises AgreedError on every rank if the checkpoint cannot be used.
    """
    comm = trainer.topo.world
    reader, notes = agree(comm, lambda: open_for_resume(trainer) if comm.rank == 0 else (None, []))
    path = comm.bcast(reader.path if reader is not None else None, root=0)
    if path is None:
        return None, notes
    try:
        notes += restore(trainer, reader)
    finally:
        if reader is not None:
            reader.close()
    return path, notes


def check_folder_owner(cfg: config.Config) -> None:
    """Rank 0, before the run writes anything: refuse a ``checkpoint.dir`` outside the run directory whose
    newest readable checkpoint another run wrote (another run directory, resolved): the two runs would
    resume from, and prune, each other's checkpoints. ``checkpoint.allow_changes`` listing ``run.name``
    or ``run.output_dir`` accepts it (a run directory that was moved). Checkpoints of an hpcngd that did
    not record the run directory count as this run's."""
    allowed = cfg.checkpoint.allow_changes
    if not cfg.checkpoints_apart or any(fnmatch.filter(config.IDENTITY_KEYS, p) for p in allowed):
        return
    mine = str(cfg.run_dir.resolve())
    for path in resume_order(cfg.checkpoint_dir):
        try:
            owner = header(path).get("run_dir")
        except (OSError, ValueError):  # damaged: resuming sets it aside, or refuses it
            continue
        if owner is not None and owner != mine:
            raise CheckpointError(
                f"checkpoint.dir: {cfg.checkpoint_dir} holds another run's checkpoints ({path.name} was "
                f"written by the run in {owner}; this run's directory is {mine}): two runs there would "
                "resume from and prune each other's; give each run its own checkpoint.dir (list run.name "
                "in checkpoint.allow_changes to use them anyway)"
            )
        return


def open_for_resume(trainer: Trainer) -> tuple[Reader | None, list[str]]:
    """Rank 0: the checkpoint ``checkpoint.resume`` asks for, opened and checked, and notes to log.

    ``auto``: the newest checkpoint in the checkpoint folder; a damaged one is set aside (renamed
    ``*.corrupt``) and the next older one is tried; none at all means a fresh start, unless some were
    set aside (then the run is refused: a fresh start would overwrite the run's metrics). A checkpoint that
    is intact but does not fit this run (another model, batch or schema) is an error, never skipped.
    """
    cfg = trainer.cfg.checkpoint
    folder = trainer.cfg.checkpoint_dir
    if cfg.resume == "never":
        if candidates(folder):
            raise CheckpointError(
                f'checkpoint.resume = "never" but {folder} holds checkpoints of an earlier run; '
                "remove them or use another run.name or checkpoint.dir"
            )
        return None, []
    if cfg.resume != "auto":
        return _open_checked(Path(cfg.resume), trainer)
    notes: list[str] = []
    order = resume_order(folder)
    for i, path in enumerate(order):
        try:
            reader, more = _open_checked(path, trainer)
            return reader, notes + more
        except CorruptCheckpoint as exc:
            then = ", trying the previous one" if i + 1 < len(order) else ""
            notes.append(f"{exc}; set aside as {set_aside(path).name}{then}")
    if notes:
        raise CheckpointError(f"no usable checkpoint in {folder}: " + "; ".join(notes))
    aside = sorted(p.name for p in folder.glob("ckpt-*.h5.corrupt"))
    if aside:  # a resubmission after the above: starting over would rewrite this run's metrics
        raise CheckpointError(
            f"{folder} holds only checkpoints set aside as damaged ({', '.join(aside[:3])}"
            f"{', ...' if len(aside) > 3 else ''}): move them away to start this run over, "
            "or name a checkpoint in checkpoint.resume"
        )
    return None, notes


def _open_checked(path: Path, trainer: Trainer) -> tuple[Reader, list[str]]:
    """``path`` opened and :func:`check`-ed (closed again if it cannot resume ``trainer``)."""
    reader = Reader(path)
    try:
        return reader, check(reader, trainer)
    except CheckpointError:
        reader.close()
        raise


def check(reader: Reader, trainer: Trainer) -> list[str]:
    """Whether ``reader``'s checkpoint can resume ``trainer``; raises CheckpointError, else notes to log.

    Its bytes were checked when it was opened (the SHA-256 seal; an unsealed file is read once here for
    its checksums); compares the run files and the model's names and shapes.
    """
    reader.verify()
    a, cfg = reader.attrs, trainer.cfg
    try:
        saved = config.loads(str(a["run_file"]), f"run file stored in {reader.path}")
    except InvalidToml as exc:  # hpcngd wrote it as TOML: the text (not checksummed) is damaged
        raise reader.fail(f"its stored run file is damaged: {exc}", corrupt=True) from None
    except config.ConfigError as exc:  # e.g. written by another hpcngd version
        raise reader.fail(f"its stored run file is not valid here: {exc}") from None
    notes = []
    changed = [(k, o, n) for k, o, n in config.differences(saved, cfg) if not k.startswith("checkpoint.")]
    for key, old, new in changed:
        if any(fnmatch.fnmatchcase(key, p) for p in cfg.checkpoint.allow_changes):
            continue
        if any(fnmatch.fnmatchcase(key, p) for p in config.TRAJECTORY_KEYS):
            raise reader.fail(
                f"was written with {key} = {old!r}, the run file says {new!r}: that is not the same run "
                f"(list {key} in checkpoint.allow_changes to resume anyway)"
            )
    if changed:
        notes.append(
            "run file differs from the checkpoint's: "
            + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changed)
        )
    world = a.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise reader.fail(f"its header's world_size is {world!r}, not a number of ranks", corrupt=True)
    stored = set(reader.names("ranks")) if reader.has("ranks") else set()
    absent = [n for n in _rank_names(reader) if n not in stored]
    absent += [n for n in ("log/pending_losses", "optim") if not reader.has(n)]
    if absent:
        raise reader.fail(f"is incomplete: it lacks {', '.join(absent[:3])}", corrupt=True)
    _check_rank_states(reader, trainer, world)
    model = {k: tuple(v.shape) for k, v in trainer.model.state_dict().items()}
    shapes = {n.removeprefix("model/"): tuple(reader.file[n].shape) for n in reader.names("model")}
    if shapes != model:
        diff = sorted(set(shapes.items()) ^ set(model.items()))[:2]
        raise reader.fail(f"holds another model than {cfg.model.arch} (first differences: {diff})")
    return notes


def restore(trainer: Trainer, reader: Reader | None) -> list[str]:
    """Load the checkpoint that rank 0 opened (and :func:`check`-ed) into every rank's trainer.

    Returns the notes to log (the same on every rank). Collective; only rank 0 touches the file.
    """
    comm, size = trainer.topo.world, trainer.topo.size
    manifest = None
    if reader is not None:
        manifest = {"attrs": reader.attrs, "names": reader.names(""), "groups": _group_attrs(reader)}
    manifest = comm.bcast(manifest, root=0)
    a, names, groups = manifest["attrs"], set(manifest["names"]), manifest["groups"]

    def get(name: str) -> np.ndarray:
        return comm.bcast(reader.array(name) if reader is not None else None, root=0)

    notes: list[str] = []
    device = trainer.device
    with torch.no_grad():
        for name, t in trainer.model.state_dict().items():
            t.copy_(torch.from_numpy(get(f"model/{name}")))
        if a["optimizer"] == trainer.cfg.optim.name:
            for name, p in trainer.model.named_parameters():
                for key in sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"optim/{name}/")):
                    value = torch.from_numpy(get(f"optim/{name}/{key}"))
                    trainer.optimizer.state[p][key] = value.to(p.device)
            for group, prev in zip(trainer.optimizer.param_groups, groups["optim"]["prev_lr"], strict=True):
                group["prev_lr"] = None if math.isnan(prev) else prev
        else:
            notes.append(
                f"optimizer changed ({a['optimizer']} -> {trainer.cfg.optim.name}): its state starts fresh"
            )

    step = _resume_step(trainer, a, notes)
    if trainer.ngd is not None:
        if not any(n.startswith("ngd/") for n in names):
            notes.append("the checkpoint has no SP-NGD statistics: curvature starts fresh")
        for (layer, kind), stat in trainer.ngd.stats.items():
            base = f"ngd/{layer}/{kind}"
            if f"{base}/value" not in names:
                continue
            stat.value = torch.from_numpy(get(f"{base}/value")).to(device, trainer.ngd.dtype)
            stat.schedule.interval = int(groups[base]["interval"])
            stat.schedule.next_step = int(groups[base]["next_step"]) + step - int(a["step"])
            if f"{base}/inverse" in names:  # only to the layer's owner now, point to point
                owner = trainer.plan.owner(layer)
                inv = reader.array(f"{base}/inverse") if reader is not None else None
                if owner != 0:
                    if reader is not None:
                        comm.send(inv, dest=owner, tag=4)
                    inv = comm.recv(source=0, tag=4) if comm.rank == owner else None
                if inv is not None:
                    stat.inverse = torch.from_numpy(inv).to(device, trainer.ngd.dtype)
    same_batch = int(a["batch_size"]) == trainer.cfg.data.batch_size
    if trainer.mixup is not None and "mixup/images" in names and same_batch:
        images, targets = _scatter_rows(trainer, reader)
        trainer.mixup.prev = images.to(device), targets.to(device)
    elif trainer.mixup is not None and "not_saved_mib" in groups.get("mixup", {}):
        notes.append(
            f"running mixup's previous batch ({groups['mixup']['not_saved_mib']:.0f} MiB, above "
            "checkpoint.mixup_max_mib) was not saved: mixing restarts at this step (not bit-exact)"
        )
    if same_batch:
        trainer.pending_losses = get("log/pending_losses").tolist()
    if trainer.scaler.enabled and "precision" in groups:
        trainer.scaler.load(groups["precision"])
    if int(a["world_size"]) == size:
        _set_rank_state(
            trainer, comm.scatter(read_rank_states(reader) if reader is not None else None, root=0)
        )
    else:
        mc = trainer.ngd is not None and trainer.cfg.ngd.fisher == "mc"
        notes.append(
            f"written by {a['world_size']} rank(s), resuming on {size}"
            + (" with the same global batch" if same_batch else "")
            + ("; MC Fisher label sampling (a stream per rank) restarts from the seed" if mc else "")
        )
        saved = config.loads(str(a["run_file"]), "the checkpoint's run file").data
        old_micro = saved.micro_batch_size or saved.batch_size // int(a["world_size"])
        if old_micro != trainer.micro_batch:
            notes.append(
                f"BatchNorm's batch changes from {old_micro} to {trainer.micro_batch} images "
                "(data.micro_batch_size = 0 is the per-rank batch): losses part from the uninterrupted "
                "run's; a fixed data.micro_batch_size keeps them"
            )
    evals = get("log/evals") if "log/evals" in names else np.zeros((0, 5))
    _restore_clock(trainer, a, [tuple(e) for e in evals.tolist()], notes)
    trainer.step, trainer.resumed_from_step = step, int(a["step"])
    return notes


def _restore_clock(
    trainer: Trainer, a: dict[str, Any], evals: list[tuple[float, ...]], notes: list[str]
) -> None:
    """The run's clock and its evaluations so far, which give its time to target (an older hpcngd saved
    neither); a note when a target other than the checkpoint's was already reached."""
    if "train_s" not in a or "elapsed_s" not in a:
        notes.append("the checkpoint holds no training clock: train_s and elapsed_s count from this resume")
        return
    trainer.clock.load(a["train_s"], a["elapsed_s"])
    trainer.evals = evals
    target = trainer.cfg.log.target_top1
    first = first_reaching(evals, target)
    if first is not None and a.get("target_top1") != target:  # no target record was written for it
        notes.append(
            f"log.target_top1 = {target:g} was reached before this resume, at step {int(first[0])} (epoch "
            f"{first[1]:g}) after {clock_phrase(first[3], first[4])} (no target record is written for it)"
        )


def _resume_step(trainer: Trainer, a: dict[str, Any], notes: list[str]) -> int:
    """The step to resume at: where the images trained on so far end in the data stream (the same step
    unless the global batch changed). Notes what moved."""
    old_step, old_batch, batch = int(a["step"]), int(a["batch_size"]), trainer.cfg.data.batch_size
    seen = old_step * old_batch
    step = seen // batch
    if batch != old_batch:
        notes.append(
            f"global batch changed ({old_batch} -> {batch}): {seen} images trained on, resuming at step "
            f"{step} (epoch {trainer.epoch_at(step):.2f})"
            + (f"; the last {seen - step * batch} of them are trained on again" if seen % batch else "")
        )
    n = trainer.num_samples
    if int(a["schema_version"]) < 3:  # N // B steps an epoch (the same N, most likely, if that count is)
        old_spe = int(a.get("steps_per_epoch", 0))
        changed = old_spe != n // old_batch
        if changed or n % old_batch:
            then, now = old_step / max(old_spe, 1), trainer.epoch_at(step)
            notes.append(
                f"written by an hpcngd whose epochs were N // batch steps ({old_spe}), leaving the last N "
                f"mod batch images out: step {old_step} was epoch {then:.2f} then; resuming at step {step}, "
                f"epoch {now:.2f} now, of a run of {trainer.total_steps} steps"
                + (f" (the training set changed: {n} images now)" if changed else "")
            )
    elif int(a.get("train_samples", n)) != n:
        notes.append(
            f"training set size changed ({a['train_samples']} -> {n} images): step {step} is epoch "
            f"{trainer.epoch_at(step):.2f} now, and the sample order from here on is not the one before"
        )
    return step


_RANK_KEYS = ("torch", "mc", "numpy", "numpy_extra", "python", "python_extra", "ngd_counts")


def write_rank_states(w: Writer, states: list[dict[str, np.ndarray]]) -> None:
    """Every rank's :func:`rank_state` (rank R's in row R), one dataset per key."""
    for key in _RANK_KEYS:
        w.put_stacked(f"ranks/{key}", [s[key] for s in states])


def read_rank_states(reader: Reader) -> list[dict[str, np.ndarray]]:
    """What :func:`write_rank_states` wrote (or a schema 1 file's ``ranks/R/KEY``), a dict per rank."""
    world = int(reader.attrs["world_size"])
    if not _stacked(reader):
        return [{k: reader.array(f"ranks/{r}/{k}") for k in _RANK_KEYS} for r in range(world)]
    stacked = {k: reader.array(f"ranks/{k}") for k in _RANK_KEYS}
    return [{k: v[r] for k, v in stacked.items()} for r in range(world)]


def _check_rank_states(reader: Reader, trainer: Trainer, world: int) -> None:
    """Each per-rank entry holds a row per rank (schema 2) of what this hpcngd stores for a rank; the
    rows' shape and type matter only when they are restored (the same world size)."""
    mine, rows = rank_state(trainer.mc_rng, trainer.ngd_counts), (world,) if _stacked(reader) else ()
    for name in _rank_names(reader):
        key = name.rsplit("/", 1)[1]
        got = reader.file[name]
        if got.shape[: len(rows)] != rows:
            raise reader.fail(f"{name} holds {got.shape[0] if got.shape else 0} rows for {world} ranks")
        want = rows + mine[key].shape
        if world == trainer.topo.size and (got.shape != want or got.dtype != mine[key].dtype):
            raise reader.fail(
                f"{name} holds {got.dtype} {got.shape}; this hpcngd stores {mine[key].dtype} {want} there"
            )


def _stacked(reader: Reader) -> bool:
    return int(reader.attrs["schema_version"]) >= 2


def _rank_names(reader: Reader) -> list[str]:
    if _stacked(reader):
        return [f"ranks/{k}" for k in _RANK_KEYS]
    return [f"ranks/{r}/{k}" for r in range(int(reader.attrs["world_size"])) for k in _RANK_KEYS]


def _group_attrs(reader: Reader) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    reader.file.visititems(
        lambda n, o: groups.__setitem__(n, reader.group_attrs(n)) if not hasattr(o, "dtype") else None
    )
    return groups


def _scatter_rows(trainer: Trainer, reader: Reader | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's slice of the stored global mixed batch (rank 0 reads one slice at a time)."""
    comm, size, n = trainer.topo.world, trainer.topo.size, trainer.local_batch
    out = []
    for key in ("images", "targets"):
        mine = None
        for r in range(size):
            if reader is not None:
                rows = reader.rows(f"mixup/{key}", r * n, (r + 1) * n)
                if r == 0:
                    mine = rows
                else:
                    comm.send(rows, dest=r, tag=3)
            elif comm.rank == r:
                mine = comm.recv(source=0, tag=3)
        out.append(torch.from_numpy(mine))
    return out[0], out[1]
