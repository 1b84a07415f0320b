"""Durable results: a checkpoint while the job runs, one Parquet file when it is done.

While a job runs, every engine step's finished results are appended as one record batch to an
Arrow IPC stream (a "journal") in `<output>.partial/`, and flushed, so a `kill -9` loses only
the requests still in flight. A resumed run reads the journals (a batch cut short by the kill
is dropped: its rows simply run again) and starts a new journal. When every row is done, the
journals are merged in input order into the output Parquet file: written under a temporary
name in the same folder, then renamed into place, so the output path only ever holds a
complete file. A checkpoint that holds no result yet (a kill before the first one, a bad input)
is simply replaced: it has nothing to lose, and it must not block the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from ...errors import CheckpointError
from ..schema import RESULT_SCHEMA
from ..storage import (
    Location,
    expand,
    reading_input,
    remote_fingerprint,
)

MANIFEST = "manifest.json"
# Written once every row is done, just before the output is renamed into place: a checkpoint
# that has it next to an existing output is one whose removal a kill interrupted.
COMPLETE = "complete"
ROW_GROUP_SIZE = 65_536


class JobLock:
    """One run of a job (one output path) at a time.

    Two runs of one job (a nightly cron run that overran into the next night's, an Airflow
    retry next to a stuck attempt) would both append to its journals and write its output.
    The lock is an flock on a hidden file next to the output: the kernel releases it when its
    process dies, kill -9 included, so a killed run never leaves a stale lock behind."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(f".{output.name}.lock")
        self._fd: int | None = None

    def __enter__(self) -> JobLock:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CheckpointError(
                    f"cannot create {self.path} ({e.strerror or e}); check that "
                    f"{self.path.parent} is writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"another batchrun is running this job (pid {holder}, lock {self.path}); "
                    "wait for it to finish, or stop it and re-run with --resume") from None
            # The holder may have released and removed the file between our open and flock:
            # then this lock is on a file nobody else will find. Take the current one.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still held: nobody can take the file unlinked
            os.close(self._fd)
            self._fd = None


def partial_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def file_fingerprint(path: Location) -> dict[str, Any]:
    """What identifies the input's content, so a resume never mixes results of two inputs:
    a content hash of each local file; size and modification time of each remote object (a
    hash would download it). A dataset lists every file it reads."""
    files = expand(path)
    if files == [path] and isinstance(path, Path):
        return _local_fingerprint(path)
    return {"path": str(path), "files": [_local_fingerprint(f) if isinstance(f, Path)
                                         else remote_fingerprint(f) for f in files]}


def _local_fingerprint(path: Path) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    with reading_input(path), open(path, "rb") as f:
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
            _fsync_dir(path)
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


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: same folder (a rename across
    file systems is not atomic), hidden, named after this process. Temp files that killed
    writers left are removed first: the output path is this job's alone."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_openai_lines(f: TextIO, table: pa.Table, model: str) -> None:
    """One line per row, in the shape of OpenAI's Batch API output file: a success carries the
    chat.completion / text_completion body the API would have returned (what the `openai`
    package's ChatCompletion / Completion models read), a failure the documented error."""
    names = RESULT_SCHEMA.names + (["endpoint"] if "endpoint" in table.column_names else [])
    run = uuid.uuid4().hex[:16]  # ids are unique per file, as OpenAI's are per batch
    created = int(time.time())
    for start in range(0, table.num_rows, ROW_GROUP_SIZE):  # bounded memory for to_pylist
        for r in table.select(names).slice(start, ROW_GROUP_SIZE).to_pylist():
            f.write(json.dumps(_openai_line(r, run, created, model))
                    + "\n")


def _openai_line(r: dict[str, Any], run: str, created: int, model: str) -> dict[str, Any]:
    line_id = f"batch_req_{run}_{r['row']}"
    if r["error"] is not None:
        return {"id": line_id, "custom_id": r["id"], "response": None,
                "error": {"code": "row_error", "message": r["error"]}}
    chat = r.get("endpoint") == "chat"
    choice: dict[str, Any] = {"index": 0, "finish_reason": r["finish_reason"]}
    if chat:
        choice["message"] = {"role": "assistant", "content": r["text"], "refusal": None}
        choice["logprobs"] = None if r["logprobs"] is None else {
            "content": [_chat_logprob(t) for t in r["logprobs"]], "refusal": None}
    else:
        choice["text"] = r["text"]
        choice["logprobs"] = None if r["logprobs"] is None else _completion_logprobs(
            r["logprobs"])
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{run}-{r['row']}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": model, "choices": [choice],
        "usage": {"prompt_tokens": r["prompt_tokens"],
                  "completion_tokens": r["completion_tokens"],
                  "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                  "prompt_tokens_details": {"cached_tokens": r["cached_tokens"]}},
    }
    return {"id": line_id, "custom_id": r["id"],
            "response": {"status_code": 200, "request_id": f"req_{run}_{r['row']}",
                         "body": body},
            "error": None}


def _chat_logprob(t: dict[str, Any]) -> dict[str, Any]:
    """A token's logprobs as chat.completion's `logprobs.content` holds them."""
    return {"token": t["token"], "logprob": t["logprob"], "bytes": list(_utf8(t["token"])),
            "top_logprobs": [{"token": top["token"], "logprob": top["logprob"],
                              "bytes": list(_utf8(top["token"]))}
                             for top in t["top_logprobs"]]}


def _completion_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """A completion's logprobs as text_completion (OpenAI's legacy shape) holds them."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in tokens],
            "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{top["token"]: top["logprob"] for top in t["top_logprobs"]}
                             for t in tokens],
            "text_offset": offsets}


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
