"""The request path, whatever protocol a request came by:

    a GenerateInput comes in -> refused early if the tenant or the queue is full -> resolved to
    an adapter version the caller may use -> sizes checked, tokenized (chat template applied)
    -> admitted under the tenant's quotas -> the adapter's weights held in the host tier ->
    submitted to the engine -> its outputs streamed back, until one carries a finish reason.

Errors about the request raise from `generate` before any output (a front end answers them as
errors, not as a started stream); an error after that ends the outputs. Whatever way the
outputs end (finished, failed, or the consumer gone), the request's quota, host-tier lease and
engine resources are given back, and it is observed once (metrics, the request log).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from jinja2 import TemplateError

from loraplex.adapters.cache import Lease
from loraplex.adapters.compositions import CompositionRequest
from loraplex.adapters.registry import loggable_id
from loraplex.core.errors import CANCELLED, InvalidRequest, shown
from loraplex.core.types import AdapterVersion
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.request import (
    EngineRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from loraplex.server.engine.structured import CompiledConstraint, ConstraintSpec, GrammarCompiler
from loraplex.server.runtime.auth import Principal
from loraplex.server.runtime.mailbox import LoopMailbox
from loraplex.server.runtime.quotas import Quotas, Ticket
from loraplex.server.runtime.resolver import AdapterResolver
from loraplex.server.runtime.telemetry import Observers, RequestRecord
from loraplex.server.runtime.telemetry import request_id as new_request_id

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_TEXT_CHARS = 1 << 20  # prompt or messages, before tokenizing (the context bounds tokens)
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerateInput:
    """A generate request in domain terms (what every front end translates to)."""

    adapter_id: str = ""  # "" = the base model
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()  # the adapter's chat template applied, else the model's
    prompt_ids: tuple[int, ...] = ()  # a prompt already tokenized (what harnesses send)
    max_new_tokens: int | None = None  # None = the server's default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    compose: CompositionRequest | None = None  # several adapters composed (not adapter_id)
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    # What SamplingParams (engine/request.py) says of each:
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    constraint: ConstraintSpec | None = None  # the output satisfies it (structured outputs)
    # Function definitions (OpenAI's `tools`, as JSON objects) shown to the chat template.
    tools: tuple[dict[str, object], ...] = ()
    cache_salt: str = ""  # only requests with the same salt share cached prefixes


@dataclass(frozen=True)
class Completion:
    """One sample's whole generation: its text and tokens, and its last output (finish
    reason, usage)."""

    text: str
    token_ids: list[int]
    last: RequestOutput
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, if asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # if asked

    @property
    def index(self) -> int:
        return self.last.index


@dataclass
class Generation:
    """A submitted request: what serves it, and its outputs as they come (iterate over it).
    Close it (`aclose`, e.g. with contextlib.aclosing) however the caller stops: a request not
    finished is cancelled, and its quota, lease and engine resources are given back, even if
    no output was read."""

    request_id: str
    adapter: AdapterVersion | None
    outputs: AsyncGenerator[RequestOutput, None]
    _abandon: Callable[[], None] = field(repr=False)  # ends it if its outputs never started
    n: int = 1  # samples: the outputs end once each has had its finish reason
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as the model reads it

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self.outputs

    async def aclose(self) -> None:
        await self.outputs.aclose()  # a started iteration ends itself
        self._abandon()  # one never started is ended here (after the above: a no-op)

    async def complete(self) -> list[Completion]:
        """Read every output (a unary answer): one Completion per sample, by index. The
        generation is closed afterwards."""
        texts: list[list[str]] = [[] for _ in range(self.n)]
        token_ids: list[list[int]] = [[] for _ in range(self.n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]
        prompt_logprobs = None
        done: dict[int, Completion] = {}
        async with contextlib.aclosing(self):
            async for out in self:
                i = out.index
                texts[i].append(out.text)
                token_ids[i].extend(out.token_ids)
                logprobs[i].extend(out.logprobs or ())
                prompt_logprobs = out.prompt_logprobs or prompt_logprobs
                if out.finish_reason is not None:
                    done[i] = Completion(
                        text="".join(texts[i]),
                        token_ids=token_ids[i],
                        last=out,
                        logprobs=tuple(logprobs[i]) if out.logprobs is not None else None,
                    )
        if len(done) < self.n:
            raise RuntimeError("generation ended without a finish reason")
        ordered = [done[i] for i in range(self.n)]
        if prompt_logprobs is not None:  # sent once, with the first sample's first output
            ordered = [dataclasses.replace(c, prompt_logprobs=prompt_logprobs) for c in ordered]
        return ordered


class Requests:
    def __init__(
        self,
        engine: Engine,
        resolver: AdapterResolver,
        quotas: Quotas,
        observers: Observers,
        default_max_new_tokens: int,
        log_prompts: bool = False,
    ) -> None:
        self.engine = engine
        self.resolver = resolver
        self.quotas = quotas
        self.observers = observers
        self.default_max_new_tokens = default_max_new_tokens
        self.log_prompts = log_prompts
        self.tokenizer = engine.info.tokenizer
        self._loop_mailbox: LoopMailbox | None = None
        self._in_flight: dict[int, str] = {}  # id(record) -> request id, submitted and not ended
        self._special_tokens = sorted(
            {str(t) for t in getattr(self.tokenizer, "all_special_tokens", ())} - {""}
        )
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, engine.info.max_context)
        # Structured outputs: compiled in a worker thread per request (bounded, cached), never
        # on the engine thread; the tokenizer's side is built once, here.
        self.grammars = GrammarCompiler(
            self.tokenizer, engine.info.vocab_size, eos_token_ids=engine.info.eos_token_ids
        )

    async def generate(
        self,
        inp: GenerateInput,
        request_id: str | None = None,
        principal: Principal | None = None,
        deadline: float | None = None,
        protocol: str = "grpc",
    ) -> Generation:
        """Validate, admit and submit a request. Errors about the request raise here, before
        any output; the returned iterator yields outputs until one carries a finish_reason.
        `deadline` (time.monotonic): when the client gives up; a request that cannot finish by
        then at the pace the engine runs is refused (Unmeetable) rather than queued.
        `protocol`: the front end it came by (a metrics label)."""
        tenant = principal.tenant if principal is not None else ""
        record = RequestRecord(
            request_id=request_id or new_request_id(),
            tenant=tenant,
            arrival=time.monotonic(),
            adapter_id=loggable_id(inp.adapter_id),  # a client's id is not logged raw
            protocol=protocol,
        )
        if self.log_prompts:
            record.prompt = inp.prompt or json.dumps(
                [(m.role, m.content) for m in inp.messages], ensure_ascii=False
            )
        try:
            return await self._submit(inp, record, principal, deadline)
        except BaseException as exc:  # refused: observed now (a started one when it ends)
            record.fail(exc)
            record.finished = time.monotonic()
            self.observers.finished(record)
            raise

    async def _submit(
        self,
        inp: GenerateInput,
        record: RequestRecord,
        principal: Principal | None,
        deadline: float | None,
    ) -> Generation:
        request_id, tenant = record.request_id, record.tenant
        # Refuse early what would be refused anyway, before tokenizing: under overload the
        # refusals must cost the server (and the requests it runs) next to nothing.
        self.quotas.check(tenant)
        self.engine.check()
        adapter = await self.resolver.for_request(inp.adapter_id, inp.compose, principal)
        if adapter is not None:
            record.adapter_id, record.adapter_version = adapter.key
        check_sizes(inp, self.max_prompt_chars)
        template = adapter.chat_template if adapter is not None else ""
        prompt_ids = await asyncio.to_thread(self._tokenize, inp, template or None)
        record.prompt_tokens = len(prompt_ids)
        max_new = self.default_max_new_tokens if inp.max_new_tokens is None else inp.max_new_tokens
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=inp.temperature,
            top_p=inp.top_p,
            top_k=inp.top_k,
            seed=inp.seed,
            stop=inp.stop,
            ignore_eos=inp.ignore_eos,
            n=inp.n,
            logprobs=inp.logprobs,
            prompt_logprobs=inp.prompt_logprobs,
            presence_penalty=inp.presence_penalty,
            frequency_penalty=inp.frequency_penalty,
            repetition_penalty=inp.repetition_penalty,
            min_p=inp.min_p,
            logit_bias=inp.logit_bias,
            stop_token_ids=inp.stop_token_ids,
            min_tokens=inp.min_tokens,
            include_stop_str_in_output=inp.include_stop_str_in_output,
        )
        self._check_params(params)
        check_context(len(prompt_ids), max_new, self.engine.info.max_context)
        mailbox = self._mailbox()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def emit(item: RequestOutput | BaseException) -> None:  # called on the engine thread
            try:
                mailbox.post(queue, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                request.cancel()

        ticket = self.quotas.admit(tenant, len(prompt_ids) + params.n * max_new)
        lease = None
        try:
            # The host tier holds the adapter's weights while the request lives: loaded once
            # however many requests want it, and fetched while the batch runs.
            # Compiled once the request holds its place under the tenant's quotas, so that a
            # tenant's compiles are bounded by its own limits.
            constraint = await self._compile(inp.constraint)
            lease = await self.resolver.lease(adapter, tenant) if adapter is not None else None
            request = EngineRequest(
                request_id=request_id,
                prompt_ids=prompt_ids,
                params=params,
                adapter=adapter,
                emit=emit,
                weights=lease.weights if lease else None,
                tenant=tenant,
                deadline=deadline,
                constraint=constraint,
                cache_salt=inp.cache_salt,
            )
            self.engine.submit(request)
            self._in_flight[id(record)] = request_id
        except BaseException:
            if lease is not None:
                lease.release()
            ticket.release(ticket.tokens)
            raise
        end = self._ending(request, lease, ticket, record)
        return Generation(
            request_id=request_id,
            adapter=adapter,
            outputs=self._outputs(queue, record, end, params.n),
            _abandon=lambda: end(False),
            n=params.n,
            prompt_ids=prompt_ids,
        )

    async def _compile(self, spec: ConstraintSpec | None) -> CompiledConstraint | None:
        """The request's constraint compiled (InvalidRequest naming its field if it cannot
        be), off the event loop: a compile is bounded in time, a repeated one cached."""
        if spec is None:
            return None
        return await asyncio.to_thread(self.grammars.compile, spec)

    def _mailbox(self) -> LoopMailbox:
        """The running loop's mailbox: the engine's outputs for every request on this loop
        reach it through one."""
        loop = asyncio.get_running_loop()
        if self._loop_mailbox is None or self._loop_mailbox.loop is not loop:
            self._loop_mailbox = LoopMailbox(loop)
        return self._loop_mailbox

    async def _outputs(
        self,
        queue: asyncio.Queue[RequestOutput | BaseException],
        record: RequestRecord,
        end: Callable[[bool], None],
        samples: int,
    ) -> AsyncGenerator[RequestOutput, None]:
        finished = False
        running = samples  # samples without a finish reason yet
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    record.fail(item)
                    raise item
                if item.finish_reason is not None:
                    running -= 1
                finished = running == 0
                record.output(time.monotonic(), len(item.token_ids))
                if self.log_prompts and item.index == 0:
                    record.text += item.text
                if finished:
                    record.finish_reason = item.finish_reason or ""
                yield item
        finally:
            end(finished)

    def _ending(
        self, request: EngineRequest, lease: Lease | None, ticket: Ticket, record: RequestRecord
    ) -> Callable[[bool], None]:
        """What ends a request, once whatever ends it: unfinished, it is cancelled (the
        consumer went away: a client cancel, a deadline); what it holds is given back, and it
        is observed."""
        ended = False

        def end(finished: bool) -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            self._in_flight.pop(id(record), None)
            if not finished:
                self.engine.cancel(request)
                record.code = CANCELLED
            if lease is not None:
                lease.release()
            params = request.params
            ticket.release(params.n * params.max_new_tokens - record.completion_tokens)
            record.queued, record.admitted = request.arrival, request.admitted
            record.loaded, record.prefill_started = request.loaded, request.prefill_started
            record.first_emitted = request.first_emitted
            record.finished = time.monotonic()
            self.observers.finished(record)

        return end

    def in_flight(self) -> list[str]:
        """The ids of the requests submitted and not ended yet."""
        return list(self._in_flight.values())

    def _tokenize(self, inp: GenerateInput, chat_template: str | None = None) -> list[int]:
        """The prompt's token ids: given, `messages` through `chat_template` (an adapter's own;
        None: the base model's), or the raw `prompt`."""
        if sum(map(bool, (inp.prompt, inp.messages, inp.prompt_ids))) > 1:
            raise InvalidRequest("prompt", "give one of prompt, messages or token ids")
        if inp.prompt_ids:
            return self._checked_ids(inp.prompt_ids)
        if inp.messages:
            for i, message in enumerate(inp.messages):
                if message.role not in CHAT_ROLES:
                    raise InvalidRequest(
                        f"messages[{i}].role",
                        f"must be one of {', '.join(CHAT_ROLES)}, got {shown(message.role)}",
                    )
                # A control token in the content would forge turns of the conversation.
                self._check_special(f"messages[{i}].content", message.content)
            if inp.tools:  # rendered by the template too
                self._check_special("tools", json.dumps(inp.tools, ensure_ascii=False))
            if not chat_template and not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("messages", "the served model has no chat template")
            try:
                text = self.tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                    [{"role": m.role, "content": m.content} for m in inp.messages],
                    chat_template=chat_template,
                    tools=list(inp.tools) or None,
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except TemplateError as exc:  # e.g. raise_exception("roles must alternate")
                raise InvalidRequest(
                    "messages", f"the chat template refuses them: {shown(str(exc), 200)}"
                ) from None
            ids = self.tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]
        elif inp.prompt:
            # Raw text: special-token strings in it stay text, never control tokens.
            ids = self.tokenizer(inp.prompt, split_special_tokens=True).input_ids  # type: ignore[operator]
        else:
            raise InvalidRequest("prompt", "empty: give a prompt or messages")
        if not ids:
            raise InvalidRequest("prompt", "tokenizes to no tokens")
        return list(ids)

    def _check_special(self, field: str, text: str) -> None:
        for token in self._special_tokens:
            if token in text:
                raise InvalidRequest(field, f"contains the special token {token!r}")

    def _checked_ids(self, ids: tuple[int, ...], field: str = "prompt") -> list[int]:
        vocab = self.engine.info.vocab_size
        for i, token in enumerate(ids):
            if not 0 <= token < vocab:
                raise InvalidRequest(f"{field}[{i}]", f"token id {token} is not in [0, {vocab})")
        return list(ids)

    def _check_params(self, params: SamplingParams) -> None:
        """The token ids the parameters name must be in the vocabulary."""
        self._checked_ids(tuple(t for t, _ in params.logit_bias), "logit_bias")
        self._checked_ids(params.stop_token_ids, "stop_token_ids")

    async def warmup(self) -> None:
        """One tiny generation through the whole path, so the first client is not the one
        who pays for lazy initialisation."""
        # A fixed length: its two tokens say nothing of how long requests run (the pacing).
        warm = GenerateInput(prompt="Hello", max_new_tokens=2, ignore_eos=True)
        generation = await self.generate(warm)
        await generation.complete()


def check_sizes(inp: GenerateInput, max_chars: int = MAX_TEXT_CHARS) -> None:
    """Bound the text before tokenizing it (tokens are bounded by the context afterwards):
    at most `max_chars` characters (`max_prompt_chars`: more cannot fit the context)."""
    limit = min(max_chars, MAX_TEXT_CHARS)
    if len(inp.prompt) > limit:
        raise InvalidRequest("prompt", f"{len(inp.prompt)} characters; at most {limit}")
    if len(inp.messages) > MAX_MESSAGES:
        raise InvalidRequest("messages", f"{len(inp.messages)} messages; at most {MAX_MESSAGES}")
    total = sum(len(m.content) for m in inp.messages)
    if total > limit:
        raise InvalidRequest("messages", f"{total} characters; at most {limit}")
    tools = len(json.dumps(inp.tools)) if inp.tools else 0
    if tools + total > limit:
        raise InvalidRequest("tools", f"{tools} characters with the messages'; at most {limit}")
    if len(inp.prompt_ids) > MAX_TEXT_CHARS:
        raise InvalidRequest("prompt", f"{len(inp.prompt_ids)} tokens; at most {MAX_TEXT_CHARS}")


def max_prompt_chars(tokenizer: object, max_context: int) -> int:
    """Characters beyond which a text cannot fit in `max_context` tokens, so it is refused
    untokenized: a token stands for at most as many characters as its vocabulary entry has
    (byte-level BPE spells a byte with one character, SentencePiece a space with one), so a
    text of more than the longest entry times the context is more tokens than fit. A
    tokenizer that normalizes text first (composing characters) may shrink it: four times
    that, for those. Without a vocabulary to measure, MAX_TEXT_CHARS."""
    try:
        longest = max(map(len, tokenizer.get_vocab()))  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return MAX_TEXT_CHARS
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizes = backend is None or getattr(backend, "normalizer", None) is not None
    return min(MAX_TEXT_CHARS, longest * max_context * (4 if normalizes else 1))


def check_context(prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
    """The prompt and what it may generate must fit the model's context."""
    if prompt_tokens >= limit:
        raise InvalidRequest(
            "prompt", f"{prompt_tokens} tokens; the model's context is {limit} tokens"
        )
    if prompt_tokens + max_new_tokens > limit:
        raise InvalidRequest(
            "max_new_tokens",
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {limit} tokens",
        )
