"""OpenAI request bodies -> GenerateInput, and the runtime's answers -> OpenAI response bodies.

Field names and defaults are OpenAI's (`temperature` 1, `max_tokens` 16 on /v1/completions),
extensions vLLM's (`top_k`, `ignore_eos`) and loraplex's `compose`. A field OpenAI defines that
loraplex does not serve yet is refused when it asks for something other than its default (a
400 naming it), never silently ignored; fields nobody defines are ignored, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loraplex.adapters.compositions import CompositionRequest, WeightedAdapter
from loraplex.core.errors import InvalidRequest, shown
from loraplex.core.types import AdapterVersion
from loraplex.server.engine.request import RequestOutput, Usage
from loraplex.server.runtime.requests import ChatMessage, GenerateInput
from loraplex.server.runtime.views import AdapterView, ModelInfo

Body = Mapping[str, Any]
MAX_PROMPTS = 64  # prompts in one /v1/completions request
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields of OpenAI's API and vLLM's extensions served later; until then only their defaults
# are accepted.
UNSUPPORTED_DEFAULTS: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    # vLLM's sampling extensions
    "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "prompt_logprobs": (None,),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}


@dataclass(frozen=True)
class HttpGenerate:
    """A chat or completions request: its inputs (several prompts on /v1/completions), and
    how to answer it."""

    model: str
    inputs: tuple[GenerateInput, ...]
    stream: bool
    include_usage: bool


def chat_request(body: Body, base_id: str, default_max_tokens: int | None) -> HttpGenerate:
    """A /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    inp = generate_input(body, base_id, default_max_tokens)
    chat = tuple(chat_message(i, m) for i, m in enumerate(messages))
    return _request(body, (dataclasses.replace(inp, messages=chat),))


def completion_request(body: Body, base_id: str) -> HttpGenerate:
    """A /v1/completions body: `prompt` a string, a list of strings, token ids (a list of
    ints) or a list of token id lists, as vLLM takes them; one choice per prompt."""
    inp = generate_input(body, base_id, COMPLETIONS_MAX_TOKENS)
    prompts = prompts_of(body.get("prompt"))
    inputs = tuple(
        dataclasses.replace(inp, prompt=p)
        if isinstance(p, str)
        else dataclasses.replace(inp, prompt_ids=p)
        for p in prompts
    )
    return _request(body, inputs)


def _request(body: Body, inputs: tuple[GenerateInput, ...]) -> HttpGenerate:
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options", "must be an object")
    include_usage = bool(options and flag(options, "include_usage", "stream_options."))
    return HttpGenerate(model_of(body), inputs, stream, include_usage)


def model_of(body: Body) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", "required: the base model's id or an adapter id")
    return model


def generate_input(body: Body, base_id: str, default_max_tokens: int | None) -> GenerateInput:
    """The fields chat and completions share."""
    for name, defaults in UNSUPPORTED_DEFAULTS.items():
        if name in body and body[name] not in defaults:
            raise InvalidRequest(name, "is not supported by this server yet")
    model = model_of(body)
    max_tokens = integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens")
    compose = composition(body.get("compose"))
    if compose is not None and model != base_id:
        raise InvalidRequest("compose", "give the base model as model when composing adapters")
    top_k = integer(body, "top_k")
    seed = integer(body, "seed")
    temperature = number(body, "temperature")
    top_p = number(body, "top_p")
    return GenerateInput(
        adapter_id="" if model == base_id else model,
        max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM's -1: no limit
        seed=seed,
        stop=stops(body.get("stop")),
        compose=compose,
        ignore_eos=flag(body, "ignore_eos"),
    )


def chat_message(index: int, message: object) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(where, "must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str):
        raise InvalidRequest(f"{where}.role", "required: system, user, assistant or tool")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    return ChatMessage(role=role, content=content_text(f"{where}.content", message.get("content")))


def content_text(where: str, content: object) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(where, "must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidRequest(f"{where}[{i}]", "only text parts ({type: text}) are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}[{i}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def prompts_of(prompt: object) -> list[str | tuple[int, ...]]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt", "must be a string, a list of strings or token ids")
    if all(_is_int(t) for t in prompt):
        return [tuple(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest("prompt", f"{len(prompt)} prompts; at most {MAX_PROMPTS}")
    prompts: list[str | tuple[int, ...]] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            prompts.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            prompts.append(tuple(p))
        else:
            raise InvalidRequest(f"prompt[{i}]", "must be a string or a list of token ids")
    return prompts


def composition(value: object) -> CompositionRequest | None:
    """loraplex's `compose` extension: {"adapters": [{"adapter_id", "weight"}], "method",
    "density", "seed", "majority_sign_method"}, as in gRPC's AdapterComposition."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("adapters"), list):
        raise InvalidRequest("compose", "must be an object with a list of adapters")
    adapters = []
    for i, a in enumerate(value["adapters"]):
        where = f"compose.adapters[{i}]"
        if not isinstance(a, dict) or not isinstance(a.get("adapter_id"), str):
            raise InvalidRequest(where, "must be an object with adapter_id and weight")
        weight = number(a, "weight", f"{where}.")
        adapters.append(WeightedAdapter(a["adapter_id"], 1.0 if weight is None else weight))
    density, seed = number(value, "density", "compose."), integer(value, "seed", "compose.")
    return CompositionRequest(
        adapters=tuple(adapters),
        method=text(value, "method", "compose.") or "linear",
        density=density,
        seed=seed or 0,
        majority_sign_method=text(value, "majority_sign_method", "compose.") or "total",
    )


def stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidRequest("stop", "must be a string or a list of strings")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _field(body: Body, name: str, prefix: str, ok: Callable[[object], bool], what: str) -> Any:
    """body[name], None when absent or null; InvalidRequest naming it unless ok(value)."""
    value = body.get(name)
    if value is not None and not ok(value):
        raise InvalidRequest(prefix + name, f"must be {what}, got {shown(value)}")
    return value


def integer(body: Body, name: str, prefix: str = "") -> int | None:
    value = _field(body, name, prefix, _is_int, "an integer")
    return None if value is None else int(value)


def number(body: Body, name: str, prefix: str = "") -> float | None:
    value = _field(body, name, prefix, _is_number, "a number")
    return None if value is None else float(value)


def flag(body: Body, name: str, prefix: str = "") -> bool:
    return bool(_field(body, name, prefix, lambda v: isinstance(v, bool), "true or false"))


def text(body: Body, name: str, prefix: str = "") -> str | None:
    value: str | None = _field(body, name, prefix, lambda v: isinstance(v, str), "a string")
    return value


# -- answers --------------------------------------------------------------------------------


def fingerprint(base_fingerprint: str, adapter: AdapterVersion | None) -> str:
    """`system_fingerprint`: the base weights' identity and the adapter version that served."""
    base = "fp_" + base_fingerprint.split(":")[-1][:16]
    return base if adapter is None else f"{base}-{adapter.adapter_id}.v{adapter.version}"


def usage(u: Usage | None) -> dict[str, int]:
    prompt, completion = (u.prompt_tokens, u.completion_tokens) if u else (0, 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def total_usage(usages: Sequence[Usage | None]) -> dict[str, int]:
    parts = [usage(u) for u in usages]
    return {
        k: sum(p[k] for p in parts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


def envelope(kind: str, response_id: str, model: str, system_fingerprint: str) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": system_fingerprint,
    }


def chat_choice(index: int, text: str, out: RequestOutput) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": out.finish_reason,
    }


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def model_card(model_id: str, created: int, owned_by: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "root": model_id,
        "parent": parent,
    }


def base_card(info: ModelInfo, created: int) -> dict[str, Any]:
    return model_card(info.model_id, created, "loraplex", None) | {
        "max_model_len": info.max_context_length
    }


def adapter_card(view: AdapterView, base_id: str) -> dict[str, Any]:
    version = view.version
    return model_card(
        version.adapter_id,
        rfc3339_seconds(version.created_at),
        version.tenant or "loraplex",
        base_id,
    )


def rfc3339_seconds(value: str) -> int:
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
