"""The two tables that pass between stages: requests (reader -> executor) and results
(executor -> writer). Plain Arrow schemas, so every stage can be tested on its own.

Requests: one row per input row, in input order, whatever the input format was.
    row        input row number (0-based; blank JSONL lines are not rows)
    id         the row's id (its own, OpenAI's custom_id, or str(row)); unique in a job
    endpoint   "completion" (prompt / prompt_token_ids) or "chat" (messages); an OpenAI
               /v1/embeddings line's "embedding" or "embedding_base64" (its encoding_format)
    prompt     text, or null
    messages   the chat list as a JSON string, or null
    prompt_token_ids  pre-tokenized prompt (no tokenizer runs for the row), or null
    max_tokens, temperature, top_p, seed, stop: the row's own sampling values, or null
    completion_tokens  the tokens the row's completion is to have (the sim engine ends it
               there; a previous output's column of that name can be fed back), or null
    logprobs, top_logprobs: the row's own log-probability request, or null
    constraint       the row's own structured-output constraint: "json_schema", "json_object",
                     "choice", "regex", "text" (free text, said explicitly), or null (not given:
                     the job's default applies)
    constraint_spec  its spec (batchrun.structured): schema or choices as JSON text, or the regex
    adapter    the LoRA adapter the row names (its `adapter` or `lora` column, or body.model in
               an OpenAI file), or null: the base model. Once read, ingest/adapters.py checks
               it against the job's adapters (a base model name becomes null)
    inputs     the texts of an OpenAI /v1/embeddings line whose `input` is a list of several
               texts (prompt is null then), or null
    input_lengths  the token count of each input of a line of several inputs (a list of token
               id lists as read; the texts of `inputs` once tokenized): prompt_token_ids holds
               their tokens one after another. Null for a row of one input
    error      null for a usable row; else what is wrong with it and how to fix it
The two constraint columns and `adapter` are dictionary-encoded: an OpenAI batch file repeats
one schema (one model) on every line, and it is held once per batch of rows, not once per row.

Results: one row per input row.
    id, text, finish_reason, prompt_tokens, completion_tokens, cached_tokens, error,
    duplicate_of (the id of the identical deterministic row whose generation served this one)
    logprobs (per completion token: token, logprob, top_logprobs; null where not asked),
    cumulative_logprob (their sum: exp() of it is the probability of the whole completion)
    embedding (an embedding job's vector, float32; null in a generation job)
The output file holds a generation job's result columns but `embedding`, or an embedding
job's (EMBED_OUTPUT_COLUMNS, the vector as fixed_size_list<float32>[dimension]).
"""

from __future__ import annotations

import pyarrow as pa

ADAPTER = "adapter"  # the column naming a row's LoRA adapter: requests' and the output's
ENDPOINT_COMPLETION = "completion"
ENDPOINT_CHAT = "chat"
# OpenAI /v1/embeddings lines, by the encoding their response is to have (encoding_format).
ENDPOINT_EMBEDDING = "embedding"
ENDPOINT_EMBEDDING_BASE64 = "embedding_base64"
DICTIONARY_STRING = pa.dictionary(pa.int32(), pa.string())

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
        pa.field("completion_tokens", pa.int64()),
        pa.field("logprobs", pa.bool_()),
        pa.field("top_logprobs", pa.int64()),
        pa.field("constraint", DICTIONARY_STRING),
        pa.field("constraint_spec", DICTIONARY_STRING),
        pa.field("adapter", DICTIONARY_STRING),
        pa.field("inputs", pa.list_(pa.string())),
        pa.field("input_lengths", pa.list_(pa.int32())),
        pa.field("error", pa.string()),
    ]
)

TOKEN_LOGPROB = pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float64())])
LOGPROBS_TYPE = pa.list_(pa.struct([
    pa.field("token", pa.string()),
    pa.field("logprob", pa.float64()),
    pa.field("top_logprobs", pa.list_(TOKEN_LOGPROB)),
]))

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
        pa.field("logprobs", LOGPROBS_TYPE),
        pa.field("cumulative_logprob", pa.float64()),
        pa.field("embedding", pa.list_(pa.float32())),
    ]
)
EMBED_OUTPUT_COLUMNS = ("row", "id", "embedding", "prompt_tokens", "error", "duplicate_of")


def output_result_schema(embeds: bool, embedding_dim: int | None = None,
                         several: bool = False) -> pa.Schema:
    """The result columns of a job's output file. An embedding job's vectors are a
    fixed_size_list of its model's dimension (a variable list when no row has one); with
    `several` (an OpenAI file, whose lines may hold several inputs) an `embeddings` column
    after `embedding` holds the list of vectors of each line of several inputs."""
    if not embeds:
        return RESULT_SCHEMA.remove(RESULT_SCHEMA.get_field_index("embedding"))
    fields = [RESULT_SCHEMA.field(name) for name in EMBED_OUTPUT_COLUMNS]
    if embedding_dim:
        fields[2] = pa.field("embedding", pa.list_(pa.float32(), embedding_dim))
    if several:
        fields.insert(3, pa.field("embeddings", pa.list_(fields[2].type)))
    return pa.schema(fields)
