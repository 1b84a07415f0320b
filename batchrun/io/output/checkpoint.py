"""Durable results while a job runs: its checkpoint, `<output>.partial/`.

While a job runs, every engine step's finished results are appended as one record batch to an
Arrow IPC stream (a "journal") in `<output>.partial/`, and flushed, so a `kill -9` loses only
the requests still in flight. A resumed run reads the journals (a batch cut short by the kill
is dropped: its rows simply run again) and starts a new journal. When every row is done, the
journals are merged in input order into the output Parquet file (batchrun.io.output.writer):
written under a temporary name in the same folder, then renamed into place, so the output
path only ever holds a complete file. A checkpoint that holds no result yet (a kill before the
first one, a bad input) is simply replaced: it has nothing to lose, and it must not block the
next run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ...errors import CheckpointError
from ..files import fsync_dir
from ..schema import RESULT_SCHEMA

MANIFEST = "manifest.json"
# Written once every row is done, just before the output is renamed into place: a checkpoint
# that has it next to an existing output is one whose removal a kill interrupted.
COMPLETE = "complete"




def partial_dir_for(output: Path) -> Path:
    """The checkpoint folder of the job whose output (or staging base) is `output`."""
    return output.with_name(output.name + ".partial")


@dataclass
class Checkpoint:
    """The `<output>.partial/` folder of one job: its manifest and result journals."""

    path: Path

    @classmethod
    def open(cls, output: Path, manifest: dict[str, Any], *, resume: bool) -> Checkpoint:
        """Start a checkpoint, or continue one when resume is set and the manifest matches."""
        path = partial_dir_for(output)
        ckpt = cls(path)
        manifest = json.loads(json.dumps(manifest))  # as it reads back: tuples become lists
        if path.is_dir() and not ckpt.has_results():
            ckpt.remove()
        if path.exists():
            if not resume:
                raise CheckpointError(
                    f"an unfinished run of this job left {path}; add --resume to continue it, "
                    f"or --overwrite to throw it away and start over")
            ckpt._check_same_job(manifest)
            return ckpt
        try:
            path.mkdir(parents=True)
            tmp = path / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp, path / MANIFEST)
            fsync_dir(path)
        except OSError as e:
            ckpt.remove()
            raise CheckpointError(
                f"cannot create the checkpoint {path} ({e.strerror or e}); check that "
                f"{path.parent} is writable and has free space") from None
        return ckpt

    def _check_same_job(self, manifest: dict[str, Any]) -> None:
        try:
            old = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise CheckpointError(
                f"{self.path} has no readable {MANIFEST}; it is not a batchrun checkpoint, or "
                "it is damaged: remove it (or use --overwrite) to start over") from None
        for key, what in (("input", "the input file"), ("settings", "the model or sampling "
                                                                     "settings")):
            if old.get(key) != manifest.get(key):
                raise CheckpointError(
                    f"cannot resume: {what} changed since the interrupted run ({self.path}); "
                    "results would mix two jobs. Use --overwrite to start over")

    def journals(self) -> list[Path]:
        return sorted(self.path.glob("journal-*.arrows"))

    def has_results(self) -> bool:
        return next(journal_batches(self.journals()), None) is not None

    def read_done(self) -> pa.Table:
        """Every result recorded so far (complete batches only), at most once per row."""
        batches = list(journal_batches(self.journals()))
        if not batches:
            return RESULT_SCHEMA.empty_table()
        done = pa.Table.from_batches(batches, schema=RESULT_SCHEMA)
        # A row is journaled once per run; keep the first should a bug ever repeat it.
        first = pc.equal(pc.index_in(done["row"], done["row"]),
                         pa.array(range(done.num_rows), pa.int32()))
        return done.filter(first)

    def new_journal(self) -> ResultJournal:
        n = len(self.journals())
        return ResultJournal(self.path / f"journal-{n:05d}.arrows")

    def mark_complete(self) -> None:
        (self.path / COMPLETE).touch()

    def is_complete(self) -> bool:
        return (self.path / COMPLETE).exists()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def journal_batches(journals: list[Path]) -> Iterator[pa.RecordBatch]:
    """Every complete record batch of the journals, in order."""
    for journal in journals:
        try:
            with pa.OSFile(str(journal), "rb") as f, pa.ipc.open_stream(f) as reader:
                yield from reader
        except (pa.ArrowInvalid, OSError):
            pass  # the tail a kill (or a full disk) cut short; what was read before it stands


class ResultJournal:
    """Append-only Arrow IPC stream of results; each append is flushed to the OS at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, RESULT_SCHEMA)
        self._since_sync = 0
        self._failed = False

    def append(self, results: pa.Table) -> None:
        if results.num_rows == 0:
            return
        try:
            self._writer.write_table(results.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
            self._sink.flush()
            self._since_sync += results.num_rows
            if self._since_sync >= 4096:  # fsync now and then: survives a power cut too
                os.fsync(self._sink.fileno())
                self._since_sync = 0
        except OSError:
            # A write cut short (a full disk) leaves part of a batch at the end of the stream:
            # readers stop there, as after a kill, as long as nothing is written after it.
            self._failed = True
            raise

    def close(self) -> None:
        try:
            if not self._failed:
                self._writer.close()
                self._sink.flush()
                os.fsync(self._sink.fileno())
        finally:
            self._sink.close()
