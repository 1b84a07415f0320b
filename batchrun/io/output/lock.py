"""One run of a job at a time: an flock beside its output."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ...errors import CheckpointError


class JobLock:
    """One run of a job (one output path) at a time.

    Two runs of one job (a nightly cron run that overran into the next night's, an Airflow
    retry next to a stuck attempt) would both append to its journals and write its output.
    The lock is an flock on a hidden file next to the output: the kernel releases it when its
    process dies, kill -9 included, so a killed run never leaves a stale lock behind."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(f".{output.name}.lock")
        self._fd: int | None = None

    def __enter__(self) -> JobLock:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CheckpointError(
                    f"cannot create {self.path} ({e.strerror or e}); check that "
                    f"{self.path.parent} is writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"another batchrun is running this job (pid {holder}, lock {self.path}); "
                    "wait for it to finish, or stop it and re-run with --resume") from None
            # The holder may have released and removed the file between our open and flock:
            # then this lock is on a file nobody else will find. Take the current one.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still held: nobody can take the file unlinked
            os.close(self._fd)
            self._fd = None
