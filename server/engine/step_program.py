"""A captured decode step: the CPU's answer to a CUDA graph (`--compile`, the default).

One stream, or a few, decodes a step in a few milliseconds on a CPU, and with the native kernels
(cpu_kernels.py) every op of it is already one C call: what is left is Python between them,
dispatch, checks and allocation around about 400 kernel calls, a quarter of a one-row step
(7.5 -> 5.5 ms on the embedded model). So a step of B decode tokens is captured once per B
into a list of records, each one kernel call on buffers fixed at capture (the hidden states,
q/k/v, the MLP's, the step's token ids, positions, rows, lengths and adapter slots), replayed
by one call into C (`run_step`): the embedding and rotary tables gathered, then per layer
add + RMSNorm, the q/k/v, o, gate/up and down projections from the 4-bit codes, their LoRA,
rotary, the KV cache write, attention and silu * up. The final norm and the LM head stay in
torch.

Why not torch.compile: the step's cost here is the dispatch between kernels that are already
native, and an inductor graph still calls each of them (as opaque ops) through its wrapper; a
capture of C calls has no wrapper at all, builds in about a millisecond (nothing to
compile, nothing to cache beyond the kernels' own build) and runs exactly the kernels the eager
path runs, so its outputs equal the eager path's bit for bit (tested).

A step is replayed only where the eager path would run the same kernels: decode tokens only, at
most CAPTURE_TOKENS of them, the base's kernel at that size the native one for every
layer, no merged adapter, the LoRA in the native kernel, attention within the native kernel's
limit. Anything else runs eagerly, the reference.
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING

import torch

from loraplex.server.engine.cpu_kernels import DTYPES, CpuKernels
from loraplex.server.engine.linear import Unit

if TYPE_CHECKING:
    from loraplex.server.engine.forward import DecoderForward, StepBatch

STEP_WORDS = 16  # int64 words per record (csrc/cpu_kernels.c)
CAPTURE_TOKENS = 16  # the largest step captured (larger ones run their linears in oneDNN)
(
    OP_GATHER,
    OP_ADD_NORM,
    OP_NF4,
    OP_LORA,
    OP_ROPE,
    OP_KV_WRITE,
    OP_ATTEND,
    OP_SILU_MUL,
    OP_ADD,
) = range(1, 10)


def _bits(value: float) -> int:
    """A float as its float32 bits, for a record."""
    return int(struct.unpack("<I", struct.pack("<f", value))[0])


class DecodeProgram:
    """The records of one decode step of `tokens` tokens, and the buffers they read and write.
    Built by `capture` (None where a step of that size cannot be captured)."""

    def __init__(self, forward: DecoderForward, tokens: int) -> None:
        native = forward.native
        assert native is not None
        self.native: CpuKernels = native
        # the LoRA stacks' allocation the records point into (a re-allocation: capture again)
        self.lora_generation = forward.lora.generation
        model, dtype = forward.model, forward.dtype
        hidden = int(model.config.hidden_size)
        inner = forward.layers[0]
        b, d = tokens, forward.head_dim

        def buffer(width: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(b, width, dtype=kind)

        # the step's inputs, written before each replay
        self.ids, self.positions = buffer(1, torch.long)[:, 0], buffer(1, torch.long)[:, 0]
        self.rows, self.lengths = buffer(1, torch.long)[:, 0], buffer(1, torch.long)[:, 0]
        # each adapter pool's slot per token and rank for the step (rank 0: none of its tokens)
        pools = sorted(forward.lora.pools.items()) if forward.lora.dtype in DTYPES else []
        self.lora_inputs = {
            bucket: (buffer(1, torch.long)[:, 0], torch.zeros(1, dtype=torch.long))
            for bucket, _ in pools
        }
        # the activations, reused by every layer
        self.h, x = buffer(hidden), buffer(hidden)
        q_width = forward.num_heads * d
        kv_width = forward.kv_heads * d
        # the fused q/k/v and gate/up outputs, each member a column range of theirs
        qkv, attn = buffer(q_width + 2 * kv_width), buffer(q_width)
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=1)
        o = buffer(hidden)
        mlp = inner.mlp_width
        gate_up, act, down = buffer(2 * mlp), buffer(mlp), buffer(hidden)
        gate, up = gate_up.split([mlp, mlp], dim=1)
        cos, sin = buffer(d), buffer(d)
        self._keep: list[object] = []  # the LoRA argument blocks the records point into
        bf16 = int(dtype == torch.bfloat16)
        rec: list[list[int]] = []
        p = torch.Tensor.data_ptr
        embed = model.model.embed_tokens.weight
        row_bytes = hidden * embed.element_size()
        rec.append([OP_GATHER, p(embed), row_bytes, p(self.ids), b, p(self.h)])
        assert forward.rope_table is not None
        table_cos, table_sin = forward.rope_table
        rec.append(
            [OP_GATHER, p(table_cos), d * table_cos.element_size(), p(self.positions), b, p(cos)]
        )
        rec.append(
            [OP_GATHER, p(table_sin), d * table_sin.element_size(), p(self.positions), b, p(sin)]
        )
        level = native.isa_level

        def nf4(src: torch.Tensor, unit: Unit, dst: torch.Tensor) -> None:
            weight = forward.linears.nf4_weight(unit, b)
            assert weight is not None
            out_f, in_f = weight.shape
            rec.append(
                [
                    OP_NF4, p(src), bf16, b, in_f, p(weight.codes), p(weight.absmax), out_f,
                    weight.blocksize, p(native.table), p(dst), level,
                ]
            )  # fmt: skip

        def add_lora(src: torch.Tensor, layer: int, name: str, outs: list[torch.Tensor]) -> None:
            for bucket, pool in pools:
                group = pool.groups[layer][name]
                slots, rank = self.lora_inputs[bucket]
                words = [len(outs)]
                for out, blocks, width in zip(outs, group.blocks, group.out_features, strict=True):
                    words += [p(out), out.stride(0), p(blocks), width]
                args = (ctypes.c_int64 * len(words))(*words)
                self._keep.append(args)
                rec.append(
                    [
                        OP_LORA, p(src), bf16, b, src.shape[1], p(slots), p(group.at),
                        int(group.at.dtype == torch.bfloat16), group.rank_capacity, p(rank),
                        ctypes.addressof(args), _bits(1.0), level, group.slot_stride,
                        group.at.shape[0],
                    ]
                )  # fmt: skip

        delta = 0  # the previous layer's MLP output, added with the next norm
        for parts in forward.layers:
            norm = parts.input_norm
            rec.append(
                [
                    OP_ADD_NORM,
                    p(self.h),
                    delta,
                    bf16,
                    b,
                    hidden,
                    p(norm.weight),
                    _bits(norm.eps),
                    p(x),
                ]
            )
            nf4(x, parts.units["qkv"], qkv)
            add_lora(x, parts.index, "qkv", [q, k, v])
            row = qkv.stride(0)  # q's, k's and v's tokens are rows of qkv
            rec.append(
                [
                    OP_ROPE, p(q), row, p(k), row, bf16, b, forward.num_heads, forward.kv_heads,
                    d, p(cos), p(sin),
                ]
            )  # fmt: skip
            max_len = parts.keys.shape[2]
            rec.append(
                [
                    OP_KV_WRITE, p(k), row, p(v), row, p(parts.keys), p(parts.values),
                    forward.kv_heads, max_len, d, parts.keys.element_size(), p(self.rows),
                    p(self.positions), b,
                ]
            )  # fmt: skip
            rec.append(
                [
                    OP_ATTEND, p(q), row, bf16, b, forward.num_heads, forward.kv_heads, d,
                    p(parts.keys), p(parts.values), max_len, p(self.rows), p(self.lengths),
                    _bits(forward.scaling), p(attn), level,
                ]
            )  # fmt: skip
            nf4(attn, parts.units["o"], o)
            add_lora(attn, parts.index, "o", [o])
            norm = parts.post_norm
            rec.append(
                [
                    OP_ADD_NORM,
                    p(self.h),
                    p(o),
                    bf16,
                    b,
                    hidden,
                    p(norm.weight),
                    _bits(norm.eps),
                    p(x),
                ]
            )
            nf4(x, parts.units["gate_up"], gate_up)
            add_lora(x, parts.index, "gate_up", [gate, up])
            rec.append([OP_SILU_MUL, p(gate), p(up), b, mlp, gate_up.stride(0), bf16, p(act)])
            nf4(act, parts.units["down"], down)
            add_lora(act, parts.index, "down", [down])
            delta = p(down)
        rec.append([OP_ADD, p(self.h), delta, b * hidden, bf16])
        self.records = torch.tensor(
            [words + [0] * (STEP_WORDS - len(words)) for words in rec], dtype=torch.long
        )
        # the tensors the records point into stay alive with the program
        self._keep += [x, qkv, attn, o, gate_up, act, down, cos, sin]

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Replay the step for `batch` (its KV cache written); returns the hidden states
        (B, hidden) after the last layer, before the final norm."""
        self.ids.copy_(batch.ids)
        self.positions.copy_(batch.positions)
        self.rows.copy_(batch.rows)
        self.lengths.copy_(batch.decode_lengths)
        for _, rank in self.lora_inputs.values():
            rank[0] = 0
        for pool, plan in batch.lora:
            assert plan.native is not None  # (replayable)
            slots, rank = self.lora_inputs[pool.rank_capacity]
            slots.copy_(plan.native.slots)
            rank[0] = plan.rank
        self.native.run_step(self.records)
        return self.h


def replayable(forward: DecoderForward, batch: StepBatch) -> bool:
    """Whether the eager path would run this step all in the native kernels a program holds."""
    n = batch.ids.shape[0]
    return (
        0 < n <= CAPTURE_TOKENS
        and batch.n_decode == n
        and not batch.chunks
        and not batch.unmerge
        and not forward.merged
        and n * batch.max_decode_length <= forward.attention_limit
        and all(
            plan.native is not None and plan.decode is None and not plan.segments
            for _, plan in batch.lora
        )
    )


def capture(forward: DecoderForward, tokens: int) -> DecodeProgram | None:
    """The program of a `tokens`-token decode step, or None where one cannot be captured: no
    native kernels or rotary table, or some linear layer that does not run the native 4-bit
    kernel at this size (its measured choice, a bias, a layer that is not 4-bit)."""
    if forward.native is None or forward.rope_table is None or forward.dtype not in DTYPES:
        return None
    linears = forward.linears
    for parts in forward.layers:
        for unit in parts.units.values():
            if linears.nf4_weight(unit, tokens) is None:
                return None
        if not parts.silu:
            return None
        for norm in (parts.input_norm, parts.post_norm):
            if norm.native is None or norm.weight.dtype != forward.dtype:
                return None
        if not (parts.keys.is_contiguous() and parts.keys.dtype == forward.dtype):
            return None
    embed = forward.model.model.embed_tokens.weight
    if embed.dtype != forward.dtype or not embed.is_contiguous():
        return None
    return DecodeProgram(forward, tokens)
