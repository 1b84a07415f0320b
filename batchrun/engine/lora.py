"""LoRA adapters on the engine: what vLLM is started with (enable_lora, max_lora_rank,
max_loras) and the LoRARequest each row's adapter becomes.

max_loras is how many adapters one engine step may mix (vLLM keeps that many slots of
adapter weights beside the model; a request whose adapter has no slot waits until the
running ones finish). Sized from the job: one slot for each adapter it declares, up to
MAX_LORAS_FROM_JOB; the user's engine.max_loras wins. Where the engine holds fewer adapters
than the job has, the planner runs each adapter's rows together (plan/adapters.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError
from ..io.storage import Location

# Slots sized from a job at most: each slot holds an adapter's weights for the whole
# max_lora_rank, on every layer it touches.
MAX_LORAS_FROM_JOB = 8
# The ranks vLLM accepts for max_lora_rank (vllm/config/lora.py); an adapter's own rank
# is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoraSettings:
    """The job's adapters as the engine takes them. `folders`: name -> local folder, sorted
    by name; each name's LoRARequest id is its place there, from 1 (vLLM's 0 is none)."""

    folders: tuple[tuple[str, str], ...]
    max_loras: int
    max_loras_reason: str
    max_lora_rank: int

    @property
    def ids(self) -> dict[str, int]:
        return {name: i + 1 for i, (name, _) in enumerate(self.folders)}

    def engine_args(self) -> dict[str, Any]:
        """vLLM EngineArgs keywords: LoRA on, sized for these adapters."""
        return {"enable_lora": True, "max_loras": self.max_loras,
                "max_lora_rank": self.max_lora_rank,
                # Adapters kept in host memory: all of them, so switching costs no reload.
                "max_cpu_loras": max(self.max_loras, len(self.folders))}

    def request(self, name: str | None) -> Any:
        """vLLM's LoRARequest for adapter `name`; None for the base model. Raises KeyError
        for a name the job does not declare (the readers turned those into error rows)."""
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self.ids[name], dict(self.folders)[name])

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": len(self.folders), "max_loras": self.max_loras,
                "max_loras_reason": self.max_loras_reason,
                "max_lora_rank": self.max_lora_rank}


def job_max_loras(config: JobConfig) -> tuple[int, str]:
    """Adapter slots the engine gets, and why."""
    n = len(config.adapters)
    if config.engine.max_loras is not None:
        return config.engine.max_loras, "set by the user (max_loras)"
    if n <= MAX_LORAS_FROM_JOB:
        return max(n, 1), f"one slot for each of the job's {n} adapters"
    return MAX_LORAS_FROM_JOB, (f"the job's {n} adapters, capped at {MAX_LORAS_FROM_JOB} "
                                "slots (each adapter's rows run together)")


def lora_settings(config: JobConfig) -> LoraSettings | None:
    """The job's LoRA settings; None for a job without adapters. Raises ConfigError for an
    adapter folder that is not a local PEFT folder."""
    if not config.adapters:
        return None
    folders = tuple((name, str(_local_folder(name, path)))
                    for name, path in sorted(config.adapters.items()))
    rank = max(_rank(name, Path(folder)) for name, folder in folders)
    max_loras, reason = job_max_loras(config)
    fitting = min((r for r in VLLM_LORA_RANKS if r >= rank), default=None)
    if fitting is None:
        raise ConfigError(f"an adapter has rank {rank}, over the {VLLM_LORA_RANKS[-1]} vLLM "
                          "supports; use adapters of a lower rank")
    return LoraSettings(folders, max_loras, reason, fitting)


def _local_folder(name: str, path: str) -> Path:
    where = Location.coerce(path)
    if where.is_remote:
        raise ConfigError(f"adapter {name!r}: {path} is not a local folder; copy the adapter "
                          "folder to this machine and name that folder")
    folder = where.local_path
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {name!r}: {folder} has no adapter_config.json; name a "
                          "PEFT LoRA folder (adapter_config.json and adapter_model.safetensors)")
    return folder.resolve()


def _rank(name: str, folder: Path) -> int:
    try:
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"adapter {name!r}: cannot read its rank `r` from "
                          f"{folder / 'adapter_config.json'} ({e})") from None
    if type(rank) is not int or rank < 1:
        raise ConfigError(f"adapter {name!r}: rank `r` must be a positive integer, not "
                          f"{rank!r}")
    return rank
