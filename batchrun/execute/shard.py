"""Run one prepared shard on a started engine: its error rows, then its plan through the
streaming executor. The single-engine job runs its shards here one by one; each Ray replica
runs the pieces it is given here too (cluster/replicas.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..clock import StageClock
from ..engine.base import Engine
from ..errors import EngineDiedError
from ..ingest.prepare import PreparedJob, request_factory
from .executor import StreamingExecutor
from .prefix_figures import largest_prefixes
from .result_rows import SeveralInputs, error_results, results_table
from .stop import StopFlag
from .trace import StepTrace


@dataclass
class ShardRun:
    """What running one shard produced beyond its results."""

    plan: dict[str, Any]
    first_prompt: np.ndarray | None
    last_prompt: np.ndarray | None
    constrained: dict[str, int]
    logprobs_rows: int
    # The shard's largest shared prefixes (prefix_figures.largest_prefixes), for the report.
    prefixes: list[dict[str, int]] = field(default_factory=list)
    # Its engine steps (TRACE_SCHEMA) when run without a job's trace (on a Ray replica).
    steps: pa.Table | None = None


def run_shard(job: PreparedJob, engine: Engine | None,
              on_results: Callable[[pa.Table], None], *, stop: StopFlag | None = None,
              grace_s: float = 30.0, trace: StepTrace | None = None,
              clock: StageClock | None = None) -> ShardRun:
    """Run a prepared shard (or whole small job) on a started engine: its error rows first,
    then its plan through the streaming executor. Every result reaches `on_results` as
    RESULT_SCHEMA rows (row numbers are the input's). With no `trace`, the steps are kept
    in the ShardRun."""
    errors = job.request_errors()
    if errors:
        on_results(error_results(job, errors))
    plan: dict[str, Any] = {"planned": False}
    prefixes: list[dict[str, int]] = []
    own_trace = trace is None
    trace = trace or StepTrace()
    if len(job.tokens.positions):
        if engine is None:
            raise EngineDiedError("no engine to run the job on")
        info = engine.info
        clock = clock or StageClock()
        with clock("plan"):
            groups, plan = job.run_groups(info.block_size, info.kv_capacity_tokens)
            prefixes = largest_prefixes(groups)
        several = SeveralInputs(job) if job.tokens.items is not None else None
        executor = StreamingExecutor(
            engine, groups, request_factory(job),
            lambda batch: on_results(results_table(job, batch, several)),
            stop=stop, grace_s=grace_s, trace=trace)
        with clock("run"):
            executor.run()
    logprobs_rows = sum(job.rows_served(i) for i, k in enumerate(job.logprobs) if k is not None)
    return ShardRun(plan, *job.first_and_last_prompts(), job.constrained_counts(),
                    logprobs_rows, prefixes, trace.kept() if own_trace else None)
