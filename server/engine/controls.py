"""What a request's parameters do to its row of logits before a token is chosen: `min_tokens`
(no end yet), `logit_bias`, and the repetition, frequency and presence penalties, in vLLM's
order (its logits processors, then penalties; temperature, min-p, top-k and top-p follow in
sampling.py).

Each sequence that needs any of them keeps a `RowControls` across its steps: its token
counts live on the logits' device as one (V,) row, updated with each token it takes, so a step
stacks the rows that need them and applies each control to all of them in one op. Nothing
loops over the vocabulary on the host, and a row's controls never touch another row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.server.engine.request import SamplingParams


@dataclass(eq=False)
class RowControls:
    """One sequence's logits controls and what they depend on (its tokens so far)."""

    params: SamplingParams
    ends: tuple[int, ...]  # tokens that end the sequence: held back until min_tokens
    counts: torch.Tensor | None = None  # (V,) float32: times each token was generated
    seen: torch.Tensor | None = None  # (V,) bool: in the prompt or generated (repetition)
    generated: int = 0
    # logit_bias as (token ids, values) on the logits' device
    bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_ids: list[int],
        eos_ids: set[int],
        vocab_size: int,
        device: torch.device,
    ) -> RowControls | None:
        """The controls of a new sequence, or None when its parameters need none."""
        ends = () if params.ignore_eos else tuple(sorted(eos_ids))
        ends += tuple(t for t in params.stop_token_ids if t not in ends)
        if not (params.penalized or params.logit_bias or (params.min_tokens and ends)):
            return None
        controls = cls(params=params, ends=ends)
        if params.presence_penalty or params.frequency_penalty:
            controls.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
            controls.seen = seen
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            controls.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        return controls

    @property
    def holding_ends(self) -> bool:
        return self.generated < self.params.min_tokens and bool(self.ends)

    def accept(self, token: int) -> None:
        """Count a token the sequence took."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def apply_controls(logits: torch.Tensor, rows: list[RowControls | None]) -> torch.Tensor:
    """logits: (B, V) float32, row i the logits of a sequence with controls rows[i] (None:
    none). Returns the logits with each row's controls applied: `logits` itself when no row
    has any, else a new tensor (the raw logits stay for log-probabilities)."""
    active = [(i, r) for i, r in enumerate(rows) if r is not None]
    if not active:
        return logits
    out = logits.clone()
    vocab, device = logits.shape[-1], logits.device
    # min_tokens: the tokens that would end the sequence are out until it is long enough.
    held = [(i, r.ends) for i, r in active if r.holding_ends]
    if held:
        rows_t = torch.tensor([i for i, ends in held for _ in ends], device=device)
        ids_t = torch.tensor([t for _, ends in held for t in ends], device=device)
        blocked = torch.tensor(float("-inf"), device=device)
        out.index_put_((rows_t, ids_t.clamp(max=vocab - 1)), blocked)
    biased = [(i, r.bias) for i, r in active if r.bias is not None]
    if biased:
        flat = torch.cat([ids + i * vocab for i, (ids, _) in biased])
        out.view(-1).index_add_(0, flat, torch.cat([values for _, (_, values) in biased]))
    _penalize(out, [(i, r) for i, r in active if r.params.penalized])
    return out


def _penalize(logits: torch.Tensor, rows: list[tuple[int, RowControls]]) -> None:
    """Repetition (HF's: a seen token's logit divided by the penalty if positive, multiplied
    if negative), then frequency and presence (OpenAI's: minus frequency x count and presence
    once for every token generated), on the given rows of `logits`, in place."""
    if not rows:
        return
    device = logits.device
    at = torch.tensor([i for i, _ in rows], dtype=torch.long, device=device)
    x = logits.index_select(0, at)  # (P, V)
    repeating = [(j, r) for j, (_, r) in enumerate(rows) if r.seen is not None]
    if repeating:
        part = torch.tensor([j for j, _ in repeating], dtype=torch.long, device=device)
        seen = torch.stack([r.seen for _, r in repeating if r.seen is not None])  # (R, V)
        penalty = _column([r.params.repetition_penalty for _, r in repeating], device)
        y = x.index_select(0, part)
        y = torch.where(seen, torch.where(y > 0, y / penalty, y * penalty), y)
        x.index_copy_(0, part, y)
    counting = [(j, r) for j, (_, r) in enumerate(rows) if r.counts is not None]
    if counting:
        part = torch.tensor([j for j, _ in counting], dtype=torch.long, device=device)
        counts = torch.stack([r.counts for _, r in counting if r.counts is not None])  # (C, V)
        frequency = _column([r.params.frequency_penalty for _, r in counting], device)
        presence = _column([r.params.presence_penalty for _, r in counting], device)
        y = x.index_select(0, part) - frequency * counts - presence * (counts > 0).float()
        x.index_copy_(0, part, y)
    logits.index_copy_(0, at, x)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
