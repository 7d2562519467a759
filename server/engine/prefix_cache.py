"""Automatic prefix caching: the keys and values of prompt prefixes computed once, reused by later
requests that start with the same tokens under the same adapter version, tenant and salt.

Blocks of BLOCK_TOKENS tokens, each named by a chained digest: block i's digest covers the
request's namespace (adapter version, tenant, cache salt), every token of blocks 0..i, through
block i-1's digest, keyed with a secret drawn at start (so nobody can forge another tenant's
names). A lookup walks the prompt's digests while they are cached; a hit's blocks are copied into
the new sequence's KV cache row (copy-into-row: rows stay what attention reads, see
kv_cache.py; with the paged cache, into the row's blocks), and its prefill starts after them.

Why copy-into-row and hashed blocks: on a CPU the engine's attention and its captured steps
read each sequence's row in place (no paged attention there), and a copy is paid once per
request, and it is small: a block of the embedded model is 16 x 23 KiB, copied at memory
speed (a 1,000-token prefix in about 3 ms, against about a second to compute it). With the
paged cache (a GPU's) a hit is copied into the sequence's blocks the same way; referencing
the cached blocks instead, which the block allocator's reference counts allow, is left for
later. Hashed blocks (vLLM's design) rather than a
radix tree (SGLang's): the same matches at block granularity, a flat dictionary to look up,
and eviction per block. 16 tokens as vLLM's blocks: a finer grain reuses more of a chat's
previous turns, a coarser one hashes and copies less; at 16 a 1,000-token prompt is 63 digests.

The blocks live in their own pool, carved out of the KV cache's budget (--prefix-cache-mb), so
admission never waits for cached entries: the least recently used blocks are evicted for new
ones, deepest first, so a chain is never left without its start. A sequence's blocks are
copied into its row at once: nothing holds a block while in use. A new version of an adapter
or its deletion drops its blocks (`drop`), which no request could reach any more.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraplex.core.types import AdapterKey
from loraplex.server.engine.kv_cache import CacheShape, zero_pages
from loraplex.server.engine.paged_kv import KVStore

BLOCK_TOKENS = 16


@dataclass(frozen=True)
class Namespace:
    """Whose prefixes these are: only requests of the same namespace share them."""

    adapter: AdapterKey | None  # None: the base model
    tenant: str = ""
    salt: str = ""  # the request's cache_salt (vLLM's), to keep even one tenant's apart

    def encode(self) -> bytes:
        adapter = f"{self.adapter.adapter_id}\0{self.adapter.version}" if self.adapter else ""
        return f"{adapter}\0{self.tenant}\0{self.salt}".encode()


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of them, found cached
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, shape: CacheShape, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"a prefix cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # a block's tokens (BLOCK_TOKENS, H_kv, D), as the paged cache lays them out
        size = (num_blocks, BLOCK_TOKENS, shape.kv_heads, shape.head_dim)
        # zero pages, backed as blocks are written (a CPU pool costs only what it holds)
        pools = [zero_pages(size, shape.dtype, device) for _ in range(2 * shape.num_layers)]
        self._maps = [region for _, region in pools if region is not None]
        self.keys = [tensor for tensor, _ in pools[: shape.num_layers]]
        self.values = [tensor for tensor, _ in pools[shape.num_layers :]]
        self._secret = os.urandom(16)
        self._index: dict[bytes, int] = {}  # digest -> block
        self._lru: OrderedDict[int, bytes] = OrderedDict()  # block -> digest, oldest first
        self._owner: dict[int, str] = {}  # block -> adapter id ("" for the base)
        self._free = list(range(num_blocks - 1, -1, -1))
        self.stats = PrefixStats()

    @property
    def used_blocks(self) -> int:
        return len(self._index)

    def digests(
        self, namespace: Namespace, tokens: list[int], known: list[bytes] | None = None
    ) -> list[bytes]:
        """The chained digest of each whole block of `tokens`; `known`: those of its first
        blocks, computed before (a sequence's chain grows with it, each block hashed once; a
        longer `known` is cut to the blocks `tokens` has)."""
        out = list(known or ())[: len(tokens) // BLOCK_TOKENS]
        parent = out[-1] if out else namespace.encode()
        for end in range(BLOCK_TOKENS * (len(out) + 1), len(tokens) + 1, BLOCK_TOKENS):
            block = array("q", tokens[end - BLOCK_TOKENS : end]).tobytes()
            digest = hashlib.blake2b(parent + block, digest_size=16, key=self._secret).digest()
            out.append(digest)
            parent = digest
        return out

    def load(self, namespace: Namespace, prompt: list[int], cache: KVStore, row: int) -> int:
        """Copy the longest cached prefix of `prompt` (whole blocks, leaving at least its last
        token to compute: its logits choose the first new token) into `row`; returns its
        length in tokens."""
        self.stats.queries += len(prompt)
        blocks = []
        for digest in self.digests(namespace, prompt[: len(prompt) - 1]):
            block = self._index.get(digest)
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return 0
        for block in reversed(blocks):  # the chain's start most recent: evicted last
            self._lru.move_to_end(block)
        n = len(blocks) * BLOCK_TOKENS
        index = torch.tensor(blocks, dtype=torch.long, device=self.keys[0].device)
        for layer in range(len(self.keys)):
            k, v = (  # the tokens' (n, H, D)
                pool[layer].index_select(0, index).flatten(0, 1)
                for pool in (self.keys, self.values)
            )
            cache.write_prefix(layer, row, k, v)
        self.stats.hits += n
        return n

    def store(self, namespace: Namespace, tokens: list[int], cache: KVStore, row: int) -> None:
        """Keep the whole blocks of `tokens`, whose keys and values are in `row` (its first
        len(tokens) positions), that are not cached yet (as many as the pool holds)."""
        self.store_many([(namespace, self.digests(namespace, tokens), row)], cache)

    def store_many(self, items: list[tuple[Namespace, list[bytes], int]], cache: KVStore) -> None:
        """`store` for several (namespace, the tokens' `digests`, row) at once: one gather and
        one copy per layer for all their new blocks (a step that ends many sequences pays for
        one)."""
        taken: list[int] = []
        sources: list[tuple[int, int]] = []  # (row, first position) of each new block
        named: list[tuple[bytes, str]] = []  # (digest, owner) of each new block
        chains: list[list[bytes]] = []
        for namespace, named_blocks, row in items:
            digests = named_blocks[: self.num_blocks]
            chains.append(digests)
            owner = namespace.adapter.adapter_id if namespace.adapter else ""
            chain = {self._index[d] for d in digests if d in self._index}
            pending = {d for d, _ in named}
            for i, digest in enumerate(digests):
                if digest in self._index or digest in pending:
                    continue
                if len(taken) >= self.num_blocks - len(chain):
                    break  # the pool is full of this step's own blocks
                taken.append(self._take_block(protect=chain | set(taken)))
                sources.append((row, i * BLOCK_TOKENS))
                named.append((digest, owner))
        if taken:
            self._copy_in(taken, sources, cache)
            for (digest, owner), block in zip(named, taken, strict=True):
                self._index[digest] = block
                self._lru[block] = digest
                self._owner[block] = owner
            self.stats.stored_blocks += len(taken)
        for digests in chains:
            for digest in reversed(digests):  # the chain's start most recent: evicted last
                found = self._index.get(digest)
                if found is not None:
                    self._lru.move_to_end(found)

    def _copy_in(self, blocks: list[int], sources: list[tuple[int, int]], cache: KVStore) -> None:
        """Copy each (row, position) block of the KV cache rows into its pool block."""
        device = self.keys[0].device
        index = torch.tensor(blocks, dtype=torch.long, device=device)
        rows = torch.tensor(
            [row for row, _ in sources for _ in range(BLOCK_TOKENS)],
            dtype=torch.long,
            device=device,
        )
        positions = torch.tensor(
            [start + t for _, start in sources for t in range(BLOCK_TOKENS)],
            dtype=torch.long,
            device=device,
        )
        places = cache.token_index(rows, positions)
        n = len(blocks)
        for layer in range(len(self.keys)):
            taken = cache.read(layer, places)  # the tokens' (n * B, H, D) each
            for pool, tokens in zip((self.keys, self.values), taken, strict=True):
                pool[layer].index_copy_(0, index, tokens.unflatten(0, (n, BLOCK_TOKENS)))

    def _take_block(self, protect: set[int]) -> int:
        if self._free:
            return self._free.pop()
        for block in self._lru:  # least recently used first
            if block not in protect:
                self._release(block)
                self.stats.evicted_blocks += 1
                return self._free.pop()
        raise RuntimeError("no prefix cache block to take")

    def _release(self, block: int) -> None:
        digest = self._lru.pop(block)
        del self._index[digest]
        del self._owner[block]
        self._free.append(block)

    def drop(self, adapter_id: str) -> int:
        """Forget every block made under `adapter_id` (a new version, or it was deleted);
        returns how many."""
        blocks = [b for b, owner in self._owner.items() if owner == adapter_id]
        for block in blocks:
            self._release(block)
        return len(blocks)
