"""Spilled runs (batchrun/ingest/spill.py): read back exactly as they were in memory, and
stored compactly: a text job spills fewer bytes than its input file holds."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.errors import EXIT_OK
from batchrun.ingest.shards import ShardBuilder, SortedRun
from batchrun.ingest.spill import SpillFile
from batchrun.io.schema import DICTIONARY_STRING, REQUEST_SCHEMA
from tests.reliability.harness import cli

# Token ids at each width's edges: one past a width's largest value needs the next width.
TOKEN_BOUNDS = (0, 255, 256, 65_535, 65_536, 2**31 - 1)


@st.composite
def column(draw, n: int, values: st.SearchStrategy) -> list:
    """A column of `n` rows: all null, one value on every row, or a value (or null) a row."""
    kind = draw(st.sampled_from(["null", "same", "varied"]))
    if kind == "null":
        return [None] * n
    if kind == "same":
        return [draw(values)] * n
    return draw(st.lists(st.none() | values, min_size=n, max_size=n))


@st.composite
def tokenized_requests(draw) -> pa.Table:
    """Tokenized request tables as the shard stage receives them: error rows (no token ids,
    an error), empty prompts, token ids up to and past each width's largest value (and
    negative ones: a pre-tokenized Parquet file may hold any int32), and every other
    column null, constant or varied."""
    n = draw(st.integers(1, 40))
    high = draw(st.sampled_from(TOKEN_BOUNDS))
    low = draw(st.sampled_from([0, 0, 0, -(2**31)]))
    token = st.integers(low, high) | st.sampled_from([low, high])
    prompts = draw(st.lists(st.none() | st.lists(token, max_size=12), min_size=n, max_size=n))
    first_row = draw(st.sampled_from([0, 250, 65_530, 2**32 - 10]))
    text = st.text(max_size=6)
    floats = st.floats(allow_nan=False, width=64) | st.sampled_from([0.0, -0.0])
    columns = {
        "row": list(range(first_row, first_row + n)),
        "id": [f"q{first_row + i}" for i in range(n)],
        "endpoint": draw(column(n, st.sampled_from(["completion", "chat"]))),
        "prompt": draw(column(n, text)),
        "messages": [None] * n,
        "prompt_token_ids": prompts,
        "max_tokens": draw(column(n, st.integers(0, 2**40))),
        "temperature": draw(column(n, floats)),
        "top_p": draw(column(n, floats)),
        "seed": draw(column(n, st.integers(-(2**63), 2**63 - 1))),
        "stop": draw(column(n, st.lists(text, max_size=2))),
        "completion_tokens": draw(column(n, st.integers(0, 300))),
        "logprobs": draw(column(n, st.booleans())),
        "top_logprobs": draw(column(n, st.integers(0, 20))),
        "inputs": [None] * n,
        # a row of several inputs: its prompt's tokens cut in two
        "input_lengths": [None if p is None or len(p) < 2 or not draw(st.booleans())
                          else [len(p) // 2, len(p) - len(p) // 2] for p in prompts],
        "error": [draw(text) if p is None else None for p in prompts],
    }
    arrays = {f.name: pa.array(columns[f.name], f.type) for f in REQUEST_SCHEMA
              if f.type != DICTIONARY_STRING}
    for name in ("constraint", "constraint_spec"):
        arrays[name] = pa.array(draw(column(n, st.sampled_from(["regex", "choice", "{}"]))),
                                pa.string()).dictionary_encode()
    arrays["adapter"] = pa.array(draw(column(n, st.sampled_from(["support", "legal"]))),
                                 pa.string()).dictionary_encode()
    return pa.table({f.name: arrays[f.name] for f in REQUEST_SCHEMA}, schema=REQUEST_SCHEMA)


@settings(max_examples=150, deadline=None)
@given(tokenized_requests(), st.integers(1, 17))
def test_a_spilled_run_reads_back_exactly_as_it_was_in_memory(table, batch_rows):
    with tempfile.TemporaryDirectory() as tmp:
        spilled = SortedRun.sort(table, Path(tmp) / "run.arrow", batch_rows)
        in_memory = SortedRun.sort(table, None, batch_rows)
        assert spilled.file.batches == len(in_memory.heads)
        for i in range(len(in_memory.heads)):
            read, held = spilled.batch(i), in_memory.batch(i)
            assert read.schema == held.schema == REQUEST_SCHEMA
            assert read.equals(held)


@settings(max_examples=40, deadline=None)
@given(st.lists(tokenized_requests(), min_size=2, max_size=5))
def test_spilled_shards_load_every_row_exactly_as_added(tables):
    first = 0  # row numbers unique across the job
    added = []
    for t in tables:
        rows = pa.array(range(first, first + t.num_rows), pa.int64())
        added.append(t.set_column(0, REQUEST_SCHEMA.field("row"), rows))
        first += t.num_rows
    with tempfile.TemporaryDirectory() as tmp:
        builder = ShardBuilder(Path(tmp), run_bytes=1, shard_bytes=200)  # every add spills
        for t in added:
            builder.add(t)
        loaded = pa.concat_tables([s.load() for s in builder.finish()])
        assert builder.spilled_rows == first
    assert loaded.schema == REQUEST_SCHEMA
    by_row = loaded.sort_by("row").to_pylist()
    assert by_row == pa.concat_tables(added).to_pylist()


def test_a_run_of_one_value_throughout_keeps_its_rows(tmp_path):
    table = pa.table({"row": [7] * 5, "error": ["no prompt"] * 5})
    spilled = SpillFile.write(tmp_path / "run.arrow", table, batch_rows=2)
    assert [spilled.batch(i).num_rows for i in range(spilled.batches)] == [2, 2, 1]
    assert pa.concat_tables(spilled.batch(i) for i in range(spilled.batches)).equals(table)


def text_rows(n: int, systems: int = 20, seed: int = 0) -> list[dict]:
    """bench_scale.py's text job, small: ~600-byte rows, one of `systems` system prompts
    (~420 bytes) and a question, shuffled."""
    rng = random.Random(seed)
    words = "the of and to in is was for on that with as by at from his an were are".split()
    system = [f"System {k}: " + " ".join(rng.choices(words, k=80)) for k in range(systems)]
    return [{"id": f"q{i}", "prompt": rng.choice(system) + " Question: "
             + " ".join(rng.choices(words, k=45)), "max_tokens": 4} for i in range(n)]


def test_a_text_job_spills_fewer_bytes_than_its_input_holds(tmp_path):
    """The fake engine's byte tokens are ~4x the input's bytes as int32 (with the request's
    other columns, main's spill format wrote ~2.4 KB a ~600-byte row): compact, a spilled row
    costs less than the row does in the input file."""
    rows = 3000
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in text_rows(rows)))
    result = cli("plan", path, "--engine", "fake", "--memory-budget", str(16 << 20), "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    shards = json.loads(result.stdout)["shards"]
    assert shards["count"] > 1 and shards["spilled_rows"] == rows
    input_bytes = path.stat().st_size
    assert shards["spilled_bytes"] < input_bytes, \
        f"spilled {shards['spilled_bytes']:,} bytes for a {input_bytes:,}-byte input"
