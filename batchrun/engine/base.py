"""What a job needs from an engine: add requests, step, collect finished results.

The executor, not the engine, decides which requests are in flight and in what order, so the
interface is vLLM's request-level one (LLMEngine.add_request / step), not `generate(all)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..structured import Constraint


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    # A list, or a numpy view into the job's token buffer (no Python int per token until
    # an engine needs one: vLLM's prompt takes a list, the fake engine an array).
    prompt_token_ids: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = None  # structured output; None: free text
    logprobs: int | None = None  # None: none; k: each token's logprob and its k likeliest rivals
    # Tokens the request is to end after (the sim engine: EOS there, a replayed or given
    # length); None: run to max_tokens. Engines with a model ignore it.
    target_tokens: int | None = None
    # The LoRA adapter (a name the job declares, engine/lora.py) the request runs on; None:
    # the base model. A prefix cached under one adapter is not another's (vLLM keys its
    # prefix cache by adapter).
    adapter: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability, and the `k` likeliest tokens at
    its position as (text, logprob) pairs, likeliest first. A constrained row's
    log-probabilities are those of the constrained distribution (vLLM applies the grammar's
    mask before it computes them); a token the constraint forbade has LOGPROB_FLOOR."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per completion token, if asked
    # An embedding job's vector (float32, the model's dimension); text is None then.
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class EngineInfo:
    """Facts the planner and the summary need about a started engine."""

    name: str
    model: str
    block_size: int
    kv_capacity_tokens: int  # KV tokens requests can hold (vLLM keeps one block back)
    max_model_len: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    finished: list[GenerationResult] = field(default_factory=list)
    # Requests whose prompt was fully computed in this step (they produced a first token):
    # from now on their prompt's full blocks are in the prefix cache.
    prefilled: list[str] = field(default_factory=list)
    batch_size: int = 0  # requests the step advanced (the running batch)
    # For the run's trace (the report): prompt tokens computed in the step (cache hits not
    # counted; an engine that sees only finished prefills counts a prompt at that step),
    # tokens generated, the share of the KV cache in use after it (None: the engine cannot
    # tell) and requests preempted in it.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kv_usage: float | None = None
    preempted: int = 0


@dataclass(frozen=True)
class EngineStats:
    """What an engine has counted, for a job's summary; `since(before)` is one job's share on
    an engine that several jobs share (tests, benchmarks, the Python API).

    structured_backends: constrained requests per structured-output backend (vLLM's "auto"
        picks one per request). attention: the counters of batchrun's attention backend,
        merged over the engine's processes (attention/stats.py); None for an engine without
        one. attention_choice: the backend the engine was started with
        (selection.AttentionChoice), which the summary reports beside what ran.
        simulated: the sim engine's counts and cost profile (sim_cost.SimulatedRun); None
        for an engine that runs a model."""

    structured_backends: dict[str, int] = field(default_factory=dict)
    attention: dict[str, Any] | None = None
    attention_choice: Any = None
    simulated: Any = None

    def since(self, before: EngineStats) -> EngineStats:
        backends = {name: n - before.structured_backends.get(name, 0)
                    for name, n in self.structured_backends.items()}
        attention = self.attention
        if attention is not None and before.attention is not None:
            from .attention.stats import diff_attention_stats

            attention = diff_attention_stats(attention, before.attention)
        simulated = self.simulated
        if simulated is not None and before.simulated is not None:
            simulated = simulated.since(before.simulated)
        return EngineStats({k: v for k, v in backends.items() if v}, attention,
                           self.attention_choice, simulated)

    def attention_summary(self) -> dict[str, Any] | None:
        """The summary's `attention` section; None for an engine without batchrun's
        attention backend."""
        if self.attention is None:
            return None
        from .attention.selection import attention_summary

        return attention_summary(self.attention_choice, self.attention)


class Engine(Protocol):
    info: EngineInfo

    def add(self, request: GenerationRequest) -> None: ...

    def step(self) -> StepOutput:
        """Run one scheduling step; report the requests that finished or prefilled in it."""
        ...

    def num_unfinished(self) -> int: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def stats(self, *, new_job: bool = False) -> EngineStats:
        """What the engine has counted so far. new_job: a job starts now, so counts this
        process keeps restart from zero (the ones of other processes are subtracted by
        `EngineStats.since`; their peaks stay the engine's)."""
        ...

    def close(self) -> None: ...
