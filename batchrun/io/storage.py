"""Where job files, inputs and outputs live: a local path, or a URI (`s3://bucket/key`,
`gs://bucket/key`, or any scheme pyarrow's file systems or fsspec know).

A location is a `Path` (local) or a `str` holding a URI; `file://` URIs are local paths.
S3 takes its credentials, region and endpoint from the standard AWS variables:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or ~/.aws), AWS_REGION or
AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (a MinIO, Ceph or test
endpoint). pyarrow does not read AWS_ENDPOINT_URL itself: it is passed on from here.

Inputs may also be datasets: a folder (every `.parquet`, `.jsonl`, `.ndjson` and `.json` file
in it and its subfolders, skipping names that start with `.` or `_`, like pyarrow datasets) or
a glob (`data/*.parquet`, `s3://bucket/day=*/part-*.parquet`), in sorted path order.
"""

from __future__ import annotations

import contextlib
import functools
import glob as globlib
import io
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Union
from urllib.parse import urlsplit

from ..errors import InputError, one_line

Location = Union[Path, str]  # noqa: UP007 - a runtime alias, also on Python 3.10

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")
DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
# Object stores where an object appears only once its upload completes.
_ATOMIC_PUT = ("s3", "gcs")


def is_uri(value: object) -> bool:
    """A remote location: a `scheme://` string other than file://."""
    if not isinstance(value, str):
        return False
    m = _URI.match(value)
    return bool(m) and m.group(1).lower() != "file"


def _norm(location: Location) -> Location:
    """A str that is no URI is a local path."""
    return location if isinstance(location, Path) or is_uri(location) else Path(location)


def to_location(value: str | Path, base: Location | None = None) -> Location:
    """A location from what a user wrote: URIs stay text (relative paths under a remote base
    join it), local paths become absolute Paths (relative ones under a local base)."""
    if isinstance(value, str):
        if is_uri(value):
            return value
        if _URI.match(value):  # file://
            value = urlsplit(value).path
    if is_uri(base):
        text = str(value)
        if text.startswith("/"):
            return Path(text)
        return join(str(base), text)
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path.resolve()


def join(uri: str, relative: str) -> str:
    """`s3://b/jobs` + `../data/x` -> `s3://b/data/x`."""
    parts = urlsplit(uri)
    key = posixpath.normpath(posixpath.join(parts.path or "/", relative))
    return f"{parts.scheme}://{parts.netloc}{key}"


def parent(location: Location) -> Location:
    location = _norm(location)
    if isinstance(location, Path):
        return location.parent
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}{posixpath.dirname(parts.path.rstrip('/'))}"


def name(location: Location) -> str:
    location = _norm(location)
    if isinstance(location, Path):
        return location.name
    return posixpath.basename(urlsplit(location).path.rstrip("/"))


def is_glob(location: Location) -> bool:
    """A pattern, not a path: it holds * ? or [ and names nothing that exists as written."""
    text = str(location) if isinstance(location, Path) else urlsplit(location).path
    if not _GLOB_CHARS.search(text):
        return False
    return not exists(location)


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


def _info(uri: str) -> Any:
    filesystem_, path = filesystem(uri)
    try:
        return filesystem_.get_file_info(path)
    except pa_errors() as e:
        raise InputError(f"{uri}: cannot be reached ({one_line(e)}); check the URI, the "
                         "credentials (AWS_* variables) and the endpoint") from None


def exists(location: Location) -> bool:
    location = _norm(location)
    if isinstance(location, Path):
        return location.exists()
    from pyarrow import fs

    return _info(location).type != fs.FileType.NotFound


def is_dir(location: Location) -> bool:
    location = _norm(location)
    if isinstance(location, Path):
        return location.is_dir()
    from pyarrow import fs

    return _info(location).type == fs.FileType.Directory


def size(location: Location) -> int:
    location = _norm(location)
    if isinstance(location, Path):
        return location.stat().st_size
    return int(_info(location).size or 0)


def open_binary(location: Location) -> BinaryIO:
    """A buffered binary reader (readline works as on a local file)."""
    location = _norm(location)
    if isinstance(location, Path):
        return open(location, "rb")  # noqa: SIM115 - the caller closes it
    filesystem_, path = filesystem(location)
    return io.BufferedReader(filesystem_.open_input_stream(path), buffer_size=1 << 20)


@contextlib.contextmanager
def reading_input(location: Location) -> Iterator[None]:
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


def open_random(location: Location) -> Any:
    """Something pyarrow.parquet opens: the local path, or a random-access remote file."""
    location = _norm(location)
    if isinstance(location, Path):
        return location
    filesystem_, path = filesystem(location)
    return filesystem_.open_input_file(path)


def read_text(location: Location) -> str:
    location = _norm(location)
    if isinstance(location, Path):
        return location.read_text()
    with open_binary(location) as f:
        return f.read().decode()


def upload(local: Path, uri: str) -> None:
    """Copy a finished local file to `uri` so that no partial object is ever visible there.

    S3 and GCS show an object only once its upload completes (a multipart upload that is
    never completed, e.g. after a kill, leaves nothing at the key). Other file systems get
    a temporary name next to the target, then a rename."""
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    # One C++ call: a Python signal handler (SIGTERM) cannot interrupt it half-way.
    if filesystem_.type_name in _ATOMIC_PUT:
        fs.copy_files(str(local), path, destination_filesystem=filesystem_)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{os.getpid()}")
    fs.copy_files(str(local), tmp, destination_filesystem=filesystem_)
    filesystem_.move(tmp, path)


def remove(uri: str) -> None:
    filesystem_, path = filesystem(uri)
    filesystem_.delete_file(path)


# --- Datasets ------------------------------------------------------------------------------

def _data_file(relative_parts: list[str]) -> bool:
    if any(p.startswith((".", "_")) for p in relative_parts):
        return False
    return relative_parts[-1].lower().endswith(DATA_SUFFIXES)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Shell glob -> regex, `*` and `?` within one path segment, `**` across segments."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def expand(location: Location) -> list[Location]:
    """The files an input names, in sorted path order: itself (a file), the data files in a
    folder, or the files a glob matches. Raises InputError when it names none."""
    if is_uri(location):
        return _expand_remote(str(location))
    path = Path(location)
    if path.is_dir():
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            for f in files:
                if _data_file([f]):
                    found.append(Path(root) / f)
        files_ = sorted(found, key=str)
        if not files_:
            raise InputError(f"{path}: is a directory; point the input at one file, or at a "
                             f"folder of {'/'.join(DATA_SUFFIXES)} files (this one holds none)")
        return files_
    if not path.exists() and _GLOB_CHARS.search(str(path)):
        files_ = sorted((Path(p) for p in globlib.glob(str(path), recursive=True)
                         if Path(p).is_file()), key=str)
        if not files_:
            raise InputError(f"{path}: matches no files; check the pattern")
        return files_
    return [path]


def _expand_remote(uri: str) -> list[Location]:
    from pyarrow import fs

    parts = urlsplit(uri)
    prefix = f"{parts.scheme}://{parts.netloc}"
    filesystem_, path = filesystem(uri)
    info = _info(uri)
    if info.type == fs.FileType.File:
        return [uri]
    try:
        if info.type == fs.FileType.Directory:
            listed = filesystem_.get_file_info(fs.FileSelector(path, recursive=True))
            found = [i.path for i in listed if i.type == fs.FileType.File
                     and _data_file(i.path[len(path):].strip("/").split("/"))]
            if not found:
                raise InputError(f"{uri}: is a directory; point the input at one file, or at "
                                 f"a folder of {'/'.join(DATA_SUFFIXES)} files (this one holds "
                                 "none)")
        elif _GLOB_CHARS.search(path):
            static = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
            regex = _glob_regex(path)
            listed = filesystem_.get_file_info(
                fs.FileSelector(static, recursive=True, allow_not_found=True))
            found = [i.path for i in listed if i.type == fs.FileType.File
                     and regex.match(i.path)]
            if not found:
                raise InputError(f"{uri}: matches no files; check the pattern")
        else:
            raise InputError(f"{uri}: no such file; check the input path")
    except pa_errors() as e:
        raise InputError(f"{uri}: cannot be listed ({one_line(e)}); check the URI and the "
                         "credentials") from None
    return [_uri_of(prefix, filesystem_, p) for p in sorted(found)]


def _uri_of(prefix: str, filesystem_: Any, path: str) -> str:
    if filesystem_.type_name in _ATOMIC_PUT:  # path is bucket/key
        return f"{prefix.split('://')[0]}://{path}"
    return f"{prefix}{path if path.startswith('/') else '/' + path}"


def remote_fingerprint(uri: str) -> dict[str, Any]:
    """What identifies a remote object's content without reading it: size and mtime."""
    info = _info(uri)
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return {"path": uri, "bytes": info.size, "mtime": mtime}
