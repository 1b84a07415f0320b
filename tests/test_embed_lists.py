"""OpenAI /v1/embeddings lines whose `input` is a list of several texts (or token id lists),
on the fake engine (a vector is a pure function of its token ids; the fake tokenizer's
tokens are a text's UTF-8 bytes): one output line per input line, one vector per input,
each input run (and deduplicated) on its own."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.config import EngineOptions
from batchrun.engine.fake import FAKE_EMBEDDING_DIM, fake_embedding
from batchrun.errors import EXIT_ROW_ERRORS
from tests.test_embed import embed_job, fake_engine, openai_line, run_fake


def vector(text_or_ids) -> list[float]:
    ids = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else text_or_ids
    return fake_embedding(np.array(ids), FAKE_EMBEDDING_DIM).tolist()


LINES = [openai_line("two", {"input": ["a cat", "a dog"]}),
         openai_line("ids", {"input": [[7, 8], [9, 10, 11]], "encoding_format": "base64"}),
         openai_line("single", {"input": "a dog"}),
         openai_line("one", {"input": ["a bird"]}),
         openai_line("again", {"input": ["a bird", "a cat", "a cat"]}),
         openai_line("empty", {"input": []}),
         openai_line("mixed", {"input": ["a cat", [1, 2]]}),
         openai_line("long", {"input": ["fine", "word " * 100]})]


@pytest.fixture
def ran(tmp_path):
    cfg = replace(embed_job(tmp_path, LINES), openai_output=tmp_path / "out.jsonl",
                  engine=EngineOptions(max_model_len=256))
    engine = fake_engine()
    assert run_fake(cfg, engine=engine).exit_code == EXIT_ROW_ERRORS
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return cfg, engine, lines


def test_one_output_line_per_input_line_with_a_vector_per_input(ran):
    from openai.types import CreateEmbeddingResponse

    _, _, lines = ran
    assert [line["custom_id"] for line in lines] == [line["custom_id"] for line in LINES]
    out = {line["custom_id"]: line for line in lines}
    two = CreateEmbeddingResponse.model_validate(out["two"]["response"]["body"])
    assert [d.index for d in two.data] == [0, 1]
    assert two.data[0].embedding == pytest.approx(vector("a cat"), rel=1e-6)
    assert two.data[1].embedding == pytest.approx(vector("a dog"), rel=1e-6)
    assert two.usage.prompt_tokens == two.usage.total_tokens == len("a cat") + len("a dog")
    # base64: each vector its own little-endian float32 bytes, as OpenAI encodes them.
    body = out["ids"]["response"]["body"]
    for d in body["data"]:
        d["embedding"] = np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()
    ids = CreateEmbeddingResponse.model_validate(body)
    assert ids.data[1].embedding == pytest.approx(vector([9, 10, 11]), rel=1e-6)
    assert ids.usage.prompt_tokens == 5
    # A list of one input is that input.
    one = CreateEmbeddingResponse.model_validate(out["one"]["response"]["body"])
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(vector("a bird"))
    again = CreateEmbeddingResponse.model_validate(out["again"]["response"]["body"])
    assert [d.embedding for d in again.data] == [one.data[0].embedding, two.data[0].embedding,
                                                 two.data[0].embedding]


def test_a_bad_list_is_one_error_line_saying_why(ran):
    _, engine, lines = ran
    out = {line["custom_id"]: line for line in lines}
    assert '"body.input" is an empty list' in out["empty"]["error"]["message"]
    assert "mixes texts and token id lists" in out["mixed"]["error"]["message"]
    assert "--truncate" in out["long"]["error"]["message"]
    assert all(out[k]["response"] is None for k in ("empty", "mixed", "long"))
    assert not [r for r in engine.admission_order if r.startswith("long")]  # "fine" neither


def test_each_distinct_input_is_embedded_once_whatever_line_holds_it(ran):
    _, engine, _ = ran
    # a cat, a dog, [7, 8], [9, 10, 11], a bird: five distinct inputs in nine
    assert len(engine.admission_order) == 5


def test_the_parquet_output_holds_a_list_of_vectors_for_a_line_of_several(ran):
    cfg, _, _ = ran
    table = pq.read_table(cfg.output)
    assert table.schema.field("embeddings").type == pa.list_(
        pa.list_(pa.float32(), FAKE_EMBEDDING_DIM))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["two"]["embedding"] is None
    np.testing.assert_allclose(rows["two"]["embeddings"], [vector("a cat"), vector("a dog")],
                               rtol=1e-6)
    assert rows["two"]["prompt_tokens"] == 10
    assert rows["single"]["embeddings"] is None
    assert rows["single"]["embedding"] == pytest.approx(vector("a dog"))
    assert rows["empty"]["embedding"] is None and rows["empty"]["embeddings"] is None
