"""Structured outputs' token masks (server/engine/structured.py) on the embedded tokenizer.

The walks drive matchers the way the engine will: random logits each step, the constrained
rows masked with one apply_masks, the argmax taken and accepted, until the row picks EOS. After
a few free steps the logits favour closing characters (quotes, brackets, separators, EOS) so that
every walk ends within its step bound; the outputs are then checked against the constraint by
an independent checker (jsonschema, re.fullmatch, a small parser).
"""

from __future__ import annotations

import json
import logging
import re
import threading

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from loraplex.core.errors import InvalidRequest
from loraplex.server.engine.structured import (
    MAX_CHOICES,
    MAX_SPEC_BYTES,
    ConstraintSpec,
    GrammarCompiler,
    allocate_bitmask,
    apply_masks,
    bitmask_words,
    fill_masks,
)

PADDING = 70  # logits beyond the tokenizer's vocabulary, as a model padded to a multiple has
FREE_STEPS = 12
MAX_STEPS = 200
SEEDS = 6  # walks per constraint: one batch row each

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["open", "closed", "pending"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "maxItems": 3,
        },
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "status", "tags", "score", "address"],
    "additionalProperties": False,
}
OPTIONAL_SCHEMA = {
    "type": "object",
    "properties": {
        "flag": {"type": "boolean"},
        "count": {"type": "integer"},
        "shape": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                    "required": ["kind", "r"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
                    "required": ["kind", "side"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "additionalProperties": False,
}
ARRAY_SCHEMA = {"type": "array", "items": {"enum": [1, 2, 3, "x"]}, "minItems": 1, "maxItems": 4}
REGEX = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
CHOICES = ["red", "green", "blue", "dark green", "ünïcødé ✓", 'say "hi"\n']
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
GBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""


def arithmetic(text: str) -> bool:
    """Whether `text` is an expression of the arithmetic grammar (recursive descent)."""
    tokens = re.findall(r"[0-9]+|[-+*/()]|.", text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def factor() -> bool:
        nonlocal pos
        token = peek()
        if token is not None and token.isdigit():
            pos += 1
            return True
        if token == "(":
            pos += 1
            if not expr() or peek() != ")":
                return False
            pos += 1
            return True
        return False

    def chain(operand, ops: str) -> bool:
        nonlocal pos
        if not operand():
            return False
        while peek() is not None and peek() in ops:
            pos += 1
            if not operand():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(tokens)


def check_schema(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema) is None


def check_object(text: str) -> bool:
    return isinstance(json.loads(text), dict)


# (id, spec, checker of a finished output)
CASES = [
    (
        "json_schema",
        ConstraintSpec("json_schema", json.dumps(SCHEMA), "response_format.json_schema.schema"),
        check_schema(SCHEMA),
    ),
    (
        "json_schema optional/oneOf",
        ConstraintSpec("json_schema", json.dumps(OPTIONAL_SCHEMA), "structured_outputs.json"),
        check_schema(OPTIONAL_SCHEMA),
    ),
    (
        "json_schema array",
        ConstraintSpec("json_schema", json.dumps(ARRAY_SCHEMA), "structured_outputs.json"),
        check_schema(ARRAY_SCHEMA),
    ),
    ("json_object", ConstraintSpec("json_object", "", "response_format"), check_object),
    (
        "regex",
        ConstraintSpec("regex", REGEX, "structured_outputs.regex"),
        lambda text: re.fullmatch(REGEX, text) is not None,
    ),
    (
        "choice",
        ConstraintSpec("choice", json.dumps(CHOICES), "structured_outputs.choice"),
        lambda text: text in CHOICES,
    ),
    ("grammar lark", ConstraintSpec("grammar", LARK, "structured_outputs.grammar"), arithmetic),
    ("grammar gbnf", ConstraintSpec("grammar", GBNF, "structured_outputs.grammar"), arithmetic),
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    """Over logits wider than the tokenizer's vocabulary: padding tokens exist."""
    return GrammarCompiler(tokenizer, len(tokenizer) + PADDING)


@pytest.fixture(scope="module")
def closing(tokenizer):
    """Tokens made only of characters that close what is open or move past it (quotes,
    brackets, separators), and EOS: favoured after the free steps so that walks end. Not
    digits: a number would grow instead of ending."""
    ids = [
        i
        for i in range(len(tokenizer))
        if (text := tokenizer.decode([i])) and all(c in '"}]),:' for c in text)
    ]
    return torch.tensor([*ids, tokenizer.eos_token_id])


def bits(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bitmask row as one bool per token (reference unpacking, bit by bit)."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask_row.unsqueeze(-1) >> shifts) & 1).flatten()[:vocab_size].bool()


def walk(compiler, tokenizer, closing, specs, seed):
    """One batch of len(specs) rows (None: an unconstrained row, left to the random logits)
    walked to EOS on every constrained row; their outputs' texts. Checks at every step that
    unconstrained rows are untouched and that EOS is allowed exactly when the matcher accepts.
    """
    vocab = compiler.vocab_size
    eos = tokenizer.eos_token_id
    matchers = {i: compiler.compile(s).matcher() for i, s in enumerate(specs) if s is not None}
    bitmask = compiler.allocate_bitmask(len(specs))
    generator = torch.Generator().manual_seed(seed)
    tokens: dict[int, list[int]] = {i: [] for i in matchers}
    running = sorted(matchers)
    for step in range(MAX_STEPS):
        if not running:
            break
        logits = torch.randn(len(specs), vocab, generator=generator)
        if step >= FREE_STEPS:
            logits[:, closing] += 50.0
        others = [r for r in range(len(specs)) if r not in running]
        before = logits[others].clone()
        for row in running:
            matchers[row].fill_mask(bitmask, row)
            eos_allowed = (int(bitmask[row, eos // 32]) >> (eos % 32)) & 1
            assert bool(eos_allowed) == matchers[row].is_accepting
        apply_masks(logits, running, bitmask)
        assert torch.equal(logits[others], before)
        picks = logits.argmax(-1).tolist()
        for row in list(running):
            token = picks[row]
            if token == eos:
                running.remove(row)
                continue
            matchers[row].accept(token)
            assert matchers[row].error is None
            tokens[row].append(token)
    assert not running, f"rows {running} did not end within {MAX_STEPS} steps"
    return {row: tokenizer.decode(ids) for row, ids in tokens.items()}


@pytest.mark.parametrize(("spec", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_walks_satisfy_the_constraint(compiler, tokenizer, closing, spec, check):
    for seed in range(2):
        texts = walk(compiler, tokenizer, closing, [spec] * SEEDS, seed)
        for text in texts.values():
            assert check(text), text


def test_mixed_batch_rows_keep_their_own_constraint(compiler, tokenizer, closing):
    """Different constraints and unconstrained rows in one batch: each constrained row's output
    satisfies its own constraint (walk checks the free rows are untouched at every step)."""
    picked = [CASES[0], CASES[4], CASES[5], CASES[6]]
    specs = [None, picked[0][1], picked[1][1], None, picked[2][1], picked[3][1], None]
    checks = {1: picked[0][2], 2: picked[1][2], 4: picked[2][2], 5: picked[3][2]}
    for seed in range(2):
        texts = walk(compiler, tokenizer, closing, specs, seed)
        assert sorted(texts) == sorted(checks)
        for row, text in texts.items():
            assert checks[row](text), (row, text)


def test_a_rows_mask_does_not_depend_on_its_neighbours(compiler):
    """The same matcher state gives the same mask row whatever the other rows hold, and
    apply_masks gives a row the same logits alone as in a batch."""
    regex = compiler.compile(ConstraintSpec("regex", r"[0-9]{3}", "f")).matcher()
    choice = compiler.compile(ConstraintSpec("choice", '["yes", "no"]', "f")).matcher()
    alone = compiler.allocate_bitmask(1)
    regex.fill_mask(alone, 0)
    batch = compiler.allocate_bitmask(3)
    choice.fill_mask(batch, 0)
    regex.fill_mask(batch, 1)
    choice.fill_mask(batch, 2)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    logits = torch.randn(3, compiler.vocab_size, generator=torch.Generator().manual_seed(0))
    single = logits[1:2].clone()
    apply_masks(single, [0], alone)
    apply_masks(logits, [0, 1, 2], batch)
    assert torch.equal(logits[1:2], single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [3], [1, 2, 3], [4, 0, 2]])
def test_apply_masks_matches_the_bits(rows, dtype):
    """Contiguous, single and scattered rows: every disallowed logit is -inf, every allowed one
    keeps its value, every other row is untouched; logits wider than the bitmask's multiple of
    32 need not be, and narrower ones are cut."""
    vocab = 1000
    generator = torch.Generator().manual_seed(7)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, bitmask_words(vocab)), generator=generator)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(5, vocab, generator=generator).to(dtype)
    expected = logits.clone()
    for row in rows:
        expected[row][~bits(bitmask[row], vocab)] = float("-inf")
    apply_masks(logits, rows, bitmask)
    assert torch.equal(logits, expected)
    apply_masks(logits, torch.tensor(rows), bitmask)  # idempotent, rows as a tensor too
    assert torch.equal(logits, expected)


def test_apply_masks_refuses_logits_wider_than_the_bitmask():
    with pytest.raises(ValueError, match="cannot cover"):
        apply_masks(torch.zeros(1, 65), [0], allocate_bitmask(1, 64))


def test_padding_tokens_are_never_allowed(compiler, tokenizer):
    """Inside a JSON string nearly every token is allowed, never one past the tokenizer's
    vocabulary; apply_masks sets those logits to -inf."""
    matcher = compiler.compile(ConstraintSpec("json_object", "", "f")).matcher()
    for token in tokenizer.encode('{"note": "', add_special_tokens=False):
        matcher.accept(token)
    bitmask = compiler.allocate_bitmask(1)
    matcher.fill_mask(bitmask, 0)
    allowed = bits(bitmask[0], compiler.vocab_size)
    assert allowed[: len(tokenizer)].sum() > len(tokenizer) // 2
    assert not allowed[len(tokenizer) :].any()
    logits = torch.zeros(1, compiler.vocab_size)
    apply_masks(logits, [0], bitmask)
    assert torch.isneginf(logits[0, len(tokenizer) :]).all()


def test_a_finished_constraint_allows_only_eos(compiler, tokenizer):
    matcher = compiler.compile(ConstraintSpec("choice", '["yes", "no"]', "f")).matcher()
    assert not matcher.is_finished
    for token in tokenizer.encode("yes", add_special_tokens=False):
        matcher.accept(token)
    assert matcher.is_finished and matcher.is_accepting
    bitmask = compiler.allocate_bitmask(1)
    matcher.fill_mask(bitmask, 0)
    assert bits(bitmask[0], compiler.vocab_size).nonzero().flatten().tolist() == [
        tokenizer.eos_token_id
    ]


def test_a_token_the_mask_refused_ends_the_output(compiler, tokenizer, caplog):
    matcher = compiler.compile(ConstraintSpec("regex", "[0-9]+", "structured_outputs.regex"))
    matcher = matcher.matcher()
    (letter,) = tokenizer.encode("a", add_special_tokens=False)
    with caplog.at_level(logging.ERROR, logger="loraplex.server.engine.structured"):
        matcher.accept(letter)
    assert matcher.error and matcher.is_finished
    assert "structured_outputs.regex" in caplog.text
    bitmask = compiler.allocate_bitmask(1)
    matcher.fill_mask(bitmask, 0)
    assert bits(bitmask[0], compiler.vocab_size).nonzero().flatten().tolist() == [
        tokenizer.eos_token_id
    ]


def test_fill_masks_equals_fill_mask_per_row(compiler, tokenizer):
    specs = [
        ConstraintSpec(kind, value, "f")
        for _, (kind, value) in enumerate(
            [("json_object", ""), ("regex", REGEX), ("grammar", LARK)]
        )
    ]
    one_by_one = [compiler.compile(s).matcher() for s in specs]
    batched = [compiler.compile(s).matcher() for s in specs]
    for matcher in (one_by_one[0], batched[0]):
        for token in tokenizer.encode('{"a": [1, ', add_special_tokens=False):
            matcher.accept(token)
    expected = compiler.allocate_bitmask(4)
    for row, matcher in zip((3, 0, 1), one_by_one, strict=True):
        matcher.fill_mask(expected, row)
    got = compiler.allocate_bitmask(4)
    fill_masks(got, list(zip(batched, (3, 0, 1), strict=True)))
    assert torch.equal(got[[3, 0, 1]], expected[[3, 0, 1]])


def test_fill_mask_checks_the_buffer(compiler):
    matcher = compiler.compile(ConstraintSpec("regex", "a", "f")).matcher()
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_mask(allocate_bitmask(1, 64), 0)  # too narrow for the vocabulary
    with pytest.raises(IndexError):
        matcher.fill_mask(compiler.allocate_bitmask(2), 2)


INVALID = [
    ("json_schema", "{", "not valid JSON"),
    ("json_schema", "[1]", "must be a JSON object"),
    ("json_schema", '{"type": "foo"}', "foo"),
    ("json_schema", '{"type": "string", "not": {"const": "x"}}', "not"),
    ("json_schema", '{"type": "string", "format": "no-such-format"}', "no-such-format"),
    ("json_schema", '{"$ref": "#/$defs/missing"}', "missing"),
    ("json_schema", '{"type": "string", "pattern": "(a"}', "unclosed group"),
    ("json_schema", "[" * 3000 + "]" * 3000, "nested too deeply"),
    ("regex", "(a", "unclosed group"),
    ("regex", "(?=a)b", "look-around"),
    ("grammar", "start: undefined_rule", "undefined_rule"),
    ("grammar", "root ::= (", ""),
    ("choice", "[1, 2]", "list of strings"),
    ("choice", "[]", "choices"),
    ("choice", "not json", "JSON list"),
]


@pytest.mark.parametrize(("kind", "value", "says"), INVALID)
def test_invalid_specs_are_refused_naming_the_field(compiler, kind, value, says):
    field = f"structured_outputs.{kind}"
    with pytest.raises(InvalidRequest) as caught:
        compiler.compile(ConstraintSpec(kind, value, field))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert says in str(caught.value)


def test_an_unknown_kind_is_refused_naming_the_field():
    with pytest.raises(InvalidRequest) as caught:
        ConstraintSpec("yaml", "a: 1", "structured_outputs")  # type: ignore[arg-type]
    assert caught.value.field == "structured_outputs"


def test_oversized_specs_are_refused(compiler):
    big = json.dumps({"enum": ["x" * 100] * (MAX_SPEC_BYTES // 100)})
    assert len(big) > MAX_SPEC_BYTES
    with pytest.raises(InvalidRequest, match="bytes long") as caught:
        compiler.compile(ConstraintSpec("json_schema", big, "response_format.json_schema"))
    assert caught.value.field == "response_format.json_schema"
    many = json.dumps([f"c{i}" for i in range(MAX_CHOICES + 1)])
    with pytest.raises(InvalidRequest, match="choices"):
        compiler.compile(ConstraintSpec("choice", many, "structured_outputs.choice"))
    compiler.compile(
        ConstraintSpec("choice", json.dumps([f"c{i}" for i in range(MAX_CHOICES)]), "f")
    )


def test_a_grammar_over_the_limits_in_its_first_tokens_is_refused(compiler):
    """Hundreds of optional properties compile, then overflow the parser at the first key:
    the compile's probe refuses them rather than the engine failing mid-output."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}
    with pytest.raises(InvalidRequest, match="limits") as caught:
        compiler.compile(ConstraintSpec("json_schema", json.dumps(schema), "structured_outputs"))
    assert caught.value.field == "structured_outputs"


def test_a_compile_over_the_time_bound_is_refused(tokenizer):
    slow = GrammarCompiler(tokenizer, len(tokenizer), timeout_s=1e-9)
    with pytest.raises(InvalidRequest, match="to compile") as caught:
        slow.compile(ConstraintSpec("regex", "[a-z]+", "structured_outputs.regex"))
    assert caught.value.field == "structured_outputs.regex"


def test_the_cache_returns_one_object_per_spec(tokenizer, monkeypatch):
    cache = GrammarCompiler(tokenizer, len(tokenizer), cache_size=2)
    compiles = []
    real = cache._compile
    monkeypatch.setattr(cache, "_compile", lambda spec: compiles.append(spec) or real(spec))
    a = ConstraintSpec("regex", "[a-z]+", "structured_outputs.regex")
    first = cache.compile(a)
    assert cache.compile(a) is first
    # Same kind and value from another field: the same compiled object.
    assert cache.compile(ConstraintSpec("regex", "[a-z]+", "response_format")) is first
    # A refused spec is remembered, and raised naming the field of each request.
    bad = ConstraintSpec("regex", "(a", "one.field")
    for field in ("one.field", "another.field"):
        with pytest.raises(InvalidRequest) as caught:
            cache.compile(ConstraintSpec(bad.kind, bad.value, field))
        assert caught.value.field == field
    assert len(compiles) == 2
    assert cache.cached() == 2
    # Least recently used first out: a third spec evicts `a`, whose next compile is new.
    cache.compile(ConstraintSpec("regex", "[0-9]+", "f"))
    assert cache.cached() == 2
    again = cache.compile(a)
    assert again is not first and len(compiles) == 4
    # Matchers from one compiled constraint are independent.
    one, two = again.matcher(), again.matcher()
    one.accept(tokenizer.encode("abc", add_special_tokens=False)[0])
    assert one.is_accepting and not two.is_accepting


def test_concurrent_compiles_of_one_spec_give_one_object(tokenizer):
    cache = GrammarCompiler(tokenizer, len(tokenizer))
    spec = ConstraintSpec("json_schema", json.dumps(SCHEMA), "f")
    results: list[object] = []
    barrier = threading.Barrier(6)

    def compile_one() -> None:
        barrier.wait()
        results.append(cache.compile(spec))

    threads = [threading.Thread(target=compile_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and all(r is results[0] for r in results)


def test_the_compiler_takes_the_engines_eos_ids(tokenizer):
    """Every EOS id the engine stops on is allowed once the output is complete."""
    extra = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    both = GrammarCompiler(tokenizer, len(tokenizer), eos_token_ids=[tokenizer.eos_token_id, extra])
    matcher = both.compile(ConstraintSpec("regex", "ok", "f")).matcher()
    for token in tokenizer.encode("ok", add_special_tokens=False):
        matcher.accept(token)
    bitmask = both.allocate_bitmask(1)
    matcher.fill_mask(bitmask, 0)
    assert bits(bitmask[0], both.vocab_size).nonzero().flatten().tolist() == sorted(
        [tokenizer.eos_token_id, extra]
    )


def test_a_vocabulary_wider_than_the_logits_is_refused(tokenizer):
    with pytest.raises(ValueError, match="more than the model's"):
        GrammarCompiler(tokenizer, len(tokenizer) - 1)
