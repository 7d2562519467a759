"""Composition: several LoRA adapters made into one, as PEFT 0.21's `add_weighted_adapter` does.

The result is an ordinary adapter (`AdapterWeights`), served like any other. The semantics are
PEFT's, method by method, because users compose offline with PEFT and expect the same adapter:

    cat          A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   B = [B_1, B_2, ...]   rank = sum of ranks
    linear       A = sum_i sign_i sqrt|w_i s_i| A_i    B = sum_i sqrt|w_i s_i| B_i   one rank
    ties         each A_i (and B_i) keeps its `density` largest-magnitude entries; per entry,
                 the sign with the larger total (or count, `majority_sign_method`) wins, and the
                 weighted entries of that sign are averaged (a disjoint mean, not a sum)
    dare_linear  each A_i and B_i loses entries at random (kept with probability `density`,
                 survivors divided by it), then linear
    dare_ties    the DARE drop, then ties' sign election and disjoint mean

w_i is the request's weight and s_i the adapter's alpha/r (or alpha/sqrt(r)); B_i is the raw
(unscaled) B, recovered as B / s_i from the folded B that AdapterWeights holds. In the
task-arithmetic family (all but cat) sqrt|w s| goes on both factors and a negative w s puts its
sign on A only, so B A carries w s with its sign. In ties, the sign election looks at the pruned
tensors *before* weighting, so a negative weight does not vote: its entries count where their
own sign agrees with the majority and then enter with their weight's sign.

Each module is composed from the inputs that target it; the result targets every module some
input targets (a module only some inputs target gets just their contribution; in cat their
rows come first and the rest of the rank is zero). The result has lora_alpha = rank, so its
scaling is 1. With one component PEFT composes "linear" whatever the method (the adapter scaled
by its weight), and so does this.

The DARE masks are PEFT's bit for bit when PEFT's global RNG was seeded with `seed` right before
`add_weighted_adapter`: one generator is consumed in PEFT's order, which starts with the draws of
injecting the (still empty) result adapter (see `_replay_injection_draws`).

Where this deliberately differs from PEFT 0.21:
- PEFT copies `use_rslora` from the first input into the result's config, so an rsLoRA first
  input scales the result by sqrt(rank) on top (huggingface/peft#3449, fixed upstream). The
  result here always has scaling 1, the composition PEFT intends.
- PEFT builds the result's config from the first input's, so that input's `exclude_modules`
  drop modules other inputs target, and it refuses to mix regex and list `target_modules`.
  AdapterWeights keeps neither; the result here covers every module the inputs target.

All of this is torch, run by the caller on the engine thread. linear and cat are a few passes
over the inputs' memory; ties (a topk per factor) and DARE (one serial RNG draw per entry, as
PEFT draws them) cost seconds on a multi-billion-parameter base with many inputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator, Sequence
from typing import Any

import torch

from loraplex.core.types import AdapterWeights

log = logging.getLogger(__name__)

COMPOSE_METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")
_PRUNED = ("ties", "dare_linear", "dare_ties")  # the methods that take a density
_DARE = ("dare_linear", "dare_ties")
_ELECTED = ("ties", "dare_ties")  # sign election and disjoint mean
_SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes an unsigned 64-bit seed

Components = Sequence[tuple[AdapterWeights, float]]  # (adapter, weight), in request order


class CompositionError(ValueError):
    """The composition request cannot be honoured as given; the message says why."""


def compose(components: Components, method: str, **options: Any) -> AdapterWeights:
    """The composed adapter: `compose_steps` (same arguments) run to the end."""
    steps = compose_steps(components, method, **options)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def compose_steps(
    components: Components,
    method: str,
    *,
    density: float | None = None,
    seed: int = 0,
    majority_sign_method: str = "total",
    module_order: Sequence[str],
    max_rank: int | None = None,
) -> Generator[None, None, AdapterWeights]:
    """Compose `components` ((adapter, weight) in request order) into one adapter by `method`,
    one module per step: the generator yields after each, and returns the adapter. (The server
    runs a few milliseconds of steps between two engine steps: ties and DARE take seconds on a
    large model, which would otherwise stall every request for as long.)

    `density` (in (0, 1]) is required for ties and the DARE methods and ignored otherwise;
    `seed` seeds the DARE masks; `module_order` lists the base's modules in named_modules order
    (PEFT's iteration order, which the masks depend on); `max_rank` caps the result's rank.
    Returns float32 contiguous A (r, in) and B (out, r) per module with scaling 1 (lora_alpha =
    rank), modules in model order. Raises CompositionError on any invalid request.
    """
    started = time.perf_counter()
    _check_request(components, method, density, seed, majority_sign_method, max_rank)
    # PEFT composes a single adapter linearly, whatever the method asked for.
    effective = "linear" if len(components) == 1 else method
    rank = _result_rank(components, effective, max_rank)
    shapes = _result_modules(components, module_order)
    generator = None
    if effective in _DARE:
        generator = torch.Generator().manual_seed(seed)
        _replay_injection_draws(generator, list(shapes.values()), rank)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in shapes:
        present = [(float(w), adapter) for adapter, w in components if name in adapter.modules]
        if effective == "cat":
            a, b = _concatenate(name, present, rank)
        else:
            a, b = _task_arithmetic(
                name, present, effective, density, majority_sign_method, generator
            )
        # A NaN or inf anywhere makes the sum non-finite; no mask tensor is needed to find it.
        if not (math.isfinite(a.sum()) and math.isfinite(b.sum())):
            raise CompositionError(
                f"{name}: the composed weights overflow float32; use smaller weights"
            )
        modules[name] = (a.contiguous(), b.contiguous())
        yield
    log.debug(
        "composed %d adapters by %s: rank %d, %d modules in %.3f s",
        len(components),
        effective,
        rank,
        len(modules),
        time.perf_counter() - started,
    )
    return AdapterWeights(
        modules=modules,
        rank=rank,
        lora_alpha=float(rank),
        target_modules=tuple(sorted({n.rsplit(".", 1)[-1] for n in modules})),
        scaling=1.0,
    )


# -- the request --------------------------------------------------------------------------------
def _check_request(
    components: Components,
    method: str,
    density: float | None,
    seed: int,
    majority_sign_method: str,
    max_rank: int | None,
) -> None:
    if method not in COMPOSE_METHODS:
        raise CompositionError(
            f"unknown composition method {method!r}; expected one of {', '.join(COMPOSE_METHODS)}"
        )
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise CompositionError(
            f"unknown majority_sign_method {majority_sign_method!r}; expected one of"
            f" {', '.join(MAJORITY_SIGN_METHODS)}"
        )
    if not components:
        raise CompositionError("composition needs at least one adapter")
    if method in _PRUNED:
        if density is None:
            raise CompositionError(f"{method} needs a density in (0, 1]")
        if not _is_real(density) or not 0.0 < density <= 1.0:
            raise CompositionError(
                f"density must be in (0, 1] (the fraction of entries kept), got {density!r}"
            )
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _SEED_LIMIT:
        raise CompositionError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if max_rank is not None and (
        not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1
    ):
        raise CompositionError(f"max_rank must be a positive integer, got {max_rank!r}")
    for i, (adapter, weight) in enumerate(components):
        if not _is_real(weight) or not math.isfinite(weight):
            raise CompositionError(f"adapter {i}: weight must be a finite number, got {weight!r}")
        if not math.isfinite(weight * adapter.scaling):
            raise CompositionError(f"adapter {i}: weight {weight!r} times its scaling overflows")
        if adapter.scaling == 0.0:
            # B was stored multiplied by 0, so the raw B that PEFT weights is gone.
            raise CompositionError(
                f"adapter {i} has lora_alpha 0, so it changes nothing and its B cannot be"
                " recovered; leave it out of the composition"
            )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _result_rank(components: Components, method: str, max_rank: int | None) -> int:
    """PEFT's rule: cat stacks the ranks; every other method needs one rank and keeps it."""
    ranks = [adapter.rank for adapter, _ in components]
    if method == "cat":
        rank = sum(ranks)
    elif len(set(ranks)) > 1:
        raise CompositionError(
            f"{method} composes adapters of one rank, got ranks {', '.join(map(str, ranks))};"
            " use 'cat' (whose rank is the sum of the ranks) for adapters of different ranks"
        )
    else:
        rank = ranks[0]
    if max_rank is not None and rank > max_rank:
        raise CompositionError(
            f"the composed adapter would have rank {rank}, over the limit of {max_rank}"
            + (" (cat adds up the ranks; compose fewer adapters)" if method == "cat" else "")
        )
    return rank


def _result_modules(
    components: Components, module_order: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Every module some input targets, in model order (the order PEFT composes them in), with
    its (in_features, out_features)."""
    position = {name: i for i, name in enumerate(module_order)}
    wanted = {name for adapter, _ in components for name in adapter.modules}
    unknown = sorted(wanted - position.keys())
    if unknown:
        raise CompositionError(f"module {unknown[0]!r} is not a module of the base model")
    return {
        name: _module_shape(components, name) for name in sorted(wanted, key=position.__getitem__)
    }


def _module_shape(components: Components, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a module, the same in every input that targets it."""
    shapes = {
        (a.shape[1], b.shape[0])
        for adapter, _ in components
        if name in adapter.modules
        for a, b in [adapter.modules[name]]
    }
    if len(shapes) != 1:
        raise CompositionError(f"{name}: the adapters disagree on its shape {sorted(shapes)}")
    return shapes.pop()


# -- the methods --------------------------------------------------------------------------------
def _raw_b(adapter: AdapterWeights, name: str) -> torch.Tensor:
    """The adapter's B before scaling (PEFT weights raw factors); exact up to float32 rounding
    (the scaling was folded in as float32, as validate.py does)."""
    return adapter.modules[name][1] / adapter.scaling


def _concatenate(
    name: str, present: list[tuple[float, AdapterWeights]], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cat: the weighted, scaled A's stacked by rows and the raw B's by columns, so that
    B A = sum_i w_i s_i B_i A_i. Inputs missing here leave zero rows at the end."""
    first_a, first_b = present[0][1].modules[name]
    a = first_a.new_empty(rank, first_a.shape[1])
    b = first_b.new_empty(first_b.shape[0], rank)
    row = 0
    for w, adapter in present:  # written in place: the result can be large (rank = sum)
        part_a, part_b = adapter.modules[name]
        rows = slice(row, row + part_a.shape[0])
        # (A * w) * s: PEFT's two float32 roundings, in its order.
        torch.mul(part_a, w, out=a[rows]).mul_(adapter.scaling)
        torch.div(part_b, adapter.scaling, out=b[:, rows])  # the raw B, as in _raw_b
        row = rows.stop
    a[row:].zero_()
    b[:, row:].zero_()
    return a, b


def _task_arithmetic(
    name: str,
    present: list[tuple[float, AdapterWeights]],
    method: str,
    density: float | None,
    majority_sign_method: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear, ties and DARE: A and B combined separately, A first (PEFT's RNG order), with
    sqrt|w s| on each and the sign of w s on A."""
    roots = [math.sqrt(abs(w * adapter.scaling)) for w, adapter in present]
    signs = [1.0 if w * adapter.scaling >= 0 else -1.0 for w, adapter in present]
    # float32 weight vectors, rounded from float64 like PEFT's torch.tensor(list of floats).
    weights_a = torch.tensor([r * s for r, s in zip(roots, signs, strict=True)])
    weights_b = torch.tensor(roots)
    a = _combine_factor(
        [adapter.modules[name][0] for _, adapter in present],
        weights_a,
        method,
        density,
        majority_sign_method,
        generator,
    )
    b = _combine_factor(
        [_raw_b(adapter, name) for _, adapter in present],
        weights_b,
        method,
        density,
        majority_sign_method,
        generator,
    )
    return a, b


def _combine_factor(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    density: float | None,
    majority_sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One factor (all A's or all B's of a module, each (r, d)) combined into one (r, d)."""
    if method in _DARE:
        assert density is not None and generator is not None
        tensors = [_drop_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, r, d)
    if method == "ties":
        assert density is not None
        stacked = _keep_largest(stacked, density)
    weighted = stacked * weights.view(-1, 1, 1)
    if method not in _ELECTED:
        return weighted.sum(dim=0)
    # Sign election on the unweighted tensors; entries of the losing sign (or zero) sit out,
    # and each entry is the mean over the inputs that kept it.
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    majority = torch.where(votes >= 0, 1, -1)
    agrees = signs == majority  # (n, r, d) bool
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _keep_largest(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """ties' pruning of each input (n, r, d): its int(density * r * d) entries of largest
    magnitude kept, the rest 0.

    One topk over all n rows (parallel across them) picks, row by row, the set PEFT's topk on
    each flattened tensor picks: on the CPU both run the same selection per row, and `sorted`
    only orders the chosen entries, so equal magnitudes at the cut are broken the same way.
    """
    if density >= 1.0:
        return stacked
    flat = stacked.reshape(stacked.shape[0], -1)
    k = int(density * flat.shape[1])
    chosen = torch.topk(flat.abs(), k=k, dim=1, largest=True, sorted=False).indices
    keep = torch.zeros_like(flat).scatter_(1, chosen, 1.0)
    return stacked * keep.view_as(stacked)


def _drop_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and the survivors scaled by 1/density,
    so the expectation is unchanged. At density 1 nothing is drawn (as in PEFT)."""
    if density >= 1.0:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _replay_injection_draws(
    generator: torch.Generator, shapes: list[tuple[int, int]], rank: int
) -> None:
    """Advance `generator` past the draws PEFT makes before its first DARE mask.

    add_weighted_adapter first injects the result adapter: per targeted module, in model order,
    nn.Linear(in, r) and nn.Linear(r, out) are built (each weight filled by kaiming_uniform_),
    then lora_A is filled by kaiming_uniform_ again (init_lora_weights=True, PEFT's default and
    what its saved configs carry). uniform_ takes one 32-bit draw per float32 element whatever
    the bounds, so filling a scratch tensor of the same size consumes the generator the same.
    shapes: (in_features, out_features) of each result module.
    """
    sizes = [n for d_in, d_out in shapes for n in (rank * d_in, d_out * rank, rank * d_in)]
    scratch = torch.empty(max(sizes, default=0), dtype=torch.float32)
    for n in sizes:
        scratch[:n].uniform_(generator=generator)
