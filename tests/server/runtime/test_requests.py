"""The runtime on its own, with no protocol in front: the tiny model served through the request
path and the adapter service directly (what any front end calls), with tenancy, admin rights,
refusals before any output, and cleanup however a generation is closed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time

import pytest
from peft import LoraConfig

from loraplex.adapters.compositions import CompositionRequest, WeightedAdapter
from loraplex.core.config import ModelConfig
from loraplex.core.errors import InvalidRequest, OverQuota, PermissionDenied
from loraplex.server.config import EngineConfig, MergeSettings, ServerConfig
from loraplex.server.runtime.auth import Principal
from loraplex.server.runtime.requests import ChatMessage, GenerateInput
from loraplex.server.runtime.resolver import MAX_BUILDS_PER_TENANT
from loraplex.server.runtime.runtime import Runtime
from tests.helpers import add_peft_adapter

ADMIN = Principal(tenant="ops", role="admin", key_name="ops-key")
ACME = Principal(tenant="acme", role="client", key_name="acme-key")
GLOBEX = Principal(tenant="globex", role="client", key_name="globex-key")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(runtime, its event loop, an adapter directory) on the tiny model."""
    root = tmp_path_factory.mktemp("runtime")
    _write_adapter(tiny_model_dir, root / "peft", "tone", seed=1)
    config = ServerConfig(
        adapter_roots=(root,),
        adapter_store=root / "store",
        model=ModelConfig(
            model=str(tiny_model_dir), quantization="none", dtype="float32", device="cpu"
        ),
        engine=EngineConfig(max_loras=2, max_lora_rank=8, merge=MergeSettings(policy="off")),
    )
    runtime = Runtime.create(config)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(runtime.start())
        yield runtime, loop, root / "peft" / "tone"
    finally:
        runtime.close()
        loop.close()


def _write_adapter(tiny_model_dir, where, name: str, seed: int) -> None:
    """A random rank-4 all-linear PEFT adapter of the tiny model, saved as where/name."""
    from transformers import AutoModelForCausalLM

    peft = add_peft_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        name,
        LoraConfig(r=4, target_modules="all-linear"),
        seed=seed,
        b_std=0.5,
    )
    peft.save_pretrained(where, selected_adapters=[name])


def test_a_generation_and_an_adapter_without_any_protocol(served):
    runtime, loop, adapter_dir = served

    async def scenario():
        registration = await runtime.adapters.register(
            "tone", str(adapter_dir), tenant="acme", principal=ADMIN
        )
        assert registration.created and registration.adapter.version.tenant == "acme"
        ask = GenerateInput(messages=(ChatMessage(role="user", content="hi"),), max_new_tokens=6)
        (base,) = await (await runtime.requests.generate(ask, principal=ACME)).complete()
        generation = await runtime.requests.generate(
            GenerateInput(adapter_id="tone", messages=ask.messages, max_new_tokens=6),
            principal=ACME,
        )
        (tuned,) = await generation.complete()
        assert generation.adapter is not None and generation.adapter.version == 1
        assert base.last.finish_reason == "length" and len(base.token_ids) == 6
        assert tuned.last.usage is not None and tuned.last.usage.completion_tokens == 6
        assert tuned.token_ids != base.token_ids  # the adapter is no no-op
        views = await runtime.adapters.available(GLOBEX)
        assert views == []  # another tenant's adapter is not listed

    loop.run_until_complete(scenario())


def test_tenancy_admin_rights_and_bad_input_refuse_before_any_output(served):
    runtime, loop, adapter_dir = served

    async def scenario():
        with pytest.raises(PermissionDenied, match="admin"):
            await runtime.adapters.register("mine", str(adapter_dir), principal=ACME)
        with pytest.raises(PermissionDenied, match="admin"):
            await runtime.adapters.merge_state(ACME)
        with pytest.raises(PermissionDenied):
            await runtime.requests.generate(
                GenerateInput(adapter_id="tone", prompt="hi"), principal=GLOBEX
            )
        with pytest.raises(InvalidRequest, match="top_p"):
            await runtime.requests.generate(GenerateInput(prompt="hi", top_p=2.0))

    loop.run_until_complete(scenario())
    assert runtime.quotas.in_flight("globex") == 0 and runtime.quotas.in_flight("") == 0


def test_closing_a_generation_before_reading_it_gives_everything_back(served):
    runtime, loop, _ = served
    finished = []
    runtime.observers.observers.append(type("Seen", (), {"finished": finished.append})())

    async def scenario():
        generation = await runtime.requests.generate(
            GenerateInput(prompt="Once upon a time", max_new_tokens=200), principal=ACME
        )
        assert runtime.quotas.in_flight("acme") == 1
        async with contextlib.aclosing(generation):
            pass  # closed before its first output

    loop.run_until_complete(scenario())
    assert runtime.quotas.in_flight("acme") == 0
    assert [r.code for r in finished] == ["CANCELLED"]
    deadline = time.monotonic() + 30
    while (state := runtime.engine.snapshot().result(30)).running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.running == 0 and state.waiting == 0


def test_ids_a_client_sends_are_validated_before_they_are_echoed_logged_or_counted(served):
    """Every id a request names (composed- ones too) is checked before it
    reaches an error detail, the request log or a metric label, and only so much is echoed."""
    from loraplex.adapters.compositions import CompositionRequest, WeightedAdapter
    from loraplex.core.errors import InvalidAdapterId

    runtime, loop, adapter_dir = served
    records = []
    runtime.observers.observers.append(type("Seen", (), {"finished": records.append})())
    huge = "composed-" + "x" * 100_000
    forged = "tone\nINFO forged log line"

    async def scenario():
        for adapter_id in (huge, "composed-" + "0" * 23 + "\n", forged, "x" * 100_000):
            with pytest.raises(InvalidAdapterId) as err:
                await runtime.requests.generate(GenerateInput(adapter_id=adapter_id, prompt="hi"))
            assert len(str(err.value)) < 300
            with pytest.raises(InvalidAdapterId) as err:
                await runtime.adapters.get(adapter_id, ACME)
            assert len(str(err.value)) < 300
        with pytest.raises(InvalidRequest) as err:
            compose = CompositionRequest(
                adapters=(WeightedAdapter("tone", 1.0), WeightedAdapter("tone", 1.0)),
                method="m" * 100_000,
            )
            await runtime.requests.generate(GenerateInput(prompt="hi", compose=compose))
        assert len(str(err.value)) < 400
        with pytest.raises(InvalidAdapterId, match="composed"):  # a reserved form
            await runtime.adapters.register("composed-abc", str(adapter_dir))

    loop.run_until_complete(scenario())
    ids = [r.adapter_id for r in records]
    assert ids[:4] == ["(invalid id)"] * 4 and all(len(i) < 64 for i in ids)
    assert all(r.adapter_version == 0 for r in records)


def _second_adapter(tiny_model_dir, root) -> str:
    """Another rank-4 adapter under the runtime's allowed root (other weights than 'tone')."""
    where = root / "peft2"
    if not (where / "other").exists():
        _write_adapter(tiny_model_dir, where, "other", seed=7)
    return str(where / "other")


def _composition(*adapter_ids: str, weight: float = 0.5) -> CompositionRequest:
    return CompositionRequest(
        adapters=tuple(WeightedAdapter(a, weight) for a in adapter_ids), method="linear"
    )


def test_a_composition_is_checked_against_its_inputs_as_they_are_now(served, tiny_model_dir):
    """A shared input re-registered unshared: compositions made while it was shared are no
    longer usable by other tenants through their derived ids."""
    runtime, loop, adapter_dir = served
    other = _second_adapter(tiny_model_dir, adapter_dir.parent.parent)

    async def scenario():
        await runtime.adapters.register("acme-6", str(adapter_dir), tenant="acme", principal=ADMIN)
        await runtime.adapters.register(
            "lent-6", other, tenant="globex", shared=True, principal=ADMIN
        )
        ask = GenerateInput(compose=_composition("acme-6", "lent-6"), prompt="hi", max_new_tokens=1)
        made = await runtime.requests.generate(ask, principal=ACME)
        await made.complete()
        assert made.adapter is not None
        derived = GenerateInput(adapter_id=made.adapter.adapter_id, prompt="hi", max_new_tokens=1)
        await (await runtime.requests.generate(derived, principal=ACME)).complete()
        # globex takes its adapter back (a new version, not shared)
        await runtime.adapters.register(
            "lent-6", str(adapter_dir), tenant="globex", shared=False, principal=ADMIN
        )
        with pytest.raises(PermissionDenied):
            await runtime.requests.generate(derived, principal=ACME)
        with pytest.raises(PermissionDenied):
            await runtime.requests.generate(ask, principal=ACME)
        await (await runtime.requests.generate(derived, principal=ADMIN)).complete()
        # The other way round: made of globex's private version, which a later version shares;
        # the composition still holds the private weights, so acme may not use it.
        await runtime.adapters.register("own-6", other, tenant="globex", principal=ADMIN)
        theirs = GenerateInput(
            compose=_composition("own-6", "lent-6"), prompt="hi", max_new_tokens=1
        )
        made = await runtime.requests.generate(theirs, principal=GLOBEX)
        await made.complete()
        assert made.adapter is not None
        await runtime.adapters.register(
            "own-6", str(adapter_dir), tenant="globex", shared=True, principal=ADMIN
        )
        private = GenerateInput(adapter_id=made.adapter.adapter_id, prompt="hi", max_new_tokens=1)
        with pytest.raises(PermissionDenied):
            await runtime.requests.generate(private, principal=ACME)

    loop.run_until_complete(scenario())


def test_one_tenant_builds_few_compositions_at_once_and_keeps_few(served, tiny_model_dir):
    """A tenant minting compositions: at most MAX_BUILDS_PER_TENANT built at once (the next
    refused with retry advice, another tenant's still built), and beyond the per-tenant
    number kept, its own oldest go, not another tenant's."""
    runtime, loop, adapter_dir = served
    other = _second_adapter(tiny_model_dir, adapter_dir.parent.parent)
    resolver = runtime.resolver
    gate = threading.Event()
    entered = threading.Semaphore(0)  # a build has started (past the point of being given back)
    build = resolver._build

    def held_build(composition, parts):
        entered.release()
        gate.wait(30)
        return build(composition, parts)

    async def scenario():
        for adapter_id, path in (("shared-7a", str(adapter_dir)), ("shared-7b", other)):
            await runtime.adapters.register(
                adapter_id, path, tenant="ops", shared=True, principal=ADMIN
            )

        async def version(principal: Principal, weight: float):
            request = _composition("shared-7a", "shared-7b", weight=weight)
            return await resolver.for_request("", request, principal)

        acme = [await version(ACME, w) for w in (0.1, 0.2, 0.3)]
        building = [
            asyncio.create_task(resolver.lease(v, "acme")) for v in acme[:MAX_BUILDS_PER_TENANT]
        ]
        for _ in building:
            assert await asyncio.to_thread(entered.acquire, True, 30)
        with pytest.raises(OverQuota) as refused:
            await resolver.lease(acme[MAX_BUILDS_PER_TENANT], "acme")
        assert refused.value.retry_after_s > 0
        # A caller that goes away does not end its build: the count holds until it ends.
        building[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await building[0]
        with pytest.raises(OverQuota):
            await resolver.lease(acme[MAX_BUILDS_PER_TENANT], "acme")
        # Another request for a composition being built waits for that build.
        joining = asyncio.create_task(resolver.lease(acme[1], "acme"))
        theirs = asyncio.create_task(resolver.lease(await version(GLOBEX, 0.9), "globex"))
        await asyncio.sleep(0.2)  # both queued (the build workers are held at the gate)
        gate.set()
        for lease in await asyncio.gather(*building[1:], joining, theirs):
            lease.release()

    resolver._build = held_build
    try:
        loop.run_until_complete(scenario())
    finally:
        resolver._build = build

    compositions = resolver.compositions
    saved = compositions.per_tenant
    compositions.per_tenant = 3
    try:
        globex_id = next(
            c for c in list(compositions._entries) if compositions._maker[c] == "globex"
        )

        async def mint():
            for w in (1.1, 1.2, 1.3, 1.4, 1.5):
                request = _composition("shared-7a", "shared-7b", weight=w)
                await resolver.for_request("", request, ACME)

        loop.run_until_complete(mint())
        makers = list(compositions._maker.values())
        assert makers.count("acme") == 3 and globex_id in compositions._entries
    finally:
        compositions.per_tenant = saved


def test_prompts_far_over_the_context_are_refused_before_tokenizing(served, monkeypatch):
    """A text longer than the longest vocabulary entry times the context
    cannot fit in it, so it is refused untokenized; the bound is tight (the densest text the
    tokenizer knows, one entry repeated, fits up to it) and no text over it fits."""
    from loraplex.server.runtime.requests import MAX_TEXT_CHARS

    runtime, loop, _ = served
    requests, context = runtime.requests, runtime.engine.info.max_context
    tokenizer = requests.tokenizer
    limit = requests.max_prompt_chars
    longest = max(map(len, tokenizer.get_vocab()))
    assert limit == longest * context < MAX_TEXT_CHARS
    densest = max((tokenizer.decode([i]) for i in tokenizer.get_vocab().values()), key=len)
    assert len(densest) == longest
    for unit in (densest, " ", "#", "é", "\n"):
        text = unit * (limit // len(unit) + 1)
        assert len(text) > limit
        assert len(tokenizer(text, split_special_tokens=True).input_ids) > context, repr(unit)
    tokenized = []
    monkeypatch.setattr(requests, "_tokenize", lambda inp: tokenized.append(inp) or [1])

    async def scenario():
        for inp in (
            GenerateInput(prompt="x" * (limit + 1)),
            GenerateInput(messages=(ChatMessage("user", "x" * (limit // 2 + 1)),) * 2),
        ):
            with pytest.raises(InvalidRequest, match=f"at most {limit}"):
                await runtime.requests.generate(inp, principal=ACME)

    loop.run_until_complete(scenario())
    assert tokenized == []
    assert runtime.quotas.in_flight("acme") == 0


def test_an_adapter_with_its_own_chat_template_is_prompted_with_it(served, monkeypatch):
    """As LoRAX does: chat requests for an adapter that brought a chat template are rendered
    with it; another adapter and the base keep the base model's. The adapter's directory is
    as a trainer leaves it: its side files are named in the registration."""
    runtime, loop, adapter_dir = served
    requests, tokenizer = runtime.requests, runtime.requests.tokenizer
    templated = adapter_dir.parent / "templated"
    shutil.copytree(adapter_dir, templated, dirs_exist_ok=True)
    template = (
        "{% for m in messages %}### {{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
    )
    (templated / "chat_template.jinja").write_text(template)
    (templated / "training_args.bin").write_bytes(b"\x80\x05 not a pickle")
    (templated / "optimizer.pt").write_bytes(b"\x80\x05 not a pickle")
    messages = (ChatMessage(role="user", content="hi"),)
    prompts = {}
    real = requests._tokenize

    def tokenize(inp, chat_template=None):
        prompts[inp.adapter_id] = real(inp, chat_template)
        return prompts[inp.adapter_id]

    monkeypatch.setattr(requests, "_tokenize", tokenize)

    async def scenario():
        registration = await runtime.adapters.register(
            "templated", str(templated), tenant="acme", principal=ADMIN
        )
        assert registration.ignored_files == ("optimizer.pt", "training_args.bin")
        await runtime.adapters.register("tone", str(adapter_dir), tenant="acme", principal=ADMIN)
        view = await runtime.adapters.get("templated", ACME)
        assert view.version.chat_template == template
        for adapter_id in ("templated", "tone", ""):
            ask = GenerateInput(adapter_id=adapter_id, messages=messages, max_new_tokens=2)
            (done,) = await (await requests.generate(ask, principal=ACME)).complete()
            assert done.last.usage.prompt_tokens == len(prompts[adapter_id])

    loop.run_until_complete(scenario())
    own = tokenizer("### USER: hi\n### ASSISTANT:", add_special_tokens=False).input_ids
    base = tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    ).input_ids
    assert prompts["templated"] == own
    assert prompts["tone"] == prompts[""] == base != own


def test_a_chat_template_that_refuses_the_messages_is_invalid_argument(served):
    runtime, loop, adapter_dir = served
    strict = adapter_dir.parent / "strict"
    shutil.copytree(adapter_dir, strict, dirs_exist_ok=True)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('no system messages') }}{% endif %}{{ m.content }}{% endfor %}"
    )

    async def scenario():
        await runtime.adapters.register("strict", str(strict), tenant="acme", principal=ADMIN)
        ask = GenerateInput(adapter_id="strict", messages=(ChatMessage("system", "be terse"),))
        with pytest.raises(InvalidRequest, match="no system messages"):
            await runtime.requests.generate(ask, principal=ACME)

    loop.run_until_complete(scenario())
    assert runtime.quotas.in_flight("acme") == 0
