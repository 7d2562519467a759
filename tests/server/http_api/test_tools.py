"""Tool calls out of generated text, and the constraints forced tool choices ask for."""

from __future__ import annotations

import json

import pytest

from loraplex.core.errors import InvalidRequest
from loraplex.server.http_api.tools import ToolCalling, tool_calls, tool_request

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
AUTO = ToolCalling("auto", ("get_weather",))


def test_auto_parses_calls_only_when_the_whole_text_is_calls():
    (call,) = tool_calls(AUTO, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    tagged = (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'
    )
    assert json.loads(tool_calls(AUTO, tagged)[0]["function"]["arguments"]) == {"city": "Rome"}
    for text in (
        "It is sunny.",
        '{"name": "other", "arguments": {}}',  # not a declared tool
        'Sure: {"name": "get_weather", "arguments": {}}',  # not the whole text
        "[" * 100_000,  # nested past Python's stack: not a call, not a crash
    ):
        assert tool_calls(AUTO, text) is None


def test_forced_choices_become_schema_constraints():
    named = tool_request(
        {
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    assert named.calling is not None and named.calling.mode == "named"
    assert named.constraint is not None
    assert json.loads(named.constraint.value) == WEATHER["function"]["parameters"]
    assert named.constraint.field == "tools[0].function.parameters"
    required = tool_request({"tools": [WEATHER], "tool_choice": "required"})
    schema = json.loads(required.constraint.value)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert tool_request({"tools": [WEATHER], "tool_choice": "none"}).calling is None
    assert tool_request({"tools": [WEATHER]}).constraint is None  # auto: free text
    with pytest.raises(InvalidRequest) as err:
        tool_request({"tools": [WEATHER, WEATHER]})
    assert err.value.field == "tools"
