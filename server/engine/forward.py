"""The decoder forward pass over one step's flat token batch, for the Llama family (Llama,
Mistral, Qwen2), reading the HF model's own modules (4-bit or not) and weights.

A step's N tokens are not padded: the first n_decode are one token per decoding sequence, then
come prompt chunks, contiguous per sequence. Linear layers (and LoRA) run on all N tokens at
once; attention reads the KV cache rows. Where the native kernel has a vector version (a CPU
with AVX2 or AVX-512, heads of 64 or 128) all N tokens attend in one call, each against its
own row up to its own position. Elsewhere (a GPU, or no native kernels), torch's ops:

    decode   q (n_decode, H, D) against the pool prefix view [:rows, :, :L], one batched matmul
             (grouped-query: the g = H / H_kv query heads of a KV head share its keys, no copy)
    prefill  per chunk, q (n, H, D) against its row's first start + n tokens, causal

With the paged cache (paged_kv.py: a GPU's) the Triton kernel attends every token of the step
in one launch (triton_attention.py), or torch's ops read the same blocks gathered per step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.errors import OverMemoryBudget
from loraplex.core.model import dense_weight
from loraplex.server.engine.cpu_kernels import DTYPES, NATIVE_ROW_MAX, CpuKernels
from loraplex.server.engine.kv_cache import CacheShape, write_layer
from loraplex.server.engine.linear import BaseLinears, Unit
from loraplex.server.engine.lora import LoraGroup, LoraStacks
from loraplex.server.engine.lora_ops import PoolPlan, add_step_lora
from loraplex.server.engine.paged_attention import PagedQueries
from loraplex.server.engine.paged_kv import KVStore, PagedKVCache, write_blocks
from loraplex.server.engine.step_program import DecodeProgram, capture, replayable

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SMALL_ATTENTION_TOKENS = 512  # decode attention over at most this many cached tokens: float32
SILU_MODULES = ("SiLU", "SiLUActivation")  # the MLP activations that are x * sigmoid(x)
DYNAMIC_ROPE = ("dynamic", "longrope")  # rotary types whose frequencies follow the length


@dataclass(frozen=True)
class PromptChunk:
    row: int  # KV cache row of the sequence
    start: int  # position of the chunk's first token in the sequence
    offset: int  # index of its first token in the flat batch
    length: int


@dataclass(frozen=True)
class StepBatch:
    ids: torch.Tensor  # (N,) token ids
    positions: torch.Tensor  # (N,) position of each token in its sequence
    rows: torch.Tensor  # (N,) KV cache row of each token
    cache_index: torch.Tensor  # (N * H_kv,) where each token's keys/values go in the cache
    n_decode: int
    decode_lengths: torch.Tensor  # (n_decode,) cached tokens after this step = position + 1
    max_decode_length: int
    num_rows: int  # rows in use: decode attention reads rows [0, num_rows)
    chunks: list[PromptChunk]
    logits_index: torch.Tensor  # (M,) tokens whose next-token logits are wanted
    lora: tuple[PoolPlan, ...]  # each pool's part of the step's LoRA (empty: none)
    # With an adapter merged into the base: its delta, subtracted for every other token.
    unmerge: tuple[PoolPlan, ...] = ()
    # Decode token i is in cache row i, and every row in use decodes (n_decode == num_rows).
    rows_in_order: bool = False
    # The paged cache's block tables (max_seqs, max_blocks) and, for the Triton kernel, the
    # step's query tiles (None: torch's ops over blocks gathered per step).
    block_tables: torch.Tensor | None = None
    paged: PagedQueries | None = None


def lora_layout(model: nn.Module) -> list[dict[str, tuple[int, list[tuple[str, int]]]]]:
    """The fused LoRA groups of every decoder layer: q/k/v share one shrink, gate/up another."""
    layout = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"

        def out(module: nn.Module) -> int:
            return int(module.out_features)

        sa, m = layer.self_attn, layer.mlp
        layout.append(
            {
                "qkv": (
                    int(sa.q_proj.in_features),
                    [
                        (f"{attn}.q_proj", out(sa.q_proj)),
                        (f"{attn}.k_proj", out(sa.k_proj)),
                        (f"{attn}.v_proj", out(sa.v_proj)),
                    ],
                ),
                "o": (int(sa.o_proj.in_features), [(f"{attn}.o_proj", out(sa.o_proj))]),
                "gate_up": (
                    int(m.gate_proj.in_features),
                    [(f"{mlp}.gate_proj", out(m.gate_proj)), (f"{mlp}.up_proj", out(m.up_proj))],
                ),
                "down": (int(m.down_proj.in_features), [(f"{mlp}.down_proj", out(m.down_proj))]),
            }
        )
    return layout


def fused_groups(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    """The layers that read one input, run as one where their weights allow (BaseLinears):
    each decoder layer's q/k/v and its gate/up (the LoRA groups that share a shrink)."""
    groups: list[tuple[nn.Module, ...]] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups += [(attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)]
    return groups


def cache_shape(model: nn.Module, dtype: torch.dtype) -> CacheShape:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return CacheShape(
        num_layers=config.num_hidden_layers,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        dtype=dtype,
    )


def check_supported(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; loraplex serves "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


@dataclass(frozen=True)
class _DecodeMask:
    gathered: bool  # attention reads copies of the decoding rows, not the pool's view
    bias: torch.Tensor  # (rows or B, 1, 1, L) float32: 0 where a row sees a key, else -inf


@dataclass(frozen=True)
class _AttentionMasks:
    """A step's attention masks, the same in every layer: built once per step. Where the
    native kernel attends every token of the step in one call, no mask: each token's length."""

    decode: _DecodeMask | None
    chunks: list[torch.Tensor]  # per prompt chunk, (n, T) float32: 0, or -inf for the future
    lengths: torch.Tensor | None = None  # (N,) keys each token sees: its position + 1

    @classmethod
    def of(
        cls, batch: StepBatch, every_token_native: bool, gathered: bool | None = None
    ) -> _AttentionMasks:
        """`gathered`: decode attention reads copies of the decoding rows (None: where they
        are at most half the rows in use)."""
        if every_token_native:
            return cls(None, [], batch.positions + 1)
        b, rows, length = batch.n_decode, batch.num_rows, batch.max_decode_length
        device = batch.ids.device
        if gathered is None:
            gathered = 2 * b <= rows
        if gathered:
            lengths = batch.decode_lengths
        else:  # every row of the pool's view; rows not decoding see their first key only
            lengths = torch.ones(rows, dtype=torch.long, device=device)
            lengths[batch.rows[:b]] = batch.decode_lengths
        hidden = torch.arange(length, device=device) >= lengths.unsqueeze(1)  # (rows, L)
        decode = _DecodeMask(gathered, _additive(hidden)[:, None, None, :])
        chunks = []
        for chunk in batch.chunks:
            total = chunk.start + chunk.length
            pos = torch.arange(chunk.start, total, device=device)
            chunks.append(_additive(torch.arange(total, device=device) > pos.unsqueeze(1)))
        return cls(decode, chunks)


def _additive(hidden: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: not seen) as float32 0 / -inf, to add to attention scores."""
    return torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).masked_fill_(
        hidden, -torch.inf
    )


class _LayerParts:
    """One decoder layer as the forward reads it, resolved once: its norms, the kernel of each
    of its units (q/k/v and gate/up each one call, their outputs side by side; BaseLinears'
    choice, or a merged copy while an adapter is merged), its KV cache and its index (the layer
    of its LoRA groups in each adapter pool)."""

    def __init__(
        self,
        layer: nn.Module,
        linears: BaseLinears,
        keys: torch.Tensor,
        values: torch.Tensor,
        index: int,
    ) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = _Norm(layer.input_layernorm, linears.native)
        self.post_norm = _Norm(layer.post_attention_layernorm, linears.native)
        self.modules: dict[str, nn.Module] = {
            "q": attn.q_proj,
            "k": attn.k_proj,
            "v": attn.v_proj,
            "o": attn.o_proj,
            "gate": mlp.gate_proj,
            "up": mlp.up_proj,
            "down": mlp.down_proj,
        }
        m = self.modules
        self.units: dict[str, Unit] = {
            "qkv": (m["q"], m["k"], m["v"]),
            "o": m["o"],
            "gate_up": (m["gate"], m["up"]),
            "down": m["down"],
        }
        self.linear: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            name: linears.kernel(unit) for name, unit in self.units.items()
        }
        # the widths of q, k and v in the qkv unit's output; gate's (= up's) in gate_up's
        self.qkv_split = [int(m[key].out_features) for key in ("q", "k", "v")]
        self.mlp_width = int(m["gate"].out_features)
        self.act: Callable[[torch.Tensor], torch.Tensor] = mlp.act_fn
        self.silu = type(mlp.act_fn).__name__ in SILU_MODULES
        self.keys, self.values = keys, values
        self.index = index


class _Norm:
    """An RMSNorm module's weight and epsilon (the family's own, read once)."""

    def __init__(self, norm: nn.Module, native: CpuKernels | None = None) -> None:
        self.weight: torch.Tensor = norm.weight
        self.eps = float(norm.variance_epsilon)
        self.native = native if self.weight.dtype in DTYPES else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """torch's fused kernel, one op instead of about seven: HF's values in float32,
        within one rounding in bf16 (tested)."""
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def after(self, h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """h += delta (the residual add, when given) in place, then the norm of h: one native
        call where the kernels are built."""
        native = self.native
        if native is not None and h.shape[-1] <= NATIVE_ROW_MAX:
            ready = h.dtype == self.weight.dtype and h.is_contiguous()
            if ready and (delta is None or delta.is_contiguous()):
                return native.add_rms_norm(h, delta, self.weight, self.eps)
        if delta is not None:
            h += delta
        return self(h)


MergeInputs = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A, B^T) copies


@dataclass(frozen=True)
class PreparedMerge:
    """An adapter folded into the base layers it targets, ready to serve (install_merge)."""

    modules: frozenset[nn.Module]  # the base linear layers merged
    # (layer index, unit key) -> the merged unit's kernel
    linears: dict[tuple[int, str], Callable[[torch.Tensor], torch.Tensor]]


class MergeUnit(NamedTuple):
    """A unit of the base a merge copies: layer index, unit key, the unit, its members."""

    layer: int
    key: str
    unit: Unit
    members: tuple[nn.Module, ...]


class DecoderForward:
    def __init__(
        self,
        model: nn.Module,
        cache: KVStore,
        lora: LoraStacks,
        linears: BaseLinears,
        compile: bool = True,
    ) -> None:
        self.model = model  # a supported family: ModelRunner checks before building the cache
        self.cache = cache
        self.lora = lora
        config = model.config
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = cache.shape.head_dim
        self.group = self.num_heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.linears = linears
        self.dtype = linears.dtype
        self.native = linears.native  # the native CPU kernels (None: not built, or a GPU)
        # paged: attention reads blocks (the Triton kernel, or torch's ops); the native
        # kernels read rows
        self.paged = isinstance(cache, PagedKVCache)
        self.native_attention = None if self.paged else self.native
        # decode attention natively up to this many row-tokens (b x L); without a limit, a
        # step's every token (prompt chunks too: causal, by each token's position) in one call
        native = self.native_attention
        self.attention_limit = native.attention_limit(self.head_dim) if native is not None else 0.0
        # cos and sin (max_len, D) of every position, computed once by the model's own rotary
        # module (None for rotary types that change with the length: computed per step)
        self.rope_table = _rope_table(model, cache.max_len, linears.dtype, cache.device)
        # captured decode steps by token count (step_program.py); --no-compile: none
        self.compile = compile and self.native_attention is not None
        self.programs: dict[int, DecodeProgram | None] = {}
        inner = model.model
        self.layers = [
            _LayerParts(layer, linears, cache.keys[i], cache.values[i], i)
            for i, layer in enumerate(inner.layers)
        ]
        self.block_size = cache.block_size if isinstance(cache, PagedKVCache) else 0
        self.final_norm = _Norm(inner.norm)
        self.lm_head = linears.head(model.lm_head)
        # Layers with an adapter folded in (their units run W + B @ A dense: see merge).
        self.merged: set[nn.Module] = set()

    def release_cache(self) -> None:
        """Let go of the cache's pools (before the paged cache re-allocates them: the old
        ones are freed first); rebind_cache reads the new ones."""
        for parts in self.layers:
            parts.keys = parts.values = torch.empty(0)

    def rebind_cache(self) -> None:
        """Read the cache's pools again (the paged cache re-allocates them when resized)."""
        for i, parts in enumerate(self.layers):
            parts.keys, parts.values = self.cache.keys[i], self.cache.values[i]

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        """A base linear layer's weight (out, in) as the forward computes with it: 4-bit
        weights dequantized in the compute dtype, others as they are."""
        weight = self.linears.weight(module)
        return weight if weight is not None else dense_weight(module)

    def merge(self, slot: int) -> int:
        """Fold the adapter in `slot` into the base, at once (see merge_steps). Returns the
        number of layers merged."""
        steps = self.merge_steps(self.merge_inputs(slot))
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return self.install_merge(done.value)

    def merge_inputs(self, slot: int) -> MergeInputs:
        """A copy of the adapter in `slot`, per layer it targets: (A (R, in), B^T (R, out)).
        On the engine thread: the stacks may be compacted later, the copy stays as it is."""
        return {
            m: (group.a(local, member).clone(), group.bt(member, local).clone())
            for m, group, local, member in self._adapter_layers(slot)
        }

    def merge_targets(self, slot: int) -> set[nn.Module]:
        """The base layers the adapter in `slot` targets (what check_merge needs; no copy)."""
        return {m for m, _, _, _ in self._adapter_layers(slot)}

    def _adapter_layers(self, slot: int) -> Iterator[tuple[nn.Module, LoraGroup, int, int]]:
        """Each layer the adapter in `slot` targets, with the group that holds it, its local
        slot there and its member."""
        placed = self.lora.locate(slot)
        if placed is None:  # an adapter of rank 0: nothing to fold in
            return
        pool, local = placed
        by_name = dict(self.model.named_modules())
        for name, (layer, gname, member) in self.lora.modules.items():
            group = pool.groups[layer][gname]
            if group.blocks[member][local].any():  # else not targeted by this adapter
                yield by_name[name], group, local, member

    def merge_steps(self, inputs: MergeInputs) -> Generator[None, None, PreparedMerge]:
        """The layers with the adapter (`merge_inputs`) folded in, one unit (a projection, or
        the projections fused over one input) per step: the generator yields after each and
        returns them. Every layer the adapter targets gets a dense copy W + B @ A (the sum in
        float32, kept in the compute dtype: the higher-precision copy of a 4-bit base, whose
        4-bit weights stay untouched for unmerging), laid out as the layer's own copy (packed
        where it is). It reads only the base's weights and `inputs`, which do not change, so
        the engine may run steps between two of its steps. The copies count against the
        dense budget: a merge that would pass it raises OverMemoryBudget here (check_merge),
        before any copy is made."""
        return self._merge_units(inputs, self.check_merge(inputs.keys()))

    def check_merge(self, targets: Collection[nn.Module]) -> list[MergeUnit]:
        """The units a merge of an adapter targeting `targets` copies (`merge_copy_bytes`);
        OverMemoryBudget where the copies do not fit the dense budget
        (`BaseLinears.merge_room`)."""
        units = [
            MergeUnit(i, key, unit, unit if isinstance(unit, tuple) else (unit,))
            for i, parts in enumerate(self.layers)
            for key, unit in parts.units.items()
        ]
        units = [u for u in units if any(m in targets for m in u.members)]
        nbytes, room = self.merge_copy_bytes(units), self.linears.merge_room()
        if nbytes > room:
            raise OverMemoryBudget(
                f"merging needs {nbytes / 2**20:.1f} MiB of dense copies and the dense budget "
                f"has {room / 2**20:.1f} MiB beside the base's copies (--dense-cache-mb)"
            )
        return units

    def merge_copy_bytes(self, units: Iterable[MergeUnit]) -> int:
        """The bytes of the dense copies of `units`, in the compute dtype."""
        element = torch.empty((), dtype=self.linears.dtype).element_size()
        return sum(m.in_features * m.out_features for u in units for m in u.members) * element

    def _merge_units(
        self, inputs: MergeInputs, units: list[MergeUnit]
    ) -> Generator[None, None, PreparedMerge]:
        """merge_steps' generator: one unit per step."""
        linears = {}
        modules = set()
        for i, key, unit, members in units:
            weights = []
            for m in members:
                base = self.dense_weight(m)  # in the compute dtype
                if m in inputs:
                    a, bt = inputs[m]
                    delta = bt.float().T @ a.float()  # (out, in)
                    base = (base.float() + delta).to(base.dtype)
                    modules.add(m)
                weights.append(base)
            linears[(i, key)] = self.linears.merged(unit, torch.cat(weights))
            yield
        return PreparedMerge(frozenset(modules), linears)

    def install_merge(self, prepared: PreparedMerge) -> int:
        """Serve with a prepared merge (engine thread, between steps; no tensor work). Requests
        for other adapters then subtract its delta (StepBatch.unmerge). Returns the number of
        layers merged."""
        self.unmerge()
        self.merged = set(prepared.modules)
        for (i, key), linear in prepared.linears.items():
            self.layers[i].linear[key] = linear
        return len(prepared.modules)

    def unmerge(self) -> None:
        """Back to the untouched base weights (the dense copies are dropped)."""
        self.merged = set()
        for parts in self.layers:
            for key, unit in parts.units.items():
                parts.linear[key] = self.linears.kernel(unit)

    @torch.inference_mode()
    def __call__(self, batch: StepBatch) -> torch.Tensor:
        """Runs the step, writing its keys/values into the cache; returns float32 logits (M, V)."""
        program = self._program(batch) if self.compile else None
        h = program.run(batch) if program is not None else self.eager(batch)
        h = self.final_norm(h.index_select(0, batch.logits_index))  # (M, hidden)
        return self.lm_head(h).float()

    def _program(self, batch: StepBatch) -> DecodeProgram | None:
        """The captured program for this step, captured at its first use (about a
        millisecond), or None where the step runs eagerly."""
        if not replayable(self, batch):
            return None
        n = batch.ids.shape[0]
        program = self.programs.get(n)
        if program is not None and program.lora_generation != self.lora.generation:
            program = None  # the LoRA stacks were re-allocated since
        if program is None and (n not in self.programs or self.programs[n] is not None):
            program = capture(self, n)
            self.programs[n] = program
            log.debug("decode step of %d tokens: %s", n, "captured" if program else "eager")
        return program

    def eager(self, batch: StepBatch) -> torch.Tensor:
        """The step op by op (the reference, and every step a program does not take): writes
        its keys/values into the cache; returns the hidden states (N, hidden) after the last
        layer, before the final norm."""
        inner = self.model.model
        h = inner.embed_tokens(batch.ids)  # (N, hidden)
        if self._fused_rope(batch):  # the Triton kernel reads the table at each position
            cos, sin = self.rope_table
        elif self.rope_table is not None:
            cos = self.rope_table[0].index_select(0, batch.positions).unsqueeze(1)  # (N, 1, D)
            sin = self.rope_table[1].index_select(0, batch.positions).unsqueeze(1)
        else:
            cos, sin = inner.rotary_emb(h.unsqueeze(0), batch.positions.unsqueeze(0))  # (1, N, D)
            cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (N, 1, D)
        # the same for every layer: built once per step
        native = self.native_attention
        if batch.paged is not None:  # the Triton kernel masks by position
            masks = _AttentionMasks(None, [])
        else:
            every_token = native is not None and native.attends_every_token(self.head_dim)
            masks = _AttentionMasks.of(batch, every_token, gathered=self.paged or None)
        delta: torch.Tensor | None = None  # the last layer's output, added with the next norm
        for parts in self.layers:
            delta = self.layer(parts, h, delta, cos, sin, batch, masks)
        if delta is not None:
            h += delta
        return h

    def layer(
        self,
        parts: _LayerParts,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: StepBatch,
        masks: _AttentionMasks,
    ) -> torch.Tensor:
        """One decoder layer on the step's hidden states h (N, hidden), updated in place: the
        previous layer's output `delta` is added first (with this layer's first norm, one
        kernel for a few tokens); returns this layer's MLP output, for the next to add."""
        x = parts.input_norm.after(h, delta)
        attention = self._attention(parts, x, cos, sin, batch, masks)
        x = parts.post_norm.after(h, attention)
        return self._mlp(parts, x, batch)

    def _attention(
        self,
        parts: _LayerParts,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: StepBatch,
        masks: _AttentionMasks,
    ) -> torch.Tensor:
        n, linear = x.shape[0], parts.linear
        # q, k and v: column ranges of one output (N, q + k + v), rotated and read in place
        q, k, v = linear["qkv"](x).split(parts.qkv_split, dim=1)
        _add_lora([q, k, v], x, parts.index, "qkv", batch)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.kv_heads, self.head_dim)
        v = v.view(n, self.kv_heads, self.head_dim)
        if self._fused_rope(batch):  # rotated, and k and v stored in the blocks: one launch
            _triton_rope_cache()(
                q, k, v, cos, sin, batch.positions, batch.cache_index, parts.keys, parts.values
            )
        else:
            q = self._rope_and_write(parts, q, k, v, cos, sin, batch)
        native = self.native_attention
        if batch.paged is not None:  # every token in one launch
            assert batch.block_tables is not None
            out = _triton_attention()(
                q, parts.keys, parts.values, batch.block_tables, batch.paged, self.scaling
            )
        elif masks.lengths is not None:  # natively, each token against its own row, in place
            assert native is not None
            out = native.decode_attention(
                q, parts.keys, parts.values, batch.rows, masks.lengths, self.scaling
            )
        else:
            out = q.new_empty((n, self.num_heads, self.head_dim))
            if batch.n_decode:
                assert masks.decode is not None
                out[: batch.n_decode] = self._decode_attention(
                    parts, q[: batch.n_decode], batch, masks.decode
                )
            for chunk, future in zip(batch.chunks, masks.chunks, strict=True):
                span = slice(chunk.offset, chunk.offset + chunk.length)
                keys, values = self._chunk_keys(parts, chunk, batch)
                out[span] = self._prefill_attention(q[span], keys, values, future)
        o_in = out.view(n, -1)
        o = linear["o"](o_in)
        _add_lora([o], o_in, parts.index, "o", batch)
        return o

    def _decode_attention(
        self, parts: _LayerParts, q: torch.Tensor, batch: StepBatch, mask: _DecodeMask
    ) -> torch.Tensor:
        """q (B, H, D) of the decode tokens, sequence i in row rows[i]; returns (B, H, D)."""
        b, rows, length = batch.n_decode, batch.num_rows, batch.max_decode_length
        decode_rows = batch.rows[:b]
        native = self.native_attention
        if native is not None and b * length <= self.attention_limit:
            # each token's own row and length, read in place: no copy, no mask
            return native.decode_attention(
                q, parts.keys, parts.values, decode_rows, batch.decode_lengths, self.scaling
            )
        if mask.gathered:  # few rows decode (a prefill step), or blocks: read only theirs
            return self._decode_attention_gathered(parts, q, batch, mask)
        keys = parts.keys[:rows, :, :length]  # (rows, H_kv, L, D), a view
        values = parts.values[:rows, :, :length]
        if batch.rows_in_order:  # decode token i is in row i, for every row: no scatter
            qg = q.view(b, self.kv_heads, self.group, self.head_dim)
            out = attend(qg, keys, values, mask.bias, self.scaling)
            return out.view(b, self.num_heads, self.head_dim)
        qg = q.new_zeros(rows, self.kv_heads, self.group, self.head_dim)  # (rows, H_kv, g, D)
        qg[decode_rows] = q.view(b, self.kv_heads, self.group, self.head_dim)
        out = attend(qg, keys, values, mask.bias, self.scaling)  # (rows, H_kv, g, D)
        return out[decode_rows].view(b, self.num_heads, self.head_dim)

    def _decode_attention_gathered(
        self, parts: _LayerParts, q: torch.Tensor, batch: StepBatch, mask: _DecodeMask
    ) -> torch.Tensor:
        """_decode_attention over copies of the decoding rows only: cheaper than the whole
        pool's view (which the batched matmul copies anyway) when they are at most half, and
        the paged cache's way (its masks are always gathered)."""
        b, length = batch.n_decode, batch.max_decode_length
        decode_rows = batch.rows[:b]
        if self.paged:  # (B, H_kv, L, D) each
            keys, values = self._gather_blocks(parts, decode_rows, length, batch)
        else:
            keys = parts.keys[:, :, :length].index_select(0, decode_rows)
            values = parts.values[:, :, :length].index_select(0, decode_rows)
        qg = q.view(b, self.kv_heads, self.group, self.head_dim)
        out = attend(qg, keys, values, mask.bias, self.scaling)
        return out.view(b, self.num_heads, self.head_dim)

    def _rope_and_write(
        self,
        parts: _LayerParts,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """q and k rotated (q returned: in place where native), k and v written into the
        cache at the step's places."""
        native = self.native
        if native is not None and q.dtype == cos.dtype:  # q, k: token rows of the qkv output
            native.rope_qk(q, k, cos, sin)  # in place
        else:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        native = self.native_attention
        if self.paged:
            write_blocks(parts.keys, parts.values, batch.cache_index, k, v)
        elif native is not None:  # k (rotated) and v are token rows in the cache's dtype
            native.kv_write(parts.keys, parts.values, k, v, batch.rows, batch.positions)
        else:
            write_layer(parts.keys, parts.values, batch.cache_index, k, v)
        return q

    def _fused_rope(self, batch: StepBatch) -> bool:
        """Whether the step's rotary embedding and cache writes run in one Triton launch per
        layer (the Triton path, with the model's table of every position)."""
        return batch.paged is not None and self.rope_table is not None

    def _gather_blocks(
        self, parts: _LayerParts, rows: torch.Tensor, length: int, batch: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` keys and values of each of `rows` (R,), copied out of their
        blocks: (R, H_kv, L, D) each."""
        assert batch.block_tables is not None
        blocks = batch.block_tables[rows, : -(-length // self.block_size)].long()  # (R, nb)
        keys = parts.keys[blocks].flatten(1, 2)[:, :length].transpose(1, 2)
        return keys, parts.values[blocks].flatten(1, 2)[:, :length].transpose(1, 2)

    def _chunk_keys(
        self, parts: _LayerParts, chunk: PromptChunk, batch: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a prompt chunk sees, its row's first start + n: (H_kv, 1, T,
        D) each, a view of the row (copies of the blocks where paged)."""
        total = chunk.start + chunk.length
        if self.paged:
            row = batch.rows[chunk.offset : chunk.offset + 1]
            keys, values = self._gather_blocks(parts, row, total, batch)  # (1, H_kv, T, D)
            return keys.transpose(0, 1), values.transpose(0, 1)
        keys = parts.keys[chunk.row, :, :total].unsqueeze(1)
        return keys, parts.values[chunk.row, :, :total].unsqueeze(1)

    def _prefill_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, future: torch.Tensor
    ) -> torch.Tensor:
        """q (n, H, D) of one prompt chunk; causal over the keys and values (H_kv, 1, T, D)
        of its row's first T = start + n tokens (`future`: the chunk's (n, T) additive
        mask)."""
        n = q.shape[0]
        qg = q.view(n, self.kv_heads, self.group, self.head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(qg, keys.transpose(-1, -2))  # (H_kv, g, n, T)
        probs = probs_of(scores, future, self.scaling).to(values.dtype)
        out = torch.matmul(probs, values)  # (H_kv, g, n, D)
        return out.permute(2, 0, 1, 3).reshape(n, self.num_heads, self.head_dim)

    def _mlp(self, parts: _LayerParts, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        linear = parts.linear
        width = parts.mlp_width
        gate, up = linear["gate_up"](x).split([width, width], dim=1)  # (N, I) each, in place
        _add_lora([gate, up], x, parts.index, "gate_up", batch)
        native = self.native
        if native is not None and parts.silu:
            act = native.silu_mul(gate, up)
        else:
            act = parts.act(gate) * up
        down = linear["down"](act)
        _add_lora([down], act, parts.index, "down", batch)
        return down


@functools.cache
def _triton_rope_cache() -> Callable[..., None]:
    """rope_and_cache, imported at first use (its module imports triton)."""
    from loraplex.server.engine.triton_attention import rope_and_cache

    return rope_and_cache


@functools.cache
def _triton_attention() -> Callable[..., torch.Tensor]:
    """paged_attention_triton, imported at first use (its module imports triton)."""
    from loraplex.server.engine.triton_attention import paged_attention_triton

    return paged_attention_triton


def attend(
    qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q K.T * scaling + bias) V of decode queries qg (R, H_kv, g, D) against
    keys and values (R, H_kv, L, D); returns (R, H_kv, g, D) in the cache's dtype.

    A few cached tokens in all (R * L <= SMALL_ATTENTION_TOKENS: one stream, or a few
    short ones) on a CPU: in float32, as a bf16 matmul this small costs more in oneDNN's
    fixed overhead than the conversion (126 -> 45 us per layer for one 100-token row)."""
    dtype = values.dtype
    small = keys.shape[0] * keys.shape[2] <= SMALL_ATTENTION_TOKENS
    if small and dtype != torch.float32 and keys.device.type == "cpu":
        keys, values = keys.float(), values.float()
        scores = torch.matmul(qg.float(), keys.transpose(-1, -2))  # (R, H_kv, g, L)
        return torch.matmul(probs_of(scores, bias, scaling), values).to(dtype)
    # K @ q.T rather than q @ K.T: the strided view is then the left operand, which the
    # CPU bmm takes ~2x faster for these (g x D) @ (D x L) shapes.
    scores = torch.matmul(keys, qg.transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(probs_of(scores, bias, scaling).to(dtype), values)


def probs_of(scores: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax of scaled scores plus an additive mask (0 or -inf, float32): the float32
    cast, the scaling and the mask are one op (the same values as masking after)."""
    return torch.add(bias, scores, alpha=scaling).softmax(dim=-1)


def _add_lora(
    outputs: list[torch.Tensor], x: torch.Tensor, layer: int, group: str, batch: StepBatch
) -> None:
    """Each token's adapter delta; with a merged adapter, minus its delta for the others."""
    add_step_lora(outputs, x, batch.lora, layer, group)
    add_step_lora(outputs, x, batch.unmerge, layer, group, scale=-1.0)


def _rope_table(
    model: nn.Module, max_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin (max_len, D) of every position as the model's rotary module gives them, or
    None where its frequencies change with the length."""
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") in DYNAMIC_ROPE:
        return None
    with torch.inference_mode():
        x = torch.zeros(1, 1, 1, dtype=dtype, device=device)
        positions = torch.arange(max_len, device=device).unsqueeze(0)
        cos, sin = rotary(x, positions)
    return cos[0].contiguous(), sin[0].contiguous()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it: x (N, heads, D), cos/sin (N, 1, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
