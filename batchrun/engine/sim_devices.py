"""The devices a sim run can be priced for (`--sim-device`, config.SimDevice): this machine's
CPU, or a GPU described by its published peak figures.

A GPU the sim prices is a GPU no one measured here, so its cost profile is an assumption,
labelled so: the model's shape from config.json (weights to stream, FLOPs per token, KV bytes
per token) over the card's published peak compute and memory bandwidth, at stated
efficiencies. A profile measured on that GPU (`batchrun calibrate` run there, its cache file
copied over) takes its place (sim_profiles.py).

The scheduler of a GPU-priced sim takes the defaults vLLM would take on that card where the
job sets none, so that its steps are the card's: bfloat16, 16-token blocks, vLLM 0.32's
offline batch limits for the card's memory (EngineArgs.get_batch_defaults), and a KV cache
of the card's memory at gpu_memory_utilization less the weights and an activation reserve.
Tensor parallelism is taken as a perfect split of weights, compute and bandwidth (no
all-reduce cost): an assumption too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import EngineOptions, SimDevice, check_sim_device
from ..errors import ConfigError
from .sim_cost import CostProfile


@dataclass(frozen=True)
class GpuFigures:
    """A GPU's published figures, and vLLM's offline defaults on it."""

    name: str  # a SimDevice
    label: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s (no sparsity)
    bandwidth: float  # memory bytes/s
    memory: int  # bytes
    max_num_seqs: int  # vLLM 0.32, the LLM class, on this card
    max_num_batched_tokens: int

    @property
    def figures(self) -> str:
        return (f"{self.label}: {self.peak_flops / 1e12:,.0f} TFLOPS bf16 dense, "
                f"{self.bandwidth / 1e12:.2f} TB/s, {self.memory / 1e9:.0f} GB")


GPUS = {g.name: g for g in (
    GpuFigures(SimDevice.H100, "NVIDIA H100 SXM", 989e12, 3.35e12, 80 * 10**9, 1024, 16384),
    GpuFigures(SimDevice.H200, "NVIDIA H200 SXM", 989e12, 4.8e12, 141 * 10**9, 1024, 16384),
    # vLLM keeps the smaller batch defaults on A100s (arg_utils: they measured slower).
    GpuFigures(SimDevice.A100, "NVIDIA A100 80GB SXM", 312e12, 2.039e12, 80 * 10**9, 256,
               8192),
    GpuFigures(SimDevice.L40S, "NVIDIA L40S", 362e12, 0.864e12, 48 * 10**9, 256, 8192),
)}

# Assumed efficiencies (no GPU has measured them for batchrun): the share of peak compute a
# prefill reaches (large matrix products), the share a decode's token reaches (its matrix
# products have one row per request), the share of peak bandwidth reached streaming weights
# and KV, and the host's time per step (scheduling, inputs, sampling).
PREFILL_MFU = 0.45
DECODE_MFU = 0.3
BANDWIDTH_EFFICIENCY = 0.7
STEP_OVERHEAD_S = 0.003
# Memory a GPU engine keeps for activations, CUDA graphs and the sampler besides weights
# and KV (vLLM measures it at start; an assumption here).
ACTIVATION_RESERVE_BYTES = 3 * 2**30
GPU_DTYPE = "bfloat16"
GPU_BLOCK_SIZE = 16


def gpu_figures(device: str | None) -> GpuFigures | None:
    """The published figures of a GPU SimDevice; None for the CPU and for None (this
    machine). An unknown name is a ConfigError naming the known ones."""
    check_sim_device(device)
    return None if device is None or device == SimDevice.CPU else GPUS[device]


def gpu_named(cuda_name: str) -> GpuFigures | None:
    """The known GPU a CUDA device name is (``NVIDIA H100 80GB HBM3`` -> h100), or None."""
    lowered = cuda_name.lower().replace(" ", "")
    return next((g for name, g in GPUS.items() if name in lowered), None)


@dataclass(frozen=True)
class ModelShape:
    """What a decoder's cost depends on, from config.json."""

    weight_params: int  # every parameter held in memory
    active_params: int  # parameters one token's forward pass multiplies (embedding lookup not)
    kv_values_per_token: int  # keys + values, every layer

    @classmethod
    def of(cls, model_dir: Path) -> ModelShape:
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg.get("num_attention_heads", 1))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        vocab = int(cfg.get("vocab_size", 32_000))
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o; k, v
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        mlp_width = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) \
            if experts else int(cfg["intermediate_size"])
        expert = 3 * hidden * mlp_width  # gate, up, down
        held_mlp = expert * max(1, experts)
        used_mlp = expert * (int(cfg.get("num_experts_per_tok") or 1) if experts else 1)
        embedding = vocab * hidden
        head = 0 if cfg.get("tie_word_embeddings") else vocab * hidden
        return cls(weight_params=layers * (attention + held_mlp) + embedding + head,
                   active_params=layers * (attention + used_mlp) + vocab * hidden,
                   kv_values_per_token=2 * layers * kv_heads * head_dim)


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "float") else 2


def gpu_profile(model_dir: Path, gpu: GpuFigures, dtype: str, *,
                tensor_parallel_size: int = 1) -> CostProfile:
    """The assumed cost profile of `model_dir` on `gpu` (see the module notes):
    prefill_token_s = 2 * active params / (peak * PREFILL_MFU); decode_request_s the same at
    DECODE_MFU; step_s = weight bytes / (bandwidth * BANDWIDTH_EFFICIENCY) + host overhead;
    kv_token_read_s = KV bytes a token / (bandwidth * BANDWIDTH_EFFICIENCY). float32 runs at
    half the bf16 peak (TF32 tensor cores)."""
    shape = ModelShape.of(model_dir)
    width = dtype_bytes(dtype)
    tp = max(1, tensor_parallel_size)
    peak = gpu.peak_flops * tp / (2 if width == 4 else 1)
    bandwidth = gpu.bandwidth * tp * BANDWIDTH_EFFICIENCY
    flops = 2 * shape.active_params
    split = f" x{tp} (tensor parallel, split perfectly)" if tp > 1 else ""
    return CostProfile(
        step_s=shape.weight_params * width / bandwidth + STEP_OVERHEAD_S,
        prefill_token_s=flops / (peak * PREFILL_MFU),
        decode_request_s=flops / (peak * DECODE_MFU),
        kv_token_read_s=shape.kv_values_per_token * width / bandwidth,
        source=(f"assumption: published figures of the {gpu.figures}{split}; "
                f"{PREFILL_MFU:.0%} of peak FLOPs for prefill, {DECODE_MFU:.0%} for decode, "
                f"{BANDWIDTH_EFFICIENCY:.0%} of bandwidth for weights and KV, "
                f"{STEP_OVERHEAD_S * 1e3:g} ms host time a step; {model_dir.name}'s shape "
                f"from config.json ({shape.weight_params / 1e9:.2f}B parameters, "
                f"{shape.kv_values_per_token * width:,} KV bytes a token, {dtype}); not "
                "measured: run `batchrun calibrate` on that GPU"),
        assumed=True)


def sim_options(options: EngineOptions) -> EngineOptions:
    """The options a sim run's scheduler takes: for a GPU sim device, that card's vLLM
    defaults where the job sets none (dtype, block size, max_num_seqs); else as given."""
    gpu = gpu_figures(options.sim_device)
    if gpu is None:
        return options
    return replace(options, dtype=options.dtype or GPU_DTYPE,
                   block_size=options.block_size or GPU_BLOCK_SIZE,
                   max_num_seqs=options.max_num_seqs or gpu.max_num_seqs)


def sim_scheduler_args(options: EngineOptions) -> dict[str, Any]:
    """EngineArgs a GPU-priced sim adds to the ones `sim_options` gives: the card's tokens a
    step (vLLM derives it from the device it runs on, which is this machine)."""
    gpu = gpu_figures(options.sim_device)
    return {} if gpu is None else {"max_num_batched_tokens": gpu.max_num_batched_tokens}


def gpu_kv_cache_memory(model_dir: Path, options: EngineOptions) -> tuple[int, str] | None:
    """The KV cache a GPU-priced sim gets when the job sets none, and why; None for the CPU
    (sized from the job, engine/sizing.py)."""
    gpu = gpu_figures(options.sim_device)
    if gpu is None:
        return None
    tp = max(1, options.tensor_parallel_size)
    weights = ModelShape.of(model_dir).weight_params * dtype_bytes(
        options.dtype or GPU_DTYPE) // tp
    usable = int(gpu.memory * options.gpu_memory_utilization)
    kv = usable - weights - ACTIVATION_RESERVE_BYTES
    if kv <= 0:
        raise ConfigError(f"{model_dir.name} does not fit one {gpu.label} ({weights / 1e9:.1f}"
                          f" GB of weights a GPU): raise --tensor-parallel-size or set "
                          "--kv-cache-memory")
    return kv, (f"simulated {gpu.label}: {options.gpu_memory_utilization:.0%} of "
                f"{gpu.memory / 1e9:.0f} GB less {weights / 1e9:.1f} GB of weights and "
                f"{ACTIVATION_RESERVE_BYTES / 2**30:.0f} GiB for activations (an assumption)")
