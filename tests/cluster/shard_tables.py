"""Prefix shards built in a few lines, for the cluster tests: REQUEST_SCHEMA tables of
pre-tokenized rows, held in memory."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from batchrun.io.schema import REQUEST_SCHEMA


def request_table(prompts: list[list[int] | None], first_row: int = 0,
                  errors: dict[int, str] | None = None) -> pa.Table:
    """Rows first_row.. with these token ids; a None prompt is an error row."""
    errors = errors or {}
    n = len(prompts)
    rows = list(range(first_row, first_row + n))
    columns = {name: pa.nulls(n, field.type) for name, field in
               zip(REQUEST_SCHEMA.names, REQUEST_SCHEMA, strict=True)}
    columns["row"] = pa.array(rows, pa.int64())
    columns["id"] = pa.array([f"r{r}" for r in rows], pa.string())
    columns["prompt_token_ids"] = pa.array(prompts, pa.list_(pa.int32()))
    columns["error"] = pa.array([errors.get(r, "no prompt" if p is None else None)
                                 for r, p in zip(rows, prompts, strict=True)], pa.string())
    return pa.table(columns, schema=REQUEST_SCHEMA)


@dataclass(eq=False)
class TableShard:
    """A shard held in memory (batchrun/ingest/shards.py spills big ones to disk)."""

    data: pa.Table
    loads: int = 0

    @property
    def rows(self) -> int:
        return self.data.num_rows

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def load(self) -> pa.Table:
        self.loads += 1
        return self.data


def family(head: list[int], rows: int, own: int = 5, first_row: int = 0) -> list[list[int]]:
    """`rows` prompts that share `head`, each with `own` tokens of its own after it."""
    return [head + [1000 + first_row + i] * own for i in range(rows)]
