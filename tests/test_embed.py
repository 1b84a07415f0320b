"""Embedding jobs (`--task embed`) through the whole pipeline on the fake engine, whose
vectors are a pure function of the token ids: the output's columns and types, input order,
pass-through columns, identical inputs embedded once, error rows, resume exactly once."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.config import DEFAULT_EMBED_MODEL, ColumnMap, JobConfig, validate_config
from batchrun.engine.fake import FAKE_EMBEDDING_DIM, FakeEngine, fake_embedding
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS, ConfigError, InputError
from batchrun.ingest.prepare import prepare_job
from batchrun.job.run import run_job
from batchrun.job.summary_lines import outcome_lines
from tests.helpers import write_jsonl

TEXTS = ["the cat sat on the mat", "hello world", "embeddings turn text into vectors",
         "hello world", "a longer sentence " * 12, "the cat sat on the mat", "short"]


def embed_job(tmp_path, rows, **fields) -> JobConfig:
    return JobConfig(input=write_jsonl(tmp_path / "in.jsonl", rows),
                     output=tmp_path / "out" / "vectors.parquet", task="embed",
                     columns=ColumnMap(passthrough=("tag",)), **fields)


def fake_engine(**kwargs) -> FakeEngine:
    return FakeEngine(block_size=4, kv_capacity_tokens=8192,
                      embedding_dim=FAKE_EMBEDDING_DIM, **kwargs)


def run_fake(cfg, **kwargs):
    engine = kwargs.pop("engine", None) or fake_engine()
    return run_job(cfg, engine_kind="fake", engine=engine, interactive=False,
                   handle_signals=False, **kwargs)


def text_rows(texts=TEXTS):
    # `input` (OpenAI's name) and `prompt` both hold an embedding job's text.
    return [{"id": f"r{i}", ("input" if i % 2 else "prompt"): t, "tag": i}
            for i, t in enumerate(texts)]


def test_embed_task_defaults_to_the_packaged_embedding_model():
    cfg = JobConfig(input="in.jsonl", output="out.parquet", task="embed")
    assert cfg.model_name == DEFAULT_EMBED_MODEL
    assert JobConfig(input="in.jsonl", output="out.parquet").model_name == "default"
    assert replace(cfg, model="/models/e5").model_name == "/models/e5"
    with pytest.raises(ConfigError, match="task must be one of"):
        validate_config(JobConfig(input="in.jsonl", output="out.parquet", task="rerank"))


def test_each_row_gets_its_vector_in_input_order_with_passthrough(tmp_path):
    cfg = embed_job(tmp_path, text_rows())
    outcome = run_fake(cfg)
    assert outcome.exit_code == EXIT_OK
    table = pq.read_table(cfg.output)
    assert table.column_names == ["row", "id", "embedding", "prompt_tokens", "error",
                                  "duplicate_of", "tag"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), FAKE_EMBEDDING_DIM)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(TEXTS))]
    assert [r["tag"] for r in rows] == list(range(len(TEXTS)))
    tokens = prepare_job(cfg, engine_kind="fake").tokens
    for r in rows:  # each row's own text's vector (the fake engine's: of its token ids)
        i = int(np.flatnonzero(tokens.positions == r["row"])[0]) if r["duplicate_of"] is None \
            else None
        if i is not None:
            ids = tokens.values[tokens.offsets[i]:tokens.offsets[i + 1]]
            np.testing.assert_allclose(r["embedding"], fake_embedding(ids, FAKE_EMBEDDING_DIM),
                                       rtol=1e-6)
            assert r["prompt_tokens"] == len(ids)


def test_identical_inputs_are_embedded_once(tmp_path):
    cfg = embed_job(tmp_path, text_rows())
    engine = fake_engine()
    run_fake(cfg, engine=engine)
    rows = pq.read_table(cfg.output).to_pylist()
    assert sorted(engine.admission_order) == ["r0", "r1", "r2", "r4", "r6"]
    assert rows[3]["duplicate_of"] == "r1" and rows[5]["duplicate_of"] == "r0"
    assert rows[3]["embedding"] == rows[1]["embedding"]
    summary = run_fake(cfg, overwrite=True).summary
    assert summary["duplicate_rows"] == 2 and summary["rows_per_s"] > 0
    assert "2 duplicate input(s) embedded once" in "\n".join(outcome_lines(summary))


def test_the_summary_counts_duplicates_apart_from_prefix_cache_hits(tmp_path):
    # Pooling models run without a prefix cache: a duplicate input is not a cache hit.
    cfg = embed_job(tmp_path, text_rows())
    summary = run_fake(cfg).summary
    duplicate = len(TEXTS[1].encode()) + len(TEXTS[0].encode())  # rows 3 and 5 (bytes)
    assert summary["tokens"]["duplicate"] == duplicate and summary["tokens"]["cached"] == 0
    assert summary["tokens"]["computed_prompt"] == summary["tokens"]["prompt"] - duplicate
    assert summary["prefix_cache_hit_rate"] is None
    text = "\n".join(outcome_lines(summary))
    assert f"duplicate {duplicate:,}" in text and "hit rate" not in text


def test_longest_input_runs_first(tmp_path):
    cfg = embed_job(tmp_path, text_rows())
    engine = fake_engine()
    run_fake(cfg, engine=engine)
    assert engine.admission_order[0] == "r4"  # the long sentence
    assert engine.admission_order[-1] == "r6"  # "short"


def test_bad_and_too_long_rows_are_error_rows_naming_the_fix(tmp_path):
    rows = [*text_rows(["fine text", "also fine"]), {"id": "missing", "tag": 9},
            {"id": "list", "input": 5, "tag": 10}, {"id": "long", "input": "word " * 400}]
    cfg = embed_job(tmp_path, rows, engine=_small_context())
    outcome = run_fake(cfg)
    assert outcome.exit_code == EXIT_ROW_ERRORS
    out = {r["id"]: r for r in pq.read_table(cfg.output).to_pylist()}
    assert out["r0"]["error"] is None and out["r0"]["embedding"] is not None
    assert "no prompt" in out["missing"]["error"] and out["missing"]["embedding"] is None
    assert "must be a non-empty string" in out["list"]["error"]
    assert "--truncate" in out["long"]["error"]


def test_truncate_embeds_the_first_tokens_of_a_long_input(tmp_path):
    cfg = embed_job(tmp_path, [{"id": "long", "input": "word " * 400}],
                    engine=_small_context(), truncate=True)
    assert run_fake(cfg).exit_code == EXIT_OK
    (row,) = pq.read_table(cfg.output).to_pylist()
    assert row["error"] is None and row["prompt_tokens"] == 256


def test_engine_failure_and_resume_embed_each_row_exactly_once(tmp_path):
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(40)]
    cfg = embed_job(tmp_path, text_rows(texts))
    dying = fake_engine(max_num_seqs=4, die_after_steps=4)
    outcome = run_fake(cfg, engine=dying)
    assert outcome.exit_code == EXIT_INTERRUPTED and "--resume" in outcome.message
    done_before = set(dying.admission_order) - set(dying.admission_order[-4:])
    engine = fake_engine()
    assert run_fake(cfg, resume=True, engine=engine).exit_code == EXIT_OK
    rows = pq.read_table(cfg.output).to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(40)]
    assert all(r["embedding"] is not None for r in rows)
    assert not set(engine.admission_order) & done_before


def _small_context():
    from batchrun.config import EngineOptions

    return EngineOptions(max_model_len=256)


def openai_line(custom_id, body, url="/v1/embeddings"):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_embeddings_lines_in_and_out(tmp_path):
    from openai.types import CreateEmbeddingResponse

    lines = [openai_line("plain", {"model": "m", "input": "hello world"}),
             openai_line("b64", {"input": ["hello world"], "encoding_format": "base64"}),
             openai_line("ids", {"input": [101, 7592, 102]}),
             openai_line("missing", {"model": "m"}),
             openai_line("number", {"input": 5}),
             openai_line("empty", {"input": []}),
             openai_line("format", {"input": "x", "encoding_format": "int8"})]
    cfg = replace(embed_job(tmp_path, lines), openai_output=tmp_path / "out.jsonl")
    assert run_fake(cfg).exit_code == EXIT_ROW_ERRORS
    out = {json.loads(line)["custom_id"]: json.loads(line)
           for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    vectors = {r["id"]: r["embedding"] for r in pq.read_table(cfg.output).to_pylist()}
    plain = CreateEmbeddingResponse.model_validate(out["plain"]["response"]["body"])
    assert plain.data[0].embedding == pytest.approx(vectors["plain"], rel=1e-6)
    assert plain.usage.prompt_tokens == plain.usage.total_tokens > 0
    # base64: the SDK decodes the little-endian float32 bytes before it builds the model.
    body = out["b64"]["response"]["body"]
    encoded = body["data"][0]["embedding"]
    body["data"][0]["embedding"] = np.frombuffer(base64.b64decode(encoded), "<f4").tolist()
    decoded = CreateEmbeddingResponse.model_validate(body)
    assert decoded.data[0].embedding == vectors["plain"]  # the same text: its float32 bits
    assert out["ids"]["error"] is None and vectors["ids"] is not None
    assert '"body.input" is missing' in out["missing"]["error"]["message"]
    assert '"body.input" must be a non-empty string' in out["number"]["error"]["message"]
    assert '"body.input" is an empty list' in out["empty"]["error"]["message"]
    assert "encoding_format" in out["format"]["error"]["message"]
    assert out["missing"]["response"] is None


def test_a_file_mixing_chat_and_embeddings_lines_is_refused_naming_the_fix(tmp_path):
    lines = [openai_line("e", {"input": "hello"}),
             openai_line("c", {"messages": [{"role": "user", "content": "hi"}]},
                         url="/v1/chat/completions")]
    for task in ("embed", "generate"):
        cfg = replace(embed_job(tmp_path, lines), task=task)
        with pytest.raises(InputError, match="split the file by url"):
            run_fake(cfg)


def test_embeddings_lines_in_a_generation_job_ask_for_task_embed(tmp_path):
    cfg = replace(embed_job(tmp_path, [openai_line("e", {"input": "hello"})]), task="generate")
    with pytest.raises(InputError, match="--task embed"):
        run_fake(cfg)


def test_the_python_api_adds_a_vector_column_to_the_frame():
    import polars as pl

    import batchrun

    frame = pl.DataFrame({"input": ["a cat", "a dog", "a cat"], "topic": ["x", "y", "z"]})
    got = batchrun.embed(frame, engine="fake")
    assert got.columns == ["input", "topic", "embedding", "prompt_tokens", "error"]
    assert got["topic"].to_list() == ["x", "y", "z"]
    vectors = got["embedding"].to_list()
    assert len(vectors[0]) == FAKE_EMBEDDING_DIM and vectors[0] == vectors[2] != vectors[1]
    named = batchrun.embed(pl.DataFrame({"text": ["a cat"]}), text="text", engine="fake")
    assert named["embedding"].to_list() == vectors[:1]
