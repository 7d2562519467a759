"""The running batch: the sequences being decoded together and their shared KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.server.engine.kv_cache import BatchKV
from loraplex.server.engine.output import OutputProcessor
from loraplex.server.engine.request import EngineRequest


@dataclass
class Sequence:
    """One request while it runs."""

    request: EngineRequest
    slot: int  # device slot of its adapter; -1 = base model
    output: OutputProcessor
    generator: torch.Generator | None  # None = greedy
    last_token: int = -1  # the token fed at the next decode step
    num_generated: int = 0
    released: bool = False  # its adapter slot reference was dropped

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + self.num_generated


@dataclass
class RunningBatch:
    """Row i of `kv` belongs to seqs[i]."""

    seqs: list[Sequence] = field(default_factory=list)
    kv: BatchKV | None = None  # (B, H, T, D) per layer; None when empty

    def __len__(self) -> int:
        return len(self.seqs)

    def slots(self) -> list[int]:  # (B,) adapter slot per row
        return [s.slot for s in self.seqs]

    def add(self, seqs: list[Sequence], kv: BatchKV) -> None:
        self.kv = kv if self.kv is None else BatchKV.merge(self.kv, kv)
        self.seqs.extend(seqs)

    def keep(self, rows: list[int]) -> None:
        """Retain only `rows` (in order), freeing the cache of the others."""
        if len(rows) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in rows]
        self.kv = self.kv.select(rows) if rows and self.kv is not None else None
