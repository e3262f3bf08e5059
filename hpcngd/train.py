"""The Trainer: builds the parts of a run and drives the bulk-synchronous loop.

One step (``train_step``):
  1. forward + backward over the rank's micro-batches, gradients accumulated (scaled so that their
     sum is the gradient of the rank's mean loss); with SP-NGD, hooks collect the factors that are due
     (and the "mc" Fisher takes one extra backward with sampled labels);
  2. one fused allreduce averages the gradients over all ranks (``comm.bucket_mb`` buckets, on the
     ``comm.dtype`` wire), and one fp32 pass the loss, the control values and the BatchNorm statistics;
  3. SP-NGD only: refreshed factors are averaged over ranks (fused), damped, inverted, and every
     gradient is preconditioned (:mod:`hpcngd.ngd.preconditioner`);
  4. the optimizer applies the same update on every rank, so replicas stay identical.
A non-finite global loss stops every rank at the same step (all ranks see the same reduced value).
Four control values ride along with the loss in phase 2, so every rank takes the same decision at the
same step boundary without a collective of their own: "some rank received a stop signal", "rank 0's clock
says a timed checkpoint is due", (fp16) "some rank's gradients or factors overflowed": then every
rank skips the update, keeps its factors' schedule (they are due again) and halves the loss scale; and
"another run took this run's directory over" (:mod:`hpcngd.runlock`): every rank stops, exit 2.

Devices (:mod:`hpcngd.device`): the model, batches, factors, inverses and optimizer state live on the
rank's device; the wire buffers on it too when MPI is CUDA-aware, else in pinned host memory.
Precision (:mod:`hpcngd.precision`): forward and backward under autocast; everything kept is fp32.
Checkpoints: :mod:`hpcngd.state` (what is saved) and :mod:`hpcngd.checkpoint` (the file).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hpcngd import inference, state
from hpcngd.checkpoint import remove_leftovers
from hpcngd.comm.collectives import (
    FusedAllreduce,
    allreduce_sum,
    average_symmetric_,
    broadcast_,
    pack_factors,
    unpack_factors,
)
from hpcngd.comm.gpu import direct_device_buffers
from hpcngd.comm.hierarchical import WireReducer
from hpcngd.comm.packing import pack, unpack
from hpcngd.comm.topology import Topology
from hpcngd.config import Config, check_world_size
from hpcngd.data import Dataset, evaluation_batches, sharding, train_loader
from hpcngd.data.mixing import RunningMixup, erase_
from hpcngd.device import bind, to_device, use
from hpcngd.errors import AgreedError, Diverged, UserError
from hpcngd.metrics import MetricsLog, PhaseTimer, RunClock
from hpcngd.models.batchnorm import StepRunningStatistics
from hpcngd.models.resnet import build
from hpcngd.ngd import Preconditioner, mc_labels
from hpcngd.ngd.plan import layer_costs, make_plan, owned_parameters
from hpcngd.ngd.preconditioner import select_layers
from hpcngd.optim import build_optimizer, damping_at, learning_rate, rescale_weights, set_lr
from hpcngd.precision import LossScaler, autocast, unscale_
from hpcngd.records import first_reaching, log_eval, log_train
from hpcngd.runlock import RunLock
from hpcngd.stopping import StopSignals


class Trainer:
    """Everything one rank needs to train.

    Args:
        cfg: the validated run file.
        topo: communicators of this job.
        train_set, val_set: data sets (see :func:`hpcngd.data.build_datasets`).
        log: rank 0's console and metrics writer.
        checkpoints: save checkpoints as the [checkpoint] section says (off: never save).
        stop: the stop-signal note of this process (None: signals are not watched).
        locks: the run directory's lock (and the checkpoint folder's), on the rank that holds them (see
            :mod:`hpcngd.runlock`): when another run takes one over, every rank stops at the next step,
            and no checkpoint is published.
        device: this rank's device (None: chosen from run.device, see :func:`hpcngd.device.bind`).
    """

    def __init__(
        self,
        cfg: Config,
        topo: Topology,
        train_set: Dataset,
        val_set: Dataset,
        log: MetricsLog,
        checkpoints: bool = False,
        stop: StopSignals | None = None,
        device: torch.device | None = None,
        locks: Sequence[RunLock] = (),
    ) -> None:
        self.cfg, self.topo, self.val_set, self.log = cfg, topo, val_set, log
        self.checkpoints, self.stop, self.locks = checkpoints, stop, list(locks)
        data, run = cfg.data, cfg.run
        check_world_size(cfg, topo.size)  # the CLI checks before any rank computes; other callers may not
        self.device = device if device is not None else bind(run.device, topo.host_rank)
        use(self.device)
        on_gpu = self.device.type == "cuda"
        sync = torch.cuda.synchronize if on_gpu else None  # phase times hold their own kernels
        self.loader = train_loader(data, train_set, topo.rank, topo.size, run.seed, run.channels_last, on_gpu)
        self.local_batch = data.batch_size // topo.size
        self.micro_batch = data.micro_batch_size or self.local_batch
        self.num_samples = len(train_set)
        self.total_steps = sharding.run_steps(self.num_samples, data.batch_size, run.epochs)
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)

        torch.manual_seed(cfg.run.seed)
        # Built on the CPU (the same init on any device), then moved.
        self.model = build(
            cfg.model.arch, cfg.model.num_classes, cfg.model.zero_init_residual, cfg.model.init
        )
        self.model.to(self.device).train()
        if run.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # Same seed gives the same init everywhere; broadcasting rank 0's makes it certain.
        broadcast_(list(self.model.state_dict().values()), topo.world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ngd: Preconditioner | None = None
        if cfg.optim.name == "spngd":
            # Model-parallel inversion: the plan gives each layer one owner rank (ngd/plan.py).
            self.plan = make_plan(layer_costs(select_layers(self.model, cfg.ngd.exclude)), topo.size)
            owned = set(self.plan.owned_by(topo.rank))
            self.ngd = Preconditioner(self.model, cfg.ngd, owned, sync)
            self.owner_grads = owned_parameters(self.ngd.layers, self.plan)
        self.mc_rng = torch.Generator().manual_seed(cfg.run.seed * 7919 + topo.rank)  # CPU: see ngd.mc_labels
        self.scaler = LossScaler(run.loss_scale_init, run.loss_scale_growth_interval, run.precision == "fp16")
        self.ngd_counts: Counter[str] = Counter()
        alpha = cfg.data.mixup_alpha
        self.mixup = RunningMixup(alpha, cfg.model.num_classes, cfg.run.seed) if alpha else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.loss_buf = torch.zeros(1)
        # [stop signal seen, timed checkpoint due, fp16 overflow, run directory lost]
        self.control = torch.zeros(4)
        # BatchNorm running statistics move once a step, by the mean statistics of all ranks' micro-batches
        # (models/batchnorm.py): the same on every rank and at any rank count with a fixed micro-batch
        self.bn_stats = StepRunningStatistics(self.model)
        self.float_buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        shapes = [p.shape for p in self.params]
        # Gradients and factors share one wire.
        direct, self.comm_mode = direct_device_buffers(cfg.comm.cuda_aware, self.device, cfg.comm.dtype)
        self.wire = WireReducer(topo, cfg.comm.dtype, cfg.comm.hierarchical, self.device, direct)
        self.grad_reducer = FusedAllreduce(self.wire, shapes, cfg.comm.bucket_mb)
        # The loss, the control flags and the step's BN statistics go in fp32 (0.2 MiB for ResNet-50; a
        # 16-bit wire would round the logged loss, and the running statistics every step, where 1 rank sends
        # nothing), counted with the run's other communication.
        direct32 = direct_device_buffers(cfg.comm.cuda_aware, self.device, "fp32")[0]
        fp32_wire = WireReducer(topo, "fp32", cfg.comm.hierarchical, self.device, direct32)
        fp32_wire.bytes_sent, fp32_wire.calls = self.wire.bytes_sent, self.wire.calls
        self.exact = [self.loss_buf, self.control, *self.bn_stats.sums]
        self.exact_reducer = FusedAllreduce(fp32_wire, [t.shape for t in self.exact], cfg.comm.bucket_mb)
        self.timer = PhaseTimer(sync)
        self.clock = RunClock()  # seconds trained, over all resumes (checkpointed)
        self.evals: list[tuple[float, ...]] = []  # (step, epoch, top-1, train_s, elapsed_s), checkpointed
        self.resumed_from_step: int | None = None  # the restored checkpoint's step, as it counted steps
        self.step = 0
        self.pending_losses: list[float] = []  # since the last metrics record
        self.stop_requested = self.save_due = False
        self.stopped: str | None = None  # the stop signal's name once the run stopped for it
        self.last_save = time.monotonic()

    @property
    def target_step(self) -> int:
        """The step whose evaluation first reached log.target_top1 (-1: not yet)."""
        first = first_reaching(self.evals, self.cfg.log.target_top1)
        return -1 if first is None else int(first[0])

    def lr_at(self, step: int) -> float:
        return learning_rate(self.cfg.optim, self.epoch_at(step), self.cfg.run.epochs)

    def epoch_at(self, step: int) -> float:
        """Epochs done after ``step`` steps: images seen over the training set's size."""
        return step * self.cfg.data.batch_size / self.num_samples

    def damping_at_step(self, step: int) -> float:
        return damping_at(self.cfg.ngd.damping, self.cfg.ngd.damping_end, step, self.total_steps)

    def augment(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Running mixup, then random erasing of the mixed batch (off unless the run file turns them on)."""
        data, seed = self.cfg.data, self.cfg.run.seed
        first = self.topo.rank * self.local_batch  # global position of this rank's first image
        if self.mixup is not None:
            images, labels = self.mixup(images, labels, self.step, first)
        if data.random_erasing:
            erase_(
                images, seed, self.step, first, data.random_erasing, data.erasing_area, data.erasing_aspect
            )
        return images, labels

    def train_step(self, images: Tensor, labels: Tensor) -> float:
        """One step on this rank's part of the global batch; returns the global mean loss."""
        set_lr(self.optimizer, self.lr_at(self.step))
        images, labels = self.augment(*self._to_device(images, labels))
        scale = self.scaler.scale  # fp16: gradients and captured output gradients carry it
        capturing = self.ngd is not None and self.ngd.begin(self.step, grad_scale=len(images) / scale)
        with self.timer.phase("fwd_bwd"):
            self.optimizer.zero_grad(set_to_none=False)
            local_loss = torch.zeros((), dtype=torch.float64, device=self.device)  # as Python floats
            self.bn_stats.begin()
            for x, y in zip(images.split(self.micro_batch), labels.split(self.micro_batch), strict=True):
                with autocast(self.cfg.run.precision, self.device):
                    logits = self.model(x)
                    loss = self.criterion(logits, y) * (len(x) / len(images))
                self.bn_stats.collect()
                if capturing and self.cfg.ngd.fisher == "mc":
                    self._mc_backward(logits, scale * len(x) / len(images))
                (loss * scale if self.scaler.enabled else loss).backward()
                local_loss += loss.detach().double()
            grads = [self._grad(p) for p in self.params]
            fresh = self.ngd.take_factors() if self.ngd is not None else {}
            overflow = self.scaler.enabled and (unscale_(grads, scale) | unscale_(list(fresh.values()), 1.0))
        with self.timer.phase("comm"):
            self.loss_buf.copy_(local_loss)
            lost = not self.holds_locks()
            self.control.copy_(
                torch.tensor([self._stop_seen(), self._timed_save_due(), float(overflow), float(lost)])
            )
            self._average(grads, list(fresh.values()))
            self.bn_stats.means()  # in place: self.exact holds them
            self.exact_reducer.average_(self.exact)
        loss_value = float(self.loss_buf.item())
        stop, timed, overflowed, lost_anywhere = self.control.tolist()
        if lost_anywhere > 0:  # every rank at once: printed once, exit 2, no checkpoint
            raise AgreedError(self.lost_message())
        self.stop_requested, self.save_due = stop > 0, timed > 0
        skip = overflowed > 0  # fp16: skipped on every rank; no update, the due factors stay due
        self.bn_stats.finish(keep=not skip)  # before the scaler, which may raise (diverged)
        if self.scaler.enabled:
            self.scaler.update(skip)
        if self.ngd is not None:  # the hooks ran inside forward/backward, on a skipped step too
            hooks = self.ngd.capture.take_seconds()
            self.timer.add("factors", hooks)
            self.timer.add("fwd_bwd", -hooks)
        if not skip:
            if not math.isfinite(loss_value):
                raise Diverged(
                    f"the run diverged: the loss is {loss_value} at step {self.step} (try a lower optim.lr)"
                )
            if self.ngd is not None:
                self._precondition(fresh)
            with self.timer.phase("update"):
                self.optimizer.step()
                if self.cfg.optim.weight_rescaling:
                    rescale_weights(self.model)
        self.step += 1
        self.timer.count_step()
        if self.cfg.comm.check_replicas and self.step % self.cfg.comm.check_replicas == 0:
            self.check_replicas()
        return loss_value

    def holds_locks(self, strict: bool = False) -> bool:
        """Whether this rank's locks (if any) are still this run's (see :meth:`RunLock.confirm`)."""
        return all([lock.confirm(strict) for lock in self.locks])

    def lost_message(self) -> str:
        """Why the run stops when a rank found one of its locks taken over (or could not tell)."""
        lost = [lock.lost_message() for lock in self.locks if lock.lost]
        lost += [lock.lost_message() for lock in self.locks if not lock.lost and lock.error is not None]
        return lost[0] if lost else "run.name: another run took this run's directory over"

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return to_device(images, labels, self.device, self.cfg.run.channels_last)

    def _stop_seen(self) -> float:
        return float(self.stop is not None and self.stop.received is not None)

    def _timed_save_due(self) -> float:
        minutes = self.cfg.checkpoint.every_minutes
        due = minutes and self.topo.rank == 0 and time.monotonic() - self.last_save >= 60 * minutes
        return float(bool(due))

    def check_replicas(self) -> None:
        """Raise on every rank if any rank's parameters, BatchNorm running statistics or optimizer state
        differ from rank 0's."""
        digest = hashlib.sha256()
        for t in [*self.model.parameters(), *self.float_buffers, *self.optimizer_tensors()]:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        digests = self.topo.world.allgather(digest.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(f"replicas diverged at step {self.step}: ranks {differ} differ from rank 0")

    def optimizer_tensors(self) -> list[Tensor]:
        return [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]

    def _mc_backward(self, logits: Tensor, scale: float) -> None:
        """Monte Carlo Fisher: G from gradients at labels sampled from the model (one extra backward)."""
        assert self.ngd is not None
        sampled = mc_labels(logits, self.mc_rng)
        # the loss in fp32: fp16 would overflow once multiplied by the loss scale
        mc_loss = nn.functional.cross_entropy(logits.float(), sampled) * scale
        self.ngd.capture.collect_grads = True
        torch.autograd.grad(mc_loss, self.params, retain_graph=True, allow_unused=True)
        self.ngd.capture.collect_grads = False  # the training backward that follows adds no G

    def _average(self, grads: list[Tensor], factors: list[Tensor]) -> None:
        """Phase 2: gradients and refreshed factors (packed triangles) in one fused pass."""
        if not factors or self.topo.size == 1 or factors[0].dtype != torch.float32:
            self.grad_reducer.average_(grads)  # planned once for the gradients' shapes
            average_symmetric_(factors, self.wire, self.cfg.comm.bucket_mb)  # fp64 factors travel apart
            return
        packed = pack_factors(factors)
        both = grads + packed
        FusedAllreduce(self.wire, [t.shape for t in both], self.cfg.comm.bucket_mb).average_(both)
        unpack_factors(packed, factors)

    def _precondition(self, fresh: dict[tuple[str, str], Tensor]) -> None:
        """Phase 3: invert the refreshed factors this rank owns, precondition, share the results."""
        assert self.ngd is not None
        damping = self.damping_at_step(self.step)
        report = self.ngd.step(self.step, damping, fresh)
        self.timer.add("inverse", report.inverse_seconds)
        t0 = time.perf_counter()
        self._share_preconditioned()
        self.timer.add("precondition", report.precondition_seconds)
        self.timer.add("comm", time.perf_counter() - t0)
        self.ngd_counts.update(
            refreshed=report.refreshed,
            inverted=report.inverted,
            fp64_retries=report.retried_fp64,
            failed=report.failed,
        )

    def _share_preconditioned(self) -> None:
        """Phase 3d: every owner's preconditioned gradients reach every rank (one allgatherv)."""
        if self.topo.size == 1:
            return
        grads = [[self._grad(p) for p in params] for params in self.owner_grads]
        counts = [sum(g.numel() for g in gs) for gs in grads]
        mine = grads[self.topo.rank]
        staged = self.wire.new_buffer(counts[self.topo.rank])
        everything = self.wire.allgatherv(pack(mine, staged), counts)
        unpack(everything, [g for gs in grads for g in gs])

    @staticmethod
    def _grad(p: nn.Parameter) -> Tensor:
        if p.grad is None:  # a parameter the forward pass did not reach
            p.grad = torch.zeros_like(p)
        return p.grad

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 (%) on the whole validation set, summed over ranks, and the number of
        images whose logits hold inf or NaN (an fp16 forward can overflow; their loss is then not finite)."""
        self.model.eval()
        found = evaluation_batches(
            self.cfg.data, self.val_set, self.local_batch, self.topo.rank, self.topo.size
        )
        mine = inference.evaluate(
            self.model, (self._to_device(x, y) for x, y in found), self.cfg.run.precision, self.device
        )
        self.model.train()
        sums = [mine.images, mine.loss_sum, mine.top1_hits, mine.top5_hits, mine.nonfinite_images]
        count, loss_sum, top1, top5, nonfinite = allreduce_sum(sums, self.topo.world)
        n = max(count, 1.0)
        return {
            "val_loss": loss_sum / n,
            "val_top1": 100 * top1 / n,
            "val_top5": 100 * top5 / n,
            "val_images": int(count),
            "val_nonfinite_images": int(nonfinite),
        }

    def train(self) -> dict[str, Any]:
        """Run every step of the run; returns the last train and eval figures."""
        cfg, batch, n = self.cfg, self.cfg.data.batch_size, self.num_samples
        last: dict[str, Any] = {}
        self.timer.take()  # set-up and restore (minutes, for a large checkpoint) are not training throughput
        batches = self.loader.batches(self.step, self.total_steps)
        self.clock.start()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            with self.timer.phase("data"):
                _, images, labels = next(batches)
            self.pending_losses.append(self.train_step(images, labels))
            self.clock.add_step(time.perf_counter() - t0)
            done = sharding.epochs_done(self.step, batch, n)  # this step ended epoch `done` if it rose
            epoch_done = done > sharding.epochs_done(self.step - 1, batch, n)
            if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps or epoch_done:
                last = log_train(self, self.epoch_at(self.step), self.pending_losses)
                self.pending_losses = []
            every = cfg.log.eval_every_epochs
            if self.step == self.total_steps or (epoch_done and every and done % every == 0):
                last.update(log_eval(self, self.epoch_at(self.step)))
                self.timer.take()  # evaluation time is not training throughput
            reason = self._save_reason()
            if reason:
                self.save_checkpoint(reason)
            if self.stop_requested and self.stop is not None:
                self.stopped = self.stop.name() if self.stop.received else "a signal to another rank"
                break
        batches.close()
        return last

    def _save_reason(self) -> str | None:
        """Why a checkpoint is written after this step, if one is (the same answer on every rank)."""
        ckpt = self.cfg.checkpoint
        if not self.checkpoints:
            return None
        if self.stop_requested:
            return "stop signal"
        if ckpt.every_steps and self.step % ckpt.every_steps == 0:
            return "every_steps"
        if self.save_due:
            return "every_minutes"
        if ckpt.at_end and self.step == self.total_steps:
            return "end of run"
        return None

    def save_checkpoint(self, reason: str) -> Path:
        """Write a checkpoint of the current state (collective) and log it."""
        t0 = time.perf_counter()
        clock = self.clock.fields()  # what the checkpoint keeps and its record says: a resume goes on from it
        path = state.save(self, self.cfg.checkpoint_dir, self.cfg.checkpoint.keep_last, clock)
        seconds = time.perf_counter() - t0
        self.last_save = time.monotonic()
        if self.topo.rank == 0:
            mib = path.stat().st_size / 2**20
            self.log.record(
                kind="checkpoint",
                step=self.step,
                path=str(path),
                reason=reason,
                seconds=seconds,
                mib=mib,
                **clock,
            )
            self.log.say(
                f"checkpoint step {self.step} -> {path} ({reason}; {mib:.1f} MiB in {seconds:.2f} s)"
            )
        self.timer.take()  # checkpoint time is not training throughput
        return path


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory (rank 0 only, holding the folders' locks), once a shared checkpoint
    folder was found to be this run's (:func:`state.check_folder_owner`); create the checkpoint folder
    too, so that one that cannot be made stops the run now, not at its first checkpoint, and remove the
    temporary files of checkpoint writers that died there."""
    state.check_folder_owner(cfg)
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "metrics.jsonl").is_dir():
            raise IsADirectoryError(f"{run_dir / 'metrics.jsonl'} is a folder")
    except OSError as exc:
        raise UserError(f"run.output_dir = {cfg.run.output_dir!r}: cannot write {run_dir}: {exc}") from None
    try:
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(cfg.checkpoint_dir)
    except OSError as exc:
        key = "checkpoint.dir" if cfg.checkpoint.dir else "run.output_dir"
        raise UserError(f"{key}: cannot use the checkpoint folder {cfg.checkpoint_dir}: {exc}") from None
    return run_dir


def record_run_file(cfg: Config, resolved_toml: str) -> None:
    """Write the resolved run file as ``<run dir>/config.toml`` (rank 0), once the run is known to start:
    a run refused at its checkpoints leaves the previous run's record as it was."""
    path = cfg.run_dir / "config.toml"
    try:
        path.write_text(resolved_toml, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"run.output_dir = {cfg.run.output_dir!r}: cannot write {path}: {exc}") from None
