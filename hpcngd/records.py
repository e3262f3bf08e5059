"""What a training run reports: the train, eval and target records of ``metrics.jsonl`` and their
console lines.

Called by :meth:`hpcngd.train.Trainer.train`; the writer and the phase timer are :mod:`hpcngd.metrics`.
A train record holds the mean loss, learning rate, images/s and ms per phase since the last record,
communication bytes and calls per level, the fp16 loss scale and skipped steps, and the SP-NGD counts
(inversions summed over ranks: collective). Every record holds the run's clock (:class:`RunClock`):
``train_s`` and ``elapsed_s``, over all resumes. The first evaluation that reaches ``log.target_top1``
writes a target record: the time to accuracy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from hpcngd.comm.collectives import allreduce_sum
from hpcngd.metrics import NGD_COUNTS, clock_phrase, duration

if TYPE_CHECKING:
    from hpcngd.train import Trainer


def mean_finite(losses: list[float]) -> float:
    """Mean of the finite losses (an fp16 step skipped for overflow may have none), NaN if none."""
    finite = [v for v in losses if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def log_train(t: Trainer, epoch: float, losses: list[float]) -> dict[str, Any]:
    """The train record (metrics.jsonl) and progress line of the steps since the last one; returns it."""
    steps, wall, ms = t.timer.take()
    rec = {
        "kind": "train",
        "step": t.step,
        "epoch": round(epoch, 4),
        "loss": mean_finite(losses),
        "lr": t.lr_at(t.step - 1),
        "images_per_s": steps * t.cfg.data.batch_size / max(wall, 1e-9),
        "step_ms": 1e3 * wall / max(steps, 1),
        **{f"{k}_ms": v for k, v in ms.items()},
        "comm_bytes": sum(t.wire.bytes_sent.values()),
        "comm_calls": sum(t.wire.calls.values()),
        **{f"comm_bytes_{level}": n for level, n in sorted(t.wire.bytes_sent.items())},
        **t.clock.fields(),
    }
    if t.scaler.enabled:
        rec["loss_scale"] = t.scaler.scale
        rec["amp_skipped"] = t.scaler.take_skipped()
    if t.ngd is not None:
        # Each rank counts the inversions it did; the record holds the whole job's.
        done = allreduce_sum([t.ngd_counts[k] for k in NGD_COUNTS[1:]], t.topo.world)
        rec["ngd_refreshed"] = t.ngd_counts["refreshed"]
        rec.update({f"ngd_{k}": int(v) for k, v in zip(NGD_COUNTS[1:], done, strict=True)})
        rec["ngd_damping"] = t.damping_at_step(t.step - 1)
        t.ngd_counts.clear()
    t.log.record(**rec)
    phases = " ".join(
        f"{k} {v:.0f}ms" for k, v in ms.items() if v or k in ("data", "fwd_bwd", "comm", "update")
    )
    if t.scaler.enabled:
        phases += f" | loss scale {rec['loss_scale']:g} skipped {rec['amp_skipped']}"
    if t.ngd is not None:
        phases += f" | factors refreshed {rec['ngd_refreshed']} inverted {rec['ngd_inverted']}"
    left = (t.total_steps - t.step) * wall / max(steps, 1)  # the steps to go at this record's pace
    t.log.say(
        f"epoch {epoch:6.2f}/{t.cfg.run.epochs} step {t.step}/{t.total_steps} "
        f"loss {rec['loss']:.4f} lr {rec['lr']:.4g} img/s {rec['images_per_s']:.0f} "
        f"left {duration(left)} | {phases}"
    )
    return rec


def log_eval(t: Trainer, epoch: float) -> dict[str, float]:
    """Evaluate (collective), then write the eval record and line; returns the figures."""
    res = t.evaluate()
    clock = t.clock.fields()
    t.log.record(kind="eval", step=t.step, epoch=round(epoch, 4), **res, **clock)
    t.log.say(
        f"eval  epoch {epoch:6.2f} step {t.step}: loss {res['val_loss']:.4f} "
        f"top1 {res['val_top1']:.2f}% top5 {res['val_top5']:.2f}% ({res['val_images']:.0f} images)"
        + (f"; {res['val_nonfinite_images']} with inf/NaN logits" if res["val_nonfinite_images"] else "")
    )
    t.evals.append((t.step, round(epoch, 4), res["val_top1"], clock["train_s"], clock["elapsed_s"]))
    target = t.cfg.log.target_top1
    if first_reaching(t.evals, target) is t.evals[-1]:  # this evaluation is the first to reach it
        t.log.record(
            kind="target",
            step=t.step,
            epoch=round(epoch, 4),
            target_top1=target,
            val_top1=res["val_top1"],
            **clock,
        )
        t.log.say(
            f"target top1 {target:g}% reached at step {t.step} (epoch {epoch:.2f}) after "
            + clock_phrase(clock["train_s"], clock["elapsed_s"])
        )
    return res


def first_reaching(evals: list[tuple[float, ...]], target: float) -> tuple[float, ...] | None:
    """The first evaluation (step, epoch, top-1, train_s, elapsed_s) whose top-1 reaches ``target``."""
    return next((e for e in evals if target and e[2] >= target), None)
