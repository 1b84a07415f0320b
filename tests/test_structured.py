"""Structured outputs and log-probabilities without a model: what rows and job files may ask
for, how bad specs are refused (row error, or exit 2 for the job's default), what the runner
writes (fake engine), and the OpenAI output file read back with the `openai` package's models."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from batchrun.ingest.prepare import prepare_job
from batchrun.io.input.readers import read_request_set
from batchrun.job.run import run_job
from batchrun.job_file import load_job_file, with_overrides
from tests.helpers import job, read_output, write_jsonl
from tests.reliability.harness import cli

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "stars": {"type": "integer", "minimum": 1}},
          "required": ["name", "stars"], "additionalProperties": False}
LABELS = ["POSITIVE", "NEGATIVE", "MIXED"]


def run_fake(cfg, **kwargs):
    engine = FakeEngine(block_size=4, kv_capacity_tokens=8192)
    return run_job(cfg, engine_kind="fake", engine=engine, interactive=False,
                   handle_signals=False, **kwargs)


def requests_of(path: Path, **kwargs) -> list[dict]:
    return read_request_set(path, **kwargs).table.to_pylist()


# --- Reading rows ------------------------------------------------------------------------

def test_rows_carry_their_constraints_and_logprobs(tmp_path):
    rows = [
        {"prompt": "a", "choices": LABELS, "top_logprobs": 2},
        {"prompt": "b", "regex": r"\d{4}", "logprobs": True},
        {"prompt": "c", "json_schema": SCHEMA},
        {"prompt": "d", "json_schema": json.dumps(SCHEMA)},  # the same, as JSON text
        {"prompt": "e", "response_format": {"type": "json_object"}, "logprobs": False},
        {"prompt": "f", "response_format": {"type": "json_schema", "json_schema": {
            "name": "review", "schema": SCHEMA, "strict": True}}},
        {"prompt": "g", "response_format": {"type": "text"}},
        {"prompt": "h"},
    ]
    got = requests_of(write_jsonl(tmp_path / "in.jsonl", rows))
    assert [r["error"] for r in got] == [None] * 8
    assert [r["constraint"] for r in got] == ["choice", "regex", "json_schema", "json_schema",
                                              "json_object", "json_schema", "text", None]
    assert json.loads(got[0]["constraint_spec"]) == LABELS
    assert got[1]["constraint_spec"] == r"\d{4}"
    # One canonical text per schema, key order kept (the order the model writes properties).
    assert got[2]["constraint_spec"] == got[3]["constraint_spec"] == got[5]["constraint_spec"]
    assert list(json.loads(got[2]["constraint_spec"])["properties"]) == ["name", "stars"]
    assert [(r["logprobs"], r["top_logprobs"]) for r in got[:5]] == [
        (None, 2), (True, None), (None, None), (None, None), (False, None)]


@pytest.mark.parametrize("extra,message", [
    ({"choices": []}, '"choices" must be a non-empty list of non-empty strings, got []'),
    ({"choices": ["A", ""]}, '"choices" must be a non-empty list of non-empty strings'),
    ({"regex": "(("}, '"regex" is not a regular expression the decoder can enforce '
                      "(unclosed group); fix the pattern"),
    ({"regex": "(?<=a)b"}, "look-around"),
    ({"json_schema": "{not json"}, '"json_schema" is not valid JSON'),
    ({"json_schema": 42}, '"json_schema" must be a JSON Schema object (or its JSON text), got 42'),
    ({"json_schema": {"type": "objekt"}}, '"json_schema" is not a valid JSON Schema: '),
    ({"json_schema": {"type": "object", "required": "name"}},
     '"json_schema" is not a valid JSON Schema: '),
    ({"json_schema": {"type": "string", "pattern": "(("}}, '"json_schema" '),
    ({"response_format": {"type": "xml"}},
     '"response_format" must be {"type": "text" | "json_object" | "json_schema", ...}'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     '"response_format.json_schema" must be an object with a "schema" key'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     '"response_format.json_schema.schema" is not a valid JSON Schema'),
    ({"choices": LABELS, "regex": "x"},
     'give only one of "response_format", "choices", "regex", "json_schema", not "choices" '
     'and "regex"'),
    ({"top_logprobs": 21}, '"top_logprobs" must be an integer from 0 to 20, got 21'),
    ({"logprobs": "yes"}, '"logprobs" must be true or false, got "yes"'),
    ({"logprobs": False, "top_logprobs": 3}, '"top_logprobs" needs "logprobs": true'),
])
def test_a_bad_constraint_is_the_rows_error_in_one_line(tmp_path, extra, message):
    rows = [{"prompt": "ok"}, {"prompt": "bad", **extra}]
    got = requests_of(write_jsonl(tmp_path / "in.jsonl", rows))
    error = got[1]["error"]
    assert got[0]["error"] is None
    assert error.startswith("row 1: ") and message in error and "\n" not in error, error
    assert got[1]["constraint"] is None and got[1]["constraint_spec"] is None


def test_openai_batch_lines_carry_response_format_and_logprobs(tmp_path):
    def line(i, url, body):
        return {"custom_id": f"c{i}", "method": "POST", "url": url,
                "body": {"model": "m", **body}}
    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    user = [{"role": "user", "content": "hi"}]
    rows = [
        line(0, chat, {"messages": user, "response_format": {"type": "json_schema", "json_schema": {
            "name": "r", "schema": SCHEMA, "strict": True}}, "logprobs": True,
            "top_logprobs": 3}),
        line(1, chat, {"messages": user, "response_format": {"type": "json_object"}}),
        line(2, cmpl, {"prompt": "The sky is", "logprobs": 2}),  # a count, in /v1/completions
        line(3, cmpl, {"prompt": "The sky is", "logprobs": 9000}),
        line(4, chat, {"messages": user, "response_format": {"type": "grammar"}}),
        line(5, chat, {"messages": user, "logprobs": False, "top_logprobs": 2}),
    ]
    got = requests_of(write_jsonl(tmp_path / "batch.jsonl", rows))
    assert got[0]["error"] is None and got[0]["constraint"] == "json_schema"
    assert (got[0]["logprobs"], got[0]["top_logprobs"]) == (True, 3)
    assert got[1]["constraint"] == "json_object"
    assert (got[2]["logprobs"], got[2]["top_logprobs"], got[2]["error"]) == (True, 2, None)
    assert got[3]["error"] == 'row 3: "body.logprobs" must be an integer from 0 to 20, got 9000'
    assert got[4]["error"].startswith('row 4: "body.response_format" must be {"type": ')
    assert got[5]["error"] == ('row 5: "body.top_logprobs" needs "body.logprobs": true; set it, '
                               'or drop "body.top_logprobs"')


def test_parquet_rows_read_like_jsonl_rows(tmp_path):
    rows = [
        {"prompt": "a", "choices": LABELS, "top_logprobs": 1},
        {"prompt": "b", "regex": "[a-z]+", "logprobs": True},
        {"prompt": "c", "json_schema": json.dumps(SCHEMA)},
        {"prompt": "d", "response_format": {"type": "json_object"}},
        {"prompt": "e", "regex": "(("},
        {"prompt": "f", "logprobs": False, "top_logprobs": 2},
        {"prompt": "g", "response_format": {"type": "json_schema", "json_schema": {
            "schema": json.dumps(SCHEMA)}}},
    ]
    from_jsonl = requests_of(write_jsonl(tmp_path / "in.jsonl", rows))
    columns = {name: [r.get(name) for r in rows] for name in (
        "prompt", "choices", "regex", "json_schema", "logprobs", "top_logprobs")}
    table = pa.table(columns)
    # A struct column holds every key of every row (null where a row lacks it): those nulls
    # must not end up in the row's response_format.
    table = table.append_column("response_format", pa.array([r.get("response_format")
                                                             for r in rows]))
    assert pa.types.is_struct(table["response_format"].type)
    pq.write_table(table, tmp_path / "in.parquet")
    from_parquet = requests_of(tmp_path / "in.parquet")
    assert from_parquet == from_jsonl


def test_one_schema_on_every_row_is_held_once(tmp_path):
    rows = [{"prompt": f"p{i}", "json_schema": SCHEMA} for i in range(500)]
    table = read_request_set(write_jsonl(tmp_path / "in.jsonl", rows)).table
    spec = table["constraint_spec"]
    assert pa.types.is_dictionary(spec.type)
    assert sum(len(chunk.dictionary) for chunk in spec.chunks) == 1


# --- Job-level defaults --------------------------------------------------------------------

def write_job(tmp_path: Path, sampling: str, rows: list[dict] | None = None) -> Path:
    write_jsonl(tmp_path / "in.jsonl", rows or [{"prompt": "hello"}])
    path = tmp_path / "job.toml"
    path.write_text(f'input = "in.jsonl"\noutput = "out.parquet"\n[sampling]\n{sampling}\n')
    return path


def test_a_default_schema_file_resolves_against_the_job_file(tmp_path):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "review.json").write_text(json.dumps(SCHEMA))
    cfg = load_job_file(write_job(tmp_path, 'json_schema = "schemas/review.json"'))
    assert cfg.sampling.json_schema == str(tmp_path / "schemas" / "review.json")
    # The file's content is part of the job's identity: a resume must not mix two schemas.
    assert json.loads(cfg.fingerprint_settings()["constraint"][1]) == SCHEMA


@pytest.mark.parametrize("sampling,files,message", [
    ('json_schema = "nope.json"', {}, "sampling.json_schema: cannot read "),
    ('json_schema = "s.json"', {"s.json": "{oops"}, "is not valid JSON"),
    ('json_schema = "s.json"', {"s.json": '{"type": "objekt"}'}, "is not a valid JSON Schema"),
    ('regex = "(("', {}, "sampling.regex is not a regular expression the decoder can enforce"),
    ('choices = ["A", ""]', {}, "sampling.choices must be a non-empty list of non-empty"),
    ('choices = ["A"]\nregex = "a"', {}, "[sampling] sets choices and regex; give only one"),
    ("top_logprobs = 21", {}, "sampling.top_logprobs must be from 0 to 20, not 21"),
])
def test_a_bad_default_constraint_is_a_config_error(tmp_path, sampling, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        load_job_file(write_job(tmp_path, sampling))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_validate_and_plan_count_constrained_rows_and_refuse_bad_ones(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b", "regex": "[0-9]+"},
            {"prompt": "c", "response_format": {"type": "text"}},
            {"prompt": "d", "json_schema": {"type": "objekt"}}]
    path = write_job(tmp_path, 'choices = ["yes", "no"]\ntop_logprobs = 1', rows)
    result = cli("validate", path, "--engine", "fake", "--json")
    assert result.exit_code == EXIT_ROW_ERRORS
    report = json.loads(result.stdout)
    assert report["constrained"] == {"choice": 1, "regex": 1}  # "text" opts out; row 3 failed
    assert report["logprobs_rows"] == 3
    assert report["first_errors"][0].startswith('row 3: "json_schema" is not a valid JSON Schema')
    plan = cli("plan", path, "--engine", "fake", "--json")
    assert plan.exit_code == EXIT_OK and json.loads(plan.stdout)["constrained_rows"] == 2
    # A flag replaces the job file's default constraint.
    flagged = cli("validate", path, "--engine", "fake", "--json", "--regex", "[a-z]")
    assert json.loads(flagged.stdout)["constrained"] == {"regex": 2}

    (tmp_path / "bad.json").write_text('{"type": "object", "required": "x"}')
    bad = cli("validate", path, "--engine", "fake", "--json-schema", tmp_path / "bad.json")
    assert bad.exit_code == 2
    assert "sampling.json_schema" in bad.stderr and "is not a valid JSON Schema" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_the_example_jobs_validate(tmp_path):
    for name, kind, rows in (("classify", "choice", 40), ("extract", "json_schema", 20)):
        result = cli("validate", REPO / "jobs" / f"{name}.toml", "--engine", "fake", "--json")
        assert result.exit_code == EXIT_OK, result.stderr
        assert json.loads(result.stdout)["constrained"] == {kind: rows}


# --- Running (fake engine) -----------------------------------------------------------------

def test_constrained_rows_keep_to_their_constraints(tmp_path):
    rows = [
        {"id": "free", "prompt": "tell me", "response_format": {"type": "text"}},
        {"id": "default", "prompt": "label me"},
        {"id": "own", "prompt": "pick", "choices": ["left", "right"]},
        {"id": "schema", "prompt": "fill", "json_schema": SCHEMA},
        {"id": "object", "prompt": "obj", "response_format": {"type": "json_object"}},
        {"id": "regex", "prompt": "digits", "regex": "[0-9]{3}"},  # the fake ignores regexes
        {"id": "cut", "prompt": "fill", "json_schema": SCHEMA, "max_tokens": 2},
    ]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), choices=tuple(LABELS))
    outcome = run_fake(cfg)
    assert outcome.exit_code == EXIT_ROW_ERRORS
    out = {r["id"]: r for r in read_output(cfg)}
    assert out["free"]["error"] is None and out["free"]["text"].startswith("w")
    assert out["default"]["text"] in LABELS and out["own"]["text"] in ("left", "right")
    jsonschema.validate(json.loads(out["schema"]["text"]), SCHEMA)
    assert json.loads(out["object"]["text"]) == {}
    # Output that does not keep to its constraint is never a silent success: the row fails,
    # its text kept, and the error says what to change.
    assert out["regex"]["error"].startswith('row 5: the output "w') and \
        "does not fully match the regex" in out["regex"]["error"]
    cut = out["cut"]
    assert cut["finish_reason"] == "length" and cut["text"]
    assert cut["error"] == ("row 6: the output is not complete JSON: it stopped at max_tokens "
                            "(2 tokens) before it was complete; raise max_tokens")
    counts = outcome.summary["structured_outputs"]["constrained_rows"]
    assert counts == {"choice": 2, "json_object": 1, "json_schema": 2, "regex": 1}


def test_a_choice_reserves_only_the_tokens_its_longest_choice_can_take(tmp_path):
    rows = [{"prompt": "a", "choices": ["yes", "no"]}, {"prompt": "b"},
            {"prompt": "c", "choices": ["yes"], "max_tokens": 2}]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), max_tokens=100)
    prepared = prepare_job(cfg, engine_kind="fake")
    assert prepared.max_tokens.tolist() == [4, 100, 2]  # 3 bytes + end of sequence


def test_logprobs_are_per_completion_token_and_null_where_not_asked(tmp_path):
    rows = [{"id": "a", "prompt": "one", "logprobs": True},
            {"id": "b", "prompt": "two", "top_logprobs": 3},
            {"id": "c", "prompt": "three", "logprobs": False},
            {"id": "d", "prompt": "four"}]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), top_logprobs=1)
    assert run_fake(cfg).exit_code == EXIT_OK
    out = {r["id"]: r for r in read_output(cfg)}
    for rid, top in (("a", 1), ("b", 3), ("d", 1)):  # a: the job's top_logprobs
        lps = out[rid]["logprobs"]
        assert len(lps) == out[rid]["completion_tokens"]
        assert "".join(t["token"] for t in lps) == out[rid]["text"]
        assert all(len(t["top_logprobs"]) == top for t in lps)
        assert all(t["top_logprobs"][0] == {"token": t["token"], "logprob": t["logprob"]}
                   for t in lps)
        assert math.isclose(out[rid]["cumulative_logprob"], sum(t["logprob"] for t in lps))
    assert out["c"]["logprobs"] is None and out["c"]["cumulative_logprob"] is None
    assert pq.read_schema(cfg.output).field("logprobs").type == pa.list_(pa.struct([
        ("token", pa.string()), ("logprob", pa.float64()),
        ("top_logprobs", pa.list_(pa.struct([("token", pa.string()),
                                             ("logprob", pa.float64())])))]))


def check_openai_output(cfg) -> tuple[list[dict], list[dict]]:
    """Every line of the OpenAI output against the Parquet rows, read back with the `openai`
    package's own models as OpenAI's docs show. Returns (success lines, failed lines)."""
    out = read_output(cfg)
    lines = [json.loads(x) for x in cfg.openai_output.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [r["id"] for r in out]
    assert len({x["id"] for x in lines}) == len(lines)
    ok, failed = [], []
    for line, row in zip(lines, out, strict=True):
        assert set(line) == {"id", "custom_id", "response", "error"}
        if row["error"] is not None:
            assert line["response"] is None
            assert line["error"] == {"code": "row_error", "message": row["error"]}
            failed.append(line)
            continue
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["request_id"]
        body = line["response"]["body"]
        usage = (row["prompt_tokens"], row["completion_tokens"],
                 row["prompt_tokens"] + row["completion_tokens"])
        if body["object"] == "chat.completion":
            parsed = ChatCompletion.model_validate(body)
            choice = parsed.choices[0]
            assert choice.message.content == row["text"]
            if row["logprobs"] is None:
                assert choice.logprobs is None
            else:
                content = choice.logprobs.content
                assert [t.token for t in content] == [t["token"] for t in row["logprobs"]]
                assert [t.logprob for t in content] == [t["logprob"] for t in row["logprobs"]]
                assert all(bytes(t.bytes) == t.token.encode() for t in content)
                assert [len(t.top_logprobs) for t in content] == \
                    [len(t["top_logprobs"]) for t in row["logprobs"]]
        else:
            parsed = Completion.model_validate(body)
            choice = parsed.choices[0]
            assert choice.text == row["text"]
            if row["logprobs"] is None:
                assert choice.logprobs is None
            else:
                assert choice.logprobs.tokens == [t["token"] for t in row["logprobs"]]
                assert choice.logprobs.token_logprobs == [t["logprob"] for t in row["logprobs"]]
        assert choice.finish_reason == row["finish_reason"]
        assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens,
                parsed.usage.total_tokens) == usage
        assert parsed.usage.prompt_tokens_details.cached_tokens == row["cached_tokens"]
        ok.append(line)
    return ok, failed


def test_openai_output_passes_the_openai_packages_models(tmp_path):
    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    user = [{"role": "user", "content": "hi"}]
    rows = [
        {"custom_id": "plain", "method": "POST", "url": chat, "body": {"messages": user}},
        {"custom_id": "json", "method": "POST", "url": chat, "body": {
            "messages": user, "logprobs": True, "top_logprobs": 2, "response_format": {
                "type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}}},
        {"custom_id": "cmpl", "method": "POST", "url": cmpl,
         "body": {"prompt": "The sky is", "logprobs": 3}},
        {"custom_id": "cmpl-plain", "method": "POST", "url": cmpl, "body": {"prompt": "Hi"}},
        {"custom_id": "bad", "method": "POST", "url": chat,
         "body": {"messages": user, "response_format": {"type": "json_schema"}}},
        {"custom_id": "cut", "method": "POST", "url": chat, "body": {
            "messages": user, "max_tokens": 1, "logprobs": True, "response_format": {
                "type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}}},
    ]
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "batch.jsonl", rows)),
                  openai_output=tmp_path / "batch_out.jsonl")
    assert run_fake(cfg).exit_code == EXIT_ROW_ERRORS
    ok, failed = check_openai_output(cfg)
    assert [x["custom_id"] for x in ok] == ["plain", "json", "cmpl", "cmpl-plain"]
    assert [x["custom_id"] for x in failed] == ["bad", "cut"]


def test_overrides_clear_the_other_default_kinds(tmp_path):
    cfg = load_job_file(write_job(tmp_path, 'choices = ["a", "b"]'))
    flagged = with_overrides(cfg, **{"sampling.json_schema": "", "sampling.choices": (),
                                     "sampling.regex": "[a-z]+"})
    assert flagged.sampling.choices == () and flagged.sampling.json_schema is None
    assert flagged.sampling.regex == "[a-z]+"
