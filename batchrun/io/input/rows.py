"""What one request row may hold: the checks every input format shares.

The JSONL, OpenAI-batch and Parquet readers all hand raw Python values to the functions here,
so a bad value gets the same verdict and the same message whatever file it came from. (The
Parquet reader first tries vectorized Arrow checks and falls back to these for any column chunk
those do not accept outright: these functions are the definition of a valid value.)

A value of None means "not given", for every field: JSON null, a missing key and a Parquet null
are the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pyarrow as pa

from ... import structured
from ...errors import show
from ..schema import ENDPOINT_CHAT, ENDPOINT_COMPLETION, REQUEST_SCHEMA

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The readers' working table: REQUEST_SCHEMA, except that `id` may be null. A null id means the
# row's own id could not be read; the reader gives such rows a free id once it has seen them all.
DRAFT_SCHEMA = REQUEST_SCHEMA.set(1, pa.field("id", pa.string()))

# The request fields a row may set, in REQUEST_SCHEMA order. The first three are the prompt
# sources, of which a row gives exactly one.
FIELDS = ("prompt", "messages", "prompt_token_ids",
          "max_tokens", "temperature", "top_p", "seed", "stop", "completion_tokens", "logprobs",
          "top_logprobs")
PROMPT_SOURCES = 3
# The fields that constrain the output, of which a row gives at most one. Together they fill
# the request table's `constraint` and `constraint_spec` columns.
CONSTRAINT_FIELDS = ("response_format", "choices", "regex", "json_schema")
# The columns that name a row's LoRA adapter (ColumnMap names; either may be used).
ADAPTER_FIELDS = ("adapter", "lora")


class DraftBatch(NamedTuple):
    """What a format reader gives for a run of consecutive rows, before ids are checked.

    draft: DRAFT_SCHEMA rows.
    passthrough: the ColumnMap.passthrough columns of the same rows, as the file types them
        (a column the file lacks, or a JSONL column null in every row of the batch, is of
        Arrow's null type: it has no type of its own to agree with other batches on).
    input_format: what the file is as far as read: "jsonl", "openai", "parquet", or None
        while no row has told (JSONL with format "auto" and no JSON object yet).
    """

    draft: pa.RecordBatch
    passthrough: pa.Table
    input_format: str | None


class RowError(ValueError):
    """What is wrong with one row and how to fix it, without the "row N: " prefix."""


class _Invalid(Exception):
    """Raised by a field parser; parse_field words the message from the field's reason."""


def json_text(values: Sequence[Any]) -> pa.Array:
    """Values as a text column: strings as they are, anything else as its JSON text (for a
    column whose values share no Arrow type)."""
    return pa.array([v if v is None or type(v) is str else json.dumps(v, default=str)
                     for v in values], pa.string())


def _integer(value: Any, low: float, high: float) -> int:
    # Integral floats pass: pandas stores an int column with nulls as float64.
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not low <= value <= high:  # `type is` also rejects bools
        raise _Invalid
    return value


def _number(value: Any) -> float:
    if type(value) is not int and type(value) is not float:
        raise _Invalid
    try:
        number = float(value)
    except OverflowError:
        raise _Invalid from None
    if not math.isfinite(number):
        raise _Invalid
    return number


def _prompt(value: Any) -> str:
    if type(value) is not str or not value:
        raise _Invalid
    return value


def _messages(value: Any) -> str:
    if type(value) is str:  # the chat list as JSON text, as a Parquet string column holds it
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise _Invalid from None
    if type(value) is not list or not value:
        raise _Invalid
    messages = []
    for message in value:
        if (type(message) is not dict or type(message.get("role")) is not str
                or type(message.get("content")) is not str):
            raise _Invalid
        # Parquet structs carry every key of the column as null where a message lacks it.
        messages.append({k: v for k, v in message.items() if v is not None})
    text = json.dumps(messages, ensure_ascii=False)
    try:
        text.encode("utf-8")  # JSON text may hide an unpaired surrogate escape
    except UnicodeEncodeError:
        raise _Invalid from None
    return text


def _token_ids(value: Any) -> list[int]:
    if (type(value) is not list or not value or set(map(type, value)) != {int}
            or min(value) < 0 or max(value) > INT32_MAX):
        raise _Invalid
    return value


def _max_tokens(value: Any) -> int:
    return _integer(value, 1, INT64_MAX)


def _temperature(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise _Invalid
    return number


def _top_p(value: Any) -> float:
    number = _number(value)
    if not 0 < number <= 1:
        raise _Invalid
    return number


def _seed(value: Any) -> int:
    return _integer(value, INT64_MIN, INT64_MAX)


def _stop(value: Any) -> list[str]:
    if type(value) is str:
        return [value]
    if type(value) is not list or any(type(s) is not str for s in value):
        raise _Invalid
    return value


def _completion_tokens(value: Any) -> int:
    return _integer(value, 0, INT64_MAX)


def _logprobs(value: Any) -> bool:
    if type(value) is not bool:
        raise _Invalid
    return value


def _top_logprobs(value: Any) -> int:
    return _integer(value, 0, structured.MAX_TOP_LOGPROBS)


def _id(value: Any) -> str:
    if type(value) is str:
        return value
    return str(_integer(value, -math.inf, math.inf))


# field -> (parser, why a value fails). The reason is the whole rule: messages quote it.
_PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "id": (_id, "must be a string or an integer"),
    "prompt": (_prompt, "must be a non-empty string"),
    "messages": (_messages, 'must be a non-empty list of {"role": string, "content": string} '
                            "objects (or that list as JSON text)"),
    "prompt_token_ids": (_token_ids, "must be a non-empty list of token ids "
                                     f"(integers from 0 to {INT32_MAX})"),
    "max_tokens": (_max_tokens, "must be a positive integer"),
    "temperature": (_temperature, "must be a number >= 0"),
    "top_p": (_top_p, "must be a number in (0, 1]"),
    "seed": (_seed, "must be a 64-bit integer"),
    "stop": (_stop, "must be a string or a list of strings"),
    "completion_tokens": (_completion_tokens, "must be an integer >= 0 (the tokens the "
                                              "completion is to have, for --engine sim)"),
    "logprobs": (_logprobs, "must be true or false"),
    "top_logprobs": (_top_logprobs, "must be an integer from 0 to "
                                    f"{structured.MAX_TOP_LOGPROBS}"),
}
_FIELD_PARSERS = tuple(_PARSERS[name][0] for name in FIELDS)


def parse_field(field: str, value: Any, label: str) -> Any:
    """A non-null input value of `field` as the request table stores it; `label` is the name
    the user knows the value by (their column name, or `body.x` in an OpenAI file)."""
    parse, reason = _PARSERS[field]
    try:
        return parse(value)
    except _Invalid:
        raise RowError(f'"{label}" {reason}, got {show(value)}') from None


def parse_id(value: Any, label: str, row: int) -> str:
    """The id a row claims: its own (ints as text), or its row number when it gives none."""
    return str(row) if value is None else parse_field("id", value, label)


def sources_problem(given: Sequence[int], labels: Sequence[str | None]) -> str:
    """Why a row does not give exactly one prompt source. `given`: indexes into FIELDS of the
    sources it gives; a None label marks a source the format cannot hold."""
    names = [f'"{label}"' for label in dict.fromkeys(labels[:PROMPT_SOURCES]) if label]
    if not given:
        choice = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
        return f"no prompt; set {choice}"
    both = " and ".join(f'"{labels[i]}"' for i in given)
    return f"give only one of {', '.join(names)}, not {both}"


def logprobs_problem(logprobs: bool | None, top_logprobs: int | None,
                     labels: Sequence[str | None]) -> str | None:
    """Why a row's logprobs and top_logprobs contradict each other (as OpenAI refuses them).
    `labels`: the names of the two fields."""
    if logprobs is False and top_logprobs is not None:
        return (f'"{labels[1]}" needs "{labels[0]}": true; set it, or drop '
                f'"{labels[1]}"')
    return None


def parse_constraint(raw: Sequence[Any], labels: Sequence[str | None]) -> tuple[Any, Any]:
    """One row's constraint as (kind, spec), (None, None) when it gives none. `raw` holds the
    input values in CONSTRAINT_FIELDS order; a None label marks a field the format cannot
    hold. Raises RowError."""
    given = [i for i, value in enumerate(raw) if value is not None]
    if not given:
        return None, None
    if len(given) > 1:
        names = ", ".join(f'"{label}"' for label in labels if label)
        both = " and ".join(f'"{labels[i]}"' for i in given)
        raise RowError(f"give only one of {names}, not {both}")
    i = given[0]
    value, label = raw[i], labels[i]
    try:
        if i == 0:
            constraint = structured.response_format(value, label)
        elif i == 1:
            constraint = structured.Constraint(structured.CHOICE, structured.choices_text(value))
        elif i == 2:
            constraint = structured.Constraint(structured.REGEX, structured.regex_text(value))
        else:
            constraint = structured.Constraint(structured.JSON_SCHEMA,
                                               structured.schema_text(value))
    except structured.ConstraintError as e:
        message = str(e)  # response_format's parts name themselves
        raise RowError(message if message.startswith('"') else f'"{label}" {message}') \
            from None
    return constraint.kind, constraint.spec


def parse_request(raw: Sequence[Any], labels: Sequence[str | None]) -> list[Any]:
    """One row's request values as the request table stores them: the endpoint, FIELDS, then
    the constraint and its spec. `raw` holds the input values in FIELDS + CONSTRAINT_FIELDS
    order. Raises RowError."""
    if (raw[0] is None) + (raw[1] is None) + (raw[2] is None) != PROMPT_SOURCES - 1:
        given = [i for i in range(PROMPT_SOURCES) if raw[i] is not None]
        raise RowError(sources_problem(given, labels))
    n = len(FIELDS)
    request = [ENDPOINT_COMPLETION if raw[1] is None else ENDPOINT_CHAT, *raw[:n]]
    for i in range(n):
        value = raw[i]
        if value is not None:
            try:  # the parser directly: this runs per field per row
                request[i + 1] = _FIELD_PARSERS[i](value)
            except _Invalid:
                parse_field(FIELDS[i], value, labels[i])  # raises RowError, worded
    if request[n - 1] is not None or request[n] is not None:
        problem = logprobs_problem(request[n - 1], request[n], labels[n - 2:n])
        if problem:
            raise RowError(problem)
    if raw[n] is None and raw[n + 1] is None and raw[n + 2] is None and raw[n + 3] is None:
        request += (None, None)
    else:
        request += parse_constraint(raw[n:], labels[n:])
    return request


def parse_adapter(values: Sequence[Any], labels: Sequence[str]) -> str | None:
    """The adapter a row names in its adapter columns (`values`, named `labels`), None for
    none: an empty name is none too. Raises RowError for a name that is not a string and
    for two columns naming different adapters."""
    named = None
    for value, label in zip(values, labels, strict=True):
        if value is None or value == "":
            continue
        if type(value) is not str:
            raise RowError(f'"{label}" must be an adapter name (a string), got {show(value)}')
        if named is not None and value != named[0]:
            raise RowError(f'"{named[1]}" and "{label}" name different adapters '
                           f'({show(named[0])} and {show(value)}); give one')
        named = (value, label)
    return None if named is None else named[0]
