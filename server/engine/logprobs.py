"""Log-probabilities of chosen tokens and the best alternatives, from the model's logits.

They are log-softmax in float32 of the logits the step produced for the row (after the
request's adapter, before any penalty, bias, constraint or temperature: the model's own
distribution, which is what evaluation harnesses score), computed for the rows that ask, with
one device-to-host copy for all of them.
"""

from __future__ import annotations

import torch

from loraplex.server.engine.request import TokenLogprob


def token_logprobs(logits: torch.Tensor, targets: list[int], tops: list[int]) -> list[TokenLogprob]:
    """logits: (R, V) the rows' logits; targets: (R,) the token each row scores; tops: (R,)
    how many best alternatives each row reports. Returns one TokenLogprob per row."""
    device = logits.device
    logits = logits.float()
    # log-softmax read off where needed: x - logsumexp(x), never written out whole (R x V)
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)  # (R, 1)
    target_t = torch.tensor(targets, dtype=torch.long, device=device).unsqueeze(1)
    chosen = (logits.gather(1, target_t) - log_total).squeeze(1)  # (R,)
    width = max(tops, default=0)
    if width:
        best = torch.topk(logits, width, dim=-1)  # (R, W) each, most likely first
        values = best.values - log_total
        host = torch.cat([chosen.unsqueeze(1), values, best.indices.float()], dim=1)
        rows = host.tolist()
    else:
        rows = [[value] for value in chosen.tolist()]
    out = []
    for target, top, row in zip(targets, tops, rows, strict=True):
        values, ids = row[1 : 1 + width], row[1 + width :]
        pairs = tuple((int(ids[j]), values[j]) for j in range(top))
        out.append(TokenLogprob(token_id=target, logprob=row[0], top=pairs))
    return out
