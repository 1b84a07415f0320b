"""The command line's options, as typer Annotated types: one home for each flag's help text,
shared by the commands that take it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .config import EngineKind, InputFormat, Task
from .errors import ConfigError

JobArg = Annotated[str, typer.Argument(
    help="A job file (jobs/*.toml) or an input: a file (.jsonl, .parquet, OpenAI batch "
         ".jsonl), a folder or glob of them; local or a URI (s3://bucket/in.jsonl).",
    show_default=False)]
OutputOpt = Annotated[str | None, typer.Option(
    "--output", "-o", help="Output Parquet file, local or a URI (required when JOB is an "
                           "input).")]
ModelOpt = Annotated[str | None, typer.Option(
    help="Local Hugging Face model folder, or 'default' (SmolLM2-135M-Instruct, shipped), or "
         "'default-embed' (all-MiniLM-L6-v2, shipped; the default of --task embed).")]
TaskOpt = Annotated[Task | None, typer.Option(
    help="'generate' (default): a completion per row; 'embed': a vector per row (output "
         "column `embedding`).")]
NormalizeOpt = Annotated[bool | None, typer.Option(
    "--normalize/--no-normalize", help="--task embed: unit-length vectors or the model's raw "
    "ones. Default: as the model's sentence-transformers config says.")]
TruncateOpt = Annotated[bool | None, typer.Option(
    "--truncate", help="--task embed: cut inputs longer than the model's context to it "
                       "(default: such a row is an error row).")]
FormatOpt = Annotated[InputFormat | None, typer.Option(
    "--input-format", help="Input format; 'auto' detects Parquet, JSONL and OpenAI batch.")]
MemoryBudgetOpt = Annotated[str | None, typer.Option(
    help="Memory batchrun itself may use for rows, token ids, plans and results (not the "
         "engine's), e.g. 2GiB. Past it the job is cut into prefix shards on disk under "
         "<output>.partial/. Default 4GiB.")]
PromptColOpt = Annotated[str | None, typer.Option(help="Input column holding the prompt text.")]
IdColOpt = Annotated[str | None, typer.Option(help="Input column holding each row's id.")]
PassOpt = Annotated[list[str] | None, typer.Option(
    "--passthrough", help="Input column to copy into the output (repeatable); "
                          "source_file: the file each row came from.")]
EngineOpt = Annotated[EngineKind | None, typer.Option(
    help="'sim' runs vLLM's own scheduler and KV cache with no model: vLLM's steps and "
         "cache hits, simulated time; 'fake' is a deterministic stand-in with no model, for "
         "testing pipelines. Default: the job file's [engine] kind, else vllm.")]
ReplicasOpt = Annotated[int | None, typer.Option(
    help="Engine replicas (Ray actors; needs batchrun[ray]): one GPU each, or on CPU side by "
         "side; each pulls prefix shards as it frees up. With --engine sim the fleet is "
         "simulated in this process, no Ray.")]
EstimateRunOpt = Annotated[bool, typer.Option(
    "--estimate", help="First run the job through the sim engine (vLLM's scheduler, no "
    "model) as this run will run it, then run it: the summary puts the predicted engine "
    "steps, computed prompt tokens and run-stage seconds beside the measured ones "
    "(JSON: estimate.*).")]
SchemaOpt = Annotated[Path | None, typer.Option(
    "--json-schema", help="Default constraint: a JSON Schema file every row's output must "
    "match (rows may set their own `json_schema`, `choices`, `regex` or `response_format`).")]
ChoiceOpt = Annotated[list[str] | None, typer.Option(
    "--choice", help="Default constraint: the output is exactly one of these (repeat: "
    "--choice POSITIVE --choice NEGATIVE).")]
SimDeviceOpt = Annotated[str | None, typer.Option(
    help="With the sim engine: the device its simulated seconds are for: cpu (this "
         "machine's, measured by `batchrun calibrate` or assumed), or h100, h200, a100, l40s "
         "(published figures: an assumption; the scheduler then takes that card's vLLM "
         "defaults and memory). Default: this machine's device.", show_default=False)]
RegexOpt = Annotated[str | None, typer.Option(
    "--regex", help="Default constraint: the output fully matches this regular expression.")]
AdapterOpt = Annotated[list[str] | None, typer.Option(
    "--adapter", help="A LoRA adapter rows may run on, NAME=FOLDER (a PEFT folder; "
    "repeatable; adds to the job file's [adapters]). A row names it in its `adapter` or "
    "`lora` column, or as body.model in an OpenAI batch file.")]
MaxLorasOpt = Annotated[int | None, typer.Option(
    help="LoRA adapters the engine holds at once (vLLM's max_loras). Default: every "
         "adapter the job has, up to 8; with fewer, each adapter's rows run together.")]


def adapter_overrides(adapter: list[str] | None) -> dict[str, Any]:
    """--adapter NAME=FOLDER flags as the `adapters` override."""
    if not adapter:
        return {}
    adapters = {}
    for given in adapter:
        name, eq, folder = given.partition("=")
        if not eq or not name or not folder:
            raise ConfigError(f"--adapter {given!r}: write NAME=FOLDER, like "
                              "--adapter support=adapters/support")
        adapters[name] = folder
    return {"adapters": adapters}
ReportOpt = Annotated[bool, typer.Option(
    "--report/--no-report", help="Write <output>.report.html beside the summary: the run's "
    "throughput, batch and KV use over time, the prefix plan, replicas, output lengths, "
    "errors, settings (rebuild it any time with `batchrun report OUTPUT`).")]
EarlyStartOpt = Annotated[bool, typer.Option(
    "--early-start/--no-early-start", help="On a job larger than one sorted run (--memory-"
    "budget/16 of rows), start the engine on the first rows while the rest is read, and hand "
    "it more whenever it would wait; costs a recomputed shared prefix per run handed early. "
    "--no-early-start reads and plans the whole job first.")]
PlanReportOpt = Annotated[Path | None, typer.Option(
    "--report", help="Also draw the plan (and the --estimate) into this HTML file.")]
