"""Stop signals: SIGTERM and SIGUSR1 (what Slurm and PBS send before they kill a job) are noted, not obeyed.

The handler only records the signal. The trainer sends the note along with the loss in the step's
allreduce, so every rank learns at the same step boundary that some rank was told to stop; then all
ranks write a checkpoint together and exit with ``EXIT_STOPPED`` (see README, "Exit codes").
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Installs the handlers while in use (``with``); ``received`` is the first signal seen, or None.

    Args:
        ignore_after: on leaving, ignore the signals instead of restoring the previous handlers. For the
            command's own run: once it is over a late signal has nothing to stop, and the default action
            would kill the ranks in MPI's finalize, so that a scheduler records a finished job as failed.
    """

    def __init__(self, ignore_after: bool = False) -> None:
        self.received: int | None = None
        self.ignore_after = ignore_after
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.ignore_after else handler)

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "none"
