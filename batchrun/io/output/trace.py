"""The run's per-step trace, kept with the checkpoint: the source of the HTML report.

Every engine step is one row (TRACE_SCHEMA: when it ended, how long it took, the running
batch, prompt and completion tokens, KV-cache use, preemptions, which replica ran it),
appended in record batches to an Arrow IPC stream `trace-NNNNN.arrows` in the checkpoint
folder, one stream per run of the job, as the result journals are. A resumed run adds its
own stream beside those of earlier runs, so once the job completes the merged trace
(`<output>.trace.arrow`, an Arrow IPC file: not `.parquet`, which a glob over an output
folder's Parquet files would take for data) covers the whole job. Each run also leaves the
start and end of its stages (`stages-NNNNN.json`): the report draws them as bands on the time
axis.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather

from ..files import temp_path

TRACE_SCHEMA = pa.schema([
    pa.field("time", pa.float64()),  # seconds since the epoch when the step ended
    pa.field("seconds", pa.float32()),  # how long the step took
    pa.field("batch", pa.int32()),  # requests the step advanced
    pa.field("prompt_tokens", pa.int32()),  # prompt tokens computed (cache hits excluded)
    pa.field("completion_tokens", pa.int32()),
    pa.field("kv_usage", pa.float32()),  # share of the KV cache in use; null: not known
    pa.field("preempted", pa.int32()),
    pa.field("replica", pa.int16()),  # -1: the job's one engine
    pa.field("run", pa.int16()),  # which run of the job (0, then one more per --resume)
])


def trace_path_for(output: Path) -> Path:
    """The merged trace of a finished job, beside its output (and its summary)."""
    return output.with_name(output.name + ".trace.arrow")


def _numbered(folder: Path, prefix: str, suffix: str) -> list[Path]:
    return sorted(folder.glob(f"{prefix}-*{suffix}"))


def run_number(checkpoint: Path) -> int:
    """This run's number: the count of runs that left a trace in the checkpoint before it."""
    return len(_numbered(checkpoint, "trace", ".arrows"))


class TraceJournal:
    """One run's trace stream in the checkpoint; each append is flushed to the OS."""

    def __init__(self, checkpoint: Path) -> None:
        self.run = run_number(checkpoint)
        self.path = checkpoint / f"trace-{self.run:05d}.arrows"
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, TRACE_SCHEMA)

    def append(self, steps: pa.Table) -> None:
        if steps.num_rows:
            steps = steps.set_column(steps.schema.get_field_index("run"), "run",
                                     pa.array([self.run] * steps.num_rows, pa.int16()))
            self._writer.write_table(steps.cast(TRACE_SCHEMA))
            self._sink.flush()

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def read_trace(checkpoint: Path) -> pa.Table:
    """Every complete step record the checkpoint's trace streams hold, runs in order."""
    batches = []
    for path in _numbered(checkpoint, "trace", ".arrows"):
        try:
            with pa.OSFile(str(path), "rb") as f, pa.ipc.open_stream(f) as reader:
                batches.extend(reader)
        except (pa.ArrowInvalid, OSError):
            pass  # the tail a kill cut short; what was read before it stands
    return pa.Table.from_batches(batches, schema=TRACE_SCHEMA)


def save_stage_spans(checkpoint: Path, run: int, spans: dict[str, list[list[float]]]) -> None:
    """This run's stages: {stage: [[start, end], ...]} in seconds since the epoch."""
    path = checkpoint / f"stages-{run:05d}.json"
    tmp = temp_path(path)
    tmp.write_text(json.dumps(spans))
    os.replace(tmp, path)


def load_stage_spans(checkpoint: Path) -> list[dict[str, Any]]:
    """Every run's stage spans: [{run, stage, start, end}], runs in order."""
    spans = []
    for path in _numbered(checkpoint, "stages", ".json"):
        try:
            run = int(path.stem.split("-")[1])
            for stage, times in json.loads(path.read_text()).items():
                spans.extend({"run": run, "stage": stage, "start": start, "end": end}
                             for start, end in times)
        except (OSError, ValueError, IndexError):
            continue  # a damaged file costs the report its bands, not the job
    return spans


def write_trace(checkpoint: Path, output: Path) -> Path:
    """The checkpoint's trace merged into `<output>.trace.arrow` (atomically)."""
    path = trace_path_for(output)
    tmp = temp_path(path)
    feather.write_feather(read_trace(checkpoint), tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_saved_trace(output: Path) -> pa.Table:
    """The merged trace of a finished job (`write_trace`)."""
    return feather.read_table(trace_path_for(output))
