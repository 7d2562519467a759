"""The prefix cache on an embedded-model server of its own, with the default flags: a repeated
system prompt is read from the cache (usage's cached tokens over both protocols, the metrics,
GetCacheStats), a salt or another adapter never shares it, and the answers are those computed
without it (up to near ties, in bf16)."""

from __future__ import annotations

import openai
import pytest
from prometheus_client import generate_latest

from loraplex.core.config import ModelConfig
from loraplex.server.config import EngineConfig, MergeSettings, ServerConfig
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

SYSTEM = (
    "You are the support assistant of a shop that sells bicycles, spare parts and repairs. "
    "Answer in one short sentence, politely, and never invent an order number. Opening hours "
    "are nine to six on weekdays and ten to two on Saturdays; the shop is closed on Sundays. "
)
# bf16 noise: the cached prompt's last tokens are computed in a smaller step than the whole
# prompt is, and SmolLM2's bf16 logits can differ by up to ~1 between step shapes
# (tests/integration/test_peft_equivalence.py).
TIE_GAP = 0.5
LOGPROB_ATOL = 0.5
QUESTIONS = ["When do you open on Saturday?", "Do you repair brakes?", "Are you open Sunday?",
             "Can I return a helmet?"]  # fmt: skip


@pytest.fixture(scope="module")
def server(model_home, adapter_root, tmp_path_factory):
    """A server of this module's own, with the default prefix cache (the shared one runs
    without: see conftest.py)."""
    config = ServerConfig(
        port=0,
        http_port=0,
        adapter_roots=(adapter_root,),
        adapter_store=tmp_path_factory.mktemp("store"),
        model=ModelConfig(home=model_home),
        engine=EngineConfig(max_loras=4, max_batch_size=32, merge=MergeSettings(policy="off")),
    )
    assert config.engine.prefix_cache  # the default
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def api(server, registered):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120)


def ask(api, model, question, **extra):
    return api.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        temperature=0,
        **({"max_tokens": 12} | extra),
    )


def counter(server, name: str) -> float:
    text = generate_latest(server.server.metrics.registry).decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
    )


def test_a_repeated_system_prompt_comes_from_the_cache(api, server, client):
    hits = counter(server, "loraplex_prefix_cache_hits_total")
    first = ask(api, "attn-r8", QUESTIONS[0], extra_body={"cache_salt": "first-pass"})
    cached = [ask(api, "attn-r8", q, extra_body={"cache_salt": "first-pass"}) for q in QUESTIONS]
    details = [a.usage.prompt_tokens_details.cached_tokens for a in cached]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert all(n >= 64 for n in details), details  # the system prompt's whole blocks
    assert all(n < a.usage.prompt_tokens for n, a in zip(details, cached, strict=True))
    assert counter(server, "loraplex_prefix_cache_hits_total") - hits >= sum(details)
    # computed without it (a new salt each): the same first-token distribution within bf16
    # noise, and the same token unless PEFT-style near ties (TIE_GAP) decide it
    for q in QUESTIONS:
        warm = ask(api, "attn-r8", q, max_tokens=1, logprobs=True, top_logprobs=5,
                   extra_body={"cache_salt": "first-pass"})  # fmt: skip
        cold = ask(api, "attn-r8", q, max_tokens=1, logprobs=True, top_logprobs=5,
                   extra_body={"cache_salt": f"fresh-{q}"})  # fmt: skip
        assert warm.usage.prompt_tokens_details.cached_tokens >= 64
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        hot, fresh = warm.choices[0].logprobs.content[0], cold.choices[0].logprobs.content[0]
        tops = [t.logprob for t in fresh.top_logprobs]
        assert hot.token == fresh.token or tops[0] - tops[1] < TIE_GAP, (hot, fresh)
        assert abs(hot.logprob - fresh.logprob) < LOGPROB_ATOL, (hot, fresh)
    # another adapter, the base, another salt: none reads attn-r8's blocks
    assert ask(api, "all-r16", QUESTIONS[1]).usage.prompt_tokens_details.cached_tokens == 0
    base = server.runtime.info.model_id
    assert ask(api, base, QUESTIONS[2]).usage.prompt_tokens_details.cached_tokens == 0
    # over gRPC, the same prompt finds the blocks HTTP left
    request = pb.GenerateRequest(
        adapter_id="mix-r32",
        messages=[
            pb.ChatMessage(role="system", content=SYSTEM),
            pb.ChatMessage(role="user", content=QUESTIONS[3]),
        ],
        max_new_tokens=4,
    )
    client.generate(request)
    assert client.generate(request).usage.cached_tokens >= 64
    stats = client.cache_stats().prefix_cache
    assert stats.hits > 0 and 0 < stats.hit_rate <= 1 and stats.block_tokens == 16
    assert 0 < stats.used_blocks <= stats.blocks
