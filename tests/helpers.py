"""Small builders the tests share: job files and inputs written in a few lines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from batchrun.config import JobConfig, SamplingDefaults

SYSTEM = ("You are a careful assistant for a library catalogue. Answer briefly and say "
          "'unknown' when the catalogue does not say. ") * 3


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def shared_prefix_rows(n: int, *, groups: int = 3, max_tokens: int | None = None) -> list[dict]:
    """Chat rows in `groups` families that share a long system prompt + document."""
    rows = []
    for i in range(n):
        g = i % groups
        doc = f"Document {g}: " + " ".join(f"shelf {g}-{k} holds volume {k * 7 + g}."
                                          for k in range(12))
        row = {"id": f"r{i}", "messages": [
            {"role": "system", "content": SYSTEM + doc},
            {"role": "user", "content": f"Question {i}: which volume is on shelf {g}-{i % 12}?"}]}
        if max_tokens:
            row["max_tokens"] = max_tokens
        rows.append(row)
    return rows


def job(tmp_path: Path, input_path: Path, **sampling) -> JobConfig:
    return JobConfig(input=input_path, output=tmp_path / "out" / "results.parquet",
                     sampling=SamplingDefaults(**sampling))


def read_output(cfg: JobConfig) -> list[dict]:
    return pq.read_table(cfg.output).to_pylist()
