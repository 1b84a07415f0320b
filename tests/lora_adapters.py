"""Random LoRA adapters for a model folder, made by the tests themselves: a PEFT folder
(adapter_config.json and adapter_model.safetensors) of rank-`rank` weights on every layer's
q_proj and v_proj, which vLLM loads as any trained adapter. The weights are large enough
that greedy decoding under each adapter differs from the base model's and from another's."""

from __future__ import annotations

import json
from pathlib import Path


def write_random_adapter(folder: Path, model_dir: Path, *, seed: int, rank: int = 8,
                         scale: float = 0.15) -> Path:
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outputs = {"q_proj": config["num_attention_heads"] * head_dim,
               "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in outputs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(
                rank, hidden, generator=generator) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(
                out, rank, generator=generator) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(outputs),
        "base_model_name_or_path": str(model_dir), "fan_in_fan_out": False,
        "modules_to_save": None, "use_rslora": False}))
    return folder
