"""Examples of the input readers: each format, each row-level problem, each job-level problem."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.config import ColumnMap
from batchrun.errors import InputError
from batchrun.io.input.readers import read_request_set, read_requests
from batchrun.io.schema import REQUEST_SCHEMA
from batchrun.job.commands import validate_summary

REQUEST_FIELDS = REQUEST_SCHEMA.names[2:-1]  # endpoint .. stop


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Each item: a dict/list/value (written as JSON) or bytes/str (written as the line)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, str):
                row = row.encode()
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return path


def only(table: pa.Table, row: int) -> dict[str, Any]:
    """A row of the table, without its null fields."""
    return {k: v for k, v in table.slice(row, 1).to_pylist()[0].items() if v is not None}


def error_of(tmp_path: Path, line: Any) -> str | None:
    return read_requests(write_jsonl(tmp_path / "in.jsonl", [line]))["error"][0].as_py()


# --- JSONL ---------------------------------------------------------------------------------

def test_jsonl_each_prompt_source(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hello"},
        {"id": "b", "messages": [{"role": "user", "content": "Hi"}]},
        {"id": "c", "prompt_token_ids": [1, 2, 3]},
    ])
    table = read_requests(path)
    assert table.schema == REQUEST_SCHEMA
    assert only(table, 0) == {"row": 0, "id": "a", "endpoint": "completion", "prompt": "Hello"}
    assert only(table, 1) == {"row": 1, "id": "b", "endpoint": "chat",
                              "messages": '[{"role": "user", "content": "Hi"}]'}
    assert only(table, 2) == {"row": 2, "id": "c", "endpoint": "completion",
                              "prompt_token_ids": [1, 2, 3]}


def test_jsonl_sampling_values(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "a", "max_tokens": 8, "temperature": 0.5, "top_p": 1, "seed": -3,
         "stop": "\n"},
        {"prompt": "b", "stop": ["x", "y"], "max_tokens": 16.0},  # an integral float is an int
        {"prompt": "c", "temperature": None},  # null is the same as not given
    ])
    table = read_requests(path)
    assert only(table, 0) == {"row": 0, "id": "0", "endpoint": "completion", "prompt": "a",
                              "max_tokens": 8, "temperature": 0.5, "top_p": 1.0, "seed": -3,
                              "stop": ["\n"]}
    assert only(table, 1)["stop"] == ["x", "y"] and only(table, 1)["max_tokens"] == 16
    assert only(table, 2) == {"row": 2, "id": "2", "endpoint": "completion", "prompt": "c"}


def test_jsonl_ids_rows_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    # A BOM, CRLF endings, blank and whitespace-only lines (not rows), int and missing ids.
    path.write_bytes(b'\xef\xbb\xbf{"id": 7, "prompt": "a"}\r\n\n   \r\n'
                     b'{"prompt": "b"}\n\t\n{"id": "x", "prompt": "c"}')
    table = read_requests(path)
    assert table["row"].to_pylist() == [0, 1, 2]
    assert table["id"].to_pylist() == ["7", "1", "x"]
    assert table["error"].null_count == 3


def test_jsonl_column_map(tmp_path: Path) -> None:
    columns = ColumnMap(id="key", prompt="question", max_tokens="limit", stop="until")
    path = write_jsonl(tmp_path / "in.jsonl", [{"key": 1, "question": "q", "limit": 3,
                                                "until": "!", "prompt": "ignored"}])
    assert only(read_requests(path, columns), 0) == {
        "row": 0, "id": "1", "endpoint": "completion", "prompt": "q", "max_tokens": 3,
        "stop": ["!"]}
    bad = read_requests(write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "limit": 0}]),
                        columns)
    assert bad["error"][0].as_py() == 'row 0: "limit" must be a positive integer, got 0'


def test_jsonl_passthrough(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "a", "cat": "x", "meta": {"k": [1, 2]}, "mixed": 1},
        {"prompt": "b", "mixed": "two"},
        "not json",
    ])
    found = read_request_set(path, ColumnMap(passthrough=("cat", "meta", "mixed", "gone")))
    assert found.input_format == "jsonl"
    assert found.passthrough.to_pydict() == {
        "cat": ["x", None, None],
        "meta": ['{"k": [1, 2]}', None, None],  # nested values come as JSON text
        "mixed": ["1", "two", None],  # no common type: text
        "gone": [None, None, None],
    }
    assert found.passthrough.schema.field("gone").type == pa.string()
    assert read_request_set(path).passthrough.num_columns == 0


def test_jsonl_chunks_keep_row_order(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": str(i)} for i in range(10)])
    table = read_request_set(path, batch_rows=3).table
    assert table["prompt"].to_pylist() == [str(i) for i in range(10)]
    assert table["id"].to_pylist() == [str(i) for i in range(10)]


# --- Row-level problems: error rows, never a dead job ---------------------------------------

@pytest.mark.parametrize(("line", "error"), [
    # What the line holds
    ("{not json}", "row 0: not valid JSON (Expecting property name enclosed in double quotes, "
                   "column 2); write one JSON object per line"),
    (b'{"prompt": "caf\xe9"}', "row 0: line is not valid UTF-8 (bad byte at offset 15); "
                               "save the file as UTF-8"),
    ([1, 2], "row 0: expected a JSON object, got list [1, 2]; write one JSON object per line"),
    ('"text"', 'row 0: expected a JSON object, got str "text"; write one JSON object per line'),
    ('{"prompt": "\\ud800"}', "row 0: holds an unpaired UTF-16 surrogate escape (like \\ud800); "
                              "write text as valid Unicode"),
    ("[" * 100_000 + "]" * 100_000, "row 0: JSON nested too deeply; flatten the row"),
    # The prompt
    ({"max_tokens": 3}, 'row 0: no prompt; set one of "prompt", "messages", "prompt_token_ids"'),
    ({"prompt": None}, 'row 0: no prompt; set one of "prompt", "messages", "prompt_token_ids"'),
    ({"prompt": "a", "prompt_token_ids": [1]},
     'row 0: give only one of "prompt", "messages", "prompt_token_ids", not "prompt" and '
     '"prompt_token_ids"'),
    ({"prompt": 5}, 'row 0: "prompt" must be a non-empty string, got 5'),
    ({"prompt": ""}, 'row 0: "prompt" must be a non-empty string, got ""'),
    ({"messages": "hi"}, '"messages" must be a non-empty list of {"role": string, "content": '
                         'string} objects (or that list as JSON text), got "hi"'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user"}]}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": None}]}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": 1, "content": "x"}]}, '"messages" must be a non-empty list'),
    ({"messages": ["hi"]}, '"messages" must be a non-empty list'),
    ({"prompt_token_ids": [1, -2]}, 'row 0: "prompt_token_ids" must be a non-empty list of '
                                    "token ids (integers from 0 to 2147483647), got [1, -2]"),
    ({"prompt_token_ids": [2**31]}, '"prompt_token_ids" must be a non-empty list'),
    ({"prompt_token_ids": ["1"]}, '"prompt_token_ids" must be a non-empty list'),
    ({"prompt_token_ids": [1.0]}, '"prompt_token_ids" must be a non-empty list'),
    ({"prompt_token_ids": []}, '"prompt_token_ids" must be a non-empty list'),
    ({"prompt_token_ids": 5}, '"prompt_token_ids" must be a non-empty list'),
    # Sampling values
    ({"prompt": "a", "max_tokens": "ten"}, 'row 0: "max_tokens" must be a positive integer, '
                                           'got "ten"'),
    ({"prompt": "a", "max_tokens": 0}, '"max_tokens" must be a positive integer, got 0'),
    ({"prompt": "a", "max_tokens": 2.5}, '"max_tokens" must be a positive integer, got 2.5'),
    ({"prompt": "a", "max_tokens": True}, '"max_tokens" must be a positive integer, got true'),
    ({"prompt": "a", "max_tokens": 2**63}, '"max_tokens" must be a positive integer'),
    ({"prompt": "a", "temperature": -0.1}, '"temperature" must be a number >= 0, got -0.1'),
    ({"prompt": "a", "temperature": "0.5"}, '"temperature" must be a number >= 0, got "0.5"'),
    ('{"prompt": "a", "temperature": NaN}', '"temperature" must be a number >= 0, got NaN'),
    ({"prompt": "a", "temperature": 10**400}, '"temperature" must be a number >= 0'),
    ({"prompt": "a", "top_p": 0}, '"top_p" must be a number in (0, 1], got 0'),
    ({"prompt": "a", "top_p": 1.5}, '"top_p" must be a number in (0, 1], got 1.5'),
    ({"prompt": "a", "seed": "s"}, '"seed" must be a 64-bit integer, got "s"'),
    ({"prompt": "a", "seed": 0.5}, '"seed" must be a 64-bit integer, got 0.5'),
    ({"prompt": "a", "stop": 5}, '"stop" must be a string or a list of strings, got 5'),
    ({"prompt": "a", "stop": ["x", 1]}, '"stop" must be a string or a list of strings'),
    ({"prompt": "a", "id": 1.5}, 'row 0: "id" must be a string or an integer, got 1.5'),
    ({"prompt": "a", "id": [1]}, 'row 0: "id" must be a string or an integer, got [1]'),
])
def test_row_errors(tmp_path: Path, line: Any, error: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "before"}, line, {"prompt": "after"}])
    table = read_requests(path)
    assert table.num_rows == 3
    assert table["error"][0].as_py() is None and table["error"][2].as_py() is None
    message = table["error"][1].as_py()
    assert error.replace("row 0", "row 1") in message
    assert "\n" not in message
    assert only(table, 1).keys() == {"row", "id", "error"}  # no request fields on an error row


def test_error_values_are_shortened(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"prompt": "a", "max_tokens": "x" * 1000})
    assert message == 'row 0: "max_tokens" must be a positive integer, got "' + "x" * 56 + "..."


def test_cut_short_last_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b", "max_tok')
    table = read_requests(path)
    assert table["prompt"].to_pylist() == ["a", None]
    assert table["error"][1].as_py().startswith("row 1: the last line is cut short (")
    assert table["error"][1].as_py().endswith("the file looks truncated: write it again in full")


def test_line_over_8_mib(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "a"}\n{"prompt": "')
        f.write(b"x" * (9 * 2**20))
        f.write(b'"}\n{"prompt": "c"}\n')
    table = read_requests(path)
    assert table["prompt"].to_pylist() == ["a", None, "c"]
    assert table["error"][1].as_py() == \
        "row 1: line is 9.0 MiB, over the 8 MiB limit; shorten it"


def test_duplicate_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "x", "prompt": "first"},
        {"id": "1", "prompt": "b"},
        {"id": "x", "prompt": "again"},
        {"prompt": "d"},  # id "3"
        {"id": 3, "prompt": "e"},  # claims "3" as well: a duplicate of row 3
    ])
    table = read_requests(path)
    assert table["error"][2].as_py() == (
        'row 2: duplicate id "x" (first at row 0); ids must be unique — fix the input or drop '
        "the id column to use row numbers")
    assert table["error"][4].as_py().startswith('row 4: duplicate id "3" (first at row 3)')
    assert table["prompt"].to_pylist() == ["first", "b", None, "d", None]
    ids = table["id"].to_pylist()
    assert ids[:2] == ["x", "1"] and ids[3] == "3"
    assert len(set(ids)) == 5  # the error rows get free ids
    assert ids[2] == "2" and ids[4] == "4"


def test_rows_without_a_readable_id_never_steal_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        "broken", {"id": "0", "prompt": "a"}, {"id": "0~1", "prompt": "b"}])
    table = read_requests(path)
    assert table["id"].to_pylist() == ["0~2", "0", "0~1"]
    assert table["error"].null_count == 2


# --- OpenAI Batch API JSONL ----------------------------------------------------------------

def openai_line(custom_id: str, url: str, body: dict, method: str = "POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def test_openai_batch(tmp_path: Path) -> None:
    chat = "/v1/chat/completions"
    completions = "/v1/completions"
    path = write_jsonl(tmp_path / "batch.jsonl", [
        openai_line("c1", chat, {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                 "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0,
                                 "top_p": 0.5, "seed": 1, "stop": ["."]}),
        openai_line("t1", completions, {"prompt": "Once", "max_tokens": 7}),
        openai_line("t2", completions, {"prompt": ["Only one"]}),
        openai_line("t3", completions, {"prompt": [5, 6, 7]}),
        openai_line("t4", completions, {"prompt": [[5, 6]]}),
    ])
    found = read_request_set(path)
    assert found.input_format == "openai"
    table = found.table
    assert only(table, 0) == {"row": 0, "id": "c1", "endpoint": "chat",
                              "messages": '[{"role": "user", "content": "Hi"}]',
                              "max_tokens": 5, "temperature": 0.0, "top_p": 0.5, "seed": 1,
                              "stop": ["."], "adapter": "m"}  # body.model, as read
    assert only(table, 1) == {"row": 1, "id": "t1", "endpoint": "completion",
                              "prompt": "Once", "max_tokens": 7}
    assert only(table, 2)["prompt"] == "Only one"
    assert only(table, 3)["prompt_token_ids"] == [5, 6, 7]
    assert only(table, 4)["prompt_token_ids"] == [5, 6]
    assert read_requests(path, input_format="openai").equals(table)


@pytest.mark.parametrize(("line", "error"), [
    (openai_line("a", "/v1/completions", {"prompt": ["one", "two"]}),
     'row 0: batched prompts are not supported; one prompt per line ("body.prompt" holds 2)'),
    (openai_line("a", "/v1/responses", {"input": "x"}),
     'row 0: "url" must be "/v1/chat/completions" or "/v1/completions" or "/v1/embeddings", '
     'got "/v1/responses"'),
    (openai_line("a", "/v1/completions", {"prompt": "x"}, method="GET"),
     'row 0: "method" must be "POST", got "GET"'),
    (openai_line("a", "/v1/completions", ["x"]),
     'row 0: "body" must be a JSON object, got ["x"]'),
    (openai_line("a", "/v1/completions", {"prompt": "x", "n": 2}),
     'row 0: "body.n" must be 1 (one completion per line), got 2'),
    (openai_line("a", "/v1/chat/completions", {"prompt": "x"}),
     'row 0: no prompt; set "body.messages"'),
    (openai_line("a", "/v1/completions", {"messages": []}),
     'row 0: no prompt; set "body.prompt"'),
    (openai_line("a", "/v1/completions", {"prompt": "x", "max_completion_tokens": -1}),
     'row 0: "body.max_completion_tokens" must be a positive integer, got -1'),
    (openai_line("a", "/v1/completions", {"prompt": [-1]}),
     'row 0: "body.prompt" must be a non-empty list of token ids'),
    ({"custom_id": 1.5, "body": {}}, 'row 0: "custom_id" must be a string or an integer'),
])
def test_openai_row_errors(tmp_path: Path, line: dict, error: str) -> None:
    path = write_jsonl(tmp_path / "batch.jsonl", [line])
    table = read_requests(path, input_format="openai")
    assert table["error"][0].as_py().startswith(error)


def test_openai_detected_by_first_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "batch.jsonl", [
        "garbage", openai_line("a", "/v1/completions", {"prompt": "x"}), {"prompt": "plain"}])
    found = read_request_set(path)
    assert found.input_format == "openai"
    assert found.table["id"].to_pylist() == ["0", "a", "2"]
    assert found.table["error"][2].as_py().startswith('row 2: "url" must be')


# --- Parquet -------------------------------------------------------------------------------

def write_parquet(path: Path, columns: dict[str, Any], **kwargs: Any) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def test_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {
        "id": pa.array([10, None, 12], pa.int32()),
        "prompt": ["a", None, None],
        "messages": [None, [{"role": "user", "content": "Hi", "name": None}], None],
        "prompt_token_ids": pa.array([None, None, [1, 2]], pa.list_(pa.int64())),
        "max_tokens": pa.array([4.0, None, 6.0]),  # pandas-style float column of ints
        "temperature": pa.array([0, 1, 2], pa.int8()),
        "stop": ["x", None, "z"],
        "extra": [{"a": 1}, None, {"a": 3}],
    })
    found = read_request_set(path, ColumnMap(passthrough=("extra", "missing")))
    assert found.input_format == "parquet"
    table = found.table
    assert table.schema == REQUEST_SCHEMA
    assert only(table, 0) == {"row": 0, "id": "10", "endpoint": "completion", "prompt": "a",
                              "max_tokens": 4, "temperature": 0.0, "stop": ["x"]}
    assert only(table, 1) == {"row": 1, "id": "1", "endpoint": "chat",
                              "messages": '[{"role": "user", "content": "Hi"}]',
                              "temperature": 1.0}
    assert only(table, 2) == {"row": 2, "id": "12", "endpoint": "completion",
                              "prompt_token_ids": [1, 2], "max_tokens": 6, "temperature": 2.0,
                              "stop": ["z"]}
    assert found.passthrough.column_names == ["extra", "missing"]
    assert found.passthrough["extra"].to_pylist() == [{"a": 1}, None, {"a": 3}]
    assert found.passthrough["missing"].null_count == 3


def test_parquet_other_column_types(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {
        "question": pa.array(["a", "b", "a"], pa.large_string()).dictionary_encode(),
        "stop": pa.array([["x"], None, []], pa.large_list(pa.string())),
        "messages": pa.array([None, None, None], pa.string()),
        "seed": pa.array([1, 2, 2**64 - 1], pa.uint64()),
    })
    table = read_requests(path, ColumnMap(prompt="question"))
    assert table["prompt"].to_pylist() == ["a", "b", None]
    assert table["stop"].to_pylist() == [["x"], None, None]
    assert table["seed"].to_pylist() == [1, 2, None]
    assert table["error"][2].as_py() == \
        f'row 2: "seed" must be a 64-bit integer, got {2**64 - 1}'


def test_parquet_messages_as_json_text(tmp_path: Path) -> None:
    chat = json.dumps([{"role": "user", "content": "Hi"}])
    path = write_parquet(tmp_path / "in.parquet", {"messages": [chat, "[oops"]})
    table = read_requests(path)
    assert table["messages"][0].as_py() == chat
    assert table["error"][1].as_py().startswith('row 1: "messages" must be a non-empty list')


@pytest.mark.parametrize("rows", [
    [{"prompt": "a", "max_tokens": "ten"}, {"prompt": "b", "max_tokens": "5"}],
    [{"prompt": "a", "temperature": -1.0}, {"prompt": "b", "temperature": float("nan")}],
    [{"prompt": "a", "top_p": 0.0}, {"prompt": "b", "top_p": 2.0}],
    [{"prompt": ""}, {"prompt": None}],
    [{"prompt": "a", "messages": "[]"}, {"prompt": None, "messages": None}],
    [{"prompt_token_ids": [-1]}, {"prompt_token_ids": []}],
    [{"prompt": "a", "stop": [None]}, {"prompt": "b", "stop": ["x"]}],
    [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}],
])
def test_parquet_and_jsonl_agree(tmp_path: Path, rows: list[dict]) -> None:
    """The same values give the same table, errors included, from either format."""
    from_parquet = read_requests(write_parquet(tmp_path / "in.parquet", pa.Table.from_pylist(rows)
                                               .to_pydict()))
    from_jsonl = read_requests(write_jsonl(tmp_path / "in.jsonl", rows))
    assert from_parquet.to_pylist() == from_jsonl.to_pylist()
    assert from_parquet["error"].null_count < 2


def test_parquet_batches(tmp_path: Path) -> None:
    n = 10
    path = write_parquet(tmp_path / "in.parquet", {
        "id": [f"q{i % 7}" for i in range(n)],
        "prompt": [f"p{i}" if i != 5 else "" for i in range(n)],
    }, row_group_size=3)
    table = read_request_set(path, batch_rows=4).table
    assert table["row"].to_pylist() == list(range(n))
    assert table["error"][5].as_py() == 'row 5: "prompt" must be a non-empty string, got ""'
    assert table["error"][8].as_py().startswith('row 8: duplicate id "q1" (first at row 1)')
    assert table["error"].null_count == n - 4  # row 5, and rows 7, 8, 9 repeat an id
    assert table["id"].to_pylist()[:7] == [f"q{i}" for i in range(7)]


# --- Job-level problems: InputError, one line naming the file and the fix -------------------

def parquet_bytes(tmp_path: Path) -> bytes:
    return write_parquet(tmp_path / "ok.parquet", {"prompt": ["a", "b"]}).read_bytes()


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file; check the input path"),
    (b"", "is empty; write at least one request"),
    (b"\n  \n\r\n", "holds no rows; write at least one request"),
    (b'[{"prompt": "a"}]', "this is a JSON array; write one JSON object per line (JSONL)"),
    (b'\n  [\n  {"prompt": "a"}\n]\n',
     "this is a JSON array; write one JSON object per line (JSONL)"),
    (bytes(range(256)) * 4, "none of its 5 lines is a JSON object"),
    (b"1\n2\n", "none of its 2 lines is a JSON object (is it binary, or another format?); "
                "write one JSON object per line (JSONL) or use Parquet"),
    (b"id,prompt\n1,hello\n", "none of its 2 lines is a JSON object"),
    (gzip.compress(b'{"prompt": "a"}\n'), "is gzip-compressed; decompress it first"),
    (b"PAR1 not really", "cannot be opened as Parquet ("),
    (lambda tmp: parquet_bytes(tmp)[:-20], "the file is cut short or corrupt: write it again"),
    (lambda tmp: parquet_bytes(tmp)[:60] + parquet_bytes(tmp)[-300:],
     "the file is cut short or corrupt: write it again"),
    (lambda tmp: write_parquet(tmp / "q.parquet", {"text": ["a"], "n": [1]}).read_bytes(),
     'has none of the columns "prompt", "messages", "prompt_token_ids" (it has "text", "n"); '
     'rename the prompt column or set `prompt = "..."` under [columns] in the job file'),
    (lambda tmp: write_parquet(tmp / "z.parquet",
                               {"prompt": pa.array([], pa.string())}).read_bytes(),
     "holds no rows; write at least one request"),
])
def test_input_errors(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "input.data"
    if callable(content):
        content = content(tmp_path)
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as raised:
        read_requests(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_corrupt_parquet_data_is_an_input_error(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", {"prompt": [f"prompt {i}" for i in range(1000)]},
                         compression="none")
    data = bytearray(path.read_bytes())
    start = data.index(b"prompt 500")
    data[start:start + 200] = b"\xff" * 200  # invalid UTF-8 inside a page
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="the file is cut short or corrupt: write it again"):
        read_requests(path)


def test_input_errors_of_paths_and_formats(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory; point the input at one file"):
        read_requests(tmp_path)
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    with pytest.raises(InputError, match="unknown input format 'csv'; use one of auto, jsonl"):
        read_requests(jsonl, input_format="csv")
    with pytest.raises(InputError, match='is not a Parquet file .it does not start with "PAR1".; '
                                         'set input_format to "auto" or write the file as'):
        read_requests(jsonl, input_format="parquet")
    parquet = write_parquet(tmp_path / "in.parquet", {"prompt": ["a"]})
    with pytest.raises(InputError, match='is a Parquet file, but input_format is "jsonl"; set '
                                         'input_format to "parquet" or "auto"'):
        read_requests(parquet, input_format="jsonl")
    renamed = tmp_path / "actually_parquet.jsonl"  # detected by content, not by name
    renamed.write_bytes(parquet.read_bytes())
    assert read_request_set(renamed).input_format == "parquet"


# --- validate_summary ----------------------------------------------------------------------

def test_validate_summary(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, "x", {"prompt": 1}, "y"])
    summary = validate_summary(read_requests(path), max_errors=2)
    assert summary == {
        "rows": 4, "ok": 1, "errors": 3,
        "first_errors": ["row 1: not valid JSON (Expecting value, column 1); write one JSON "
                         "object per line",
                         'row 2: "prompt" must be a non-empty string, got 1'],
    }
