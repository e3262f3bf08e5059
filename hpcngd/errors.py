"""The one error type for bad user input (run files, data, checkpoints).

A ``UserError`` is printed as one line by the CLI (no traceback) and ends the job with exit code 2 on
every rank (a :class:`Diverged` run: 4). Anything else that escapes is a bug or an environment failure
and aborts the whole MPI job (see ``cli.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """Bad input from the user: a run file key, a data folder, a checkpoint file; or an output file that
    cannot be written (a full disk), named with its path."""


class ConfigError(UserError):
    """A run-file value that is unknown, of the wrong type, out of range or inconsistent."""


class InvalidToml(ConfigError):
    """A run file that is not TOML at all (a syntax error)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, corrupted, of another schema or another model."""


class AgreedError(UserError):
    """A UserError raised on every rank at once: printed once by rank 0, exit 2 everywhere (a Diverged
    run: 4), no abort."""


class Diverged(AgreedError):
    """Training diverged: a non-finite global loss, fp16 gradients overflowing step after step, or NaN/Inf
    in the state a checkpoint would save (found by an allgather). Every rank sees the same reduced
    figures, so every rank raises it at the same step: printed once by rank 0, exit 4 everywhere (not 2:
    the input was valid; resuming would diverge again), no abort."""


def agree(comm: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank of ``comm``; a UserError on any rank is raised on all as AgreedError.

    Collective (one allgather), so no rank is left waiting when another one meets bad input.
    """
    try:
        result, error = fn(), None
    except UserError as exc:
        result, error = None, str(exc)
    errors = comm.allgather(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise AgreedError(first)
    return result  # type: ignore[return-value]
