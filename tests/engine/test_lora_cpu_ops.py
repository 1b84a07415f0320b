"""batchrun's CPU LoRA ops (engine/lora_cpu_ops.py) against vLLM's own torch ops: the same
outputs for every op, with tokens of several adapter slots mixed in one step and -1 (no
adapter, which vLLM's indexing makes the last slot)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

from batchrun.engine import lora_cpu_ops  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 4, 8, 64, 96


def _case(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, SLOTS, (tokens,), generator=g)
    return g, indices


@pytest.mark.parametrize("tokens", [1, 7, 50])
def test_bgmv_ops_equal_vllms_for_mixed_slots(tokens: int) -> None:
    g, indices = _case(tokens, tokens)
    x = torch.randn(tokens, HIDDEN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    h = torch.randn(tokens, RANK, generator=g)
    for ours, theirs in ((torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)),):
        lora_cpu_ops.bgmv_shrink(x, a, ours, indices, 0.5)
        torch_ops.bgmv_shrink(x, a, theirs, indices, 0.5)
        torch.testing.assert_close(ours, theirs)
    for add in (True, False):
        base = torch.randn(tokens, OUT, generator=g)
        ours, theirs = base.clone(), base.clone()
        lora_cpu_ops.bgmv_expand(h, b, ours, indices, add)
        torch_ops.bgmv_expand(h, b, theirs, indices, add)
        torch.testing.assert_close(ours, theirs)
        wide = torch.randn(tokens, 3 * OUT, generator=g)
        ours, theirs = wide.clone(), wide.clone()
        lora_cpu_ops.bgmv_expand_slice(h, b, ours, indices, OUT, OUT, add)
        torch_ops.bgmv_expand_slice(h, b, theirs, indices, OUT, OUT, add)
        torch.testing.assert_close(ours, theirs)


def test_sgmv_ops_equal_vllms_for_sequences_on_several_slots() -> None:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 1, 9, 3])
    slots = torch.tensor([2, -1, 0, 2])
    tokens = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    x = torch.randn(tokens, HIDDEN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    meta = (starts, lengths, slots, len(lengths), int(lengths.max()), tokens)
    ours, theirs = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    lora_cpu_ops.sgmv_shrink(x, a, ours, *meta, 2.0)
    torch_ops.sgmv_shrink(x, a, theirs, *meta, 2.0)
    torch.testing.assert_close(ours, theirs)
    base = torch.randn(tokens, 2 * OUT, generator=g)
    ours, theirs = base.clone(), base.clone()
    lora_cpu_ops.sgmv_expand(theirs[:, :RANK].clone(), b, ours, *meta, True)
    torch_ops.sgmv_expand(theirs[:, :RANK].clone(), b, theirs, *meta, True)
    torch.testing.assert_close(ours, theirs)
    ours, theirs = base.clone(), base.clone()
    h = torch.randn(tokens, RANK, generator=g)
    lora_cpu_ops.sgmv_expand_slice(h, b, ours, *meta, OUT, OUT, False)
    torch_ops.sgmv_expand_slice(h, b, theirs, *meta, OUT, OUT, False)
    torch.testing.assert_close(ours, theirs)


def test_install_puts_them_in_vllms_cpu_wrapper_once() -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    before = punica_cpu.bgmv_shrink
    try:
        lora_cpu_ops.install()
        lora_cpu_ops.install()
        assert punica_cpu.bgmv_shrink is lora_cpu_ops.bgmv_shrink
        assert punica_cpu.sgmv_expand_slice is lora_cpu_ops.sgmv_expand_slice
    finally:
        for name in lora_cpu_ops._OPS:
            setattr(punica_cpu, name, getattr(torch_ops, name))
    assert before is torch_ops.bgmv_shrink
