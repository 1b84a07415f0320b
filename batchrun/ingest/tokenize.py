"""Tokenize a whole job into flat buffers (values + offsets) the planner works on.

Prompts are encoded the way vLLM encodes a text prompt (with the tokenizer's special tokens);
chat messages are rendered with the model's chat template (generation prompt added) and then
encoded without extra special tokens, as vLLM's chat path does. Rows that already carry
`prompt_token_ids` skip the tokenizer: their tokens come straight from the Arrow list array.
Works on any request table, a whole job's or one batch of a stream.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ModelError, one_line
from .token_lists import offsets_of, token_lists

_BATCH = 2048  # prompts per tokenizer call: big enough for the Rust tokenizer's threads
_COPY_TOKENS = 1 << 20  # tokens per step when rows of several kinds are put in row order


class PromptTokenizer(Protocol):
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Prompts as vLLM encodes a text prompt: with the tokenizer's special tokens."""

    def encode_rendered(self, texts: list[str]) -> list[list[int]]:
        """Chats rendered by render_chat: without extra special tokens (the template has
        them)."""

    def render_chat(self, messages: list[dict]) -> str:
        """Chat messages as the model's template renders them, generation prompt added."""


class HFTokenizer:
    """The model's own Hugging Face tokenizer and chat template, loaded at first use: a job
    whose prompts are all pre-tokenized never imports transformers (seconds of start-up)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    @cached_property
    def _tok(self) -> Any:
        try:
            return _load_tokenizer(self.model_dir)
        except (OSError, ValueError) as e:  # no tokenizer files (a config-only folder), ...
            raise ModelError(
                f"the model folder {self.model_dir} has no usable tokenizer "
                f"({one_line(e, 200)}): text prompts and chat messages need its tokenizer "
                "files (tokenizer.json, tokenizer_config.json); pre-tokenized rows "
                "(prompt_token_ids) do not") from None

    @cached_property
    def _batch_encode(self) -> Callable[..., list[Any]] | None:
        """The Rust tokenizer's batch call, as transformers makes it but without the offsets
        and attention masks it computes and converts (about a fifth of the CPU time); None
        for a tokenizer without a Rust backend."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return None
        # As transformers sets them before each call.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(self._tok, "split_special_tokens", False))
        return getattr(backend, "encode_batch_fast", backend.encode_batch)

    def _encode(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        if self._batch_encode is None:
            return self._tok(texts, add_special_tokens=special_tokens)["input_ids"]
        return [e.ids for e in self._batch_encode(texts, add_special_tokens=special_tokens)]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts, special_tokens=True)

    def encode_rendered(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts, special_tokens=False)

    def render_chat(self, messages: list[dict]) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer AutoTokenizer would load. Where tokenizer_config.json names a Rust-backed
    class, that class is loaded directly: AutoTokenizer's class lookup imports torch and most of
    transformers' model code first (about 3 of a small job's 4 seconds of tokenizing)."""
    import transformers

    try:
        named = json.loads((model_dir / "tokenizer_config.json").read_text()).get(
            "tokenizer_class")
    except (OSError, ValueError):
        named = None
    direct = getattr(transformers, named, None) if isinstance(named, str) else None
    backend = getattr(transformers, "TokenizersBackend", None)
    if isinstance(direct, type) and backend is not None and issubclass(direct, backend):
        return direct.from_pretrained(model_dir)
    return transformers.AutoTokenizer.from_pretrained(model_dir)


class ByteTokenizer:
    """UTF-8 bytes as token ids, with a plain chat format: for the fake engine's tests."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode()) for t in texts]

    encode_rendered = encode

    def render_chat(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


@dataclass(frozen=True)
class TokenizedRequests:
    """Token ids of the usable rows of a request table, as flat buffers.

    positions[i] is the row position (in the request table) of request i, whose tokens are
    values[offsets[i]:offsets[i+1]]. errors maps row positions to problems found here.
    A row of several inputs (an OpenAI embeddings line's list) is one request per input, in
    a run of equal positions: items[i] is request i's input in its row (None when every row
    has one input)."""

    positions: np.ndarray  # int64 [n]
    values: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]
    errors: dict[int, str]
    items: np.ndarray | None = None  # int64 [n]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, requests: np.ndarray) -> TokenizedRequests:
        """Only these requests (indices, ascending), renumbered 0..len-1."""
        lengths = self.lengths()
        kept = np.zeros(len(lengths), dtype=bool)
        kept[requests] = True
        # A mask of one byte a token, not an index of eight: the requests stay in order.
        return TokenizedRequests(self.positions[requests], self.values[np.repeat(kept, lengths)],
                                 offsets_of(lengths[requests]), self.errors,
                                 None if self.items is None else self.items[requests])


def tokenize_requests(
    requests: pa.Table, tokenizer: PromptTokenizer, *, max_model_len: int,
    skip: np.ndarray | None = None, room: int = 1, truncate: bool = False,
) -> TokenizedRequests:
    """Tokenize every row without an error (and not in `skip`, a bool mask). A prompt that
    leaves no `room` tokens (to generate; 0 for an embedding) in the model's context becomes
    an error for its row, or with `truncate` is cut to fit (see _truncated)."""
    usable = ~_is_valid(requests["error"])
    if skip is not None:
        usable &= ~skip
    given = usable & _is_valid(requests["prompt_token_ids"])
    chat = usable & ~given & _is_valid(requests["messages"])
    several = usable & ~given & ~chat & _is_valid(requests["inputs"])
    text = usable & ~given & ~chat & ~several
    rows = requests["row"].to_numpy()
    errors: dict[int, str] = {}
    parts = [_given_tokens(requests["prompt_token_ids"], given, requests["input_lengths"]),
             _encoded(tokenizer.encode, np.flatnonzero(text),
                      requests["prompt"].filter(pa.array(text)).to_pylist())]
    if chat.any():
        rendered = _render_chats(tokenizer, requests["messages"], chat, rows, errors)
        parts.append(_encoded(tokenizer.encode_rendered, *rendered))
    if several.any():
        texts = requests["inputs"].filter(pa.array(several))
        counts = pc.list_value_length(texts).to_numpy()
        parts.append(_encoded(tokenizer.encode, np.repeat(np.flatnonzero(several), counts),
                              pc.list_flatten(texts).to_pylist()))
    limit = max_model_len - room + 1  # tokens + room must fit: lengths below this
    if truncate:
        # Encoded rows (all but the first part) end in the tokenizer's closing special token
        # (BERT's [SEP]): kept.
        parts = [_truncated(p, limit - 1, keep_last=k > 0) for k, p in enumerate(parts)]
    parts = [p for p in parts if len(p.positions)]
    for part in parts:
        for i in np.flatnonzero(~part.fit(limit)):
            pos, n = int(part.positions[i]), int(part.lengths[i])
            errors[pos] = _length_problem(int(rows[pos]), n, max_model_len, room)
    if several.any() or _is_valid(requests["input_lengths"]).any():
        # A row of several inputs runs whole or not at all: one input's problem is its row's.
        dropped = np.fromiter(errors, np.int64, len(errors))
        parts = [replace(p, ok=~np.isin(p.positions, dropped)) for p in parts]
    return _assemble(parts, limit, errors)


@dataclass(frozen=True)
class _Tokens:
    """Token ids of some rows, in row order: positions (ascending), lengths, values."""

    positions: np.ndarray  # int64 (a row of several inputs: once per input)
    lengths: np.ndarray  # int64
    values: np.ndarray  # int32, the rows' tokens one after another
    ok: np.ndarray | bool = True  # False: dropped with its row (another input's error)

    def fit(self, limit: int) -> np.ndarray:
        """Which of these rows are shorter than `limit` tokens (and not empty)."""
        return (self.lengths > 0) & (self.lengths < limit) & self.ok


def _truncated(part: _Tokens, most: int, *, keep_last: bool) -> _Tokens:
    """The part with each row cut to its first `most` tokens (keep_last: its first most - 1
    and its last one), as sentence-transformers truncates an input."""
    if most < 1 or not (part.lengths > most).any():
        return part
    keep = []
    start = 0
    for n in part.lengths.tolist():
        if n <= most:
            keep.append(np.arange(start, start + n))
        elif keep_last:
            keep.append(np.append(np.arange(start, start + most - 1), start + n - 1))
        else:
            keep.append(np.arange(start, start + most))
        start += n
    index = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return _Tokens(part.positions, np.minimum(part.lengths, most), part.values[index])


def _is_valid(column: pa.ChunkedArray) -> np.ndarray:
    return column.is_valid().to_numpy()


def _given_tokens(column: pa.ChunkedArray, selected: np.ndarray,
                  input_lengths: pa.ChunkedArray) -> _Tokens:
    """The selected rows' pre-tokenized prompts, straight from the Arrow list array's values
    and offsets: no Python object per row or token (and no copy of the values when every row
    of a one-chunk column is selected). A row with `input_lengths` is one prompt per input."""
    positions = np.flatnonzero(selected)
    if not len(positions):
        return _Tokens(positions, np.zeros(0, np.int64), np.zeros(0, np.int32))
    values, offsets = token_lists(column if selected.all() else
                                  column.filter(pa.array(selected)))
    lengths = np.diff(offsets)
    if input_lengths.null_count == len(input_lengths):
        return _Tokens(positions, lengths, values)
    inputs = input_lengths.filter(pa.array(selected))
    counts = np.where(inputs.is_valid().to_numpy(), pc.list_value_length(inputs).fill_null(1)
                      .to_numpy(), 1)
    # Each row's own length where it has one input, its inputs' lengths where several.
    each = pc.list_flatten(pc.if_else(inputs.is_valid(), inputs, pa.array(
        lengths.reshape(-1, 1).tolist(), pa.list_(pa.int32())))).to_numpy()
    return _Tokens(np.repeat(positions, counts), each.astype(np.int64), values)


def _encoded(encode: Callable[[list[str]], list[list[int]]], positions: np.ndarray,
             texts: list[str]) -> _Tokens:
    """Texts through the tokenizer's batch encode, _BATCH at a time, as flat buffers."""
    lengths, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for start in range(0, len(texts), _BATCH):
        ids = encode(texts[start:start + _BATCH])
        chunk_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        lengths.append(chunk_lengths)
        values.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                                  count=int(chunk_lengths.sum())))
    return _Tokens(np.asarray(positions, dtype=np.int64), np.concatenate(lengths),
                   np.concatenate(values))


def _render_chats(tokenizer: PromptTokenizer, column: pa.ChunkedArray, chat: np.ndarray,
                  rows: np.ndarray, errors: dict[int, str]) -> tuple[np.ndarray, list[str]]:
    """The chat rows rendered with the model's chat template: (positions, texts). A template
    that rejects a row's messages is that row's error."""
    positions, texts = [], []
    for pos, messages in zip(np.flatnonzero(chat).tolist(),
                             column.filter(pa.array(chat)).to_pylist(), strict=True):
        try:
            texts.append(tokenizer.render_chat(json.loads(messages)))
            positions.append(pos)
        except Exception as e:  # templates raise anything (jinja errors, bad roles, ...)
            errors[pos] = (f"row {rows[pos]}: the model's chat template rejected "
                           f"these messages ({type(e).__name__}: {e}); check roles and order")
    return np.asarray(positions, dtype=np.int64), texts


def _length_problem(row: int, n: int, max_model_len: int, room: int) -> str:
    if n == 0:
        return f"row {row}: the prompt is empty; give it some text"
    if room == 0:  # an embedding: nothing to generate, the input alone must fit
        return (f"row {row}: the input is {n} tokens but the model's context is "
                f"{max_model_len}; shorten it, or pass --truncate (truncate = true) to "
                "embed its first tokens")
    return (f"row {row}: the prompt is {n} tokens but the model's "
            f"context is {max_model_len} (max_model_len); shorten the prompt "
            "or raise engine.max_model_len if the model allows it")


def _assemble(parts: list[_Tokens], limit: int,
              errors: dict[int, str]) -> TokenizedRequests:
    """The rows of all parts shorter than `limit`, in row order, as one TokenizedRequests."""
    if not parts:
        return TokenizedRequests(np.zeros(0, np.int64), np.zeros(0, np.int32),
                                 np.zeros(1, np.int64), errors)
    keep = [part.fit(limit) for part in parts]
    if len(parts) == 1:  # one kind of prompt: its values are in row order already
        part, fits = parts[0], keep[0]
        values = part.values if fits.all() else part.values[np.repeat(fits, part.lengths)]
        positions = part.positions[fits]
        return TokenizedRequests(positions, values, offsets_of(part.lengths[fits]), errors,
                                 _input_items(positions))
    positions = np.concatenate([p.positions[k] for p, k in zip(parts, keep, strict=True)])
    lengths = np.concatenate([p.lengths[k] for p, k in zip(parts, keep, strict=True)])
    order = np.argsort(positions, kind="stable")
    offsets = offsets_of(lengths[order])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    starts = np.empty(len(order), dtype=np.int64)
    starts[order] = offsets[:-1]  # where each row of `positions` goes
    done = 0
    for part, fits in zip(parts, keep, strict=True):
        n = int(fits.sum())
        _copy_rows(part, fits, starts[done:done + n], values)
        done += n
    return TokenizedRequests(positions[order], values, offsets, errors,
                             _input_items(positions[order]))


def _input_items(positions: np.ndarray) -> np.ndarray | None:
    """Each request's input in its row (positions ascending, a row of several inputs a run
    of equal ones); None when no row has several."""
    starts = np.flatnonzero(np.diff(positions, prepend=-1))
    if len(starts) == len(positions):
        return None
    return np.arange(len(positions)) - np.repeat(starts, np.diff(starts, append=len(positions)))


def _copy_rows(part: _Tokens, rows: np.ndarray, targets: np.ndarray, out: np.ndarray) -> None:
    """Copy the tokens of the part's rows selected by `rows` to out[targets[i]:], about
    _COPY_TOKENS at a time (the index arrays take 16 bytes a token)."""
    sources = offsets_of(part.lengths)[:-1][rows]
    lengths = part.lengths[rows]
    ends = np.cumsum(lengths)
    lo = 0
    while lo < len(lengths):
        begin = int(ends[lo] - lengths[lo])
        hi = max(lo + 1, int(np.searchsorted(ends, begin + _COPY_TOKENS, side="right")))
        step = lengths[lo:hi]
        within = np.arange(int(ends[hi - 1]) - begin)  # token index within this step
        row_start = ends[lo:hi] - step - begin  # each row's first token within the step
        out[np.repeat(targets[lo:hi] - row_start, step) + within] = \
            part.values[np.repeat(sources[lo:hi] - row_start, step) + within]
        lo = hi
