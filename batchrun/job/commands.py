"""The commands that look at a job without running it: `batchrun plan` (describe_plan)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EngineKind, JobConfig
from ..ingest.prepare import prepare_shard, read_into_shards
from ..plan.job_figures import JobPlanFigures
from .engine_setup import engine_sizing
from .summary import peak_rss_bytes


def describe_plan(config: JobConfig, engine_kind: str = EngineKind.VLLM) -> dict[str, Any]:
    """The plan's figures for `batchrun plan`, computed without starting an engine: the job
    read, tokenized, sharded and planned as a run would, in the same memory budget."""
    with tempfile.TemporaryDirectory(prefix="batchrun-plan-") as tmp:
        sharded = read_into_shards(config, engine_kind=engine_kind,
                                   finished_rows=np.zeros(0, np.int64),
                                   spill_dir=Path(tmp) / "spill")
        figures = JobPlanFigures()
        counts = {"requests": 0, "rows_with_errors": 0, "constrained_rows": 0}
        sizing = None
        for shard in sharded.shards:
            job = prepare_shard(config, shard.load(), sharded.input_format,
                                sharded.max_model_len)
            sizing = sizing or engine_sizing(job, engine_kind, longest=sharded.longest)
            _, plan = job.run_groups(sizing.block_size, sizing.kv_capacity_tokens)
            figures.add(plan, *job.first_and_last_prompts())
            counts["requests"] += len(job.tokens.positions)
            counts["rows_with_errors"] += len(job.request_errors())
            counts["constrained_rows"] += sum(job.constrained_counts().values())
            del job  # one shard in memory at a time: the next one loads after this is gone
    out = {"rows": sharded.rows, **counts, **figures.to_dict()}
    out.pop("planned", None)
    out["requests"] = counts["requests"]
    if sizing is not None:
        if sizing.kv_bytes_per_token:
            out["kv_bytes_per_token"] = sizing.kv_bytes_per_token
        out["engine_sizing"] = sizing.to_dict()
    out["shards"] = {"count": len(sharded.shards), "spilled_bytes": sharded.spilled_bytes,
                     "memory_budget": config.engine.memory_budget,
                     "peak_rss_bytes": peak_rss_bytes()}
    return out
