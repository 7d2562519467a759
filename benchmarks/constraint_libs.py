"""Constraint libraries for structured outputs, measured on the embedded model's tokenizer.

For llguidance, xgrammar and outlines-core (one not installed is skipped, with a message; `pip
install llguidance xgrammar outlines-core`), and for loraplex's own module over its library
(loraplex.server.engine.structured), each in a fresh process, on SmolLM2's 49,152-token vocabulary:

    setup       the tokenizer/vocabulary set-up (once per server)
    compile     each case compiled (median of --repeats, caches off): six JSON schemas (flat,
                nested, enums, arrays, anyOf/oneOf, patterns and formats), any JSON object, a
                regex, a choice list, a Lark grammar; and the first mask of a fresh matcher
    masks       per-token mask computation (fill one bitmask row) and token acceptance over a
                forced valid output of every case (a few hundred tokens, --repeats times, fresh
                matchers each time): p50 and p99; and whether every forced token was allowed
                and EOS allowed exactly at the end
    batch fill  16 rows' masks in one call (the library's parallel API) against a loop
    apply       the library's own kernel that sets disallowed logits to -inf in a (B, 49152)
                float32 tensor (median of 50), for all rows and for 8 of 64 rows where it can
    features    which kinds compile, and what an invalid or unsupported input does (refused
                with a message, or accepted)
    limits      pathological inputs (a 5,000-value enum, deep nesting, 1,000 optional
                properties, exponential regexes, huge repetition counts), each in a process of
                its own with --timeout seconds and an 8 GiB address-space limit: compile plus
                first mask, or what stopped it

The machine is shared (2 cores here): quote medians and ratios between libraries measured in
the same run.

    python benchmarks/constraint_libs.py [--repeats 3] [--timeout 60] [--libs a,b]
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    add_common_args,
    format_table,
    make_parser,
    percentile,
    publish,
    run_main,
    setup_logging,
)

log = logging.getLogger("benchmark")

LIBRARIES = ("llguidance", "xgrammar", "outlines-core", "loraplex")
# What each needs importable; loraplex's module runs on llguidance.
IMPORTS = {
    "llguidance": "llguidance",
    "xgrammar": "xgrammar",
    "outlines-core": "outlines_core",
    "loraplex": "llguidance",
}
MEMORY_LIMIT = 8 << 30  # bytes of address space for a pathological case's process


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # json_schema, json_object, regex, choice, grammar
    value: str
    instance: str  # a valid output, forced token by token


def _schema(schema: dict) -> str:
    return json.dumps(schema)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""

CASES = (
    Case(
        "flat object",
        "json_schema",
        _schema(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"},
                    "email": {"type": "string", "format": "email"},
                    "active": {"type": "boolean"},
                    "score": {"type": "number"},
                },
                "required": ["name", "age", "email", "active", "score"],
                "additionalProperties": False,
            }
        ),
        _compact(
            {
                "name": "Ada Lovelace",
                "age": 36,
                "email": "ada@example.com",
                "active": True,
                "score": 97.5,
            }
        ),
    ),
    Case(
        "nested",
        "json_schema",
        _schema(
            {
                "type": "object",
                "properties": {
                    "person": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "address": {
                                "type": "object",
                                "properties": {
                                    "street": {"type": "string"},
                                    "city": {"type": "string"},
                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                },
                                "required": ["street", "city", "zip"],
                                "additionalProperties": False,
                            },
                        },
                        "required": ["name", "address"],
                        "additionalProperties": False,
                    },
                    "notes": {"type": "string"},
                },
                "required": ["person", "notes"],
                "additionalProperties": False,
            }
        ),
        _compact(
            {
                "person": {
                    "name": "Grace Hopper",
                    "address": {"street": "1 Navy Yard Road", "city": "Arlington", "zip": "22202"},
                },
                "notes": "Wrote the first compiler and found a moth in a relay.",
            }
        ),
    ),
    Case(
        "enums",
        "json_schema",
        _schema(
            {
                "type": "object",
                "properties": {
                    "status": {"enum": ["open", "closed", "pending", "escalated"]},
                    "priority": {"enum": [1, 2, 3, 4]},
                    "category": {"const": "ticket"},
                    "labels": {
                        "type": "array",
                        "items": {"enum": ["billing", "login", "bug", "feature", "urgent"]},
                    },
                },
                "required": ["status", "priority", "category", "labels"],
                "additionalProperties": False,
            }
        ),
        _compact(
            {
                "status": "escalated",
                "priority": 2,
                "category": "ticket",
                "labels": ["billing", "urgent", "login", "bug"],
            }
        ),
    ),
    Case(
        "arrays",
        "json_schema",
        _schema(
            {
                "type": "object",
                "properties": {
                    "points": {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                        "minItems": 1,
                        "maxItems": 32,
                    },
                    "names": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                },
                "required": ["points", "names"],
                "additionalProperties": False,
            }
        ),
        _compact(
            {
                "points": [[i * 1.5, -i * 2.25] for i in range(12)],
                "names": ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"],
            }
        ),
    ),
    Case(
        "anyOf/oneOf",
        "json_schema",
        _schema(
            {
                "type": "object",
                "properties": {
                    "value": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
                    "shape": {
                        "oneOf": [
                            {
                                "type": "object",
                                "properties": {
                                    "kind": {"const": "circle"},
                                    "radius": {"type": "number"},
                                },
                                "required": ["kind", "radius"],
                                "additionalProperties": False,
                            },
                            {
                                "type": "object",
                                "properties": {
                                    "kind": {"const": "square"},
                                    "side": {"type": "number"},
                                },
                                "required": ["kind", "side"],
                                "additionalProperties": False,
                            },
                        ]
                    },
                },
                "required": ["value", "shape"],
                "additionalProperties": False,
            }
        ),
        _compact({"value": 42.5, "shape": {"kind": "square", "side": 3}}),
    ),
    Case(
        "patterns",
        "json_schema",
        _schema(
            {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,15}$"},
                    "date": {"type": "string", "format": "date"},
                    "id": {"type": "string", "format": "uuid"},
                    "slug": {"type": "string", "minLength": 3, "maxLength": 24},
                },
                "required": ["sku", "phone", "date", "id", "slug"],
                "additionalProperties": False,
            }
        ),
        _compact(
            {
                "sku": "ABC-1234",
                "phone": "+441632960961",
                "date": "2024-02-29",
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "slug": "structured-outputs",
            }
        ),
    ),
    Case(
        "json object",
        "json_object",
        "",
        _compact({"reply": "yes", "confidence": 0.9, "reasons": ["short", "clear"], "n": None}),
    ),
    Case(
        "regex",
        "regex",
        r"[0-9]{4}-[0-9]{2}-[0-9]{2} (INFO|WARN|ERROR) [a-z_]+: [A-Za-z ,.]{1,80}",
        "2024-05-17 WARN disk_monitor: Volume nearly full, cleaning old logs.",
    ),
    Case(
        "choice",
        "choice",
        json.dumps(["positive", "negative", "neutral", "mixed", "not applicable"]),
        "not applicable",
    ),
    Case("lark grammar", "grammar", ARITHMETIC, "(12+7)*3-4/(2+1)*15+((8-3)*2)"),
)

INVALID = (
    ("invalid type", "json_schema", _schema({"type": "foo"})),
    ("dangling $ref", "json_schema", _schema({"$ref": "#/$defs/missing"})),
    ("unsupported keyword", "json_schema", _schema({"type": "string", "not": {"const": "x"}})),
    ("unknown format", "json_schema", _schema({"type": "string", "format": "no-such-format"})),
    ("bad pattern", "json_schema", _schema({"type": "string", "pattern": "(a"})),
    ("bad regex", "regex", "(a"),
    ("lookahead regex", "regex", "(?=a)b"),
    ("bad Lark", "grammar", "start: undefined_rule"),
)


def _deep_schema(depth: int) -> str:
    # Built as text: json.dumps recurses once per level.
    head = '{"type":"object","properties":{"a":'
    tail = '},"required":["a"]}'
    return head * depth + '{"type":"integer"}' + tail * depth


PATHOLOGICAL = (
    ("enum of 5,000 strings", "json_schema", _schema({"enum": [f"v{i:05d}" for i in range(5000)]})),
    ("objects nested 60 deep", "json_schema", _deep_schema(60)),
    ("objects nested 1,000 deep", "json_schema", _deep_schema(1000)),
    (
        "1,000 optional properties",
        "json_schema",
        _schema(
            {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}}
        ),
    ),
    (
        "array minItems 5,000",
        "json_schema",
        _schema({"type": "array", "items": {"type": "integer"}, "minItems": 5000}),
    ),
    ("string maxLength 50,000", "json_schema", _schema({"type": "string", "maxLength": 50000})),
    ("regex (a|b)*a(a|b){24}", "regex", "(a|b)*a(a|b){24}"),
    ("regex (a{1,100}){1,100}", "regex", "(a{1,100}){1,100}"),
    ("regex [a-z]{1,60000}", "regex", "[a-z]{1,60000}"),
)


# -- the libraries -------------------------------------------------------------------------------
class Unsupported(Exception):
    """The library has no such kind of constraint."""


def _apply_rows(kernel: Any, logits: Any, bitmask: Any, rows: list[int] | None) -> None:
    """A whole-batch kernel on some rows only: on their copy, then written back."""
    import torch

    if rows is None:
        kernel(logits, bitmask)
        return
    index = torch.tensor(rows)
    chosen = logits.index_select(0, index)
    kernel(chosen, bitmask.index_select(0, index))
    logits.index_copy_(0, index, chosen)


class Llguidance:
    """llguidance with its defaults (flexible JSON whitespace); a matcher per compile, copied
    for each sequence as loraplex does."""

    def setup(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        from copy import copy

        import llguidance

        backend = copy(tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        self.llg = llguidance
        self.tok = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)

    def compile(self, kind: str, value: str) -> Any:
        llg = self.llg
        if kind == "json_object":
            grammar = llg.grammar_from("json_schema", '{"type": "object"}')
        elif kind == "grammar":
            grammar = llg.grammar_from("lark", value)
        else:
            grammar = llg.grammar_from(kind, value)
        matcher = llg.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        target = bitmask[row]
        matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def error(self, matcher: Any) -> str | None:
        return matcher.get_error() if matcher.is_error() else None

    def fill_batch(self, pairs: list[tuple[Any, int]], bitmask: Any) -> None:
        if not hasattr(self, "executor"):
            self.executor = self.llg.LLExecutor()
        from llguidance.torch import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def apply(self, logits: Any, bitmask: Any, rows: list[int] | None) -> None:
        from llguidance.torch import apply_token_bitmask_inplace

        _apply_rows(apply_token_bitmask_inplace, logits, bitmask, rows)

    apply_name = "llguidance.torch (torch.compile)"


class Xgrammar:
    """xgrammar with its defaults (any whitespace, strict mode), its compile cache off so that
    every compile is measured."""

    def setup(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[eos]
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, kind: str, value: str) -> Any:
        c = self.compiler
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}')
        if kind == "json_schema":
            return c.compile_json_schema(value)
        if kind == "regex":
            return c.compile_regex(value)
        if kind == "choice":
            return c.compile_lark("start: " + " | ".join(json.dumps(x) for x in json.loads(value)))
        return c.compile_lark(value)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def error(self, matcher: Any) -> str | None:
        return None

    def fill_batch(self, pairs: list[tuple[Any, int]], bitmask: Any) -> None:
        if not hasattr(self, "batch"):
            self.batch = self.xgr.BatchGrammarMatcher(max_threads=2)
        self.batch.batch_fill_next_token_bitmask(
            [m for m, _ in pairs], bitmask, indices=[r for _, r in pairs]
        )

    def apply(self, logits: Any, bitmask: Any, rows: list[int] | None) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

    apply_name = "xgrammar (native CPU kernel)"


_GPT2_PRINTABLE = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("\xa1"), ord("\xac") + 1))
    + list(range(ord("\xae"), ord("\xff") + 1))
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a BPE token uses for each byte."""
    chars = list(_GPT2_PRINTABLE)
    bytes_ = list(_GPT2_PRINTABLE)
    extra = 0
    for b in range(256):
        if b not in bytes_:
            bytes_.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bytes_, chars, strict=True)}


_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


class OutlinesCore:
    """outlines-core: a DFA index per regex (JSON schemas through its regex translation); no
    grammars. Its vocabulary is built from the tokenizer's byte-level tokens."""

    def setup(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        import outlines_core

        self.oc = outlines_core
        decoder = _byte_decoder()
        special = set(tokenizer.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for text, token in tokenizer.get_vocab().items():
            if token in special:
                continue
            try:
                raw = bytes(decoder[c] for c in text)
            except KeyError:  # an added token, not byte-level
                raw = text.encode()
            tokens.setdefault(raw, []).append(token)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, kind: str, value: str) -> Any:
        oc = self.oc
        if kind == "grammar":
            raise Unsupported("no context-free grammars")
        if kind == "json_object":
            regex = oc.json_schema.build_regex_from_schema('{"type": "object"}')
        elif kind == "json_schema":
            regex = oc.json_schema.build_regex_from_schema(value)
        elif kind == "choice":
            regex = "|".join(
                "".join("\\" + c if c in _REGEX_META else c for c in x) for x in json.loads(value)
            )
        else:
            regex = value
        return oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        target = bitmask[row]
        matcher.write_mask_into(target.data_ptr(), target.numel(), 4)

    def accept(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def error(self, matcher: Any) -> str | None:
        return None

    def apply(self, logits: Any, bitmask: Any, rows: list[int] | None) -> None:
        from outlines_core.kernels.torch import apply_token_bitmask_inplace

        _apply_rows(apply_token_bitmask_inplace, logits, bitmask, rows)

    apply_name = "outlines_core.kernels.torch (torch.compile)"


class Loraplex:
    """loraplex.server.engine.structured over llguidance: its JSON options (whitespace runs of
    at most 64), its first mask computed at compile time, its vectorized apply_masks."""

    def setup(self, tokenizer: Any, vocab_size: int, eos: int) -> None:
        from loraplex.server.engine import structured

        self.st = structured
        self.compiler = structured.GrammarCompiler(tokenizer, vocab_size, eos_token_ids=[eos])

    def compile(self, kind: str, value: str) -> Any:
        self.compiler.clear_cache()  # every compile measured, as with the libraries' own
        return self.compiler.compile(self.st.ConstraintSpec(kind, value, "bench"))  # type: ignore[arg-type]

    def matcher(self, compiled: Any) -> Any:
        return compiled.matcher()

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_mask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        matcher.accept(token)
        return matcher.error is None

    def error(self, matcher: Any) -> str | None:
        return matcher.error

    def fill_batch(self, pairs: list[tuple[Any, int]], bitmask: Any) -> None:
        self.st.fill_masks(bitmask, pairs)

    def apply(self, logits: Any, bitmask: Any, rows: list[int] | None) -> None:
        self.st.apply_masks(logits, range(logits.shape[0]) if rows is None else rows, bitmask)

    apply_name = "loraplex apply_masks (torch, vectorized)"


BACKENDS = {
    "llguidance": Llguidance,
    "xgrammar": Xgrammar,
    "outlines-core": OutlinesCore,
    "loraplex": Loraplex,
}


def _tokenizer(home: str) -> Any:
    from transformers import AutoTokenizer

    from loraplex.core.model import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(Path(home).expanduser()))


def _bits(bitmask_row: Any, vocab_size: int) -> Any:
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask_row.unsqueeze(-1) >> shifts) & 1).flatten()[:vocab_size].bool()


def _ms(seconds: float) -> float:
    return seconds * 1e3


# -- one library, in a child process -------------------------------------------------------------
def measure_library(lib: str, home: str, repeats: int) -> dict[str, Any]:
    """Everything but the pathological cases, for one library, in this (fresh) process."""
    import torch

    logging.getLogger().setLevel(logging.WARNING)  # loraplex's module logs each compile
    tokenizer = _tokenizer(home)
    vocab_size = len(tokenizer)
    eos = int(tokenizer.eos_token_id)
    backend = BACKENDS[lib]()
    started = time.perf_counter()
    backend.setup(tokenizer, vocab_size, eos)
    result: dict[str, Any] = {
        "library": lib,
        "version": importlib.metadata.version(IMPORTS[lib] if lib != "loraplex" else "llguidance"),
        "setup_s": time.perf_counter() - started,
        "vocab_size": vocab_size,
    }
    bitmask = torch.full((64, (vocab_size + 31) // 32), -1, dtype=torch.int32)

    # Compile each case, then one first mask on a fresh matcher.
    compiled: dict[str, Any] = {}
    cases: dict[str, Any] = {}
    for case in CASES:
        times, first = [], []
        try:
            for _ in range(repeats):
                started = time.perf_counter()
                c = backend.compile(case.kind, case.value)
                times.append(time.perf_counter() - started)
                matcher = backend.matcher(c)
                started = time.perf_counter()
                backend.fill(matcher, bitmask, 0)
                first.append(time.perf_counter() - started)
        except Unsupported as exc:
            cases[case.name] = {"supported": False, "error": str(exc)}
            continue
        except Exception as exc:  # a library's own error type: what it said is the result
            cases[case.name] = {"supported": True, "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        compiled[case.name] = c
        cases[case.name] = {
            "supported": True,
            "compile_ms": _ms(statistics.median(times)),
            "first_mask_ms": _ms(statistics.median(first)),
        }

    # Per-token masks over each case's forced valid output, fresh matchers each repeat.
    fill_s: list[float] = []
    accept_s: list[float] = []
    for case in CASES:
        if case.name not in compiled:
            continue
        tokens = tokenizer.encode(case.instance, add_special_tokens=False)
        outcome = "ok"
        for _ in range(repeats):
            matcher = backend.matcher(compiled[case.name])
            for token in [*tokens, eos]:
                started = time.perf_counter()
                backend.fill(matcher, bitmask, 0)
                fill_s.append(time.perf_counter() - started)
                allowed = _bits(bitmask[0], vocab_size)
                eos_allowed = bool(allowed[eos])
                if token == eos:
                    if not eos_allowed:
                        outcome = "EOS not allowed at the end"
                    break
                if eos_allowed and allowed.sum() == 1:
                    outcome = "only EOS allowed before the end"
                    break
                if not allowed[token]:
                    outcome = f"token {token} ({tokenizer.decode([token])!r}) not allowed"
                    break
                started = time.perf_counter()
                ok = backend.accept(matcher, token)
                accept_s.append(time.perf_counter() - started)
                if not ok:
                    outcome = f"token {token} refused: {backend.error(matcher)}"
                    break
        cases[case.name]["tokens"] = len(tokens)
        cases[case.name]["forced_output"] = outcome
    result["cases"] = cases
    result["mask_us"] = {
        "steps": len(fill_s),
        "p50": percentile(fill_s, 50) * 1e6 if fill_s else None,
        "p99": percentile(fill_s, 99) * 1e6 if fill_s else None,
        "max": max(fill_s) * 1e6 if fill_s else None,
    }
    result["accept_us_p50"] = percentile(accept_s, 50) * 1e6 if accept_s else None

    # 16 rows of the nested schema, a few tokens in: one batch call against a loop.
    if "nested" in compiled and hasattr(backend, "fill_batch"):
        prefix = tokenizer.encode('{"person":{"name":"', add_special_tokens=False)
        matchers = []
        for _ in range(16):
            m = backend.matcher(compiled["nested"])
            for t in prefix:
                backend.accept(m, t)
            matchers.append(m)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        loop, batch = [], []
        for _ in range(20):
            started = time.perf_counter()
            for m, i in pairs:
                backend.fill(m, bitmask, i)
            loop.append(time.perf_counter() - started)
            started = time.perf_counter()
            backend.fill_batch(pairs, bitmask)
            batch.append(time.perf_counter() - started)
        result["fill_16_rows_ms"] = {
            "loop": _ms(statistics.median(loop)),
            "batch": _ms(statistics.median(batch)),
        }

    # The library's kernel applying masks to (B, V) float32 logits.
    apply: dict[str, Any] = {"implementation": backend.apply_name}
    generator = torch.Generator().manual_seed(0)
    for batch_size, rows in ((1, None), (16, None), (64, None), (64, list(range(0, 64, 8)))):
        logits = torch.randn(batch_size, vocab_size, generator=generator)
        masks = torch.randint(
            -(2**31), 2**31 - 1, (batch_size, bitmask.shape[1]), dtype=torch.int32
        )
        label = f"B={batch_size}, " + ("all rows" if rows is None else f"{len(rows)} rows")
        try:
            work = logits.clone()
            started = time.perf_counter()
            backend.apply(work, masks, rows)  # a torch.compile kernel compiles here
            warmup = time.perf_counter() - started
            times = []
            for _ in range(50):
                work = logits.clone()
                started = time.perf_counter()
                backend.apply(work, masks, rows)
                times.append(time.perf_counter() - started)
            apply[label] = {"ms": _ms(statistics.median(times)), "first_call_s": warmup}
        except Exception as exc:
            apply[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result["apply"] = apply

    # Invalid and unsupported input: refused (with what message) or accepted.
    invalid: dict[str, Any] = {}
    for name, kind, value in INVALID:
        try:
            c = backend.compile(kind, value)
            m = backend.matcher(c)
            backend.fill(m, bitmask, 0)
            error = backend.error(m)
            invalid[name] = {"refused": error is not None, "message": error}
        except Unsupported as exc:
            invalid[name] = {"refused": None, "message": str(exc)}
        except Exception as exc:
            invalid[name] = {"refused": True, "message": f"{type(exc).__name__}: {exc}"[:300]}
    result["invalid"] = invalid
    return result


def measure_pathological(lib: str, home: str, kind: str, value: str) -> dict[str, Any]:
    """One pathological input: compile plus a first mask, in this (fresh) process."""
    import torch

    logging.getLogger().setLevel(logging.WARNING)
    tokenizer = _tokenizer(home)
    vocab_size = len(tokenizer)
    backend = BACKENDS[lib]()
    backend.setup(tokenizer, vocab_size, int(tokenizer.eos_token_id))
    bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    started = time.perf_counter()
    try:
        c = backend.compile(kind, value)
        m = backend.matcher(c)
        backend.fill(m, bitmask, 0)
        error = backend.error(m)
    except Unsupported as exc:
        return {"outcome": "unsupported", "message": str(exc)}
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    if error is not None:
        return {"outcome": "refused", "s": seconds, "message": error[:300]}
    return {"outcome": "compiled", "s": seconds}


def _isolated_child(conn: Any, fn: Any, args: tuple) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    try:
        conn.send(fn(*args))
    except BaseException as exc:  # MemoryError and the like: the report says so
        conn.send({"outcome": "failed", "message": f"{type(exc).__name__}: {exc}"[:300]})


def isolated(fn: Any, args: tuple, timeout: float) -> dict[str, Any]:
    """fn(*args) in a spawned process with an address-space limit: its result, or what stopped
    it (killed after `timeout` s; died, e.g. aborting on a failed allocation)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_child, args=(send, fn, args), daemon=True)
    process.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        return {"outcome": "timeout", "message": f"still running after {timeout:g} s (killed)"}
    except EOFError:
        process.join(10)
        return {"outcome": "died", "message": f"process died, exit code {process.exitcode}"}
    finally:
        if process.is_alive():
            process.kill()
        process.join(10)


# -- tables ----------------------------------------------------------------------------------------
def _cell_ms(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if not entry.get("supported", True):
        return "n/a"
    if "error" in entry:
        return "error"
    return f"{entry['compile_ms']:.2f}"


def _first_mask_ms(result: dict[str, Any]) -> float:
    """A fresh matcher's first mask, median over the cases that compiled."""
    return statistics.median(
        c["first_mask_ms"] for c in result["cases"].values() if "first_mask_ms" in c
    )


def tables(report: dict[str, Any]) -> list[str]:
    libs = [r for r in report["libraries"] if "cases" in r]
    lines = [f"Constraint libraries on {report['tokenizer']} ({report['vocab_size']} tokens)", ""]
    cols = [("", 26, "s")] + [(r["library"], 14, "s") for r in libs]
    rows: list[list[object]] = [
        ["version"] + [r["version"] for r in libs],
        ["tokenizer setup (ms)"] + [f"{_ms(r['setup_s']):.0f}" for r in libs],
    ]
    for case in CASES:
        rows.append(
            [f"compile: {case.name} (ms)"] + [_cell_ms(r["cases"].get(case.name)) for r in libs]
        )
    rows.append(["first mask, p50 (ms)"] + [f"{_first_mask_ms(r):.2f}" for r in libs])
    rows += [
        ["mask per token p50 (us)"] + [f"{r['mask_us']['p50']:.0f}" for r in libs],
        ["mask per token p99 (us)"] + [f"{r['mask_us']['p99']:.0f}" for r in libs],
        ["accept per token p50 (us)"] + [f"{r['accept_us_p50']:.1f}" for r in libs],
        ["forced outputs accepted"]
        + [
            f"{sum(c.get('forced_output') == 'ok' for c in r['cases'].values())}"
            f"/{sum('forced_output' in c for c in r['cases'].values())}"
            for r in libs
        ],
        ["16 rows: loop / batch (ms)"]
        + [
            f"{r['fill_16_rows_ms']['loop']:.2f}/{r['fill_16_rows_ms']['batch']:.2f}"
            if "fill_16_rows_ms" in r
            else "-"
            for r in libs
        ],
    ]
    for label in ("B=1, all rows", "B=16, all rows", "B=64, all rows", "B=64, 8 rows"):
        rows.append(
            [f"apply {label} (ms)"]
            + [
                f"{r['apply'][label]['ms']:.3f}" if "ms" in r["apply"].get(label, {}) else "error"
                for r in libs
            ]
        )
    for name, _, _ in INVALID:
        rows.append(
            [f"invalid: {name}"]
            + [
                {True: "refused", False: "ACCEPTED", None: "n/a"}[r["invalid"][name]["refused"]]
                for r in libs
            ]
        )
    lines += format_table(cols, rows)
    lines += ["", "Pathological inputs: compile + first mask (s), or what stopped it"]
    cols = [("", 28, "s")] + [(lib, 14, "s") for lib in report["pathological_libraries"]]
    prow = []
    for name, _, _ in PATHOLOGICAL:
        row: list[object] = [name]
        for lib in report["pathological_libraries"]:
            entry = report["pathological"][lib][name]
            outcome = entry["outcome"]
            if outcome in ("compiled", "refused"):
                row.append(f"{entry['s']:.3f}" + (" refused" if outcome == "refused" else ""))
            else:
                row.append(outcome)
        prow.append(row)
    lines += format_table(cols, prow)
    lines += [
        "",
        "Mask application kernels: "
        + "; ".join(f"{r['library']}: {r['apply']['implementation']}" for r in libs),
    ]
    return lines


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="per pathological case (s)")
    parser.add_argument("--libs", default=",".join(LIBRARIES))
    parser.add_argument("--skip-pathological", action="store_true")
    add_common_args(parser, "constraint_libs")
    args = parser.parse_args()
    setup_logging()
    libs = []
    for lib in args.libs.split(","):
        try:
            importlib.metadata.version(IMPORTS[lib] if lib != "loraplex" else "llguidance")
        except importlib.metadata.PackageNotFoundError:
            package = "llguidance" if lib == "loraplex" else lib
            log.warning("%s is not installed: skipped (pip install %s)", lib, package)
            continue
        libs.append(lib)
    if not libs:
        raise RuntimeError("none of the libraries is installed")
    report: dict[str, Any] = {"config": vars(args), "libraries": []}
    for lib in libs:
        log.info("measuring %s", lib)
        outcome = isolated(measure_library, (lib, args.home, args.repeats), 3600)
        report["libraries"].append(outcome if "cases" in outcome else {"library": lib, **outcome})
    first = next((r for r in report["libraries"] if "cases" in r), None)
    if first is None:
        raise RuntimeError(f"every library failed: {report['libraries']}")
    report["vocab_size"] = first["vocab_size"]
    report["tokenizer"] = "SmolLM2-135M-Instruct"
    # loraplex's module runs on llguidance: its pathological behaviour is llguidance's plus
    # the module's own bounds, so it is measured as well.
    report["pathological_libraries"] = [] if args.skip_pathological else libs
    report["pathological"] = {}
    for lib in report["pathological_libraries"]:
        report["pathological"][lib] = {}
        for name, kind, value in PATHOLOGICAL:
            log.info("%s: %s", lib, name)
            report["pathological"][lib][name] = isolated(
                measure_pathological, (lib, args.home, kind, value), args.timeout
            )
    publish(report, tables(report), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
