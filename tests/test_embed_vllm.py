"""An embedding job on vLLM's pooling runner with the packaged model (all-MiniLM-L6-v2), run
once as a CLI subprocess (never a second vLLM engine in the test process): its vectors equal
sentence-transformers' for the same model (mean pooling over the attention mask, then unit
length, as the model's modules.json says), computed here with torch and transformers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.model import default_embed_model_dir, sentence_transformers_settings

ROWS = 300
WORDS = ("the library keeps old maps of the river valley while students read quietly about "
         "trains ships weather markets music and the history of small towns near mountains").split()


def texts() -> list[str]:
    rng = random.Random(7)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 8, 20, 60, 150])))
           for _ in range(ROWS)]
    for i in range(0, ROWS, 10):  # every tenth row repeats an earlier one
        out[i] = out[i // 2]
    out[5] = "word " * 400  # longer than the model's 256 tokens: an error row
    return out


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[pa.Table, list[str], dict]:
    folder = tmp_path_factory.mktemp("embed")
    rows = [{"id": f"r{i}", "input": t, "n": i} for i, t in enumerate(texts())]
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "vectors.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(folder / "in.jsonl"), "-o", str(out),
         "--task", "embed", "--passthrough", "n", "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]  # one error row
    return pq.read_table(out), texts(), json.loads(done.stdout)


def reference_vectors(inputs: list[str]) -> np.ndarray:
    """sentence-transformers' vectors of all-MiniLM-L6-v2, computed as its modules do."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = default_embed_model_dir()
    normalize, longest = sentence_transformers_settings(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    for start in range(0, len(inputs), 64):
        batch = tokenizer(inputs[start:start + 64], padding=True, truncation=True,
                          max_length=longest, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vectors = (hidden * mask).sum(1) / mask.sum(1)
        if normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        out.append(vectors.numpy())
    return np.concatenate(out)


def test_vectors_equal_sentence_transformers_within_1e_4_cosine(embedded):
    table, inputs, _ = embedded
    ok = [i for i, e in enumerate(table["error"].to_pylist()) if e is None]
    got = np.array(table["embedding"].take(ok).to_pylist(), dtype=np.float32)
    want = reference_vectors([inputs[i] for i in ok])
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert len(ok) == ROWS - 1
    assert cosine.min() > 1 - 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_one_row_per_input_in_order_with_the_models_dimension(embedded):
    table, _, _ = embedded
    assert table["id"].to_pylist() == [f"r{i}" for i in range(ROWS)]
    assert table["n"].to_pylist() == list(range(ROWS))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)


def test_identical_inputs_are_embedded_once_and_counted(embedded):
    table, inputs, summary = embedded
    rows = table.to_pylist()
    copies = [r for r in rows if r["duplicate_of"] is not None]
    assert len(copies) == len(inputs) - len(set(inputs))
    for r in copies:
        original = rows[int(r["duplicate_of"][1:])]
        assert r["embedding"] == original["embedding"]


def test_an_input_longer_than_the_context_is_an_error_row_naming_the_fix(embedded):
    table, _, _ = embedded
    row = table.to_pylist()[5]
    assert row["embedding"] is None and "--truncate" in row["error"]


def test_an_openai_line_of_several_texts_gets_each_texts_vector(tmp_path):
    from openai.types import CreateEmbeddingResponse

    inputs = ["the river valley", "old maps of small towns", "trains and ships"]
    lines = [{"custom_id": "several", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "m", "input": inputs}},
             {"custom_id": "one", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "m", "input": inputs[1]}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(tmp_path / "in.jsonl"), "-o",
         str(tmp_path / "out.parquet"), "--task", "embed", "--openai-output",
         str(tmp_path / "out.jsonl")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    several = CreateEmbeddingResponse.model_validate(out[0]["response"]["body"])
    got = np.array([d.embedding for d in several.data], dtype=np.float32)
    want = reference_vectors(inputs)
    assert (got * want).sum(1).min() > 1 - 1e-4  # unit vectors: their cosine
    one = CreateEmbeddingResponse.model_validate(out[1]["response"]["body"])
    np.testing.assert_allclose(one.data[0].embedding, got[1], atol=1e-5)
