"""Tokenize a whole job into flat buffers (values + offsets) the planner works on.

Prompts are encoded the way vLLM encodes a text prompt (with the tokenizer's special tokens);
chat messages are rendered with the model's chat template (generation prompt added) and then
encoded without extra special tokens, as vLLM's chat path does. Rows that already carry
`prompt_token_ids` skip the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

_BATCH = 2048  # prompts per tokenizer call: big enough for the Rust tokenizer's threads


class PromptTokenizer(Protocol):
    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def render_chat(self, messages: list[dict]) -> str: ...


class HFTokenizer:
    """The model's own Hugging Face tokenizer and chat template."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=True)["input_ids"]

    def encode_rendered(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: list[dict]) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
    values[offsets[i]:offsets[i+1]]. errors maps row positions to problems found here."""

    positions: np.ndarray  # int64 [n]
    values: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]
    errors: dict[int, str]

    def tokens(self, i: int) -> list[int]:
        return self.values[self.offsets[i]:self.offsets[i + 1]].tolist()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, requests: np.ndarray) -> TokenizedRequests:
        """Only these requests (indices, ascending), renumbered 0..len-1."""
        lengths = self.lengths()[requests]
        offsets = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[requests]
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenizedRequests(self.positions[requests], self.values[gather], offsets,
                                 self.errors)


def tokenize_requests(
    requests: pa.Table, tokenizer: PromptTokenizer, *, max_model_len: int,
    skip: np.ndarray | None = None,
) -> TokenizedRequests:
    """Tokenize every row without an error (and not in `skip`, a bool mask). A prompt that
    leaves no room to generate in the model's context becomes an error for its row."""
    cols = {name: requests.column(name).to_pylist()
            for name in ("row", "prompt", "messages", "prompt_token_ids", "error")}
    ids: dict[int, list[int]] = {}
    errors: dict[int, str] = {}
    texts: list[tuple[int, str, bool]] = []  # (position, text, rendered-by-chat-template)
    for pos, err in enumerate(cols["error"]):
        if err is not None or (skip is not None and skip[pos]):
            continue
        if cols["prompt_token_ids"][pos] is not None:
            ids[pos] = cols["prompt_token_ids"][pos]
        elif cols["messages"][pos] is not None:
            try:
                texts.append((pos, tokenizer.render_chat(json.loads(cols["messages"][pos])), True))
            except Exception as e:  # templates raise anything (jinja errors, bad roles, ...)
                errors[pos] = (f"row {cols['row'][pos]}: the model's chat template rejected "
                               f"these messages ({type(e).__name__}: {e}); check roles and order")
        else:
            texts.append((pos, cols["prompt"][pos], False))
    for rendered in (False, True):
        batch = [(p, t) for p, t, r in texts if r is rendered]
        encode = tokenizer.encode_rendered if rendered else tokenizer.encode
        for start in range(0, len(batch), _BATCH):
            chunk = batch[start:start + _BATCH]
            for (pos, _), tok in zip(chunk, encode([t for _, t in chunk]), strict=True):
                ids[pos] = tok
    positions = []
    for pos in sorted(ids):
        n = len(ids[pos])
        if n == 0:
            errors[pos] = f"row {cols['row'][pos]}: the prompt is empty; give it some text"
        elif n >= max_model_len:
            errors[pos] = (f"row {cols['row'][pos]}: the prompt is {n} tokens but the model's "
                           f"context is {max_model_len} (max_model_len); shorten the prompt "
                           "or raise engine.max_model_len if the model allows it")
        else:
            positions.append(pos)
    lengths = np.fromiter((len(ids[p]) for p in positions), dtype=np.int64, count=len(positions))
    offsets = np.zeros(len(positions) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    for i, pos in enumerate(positions):
        values[offsets[i]:offsets[i + 1]] = ids[pos]
    return TokenizedRequests(np.asarray(positions, dtype=np.int64), values, offsets, errors)
