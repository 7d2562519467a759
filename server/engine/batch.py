"""The running sequences: each owns one KV cache row from admission to its end.

A sequence first prefills its prompt (in chunks, over as many steps as the prefill budget
needs), then decodes one token per step. Rows stay compact: when a sequence leaves, the one in
the last row moves into its row (see KVCache.free).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from loraplex.server.engine.output import OutputProcessor
from loraplex.server.engine.request import EngineRequest


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
    released: bool = False  # its adapter slot reference was dropped

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
