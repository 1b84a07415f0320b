"""The two tables that pass between stages: requests (reader -> runner) and results
(runner -> writer). Plain Arrow schemas, so every stage can be tested on its own.

Requests: one row per input row, in input order, whatever the input format was.
    row        input row number (0-based; blank JSONL lines are not rows)
    id         the row's id (its own, OpenAI's custom_id, or str(row)); unique in a job
    endpoint   "completion" (prompt / prompt_token_ids) or "chat" (messages)
    prompt     text, or null
    messages   the chat list as a JSON string, or null
    prompt_token_ids  pre-tokenized prompt (no tokenizer runs for the row), or null
    max_tokens, temperature, top_p, seed, stop: the row's own sampling values, or null
    error      null for a usable row; else what is wrong with it and how to fix it

Results: one row per input row.
    id, text, finish_reason, prompt_tokens, completion_tokens, cached_tokens, error,
    duplicate_of (the id of the identical deterministic row whose generation served this one)
"""

from __future__ import annotations

import pyarrow as pa

ENDPOINT_COMPLETION = "completion"
ENDPOINT_CHAT = "chat"

REQUEST_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("endpoint", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("messages", pa.string()),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("max_tokens", pa.int64()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("stop", pa.list_(pa.string())),
        pa.field("error", pa.string()),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cached_tokens", pa.int64()),
        pa.field("error", pa.string()),
        pa.field("duplicate_of", pa.string()),
    ]
)
