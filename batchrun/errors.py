"""Every exception batchrun raises to its callers, each with the exit code the CLI gives it,
and the two helpers that put an error or a value into a one-line message.

    UsageError (exit 2): a job file, flag, input, model, checkpoint or setting a user can fix;
        the message says how. ConfigError (AttentionUnavailable), InputError, ModelError and
        CheckpointError are kinds of it.
    JobInterrupted (exit 4): a signal, an engine failure or a full disk stopped the job;
        every finished row is saved, and running it again with resume=True continues.
    EngineDiedError (exit 4): the engine can no longer run requests; the job it ran stops as
        JobInterrupted does (status "engine_failed"), its finished rows saved.
Anything else is a bug (exit 1).

Standard library only: the Airflow operator (batchrun/airflow.py) imports this in Airflow's
environment, which has neither vLLM nor pyarrow.
"""

from __future__ import annotations

import json
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


class AttentionUnavailable(ConfigError):
    """``--attention prefix`` on a platform without batchrun's shared-prefix attention."""


class InputError(UsageError):
    """The input file as a whole cannot be read (the CLI exits with code 2). The message is one
    line that names the file and the fix."""


class ModelError(UsageError, RuntimeError):
    """The model cannot be found or prepared; the message says how to fix it."""


class CheckpointError(UsageError, RuntimeError):
    """The checkpoint cannot be used as asked; the message says what to do instead."""


class JobInterrupted(BatchrunError):
    """The job stopped before every row was done (exit code 4); nothing finished is lost.
    `summary` (a batchrun.Summary) counts what was done; run again with resume=True."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.summary = summary


class EngineDiedError(BatchrunError, RuntimeError):
    """The engine can no longer run requests (process died, out of memory). Not row-specific:
    the job stops with its finished rows saved, and a resumed run continues (exit code 4)."""

    exit_code = EXIT_INTERRUPTED


def one_line(message: object, limit: int | None = 300) -> str:
    """A message (or an exception's) on one line: every run of whitespace, line breaks
    included, becomes one space; "no details" when it says nothing; at most `limit`
    characters ("..." ends a message cut short; None: no limit)."""
    text = " ".join(str(message).split()) or "no details"
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON for an error message: one line, short, always valid UTF-8."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    # A lone surrogate from a "\ud800" escape cannot be stored in an Arrow string.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
