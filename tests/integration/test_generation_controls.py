"""Generation controls on the shared embedded-model server, over both protocols: log-probabilities
within bf16 noise of PEFT's (the prompt scored with echo, as evaluation harnesses ask), `n`
samples as indexed choices and chunks, and sampling controls reaching the engine."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from loraplex.v1 import inference_pb2 as pb
from tests.integration.test_http_api import raw

pytestmark = pytest.mark.integration

# Log-probabilities of prompt tokens, bf16 NF4 against the exact float32 reference: each
# within LOGPROB_MAX_ATOL, and on average within NOISE_FACTOR times PEFT's own bf16 forward's
# distance from it (plus a floor), as test_peft_equivalence holds the logits.
LOGPROB_MAX_ATOL = 1.5
NOISE_FACTOR, NOISE_FLOOR = 2.0, 0.05
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."


@pytest.fixture(scope="module")
def api(server, registered):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120)


def log_softmax(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """(len(ids), V) next-token log-probabilities of a PEFT model, with `adapter` (None: base)."""
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                logits = model(torch.tensor([ids])).logits[0]
        else:
            model.set_adapter(adapter)
            logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("adapter", [None, "all-r16"])
def test_echo_scores_the_prompt_as_peft_does(api, server, peft_reference, peft_float32, adapter):
    model, tokenizer, _ = peft_reference
    ids = tokenizer(SENTENCE).input_ids
    answer = api.completions.create(
        model=adapter or server.runtime.info.model_id,
        prompt=ids,
        max_tokens=1,
        temperature=0,
        logprobs=1,
        echo=True,
    )
    (choice,) = answer.choices
    scores = choice.logprobs.token_logprobs
    assert len(scores) == len(ids) + 1 and scores[0] is None
    assert choice.text.startswith(tokenizer.decode(ids))
    assert choice.logprobs.text_offset[0] == 0
    want = [
        log_softmax(peft_float32, ids, adapter)[i - 1, ids[i]].item() for i in range(1, len(ids))
    ]
    peft = [log_softmax(model, ids, adapter)[i - 1, ids[i]].item() for i in range(1, len(ids))]
    ours = torch.tensor(scores[1 : len(ids)])
    err = (ours - torch.tensor(want)).abs()
    noise = (torch.tensor(peft) - torch.tensor(want)).abs().mean().item()
    assert err.max() <= LOGPROB_MAX_ATOL and err.mean() <= NOISE_FACTOR * noise + NOISE_FLOOR
    # the generated token: greedy, so the best alternative is itself (how harnesses check)
    last_top = choice.logprobs.top_logprobs[-1]
    assert max(last_top.values()) == scores[-1]
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 1


def test_chat_logprobs_are_sorted_and_greedy_takes_the_best(api):
    answer = api.chat.completions.create(
        model="attn-r8",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    (choice,) = answer.choices
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        values = [t.logprob for t in token.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        # greedy: the chosen token is the best (bf16 logits tie often: by value)
        assert token.top_logprobs[0].logprob == token.logprob <= 0
        assert bytes(token.bytes).decode(errors="replace") == token.token


def test_n_samples_are_indexed_choices_and_reproduce_with_a_seed(api):
    def ask():
        return api.chat.completions.create(
            model="mix-r32",
            messages=[{"role": "user", "content": "Write a word."}],
            max_tokens=6,
            temperature=1.0,
            seed=5,
            n=3,
        )

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed + i per sample
    assert len(set(texts)) > 1  # three samples, not one thrice
    counted = first.usage.completion_tokens
    assert 6 < counted <= 18  # every sample's tokens, the prompt once
    single = api.chat.completions.create(
        model="mix-r32", messages=[{"role": "user", "content": "Write a word."}], max_tokens=1
    )
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    stream = api.chat.completions.create(
        model="mix-r32",
        messages=[{"role": "user", "content": "Write a word."}],
        max_tokens=6,
        temperature=1.0,
        seed=5,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = ["", "", ""]
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert streamed == texts and usage.completion_tokens == counted


def test_streamed_completions_echo_and_score_as_the_unary_answer(server):
    body = {
        "model": server.runtime.info.model_id,
        "prompt": "Once upon a time",
        "max_tokens": 5,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
    }
    status, _, unary = raw(server, "POST", "/v1/completions", body)
    assert status == 200
    whole = json.loads(unary)["choices"][0]
    status, _, events = raw(server, "POST", "/v1/completions", body | {"stream": True})
    chunks = [
        json.loads(e.removeprefix("data: "))
        for e in events.decode().split("\n\n")
        if e.startswith("data: {")
    ]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["text"] and text.startswith("Once upon a time")
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    offsets = [
        o for c in chunks if c["choices"] for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == whole["logprobs"]["text_offset"]


def test_grpc_samples_logprobs_and_stop_tokens(client, registered):
    request = pb.GenerateRequest(
        adapter_id="attn-r8",
        prompt="Count: one, two,",
        max_new_tokens=6,
        temperature=0.8,
        seed=9,
        n=2,
        logprobs=2,
        prompt_logprobs=0,
    )
    unary = client.generate(request)
    assert [c.index for c in unary.choices] == [0, 1]
    assert unary.text == unary.choices[0].text
    prompt_len = unary.usage.prompt_tokens
    assert len(unary.prompt_logprobs) == prompt_len - 1
    assert all(lp.logprob <= 0 and not lp.top for lp in unary.prompt_logprobs)
    for choice in unary.choices:
        assert [lp.token_id for lp in choice.logprobs] == list(choice.token_ids)
        assert all(len(lp.top) == 2 for lp in choice.logprobs)
    assert unary.usage.completion_tokens == sum(len(c.token_ids) for c in unary.choices)
    texts = ["", ""]
    for chunk in client.generate_stream(request):
        texts[chunk.index] += chunk.text
    assert texts == [c.text for c in unary.choices]
    # a stop token id ends generation as the end-of-sequence token does, and says which
    greedy = client.generate(pb.GenerateRequest(prompt="Count: one, two,", max_new_tokens=6))
    stop = greedy.token_ids[1]
    stopped = client.generate(
        pb.GenerateRequest(prompt="Count: one, two,", max_new_tokens=6, stop_token_ids=[stop])
    )
    first = list(greedy.token_ids).index(stop)
    assert list(stopped.token_ids) == list(greedy.token_ids)[: first + 1]
    assert (stopped.finish_reason, stopped.stop_token_id) == ("stop", stop)


def test_a_frequency_penalty_breaks_repetition(api, server):
    def ask(**extra):
        answer = api.completions.create(
            model=server.runtime.info.model_id,
            prompt="Repeat after me: go go go go go go",
            max_tokens=16,
            temperature=0,
            logprobs=0,
            **extra,
        )
        tokens = answer.choices[0].logprobs.tokens
        return max(tokens.count(t) for t in tokens)

    # greedy, the model repeats "go" for all 16 tokens; penalized, hardly a token twice
    assert ask() >= 12 and ask(frequency_penalty=2.0, presence_penalty=2.0) <= 3


def test_out_of_range_controls_are_400s(server):
    base = server.runtime.info.model_id
    cases = [
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"10": 101}}, "logit_bias.10"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias[0]"),
        ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ]
    for body, param in cases:
        request = {"model": base, "prompt": "hi", "max_tokens": 10} | body
        status, _, answer = raw(server, "POST", "/v1/completions", request)
        assert status == 400, body
        assert json.loads(answer)["error"]["param"] == param, body
