"""Progress for people and for logs: a rich bar on a terminal, plain periodic lines elsewhere
(cron mail and Airflow task logs do not render carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressReporter:
    def __init__(self, total: int | None, *, already_done: int = 0, interactive: bool | None = None,
                 interval_s: float = 30.0, stream: TextIO | None = None) -> None:
        self.total = total
        self.rows_done = already_done
        self._rows_done_at_start = already_done
        self._tokens = 0
        self._t0 = time.monotonic()
        self._stream = stream or sys.stderr
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._interval = interval_s
        self._last_line = self._t0
        self._bar = None
        if self._interactive:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]batchrun"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(file=self._stream), transient=False)
            self._task = self._bar.add_task("run", total=total, completed=already_done, tps="-")
            self._bar.start()

    def set_total(self, total: int) -> None:
        """The job's rows, once its read has ended (None until then: an early start)."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, rows: int, tokens: int) -> None:
        self.rows_done += rows
        self._tokens += tokens
        now = time.monotonic()
        tps = self._tokens / max(now - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.rows_done, tps=f"{tps:,.0f}")
        elif now - self._last_line >= self._interval:
            self._last_line = now
            self._stream.write(self.line() + "\n")
            self._stream.flush()

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = (self.rows_done - self._rows_done_at_start) / max(elapsed, 1e-9)
        if self.total is None:
            done = f"{self.rows_done} rows (the rest of the job is still being read)"
            eta = "unknown"
        else:
            left = self.total - self.rows_done
            eta = "0s" if left <= 0 else f"{left / rate:,.0f}s" if rate > 0 else "unknown"
            pct = 100.0 * self.rows_done / max(self.total, 1)
            done = f"{self.rows_done}/{self.total} rows ({pct:.1f}%)"
        return (f"batchrun: {done}, "
                f"{self._tokens / max(elapsed, 1e-9):,.0f} tok/s, elapsed {elapsed:,.0f}s, "
                f"eta {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:  # the last word in a log, whatever the interval
            self._stream.write(self.line() + "\n")
            self._stream.flush()
