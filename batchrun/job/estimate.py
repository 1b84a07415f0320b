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
    """The `estimate` section of `batchrun plan --estimate` (see the module notes)."""
    if config.cluster.on_ray:
        raise ConfigError("plan --estimate does not simulate replicas yet; estimate one "
                          "engine (drop --replicas/--ray-address) and divide by the replicas")
    with tempfile.TemporaryDirectory(prefix="batchrun-estimate-") as tmp:
        scratch = replace(config, output=Location.coerce(Path(tmp) / "estimate.parquet"),
                          openai_output=None, work_dir=None)
        outcome = run_job(scratch, engine_kind=EngineKind.SIM, handle_signals=False,
                          interactive=False, engine_log=True)
    summary = outcome.summary
    simulated = summary.get("simulated", {})
    return {
        "label": LABEL,
        "engine_steps": summary["batch"]["steps"],
        "computed_prompt": summary["tokens"]["computed_prompt"],
        "completion": summary["tokens"]["completion"],
        "run_seconds": simulated.get("seconds"),
        "profile": simulated.get("profile"),
        "rows": summary["rows"],
        "failed_rows": summary["failed"],
    }
