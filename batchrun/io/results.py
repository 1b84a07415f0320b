"""Durable results: a checkpoint while the job runs, one Parquet file when it is done.

While a job runs, every engine step's finished results are appended as one record batch to an
Arrow IPC stream (a "journal") in `<output>.partial/`, and flushed, so a `kill -9` loses only
the requests still in flight. A resumed run reads the journals (a batch cut short by the kill
is dropped: its rows simply run again) and starts a new journal. When every row is done, the
journals are merged in input order into the output Parquet file: written under a temporary
name in the same folder, then renamed into place, so the output path only ever holds a
complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import RESULT_SCHEMA

MANIFEST = "manifest.json"
ROW_GROUP_SIZE = 65_536


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used as asked; the message says what to do instead."""


def partial_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Content hash of the input, so a resume never mixes results of two different inputs."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "blake2b": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        if path.exists():
            if not resume:
                raise CheckpointError(
                    f"an unfinished run of this job left {path}; add --resume to continue it, "
                    f"or --overwrite to throw it away and start over")
            ckpt._check_same_job(manifest)
            return ckpt
        path.mkdir(parents=True)
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, path / MANIFEST)
        _fsync_dir(path)
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

    def read_done(self) -> pa.Table:
        """Every result recorded so far (complete batches only), at most once per row."""
        tables = []
        for journal in self.journals():
            tables.extend(_read_complete_batches(journal))
        if not tables:
            return RESULT_SCHEMA.empty_table()
        done = pa.concat_tables(tables)
        # A row is journaled once per run; keep the first should a bug ever repeat it.
        first = pc.equal(pc.index_in(done["row"], done["row"]),
                         pa.array(range(done.num_rows), pa.int32()))
        return done.filter(first)

    def new_journal(self) -> ResultJournal:
        n = len(self.journals())
        return ResultJournal(self.path / f"journal-{n:05d}.arrows")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read_complete_batches(journal: Path) -> list[pa.Table]:
    out = []
    try:
        with pa.OSFile(str(journal), "rb") as f, pa.ipc.open_stream(f) as reader:
            while True:
                try:
                    out.append(pa.Table.from_batches([reader.read_next_batch()]))
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError):
        pass  # the tail that a kill cut short; what was read before it stands
    return out


class ResultJournal:
    """Append-only Arrow IPC stream of results; each append is flushed to the OS at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, RESULT_SCHEMA)
        self._since_sync = 0

    def append(self, results: pa.Table) -> None:
        if results.num_rows == 0:
            return
        self._writer.write_table(results.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
        self._sink.flush()
        self._since_sync += results.num_rows
        if self._since_sync >= 4096:  # fsync now and then: survives a power cut, not only a kill
            os.fsync(self._sink.fileno())
            self._since_sync = 0

    def close(self) -> None:
        try:
            self._writer.close()
            self._sink.flush()
            os.fsync(self._sink.fileno())
        finally:
            self._sink.close()


def write_final_parquet(
    results: pa.Table, passthrough: pa.Table | None, output: Path, metadata: dict[str, Any]
) -> pa.Table:
    """Write results (one per input row, any order) in input order, atomically, and return
    the table written. Passthrough columns are joined by row position."""
    table = results.sort_by("row")
    if passthrough is not None and passthrough.num_columns:
        extra = passthrough.take(table["row"])
        for name in extra.column_names:
            if name not in table.column_names:
                table = table.append_column(name, extra[name])
    meta = {b"batchrun": json.dumps(metadata, sort_keys=True, default=str).encode()}
    table = table.replace_schema_metadata(meta)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
        _fsync_dir(output.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return table


def write_openai_jsonl(table: pa.Table, path: Path, *, model: str) -> None:
    """Results in the OpenAI Batch API output format, one line per input row. An `endpoint`
    column ("chat" / "completion") picks chat.completion or text_completion bodies."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        names = RESULT_SCHEMA.names + (["endpoint"] if "endpoint" in table.column_names else [])
        for r in table.select(names).to_pylist():
            if r["error"] is not None:
                line = {"id": f"batch_req_{r['row']}", "custom_id": r["id"], "response": None,
                        "error": {"code": "row_error", "message": r["error"]}}
            else:
                choice: dict[str, Any] = {"index": 0, "finish_reason": r["finish_reason"]}
                if r.get("endpoint") == "chat":
                    obj = "chat.completion"
                    choice["message"] = {"role": "assistant", "content": r["text"]}
                else:
                    obj = "text_completion"
                    choice["text"] = r["text"]
                body = {
                    "object": obj, "model": model, "choices": [choice],
                    "usage": {"prompt_tokens": r["prompt_tokens"],
                              "completion_tokens": r["completion_tokens"],
                              "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                              "prompt_tokens_details": {"cached_tokens": r["cached_tokens"]}},
                }
                line = {"id": f"batch_req_{r['row']}", "custom_id": r["id"],
                        "response": {"status_code": 200, "body": body}, "error": None}
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)
