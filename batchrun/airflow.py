"""An Airflow operator for batchrun jobs: `pip install 'batchrun[airflow]'` in Airflow's
environment (Airflow 3; Airflow 2.x works too).

    from batchrun.airflow import BatchrunOperator

    BatchrunOperator(
        task_id="nightly",
        job="/srv/batchrun/jobs/nightly.toml",
        output_path="s3://bucket/nightly/{{ ds }}.parquet",  # one output per run: dated
        batchrun="/srv/batchrun/.venv/bin/batchrun",     # batchrun's own environment (vLLM)
    )

It runs `batchrun run JOB --resume --log-lines --json` as a child process (batchrun's engine
never loads into the Airflow worker), streams its log to the task log, returns the run
summary (an XCom), and maps the exit code the way a pipeline expects:

    0  success
    3  the job finished but some rows failed: skipped (row_errors="skip", the default),
       success with a warning ("warn"), or failed without retry ("fail")
    4  interrupted (signal, engine failure, full disk): failed and retried; the retry
       continues from the checkpoint (--resume)
    1  a bug, 2  a usage error or an unreadable input: failed without retry (retrying
       cannot help)

On execution_timeout (or when the task is killed) the operator sends batchrun SIGTERM and
waits up to grace_period + 30 s for it to save; the task then fails as Airflow decides (a
timeout is retried while retries remain), and nothing finished is lost: the retry resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS

ROW_ERRORS = ("skip", "warn", "fail")


def task_outcome(exit_code: int, row_errors: str = "skip") -> str:
    """What an exit code of `batchrun run` means for the task: "success", "warn" (success,
    logged as a warning), "skip", "retry" (fail; Airflow retries) or "fail" (no retry)."""
    if row_errors not in ROW_ERRORS:
        raise ValueError(f"row_errors must be one of {ROW_ERRORS}, not {row_errors!r}")
    if exit_code == EXIT_OK:
        return "success"
    if exit_code == EXIT_ROW_ERRORS:
        return {"skip": "skip", "warn": "warn", "fail": "fail"}[row_errors]
    if exit_code == EXIT_INTERRUPTED or exit_code < 0:  # or killed by a signal: resume on retry
        return "retry"
    return "fail"  # EXIT_INTERNAL (a bug), EXIT_USAGE (usage / input), anything unknown


def batchrun_command(job: str, *, output: str | None = None, resume: bool = True,
                     grace_period: float = 30.0, extra_args: Sequence[str] = (),
                     batchrun: str | Sequence[str] | None = None) -> list[str]:
    """The command line the operator runs."""
    if batchrun is None:
        prefix = [sys.executable, "-m", "batchrun"]
    elif isinstance(batchrun, str):
        prefix = [batchrun]
    else:
        prefix = list(batchrun)
    cmd = [*prefix, "run", job, "--log-lines", "--json", "--grace-period", str(grace_period)]
    if output:
        cmd += ["-o", output]
    if resume:
        cmd.append("--resume")
    return [*cmd, *extra_args]


try:  # Airflow 3
    from airflow.sdk import BaseOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
except ImportError:  # Airflow 2, or none
    try:
        from airflow.exceptions import (
            AirflowException,
            AirflowFailException,
            AirflowSkipException,
        )
        from airflow.models import BaseOperator
    except ImportError:
        BaseOperator = None


if BaseOperator is not None:

    class BatchrunOperator(BaseOperator):
        """Run a batchrun job (see the module docstring for the exit-code mapping).

        job: a job file or an input (local or a URI); output_path: the output path or URI,
        overriding the job file's (a dated one, e.g. with {{ ds }}, so each run writes its
        own; `output` is Airflow's own attribute); resume: pass --resume
        (default: a retry continues where the last attempt stopped); row_errors: what exit 3
        means ("skip", "warn" or "fail"); batchrun: the batchrun executable (or a command
        prefix list), default this Python's `-m batchrun`; extra_args: more flags
        (e.g. ["--max-tokens", "64"]); env: extra environment variables for batchrun."""

        template_fields: Sequence[str] = ("job", "output_path", "extra_args", "env")
        ui_color = "#e8f0fe"

        def __init__(self, *, job: str, output_path: str | None = None, resume: bool = True,
                     row_errors: str = "skip", batchrun: str | Sequence[str] | None = None,
                     extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                     grace_period: float = 30.0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            task_outcome(EXIT_OK, row_errors)  # checks row_errors now, when the DAG is parsed
            self.job, self.output_path, self.resume = job, output_path, resume
            self.row_errors, self.batchrun = row_errors, batchrun
            self.extra_args, self.env = list(extra_args), dict(env or {})
            self.grace_period = grace_period
            self._proc: subprocess.Popen[str] | None = None

        def execute(self, context: Any) -> dict[str, Any]:
            cmd = batchrun_command(self.job, output=self.output_path, resume=self.resume,
                                   grace_period=self.grace_period, extra_args=self.extra_args,
                                   batchrun=self.batchrun)
            self.log.info("running %s", " ".join(cmd))
            with tempfile.TemporaryFile("w+") as stdout:
                self._proc = subprocess.Popen(
                    cmd, stdout=stdout, stderr=subprocess.PIPE, text=True,
                    env={**os.environ, **self.env}, start_new_session=True)
                try:
                    assert self._proc.stderr is not None
                    for line in self._proc.stderr:
                        self.log.info("%s", line.rstrip())
                    code = self._proc.wait()
                except BaseException:  # a timeout or a kill of the task: let batchrun save
                    self._stop_child()
                    raise
                stdout.seek(0)
                summary = _parse_summary(stdout.read())
            return self._finish(code, summary)

        def _finish(self, code: int, summary: dict[str, Any]) -> dict[str, Any]:
            outcome = task_outcome(code, self.row_errors)
            what = (f"batchrun exited {code}: {summary.get('status', 'no summary')}, "
                    f"{summary.get('failed', '?')} of {summary.get('rows', '?')} rows failed")
            if outcome == "success":
                return summary
            if outcome == "warn":
                self.log.warning("%s (their `error` column says why)", what)
                return summary
            if outcome == "skip":
                raise AirflowSkipException(f"{what}; see the output's `error` column")
            if outcome == "retry":
                raise AirflowException(f"{what}: interrupted; finished rows are saved, and "
                                       "a retry resumes")
            raise AirflowFailException(f"{what}; not retried (a retry cannot fix it)")

        def _stop_child(self) -> None:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return
            self.log.warning("stopping batchrun (SIGTERM); it saves finished rows, and a "
                             "retry resumes")
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=self.grace_period + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # finished rows are on disk already
                proc.wait()
            except ProcessLookupError:
                pass

        def on_kill(self) -> None:
            self._stop_child()

else:

    def __getattr__(name: str) -> Any:
        if name == "BatchrunOperator":
            raise ImportError("BatchrunOperator needs Apache Airflow: pip install "
                              "'batchrun[airflow]' in Airflow's environment")
        raise AttributeError(name)


def _parse_summary(stdout: str) -> dict[str, Any]:
    """The --json summary batchrun prints on stdout ({} when there is none, e.g. exit 2)."""
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(stdout[start:])
    except ValueError:
        return {}
