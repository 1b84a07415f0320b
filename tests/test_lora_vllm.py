"""Real LoRA adapters on real vLLM: batchrun's output for rows on two adapters and the base
model equals what vLLM's own LLM.generate gives with the same LoRARequests. Both run as
subprocesses (a real engine each; never a second engine in the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import write_jsonl
from tests.lora_adapters import write_random_adapter

pytestmark = pytest.mark.slow  # two engines of its own (minutes on 2 cores)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random rank-8 q_proj/v_proj adapters for the default model."""
    from batchrun.model import default_model_dir

    folder = tmp_path_factory.mktemp("adapters")
    return {name: write_random_adapter(folder / name, default_model_dir(), seed=seed)
            for seed, name in enumerate(("support", "legal"), start=1)}


def _python(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_each_row_gets_what_llm_generate_gives_on_its_adapter(
        tmp_path: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from batchrun.model import default_model_dir

    # A prompt the model continues (a bare instruction is answered with an end of text).
    prompt = AutoTokenizer.from_pretrained(default_model_dir()).encode(
        "The capital of France is Paris. The capital of Germany is")
    rows = [{"id": name or "base", "prompt_token_ids": prompt, "max_tokens": 8,
             **({"adapter": name} if name else {})} for name in (None, "support", "legal")]
    write_jsonl(tmp_path / "in.jsonl", rows)
    flags = [f"{name}={folder}" for name, folder in adapters.items()]
    reference = _python(REPO / "tests" / "lora_reference.py", tmp_path / "in.jsonl",
                        tmp_path / "reference.json", *flags)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = _python("-m", "batchrun", "run", tmp_path / "in.jsonl", "-o",
                  tmp_path / "out.parquet", "--kv-cache-memory", "256MiB", "--enforce-eager",
                  *[arg for flag in flags for arg in ("--adapter", flag)])
    assert run.returncode == 0, run.stderr[-3000:]
    expected = json.loads((tmp_path / "reference.json").read_text())
    got = {r["id"]: r["text"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    assert got == expected
    assert len(set(got.values())) == 3  # three models, three continuations
