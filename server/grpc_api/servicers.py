"""gRPC servicers. They only translate: protobuf <-> runtime types (convert.py), and domain
errors <-> status codes (status.py). No torch, no logic of their own."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from loraplex.core.errors import InvalidRequest
from loraplex.server.grpc_api.convert import (
    adapter_id_of,
    adapter_info,
    cache_stats_message,
    generate_input,
    generate_response,
    merge_state_message,
    model_info_message,
    push_chunks,
    registration_message,
    unary_response,
)
from loraplex.server.grpc_api.interceptor import PRINCIPAL, REQUEST_ID_KEY, request_id_of
from loraplex.server.grpc_api.status import retry_metadata, status_for
from loraplex.server.logs import REQUEST_ID
from loraplex.server.runtime.runtime import Runtime
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

RuntimeGetter = Callable[[], Runtime]  # raises NotReady until the model is served
Handler = TypeVar("Handler", bound=Callable[..., Any])
MAX_DEADLINE_S = 365 * 86400.0


def _start(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    """Take the call's request id (set REQUEST_ID); returns the trailing metadata to send."""
    REQUEST_ID.set(request_id_of(context.invocation_metadata()))
    trailing = [(REQUEST_ID_KEY, REQUEST_ID.get())]
    context.set_trailing_metadata(trailing)
    return trailing


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic's clock (None: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > MAX_DEADLINE_S:  # none, or none worth the name
        return None
    return time.monotonic() + remaining


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


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, runtime: RuntimeGetter) -> None:
        self._runtime = runtime

    @unary
    async def Generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.GenerateResponse:
        generation = await self._runtime().requests.generate(
            generate_input(request), REQUEST_ID.get(), PRINCIPAL.get(), deadline_of(context)
        )
        done = await generation.complete()
        return unary_response(done, generation.adapter, generation.request_id)

    @streaming
    async def GenerateStream(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        generation = await self._runtime().requests.generate(
            generate_input(request), REQUEST_ID.get(), PRINCIPAL.get(), deadline_of(context)
        )
        # Closed however the call ends (a client gone mid-send included): the request is
        # cancelled and what it holds given back at once, not when garbage is collected.
        async with contextlib.aclosing(generation) as outputs:
            async for out in outputs:
                # Also steps whose text is held back (half a character, a possible stop
                # string): their token ids must reach the client.
                if out.text or out.token_ids or out.finish_reason is not None:
                    yield generate_response(
                        out, out.text, out.token_ids, generation.adapter, generation.request_id
                    )

    @unary
    async def ModelInfo(
        self,
        request: inference_pb2.ModelInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.ModelInfoResponse:
        return model_info_message(self._runtime().model_info())


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime: RuntimeGetter) -> None:
        self._runtime = runtime

    @unary
    async def RegisterAdapter(
        self,
        request: adapters_pb2.RegisterAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.RegisterAdapterResponse:
        registration = await self._runtime().adapters.register(
            adapter_id_of(request),
            request.path,
            pin=request.pin,
            tenant=request.tenant,
            shared=request.shared,
            principal=PRINCIPAL.get(),
        )
        return registration_message(registration)

    @unary
    async def PushAdapter(
        self,
        request_iterator: AsyncIterator[adapters_pb2.PushAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.RegisterAdapterResponse:
        adapters = self._runtime().adapters
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise InvalidRequest("adapter_id", "the push stream is empty") from None
        registration = await adapters.push(
            adapter_id_of(first),
            push_chunks(first, aiter(request_iterator)),
            pin=first.pin,
            tenant=first.tenant,
            shared=first.shared,
            principal=PRINCIPAL.get(),
        )
        return registration_message(registration)

    @unary
    async def GetAdapter(
        self,
        request: adapters_pb2.GetAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        view = await self._runtime().adapters.get(adapter_id_of(request), PRINCIPAL.get())
        return adapter_info(view)

    @unary
    async def ListAdapters(
        self,
        request: adapters_pb2.ListAdaptersRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.ListAdaptersResponse:
        views = await self._runtime().adapters.available(PRINCIPAL.get())
        return adapters_pb2.ListAdaptersResponse(adapters=[adapter_info(v) for v in views])

    @unary
    async def DeleteAdapter(
        self,
        request: adapters_pb2.DeleteAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.DeleteAdapterResponse:
        versions = await self._runtime().adapters.delete(adapter_id_of(request), PRINCIPAL.get())
        return adapters_pb2.DeleteAdapterResponse(deleted=True, versions=versions)

    @unary
    async def PinAdapter(
        self,
        request: adapters_pb2.PinAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        view = await self._runtime().adapters.pin(adapter_id_of(request), PRINCIPAL.get())
        return adapter_info(view)

    @unary
    async def UnpinAdapter(
        self,
        request: adapters_pb2.PinAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        view = await self._runtime().adapters.unpin(adapter_id_of(request), PRINCIPAL.get())
        return adapter_info(view)

    @unary
    async def GetCacheStats(
        self,
        request: adapters_pb2.GetCacheStatsRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.CacheStats:
        return cache_stats_message(await self._runtime().adapters.cache_view(PRINCIPAL.get()))

    @unary
    async def MergeAdapter(
        self,
        request: adapters_pb2.MergeAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.MergeState:
        view = await self._runtime().adapters.merge(adapter_id_of(request), PRINCIPAL.get())
        return merge_state_message(view)

    @unary
    async def UnmergeAdapter(
        self,
        request: adapters_pb2.UnmergeAdapterRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.MergeState:
        return merge_state_message(await self._runtime().adapters.unmerge(PRINCIPAL.get()))

    @unary
    async def GetMergeState(
        self,
        request: adapters_pb2.GetMergeStateRequest,
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.MergeState:
        return merge_state_message(await self._runtime().adapters.merge_state(PRINCIPAL.get()))
