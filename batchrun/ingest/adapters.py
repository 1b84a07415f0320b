"""Which LoRA adapter each row runs on: the names rows give (their `adapter` or `lora` column,
or body.model in an OpenAI file) checked against the adapters the job declares.

A declared name runs that adapter; no name, or the base model's (the job's `model`, its
folder's name, "default"), runs the base model; any other name is the row's error, naming the
known ones: a row never runs silently on another model than it asked for. One exception: an
OpenAI batch file names a model on every line (often an OpenAI model), so in a job that
declares no adapters its body.model is not read, as before adapters existed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..config import DEFAULT_MODEL, JobConfig
from ..errors import show
from ..io.schema import ADAPTER, DICTIONARY_STRING


def base_model_names(config: JobConfig) -> set[str]:
    """The names that mean "the base model": the job's `model` as given, its folder's name,
    and for the default model "default" and that model's own name."""
    names = {config.model, Path(config.model).name}
    if config.model == DEFAULT_MODEL:
        from ..model import DEFAULT_MODEL_NAME

        names.add(DEFAULT_MODEL_NAME)
    return names


def resolve_adapters(requests: pa.Table, config: JobConfig,
                     input_format: str | None) -> pa.Table:
    """`requests` (REQUEST_SCHEMA) with each row's adapter checked: a declared name kept, a
    base model's name null, an unknown name the row's error (and its adapter null)."""
    column = requests[ADAPTER]
    if column.null_count == len(column):
        return requests
    if not config.adapters and input_format == "openai":
        return _set(requests, ADAPTER, pa.nulls(len(column), DICTIONARY_STRING))
    names = column.cast(pa.string())
    given = set(pc.unique(names).to_pylist()) - {None}
    base = given & base_model_names(config)
    unknown = sorted(given - base - set(config.adapters))
    errors = requests["error"]
    if unknown:
        bad = pc.fill_null(pc.is_in(names, pa.array(unknown)), False)
        known = ", ".join([f"the base model ({show(config.model)} or none)",
                           *(show(n) for n in sorted(config.adapters))])
        fix = ("declare it under [adapters] in the job file (or --adapter NAME=FOLDER)"
               if config.adapters else "this job declares no adapters: add it under "
               "[adapters] in the job file (or --adapter NAME=FOLDER)")
        rows = requests["row"].to_pylist()
        messages = [f"row {row}: adapter {show(name)} is not one of this job's models "
                    f"({known}); {fix}" if is_bad else None
                    for row, name, is_bad in zip(rows, names.to_pylist(), bad.to_pylist(),
                                                 strict=True)]
        errors = pc.coalesce(errors, pa.array(messages, pa.string()))
    if base or unknown:
        runs_base = pc.fill_null(pc.is_in(names, pa.array(sorted(base | set(unknown)),
                                                           pa.string())), False)
        names = pc.if_else(runs_base, pa.scalar(None, pa.string()), names)
    adapters = pc.dictionary_encode(names).cast(DICTIONARY_STRING)
    return _set(_set(requests, "error", errors), ADAPTER, adapters)


def _set(table: pa.Table, name: str, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(name), column)
