"""Where a job's files go: the output (local or remote), its staging copy, the checkpoint
and the lock, and the checks that refuse outputs where writing would be wrong."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import JobConfig
from ..errors import ConfigError
from ..io.storage import Location
from ..model import cache_root


@dataclass(frozen=True)
class OutputPaths:
    """Where a job's files go. `dest` is the output the user named (a local path or a URI);
    `local` is where this machine writes the Parquet file: `dest` itself, or for a remote
    output a staging file in the work dir, uploaded once complete. The checkpoint
    (`<base>.partial/`) and the lock (`.<base name>.lock`) derive from `base`, which is
    `<work dir>/<output name>`: for a local output and no work dir, the output itself."""

    dest: Location
    local: Path
    base: Path
    openai_dest: Location | None = None
    openai_local: Path | None = None

    def staged(self) -> list[tuple[Path, Location]]:
        """The files written here for a remote destination, and where each is uploaded once
        complete: the OpenAI file first, then the Parquet file."""
        files = []
        if self.openai_dest is not None and self.openai_local is not None \
                and self.openai_dest.is_remote:
            files.append((self.openai_local, self.openai_dest))
        if self.dest.is_remote:
            files.append((self.local, self.dest))
        return files


def default_work_dir(uri: str) -> Path:
    """The local folder of a remote output's checkpoint: one per output URI, in the cache."""
    return cache_root() / "work" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def output_paths(config: JobConfig) -> OutputPaths:
    dest = config.output
    if dest.is_remote:
        work = config.work_dir or default_work_dir(str(dest))
        base = local = work / dest.name
    else:
        local = dest.local_path
        work = config.work_dir or local.parent
        base = work / local.name
    openai, openai_local = config.openai_output, None
    if openai is not None:
        openai_local = work / f"openai-{openai.name}" if openai.is_remote else openai.local_path
    return OutputPaths(dest, local, base, openai, openai_local)


def check_output_paths(config: JobConfig) -> None:
    """Refuse output paths where writing (or declaring the job done) would be wrong."""
    for location in filter(None, (config.output, config.openai_output)):
        if location.is_dir():
            raise ConfigError(f"output {location} is a folder; name a file, e.g. "
                              f"{location.join('results.parquet')}")
        if location.same_as(config.input):
            raise ConfigError(f"output {location} is the input file; write results elsewhere")
    if config.output.exists() and not _is_batchrun_output(config.output):
        raise ConfigError(f"{config.output} exists but is not a batchrun output; move it away, "
                          "choose another output path, or use --overwrite to replace it")


def _is_batchrun_output(location: Location) -> bool:
    try:
        return b"batchrun" in (pq.read_schema(location.open_random()).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def remove_staged(paths: OutputPaths) -> None:
    """The local copies of remote outputs, once uploaded."""
    for local, _ in paths.staged():
        local.unlink(missing_ok=True)
