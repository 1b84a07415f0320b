"""A run's trace files: the per-step trace and the stage spans kept in the checkpoint as the
run goes (io/output/trace.py), merged beside the output when the job completes, and the
HTML report written from them and the summary (batchrun/report/)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..clock import StageClock
from ..config import JobConfig
from ..execute.prefix_figures import LARGEST
from ..execute.trace import StepTrace
from ..io.output.trace import (
    TraceJournal,
    load_stage_spans,
    run_number,
    save_stage_spans,
    write_trace,
)
from ..report.host import host_facts
from .paths import output_paths
from .summary import write_summary

log = logging.getLogger(__name__)


class RunTrace:
    """The job's step trace streamed into the checkpoint, and its largest shared prefixes."""

    def __init__(self, trace: StepTrace) -> None:
        self.trace = trace
        self.journal: TraceJournal | None = None
        self.prefixes: list[dict[str, Any]] = []

    def open(self, checkpoint: Path) -> None:
        self.journal = TraceJournal(checkpoint)
        self.trace.sink = self.journal.append

    def close(self) -> None:
        """Flush the last steps: a stop or a failure keeps them for the resumed run's report."""
        try:
            self.trace.flush()
        finally:
            if self.journal is not None:
                self.journal.close()
            self.trace.sink = None

    def add_shard(self, shard: int, prefixes: list[dict[str, int]], steps: Any) -> None:
        """A shard's largest prefixes (ids made unique across shards), and its steps when a
        replica ran it."""
        if steps is not None:
            self.trace.add(steps)
        tag = f"s{shard}-"
        self.prefixes.extend({**p, "id": tag + str(p["id"]),
                              "parent": tag + str(p["parent"]) if p["parent"] >= 0 else ""}
                             for p in prefixes)
        if len(self.prefixes) > 4 * LARGEST:
            self.prefixes = self.largest()

    def largest(self) -> list[dict[str, Any]]:
        kept = sorted(self.prefixes, key=lambda p: -p["saved"])[:LARGEST]
        ids = {p["id"] for p in kept}
        return [{**p, "parent": p["parent"] if p["parent"] in ids else ""} for p in kept]

    def summarize(self, summary: dict[str, Any], checkpoint: Path, clock: StageClock) -> None:
        """Keep this run's stage spans in the checkpoint; put every run's in the summary,
        with the largest prefixes and the machine."""
        run = self.journal.run if self.journal is not None else run_number(checkpoint)
        try:
            save_stage_spans(checkpoint, run, clock.spans)
        except OSError as e:
            log.warning("cannot keep the stage times in %s (%s)", checkpoint, e)
        summary["stage_spans"] = load_stage_spans(checkpoint)
        summary["prefixes"] = self.largest()
        summary["host"] = host_facts()


def merge_trace(checkpoint: Path, output: Path) -> None:
    """The checkpoint's trace beside the output, before the checkpoint goes (best effort:
    the report is not worth a finished job)."""
    try:
        write_trace(checkpoint, output)
    except OSError as e:
        log.warning("cannot write the run's trace beside %s (%s)", output, e)


def report(summary_path: Path | None, enabled: bool) -> None:
    """The HTML report beside the summary, unless turned off (best effort)."""
    if not enabled or summary_path is None:
        return
    try:
        from ..report.build import write_report  # plotly loads only when a report is due

        write_report(summary_path)
    except Exception as e:  # a report bug must not fail a finished job
        log.warning("cannot write the report beside %s (%s: %s)", summary_path,
                    type(e).__name__, e)


def rewrite_summary(config: JobConfig, summary: dict[str, Any]) -> None:
    """The summary file and its report again, with what was added after the run (the
    estimate beside it)."""
    report(write_summary(output_paths(config).local, summary), config.report)
