"""The commands that look at a job without running it: `batchrun plan` (describe_plan) and
`batchrun validate` (validate_input, ValidationReport)."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..clock import StageClock
from ..config import EngineKind, JobConfig
from ..ingest.adapters import resolve_adapters
from ..ingest.prepare import (
    length_rules,
    load_tokenizer,
    prepare_shard,
    request_constraints,
    request_logprobs,
)
from ..ingest.stream import read_into_shards
from ..ingest.tokenize import tokenize_requests
from ..io.input.readers import open_request_stream
from ..plan.job_figures import JobPlanFigures
from .engine_setup import engine_sizing
from .summary import peak_rss_bytes


def describe_plan(config: JobConfig, engine_kind: str = EngineKind.VLLM) -> dict[str, Any]:
    """The plan's figures for `batchrun plan`, computed without starting an engine: the job
    read, tokenized, sharded and planned as a run would, in the same memory budget."""
    clock = StageClock()
    with tempfile.TemporaryDirectory(prefix="batchrun-plan-") as tmp:
        sharded = read_into_shards(config, engine_kind=engine_kind,
                                   finished_rows=np.zeros(0, np.int64),
                                   spill_dir=Path(tmp) / "spill", clock=clock)
        figures = JobPlanFigures()
        counts = {"requests": 0, "rows_with_errors": 0, "constrained_rows": 0}
        sizing = None
        for shard in sharded.shards:
            with clock("plan"):
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
                     "spilled_rows": sharded.spilled_rows,
                     "memory_budget": config.engine.memory_budget,
                     "peak_rss_bytes": peak_rss_bytes()}
    out["stages"] = clock.stage_figures(sharded.rows)
    return out


def validate_input(cfg: JobConfig, engine_kind: str, max_errors: int) -> tuple[
        ValidationReport, str, int]:
    """The job's input checked batch by batch, as `run` would read and tokenize it (memory
    does not grow with the input): the report, the input's format, and the context length
    the checks used."""
    # Passthrough columns are copied, never checked: not read at all here.
    stream = open_request_stream(cfg.input, replace(cfg.columns, passthrough=()),
                                 cfg.input_format)
    tokenizer, max_model_len = load_tokenizer(cfg, engine_kind)
    report = ValidationReport(max_errors)
    for batch in stream:
        requests = resolve_adapters(batch.requests, cfg, batch.input_format)
        tokens = tokenize_requests(requests, tokenizer, max_model_len=max_model_len,
                                   **length_rules(cfg))
        report.add_rows(requests, tokens.errors)
        report.add_prompts(tokens.lengths(),
                           [c.kind if c else None
                            for c in request_constraints(requests, tokens.positions, cfg)],
                           request_logprobs(requests, tokens.positions, cfg))
    return report, stream.input_format, max_model_len


@dataclass
class ValidationReport:
    """`batchrun validate`'s figures, gathered batch by batch (memory does not grow with the
    input): rows, how many can run, the first `max_errors` problems in row order; and, of the
    rows that can run, their prompt tokens, output constraints and logprobs requests."""

    max_errors: int = 10
    rows: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    prompts: int = 0
    prompt_tokens: int = 0
    longest_prompt: int = 0
    constrained: Counter[str] = field(default_factory=Counter)
    logprobs_rows: int = 0

    def add_rows(self, requests: pa.Table, more_errors: Mapping[int, str] | None = None) -> None:
        """Count a batch of rows. more_errors: row position in `requests` -> a problem found
        after reading (the tokenizer's), for rows without a reader error."""
        more_errors = more_errors or {}
        reader_errors = requests["error"]
        self.rows += requests.num_rows
        self.errors += len(reader_errors) - reader_errors.null_count + len(more_errors)
        room = self.max_errors - len(self.first_errors)
        if room <= 0:
            return
        if not more_errors:
            self.first_errors += reader_errors.drop_null()[:room].to_pylist()
            return
        positions = np.flatnonzero(reader_errors.is_valid().to_numpy())[:room]
        found = dict(zip(positions.tolist(), reader_errors.take(positions).to_pylist(),
                         strict=True))
        found.update(more_errors)
        self.first_errors += [found[p] for p in sorted(found)[:room]]

    def add_prompts(self, lengths: np.ndarray, constraints: Iterable[str | None],
                    logprobs: Iterable[int | None]) -> None:
        """Count the prompts of rows that can run: their token counts, constraint kinds (None:
        free text) and top-logprobs counts (None: no logprobs)."""
        self.prompts += len(lengths)
        self.prompt_tokens += int(lengths.sum())
        self.longest_prompt = max(self.longest_prompt, int(lengths.max(initial=0)))
        self.constrained.update(kind for kind in constraints if kind is not None)
        self.logprobs_rows += sum(top is not None for top in logprobs)

    def summary(self) -> dict[str, Any]:
        return {"rows": self.rows, "ok": self.rows - self.errors, "errors": self.errors,
                "first_errors": list(self.first_errors)}

    def prompt_summary(self) -> dict[str, Any]:
        return {"constrained": dict(sorted(self.constrained.items())),
                "logprobs_rows": self.logprobs_rows,
                "prompt_tokens": {"total": self.prompt_tokens, "max": self.longest_prompt,
                                  "mean": self.prompt_tokens / self.prompts
                                  if self.prompts else 0.0}}


def validate_summary(requests: pa.Table, max_errors: int = 10) -> dict[str, Any]:
    """Counts of a request table, and the first `max_errors` row errors, for `validate`."""
    report = ValidationReport(max_errors)
    report.add_rows(requests)
    return report.summary()
