"""Merge on demand through the gRPC server: a composed adapter serves what stock PEFT's
`add_weighted_adapter` composes, under a derived id; an adapter merged into the base (the
MergeAdapter RPC) keeps every request's output what PEFT gives, its own and the others'."""

from __future__ import annotations

import json

import grpc
import pytest

from loraplex.server.cli import main
from loraplex.v1 import adapters_pb2
from loraplex.v1 import inference_pb2 as pb
from tests.integration.test_peft_equivalence import (
    NEW_TOKENS,
    PROMPTS,
    agreeing_prefix,
    chat_ids,
    peft_greedy,
)

pytestmark = pytest.mark.integration


def request(prompt: str, adapter: str = "", compose=None) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        adapter_id=adapter,
        max_new_tokens=NEW_TOKENS,
        messages=[pb.ChatMessage(role="user", content=prompt)],
    )
    if compose is not None:
        req.compose.CopyFrom(compose)
    return req


def composition(
    method: str, *pairs: tuple[str, float], **kwargs
) -> adapters_pb2.AdapterComposition:
    return adapters_pb2.AdapterComposition(
        adapters=[adapters_pb2.WeightedAdapter(adapter_id=a, weight=w) for a, w in pairs],
        method=method,
        **kwargs,
    )


def check_like_peft(model, tokenizer, response, prompt: str, adapter: str | None) -> None:
    ref, gaps = peft_greedy(model, chat_ids(tokenizer, prompt), adapter)
    must, agree = agreeing_prefix(list(response.token_ids), ref, gaps)
    assert agree >= must, f"{adapter}: diverged from PEFT at step {agree}: {response.token_ids}"


def test_composed_adapter_serves_what_peft_composes(client, peft_reference, registered):
    """cat of two adapters of different ranks (exact composition) against PEFT's own."""
    model, tokenizer, _ = peft_reference
    inputs = (("all-r16", 0.7), ("mix-r32", -0.4))
    spec = composition("cat", *inputs)
    model.add_weighted_adapter(
        [a for a, _ in inputs], [w for _, w in inputs], "cat-ref", combination_type="cat"
    )
    try:
        first = client.generate(request(PROMPTS[0], compose=spec))
        derived = first.adapter_id
        assert derived.startswith("composed-") and first.adapter_version == 1
        check_like_peft(model, tokenizer, first, PROMPTS[0], "cat-ref")
        second = client.generate(request(PROMPTS[1], compose=spec))
        assert second.adapter_id == derived  # same inputs, same id
        check_like_peft(model, tokenizer, second, PROMPTS[1], "cat-ref")
    finally:
        model.delete_adapter("cat-ref")
    plain = client.generate(request(PROMPTS[0], adapter="all-r16"))
    assert list(plain.token_ids) != list(first.token_ids)  # the composition did something
    # By its derived id while this server holds it: the same adapter, the same output.
    by_id = client.generate(request(PROMPTS[0], adapter=derived))
    assert by_id.adapter_id == derived and list(by_id.token_ids) == list(first.token_ids)
    info = client.get(derived)
    assert info.rank == 16 + 32 and info.source == "composed:cat"
    assert [(a.adapter_id, round(a.weight, 3)) for a in info.composition.adapters] == [
        ("all-r16", 0.7),
        ("mix-r32", -0.4),
    ]
    assert list(info.composed_versions) == [1, 1]
    # Other parameters the method does not read leave the id alone; other weights do not.
    seeded = client.generate(request(PROMPTS[0], compose=composition("cat", *inputs, seed=7)))
    assert seeded.adapter_id == derived
    other = client.generate(
        request(PROMPTS[0], compose=composition("cat", ("all-r16", 0.5), ("mix-r32", -0.4)))
    )
    assert other.adapter_id != derived


@pytest.mark.parametrize(
    ("spec", "code", "field"),
    [
        (composition("linear", ("all-r16", 1.0)), grpc.StatusCode.INVALID_ARGUMENT, "adapters"),
        (
            composition("mean", ("all-r16", 1.0), ("attn-r8", 1.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "method",
        ),
        (
            composition("linear", ("all-r16", 1.0), ("attn-r8", 1.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "one rank",
        ),
        (
            composition("ties", ("all-r16", 1.0), ("all-r16", 0.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "density",
        ),
        (
            composition("cat", ("all-r16", 1.0), ("no-such-adapter", 1.0)),
            grpc.StatusCode.NOT_FOUND,
            "no-such-adapter",
        ),
    ],
)
def test_bad_compositions_are_refused(client, registered, spec, code, field):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(request(PROMPTS[0], compose=spec))
    assert err.value.code() == code
    assert field in err.value.details()


def test_adapter_id_and_compose_together_are_refused(client, registered):
    spec = composition("cat", ("all-r16", 1.0), ("attn-r8", 1.0))
    with pytest.raises(grpc.RpcError) as err:
        client.generate(request(PROMPTS[0], adapter="attn-r8", compose=spec))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compose" in err.value.details()


def test_merged_adapter_and_the_others_still_match_peft(client, server, peft_reference, registered):
    """MergeAdapter folds all-r16 into the base: its requests, another adapter's and the base's
    still give PEFT's outputs (up to PEFT's own near ties); UnmergeAdapter undoes it."""
    model, tokenizer, _ = peft_reference
    state = client.merge("all-r16")
    try:
        assert state.adapter_id == "all-r16" and state.version == 1 and state.pinned
        assert state.last_merge_seconds > 0
        assert client.get("all-r16").merged and not client.get("attn-r8").merged
        for adapter in ("all-r16", "attn-r8", None):
            for prompt in PROMPTS[:2]:
                response = client.generate(request(prompt, adapter=adapter or ""))
                check_like_peft(model, tokenizer, response, prompt, adapter)
        assert client.merge_state().adapter_id == "all-r16"
    finally:
        state = client.unmerge()
    assert state.adapter_id == "" and not state.pinned and state.unmerges >= 1
    assert not client.get("all-r16").merged
    assert server.state().merge.adapter is None
    with pytest.raises(grpc.RpcError) as err:
        client.merge("no-such-adapter")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_composes_and_merges(server, registered, capsys):
    def run(*argv: str) -> dict:
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    address = ("--server", server.address)
    composing = ("--compose", "all-r16:0.5", "--compose", "attn-r8:0.5", "--method", "cat")
    reply = run("generate", *address, "Hello", "--max-new-tokens", "4", "--json", *composing)
    assert reply["adapter_id"].startswith("composed-")
    assert run("adapters", *address, "merge", "attn-r8")["adapter_id"] == "attn-r8"
    state = run("adapters", *address, "merge-state")
    assert state["adapter_id"] == "attn-r8" and state["pinned"] and state["policy"] == "off"
    assert run("adapters", *address, "unmerge")["adapter_id"] == ""
