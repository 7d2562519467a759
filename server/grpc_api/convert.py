"""protobuf <-> runtime types, one explicit function per message: a field added on either side
is added here, by name (tests/server/grpc_api/test_convert.py checks that every field of each
view reaches its message)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

from loraplex.adapters.compositions import Composition, CompositionRequest, WeightedAdapter
from loraplex.adapters.sources import FileChunk
from loraplex.core.errors import InvalidRequest
from loraplex.core.types import AdapterVersion
from loraplex.server.engine.request import RequestOutput, TokenLogprob, Usage
from loraplex.server.engine.structured import ConstraintSpec
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


# -- requests -----------------------------------------------------------------------------------
def generate_input(request: inference_pb2.GenerateRequest) -> GenerateInput:
    return GenerateInput(
        adapter_id=request.adapter_id,
        prompt=request.prompt,
        messages=tuple(ChatMessage(role=m.role, content=m.content) for m in request.messages),
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else None,
        temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        compose=composition_request(request.compose) if request.HasField("compose") else None,
        ignore_eos=request.ignore_eos,
        prompt_ids=tuple(request.prompt_ids),
        n=request.n or 1,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        prompt_logprobs=(request.prompt_logprobs if request.HasField("prompt_logprobs") else None),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=(
            request.repetition_penalty if request.HasField("repetition_penalty") else 1.0
        ),
        min_p=request.min_p,
        logit_bias=tuple(sorted(request.logit_bias.items())),
        stop_token_ids=tuple(request.stop_token_ids),
        min_tokens=request.min_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        constraint=(
            constraint_spec(request.structured_outputs)
            if request.HasField("structured_outputs")
            else None
        ),
        cache_salt=request.cache_salt,
    )


def constraint_spec(message: inference_pb2.StructuredOutputs) -> ConstraintSpec:
    """StructuredOutputs: exactly one of its fields."""
    given = [
        ConstraintSpec(kind, value, f"structured_outputs.{name}")
        for name, kind, value in (
            ("json", "json_schema", message.json),
            ("regex", "regex", message.regex),
            ("choice", "choice", json.dumps(list(message.choice)) if message.choice else ""),
            ("grammar", "grammar", message.grammar),
            ("json_object", "json_object", "" if message.json_object else None),
        )
        if value is not None and (value or name == "json_object")
    ]
    if len(given) != 1:
        raise InvalidRequest(
            "structured_outputs", "give exactly one of json, regex, choice, grammar, json_object"
        )
    return given[0]


def composition_request(message: adapters_pb2.AdapterComposition) -> CompositionRequest:
    return CompositionRequest(
        adapters=tuple(
            WeightedAdapter(adapter_id=a.adapter_id, weight=a.weight) for a in message.adapters
        ),
        method=message.method or "linear",
        density=message.density if message.HasField("density") else None,
        seed=message.seed,
        majority_sign_method=message.majority_sign_method or "total",
    )


def adapter_id_of(request: object) -> str:
    """`adapter_id`, or its alias `name`; naming two different adapters is an error."""
    adapter_id, name = getattr(request, "adapter_id", ""), getattr(request, "name", "")
    if adapter_id and name and adapter_id != name:
        raise InvalidRequest("name", "names another adapter than adapter_id: give one of them")
    return str(adapter_id or name)


async def push_chunks(
    first: adapters_pb2.PushAdapterRequest,
    rest: AsyncIterator[adapters_pb2.PushAdapterRequest],
) -> AsyncIterator[FileChunk]:
    """The file pieces of a PushAdapter stream."""
    message = first
    while True:
        if message.data or message.file_name:
            if not message.file_name:
                raise InvalidRequest("file_name", "every piece of data names its file")
            yield FileChunk(file_name=message.file_name, data=message.data)
        try:
            message = await anext(rest)
        except StopAsyncIteration:
            return


# -- responses ----------------------------------------------------------------------------------
def generate_response(
    out: RequestOutput,
    text: str,
    token_ids: list[int],
    adapter: AdapterVersion | None,
    request_id: str,
    logprobs: tuple[TokenLogprob, ...] | None = None,
) -> inference_pb2.GenerateResponse:
    """One response (a stream chunk, or with a sample's whole text a unary answer) for `out`
    (`logprobs`: the text's, else `out`'s own)."""
    response = inference_pb2.GenerateResponse(
        text=text,
        finish_reason=out.finish_reason or "",
        token_ids=token_ids,
        adapter_id=adapter.adapter_id if adapter else "",
        adapter_version=adapter.version if adapter else 0,
        request_id=request_id,
        index=out.index,
        logprobs=token_logprobs(out.logprobs if logprobs is None else logprobs),
        prompt_logprobs=token_logprobs(out.prompt_logprobs),
    )
    _set_stop(response, out)
    if out.usage is not None:
        response.usage.CopyFrom(usage_message([out.usage]))
    return response


def unary_response(
    done: list[Completion], adapter: AdapterVersion | None, request_id: str
) -> inference_pb2.GenerateResponse:
    """A unary answer: sample 0 in the top-level fields, and with n > 1 every sample in
    `choices`; usage counts every sample's tokens."""
    first = done[0]
    # the prompt's log-probabilities once, from the completion (its last output may be its
    # first too, which carries them)
    last = dataclasses.replace(first.last, prompt_logprobs=first.prompt_logprobs)
    response = generate_response(
        last, first.text, first.token_ids, adapter, request_id, first.logprobs or ()
    )
    response.usage.CopyFrom(usage_message([c.last.usage for c in done]))
    if len(done) > 1:
        for c in done:
            choice = inference_pb2.Choice(
                index=c.index,
                text=c.text,
                finish_reason=c.last.finish_reason or "",
                token_ids=c.token_ids,
                logprobs=token_logprobs(c.logprobs),
            )
            _set_stop(choice, c.last)
            response.choices.append(choice)
    return response


def _set_stop(
    message: inference_pb2.GenerateResponse | inference_pb2.Choice, out: RequestOutput
) -> None:
    """stop_reason (a stop string) or stop_token_id (a stop token) of `out`."""
    if isinstance(out.stop_reason, int):
        message.stop_token_id = out.stop_reason
    elif out.stop_reason:
        message.stop_reason = out.stop_reason


def usage_message(usages: list[Usage | None]) -> inference_pb2.Usage:
    """Usage over a request's samples: the prompt once, every sample's tokens."""
    found = [u for u in usages if u is not None]
    prompt = found[0].prompt_tokens if found else 0
    completion = sum(u.completion_tokens for u in found)
    return inference_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=found[0].cached_tokens if found else 0,
    )


def token_logprobs(
    logprobs: tuple[TokenLogprob | None, ...] | None,
) -> list[inference_pb2.TokenLogprob]:
    """Log-probabilities as messages (the first prompt token's, None, has none)."""
    return [
        inference_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[inference_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs or ()
        if lp is not None
    ]


def model_info_message(info: ModelInfo) -> inference_pb2.ModelInfoResponse:
    return inference_pb2.ModelInfoResponse(
        model_id=info.model_id,
        model_type=info.model_type,
        quantization=info.quantization,
        device=info.device,
        dtype=info.dtype,
        max_context_length=info.max_context_length,
        vocab_size=info.vocab_size,
        num_layers=info.num_layers,
        supported_target_modules=list(info.supported_target_modules),
        max_lora_rank=info.max_lora_rank,
        max_loras=info.max_loras,
        max_batch_size=info.max_batch_size,
        base_model_fingerprint=info.base_model_fingerprint,
        version=info.version,
        has_chat_template=info.has_chat_template,
        dtype_choice=info.dtype_choice,
        machine=info.machine,
        base_kernels=[
            inference_pb2.BaseKernel(
                in_features=k.shape[0],
                out_features=k.shape[1],
                min_rows=k.min_rows,
                kernel=k.kernel,
                layers=k.layers,
            )
            for k in info.base_kernels
        ],
        dense_cache_bytes=info.dense_cache_bytes,
        max_loras_choice=info.max_loras_choice,
    )


def composition_message(composition: Composition) -> adapters_pb2.AdapterComposition:
    message = adapters_pb2.AdapterComposition(
        adapters=[
            adapters_pb2.WeightedAdapter(adapter_id=v.adapter_id, weight=w)
            for v, w in zip(composition.inputs, composition.weights, strict=True)
        ],
        method=composition.method,
        seed=composition.seed,
        majority_sign_method=composition.majority_sign_method,
    )
    if composition.density is not None:
        message.density = composition.density
    return message


def adapter_info(view: AdapterView) -> adapters_pb2.AdapterInfo:
    version = view.version
    info = adapters_pb2.AdapterInfo(
        adapter_id=version.adapter_id,
        name=version.adapter_id,
        version=version.version,
        digest=version.digest,
        rank=version.rank,
        lora_alpha=version.lora_alpha,
        target_modules=list(version.target_modules),
        size_bytes=version.size_bytes,
        created_at=version.created_at,
        source=version.source,
        versions=list(view.versions),
        base_model_fingerprint=version.base_model_fingerprint,
        tenant=version.tenant,
        pinned=view.pinned,
        shared=version.shared,
        merged=view.merged,
        has_chat_template=bool(version.chat_template),
    )
    if view.composition is not None:
        info.composition.CopyFrom(composition_message(view.composition))
        info.composed_versions.extend(v.version for v in view.composition.inputs)
    return info


def registration_message(registration: Registration) -> adapters_pb2.RegisterAdapterResponse:
    return adapters_pb2.RegisterAdapterResponse(
        adapter=adapter_info(registration.adapter),
        created=registration.created,
        ignored_files=list(registration.ignored_files),
    )


def tier_stats_message(view: TierView) -> adapters_pb2.TierStats:
    st = view.stats
    return adapters_pb2.TierStats(
        tier=view.tier,
        resident=view.resident,
        capacity=view.capacity,
        used_bytes=view.used_bytes,
        budget_bytes=view.budget_bytes,
        hits=st.hits,
        misses=st.misses,
        loads=st.loads,
        evictions=st.evictions,
        load_seconds=st.load_seconds,
        load_failures=st.load_failures,
    )


def cache_stats_message(view: CacheView) -> adapters_pb2.CacheStats:
    message = adapters_pb2.CacheStats(
        tiers=[tier_stats_message(t) for t in view.tiers], pinned=list(view.pinned)
    )
    prefix = view.prefix_cache
    if prefix is not None:
        message.prefix_cache.CopyFrom(
            adapters_pb2.PrefixCacheStats(
                queries=prefix.queries,
                hits=prefix.hits,
                hit_rate=prefix.hit_rate,
                used_blocks=prefix.used_blocks,
                blocks=prefix.blocks,
                block_tokens=prefix.block_tokens,
            )
        )
    return message


def merge_state_message(view: MergeView) -> adapters_pb2.MergeState:
    return adapters_pb2.MergeState(
        adapter_id=view.adapter_id,
        version=view.version,
        pinned=view.pinned,
        policy=view.policy,
        token_share=view.token_share,
        leading_adapter_id=view.leading_adapter_id,
        merges=view.merges,
        unmerges=view.unmerges,
        last_merge_seconds=view.last_merge_seconds,
        last_unmerge_seconds=view.last_unmerge_seconds,
    )
