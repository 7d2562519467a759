"""Structured outputs: the token masks that keep a request's output inside a JSON schema, a
regex, a list of choices or a grammar.

A request's constraint arrives as a `ConstraintSpec` (what the request asked for, and the field
it came from). `GrammarCompiler.compile` turns it into a `CompiledConstraint` on a worker thread,
never on the engine thread, and keeps the last `cache_size` of them (the failures too, so a
rejected spec sent again costs nothing). Each constrained sequence takes its own
`ConstraintMatcher` from it. On the engine thread, once per step, each constrained row writes the
tokens allowed next into its row of a packed bitmask (`ConstraintMatcher.fill_mask`, or
`fill_masks` for all rows at once), one vectorized `apply_masks` sets every other token of
those rows to -inf in the step's logits, and after sampling each row `accept`s its token.
Unconstrained rows are never read or written: a request's constraint cannot reach its
neighbours. A matcher allows EOS exactly when its output is complete, and only EOS once nothing
can follow (`is_finished`).

The library is llguidance (the engine of vLLM's `guidance` backend), chosen by measurement on
the embedded SmolLM2's 49,152-token vocabulary (benchmarks/constraint_libs.py; the table is in
docs/structured-outputs.md), against xgrammar (vLLM's default backend) and outlines-core:

- it covers every kind asked for: JSON Schema (anyOf/oneOf/allOf, $ref, patterns, formats,
  numeric bounds), Rust-syntax regexes, Lark grammars (and llama.cpp's GBNF), choices;
  outlines-core has no grammars. It refuses what it does not implement ("Unimplemented keys:
  ["not"]"), where xgrammar accepts unknown keywords and formats and ignores them, so that its
  output can break the schema the client gave;
- its compile is lazy: 0.2-0.6 ms for the benchmark's schemas, regex and grammar, where
  xgrammar precomputes masks (2-15 ms for the schemas, 280 ms for a log-line regex) and
  outlines-core builds a whole DFA (31-280 ms per schema, 4.3 s for "any JSON object"). Its
  masks cost more per token (p50 6 us, p99 0.3 ms against xgrammar's 2 and 22 us), well under
  a decode step;
- it bounds its own work (`parser_limits`): grammar size, lexer states, fuel for building the
  lexer and for each mask step, Earley items per step. No library can interrupt a compile;
  only llguidance's limits bound it whatever the input: xgrammar ran past 60 s on a schema of
  objects nested 1,000 deep (53 KB), outlines-core on 1,000 optional properties and on
  `(a|b)*a(a|b){24}`, where llguidance refused or compiled each in under 70 ms;
- one abi3 wheel per platform with no dependencies (xgrammar requires torch, transformers,
  triton and apache-tvm-ffi).

Bounds. A spec's text is at most `MAX_SPEC_BYTES` (64 KiB) and a choice list `MAX_CHOICES`
long. The library's limits (`parser_limits`) bound the work of a compile and of every mask
step. A grammar over them is refused at compile time when its first mask shows it, or when a
probe `PROBE_STEPS` tokens down one path does (an object with hundreds of optional properties
overflows at its first key); when a later step hits them, its matcher ends the output (only
EOS allowed; `ConstraintMatcher.error` says why). A compile (grammar, first mask, probe) that
took longer than `timeout_s` is refused afterwards and remembered as refused: the limits, not
a timer, are what stop a compile, since the library cannot be interrupted (the slowest input
found within 64 KiB, 5,900 optional properties, took 1.5 s before the probe refused it). JSON
is written compact (", " between items, ": " after keys, no other whitespace),
so a model cannot spend its tokens on runs of blanks: with whitespace free between tokens (even
at most 64 characters), the embedded model wrote newlines until max_tokens in 7 of 12 requests,
compact in 1 of 12 (a runaway number).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from copy import copy
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import llguidance
import torch

from loraplex.core.errors import InvalidRequest

log = logging.getLogger(__name__)

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
CONSTRAINT_KINDS: Final[tuple[str, ...]] = get_args(ConstraintKind)

MAX_SPEC_BYTES: Final = 64 * 1024
# Each choice is one alternative of the grammar's start rule, and llguidance's Earley parser
# refuses a row of more than `max_items_in_row` (2000) items: 1000 stays well inside it.
MAX_CHOICES: Final = 1000
DEFAULT_TIMEOUT_S: Final = 2.0
# Tokens a compile walks past the start to see that the grammar stays inside the limits there.
PROBE_STEPS: Final = 8
DEFAULT_CACHE_SIZE: Final = 256
_MESSAGE_CHARS = 600  # of a library error returned to a client: its first lines say it all

_BITS_PER_WORD = 32
if sys.byteorder != "little":  # apply_masks reads the packed words byte by byte
    raise ImportError("structured outputs need a little-endian host")


def parser_limits() -> llguidance.LLParserLimits:
    """The library's limits on a grammar's work: its defaults, named here because they are the
    bounds this module relies on (the speeds are llguidance's own estimates). Verbose errors
    are off: they print the parser's state, and an error goes back to the client."""
    return llguidance.LLParserLimits(
        max_items_in_row=2_000,  # Earley items in one row (e.g. alternatives of one rule)
        initial_lexer_fuel=1_000_000,  # building the lexer's regexes (~50k/ms)
        step_lexer_fuel=200_000,  # the lexer's work in one mask step (~14k/ms)
        step_max_items=50_000,  # Earley items in one mask step (~20k/ms)
        max_lexer_states=250_000,  # lazy DFA states (~1-2 kB each)
        max_grammar_size=500_000,  # symbols in the grammar's productions
        verbose_errors=False,
    )


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asked its output to satisfy.

    kind: json_object (any JSON object; value ""), json_schema (the schema as JSON text), regex
    (the whole output matches it; Rust regex syntax), choice (a JSON list of strings: the output
    is one of them), grammar (a Lark grammar, or llama.cpp's GBNF). field: the request field the
    constraint came from, named by every error about it. Hashable; the compile cache is keyed by
    (kind, value) alone, so one schema sent through two fields is compiled once.
    """

    kind: ConstraintKind
    value: str
    field: str

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidRequest(
                self.field,
                f"unknown constraint {self.kind!r}; one of {', '.join(CONSTRAINT_KINDS)}",
            )
        if not isinstance(self.value, str):
            raise InvalidRequest(self.field, f"must be text, not {type(self.value).__name__}")

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.value


def bitmask_words(vocab_size: int) -> int:
    """int32 words of a bitmask row over `vocab_size` tokens (bit t % 32 of word t // 32)."""
    return (vocab_size + _BITS_PER_WORD - 1) // _BITS_PER_WORD


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A (rows, bitmask_words(vocab_size)) int32 buffer on the CPU, every token allowed: one per
    engine, reused every step (fill_mask overwrites a row whole)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


class ConstraintMatcher:
    """One sequence's place in its constraint. Used by one thread at a time (the engine's)."""

    __slots__ = ("_error_logged", "_matcher", "_row_bytes", "_words", "spec")

    def __init__(self, matcher: llguidance.LLMatcher, words: int, spec: ConstraintSpec) -> None:
        self._matcher = matcher
        self._words = words
        self._row_bytes = words * 4
        self._error_logged = False
        self.spec = spec

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (a whole row: 1 = allowed). Only EOS
        is allowed once the output is complete and nothing may follow, or after an error."""
        self._check_bitmask(bitmask, row)
        # The library writes the row through its address (no tensor view: this runs per row per
        # step); _check_bitmask has made sure the row is this long and inside the buffer.
        self._matcher.unsafe_compute_mask_ptr(
            bitmask.data_ptr() + row * self._row_bytes, self._row_bytes
        )
        if not self._error_logged and self._matcher.is_error():
            self._log_error("computing a mask")

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token (EOS included). A token the last mask did not allow
        cannot come from a masked row: should one come, the matcher keeps an error (logged, and
        `error` says it), its masks allow only EOS, and `is_finished` is true."""
        if not self._matcher.consume_token(token_id) and not self._error_logged:
            self._log_error(f"accepting token {token_id}")

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS may follow: the output is complete (or the matcher failed)."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The output so far satisfies the constraint (EOS is allowed next), though more tokens
        may still be allowed too (a regex `a+`)."""
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a token it did not allow, or a step over the library's
        limits); None while it has not."""
        return str(self._matcher.get_error()) if self._matcher.is_error() else None

    def _check_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if (
            bitmask.dtype != torch.int32
            or bitmask.device.type != "cpu"
            or bitmask.dim() != 2
            or bitmask.shape[1] != self._words
            or not bitmask.is_contiguous()
        ):
            raise ValueError(
                f"the bitmask must be a contiguous (rows, {self._words}) int32 CPU tensor, got "
                f"{tuple(bitmask.shape)} {bitmask.dtype} on {bitmask.device}"
            )
        if not 0 <= row < bitmask.shape[0]:
            raise IndexError(f"row {row} is outside a bitmask of {bitmask.shape[0]} rows")

    def _log_error(self, doing: str) -> None:
        self._error_logged = True
        log.error(
            "constraint from %s failed while %s: %s (its output ends here)",
            self.spec.field,
            doing,
            _short(self._matcher.get_error()),
        )


class CompiledConstraint:
    """A compiled constraint: a matcher at its start, with its first mask already computed
    (which builds the lexer's first states), copied for each sequence."""

    def __init__(
        self, template: llguidance.LLMatcher, words: int, spec: ConstraintSpec, compile_s: float
    ) -> None:
        self._template = template
        self._words = words
        self._lock = threading.Lock()
        self.spec = spec
        self.compile_s = compile_s

    def matcher(self) -> ConstraintMatcher:
        """A fresh matcher for one sequence (a copy of the template: microseconds)."""
        with self._lock:  # the template is shared by every thread that starts a sequence
            copied = self._template.deep_copy()
        return ConstraintMatcher(copied, self._words, self.spec)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and model: built once per server (the tokenizer's
    setup takes ~0.15 s for SmolLM2), then `compile` on worker threads.

    tokenizer: a transformers fast tokenizer (llguidance reads its backend's JSON).
    vocab_size: the width of the model's logits; tokens from the tokenizer's size up to it are
    padding and never allowed. eos_token_ids: the ids that end a sequence (the engine's; by
    default the tokenizer's EOS), all allowed exactly when an output is complete.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        eos_token_ids: Iterable[int] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"structured outputs need a fast (Rust) tokenizer, not {type(tokenizer).__name__}"
            )
        eos = sorted({int(t) for t in eos_token_ids or ()}) or [int(tokenizer.eos_token_id)]
        if cache_size < 1 or timeout_s <= 0:
            raise ValueError(f"cache_size {cache_size} and timeout_s {timeout_s} must be positive")
        # A copy: the tokenizer in use keeps its own padding and truncation settings, which the
        # serialized vocabulary must not carry.
        backend = copy(backend)
        backend.no_padding()
        backend.no_truncation()
        tokens = len(tokenizer)
        if tokens > vocab_size:
            raise ValueError(
                f"the tokenizer has {tokens} tokens, more than the model's {vocab_size} logits"
            )
        started = time.perf_counter()
        self._tokenizer = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=vocab_size, eos_token=eos
        )
        self.setup_s = time.perf_counter() - started
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos)
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._words = bitmask_words(vocab_size)
        self._limits = parser_limits()
        self._cache: OrderedDict[tuple[str, str], CompiledConstraint | str] = OrderedDict()
        self._lock = threading.Lock()
        log.info(
            "structured outputs: llguidance %s over %d tokens (EOS %s), set up in %.2f s",
            llguidance.__version__,
            vocab_size,
            eos,
            self.setup_s,
        )

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A bitmask buffer for up to `rows` rows over this compiler's vocabulary."""
        return allocate_bitmask(rows, self.vocab_size)

    def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """The compiled constraint for `spec`, from the cache when (kind, value) was compiled
        before. Thread-safe; seconds at most (see the module's bounds), so call it from a
        worker thread. Raises InvalidRequest naming spec.field when the spec is malformed,
        unsupported, too large, or too costly to compile."""
        key = spec.key
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            # Outside the lock: compiles of different specs run side by side (the library
            # releases the GIL while it builds).
            try:
                cached = self._compile(spec)
            except _Refused as exc:
                cached = exc.reason
            with self._lock:
                # A compile of the same spec that finished first wins: one object per spec.
                cached = self._cache.setdefault(key, cached)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(cached, str):
            raise InvalidRequest(spec.field, cached)
        return cached

    def cached(self) -> int:
        """How many specs (compiled or refused) the cache holds."""
        with self._lock:
            return len(self._cache)

    def clear_cache(self) -> None:
        """Forget every compiled and refused spec (matchers already taken keep working)."""
        with self._lock:
            self._cache.clear()

    def _probe(self, matcher: llguidance.LLMatcher, scratch: torch.Tensor) -> None:
        """Walk a copy of `matcher` PROBE_STEPS tokens down its lowest-numbered allowed path
        (single characters first in a byte-level vocabulary: `{` then `"` for an object), so
        that a grammar over the library's limits within its first tokens is refused here, with
        the library's reason, rather than in the middle of a request's output: an object with
        some 500 optional properties compiles, then overflows the parser's row limit at its
        first key. `scratch` holds the matcher's first mask, and is overwritten."""
        walker = matcher.deep_copy()
        for _ in range(PROBE_STEPS):
            token = self._lowest_allowed(scratch[0])
            if token is None:  # only EOS: the output can be complete this early
                break
            # An allowed token fails only on the limits (in the token's own parsing step).
            if walker.consume_token(token):
                walker.unsafe_compute_mask_ptr(scratch.data_ptr(), self._words * 4)
            if walker.is_error():
                raise _Refused(
                    f"is over the server's grammar limits within its first tokens: "
                    f"{_short(walker.get_error())}"
                )

    def _lowest_allowed(self, row: torch.Tensor) -> int | None:
        for word_index in torch.nonzero(row).flatten().tolist():
            word = int(row[word_index]) & 0xFFFFFFFF
            while word:
                bit = (word & -word).bit_length() - 1
                token = word_index * _BITS_PER_WORD + bit
                if token not in self.eos_token_ids:
                    return token
                word &= word - 1
        return None

    def _compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        size = len(spec.value.encode())
        if size > MAX_SPEC_BYTES:
            raise _Refused(f"is {size} bytes long; at most {MAX_SPEC_BYTES}")
        started = time.perf_counter()
        grammar = _grammar(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if not matcher.is_error():
            # The first mask: it builds the lexer's first states here rather than in the
            # engine's first step, and shows a grammar over the limits from its first token.
            scratch = allocate_bitmask(1, self.vocab_size)
            matcher.unsafe_compute_mask_ptr(scratch.data_ptr(), self._words * 4)
            self._probe(matcher, scratch)
        elapsed = time.perf_counter() - started
        if matcher.is_error():
            raise _Refused(_short(matcher.get_error()))
        if elapsed > self.timeout_s:
            log.warning(
                "refused a %s constraint from %s: %.2f s to compile (bound %.2f s)",
                spec.kind,
                spec.field,
                elapsed,
                self.timeout_s,
            )
            raise _Refused(
                f"took {elapsed:.2f} s to compile, over the server's {self.timeout_s:g} s: "
                "simplify it"
            )
        log.debug("compiled a %s constraint (%d bytes) in %.1f ms", spec.kind, size, elapsed * 1e3)
        return CompiledConstraint(matcher, self._words, spec, elapsed)


class _Refused(Exception):
    """A spec the compiler refuses (cached as refused); compile raises it as InvalidRequest
    naming the field of the spec at hand."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _grammar(spec: ConstraintSpec) -> str:
    """The llguidance grammar (its JSON form) of a spec; _Refused if it is not one."""
    try:
        if spec.kind == "json_object":
            return _json_grammar('{"type": "object"}')
        if spec.kind == "json_schema":
            return _json_grammar(_json_schema_text(spec))
        if spec.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.value))
        if spec.kind == "choice":
            return str(llguidance.LLMatcher.grammar_from_lark(_choice_lark(spec)))
        return str(llguidance.grammar_from("grammar", spec.value))
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        # The GBNF-to-Lark translation and the JSON-schema wrapper raise on malformed input;
        # everything else the library reports from the matcher (see _compile).
        raise _Refused(_short(str(exc) or type(exc).__name__)) from None


def _json_grammar(schema: str) -> str:
    # Compact, with json.dumps' separators and no other whitespace; an unimplemented keyword is
    # refused, never ignored (lenient off).
    return str(
        llguidance.LLMatcher.grammar_from_json_schema(
            schema,
            overrides={
                "whitespace_flexible": False,
                "item_separator": ", ",
                "key_separator": ": ",
                "lenient": False,
            },
        )
    )


def _json_schema_text(spec: ConstraintSpec) -> str:
    # Parsed here for errors that say what is wrong; the library takes the text as it came.
    try:
        schema = json.loads(spec.value)
    except json.JSONDecodeError as exc:
        raise _Refused(f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise _Refused("is nested too deeply") from None
    if not isinstance(schema, dict):
        raise _Refused(f"must be a JSON object, not {type(schema).__name__}")
    return spec.value


def _choice_lark(spec: ConstraintSpec) -> str:
    try:
        choices = json.loads(spec.value)
    except json.JSONDecodeError as exc:
        raise _Refused(f"is not a JSON list of strings: {exc}") from None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise _Refused("must be a list of strings")
    if not 1 <= len(choices) <= MAX_CHOICES:
        raise _Refused(f"has {len(choices)} choices; 1 to {MAX_CHOICES}")
    # Lark's string literals take JSON's escapes; ensure_ascii=False keeps characters beyond
    # the BMP whole (their \u escapes would be surrogate pairs).
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _short(message: str) -> str:
    # Without verbose errors the library ends its messages with this marker, which says
    # nothing to a client.
    message = message.replace("<non-verbose/>", "").strip()
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS] + "..."


_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def fill_masks(bitmask: torch.Tensor, rows: Sequence[tuple[ConstraintMatcher, int]]) -> None:
    """fill_mask for several (matcher, row) pairs (distinct matchers, distinct rows) in one
    call: the library computes the masks on its own threads, without the GIL for the whole
    batch. The same masks as fill_mask for each pair; as fast as that loop for 16 typical rows
    on 2 cores, faster where single masks are costly (the p99 steps) and cores are free."""
    if not rows:
        return
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = llguidance.LLExecutor()
    words = rows[0][0]._words
    for matcher, row in rows:
        matcher._check_bitmask(bitmask, row)
    _executor.unsafe_compute_mask_ptr(
        [(m._matcher, row) for m, row in rows], bitmask.data_ptr(), words * 4, bitmask.shape[0]
    )
    for matcher, _ in rows:
        if not matcher._error_logged and matcher._matcher.is_error():
            matcher._log_error("computing a mask")


# For each byte value, what its 8 bits make of 8 logits: +inf keeps a logit (min(x, +inf) = x),
# -inf blocks it. Per (device, dtype): one lookup turns a bitmask row into its row of caps.
_caps: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_caps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    caps = _caps.get((device, dtype))
    if caps is None:
        allowed = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        table = torch.where(allowed.bool(), float("inf"), float("-inf")).to(device, dtype)
        caps = _caps.setdefault((device, dtype), table)
    return caps


def apply_masks(
    logits: torch.Tensor, rows: Sequence[int] | torch.Tensor, bitmask: torch.Tensor
) -> None:
    """Set to -inf, in place, every token that `bitmask[r]` does not allow in `logits[r]`, for
    each r in `rows` (distinct); other rows are left untouched. logits: (B, V) on any device,
    any float dtype, V at most 32 times the bitmask's width (a bitmask over the model's logits
    width covers padding tokens too). A few vectorized ops for all the rows, no loop over them:
    ~15 us for one row of 49,152 logits and ~0.8 ms for 64 on a 2-core CPU."""
    index = torch.as_tensor(rows, dtype=torch.long).cpu()
    n = int(index.numel())
    if n == 0:
        return
    vocab = logits.shape[1]
    if vocab > bitmask.shape[1] * _BITS_PER_WORD:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words cannot cover {vocab} logits")
    # Bytes of the packed words in token order (a little-endian host's, as on x86-64 and
    # ARM64: bit i of word j is token 32j + i), each looked up as its 8 caps. torch's
    # masked_fill_ would be simpler but is several times slower on a CPU than this lookup and
    # one vectorized minimum.
    words = bitmask.index_select(0, index).to(logits.device, non_blocking=True)
    codes = words.view(torch.uint8).flatten().to(torch.int32)
    caps = _byte_caps(logits.device, logits.dtype).index_select(0, codes).view(n, -1)[:, :vocab]
    first = int(index[0])
    if torch.equal(index, torch.arange(first, first + n)):
        # Contiguous rows (a batch that is all constrained, say): capped in place.
        chosen = logits[first : first + n]
        torch.minimum(chosen, caps, out=chosen)
    else:
        device_index = index.to(logits.device, non_blocking=True)
        chosen = torch.minimum(logits.index_select(0, device_index), caps)
        logits.index_copy_(0, device_index, chosen)
