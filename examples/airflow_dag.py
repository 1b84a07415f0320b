"""Airflow DAG running a batchrun job nightly.

Exit codes: 0 ok; 3 finished but some rows failed -> a *soft* failure (task marked skipped,
downstream tasks that tolerate it still run); 4 interrupted -> Airflow retries, and --resume
continues where the killed attempt stopped; 1 / 2 fail the task.
"""

from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator

BATCHRUN = "cd /srv/batchrun && .venv/bin/batchrun"

with DAG(
    dag_id="batchrun_example",
    schedule="15 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 3, "retry_delay": pendulum.duration(minutes=5)},
) as dag:
    BashOperator(
        task_id="run_example_job",
        bash_command=f"{BATCHRUN} run jobs/example.toml --resume --log-lines",
        # Airflow marks the task skipped (not failed) on this exit code: rows with errors are
        # in the output's `error` column, and the rest of the pipeline can go on.
        skip_on_exit_code=3,
        # SIGTERM on timeout: batchrun drains for its grace period, saves, and exits 4.
        execution_timeout=pendulum.duration(hours=6),
    )
