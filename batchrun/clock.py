"""Seconds per stage of a job (read, tokenize, shard, plan, run, write): the summary's
rows/s per stage. Every stage takes the job's one clock."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_END = object()


class StageClock:
    """Seconds spent per stage (read, tokenize, shard, plan, run, write), for the summary's
    rows/s per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        # stage -> [first start, last end], seconds since the epoch: the report's time bands
        self.spans: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        span = self.spans.setdefault(stage, [time.time(), 0.0])
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
            span[1] = time.time()

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
