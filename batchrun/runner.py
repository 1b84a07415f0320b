"""Run one job end to end: read -> tokenize -> plan -> execute -> write -> summary.

Each stage lives in its own module; this one only wires them together and keeps the books
(checkpoint, counts, exit code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__
from .cluster.replicas import EngineReplicas, start_replicas
from .config import ConfigError, JobConfig
from .engine.attention.selection import (
    DEFAULT_CONCURRENCY,
    AttentionChoice,
    SharingFigures,
    choose_attention,
    sharing_figures,
)
from .engine.base import Engine, EngineDiedError, EngineStats
from .engine.factory import start_engine
from .engine.sizing import (
    DEFAULT_MAX_NUM_SEQS,
    EngineSizing,
    LongestRequest,
    peak_window_tokens,
    size_engine,
)
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS, EXIT_USAGE
from .executor import RunGroup, StepTrace, StreamingExecutor
from .io import storage
from .io.output import OutputFiles, count_done, write_in_row_order
from .io.result_rows import error_results, results_table
from .io.results import (
    Checkpoint,
    CheckpointError,
    JobLock,
    ResultJournal,
    file_fingerprint,
    partial_dir_for,
    temp_path,
)
from .lifecycle import Interrupted, StopFlag, install_signal_handlers
from .model import cache_root, kv_bytes_per_token, num_layers
from .plan import plan_schedule
from .plan.decode_first import decode_heavy_first
from .plan.job_figures import JobPlanFigures
from .prepare import (
    PreparedJob,
    ShardedJob,
    prepare_job,
    prepare_shard,
    read_into_shards,
    request_factory,
)
from .progress import ProgressReporter, StageClock
from .shards import Shard
from .terminal import engine_log_path, output_to_log, terminal

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_ROW_ERRORS", "EXIT_USAGE",
           "JobOutcome", "PreparedJob", "choose_job_attention", "describe_plan",
           "engine_sizing", "make_groups", "prepare_job", "request_factory", "run_job",
           "run_shard"]

log = logging.getLogger(__name__)




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
                               plan.private_blocks[members], decode[members],
                               g.shared_above))
    return decode_heavy_first(groups, job.max_tokens), {"planned": True,
                                                        **plan.stats.to_dict()}


def engine_sizing(job: PreparedJob, engine_kind: str = "vllm", *,
                  longest: LongestRequest | None = None) -> EngineSizing:
    """The engine settings this job gets (see engine/sizing.py), without starting it. A job
    of several shards is sized by its first shard's plan and the whole job's `longest`
    request."""
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
    return size_engine(longest=longest or job.longest_request(), context=job.max_model_len,
                       block_size=block_size, kv_bytes_per_token=per_token,
                       user_kv_cache_memory=opts.kv_cache_memory, size_kv_from_job=size_kv,
                       window_tokens=window)


def describe_plan(config: JobConfig, engine_kind: str = "vllm") -> dict[str, Any]:
    """The plan's figures for `batchrun plan`, computed without starting an engine: the job
    read, tokenized, sharded and planned as a run would, in the same memory budget."""
    with tempfile.TemporaryDirectory(prefix="batchrun-plan-") as tmp:
        sharded = read_into_shards(config, engine_kind=engine_kind, done=np.zeros(0, np.int64),
                                   spill_dir=Path(tmp) / "spill")
        figures = JobPlanFigures()
        counts = {"requests": 0, "rows_with_errors": 0, "constrained_rows": 0}
        sizing = None
        for shard in sharded.shards:
            job = prepare_shard(config, shard.load(), sharded.input_format,
                                sharded.max_model_len)
            sizing = sizing or engine_sizing(job, engine_kind, longest=sharded.longest)
            _, plan = make_groups(job, sizing.block_size, sizing.kv_capacity_tokens)
            figures.add(plan, *_first_and_last_prompts(job))
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


def _first_and_last_prompts(job: PreparedJob) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The job's first and last prompts in token order (None when it has none)."""
    toks = job.tokens
    if not len(toks.positions) or not job.config.plan:
        return None, None
    order = job.prefix_tree.order
    first, last = int(order[0]), int(order[-1])
    # Copies: a view would keep the shard's whole token buffer alive with it.
    return (toks.values[toks.offsets[first]:toks.offsets[first + 1]].copy(),
            toks.values[toks.offsets[last]:toks.offsets[last + 1]].copy())


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
class Books:
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

    def count(self, table: pa.Table) -> None:
        ok = table.filter(table["error"].is_null())
        self.failed += table.num_rows - ok.num_rows
        self.succeeded += ok.num_rows
        self.duplicates += table.num_rows - table["duplicate_of"].null_count
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + (pc.sum(ok[name]).as_py() or 0))
        for item in pc.value_counts(ok["finish_reason"]).to_pylist():
            reason = item["values"]
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + item["counts"]


@dataclass
class ShardRun:
    """What running one shard produced beyond its results."""

    plan: dict[str, Any]
    first_prompt: np.ndarray | None
    last_prompt: np.ndarray | None
    constrained: dict[str, int]
    logprobs_rows: int


def run_shard(job: PreparedJob, engine: Engine | None,
              on_results: Callable[[pa.Table], None], *, stop: StopFlag | None = None,
              grace_s: float = 30.0, trace: StepTrace | None = None,
              clock: StageClock | None = None) -> ShardRun:
    """Run a prepared shard (or whole small job) on a started engine: its error rows first,
    then its plan through the streaming executor. Every result reaches `on_results` as
    RESULT_SCHEMA rows (row numbers are the input's)."""
    errors = job.request_errors()
    if errors:
        on_results(error_results(job, errors))
    plan: dict[str, Any] = {"planned": False}
    if len(job.tokens.positions):
        if engine is None:
            raise EngineDiedError("no engine to run the job on")
        info = engine.info
        clock = clock or StageClock()
        with clock("plan"):
            groups, plan = make_groups(job, info.block_size, info.kv_capacity_tokens)
        executor = StreamingExecutor(
            engine, groups, request_factory(job),
            lambda batch: on_results(results_table(job, batch)),
            stop=stop, grace_s=grace_s, trace=trace)
        with clock("run"):
            executor.run()
    logprobs_rows = sum(job.rows_served(i) for i, k in enumerate(job.logprobs) if k is not None)
    return ShardRun(plan, *_first_and_last_prompts(job), job.constrained_counts(),
                    logprobs_rows)


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
    if storage.exists(paths.dest) and not overwrite:
        leftover = Checkpoint(partial_dir_for(paths.base))
        if leftover.is_complete():  # a kill came between writing the output and this cleanup
            leftover.remove()
            _remove_staged(paths)
        msg = (f"{paths.dest} already exists: this job has finished before, nothing to do. "
               "Use --overwrite to run it again")
        return JobOutcome(EXIT_OK, {"status": "already_done", "output": str(paths.dest)}, msg)
    run = _JobRun.open(config, paths, engine_kind, engine, resume=resume, overwrite=overwrite,
                       stop=stop)
    run.generate(stop, interactive=interactive, grace_s=grace_s)
    return run.finish(time.monotonic() - t0)


@dataclass
class _JobRun:
    """One run of a job: opened (checkpoint, input read into shards, engine started),
    generated (shard by shard), finished (output written, or the reason it was not).
    Every failure after opening ends in `finish` with a status and the checkpoint kept."""

    config: JobConfig
    paths: OutputPaths
    ckpt: Checkpoint
    books: Books
    sharded: ShardedJob
    engine: Engine | None
    own_engine: bool
    sizing: EngineSizing | None = None
    first: PreparedJob | None = None  # the first shard, prepared while sizing the engine
    start_failure: EngineDiedError | None = None
    status: str = "ok"
    message: str = ""
    plan: JobPlanFigures = field(default_factory=JobPlanFigures)
    trace: StepTrace = field(default_factory=StepTrace)
    clock: StageClock = field(default_factory=StageClock)
    constrained: dict[str, int] = field(default_factory=dict)
    logprobs_rows: int = 0
    stats_before: EngineStats | None = None
    replicas: EngineReplicas | None = None  # the engines, when on Ray (cluster/replicas.py)

    @classmethod
    def open(cls, config: JobConfig, paths: OutputPaths, engine_kind: str,
             engine: Engine | None, *, resume: bool, overwrite: bool,
             stop: StopFlag) -> _JobRun:
        manifest = {"batchrun": __version__, "input": file_fingerprint(config.input),
                    "settings": config.fingerprint_settings()}
        if overwrite:
            Checkpoint(partial_dir_for(paths.base)).remove()
        ckpt = Checkpoint.open(paths.base, manifest, resume=resume)
        books = Books()
        done = count_done(ckpt.journals(), books.count)
        clock = StageClock()
        try:
            sharded = read_into_shards(
                config, engine_kind=engine_kind, done=done, spill_dir=ckpt.path / "spill",
                engine_max_model_len=engine.info.max_model_len if engine else None,
                stop=lambda: stop.requested, clock=clock)
        except BaseException:
            if not len(done):  # an unusable input, model or setting: leave no empty checkpoint
                ckpt.remove()
            raise
        run = cls(config, paths, ckpt, books, sharded, engine, own_engine=engine is None,
                  clock=clock)
        try:
            run._start_engine(engine_kind, stop)
        except EngineDiedError as e:
            run.start_failure = e  # not the input's or the settings' fault: exit 4, resumable
        except BaseException:
            if not len(done):
                ckpt.remove()
            raise
        return run

    def _start_engine(self, engine_kind: str, stop: StopFlag) -> None:
        """Size and start the engine, unless nothing is left to generate (a resume after a
        failed final write, only error rows) or a signal came while reading: starting vLLM
        takes a minute."""
        sharded = self.sharded
        if not sharded.runnable or stop.requested:
            return
        with self.clock("plan"):
            self.first = prepare_shard(self.config, sharded.shards[0].load(),
                                       sharded.input_format, sharded.max_model_len)
        if self.own_engine:
            self.sizing = engine_sizing(self.first, engine_kind, longest=sharded.longest)
            first = self.first
            if self.config.cluster.on_ray:
                self.replicas = start_replicas(self.config, engine_kind, self.sizing, sharded,
                                               attention=lambda: choose_job_attention(first))
                return
            self.engine = start_engine(engine_kind, self.config, self.sizing,
                                       new_tokens=sharded.new_tokens,
                                       attention=lambda: choose_job_attention(first))

    def generate(self, stop: StopFlag, *, interactive: bool | None, grace_s: float) -> None:
        journal: ResultJournal | None = None
        progress: ProgressReporter | None = None
        try:
            journal = self.ckpt.new_journal()
            if self.sharded.runnable and not stop.requested:
                if self.start_failure is not None:  # reported like an engine failure mid-run
                    raise self.start_failure
                self._note_engine_counters()
                terminal().write(self._start_line() + "\n")
            progress = ProgressReporter(self.sharded.rows, already_done=self.books.rows,
                                        interactive=interactive, stream=terminal())
            self._run_shards(journal, progress, stop, grace_s)
            if stop.requested and self.books.rows < self.sharded.rows:
                self.status = "interrupted"
                self.message = ("interrupted by a signal; finished rows are saved. Run the same "
                                "command with --resume to continue")
        except Interrupted as e:
            self.status = "interrupted"
            self.message = f"{e}; finished rows are saved. Re-run with --resume"
        except EngineDiedError as e:
            self.status, self.message = "engine_failed", (
                f"{e}. Finished rows are saved in {self.ckpt.path}; fix the cause and re-run "
                "with --resume")
        except OSError as e:
            self.status, self.message = "write_failed", (
                f"cannot write results ({e.strerror or e}): {self.ckpt.path} holds every row "
                "finished so far; free space and re-run with --resume")
        finally:
            if progress is not None:
                progress.close()
            if journal is not None:
                with contextlib.suppress(OSError):  # the write error itself was caught above
                    journal.close()
            if self.own_engine and self.engine is not None:
                self.engine.close()
            if self.replicas is not None:
                self.replicas.close()

    def _run_shards(self, journal: ResultJournal, progress: ProgressReporter, stop: StopFlag,
                    grace_s: float) -> None:
        def on_results(table: pa.Table) -> None:
            journal.append(table)
            self.books.count(table)
            tokens = [pc.sum(table[c]).as_py() or 0
                      for c in ("prompt_tokens", "completion_tokens")]
            progress.advance(table.num_rows, sum(tokens))

        if self.replicas is not None:
            shard_runs = self.replicas.run(self.sharded.shards, on_results, stop, grace_s)
        else:
            shard_runs = (self._run_shard(shard, on_results, stop, grace_s)
                          for shard in self.sharded.shards if not stop.requested)
        for done in shard_runs:
            self.plan.add(done.plan, done.first_prompt, done.last_prompt)
            for kind, n in done.constrained.items():
                self.constrained[kind] = self.constrained.get(kind, 0) + n
            self.logprobs_rows += done.logprobs_rows

    def _run_shard(self, shard: Shard, on_results: Callable[[pa.Table], None],
                   stop: StopFlag, grace_s: float) -> ShardRun:
        job, self.first = self.first, None  # the first shard was prepared at the start
        if job is None:
            with self.clock("plan"):
                job = prepare_shard(self.config, shard.load(), self.sharded.input_format,
                                    self.sharded.max_model_len)
        return run_shard(job, self.engine, on_results, stop=stop, grace_s=grace_s,
                         trace=self.trace, clock=self.clock)

    def _note_engine_counters(self) -> None:
        """What a shared engine counted before this job: the summary reports this job's.
        (Replicas report per replica instead.)"""
        if self.engine is not None:
            self.stats_before = self.engine.stats(new_job=True)

    def _start_line(self) -> str:
        if self.replicas is not None:
            return (f"batchrun: {self.sharded.requests:,} of {self.sharded.rows:,} rows to run "
                    f"on {self.replicas.describe()}")
        info, sharded = self.engine.info, self.sharded
        kv = f", KV cache {info.kv_capacity_tokens:,} tokens" if info.kv_capacity_tokens else ""
        shards = f", in {len(sharded.shards)} prefix shards" if len(sharded.shards) > 1 else ""
        return (f"batchrun: {sharded.requests:,} of {sharded.rows:,} rows to run on "
                f"{info.name}{kv}, context {info.max_model_len:,} tokens{shards}")

    def finish(self, wall_s: float) -> JobOutcome:
        summary = self._summary(wall_s)
        if self.status != "ok":
            return self._stopped(summary, self.message)
        if self.books.rows != self.sharded.rows:
            raise CheckpointError(f"internal: {self.books.rows} results for "
                                  f"{self.sharded.rows} rows")
        try:
            self.ckpt.mark_complete()
            with self.clock("write"):
                self._write_output()
        except (OSError, pa.ArrowException) as e:
            summary["status"] = "write_failed"
            reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:300]
            return self._stopped(summary, (
                f"cannot write the output ({reason}): {self.ckpt.path} holds every row; "
                "free space and re-run with --resume"))
        self.ckpt.remove()
        _remove_staged(self.paths)
        summary["stages"] = self._stage_figures()
        _write_summary(self.paths.local, summary)
        code = EXIT_OK if self.books.failed == 0 else EXIT_ROW_ERRORS
        return JobOutcome(code, summary, f"wrote {self.paths.dest}")

    def _stage_figures(self) -> dict[str, dict[str, float]]:
        """Seconds and rows/s per stage (rows this run handled)."""
        rows = self.sharded.requests or self.sharded.rows
        return {stage: {"seconds": s, "rows_per_s": round(rows / s) if s > 0 else None}
                for stage, s in self.clock.figures().items()}

    def _stopped(self, summary: dict[str, Any], message: str) -> JobOutcome:
        summary["checkpoint"] = str(self.ckpt.path)
        self.sharded.remove_spill()
        _write_summary(self.paths.local, summary)
        return JobOutcome(EXIT_INTERRUPTED, summary, message)

    def _write_output(self) -> None:
        config, paths = self.config, self.paths
        meta = {"batchrun_version": __version__, "model": config.model,
                "sampling": config.fingerprint_settings()["sampling"],
                "engine": self.engine.info.settings if self.engine else {}}
        files = OutputFiles(paths.local, paths.openai_local, config.model)
        write_in_row_order(self.ckpt.journals(), self.sharded.rows, self.sharded.columns,
                           files, meta, range_bytes=config.engine.memory_budget // 8,
                           scratch=self.sharded.spill_dir)
        # The OpenAI file first: the Parquet output appearing is what marks the job done.
        if paths.openai_local is not None and storage.is_uri(paths.openai_dest):
            storage.upload(paths.openai_local, str(paths.openai_dest))
        if paths.remote:  # the object appears at the output key only once complete
            storage.upload(paths.local, str(paths.dest))

    def _summary(self, wall_s: float) -> dict[str, Any]:
        summary = job_summary(self.config, self.sharded.rows, self.books, self.engine,
                              self.plan.to_dict(), wall_s, self.status)
        summary["batch"] = self.trace.figures()
        summary["stages"] = self._stage_figures()
        summary["structured_outputs"] = {"constrained_rows": dict(sorted(
            self.constrained.items())), "logprobs_rows": self.logprobs_rows}
        summary["shards"] = {"count": len(self.sharded.shards),
                             "spilled_bytes": self.sharded.spilled_bytes,
                             "memory_budget": self.config.engine.memory_budget,
                             "peak_rss_bytes": peak_rss_bytes()}
        if self.sizing is not None:
            summary["engine_sizing"] = self.sizing.to_dict()
        if self.replicas is not None:
            summary["replicas"] = [r.to_dict() for r in self.replicas.stats]
        if self.stats_before is not None:
            # Read after close: an engine's own processes have written their last counts then.
            used = self.engine.stats().since(self.stats_before)
            if (attention := used.attention_summary()) is not None:
                summary["attention"] = attention
            if self.constrained:
                summary["structured_outputs"]["backends"] = used.structured_backends
        return summary


def job_summary(config: JobConfig, rows: int, books: Books, engine: Engine | None,
                plan_figures: dict[str, Any], wall_s: float, status: str) -> dict[str, Any]:
    computed = books.prompt_tokens - books.cached_tokens
    distinct = plan_figures.get("distinct_prompt_tokens")
    return {
        "status": status,
        "input": str(config.input),
        "output": str(config.output),
        "model": config.model,
        "rows": rows,
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
    }


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
