"""The one error type for bad user input (run files, data, checkpoints).

A ``UserError`` is printed as one line by the CLI (no traceback) and ends the job with exit code 2 on
every rank. Anything else that escapes is a bug or an environment failure and aborts the whole MPI
job (see ``cli.py``).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a run file key, a data folder, a checkpoint file."""


class ConfigError(UserError):
    """A run-file value that is unknown, of the wrong type, out of range or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, corrupted, of another schema or another model."""


class AgreedError(UserError):
    """A UserError raised on every rank at once: printed once by rank 0, exit 2 everywhere, no abort."""
