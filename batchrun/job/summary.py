"""The run summary: counts of the results journaled (ResultCounts), the summary dict every
run prints and writes beside its output, and this process's peak memory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..config import JobConfig
from ..engine.base import Engine
from ..execute.result_rows import TokenSums
from ..io.files import temp_path

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ResultCounts:
    """Counts of the results journaled so far (this run's and earlier runs')."""

    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    duplicates: int = 0  # rows served by an identical row's generation
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.succeeded + self.failed

    def count(self, table: pa.Table) -> TokenSums:
        """Count a table of results in; the tokens of those that succeeded."""
        ok = table.filter(table["error"].is_null())
        self.failed += table.num_rows - ok.num_rows
        self.succeeded += ok.num_rows
        self.duplicates += table.num_rows - table["duplicate_of"].null_count
        tokens = TokenSums.of(ok)
        self.prompt_tokens += tokens.prompt
        self.cached_tokens += tokens.cached
        self.completion_tokens += tokens.completion
        for item in pc.value_counts(ok["finish_reason"]).to_pylist():
            reason = item["values"]
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + item["counts"]
        return tokens


def job_summary(config: JobConfig, rows: int, counts: ResultCounts, engine: Engine | None,
                plan_figures: dict[str, Any], wall_s: float, status: str) -> dict[str, Any]:
    computed = counts.prompt_tokens - counts.cached_tokens
    distinct = plan_figures.get("distinct_prompt_tokens")
    tokens = {"prompt": counts.prompt_tokens, "cached": counts.cached_tokens,
              "computed_prompt": computed, "distinct_prompt": distinct,
              "completion": counts.completion_tokens}
    hit_rate = counts.cached_tokens / counts.prompt_tokens if counts.prompt_tokens else 0.0
    if config.embeds:
        # vLLM runs pooling models without a prefix cache: the tokens an embedding job did
        # not compute are those of duplicate inputs (a copy's prompt counts as its cached
        # tokens in the results), not cache hits.
        tokens.update(cached=0, duplicate=counts.cached_tokens)
        hit_rate = None
    return {
        "status": status,
        "input": str(config.input),
        "output": str(config.output),
        "model": config.model_name,
        "rows": rows,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "finish_reasons": counts.finish_reasons,
        "duplicate_rows": counts.duplicates,
        "tokens": tokens,
        "prefix_cache_hit_rate": hit_rate,
        "computed_vs_distinct": computed / distinct if distinct else None,
        "wall_time_s": round(wall_s, 3),
        "tokens_per_s": (counts.prompt_tokens + counts.completion_tokens) / max(wall_s, 1e-9),
        "completion_tokens_per_s": counts.completion_tokens / max(wall_s, 1e-9),
        "rows_per_s": rows / max(wall_s, 1e-9),
        **({"task": config.task} if config.embeds else {}),
        "engine": engine.info.settings if engine else {},
        "plan": plan_figures,
    }


def summary_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def write_summary(output: Path, summary: dict[str, Any]) -> Path | None:
    """Best effort: the summary is also printed, and a full disk that stopped the job must
    not turn its exit code 4 into a crash. Where it was written; None if it was not."""
    path = summary_path_for(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
        return path
    except OSError as e:
        with contextlib.suppress(OSError):
            temp_path(path).unlink(missing_ok=True)
        log.warning("cannot write %s (%s); the summary is printed instead", path,
                    e.strerror or e)
        return None
