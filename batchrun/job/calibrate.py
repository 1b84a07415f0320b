"""`batchrun calibrate`: measure the sim engine's cost profile (engine/sim_cost.py) on the
real engine, for one model, this machine's device, a dtype and eager or compiled execution.

The probe runs phases of fabricated token prompts on vLLM, timing every step, chosen so that
the four prices can be told apart: prompts of different lengths prefilled one a step (the
price of a prefilled token), decodes at several batch sizes (of a step and of a decoding
request), decodes of long shared-prefix contexts and prefills behind a cached prefix (of a
KV token read). Then the same requests run on the sim engine with each request's real
completion length as its target: the sim's steps are then the real run's steps (the probe
checks that), and each measured step pairs with that step's counts. The prices are fitted to
those pairs by non-negative least squares (sim_cost.fit_profile, which leaves out steps
stalled by other processes), on the fitting phases only; the held-out phases
(a shared-prefix chat batch, mixed lengths) are mixed work like a real job's, and their
predicted against measured seconds is the fit's reported quality.

The real engine runs in this process and is closed at the end: run it as its own process
(the CLI), never inside another vLLM user.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from ..config import AttentionMode, EngineOptions
from ..engine.base import Engine, GenerationRequest
from ..engine.sim_cost import DEFAULT_CPU_PROFILE, CostProfile, SimCounts, fit_profile
from ..engine.sim_profiles import (
    ProfileKey,
    cached_calibration,
    profile_dir,
    profile_path,
    save_calibration,
    this_device,
)
from ..errors import EngineDiedError, one_line
from .terminal import output_to_log

# The probe runs this many times and each step's median time is fitted: on a shared machine
# one round's steps vary several-fold (another process takes the cores for a while).
PROBE_ROUNDS = 3

# The probe's engine: a KV cache that holds any of its phases with room to spare (the 16
# long contexts share all but a block or two each), a context for its longest prompt.
PROBE_KV_CACHE_MEMORY = 512 << 20
PROBE_MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class ProbeRequest:
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Phase:
    """Waves of requests: each wave is added at once and run until it has finished."""

    name: str
    waves: tuple[tuple[ProbeRequest, ...], ...]
    held_out: bool = False  # not fitted: the fit's quality is measured on it
    warm_up: bool = False  # neither fitted nor reported (first-call costs)


class _Tokens:
    """Fabricated prompt tokens, different for every call (no accidental prefix hits), clear
    of the ids a tokenizer reserves at both ends of the vocabulary."""

    def __init__(self, vocab_size: int, seed: int = 25) -> None:
        self._rng = np.random.default_rng(seed)
        self._low, self._high = 1000, max(1001, vocab_size - 1000)

    def __call__(self, n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in self._rng.integers(self._low, self._high, n))


def probe_phases(vocab_size: int) -> list[Phase]:
    """The probe's phases (see the module notes)."""
    tokens = _Tokens(vocab_size)

    def requests(tag: str, prompts: list[tuple[int, ...]], max_tokens: list[int]) \
            -> tuple[ProbeRequest, ...]:
        return tuple(ProbeRequest(f"{tag}-{i}", p, m)
                     for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)))

    def one_each(tag: str, prompts: list[tuple[int, ...]], max_tokens: int) \
            -> tuple[tuple[ProbeRequest, ...], ...]:
        return tuple(requests(f"{tag}{i}", [p], [max_tokens]) for i, p in enumerate(prompts))

    prefix, short_prefix = tokens(992), tokens(384)  # 31 and 12 whole 32-token blocks
    systems = [tokens(256) for _ in range(2)]
    lengths = [48, 512, 96, 320, 160, 32, 224, 128]
    return [
        Phase("warm-up", (requests("w", [tokens(96), tokens(32)], [4, 4]),), warm_up=True),
        Phase("prefill, one prompt a step",
              one_each("p", [tokens(n) for n in (32, 384, 128, 768)], 1)),
        *(Phase(f"decode, batch {b}", (requests(f"d{b}-", [tokens(16) for _ in range(b)],
                                                [8] * b),))
          for b in (1, 8, 32)),
        Phase("decode, 16 contexts of 1,008 sharing 992 tokens", (
            requests("lp", [prefix + tokens(16)], [1]),
            requests("l", [prefix + tokens(16) for _ in range(16)], [8] * 16))),
        Phase("prefill behind a cached 384-token prefix", (
            requests("sp", [short_prefix + tokens(32)], [1]),
            *one_each("s", [short_prefix + tokens(192) for _ in range(2)], 1))),
        Phase("held out: chat, 2 system prompts x 4 questions", (requests(
            "c", [systems[i % 2] + tokens(32) for i in range(8)],
            [4 + (i * 5) % 13 for i in range(8)]),), held_out=True),
        Phase("held out: mixed lengths", (requests(
            "m", [tokens(n) for n in lengths], [4 + (i * 7) % 17 for i in range(8)]),),
              held_out=True),
    ]


@dataclass
class PhaseRun:
    """One phase as an engine ran it: the time of each step, each request's completion
    length, and (once replayed on the sim) each step's counts."""

    step_seconds: list[float] = field(default_factory=list)
    completions: dict[str, int] = field(default_factory=dict)
    steps_per_wave: list[int] = field(default_factory=list)
    counts: list[SimCounts] = field(default_factory=list)


def run_phase(engine: Engine, phase: Phase, lengths: dict[str, int] | None = None) -> PhaseRun:
    """Each wave added, then stepped until it has finished, each step timed. `lengths`: the
    completion length each request is to have (the sim engine's targets)."""
    run = PhaseRun()
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:  # every phase starts cold, on both engines
        reset()
    for wave in phase.waves:
        for r in wave:
            engine.add(GenerationRequest(r.request_id, list(r.prompt), r.max_tokens,
                                         target_tokens=None if lengths is None
                                         else lengths[r.request_id]))
        steps = 0
        while engine.num_unfinished():
            start = time.perf_counter()
            out = engine.step()
            run.step_seconds.append(time.perf_counter() - start)
            steps += 1
            for result in out.finished:
                if result.error is not None:
                    raise RuntimeError(f"probe request {result.request_id} failed: "
                                       f"{result.error}")
                run.completions[result.request_id] = result.completion_tokens
        run.steps_per_wave.append(steps)
    return run


@dataclass(frozen=True)
class Calibration:
    key: ProfileKey
    profile: CostProfile
    probe: dict[str, Any]
    path: Path | None = None
    cached: bool = False  # shown from the cache, not measured now

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "profile": self.profile.to_dict(),
                "probe": self.probe, "path": str(self.path) if self.path else None,
                "cached": self.cached}

    def lines(self) -> list[str]:
        """`batchrun calibrate`'s report: the profile, each phase predicted against
        measured, the held-out error, and a warning when other work shared the cores."""
        p, probe = self.profile, self.probe
        fitted = probe["fitted_steps"] + probe["left_out_steps"]
        out = [("cached profile (--force measures again): " if self.cached else
                "measured profile: ") + str(self.path), f"  {p.source}",
               f"  step {p.step_s * 1e3:.3f} ms + prefill token {p.prefill_token_s * 1e3:.4f} "
               f"ms + decoding request {p.decode_request_s * 1e3:.4f} ms + KV token read "
               f"{p.kv_token_read_s * 1e6:.4f} us"]
        out += [f"  {r['phase']:<50} {r['steps']:>4} steps  measured {r['measured_s']:7.2f} s"
                f"  predicted {r['predicted_s']:7.2f} s" for r in probe["phases"]]
        out.append(f"  held-out phases: predicted within {probe['held_out_error']:.0%} of "
                   f"measured (probe {probe['probe_s']:.0f} s, engine start "
                   f"{probe['engine_start_s']:.0f} s; {probe['left_out_steps']} of {fitted} "
                   "fitted steps left out as stalled)")
        load = max(probe["load_average"])
        if load > probe["threads"]:
            out.append(f"  note: load average {load:.1f} on {probe['threads']} threads during "
                       "the probe: other work shared the cores and these prices include it; "
                       "measure again (--force) when the machine is quieter")
        return out


def probe_options(dtype: str | None) -> EngineOptions:
    return EngineOptions(dtype=dtype, kv_cache_memory=PROBE_KV_CACHE_MEMORY,
                         max_model_len=PROBE_MAX_MODEL_LEN,
                         attention=AttentionMode.DEFAULT.value)


def probe_eager(eager: bool | None) -> bool:
    """Eager or compiled: as asked, else eager on CPU (small jobs run so there:
    engine/factory.py, use_eager), compiled on GPUs."""
    from ..engine.vllm_engine import on_cpu

    return on_cpu() if eager is None else eager


def cached(model_dir: Path, dtype: str | None, eager: bool | None) -> Calibration | None:
    """The cached calibration of this model, dtype and mode on this machine, or None. The
    dtype is the one the engine resolves (a sim engine's settings say it)."""
    from ..engine.sim import SimEngine

    eager = probe_eager(eager)
    sim = SimEngine(model_dir, probe_options(dtype), enforce_eager=eager,
                    profile=DEFAULT_CPU_PROFILE)
    key = ProfileKey.of(model_dir, this_device(), sim.info.settings["dtype"], eager=eager)
    record = cached_calibration(key)
    if record is None:
        return None
    return Calibration(key, CostProfile.from_dict(record["profile"]), record["probe"],
                       profile_path(key), cached=True)


def calibrate(model: str, *, dtype: str | None = None, eager: bool | None = None,
              force: bool = False, rounds: int = PROBE_ROUNDS,
              log: Callable[[str], None] | None = None) -> Calibration:
    """`batchrun calibrate`: the cached profile of this model (a folder or "default"), dtype
    and mode on this machine, else (or with `force`) a new measurement. What vLLM and the
    libraries under it print goes to `calibrate.log` beside the cached profiles."""
    from ..model import resolve_model

    engine_log = profile_dir() / "calibrate.log"
    with output_to_log(engine_log):
        model_dir = resolve_model(model)
        found = None if force else cached(model_dir, dtype, eager)
        if found is not None:
            return found
        if log is not None:
            log(f"probing the real engine (its own output: {engine_log})")
        return measure(model_dir, dtype=dtype, eager=eager, rounds=rounds, log=log)


def measure(model_dir: Path, *, dtype: str | None = None, eager: bool | None = None,
            rounds: int = PROBE_ROUNDS, log: Callable[[str], None] | None = None) -> Calibration:
    """Run the probe `rounds` times (see the module notes), fit the profile to each step's
    median time, cache it; `log(line)` hears about each phase. `eager`: see `probe_eager`."""
    from ..engine.sim import SimEngine
    from ..engine.vllm_engine import VllmEngine

    eager = probe_eager(eager)
    say = log or (lambda line: None)
    options = probe_options(dtype)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        real = VllmEngine(model_dir, options, enforce_eager=eager)
    except Exception as e:  # no weights in the folder, too little memory, ...
        raise EngineDiedError(f"the vLLM engine failed to start for the probe: "
                              f"{type(e).__name__}: {one_line(e, None)}") from e
    start_s = time.perf_counter() - started
    say(f"engine started in {start_s:.0f} s")
    try:
        sim = SimEngine(model_dir, options, enforce_eager=eager,
                        profile=DEFAULT_CPU_PROFILE, record_steps=True)
        phases = probe_phases(sim.vocab_size)
        rounds_run = []
        for r in range(rounds):
            say(f"round {r + 1} of {rounds}")
            rounds_run.append([_run_both(real, sim, phase, say) for phase in phases])
        runs = [_median_steps(list(runs_of_phase))
                for runs_of_phase in zip(*rounds_run, strict=True)]
        probe_s = time.perf_counter() - started - start_s
    finally:
        real.close()
    key = ProfileKey.of(model_dir, this_device(), sim.info.settings["dtype"], eager=eager)
    source = (f"measured: `batchrun calibrate` on {key.device}, {model_dir.name} {key.dtype} "
              f"{key.mode}, vLLM {key.vllm}, {date.today().isoformat()}")
    fitted = [run for phase, run in zip(phases, runs, strict=True)
              if not (phase.held_out or phase.warm_up)]
    fit = fit_profile([c for run in fitted for c in run.counts],
                      [t for run in fitted for t in run.step_seconds], source=source)
    report = [_phase_report(phase, run, fit.profile)
              for phase, run in zip(phases, runs, strict=True) if not phase.warm_up]
    held = [r for r in report if r["held_out"]]
    error = sum(abs(r["predicted_s"] - r["measured_s"]) for r in held) / \
        max(1e-9, sum(r["measured_s"] for r in held))
    profile = replace(fit.profile, source=f"{source}; held-out phases within {error:.0%}")
    probe = {"model": str(model_dir), "phases": report, "held_out_error": round(error, 4),
             "fitted_steps": fit.steps_used, "left_out_steps": fit.steps_left_out,
             "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
             "threads": len(os.sched_getaffinity(0)), "engine_start_s": round(start_s, 1),
             "probe_s": round(probe_s, 1), "date": date.today().isoformat(),
             "engine": {"kv_cache_memory": options.kv_cache_memory,
                        "max_model_len": options.max_model_len,
                        "block_size": real.info.block_size}}
    steps = [[phase.name, round(t, 5), c.prefill_tokens, c.decode_requests, c.kv_tokens_read]
             for phase, run in zip(phases, runs, strict=True)
             for t, c in zip(run.step_seconds, run.counts, strict=True)]
    path = save_calibration(key, profile, probe, steps)
    return Calibration(key, profile, probe, path)


def _median_steps(runs: list[PhaseRun]) -> PhaseRun:
    """One phase's runs of several rounds as one: each step's median time (the rounds run
    the same steps: the same requests, cold caches, greedy lengths)."""
    first = runs[0]
    if any(r.steps_per_wave != first.steps_per_wave for r in runs):
        return first
    times = np.median(np.array([r.step_seconds for r in runs]), axis=0)
    return replace(first, step_seconds=[float(t) for t in times])


def _run_both(real: Engine, sim: Any, phase: Phase, say: Callable[[str], None]) -> PhaseRun:
    """A phase on the real engine, then replayed on the sim with its completion lengths: the
    real run's step times with the sim's counts of the same steps."""
    run = run_phase(real, phase)
    before = len(sim.step_counts)
    replayed = run_phase(sim, phase, run.completions)
    if replayed.steps_per_wave != run.steps_per_wave or \
            replayed.completions != run.completions:
        raise RuntimeError(
            f"the sim engine's replay of probe phase {phase.name!r} took "
            f"{replayed.steps_per_wave} steps a wave, the real engine {run.steps_per_wave}: "
            "the sim does not follow this vLLM here, so its steps cannot be priced")
    run.counts = sim.step_counts[before:]
    say(f"  {phase.name}: {len(run.step_seconds)} steps, {sum(run.step_seconds):.1f} s")
    return run


def _phase_report(phase: Phase, run: PhaseRun, profile: CostProfile) -> dict[str, Any]:
    total = SimCounts.total(run.counts)
    measured, predicted = sum(run.step_seconds), profile.seconds(total)
    return {"phase": phase.name, "held_out": phase.held_out, **asdict(total),
            "measured_s": round(measured, 3), "predicted_s": round(predicted, 3),
            "error": round((predicted - measured) / measured, 4) if measured else None}
