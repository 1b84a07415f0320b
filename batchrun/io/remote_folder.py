"""A remote folder (every object under a URI prefix, `s3://bucket/adapters/support/`) copied
to a local cache folder, for what must be read from a local path (vLLM loads LoRA adapters
from local folders only).

The cached copy is named by the URI and what its listing says of each file (its path under
the prefix, size and modification time), so a rerun lists the prefix once and downloads
nothing, and a folder changed in storage is fetched again into a new copy. A copy appears
under its name only once whole (downloaded beside it, then renamed): a killed download leaves
no half folder to be taken for the adapter."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .storage import Location, filesystem


@dataclass(frozen=True)
class FetchedFolder:
    """A remote folder's local copy: `path`; `files` the paths under it (posix, sorted);
    `downloaded` False when the copy was in the cache already."""

    path: Path
    files: tuple[str, ...]
    bytes: int
    downloaded: bool


def remote_files(location: Location) -> dict[str, tuple[int, str | None]]:
    """Each file under the remote prefix `location`: relative posix path -> (size, mtime
    as ISO text). Empty when nothing is there. Raises OSError (or pyarrow's errors) when
    the storage cannot be reached."""
    from pyarrow import fs

    filesystem_, root = filesystem(str(location))
    found = filesystem_.get_file_info(fs.FileSelector(root, recursive=True,
                                                      allow_not_found=True))
    return {f.path[len(root):].lstrip("/"): (int(f.size or 0),
                                             f.mtime.isoformat() if f.mtime else None)
            for f in found if f.type == fs.FileType.File}


def fetch_folder(location: Location, cache: Path,
                 files: dict[str, tuple[int, str | None]] | None = None) -> FetchedFolder:
    """The local copy under `cache` of every file under the remote prefix `location`,
    downloaded unless a copy of these very files is there already. `files`: the prefix's
    listing (`remote_files`), when the caller has it. Raises OSError (or pyarrow's errors)
    when the storage cannot be read."""
    from pyarrow import fs

    listing = remote_files(location) if files is None else files
    key = hashlib.sha256(json.dumps([str(location).rstrip("/"), sorted(listing.items())])
                         .encode()).hexdigest()[:24]
    target = cache / key
    names = tuple(sorted(listing))
    size = sum(s for s, _ in listing.values())
    if target.is_dir():
        return FetchedFolder(target, names, size, downloaded=False)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    filesystem_, root = filesystem(str(location))
    try:
        for name in names:
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            fs.copy_files(f"{root}/{name}", str(partial / name), source_filesystem=filesystem_,
                          destination_filesystem=fs.LocalFileSystem())
        try:
            partial.rename(target)
        except OSError:  # another process put the same copy there first: the same files
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return FetchedFolder(target, names, size, downloaded=True)


