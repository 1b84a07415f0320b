"""Where job files, inputs and outputs live: a `Location`, a local path or a URI (`s3://bucket/key`,
`gs://bucket/key`, or any scheme pyarrow's file systems or fsspec know).

S3 takes its credentials, region and endpoint from the standard AWS variables:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or ~/.aws), AWS_REGION or
AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (a MinIO, Ceph or test
endpoint). pyarrow does not read AWS_ENDPOINT_URL itself: it is passed on from here.

Inputs may also be datasets: a folder (every `.parquet`, `.jsonl`, `.ndjson` and `.json` file
in it and its subfolders, skipping names that start with `.` or `_`, like pyarrow datasets) or
a glob (`data/*.parquet`, `s3://bucket/day=*/part-*.parquet`), in sorted path order
(batchrun.io.datasets).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from ..errors import ConfigError, InputError, one_line

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
GLOB_CHARS = re.compile(r"[*?\[]")
# Object stores where an object appears only once its upload completes.
_ATOMIC_PUT = ("s3", "gcs")


def _is_uri(value: object) -> bool:
    """A remote location written as text: a `scheme://` string other than file://."""
    if not isinstance(value, str):
        return False
    m = _URI.match(value)
    return bool(m) and m.group(1).lower() != "file"


@dataclass(frozen=True)
class Location:
    """A place a job reads or writes: a local path, or a remote object (or prefix) named by a
    URI. Every "local or remote?" question is answered here, once. Immutable and hashable;
    `str()` is the local path or the URI exactly as batchrun prints it (summaries, messages).

    Build one with `Location.of` from what a user wrote, or `Location.coerce` from a value
    already meant as a location (a Path or a URI string given from Python). A local location
    is also os.PathLike, so open() and pyarrow take it as they take its Path."""

    where: Path | str  # a Path when local; the URI as written when remote

    def __post_init__(self) -> None:
        if isinstance(self.where, str) and not _is_uri(self.where):
            raise ValueError(f"{self.where!r} is not a URI; use Location.of or "
                             "Location.coerce for a local path")

    # --- Making one ----------------------------------------------------------------------

    @classmethod
    def of(cls, value: str | os.PathLike[str] | Location,
           base: Location | None = None) -> Location:
        """What a user wrote (a flag, a job file line, an API argument): a URI stays as
        written; a local path is made absolute (`~` expanded, a relative one taken against
        `base`, a job file's folder, or else the working directory). Under a remote base a
        relative path joins it and an absolute one is local. file:// URIs are local paths."""
        if isinstance(value, Location):
            return value
        given = cls.coerce(value)
        if isinstance(given.where, str):
            return given
        path = given.where
        if base is not None and base.is_remote:
            return given if path.is_absolute() else base.join(str(path))
        path = path.expanduser()
        if base is not None and not path.is_absolute():
            path = base.local_path / path
        return cls(path.resolve())

    @classmethod
    def coerce(cls, value: str | os.PathLike[str] | Location) -> Location:
        """A value already meant as a location, kept as given (nothing resolved): a Location,
        a Path, a URI string, or a string naming a local path (file:// URIs too)."""
        if isinstance(value, Location):
            return value
        if isinstance(value, str):
            if _is_uri(value):
                return cls(value)
            if _URI.match(value):  # file://
                value = urlsplit(value).path
        return cls(Path(value))

    # --- What it is ----------------------------------------------------------------------

    @property
    def is_remote(self) -> bool:
        """True for a URI (object storage, ...), False for a path on this machine."""
        return isinstance(self.where, str)

    @property
    def local_path(self) -> Path:
        """The Path of a local location; ValueError for a remote one (ask `is_remote`, or
        `require_local` where a user gave it)."""
        if isinstance(self.where, str):
            raise ValueError(f"{self.where} is remote: it has no local path")
        return self.where

    def require_local(self, what: str) -> Path:
        """The local Path; ConfigError naming `what` (e.g. "work_dir") when it is remote."""
        if self.is_remote:
            raise ConfigError(f"{what} must be a local folder, not {self}")
        return self.local_path

    @property
    def name(self) -> str:
        """The last part of the path or key: `out.parquet`."""
        if isinstance(self.where, Path):
            return self.where.name
        return posixpath.basename(urlsplit(self.where).path.rstrip("/"))

    @property
    def parent(self) -> Location:
        """The folder (or key prefix) holding it."""
        if isinstance(self.where, Path):
            return Location(self.where.parent)
        parts = urlsplit(self.where)
        return Location(f"{parts.scheme}://{parts.netloc}"
                        f"{posixpath.dirname(parts.path.rstrip('/'))}")

    def join(self, relative: str) -> Location:
        """A path under (or, with `..`, beside) this one: `s3://b/jobs` + `../data/x` ->
        `s3://b/data/x`; locally `folder / relative` as written."""
        if isinstance(self.where, Path):
            return Location(self.where / relative)
        parts = urlsplit(self.where)
        key = posixpath.normpath(posixpath.join(parts.path or "/", relative))
        return Location(f"{parts.scheme}://{parts.netloc}{key}")

    def same_as(self, other: Location) -> bool:
        """Whether both name the same file: local paths after resolving links and `..`,
        URIs as written."""
        if isinstance(self.where, Path) and isinstance(other.where, Path):
            return self.where.resolve() == other.where.resolve()
        return str(self) == str(other)

    def is_glob(self) -> bool:
        """A pattern, not a path: it holds * ? or [ and names nothing that exists as written."""
        text = str(self.where) if isinstance(self.where, Path) else urlsplit(self.where).path
        if not GLOB_CHARS.search(text):
            return False
        return not self.exists()

    def __str__(self) -> str:
        return str(self.where)

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __fspath__(self) -> str:
        if isinstance(self.where, str):
            raise TypeError(f"{self.where} is remote: it has no local file system path")
        return str(self.where)

    # --- Reading it ----------------------------------------------------------------------

    def exists(self) -> bool:
        if isinstance(self.where, Path):
            return self.where.exists()
        from pyarrow import fs

        return info(self.where).type != fs.FileType.NotFound

    def is_dir(self) -> bool:
        if isinstance(self.where, Path):
            return self.where.is_dir()
        from pyarrow import fs

        return info(self.where).type == fs.FileType.Directory

    def size(self) -> int:
        """Bytes."""
        if isinstance(self.where, Path):
            return self.where.stat().st_size
        return int(info(self.where).size or 0)

    def open_binary(self) -> BinaryIO:
        """A buffered binary reader (readline works as on a local file)."""
        if isinstance(self.where, Path):
            return open(self.where, "rb")  # noqa: SIM115 - the caller closes it
        filesystem_, path = filesystem(self.where)
        return io.BufferedReader(filesystem_.open_input_stream(path), buffer_size=1 << 20)

    def open_random(self) -> Any:
        """Something pyarrow.parquet opens: the local path, or a random-access remote file."""
        if isinstance(self.where, Path):
            return self.where
        filesystem_, path = filesystem(self.where)
        return filesystem_.open_input_file(path)

    def read_text(self) -> str:
        if isinstance(self.where, Path):
            return self.where.read_text()
        with self.open_binary() as f:
            return f.read().decode()


@contextlib.contextmanager
def reading_input(location: Location | Path) -> Iterator[None]:
    """Inside the block, failing to read the input `location` raises the InputError that
    says how to fix it (a missing file, a folder, no permission)."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{location}: no such file; check the input path") from None
    except IsADirectoryError:
        raise InputError(f"{location}: is a directory; point the input at one file") from None
    except OSError as e:
        raise InputError(f"{location}: cannot be read ({e.strerror or e}); check its "
                         "permissions") from None


# --- File systems --------------------------------------------------------------------------

def _s3_options(bucket: str) -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            options["scheme"] = "http"
    if not region and not endpoint and bucket:
        from pyarrow import fs

        try:  # AWS itself: the bucket's region, as pyarrow's from_uri finds it
            region = fs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            region = None
    if region:
        options["region"] = region
    return options


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, env_key: tuple[str | None, ...]) -> Any:
    from pyarrow import fs

    if scheme in ("s3", "s3a"):
        return fs.S3FileSystem(**_s3_options(netloc))
    try:
        filesystem, _ = fs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return filesystem
    except (pa_errors() + (ValueError,)):
        pass
    try:
        import fsspec
    except ImportError:
        raise InputError(f"{scheme}:// is not a storage scheme pyarrow knows; install fsspec "
                         f"and its {scheme} package to use it") from None
    try:
        spec_fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise InputError(f"{scheme}:// cannot be opened ({e}); install the fsspec package "
                         f"for {scheme}") from None
    return fs.PyFileSystem(fs.FSSpecHandler(spec_fs))


def pa_errors() -> tuple[type[BaseException], ...]:
    """What a pyarrow file system raises when storage fails (pyarrow imported on first use)."""
    import pyarrow as pa

    return (pa.ArrowException, OSError)


def filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow FileSystem of a URI, and the path inside it (`bucket/key` for S3)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    env_key = tuple(os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID", "AWS_PROFILE"))
    fs = _filesystem(scheme, parts.netloc, env_key)
    if scheme in ("s3", "s3a", "gs", "gcs") or fs.type_name in _ATOMIC_PUT:
        path = f"{parts.netloc}{parts.path}".rstrip("/")
    else:
        path = parts.path if not parts.netloc else f"{parts.netloc}{parts.path}"
    return fs, path


def info(uri: str) -> Any:
    """The pyarrow FileInfo of a URI; InputError when its storage cannot be reached."""
    filesystem_, path = filesystem(uri)
    try:
        return filesystem_.get_file_info(path)
    except pa_errors() as e:
        raise InputError(f"{uri}: cannot be reached ({one_line(e)}); check the URI, the "
                         "credentials (AWS_* variables) and the endpoint") from None


def remote_fingerprint(location: Location) -> dict[str, Any]:
    """What identifies a remote object's content without reading it: size and mtime."""
    found = info(str(location))
    mtime = found.mtime.isoformat() if found.mtime is not None else None
    return {"path": str(location), "bytes": found.size, "mtime": mtime}


def upload(local: Path, dest: Location) -> None:
    """Copy a finished local file to the remote `dest` so that no partial object is ever
    visible there.

    S3 and GCS show an object only once its upload completes (a multipart upload that is
    never completed, e.g. after a kill, leaves nothing at the key). Other file systems get
    a temporary name next to the target, then a rename."""
    from pyarrow import fs

    filesystem_, path = filesystem(str(dest))
    # One C++ call: a Python signal handler (SIGTERM) cannot interrupt it half-way.
    if filesystem_.type_name in _ATOMIC_PUT:
        fs.copy_files(str(local), path, destination_filesystem=filesystem_)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{os.getpid()}")
    fs.copy_files(str(local), tmp, destination_filesystem=filesystem_)
    filesystem_.move(tmp, path)


def listed(uri: str, path: str) -> Location:
    """The Location of a file that a listing of `uri`'s file system named `path`."""
    filesystem_, _ = filesystem(uri)
    parts = urlsplit(uri)
    if filesystem_.type_name in _ATOMIC_PUT:  # path is bucket/key
        return Location(f"{parts.scheme}://{path}")
    return Location(f"{parts.scheme}://{parts.netloc}"
                    f"{path if path.startswith('/') else '/' + path}")
