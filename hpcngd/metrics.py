"""Timers per phase, the rank-0 console line and ``metrics.jsonl``.

One timer (:class:`PhaseTimer`) for every phase of a step; one writer (:class:`MetricsLog`) that only
rank 0 holds open. ``metrics.jsonl`` gets one JSON object per line: ``"kind": "train"`` records every
``log.every_steps`` steps and ``"kind": "eval"`` records after each evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PHASES = ("data", "fwd_bwd", "factors", "comm", "inverse", "precondition", "update")


class PhaseTimer:
    """Wall time per named phase, accumulated until :meth:`take`."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
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
        self.file: IO[str] | None = None
        if active and path is not None:
            self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def say(self, line: str) -> None:
        """Print one console line (rank 0 only)."""
        if self.active:
            print(line, file=self.stream, flush=True)

    def record(self, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl (rank 0 only)."""
        if self.file is not None:
            self.file.write(json.dumps(fields, sort_keys=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
