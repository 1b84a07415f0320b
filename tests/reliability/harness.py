"""Drive batchrun the way cron and Airflow do (a subprocess running the CLI) and inspect what
it leaves on disk: the checkpoint journals, the output, the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from click.testing import Result
from typer.testing import CliRunner

from batchrun.cli import app
from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for

REPO = Path(__file__).resolve().parents[2]
KILL_AT = Path(__file__).with_name("kill_at.py")
TRACED = Path(__file__).with_name("traced.py")


@dataclass
class Tally:
    """Counts across the suite (printed by conftest.py): every SIGKILL a run survived, every
    input row missing from or repeated in a final output, every fuzz case tried."""

    kills: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    fuzz_cases: int = 0

    @property
    def touched(self) -> bool:
        return bool(self.kills or self.fuzz_cases or self.rows_lost or self.rows_duplicated)


TALLY = Tally()


def cli_env(fake_engine: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment of a CLI run: the fake engine's knobs, nothing inherited that changes
    how errors are shown."""
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHRUN_DEBUG",)}
    env["BATCHRUN_FAKE_ENGINE"] = json.dumps(fake_engine or {})
    env["PYTHONPATH"] = str(REPO)
    return env


def batchrun(*args: str | Path, fake_engine: dict[str, Any] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m batchrun ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "batchrun", *map(str, args)], cwd=REPO,
                          env=cli_env(fake_engine), capture_output=True, text=True,
                          timeout=timeout)


def start_batchrun(*args: str | Path, fake_engine: dict[str, Any] | None = None,
                   kill_at: str | None = None) -> subprocess.Popen[str]:
    """`python -m batchrun ARGS` in the background; with kill_at ("module:attr [after]"),
    the process SIGKILLs itself when that function is called (see kill_at.py)."""
    prefix = [str(KILL_AT), *kill_at.split(), "--"] if kill_at else ["-m", "batchrun"]
    return subprocess.Popen([sys.executable, *prefix, *map(str, args)], cwd=REPO,
                            env=cli_env(fake_engine), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_traced(events: Path, *args: str | Path, fake_engine: dict[str, Any] | None = None,
                 pause: tuple[int, ...] = (), hang: str | None = None) -> subprocess.Popen[str]:
    """`python -m batchrun ARGS` in the background, writing its events (engine steps, signals
    received; see traced.py) to `events`; after each engine step numbered in `pause` the
    engine waits for the next signal; with hang ("module:attr"), that function hangs."""
    options = [f"hang={hang}"] if hang else []
    options += [f"pause={','.join(map(str, pause))}"] if pause else []
    return subprocess.Popen([sys.executable, str(TRACED), str(events), *options, "--",
                             *map(str, args)], cwd=REPO, env=cli_env(fake_engine),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(path: Path) -> list[list[str]]:
    """The events a traced run wrote so far, each split into its words."""
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_event(path: Path, proc: subprocess.Popen[str], done: Any,
                   timeout: float = 120) -> list[list[str]]:
    """Poll a traced run's events until done(events) holds; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = proc.poll() is not None
        seen = events(path)
        if done(seen):
            return seen
        if ended:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the event; "
                                 f"events: {seen[-5:]}")
        time.sleep(0.01)
    raise AssertionError(f"no such event in {timeout} s")


def cli(*args: str | Path) -> Result:
    """`batchrun ARGS` in this process (typer's CliRunner): for many fast runs. Fails the
    test if anything but a clean exit (typer.Exit) came out of the command."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}\n{result.stderr}"
    return result


def journaled_rows(output: Path) -> list[int]:
    """Row numbers in the checkpoint's journals as a resume would read them: every complete
    batch, in every journal, repeats included (a row journaled twice is a bug)."""
    ckpt = Checkpoint(partial_dir_for(output))
    rows: list[int] = []
    for journal in ckpt.journals():
        try:
            with pa.OSFile(str(journal), "rb") as f, pa.ipc.open_stream(f) as reader:
                for batch in reader:
                    rows.extend(batch.column("row").to_pylist())
        except (pa.ArrowInvalid, OSError):
            pass  # a batch cut short by the kill
    return rows


def wait_for_rows(output: Path, proc: subprocess.Popen[str], at_least: int,
                  timeout: float = 120) -> int:
    """Poll the journals until `at_least` rows are in them or the process ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(journaled_rows(output))
        if n >= at_least or proc.poll() is not None:
            return n
        time.sleep(0.02)
    raise AssertionError(f"no {at_least} rows journaled in {timeout} s")


@dataclass
class Killed:
    alive: bool  # it was still running: the kill really happened
    stderr: str  # what the run printed to its stderr (the user's terminal) until then

    def __bool__(self) -> bool:
        return self.alive


def kill9(proc: subprocess.Popen[str]) -> Killed:
    """SIGKILL the run; true when it was still running (a kill that really happened)."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    return Killed(alive, stderr)


@contextmanager
def fails_instead_of_hanging(seconds: int) -> Iterator[None]:
    """Turns a hang of the code inside into a test failure after `seconds`."""
    def hung(*_: object) -> None:
        raise AssertionError(f"still running after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_output(output: Path, ids: list[str]) -> pa.Table:
    """The output holds every input row exactly once, in input order: counted in TALLY."""
    table = pq.read_table(output)
    got = table["id"].to_pylist()
    lost = set(ids) - set(got)
    repeated = len(got) - len(set(got))
    TALLY.rows_lost += len(lost)
    TALLY.rows_duplicated += repeated
    assert not lost and not repeated, f"lost {sorted(lost)[:10]}, {repeated} repeated"
    assert got == ids and table["row"].to_pylist() == list(range(len(ids)))
    return table


def admitted(log: Path) -> list[str]:
    """Request ids a fake engine started with {"admitted_log": log} admitted, in order."""
    return log.read_text().split() if log.exists() else []


def check_nothing_finished_ran_again(log: Path, finished_rows: list[int]) -> None:
    """A run's fake engine (its `admitted_log`) admitted no row that had finished before the
    run (rows of write_rows: id q<row>), and no row twice. The output alone cannot show this:
    a resume drops the duplicates of finished rows before it writes the Parquet file."""
    ran = admitted(log)
    again = sorted(set(ran) & {f"q{r}" for r in finished_rows})
    assert not again, f"{len(again)} finished row(s) generated again: {again[:10]}"
    assert len(ran) == len(set(ran)), "a row was admitted twice in one run"


def check_summary_tokens(output: Path) -> None:
    """The job's summary counts the tokens of the output's rows, after any number of
    resumes: each finished row once, whichever run generated it."""
    summary = json.loads(output.with_name(output.name + ".summary.json").read_text())
    ok = pq.read_table(output).filter(pc.is_null(pc.field("error")))
    for key, column in (("prompt", "prompt_tokens"), ("cached", "cached_tokens"),
                        ("completion", "completion_tokens")):
        assert summary["tokens"][key] == pc.sum(ok[column]).as_py(), key
    assert summary["succeeded"] == ok.num_rows


def write_rows(path: Path, n: int, **extra: Any) -> list[str]:
    """n JSONL rows sharing a few prefixes; returns their ids."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"Family {i % 5}: " + "shared context " * 8 + f"question {i}"
            f.write(json.dumps({"id": f"q{i}", "prompt": prompt, **extra}) + "\n")
    return [f"q{i}" for i in range(n)]
