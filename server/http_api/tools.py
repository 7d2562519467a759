"""OpenAI's function calling over the chat API, as structured outputs: `tools` and `tool_choice`
in, `tool_calls` out.

    tool_choice      what the model generates                      the answer
    "none"           text; the tools are not shown to it           content
    "auto" (default) text, the tools shown to its chat template    tool_calls if the text is a
                                                                   call of a declared tool (a
                                                                   JSON {"name", "arguments"},
                                                                   a list of them, or either
                                                                   inside <tool_call> tags),
                                                                   else content
    "required"       a JSON list of calls, constrained to the      tool_calls (finish_reason
                     declared tools' names and parameter schemas   "tool_calls")
    {"type": "function", "function": {"name": N}}
                     N's arguments, constrained to its schema      one call of N (finish_reason
                                                                   "stop", as OpenAI's)

A forced call always parses: its arguments satisfy the function's JSON schema (unless
max_tokens cuts them, which finish_reason "length" says).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.core.errors import InvalidRequest, shown
from loraplex.server.engine.structured import ConstraintSpec

MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)  # Hermes-style calls


@dataclass(frozen=True)
class ToolCalling:
    """How a chat request's output becomes tool calls."""

    mode: str  # "auto" | "required" | "named"
    names: tuple[str, ...]  # the declared functions
    named: str = ""  # the function a named tool_choice forces


@dataclass(frozen=True)
class ToolRequest:
    """What `tools` and `tool_choice` ask of a chat request."""

    calling: ToolCalling | None  # None: tool_choice "none", or no tools
    shown: tuple[dict[str, Any], ...]  # the tools for the chat template
    constraint: ConstraintSpec | None  # a forced call's schema


def tool_request(body: Mapping[str, Any]) -> ToolRequest:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice", "names a tool, but the request has no tools")
        return ToolRequest(None, (), None)
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidRequest("tools", f"must be a list of at most {MAX_TOOLS} functions")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    names = tuple(f["name"] for f in functions)
    if len(set(names)) < len(names):
        raise InvalidRequest("tools", "two tools have the same name")
    if choice is None or choice == "auto":
        return ToolRequest(ToolCalling("auto", names), tuple(tools), None)
    if choice == "none":
        return ToolRequest(None, (), None)
    if choice == "required":
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
            }
            for f in functions
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        spec = ConstraintSpec("json_schema", json.dumps(schema), "tools")
        return ToolRequest(ToolCalling("required", names), tuple(tools), spec)
    name = _named(choice)
    if name not in names:
        raise InvalidRequest("tool_choice", f"names {shown(name)}, which is not in tools")
    i = names.index(name)
    spec = ConstraintSpec(
        "json_schema", json.dumps(functions[i]["parameters"]), f"tools[{i}].function.parameters"
    )
    return ToolRequest(ToolCalling("named", names, name), tuple(tools), spec)


def _function(i: int, tool: object) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise InvalidRequest(where, 'must be {"type": "function", "function": {...}}')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{where}.function", "must be an object with a name")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(f"{where}.function.name", "1-64 letters, digits, _ or -")
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{where}.function.parameters", "must be a JSON schema object")
    return {"name": name, "parameters": parameters}


def _named(choice: object) -> str:
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        return str(choice["function"]["name"])
    raise InvalidRequest(
        "tool_choice", 'must be "none", "auto", "required" or {"type": "function", ...}'
    )


def tool_calls(calling: ToolCalling, text: str) -> list[dict[str, Any]] | None:
    """The calls `text` makes (None: it is a message, not calls)."""
    if calling.mode == "named":
        return [_call(calling.named, text)]
    calls = _parse_calls(text, calling.names)
    if calls is None:
        return None
    return [_call(name, json.dumps(arguments, ensure_ascii=False)) for name, arguments in calls]


def finish_reason(calling: ToolCalling, finish: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (a forced function: "stop")."""
    return "tool_calls" if finish == "stop" and calling.mode != "named" else finish


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _parse_calls(text: str, names: tuple[str, ...]) -> list[tuple[str, Any]] | None:
    """[(name, arguments)] if the whole text is calls of declared tools, else None."""
    tagged = TAGGED.findall(text)
    parts = tagged if tagged and not TAGGED.sub("", text).strip() else [text]
    calls: list[tuple[str, Any]] = []
    for part in parts:
        try:
            value = json.loads(part)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):  # some models write them as JSON text
                try:
                    arguments = json.loads(arguments)
                except (ValueError, RecursionError):
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append((str(item["name"]), arguments))
    return calls or None
