"""What an adapter directory holds, sorted out by name before any file of it is read.

Users' tools leave more than an adapter in its directory: `trainer.save_model()` and PEFT's
`save_pretrained` add tokenizer files, a model card, the training arguments, optimizer,
scheduler and RNG state (pickles), generation and model configs, checkpoint subdirectories.
As vLLM and LoRAX do, registration takes what it serves and ignores the rest:

- staged (copied into a private staging directory, then read): the adapter's own files,
  adapter_config.json and adapter_model.safetensors (the only files the store keeps), and the
  sources of its own chat template, chat_template.jinja and tokenizer_config.json (see
  chat_template.py);
- refused by name, never opened: pickled weights in place of the safetensors
  (adapter_model.bin, pytorch_model.bin);
- ignored: every other entry, whatever it is (a pickle, a link, a FIFO, a subdirectory), is
  never opened, followed or copied; the registration names them.

A staged file is checked as a file the server reads: a regular file within its limit, not
executable, and a symlink only if it resolves to a file inside an allowed root. A directory
of more than MAX_ENTRIES entries is refused, whatever they are. `read_file` reads one checked
file whole, within a limit.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from loraplex.core.errors import InvalidAdapter, shown

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
TEMPLATE_FILE = "chat_template.jinja"  # where transformers saves a tokenizer's chat template
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # where older versions kept it
TEMPLATE_SOURCES = (TEMPLATE_FILE, TOKENIZER_CONFIG_FILE)  # the first with a template wins
STAGED_FILES = ADAPTER_FILES + TEMPLATE_SOURCES
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")  # pickled weights: refused
MAX_ENTRIES = 1024  # an adapter directory holds a few files (and a trainer's checkpoints)
MAX_NAME_CHARS = 255  # a name longer than a file system's is listed cut short
MAX_CONFIG_BYTES = 1 << 20
MAX_TEMPLATE_BYTES = 64 << 10  # a chat template; real ones are a few KiB
# tokenizer_config.json is read only for its chat_template, but it also lists the added tokens:
# a large vocabulary's (Gemma's) is over 1 MiB.
MAX_TOKENIZER_CONFIG_BYTES = 4 << 20


class Entries(NamedTuple):
    """A directory's entries by what registration does with them, each sorted by name."""

    staged: tuple[str, ...]
    ignored: tuple[str, ...]  # as listed: see `listed_name`; a subdirectory's ends in "/"


def check_entries(adapter_dir: Path, allowed_roots: Sequence[Path] | None = None) -> Entries:
    """Sort out `adapter_dir`'s entries (see the module docstring) and check the staged ones;
    InvalidAdapter if pickled weights are there or an adapter file is missing. A staged file
    that is a symlink is refused when `allowed_roots` is None, else it must resolve to a file
    inside one. Ignored entries are neither opened nor followed."""
    is_dir: dict[str, bool] = {}
    try:
        with os.scandir(adapter_dir) as it:
            for entry in it:
                if len(is_dir) == MAX_ENTRIES:
                    raise InvalidAdapter(
                        f"{adapter_dir.name!r} holds more than {MAX_ENTRIES} entries; an adapter "
                        "directory holds a few files"
                    )
                is_dir[entry.name] = entry.is_dir(follow_symlinks=False)  # no stat of the target
    except OSError as exc:
        raise InvalidAdapter(
            f"{adapter_dir.name!r} is not a readable directory: {exc.strerror}"
        ) from None
    names = sorted(is_dir)
    staged = [name for name in names if is_staged(name)]  # pickled weights refused, unopened
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
    for name in staged:
        _check_entry(adapter_dir / name, roots)
    for name in ADAPTER_FILES:
        if name not in is_dir:
            raise InvalidAdapter(f"{name} is missing from {adapter_dir.name!r}")
    ignored = sorted(listed_name(n) + ("/" if is_dir[n] else "") for n in names if n not in staged)
    return Entries(tuple(staged), tuple(ignored))


def is_staged(name: str) -> bool:
    """Whether registration copies and reads the file `name`; False for one it ignores,
    unopened. Pickled weights are refused here, by their name alone."""
    if name in PICKLE_FILES:
        raise InvalidAdapter(
            f"{name} is a pickle file and is never loaded; save with safetensors (PEFT's "
            "save_pretrained does by default)"
        )
    return name in STAGED_FILES


def listed_name(name: str) -> str:
    """An ignored entry's name as a registration lists it: as it is when it is printable text
    of a file name's length, else cut short and escaped (no control character, nor any byte
    that is not UTF-8, reaches a response or a log)."""
    return name if name.isprintable() and len(name) <= MAX_NAME_CHARS else shown(name)


def file_limit(name: str, max_weights_bytes: int) -> int:
    """The most bytes the staged file `name` may hold (the weights' limit is the spec's)."""
    limits = {
        WEIGHTS_FILE: max_weights_bytes,
        TEMPLATE_FILE: MAX_TEMPLATE_BYTES,
        TOKENIZER_CONFIG_FILE: MAX_TOKENIZER_CONFIG_BYTES,
    }
    return limits.get(name, MAX_CONFIG_BYTES)


def _check_entry(path: Path, roots: list[Path] | None) -> None:
    name = path.name
    st = path.lstat()
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
