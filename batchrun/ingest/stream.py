"""The ingest pipeline, streamed: read the input batch by batch, tokenize each batch, and cut
the job into prefix shards within the memory budget (shards.py). Rows finished in an earlier
run are read for their pass-through columns only."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..clock import StageClock
from ..config import InputFormat, JobConfig
from ..engine.sizing import LongestRequest, longest_request
from ..errors import InputError
from ..io.input.readers import open_request_stream
from ..io.output.writer import ENDPOINT, INPUT_COUNT, InputColumns, input_counts
from ..io.schema import ADAPTER, ENDPOINT_EMBEDDING, ENDPOINT_EMBEDDING_BASE64
from .adapters import resolve_adapters
from .lengths import ReplayLengths, replay_lengths
from .prepare import (
    length_rules,
    load_tokenizer,
    request_constraints,
    request_max_tokens,
    tokenized_table,
)
from .shards import Shard, ShardBuilder
from .tokenize import TokenizedRequests, tokenize_requests


@dataclass
class ShardedJob:
    """A job read, tokenized and cut into prefix shards (see shards.py), with what the
    output needs from the input (`columns`) and what sizing the engine needs (`longest`)."""

    rows: int  # input rows, finished before or not
    input_format: str
    shards: list[Shard]
    columns: InputColumns
    spilled_bytes: int  # on disk: the spilled runs' files (spill.py's compact format)
    max_model_len: int
    longest: LongestRequest | None
    spill_dir: Path
    runnable_requests: int = 0  # requests with token ids (the rest are error rows)
    new_tokens: int = 0  # the sum of their max_tokens
    replay: ReplayLengths | None = None  # the sim engine's replayed lengths (lengths.py)
    spilled_rows: int = 0  # rows in the spilled runs' files
    early_rows: int = 0  # rows handed on as EarlyRows while reading: in no shard

    @property
    def pending_rows(self) -> int:
        """Rows to run or to report as errors in this run (not finished before)."""
        return sum(s.rows for s in self.shards) + self.early_rows

    def remove_spill(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)


@dataclass(frozen=True)
class EarlyRows:
    """A run's worth of tokenized requests (REQUEST_SCHEMA, input order) handed on while the
    rest of the job is still being read, to run as a shard of its own."""

    table: pa.Table
    input_format: str
    max_model_len: int
    new_tokens: int  # the job's max_tokens read so far (these rows' and earlier ones')

    @property
    def rows(self) -> int:  # as Shard's
        return self.table.num_rows

    def load(self) -> pa.Table:
        return self.table


def read_into_shards(config: JobConfig, *, engine_kind: str, finished_rows: np.ndarray,
                     spill_dir: Path,
                     engine_max_model_len: int | None = None,
                     stop: Callable[[], bool] = lambda: False,
                     clock: StageClock | None = None,
                     hand_on: Callable[[EarlyRows], bool] | None = None,
                     planning: AbstractContextManager | None = None) -> ShardedJob:
    """Read the input batch by batch, tokenize each batch, and cut the job into prefix shards
    in `config.engine.memory_budget`. Rows in `finished_rows` (sorted row numbers: finished in an
    earlier run) are read for their pass-through columns only. Replayed output lengths
    (`config.engine.replay_lengths`, the sim engine's) are joined to the rows as they are
    read (lengths.py). `stop()` ends the read early
    (a signal): the job then has no shards. `clock` gets the read, tokenize, shard seconds.
    `hand_on` is offered each full run before it is spilled; the rows of a run it takes
    (True) join no shard (ShardedJob.early_rows counts them). `planning` is held while a
    run is sorted (ShardBuilder.planning)."""
    clock = clock or StageClock()
    tokenizer, max_model_len = load_tokenizer(config, engine_kind, engine_max_model_len)
    replay = replay_lengths(config.engine.replay_lengths, engine_kind)
    budget = config.engine.memory_budget
    shutil.rmtree(spill_dir, ignore_errors=True)
    # Sorting a run or planning a shard takes several times its bytes (token copies, prefix
    # hashes, the tree's arrays): measured peaks of 6-10x, so each gets a sixteenth.
    builder = ShardBuilder(spill_dir, run_bytes=budget // 16, shard_bytes=budget // 16,
                           planning=planning or nullcontext())
    # The columns the output repeats grow with the rows: past a sixty-fourth they go to disk
    # (read back range by range when the output is written), not into the peak.
    columns = InputColumns(spill_dir, memory_bytes=budget // 64)
    sizes = _RequestSizes()
    stream = open_request_stream(config.input, config.columns, config.input_format)
    if hand_on is not None:
        builder.hand_on = lambda table: hand_on(
            EarlyRows(table, stream.input_format, max_model_len, sizes.new_tokens))
    for batch in clock.timed("read", stream):
        check_endpoints(config, batch.requests["endpoint"], stream.input_format)
        table = resolve_adapters(batch.requests, config, batch.input_format)
        table = table if replay is None else replay.fill(table)
        skip = _finished(table["row"].to_numpy(), finished_rows)
        with clock("tokenize"):
            tokens = tokenize_requests(table, tokenizer, max_model_len=max_model_len, skip=skip,
                                       **length_rules(config))
            sizes.add(config, table, tokens, max_model_len)
        with clock("shard"):
            builder.add(tokenized_table(table, tokens, skip))
            columns.append(pa.table({**{n: batch.passthrough[n]
                                        for n in batch.passthrough.column_names},
                                     ENDPOINT: table["endpoint"],
                                     # the output's adapter column, in a job that has any
                                     **({ADAPTER: table[ADAPTER].cast(pa.string())}
                                        if config.adapters else {}),
                                     **({INPUT_COUNT: input_counts(table)} if config.embeds
                                        and stream.input_format == InputFormat.OPENAI
                                        else {})}))
        if stop():
            return ShardedJob(columns.rows, stream.input_format, [], columns, 0, max_model_len,
                              None, spill_dir, replay=replay,
                              early_rows=builder.handed_rows)
    with clock("shard"):
        shards = builder.finish()
    return ShardedJob(columns.rows, stream.input_format, shards, columns, builder.spilled_bytes,
                      max_model_len, sizes.longest, spill_dir, sizes.runnable_requests,
                      sizes.new_tokens, replay, builder.spilled_rows, builder.handed_rows)


_EMBEDDINGS = {ENDPOINT_EMBEDDING, ENDPOINT_EMBEDDING_BASE64}


def check_endpoints(config: JobConfig, endpoints: pa.ChunkedArray | pa.Array,
                    input_format: str | None) -> None:
    """An OpenAI batch file's lines must be of the job's task: /v1/embeddings lines in an
    embedding job, chat and completion lines in a generation job. A file that mixes them is
    refused as a whole (InputError), naming the fix: its two kinds run as two jobs."""
    if input_format != InputFormat.OPENAI:
        return
    found = set(pc.unique(endpoints).to_pylist()) - {None}
    mixed = "; it also holds chat or completion lines: split the file by url and run each " \
        "part as a job of its own" if found - _EMBEDDINGS and found & _EMBEDDINGS else ""
    if found & _EMBEDDINGS and not config.embeds:
        raise InputError(f"{config.input} holds OpenAI /v1/embeddings lines: run them with "
                         f"--task embed (task = \"embed\" in a job file){mixed}")
    if config.embeds and found - _EMBEDDINGS:
        raise InputError(f"{config.input} holds OpenAI chat or completion lines, which an "
                         "embedding job (--task embed) does not run" + (
                             mixed or ": run it without --task embed"))


@dataclass
class _RequestSizes:
    """What sizing the engine needs to know of the whole job, gathered batch by batch."""

    longest: LongestRequest | None = None
    runnable_requests: int = 0
    new_tokens: int = 0

    def add(self, config: JobConfig, table: pa.Table, tokens: TokenizedRequests,
            max_model_len: int) -> None:
        constraints = request_constraints(table, tokens.positions, config)
        max_tokens = request_max_tokens(table, tokens, constraints, config, max_model_len)
        ids, at = table["id"], tokens.positions
        longest = longest_request(tokens.lengths(), max_tokens,
                                  lambda i: ids[int(at[i])].as_py())
        if self.longest is None or (longest is not None and longest.tokens > self.longest.tokens):
            self.longest = longest
        self.runnable_requests += len(max_tokens)
        self.new_tokens += int(max_tokens.sum())


def _finished(rows: np.ndarray, finished_rows: np.ndarray) -> np.ndarray:
    """Which of `rows` are in `finished_rows` (sorted)."""
    if not len(finished_rows):
        return np.zeros(len(rows), dtype=bool)
    at = np.minimum(np.searchsorted(finished_rows, rows), len(finished_rows) - 1)
    return finished_rows[at] == rows
