"""JSONL and OpenAI-batch JSONL input: one JSON object per line, parsed line by line.

The file is read in binary so that each line is decoded on its own: invalid UTF-8, bad JSON, a
line that is too long or a cut-short last line spoil that row only. Rows are gathered as tuples
and handed on as an Arrow record batch every `batch_rows` rows: the file is never held whole,
and the Python objects of one batch at most exist at a time.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from operator import itemgetter
from typing import Any, BinaryIO, NamedTuple

import pyarrow as pa

from ...config import ColumnMap
from ...errors import InputError, show
from ..schema import (
    ENDPOINT_CHAT,
    ENDPOINT_COMPLETION,
    ENDPOINT_EMBEDDING,
    ENDPOINT_EMBEDDING_BASE64,
)
from ..storage import Location
from .rows import (
    ADAPTER_FIELDS,
    CONSTRAINT_FIELDS,
    DRAFT_SCHEMA,
    FIELDS,
    PROMPT_SOURCES,
    DraftBatch,
    RowError,
    json_text,
    parse_adapter,
    parse_field,
    parse_id,
    parse_request,
)

MAX_LINE_BYTES = 8 * 2**20

_BOM = b"\xef\xbb\xbf"
# The escapes \ud800..\udfff; only lines holding one can decode to an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# endpoint, fields, constraint, spec, adapter, inputs, input_lengths of a row with an error
_NO_REQUEST = (None,) * (1 + len(FIELDS) + 5)

OPENAI_URLS = {"/v1/chat/completions": ENDPOINT_CHAT, "/v1/completions": ENDPOINT_COMPLETION,
               "/v1/embeddings": ENDPOINT_EMBEDDING}


# --- One JSON object -> request values (the endpoint, FIELDS, constraint, spec, adapter).
# Raises RowError. -----------------------------------------------------------------------

class _Format(NamedTuple):
    id_key: str
    request: Callable[[dict], Sequence[Any]]


def _plain_format(columns: ColumnMap) -> _Format:
    keys = [getattr(columns, f) for f in FIELDS + CONSTRAINT_FIELDS]
    adapter_keys = [getattr(columns, f) for f in ADAPTER_FIELDS]
    # A merge onto all-None defaults plus one itemgetter beats 14 dict.get calls per row.
    absent, pick = dict.fromkeys(keys), itemgetter(*keys)
    sources, text = keys[:PROMPT_SOURCES], columns.input

    def request(obj: dict) -> list[Any]:
        values = {**absent, **obj}
        if text in obj and all(values[k] is None for k in sources):  # `input`: the prompt
            values[sources[0]] = obj[text]
        parsed = parse_request(pick(values), keys)
        parsed.append(parse_adapter([obj.get(k) for k in adapter_keys], adapter_keys))
        parsed += (None, None)  # several inputs: OpenAI /v1/embeddings lines only
        return parsed

    return _Format(columns.id, request)


def _openai_labels(endpoint: str, max_key: str, top_key: str) -> tuple[str | None, ...]:
    """Names of the request fields in a body; None for a field the url cannot hold."""
    prompt = "body.prompt" if endpoint == ENDPOINT_COMPLETION else None
    messages = "body.messages" if endpoint == ENDPOINT_CHAT else None
    return (prompt, messages, prompt, f"body.{max_key}",
            "body.temperature", "body.top_p", "body.seed", "body.stop", None, "body.logprobs",
            f"body.{top_key}", "body.response_format", None, None, None)


_EMBEDDING_LABELS = ("body.input", None, "body.input", *(None,) * (len(FIELDS) - 3),
                     *(None,) * len(CONSTRAINT_FIELDS))
_ENCODINGS = {None: ENDPOINT_EMBEDDING, "float": ENDPOINT_EMBEDDING,
              "base64": ENDPOINT_EMBEDDING_BASE64}


def _openai_embedding_request(body: dict) -> list[Any]:
    """A /v1/embeddings body: `input` a string, a list of token ids, or a list of those (a
    list of one is that one); `encoding_format` float or base64 (kept as the row's endpoint,
    for its response)."""
    text = body.get("input")
    if text is None:
        raise RowError('"body.input" is missing; give the text to embed')
    if type(text) is list and not text:
        raise RowError('"body.input" is an empty list; give at least one text to embed')
    several = None
    if type(text) is list and type(text[0]) is not int:
        several, text = (text, text[0]) if len(text) > 1 else (None, text[0])
    encoding = body.get("encoding_format")
    if encoding not in _ENCODINGS:
        raise RowError(f'"body.encoding_format" must be "float" or "base64", got {show(encoding)}')
    if body.get("dimensions") is not None:
        raise RowError('"body.dimensions" is not supported: the vectors have the model\'s '
                       "own dimension; drop it")
    sources = (None, None, text) if type(text) is list else (text, None, None)
    request = parse_request((*sources, *(None,) * (len(_EMBEDDING_LABELS) - 3)),
                            _EMBEDDING_LABELS)
    request[0] = _ENCODINGS[encoding]
    request.append(parse_adapter([body.get("model")], ["body.model"]))
    request.extend(_several_inputs(several, request) if several else (None, None))
    return request


def _several_inputs(inputs: list, request: list[Any]) -> tuple[Any, Any]:
    """A list of several inputs as the request table's `inputs` (texts) or `input_lengths`
    (token id lists, their ids one after another in prompt_token_ids); `request`'s prompt
    source is set to match."""
    kind = "prompt" if type(inputs[0]) is str else "prompt_token_ids"
    for k, item in enumerate(inputs):
        if (type(item) is str) != (kind == "prompt"):
            raise RowError('"body.input" mixes texts and token id lists; give a list of '
                           "texts or a list of token id lists")
        parse_field(kind, item, f"body.input[{k}]")
    if kind == "prompt":
        request[1] = None
        return inputs, None
    request[3] = [t for item in inputs for t in item]
    return None, [len(item) for item in inputs]


# /v1/completions takes `logprobs` as a number: how many top tokens to return per position.
_OPENAI_LABELS = {(url, max_key, top_key): _openai_labels(endpoint, max_key, top_key)
                  for url, endpoint in OPENAI_URLS.items()
                  for max_key in ("max_tokens", "max_completion_tokens")
                  for top_key in ("top_logprobs", "logprobs")}


def _openai_prompt(prompt: Any) -> tuple[Any, Any]:
    """body.prompt of /v1/completions as (text, token ids): it may be a string, a list of token
    ids, or a batch (a list of those) that must hold exactly one prompt."""
    if type(prompt) is list and prompt and type(prompt[0]) is not int:
        if len(prompt) > 1:
            raise RowError("batched prompts are not supported; one prompt per line "
                           f'("body.prompt" holds {len(prompt)})')
        prompt = prompt[0]
    return (None, prompt) if type(prompt) is list else (prompt, None)


def _openai_request(obj: dict) -> list[Any]:
    method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
    if method is not None and method != "POST":
        raise RowError(f'"method" must be "POST", got {show(method)}')
    if type(url) is not str or url not in OPENAI_URLS:
        supported = " or ".join(f'"{u}"' for u in OPENAI_URLS)
        raise RowError(f'"url" must be {supported}, got {show(url)}')
    if type(body) is not dict:
        raise RowError(f'"body" must be a JSON object, got {show(body)}')
    if url == "/v1/embeddings":
        return _openai_embedding_request(body)
    if body.get("n") not in (None, 1):
        raise RowError(f'"body.n" must be 1 (one completion per line), got {show(body["n"])}')
    # max_completion_tokens is OpenAI's newer name for max_tokens.
    max_key = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
               else "max_tokens")
    logprobs, top_logprobs, top_key = body.get("logprobs"), body.get("top_logprobs"), \
        "top_logprobs"
    if OPENAI_URLS[url] == ENDPOINT_CHAT:
        sources = (None, body.get("messages"), None)
    else:
        text, token_ids = _openai_prompt(body.get("prompt"))
        sources = (text, None, token_ids)
        if logprobs is not None and type(logprobs) is not bool:  # a count, as OpenAI has it
            logprobs, top_logprobs, top_key = True, logprobs, "logprobs"
    # No completion_tokens: OpenAI's body has no such field.
    raw = (*sources, body.get(max_key), *map(body.get, FIELDS[4:8]), None, logprobs,
           top_logprobs, body.get("response_format"), None, None, None)
    request = parse_request(raw, _OPENAI_LABELS[url, max_key, top_key])
    # The model a line names: an adapter, the base model, or (in a job that declares no
    # adapters) any model name at all; ingest/adapters.py tells which.
    request.append(parse_adapter([body.get("model")], ["body.model"]))
    request += (None, None)
    return request


_OPENAI_FORMAT = _Format("custom_id", _openai_request)


def is_openai_batch(obj: dict) -> bool:
    return "custom_id" in obj and "body" in obj


# --- The line loop ------------------------------------------------------------------------

def _skip_rest_of_line(f: BinaryIO) -> int:
    """Read past the end of an over-long line in pieces, so it is never held whole."""
    skipped = 0
    while True:
        piece = f.readline(2**20)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def _parse_line(line: bytes) -> dict:
    """A line as a JSON object, or RowError saying why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError(f"line is not valid UTF-8 (bad byte at offset {e.start}); "
                       "save the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if not line.endswith(b"\n"):
            raise RowError(f"the last line is cut short ({e.msg}, column {e.colno}); "
                           "the file looks truncated: write it again in full") from None
        raise RowError(f"not valid JSON ({e.msg}, column {e.colno}); "
                       "write one JSON object per line") from None
    except RecursionError:
        raise RowError("JSON nested too deeply; flatten the row") from None
    except ValueError as e:  # e.g. an integer literal with thousands of digits
        raise RowError(f"not valid JSON ({e}); write one JSON object per line") from None
    if type(obj) is not dict:
        raise RowError(f"expected a JSON object, got {type(obj).__name__} {show(obj)}; "
                       "write one JSON object per line")
    if b"\\u" in line and _SURROGATE_ESCAPE.search(line):  # `in` is much faster than re
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RowError("holds an unpaired UTF-16 surrogate escape (like \\ud800); "
                           "write text as valid Unicode") from None
    return obj


def _passthrough_value(value: Any) -> Any:
    # Nested JSON values travel as JSON text: an Arrow column needs one type per column.
    if value is None or type(value) in (str, int, float, bool):
        return value
    return json.dumps(value, ensure_ascii=False)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Parsing makes millions of small containers and no reference cycles, so the cyclic GC
    would only rescan them over and over (about a tenth of the read time). Paused only while
    a batch is parsed: the caller's code between batches runs with the GC as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _passthrough_column(values: Sequence[Any]) -> pa.Array:
    """JSON scalars as Arrow infers them; text for a column whose values share no type."""
    try:
        return pa.array(values)
    except (pa.ArrowException, OverflowError):
        return json_text(values)


class _JsonlFile:
    """One JSONL file read line by line: where the reading stands between batches."""

    def __init__(self, path: Location, columns: ColumnMap, input_format: str,
                 first_row: int) -> None:
        self.path = path
        self.first_row = first_row
        self.row = first_row  # the number the next row gets
        self.objects = 0  # lines that held a JSON object
        self.keep = list(dict.fromkeys(columns.passthrough))  # passthrough names, once each
        self.formats = {"jsonl": _plain_format(columns), "openai": _OPENAI_FORMAT}
        self.input_format = None if input_format == "auto" else input_format

    def batches(self, batch_rows: int) -> Iterator[DraftBatch]:
        with self.path.open_binary() as f:
            lines = iter(partial(f.readline, MAX_LINE_BYTES + 1), b"")
            more = True
            while more:
                pending: list[tuple] = []
                kept: list[tuple] = []
                with _cyclic_gc_paused():
                    more = self._parse(f, lines, pending, kept, batch_rows)
                if pending:
                    yield self._batch(pending, kept)
        if self.row > self.first_row and not self.objects:
            raise InputError(f"{self.path}: none of its {self.row - self.first_row} lines is a "
                             "JSON object (is it binary, or another format?); write one JSON "
                             "object per line (JSONL) or use Parquet")

    def _batch(self, pending: list[tuple], kept: list[tuple]) -> DraftBatch:
        arrays = [pa.array(values, type=f.type)
                  for values, f in zip(zip(*pending, strict=True), DRAFT_SCHEMA, strict=True)]
        passthrough = pa.table({name: _passthrough_column(values) for name, values in
                                zip(self.keep, zip(*kept, strict=True), strict=True)})
        return DraftBatch(pa.RecordBatch.from_arrays(arrays, schema=DRAFT_SCHEMA), passthrough,
                          self.input_format)

    def _parse(self, f: BinaryIO, lines: Iterator[bytes], pending: list[tuple],
               kept_rows: list[tuple], limit: int) -> bool:
        """Parse lines into `pending` (draft rows) and `kept_rows` (passthrough values) until
        `limit` rows; False once the file is at its end. One loop with local names: it runs
        once per line."""
        path, first_row, keep = self.path, self.first_row, self.keep
        row, objects, formats = self.row, self.objects, self.formats
        fmt = formats.get(self.input_format)
        none_kept = (None,) * len(keep)
        more = False
        for line in lines:
            too_long = len(line) > MAX_LINE_BYTES and not line.endswith(b"\n")
            if too_long:
                size = len(line) + _skip_rest_of_line(f)
                line = b""  # let go of it
            elif row == first_row:  # nothing but blank lines so far
                line = line.removeprefix(_BOM)
                if line.lstrip()[:1] == b"[":
                    raise InputError(f"{path}: this is a JSON array; "
                                     "write one JSON object per line (JSONL)")
            if not too_long and (not line or line.isspace()):
                continue  # blank lines are not rows
            claim, request, error, kept = None, _NO_REQUEST, None, none_kept
            try:
                if too_long:
                    raise RowError(f"line is {size / 2**20:.1f} MiB, over the "
                                   f"{MAX_LINE_BYTES // 2**20} MiB limit; shorten it")
                obj = _parse_line(line)
                objects += 1
                if keep:
                    kept = tuple(_passthrough_value(obj.get(name)) for name in keep)
                if fmt is None:
                    self.input_format = "openai" if is_openai_batch(obj) else "jsonl"
                    fmt = formats[self.input_format]
                claim = parse_id(obj.get(fmt.id_key), fmt.id_key, row)
                request = fmt.request(obj)
            except RowError as e:
                error = f"row {row}: {e}"
            except RecursionError:  # a value nested deeper than json.dumps goes
                error = f"row {row}: JSON nested too deeply; flatten the row"
            pending.append((row, claim, *request, error))
            kept_rows.append(kept)
            row += 1
            if len(pending) == limit:
                more = True
                break
        self.row, self.objects = row, objects
        return more


def iter_jsonl(path: Location, columns: ColumnMap, input_format: str, first_row: int,
               batch_rows: int) -> Iterator[DraftBatch]:
    """Read `path` as JSONL, `batch_rows` rows at a time, lazily. input_format: "jsonl",
    "openai", or "auto" (OpenAI-batch when the first JSON object on a line has `custom_id`
    and `body`). Rows are numbered from `first_row` (a file of a dataset continues the
    numbering of the files before it). Raises InputError: for a JSON array at its first line,
    for a file without a single JSON object once it has read it all."""
    return _JsonlFile(path, columns, input_format, first_row).batches(batch_rows)
