"""Flags made from config dataclasses: names, units, defaults, environment, nesting, and the
help taken from the docstring under each field."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from loraplex.core.options import add_options, build, field_docs, given, options


@dataclass(frozen=True)
class Inner:
    size_bytes: int = field(default=4 << 20, metadata={"flag": "--size-mb", "scale": 1 << 20})
    """A size, in MiB on the command line."""
    mode: Literal["fast", "exact"] = "fast"
    """How it runs."""


@dataclass(frozen=True)
class Base:
    where: Path | None = None
    """Where it is."""


@dataclass(frozen=True)
class Outer(Base):
    name: str = field(default="", metadata={"positional": True, "metavar": "NAME"})
    """The thing's name."""
    home: Path = field(default=Path("/nowhere"), metadata={"env": "TEST_HOME", "shown": "/x"})
    """Its home."""
    tags: tuple[str, ...] = field(default=(), metadata={"flag": "--tag"})
    """A tag (repeatable)."""
    port: int | None = field(default=None, metadata={"cli_default": 80, "off_flag": "--no-port"})
    """A port."""
    verbose: bool = False
    """Say more."""
    inner: Inner = field(default_factory=Inner, metadata={"prefix": "inner-"})
    """The inner part."""


def parse(*argv: str, environ: dict[str, str] | None = None) -> Outer:
    parser = argparse.ArgumentParser()
    add_options(parser, Outer)
    return build(Outer, parser.parse_args(list(argv)), environ or {})  # type: ignore[no-any-return]


def test_defaults_are_the_fields_except_where_the_command_line_says_otherwise():
    assert parse("n") == Outer(name="n", port=80)


def test_flags_set_their_fields_in_the_fields_units():
    got = parse(
        "n", "--where", "~/w", "--tag", "a", "--tag", "b", "--verbose",
        "--size-mb", "3", "--inner-mode", "exact", "--port", "9",
    )  # fmt: skip
    assert got.where == Path("~/w").expanduser() and got.tags == ("a", "b") and got.verbose
    assert got.inner == Inner(size_bytes=3 << 20, mode="exact") and got.port == 9
    assert parse("n", "--no-port").port is None


def test_an_environment_variable_gives_a_default_a_flag_overrides():
    assert parse("n", environ={"TEST_HOME": "/from/env"}).home == Path("/from/env")
    assert parse("n", "--home", "/flag", environ={"TEST_HOME": "/env"}).home == Path("/flag")
    assert parse("n").home == Path("/nowhere")


def test_bad_values_are_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        parse("n", "--inner-mode", "slow")
    assert "invalid choice" in capsys.readouterr().err


def test_help_is_the_docstring_with_the_default_in_flag_units():
    parser = argparse.ArgumentParser()
    add_options(parser, Outer)
    text = " ".join(parser.format_help().split())
    assert "--size-mb SIZE_MB A size, in MiB on the command line. (default: 4)" in text
    assert "Its home. (default: $TEST_HOME, else /x)" in text
    assert "inner: The inner part." in text  # a nested config is a group
    docs = field_docs(Outer)
    assert docs["where"] == "Where it is." and docs["verbose"] == "Say more."  # bases too
    assert [o.flag for o in options(Outer)][:2] == ["--where", "--name"]


def test_overrides_only_leaves_unset_flags_out():
    parser = argparse.ArgumentParser()
    add_options(parser, Inner, overrides_only=True)
    assert given(Inner, parser.parse_args([])) == {}
    assert given(Inner, parser.parse_args(["--mode", "exact"])) == {"mode": "exact"}
