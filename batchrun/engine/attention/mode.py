"""Which attention path batchrun's backend takes.

Each engine takes its mode from ``BATCHRUN_ATTENTION`` when its attention metadata builder
starts (the env var reaches every vLLM process; batchrun sets it before creating the engine).
``set_mode`` switches it at run time in this process, so one in-process engine can produce the
prefix-path and the stock-path outputs side by side (tests, benchmarks).

- ``prefix``: take the shared-prefix path for every group of >= 2 sequences sharing >= 1 block.
- ``auto``: take it only for groups that pay, by the measured threshold in ``groups.py``.
- ``default``: vLLM's own attention (the plugin registers nothing when an engine starts so).
"""

from __future__ import annotations

import os

from ...config import AttentionMode

ENV_VAR = "BATCHRUN_ATTENTION"

_mode = AttentionMode.DEFAULT


def mode_from_env() -> AttentionMode:
    """The mode BATCHRUN_ATTENTION asks for; unset means ``default`` so that plain vLLM runs
    in the same environment stay untouched."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or AttentionMode.DEFAULT
    if value not in AttentionMode.values():
        raise ValueError(f"{ENV_VAR} must be one of {AttentionMode.values()}, not {value!r}")
    return AttentionMode(value)


def load_mode_from_env() -> AttentionMode:
    global _mode
    _mode = mode_from_env()
    return _mode


def set_mode(mode: str) -> None:
    """Switch this process's attention path; takes effect from the next engine step."""
    global _mode
    if mode not in AttentionMode.values():
        raise ValueError(f"attention mode must be one of {AttentionMode.values()}, not {mode!r}")
    _mode = AttentionMode(mode)


def get_mode() -> AttentionMode:
    return _mode
