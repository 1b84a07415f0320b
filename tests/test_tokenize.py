"""Examples of tokenize_requests: pre-tokenized rows straight from Arrow, text and chat rows
through the tokenizer's batch calls, the row problems it finds, and a pre-tokenized job that
never imports transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.ingest import tokenize
from batchrun.ingest.tokenize import ByteTokenizer, TokenizedRequests, tokenize_requests
from batchrun.io.schema import REQUEST_SCHEMA

REPO = Path(__file__).resolve().parents[1]


class PickyTokenizer(ByteTokenizer):
    """ByteTokenizer whose chat template rejects a message with the role "tool"."""

    def render_chat(self, messages: list[dict]) -> str:
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("tool messages need a tool call before them")
        return super().render_chat(messages)


def request_table(rows: list[dict[str, Any]], chunks: int = 1) -> pa.Table:
    """REQUEST_SCHEMA rows (row and id filled in), split into about `chunks` chunks."""
    full = [{"row": i, "id": str(i), **r} for i, r in enumerate(rows)]
    size = max(1, -(-len(full) // chunks))
    parts = [pa.Table.from_pylist(full[i:i + size], schema=REQUEST_SCHEMA)
             for i in range(0, len(full), size)]
    return pa.concat_tables(parts) if parts else REQUEST_SCHEMA.empty_table()


def tokens_of(got: TokenizedRequests, i: int) -> list[int]:
    """Request i's token ids."""
    return got.values[got.offsets[i]:got.offsets[i + 1]].tolist()


def per_row(requests: pa.Table, tokenizer: ByteTokenizer, max_model_len: int,
            skip: list[bool]) -> tuple[dict[int, list[int]], dict[int, str]]:
    """What each row should give, worked out one row at a time: tokens or a problem."""
    tokens, problems = {}, {}
    for pos, r in enumerate(requests.to_pylist()):
        if r["error"] is not None or skip[pos]:
            continue
        if r["prompt_token_ids"] is not None:
            ids = r["prompt_token_ids"]
        elif r["messages"] is not None:
            try:
                rendered = tokenizer.render_chat(json.loads(r["messages"]))
            except ValueError as e:
                problems[pos] = (f"row {r['row']}: the model's chat template rejected these "
                                 f"messages (ValueError: {e}); check roles and order")
                continue
            ids = tokenizer.encode_rendered([rendered])[0]
        else:
            ids = tokenizer.encode([r["prompt"]])[0]
        if not ids:
            problems[pos] = f"row {r['row']}: the prompt is empty; give it some text"
        elif len(ids) >= max_model_len:
            problems[pos] = (f"row {r['row']}: the prompt is {len(ids)} tokens but the model's "
                             f"context is {max_model_len} (max_model_len); shorten the prompt "
                             "or raise engine.max_model_len if the model allows it")
        else:
            tokens[pos] = ids
    return tokens, problems


token_lists = st.lists(st.integers(0, 2**31 - 1), max_size=12)
a_row = st.one_of(
    st.builds(lambda ids: {"prompt_token_ids": ids}, token_lists),
    st.builds(lambda ids: {"prompt_token_ids": ids}, token_lists),  # most rows: pre-tokenized
    st.builds(lambda text: {"prompt": text}, st.text(max_size=10)),
    st.builds(lambda role, text: {"messages": json.dumps([{"role": role, "content": text}])},
              st.sampled_from(["user", "system", "tool"]), st.text(max_size=6)),
    st.just({"error": "row ?: bad JSON"}),
)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(a_row, max_size=40), chunks=st.integers(1, 4),
       max_model_len=st.integers(2, 16), skip_seed=st.integers(0, 2**32 - 1),
       copy_step=st.sampled_from([1, 5, 1 << 20]))
def test_batched_tokenizing_equals_the_per_row_result(rows: list[dict], chunks: int,
                                                     max_model_len: int, skip_seed: int,
                                                     copy_step: int) -> None:
    requests = request_table(rows, chunks)
    skip = np.random.default_rng(skip_seed).random(len(rows)) < 0.2
    tokenizer = PickyTokenizer()
    # Rows of several kinds are put in row order a few tokens at a time, or all at once.
    with mock.patch.object(tokenize, "_COPY_TOKENS", copy_step):
        got = tokenize_requests(requests, tokenizer, max_model_len=max_model_len, skip=skip)
    want_tokens, want_problems = per_row(requests, tokenizer, max_model_len, skip.tolist())
    assert got.positions.tolist() == sorted(want_tokens)
    assert {int(p): tokens_of(got, i) for i, p in enumerate(got.positions)} == want_tokens
    assert got.errors == want_problems
    assert got.values.dtype == np.int32 and got.offsets.dtype == np.int64
    assert got.offsets[0] == 0 and got.offsets[-1] == len(got.values)


def test_pre_tokenized_prompts_are_used_without_a_copy() -> None:
    requests = request_table([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8]}])
    got = tokenize_requests(requests, ByteTokenizer(), max_model_len=64)
    arrow_values = requests["prompt_token_ids"].chunk(0).flatten().to_numpy()
    assert got.values.tolist() == [5, 6, 7, 8] and got.offsets.tolist() == [0, 3, 4]
    assert np.shares_memory(got.values, arrow_values)


def test_rows_of_every_kind_come_back_in_row_order() -> None:
    requests = request_table([{"prompt": "ab"}, {"prompt_token_ids": [1]},
                              {"messages": json.dumps([{"role": "user", "content": "x"}])},
                              {"prompt_token_ids": [2, 3]}, {"prompt": "c"}], chunks=2)
    got = tokenize_requests(requests, ByteTokenizer(), max_model_len=64)
    assert got.positions.tolist() == [0, 1, 2, 3, 4]
    assert [tokens_of(got, i) for i in range(5)] == [
        [97, 98], [1], list(b"<user>x\n<assistant>"), [2, 3], [99]]


def test_row_problems_name_the_row_and_the_fix() -> None:
    requests = request_table([
        {"prompt_token_ids": []},
        {"prompt": "far too long for this model"},
        {"messages": json.dumps([{"role": "tool", "content": "42"}])},
        {"prompt": "fits"}])
    got = tokenize_requests(requests, PickyTokenizer(), max_model_len=8)
    assert got.positions.tolist() == [3]
    assert got.errors == {
        0: "row 0: the prompt is empty; give it some text",
        1: "row 1: the prompt is 27 tokens but the model's context is 8 (max_model_len); "
           "shorten the prompt or raise engine.max_model_len if the model allows it",
        2: "row 2: the model's chat template rejected these messages (ValueError: tool "
           "messages need a tool call before them); check roles and order"}


def test_a_pre_tokenized_job_never_imports_transformers(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()  # config.json is all `validate` reads of a model for pre-tokenized rows
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    data = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"prompt_token_ids": pa.array([[1, 2, 3], [4, 5]],
                                                          pa.list_(pa.int32()))}), data)
    script = ("import json, sys\n"
              "from batchrun.cli import app\n"
              "try:\n"
              f"    app(['validate', {str(data)!r}, '--model', {str(model)!r}, '--json'])\n"
              "except SystemExit as e:\n"
              "    code = e.code\n"
              "print(json.dumps({'exit': code, 'transformers': 'transformers' in sys.modules}),"
              " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    outcome = json.loads(done.stderr.strip().splitlines()[-1])
    assert outcome == {"exit": 0, "transformers": False}, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 2 and report["prompt_tokens"]["total"] == 5


def test_the_model_tokenizer_encodes_as_transformers_does() -> None:
    from transformers import AutoTokenizer

    from batchrun.ingest.tokenize import HFTokenizer
    from batchrun.model import default_model_dir

    texts = ["Hello, world!", "  leading and trailing spaces  ", "café ☕ naïve 日本語 🙂",
             "<|im_start|>user\nspecial tokens written as text<|im_end|>", "\n\n\t", "x" * 5000,
             "The quick brown fox " * 50]
    ours, theirs = HFTokenizer(default_model_dir()), AutoTokenizer.from_pretrained(
        default_model_dir())
    assert ours.encode(texts) == theirs(texts, add_special_tokens=True)["input_ids"]
    assert ours.encode_rendered(texts) == theirs(texts, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.render_chat(chat) == theirs.apply_chat_template(chat, tokenize=False,
                                                                add_generation_prompt=True)


def test_the_model_tokenizer_loads_without_torch(tmp_path: Path) -> None:
    """A text job's tokenizer is the class tokenizer_config.json names, loaded without
    AutoTokenizer's lookup, which imports torch and transformers' model code (seconds)."""
    script = ("import json, sys\n"
              "from batchrun.ingest.tokenize import HFTokenizer\n"
              "from batchrun.model import default_model_dir\n"
              "ids = HFTokenizer(default_model_dir()).encode(['Hello, world!'])\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': ids,\n"
              "                  'class': type(HFTokenizer(default_model_dir())._tok).__name__}))\n"
              "from transformers import AutoTokenizer\n"
              "auto = AutoTokenizer.from_pretrained(default_model_dir())\n"
              "print(json.dumps({'ids': auto(['Hello, world!'])['input_ids'],\n"
              "                  'class': type(auto).__name__}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    ours, auto = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert ours.pop("torch") is False, done.stderr
    assert ours == auto
