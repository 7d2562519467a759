"""Where a registration's files come from: a directory under an allowed root, an object-store
URI (s3://...), or an upload streamed by a client. Each lands in a private local staging
directory first; only that copy is validated and stored, so a source that changes underneath
cannot slip in bytes that were never checked.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from loraplex.adapters.store import open_filesystem
from loraplex.adapters.validate import (
    ADAPTER_FILES,
    IGNORED_FILES,
    MAX_CONFIG_BYTES,
    MAX_EXTRA_BYTES,
    check_entries,
)
from loraplex.core.errors import AdapterSourceDenied, InvalidAdapter

MAX_FILE_NAME = 255
# Beyond the weights limit: the config and the ignored extras, at their own limits.
EXTRA_BYTES = MAX_CONFIG_BYTES + len(IGNORED_FILES) * MAX_EXTRA_BYTES


def is_uri(source: str) -> bool:
    return "://" in source


def stage_directory(path: str, roots: Sequence[Path], staging: Path) -> str:
    """Copy an adapter directory under one of `roots` into `staging`; returns its resolved
    path (the registration's recorded source)."""
    if not path or "\0" in path:
        raise InvalidAdapter("path must name an adapter directory")
    source = Path(path).expanduser().resolve()  # follows symlinks: then checked
    if not any(source.is_relative_to(root) for root in roots):
        raise AdapterSourceDenied(f"path {path!r} is outside the server's allowed adapter roots")
    if not source.is_dir():
        raise InvalidAdapter(f"path {path!r} is not a directory")
    check_entries(source, roots)  # no pickles, extras, executables or links out of the roots
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, staging / name)
    return str(source)


def stage_uri(
    uri: str,
    uri_roots: Sequence[str],
    storage_options: dict[str, Any],
    staging: Path,
    max_bytes: int,
) -> str:
    """Download an adapter directory from an object store into `staging`; returns the URI."""
    prefix = uri.rstrip("/")
    roots = [root.rstrip("/") for root in uri_roots]
    if roots and not any(prefix == root or prefix.startswith(root + "/") for root in roots):
        raise AdapterSourceDenied(f"{uri!r} is outside the server's allowed adapter roots")
    try:
        fs, path = open_filesystem(prefix, storage_options)
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise InvalidAdapter(f"no adapter directory at {uri!r}: {exc}") from None
    names = []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory":
            raise InvalidAdapter(f"unexpected directory {name!r} in {uri!r}")
        check_file_name(name)
        names.append(name)
    total = sum(int(e.get("size") or 0) for e in entries)
    if total > max_bytes + EXTRA_BYTES:
        raise InvalidAdapter(f"{uri!r} holds {total} bytes, over the limit of {max_bytes}")
    for name in names:  # what check_entries will refuse (pickles, extras) is never opened here
        if name in ADAPTER_FILES or name in IGNORED_FILES:
            fs.get_file(f"{path}/{name}", str(staging / name))
        else:
            (staging / name).touch()
    check_entries(staging)
    return uri


def check_file_name(name: str) -> str:
    """A plain file name: no directories, no traversal, no NUL."""
    if (
        not name
        or name in (".", "..")
        or len(name) > MAX_FILE_NAME
        or any(c in name for c in "/\\\0")
    ):
        raise InvalidAdapter(f"file name {name[:80]!r} is not a plain file name")
    return name


class FileChunk(NamedTuple):
    """A piece of one file of an adapter being uploaded."""

    file_name: str
    data: bytes


class Upload:
    """An adapter's files streamed in by a client, written to `staging` as they come, within a
    byte limit. Not thread-safe: one stream writes it."""

    def __init__(self, staging: Path, max_bytes: int) -> None:
        self.staging = staging
        self.max_bytes = max_bytes + EXTRA_BYTES
        self.received = 0
        self._files: dict[str, IO[bytes]] = {}

    def write(self, file_name: str, data: bytes) -> None:
        f = self._files.get(file_name)
        if f is None:
            check_file_name(file_name)
            f = self._files[file_name] = open(self.staging / file_name, "wb")  # noqa: SIM115
        self.received += len(data)
        if self.received > self.max_bytes:
            raise InvalidAdapter(f"the upload is larger than the limit of {self.max_bytes} bytes")
        f.write(data)

    def finish(self) -> None:
        self.close()
        if not self._files:
            raise InvalidAdapter("the upload holds no files")

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
