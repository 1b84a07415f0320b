"""The sim engine's fidelity and `plan --estimate`'s accuracy on the benchmark suite (issue 25).

For every job of synthetic.py and every KV cache size, three commands a user runs, in order:
  (1) `batchrun plan JOB --estimate --kv-cache-memory KV --json`, before any real run: the
      estimate's run-stage seconds (priced by the sim's cost profile: today an ASSUMED CPU
      profile, engine/sim_cost.py), engine steps and computed prompt tokens (simulated, each
      row running to max_tokens: no lengths are known before a run);
  (2) `batchrun run JOB -o real.parquet --kv-cache-memory KV --json`: the real vLLM run;
  (3) `batchrun run JOB -o sim.parquet --engine sim --replay-lengths real.parquet
      --kv-cache-memory KV --json`: the sim with the real run's output lengths replayed.
Printed per job and KV size: engine steps and computed prompt tokens, real against sim
(exact, or % off); rows whose cached tokens, completion tokens or finish reason differ
between the two outputs; vLLM's preemptions in each (counted by a patch of its scheduler in
the command's process, COUNTING_BATCHRUN: no summary reports them); and the real run stage's
seconds (summary `stages.run.seconds`) against the replay's simulated seconds and the
estimate's. Every sim figure is labelled simulated.

    python benchmarks/bench_sim_fidelity.py                         # whole suite, 256MiB, 1GiB
    python benchmarks/bench_sim_fidelity.py --jobs rag,prefix --kv 256MiB --skip-estimate
    python benchmarks/bench_sim_fidelity.py --json results.jsonl    # also one JSON line a row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import JOBS, write_job  # noqa: E402

BATCHRUN = [sys.executable, "-m", "batchrun"]
ROW_FIELDS = ("cached_tokens", "completion_tokens", "finish_reason")

# `python -m batchrun`, with vLLM's scheduler counting its preemptions and the tokens the
# preempted requests had computed (they compute them again). Neither a real run's summary nor
# vLLM's logs report preemptions; the engine core runs in this process on CPU, and the sim
# runs the same Scheduler class, so one patch counts both.
COUNTING_BATCHRUN = [sys.executable, "-c", """
import atexit, json, os
from vllm.v1.core.sched.scheduler import Scheduler
counts = {"preemptions": 0, "tokens": 0}
preempt = Scheduler._preempt_request
def counted(self, request, *args, **kwargs):
    counts["preemptions"] += 1
    counts["tokens"] += request.num_computed_tokens
    return preempt(self, request, *args, **kwargs)
Scheduler._preempt_request = counted
atexit.register(lambda: open(os.environ["BENCH_PREEMPTIONS"], "w").write(json.dumps(counts)))
from batchrun.cli import app
app(prog_name="batchrun")
"""]


def run_cli(args: list[str], preemptions: Path | None = None) -> dict:
    """The --json summary of one `batchrun` command (exit 0, or 3: some rows failed); with
    `preemptions`, vLLM's preemptions counted into that file (COUNTING_BATCHRUN)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cmd = BATCHRUN
    if preemptions is not None:
        cmd, env["BENCH_PREEMPTIONS"] = COUNTING_BATCHRUN, str(preemptions)
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"failed ({proc.returncode}): batchrun {' '.join(args)}\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


@dataclass
class Fidelity:
    """One job at one KV size: the real run, the sim's replay of it, the estimate before."""

    job: str
    kv: str
    rows: int
    steps_real: int
    steps_sim: int  # simulated
    computed_real: int
    computed_sim: int  # simulated
    cached_real: int
    cached_sim: int  # simulated
    completion_real: int
    completion_sim: int  # simulated
    rows_differing: dict[str, int]  # per ROW_FIELDS: rows where real and sim differ
    preempted_real: dict[str, int]  # vLLM's preemptions, and the tokens computed again
    preempted_sim: dict[str, int]  # simulated
    run_stage_s: float  # the real run's run stage
    real_wall_s: float
    replay_s: float  # simulated: the replay's counts priced by the (assumed) cost profile
    estimate_s: float | None  # simulated, assumed cost profile
    estimate_steps: int | None  # simulated, rows to max_tokens
    estimate_computed: int | None  # simulated
    estimate_profile: str | None
    load_before: float

    @property
    def exact(self) -> bool:
        return (self.steps_real == self.steps_sim and self.computed_real == self.computed_sim
                and not any(self.rows_differing.values())
                and self.preempted_real == self.preempted_sim)


def rows_differing(real: Path, sim: Path) -> dict[str, int]:
    """Rows (matched by id) whose ROW_FIELDS differ between the real and the sim output."""
    cols = ["id", *ROW_FIELDS]
    a = {r["id"]: r for r in pq.read_table(real, columns=cols).to_pylist()}
    b = {r["id"]: r for r in pq.read_table(sim, columns=cols).to_pylist()}
    assert a.keys() == b.keys(), "real and sim outputs hold different rows"
    return {f: sum(a[i][f] != b[i][f] for i in a) for f in ROW_FIELDS}


def measure(name: str, kv: str, tmp: Path, *, estimate: bool) -> Fidelity:
    job = write_job(name, tmp)
    kv_args = ["--kv-cache-memory", kv]
    load = os.getloadavg()[0]
    est = (run_cli(["plan", str(job), "--estimate", *kv_args, "--json"])["estimate"]
           if estimate else None)
    real_out, sim_out = tmp / f"{name}-{kv}-real.parquet", tmp / f"{name}-{kv}-sim.parquet"
    counted = tmp / "preemptions.json"
    t0 = time.perf_counter()
    real = run_cli(["run", str(job), "-o", str(real_out), *kv_args, "--overwrite", "--json",
                    "--log-lines"], counted)
    wall = time.perf_counter() - t0
    preempted_real = json.loads(counted.read_text())
    sim = run_cli(["run", str(job), "-o", str(sim_out), "--engine", "sim", "--replay-lengths",
                   str(real_out), *kv_args, "--overwrite", "--json", "--log-lines"], counted)
    return Fidelity(
        name, kv, real["rows"], real["batch"]["steps"], sim["batch"]["steps"],
        real["tokens"]["computed_prompt"], sim["tokens"]["computed_prompt"],
        real["tokens"]["cached"], sim["tokens"]["cached"],
        real["tokens"]["completion"], sim["tokens"]["completion"],
        rows_differing(real_out, sim_out), preempted_real, json.loads(counted.read_text()),
        real["stages"]["run"]["seconds"], round(wall, 1),
        sim["simulated"]["seconds"],
        est and est["run_seconds"], est and est["engine_steps"],
        est and est["computed_prompt"], est and (est["profile"] or {}).get("source"), load)


def off(real: int, sim: int) -> str:
    return "exact" if real == sim else f"{(sim - real) / real:+.2%}"


def preempted(f: Fidelity) -> str:
    """Preemptions (tokens computed again): 'n (t)' when real and sim agree, else both."""
    def cell(p: dict[str, int]) -> str:
        return f"{p['preemptions']} ({p['tokens']:,})"

    real, sim = cell(f.preempted_real), cell(f.preempted_sim)
    return real if real == sim else f"{real}/{sim}"


def print_row(f: Fidelity) -> None:
    diff = ",".join(f"{k.split('_')[0]} {v}" for k, v in f.rows_differing.items() if v) or "0"
    est = (f"{f.estimate_steps:>5} {f.estimate_s:7.1f} {f.estimate_s / f.run_stage_s:5.2f}x"
           if f.estimate_s is not None else f"{'-':>5} {'-':>7} {'-':>6}")
    print(f"{f.job:<16} {f.kv:>6} {f.rows:>5} | {f.steps_real:>5} {f.steps_sim:>5} "
          f"{off(f.steps_real, f.steps_sim):>7} | {f.computed_real:>7,} {f.computed_sim:>7,} "
          f"{off(f.computed_real, f.computed_sim):>7} | {diff:<18} | {preempted(f):<15} | "
          f"{f.run_stage_s:6.1f} {f.replay_s:6.1f} {f.replay_s / f.run_stage_s:5.2f}x | {est} | "
          f"{f.load_before:4.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated synthetic.py jobs")
    ap.add_argument("--kv", default="256MiB,1GiB", help="comma-separated KV cache sizes")
    ap.add_argument("--skip-estimate", action="store_true",
                    help="no `plan --estimate` before each real run")
    ap.add_argument("--json", type=Path, help="also append one JSON line per job and KV")
    args = ap.parse_args()
    print("steps and computed prompt tokens: real vLLM run | sim replay of its lengths "
          "(SIMULATED); rows differing: per-row cached/completion/finish real vs sim; "
          "preempted: vLLM's preemptions (tokens the preempted had computed), real/sim "
          "where they differ; "
          "real s: the real run stage's seconds; sim s: the replay's seconds (SIMULATED, "
          "ASSUMED cost profile); est: `plan --estimate` before the run, every row to "
          "max_tokens (SIMULATED, ASSUMED cost profile); load: 1-min load average before")
    print(f"{'job':<16} {'KV':>6} {'rows':>5} | {'steps':>5} {'sim':>5} {'':>7} | "
          f"{'computed':>7} {'sim':>7} {'':>7} | {'rows differing':<18} | {'preempted':<15} | "
          f"{'real s':>6} {'sim s':>6} {'ratio':>6} | {'est steps':>5} {'est s':>7} {'ratio':>6} | "
          "load")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sim-fidelity-") as d:
        for kv in args.kv.split(","):
            for name in args.jobs.split(","):
                f = measure(name, kv, Path(d), estimate=not args.skip_estimate)
                results.append(f)
                print_row(f)
                if args.json:
                    with open(args.json, "a") as out:
                        out.write(json.dumps({**asdict(f), "exact": f.exact}) + "\n")
    exact = sum(f.exact for f in results)
    print(f"{exact} of {len(results)} exact (steps, computed prompt tokens and every row); "
          f"load average now {os.getloadavg()[0]:.1f}")
    profiles = {f.estimate_profile for f in results if f.estimate_profile}
    for source in profiles:
        print(f"estimate cost profile: {source}")


if __name__ == "__main__":
    main()
