"""What every engine step did, recorded as the run goes: the summary's batch figures, and
the per-step trace (io/output/trace.py) that the HTML report is drawn from."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..engine.base import StepOutput
from ..io.output.trace import TRACE_SCHEMA

# Steps buffered before they go to the sink: a few hundred KB at most, and half a minute's
# at most, so that a killed run's report still shows all but its last seconds.
FLUSH_STEPS = 8192
FLUSH_SECONDS = 30.0


class StepTrace:
    """The running batch of every engine step, for the summary: its mean over the run and
    over the run's last 10% of time (the tail, where a bad order leaves long decodes alone);
    the shared prefixes found light and deferred as the run went; and each step's record
    (TRACE_SCHEMA), handed to `sink` in batches (kept in memory when there is none: a Ray
    replica sends its pieces' steps back with their results)."""

    TAIL = 0.1

    def __init__(self, sink: Callable[[pa.Table], None] | None = None,
                 replica: int = -1) -> None:
        self._times: list[float] = []
        self._sizes: list[int] = []
        self._deferred_prefixes = 0
        self.first_step_at: float | None = None  # time.monotonic() when the first step began
        self.sink = sink
        self.replica = replica
        self._step_began = 0.0
        self._rows: list[tuple[float, float, int, int, int, float | None, int]] = []
        self._kept: list[pa.Table] = []
        self._flushed_at = time.monotonic()

    def stepping(self) -> None:
        """An engine step starts (the summary's time to the first step)."""
        self._step_began = time.monotonic()
        if self.first_step_at is None:
            self.first_step_at = self._step_began

    def record(self, step: StepOutput) -> None:
        now = time.monotonic()
        self._times.append(now)
        self._sizes.append(step.batch_size)
        self._rows.append((time.time(), now - self._step_began, step.batch_size,
                           step.prompt_tokens, step.completion_tokens, step.kv_usage,
                           step.preempted))
        if len(self._rows) >= FLUSH_STEPS or (
                self.sink is not None and now - self._flushed_at >= FLUSH_SECONDS):
            self.flush()

    def prefix_deferred(self) -> None:
        self._deferred_prefixes += 1

    def flush(self) -> None:
        """Hand the steps recorded since the last flush to the sink (or keep them)."""
        self._flushed_at = time.monotonic()
        if not self._rows:
            return
        columns = list(zip(*self._rows, strict=True))
        n = len(self._rows)
        table = pa.table([*(pa.array(c, f.type) for c, f in zip(columns, TRACE_SCHEMA,
                                                                  strict=False)),
                          pa.array([self.replica] * n, pa.int16()),
                          pa.array([0] * n, pa.int16())], schema=TRACE_SCHEMA)
        self._rows = []
        self.add(table)

    def add(self, steps: pa.Table) -> None:
        """Steps recorded elsewhere (a replica's) into this trace's sink."""
        if self.sink is not None:
            self.sink(steps)
        else:
            self._kept.append(steps)

    def kept(self) -> pa.Table | None:
        """The steps kept in memory (no sink), flushed first; None if there are none."""
        self.flush()
        return pa.concat_tables(self._kept) if self._kept else None

    def figures(self) -> dict[str, float]:
        deferred = {"deferred_light_prefixes": self._deferred_prefixes}
        if not self._sizes:
            return {"steps": 0, "mean_batch": 0.0, "tail_batch": 0.0, **deferred}
        times, sizes = np.array(self._times), np.array(self._sizes, dtype=np.float64)
        tail = sizes[times >= times[-1] - self.TAIL * (times[-1] - times[0])]
        return {"steps": len(sizes), "mean_batch": round(float(sizes.mean()), 2),
                "tail_batch": round(float(tail.mean()), 2), **deferred}
