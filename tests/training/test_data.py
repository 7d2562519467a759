"""Training data: the three JSONL forms, assistant-only labels, and loud failures."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from loraplex.training.data import (
    IGNORE_INDEX,
    DataError,
    dedup,
    prepare,
    read_jsonl,
    render_marked,
    split,
    to_messages,
    tokenize_chat,
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def eos_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_every_form_becomes_a_chat(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"prompt": "Capital of France?", "completion": "Paris"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    chats = read_jsonl(path)
    assert chats[0] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert chats[1][1] == {"role": "assistant", "content": "Paris"}
    assert chats[2][0]["role"] == "user"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "JSON object"),
        ({"text": "x"}, "unknown form"),
        ({"prompt": "", "completion": "x"}, "non-empty"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ],
)
def test_bad_records_name_the_line_and_the_problem(record, message):
    with pytest.raises(DataError, match=message) as err:
        to_messages(record, "data.jsonl:7")
    assert "data.jsonl:7" in str(err.value)


def test_invalid_json_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_jsonl(path)


def test_only_assistant_turns_and_their_end_of_turn_are_trained(tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    example = tokenize_chat(tokenizer, chat, max_length=512)
    pairs = list(zip(example.input_ids, example.labels, strict=True))
    trained = [t for t, label in pairs if label != IGNORE_INDEX]
    text = tokenizer.decode(trained)
    assert "Paris." in text and "Rome." in text
    assert "France" not in text and "Italy" not in text and "brief" not in text
    assert text.count("<|im_end|>") == 2  # each answer learns to stop
    assert all(label in (IGNORE_INDEX, t) for t, label in pairs)
    marked = render_marked(tokenizer, example)
    assert "⟦" in marked and marked.count("⟦") == marked.count("⟧") == 2


def test_prepare_reports_lengths_and_drops_what_truncation_emptied(tokenizer):
    long_user = {"role": "user", "content": "word " * 200}
    chats = [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [long_user, {"role": "assistant", "content": "ok"}],  # its answer is cut off
    ]
    examples, report = prepare(tokenizer, chats, max_length=64, eos_token_ids=eos_ids(tokenizer))
    assert len(examples) == 1 and report.truncated == 1 and report.dropped_empty == 1
    assert "1 truncated" in report.summary()


def test_prepare_fails_loudly_when_no_end_of_sequence_is_trained(tokenizer):
    chats = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4 " * 40}]]
    with pytest.raises(DataError, match="end-of-sequence"):
        prepare(tokenizer, chats, max_length=40, eos_token_ids=eos_ids(tokenizer))


def test_dedup_and_a_seeded_split():
    chats = [
        [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]
        for i in range(10)
    ]
    unique, dropped = dedup(chats + chats[:3])
    assert dropped == 3 and unique == chats
    train, held_out = split(unique, 0.2, seed=1)
    assert len(held_out) == 2 and len(train) == 8
    assert split(unique, 0.2, seed=1) == (train, held_out)
    assert {json.dumps(c) for c in train}.isdisjoint({json.dumps(c) for c in held_out})
    with pytest.raises(DataError):
        split(unique[:1], 0.5, seed=0)
