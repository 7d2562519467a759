"""The HTTP endpoints. They only translate: JSON bodies <-> runtime calls (convert.py), domain
errors <-> OpenAI errors (errors.py). Who may call which route is in server.py's route table.

A generation's errors about the request are answered before any byte of a stream (the runtime
raises them from `generate`); a client that goes away, mid-stream or while waiting for a whole
answer, ends its requests at the next engine step, as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from loraplex.core.errors import InvalidRequest, NotReady, Unrecoverable
from loraplex.server.engine.request import RequestOutput, TokenLogprob, Usage
from loraplex.server.http_api import convert, tools
from loraplex.server.http_api.errors import HttpError, error_event, model_not_found, response_for
from loraplex.server.runtime.auth import Principal
from loraplex.server.runtime.requests import Completion, Generation
from loraplex.server.runtime.runtime import Runtime

log = logging.getLogger(__name__)

RuntimeGetter = Callable[[], Runtime]  # raises NotReady until the model is served
T = TypeVar("T")
MAX_BODY_BYTES = 16 << 20  # as gRPC's message limit
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Call:
    """One HTTP call, authenticated: what every endpoint gets."""

    request: Request
    request_id: str
    principal: Principal | None


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Endpoints:
    def __init__(
        self, runtime: RuntimeGetter, created: int, exposition: Callable[[], bytes] | None = None
    ) -> None:
        self._runtime = runtime
        self.created = created  # the base model's `created`: when the server started
        self._exposition = exposition  # the Prometheus text, when metrics are on
        self._token_texts: convert.TokenTexts | None = None  # made with the first answer

    # -- probes ----------------------------------------------------------------------------
    async def health(self, call: Call) -> Response:
        """Liveness: 200 while the process serves, loads or drains; 503 once the model failed
        to load (a restart is needed)."""
        try:
            self._runtime()
        except Unrecoverable:
            raise
        except NotReady:  # loading or draining: alive
            pass
        return PlainTextResponse("ok")

    async def ready(self, call: Call) -> Response:
        """Readiness: 200 once the model serves; 503 while it loads or the server drains."""
        self._runtime()
        return PlainTextResponse("ready")

    async def metrics(self, call: Call) -> Response:
        """The Prometheus exposition of --metrics-port, also here as vLLM serves it (load
        tools scrape the API's base URL): the same registry, so the same labels."""
        if self._exposition is None:
            raise HttpError(
                "NOT_FOUND", "no metrics here (--no-metrics, or API keys: --metrics-port)"
            )
        return Response(self._exposition(), media_type=CONTENT_TYPE_LATEST)

    # -- models ----------------------------------------------------------------------------
    async def models(self, call: Call) -> Response:
        runtime = self._runtime()
        base = runtime.model_info()
        views = await runtime.adapters.available(call.principal)
        cards = [convert.base_card(base, self.created)]
        cards += [convert.adapter_card(v, base.model_id) for v in views if not v.composition]
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, call: Call) -> Response:
        runtime = self._runtime()
        model_id = call.request.path_params["model_id"]
        base = runtime.model_info()
        if model_id == base.model_id:
            return JSONResponse(convert.base_card(base, self.created))
        views = await runtime.adapters.available(call.principal)
        for view in views:
            if view.version.adapter_id == model_id:
                return JSONResponse(convert.adapter_card(view, base.model_id))
        return model_not_found(model_id, call.request_id)

    # -- generation ------------------------------------------------------------------------
    async def chat(self, call: Call) -> Response:
        runtime = self._runtime()
        body = await json_body(call.request)
        request = convert.chat_request(body, runtime.info.model_id, None)
        return await self._generate(call, runtime, request, chat=True)

    async def completions(self, call: Call) -> Response:
        runtime = self._runtime()
        body = await json_body(call.request)
        request = convert.completion_request(body, runtime.info.model_id)
        return await self._generate(call, runtime, request, chat=False)

    async def _generate(
        self, call: Call, runtime: Runtime, request: convert.HttpGenerate, chat: bool
    ) -> Response:
        try:
            generations = await self._submit(call, runtime, request)
        except Exception as exc:  # a model the caller cannot use: 404, whoever has it
            composing = request.inputs[0].compose is not None  # its inputs' errors are its own
            return response_for(exc, call.request_id, model=None if composing else request.model)
        first = generations[0]
        model = first.adapter.adapter_id if first.adapter is not None else request.model
        kind, prefix = ("chat.completion", "chatcmpl-") if chat else ("text_completion", "cmpl-")
        head = convert.envelope(
            kind,
            prefix + call.request_id,
            model,
            convert.fingerprint(runtime.info.fingerprint, first.adapter),
        )
        render = Choices(request, generations, self._texts(runtime), chat)
        if request.stream:
            events = stream_events(
                generations, head, render, request.include_usage, call.request_id
            )
            return ClosingStream(events, generations)
        done = await until_gone(call.request, complete_all(generations))
        choices, usages = [], {}
        for p, samples in enumerate(done):
            for c in samples:
                usages[p, c.index] = c.last.usage
                choices.append(render.whole(p, c))
        answer = head | {"choices": choices, "usage": convert.total_usage(usages)}
        if chat and done[0][0].prompt_logprobs is not None:  # vLLM's, on chat's response
            answer["prompt_logprobs"] = convert.prompt_logprobs(
                done[0][0].prompt_logprobs, render.texts
            )
        return JSONResponse(answer)

    def _texts(self, runtime: Runtime) -> convert.TokenTexts:
        if self._token_texts is None:
            self._token_texts = convert.TokenTexts(runtime.info.tokenizer)
        return self._token_texts

    async def _submit(
        self, call: Call, runtime: Runtime, request: convert.HttpGenerate
    ) -> list[Generation]:
        """Every prompt's generation, or none: if one is refused, those started are closed."""
        generations: list[Generation] = []
        try:
            several = len(request.inputs) > 1
            for i, inp in enumerate(request.inputs):
                request_id = f"{call.request_id}-{i}" if several else call.request_id
                generation = await runtime.requests.generate(
                    inp, request_id, call.principal, protocol="http"
                )
                generations.append(generation)
        except BaseException:
            for generation in generations:
                await generation.aclose()
            raise
        return generations

    # -- vLLM's dynamic LoRA loading -------------------------------------------------------
    async def load_lora_adapter(self, call: Call) -> Response:
        body = await json_body(call.request)
        name = convert.text(body, "lora_name")
        path = convert.text(body, "lora_path")
        if not name:
            raise InvalidRequest("lora_name", "required")
        if not path:
            raise InvalidRequest("lora_path", "required")
        registration = await self._runtime().adapters.register(
            name,
            path,
            # loraplex's extensions, as RegisterAdapter's fields: whose it is, and for all
            tenant=convert.text(body, "tenant") or "",
            shared=convert.flag(body, "shared"),
            principal=call.principal,
        )
        version = registration.adapter.version
        ignored = registration.ignored_files
        note = f" Ignored (not opened, not stored): {', '.join(ignored)}." if ignored else ""
        return PlainTextResponse(
            f"Success: LoRA adapter '{name}' added successfully (version {version.version})." + note
        )

    async def unload_lora_adapter(self, call: Call) -> Response:
        body = await json_body(call.request)
        name = convert.text(body, "lora_name")
        if not name:
            raise InvalidRequest("lora_name", "required")
        await self._runtime().adapters.delete(name, call.principal)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


class ClosingStream(StreamingResponse):
    """Server-Sent Events that close their generations however the response ends: finished,
    failed, or cancelled when the client disconnects (Starlette cancels the stream), even
    before its first event."""

    def __init__(self, events: AsyncIterator[str], generations: list[Generation]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.generations = generations

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self.generations:
                await generation.aclose()


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, at most MAX_BODY_BYTES."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise InvalidRequest("body", f"{length} bytes; at most {MAX_BODY_BYTES}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidRequest("body", f"more than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past Python's stack
        raise InvalidRequest("body", "is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    return body


async def complete_all(generations: list[Generation]) -> list[list[Completion]]:
    tasks = [asyncio.ensure_future(g.complete()) for g in generations]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one failed or the client went: the others end too (complete() closes them)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # ended before the generators
        for generation in generations:
            await generation.aclose()


async def until_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (its
    requests end at the next engine step) and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this call itself is cancelled: the work goes with it
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged(generations: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several generations as they come, with the index of each one's prompt.
    Every generation is closed however the iteration ends."""
    if len(generations) == 1:
        async with contextlib.aclosing(generations[0]) as outputs:
            async for out in outputs:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async with contextlib.aclosing(generation) as outputs:
                async for out in outputs:
                    queue.put_nowait((index, out))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # ended before the generators
        for generation in generations:
            await generation.aclose()


class Choices:
    """The choices of one answer: choice p * n + j is prompt p's sample j (`n` samples per
    prompt, as vLLM numbers them), whole or as stream chunks, with the log-probabilities and
    echoed prompt the request asked for."""

    def __init__(
        self,
        request: convert.HttpGenerate,
        generations: list[Generation],
        texts: convert.TokenTexts,
        chat: bool,
    ) -> None:
        self.request, self.generations, self.texts, self.chat = request, generations, texts, chat
        self.logprobs = request.inputs[0].logprobs is not None
        self._sent: dict[int, int] = {}  # per streamed choice: characters sent so far
        self._held: dict[int, str] = {}  # per streamed choice with tools: its text so far
        self._prompt_logprobs: dict[int, tuple[TokenLogprob | None, ...]] = {}  # per prompt

    def index(self, prompt: int, sample: int) -> int:
        return prompt * self.request.samples + sample

    def prompt_text(self, prompt: int) -> str:
        inp = self.request.inputs[prompt]
        if inp.prompt:
            return inp.prompt
        return str(self.texts.decode(self.generations[prompt].prompt_ids))

    def whole(self, prompt: int, c: Completion) -> dict[str, Any]:
        """A choice of a unary answer."""
        index = self.index(prompt, c.index)
        if self.chat:
            logprobs = convert.chat_logprobs(c.logprobs, self.texts)
            choice = convert.chat_choice(index, c.text, c.last, logprobs)
            calling = self.request.tools
            calls = tools.tool_calls(calling, c.text) if calling is not None else None
            if calling is not None and calls is not None:
                choice["message"] |= {"content": None, "tool_calls": calls}
                choice["finish_reason"] = tools.finish_reason(calling, c.last.finish_reason)
            return choice
        text, entries = c.text, list(c.logprobs or ())
        if self.request.echo:
            text = self.prompt_text(prompt) + text
            entries = list(c.prompt_logprobs or ()) + entries
        choice = convert.text_choice(
            index, text, c.last.finish_reason, self._legacy(prompt, entries, 0)
        )
        return self._with_prompt_logprobs(choice, c.prompt_logprobs)

    def chunk(self, prompt: int, out: RequestOutput) -> dict[str, Any] | None:
        """A stream chunk's choice for `out`, or None when it has nothing to say."""
        index = self.index(prompt, out.index)
        if out.prompt_logprobs is not None:
            self._prompt_logprobs[prompt] = out.prompt_logprobs
        first = index not in self._sent
        offset = self._sent.setdefault(index, 0)
        if self.chat:
            if self.request.tools is not None:
                return self._tool_chunk(index, out)
            if not out.text and out.finish_reason is None and not self.logprobs:
                return None
            logprobs = convert.chat_logprobs(out.logprobs, self.texts)
            delta = {"content": out.text} if out.text else {}
            return convert.chat_delta(index, delta, out.finish_reason, logprobs)
        text, entries = out.text, list(out.logprobs or ())
        echoed = None
        if self.request.echo and first:
            text = self.prompt_text(prompt) + text
            echoed = self._prompt_logprobs.get(prompt)
            entries = list(echoed or ()) + entries
        if not text and out.finish_reason is None and not self.logprobs:
            return None
        self._sent[index] = offset + len(text)
        choice = convert.text_choice(
            index, text, out.finish_reason, self._legacy(prompt, entries, offset)
        )
        return self._with_prompt_logprobs(choice, echoed if first else None)

    def _tool_chunk(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        """With tools, a choice's text is held until it ends: then it is sent as the calls it
        makes (each whole, in one delta), or as content if it makes none."""
        calling = self.request.tools
        assert calling is not None
        held = self._held.get(index, "") + out.text
        self._held[index] = held
        logprobs = convert.chat_logprobs(out.logprobs, self.texts)
        if out.finish_reason is None:
            return convert.chat_delta(index, {}, None, logprobs) if self.logprobs else None
        calls = tools.tool_calls(calling, held)
        if calls is None:
            return convert.chat_delta(index, {"content": held}, out.finish_reason, logprobs)
        delta = {"tool_calls": [{"index": i} | call for i, call in enumerate(calls)]}
        return convert.chat_delta(
            index, delta, tools.finish_reason(calling, out.finish_reason), logprobs
        )

    def _legacy(
        self, prompt: int, entries: list[TokenLogprob | None], offset: int
    ) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        ids = self.generations[prompt].prompt_ids
        return convert.completion_logprobs(entries, self.texts, offset, ids[0] if ids else None)

    def _with_prompt_logprobs(
        self, choice: dict[str, Any], logprobs: tuple[TokenLogprob | None, ...] | None
    ) -> dict[str, Any]:
        """vLLM's `prompt_logprobs` on a completions choice, when the request named it."""
        if self.request.inputs[0].prompt_logprobs is None or logprobs is None:
            return choice
        return choice | {"prompt_logprobs": convert.prompt_logprobs(logprobs, self.texts)}


async def stream_events(
    generations: list[Generation],
    head: dict[str, Any],
    render: Choices,
    include_usage: bool,
    request_id: str,
) -> AsyncIterator[str]:
    """Server-Sent Events: a chunk per step that has news, a usage chunk when asked for, and
    `data: [DONE]`. An error after the stream started ends it with an error event."""
    chat = render.chat
    head = head | {"object": "chat.completion.chunk"} if chat else head
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    usages: dict[tuple[int, int], Usage | None] = {}
    if chat:
        roles = [
            convert.chat_delta(render.index(p, j), {"role": "assistant", "content": ""}, None)
            for p in range(len(generations))
            for j in range(render.request.samples)
        ]
        yield sse(head | {"choices": roles} | extra)
    try:
        async for prompt, out in merged(generations):
            choice = render.chunk(prompt, out)
            if out.usage is not None:
                usages[prompt, out.index] = out.usage
            if choice is not None:
                yield sse(head | {"choices": [choice]} | extra)
    except Exception as exc:
        yield sse(error_event(exc, request_id))
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        yield sse(head | {"choices": [], "usage": convert.total_usage(usages)})
    yield "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
