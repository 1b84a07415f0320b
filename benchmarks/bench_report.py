"""The HTML report of a large job: how long `batchrun report OUTPUT` takes and how big the
file is, on the 2M-row text job of bench_scale.py run on the fake engine.

    python benchmarks/bench_report.py                 # 2,000,000 rows
    python benchmarks/bench_report.py --rows 200000

The job runs once (`batchrun run ... --engine fake --no-report`, the fake engine sized as in
bench_scale.py); then the report is built by the command a user runs, timed from the
outside. Targets (issue 28): built in under 30 s, under 5 MB (plotly's JavaScript, ~4.8 MB,
included). Reported: run wall, engine steps (trace rows), trace file size, report build
seconds and size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import BATCHRUN, FAKE_ENGINE, text_job  # noqa: E402

TARGET_S, TARGET_BYTES = 30.0, 5_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    job = text_job(args.rows)
    env = {**os.environ, "BATCHRUN_FAKE_ENGINE": json.dumps(FAKE_ENGINE)}
    with tempfile.TemporaryDirectory(prefix="bench_report_", dir="/tmp") as tmp:
        out = Path(tmp) / "out.parquet"
        t0 = time.perf_counter()
        subprocess.run([*BATCHRUN, "run", str(job), "-o", str(out), "--engine", "fake",
                        "--no-report", "--json"], env=env, check=True, capture_output=True)
        run_s = time.perf_counter() - t0
        summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
        t0 = time.perf_counter()
        subprocess.run([*BATCHRUN, "report", str(out)], env=env, check=True,
                       capture_output=True)
        build_s = time.perf_counter() - t0
        report = out.with_name(out.name + ".report.html")
        trace = out.with_name(out.name + ".trace.arrow")
        size = report.stat().st_size
        print(f"rows {args.rows:,}: run {run_s:.1f} s, {summary['batch']['steps']:,} engine "
              f"steps, trace {trace.stat().st_size / 1e6:.2f} MB")
        print(f"report: built in {build_s:.1f} s (target < {TARGET_S:.0f} s), "
              f"{size / 1e6:.2f} MB (target < {TARGET_BYTES / 1e6:.0f} MB): "
              f"{'ok' if build_s < TARGET_S and size < TARGET_BYTES else 'MISSED'}")


if __name__ == "__main__":
    main()
