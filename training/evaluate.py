"""Generation-based evaluation on the held-out split: the base model and the adapter answer
the same prompts (greedy), and each answer is scored against the reference:

    exact      the answer equals the reference (surrounding whitespace ignored)
    contains   the reference appears in the answer
    json       the answer is a JSON object holding every required key (json_keys), and, when
               the reference is JSON too, the same values for them
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Metric = Literal["exact", "contains", "json"]
METRICS: tuple[Metric, ...] = ("exact", "contains", "json")


@dataclass(frozen=True)
class Scorer:
    metric: Metric = "exact"
    json_keys: tuple[str, ...] = ()

    def __call__(self, answer: str, reference: str) -> float:
        answer, reference = answer.strip(), reference.strip()
        if self.metric == "exact":
            return float(answer == reference)
        if self.metric == "contains":
            return float(reference in answer)
        try:
            got = json.loads(answer)
        except json.JSONDecodeError:
            return 0.0
        if not isinstance(got, dict) or any(k not in got for k in self.json_keys):
            return 0.0
        try:
            want = json.loads(reference)
        except json.JSONDecodeError:
            return 1.0  # valid, with the keys: all that can be checked
        if not isinstance(want, dict):
            return 1.0
        keys = self.json_keys or tuple(want)
        return float(all(got.get(k) == want.get(k) for k in keys))


@dataclass
class Scores:
    base: list[float] = field(default_factory=list)
    adapter: list[float] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)  # a few, for the report

    @property
    def base_mean(self) -> float:
        return sum(self.base) / len(self.base) if self.base else 0.0

    @property
    def adapter_mean(self) -> float:
        return sum(self.adapter) / len(self.adapter) if self.adapter else 0.0


def split_for_generation(chat: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the conversation up to its last assistant turn, that turn's text: the reference)."""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    return chat[:last], chat[last]["content"]


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch: int
) -> list[str]:
    """Greedy answers to chat prompts, in left-padded batches."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def score_base_and_adapter(
    model: Any,
    tokenizer: Any,
    chats: list[list[dict[str, str]]],
    scorer: Scorer,
    max_new_tokens: int,
    batch: int = 8,
    keep_samples: int = 5,
) -> Scores:
    """Both sides on the same prompts: the PEFT model with its adapter disabled, then on."""
    prompts, references = zip(*(split_for_generation(c) for c in chats), strict=True)
    model.eval()
    with _adapter_disabled(model):
        base = generate(model, tokenizer, list(prompts), max_new_tokens, batch)
    tuned = generate(model, tokenizer, list(prompts), max_new_tokens, batch)
    scores = Scores(
        base=[scorer(a, r) for a, r in zip(base, references, strict=True)],
        adapter=[scorer(a, r) for a, r in zip(tuned, references, strict=True)],
    )
    for p, r, b, t in list(zip(prompts, references, base, tuned, strict=True))[:keep_samples]:
        scores.samples.append({"prompt": p[-1]["content"], "reference": r, "base": b, "adapter": t})
    log.info(
        "held-out %s score: base %.3f, adapter %.3f (%d examples)",
        scorer.metric,
        scores.base_mean,
        scores.adapter_mean,
        len(chats),
    )
    return scores


@contextlib.contextmanager
def _adapter_disabled(model: Any) -> Iterator[None]:
    with model.disable_adapter():
        yield
