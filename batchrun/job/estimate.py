"""`batchrun plan --estimate`: the job run through the sim engine (engine/sim.py, vLLM's own
scheduler with no model) exactly as `batchrun run` would run it (read, tokenized, sharded,
planned, the engine sized from the job), into a scratch folder. What it predicts is what that
simulated run counted: engine steps and computed prompt tokens from vLLM's scheduler, and the
run stage's seconds by the sim's cost profile, whose `source` says whether it was measured or
assumed."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import EngineKind, JobConfig
from ..errors import ConfigError
from ..io.storage import Location
from .run import run_job

LABEL = "simulated: vLLM's scheduler with no model; seconds by the sim's cost profile"


def estimate_run(config: JobConfig) -> dict[str, Any]:
    """The `estimate` section of `batchrun plan --estimate` (see the module notes). With
    replicas (--replicas N), the fleet is simulated too (cluster/sim_fleet.py): steps and
    computed tokens are summed over replicas, the run stage is the busiest replica's."""
    with tempfile.TemporaryDirectory(prefix="batchrun-estimate-") as tmp:
        scratch = replace(config, output=Location.coerce(Path(tmp) / "estimate.parquet"),
                          openai_output=None, work_dir=None)
        outcome = run_job(scratch, engine_kind=EngineKind.SIM, handle_signals=False,
                          interactive=False, engine_log=True)
    summary = outcome.summary
    if "rows" not in summary:
        raise ConfigError(f"plan --estimate could not simulate the job: {outcome.message}")
    simulated = summary.get("simulated", {})
    estimate = {
        "label": LABEL,
        "engine_steps": simulated.get("steps", summary["batch"]["steps"]),
        "computed_prompt": summary["tokens"]["computed_prompt"],
        "completion": summary["tokens"]["completion"],
        "run_seconds": simulated.get("seconds"),
        "profile": simulated.get("profile"),
        "rows": summary["rows"],
        "failed_rows": summary["failed"],
    }
    if "replicas" in simulated:
        estimate["replicas"] = {**simulated["replicas"], "per_replica": [
            {k: r[k] for k in ("replica", "rows", "computed_prompt_tokens", "busy_s",
                               "pieces")} for r in summary["replicas"]]}
    return estimate


def with_measured(estimate: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A run summary's `estimate` section: the prediction made before the run, and beside it
    (`measured`) what the run measured of the same figures: the run stage's seconds, engine
    steps (None on Ray replicas, which do not report theirs) and computed prompt tokens.
    A resumed run measures only the rows it ran; the estimate is of the whole job."""
    steps = summary.get("batch", {}).get("steps") or summary.get("simulated", {}).get("steps")
    measured = {"run_seconds": summary.get("stages", {}).get("run", {}).get("seconds"),
                "engine_steps": steps or None,
                "computed_prompt": summary["tokens"]["computed_prompt"]}
    return {**estimate, "measured": measured}
