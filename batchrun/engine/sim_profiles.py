"""The cost profile a sim run uses (`profile_for`): one measured by `batchrun calibrate` for
the same model, device, dtype, execution mode and vLLM version, cached under
`<cache>/sim-profiles/`; else an assumed one, whose `source` says so and how to measure it.

A profile is keyed by what changes a step's cost: the model's config.json (its content, so a
copied or renamed folder keeps its profile and an edited one loses it), the device (the
CPU's model name and the threads this process may use, or the GPU), the dtype, eager or
compiled, vLLM's version and the tensor-parallel size. Weights are not part of the key: two
models of one shape cost the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import SimDevice
from ..machine import cpu_model_name
from ..model import cache_root, default_model_path
from .sim_cost import DEFAULT_CPU_PROFILE, CostProfile
from .sim_devices import GPUS, gpu_figures, gpu_named, gpu_profile
from .vllm_engine import CPU_DEFAULTS

PROFILE_DIR = "sim-profiles"


@dataclass(frozen=True)
class ProfileKey:
    config_sha: str  # the model: sha256 of its config.json, first 16 hex digits
    device: str  # "cpu: <model name>, N threads", a GPU SimDevice ("h100"), or a CUDA name
    dtype: str
    mode: str  # "eager" or "compiled"
    vllm: str
    tensor_parallel_size: int = 1

    @classmethod
    def of(cls, model_dir: Path, device: str, dtype: str, *, eager: bool,
           tensor_parallel_size: int = 1) -> ProfileKey:
        import vllm

        config = (model_dir / "config.json").read_bytes()
        return cls(hashlib.sha256(config).hexdigest()[:16], device, dtype,
                   "eager" if eager else "compiled", vllm.__version__, tensor_parallel_size)

    def file_name(self) -> str:
        parts = (self.config_sha, self.device, self.dtype, self.mode,
                 f"vllm-{self.vllm}", f"tp{self.tensor_parallel_size}")
        return "--".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("_") for p in parts) \
            + ".json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_identity() -> str:
    """This machine's CPU as a profile knows it: its model name and the threads this process
    may run on (vLLM's CPU workers use them all)."""
    return f"cpu: {cpu_model_name() or 'unknown CPU'}, {len(os.sched_getaffinity(0))} threads"


def this_device() -> str:
    """The device this machine runs vLLM on, as a profile key names it."""
    from .vllm_engine import current_platform

    platform = current_platform()
    if platform.is_cpu():
        return cpu_identity()
    name = str(platform.get_device_name())
    gpu = gpu_named(name)
    return gpu.name if gpu is not None else name


def device_key(sim_device: str | None) -> str:
    """The profile key's device for a sim run's `sim_device` (None: this machine's)."""
    gpu_figures(sim_device)  # an unknown name: ConfigError
    if sim_device is None:
        return this_device()
    return cpu_identity() if sim_device == SimDevice.CPU else sim_device


def profile_dir() -> Path:
    return cache_root() / PROFILE_DIR


def profile_path(key: ProfileKey) -> Path:
    return profile_dir() / key.file_name()


def save_calibration(key: ProfileKey, profile: CostProfile, probe: dict[str, Any],
                     steps: list[list[Any]] | None = None) -> Path:
    """Cache a measured profile under its key, with what the probe saw (`probe`: its summary;
    `steps`: one row per step, [phase, seconds, prefill tokens, decoding requests, KV tokens
    read], to refit or inspect); returns the file."""
    path = profile_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key.to_dict(), "profile": profile.to_dict(),
                               "probe": probe, "steps": steps or []}, indent=1))
    os.replace(tmp, path)
    return path


def cached_calibration(key: ProfileKey) -> dict[str, Any] | None:
    """The cached calibration of exactly this key (profile, key, probe), or None."""
    path = profile_path(key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key.to_dict() or record.get("profile", {}).get("assumed", True):
        return None
    return record


def profile_for(model_dir: Path, sim_device: str | None, dtype: str, *, eager: bool,
                tensor_parallel_size: int = 1) -> CostProfile:
    """The profile a sim run of `model_dir` in `dtype` priced for `sim_device` (None: this
    machine's device) uses: the cached measured one for exactly this key, else an assumed
    one (a GPU's from its published figures, this CPU's DEFAULT_CPU_PROFILE)."""
    device = device_key(sim_device)
    key = ProfileKey.of(model_dir, device, dtype, eager=eager,
                        tensor_parallel_size=tensor_parallel_size)
    record = cached_calibration(key)
    if record is not None:
        return CostProfile.from_dict(record["profile"])
    gpu = GPUS.get(device)
    if gpu is not None:
        return gpu_profile(model_dir, gpu, dtype, tensor_parallel_size=tensor_parallel_size)
    if not device.startswith("cpu:"):  # this machine's GPU, which has no published figures
        gpu = GPUS[SimDevice.H100]
        profile = gpu_profile(model_dir, gpu, dtype, tensor_parallel_size=tensor_parallel_size)
        return CostProfile.from_dict({**profile.to_dict(), "source": (
            f"assumption: this machine's GPU {device!r} has no published figures in batchrun:"
            f" priced as an H100; {profile.source.removeprefix('assumption: ')}")})
    return CostProfile.from_dict({**DEFAULT_CPU_PROFILE.to_dict(), "source": (
        f"{DEFAULT_CPU_PROFILE.source}; run `{calibrate_command(model_dir, dtype, eager)}` "
        "to measure it")})


def calibrate_command(model_dir: Path, dtype: str, eager: bool) -> str:
    """The `batchrun calibrate` line that measures the profile of this model, dtype and mode
    on this machine."""
    words = ["batchrun calibrate"]
    if model_dir.resolve() != default_model_path().resolve():
        words.append(f"--model {model_dir}")
    if dtype != CPU_DEFAULTS["dtype"]:
        words.append(f"--dtype {dtype}")
    if not eager:
        words.append("--compile")
    return " ".join(words)
