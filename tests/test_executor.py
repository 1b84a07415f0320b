"""The executor's admission rules, run on vLLM's own scheduler and KV cache (the sim engine,
batchrun/engine/sim.py) with caches of a few dozen 32-token blocks, small enough that a wrong
window shows: vLLM holds back a request it has no blocks for, preempts, or evicts a prefix
that nothing references.

Each test watches what reached the engine and when (`EngineLog`), and what vLLM reports:
the prompt tokens each request found in vLLM's prefix cache (`cached_tokens`), the requests
each step ran. vLLM lets requests it schedules together share each other's blocks within the
step, through a chunked prefill too (`test_vllm_shares_a_prefix_among_requests_sent_together`),
so holding members back until their leader has computed the prefix decides the order requests
reach vLLM, not its cache hits: those tests check the order.

The stop flag's drain and abort is the executor's own plumbing, not vLLM's admission: it runs
on the fake engine (engine/fake.py), whose speed and injected behaviour that test needs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from batchrun.engine.base import Engine, GenerationRequest, StepOutput
from batchrun.engine.fake import FakeEngine
from batchrun.execute import output_lengths
from batchrun.execute.executor import StreamingExecutor
from batchrun.execute.kv_budget import PrefixReservations
from batchrun.execute.stop import StopFlag
from batchrun.plan.blocks import blocks_for
from batchrun.plan.groups import RunGroup
from tests.sim_engines import BLOCK, sim_engine, tokens

PREFIX = tokens(0, 320)  # 10 blocks


class EngineLog:
    """An engine as the executor sees it, with a log of what reached it: `sent[rid]` is the
    number of engine steps run before the request was added (sent together: same number),
    `prefilled[rid]` and `finished[rid]` the step (1-based) whose output reported its prompt
    computed and it finished, `batches` the requests each step ran (vLLM's count),
    `in_flight` those sent and not finished before each step (the executor's window). A
    request sent at k >= prefilled[leader] was held back until the leader's prompt was
    computed; one prefilled later than the step after it was sent waited inside vLLM."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.info = engine, engine.info
        self.steps = 0
        self.sent: dict[str, int] = {}
        self.prefilled: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.batches: list[int] = []
        self.in_flight: list[set[str]] = []
        self._unfinished: set[str] = set()

    def add(self, request: GenerationRequest) -> None:
        self.sent[request.request_id] = self.steps
        self._unfinished.add(request.request_id)
        self.engine.add(request)

    def step(self) -> StepOutput:
        self.in_flight.append(set(self._unfinished))
        out = self.engine.step()
        self.steps += 1
        self.batches.append(out.batch_size)
        for rid in out.prefilled:
            self.prefilled.setdefault(rid, self.steps)
        for result in out.finished:
            self.finished[result.request_id] = self.steps
            self._unfinished.discard(result.request_id)
        return out

    def num_unfinished(self) -> int:
        return self.engine.num_unfinished()

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)

    @property
    def order(self) -> list[str]:
        """Request ids in the order they reached the engine."""
        return list(self.sent)

    def sent_at(self, *request_ids: str) -> list[int]:
        return [self.sent[rid] for rid in request_ids]

    def waited_in_the_engine(self) -> list[str]:
        """Requests vLLM did not start in the step after they were sent (no room)."""
        return [rid for rid, k in self.sent.items() if self.prefilled[rid] > k + 1]


def requests(n: int, prefix: list[int], *, name: str = "q", own: int = 2,
             max_tokens: int = 3) -> list[GenerationRequest]:
    """n requests under `prefix`, each with `own` tokens of its own."""
    return [GenerationRequest(f"{name}{i}", prefix + tokens(1000 + 97 * i + len(prefix), own),
                              max_tokens=max_tokens) for i in range(n)]


def group(reqs: list[GenerationRequest], members: list[int], prefix_len: int,
          prefix_id: int = 1, parent_id: int = -1, shared_above_id: int = -1) -> RunGroup:
    """The members as the planner groups them: `prefix_len` shared tokens (whole blocks), and
    the KV blocks each member adds beyond them (its decode's blocks counted apart)."""
    prompts = np.array([len(reqs[m].prompt_token_ids) for m in members])
    ends = prompts + np.array([reqs[m].max_tokens for m in members])
    return RunGroup(np.array(members), prefix_len, prefix_len // BLOCK,
                    blocks_for(ends, BLOCK) - prefix_len // BLOCK,
                    prefix_id if prefix_len else -1, parent_id,
                    decode_blocks=blocks_for(ends, BLOCK) - blocks_for(prompts, BLOCK),
                    shared_above_id=shared_above_id)


def run(engine: Engine | EngineLog, reqs: list[GenerationRequest], groups: list[RunGroup],
        **kw):
    done: dict[int, object] = {}
    ex = StreamingExecutor(engine, groups, lambda i: reqs[i],
                           lambda batch: done.update(batch), **kw)
    ex.run()
    assert len(done) == len({int(m) for g in groups for m in g.members})
    return done, ex


def cached(done: dict) -> list[int]:
    return [done[i].cached_tokens for i in sorted(done)]


def computed(done: dict) -> int:
    """Prompt tokens vLLM computed (the rest it found in its prefix cache)."""
    return sum(r.prompt_tokens - r.cached_tokens for r in done.values())


def test_vllm_shares_a_prefix_among_requests_sent_together(config_only_model: Path):
    # No executor: six requests under a 4,160-token prefix, added at once. vLLM cuts the
    # first one's prefill at the step's budget of 4,096 tokens; in the next step it
    # schedules the rest of that prompt first, then the others, which find all of it.
    engine = sim_engine(config_only_model, 150, max_model_len=4_416)
    prefix = tokens(0, 4_160)
    for r in requests(6, prefix, own=10):
        engine.add(r)
    results = {}
    while engine.num_unfinished():
        results.update({r.request_id: r.cached_tokens for r in engine.step().finished})
    assert results == {"q0": 0, **{f"q{i}": 4_160 for i in range(1, 6)}}


def test_members_are_sent_once_their_leader_has_computed_the_prefix(config_only_model):
    log = EngineLog(sim_engine(config_only_model, 40))
    reqs = requests(6, PREFIX)
    done, _ = run(log, reqs, [group(reqs, list(range(6)), 320)])
    # The leader went alone; its members once its prompt (the prefix) was computed.
    assert log.sent["q0"] == 0 and log.prefilled["q0"] == 1
    assert log.sent_at(*(f"q{i}" for i in range(1, 6))) == [1] * 5
    # vLLM computed the prefix once, in whole blocks: the members found all ten.
    assert cached(done) == [0] + [320] * 5


def test_a_group_without_a_shared_prefix_sends_all_its_members_at_once(config_only_model):
    log = EngineLog(sim_engine(config_only_model, 40))
    reqs = requests(6, [], own=20)
    run(log, reqs, [group(reqs, list(range(6)), 0)])  # prefix_len 0: no leader, no hold
    assert log.sent_at(*(f"q{i}" for i in range(6))) == [0] * 6


def test_groups_cut_from_one_prefix_share_one_leader(config_only_model):
    log = EngineLog(sim_engine(config_only_model, 40))
    reqs = requests(8, PREFIX)
    done, _ = run(log, reqs, [group(reqs, [0, 1, 2, 3], 320, prefix_id=7),
                              group(reqs, [4, 5, 6, 7], 320, prefix_id=7)])
    # q0 leads both cuts: no one else is sent before its prompt is computed, the second
    # cut's first member included.
    assert [rid for rid, k in log.sent.items() if k < log.prefilled["q0"]] == ["q0"]
    assert log.sent_at(*(f"q{i}" for i in range(1, 8))) == [log.prefilled["q0"]] * 7
    assert cached(done) == [0] + [320] * 7


def test_the_window_fills_the_kv_cache_and_vllm_starts_all_it_is_sent(config_only_model):
    # 12 blocks, 11 of them for requests. Prompts of 110 tokens take 4 blocks, and their 3
    # tokens of output fit in the fourth: two run side by side, a third would not fit.
    log = EngineLog(sim_engine(config_only_model, 12))
    reqs = [GenerationRequest(f"u{i}", tokens(i, 110), max_tokens=3) for i in range(7)]
    done, ex = run(log, reqs, [group(reqs, list(range(7)), 0)])
    assert ex.reserved_blocks == 0
    # vLLM started each request in the step after it was sent: none waited for blocks.
    assert log.waited_in_the_engine() == []
    assert max(map(len, log.in_flight)) == max(log.batches) == 2
    assert computed(done) == 7 * 110


def test_a_request_the_budget_counts_over_the_whole_cache_still_runs_alone(
        config_only_model):
    # The plan counts "huge" at 14 blocks, more than the 11 vLLM gives requests: it is sent
    # once nothing else is in flight, so that a job never stalls.
    log = EngineLog(sim_engine(config_only_model, 12))
    reqs = [GenerationRequest(f"u{i}", tokens(i, 110), max_tokens=3) for i in range(6)]
    reqs.insert(3, GenerationRequest("huge", tokens(9, 300), max_tokens=3))
    blocks = np.array([4, 4, 4, 14, 4, 4, 4])
    done, ex = run(log, reqs, [RunGroup(np.arange(7), 0, 0, blocks)])
    assert ex.reserved_blocks == 0
    assert {"huge"} in log.in_flight
    assert all(flight == {"huge"} for flight in log.in_flight if "huge" in flight)


def stop_at(engine: FakeEngine, stop: StopFlag, step: int) -> FakeEngine:
    """The engine, which stops the run when its step `step` ends."""
    real_step = engine.step

    def step_then_stop() -> StepOutput:
        out = real_step()
        if engine.steps == step:
            stop.request()
        return out

    engine.step = step_then_stop
    return engine


class ToMaxTokens(FakeEngine):
    """Decodes every request to its max_tokens."""

    @staticmethod
    def _target(request: GenerationRequest, tokens: list[str]) -> int:
        return request.max_tokens


def test_stop_flag_drains_then_aborts_after_the_grace_period():
    # The engine runs two requests at a time; the executor holds four in flight (two of them
    # waiting in the engine) and two more pending. The stop comes after step 2.
    stop = StopFlag()
    engine = stop_at(ToMaxTokens(block_size=4, max_num_seqs=2, step_delay_s=0.01), stop, 2)
    lengths = [3, 10_000, 5, 5, 5, 5]  # s0 finishes while draining, s1 would take minutes
    reqs = [GenerationRequest(f"s{i}", [i, 1, 2], max_tokens=n) for i, n in enumerate(lengths)]
    done: dict[int, object] = {}
    ex = StreamingExecutor(engine, [RunGroup(np.arange(6), 0, 0, np.full(6, 2))],
                           lambda i: reqs[i], done.update, stop=stop, grace_s=0.3,
                           max_in_flight=4)
    ex.run()
    assert engine.admission_order == ["s0", "s1"]  # nothing started after the stop
    # At the stop: the requests the engine had not started are aborted (s2, s3), the pending
    # ones never sent (s4, s5). The drain lets s0 finish; s1 is aborted when the grace ends.
    assert list(done) == [0] and ex.aborted == [2, 3, 1]
    assert engine.steps > 3 and time.monotonic() - stop.at >= 0.3  # it drained, then aborted
    assert engine.num_unfinished() == 0  # nothing left behind in the engine


def test_a_group_finishing_admission_while_an_earlier_one_waits_for_its_leader(
        config_only_model):
    log = EngineLog(sim_engine(config_only_model, 40))
    reqs = requests(6, PREFIX) + [GenerationRequest("lone", tokens(5, 40), max_tokens=2)]
    done, _ = run(log, reqs, [group(reqs, [0, 1, 2], 320, prefix_id=1),
                              group(reqs, [3, 4, 5], 320, prefix_id=1), group(reqs, [6], 0)])
    # The unshared request started while the prefix group still waited for its leader.
    assert log.sent_at("q0", "lone") == [0, 0] and log.sent["q1"] == log.prefilled["q0"]
    assert cached(done) == [0] + [320] * 5 + [0]


def test_a_nested_prefix_costs_only_its_extra_blocks_while_the_outer_one_is_held():
    prefixes = PrefixReservations()
    assert prefixes.acquire(1, blocks=8, parent_id=-1) == 8  # system prompt
    assert prefixes.cost(2, blocks=12, parent_id=1) == 4  # a document under it
    assert prefixes.acquire(2, blocks=12, parent_id=1) == 4
    assert prefixes.acquire(2, blocks=12, parent_id=1) == 0  # a second group cut from it
    # The system prompt's own group ends first: its blocks stay, the document's groups use them.
    assert prefixes.release(1) == 0
    assert prefixes.release(2) == 0
    assert prefixes.release(2) == 4 + 8  # the last holder frees both
    assert prefixes.cost(2, blocks=12, parent_id=1) == 12  # nothing held any more


def test_nested_groups_run_side_by_side_in_a_cache_that_holds_their_blocks_once(
        config_only_model):
    # An outer prefix of 8 blocks; a nested one of 12 (the outer 8 and 4 more); two members
    # under each with one block of their own: 8 + 4 + 4 x 1 = 16 blocks together, 24 were
    # each prefix counted in full. vLLM shares the blocks: a cache of 16 (and its null
    # block) runs all four at once.
    log = EngineLog(sim_engine(config_only_model, 17))
    outer, inner = PREFIX[:256], PREFIX[:256] + tokens(77, 128)
    reqs = requests(2, outer, own=20, max_tokens=8) + \
        requests(2, inner, name="n", own=20, max_tokens=8)
    done, ex = run(log, reqs, [group(reqs, [0, 1], 256, prefix_id=1),
                               group(reqs, [2, 3], 384, prefix_id=2, parent_id=1)])
    assert max(log.batches) == 4 and log.waited_in_the_engine() == []
    assert ex.reserved_blocks == 0  # every reservation was given back
    assert cached(done) == [0, 256, 256, 384]  # each block computed once


def test_a_shared_group_without_a_prefix_id_is_refused():
    with pytest.raises(ValueError, match="prefix_id"):
        StreamingExecutor(FakeEngine(block_size=4),
                          [RunGroup(np.arange(2), 32, 8, np.full(2, 2))],
                          lambda i: None, lambda batch: None)


def test_requests_are_admitted_by_their_prompt_blocks_not_their_decode(config_only_model):
    # 21 blocks (20 for requests); each request: a 1-block prompt, and 3 blocks more should
    # it decode all its 80 tokens. Counting decode in full, 5 would run at once; by their
    # prompts (vLLM's own rule) all 12 do, and vLLM preempts when decodes outgrow the cache.
    log = EngineLog(sim_engine(config_only_model, 21))
    reqs = [GenerationRequest(f"d{i}", tokens(i, 20), max_tokens=80) for i in range(12)]
    done, ex = run(log, reqs, [group(reqs, list(range(12)), 0)])
    assert log.sent_at(*(r.request_id for r in reqs)) == [0] * 12
    assert log.batches[0] == 12
    assert {(r.completion_tokens, r.finish_reason) for r in done.values()} == {(80, "length")}
    assert ex.reserved_blocks == 0
    # vLLM did preempt: it computed some requests' tokens again.
    assert log.engine.figures()["prefill_tokens"] > 12 * 20


def test_cuts_of_one_prefix_keep_it_counted_until_the_last_one_finishes(config_only_model):
    # Room for one cut at a time: the prefix's 10 blocks and 3 members x 1 fill the 13
    # blocks vLLM gives requests. The leader asks for a token more than its members, so the
    # first cut finishes in one step; the second cut's members all follow in the next,
    # without a leader of their own, and find the prefix in vLLM's cache. Their prefix still
    # counted, the unshared requests planned after them (4 blocks each) wait in the executor
    # until the second cut finishes, not in vLLM, which has no room for them before.
    log = EngineLog(sim_engine(config_only_model, 14))
    reqs = requests(6, PREFIX, max_tokens=6)
    reqs[0] = replace(reqs[0], max_tokens=7)
    reqs += [GenerationRequest(f"u{i}", tokens(10 + i, 110), max_tokens=3) for i in range(3)]
    done, ex = run(log, reqs, [group(reqs, [0, 1, 2], 320, prefix_id=3),
                               group(reqs, [3, 4, 5], 320, prefix_id=3),
                               group(reqs, [6, 7, 8], 0)])
    first_cut_done = log.finished["q0"]
    assert [log.finished[f"q{i}"] for i in range(3)] == [first_cut_done] * 3
    assert log.sent_at("q3", "q4", "q5") == [first_cut_done] * 3
    assert log.waited_in_the_engine() == []
    assert ex.reserved_blocks == 0
    assert cached(done) == [0] + [320] * 5 + [0] * 3


def test_a_group_behind_others_starts_its_leader_only_when_its_members_fit_too(
        config_only_model):
    # 28 blocks (27 for requests). Each member: its prefix's 8 blocks, then 80 tokens of its
    # own and 3 of output (3 blocks). The first group needs 8 + 8 x 3 = 32 blocks: more than
    # the cache, its members run in turns. Beside its leader (11 blocks) the second group's
    # leader (11) would fit; started then, it would finish long before its members could
    # run, and the first group's members, taking blocks meanwhile, push its prefix out of
    # vLLM's cache (vLLM evicts the least recently freed blocks first).
    log = EngineLog(sim_engine(config_only_model, 28))
    first = requests(8, PREFIX[:256], own=80)
    other = requests(4, tokens(3, 256), name="o", own=80)
    reqs = first + other
    done, _ = run(log, reqs, [group(reqs, list(range(8)), 256, 1),
                              group(reqs, [8, 9, 10, 11], 256, 2)])
    # The second leader was sent only once the first group had all started.
    assert log.sent["o0"] >= max(log.sent_at(*(f"q{i}" for i in range(8))))
    # So each prefix was computed once, by its leader, and found whole by every member.
    assert cached(done) == [0] + [256] * 7 + [0] + [256] * 3


def test_a_group_behind_others_leaves_room_for_members_waiting_on_their_leader(
        config_only_model):
    # 31 blocks for requests; prefixes of 8 blocks, members with 2 of their own. The first
    # group's leader is prefilling; its 15 other members start the moment it has (as many
    # as fit). Beside the leader alone, the second group would fit (10 + 16 of 31 blocks),
    # beside the first group's members waiting for that leader it does not (10 + 30 + 16):
    # started then, its leader would finish while its members wait, and vLLM evicts a prefix
    # nothing references when the first group's members need blocks.
    log = EngineLog(sim_engine(config_only_model, 32))
    reqs = requests(16, PREFIX[:256], own=40) + requests(4, tokens(3, 256), name="o", own=40)
    done, _ = run(log, reqs, [group(reqs, list(range(16)), 256, 1),
                              group(reqs, list(range(16, 20)), 256, 2)])
    # The first group's members went as soon as its leader's prompt was computed; the second
    # leader only after them, not beside the first leader.
    assert log.sent_at(*(f"q{i}" for i in range(1, 11))) == [log.prefilled["q0"]] * 10
    assert log.sent["o0"] > log.sent["q0"]
    # Each prefix computed once, by its leader, and found whole by every member.
    assert cached(done) == [0] + [256] * 15 + [0] + [256] * 3


def test_sibling_leaders_wait_for_the_prefix_they_share(config_only_model):
    # A system prompt (8 blocks) that the planner chose as no group of its own, and two
    # document groups below it (prefix tree node 1 above both): the first leader computes the
    # system prompt, the second is sent once that prompt is computed, a step later. (vLLM
    # would share the system prompt's blocks between leaders sent together as well: the
    # wait orders the leaders, it computes nothing less here.)
    docs = [tokens(20, 128), tokens(30, 128)]
    system = PREFIX[:256]
    reqs = [GenerationRequest(f"d{d}m{m}", system + docs[d] + tokens(40 + m, 5), max_tokens=2)
            for d in range(2) for m in range(2)]

    def sent(shared_above_id: int) -> tuple[EngineLog, int]:
        groups = [group(reqs, [0, 1], 384, prefix_id=2, shared_above_id=shared_above_id),
                  group(reqs, [2, 3], 384, prefix_id=3, shared_above_id=shared_above_id)]
        log = EngineLog(sim_engine(config_only_model, 40))
        done, _ = run(log, reqs, groups)
        return log, computed(done)

    held, computed_held = sent(1)
    assert held.sent_at("d0m0", "d1m0") == [0, held.prefilled["d0m0"]] == [0, 1]
    # Each leader's member follows once that leader's own prompt is computed.
    assert held.sent["d0m1"] == held.prefilled["d0m0"]
    assert held.sent["d1m1"] == held.prefilled["d1m0"]
    # The system prompt once, each document once, each member's own last 5 tokens.
    assert computed_held == 256 + 2 * 128 + 4 * 5
    # Without the shared node, nothing holds the second leader: both are sent at once.
    free, computed_free = sent(-1)
    assert free.sent_at("d0m0", "d1m0") == [0, 0]
    assert computed_free == computed_held


LIGHT_HEAD, HEAVY_HEAD = tokens(50, 64), tokens(60, 64)


def light_then_heavy(model: Path, blocks: int, lights: int = 40
                     ) -> tuple[EngineLog, StreamingExecutor]:
    """`lights` light requests planned before 3 heavy ones, all asking for 80 tokens; each
    prompt 2 blocks of shared head and 2 of its own. The light ones answer in one token (a
    classifier), the heavy ones decode all 80 (an essay)."""
    reqs = [replace(r, target_tokens=1) for r in requests(lights, LIGHT_HEAD, name="light",
                                                          own=40, max_tokens=80)]
    reqs += requests(3, HEAVY_HEAD, name="heavy", own=40, max_tokens=80)
    log = EngineLog(sim_engine(model, blocks))
    _, ex = run(log, reqs, [group(reqs, list(range(lights)), 64, prefix_id=1),
                            group(reqs, list(range(lights, lights + 3)), 64, prefix_id=2)])
    return log, ex


def test_a_prefix_whose_first_members_answer_briefly_lets_later_work_start_before_its_rest(
        config_only_model, monkeypatch: pytest.MonkeyPatch):
    # 32 blocks for requests: the light head and 15 members fit at once. Their first 8
    # answer in one token: the head is light, and its members not started yet (most of the
    # 200) go behind the heavy group, which starts now instead of after all 200.
    log, ex = light_then_heavy(config_only_model, 33, lights=200)
    # The heavy decodes overlap the light rest: the run takes about their 80 steps.
    assert log.steps <= 80 + 8
    assert log.order.index("heavy0") < log.order.index("light199")
    assert ex.trace.figures()["deferred_light_prefixes"] == 1
    # Learning nothing (no prefix's sample ever complete), the heavy group waits for all
    # 200 light requests and then decodes alone: the bound above fails.
    monkeypatch.setattr(output_lengths, "SAMPLE", 10**9)
    unlearned, ex = light_then_heavy(config_only_model, 33, lights=200)
    assert ex.trace.figures()["deferred_light_prefixes"] == 0
    assert unlearned.order.index("heavy0") > unlearned.order.index("light199")
    assert unlearned.steps > 80 + 8


def test_a_light_prefix_too_large_to_hold_aside_keeps_its_place(config_only_model):
    # 31 blocks for requests: the 2-block light head is over 1/16 of them, so holding it
    # while it waits behind other work would cost the running batch: plan order stands.
    log, ex = light_then_heavy(config_only_model, 32)
    assert log.order.index("heavy0") > log.order.index("light39")
    assert ex.trace.figures()["deferred_light_prefixes"] == 0


def test_the_trace_reaches_its_sink_every_half_minute_not_only_at_the_end(monkeypatch):
    """A killed run's report still has its steps: what was recorded goes to the checkpoint
    at least every FLUSH_SECONDS, however few steps that is."""
    from batchrun.execute import trace as step_trace

    clock = [100.0]
    monkeypatch.setattr(step_trace.time, "monotonic", lambda: clock[0])
    sunk: list[int] = []
    trace = step_trace.StepTrace(sink=lambda steps: sunk.append(steps.num_rows))
    step = StepOutput(finished=[], batch_size=3, prompt_tokens=10, completion_tokens=3)
    for _ in range(5):
        trace.stepping()
        trace.record(step)
        clock[0] += 1.0
    assert sunk == []  # five seconds: still buffered
    clock[0] += step_trace.FLUSH_SECONDS
    trace.stepping()
    trace.record(step)
    assert sunk == [6]
