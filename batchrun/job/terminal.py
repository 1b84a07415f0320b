"""What reaches the user's terminal while a job runs: batchrun's own lines only.

vLLM, torch and the C++ libraries under them write warnings a user cannot act on (Triton's
CPU backend, NUMA binding, LD_PRELOAD advice, deprecations, weight-loading bars), some from
Python and some straight to file descriptor 2. So while a job runs quietly, the process's
stdout and stderr descriptors point at a log file, and batchrun writes its own lines
(progress, signal notices) to `terminal()`, a stream on the original stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_terminal: TextIO | None = None


def terminal() -> TextIO:
    """Where batchrun's own lines go: the real stderr, also while engine output is captured."""
    return _terminal if _terminal is not None else sys.stderr


def terminal_fd() -> int:
    """terminal() as a file descriptor, for signal handlers (which must not use Python I/O)."""
    return _terminal.fileno() if _terminal is not None else 2


def engine_log_path(output: Path) -> Path:
    return output.with_name(output.name + ".log")


@contextlib.contextmanager
def output_to_log(path: Path | None) -> Iterator[None]:
    """Send everything the process writes to fds 1 and 2 to `path` (appended) until the block
    ends. None, or a capture already active: leave them alone."""
    global _terminal
    if path is None or _terminal is not None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    _terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8",
                          errors="replace")
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        stream, _terminal = _terminal, None
        with contextlib.suppress(OSError):
            stream.close()
