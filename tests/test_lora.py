"""Many fine-tunes in one job: rows name LoRA adapters, the job declares them, and every stage
keeps each row on its adapter (reading, planning, dedupe, shards, the engine, the output,
resume). These run on the fake and sim engines; tests/test_lora_vllm.py checks real
adapters against vLLM's own LLM.generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.config import JobConfig
from batchrun.errors import ConfigError
from batchrun.ingest.adapters import resolve_adapters
from batchrun.io.input.readers import read_request_set, read_requests
from batchrun.job_file import load_job_file, with_overrides
from batchrun.plan.adapters import adapter_key, order_requests_by_adapter
from batchrun.plan.prefix_tree import PrefixTree
from tests.helpers import write_jsonl
from tests.reliability.harness import (
    admitted,
    batchrun,
    kill9,
    start_batchrun,
    wait_for_rows,
)

SYSTEM = list(range(100, 164))  # 64 tokens: 16 blocks of the fake engine's 4


def mixed_rows(n: int, adapters: tuple[str | None, ...] = (None, "support", "legal")) -> list:
    """Rows sharing one system prompt, spread over the base model and `adapters`; row i asks
    question i % 10, so each question repeats on each adapter."""
    rows = []
    for i in range(n):
        row = {"id": f"r{i}", "prompt_token_ids": [*SYSTEM, 1000 + i % 10, 7, 8],
               "max_tokens": 6}
        if adapters[i % len(adapters)] is not None:
            row["adapter"] = adapters[i % len(adapters)]
        rows.append(row)
    return rows


ADAPTER_FLAGS = ("--adapter", "support=adapters/support", "--adapter", "legal=adapters/legal")


# --- Reading: which adapter a row names ----------------------------------------------------

def test_rows_name_adapters_in_an_adapter_or_lora_column_or_body_model(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "plain.jsonl", [
        {"prompt": "a", "adapter": "support"}, {"prompt": "b", "lora": "legal"},
        {"prompt": "c"}, {"prompt": "d", "adapter": "support", "lora": "legal"},
        {"prompt": "e", "lora": 5}])
    table = read_requests(tmp_path / "plain.jsonl")
    assert table["adapter"].to_pylist() == ["support", "legal", None, None, None]
    assert table["error"].to_pylist()[3] == ('row 3: "adapter" and "lora" name different '
                                             'adapters ("support" and "legal"); give one')
    assert table["error"].to_pylist()[4] == ('row 4: "lora" must be an adapter name (a '
                                             'string), got 5')
    pq.write_table(pa.table({"prompt": ["a", "b"], "lora": ["legal", None]}),
                   tmp_path / "in.parquet")
    assert read_requests(tmp_path / "in.parquet")["adapter"].to_pylist() == ["legal", None]
    write_jsonl(tmp_path / "batch.jsonl", [
        {"custom_id": "x", "method": "POST", "url": "/v1/completions",
         "body": {"model": "support", "prompt": "hi"}}])
    assert read_requests(tmp_path / "batch.jsonl")["adapter"].to_pylist() == ["support"]


def _config(tmp_path: Path, **adapters: str) -> JobConfig:
    return JobConfig(input=tmp_path / "in.jsonl", output=tmp_path / "out.parquet",
                     adapters=adapters)


def test_an_unknown_adapter_is_an_error_row_naming_the_known_ones(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "a", "adapter": "support"}, {"prompt": "b", "adapter": "default"},
        {"prompt": "c", "adapter": "suport"}, {"prompt": "d"}])
    requests = read_request_set(tmp_path / "in.jsonl")
    table = resolve_adapters(requests.table, _config(tmp_path, support="s", legal="l"),
                             requests.input_format)
    # The base model's name runs the base model; a typo never runs on another model.
    assert table["adapter"].to_pylist() == ["support", None, None, None]
    assert table["error"].to_pylist() == [None, None, (
        'row 2: adapter "suport" is not one of this job\'s models (the base model ("default" '
        'or none), "legal", "support"); declare it under [adapters] in the job file (or '
        '--adapter NAME=FOLDER)'), None]


def test_body_model_is_read_only_in_a_job_that_declares_adapters(tmp_path: Path) -> None:
    line = {"custom_id": "x", "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-4o-mini", "prompt": "hi"}}
    write_jsonl(tmp_path / "in.jsonl", [line])
    requests = read_request_set(tmp_path / "in.jsonl")
    plain = resolve_adapters(requests.table, _config(tmp_path), "openai")
    assert plain["error"].to_pylist() == [None] and plain["adapter"].to_pylist() == [None]
    tuned = resolve_adapters(requests.table, _config(tmp_path, support="s"), "openai")
    assert "adapter \"gpt-4o-mini\" is not one of this job's models" in \
        tuned["error"].to_pylist()[0]
    # An adapter column is always checked: a job without adapters has none to run it on.
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "lora": "support"}])
    requests = read_request_set(tmp_path / "in.jsonl")
    table = resolve_adapters(requests.table, _config(tmp_path), "jsonl")
    assert "this job declares no adapters" in table["error"].to_pylist()[0]


# --- Declaring adapters -------------------------------------------------------------------

def test_adapters_come_from_the_job_file_the_flags_and_the_api(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        'input = "in.jsonl"\noutput = "out.parquet"\n[adapters]\nsupport = "ad/support"\n'
        '[engine]\nmax_loras = 1\n')
    cfg = load_job_file(tmp_path / "job.toml")
    assert cfg.adapters == {"support": str(tmp_path / "ad" / "support")}
    assert cfg.engine.max_loras == 1
    more = with_overrides(cfg, adapters={"legal": "/x/legal"})  # adds to the file's
    assert more.adapters == {"support": str(tmp_path / "ad" / "support"), "legal": "/x/legal"}
    assert "adapters" in more.fingerprint_settings()
    with pytest.raises(ConfigError, match="the base model's name"):
        with_overrides(cfg, adapters={"default": "/x"})
    result = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "o.parquet",
                      "--adapter", "nofolder")
    assert result.returncode == 2 and "write NAME=FOLDER" in result.stderr


# --- Planning: nothing shared across adapters ----------------------------------------------

def test_the_prefix_tree_shares_nothing_across_adapters() -> None:
    prompt = np.array(SYSTEM + [1, 2], dtype=np.int32)
    values = np.concatenate([prompt] * 4)
    offsets = np.arange(5) * len(prompt)
    plain = PrefixTree.build(values, offsets)
    keys = np.array([adapter_key(n) for n in (None, "a", "a", "b")], dtype=np.int32)
    keyed = PrefixTree.build(values, offsets, keys)
    # Four identical prompts share all but their last token; on three models, only the two
    # on adapter "a" share: the block ideal counts each adapter's prefix once.
    assert plain.block_ideal_computed_tokens(4) == len(prompt) + 3 * 2
    assert keyed.block_ideal_computed_tokens(4) == 3 * len(prompt) + 2
    assert sorted(keys[keyed.order].tolist()) == keys[keyed.order].tolist()


def test_with_fewer_slots_than_adapters_each_adapters_requests_run_together() -> None:
    rng = np.random.default_rng(0)
    names = [None, "a", "b", "c"]
    # Half share a prefix on their adapter, half share nothing (each a unit of its own at
    # the root, where decode-first ordering would interleave the adapters).
    prompts = [np.array([*SYSTEM[: 8 * (k % 3 + 1)] * (k % 2), *rng.integers(0, 5000, 6)],
                        np.int32) for k in range(60)]
    values = np.concatenate(prompts)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in prompts])])
    keys = np.array([adapter_key(names[k % 4]) for k in range(60)], dtype=np.int32)
    tree = PrefixTree.build(values, offsets, keys)
    max_tokens = rng.integers(1, 400, 60)  # decode-first would interleave adapters
    order = order_requests_by_adapter(tree, keys, max_tokens, block_size=4).plan().order
    runs = keys[order]
    assert (np.diff(runs) != 0).sum() == 3  # four adapters: three switches, no more


# --- The whole job on the fake engine -------------------------------------------------------

def _run(tmp_path: Path, *extra: str, fake: dict | None = None) -> dict:
    result = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet",
                      "--engine", "fake", "--json", "--overwrite", "--openai-output",
                      tmp_path / "out.jsonl", *ADAPTER_FLAGS, *extra, fake_engine=fake)
    assert result.returncode in (0, 3), result.stderr
    return json.loads(result.stdout)


def test_a_mixed_job_runs_each_row_on_its_adapter_and_says_so(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [*mixed_rows(60), {"id": "typo", "prompt": "x",
                                                          "lora": "suport"}])
    summary = _run(tmp_path)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["adapter"] for r in out[:6]] == [None, "support", "legal"] * 2
    # The same prompt on three models: three answers (the fake engine's text depends on
    # the adapter as a model's does), and never served as another adapter's duplicate.
    assert len({out[0]["text"], out[1]["text"], out[2]["text"]}) == 3
    assert out[30]["duplicate_of"] == "r0" and out[31]["duplicate_of"] == "r1"
    assert "suport" in out[60]["error"]
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [line["response"]["body"]["model"] for line in lines[:3]] == [
        "default", "support", "legal"]
    # Computed prompt tokens: the block ideal counted per adapter (the system prompt once
    # per model), what `plan` shows per adapter.
    plan = summary["plan"]
    assert set(plan["adapters"]) == {"", "support", "legal"}
    ideal = sum(a["block_ideal_computed_tokens"] for a in plan["adapters"].values())
    assert ideal == plan["block_ideal_computed_tokens"] == summary["tokens"]["computed_prompt"]
    assert ideal == 3 * (len(SYSTEM) + 10 * 3)


def test_shards_cut_by_adapter_keep_the_block_ideal_per_adapter(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", mixed_rows(600))
    whole = _run(tmp_path)
    # Every row in the global plan's shards (early start plans its first rows alone)
    sharded = _run(tmp_path, "--memory-budget", "300KiB", "--no-early-start")
    assert sharded["shards"]["count"] > 1
    assert sharded["tokens"]["computed_prompt"] == whole["tokens"]["computed_prompt"]
    assert sharded["plan"]["adapters"] == whole["plan"]["adapters"]
    assert sharded["plan"]["block_ideal_computed_tokens"] == \
        whole["plan"]["block_ideal_computed_tokens"]


def test_a_killed_mixed_job_resumes_with_every_row_on_its_adapter(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", mixed_rows(300))
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "in.jsonl").write_text((tmp_path / "in.jsonl").read_text())
    _run(clean)
    out = tmp_path / "out.parquet"
    proc = start_batchrun("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake",
                          *ADAPTER_FLAGS, fake_engine={"step_delay_s": 0.02,
                                                       "max_num_seqs": 8})
    wait_for_rows(out, proc, 40)
    assert kill9(proc)
    result = batchrun("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--resume",
                      *ADAPTER_FLAGS)
    assert result.returncode == 0, result.stderr
    resumed = pq.read_table(out).select(["id", "adapter", "text"]).to_pylist()
    assert resumed == pq.read_table(clean / "out.parquet").select(
        ["id", "adapter", "text"]).to_pylist()


def test_plan_sizes_max_loras_from_the_job_with_its_reason(tmp_path: Path,
                                                           config_only_model: Path) -> None:
    for name in ("support", "legal"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "adapter_config.json").write_text('{"r": 8}')
    write_jsonl(tmp_path / "in.jsonl", mixed_rows(30))
    flags = ("--adapter", f"support={tmp_path}/adapters/support", "--adapter",
             f"legal={tmp_path}/adapters/legal")
    args = ("plan", tmp_path / "in.jsonl", "--json", "--engine", "sim", "--model",
            config_only_model, "--kv-cache-memory", "64MiB", *flags)
    lora = json.loads(batchrun(*args).stdout)["engine_sizing"]["lora"]
    assert lora == {"adapters": 2, "max_loras": 2, "max_lora_rank": 8,
                    "max_loras_reason": "one slot for each of the job's 2 adapters"}
    one = json.loads(batchrun(*args, "--max-loras", "1").stdout)["engine_sizing"]["lora"]
    assert one["max_loras"] == 1 and one["max_loras_reason"] == "set by the user (max_loras)"


def test_the_sim_engine_caches_a_prefix_per_adapter(tmp_path: Path,
                                                   config_only_model: Path) -> None:
    for name in ("support", "legal"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "adapter_config.json").write_text('{"r": 8}')
    system = list(range(100, 356))  # 256 tokens: 8 blocks of 32
    rows = [{"id": f"r{i}", "prompt_token_ids": [*system, 1000 + i, 7], "max_tokens": 4,
             **({"adapter": ["support", "legal"][i % 3 - 1]} if i % 3 else {})}
            for i in range(30)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet", "--json",
                      "--engine", "sim", "--model", config_only_model, "--kv-cache-memory",
                      "64MiB", "--adapter", f"support={tmp_path}/adapters/support",
                      "--adapter", f"legal={tmp_path}/adapters/legal", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # vLLM's scheduler, given each row's LoRARequest, computes the shared 256 tokens once
    # per model (simulated): three models, three times.
    assert summary["tokens"]["computed_prompt"] == 3 * 256 + 30 * 2
    assert summary["plan"]["block_ideal_computed_tokens"] == 3 * 256 + 30 * 2


def test_validate_reports_an_unknown_adapter(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "adapter": "support"},
                                        {"prompt": "hi", "adapter": "suport"}])
    result = batchrun("validate", tmp_path / "in.jsonl", "--engine", "fake", "--json",
                      "--adapter", "support=adapters/support")
    report = json.loads(result.stdout)
    assert report["errors"] == 1 and "suport" in report["first_errors"][0]


def test_with_max_loras_1_the_engine_gets_one_adapters_rows_after_another(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    names = (None, "support", "legal")
    # Nothing shared and output lengths that vary: decode-first ordering alone would mix
    # the adapters.
    rows = [{"id": f"r{i}", "prompt_token_ids": rng.integers(0, 5000, 12).tolist(),
             "max_tokens": int(rng.integers(1, 300)),
             **({"adapter": names[i % 3]} if names[i % 3] else {})} for i in range(90)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    log = tmp_path / "admitted.txt"
    _run(tmp_path, "--max-loras", "1", fake={"admitted_log": str(log)})
    adapter_of = {r["id"]: r.get("adapter") for r in rows}
    ran = [adapter_of[rid] for rid in admitted(log)]
    assert sorted(map(str, ran)) == sorted(str(r.get("adapter")) for r in rows)
    assert sum(a != b for a, b in zip(ran[:-1], ran[1:], strict=True)) == 2  # 3 models
