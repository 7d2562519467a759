"""Training data: JSONL in three forms, rendered with the base model's chat template, with the
loss on assistant tokens only.

    alpaca              {"instruction": ..., "input": ... (optional), "output": ...}
    prompt/completion   {"prompt": ..., "completion": ...}
    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}

Every form becomes a chat (`messages`); every assistant turn is trained, end-of-turn token
included, so the adapter learns to stop. Exact duplicates are dropped, the rest is split into
train and eval deterministically, and a length report says what truncation cost.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The dataset cannot be trained on as it is; the message says where and why."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class LengthReport:
    examples: int = 0
    duplicates: int = 0
    truncated: int = 0
    dropped_empty: int = 0  # truncation left no trained token
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        if not self.lengths:
            return "no examples"
        ordered = sorted(self.lengths)

        def pct(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return (
            f"{self.examples} examples ({self.duplicates} duplicates dropped), tokens "
            f"min {ordered[0]} p50 {pct(0.5)} p95 {pct(0.95)} max {ordered[-1]}; "
            f"{self.truncated} truncated, {self.dropped_empty} dropped (nothing left to train)"
        )


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """One JSONL record in any supported form, as chat messages (raises DataError)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{where}: message {i} needs a role among {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs a string 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message: nothing to train on")
        return out
    if "instruction" in record and "output" in record:
        user = _text(record, "instruction", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string")
        if extra:
            user = f"{user}\n\n{extra}"
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record, "output", where)},
        ]
    if "prompt" in record and "completion" in record:
        return [
            {"role": "user", "content": _text(record, "prompt", where)},
            {"role": "assistant", "content": _text(record, "completion", where)},
        ]
    raise DataError(
        f"{where}: unknown form (keys {sorted(record)}); expected messages, "
        "instruction/output or prompt/completion"
    )


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string")
    return value


def read_jsonl(path: Path) -> list[list[dict[str, str]]]:
    """Every record of a JSONL file as chat messages; blank lines are skipped."""
    chats = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            chats.append(to_messages(record, where))
    if not chats:
        raise DataError(f"{path} holds no examples")
    return chats


def dedup(chats: list[list[dict[str, str]]]) -> tuple[list[list[dict[str, str]]], int]:
    """Exact duplicates dropped, first occurrence kept; returns (chats, number dropped)."""
    seen: set[str] = set()
    out = []
    for chat in chats:
        key = json.dumps(chat, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(chat)
    return out, len(chats) - len(out)


def split(
    chats: list[list[dict[str, str]]], eval_fraction: float, seed: int
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """(train, eval): a seeded shuffle, at least one eval example when eval_fraction > 0.
    With nothing held out the file's order is kept: the Trainer's seeded sampler shuffles
    anyway, and a plain script given the same file and seed then sees the same batches."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return list(chats), []
    order = list(range(len(chats)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(chats)))
    if n_eval >= len(chats):
        raise DataError(f"{len(chats)} examples are too few for an eval split")
    eval_set = [chats[i] for i in order[:n_eval]]
    train = [chats[i] for i in order[n_eval:]]
    return train, eval_set


def tokenize_chat(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int
) -> TokenizedExample:
    """Render with the chat template; label the tokens of every assistant turn (its end-of-turn
    marker included) and nothing else. Assistant spans are found as character ranges between
    the renders of successive prefixes, then mapped to tokens by their offsets."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(through):
            raise DataError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return TokenizedExample(
        input_ids=ids[:max_length], labels=labels[:max_length], truncated=truncated
    )


def prepare(
    tokenizer: Any,
    chats: list[list[dict[str, str]]],
    max_length: int,
    eos_token_ids: set[int],
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenize a split. Fails loudly when an example trains no token, or when no example
    ever trains an end-of-sequence token (the adapter would never learn to stop)."""
    report = LengthReport()
    out = []
    for chat in chats:
        example = tokenize_chat(tokenizer, chat, max_length)
        report.examples += 1
        report.lengths.append(len(example.input_ids))
        report.truncated += example.truncated
        if example.trained_tokens == 0:
            if not example.truncated:
                raise DataError(f"an example trains no token (its mask is empty): {chat!r}")
            report.dropped_empty += 1
            continue
        out.append(example)
    if not out:
        raise DataError("no example has a token left to train on (raise max_length?)")
    if not any(label in eos_token_ids for e in out for label in e.labels):
        raise DataError(
            "no example trains an end-of-sequence token: check the chat template and max_length"
        )
    log.info("data: %s", report.summary())
    return out, report


def render_marked(tokenizer: Any, example: TokenizedExample) -> str:
    """The example's text with trained tokens between ⟦ and ⟧, for --dry-run."""
    parts = []
    trained = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained:
            parts.append("⟦" if is_trained else "⟧")
            trained = is_trained
        parts.append(tokenizer.decode([token]))
    if trained:
        parts.append("⟧")
    return "".join(parts)
