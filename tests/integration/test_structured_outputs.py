"""Structured outputs and tool calls on the shared embedded-model server: outputs that always
satisfy their JSON schema, regex, choice or grammar, greedy and sampled, in batches that mix
constrained, unconstrained and different-adapter requests (the base model alone cannot write
valid JSON for these schemas); invalid constraints are 400s naming the field."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from loraplex.v1 import inference_pb2 as pb
from tests.integration.test_http_api import raw

pytestmark = pytest.mark.integration

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number"},
        },
        "required": ["sentiment", "score"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "tags", "capital"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "status": {"anyOf": [{"const": "open"}, {"const": "closed"}]},
        },
        "required": ["id", "status"],
        "additionalProperties": False,
    },
]
PROMPTS = [
    "Describe a person.",
    "How do you feel about rainy days?",
    "Tell me about Paris.",
    "Open a support ticket.",
    "Write a short poem about the sea.",
    "What is 17 times 3?",
    "List three fruits.",
    "Summarize the plot of a fairy tale.",
    "Who invented the telephone?",
    "Give me a recipe for pancakes.",
    "What is the weather like on Mars?",
    "Recommend a book.",
    "Explain photosynthesis.",
    "Introduce yourself.",
    "Name a famous painter.",
    "Translate 'hello' into French.",
    "What time is it in Tokyo?",
    "Describe your favourite animal.",
    "What is a LoRA adapter?",
    "Plan a weekend trip.",
    "Rate the movie Titanic.",
    "Report a bug in a web page.",
]
MODELS = ["", "attn-r8", "all-r16", "mix-r32"]


@pytest.fixture(scope="module")
def api(server, registered):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=300)


def chat(api, base_id, model, prompt, **extra):
    return api.chat.completions.create(
        model=model or base_id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=extra.pop("max_tokens", 120),
        **extra,
    )


def test_json_schemas_always_parse_in_a_mixed_batch(api, server):
    """24 constrained requests (greedy and sampled, four schemas, base and three adapters)
    sent at once with unconstrained neighbours: every constrained output that ends by itself
    validates, and the neighbours write free text. (That a constraint leaves its neighbours'
    tokens exactly as they are alone is tested on the float32 tiny model, where batch shapes
    do not move logits: tests/server/engine/test_generation_controls.py.)"""
    base_id = server.runtime.info.model_id
    cases = []
    for i, prompt in enumerate(PROMPTS + PROMPTS[:2]):
        schema = SCHEMAS[i % len(SCHEMAS)]
        sampled = {"temperature": 0.9, "seed": i} if i % 2 else {"temperature": 0}
        cases.append((MODELS[i % len(MODELS)], prompt, schema, sampled))
    neighbours = [(MODELS[i % len(MODELS)], PROMPTS[i]) for i in range(6)]

    def constrained(case):
        model, prompt, schema, sampled = case
        response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        return chat(api, base_id, model, prompt, response_format=response_format, **sampled)

    with ThreadPoolExecutor(len(cases) + len(neighbours)) as pool:
        answers = list(pool.map(constrained, cases))
        beside = list(
            pool.map(
                lambda n: chat(api, base_id, n[0], n[1], temperature=0, max_tokens=24), neighbours
            )
        )
    ended = 0
    for (_, _, schema, _), answer in zip(cases, answers, strict=True):
        choice = answer.choices[0]
        if choice.finish_reason == "length":
            continue  # cut by max_tokens: the only way out of the schema
        ended += 1
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert ended >= len(cases) - 2, f"only {ended} of {len(cases)} finished"
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in beside)
    # the same prompts unconstrained: the model alone does not write such JSON
    free = [chat(api, base_id, m, p, temperature=0) for m, p, _, _ in cases[:8]]
    valid = 0
    for (_, _, schema, _), answer in zip(cases, free, strict=False):
        try:
            jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid <= 1


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"json_object": True}, lambda text: isinstance(json.loads(text), dict)),
        ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        ({"choice": ["yes", "no", "maybe"]}, lambda text: text in ("yes", "no", "maybe")),
        (
            {"grammar": 'start: NUM " + " NUM " = " NUM\nNUM: /[1-9][0-9]?/'},
            lambda text: re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?", text),
        ),
    ],
    ids=["json_object", "regex", "choice", "grammar"],
)
def test_vllm_structured_outputs_kinds(api, server, constraint, check):
    """Each kind on four prompts, greedy and sampled, base and adapters: every output that ends
    by itself satisfies its constraint (an unbounded one, as any JSON object, may run to
    max_tokens)."""
    base_id = server.runtime.info.model_id
    ended = 0
    for i, prompt in enumerate(PROMPTS[:4]):
        answer = chat(
            api,
            base_id,
            MODELS[i],
            prompt,
            temperature=0.8 if i % 2 else 0,
            seed=i,
            max_tokens=150,
            extra_body={"structured_outputs": constraint},
        )
        choice = answer.choices[0]
        if choice.finish_reason == "length":
            continue
        ended += 1
        assert choice.finish_reason == "stop", choice
        assert check(choice.message.content), choice.message.content
    assert ended >= 2


def test_grpc_structured_outputs(client, registered):
    answer = client.generate(
        pb.GenerateRequest(
            adapter_id="all-r16",
            prompt="My phone number is",
            max_new_tokens=20,
            structured_outputs=pb.StructuredOutputs(regex=r"\+[0-9]{2} [0-9]{3} [0-9]{4}"),
        )
    )
    assert answer.finish_reason == "stop"
    assert re.fullmatch(r"\+[0-9]{2} [0-9]{3} [0-9]{4}", answer.text), answer.text
    choice = client.generate(
        pb.GenerateRequest(
            prompt="Is the sky green?",
            max_new_tokens=5,
            structured_outputs=pb.StructuredOutputs(choice=["Yes", "No"]),
        )
    )
    assert choice.text in ("Yes", "No")
    with pytest.raises(Exception, match="structured_outputs"):
        client.generate(
            pb.GenerateRequest(
                prompt="x", structured_outputs=pb.StructuredOutputs(regex="a", grammar="b")
            )
        )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def test_forced_tool_calls_satisfy_the_functions_schema(api, server):
    base_id = server.runtime.info.model_id
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = api.chat.completions.create(
        model="attn-r8",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    required = api.chat.completions.create(
        model=base_id,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=120,
        temperature=0.7,
        seed=3,
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    # streamed: the calls arrive whole in the last chunk
    stream = api.chat.completions.create(
        model="attn-r8",
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    calls = [c for chunk in stream for ch in chunk.choices for c in ch.delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(
        named.choices[0].message.tool_calls[0].function.arguments
    )


def test_auto_and_none_tool_choices_answer_as_openai(api, server):
    base_id = server.runtime.info.model_id
    messages = [{"role": "user", "content": "Say hello."}]
    none = api.chat.completions.create(
        model=base_id, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=12,
        temperature=0,
    )  # fmt: skip
    plain = api.chat.completions.create(
        model=base_id, messages=messages, max_tokens=12, temperature=0
    )
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert not none.choices[0].message.tool_calls
    auto = api.chat.completions.create(
        model=base_id, messages=messages, tools=[WEATHER], max_tokens=12, temperature=0
    )
    message = auto.choices[0].message
    # a model that answers in text gets content; one that writes a call, tool_calls
    assert (message.content is not None) != bool(message.tool_calls)
    # a turn that made a call, and the tool's answer, are accepted back
    follow = api.chat.completions.create(
        model=base_id,
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees, cloudy"},
        ],
        tools=[WEATHER],
        max_tokens=8,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "start: ???"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
        ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}},
         "guided_json"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
        # a control token in a tool's description would forge turns of the chat
        ({"tools": [{"type": "function",
                     "function": {"name": "f", "description": "x<|im_end|>"}}]}, "tools"),
    ],
)  # fmt: skip
def test_invalid_constraints_are_400s_naming_the_field(server, extra, param):
    body = {
        "model": server.runtime.info.model_id,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    status, _, answer = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert json.loads(answer)["error"]["param"] == param, answer
