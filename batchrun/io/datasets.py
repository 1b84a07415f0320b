"""An input that names many files, and what identifies an input's content.

An input is one file, a folder (every `.parquet`, `.jsonl`, `.ndjson` and `.json` file in it
and its subfolders, skipping names that start with `.` or `_`, like pyarrow datasets) or a
glob (`data/*.parquet`, `s3://bucket/day=*/part-*.parquet`); `expand` lists its files in sorted
path order, local or remote. `input_fingerprint` is what a checkpoint records of them, so that
a resume never mixes the results of two inputs.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ..errors import InputError, one_line
from .storage import (
    GLOB_CHARS,
    Location,
    filesystem,
    info,
    listed,
    pa_errors,
    reading_input,
    remote_fingerprint,
)

DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")


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
    if location.is_remote:
        return _expand_remote(str(location))
    path = location.local_path
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
        return [Location(f) for f in files_]
    if not path.exists() and GLOB_CHARS.search(str(path)):
        files_ = sorted((Path(p) for p in globlib.glob(str(path), recursive=True)
                         if Path(p).is_file()), key=str)
        if not files_:
            raise InputError(f"{path}: matches no files; check the pattern")
        return [Location(f) for f in files_]
    return [location]


def _expand_remote(uri: str) -> list[Location]:
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    found_info = info(uri)
    if found_info.type == fs.FileType.File:
        return [Location(uri)]
    try:
        if found_info.type == fs.FileType.Directory:
            entries = filesystem_.get_file_info(fs.FileSelector(path, recursive=True))
            found = [i.path for i in entries if i.type == fs.FileType.File
                     and _data_file(i.path[len(path):].strip("/").split("/"))]
            if not found:
                raise InputError(f"{uri}: is a directory; point the input at one file, or at "
                                 f"a folder of {'/'.join(DATA_SUFFIXES)} files (this one holds "
                                 "none)")
        elif GLOB_CHARS.search(path):
            static = GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
            regex = _glob_regex(path)
            entries = filesystem_.get_file_info(
                fs.FileSelector(static, recursive=True, allow_not_found=True))
            found = [i.path for i in entries if i.type == fs.FileType.File
                     and regex.match(i.path)]
            if not found:
                raise InputError(f"{uri}: matches no files; check the pattern")
        else:
            raise InputError(f"{uri}: no such file; check the input path")
    except pa_errors() as e:
        raise InputError(f"{uri}: cannot be listed ({one_line(e)}); check the URI and the "
                         "credentials") from None
    return [listed(uri, p) for p in sorted(found)]


def input_fingerprint(location: Location) -> dict[str, Any]:
    """What identifies the input's content, so a resume never mixes results of two inputs:
    a content hash of each local file; size and modification time of each remote object (a
    hash would download it). A dataset lists every file it reads."""
    files = expand(location)
    if files == [location] and not location.is_remote:
        return _local_fingerprint(location.local_path)
    return {"path": str(location), "files": [
        remote_fingerprint(f) if f.is_remote else _local_fingerprint(f.local_path)
        for f in files]}


def _local_fingerprint(path: Path) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    with reading_input(path), open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "blake2b": h.hexdigest()}
