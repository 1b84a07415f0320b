"""Airflow 3 DAG running a batchrun job nightly, one dated output per run.

Needs `pip install 'batchrun[airflow]'` in Airflow's environment (for the operator); the job
runs in batchrun's own environment (BATCHRUN_HOME/.venv, with vLLM). BatchrunOperator maps
batchrun's exit codes:
  0  success;
  3  finished, but some rows failed: the task is skipped (their `error` column says why;
     row_errors="warn" makes it a success with a warning, "fail" a failure);
  4  interrupted (signal, engine failure, full disk): failed and retried; the retry runs with
     --resume and continues where the attempt stopped;
  1  a bug, 2  a usage error or unreadable input: failed without retry.
On execution_timeout Airflow stops the task: the operator sends batchrun SIGTERM and waits
for it to save its checkpoint; the task is marked failed and retried, and the retry resumes.
Nothing finished is lost.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG

from batchrun.airflow import BatchrunOperator

BATCHRUN_HOME = os.environ.get("BATCHRUN_HOME", "/srv/batchrun")

with DAG(
    dag_id="batchrun_example",
    schedule="15 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 3, "retry_delay": pendulum.duration(minutes=5)},
) as dag:
    BatchrunOperator(
        task_id="run_example_job",
        job=f"{BATCHRUN_HOME}/jobs/example.toml",
        # A dated output: each night writes its own file (a fixed path would make every run
        # after the first an "already exists, nothing to do" success).
        output_path=BATCHRUN_HOME + "/out/example-{{ ds }}.parquet",
        batchrun=f"{BATCHRUN_HOME}/.venv/bin/batchrun",
        row_errors="skip",
        execution_timeout=pendulum.duration(hours=6),
    )
