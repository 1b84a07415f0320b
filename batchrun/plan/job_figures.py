"""The whole job's plan figures from its shards' plans.

Shards are consecutive ranges of the token order (see batchrun/ingest/shards.py), so the whole job's
prefix tree is the shards' trees joined at each boundary: its distinct and block-ideal token
counts are the shards' sums less what the two prompts meeting at each boundary share. In a job
with LoRA adapters the prompts are keyed by adapter (plan/adapters.py): two prompts on
different adapters share nothing, and the figures are summed per adapter too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .adapters import add_adapter_figures, with_savings
from .prefixes import boundary_reuse

_SUMMED = ("requests", "prompt_tokens", "distinct_prompt_tokens", "block_ideal_computed_tokens",
           "groups", "shared_groups", "unshared_requests", "group_shared_tokens",
           "over_capacity_groups")


@dataclass
class JobPlanFigures:
    """Adds up PlanStats.to_dict() of shards planned in token order."""

    totals: dict[str, Any] = field(default_factory=dict)
    shards: int = 0
    _last_prompt: np.ndarray | None = None
    _kv_token_sum: float = 0.0
    _adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, stats: dict[str, Any], first_prompt: np.ndarray | None,
            last_prompt: np.ndarray | None) -> None:
        """One shard's figures, and its first and last prompts in token order."""
        self.shards += 1
        if not stats.get("planned", True) or "requests" not in stats:
            self.totals.setdefault("planned", stats.get("planned", False))
            return
        t = self.totals
        t["planned"] = True
        for key in _SUMMED:
            t[key] = t.get(key, 0) + stats[key]
        if "adapters" in stats:  # keyed prompts: [adapter key, *tokens]
            last = self._last_prompt
            add_adapter_figures(self._adapters, stats["adapters"], last, first_prompt,
                                stats["block_size"])
        if first_prompt is not None:
            if "adapters" in stats:
                same = self._last_prompt is not None and self._last_prompt[0] == first_prompt[0]
                distinct, ideal = boundary_reuse(self._last_prompt[1:], first_prompt[1:],
                                                 stats["block_size"]) if same else (0, 0)
            else:
                distinct, ideal = boundary_reuse(self._last_prompt, first_prompt,
                                                 stats["block_size"])
            t["distinct_prompt_tokens"] -= distinct
            t["block_ideal_computed_tokens"] -= ideal
            self._last_prompt = last_prompt
        self._kv_token_sum += stats["kv_tokens_per_group_mean"] * stats["groups"]
        t["kv_tokens_per_group_max"] = max(t.get("kv_tokens_per_group_max", 0),
                                           stats["kv_tokens_per_group_max"])
        t["kv_capacity_tokens"] = stats["kv_capacity_tokens"]
        t["block_size"] = stats["block_size"]

    def to_dict(self) -> dict[str, Any]:
        t = dict(self.totals)
        if "requests" in t:
            t["kv_tokens_per_group_mean"] = self._kv_token_sum / t["groups"] if t["groups"] \
                else 0.0
            prompt = t["prompt_tokens"]
            t["expected_prefill_saving"] = (1 - t["block_ideal_computed_tokens"] / prompt
                                            if prompt else 0.0)
        if self._adapters:  # per adapter; "" is the base model
            t["adapters"] = with_savings(self._adapters)
        t.setdefault("planned", False)
        return t
