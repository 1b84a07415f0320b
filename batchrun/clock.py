"""Seconds per stage of a job (read, tokenize, shard, plan, run, write): the summary's
rows/s per stage. Every stage takes the job's one clock."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_END = object()
SPAN_GAP_S = 1.0
MAX_SPANS = 100


class StageClock:
    """Seconds spent per stage (read, tokenize, shard, plan, run, write), for the summary's
    rows/s per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        # stage -> its [start, end] spans, seconds since the epoch: the report's time bands
        self.spans: dict[str, list[list[float]]] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0, began = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
            self._span(stage, began, time.time())

    def _span(self, stage: str, began: float, ended: float) -> None:
        """Spans of a stage less than SPAN_GAP_S apart are one (a stage timed per batch
        stays a few spans), and past MAX_SPANS the last one grows."""
        spans = self.spans.setdefault(stage, [])
        if spans and (began - spans[-1][1] < SPAN_GAP_S or len(spans) >= MAX_SPANS):
            spans[-1][1] = ended
        else:
            spans.append([began, ended])

    def timed(self, stage: str, items: Iterable[T]) -> Iterator[T]:
        """`items`, with the time spent producing each counted to `stage`."""
        it = iter(items)
        while True:
            with self(stage):
                item = next(it, _END)
            if item is _END:
                return
            yield item

    def figures(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

    def stage_figures(self, rows: int) -> dict[str, dict[str, float | None]]:
        """Seconds and rows/s per stage, for `rows` rows: a summary's "stages"."""
        return {stage: {"seconds": s, "rows_per_s": round(rows / s) if s > 0 else None}
                for stage, s in self.figures().items()}
