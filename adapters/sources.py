"""Where a registration's files come from: a directory under an allowed root, an object-store
URI under an allowed prefix, or an upload streamed by a client. Each lands in a private local
staging directory first; only that copy is validated and stored, so a source that changes
underneath cannot slip in bytes that were never checked. Only the files registration reads
are staged (entries.py): everything else a source holds (tokenizer files, optimizer state, a
trainer's checkpoints) is ignored unopened, never downloaded, and an upload's pieces of it
are dropped as they come; each registration says which (`Staged.ignored`).

Only what an operator allowed is a source: local directories under the allowed roots, and
object-store URIs (s3:// only) under the allowed prefixes; with no prefix configured, no URI
at all (never a file://, http:// or other fsspec URL, which would reach local files outside
the roots or internal addresses). Paths and URIs are normalised before the check; what is
then read is the normalised location. Every copy counts its bytes and stops at the file's
limit, whatever the source's listing or a stat said; a local file is checked again once
opened (a regular file, inside the roots), so a link swapped in after the directory's check
leads nowhere. Errors echo the caller's own source (cut short), never another directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from loraplex.adapters.entries import (
    MAX_CONFIG_BYTES,
    MAX_ENTRIES,
    MAX_TEMPLATE_BYTES,
    MAX_TOKENIZER_CONFIG_BYTES,
    check_entries,
    file_limit,
    is_staged,
    listed_name,
)
from loraplex.adapters.store import open_filesystem
from loraplex.core.errors import AdapterSourceDenied, InvalidAdapter, shown

MAX_FILE_NAME = 255
# The bytes of ignored files an upload may carry (they are dropped as they come). Clients
# need send none: `loraplex adapters push` sends their names only.
MAX_IGNORED_UPLOAD_BYTES = 16 << 20
# Beyond the weights limit, what an upload may hold: the config and the chat template's
# sources at their own limits, and the ignored files' bytes.
EXTRA_BYTES = (
    MAX_CONFIG_BYTES + MAX_TEMPLATE_BYTES + MAX_TOKENIZER_CONFIG_BYTES + MAX_IGNORED_UPLOAD_BYTES
)
COPY_CHUNK = 1 << 20
SOURCE_SCHEMES = ("s3",)  # object stores a source may name, under an allowed prefix

_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\?#]|::")  # controls, and what fsspec or URLs read


class Staged(NamedTuple):
    """A source staged for registration."""

    source: str  # what the registration records: a resolved path, a normalised URI, "upload"
    ignored: tuple[str, ...]  # the entries left out unopened, sorted, as `listed_name` shows


def is_uri(source: str) -> bool:
    return "://" in source


# -- object-store URIs --------------------------------------------------------------------------
def normalise_uri(uri: str) -> str:
    """`scheme://bucket/key/prefix` with the scheme lower-cased, empty and `.` segments
    dropped and `..` applied (never above the bucket): the one spelling that is checked and
    then read. InvalidAdapter for what is not a plain object-store URI (a query, a fragment,
    credentials or a port, fsspec's `::` chaining, control characters)."""
    match = _URI.match(uri)
    if match is None or _UNSAFE.search(uri):
        raise InvalidAdapter(f"{shown(uri)} is not a plain object-store URI (scheme://bucket/key)")
    scheme, rest = match["scheme"].lower(), match["rest"]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise InvalidAdapter(f"{shown(uri)} does not name a bucket")
    segments: list[str] = []
    for segment in key.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise InvalidAdapter(f"{shown(uri)} leads above its bucket")
            segments.pop()
        else:
            segments.append(segment)
    return "/".join([f"{scheme}://{bucket}", *segments])


def source_prefix(root: str) -> str:
    """An allowed object-store prefix as configured (`--adapter-root s3://bucket/prefix`),
    normalised; ValueError for a scheme that is not an object store sources may come from."""
    try:
        prefix = normalise_uri(root)
    except InvalidAdapter as exc:
        raise ValueError(f"adapter root {root!r}: {exc}") from None
    scheme = prefix.partition("://")[0]
    if scheme not in SOURCE_SCHEMES:
        raise ValueError(
            f"adapter root {root!r}: only {', '.join(s + '://' for s in SOURCE_SCHEMES)} "
            "prefixes may be adapter sources (local directories are given as paths)"
        )
    return prefix


def check_uri(uri: str, prefixes: Sequence[str]) -> str:
    """The normalised `uri` if it lies under one of the allowed `prefixes` (normalised, see
    `source_prefix`); AdapterSourceDenied otherwise, naming only the caller's URI."""
    match = _URI.match(uri)
    scheme = match["scheme"].lower() if match else ""
    if scheme not in {p.partition("://")[0] for p in prefixes}:
        kind = f"{scheme}:// sources" if scheme else "such sources"
        raise AdapterSourceDenied(
            f"{shown(uri)}: {kind} are not accepted by this server (an operator allows "
            "object-store prefixes with --adapter-root)"
        )
    location = normalise_uri(uri)
    if not any(location == p or location.startswith(p + "/") for p in prefixes):
        raise AdapterSourceDenied(f"{shown(uri)} is outside the server's allowed adapter roots")
    return location


def stage_uri(
    uri: str,
    uri_roots: Sequence[str],
    storage_options: dict[str, Any],
    staging: Path,
    max_bytes: int,
) -> Staged:
    """Download an adapter directory's staged files from an object store into `staging`; its
    source is the normalised URI. `uri_roots` are normalised prefixes."""
    location = check_uri(uri, uri_roots)
    try:
        fs, path = open_filesystem(location, storage_options)
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, ValueError, ImportError):
        raise InvalidAdapter(f"no adapter directory at {shown(uri)}") from None
    if len(entries) > MAX_ENTRIES:
        raise InvalidAdapter(
            f"{shown(uri)} holds {len(entries)} entries, over the limit of {MAX_ENTRIES}"
        )
    names, ignored, total = [], [], 0
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if not is_staged(name):  # pickled weights are refused here, unread
            ignored.append(listed_name(name) + ("/" if entry["type"] == "directory" else ""))
        elif entry["type"] == "directory":
            raise InvalidAdapter(f"{name} in {shown(uri)} is not a regular file")
        else:
            names.append(name)
            total += int(entry.get("size") or 0)
    if total > max_bytes + EXTRA_BYTES:
        raise InvalidAdapter(f"{shown(uri)} holds {total} bytes, over the limit of {max_bytes}")
    for name in names:  # each copy stops at its limit, whatever the listing said
        try:
            remote = fs.open(f"{path}/{name}", "rb")
        except FileNotFoundError:
            raise InvalidAdapter(f"{name} went from {shown(uri)} while it was read") from None
        with remote:
            _copy_limited(remote, staging / name, name, file_limit(name, max_bytes))
    check_entries(staging)
    return Staged(location, tuple(sorted(ignored)))


# -- local directories --------------------------------------------------------------------------
def stage_directory(path: str, roots: Sequence[Path], staging: Path, max_bytes: int) -> Staged:
    """Copy the staged files of an adapter directory under one of `roots` (resolved) into
    `staging`; its source is the resolved path."""
    if not path or "\0" in path:
        raise InvalidAdapter("path must name an adapter directory")
    try:
        source = Path(path).expanduser().resolve()  # follows symlinks: then checked
    except (OSError, RuntimeError, ValueError):
        raise InvalidAdapter(f"path {shown(path)} cannot be resolved") from None
    if not _inside(source, roots):
        raise AdapterSourceDenied(
            f"path {shown(path)} is outside the server's allowed adapter roots"
        )
    if not source.is_dir():
        raise InvalidAdapter(f"path {shown(path)} is not a directory")
    # Staged files: no executables, links out of the roots or pickled weights; the rest ignored.
    entries = check_entries(source, roots)
    for name in entries.staged:
        _copy_local(source / name, staging / name, file_limit(name, max_bytes), roots)
    return Staged(str(source), entries.ignored)


def _copy_local(source: Path, target: Path, limit: int, roots: Sequence[Path]) -> None:
    """Copy one file of a checked directory, checking again what was opened: the directory
    may have changed since (a link swapped in, a file grown)."""
    name = source.name
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags)  # a FIFO does not block; what was opened is checked below
    except OSError as exc:
        raise InvalidAdapter(f"{name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidAdapter(f"{name} is not a regular file")
        if st.st_mode & 0o111:
            raise InvalidAdapter(f"{name} is executable; adapter files are data")
        opened = _opened_path(fd, source, st)
        if opened is None or not _inside(opened, roots):
            raise InvalidAdapter(f"{name} links outside the allowed roots")
        if st.st_size > limit:
            raise InvalidAdapter(
                f"{name} is {st.st_size} bytes, larger than the limit of {limit} bytes"
            )
        _copy_limited(f, target, name, limit)


def _opened_path(fd: int, source: Path, st: os.stat_result) -> Path | None:
    """Where the file open as `fd` lies: the kernel's word for it where /proc has one, else
    where `source` leads now if that is the same file (None if it is not)."""
    with contextlib.suppress(OSError):
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    try:
        real = source.resolve(strict=True)
        now = real.stat()
    except (OSError, RuntimeError):
        return None
    return real if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _copy_limited(source: IO[bytes], target: Path, name: str, limit: int) -> None:
    """Copy `source` to a new file `target`, refusing it once it holds more than `limit`
    bytes (no more than that, plus one byte, is ever read)."""
    copied = 0
    with open(target, "xb") as out:
        while chunk := source.read(min(COPY_CHUNK, limit + 1 - copied)):
            copied += len(chunk)
            if copied > limit:
                raise InvalidAdapter(f"{name} is larger than the limit of {limit} bytes")
            out.write(chunk)


# -- uploads ------------------------------------------------------------------------------------
def check_file_name(name: str) -> str:
    """A plain file name: no directories, no traversal, no NUL."""
    if (
        not name
        or name in (".", "..")
        or len(name) > MAX_FILE_NAME
        or any(c in name for c in "/\\\0")
    ):
        raise InvalidAdapter(f"file name {shown(name)} is not a plain file name")
    return name


class FileChunk(NamedTuple):
    """A piece of one file of an adapter being uploaded."""

    file_name: str
    data: bytes


class Upload:
    """An adapter's files streamed in by a client, written to `staging` as they come. Only the
    files registration reads are written, each within its own limit, and at most one file is
    open at a time however the pieces of different files interleave. The pieces of any other
    file (a name ending in "/" names a subdirectory) are dropped as they come, up to
    MAX_IGNORED_UPLOAD_BYTES in all; pickled weights are refused at their first piece. Not
    thread-safe: one stream writes it."""

    def __init__(self, staging: Path, max_bytes: int) -> None:
        self.staging = staging
        self.max_weights_bytes = max_bytes
        self.received = 0
        self._sizes: dict[str, int] = {}  # file name -> bytes written
        self._ignored: dict[str, str] = {}  # name whose pieces are dropped -> as listed
        self._ignored_bytes = 0
        self._open: tuple[str, IO[bytes]] | None = None

    @property
    def ignored(self) -> tuple[str, ...]:
        """The files left out, as a registration lists them (see `listed_name`), sorted."""
        return tuple(sorted(self._ignored.values()))

    def write(self, file_name: str, data: bytes) -> None:
        new = file_name not in self._sizes and file_name not in self._ignored
        if new:
            self._sort_out(file_name)
        self.received += len(data)
        if file_name in self._ignored:
            self._ignored_bytes += len(data)
            if self._ignored_bytes > MAX_IGNORED_UPLOAD_BYTES:
                raise InvalidAdapter(
                    f"the files the server ignores hold over {MAX_IGNORED_UPLOAD_BYTES} bytes: "
                    "leave them out (`loraplex adapters push` sends their names only)"
                )
            return
        size = self._sizes.get(file_name, 0)
        limit = file_limit(file_name, self.max_weights_bytes)
        if size + len(data) > limit:
            raise InvalidAdapter(f"{file_name} is larger than the limit of {limit} bytes")
        self._file(file_name, new=new).write(data)
        self._sizes[file_name] = size + len(data)

    def _sort_out(self, file_name: str) -> None:
        """Take a new file name: to be written, or ignored."""
        if len(self._sizes) + len(self._ignored) >= MAX_ENTRIES:
            raise InvalidAdapter(
                f"the upload names more than {MAX_ENTRIES} files; an adapter directory holds "
                "a few files"
            )
        subdirectory = file_name.removesuffix("/")
        if subdirectory != file_name:  # only its name comes: its files are not sent
            self._ignored[file_name] = listed_name(check_file_name(subdirectory)) + "/"
        elif not is_staged(check_file_name(file_name)):
            self._ignored[file_name] = listed_name(file_name)

    def _file(self, name: str, new: bool) -> IO[bytes]:
        if self._open is not None and self._open[0] == name:
            return self._open[1]
        self.close()
        f = open(self.staging / name, "xb" if new else "ab")  # noqa: SIM115
        self._open = (name, f)
        return f

    def finish(self) -> None:
        self.close()
        if not self._sizes and not self._ignored:
            raise InvalidAdapter("the upload holds no files")

    def close(self) -> None:
        if self._open is not None:
            with contextlib.suppress(OSError):
                self._open[1].close()
            self._open = None
