"""gRPC servicers. They only translate: protobuf <-> domain dataclasses, and domain errors <->
status codes (through `errors.status_for`, the one mapping). No torch here."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from loraplex.adapters.store import AdapterVersion
from loraplex.server.auth import Principal
from loraplex.server.compositions import Composition, CompositionRequest
from loraplex.server.engine.request import RequestOutput
from loraplex.server.errors import InvalidRequest, retry_metadata, status_for
from loraplex.server.frontend import Frontend, GenerateInput, TierView
from loraplex.server.interceptor import PRINCIPAL, REQUEST_ID, REQUEST_ID_KEY, request_id_of
from loraplex.server.tenancy import owner_for
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

FrontendGetter = Callable[[], Frontend]  # raises NotReady until the model is served
Handler = TypeVar("Handler", bound=Callable[..., Any])


def _start(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    """Take the call's request id (set REQUEST_ID); returns the trailing metadata to send."""
    REQUEST_ID.set(request_id_of(context.invocation_metadata()))
    trailing = [(REQUEST_ID_KEY, REQUEST_ID.get())]
    context.set_trailing_metadata(trailing)
    return trailing


async def _abort(
    context: grpc.aio.ServicerContext, exc: Exception, trailing: list[tuple[str, str]]
) -> None:
    code = status_for(exc)
    if code is not None:
        metadata = (*trailing, *retry_metadata(exc))
        await context.abort(code, str(exc), trailing_metadata=metadata)
    log.exception("internal error in request %s", REQUEST_ID.get(), exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {REQUEST_ID.get()})",
        trailing_metadata=tuple(trailing),
    )


def unary(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        trailing = _start(context)
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _abort(context, exc, trailing)

    return wrapper  # type: ignore[return-value]


def streaming(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        trailing = _start(context)
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await _abort(context, exc, trailing)

    return wrapper  # type: ignore[return-value]


def generate_input(request: inference_pb2.GenerateRequest) -> GenerateInput:
    return GenerateInput(
        adapter_id=request.adapter_id,
        prompt=request.prompt,
        messages=tuple((m.role, m.content) for m in request.messages),
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else None,
        temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        compose=composition_request(request.compose) if request.HasField("compose") else None,
    )


def composition_request(message: adapters_pb2.AdapterComposition) -> CompositionRequest:
    return CompositionRequest(
        adapters=tuple((a.adapter_id, a.weight) for a in message.adapters),
        method=message.method or "linear",
        density=message.density if message.HasField("density") else None,
        seed=message.seed,
        majority_sign_method=message.majority_sign_method or "total",
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


def _response(
    out: RequestOutput,
    text: str,
    token_ids: list[int],
    adapter: AdapterVersion | None,
    request_id: str,
) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(
        text=text,
        finish_reason=out.finish_reason or "",
        stop_reason=out.stop_reason or "",
        token_ids=token_ids,
        adapter_id=adapter.adapter_id if adapter else "",
        adapter_version=adapter.version if adapter else 0,
        request_id=request_id,
    )
    if out.usage is not None:
        u = out.usage
        response.usage.CopyFrom(
            inference_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.prompt_tokens + u.completion_tokens,
            )
        )
    return response


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, frontend: FrontendGetter) -> None:
        self._frontend = frontend

    @unary
    async def Generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.GenerateResponse:
        generation = await self._frontend().generate(
            generate_input(request), REQUEST_ID.get(), PRINCIPAL.get()
        )
        texts: list[str] = []
        token_ids: list[int] = []
        async with contextlib.aclosing(generation.outputs) as outputs:
            async for out in outputs:
                texts.append(out.text)
                token_ids.extend(out.token_ids)
                if out.finish_reason is not None:
                    return _response(
                        out, "".join(texts), token_ids, generation.adapter, generation.request_id
                    )
        raise RuntimeError("generation ended without a finish reason")

    @streaming
    async def GenerateStream(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        generation = await self._frontend().generate(
            generate_input(request), REQUEST_ID.get(), PRINCIPAL.get()
        )
        # Closed however the call ends (a client gone mid-send included): the request is
        # cancelled and what it holds given back at once, not when garbage is collected.
        async with contextlib.aclosing(generation.outputs) as outputs:
            async for out in outputs:
                # Also steps whose text is held back (half a character, a possible stop
                # string): their token ids must reach the client.
                if out.text or out.token_ids or out.finish_reason is not None:
                    yield _response(
                        out, out.text, out.token_ids, generation.adapter, generation.request_id
                    )

    @unary
    async def ModelInfo(
        self,
        request: inference_pb2.ModelInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.ModelInfoResponse:
        info = self._frontend().model_info()
        return inference_pb2.ModelInfoResponse(**info.__dict__)


def adapter_id_of(request: Any) -> str:
    """`adapter_id`, or its alias `name`; naming two different adapters is an error."""
    if request.adapter_id and request.name and request.adapter_id != request.name:
        raise InvalidRequest("name", "names another adapter than adapter_id: give one of them")
    return str(request.adapter_id or request.name)


def adapter_info(
    version: AdapterVersion, versions: list[int], pinned: bool = False
) -> adapters_pb2.AdapterInfo:
    return adapters_pb2.AdapterInfo(
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
        versions=versions,
        base_model_fingerprint=version.base_model_fingerprint,
        tenant=version.tenant,
        pinned=pinned,
        shared=version.shared,
    )


def current_info(
    frontend: Frontend, adapter_id: str, principal: Principal | None = None
) -> adapters_pb2.AdapterInfo:
    """An adapter's latest version, every version held, and whether it is pinned."""
    version, versions = frontend.get_adapter(adapter_id, principal)
    info = adapter_info(version, versions, frontend.is_pinned(adapter_id))
    info.merged = frontend.is_merged(adapter_id)
    composition = frontend.composition_of(adapter_id)
    if composition is not None:
        info.composition.CopyFrom(composition_message(composition))
        info.composed_versions.extend(v.version for v in composition.inputs)
    return info


def tier_stats(view: TierView) -> adapters_pb2.TierStats:
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


async def push_chunks(
    first: adapters_pb2.PushAdapterRequest,
    rest: AsyncIterator[adapters_pb2.PushAdapterRequest],
) -> AsyncIterator[tuple[str, bytes]]:
    """(file name, bytes) pieces of a PushAdapter stream."""
    message = first
    while True:
        if message.data or message.file_name:
            if not message.file_name:
                raise InvalidRequest("file_name", "every piece of data names its file")
            yield message.file_name, message.data
        try:
            message = await anext(rest)
        except StopAsyncIteration:
            return


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, frontend: FrontendGetter) -> None:
        self._frontend = frontend

    @unary
    async def RegisterAdapter(
        self,
        request: adapters_pb2.RegisterAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.RegisterAdapterResponse:
        frontend = self._frontend()
        version, created = await frontend.register_adapter(
            adapter_id_of(request),
            request.path,
            pin=request.pin,
            tenant=owner_for(PRINCIPAL.get(), request.tenant),
            shared=request.shared,
        )
        return self._registered(frontend, version, created)

    @unary
    async def PushAdapter(
        self,
        request_iterator: AsyncIterator[adapters_pb2.PushAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.RegisterAdapterResponse:
        frontend = self._frontend()
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise InvalidRequest("adapter_id", "the push stream is empty") from None
        adapter_id = adapter_id_of(first)
        version, created = await frontend.push_adapter(
            adapter_id,
            push_chunks(first, aiter(request_iterator)),
            pin=first.pin,
            tenant=owner_for(PRINCIPAL.get(), first.tenant),
            shared=first.shared,
        )
        return self._registered(frontend, version, created)

    @staticmethod
    def _registered(
        frontend: Frontend, version: AdapterVersion, created: bool
    ) -> adapters_pb2.RegisterAdapterResponse:
        info = current_info(frontend, version.adapter_id)
        return adapters_pb2.RegisterAdapterResponse(adapter=info, created=created)

    @unary
    async def GetAdapter(
        self,
        request: adapters_pb2.GetAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        return current_info(self._frontend(), adapter_id_of(request), PRINCIPAL.get())

    @unary
    async def ListAdapters(
        self,
        request: adapters_pb2.ListAdaptersRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.ListAdaptersResponse:
        frontend = self._frontend()
        return adapters_pb2.ListAdaptersResponse(
            adapters=[
                adapter_info(v, vs, frontend.is_pinned(v.adapter_id))
                for v, vs in frontend.list_adapters(PRINCIPAL.get())
            ]
        )

    @unary
    async def DeleteAdapter(
        self,
        request: adapters_pb2.DeleteAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.DeleteAdapterResponse:
        versions = await self._frontend().delete_adapter(adapter_id_of(request))
        return adapters_pb2.DeleteAdapterResponse(deleted=True, versions=versions)

    @unary
    async def PinAdapter(
        self,
        request: adapters_pb2.PinAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        frontend = self._frontend()
        version = await frontend.pin_adapter(adapter_id_of(request))
        return current_info(frontend, version.adapter_id)

    @unary
    async def UnpinAdapter(
        self,
        request: adapters_pb2.PinAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        frontend = self._frontend()
        version = await frontend.unpin_adapter(adapter_id_of(request))
        return current_info(frontend, version.adapter_id)

    @unary
    async def GetCacheStats(
        self,
        request: adapters_pb2.GetCacheStatsRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.CacheStats:
        tiers, pinned = self._frontend().cache_stats()
        return adapters_pb2.CacheStats(tiers=[tier_stats(t) for t in tiers], pinned=pinned)

    @unary
    async def MergeAdapter(
        self,
        request: adapters_pb2.MergeAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.MergeState:
        view = await self._frontend().merge_adapter(adapter_id_of(request))
        return adapters_pb2.MergeState(**view.__dict__)

    @unary
    async def UnmergeAdapter(
        self,
        request: adapters_pb2.UnmergeAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.MergeState:
        view = await self._frontend().unmerge_adapter()
        return adapters_pb2.MergeState(**view.__dict__)

    @unary
    async def GetMergeState(
        self,
        request: adapters_pb2.GetMergeStateRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.MergeState:
        return adapters_pb2.MergeState(**self._frontend().merge_state().__dict__)
