"""The kernel benchmark must keep running: its --smoke mode (tiny shapes, CPU interpreter)."""

from __future__ import annotations

import io
import json
import os
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


def test_targets_report_reads_the_benchmark_rows(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("targets", BENCH.with_name("targets.py"))
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)

    def row(impl, ms, suffix=64, hbm=80.0):
        return {"device": "NVIDIA H200", "dtype": "bf16", "peak_gbps": 4800.0, "batch": 512,
                "prefix": 4096, "suffix": suffix, "query_len": 1, "groups": 1, "impl": impl,
                "ms": ms, "gbps": 1.0, "hbm_pct": hbm, "vs_paged": 2.0 / ms, "vs_sdpa": None,
                "max_diff": 1e-3}

    met = [row("fused", 0.1), row("split", 0.15), row("paged", 2.0)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in met))
    out = io.StringIO()
    assert targets.report(targets.load(path), out) == 0
    assert "fused" in out.getvalue() and "20.00x per-sequence paged (met" in out.getvalue()
    # Fast enough but under 70% of the roofline; a shape that is not the target's: no verdict.
    assert targets.report([row("split", 0.1, hbm=50.0), row("paged", 2.0)], io.StringIO()) == 1
    assert targets.report([dict(row("fused", 0.1), batch=32)], io.StringIO()) == 2


def test_gpu_check_script_parses_and_lists_its_steps(tmp_path):
    script = BENCH.parents[1] / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for mode, step in (("kernels", "--batch 512 --prefix 4096"), ("e2e", "--attention default,"
                                                                   "prefix,auto")):
        result = subprocess.run(["bash", str(script), mode, "--dry-run", "--out",
                                 str(tmp_path)], capture_output=True, text=True,
                                env={**os.environ, "PYTHON": sys.executable}, timeout=120,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert step in result.stdout
