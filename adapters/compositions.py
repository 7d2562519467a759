"""Composed adapters: several registered adapters combined into one for a request (as LoRAX
does), with PEFT's `add_weighted_adapter` semantics (the math is adapters/compose.py).

A composition is named by a derived id, "composed-" and a hash of what determines its weights:
each input (owner, id and content digest) and weight, the method, and only the parameters that
method reads.
The same inputs give the same id, and (the build being deterministic, DARE's masks included)
the same weights. The table of compositions is this replica's, in memory, least recently used
out beyond `max_entries` in all and `per_tenant` of any one tenant's making (a tenant minting
compositions pushes out its own, never another's); the weights live in the host cache like any
adapter's (counted in its budget, evictable, rebuilt from the inputs when wanted again) and in
a device slot while requests use them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from loraplex.adapters.compose import COMPOSE_METHODS, MAJORITY_SIGN_METHODS
from loraplex.core.errors import InvalidRequest, shown
from loraplex.core.types import AdapterVersion

COMPOSED_PREFIX = "composed-"
COMPOSED_ID = re.compile(r"composed-[0-9a-f]{24}")  # a derived id, fullmatched (see describe)
MAX_INPUTS = 16
MAX_PER_TENANT = 64  # compositions of one tenant's making kept at once
_USES_DENSITY = ("ties", "dare_linear", "dare_ties")
_USES_SEED = ("dare_linear", "dare_ties")
_USES_SIGN = ("ties", "dare_ties")


@dataclass(frozen=True)
class WeightedAdapter:
    adapter_id: str
    weight: float


@dataclass(frozen=True)
class CompositionRequest:
    """What a request asks to compose: weighted adapters, and how."""

    adapters: tuple[WeightedAdapter, ...]
    method: str = "linear"
    density: float | None = None
    seed: int = 0
    majority_sign_method: str = "total"

    def check(self) -> None:
        """Refuse what no composition could serve, before anything is looked up."""
        if not 2 <= len(self.adapters) <= MAX_INPUTS:
            raise InvalidRequest(
                "compose.adapters", f"give 2 to {MAX_INPUTS} adapters, got {len(self.adapters)}"
            )
        for i, weighted in enumerate(self.adapters):
            adapter_id, weight = weighted.adapter_id, weighted.weight
            if not adapter_id:
                raise InvalidRequest(f"compose.adapters[{i}].adapter_id", "empty")
            if not math.isfinite(weight) or weight == 0:
                raise InvalidRequest(
                    f"compose.adapters[{i}].weight", f"must be finite and non-zero, got {weight}"
                )
        if self.method not in COMPOSE_METHODS:
            raise InvalidRequest(
                "compose.method",
                f"must be one of {', '.join(COMPOSE_METHODS)}, got {shown(self.method)}",
            )
        if self.method in _USES_DENSITY:
            if self.density is None:
                raise InvalidRequest("compose.density", f"required by {self.method}, in (0, 1]")
            if not 0 < self.density <= 1:
                raise InvalidRequest("compose.density", f"must be in (0, 1], got {self.density}")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise InvalidRequest(
                "compose.majority_sign_method",
                f"must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
                f"got {shown(self.majority_sign_method)}",
            )
        if not 0 <= self.seed < 1 << 63:
            raise InvalidRequest("compose.seed", f"must be in [0, 2^63), got {self.seed}")


@dataclass(frozen=True)
class Composition:
    """A composition resolved to input versions, and the derived adapter it serves as."""

    inputs: tuple[AdapterVersion, ...]
    weights: tuple[float, ...]
    method: str
    density: float | None
    seed: int
    majority_sign_method: str
    version: AdapterVersion  # the derived adapter, as the caches and the engine see it


def describe(
    request: CompositionRequest,
    inputs: list[AdapterVersion],
    fingerprint: str,
    max_rank: int,
) -> Composition:
    """The composition of `inputs` (resolved, in request order) as `request` asks; the rank
    rules are checked here, from the manifests, before any weights are read."""
    method = request.method
    ranks = [v.rank for v in inputs]
    if method == "cat":
        rank = sum(ranks)
    elif len(set(ranks)) != 1:
        listed = ", ".join(f"{v.adapter_id}: {v.rank}" for v in inputs)
        raise InvalidRequest(
            "compose.adapters",
            f"{method} needs inputs of one rank (got {listed}); 'cat' composes any ranks",
        )
    else:
        rank = ranks[0]
    if rank > max_rank:
        raise InvalidRequest(
            "compose.adapters",
            f"the composed adapter would have rank {rank}, over the server's max rank {max_rank}",
        )
    weights = tuple(float(a.weight) for a in request.adapters)
    density = request.density if method in _USES_DENSITY else None
    seed = request.seed if method in _USES_SEED else 0
    sign = request.majority_sign_method if method in _USES_SIGN else "total"
    identity = {
        # Whose adapters too, not only their content: two tenants composing identical
        # adapters of their own get compositions of their own.
        "inputs": [
            [v.tenant, v.adapter_id, v.digest, w] for v, w in zip(inputs, weights, strict=True)
        ],
        "method": method,
        "density": density,
        "seed": seed,
        "majority_sign_method": sign,
        "base": fingerprint,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    targets = sorted({t for v in inputs for t in v.target_modules})
    version = AdapterVersion(
        adapter_id=COMPOSED_PREFIX + digest[:24],
        version=1,
        digest=f"composed:{digest}",
        rank=rank,
        lora_alpha=float(rank),  # PEFT gives the result alpha = r: scaling 1
        target_modules=tuple(targets),
        size_bytes=0,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source=f"composed:{method}",
        base_model_fingerprint=fingerprint,
    )
    return Composition(
        inputs=tuple(inputs),
        weights=weights,
        method=method,
        density=density,
        seed=seed,
        majority_sign_method=sign,
        version=version,
    )


def is_composed_id(adapter_id: str) -> bool:
    return adapter_id.startswith(COMPOSED_PREFIX)


class Compositions:
    """The compositions this replica knows, by derived id (thread-safe)."""

    def __init__(self, max_entries: int = 4096, per_tenant: int = MAX_PER_TENANT) -> None:
        self.max_entries = max_entries
        self.per_tenant = per_tenant
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Composition] = OrderedDict()
        self._maker: dict[str, str] = {}  # derived id -> the tenant whose request made it

    def add(self, composition: Composition, tenant: str = "") -> tuple[Composition, list[str]]:
        """Remember `composition`, made by a request of `tenant`; the one already known under
        its id wins (its created_at and version object stay stable for the caches). Returns it
        and the content digests of the compositions pushed out to make room (the oldest of
        `tenant`'s own beyond `per_tenant`, the least recently used of all beyond
        `max_entries`)."""
        key = composition.version.adapter_id
        with self._lock:
            known = self._entries.get(key)
            if known is not None:
                self._entries.move_to_end(key)
                return known, []
            self._entries[key] = composition
            self._maker[key] = tenant
            gone: list[str] = []
            if tenant:  # without API keys every caller is "": the table's own bound is enough
                mine = [k for k in self._entries if self._maker[k] == tenant]  # least recent first
                for old in mine[: max(0, len(mine) - self.per_tenant)]:
                    gone.append(self._drop(old).version.digest)
            while len(self._entries) > self.max_entries:
                gone.append(self._drop(next(iter(self._entries))).version.digest)
            return composition, gone

    def _drop(self, key: str) -> Composition:
        """Under the lock: forget one composition."""
        del self._maker[key]
        return self._entries.pop(key)

    def get(self, derived_id: str) -> Composition | None:
        with self._lock:
            found = self._entries.get(derived_id)
            if found is not None:
                self._entries.move_to_end(derived_id)
            return found

    def forget_input(self, adapter_id: str) -> list[Composition]:
        """Drop (and return) every composition with an input named `adapter_id`."""
        with self._lock:
            gone = [
                c
                for c in self._entries.values()
                if any(v.adapter_id == adapter_id for v in c.inputs)
            ]
            for c in gone:
                self._drop(c.version.adapter_id)
            return gone

    def input_ids(self) -> set[str]:
        """The adapter ids the known compositions are made of."""
        with self._lock:
            return {v.adapter_id for c in self._entries.values() for v in c.inputs}

    def __len__(self) -> int:
        return len(self._entries)
