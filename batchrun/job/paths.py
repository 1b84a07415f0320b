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
from ..io import storage
from ..model import cache_root


@dataclass(frozen=True)
class OutputPaths:
    """Where a job's files go. `dest` is the output the user named (a local path or a URI);
    `local` is where this machine writes the Parquet file: `dest` itself, or for a remote
    output a staging file in the work dir, uploaded once complete. The checkpoint
    (`<base>.partial/`) and the lock (`.<base name>.lock`) derive from `base`, which is
    `<work dir>/<output name>`: for a local output and no work dir, the output itself."""

    dest: storage.Location
    local: Path
    base: Path
    openai_dest: storage.Location | None = None
    openai_local: Path | None = None

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.dest)


def default_work_dir(uri: str) -> Path:
    """The local folder of a remote output's checkpoint: one per output URI, in the cache."""
    return cache_root() / "work" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def output_paths(config: JobConfig) -> OutputPaths:
    dest = config.output
    if storage.is_uri(dest):
        work = config.work_dir or default_work_dir(str(dest))
        base = local = work / storage.name(dest)
    else:
        work = config.work_dir or dest.parent
        base, local = work / dest.name, dest
    openai_local = None
    if config.openai_output is not None:
        openai_local = (work / f"openai-{storage.name(config.openai_output)}"
                        if storage.is_uri(config.openai_output) else config.openai_output)
    return OutputPaths(dest, local, base, config.openai_output, openai_local)


def _same_location(a: storage.Location, b: storage.Location) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a) == str(b)


def check_output_paths(config: JobConfig) -> None:
    """Refuse output paths where writing (or declaring the job done) would be wrong."""
    for path in filter(None, (config.output, config.openai_output)):
        if storage.is_dir(path):
            example = (path / "results.parquet" if isinstance(path, Path)
                       else storage.join(str(path), "results.parquet"))
            raise ConfigError(f"output {path} is a folder; name a file, e.g. {example}")
        if _same_location(path, config.input):
            raise ConfigError(f"output {path} is the input file; write results elsewhere")
    if storage.is_uri(config.work_dir):
        raise ConfigError(f"work_dir must be a local folder, not {config.work_dir}")
    if storage.exists(config.output) and not _is_batchrun_output(config.output):
        raise ConfigError(f"{config.output} exists but is not a batchrun output; move it away, "
                          "choose another output path, or use --overwrite to replace it")


def _is_batchrun_output(path: storage.Location) -> bool:
    try:
        return b"batchrun" in (pq.read_schema(storage.open_random(path)).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def remove_staged(paths: OutputPaths) -> None:
    """The local copies of remote outputs, once uploaded."""
    if paths.remote:
        paths.local.unlink(missing_ok=True)
    if paths.openai_local is not None and storage.is_uri(paths.openai_dest):
        paths.openai_local.unlink(missing_ok=True)
