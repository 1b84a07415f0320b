"""The exceptions batchrun raises to its callers, each with the exit code the CLI gives it.

    UsageError (exit 2): a job file, flag, input, model or checkpoint a user can fix; the
        message says how. ConfigError, InputError, ModelError and CheckpointError are kinds
        of it.
    JobInterrupted (exit 4): a signal, an engine failure or a full disk stopped the job;
        every finished row is saved, and running it again with resume=True continues.
Anything else is a bug (exit 1).
"""

from __future__ import annotations

from typing import Any


class BatchrunError(Exception):
    """Base of batchrun's own exceptions. `exit_code` is the CLI's exit code for it."""

    exit_code = 1


class UsageError(BatchrunError):
    """Something the user can fix: the message says what and how (exit code 2)."""

    exit_code = 2


class JobInterrupted(BatchrunError):
    """The job stopped before every row was done (exit code 4); nothing finished is lost.
    `summary` (a batchrun.Summary) counts what was done; run again with resume=True."""

    exit_code = 4

    def __init__(self, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.summary = summary
