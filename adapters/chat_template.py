"""An adapter's own chat template, served as LoRAX serves one: found at registration in the
adapter's directory, kept with its version in the store, and applied to chat requests for that
adapter in place of the base model's.

Where it is found, as transformers saves a tokenizer's: chat_template.jinja, else the
`chat_template` of tokenizer_config.json (a string, or a list of named templates: the one named
"default"). Both files are staged within their limits (entries.py); tokenizer_config.json is
only parsed as JSON.

A template is checked here, once, so that a bad one is refused at registration
(INVALID_ARGUMENT) instead of failing every chat request: UTF-8 text of at most
MAX_TEMPLATE_BYTES that compiles in the sandboxed Jinja environment transformers renders chat
templates in, with its `{% generation %}` tag and loop controls. Compiling parses the template
and generates Python code, which is never run here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraplex.adapters.entries import (
    MAX_TEMPLATE_BYTES,
    TEMPLATE_FILE,
    TEMPLATE_SOURCES,
    TOKENIZER_CONFIG_FILE,
    file_limit,
    read_file,
)
from loraplex.core.errors import InvalidAdapter, shown

DEFAULT_NAME = "default"  # of the template used among named ones, as transformers picks it


class AdapterTemplate(NamedTuple):
    """What an adapter's directory says of its chat template."""

    text: str  # "" when it has none: the base model's serves its chat requests
    source: str  # the file it came from ("" when none)
    unused: tuple[str, ...]  # template sources staged but not used: ignored files


def read_chat_template(staged: Path) -> AdapterTemplate:
    """The chat template of the adapter staged in `staged`, checked; InvalidAdapter naming the
    file for one that cannot serve."""
    present = [name for name in TEMPLATE_SOURCES if (staged / name).is_file()]
    for name in present:
        data = read_file(staged / name, file_limit(name, max_weights_bytes=0))
        text = _template_file(data) if name == TEMPLATE_FILE else _tokenizer_config(data)
        if text is not None:
            check_chat_template(text, name)
            return AdapterTemplate(text, name, tuple(n for n in present if n != name))
    return AdapterTemplate("", "", tuple(present))


def check_chat_template(text: str, origin: str) -> None:
    """Refuse a template that is empty, over MAX_TEMPLATE_BYTES or not valid Jinja."""
    if not text.strip():
        raise InvalidAdapter(f"the chat template in {origin} is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEMPLATE_BYTES:
        raise InvalidAdapter(
            f"the chat template in {origin} is {size} bytes, over the limit of {MAX_TEMPLATE_BYTES}"
        )
    try:
        _ENVIRONMENT.compile(text)  # a code object, never executed
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        raise InvalidAdapter(
            f"the chat template in {origin} is not a valid Jinja template{where}: "
            f"{shown(str(exc), 200)}"
        ) from None
    except (SyntaxError, RecursionError, MemoryError):  # nested past what Python compiles
        raise InvalidAdapter(
            f"the chat template in {origin} is nested too deeply to compile"
        ) from None


def _template_file(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidAdapter(f"{TEMPLATE_FILE} is not UTF-8 text") from None


def _tokenizer_config(data: bytes) -> str | None:
    """The chat template tokenizer_config.json holds, or None."""
    try:
        config: Any = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidAdapter(f"{TOKENIZER_CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{TOKENIZER_CONFIG_FILE} must hold a JSON object")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == DEFAULT_NAME:
                if isinstance(entry.get("template"), str):
                    return str(entry["template"])
                break
        raise InvalidAdapter(
            f"{TOKENIZER_CONFIG_FILE} lists chat templates but none named {DEFAULT_NAME!r} "
            "with a template string"
        )
    raise InvalidAdapter(
        f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string, got {shown(template)}"
    )


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block (it marks the assistant's
    tokens for training masks), parsed for its syntax: templates are compiled here, never
    rendered, so the block is only its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# The environment transformers renders chat templates in, as far as the syntax goes (its
# globals and its tojson are looked up when a template runs, not when it compiles).
_ENVIRONMENT = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
)
