"""The sim engine's cost profiles (engine/sim_cost.py, sim_profiles.py, sim_devices.py): the
fit `batchrun calibrate` makes, the cache it keeps them in, the assumed profiles of GPUs,
and `--sim-device`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import batchrun
from batchrun.config import EngineOptions
from batchrun.engine.base import GenerationRequest
from batchrun.engine.sim_cost import (
    DEFAULT_CPU_PROFILE,
    CostProfile,
    SimCounts,
    count_matrix,
    fit_profile,
    nnls,
)
from batchrun.engine.sim_devices import GPUS, ModelShape, gpu_profile
from batchrun.engine.sim_profiles import (
    ProfileKey,
    profile_for,
    profile_path,
    save_calibration,
    this_device,
)
from batchrun.errors import EXIT_OK, EXIT_USAGE, ConfigError
from tests.helpers import write_jsonl
from tests.reliability.harness import cli
from tests.sim_engines import (
    BLOCK_BYTES,
    LLAMA_8B_SHAPE,
    SMOLLM2_SHAPE,
    drain,
    tokens,
    write_config_only_model,
)

REPO = Path(__file__).resolve().parents[2]
KNOWN = CostProfile(step_s=0.02, prefill_token_s=0.003, decode_request_s=0.004,
                    kv_token_read_s=2e-6, source="known", assumed=False)


def model_folder(root: Path, name: str, shape: dict) -> Path:
    return write_config_only_model(root / name, shape)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty batchrun cache folder for this test."""
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def probe_like_steps() -> list[SimCounts]:
    """Per-step counts shaped like the probe's: prefills of several lengths, decodes at
    several batch sizes, long contexts decoding, prefills behind a cached prefix."""
    steps = [SimCounts(1, n, 0, n) for n in (32, 128, 384, 768)]
    for batch, context in ((1, 16), (8, 16), (32, 16), (16, 1000)):
        steps += [SimCounts(1, 0, batch, batch * (context + k)) for k in range(8)]
    steps += [SimCounts(1, 192, 0, 576), SimCounts(1, 192, 0, 576)]
    return steps


def test_the_fit_recovers_known_prices_from_per_step_counts():
    steps = probe_like_steps()
    seconds = [KNOWN.seconds(c) for c in steps]
    fit = fit_profile(steps, seconds, source="measured: test")
    got = fit.profile
    assert not got.assumed and got.source == "measured: test"
    assert (got.step_s, got.prefill_token_s, got.decode_request_s, got.kv_token_read_s) == \
        pytest.approx((KNOWN.step_s, KNOWN.prefill_token_s, KNOWN.decode_request_s,
                       KNOWN.kv_token_read_s), rel=1e-6)
    assert (fit.steps_used, fit.steps_left_out) == (len(steps), 0)


def test_steps_stalled_by_other_processes_are_left_out_of_the_fit():
    steps = probe_like_steps()
    rng = np.random.default_rng(1)
    seconds = [KNOWN.seconds(c) * rng.uniform(0.97, 1.03) for c in steps]
    stalled = [3, 9, 20, 30]  # four steps that waited for the cores, 5x as long
    for i in stalled:
        seconds[i] *= 5
    fit = fit_profile(steps, seconds, source="measured: test")
    assert fit.steps_left_out == len(stalled)
    for name in ("step_s", "prefill_token_s", "decode_request_s", "kv_token_read_s"):
        assert getattr(fit.profile, name) == pytest.approx(getattr(KNOWN, name), rel=0.15)


def test_nnls_gives_the_best_non_negative_prices():
    # Times that fall as prefill grows: least squares would price a prefilled token below
    # zero; the non-negative fit prices it 0 and fits the rest.
    steps = [SimCounts(1, n, 0, 0) for n in (0, 100, 200, 300)]
    a, b = count_matrix(steps), np.array([1.0, 0.9, 0.8, 0.7])
    unconstrained = np.linalg.lstsq(a, b, rcond=None)[0]
    assert unconstrained[1] < 0
    x = nnls(a, b)
    assert np.all(x >= 0) and x[1] == 0 and x[0] == pytest.approx(b.mean())


def test_the_sim_engine_records_each_steps_counts_when_asked(tmp_path):
    from batchrun.engine.sim import SimEngine

    model = model_folder(tmp_path, "smol", SMOLLM2_SHAPE)
    engine = SimEngine(model, EngineOptions(kv_cache_memory=100 * BLOCK_BYTES,
                                            max_model_len=512), record_steps=True)
    for i in range(4):
        engine.add(GenerationRequest(f"r{i}", tokens(i, 40 + 30 * i), max_tokens=3 + i))
    drain(engine)
    assert engine.step_counts and SimCounts.total(engine.step_counts) == engine.counts()
    assert all(c.steps == 1 for c in engine.step_counts)
    assert engine.step_counts[0].prefill_tokens == 4 * 40 + 30 * 6
    # The last step is r3's last decode: it reads its prompt and the five tokens before the
    # sixth, which is sampled and never computed.
    assert engine.step_counts[-1] == SimCounts(1, 0, 1, 130 + 5)


def test_a_cached_measured_profile_is_used_only_for_its_own_key(tmp_path, cache):
    smol = model_folder(tmp_path, "smol", SMOLLM2_SHAPE)
    key = ProfileKey.of(smol, this_device(), "float32", eager=True)
    measured = replace(KNOWN, source="measured: on this machine")
    path = save_calibration(key, measured, {"held_out_error": 0.1})
    assert path == profile_path(key) and path.parent == cache / "sim-profiles"
    assert profile_for(smol, None, "float32", eager=True) == measured
    # The same model in another folder (same config.json) is the same model.
    copy = model_folder(tmp_path, "copy", SMOLLM2_SHAPE)
    assert profile_for(copy, "cpu", "float32", eager=True) == measured
    # Another dtype, execution mode or model: the assumed CPU profile, saying how to
    # measure the missing one.
    for other, dtype, eager, hint in (
            (smol, "bfloat16", True, "--dtype bfloat16"), (smol, "float32", False, "--compile"),
            (model_folder(tmp_path, "wider", {**SMOLLM2_SHAPE, "hidden_size": 640}),
             "float32", True, "--model")):
        got = profile_for(other, None, dtype, eager=eager)
        assert got.assumed and got.source.startswith(DEFAULT_CPU_PROFILE.source)
        assert "run `batchrun calibrate" in got.source and hint in got.source
    # A file whose key does not match its name is not trusted.
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "key": {**record["key"], "dtype": "float16"}}))
    assert profile_for(smol, None, "float32", eager=True).assumed


def test_the_shape_read_from_config_json_counts_llama_8b_parameters(tmp_path):
    shape = ModelShape.of(model_folder(tmp_path, "llama", LLAMA_8B_SHAPE))
    assert shape.weight_params == pytest.approx(8.03e9, rel=0.005)  # Llama-3.1-8B's count
    assert shape.kv_values_per_token == 2 * 32 * 8 * 128


def test_gpu_profiles_are_assumptions_that_scale_with_the_model_and_the_card(tmp_path,
                                                                            cache):
    smol = model_folder(tmp_path, "smol", SMOLLM2_SHAPE)
    llama = model_folder(tmp_path, "llama", LLAMA_8B_SHAPE)
    small = profile_for(smol, "h100", "bfloat16", eager=False)
    large = profile_for(llama, "h100", "bfloat16", eager=False)
    for p in (small, large):
        assert p.assumed and p.source.startswith("assumption: published figures of the "
                                                 "NVIDIA H100")
    # 60x the parameters: 60x the FLOPs a token; weights to stream each step grow as much,
    # over a fixed host overhead; 5.7x the KV bytes a token.
    params = ModelShape.of(llama).active_params / ModelShape.of(smol).active_params
    assert 55 < params < 65
    assert large.prefill_token_s / small.prefill_token_s == pytest.approx(params)
    assert large.decode_request_s / small.decode_request_s == pytest.approx(params)
    assert 3 < large.step_s / small.step_s < params
    assert large.kv_token_read_s / small.kv_token_read_s == pytest.approx(131072 / 23040)
    # An H200 has the H100's compute and more bandwidth; an A100 less of both.
    h200 = gpu_profile(llama, GPUS["h200"], "bfloat16")
    a100 = gpu_profile(llama, GPUS["a100"], "bfloat16")
    assert h200.prefill_token_s == large.prefill_token_s and h200.step_s < large.step_s
    assert a100.prefill_token_s > large.prefill_token_s and a100.step_s > large.step_s
    # A 1,000-row batch of 1,000-token prompts answered in 100 tokens, 256 at a time:
    # minutes on one H100, not hours or milliseconds.
    run = SimCounts(steps=4 * 100 + 60, prefill_tokens=1_000_000, decode_requests=100_000,
                    kv_tokens_read=100_000 * 1_050)
    assert 20 < large.seconds(run) < 300


def test_a_sim_priced_for_an_h100_takes_the_cards_vllm_defaults(tmp_path, cache):
    llama = model_folder(tmp_path, "llama", LLAMA_8B_SHAPE)
    rows = write_jsonl(tmp_path / "in.jsonl", [
        {"id": f"r{i}", "prompt_token_ids": tokens(i, 200), "max_tokens": 8}
        for i in range(6)])
    summary = batchrun.run(rows, output=tmp_path / "out.parquet", model=str(llama),
                           engine="sim", sim_device="h100", progress=False)
    engine, sizing = summary["engine"], summary["engine_sizing"]
    assert (engine["sim_device"], engine["dtype"], engine["block_size"]) == \
        ("h100", "bfloat16", 16)
    assert (engine["max_num_seqs"], engine["max_num_batched_tokens"]) == (1024, 16384)
    # 90% of 80 GB, less 16.1 GB of bf16 weights and 3 GiB for activations.
    assert sizing["kv_cache_memory"] == int(0.9 * 80e9) - 2 * ModelShape.of(
        llama).weight_params - 3 * 2**30
    assert sizing["kv_cache_reason"].startswith("simulated NVIDIA H100 SXM")
    assert summary["simulated"]["profile"]["source"].startswith("assumption: published")


def test_an_unknown_sim_device_is_one_line_naming_the_known_ones(tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt_token_ids": [5, 6, 7]}])
    for command in (("plan", rows, "--estimate"), ("run", rows, "-o", tmp_path / "o.parquet",
                                                   "--engine", "sim")):
        result = cli(*command, "--sim-device", "tpu-v9")
        assert result.exit_code == EXIT_USAGE
        assert result.stderr.strip().splitlines() == [
            "batchrun: error: unknown sim device 'tpu-v9'; known devices are cpu, h100, "
            "h200, a100, l40s"]
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\n[engine]\nsim_device = "b200"\n')
    with pytest.raises(ConfigError, match="unknown sim device 'b200'"):
        batchrun.run(job)
    with pytest.raises(ConfigError, match="unknown sim device 'x'"):
        batchrun.run(rows, output=tmp_path / "o.parquet", engine="sim", sim_device="x")


@pytest.mark.slow
def test_calibrate_measures_caches_and_prices_later_estimates(tmp_path):
    """`batchrun calibrate` as a user runs it (a process of its own: it starts and closes
    a real vLLM engine), then `batchrun plan --estimate` pricing with what it measured."""
    from batchrun.model import default_model_dir

    model = str(default_model_dir())  # converted in the usual cache, not again in tmp
    env = {**os.environ, "PYTHONPATH": str(REPO), "BATCHRUN_CACHE_DIR": str(tmp_path / "c"),
           "VLLM_LOGGING_LEVEL": "WARNING"}

    def batchrun_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "batchrun", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)

    done = batchrun_cli("calibrate", "--model", model, "--json", "--rounds", "1")
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    result = json.loads(done.stdout)
    folder = tmp_path / "c" / "sim-profiles"
    files = list(folder.glob("*.json"))
    assert [str(f) for f in files] == [result["path"]] and not result["cached"]
    assert "probing the real engine" in done.stderr and (folder / "calibrate.log").exists()
    profile = json.loads(files[0].read_text())["profile"]
    assert profile == result["profile"] and profile["assumed"] is False
    assert profile["source"].startswith("measured: `batchrun calibrate` on cpu: ")
    prices = [profile[k] for k in ("step_s", "prefill_token_s", "decode_request_s",
                                   "kv_token_read_s")]
    assert all(p >= 0 for p in prices) and profile["prefill_token_s"] > 0
    phases = result["probe"]["phases"]
    assert [p["phase"] for p in phases if p["held_out"]] and all(
        p["measured_s"] > 0 and p["predicted_s"] > 0 for p in phases)
    # Shown from the cache the second time; measured again only with --force.
    again = batchrun_cli("calibrate", "--model", model, "--json")
    assert again.returncode == EXIT_OK and json.loads(again.stdout)["cached"] is True
    # A later estimate on this machine prices with the measured profile.
    job = write_jsonl(tmp_path / "in.jsonl", [
        {"id": f"r{i}", "prompt_token_ids": tokens(i, 100), "max_tokens": 4} for i in range(8)])
    planned = batchrun_cli("plan", str(job), "--model", model, "--estimate", "--json",
                           "--kv-cache-memory", "64MiB")
    assert planned.returncode == EXIT_OK, planned.stderr[-2000:]
    assert json.loads(planned.stdout)["estimate"]["profile"] == profile
