"""Facts about the machine this process runs on, read once where several parts need them."""

from __future__ import annotations

from pathlib import Path


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (x86's "model name", Arm's "Model" or
    "Hardware"); None where there is no such line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return None
