"""What an adapter directory holds, checked by name and by what each entry is, before any
file of it is read: exactly adapter_config.json and adapter_model.safetensors, plus PEFT's
README.md and our trainer's training_manifest.json, which are ignored. Pickle files are refused
by name and never opened; so are other files, subdirectories, executables, non-regular files
and symlinks (unless they resolve to a file inside an allowed root). `read_file` reads one
checked file whole, within a limit.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from loraplex.core.errors import SHOWN_CHARS, InvalidAdapter, shown

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
IGNORED_FILES = ("README.md", "training_manifest.json")  # PEFT's model card, our trainer's log
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_EXTRA_BYTES = 1 << 20  # each ignored file


def check_entries(adapter_dir: Path, allowed_roots: Sequence[Path] | None = None) -> None:
    """Refuse anything in `adapter_dir` but the adapter's files and the ignored extras. Symlinks
    are refused when `allowed_roots` is None, else they must resolve to a file inside one."""
    try:
        with os.scandir(adapter_dir) as it:
            names = sorted(entry.name for entry in it)
    except OSError as exc:
        raise InvalidAdapter(
            f"{adapter_dir.name!r} is not a readable directory: {exc.strerror}"
        ) from None
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
    for name in names:
        _check_entry(adapter_dir / name, roots)
    for name in ADAPTER_FILES:
        if name not in names:
            raise InvalidAdapter(f"{name} is missing from {adapter_dir.name!r}")


def check_name(name: str, kind: str = "file") -> None:
    """Refuse, by its name alone, a file an adapter never holds: a pickle (never opened) or
    anything but the adapter's files and the ignored extras."""
    if name in PICKLE_FILES or Path(name).suffix.lower() in PICKLE_SUFFIXES:
        named = name if name.isprintable() and len(name) <= SHOWN_CHARS else shown(name)
        raise InvalidAdapter(f"{named} is a pickle file and is never loaded; save with safetensors")
    if name not in ADAPTER_FILES and name not in IGNORED_FILES:
        raise InvalidAdapter(
            f"unexpected {kind} {shown(name)}: an adapter holds only {' and '.join(ADAPTER_FILES)}"
        )


def file_limit(name: str, max_weights_bytes: int) -> int:
    """The most bytes the adapter file `name` may hold (the weights' limit is the spec's)."""
    if name == WEIGHTS_FILE:
        return max_weights_bytes
    return MAX_EXTRA_BYTES if name in IGNORED_FILES else MAX_CONFIG_BYTES


def _check_entry(path: Path, roots: list[Path] | None) -> None:
    name = path.name
    if name in PICKLE_FILES or path.suffix.lower() in PICKLE_SUFFIXES:
        check_name(name)  # refused before any stat
    st = path.lstat()
    check_name(name, "directory" if stat.S_ISDIR(st.st_mode) else "file")
    if stat.S_ISLNK(st.st_mode):
        if roots is None:
            raise InvalidAdapter(f"{name} is a symlink; links are not accepted here")
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target or a loop (RuntimeError before 3.13)
            raise InvalidAdapter(f"{name} is a broken symlink") from None
        if not any(target.is_relative_to(root) for root in roots):
            raise InvalidAdapter(f"{name} links outside the allowed roots")
        st = target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InvalidAdapter(f"{name} is not a regular file")
    if st.st_mode & 0o111:
        raise InvalidAdapter(f"{name} is executable; adapter files are data")
    limit = file_limit(name, max_weights_bytes=st.st_size)  # the weights': the spec's, later
    if st.st_size > limit:
        raise InvalidAdapter(f"{name} is {st.st_size} bytes, over the limit of {limit}")


def read_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; symlinks and FIFOs are refused
    at open, so what is read is what was checked."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.name} is missing from {path.parent.name!r}") from None
    except OSError as exc:
        raise InvalidAdapter(f"{path.name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidAdapter(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise InvalidAdapter(
                f"{path.name} is {st.st_size} bytes, larger than the limit of {limit} bytes"
            )
        data = f.read(st.st_size)
        if len(data) != st.st_size or f.read(1):
            raise InvalidAdapter(f"{path.name} changed while it was read")
    return data
