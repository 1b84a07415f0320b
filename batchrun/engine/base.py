"""What the runner needs from an engine: add requests, step, collect finished results.

The runner, not the engine, decides which requests are in flight and in what order, so the
interface is vLLM's request-level one (LLMEngine.add_request / step), not `generate(all)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..structured import Constraint


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = None  # structured output; None: free text
    logprobs: int | None = None  # None: none; k: each token's logprob and its k likeliest rivals


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


@dataclass(frozen=True)
class EngineInfo:
    """Facts the planner and the summary need about a started engine."""

    name: str
    model: str
    block_size: int
    kv_capacity_tokens: int
    max_model_len: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    finished: list[GenerationResult] = field(default_factory=list)
    # Requests whose prompt was fully computed in this step (they produced a first token):
    # from now on their prompt's full blocks are in the prefix cache.
    prefilled: list[str] = field(default_factory=list)
    batch_size: int = 0  # requests the step advanced (the running batch)


class EngineDiedError(RuntimeError):
    """The engine can no longer run requests (process died, out of memory). Not row-specific."""


class Engine(Protocol):
    info: EngineInfo

    def add(self, request: GenerationRequest) -> None: ...

    def step(self) -> StepOutput:
        """Run one scheduling step; report the requests that finished or prefilled in it."""
        ...

    def num_unfinished(self) -> int: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def close(self) -> None: ...
