"""`batchrun report OUTPUT`: rebuild a job's HTML report from its summary and trace."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .data import SUMMARY_SUFFIX


def rebuild_report(output: str, dest: Path | None = None) -> Path:
    """The report of the job whose output (or summary file) is `output`; where it went."""
    from .build import write_report

    given = Path(output)
    summary = given if given.name.endswith(SUMMARY_SUFFIX) else \
        given.with_name(given.name + SUMMARY_SUFFIX)
    if not summary.is_file():
        raise ConfigError(f"no summary at {summary}: give the output file of a job run "
                          "(its <output>.summary.json sits beside it), or the summary itself")
    return write_report(summary, dest)
