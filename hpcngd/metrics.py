"""Timers per phase, the rank-0 console line and ``metrics.jsonl``.

One timer (:class:`PhaseTimer`) for every phase of a step; one writer (:class:`MetricsLog`) that only
rank 0 holds open. ``metrics.jsonl`` gets one JSON object per line: ``"kind": "train"`` records every
``log.every_steps`` steps and ``"kind": "eval"`` records after each evaluation. One clock
(:class:`RunClock`) for the seconds a run has trained, summed over its resumes.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from hpcngd.errors import UserError

PHASES = ("data", "fwd_bwd", "factors", "comm", "inverse", "precondition", "update")
NGD_COUNTS = ("refreshed", "inverted", "fp64_retries", "failed")  # SP-NGD events, per record


class PhaseTimer:
    """Wall time per named phase, accumulated until :meth:`take`.

    Args:
        sync: called at both ends of a phase (``torch.cuda.synchronize`` on a GPU, so that a phase is
            charged with the kernels it queued, not with those of the phase before).
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.started = time.perf_counter()
        self.sync = sync or (lambda: None)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        """Book time measured elsewhere to ``name``."""
        self.totals[name] += seconds

    def count_step(self) -> None:
        self.steps += 1

    def take(self) -> tuple[int, float, dict[str, float]]:
        """(steps, wall seconds, mean ms per step of each phase) since the last take; then reset."""
        now = time.perf_counter()
        steps, wall = self.steps, now - self.started
        per_step = {k: 1e3 * self.totals.get(k, 0.0) / max(steps, 1) for k in PHASES}
        self.totals.clear()
        self.steps = 0
        self.started = now
        return steps, wall, per_step


class RunClock:
    """Seconds a run has spent training, summed over all its resumes: what a time-to-accuracy figure counts.

    ``train_s``: the training steps alone (loading, forward and backward, communication, update).
    ``elapsed_s``: the whole training loop, its evaluations, checkpoints and records too. Neither counts
    set-up, restoring a checkpoint, or the time between a stop and its resume. A checkpoint keeps both as
    they were when its writing began (as its record does); a resume continues from there.
    """

    def __init__(self) -> None:
        self.train_s = 0.0
        self.elapsed_before = 0.0  # the loop's seconds up to this process's start of the loop
        self.loop_started: float | None = None

    def start(self) -> None:
        """The training loop starts (or resumes) now."""
        self.loop_started = time.perf_counter()

    def add_step(self, seconds: float) -> None:
        self.train_s += seconds

    @property
    def elapsed_s(self) -> float:
        running = 0.0 if self.loop_started is None else time.perf_counter() - self.loop_started
        return self.elapsed_before + running

    def fields(self) -> dict[str, float]:
        """The clock as record fields (and checkpoint attributes)."""
        return {"train_s": round(self.train_s, 3), "elapsed_s": round(self.elapsed_s, 3)}

    def load(self, train_s: float, elapsed_s: float) -> None:
        """Continue from a checkpoint's clock (before the loop starts)."""
        self.train_s, self.elapsed_before = float(train_s), float(elapsed_s)


def clock_phrase(train_s: float, elapsed_s: float) -> str:
    """A run's clock in a console line."""
    return f"{duration(train_s)} of training, {duration(elapsed_s)} with evaluations and checkpoints"


def duration(seconds: float) -> str:
    """``42.0 s``, ``5.5 min`` or ``2.25 h``: a clock reading for a console line."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


class MetricsLog:
    """Rank 0's console lines and JSON-lines file; a no-op on other ranks.

    Args:
        path: the ``metrics.jsonl`` to write (``None``: console only).
        active: whether this rank writes (rank 0).
        stream: console stream.
    """

    def __init__(self, path: Path | None, active: bool, stream: IO[str] | None = None) -> None:
        self.active = active
        self.stream = stream or sys.stdout
        self.path = path if active else None
        self.file: IO[str] | None = None

    def open(self, resume_step: int | None = None, checkpoint: str | None = None) -> None:
        """Start the file: a fresh one, or (resuming from the checkpoint of step ``resume_step``, file name
        ``checkpoint``) the old one, appended to, without the records written after that checkpoint by the
        run that stopped: those after its record, or (no record: a crash right after the write) of later
        steps. Not by step alone: a resume with another global batch numbers the steps anew."""
        if self.path is not None:
            with _writing(self.path):
                self._open(self.path, resume_step, checkpoint)

    def _open(self, path: Path, resume_step: int | None, checkpoint: str | None) -> None:
        if resume_step is None or not path.exists():
            if path.is_file() and not path.is_symlink():
                # A new file, not the old one truncated: a run whose directory this run took over (it was
                # suspended) may still append one record through its open handle; that goes to its file.
                path.unlink()
            self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        mark = next((i for i in range(len(lines) - 1, -1, -1) if _writes(lines[i], checkpoint)), None)
        if mark is None:  # no record of that checkpoint (a crash right after its write): by step
            kept = [line for line in lines if line.endswith("\n") and _step(line) <= resume_step]
        else:  # everything up to the checkpoint's record
            kept = [line for line in lines[: mark + 1] if line.endswith("\n")]  # a torn last line is dropped
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")  # the old file stays whole until the rename
        tmp.replace(path)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def say(self, line: str) -> None:
        """Print one console line (rank 0 only)."""
        if self.active:
            print(line, file=self.stream, flush=True)

    def record(self, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl (rank 0 only), with ``time``: when, in Unix seconds
        (across resumes too, for plots against wall-clock time)."""
        if self.file is None and self.path is not None:
            self.open()
        if self.file is not None:
            with _writing(self.path):
                line = json.dumps({**fields, "time": round(time.time(), 3)}, sort_keys=False)
                self.file.write(line + "\n")
                self.file.flush()

    def close(self) -> None:
        path, self.path = self.path, None  # a record after close() must not start the file again
        file, self.file = self.file, None
        if file is not None:
            with _writing(path):  # the last lines are flushed here
                file.close()


@contextmanager
def _writing(path: Path | None) -> Iterator[None]:
    """A failed write (a full disk, a quota, a file system gone) is one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _writes(line: str, checkpoint: str | None) -> bool:
    """Whether ``line`` is the record of writing the checkpoint file named ``checkpoint``."""
    if checkpoint is None or checkpoint not in line:
        return False  # most lines, not parsed
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(rec, dict)
        and rec.get("kind") == "checkpoint"
        and Path(str(rec.get("path"))).name == checkpoint
    )


def _step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return float("inf")  # not a record of ours: dropped
