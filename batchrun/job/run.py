"""Run one job end to end: open (checkpoint, input read into shards, engine started),
generate (shard by shard, on one engine or on Ray replicas), finish (output written, or the
reason it was not). The stages themselves live in ingest/, plan/, execute/ and io/."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa

from ..clock import StageClock
from ..cluster.replicas import EngineReplicas, start_replicas
from ..cluster.sim_fleet import SimulatedReplicas, start_simulated_replicas
from ..config import EngineKind, JobConfig
from ..engine.base import Engine, EngineStats
from ..engine.factory import engine_kind as started_engine_kind
from ..engine.factory import start_engine
from ..engine.sizing import EngineSizing, LongestRequest
from ..errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_ROW_ERRORS,
    EngineDiedError,
    one_line,
)
from ..execute.shard import ShardRun, run_shard
from ..execute.stop import StopFlag
from ..execute.trace import StepTrace
from ..ingest.prepare import PreparedJob, prepare_shard
from ..ingest.shards import Shard
from ..ingest.stream import EarlyRows, ShardedJob, read_into_shards
from ..io import storage
from ..io.datasets import input_fingerprint
from ..io.output.checkpoint import Checkpoint, ResultJournal, partial_dir_for
from ..io.output.lock import JobLock
from ..io.output.writer import OutputFiles, read_finished_rows, write_in_row_order
from ..plan.job_figures import JobPlanFigures
from ..version import __version__
from .early_start import BackgroundRead, start_read
from .engine_setup import choose_job_attention, engine_sizing
from .paths import OutputPaths, check_output_paths, output_paths, remove_staged
from .progress import ProgressReporter
from .run_trace import RunTrace, merge_trace, report
from .signals import Interrupted, install_signal_handlers
from .summary import ResultCounts, job_summary, peak_rss_bytes, write_summary
from .terminal import engine_log_path, output_to_log, terminal


@dataclass
class JobOutcome:
    exit_code: int
    summary: dict[str, Any]
    message: str = ""


def run_job(
    config: JobConfig,
    *,
    engine_kind: str | None = None,
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
    `engine_kind`: "vllm", "sim" or "fake"; None: what `engine` is, else the job file's.
    `engine_log`: what vLLM, torch and other libraries print goes to `<output>.log`
    instead of the terminal (batchrun's own progress still reaches the terminal).

    Signals are handled from reading the input to writing the output: a first SIGTERM/SIGINT
    lets the job wind down, a second raises Interrupted wherever it lands. Either way every
    result finished by then is in the checkpoint."""
    if engine_kind is None:
        engine_kind = started_engine_kind(engine) if engine is not None else config.engine_kind
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
    if paths.dest.exists() and not overwrite:
        leftover = Checkpoint(partial_dir_for(paths.base))
        if leftover.is_complete():  # a kill came between writing the output and this cleanup
            leftover.remove()
            remove_staged(paths)
        msg = (f"{paths.dest} already exists: this job has finished before, nothing to do. "
               "Use --overwrite to run it again")
        return JobOutcome(EXIT_OK, {"status": "already_done", "output": str(paths.dest)}, msg)
    run = _JobRun.open(config, paths, engine_kind, engine, resume=resume, overwrite=overwrite,
                       stop=stop, started_at=t0)
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
    counts: ResultCounts
    sharded: ShardedJob | None  # None while the job is still being read (early start)
    engine: Engine | None
    own_engine: bool
    sizing: EngineSizing | None = None
    first: PreparedJob | None = None  # the first rows to run, prepared while sizing the engine
    reader: BackgroundRead | None = None  # the read, when it goes on beside the engine
    early: EarlyRows | None = None  # the first rows handed on by that read
    early_runs: int = 0
    shards_run: int = 0
    start_failure: EngineDiedError | None = None
    status: str = "ok"
    message: str = ""
    plan: JobPlanFigures = field(default_factory=JobPlanFigures)
    trace: StepTrace = field(default_factory=StepTrace)
    clock: StageClock = field(default_factory=StageClock)
    constrained: dict[str, int] = field(default_factory=dict)
    logprobs_rows: int = 0
    stats_before: EngineStats | None = None
    # The engines, when on Ray (cluster/replicas.py), or their simulation (--engine sim).
    replicas: EngineReplicas | SimulatedReplicas | None = None
    started_at: float = 0.0  # time.monotonic() when the command began the job
    run_trace: RunTrace | None = None  # the step trace in the checkpoint (for the report)

    @classmethod
    def open(cls, config: JobConfig, paths: OutputPaths, engine_kind: str,
             engine: Engine | None, *, resume: bool, overwrite: bool,
             stop: StopFlag, started_at: float) -> _JobRun:
        manifest = {"batchrun": __version__, "input": input_fingerprint(config.input),
                    "settings": config.fingerprint_settings()}
        if overwrite:
            Checkpoint(partial_dir_for(paths.base)).remove()
        ckpt = Checkpoint.open(paths.base, manifest, resume=resume)
        counts = ResultCounts()
        finished_rows = read_finished_rows(ckpt.journals(), counts.count)
        clock = StageClock()
        read = partial(read_into_shards, config, engine_kind=engine_kind,
                       finished_rows=finished_rows, spill_dir=ckpt.path / "spill",
                       engine_max_model_len=engine.info.max_model_len if engine else None,
                       clock=clock)
        try:
            # A simulated fleet's clock runs over one set of shards: it waits for them all
            reader, early, sharded = start_read(read, stop=lambda: stop.requested, early=(
                config.early_start and not (config.cluster.on_ray and
                                            engine_kind == EngineKind.SIM)))
        except BaseException:
            # An unusable input, model or setting: leave no empty checkpoint.
            if not len(finished_rows):
                ckpt.remove()
            raise
        run = cls(config, paths, ckpt, counts, sharded, engine, own_engine=engine is None,
                  reader=reader, early=early, clock=clock, started_at=started_at)
        try:
            run._start_engine(engine_kind, stop)
        except EngineDiedError as e:
            run.start_failure = e  # not the input's or the settings' fault: exit 4, resumable
        except BaseException:
            if not len(finished_rows):
                ckpt.remove()
            raise
        return run

    def _start_engine(self, engine_kind: str, stop: StopFlag) -> None:
        """Size and start the engine, unless nothing is left to generate (a resume after a
        failed final write, only error rows) or a signal came while reading: starting vLLM
        takes a minute. Started early, before the job's longest request is known, it is
        sized for the model's whole context (early_start.py)."""
        sharded, early = self.sharded, self.early
        if not self._has_work() or stop.requested:
            return
        rows, read = (early, early) if early is not None else (sharded.shards[0], sharded)
        with self.clock("plan"), self._planning():
            self.first = prepare_shard(self.config, rows.load(), read.input_format,
                                       read.max_model_len)
        if self.own_engine:
            def read_to_end() -> LongestRequest | None:
                self.sharded = self.sharded or self.reader.result()
                return self.sharded.longest

            self.sizing = engine_sizing(
                self.first, engine_kind, longest=sharded.longest if sharded else None,
                rest_unread=read_to_end if early is not None else None)
            first = self.first
            read = self.sharded or early  # the job read so far
            if self.config.cluster.on_ray and engine_kind == EngineKind.SIM:
                self.replicas = start_simulated_replicas(self.config, self.sizing, read)
                return
            if self.config.cluster.on_ray:
                self.replicas = start_replicas(self.config, engine_kind, self.sizing, read,
                                               attention=lambda: choose_job_attention(first))
                return
            self.engine = start_engine(engine_kind, self.config, self.sizing,
                                       new_tokens=read.new_tokens,
                                       attention=lambda: choose_job_attention(first))

    def _has_work(self) -> bool:
        return self.early is not None or self.sharded.runnable_requests > 0

    def generate(self, stop: StopFlag, *, interactive: bool | None, grace_s: float) -> None:
        journal: ResultJournal | None = None
        progress: ProgressReporter | None = None
        try:
            journal = self.ckpt.new_journal()
            self.run_trace = RunTrace(self.trace)
            self.run_trace.open(self.ckpt.path)
            if self._has_work() and not stop.requested:
                if self.start_failure is not None:  # reported like an engine failure mid-run
                    raise self.start_failure
                self._note_engine_counters()
                terminal().write(self._start_line() + "\n")
            progress = ProgressReporter(self.sharded.rows if self.sharded else None,
                                        already_done=self.counts.rows,
                                        interactive=interactive, stream=terminal())
            self._run_shards(journal, progress, stop, grace_s)
            if stop.requested and self.counts.rows < self.sharded.rows:
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
            if self.run_trace is not None:
                with contextlib.suppress(OSError):
                    self.run_trace.close()
            if self.own_engine and self.engine is not None:
                self.engine.close()
            if self.replicas is not None:
                self.replicas.close()
            if self.sharded is None:  # the job ended while it was still being read
                self.reader.abandon()
                self.sharded = self.reader.result()

    def _run_shards(self, journal: ResultJournal, progress: ProgressReporter, stop: StopFlag,
                    grace_s: float) -> None:
        def on_results(table: pa.Table) -> None:
            journal.append(table)
            tokens = self.counts.count(table)
            progress.advance(table.num_rows, tokens.prompt + tokens.completion)

        if self.reader is not None:
            self._run_early(on_results, stop, grace_s)
            progress.set_total(self.sharded.rows)
        self._run_pieces(self.sharded.shards, on_results, stop, grace_s)

    def _run_early(self, on_results: Callable[[pa.Table], None], stop: StopFlag,
                   grace_s: float) -> None:
        """Run the rows the read hands on while it goes on (early_start.py), then wait for
        its end: the rest of the job in shards."""
        rows = self.early
        while rows is not None and not stop.requested:
            self.early_runs += 1
            self._run_pieces([rows], on_results, stop, grace_s)
            rows = self.reader.next_rows()
        if stop.requested:
            self.reader.abandon()
        self.sharded = self.reader.result()

    def _run_pieces(self, pieces: list[Shard] | list[EarlyRows],
                    on_results: Callable[[pa.Table], None], stop: StopFlag,
                    grace_s: float) -> None:
        if self.replicas is not None:
            with self.clock("run"):
                shard_runs = self.replicas.run(pieces, on_results, stop, grace_s)
        else:
            shard_runs = (self._run_shard(piece, on_results, stop, grace_s)
                          for piece in pieces if not stop.requested)
        for shard_run in shard_runs:
            self._add_shard_run(shard_run)

    def _add_shard_run(self, shard_run: ShardRun) -> None:
        self.plan.add(shard_run.plan, shard_run.first_prompt, shard_run.last_prompt)
        self.run_trace.add_shard(self.shards_run, shard_run.prefixes, shard_run.steps)
        self.shards_run += 1
        for kind, n in shard_run.constrained.items():
            self.constrained[kind] = self.constrained.get(kind, 0) + n
        self.logprobs_rows += shard_run.logprobs_rows

    def _run_shard(self, rows: Shard | EarlyRows, on_results: Callable[[pa.Table], None],
                   stop: StopFlag, grace_s: float) -> ShardRun:
        job, self.first = self.first, None  # the first rows were prepared at the start
        if job is None:
            read = self.sharded or self.early  # the job's input format and context
            with self.clock("plan"), self._planning():
                job = prepare_shard(self.config, rows.load(), read.input_format,
                                    read.max_model_len)
        return run_shard(job, self.engine, on_results, stop=stop, grace_s=grace_s,
                         trace=self.trace, clock=self.clock)

    def _planning(self) -> contextlib.AbstractContextManager:
        """Held while rows are prepared to run: a read going on beside the engine sorts no
        run meanwhile (early_start.BackgroundRead.planning)."""
        return self.reader.planning if self.reader is not None else contextlib.nullcontext()

    def _note_engine_counters(self) -> None:
        """What a shared engine counted before this job: the summary reports this job's.
        (Replicas report per replica instead.)"""
        if self.engine is not None:
            self.stats_before = self.engine.stats(new_job=True)

    def _start_line(self) -> str:
        sharded = self.sharded
        rows = f"{sharded.pending_rows:,} of {sharded.rows:,} rows to run" if sharded else \
            f"the first {self.early.rows:,} rows to run while the rest of the job is being read"
        if self.replicas is not None:
            return f"batchrun: {rows} on {self.replicas.describe()}"
        info = self.engine.info
        kv = f", KV cache {info.kv_capacity_tokens:,} tokens" \
            if info.kv_capacity_tokens and not self.config.embeds else ""
        if sharded is None:
            return f"batchrun: {rows}, on {info.name}{kv}, context {info.max_model_len:,} tokens"
        shards = f", in {len(sharded.shards)} prefix shards" if len(sharded.shards) > 1 else ""
        return (f"batchrun: {sharded.pending_rows:,} of {sharded.rows:,} rows to run on "
                f"{info.name}{kv}, context {info.max_model_len:,} tokens{shards}")

    def finish(self, wall_s: float) -> JobOutcome:
        summary = self._summary(wall_s)
        if self.status != "ok":
            return self._stopped(summary, self.message)
        if self.counts.rows != self.sharded.rows:
            # A bug, not a checkpoint the user can fix: the CLI reports it as exit 1.
            raise RuntimeError(f"{self.counts.rows} results for {self.sharded.rows} rows")
        try:
            self.ckpt.mark_complete()
            with self.clock("write"):
                self._write_output()
        except (OSError, pa.ArrowException) as e:
            summary["status"] = "write_failed"
            reason = getattr(e, "strerror", None) or one_line(e)
            return self._stopped(summary, (
                f"cannot write the output ({reason}): {self.ckpt.path} holds every row; "
                "free space and re-run with --resume"))
        self._keep_trace(summary)
        merge_trace(self.ckpt.path, self.paths.local)
        self.ckpt.remove()
        remove_staged(self.paths)
        summary["stages"] = self._stage_figures()
        report(write_summary(self.paths.local, summary), self.config.report)
        code = EXIT_OK if self.counts.failed == 0 else EXIT_ROW_ERRORS
        return JobOutcome(code, summary, f"wrote {self.paths.dest}")

    def _time_to_first_step(self) -> float | None:
        """Seconds from the start of the job to its first engine step (on replicas: to the
        first piece handed to one); None when no engine ran."""
        first = self.replicas.first_piece_at if self.replicas is not None \
            else self.trace.first_step_at
        return None if first is None else round(first - self.started_at, 3)

    def _stage_figures(self) -> dict[str, dict[str, float]]:
        """Seconds and rows/s per stage (rows this run handled)."""
        return self.clock.stage_figures(self.sharded.pending_rows or self.sharded.rows)

    def _stopped(self, summary: dict[str, Any], message: str) -> JobOutcome:
        summary["checkpoint"] = str(self.ckpt.path)
        self.sharded.remove_spill()
        self._keep_trace(summary)
        report(write_summary(self.paths.local, summary), self.config.report)
        return JobOutcome(EXIT_INTERRUPTED, summary, message)

    def _keep_trace(self, summary: dict[str, Any]) -> None:
        (self.run_trace or RunTrace(self.trace)).summarize(summary, self.ckpt.path, self.clock)

    def _write_output(self) -> None:
        config, paths = self.config, self.paths
        meta = {"batchrun_version": __version__, "model": config.model_name,
                "sampling": config.fingerprint_settings()["sampling"],
                "engine": self.engine.info.settings if self.engine else {}}
        files = OutputFiles(paths.local, paths.openai_local, config.model_name, config.embeds)
        # Writing a range holds 4-5x its journal bytes (10M rows: +2.05 GiB in ranges of an
        # eighth of the budget, +0.34 GiB in ranges of a sixty-fourth, no slower).
        write_in_row_order(self.ckpt.journals(), self.sharded.rows, self.sharded.columns,
                           files, meta, range_bytes=config.engine.memory_budget // 64,
                           scratch=self.sharded.spill_dir)
        # The OpenAI file first: the Parquet output appearing is what marks the job done (an
        # object appears at its key only once complete).
        for local, dest in paths.staged():
            storage.upload(local, dest)

    def _summary(self, wall_s: float) -> dict[str, Any]:
        summary = job_summary(self.config, self.sharded.rows, self.counts, self.engine,
                              self.plan.to_dict(), wall_s, self.status)
        summary["batch"] = self.trace.figures()
        summary["time_to_first_step_s"] = self._time_to_first_step()
        summary["stages"] = self._stage_figures()
        summary["structured_outputs"] = {"constrained_rows": dict(sorted(
            self.constrained.items())), "logprobs_rows": self.logprobs_rows}
        summary["early_start"] = {"runs": self.early_runs, "rows": self.sharded.early_rows}
        summary["shards"] = {"count": len(self.sharded.shards),
                             "spilled_bytes": self.sharded.spilled_bytes,
                             "spilled_rows": self.sharded.spilled_rows,
                             "memory_budget": self.config.engine.memory_budget,
                             "peak_rss_bytes": peak_rss_bytes()}
        if self.sharded.replay is not None:
            summary.setdefault("simulated", {})["replay_lengths"] = self.sharded.replay.figures()
        if self.sizing is not None:
            summary["engine_sizing"] = self.sizing.to_dict()
        if self.replicas is not None:
            summary["replicas"] = [r.to_dict() for r in self.replicas.stats]
        if isinstance(self.replicas, EngineReplicas):
            summary["ray_restarts"] = self.replicas.ray_restarts
        if isinstance(self.replicas, SimulatedReplicas):
            summary["simulated"] = {**self.replicas.simulated(), **summary.get("simulated", {})}
        if self.stats_before is not None:
            # Read after close: an engine's own processes have written their last counts then.
            used = self.engine.stats().since(self.stats_before)
            if used.simulated is not None:
                summary["simulated"] = {**used.simulated.to_dict(),
                                        **summary.get("simulated", {})}
            if (attention := used.attention_summary()) is not None:
                summary["attention"] = attention
            if self.constrained:
                summary["structured_outputs"]["backends"] = used.structured_backends
        return summary

