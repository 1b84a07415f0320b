"""BatchrunOperator: exit codes mapped as a pipeline expects, and the example DAG run for real
(`airflow dags test`) on apache-airflow 3.3.2 with the fake engine, against this checkout.

Airflow lives in its own virtualenv (`make airflow-venv`, .venv-airflow/: installing it takes
about 2 minutes, measured; it would change vLLM's dependencies in .venv), with batchrun taken
from this checkout through PYTHONPATH. Without that venv the Airflow runs are skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.airflow import batchrun_command, task_outcome

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_VENV = Path(os.environ.get("BATCHRUN_AIRFLOW_VENV", REPO / ".venv-airflow"))


@pytest.mark.parametrize("code, row_errors, outcome", [
    (0, "skip", "success"), (3, "skip", "skip"), (3, "warn", "warn"), (3, "fail", "fail"),
    (4, "skip", "retry"), (-9, "skip", "retry"), (1, "skip", "fail"), (2, "warn", "fail"),
])
def test_exit_codes_map_to_task_outcomes(code: int, row_errors: str, outcome: str) -> None:
    assert task_outcome(code, row_errors) == outcome


def test_the_command_line() -> None:
    cmd = batchrun_command("jobs/x.toml", output="s3://b/{{ ds }}.parquet",
                           extra_args=["--max-tokens", "8"], batchrun="/srv/.venv/bin/batchrun")
    assert cmd == ["/srv/.venv/bin/batchrun", "run", "jobs/x.toml", "--log-lines", "--json",
                   "--grace-period", "30.0", "-o", "s3://b/{{ ds }}.parquet", "--resume",
                   "--max-tokens", "8"]
    with pytest.raises(ValueError, match="row_errors"):
        task_outcome(3, "ignore")


def airflow_env(tmp_path: Path, home: Path, dags: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BATCHRUN"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", BATCHRUN_HOME=str(home),
               PYTHONPATH=str(REPO), VIRTUAL_ENV=str(AIRFLOW_VENV))
    return env


@pytest.fixture
def airflow_home(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A BATCHRUN_HOME laid out as the example DAG expects (jobs/, examples/, and a
    .venv/bin/batchrun that runs this checkout with the fake engine), a DAG folder, and an
    initialised Airflow database."""
    if not (AIRFLOW_VENV / "bin" / "airflow").exists():
        pytest.skip(f"no Airflow venv at {AIRFLOW_VENV}: `make airflow-venv` builds it "
                    "(apache-airflow 3.3.2, about 2 minutes to install)")
    home, dags = tmp_path / "batchrun-home", tmp_path / "dags"
    (home / "jobs").mkdir(parents=True)
    (home / "examples").mkdir()
    (home / ".venv" / "bin").mkdir(parents=True)
    dags.mkdir()
    shutil.copy(REPO / "jobs" / "example.toml", home / "jobs")
    shutil.copy(REPO / "examples" / "prompts.jsonl", home / "examples")
    wrapper = home / ".venv" / "bin" / "batchrun"
    wrapper.write_text(f'#!/bin/sh\nexec {AIRFLOW_VENV}/bin/python -m batchrun "$@" '
                       "--engine fake\n")
    wrapper.chmod(0o755)
    env = airflow_env(tmp_path, home, dags)
    migrate = subprocess.run([AIRFLOW_VENV / "bin" / "airflow", "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return home, dags, env


def test_the_example_dag_runs_on_airflow_3_with_a_dated_output(airflow_home) -> None:
    home, dags, env = airflow_home
    shutil.copy(REPO / "examples" / "airflow_dag.py", dags)
    for day in ("2026-01-02", "2026-01-03"):
        run = subprocess.run([AIRFLOW_VENV / "bin" / "airflow", "dags", "test",
                              "batchrun_example", day], env=env, capture_output=True,
                             text=True, timeout=300)
        log = run.stdout + run.stderr
        assert run.returncode == 0 and "new_state=success" in log, log[-5000:]
        assert "DeprecatedImportWarning" not in log
        table = pq.read_table(home / "out" / f"example-{day}.parquet")
        assert table.num_rows == 19 and table["error"].null_count == 19
    assert sorted(p.name for p in (home / "out").glob("*.parquet")) == [
        "example-2026-01-02.parquet", "example-2026-01-03.parquet"]


CODES_DAG = '''
import os
import pendulum
from airflow.sdk import DAG
from batchrun.airflow import BatchrunOperator

HOME = os.environ["BATCHRUN_HOME"]
with DAG(dag_id="batchrun_codes", schedule=None,
         start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=0)}) as dag:
    run = dict(batchrun=f"{HOME}/.venv/bin/batchrun")
    BatchrunOperator(task_id="ok", job=f"{HOME}/good.jsonl",
                     output_path=HOME + "/out/ok-{{ ds }}.parquet", **run)
    BatchrunOperator(task_id="rows_failed", job=f"{HOME}/some-bad.jsonl",
                     output_path=HOME + "/out/bad-{{ ds }}.parquet", **run)
    BatchrunOperator(task_id="rows_failed_warn", row_errors="warn", job=f"{HOME}/some-bad.jsonl",
                     output_path=HOME + "/out/warn-{{ ds }}.parquet", **run)
    BatchrunOperator(task_id="usage_error", job=f"{HOME}/missing.jsonl",
                     output_path=HOME + "/out/x.parquet", **run)
    BatchrunOperator(task_id="interrupted", job=f"{HOME}/good.jsonl",
                     output_path=HOME + "/out/int.parquet",
                     env={"BATCHRUN_FAKE_ENGINE": '{"die_after_steps": 1}'}, **run)
'''

RUN_DAG = '''
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
assert not bag.import_errors, bag.import_errors
run = bag.get_dag("batchrun_codes").test(logical_date=pendulum.parse("2026-01-02"))
print("TASKS " + json.dumps({ti.task_id: [str(ti.state), ti.try_number]
                             for ti in run.get_task_instances()}))
'''


def test_exit_codes_become_success_skip_retry_or_fail_in_airflow(airflow_home) -> None:
    home, dags, env = airflow_home
    (dags / "codes_dag.py").write_text(textwrap.dedent(CODES_DAG))
    (home / "good.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (home / "some-bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    run = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", RUN_DAG, str(dags)], env=env,
                         capture_output=True, text=True, timeout=300)
    line = next((x for x in run.stdout.splitlines() if x.startswith("TASKS ")), None)
    assert line, (run.stdout + run.stderr)[-5000:]
    tasks = json.loads(line.removeprefix("TASKS "))
    assert tasks == {
        "ok": ["success", 1],
        "rows_failed": ["skipped", 1],
        "rows_failed_warn": ["success", 1],
        "usage_error": ["failed", 1],  # exit 2: not retried
        "interrupted": ["failed", 2],  # exit 4: retried (and it died again: the fake engine
    }                                  # dies at every start here)
    assert pq.read_table(home / "out" / "warn-2026-01-02.parquet")["error"].null_count == 1
