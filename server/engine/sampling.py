"""Next-token selection for a batch whose rows each have their own sampling parameters.

Greedy rows take the argmax. Sampled rows go through temperature, then min-p, then top-k, then
top-p (vLLM's order), all rows at once with their parameters as tensors, and each picks its
token by inverse CDF (in vocabulary order) with one uniform drawn from its request's own host RNG.
So a seeded row's tokens depend on its seed and its logits only, never on what shares its batch,
and the device never waits on per-row work. The one device-to-host sync of a step is `_to_host`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from loraplex.server.engine.request import SamplingParams

# The largest float32 below 1: a uniform never rounds up to 1 on its way to float32, so the
# draw always lands inside the CDF (see _inverse_cdf).
_BELOW_ONE = 1.0 - 2.0**-24


def make_generator(params: SamplingParams, index: int = 0) -> random.Random | None:
    """A per-sequence RNG on the host: one uniform per sampled token, so no device round trip.
    Sample `index` of a seeded request draws from seed + index (as vLLM seeds its `n`), so
    each sample is reproducible on its own."""
    if params.greedy:
        return None
    if params.seed is None:
        return random.Random()  # seeded from the OS
    return random.Random((params.seed + index) % 2**63)


@dataclass(frozen=True)
class RowGroup:
    """Sampled rows whose top-k/top-p read the same number of best logits per row."""

    positions: torch.Tensor  # (G,) int64: their positions among the sampled rows
    width: int  # best logits read per row: V (top-p without top-k: a full sort) or the largest k
    any_top_p: bool


@dataclass(frozen=True)
class SampledRows:
    """A step's sampled rows (S of them) and their parameters, on the logits' device."""

    rows: torch.Tensor  # (S,) int64: their rows in the step's logits
    temperature: torch.Tensor  # (S, 1) float32
    top_k: torch.Tensor  # (S, 1) int64; 0 = no limit
    top_p: torch.Tensor  # (S, 1) float32; 1 = no limit
    log_min_p: torch.Tensor | None  # (S, 1) float32: log(min_p); None: no row has a min-p
    uniform: torch.Tensor  # (S, 1) float32 in [0, 1): this step's draw from each row's RNG
    # The rows with a top-k or top-p, grouped on the host from their parameters (no sync) so
    # that only the rows with a top-p and no top-k pay for a full sort. Rows in no group sample
    # from temperature alone.
    groups: tuple[RowGroup, ...]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[random.Random | None],
) -> list[int]:
    """logits: (B, V) for the last position of each row. Returns one token id per row."""
    logits = logits.float()
    if all(p.greedy for p in params):
        return _to_host(torch.argmax(logits, dim=-1))  # (B,)
    sampled = sampled_rows(params, generators, logits.shape[-1], logits.device)
    if len(params) == sampled.rows.shape[0]:
        return _to_host(sample_rows(logits, sampled))
    tokens = torch.argmax(logits, dim=-1)  # (B,)
    picked = sample_rows(logits.index_select(0, sampled.rows), sampled)  # (S,)
    return _to_host(tokens.index_copy_(0, sampled.rows, picked))


def _to_host(tokens: torch.Tensor) -> list[int]:
    """tokens: (B,) int64. The step's one device-to-host sync: nothing else reads a value."""
    return tokens.tolist()  # type: ignore[no-any-return]


def sampled_rows(
    params: list[SamplingParams],
    generators: list[random.Random | None],
    vocab_size: int,
    device: torch.device,
) -> SampledRows:
    """The non-greedy rows' parameters and draws, sent to `device` in one copy."""
    rows = [row for row, p in enumerate(params) if not p.greedy]
    chosen = [params[row] for row in rows]
    ks = [p.top_k if p.top_k < vocab_size else 0 for p in chosen]  # k >= V keeps everything
    nucleus = [i for i, (k, p) in enumerate(zip(ks, chosen, strict=True)) if not k and p.top_p < 1]
    top_k = [i for i, k in enumerate(ks) if k]
    # One uniform per row and step from the row's own RNG (the module's if it has none).
    draws = [min(_draw(generators[row]), _BELOW_ONE) for row in rows]
    temperatures = [p.temperature for p in chosen]
    top_ps = [p.top_p for p in chosen]
    min_ps = [p.min_p for p in chosen] if any(p.min_p for p in chosen) else []
    # float64 holds row numbers and ks exactly: one host-to-device copy for all of it.
    fields = [rows, temperatures, ks, top_ps, draws, nucleus, top_k, min_ps]
    host = torch.tensor([x for field in fields for x in field], dtype=torch.float64)
    parts = torch.split(_to_device(host, device), [len(field) for field in fields])
    groups = []
    if nucleus:
        groups.append(RowGroup(parts[5].long(), vocab_size, any_top_p=True))
    if top_k:
        width = max(ks[i] for i in top_k)
        groups.append(RowGroup(parts[6].long(), width, any(top_ps[i] < 1 for i in top_k)))
    return SampledRows(
        rows=parts[0].long(),
        temperature=parts[1].float().unsqueeze(1),
        top_k=parts[2].long().unsqueeze(1),
        top_p=parts[3].float().unsqueeze(1),
        log_min_p=parts[7].float().log().unsqueeze(1) if min_ps else None,
        uniform=parts[4].float().unsqueeze(1),
        groups=tuple(groups),
    )


def _draw(generator: random.Random | None) -> float:
    return random.random() if generator is None else generator.random()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host.to(device)
    # From pinned memory the copy is queued, not waited for (a pageable one syncs the stream).
    return host.pin_memory().to(device, non_blocking=True)


def sample_rows(logits: torch.Tensor, sampled: SampledRows) -> torch.Tensor:
    """logits: (S, V) float32, the sampled rows. Returns (S,) int64 token ids, on the device."""
    probs = torch.softmax(warp(logits, sampled), dim=-1)  # (S, V)
    return _inverse_cdf(probs, sampled.uniform)


def warp(logits: torch.Tensor, sampled: SampledRows) -> torch.Tensor:
    """logits: (S, V). Temperature, then min-p, then top-k, then top-p: (S, V), -inf where a
    token is out."""
    x = logits / sampled.temperature  # (S, V)
    if sampled.log_min_p is not None:  # p >= min_p * p_max, in logits: x >= x_max + log(min_p)
        best = x.amax(dim=-1, keepdim=True)
        x = x.masked_fill(x < best + sampled.log_min_p, float("-inf"))
    if not sampled.groups:
        return x
    floor = torch.full_like(x[:, :1], float("-inf"))  # (S, 1): the smallest logit kept
    for group in sampled.groups:
        at = group.positions  # (G,)
        top_k, top_p = sampled.top_k.index_select(0, at), sampled.top_p.index_select(0, at)
        group_floor = _floor(x.index_select(0, at), group, top_k, top_p)  # (G, 1)
        floor.index_copy_(0, at, group_floor)
    return x.masked_fill(x < floor, float("-inf"))


def _floor(
    x: torch.Tensor, group: RowGroup, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """x: (G, V) a group's rows; top_k, top_p: (G, 1). The smallest logit each row keeps: (G, 1).

    Thresholds, not sorted positions: only values are read, never the order of equal logits,
    so what a row keeps is the same whatever else is in its batch.
    """
    if group.width >= x.shape[-1]:
        best = torch.sort(x, dim=-1, descending=True).values  # (G, V)
    else:
        best = torch.topk(x, group.width, dim=-1).values  # (G, W), descending
    floor = _top_k_floor(best, top_k)
    if group.any_top_p:
        x = x.masked_fill(x < floor, float("-inf"))
        floor = torch.maximum(floor, _top_p_floor(x, best, floor, top_p))
    return floor


def _top_k_floor(best: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """best: (S, W) descending; top_k: (S, 1). The k-th best logit of each row (-inf: no limit):
    tokens tied with it stay, as HF's TopKLogitsWarper keeps them."""
    kth = best.gather(1, (top_k - 1).clamp(0, best.shape[-1] - 1))  # (S, 1)
    return torch.where(top_k > 0, kth, float("-inf"))


def _top_p_floor(
    x: torch.Tensor, best: torch.Tensor, k_floor: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """x: (G, V) after top-k; best: (G, W) descending, W covering each top-p row's top-k set.

    Returns (G, 1), the smallest logit of each row's nucleus: going down the sorted tokens, keep
    a token while the mass before it is under top_p (the first always); -inf where top_p is 1.
    """
    # Probabilities of the top-k-filtered distribution, normalized over the whole row (`best`
    # may miss tokens tied with the k-th), in sorted order: (G, W).
    log_total = torch.logsumexp(x, dim=-1, keepdim=True)  # (G, 1)
    probs = torch.exp(best - log_total).masked_fill(best < k_floor, 0.0)
    preceding = probs.cumsum(-1) - probs  # the mass of the better tokens, as HF computes it
    # A floor under the k-th logit (float sums a hair under top_p) only keeps what top-k kept.
    nucleus = best.masked_fill(preceding >= top_p, float("inf"))
    nucleus_floor = nucleus.amin(dim=-1, keepdim=True)
    return torch.where(top_p < 1, nucleus_floor, float("-inf"))


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs: (S, V) rows summing to ~1; uniform: (S, 1) in [0, 1). Returns (S,) int64: the
    first token whose cumulative probability exceeds the row's draw."""
    cdf = probs.cumsum(-1)  # (S, V)
    # Scaled by the row's own total (float32 sums end a hair off 1); strictly below it, since
    # uniform < 1, so the token found always has probability > 0.
    target = uniform * cdf[:, -1:]  # (S, 1)
    token = torch.searchsorted(cdf, target, right=True)  # (S, 1)
    return token.clamp_(max=probs.shape[-1] - 1).squeeze(1)  # NaN logits only
