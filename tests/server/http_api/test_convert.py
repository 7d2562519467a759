"""OpenAI request bodies as the runtime's GenerateInput: defaults, forms and refusals."""

from __future__ import annotations

import pytest

from loraplex.adapters.compositions import CompositionRequest, WeightedAdapter
from loraplex.core.errors import InvalidRequest
from loraplex.server.http_api import convert
from loraplex.server.runtime.requests import ChatMessage, GenerateInput

BASE = "base-model"


def chat(**body):
    return convert.chat_request({"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
                                | body, BASE, None)  # fmt: skip


def test_openai_defaults_and_the_base_model():
    (inp,) = chat().inputs
    assert inp == GenerateInput(
        messages=(ChatMessage("user", "hi"),), temperature=1.0, top_p=1.0, max_new_tokens=None
    )
    (completion,) = convert.completion_request({"model": BASE, "prompt": "x"}, BASE).inputs
    assert completion.max_new_tokens == 16  # OpenAI's default for /v1/completions


def test_fields_map_to_the_runtime():
    request = chat(model="support", max_completion_tokens=9, max_tokens=3, temperature=0,
                   top_p=0.5, top_k=-1, seed=7, stop="END", ignore_eos=True, stream=True,
                   stream_options={"include_usage": True}, user="someone")  # fmt: skip
    (inp,) = request.inputs
    assert (inp.adapter_id, inp.max_new_tokens, inp.temperature, inp.top_p) == (
        "support",
        9,
        0,
        0.5,
    )
    assert (inp.top_k, inp.seed, inp.stop, inp.ignore_eos) == (0, 7, ("END",), True)
    assert request.stream and request.include_usage and request.model == "support"


def test_message_content_parts_and_roles():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    (inp,) = convert.chat_request(
        {"model": BASE, "messages": [{"role": "developer", "content": "be brief"},
                                     {"role": "user", "content": parts}]}, BASE, None
    ).inputs  # fmt: skip
    assert inp.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "a\nb"))


def test_prompt_forms():
    def prompts(prompt):
        return [
            i.prompt or i.prompt_ids
            for i in convert.completion_request({"model": BASE, "prompt": prompt}, BASE).inputs
        ]

    assert prompts("x") == ["x"]
    assert prompts([1, 2]) == [(1, 2)]
    assert prompts(["x", [3, 4], "y"]) == ["x", (3, 4), "y"]
    for bad in ([], [1.5], [[1], 2], None, {"a": 1}):
        with pytest.raises(InvalidRequest):
            prompts(bad)


def test_compose_extension():
    request = chat(compose={"adapters": [{"adapter_id": "a", "weight": 0.7},
                                         {"adapter_id": "b", "weight": 0.3}], "method": "ties",
                            "density": 0.5, "seed": 3})  # fmt: skip
    assert request.inputs[0].compose == CompositionRequest(
        adapters=(WeightedAdapter("a", 0.7), WeightedAdapter("b", 0.3)),
        method="ties",
        density=0.5,
        seed=3,
    )
    with pytest.raises(InvalidRequest) as err:
        chat(model="support", compose={"adapters": []})
    assert err.value.field == "compose"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": "3"}, "n"),
        ({"logprobs": 3}, "logprobs"),  # chat's is true or false
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"presence_penalty": "some"}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": "big"}}, "logit_bias.5"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"min_tokens": 4.5}, "min_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", 1]}, "stop"),
        ({"model": ""}, "model"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
    ],
)
def test_refusals_name_the_field(body, field):
    with pytest.raises(InvalidRequest) as err:
        chat(**body)
    assert err.value.field == field


def test_defaults_of_unserved_fields_are_accepted():
    chat(tool_choice="none", suffix="", best_of=1)


def test_generation_controls_map_to_the_runtime():
    (inp,) = chat(n=3, logprobs=True, top_logprobs=4, presence_penalty=0.5,
                  frequency_penalty=-1, repetition_penalty=1.2, min_p=0.1,
                  logit_bias={"7": -100, "12": 2.5}, stop_token_ids=[2, 3], min_tokens=4,
                  include_stop_str_in_output=True, prompt_logprobs=2).inputs  # fmt: skip
    assert (inp.n, inp.logprobs, inp.prompt_logprobs) == (3, 4, 2)
    assert (inp.presence_penalty, inp.frequency_penalty, inp.repetition_penalty) == (0.5, -1, 1.2)
    assert (inp.min_p, inp.logit_bias) == (0.1, ((7, -100.0), (12, 2.5)))
    assert (inp.stop_token_ids, inp.min_tokens, inp.include_stop_str_in_output) == ((2, 3), 4, True)
    assert chat(logprobs=True).inputs[0].logprobs == 0  # the chosen token's only
    assert chat(logprobs=False, top_logprobs=None).inputs[0].logprobs is None


def test_completions_echo_with_logprobs_scores_the_prompt():
    def request(**body):
        return convert.completion_request({"model": BASE, "prompt": [[1, 2], "x"]} | body, BASE)

    scored = request(echo=True, logprobs=1, max_tokens=1)
    assert scored.echo and all((i.logprobs, i.prompt_logprobs) == (1, 1) for i in scored.inputs)
    plain = request(logprobs=2)
    assert not plain.echo and plain.inputs[0].prompt_logprobs is None
    assert plain.inputs[0].logprobs == 2
    echoed = request(echo=True)  # the prompt's text comes back, with no scores to compute
    assert echoed.echo and echoed.inputs[0].prompt_logprobs is None
