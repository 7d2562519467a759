"""EleutherAI's evaluation harness, unmodified, against the shared server: its `local-completions`
model scores a small local multiple-choice task through /v1/completions (prompts as token ids,
`echo` with `logprobs`), and each choice's loglikelihood is PEFT's, computed directly on the same
adapter, within bf16 noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.integration

ADAPTER = "all-r16"
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "purple"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("Water freezes at zero degrees", ["Fahrenheit", "Kelvin", "Celsius"], 2),
    ("The opposite of hot is", ["cold", "loud", "tall"], 0),
    ("A week has seven", ["months", "days", "years"], 1),
    ("Paris is the capital of", ["Spain", "Italy", "France"], 2),
]
TASK = """task: loraplex_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
# Per choice, summed over its tokens (bf16 NF4 against float32): within LL_MAX_ATOL, and on
# average within NOISE_FACTOR times PEFT's own bf16 forward's distance (plus a floor).
LL_MAX_ATOL = 2.0
NOISE_FACTOR, NOISE_FLOOR = 2.0, 0.1


def loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """PEFT's log-probability of `continuation` after `context` (the adapter set)."""
    with torch.inference_mode():
        logits = model(torch.tensor([context + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[len(context) + i - 1, token].item() for i, token in enumerate(continuation))


def test_lm_eval_scores_choices_as_peft(
    server, registered, peft_reference, peft_float32, tokenizer_dir, tmp_path, monkeypatch
):
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    lm = LocalCompletionsAPI(
        model=ADAPTER,
        base_url=server.http_url + "/completions",
        tokenizer_backend="huggingface",
        tokenizer=str(tokenizer_dir),
        tokenized_requests=True,
        max_retries=1,
    )
    results = simple_evaluate(
        model=lm,
        tasks=["loraplex_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    assert results is not None
    samples = sorted(results["samples"]["loraplex_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    model, _, _ = peft_reference
    model.set_adapter(ADAPTER)
    peft_float32.set_adapter(ADAPTER)
    ours, bf16, exact = [], [], []
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ctx, cont = lm._encode_pair(context, continuation)
            ours.append(resp[0][0])
            bf16.append(loglikelihood(model, ctx, cont))
            exact.append(loglikelihood(peft_float32, ctx, cont))
    assert all(math.isfinite(x) and x < 0 for x in ours)
    err = (torch.tensor(ours) - torch.tensor(exact)).abs()
    noise = (torch.tensor(bf16) - torch.tensor(exact)).abs().mean().item()
    assert err.max() <= LL_MAX_ATOL, err
    assert err.mean() <= NOISE_FACTOR * noise + NOISE_FLOOR, (err.mean(), noise)
    accuracy = results["results"]["loraplex_mc"]["acc,none"]
    best = [
        max(range(len(c)), key=lambda i, s=s: s[i])
        for c, s in zip(
            (c for _, c, _ in QUESTIONS),
            _split(exact, [len(c) for _, c, _ in QUESTIONS]),
            strict=True,
        )
    ]
    exact_accuracy = sum(b == a for b, (_, _, a) in zip(best, QUESTIONS, strict=True))
    assert abs(accuracy * len(QUESTIONS) - exact_accuracy) <= 1  # a near tie may flip one


def _split(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for size in sizes:
        out.append(values[start : start + size])
        start += size
    return out
