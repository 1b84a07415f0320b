"""The machine a job ran on, for its summary and report."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

from ..machine import cpu_model_name


def host_facts() -> dict[str, Any]:
    """The host's name, OS, CPU and its cores, and its GPUs (nvidia-smi's names, if any)."""
    return {"hostname": platform.node(), "system": platform.platform(terse=True),
            "cpu": cpu_model_name() or platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "gpus": _gpus()}


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
