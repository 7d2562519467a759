"""OpenAI request bodies -> GenerateInput, and the runtime's answers -> OpenAI response bodies.

Field names and defaults are OpenAI's (`temperature` 1, `max_tokens` 16 on /v1/completions),
extensions vLLM's (`top_k`, `ignore_eos`, `min_p`, `repetition_penalty`, `stop_token_ids`,
`min_tokens`, `include_stop_str_in_output`, `prompt_logprobs`) and loraplex's `compose`. A
field OpenAI defines that loraplex does not serve yet is refused when it asks for something
other than its default (a 400 naming it), never silently ignored; fields nobody defines are
ignored, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loraplex.adapters.compositions import CompositionRequest, WeightedAdapter
from loraplex.core.errors import InvalidRequest, shown
from loraplex.core.types import AdapterVersion
from loraplex.server.engine.request import RequestOutput, TokenLogprob, Usage
from loraplex.server.engine.structured import ConstraintSpec
from loraplex.server.http_api.tools import ToolCalling, tool_request
from loraplex.server.runtime.requests import ChatMessage, GenerateInput
from loraplex.server.runtime.views import AdapterView, ModelInfo

Body = Mapping[str, Any]
MAX_PROMPTS = 64  # prompts in one /v1/completions request
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields of OpenAI's API and vLLM's extensions served later; until then only their defaults
# are accepted.
UNSUPPORTED_DEFAULTS: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "functions": (None, []),  # the deprecated form of `tools`
    "function_call": (None, "none", "auto"),
}
# vLLM's structured outputs: each key of `structured_outputs` (also as a `guided_<key>` field,
# its older name) and the constraint kind it asks for.
STRUCTURED_KINDS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


@dataclass(frozen=True)
class HttpGenerate:
    """A chat or completions request: its inputs (several prompts on /v1/completions), and
    how to answer it."""

    model: str
    inputs: tuple[GenerateInput, ...]
    stream: bool
    include_usage: bool
    echo: bool = False  # /v1/completions: the prompt comes back before its completion
    tools: ToolCalling | None = None  # chat: how the output becomes tool calls

    @property
    def samples(self) -> int:
        """Choices per prompt (`n`): choice i * n + j is prompt i's sample j."""
        return self.inputs[0].n


def chat_request(body: Body, base_id: str, default_max_tokens: int | None) -> HttpGenerate:
    """A /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    inp = generate_input(body, base_id, default_max_tokens)
    chat = tuple(chat_message(i, m) for i, m in enumerate(messages))
    # OpenAI's chat: `logprobs` true/false, and `top_logprobs` best alternatives (0-20)
    top = integer(body, "top_logprobs")
    if top is not None and not flag(body, "logprobs"):
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    logprobs = (top or 0) if flag(body, "logprobs") else None
    tools = tool_request(body)
    constraint = inp.constraint
    if tools.constraint is not None:
        if constraint is not None:
            raise InvalidRequest("tool_choice", f"a forced tool call and {constraint.field}")
        constraint = tools.constraint
    inp = dataclasses.replace(
        inp, messages=chat, logprobs=logprobs, tools=tools.shown, constraint=constraint
    )
    return _request(body, (inp,), tools=tools.calling)


def completion_request(body: Body, base_id: str) -> HttpGenerate:
    """A /v1/completions body: `prompt` a string, a list of strings, token ids (a list of
    ints) or a list of token id lists, as vLLM takes them; one choice per prompt."""
    inp = generate_input(body, base_id, COMPLETIONS_MAX_TOKENS)
    # The legacy completions' `logprobs`: how many best alternatives (0-20) with each token's;
    # with `echo`, the prompt's tokens are scored too (how harnesses score loglikelihoods).
    logprobs = integer(body, "logprobs")
    echo = flag(body, "echo")
    if logprobs is not None and echo:
        prompt_top = max(logprobs, inp.prompt_logprobs or 0)
        inp = dataclasses.replace(inp, prompt_logprobs=prompt_top)
    inp = dataclasses.replace(inp, logprobs=logprobs)
    prompts = prompts_of(body.get("prompt"))
    inputs = tuple(
        dataclasses.replace(inp, prompt=p)
        if isinstance(p, str)
        else dataclasses.replace(inp, prompt_ids=p)
        for p in prompts
    )
    return _request(body, inputs, echo)


def _request(
    body: Body,
    inputs: tuple[GenerateInput, ...],
    echo: bool = False,
    tools: ToolCalling | None = None,
) -> HttpGenerate:
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options", "must be an object")
    include_usage = bool(options and flag(options, "include_usage", "stream_options."))
    return HttpGenerate(model_of(body), inputs, stream, include_usage, echo, tools)


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
    repetition_penalty = number(body, "repetition_penalty")
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
        n=integer(body, "n") or 1,
        prompt_logprobs=integer(body, "prompt_logprobs"),
        presence_penalty=number(body, "presence_penalty") or 0.0,
        frequency_penalty=number(body, "frequency_penalty") or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        min_p=number(body, "min_p") or 0.0,
        logit_bias=logit_bias(body.get("logit_bias")),
        stop_token_ids=token_ids(body, "stop_token_ids"),
        min_tokens=integer(body, "min_tokens") or 0,
        include_stop_str_in_output=flag(body, "include_stop_str_in_output"),
        constraint=constraint_of(body),
        cache_salt=text(body, "cache_salt") or "",
    )


def constraint_of(body: Body) -> ConstraintSpec | None:
    """The output constraint a request asks for, by OpenAI's `response_format` or vLLM's
    `structured_outputs` (or its older `guided_*` fields): at most one."""
    found = []
    if body.get("response_format") is not None:
        found.append(response_format(body["response_format"]))
    if body.get("structured_outputs") is not None:
        found.append(structured_outputs(body["structured_outputs"], "structured_outputs."))
    guided = {k: body[f"guided_{k}"] for k in STRUCTURED_KINDS if body.get(f"guided_{k}")}
    if guided:
        found.append(structured_outputs(guided, "guided_"))
    specs = [spec for spec in found if spec is not None]
    if len(specs) > 1:
        raise InvalidRequest(specs[1].field, f"only one output constraint: {specs[0].field} too")
    return specs[0] if specs else None


def response_format(value: object) -> ConstraintSpec | None:
    """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object", "", "response_format")
    if kind == "json_schema" and isinstance(value, dict):
        wrapper = value.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema", "must hold a schema object")
        return ConstraintSpec(
            "json_schema", json.dumps(schema), "response_format.json_schema.schema"
        )
    raise InvalidRequest("response_format", "type must be text, json_object or json_schema")


def structured_outputs(value: object, prefix: str) -> ConstraintSpec:
    """vLLM's {"json" | "regex" | "choice" | "grammar" | "json_object": ...}: exactly one."""
    if not isinstance(value, dict):
        raise InvalidRequest(prefix.rstrip("._"), "must be an object")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    if len(given) != 1:
        raise InvalidRequest(
            prefix.rstrip("._"), "give exactly one of json, regex, choice, grammar, json_object"
        )
    ((key, item),) = given.items()
    field = prefix + key
    if key == "json_object" and item is True:
        return ConstraintSpec("json_object", "", field)
    if key == "json" and isinstance(item, dict | str):
        schema = item if isinstance(item, str) else json.dumps(item)
        return ConstraintSpec("json_schema", schema, field)
    if key == "choice" and isinstance(item, list) and all(isinstance(c, str) for c in item):
        return ConstraintSpec("choice", json.dumps(item), field)
    if key in ("regex", "grammar") and isinstance(item, str):
        return ConstraintSpec(STRUCTURED_KINDS[key], item, field)
    raise InvalidRequest(field, f"not a valid {key}: {shown(item)}")


def logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: an object from token ids (as strings: JSON keys) to a bias."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest("logit_bias", "must be an object of token id -> bias")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest("logit_bias", f"{shown(key)} is not a token id") from None
        if not _is_number(bias):
            raise InvalidRequest(f"logit_bias.{key}", f"must be a number, got {shown(bias)}")
        out.append((token, float(bias)))
    return tuple(out)


def token_ids(body: Body, name: str) -> tuple[int, ...]:
    value = _field(body, name, "", lambda v: isinstance(v, list), "a list of token ids")
    if value is None:
        return ()
    if not all(_is_int(t) and t >= 0 for t in value):
        raise InvalidRequest(name, "must be a list of token ids")
    return tuple(value)


def chat_message(index: int, message: object) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(where, "must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str):
        raise InvalidRequest(f"{where}.role", "required: system, user, assistant or tool")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    content = content_text(f"{where}.content", message.get("content"))
    calls = message.get("tool_calls")
    if role == "assistant" and isinstance(calls, list) and calls:
        # An earlier turn's calls, as the model wrote them (a template without tools reads
        # them as text): a JSON list of {"name", "arguments"}.
        written = [c.get("function", {}) for c in calls if isinstance(c, dict)]
        content = (content + "\n" if content else "") + json.dumps(written, ensure_ascii=False)
    return ChatMessage(role=role, content=content)


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


def total_usage(usages: Mapping[tuple[int, int], Usage | None]) -> dict[str, int]:
    """Usage of a request: each prompt once, every sample's tokens; `usages` by (prompt,
    sample)."""
    prompts = {p: u for (p, _), u in usages.items() if u is not None}
    prompt = sum(u.prompt_tokens for u in prompts.values())
    completion = sum(u.completion_tokens for u in usages.values() if u is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in prompts.values())},
    }


class TokenTexts:
    """Token ids -> their text, as log-probabilities show them (cached: a vocabulary's worth at
    most)."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.decode([token_id])
        return text

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids as text (a prompt given as ids, echoed)."""
        return str(self._tokenizer.decode(list(ids)))  # type: ignore[attr-defined]


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(
    logprobs: Sequence[TokenLogprob] | None, texts: Callable[[int], str]
) -> dict[str, Any] | None:
    """A chat choice's `logprobs`: {"content": [a token, its logprob, bytes, top_logprobs]}."""
    if logprobs is None:
        return None
    return {
        "content": [
            _token(texts(lp.token_id), lp.logprob)
            | {"top_logprobs": [_token(texts(t), v) for t, v in lp.top]}
            for lp in logprobs
        ]
    }


def completion_logprobs(
    logprobs: Sequence[TokenLogprob | None],
    texts: Callable[[int], str],
    offset: int = 0,
    first_token: int | None = None,
) -> dict[str, Any]:
    """A completions choice's legacy `logprobs`: tokens, token_logprobs, top_logprobs and
    text_offset, from `offset` characters on. None entries (the first prompt token's, whose
    id is `first_token`) have no log-probability."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        token_id = lp.token_id if lp is not None else first_token
        text = texts(token_id) if token_id is not None else ""
        tokens.append(text)
        values.append(lp.logprob if lp is not None else None)
        tops.append({texts(t): v for t, v in lp.top} if lp is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def prompt_logprobs(
    logprobs: Sequence[TokenLogprob | None] | None, texts: Callable[[int], str]
) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id:
    {"logprob", "decoded_token"}} for the token and its best alternatives."""
    if logprobs is None:
        return None
    out: list[dict[str, Any] | None] = []
    for lp in logprobs:
        if lp is None:
            out.append(None)
            continue
        entries = {**dict(lp.top), lp.token_id: lp.logprob}
        out.append({str(t): {"logprob": v, "decoded_token": texts(t)} for t, v in entries.items()})
    return out


def envelope(kind: str, response_id: str, model: str, system_fingerprint: str) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": system_fingerprint,
    }


def chat_choice(
    index: int, text: str, out: RequestOutput, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,  # vLLM's: the stop string or token id that ended it
    }


def chat_delta(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def text_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


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
