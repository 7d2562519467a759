"""The front end of the engine: requests in domain terms (validated, tokenized, resolved to an
adapter version), outputs as async iterators. The gRPC servicers only translate to and from it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loraplex.adapters.registry import AdapterRegistry, check_adapter_id
from loraplex.adapters.store import AdapterStore, AdapterVersion
from loraplex.adapters.validate import AdapterWeights, BaseModelSpec
from loraplex.server import __version__
from loraplex.server.config import ServerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import EngineRequest, RequestOutput, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.model_loader import LORA_TARGETS, LoadedModel, load_model

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class GenerateInput:
    adapter_id: str = ""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """A submitted request: what serves it, and its outputs as they come."""

    request_id: str
    adapter: AdapterVersion | None
    outputs: AsyncIterator[RequestOutput]


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_type: str
    quantization: str
    device: str
    dtype: str
    max_context_length: int
    vocab_size: int
    num_layers: int
    supported_target_modules: tuple[str, ...]
    max_lora_rank: int
    max_loras: int
    max_batch_size: int
    base_model_fingerprint: str
    version: str
    has_chat_template: bool


class Frontend:
    def __init__(
        self, loaded: LoadedModel, engine: Engine, registry: AdapterRegistry, config: ServerConfig
    ) -> None:
        self.loaded = loaded
        self.engine = engine
        self.registry = registry
        self.config = config
        self.tokenizer = loaded.tokenizer

    @classmethod
    def create(cls, config: ServerConfig) -> Frontend:
        """Load the model and build everything behind the front end (blocking; seconds). The
        model is loaded on the engine thread, the one thread that runs tensor work."""
        ec = config.engine

        def make_runner() -> ModelRunner:
            return ModelRunner.from_config(load_model(config.model), ec)

        engine = Engine(make_runner, ec)
        runner = engine.start()
        spec = BaseModelSpec(
            runner.target_shapes, ec.max_lora_rank, runner.loaded.fingerprint, ec.max_adapter_bytes
        )
        registry = AdapterRegistry(
            AdapterStore(config.store_dir), spec, list(config.allowed_adapter_roots)
        )
        engine.load_weights = registry.load_weights
        return cls(runner.loaded, engine, registry, config)

    def close(self) -> None:
        self.engine.stop()

    async def generate(self, inp: GenerateInput, request_id: str | None = None) -> Generation:
        """Validate and submit a request. Errors about the request raise here, before any
        output; the returned iterator yields outputs until one carries a finish_reason."""
        request_id = request_id or uuid.uuid4().hex
        adapter = self.registry.resolve(inp.adapter_id) if inp.adapter_id else None
        prompt_ids = await asyncio.to_thread(self._tokenize, inp)
        max_new = (
            self.config.engine.default_max_new_tokens
            if inp.max_new_tokens is None
            else inp.max_new_tokens
        )
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=inp.temperature,
            top_p=inp.top_p,
            top_k=inp.top_k,
            seed=inp.seed,
            stop=inp.stop,
        )
        limit = self.engine.runner.max_context
        if len(prompt_ids) >= limit:
            raise InvalidRequest(
                "prompt", f"{len(prompt_ids)} tokens; the model's context is {limit} tokens"
            )
        if len(prompt_ids) + max_new > limit:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds the "
                f"model's context of {limit} tokens",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def emit(item: RequestOutput | BaseException) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                request.cancel()

        request = EngineRequest(request_id, prompt_ids, params, adapter, emit)
        self.engine.submit(request)
        return Generation(request_id, adapter, _outputs(queue, request))

    def _tokenize(self, inp: GenerateInput) -> list[int]:
        if inp.prompt and inp.messages:
            raise InvalidRequest("prompt", "give either prompt or messages, not both")
        if inp.messages:
            for i, (role, _) in enumerate(inp.messages):
                if role not in CHAT_ROLES:
                    raise InvalidRequest(
                        f"messages[{i}].role",
                        f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                    )
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("messages", "the served model has no chat template")
            text = self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in inp.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        elif inp.prompt:
            ids = self.tokenizer(inp.prompt).input_ids
        else:
            raise InvalidRequest("prompt", "empty: give a prompt or messages")
        if not ids:
            raise InvalidRequest("prompt", "tokenizes to no tokens")
        return list(ids)

    async def warmup(self) -> None:
        """One tiny generation through the whole path, so the first client is not the one
        who pays for lazy initialisation."""
        generation = await self.generate(GenerateInput(prompt="Hello", max_new_tokens=2))
        async for _ in generation.outputs:
            pass

    # -- adapters (file and tensor work runs off the event loop) -------------------------------
    async def register_adapter(self, adapter_id: str, path: str) -> tuple[AdapterVersion, bool]:
        # File work on a worker thread; the tensor validation hops onto the engine thread.
        def on_engine(fn: Callable[[], AdapterWeights]) -> AdapterWeights:
            return self.engine.call(fn).result()

        return await asyncio.to_thread(self.registry.register, adapter_id, path, on_engine)

    def get_adapter(self, adapter_id: str) -> tuple[AdapterVersion, list[int]]:
        versions = self.registry.store.versions(check_adapter_id(adapter_id))
        return versions[-1], [v.version for v in versions]

    def list_adapters(self) -> list[tuple[AdapterVersion, list[int]]]:
        store = self.registry.store
        return [
            (v, [x.version for x in store.versions(v.adapter_id)]) for v in store.latest_versions()
        ]

    async def delete_adapter(self, adapter_id: str) -> list[int]:
        return await asyncio.to_thread(self.registry.store.delete, check_adapter_id(adapter_id))

    def model_info(self) -> ModelInfo:
        model = self.loaded.model
        cfg = model.config
        ec = self.config.engine
        return ModelInfo(
            model_id=self.loaded.model_id,
            model_type=str(getattr(cfg, "model_type", "")),
            quantization=self.loaded.quantization,
            device=str(self.loaded.device),
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            max_context_length=self.engine.runner.max_context,
            vocab_size=int(cfg.vocab_size),
            num_layers=int(cfg.num_hidden_layers),
            supported_target_modules=LORA_TARGETS,
            max_lora_rank=ec.max_lora_rank,
            max_loras=ec.max_loras,
            max_batch_size=ec.max_batch_size,
            base_model_fingerprint=self.loaded.fingerprint,
            version=__version__,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )


async def _outputs(
    queue: asyncio.Queue[RequestOutput | BaseException], request: EngineRequest
) -> AsyncIterator[RequestOutput]:
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finish_reason is not None
            yield item
    finally:
        if not finished:  # the consumer went away (client cancel, deadline): stop generating
            request.cancel()
