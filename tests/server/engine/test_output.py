"""Incremental detokenization and stop strings: deltas are whole UTF-8, concatenate to the
full text, and never run past a stop string."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loraplex.server.engine.output import OutputProcessor

TEXTS = [
    "Hello, world! This is a plain sentence.",
    "Émojis 🎉🚀 and 日本語のテキスト mixed in.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def run(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str | None, str]:
    processor = OutputProcessor(tokenizer, stop)
    deltas, reason = [], None
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        step = processor.append(token)
        deltas.append(step.delta)
        if step.stop_reason is not None:
            reason = step.stop_reason
            break
    else:
        deltas.append(processor.finish().delta)
    return deltas, reason, processor.text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_text(tokenizer, text):
    deltas, reason, full = run(tokenizer, text)
    assert "".join(deltas) == full == text
    assert reason is None
    for delta in deltas:
        assert "\ufffd" not in delta  # never half a character


@pytest.mark.parametrize(
    ("text", "stop", "expected", "reason"),
    [
        ("The answer is 42. Done.", ("42",), "The answer is ", "42"),
        ("The answer is 42. Done.", (". D", "is"), "The answer ", "is"),  # earliest wins
        ("one\n\ntwo", ("\n\n",), "one", "\n\n"),
        ("no match here", ("xyz",), "no match here", None),
        ("🎉🚀 party", ("🚀",), "🎉", "🚀"),
    ],
)
def test_stop_strings(tokenizer, text, stop, expected, reason):
    deltas, got_reason, full = run(tokenizer, text, stop)
    assert got_reason == reason
    assert full == expected
    assert "".join(deltas) == expected  # held-back text never leaks past the stop


def test_prefix_of_a_stop_string_is_held_back_then_released(tokenizer):
    processor = OutputProcessor(tokenizer, ("STOPNOW",))
    released = ""
    for token in tokenizer("go STOP", add_special_tokens=False).input_ids:
        released += processor.append(token).delta
    assert released == "go "  # "STOP" could still become "STOPNOW"
    assert processor.finish().delta == "STOP"
