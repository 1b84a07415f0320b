"""batchrun's vLLM attention backend: shared-prefix (Hydragen-style) attention inside the
engine, registered by the ``vllm.general_plugins`` entry point ``plugin.register``.

This package's top level stays free of vLLM and torch imports: vLLM imports the plugin in
every process, and the job reads the counters without touching the engine.
"""

from .mode import get_mode, set_mode
from .selection import AttentionChoice, attention_summary, choose_attention
from .stats import read_attention_stats, reset_attention_stats

__all__ = ["AttentionChoice", "attention_summary", "choose_attention", "get_mode",
           "read_attention_stats", "reset_attention_stats", "set_mode"]
