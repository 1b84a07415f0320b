"""Output lengths learned as the run goes: which shared prefixes' requests answer briefly.

The plan ranks work by max_tokens, so it cannot tell a classifier that answers in one word
from an essay writer when both ask for up to 192 tokens; sorted by prompt, whichever sorts
last decodes at the end of the job, alone if it is the writer. The first requests run under
a prefix tell the two apart: once the first SAMPLE members started under a shared prefix have
all finished, the prefix is light if each of them used at most 1/LIGHT_FACTOR of its
max_tokens and left at least MIN_UNUSED_TOKENS of it unused (a smaller difference is a tail
too short to be worth reordering for). Each, not on average: one essay in the sample says
the prefix's requests may decode for long, and those must not come last. The executor then
lets work whose length it does not know yet go before the light prefix's remaining requests.

The sample is the first members started, not the first finished: the first to finish are the
shortest of any group, and would call a group of essays with one short answer light.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE = 8
LIGHT_FACTOR = 4  # as the plan's HEAVY_FACTOR: a quarter of max_tokens or less is light
MIN_UNUSED_TOKENS = 64


@dataclass
class _Sample:
    started: int = 0
    running: int = 0
    not_light: bool = False  # a sampled request answered at length, or failed


class OutputLengths:
    """What the first members of each shared prefix generated. Told when a member starts and
    when it finishes; says, at the finish that completes a prefix's sample, whether the
    prefix turned out light."""

    def __init__(self) -> None:
        self._samples: dict[int, _Sample] = {}
        # sampled requests still running -> (their prefix id, their max_tokens)
        self._sampled: dict[str, tuple[int, int]] = {}

    def started(self, prefix_id: int, request_id: str, max_tokens: int) -> None:
        sample = self._samples.get(prefix_id)
        if sample is None:
            sample = self._samples[prefix_id] = _Sample()
        if sample.started < SAMPLE:
            sample.started += 1
            sample.running += 1
            self._sampled[request_id] = (prefix_id, max_tokens)

    def finished(self, request_id: str, completion_tokens: int) -> int | None:
        """Record a finished request; the prefix id if this finish showed its prefix light."""
        if (sampled := self._sampled.pop(request_id, None)) is None:
            return None
        prefix_id, max_tokens = sampled
        sample = self._samples[prefix_id]
        sample.running -= 1
        if not _is_brief(completion_tokens, max_tokens):
            sample.not_light = True
        if sample.running or sample.started < SAMPLE or sample.not_light:
            return None
        return prefix_id

    def failed(self, request_id: str) -> None:
        """A request failed: its length says nothing, and a prefix it was sampled for stays
        undecided."""
        if (sampled := self._sampled.pop(request_id, None)) is not None:
            sample = self._samples[sampled[0]]
            sample.running -= 1
            sample.not_light = True


def _is_brief(completion_tokens: int, max_tokens: int) -> bool:
    return (completion_tokens * LIGHT_FACTOR <= max_tokens
            and max_tokens - completion_tokens >= MIN_UNUSED_TOKENS)
