"""`batchrun` command line: thin on purpose. It turns flags into a JobConfig, calls one stage
function, prints the outcome and maps it to an exit code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .api import build_config, quiet_engine_logs, run_config
from .cli_options import (
    AdapterOpt,
    ChoiceOpt,
    EarlyStartOpt,
    EngineOpt,
    EstimateRunOpt,
    FormatOpt,
    IdColOpt,
    JobArg,
    MaxLorasOpt,
    MemoryBudgetOpt,
    ModelOpt,
    NormalizeOpt,
    OutputOpt,
    PassOpt,
    PlanReportOpt,
    PromptColOpt,
    RegexOpt,
    ReplicasOpt,
    ReportOpt,
    SchemaOpt,
    SimDeviceOpt,
    TaskOpt,
    TruncateOpt,
    adapter_overrides,
)
from .config import AttentionMode, JobConfig
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_ROW_ERRORS,
    EXIT_USAGE,
    BatchrunError,
    JobInterrupted,
    one_line,
)
from .job.summary_lines import estimate_lines, outcome_lines

EXIT_CODES_HELP = f"""\
Exit codes: {EXIT_OK} every row succeeded (or the job had already finished);
{EXIT_INTERNAL} internal error (a bug: please report it);
{EXIT_USAGE} usage error or unreadable input;
{EXIT_ROW_ERRORS} finished, but some rows failed (their `error` column says why);
{EXIT_INTERRUPTED} interrupted (signal, engine failure, full disk): run again with --resume."""

app = typer.Typer(
    name="batchrun",
    help=("Offline batch inference for LLMs: a file of prompts in, a Parquet file of "
          "completions out, planned so that shared prompt prefixes are computed once.\n\n"
          "  batchrun run jobs/example.toml\n\n"
          "  batchrun run prompts.jsonl -o results.parquet --max-tokens 64\n\n"
          + EXIT_CODES_HELP),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _constraint_overrides(json_schema: Path | None, choice: list[str] | None,
                          regex: str | None) -> dict[str, Any]:
    """Constraint flags as sampling overrides. A flag replaces the job file's default
    constraint, whichever kind that was ('' and () clear the other kinds)."""
    if json_schema is None and not choice and regex is None:
        return {}
    return {"json_schema": str(json_schema.resolve()) if json_schema else "",
            "choices": tuple(choice or ()), "regex": regex or ""}


def _config(job: str, output: str | None, **overrides: Any) -> JobConfig:
    """Flags -> JobConfig: the same code as batchrun.run()'s (batchrun.api.build_config)."""
    return build_config(job, output, **overrides)


def _fail(message: str, code: int) -> None:
    typer.echo(f"batchrun: error: {message}", err=True)
    raise typer.Exit(code)


def _internal_error(e: Exception, verbose: bool) -> None:
    """A bug: say so in one line, details only when asked."""
    if verbose or os.environ.get("BATCHRUN_DEBUG"):
        raise e
    _fail(f"internal error: {type(e).__name__}: {one_line(e, None)} (re-run with -v for "
          "details; please report it)", EXIT_INTERNAL)


def _quiet_engine_logs(verbose: bool, *, to_log_file: bool = False) -> None:
    quiet_engine_logs(verbose, to_log_file=to_log_file)


@app.command()
def run(
    job: JobArg,
    output: OutputOpt = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    normalize: NormalizeOpt = None,
    truncate: TruncateOpt = None,
    max_tokens: Annotated[int | None, typer.Option(help="Default max new tokens per row.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default temperature (0: greedy).")]
    = None,
    top_p: Annotated[float | None, typer.Option(help="Default nucleus sampling top_p.")] = None,
    seed: Annotated[int | None, typer.Option(help="Default per-row sampling seed.")] = None,
    json_schema: SchemaOpt = None,
    choice: ChoiceOpt = None,
    regex: RegexOpt = None,
    logprobs: Annotated[bool | None, typer.Option(
        "--logprobs/--no-logprobs", help="Return each output token's log-probability "
        "(output column `logprobs`; rows may set their own).")] = None,
    top_logprobs: Annotated[int | None, typer.Option(
        help="With each token, the log-probabilities of the N (0-20) likeliest tokens at its "
             "position; turns --logprobs on.")] = None,
    input_format: FormatOpt = None,
    prompt_column: PromptColOpt = None,
    id_column: IdColOpt = None,
    passthrough: PassOpt = None,
    openai_output: Annotated[str | None, typer.Option(
        help="Also write results as OpenAI Batch API output JSONL here.")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="Local folder for the checkpoint (default: next to a local output; for a remote "
             "output, a cache folder per output URI).")] = None,
    kv_cache_memory: Annotated[str | None, typer.Option(
        help="KV-cache size for vLLM, e.g. 256MiB or 4GiB. Default on CPU: sized from the "
             "job (its plan's peak window + 25%, at most 40% of free memory); on GPU: "
             "vLLM's.")] = None,
    block_size: Annotated[int | None, typer.Option(
        help="KV block size (default: 32 on CPU, 16 on GPU).")] = None,
    memory_budget: MemoryBudgetOpt = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Context length cap. Default: the job's longest request (prompt + max_tokens), "
             "within the model's context.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 (CPU default), bfloat16, ...")]
    = None,
    enforce_eager: Annotated[bool | None, typer.Option(
        "--enforce-eager/--compile",
        help="Eager mode starts fast; compiled runs faster. Default: by job size.")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="GPUs per model.")] = None,
    attention: Annotated[AttentionMode | None, typer.Option(
        help="'auto' (default): batchrun's shared-prefix attention where it pays (GPUs; on "
             "CPU vLLM's kernel measured faster); 'prefix': always; 'default': vLLM's own.")]
    = None,
    plan: Annotated[bool, typer.Option(
        "--plan/--no-plan", help="--no-plan runs rows in file order (for comparisons).")]
    = True,
    replicas: ReplicasOpt = None,
    ray_address: Annotated[str | None, typer.Option(
        help="Run the replicas on this Ray cluster: 'auto' (the one this machine is part "
             "of) or 'ray://HEAD:10001'. Default: a Ray instance on this machine.")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted run of this job (starts fresh if there is none).")]
    = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a finished output and discard any unfinished run.")] = False,
    engine: EngineOpt = None,
    estimate: EstimateRunOpt = False,
    report: ReportOpt = True,
    early_start: EarlyStartOpt = True,
    replay_lengths: Annotated[str | None, typer.Option(
        help="With --engine sim: end each row's completion where an earlier output of this "
             "job (its Parquet file, local or a URI) ended it, by row id; rows that ended by "
             "length there run to max_tokens.")] = None,
    sim_device: SimDeviceOpt = None,
    adapter: AdapterOpt = None,
    max_loras: MaxLorasOpt = None,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--log-lines",
        help="Progress bar, or plain log lines (default: bar on a terminal).")] = None,
    grace_period: Annotated[float, typer.Option(
        help="Seconds in-flight requests get to finish after SIGTERM/SIGINT.")] = 30.0,
    json_summary: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v",
        help="Show vLLM's and torch's logs live (default: in <output>.log, path in the "
             "summary).")] = False,
) -> None:
    """Run a job: read, plan, generate, and write one Parquet row per input row.

    \b
    Examples:
      batchrun run jobs/example.toml
      batchrun run prompts.jsonl -o out.parquet --max-tokens 64 --kv-cache-memory 1GiB
      batchrun run batch_input.jsonl -o out.parquet --openai-output out.jsonl
      batchrun run texts.jsonl -o vectors.parquet --task embed
      batchrun run reviews.jsonl -o labels.parquet --choice YES --choice NO --top-logprobs 2
      batchrun run docs.jsonl -o fields.parquet --json-schema schemas/invoice.json
      batchrun run jobs/nightly.toml --resume      # cron: continue after a kill
      batchrun run 's3://bucket/in/*.parquet' -o s3://bucket/out.parquet
      batchrun run jobs/nightly.toml --replicas 8    # 8 GPUs, one engine each
    """
    _quiet_engine_logs(verbose, to_log_file=True)
    try:
        cfg = _config(
            job, output, model=model, input_format=input_format, openai_output=openai_output,
            task=task and task.value, normalize=normalize, truncate=truncate, plan=plan,
            work_dir=work_dir, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, logprobs=logprobs, top_logprobs=top_logprobs,
            kv_cache_memory=kv_cache_memory, memory_budget=memory_budget,
            block_size=block_size, max_model_len=max_model_len, dtype=dtype,
            enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
            attention=attention, prompt_column=prompt_column, id_column=id_column,
            passthrough=passthrough, replicas=replicas, ray_address=ray_address,
            replay_lengths=replay_lengths, sim_device=sim_device, max_loras=max_loras,
            report=report, early_start=early_start, **adapter_overrides(adapter),
            **_constraint_overrides(json_schema, choice, regex))
        summary = run_config(cfg, engine=engine and engine.value, resume=resume,
                             overwrite=overwrite, progress=progress, grace_period=grace_period,
                             handle_signals=True, engine_log=not verbose, estimate=estimate)
    except JobInterrupted as e:
        summary = e.summary
    except BatchrunError as e:
        _fail(str(e), e.exit_code)  # 2 (usage), or 4 (an engine that died)
    except KeyboardInterrupt:  # Ctrl-C before the job's own signal handling started
        _fail("interrupted before the job started; nothing was lost. Run the same command "
              "(with --resume) to start it", EXIT_INTERRUPTED)
    except Exception as e:
        _internal_error(e, verbose)
    _print_outcome(summary.details, summary.message, json_summary)
    raise typer.Exit(summary.exit_code)


def _print_outcome(summary: dict[str, Any], message: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    for line in outcome_lines(summary):
        typer.echo(line, err=True)
    if message:
        typer.echo(f"batchrun: {message}", err=True)


@app.command()
def validate(
    job: JobArg,
    output: OutputOpt = None,
    model: ModelOpt = None,
    input_format: FormatOpt = None,
    prompt_column: PromptColOpt = None,
    id_column: IdColOpt = None,
    json_schema: SchemaOpt = None,
    choice: ChoiceOpt = None,
    regex: RegexOpt = None,
    engine: EngineOpt = None,
    adapter: AdapterOpt = None,
    max_errors: Annotated[int, typer.Option(help="How many row problems to list.")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a job without running the model: rows, row problems, prompt lengths.

    \b
    Exits 0 when every row can run, 3 when some rows would fail, 2 when the job cannot run.
    Example:
      batchrun validate jobs/example.toml
    """
    _quiet_engine_logs(False)
    try:
        from .job.commands import validate_input

        cfg = _config(job, output or "validate.parquet", model=model,
                      input_format=input_format,
                      **{"columns.prompt": prompt_column, "columns.id": id_column,
                         **adapter_overrides(adapter),
                         **_constraint_overrides(json_schema, choice, regex)})
        found, input_format_found, max_model_len = validate_input(
            cfg, engine.value if engine else cfg.engine_kind, max_errors)
    except BatchrunError as e:
        _fail(str(e), e.exit_code)  # 2 (usage), or 4 (an engine that died)
    except Exception as e:
        _internal_error(e, False)
    counts = found.summary()
    report = {
        "input": str(cfg.input),
        "format": input_format_found,
        "rows": counts["rows"],
        "ok": counts["ok"],
        "errors": counts["errors"],
        "max_model_len": max_model_len,
        **found.prompt_summary(),
        "first_errors": counts["first_errors"],
    }
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"{report['input']} ({report['format']}): {report['rows']} rows, "
                   f"{report['ok']} ok, {report['errors']} with problems")
        typer.echo(f"prompt tokens: total {report['prompt_tokens']['total']:,}, max "
                   f"{report['prompt_tokens']['max']:,} (context {report['max_model_len']:,})")
        constrained = report["constrained"]
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in constrained.items())
        typer.echo(f"constrained outputs: {sum(constrained.values()):,} rows"
                   + (f" ({kinds})" if kinds else "")
                   + f"; logprobs: {report['logprobs_rows']:,} rows")
        for line in report["first_errors"]:
            typer.echo(f"  {line}")
    raise typer.Exit(EXIT_OK if not report["errors"] else EXIT_ROW_ERRORS)


@app.command("plan")
def plan_command(
    job: JobArg,
    output: OutputOpt = None,
    model: ModelOpt = None,
    input_format: FormatOpt = None,
    prompt_column: PromptColOpt = None,
    block_size: Annotated[int | None, typer.Option(
        help="KV block size to plan for (default: the platform's, 32 on CPU).")] = None,
    kv_cache_memory: Annotated[str | None, typer.Option(
        help="KV-cache size the run will have, e.g. 256MiB: groups are split to fit it "
             "(default: the size a run would choose).")]
    = None,
    memory_budget: MemoryBudgetOpt = None,
    json_schema: SchemaOpt = None,
    choice: ChoiceOpt = None,
    regex: RegexOpt = None,
    engine: EngineOpt = None,
    replicas: ReplicasOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")]
    = False,
    estimate: Annotated[bool, typer.Option(
        "--estimate", help="Also run the job through the sim engine (vLLM's scheduler, no "
        "model) as a run would, replicas included, and predict its engine steps, computed "
        "prompt tokens and run-stage seconds (JSON: estimate.*); with --replicas, the "
        "busiest replica against the mean. Seconds come from the sim's cost profile.")]
    = False,
    sim_device: SimDeviceOpt = None,
    adapter: AdapterOpt = None,
    max_loras: MaxLorasOpt = None,
    report: PlanReportOpt = None,
) -> None:
    """Show how a job would run, without loading the model: requests, prompt tokens, distinct
    prompt tokens (the least prefill work possible), shared-prefix groups, expected saving.

    \b
    Example:
      batchrun plan jobs/example.toml --kv-cache-memory 256MiB
      batchrun plan prompts.jsonl --json | jq .distinct_prompt_tokens
      batchrun plan jobs/example.toml --estimate --json | jq .estimate.run_seconds
      batchrun plan jobs/nightly.toml --estimate --replicas 16
      batchrun plan jobs/example.toml --estimate --sim-device h100 --model llama-8b/
    """
    _quiet_engine_logs(False)
    from .job.commands import describe_plan

    try:
        cfg = _config(job, output or "plan.parquet", model=model, input_format=input_format,
                      prompt_column=prompt_column, block_size=block_size,
                      kv_cache_memory=kv_cache_memory, memory_budget=memory_budget,
                      replicas=replicas, sim_device=sim_device, max_loras=max_loras,
                      **adapter_overrides(adapter),
                      **_constraint_overrides(json_schema, choice, regex))
        figures = describe_plan(cfg, engine.value if engine else cfg.engine_kind)
        if estimate:
            from .job.estimate import estimate_run

            figures["estimate"] = estimate_run(cfg)
        if report is not None:
            from .report.build import write_plan_report

            write_plan_report({"input": str(cfg.input), **figures}, report)
    except BatchrunError as e:
        _fail(str(e), e.exit_code)  # 2 (usage), or 4 (an engine that died)
    except Exception as e:
        _internal_error(e, False)
    if json_out:
        typer.echo(json.dumps(figures, indent=2, sort_keys=True))
        return
    shown_estimate = figures.pop("estimate", None)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else (
            f"{value:,}" if isinstance(value, int) else str(value))
        typer.echo(f"{key:<{width}}  {shown}")
    if shown_estimate is not None:
        for line in estimate_lines(shown_estimate):
            typer.echo(line)


@app.command()
def calibrate(
    model: ModelOpt = None,
    dtype: Annotated[str | None, typer.Option(
        help="The dtype to measure (default: the platform's, float32 on CPU).")] = None,
    enforce_eager: Annotated[bool | None, typer.Option(
        "--enforce-eager/--compile", help="Measure eager or compiled execution (starting a "
        "compiled engine on CPU takes minutes). Default: eager on CPU (as jobs under "
        "13,000 new tokens run there), compiled on GPUs.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Measure again even if a profile is cached.")] = False,
    rounds: Annotated[int, typer.Option(
        min=1, help="Run the probe this many times; each step's median time is fitted.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
    = False,
) -> None:
    """Measure the sim engine's cost profile on this machine: a short probe (1-3 minutes on
    2 CPU cores) on the real engine, fitted step by step to the sim's counts, cached per
    model, device, dtype and vLLM version for `--engine sim` and `plan --estimate`. Without
    --force, shows the cached profile when there is one.

    \b
    Example:
      batchrun calibrate --model /models/llama --force --json
    """
    _quiet_engine_logs(False)
    try:
        from .config import DEFAULT_MODEL
        from .job.calibrate import calibrate as run_calibrate
        from .job.terminal import terminal

        result = run_calibrate(model or DEFAULT_MODEL, dtype=dtype, eager=enforce_eager,
                               force=force, rounds=rounds,
                               log=lambda line: print(line, file=terminal()))
    except BatchrunError as e:
        _fail(str(e), e.exit_code)
    except Exception as e:
        _internal_error(e, False)
    typer.echo(json.dumps(result.to_dict(), indent=2) if json_out else
               "\n".join(result.lines()))


@app.command("report")
def report_command(
    output: Annotated[str, typer.Argument(help="A job's output file (or its summary JSON).")],
    to: Annotated[Path | None, typer.Option(
        "--to", help="Write the report here (default: <output>.report.html).")] = None,
) -> None:
    """Rebuild a job's HTML report from its summary and per-step trace (one file that opens
    offline: plotly's JavaScript is embedded).

    \b
    Example:
      batchrun report out/example.parquet
    """
    from .report.command import rebuild_report

    try:
        typer.echo(f"wrote {rebuild_report(output, to)}")
    except BatchrunError as e:
        _fail(str(e), e.exit_code)
