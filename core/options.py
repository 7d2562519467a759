"""Command-line options made from config dataclasses, so that each option is written once: its
field gives the flag's name, type, default and help (the docstring under the field). The
`loraplex` verbs build their flags with `add_options` and their configs with `build`, and
docs/options.md is their --help.

A field's metadata (`dataclasses.field(metadata=...)`) adjusts its flag where the field alone
cannot say it:

    flag         the flag, whole (default: --field-name, after its config's prefix)
    scale        the flag counts in these units of the field's (e.g. MiB of a field in bytes)
    env          an environment variable that gives the default (read here, at the edge)
    metavar      the value's name in --help
    parse        str -> value, for types argparse cannot build alone (e.g. a path or a URL)
    positional   a positional argument rather than a flag
    cli_default  the command line's default, where it differs from the field's
    off_flag     a flag that sets an optional field to None (e.g. --no-metrics); off_help
                 is its help
    hidden       no flag: set in code only

and on a field that nests another config dataclass:

    prefix       put before its fields' flag names (e.g. "tenant-")
    exclude      its fields that get no flag
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import textwrap
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_NO_DEFAULT = object()  # a required field
OFF = "__off"  # the dest suffix of an off_flag


@dataclass(frozen=True)
class Option:
    """One leaf field of a (nested) config dataclass and the argument it becomes."""

    path: tuple[str, ...]  # field names from the outer config down, e.g. ("engine", "max_loras")
    group: tuple[str, str]  # (title, description) of the nested config it is in; ("", "") at top
    field: Field[Any]
    kind: Any  # the annotated type, Optional unwrapped
    flag: str
    help: str
    default: Any  # in the default config (a nested config's own default), or _NO_DEFAULT

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata


def options(cls: type) -> Iterator[Option]:
    """Every leaf field of `cls`, nested configs flattened, in declaration order."""
    yield from _options(cls, (), ("", ""), "", (), None)


def _options(
    cls: type,
    path: tuple[str, ...],
    group: tuple[str, str],
    prefix: str,
    exclude: tuple[str, ...],
    defaults: Any,  # the default instance of `cls` where it is nested, else None
) -> Iterator[Option]:
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("hidden"):
            continue
        kind = _unwrap(hints[f.name])
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if dataclasses.is_dataclass(kind):
            yield from _options(
                kind,  # type: ignore[arg-type]
                (*path, f.name),
                (f.name.replace("_", " "), " ".join(docs.get(f.name, "").split())),
                prefix + f.metadata.get("prefix", ""),
                tuple(f.metadata.get("exclude", ())),
                default,
            )
            continue
        flag = f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")
        yield Option(
            path=(*path, f.name),
            group=group,
            field=f,
            kind=kind,
            flag=flag,
            help=docs.get(f.name, ""),
            default=default,
        )


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    overrides_only: bool = False,
    suppressed: bool = False,
) -> None:
    """One argument per leaf field of `cls`; a nested config's fields make a group. With
    `overrides_only`, unset flags stay None (a config file or the caller fills them) and bools
    get --x/--no-x. `suppressed` flags are accepted but neither shown nor defaulted (e.g. global
    flags repeated after a verb)."""
    groups: dict[tuple[str, str], Any] = {}
    for option in options(cls):
        target: Any = parser
        if option.group[0]:
            if option.group not in groups:
                groups[option.group] = parser.add_argument_group(*option.group)
            target = groups[option.group]
        if suppressed:
            hidden: dict[str, Any] = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
            if get_origin(option.kind) is Literal:
                hidden["choices"] = get_args(option.kind)
            parser.add_argument(option.flag, dest=option.dest, **hidden)
        else:
            _add(target, option, overrides_only)


def build(cls: type, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """An instance of `cls` from parsed `args` (values in the fields' units): a flag not given
    leaves the default config's value (an environment variable's, where the field names one)."""
    by_path = {o.path: o for o in options(cls)}
    return _build(cls, (), None, args, os.environ if environ is None else environ, by_path)


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The top-level fields of `cls` whose flags were given (overrides_only parsers), by name."""
    out = {}
    for option in options(cls):
        value = getattr(args, option.dest, None)
        if value is not None:
            out[option.path[-1]] = _from_flag(option, value)
    return out


def _build(
    cls: type,
    path: tuple[str, ...],
    defaults: Any,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    by_path: dict[tuple[str, ...], Option],
) -> Any:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            nested = getattr(defaults, f.name) if defaults is not None else _field_default(f)
            values[f.name] = _build(kind, (*path, f.name), nested, args, environ, by_path)  # type: ignore[arg-type]
            continue
        option = by_path.get((*path, f.name))
        if option is None:  # no flag (hidden or excluded): the default config's value
            continue
        if getattr(args, option.dest + OFF, False):  # --no-x wins wherever it stands
            values[f.name] = None
            continue
        value = getattr(args, option.dest, None)
        if value == "" and option.kind is not str:
            value = None  # an empty path or number is no value: as if not given
        env = option.meta.get("env")
        if value is None and env and environ.get(env):
            value = environ[env]
        if value is None:
            continue  # not given: the default config's value
        values[f.name] = _from_flag(option, value)
    if defaults is not None and defaults is not _NO_DEFAULT:
        return dataclasses.replace(defaults, **values)
    return cls(**values)


def _from_flag(option: Option, value: Any) -> Any:
    """A parsed flag value in the field's type and units."""
    if isinstance(value, list):
        return tuple(_one(option, v) for v in value)
    return _one(option, value)


def _one(option: Option, value: Any) -> Any:
    parse: Callable[[str], Any] | None = option.meta.get("parse")
    if parse is not None and isinstance(value, str):
        value = parse(value)
    elif option.kind is Path and isinstance(value, str):
        value = Path(value).expanduser()
    scale = option.meta.get("scale")
    return value * scale if scale and isinstance(value, int | float) else value


def _field_default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def _add(parser: Any, option: Option, overrides_only: bool) -> None:
    meta, kind = option.meta, option.kind
    kwargs: dict[str, Any] = {"dest": option.dest}
    repeated = get_origin(kind) is tuple
    element = get_args(kind)[0] if repeated else kind
    if element is bool:
        default = _default(option)
        bool_action = overrides_only or default is True
        kwargs["action"] = argparse.BooleanOptionalAction if bool_action else "store_true"
        kwargs["default"] = None if overrides_only else default
    else:
        if get_origin(element) is Literal:
            kwargs["choices"] = get_args(element)
        else:
            if "parse" not in meta:
                kwargs["type"] = str if element is Path else element
            kwargs["metavar"] = (
                meta.get("metavar") or option.flag.lstrip("-").replace("-", "_").upper()
            )
        if repeated:
            kwargs["action"] = "append"
        if overrides_only or meta.get("env") or repeated:
            kwargs["default"] = None  # resolved in `build` (a config file, or the environment)
        else:
            kwargs["default"] = _flag_default(option)
    kwargs["help"] = _help(option, overrides_only).replace("%", "%%")
    if meta.get("positional"):
        del kwargs["dest"]
        kwargs.pop("default", None)
        parser.add_argument(option.dest, **kwargs)
    else:
        required = option.default is _NO_DEFAULT and not overrides_only
        parser.add_argument(option.flag, required=required, **kwargs)
    off = meta.get("off_flag")
    if off:
        parser.add_argument(
            off, dest=option.dest + OFF, action="store_true", help=meta.get("off_help")
        )


def _default(option: Option) -> Any:
    """The command line's default, in the field's units (None: none)."""
    if "cli_default" in option.meta:
        return option.meta["cli_default"]
    return None if option.default is _NO_DEFAULT else option.default


def _flag_default(option: Option) -> Any:
    """The default in the flag's units."""
    value = _default(option)
    scale = option.meta.get("scale")
    if scale and isinstance(value, int):
        return value // scale
    return value


def _help(option: Option, overrides_only: bool) -> str:
    text = " ".join(option.help.split())
    if overrides_only:
        return text
    env = option.meta.get("env")
    if env:
        return f"{text} (default: ${env}, else {option.meta.get('shown', _default(option))})"
    value = _flag_default(option)
    if option.meta.get("positional") or value is None or value is False or value == ():
        return text
    return f"{text} (default: {value})"


def _unwrap(annotation: Any) -> Any:
    """The type of an annotation such as `int | None` (None unwrapped)."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation  # e.g. Path | str: the field's `parse` builds it


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings under the fields of `cls` and its dataclass bases (bases first)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = following.value.value
    return docs
