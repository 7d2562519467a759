"""The prefix cache: its blocks (match, insert, evict deepest first, isolation, drop), and on
the tiny float32 model the same greedy tokens with and without it, across adapters."""

from __future__ import annotations

import torch

from loraplex.core.types import AdapterKey
from loraplex.server.engine.kv_cache import CacheShape, KVCache
from loraplex.server.engine.prefix_cache import BLOCK_TOKENS, Namespace, PrefixCache
from tests.server.engine.test_engine import submit

CPU = torch.device("cpu")
SHAPE = CacheShape(num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)
BASE = Namespace(adapter=None)


def rows_with(tokens: int) -> KVCache:
    """A KV cache of 4 rows whose row r holds distinct values at every position."""
    cache = KVCache(SHAPE, num_rows=4, max_len=256, budget_bytes=1 << 22, device=CPU)
    for layer in range(SHAPE.num_layers):
        for pool in (cache.keys[layer], cache.values[layer]):
            pool.copy_(torch.randn(pool.shape))
    return cache


def test_a_stored_prefix_is_loaded_into_another_row_block_by_block():
    cache = rows_with(256)
    prefix = PrefixCache(SHAPE, num_blocks=16, device=CPU)
    tokens = list(range(100, 100 + 3 * BLOCK_TOKENS + 5))  # 3 whole blocks and a bit
    prefix.store(BASE, tokens, cache, row=0)
    assert prefix.used_blocks == 3
    # a prompt with the same first 2.5 blocks: 2 blocks found
    prompt = [*tokens[: 2 * BLOCK_TOKENS + 8], 7, 7, 7]
    n = prefix.load(BASE, prompt, cache, row=2)
    assert n == 2 * BLOCK_TOKENS
    for layer in range(SHAPE.num_layers):
        for pool in (cache.keys[layer], cache.values[layer]):
            assert torch.equal(pool[2, :, :n], pool[0, :, :n])
    # the last prompt token is always computed: a prompt of exactly 3 blocks reuses 2
    assert prefix.load(BASE, tokens[: 3 * BLOCK_TOKENS], cache, row=3) == 2 * BLOCK_TOKENS
    assert prefix.load(BASE, [1, 2, 3, *tokens], cache, row=3) == 0  # not a prefix
    assert prefix.stats.hits == 4 * BLOCK_TOKENS
    assert prefix.stats.queries == len(prompt) + 3 * BLOCK_TOKENS + len(tokens) + 3


def test_a_chain_extended_block_by_block_equals_it_hashed_whole():
    """A sequence's digests grow with it (each block hashed once): extending those of its
    first blocks gives what hashing all its tokens gives."""
    prefix = PrefixCache(SHAPE, num_blocks=4, device=CPU)
    tokens = list(range(300, 300 + 5 * BLOCK_TOKENS + 7))
    whole = prefix.digests(BASE, tokens)
    known = prefix.digests(BASE, tokens[: 2 * BLOCK_TOKENS + 3])
    assert len(whole) == 5 and len(known) == 2
    assert prefix.digests(BASE, tokens, known) == whole
    assert known == whole[:2]  # (not extended in place)
    # a chain never names blocks the tokens lack (their rows would not hold them yet)
    assert prefix.digests(BASE, tokens[: 3 * BLOCK_TOKENS + 1], whole) == whole[:3]


def test_namespaces_never_share_and_a_dropped_adapter_is_gone():
    cache = rows_with(256)
    prefix = PrefixCache(SHAPE, num_blocks=16, device=CPU)
    tokens = list(range(2 * BLOCK_TOKENS + 1))
    v1 = Namespace(adapter=AdapterKey("tone", 1), tenant="acme")
    prefix.store(v1, tokens, cache, row=0)
    assert prefix.load(v1, tokens, cache, row=1) == 2 * BLOCK_TOKENS
    for other in (
        Namespace(adapter=AdapterKey("tone", 2), tenant="acme"),  # a new version
        Namespace(adapter=AdapterKey("tone", 1), tenant="globex"),  # another tenant
        Namespace(adapter=AdapterKey("tone", 1), tenant="acme", salt="s"),  # another salt
        Namespace(adapter=None, tenant="acme"),  # the base model
    ):
        assert prefix.load(other, tokens, cache, row=1) == 0
    prefix.store(BASE, tokens, cache, row=0)
    assert prefix.drop("tone") == 2 and prefix.used_blocks == 2
    assert prefix.load(v1, tokens, cache, row=1) == 0
    assert prefix.load(BASE, tokens, cache, row=1) == 2 * BLOCK_TOKENS


def test_least_recently_used_chains_go_first_deepest_block_first():
    cache = rows_with(256)
    prefix = PrefixCache(SHAPE, num_blocks=4, device=CPU)
    old = list(range(1000, 1000 + 2 * BLOCK_TOKENS + 1))
    new = list(range(2000, 2000 + 2 * BLOCK_TOKENS + 1))
    prefix.store(BASE, old, cache, row=0)
    prefix.store(BASE, new, cache, row=1)
    assert prefix.load(BASE, new, cache, row=2) == 2 * BLOCK_TOKENS  # new is now recent
    third = list(range(3000, 3000 + BLOCK_TOKENS + 1))
    prefix.store(BASE, third, cache, row=3)  # one block more: old's deepest goes
    assert prefix.stats.evicted_blocks == 1
    assert prefix.load(BASE, old, cache, row=2) == BLOCK_TOKENS  # its start is still there
    assert prefix.load(BASE, new, cache, row=2) == 2 * BLOCK_TOKENS
    assert prefix.load(BASE, third, cache, row=2) == BLOCK_TOKENS


def test_greedy_tokens_equal_with_and_without_the_cache_across_adapters(setup):
    """A shared system prompt then different questions, on the base and two adapters, run
    twice each on an engine with the cache (the second time from cached blocks) and once on
    one without: the same tokens, and the hits counted; no adapter reads another's blocks."""
    system = [(13 * i) % 3000 + 40 for i in range(3 * BLOCK_TOKENS + 3)]
    questions = [[5, 17, 300], [9, 8, 7, 6], [100, 200]]
    with_cache, versions = setup()
    without, _ = setup(prefix_cache=False)
    adapters = [None, versions["one"], versions["two"]]
    results = {}
    for name, engine in (("cache", with_cache), ("none", without)):
        runs = []
        for _ in range(2):
            for adapter in adapters:
                for q in questions:
                    c = submit(engine, system + q, adapter, max_new_tokens=8)
                    assert c.done.wait(60) and c.error is None
                    runs.append((c.tokens, c.outputs[-1].usage.cached_tokens))
        results[name] = runs
    tokens = [t for t, _ in results["cache"]]
    assert tokens == [t for t, _ in results["none"]]
    assert len({tuple(t) for t in tokens}) > 3  # the adapters and questions differ
    cached = [n for _, n in results["cache"]]
    per_pass = len(adapters) * len(questions)
    # first pass: each adapter's first question computes the system prompt, the next two
    # find it (3 whole blocks); second pass: every request finds at least that
    first_pass = cached[:per_pass]
    assert first_pass[:: len(questions)] == [0] * len(adapters)
    assert all(n >= 3 * BLOCK_TOKENS for i, n in enumerate(first_pass) if i % len(questions))
    assert all(n >= 3 * BLOCK_TOKENS for n in cached[per_pass:])
    assert all(n == 0 for _, n in results["none"])
    stats = with_cache.snapshot().result(30).prefix_cache
    assert stats is not None and stats.hits == sum(cached) and stats.queries > stats.hits


def test_a_conversation_reuses_its_previous_turn(setup):
    """The next turn's prompt starts with the previous prompt and its answer: the answer's
    blocks are cached when it ends, so only the new tokens are computed."""
    engine, versions = setup()
    prompt = [(7 * i) % 2000 + 30 for i in range(2 * BLOCK_TOKENS)]
    first = submit(engine, prompt, versions["one"], max_new_tokens=2 * BLOCK_TOKENS)
    assert first.done.wait(60) and first.error is None
    follow = prompt + first.tokens + [11, 12, 13]
    second = submit(engine, follow, versions["one"], max_new_tokens=4)
    assert second.done.wait(60) and second.error is None
    # every whole block the first turn computed: its prompt and all but its last token
    assert second.outputs[-1].usage.cached_tokens == 3 * BLOCK_TOKENS


def test_many_rows_are_stored_at_once_and_shared_blocks_once():
    """store_many: several sequences' blocks in one copy; a block two of them share (the
    same prompt start) is stored once; each loads back what its own row held."""
    cache = rows_with(256)
    prefix = PrefixCache(SHAPE, num_blocks=16, device=CPU)
    shared = list(range(500, 500 + BLOCK_TOKENS))
    first = [*shared, *range(600, 600 + BLOCK_TOKENS + 3)]
    second = [*shared, *range(700, 700 + BLOCK_TOKENS + 3)]
    for layer in range(SHAPE.num_layers):  # the shared block's values equal in both rows
        for pool in (cache.keys[layer], cache.values[layer]):
            pool[1, :, :BLOCK_TOKENS] = pool[0, :, :BLOCK_TOKENS]
    prefix.store_many(
        [(BASE, prefix.digests(BASE, first), 0), (BASE, prefix.digests(BASE, second), 1)], cache
    )
    assert prefix.used_blocks == 3 and prefix.stats.stored_blocks == 3
    for tokens, source in ((first, 0), (second, 1)):
        assert prefix.load(BASE, [*tokens, 9], cache, row=3) == 2 * BLOCK_TOKENS
        for layer in range(SHAPE.num_layers):
            for pool in (cache.keys[layer], cache.values[layer]):
                assert torch.equal(
                    pool[3, :, : 2 * BLOCK_TOKENS], pool[source, :, : 2 * BLOCK_TOKENS]
                )


def _submit_together(engine, prompts, adapter, **params):
    """Submit every prompt between two steps (on the engine thread), so that one admission
    takes them all."""
    return engine.call(lambda: [submit(engine, p, adapter, **params) for p in prompts]).result(30)


def test_requests_admitted_together_find_the_blocks_of_those_prefilled_before_them(setup):
    """A burst sharing a system prompt, admitted in one step, one prompt prefilled a step: the
    first computes the shared blocks, each later one finds them when its own prefill starts
    (not when it was admitted, with nothing cached yet), with the same tokens as without."""
    system = [(11 * i) % 3000 + 40 for i in range(2 * BLOCK_TOKENS)]
    prompts = [[*system, 7 + q, 8, 9, 10] for q in range(4)]
    budget = len(prompts[0])  # one whole prompt a step
    with_cache, versions = setup(max_prefill_tokens=budget)
    without, _ = setup(max_prefill_tokens=budget, prefix_cache=False)
    for adapter in (None, versions["one"]):
        runs = {}
        for name, engine in (("cache", with_cache), ("none", without)):
            collectors = _submit_together(engine, prompts, adapter, max_new_tokens=4)
            for c in collectors:
                assert c.done.wait(60) and c.error is None
            runs[name] = collectors
        assert [c.tokens for c in runs["cache"]] == [c.tokens for c in runs["none"]]
        cached = [c.outputs[-1].usage.cached_tokens for c in runs["cache"]]
        assert cached == [0] + [2 * BLOCK_TOKENS] * 3  # (each adapter's blocks its own)


def test_a_long_prompt_leaves_its_first_chunks_for_others_before_it_ends(setup):
    """A prompt prefilled over three steps stores its whole blocks chunk by chunk: a request
    admitted with it, starting the step its last chunk runs, finds the five blocks already
    computed, with the tokens it gets without the cache."""
    long_prompt = [(7 * i) % 3000 + 50 for i in range(5 * BLOCK_TOKENS + 3)]
    sharing = [*long_prompt[: 5 * BLOCK_TOKENS], 1, 2, 3, 4]
    budget = 2 * BLOCK_TOKENS + 8
    with_cache, _ = setup(max_prefill_tokens=budget)
    without, _ = setup(max_prefill_tokens=budget, prefix_cache=False)
    outcome = {}
    for name, engine in (("cache", with_cache), ("none", without)):
        first, second = _submit_together(engine, [long_prompt, sharing], None, max_new_tokens=4)
        for c in (first, second):
            assert c.done.wait(60) and c.error is None
        outcome[name] = (first, second)
    first, second = outcome["cache"]
    assert first.outputs[-1].usage.cached_tokens == 0
    assert second.outputs[-1].usage.cached_tokens == 5 * BLOCK_TOKENS
    assert [c.tokens for c in outcome["cache"]] == [c.tokens for c in outcome["none"]]
