"""A full disk while a job writes leaves a checkpoint that `--resume` finishes from, and one
clear message (exit 4); no room for the checkpoint at all is a clear error (exit 2).

The disk fills up by monkeypatching (portable), and for real on a tiny tmpfs where this
process may mount one (root in a container or VM; skipped elsewhere)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, CheckpointError
from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for
from batchrun.job.run import run_job
from tests.helpers import job
from tests.reliability.harness import batchrun, check_output, journaled_rows, write_rows

NEW_STREAM = pa.ipc.new_stream  # the real one, for the stand-in below


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillingWriter:
    """Stands in for a journal's Arrow stream writer on a disk with room for `room` more
    batches: the next write gets part of its bytes onto the disk, then fails, as a write
    that runs out of space does."""

    def __init__(self, sink: pa.NativeFile, schema: pa.Schema, room: int) -> None:
        self._sink, self._room = sink, room
        self._writer = NEW_STREAM(sink, schema)

    def write_table(self, table: pa.Table) -> None:
        start = self._sink.tell()
        self._writer.write_table(table)
        if self._room == 0:
            os.ftruncate(self._sink.fileno(), start + (self._sink.tell() - start) // 2)
            raise no_space()
        self._room -= 1

    def close(self) -> None:
        self._writer.close()


def run_fake(cfg: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("engine", FakeEngine(max_num_seqs=8))
    return run_job(cfg, engine_kind="fake", interactive=False, handle_signals=False, **kwargs)


def test_a_full_disk_while_journaling_exits_4_and_resume_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 80)
    cfg = job(tmp_path, tmp_path / "in.jsonl", max_tokens=8)
    monkeypatch.setattr("batchrun.io.output.checkpoint.pa.ipc.new_stream",
                        lambda sink, schema: FillingWriter(sink, schema, room=3))
    full = run_fake(cfg)
    monkeypatch.undo()
    assert full.exit_code == EXIT_INTERRUPTED and full.summary["status"] == "write_failed"
    assert full.message.startswith("cannot write results (No space left on device)")
    assert "free space and re-run with --resume" in full.message
    saved = journaled_rows(cfg.output.local_path)
    assert saved and len(saved) == len(set(saved))  # three whole batches; the cut one is not
    engine = FakeEngine()
    assert run_fake(cfg, engine=engine, resume=True).exit_code == EXIT_OK
    check_output(cfg.output.local_path, ids)
    assert sorted(engine.admission_order) == sorted(set(ids) - {f"q{r}" for r in saved})


def test_a_full_disk_while_writing_the_output_keeps_the_finished_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 30)
    cfg = job(tmp_path, tmp_path / "in.jsonl", max_tokens=4)

    def half_written(writer: pq.ParquetWriter, table: pa.Table, **_: Any) -> None:
        raise no_space()  # the writer's file holds its header only: a cut-short file

    real_write_text = Path.write_text

    def summary_too(self: Path, *args: Any, **kwargs: Any) -> int:
        if "summary" in self.name:
            raise no_space()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half_written)
    monkeypatch.setattr(Path, "write_text", summary_too)  # the disk is still full after it
    full = run_fake(cfg)
    monkeypatch.undo()
    assert full.exit_code == EXIT_INTERRUPTED and full.summary["status"] == "write_failed"
    assert full.message.startswith("cannot write the output (No space left on device)")
    assert not cfg.output.exists()
    out = cfg.output.local_path
    assert [p.name for p in out.parent.iterdir()] == [out.name + ".partial"]
    # Every row is in the checkpoint: the resume writes the output and generates nothing.
    resumed = run_fake(cfg, engine=FakeEngine(die_after_steps=0), resume=True)
    assert resumed.exit_code == EXIT_OK, resumed.message
    check_output(cfg.output.local_path, ids)


def test_no_room_for_the_checkpoint_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_rows(tmp_path / "in.jsonl", 3)
    cfg = job(tmp_path, tmp_path / "in.jsonl")

    def full(self: Path, *_: Any, **__: Any) -> int:
        raise no_space()

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint .*No space left "
                                              r"on device.*writable and has free space"):
        run_fake(cfg)
    assert not partial_dir_for(cfg.output.local_path).exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 96 KiB tmpfs: a few dozen journal batches fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched tests cover it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_through_the_cli(tmp_path: Path, tiny_disk: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 600)
    out = tiny_disk / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--max-tokens", "24")
    full = batchrun(*args, fake_engine={"max_num_seqs": 4})
    assert full.returncode == EXIT_INTERRUPTED, full.stderr
    assert "No space left on device" in full.stderr and "--resume" in full.stderr
    assert "Traceback" not in full.stderr
    saved = journaled_rows(out)
    assert 0 < len(saved) < len(ids)
    # Free space (grow the disk), then the same command with --resume finishes the job.
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    resumed = batchrun(*args, "--resume")
    assert resumed.returncode == EXIT_OK, resumed.stderr
    check_output(out, ids)
    assert not Checkpoint(partial_dir_for(out)).path.exists()
