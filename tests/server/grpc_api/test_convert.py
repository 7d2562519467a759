"""protobuf <-> runtime types: every field of each view reaches the message field of the same
name (with distinct values, so a swapped or forgotten field fails), and every request field
reaches the runtime."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from loraplex.adapters.compositions import Composition, CompositionRequest, WeightedAdapter
from loraplex.adapters.sources import FileChunk
from loraplex.core.errors import InvalidRequest
from loraplex.core.types import AdapterVersion, TierStats
from loraplex.server.engine.request import RequestOutput, TokenLogprob, Usage
from loraplex.server.engine.structured import ConstraintSpec
from loraplex.server.grpc_api import convert
from loraplex.server.runtime.requests import ChatMessage, Completion, GenerateInput
from loraplex.server.runtime.views import (
    AdapterView,
    CacheView,
    MergeView,
    ModelInfo,
    Registration,
    TierView,
)
from loraplex.v1 import adapters_pb2, inference_pb2


def fields_of(message) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


def assert_same_fields(view, message, renamed: dict[str, str] | None = None) -> None:
    """Each field of `view` equals the message's field of that name (or of its new name), and
    the message has no field the view does not fill."""
    renamed = renamed or {}
    names = {renamed.get(f.name, f.name) for f in dataclasses.fields(view)}
    assert names == fields_of(message), names ^ fields_of(message)
    for f in dataclasses.fields(view):
        got = getattr(message, renamed.get(f.name, f.name))
        want = getattr(view, f.name)
        if isinstance(want, tuple):
            got, want = list(got), list(want)
        if isinstance(want, float):
            assert abs(got - want) < 1e-6, f.name
        else:
            assert got == want, f.name


VERSION = AdapterVersion(
    adapter_id="support",
    version=3,
    digest="sha256:ab",
    rank=16,
    lora_alpha=32.0,
    target_modules=("q_proj", "v_proj"),
    size_bytes=1234,
    created_at="2026-01-02T03:04:05Z",
    source="s3://bucket/support",
    base_model_fingerprint="sha256:base",
    tenant="acme",
    shared=True,
    chat_template="{{ messages }}",
)


def test_model_info_fields_map_one_to_one():
    info = ModelInfo(
        model_id="m",
        model_type="llama",
        quantization="bnb-nf4-double-quant",
        device="cpu",
        dtype="bfloat16",
        max_context_length=4096,
        vocab_size=49152,
        num_layers=30,
        supported_target_modules=("q_proj", "down_proj"),
        max_lora_rank=64,
        max_loras=8,
        max_batch_size=65,
        base_model_fingerprint="sha256:f",
        version="0.1.0",
        has_chat_template=True,
    )
    assert_same_fields(info, convert.model_info_message(info))


def test_merge_view_fields_map_one_to_one():
    view = MergeView(
        adapter_id="support",
        version=3,
        pinned=True,
        policy="auto",
        token_share=0.75,
        leading_adapter_id="other",
        merges=5,
        unmerges=4,
        last_merge_seconds=0.25,
        last_unmerge_seconds=0.125,
    )
    assert_same_fields(view, convert.merge_state_message(view))


def test_tier_and_cache_views_map_with_their_counters():
    stats = TierStats(hits=1, misses=2, evictions=3, loads=4, load_seconds=5.5, load_failures=6)
    view = TierView(tier="host", resident=7, capacity=8, used_bytes=9, budget_bytes=10, stats=stats)
    message = convert.tier_stats_message(view)
    counters = {f.name for f in dataclasses.fields(stats)} - {"load_observers"}
    tier_fields = {f.name for f in dataclasses.fields(view)} - {"stats"}
    assert fields_of(message) == tier_fields | counters
    for name in tier_fields:
        assert getattr(message, name) == getattr(view, name), name
    for name in counters:
        assert getattr(message, name) == getattr(stats, name), name
    cache = convert.cache_stats_message(CacheView(tiers=(view,), pinned=("a", "b")))
    assert list(cache.pinned) == ["a", "b"] and cache.tiers[0] == message


def test_adapter_view_fills_every_adapter_info_field():
    other = dataclasses.replace(VERSION, adapter_id="tone", version=2)
    composition = Composition(
        inputs=(VERSION, other),
        weights=(0.7, 0.3),
        method="ties",
        density=0.5,
        seed=9,
        majority_sign_method="frequency",
        version=dataclasses.replace(VERSION, adapter_id="composed-x", version=1),
    )
    view = AdapterView(
        version=VERSION, versions=(1, 3), pinned=True, merged=True, composition=composition
    )
    info = convert.adapter_info(view)
    version_fields = {f.name for f in dataclasses.fields(VERSION)} - {"chat_template"}
    view_fields = {"versions", "pinned", "merged", "composition"}
    derived = {"name", "composed_versions", "has_chat_template"}
    assert fields_of(info) == version_fields | view_fields | derived
    assert info.has_chat_template  # the template itself stays on the server
    assert not convert.adapter_info(
        AdapterView(dataclasses.replace(VERSION, chat_template=""), (3,))
    ).has_chat_template
    for name in version_fields:
        want, got = getattr(VERSION, name), getattr(info, name)
        if isinstance(want, tuple):
            want, got = list(want), list(got)
        assert got == want, name
    assert info.name == "support" and list(info.versions) == [1, 3]
    assert info.pinned and info.merged and list(info.composed_versions) == [3, 2]
    c = info.composition
    weighted = [(a.adapter_id, round(a.weight, 6)) for a in c.adapters]
    assert weighted == [("support", 0.7), ("tone", 0.3)]
    assert (c.method, c.density, c.seed, c.majority_sign_method) == ("ties", 0.5, 9, "frequency")
    ignored = ("checkpoint-10/", "optimizer.pt", "tokenizer.json")
    registration = Registration(adapter=view, created=True, ignored_files=ignored)
    registered = convert.registration_message(registration)
    assert {f.name for f in dataclasses.fields(registration)} == fields_of(registered)
    assert registered.created and registered.adapter == info
    assert tuple(registered.ignored_files) == ignored


def test_every_generate_request_field_reaches_the_runtime():
    request = inference_pb2.GenerateRequest(
        adapter_id="support",
        prompt="hello",
        messages=[inference_pb2.ChatMessage(role="user", content="hi")],
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.75,
        top_k=3,
        seed=11,
        stop=["\n\n", "END"],
        compose=adapters_pb2.AdapterComposition(
            adapters=[adapters_pb2.WeightedAdapter(adapter_id="a", weight=0.5)],
            method="cat",
            density=0.25,
            seed=4,
            majority_sign_method="frequency",
        ),
        ignore_eos=True,
        prompt_ids=[1, 2, 3],
        n=4,
        logprobs=5,
        prompt_logprobs=0,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        repetition_penalty=1.25,
        min_p=0.125,
        logit_bias={9: -1.5, 2: 100.0},
        stop_token_ids=[7, 8],
        min_tokens=6,
        include_stop_str_in_output=True,
        structured_outputs=inference_pb2.StructuredOutputs(regex="a+"),
    )
    got = convert.generate_input(request)
    # `tools` are the chat API's (function definitions for a chat template); the constraint
    # comes as structured_outputs
    names = {f.name for f in dataclasses.fields(GenerateInput)} - {"tools", "constraint"}
    assert names | {"structured_outputs"} == fields_of(request)
    assert got == GenerateInput(
        adapter_id="support",
        prompt="hello",
        messages=(ChatMessage(role="user", content="hi"),),
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.75,
        top_k=3,
        seed=11,
        stop=("\n\n", "END"),
        compose=CompositionRequest(
            adapters=(WeightedAdapter(adapter_id="a", weight=0.5),),
            method="cat",
            density=0.25,
            seed=4,
            majority_sign_method="frequency",
        ),
        ignore_eos=True,
        prompt_ids=(1, 2, 3),
        n=4,
        logprobs=5,
        prompt_logprobs=0,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        repetition_penalty=1.25,
        min_p=0.125,
        logit_bias=((2, 100.0), (9, -1.5)),
        stop_token_ids=(7, 8),
        min_tokens=6,
        include_stop_str_in_output=True,
        constraint=ConstraintSpec("regex", "a+", "structured_outputs.regex"),
    )
    unset = convert.generate_input(inference_pb2.GenerateRequest())
    assert unset == GenerateInput()  # unset optional fields are the runtime's defaults


def test_a_final_output_becomes_a_response_with_usage():
    out = RequestOutput(
        text="x",
        token_ids=[5],
        finish_reason="stop",
        stop_reason="END",
        usage=Usage(prompt_tokens=3, completion_tokens=4),
    )
    response = convert.generate_response(out, "all text", [1, 5], VERSION, "req-9")
    assert (response.text, response.finish_reason, response.stop_reason) == ("all text", "stop",
                                                                             "END")  # fmt: skip
    assert (response.adapter_id, response.adapter_version, response.request_id) == (
        "support",
        3,
        "req-9",
    )
    assert list(response.token_ids) == [1, 5]
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (3, 7)


def test_structured_outputs_take_exactly_one_constraint():
    def spec(**fields):
        return convert.constraint_spec(inference_pb2.StructuredOutputs(**fields))

    assert spec(json='{"type": "object"}') == ConstraintSpec(
        "json_schema", '{"type": "object"}', "structured_outputs.json"
    )
    assert spec(choice=["a", "b"]).value == '["a", "b"]'
    assert spec(grammar="start: x").kind == "grammar"
    assert spec(json_object=True).kind == "json_object"
    for bad in ({}, {"regex": "a", "grammar": "b"}, {"json_object": True, "choice": ["a"]}):
        with pytest.raises(InvalidRequest, match="exactly one"):
            spec(**bad)


def test_samples_logprobs_and_stop_tokens_reach_the_response():
    lp = TokenLogprob(token_id=5, logprob=-0.25, top=((5, -0.25), (6, -2.0)))
    prompt = (None, TokenLogprob(token_id=3, logprob=-4.0))
    chunk = RequestOutput(text="x", token_ids=[5], index=2, logprobs=(lp,), prompt_logprobs=prompt)
    response = convert.generate_response(chunk, chunk.text, chunk.token_ids, None, "r")
    assert response.index == 2
    assert [(t.token_id, round(t.logprob, 6)) for t in response.logprobs] == [(5, -0.25)]
    assert [(t.token_id, t.logprob) for t in response.logprobs[0].top] == [(5, -0.25), (6, -2.0)]
    # the first prompt token has nothing before it: one entry per later token
    assert [(t.token_id, t.logprob) for t in response.prompt_logprobs] == [(3, -4.0)]
    assert not response.HasField("stop_token_id") and not response.stop_reason

    def sample(index: int, text: str, stop: str | int) -> Completion:
        last = RequestOutput(
            text="",
            token_ids=[],
            finish_reason="stop",
            stop_reason=stop,
            usage=Usage(prompt_tokens=3, completion_tokens=2 + index),
            index=index,
            logprobs=(lp,),
        )
        return Completion(text=text, token_ids=[1, index], last=last, logprobs=(lp, lp))

    done = [sample(0, "a", 7), sample(1, "b", "END")]
    unary = convert.unary_response(done, VERSION, "r")
    assert (unary.text, unary.stop_token_id, len(unary.logprobs)) == ("a", 7, 2)
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (3, 5)
    assert [(c.index, c.text, list(c.token_ids)) for c in unary.choices] == [
        (0, "a", [1, 0]),
        (1, "b", [1, 1]),
    ]
    assert unary.choices[0].stop_token_id == 7 and not unary.choices[0].stop_reason
    assert unary.choices[1].stop_reason == "END" and not unary.choices[1].HasField("stop_token_id")
    assert not convert.unary_response(done[:1], None, "r").choices  # n = 1: no choices
    # one token: its output is the first (with the prompt's) and the last: listed once
    only = RequestOutput(
        text="a", token_ids=[5], finish_reason="length", index=0, prompt_logprobs=prompt,
        usage=Usage(prompt_tokens=2, completion_tokens=1),
    )  # fmt: skip
    scored = Completion(text="a", token_ids=[5], last=only, prompt_logprobs=prompt)
    assert len(convert.unary_response([scored], None, "r").prompt_logprobs) == 1


def test_adapter_requests_name_one_adapter_and_uploads_arrive_as_file_chunks():
    assert convert.adapter_id_of(adapters_pb2.GetAdapterRequest(name="tone")) == "tone"
    same = adapters_pb2.GetAdapterRequest(adapter_id="tone", name="tone")
    assert convert.adapter_id_of(same) == "tone"
    with pytest.raises(InvalidRequest, match="name"):
        convert.adapter_id_of(adapters_pb2.GetAdapterRequest(adapter_id="tone", name="other"))

    first = adapters_pb2.PushAdapterRequest(adapter_id="tone", pin=True)
    rest = [
        adapters_pb2.PushAdapterRequest(file_name="adapter_config.json", data=b"{}"),
        adapters_pb2.PushAdapterRequest(file_name="empty"),
        adapters_pb2.PushAdapterRequest(data=b"orphan"),
    ]

    async def chunks():
        async def stream():
            for message in rest:
                yield message

        return [c async for c in convert.push_chunks(first, stream())]

    with pytest.raises(InvalidRequest, match="file_name"):  # data must name its file
        asyncio.run(chunks())
    rest.pop()
    assert asyncio.run(chunks()) == [
        FileChunk(file_name="adapter_config.json", data=b"{}"),
        FileChunk(file_name="empty", data=b""),
    ]
