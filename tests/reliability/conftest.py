"""The reliability suite's tally: what it put batchrun through, printed at the end of a run."""

from __future__ import annotations

import pytest

from tests.reliability.harness import TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.touched:
        terminalreporter.write_line(
            f"reliability: kills survived {TALLY.kills}, rows lost {TALLY.rows_lost}, "
            f"rows duplicated {TALLY.rows_duplicated}, fuzz cases tried {TALLY.fuzz_cases}")
