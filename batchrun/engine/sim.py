"""`--engine sim`: vLLM's real v1 scheduler and KV-cache manager, with a model that computes
nothing.

Everything that decides what runs when is vLLM's own code, the version batchrun runs
(sim_setup.py builds it as vLLM's engine core does): admission under max_num_seqs and the
KV cache, chunked prefill within max_num_batched_tokens, prefix caching and its block pool
and eviction, preemption. Only the model runner is replaced: after each `schedule()`, every
request whose prompt is now fully computed gets one fabricated token, and
`update_from_output()` books it as vLLM books a real one. So steps, cached and computed
prompt tokens and finish reasons are vLLM's; the seconds are not measured but modelled
(sim_cost.py), and every such figure is labelled simulated.

Output lengths: a request ends at its `target_tokens` (GenerationRequest) with an
end-of-sequence token, finish_reason "stop"; without a target, at max_tokens ("length").
The tokens are fixed per request (one id derived from the request id, never the EOS id; a
distinct id per request keeps vLLM from finding one request's output blocks in another's
cache, which real, different completions would not allow), so a run is deterministic.

Results carry text "": no model ran, so there is no text to give, and an empty string (not
null, which marks an error row) keeps the output's schema and its counts as a real run's.
Constraints and logprobs are ignored: a constrained request is scheduled as free text (the
real engine also waits for its grammar to compile, which the sim does not model).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EngineOptions
from .base import EngineInfo, EngineStats, GenerationRequest, GenerationResult, StepOutput
from .lora import LoraSettings
from .sim_cost import CostProfile, SimCounts, SimulatedRun
from .sim_profiles import device_key, profile_for
from .sim_setup import SimScheduler, another_scheduler, build_scheduler
from .vllm_engine import request_kv_tokens


@dataclass
class _Live:
    """What the sim tracks of a request vLLM holds."""

    prompt_tokens: int
    target: int  # tokens until EOS; 0: none (ends by max_tokens)
    token: int  # the one id it generates until its EOS
    cached: int = 0
    produced: int = 0
    started: bool = False


class SimEngine:
    """vLLM's scheduler behind batchrun's Engine interface (see the module notes)."""

    def __init__(self, model_dir: Path, options: EngineOptions, *, enforce_eager: bool = True,
                 profile: CostProfile | None = None, record_steps: bool = False,
                 scheduler: SimScheduler | None = None,
                 lora: LoraSettings | None = None) -> None:
        """`profile`: the cost profile to price steps with (default: `profile_for` the
        model, `options.sim_device` and dtype); `record_steps`: keep each step's counts
        (`step_counts`), as `batchrun calibrate` pairs them with the real engine's times;
        `scheduler`: one built already (`twin`), else built here; `lora`: the job's
        adapters: the scheduler keys cached blocks by adapter and holds max_loras at once,
        as vLLM's does (LoRARequests with no weights behind them: nothing loads them)."""
        import vllm
        from vllm.sampling_params import SamplingParams
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request, RequestStatus

        self._Request, self._SamplingParams = Request, SamplingParams
        self._ModelRunnerOutput, self._aborted = ModelRunnerOutput, RequestStatus.FINISHED_ABORTED
        sim = scheduler or build_scheduler(model_dir, options, enforce_eager=enforce_eager,
                                           lora=lora)
        self._setup = (model_dir, options, enforce_eager, sim, lora)
        self._lora = lora
        self._scheduler, self._hasher = sim.scheduler, sim.block_hasher
        self._eos, self.vocab_size = sim.eos_token_id, sim.vocab_size
        config = sim.vllm_config
        self._max_model_len = config.model_config.max_model_len
        dtype = str(config.model_config.dtype).removeprefix("torch.")
        self.profile = profile or profile_for(
            model_dir, options.sim_device, dtype, eager=enforce_eager,
            tensor_parallel_size=options.tensor_parallel_size)
        sched = config.scheduler_config
        settings = {
            "engine": "sim",
            "simulates": f"vLLM {vllm.__version__} v1 scheduler and KV-cache manager; no "
                         "model runs",
            "vllm_version": vllm.__version__,
            "dtype": dtype,
            "block_size": sim.block_size,
            "num_blocks": sim.num_blocks,
            "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,
            "max_model_len": self._max_model_len,
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "enable_chunked_prefill": sched.enable_chunked_prefill,
            "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching),
            "enforce_eager": enforce_eager,
            "sim_device": device_key(options.sim_device),
        }
        self.info = EngineInfo(
            name=f"sim (a simulation of vLLM {vllm.__version__}'s scheduler, no model)",
            model=str(model_dir), block_size=sim.block_size,
            kv_capacity_tokens=request_kv_tokens(sim.num_blocks, sim.block_size),
            max_model_len=self._max_model_len, settings=settings)
        self._live: dict[str, _Live] = {}
        self._params: dict[int, Any] = {}  # max_tokens -> vLLM's SamplingParams
        self._rejected: list[GenerationResult] = []
        self._steps = self._prefill_tokens = self._decode_requests = self._kv_read = 0
        self.step_counts: list[SimCounts] | None = [] if record_steps else None
        # As vLLM's engine core does once started: the objects alive now (vLLM, torch, the
        # job's own) leave the garbage collector's scans, which otherwise take a large share
        # of a simulation's time (millions of short-lived request objects trigger them).
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()

    # --- Engine interface -------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        prompt = request.prompt_token_ids
        prompt = prompt.tolist() if isinstance(prompt, np.ndarray) else list(prompt)
        problem = self._check(prompt)
        if problem is not None:
            self._rejected.append(GenerationResult(
                request.request_id, None, None, len(prompt), 0, 0,
                error=f"rejected by the engine: {problem}"))
            return
        rid = request.request_id
        params = self._params.get(request.max_tokens)
        if params is None:  # one per max_tokens: vLLM reads a request's, never changes it
            params = self._params[request.max_tokens] = self._SamplingParams(
                max_tokens=request.max_tokens, stop_token_ids=[self._eos])
        target = max(1, request.target_tokens) if request.target_tokens is not None else 0
        self._live[rid] = _Live(len(prompt), target, self._token_for(rid))
        lora = None if self._lora is None else self._lora.request(request.adapter)
        self._scheduler.add_request(self._Request(rid, prompt, params, None, lora_request=lora,
                                                  block_hasher=self._hasher))

    def step(self) -> StepOutput:
        out = StepOutput(finished=self._rejected)
        self._rejected = []
        scheduler = self._scheduler
        if not scheduler.has_requests():
            return out
        scheduled = scheduler.schedule()
        self._steps += 1
        requests, live = scheduler.requests, self._live
        ids: list[str] = []
        sampled: list[list[int]] = []
        prefill = decodes = kv_read = 0
        for rid, n in scheduled.num_scheduled_tokens.items():
            r = requests[rid]
            after = r.num_computed_tokens  # schedule() has advanced it by n already
            kv_read += after
            if n == 1 and after > r.num_prompt_tokens:
                decodes += 1
            else:
                prefill += n
            ids.append(rid)
            if after >= r.num_tokens:  # its prompt (and output so far) is computed: a token
                s = live[rid]
                sampled.append([self._eos if s.target and r.num_output_tokens + 1 >= s.target
                                else s.token])
            else:
                sampled.append([])
        self._prefill_tokens += prefill
        self._decode_requests += decodes
        self._kv_read += kv_read
        if self.step_counts is not None:
            self.step_counts.append(SimCounts(1, prefill, decodes, kv_read))
        result = self._ModelRunnerOutput(
            req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
            sampled_token_ids=sampled)
        out.prompt_tokens = prefill
        out.preempted = len(scheduled.preempted_req_ids or ())
        for outputs in scheduler.update_from_output(scheduled, result).values():
            for o in outputs.outputs:
                self._book(o, out)
        out.kv_usage = float(scheduler.kv_cache_manager.usage)
        return out

    def num_unfinished(self) -> int:
        return self._scheduler.get_num_unfinished_requests() + len(self._rejected)

    def abort(self, request_ids: list[str]) -> None:
        self._scheduler.finish_requests(request_ids, self._aborted)
        for rid in request_ids:
            self._live.pop(rid, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as VllmEngine.reset_prefix_cache (vLLM refuses while
        requests hold blocks: False then)."""
        return bool(self._scheduler.reset_prefix_cache())

    def stats(self, *, new_job: bool = False) -> EngineStats:
        """The simulated counts so far (`EngineStats.since` takes one job's share)."""
        return EngineStats(simulated=SimulatedRun(self.counts(), self.profile))

    def close(self) -> None:
        live = list(self._live)
        if live:
            self.abort(live)

    def twin(self) -> SimEngine:
        """Another engine with these settings and profile, and a KV cache of its own (a
        simulated replica)."""
        model_dir, options, enforce_eager, sim, lora = self._setup
        return SimEngine(model_dir, options, enforce_eager=enforce_eager, profile=self.profile,
                         scheduler=another_scheduler(sim), lora=lora)

    # --- Simulated figures ------------------------------------------------------------------

    def counts(self) -> SimCounts:
        return SimCounts(self._steps, self._prefill_tokens, self._decode_requests,
                         self._kv_read)

    def figures(self) -> dict[str, Any]:
        """Counts so far, the seconds the cost profile gives them, and the profile."""
        return SimulatedRun(self.counts(), self.profile).to_dict()

    # --- Inside -----------------------------------------------------------------------------

    def _book(self, o: Any, out: StepOutput) -> None:
        """One request's output of a step, as VllmEngine.step books vLLM's RequestOutput."""
        s = self._live.get(o.request_id)
        if s is None:  # aborted
            return
        out.batch_size += 1
        if o.prefill_stats is not None:
            s.cached = o.prefill_stats.num_cached_tokens
        s.produced += len(o.new_token_ids)
        out.completion_tokens += len(o.new_token_ids)
        if not s.started:
            s.started = True
            out.prefilled.append(o.request_id)
        if o.finish_reason is None:
            return
        del self._live[o.request_id]
        out.finished.append(GenerationResult(o.request_id, "", str(o.finish_reason),
                                             s.prompt_tokens, s.produced, s.cached))

    def _check(self, prompt: list[int]) -> str | None:
        """vLLM's own checks of a prompt (its input processor's), worded as vLLM words them."""
        if not prompt:
            return "The decoder prompt cannot be empty"
        if len(prompt) >= self._max_model_len:
            return (f"The decoder prompt (length {len(prompt)}) plus the number of requested "
                    f"output tokens (at least 1) is longer than the maximum model length of "
                    f"{self._max_model_len}.")
        if max(prompt) >= self.vocab_size:
            return f"Token id {max(prompt)} is out of vocabulary"
        return None

    def _token_for(self, request_id: str) -> int:
        """The id a request generates until its end: fixed per request, never the EOS id."""
        token = zlib.crc32(request_id.encode()) % self.vocab_size
        return token if token != self._eos else (token + 1) % self.vocab_size
