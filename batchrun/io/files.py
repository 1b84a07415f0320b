"""Local files written so that a reader never sees half of one: a temporary name beside the
target (renamed into place once complete) and an fsync of the folder that makes a rename
durable."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: same folder (a rename across
    file systems is not atomic), hidden, named after this process. Temp files that killed
    writers left are removed first: the output path is this job's alone."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a rename, a new file) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
