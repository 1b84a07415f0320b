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

# The exit codes of `batchrun run` (and of a job's outcome), the one place they are defined.
EXIT_OK = 0  # every row succeeded, or the job had already finished
EXIT_INTERNAL = 1  # a bug
EXIT_USAGE = 2  # a job file, flag, input, model or checkpoint the user can fix
EXIT_ROW_ERRORS = 3  # finished, but some rows failed
EXIT_INTERRUPTED = 4  # a signal, an engine failure or a full disk: resumable


class BatchrunError(Exception):
    """Base of batchrun's own exceptions. `exit_code` is the CLI's exit code for it."""

    exit_code = EXIT_INTERNAL


class UsageError(BatchrunError):
    """Something the user can fix: the message says what and how (exit code 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A job file or flag a user can fix; the message says how."""


class JobInterrupted(BatchrunError):
    """The job stopped before every row was done (exit code 4); nothing finished is lost.
    `summary` (a batchrun.Summary) counts what was done; run again with resume=True."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.summary = summary
