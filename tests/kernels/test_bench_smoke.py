"""The kernel benchmark must keep running: its --smoke mode (tiny shapes, CPU interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_prefix_attention.py"


def test_benchmark_smoke_mode_runs_and_agrees_with_the_baseline():
    result = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.startswith("  ") and line.split()[0] in {"fused", "split", "paged", "sdpa"}}
    assert set(rows) == {"fused", "split", "paged", "sdpa"}
    # Last column: max |difference| from the per-sequence Triton baseline (bf16 outputs).
    assert all(float(row[-1]) < 2e-2 for row in rows.values())
