"""batchrun from Python: the same jobs, checkpoints and engine as the CLI, without sys.exit.

    import batchrun

    summary = batchrun.run("jobs/nightly.toml", resume=True)        # a job file (or an input)
    summary = batchrun.run("s3://bucket/in.jsonl", output="s3://bucket/out.parquet",
                           max_tokens=64)
    df = batchrun.generate(pl.DataFrame({"prompt": ["Say hi."] * 4}), max_tokens=4)

`run` returns a Summary (exit_code 0, or 3 when some rows failed: their `error` column says
why) and raises batchrun.UsageError (exit code 2: a bad job, flag, input, model or
checkpoint) or batchrun.JobInterrupted (exit code 4: finished rows are saved; run again with
resume=True). The CLI (`batchrun run`) is a thin layer over these functions.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SECTIONS, EngineKind, JobConfig
from .errors import EXIT_INTERRUPTED, ConfigError, JobInterrupted, UsageError
from .io.storage import Location
from .job_file import load_job_file, option_keys, with_overrides

if TYPE_CHECKING:
    import polars

    from .engine.base import Engine
    from .job.run import JobOutcome

__all__ = ["Summary", "build_config", "generate", "run", "run_config"]

# Keyword arguments of run() / generate() -> the JobConfig field they set (from its fields).
OPTIONS = option_keys()
# Keyword arguments that say how to run, not what.
RUN_OPTIONS = ("resume", "overwrite", "engine", "progress", "grace_period", "handle_signals",
               "engine_log", "estimate")


@dataclass(frozen=True)
class Summary:
    """How a finished job went. `details` is the whole summary, as in
    `<output>.summary.json` (tokens, plan, engine, wall time)."""

    exit_code: int  # 0: every row succeeded (or the job had finished before); 3: some failed
    status: str  # "ok", "already_done"; in JobInterrupted.summary: "interrupted", ...
    output: str
    message: str = ""
    rows: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __getitem__(self, key: str) -> Any:
        return self.details[key]

    @classmethod
    def from_outcome(cls, outcome: JobOutcome) -> Summary:
        s = outcome.summary
        return cls(outcome.exit_code, s.get("status", ""), str(s.get("output", "")),
                   outcome.message, s.get("rows"), s.get("succeeded"), s.get("failed"), s)


def quiet_engine_logs(verbose: bool = False, *, to_log_file: bool = False) -> None:
    """stdout is for results (the CLI's --json); vLLM logs to stdout unless told otherwise.
    With the engine's output going to a log file, that file keeps vLLM's INFO lines."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose and not to_log_file:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _option_key(name: str) -> str:
    if name in OPTIONS:
        return OPTIONS[name]
    section = name.split(".", 1)[0]
    if "." in name and section in SECTIONS:
        return name
    raise ConfigError(f"unknown option {name!r}; known options are "
                      f"{sorted(OPTIONS) + list(RUN_OPTIONS)}, or 'sampling.x', 'engine.x', "
                      "'columns.x', 'cluster.x' for any key of a job file's sections")


def build_config(job: str | Path | Location | JobConfig,
                 output: str | Path | Location | None = None, **overrides: Any) -> JobConfig:
    """A JobConfig from a job file or an input (a local path or a URI; an input needs
    `output`), with overrides on top: run()'s option names (max_tokens=64, ...) or dotted
    keys ('sampling.max_tokens', 'engine.kv_cache_memory', 'columns.prompt'); None means
    not given. The CLI builds its config here too."""
    if isinstance(job, JobConfig):
        cfg = job
    else:
        where = Location.of(job)
        if not (where.is_glob() or where.exists()):
            raise ConfigError(f"{job} does not exist; give a job file (.toml) or an input file")
        if where.name.endswith(".toml"):
            cfg = load_job_file(where)
        else:
            if output is None:
                raise ConfigError(f"{job} is an input file: say where results go with "
                                  "-o out.parquet")
            cfg = JobConfig(input=where, output=Location.of(output))
    keyed = {_option_key(name): value for name, value in overrides.items()}
    if output is not None:
        keyed["output"] = output
    return with_overrides(cfg, **keyed)


def _engine(engine: str | Engine) -> tuple[str, Engine | None]:
    from .engine.factory import engine_kind

    if isinstance(engine, str):
        if engine not in EngineKind.values():
            raise ConfigError(f"engine must be {' or '.join(map(repr, EngineKind.values()))}, "
                              f"not {engine!r}")
        return engine, None
    return engine_kind(engine), engine


def run_config(cfg: JobConfig, *, resume: bool = False, overwrite: bool = False,
               engine: str | Engine | None = None, progress: bool | None = None,
               grace_period: float = 30.0, handle_signals: bool | None = None,
               engine_log: bool = False, estimate: bool = False) -> Summary:
    """Run a JobConfig: the Summary of a finished job (exit_code 0 or 3), or JobInterrupted.

    engine: "vllm", "sim" (vLLM's scheduler and KV cache with no model: engine/sim.py),
    "fake" (no model: a deterministic stand-in for pipeline tests), an engine already
    started (shared between jobs), or None: the job file's `[engine] kind`, else "vllm".
    handle_signals (default: when called from the main thread) lets SIGTERM/SIGINT drain and
    save, as in the CLI. engine_log: what vLLM and the libraries under it print goes to
    `<output>.log`, not the terminal. estimate: first run the job through the sim engine
    (job/estimate.py); the summary's `estimate` puts its predictions beside what the run
    measured."""
    from .job.estimate import estimate_run, with_measured
    from .job.paths import output_paths
    from .job.run import run_job

    engine_kind, started = _engine(cfg.engine_kind if engine is None else engine)
    if handle_signals is None:
        handle_signals = threading.current_thread() is threading.main_thread()
    # A finished job is not run again: nor is its estimate (a simulation of the whole job)
    done = not overwrite and output_paths(cfg).dest.exists()
    predicted = estimate_run(cfg) if estimate and not done else None
    outcome = run_job(cfg, engine_kind=engine_kind, engine=started, resume=resume,
                      overwrite=overwrite, interactive=progress, grace_s=grace_period,
                      handle_signals=handle_signals, engine_log=engine_log)
    if predicted is not None and "rows" in outcome.summary:
        outcome.summary["estimate"] = with_measured(predicted, outcome.summary)
        from .job.run_trace import rewrite_summary

        rewrite_summary(cfg, outcome.summary)  # the file and the report show it too
    summary = Summary.from_outcome(outcome)
    if outcome.exit_code == EXIT_INTERRUPTED:
        raise JobInterrupted(outcome.message, summary)
    return summary


def run(job: str | Path | Location | JobConfig, **options: Any) -> Summary:
    """Run a job: a job file, an input file (with output=...), or a JobConfig; local paths or
    URIs (s3://, gs://, ...). Options are the CLI's flags as keyword arguments:

        batchrun.run("jobs/example.toml", resume=True)
        batchrun.run("prompts.jsonl", output="out.parquet", max_tokens=64, engine="fake")

    Returns a Summary (exit_code 0, or 3 when some rows failed). Raises UsageError (exit code
    2: the message says what to fix) or JobInterrupted (exit code 4: run again with
    resume=True). Like the CLI, a job whose output exists is not run again (status
    "already_done") unless overwrite=True."""
    quiet_engine_logs()
    run_options = {k: options.pop(k) for k in list(options) if k in RUN_OPTIONS}
    return run_config(build_config(job, **options), **run_options)


def _to_arrow(frame: Any) -> Any:
    import pyarrow as pa

    if isinstance(frame, pa.Table):
        return frame
    if isinstance(frame, pa.RecordBatch):
        return pa.Table.from_batches([frame])
    module = type(frame).__module__.split(".")[0]
    if module == "polars":
        if hasattr(frame, "collect") and not hasattr(frame, "to_arrow"):  # a LazyFrame
            frame = frame.collect()
        return frame.to_arrow()
    if module == "pandas":
        return pa.Table.from_pandas(frame, preserve_index=False)
    if hasattr(frame, "__arrow_c_stream__"):  # any Arrow-compatible table
        return pa.table(frame)
    raise UsageError(f"generate() and embed() take a polars, pandas or Arrow table, not "
                     f"{type(frame).__name__}")


def generate(frame: Any, *, prompt: str = "prompt", model: str = "default",
             **options: Any) -> polars.DataFrame:
    """Completions for a table in memory (polars, pandas or Arrow), one output row per input
    row, in order, with the columns of batchrun's Parquet output (row, id, text,
    finish_reason, prompt_tokens, completion_tokens, cached_tokens, error).

    `prompt` names the prompt column (a `messages` column of chat lists works too, and
    `id`, `max_tokens`, `temperature`, ... columns set per-row values, as in a file).
    Options: sampling defaults (max_tokens, temperature, top_p, seed, stop) and run()'s
    other options (engine="fake", kv_cache_memory="1GiB", passthrough=["topic"], ...).

        batchrun.generate(pl.DataFrame({"prompt": ["Say hi."] * 4}), max_tokens=4)

    The same planner and engine as `batchrun run`: the table goes through a temporary Parquet
    file. A bad row gets its `error` set; a bad table raises UsageError."""
    import polars as pl

    return pl.from_arrow(_run_table(_to_arrow(frame), "generate", model=model,
                                    prompt_column=prompt, **options))


def embed(frame: Any, *, text: str | None = None, model: str = "default",
          **options: Any) -> polars.DataFrame:
    """A vector for each row of a table in memory (polars, pandas or Arrow): the table, in
    order, with `embedding` (float32 vectors of the model's dimension), `prompt_tokens` and
    `error` added. `text` names the text column (default: `input`, else `prompt`); the
    model (default: all-MiniLM-L6-v2, shipped) and run()'s options as for generate().

        batchrun.embed(pl.DataFrame({"input": ["a cat", "a dog"]}))["embedding"]"""
    import polars as pl

    table = _to_arrow(frame)
    columns = {"prompt_column": text} if text else {}
    out = _run_table(table, "embed", model=model, task="embed", **columns, **options)
    added = ["embedding", "prompt_tokens", "error"]
    kept = table.drop_columns([c for c in added if c in table.column_names])
    for name in added:  # one output row per input row, in order
        kept = kept.append_column(name, out[name])
    return pl.from_arrow(kept)


def _run_table(table: Any, caller: str, **options: Any) -> Any:
    """An Arrow table through a job (a temporary Parquet file each way): the output table."""
    import pyarrow.parquet as pq

    quiet_engine_logs()
    run_options = {k: options.pop(k) for k in list(options) if k in RUN_OPTIONS}
    run_options.setdefault("progress", False)
    for name in ("output", "work_dir", "openai_output"):
        if name in options:
            raise ConfigError(f"{caller}() returns its results; use batchrun.run() to write "
                              f"them to a file ({name}=...)")
    with tempfile.TemporaryDirectory(prefix=f"batchrun-{caller}-") as tmp:
        source, target = Path(tmp) / "input.parquet", Path(tmp) / "output.parquet"
        pq.write_table(table, source)
        cfg = build_config(source, target, input_format="parquet", **options)
        run_config(cfg, **run_options)
        return pq.read_table(target).replace_schema_metadata(None)
