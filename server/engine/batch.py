"""The running sequences: each owns one KV cache row from admission to its end.

A sequence first prefills its prompt (in chunks, over as many steps as the prefill budget
needs), then decodes one token per step. A request with `n` samples runs as n sequences, each in
a row of its own: the first prefills the prompt, and when it is done the others take a copy of
its keys and values and their first token from its logits (the prompt is computed once).
Rows stay compact: when a sequence leaves, the one in the last row moves into its row (see
KVCache.free).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loraplex.server.engine.controls import RowControls
from loraplex.server.engine.output import OutputProcessor
from loraplex.server.engine.request import EngineRequest, TokenLogprob
from loraplex.server.engine.structured import ConstraintMatcher


@dataclass(eq=False)  # identity: two sequences are never the same
class Sequence:
    """One request while it runs."""

    request: EngineRequest
    slot: int  # device slot of its adapter; -1 = base model
    output: OutputProcessor
    generator: random.Random | None  # None = greedy (see sampling.make_generator)
    row: int  # its KV cache row
    reserved: int  # KV cache tokens reserved for it
    num_cached: int = 0  # tokens whose keys/values are in the cache
    last_token: int = -1  # the token fed at the next decode step
    num_generated: int = 0
    index: int = 0  # which of its request's samples
    # The request's sequences (this one among them) still running: the last one to leave
    # gives back the adapter slot and ends the request.
    family: list[Sequence] = field(default_factory=list)
    # A sample after the first waits for the first one's prompt to copy it.
    waits_for: Sequence | None = None
    controls: RowControls | None = None  # penalties, bias, min_tokens (None: none)
    matcher: ConstraintMatcher | None = None  # its place in its request's constraint, if any
    cached_tokens: int = 0  # of its prompt, copied from the prefix cache
    # Its prompt is looked up in the prefix cache just before its first chunk (Engine.
    # _load_prefix), so that it finds what the prompts prefilled before it left there.
    prefix_pending: bool = False
    # The prefix cache's digests of its whole blocks stored so far (extended as it grows).
    prefix_chain: list[bytes] = field(default_factory=list)
    # The prompt's log-probabilities as its chunks are computed, when the request asks.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Its generated tokens that are fed back (not an end-of-sequence or stop token), kept on
    # the engine thread (the text may be rendered on the output thread: emitter.py).
    generated: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_generated


@dataclass
class RunningBatch:
    """Every admitted sequence, in admission order (prefills are served first come, first
    served); `by_row[r]` is the sequence in cache row r."""

    seqs: list[Sequence] = field(default_factory=list)
    by_row: dict[int, Sequence] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence) -> None:
        self.seqs.append(seq)
        self.by_row[seq.row] = seq

    def remove(self, seq: Sequence) -> None:
        self.seqs.remove(seq)
        del self.by_row[seq.row]

    def move(self, old_row: int, new_row: int) -> None:
        """The cache moved the sequence of `old_row` into `new_row`."""
        seq = self.by_row.pop(old_row)
        seq.row = new_row
        self.by_row[new_row] = seq
