"""What one request row may hold: the checks every input format shares.

InputError (a whole file is unusable) lives here too, so that every reader module can raise it;
batchrun.io.readers is its public home.

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
from typing import Any

import pyarrow as pa

from batchrun.errors import UsageError
from batchrun.io.schema import ENDPOINT_CHAT, ENDPOINT_COMPLETION, REQUEST_SCHEMA

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The readers' working table: REQUEST_SCHEMA, except that `id` may be null. A null id means the
# row's own id could not be read; the reader gives such rows a free id once it has seen them all.
DRAFT_SCHEMA = REQUEST_SCHEMA.set(1, pa.field("id", pa.string()))

# The request fields a row may set, in REQUEST_SCHEMA order. The first three are the prompt
# sources, of which a row gives exactly one.
FIELDS = ("prompt", "messages", "prompt_token_ids",
          "max_tokens", "temperature", "top_p", "seed", "stop")
PROMPT_SOURCES = 3


class InputError(UsageError):
    """The input file as a whole cannot be read (the CLI exits with code 2). The message is one
    line that names the file and the fix."""


class RowError(ValueError):
    """What is wrong with one row and how to fix it, without the "row N: " prefix."""


class _Invalid(Exception):
    """Raised by a field parser; parse_field words the message from the field's reason."""


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON for an error message: one line, short, always valid UTF-8."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    # A lone surrogate from a "\ud800" escape cannot be stored in an Arrow string.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


def parse_request(raw: Sequence[Any], labels: Sequence[str | None]) -> list[Any]:
    """One row's request values as the request table stores them: the endpoint, then FIELDS.
    `raw` holds the input values in FIELDS order. Raises RowError."""
    if (raw[0] is None) + (raw[1] is None) + (raw[2] is None) != PROMPT_SOURCES - 1:
        given = [i for i in range(PROMPT_SOURCES) if raw[i] is not None]
        raise RowError(sources_problem(given, labels))
    request = [ENDPOINT_COMPLETION if raw[1] is None else ENDPOINT_CHAT, *raw]
    for i, value in enumerate(raw):
        if value is not None:
            try:  # the parser directly: this runs per field per row
                request[i + 1] = _FIELD_PARSERS[i](value)
            except _Invalid:
                parse_field(FIELDS[i], value, labels[i])  # raises RowError, worded
    return request
