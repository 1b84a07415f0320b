"""The OpenAI Batch API output file: one JSON line per result, in the shape OpenAI's own batch
output has (what the `openai` package's models read), so that code written for OpenAI's
batches reads batchrun's results unchanged."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from ..schema import ADAPTER, ENDPOINT_EMBEDDING_BASE64, RESULT_SCHEMA

# Rows turned into Python objects at a time: memory stays bounded whatever the table's size.
ROWS_AT_ONCE = 65_536


def write_openai_lines(f: TextIO, table: pa.Table, model: str, *, embeds: bool = False) -> None:
    """One line per row, in the shape of OpenAI's Batch API output file: a success carries the
    chat.completion / text_completion body the API would have returned (what the `openai`
    package's ChatCompletion / Completion models read), or in an embedding job (`embeds`) the
    /v1/embeddings list (CreateEmbeddingResponse); a failure the documented error."""
    names = RESULT_SCHEMA.names + [n for n in ("endpoint", ADAPTER, "input_count")
                                   if n in table.column_names]
    run = uuid.uuid4().hex[:16]  # ids are unique per file, as OpenAI's are per batch
    created = int(time.time())
    for start in range(0, table.num_rows, ROWS_AT_ONCE):  # bounded memory for to_pylist
        for r in table.select(names).slice(start, ROWS_AT_ONCE).to_pylist():
            f.write(json.dumps(_openai_line(r, run, created, model, embeds))
                    + "\n")


def _openai_line(r: dict[str, Any], run: str, created: int, model: str,
                 embeds: bool) -> dict[str, Any]:
    line_id = f"batch_req_{run}_{r['row']}"
    if r["error"] is not None:
        return {"id": line_id, "custom_id": r["id"], "response": None,
                "error": {"code": "row_error", "message": r["error"]}}
    if embeds:
        return {"id": line_id, "custom_id": r["id"],
                "response": {"status_code": 200, "request_id": f"req_{run}_{r['row']}",
                             "body": _embedding_body(r, model)},
                "error": None}
    chat = r.get("endpoint") == "chat"
    choice: dict[str, Any] = {"index": 0, "finish_reason": r["finish_reason"]}
    if chat:
        choice["message"] = {"role": "assistant", "content": r["text"], "refusal": None}
        choice["logprobs"] = None if r["logprobs"] is None else {
            "content": [_chat_logprob(t) for t in r["logprobs"]], "refusal": None}
    else:
        choice["text"] = r["text"]
        choice["logprobs"] = None if r["logprobs"] is None else _completion_logprobs(
            r["logprobs"])
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{run}-{r['row']}",
        "object": "chat.completion" if chat else "text_completion",
        # The model that answered: the row's adapter, else the base model.
        "created": created, "model": r.get(ADAPTER) or model, "choices": [choice],
        "usage": {"prompt_tokens": r["prompt_tokens"],
                  "completion_tokens": r["completion_tokens"],
                  "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                  "prompt_tokens_details": {"cached_tokens": r["cached_tokens"]}},
    }
    return {"id": line_id, "custom_id": r["id"],
            "response": {"status_code": 200, "request_id": f"req_{run}_{r['row']}",
                         "body": body},
            "error": None}


def _embedding_body(r: dict[str, Any], model: str) -> dict[str, Any]:
    """/v1/embeddings' response: one vector per input (a line of several inputs has them
    one after another in `embedding`, `input_count` of them), as floats, or (encoding_format
    base64) as the base64 of its little-endian float32 bytes, as OpenAI encodes it."""
    vectors = np.asarray(r["embedding"], dtype="<f4").reshape(r.get("input_count") or 1, -1)
    data = []
    for index, vector in enumerate(vectors):
        value: Any = vector.tolist()
        if r.get("endpoint") == ENDPOINT_EMBEDDING_BASE64:
            value = base64.b64encode(vector.tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "model": model, "data": data,
            "usage": {"prompt_tokens": r["prompt_tokens"], "total_tokens": r["prompt_tokens"]}}


def _chat_logprob(t: dict[str, Any]) -> dict[str, Any]:
    """A token's logprobs as chat.completion's `logprobs.content` holds them."""
    return {"token": t["token"], "logprob": t["logprob"], "bytes": list(_utf8(t["token"])),
            "top_logprobs": [{"token": top["token"], "logprob": top["logprob"],
                              "bytes": list(_utf8(top["token"]))}
                             for top in t["top_logprobs"]]}


def _completion_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """A completion's logprobs as text_completion (OpenAI's legacy shape) holds them."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in tokens],
            "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{top["token"]: top["logprob"] for top in t["top_logprobs"]}
                             for t in tokens],
            "text_offset": offsets}


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
