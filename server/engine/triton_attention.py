"""Paged attention in Triton: a step's decode tokens and prompt chunks in one launch, each query
token against its own sequence's cached keys up to its position (paged_attention.py says what
the metadata means; paged_attention_reference is the spec this equals). And its input side in
one launch too: the rotary embedding of q and k, with k and v stored into the blocks.

One program per (query tile, KV head). Its rows are the tile's tokens x the group of query heads
that share that KV head (grouped-query attention: the keys are read once for the group), padded
to a power of 2: BLOCK_Q * GROUP_PAD rows, at least 16 for tl.dot. It walks the sequence's
blocks (BLOCK_SIZE keys each, one tl.dot) up to the tile's last position with an online softmax
in float32 (in the exp2 domain: the scale carries log2(e)); a row masks the keys past its own
position, so a chunk starting mid-block is causal and a decode token sees its whole sequence.
Unused tiles (length 0) store nothing: a caller may launch a fixed grid (a CUDA graph).

This module imports triton: import it only where the triton kernels are chosen.
"""

# A Triton kernel's arguments are untyped pointers and scalars, its constexprs upper case.
# ruff: noqa: ANN001, ANN201, N803

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from loraplex.server.engine.paged_attention import PagedQueries, next_power_of_2


@triton.jit
def paged_attention_kernel(
    q_ptr,  # (N, H, D)
    k_ptr,  # (num_blocks, BLOCK_SIZE, H_kv, D)
    v_ptr,  # (num_blocks, BLOCK_SIZE, H_kv, D)
    o_ptr,  # (N, H, D)
    tables_ptr,  # (max_seqs, max_blocks) int32
    seq_ids_ptr,  # (N,) int32
    positions_ptr,  # (N,) int32
    tile_starts_ptr,  # (T,) int32
    tile_lengths_ptr,  # (T,) int32
    scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_table,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of 2
    BLOCK_Q: tl.constexpr,  # tokens per tile at most
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
    UPCAST: tl.constexpr,  # dots in float32 (the interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,  # of float32 dots: "ieee" for a float32 cache, not TF32
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    start = tl.load(tile_starts_ptr + tile)
    count = tl.load(tile_lengths_ptr + tile)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)  # (M,): token of the tile x member of the group
    token = start + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (rows // GROUP_PAD < count) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    pos = tl.load(positions_ptr + token, mask=row_ok, other=-1)  # (M,) -1: sees nothing
    last = tl.max(pos, axis=0)  # the tile's last position: its keys end there
    seq = tl.load(seq_ids_ptr + start, mask=count > 0, other=0).to(tl.int64)
    num_blocks = tl.where(count > 0, last // BLOCK_SIZE + 1, 0)

    q_mask = row_ok[:, None] & dim_ok[None, :]
    q_at = q_ptr + token.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_at + dims[None, :], mask=q_mask, other=0.0)  # (M, HEAD_PAD)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], -float("inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_PAD], tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    table = tables_ptr + seq * stride_table
    for j in range(0, num_blocks):
        block = tl.load(table + j).to(tl.int64)
        key_pos = j * BLOCK_SIZE + slots  # (BLOCK_SIZE,)
        kv_mask = (key_pos <= last)[:, None] & dim_ok[None, :]
        k_at = k_ptr + block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh
        v_at = v_ptr + block * stride_vb + slots[:, None] * stride_vs + kv_head * stride_vh
        k = tl.load(k_at + dims[None, :], mask=kv_mask, other=0.0)  # (BLOCK_SIZE, HEAD_PAD)
        v = tl.load(v_at + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(key_pos[None, :] <= pos[:, None], s * scale, -float("inf"))  # (M, BLOCK_SIZE)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_at = o_ptr + token.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(o_at + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def rope_cache_kernel(
    q_ptr,  # (N, H, D) rotated in place (a column view of the q/k/v output)
    k_ptr,  # (N, H_kv, D)
    v_ptr,  # (N, H_kv, D)
    cos_ptr,  # (max_len, D)
    sin_ptr,  # (max_len, D)
    positions_ptr,  # (N,) int64
    slots_ptr,  # (N,) int64: block * BLOCK_SIZE + offset of each token in the pools
    kc_ptr,  # (num_blocks * BLOCK_SIZE, H_kv, D)
    vc_ptr,  # (num_blocks * BLOCK_SIZE, H_kv, D)
    stride_qt,
    stride_kt,
    stride_vt,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # max(HEADS, KV_HEADS) rounded up to a power of 2
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,  # HEAD_DIM // 2 rounded up to a power of 2
):
    """One token: q and k rotated (HF's rotate_half: the halves of each head are the pairs),
    q in place, k and v stored at the token's slot of the pools. In float32, one rounding."""
    t = tl.program_id(0)
    pos = tl.load(positions_ptr + t)
    slot = tl.load(slots_ptr + t)
    heads = tl.arange(0, HEADS_PAD)[:, None]  # (HEADS_PAD, 1)
    half = tl.arange(0, HALF_PAD)[None, :]  # (1, HALF_PAD)
    dim_ok = half < HEAD_DIM // 2
    c1 = tl.load(cos_ptr + pos * HEAD_DIM + half, mask=dim_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * HEAD_DIM + HEAD_DIM // 2 + half, mask=dim_ok, other=0.0)
    s1 = tl.load(sin_ptr + pos * HEAD_DIM + half, mask=dim_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * HEAD_DIM + HEAD_DIM // 2 + half, mask=dim_ok, other=0.0)
    c2 = c2.to(tl.float32)
    s2 = s2.to(tl.float32)
    # q, in place
    at = q_ptr + t.to(tl.int64) * stride_qt + heads * HEAD_DIM + half
    ok = (heads < HEADS) & dim_ok
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HEAD_DIM // 2, mask=ok, other=0.0).to(tl.float32)
    tl.store(at, (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(at + HEAD_DIM // 2, (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty), mask=ok)
    # k, rotated into the key pool; v copied into the value pool
    ok = (heads < KV_HEADS) & dim_ok
    at = k_ptr + t.to(tl.int64) * stride_kt + heads * HEAD_DIM + half
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HEAD_DIM // 2, mask=ok, other=0.0).to(tl.float32)
    to = kc_ptr + slot * (KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + half
    tl.store(to, (x1 * c1 - x2 * s1).to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(to + HEAD_DIM // 2, (x2 * c2 + x1 * s2).to(kc_ptr.dtype.element_ty), mask=ok)
    at = v_ptr + t.to(tl.int64) * stride_vt + heads * HEAD_DIM + half
    to = vc_ptr + slot * (KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + half
    tl.store(to, tl.load(at, mask=ok, other=0.0), mask=ok)
    tl.store(to + HEAD_DIM // 2, tl.load(at + HEAD_DIM // 2, mask=ok, other=0.0), mask=ok)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
) -> None:
    """The rotary embedding of q (N, H, D), in place, and of k (N, H_kv, D), stored with v
    at each token's slot (N,) of the pools (num_blocks, block_size, H_kv, D): forward.py's
    rope and write_blocks in one launch. cos and sin (max_len, D) are the model's table,
    read at positions (N,). Heads must be contiguous within a token (q/k/v column views)."""
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    for x in (q, k, v):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError("a token's heads must be contiguous")
    if d % 2 or not (key_pool.is_contiguous() and value_pool.is_contiguous()):
        raise ValueError("an even head dim and contiguous pools are needed")
    if not n:
        return
    rope_cache_kernel[(n,)](
        q, k, v, cos, sin, positions, slots, key_pool, value_pool,
        q.stride(0), k.stride(0), v.stride(0),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEADS_PAD=next_power_of_2(max(heads, kv_heads)),
        HEAD_DIM=d,
        HALF_PAD=next_power_of_2(d // 2),
    )  # fmt: skip


def interpreting() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(paged_attention_kernel, InterpretedFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots as float32 (a float32 cache is asked for exactness); TF32 is the default
    that half-precision dots ignore."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention_triton(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    queries: PagedQueries,
    scale: float,
) -> torch.Tensor:
    """paged_attention_reference's signature and result: q (N, H, D), pools (num_blocks,
    block_size, H_kv, D) with contiguous heads, block_tables (max_seqs, max_blocks) int32;
    returns (N, H, D) in q's dtype."""
    _, heads, d = q.shape
    block_size, kv_heads = key_pool.shape[1], key_pool.shape[2]
    if heads % kv_heads or q.stride(2) != 1 or key_pool.stride(3) != 1:
        raise ValueError("query heads must be a multiple of KV heads, head dims contiguous")
    if value_pool.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("value heads and block tables must be contiguous")
    group = heads // kv_heads
    group_pad = next_power_of_2(group)
    if queries.block_q * group_pad < 16 or block_size < 16 or d < 16:
        raise ValueError("tiles need 16 query rows, 16 keys per block and 16 head dims at least")
    out = torch.empty_like(q)
    grid = (queries.tile_starts.shape[0], kv_heads)
    if not grid[0]:  # no query token: nothing to launch (a grid of 0 programs is an error)
        return out
    paged_attention_kernel[grid](
        q,
        key_pool,
        value_pool,
        out,
        block_tables,
        queries.seq_ids,
        queries.positions,
        queries.tile_starts,
        queries.tile_lengths,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *key_pool.stride()[:3],
        *value_pool.stride()[:3],
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=queries.block_q,
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        HEAD_PAD=next_power_of_2(d),
        UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION=dot_precision(q.dtype),
    )
    return out


def aot_specs() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) of the kernel as the wrapper launches it, for the
    ahead-of-time build test (tests/server/engine/test_triton_build.py): Llama-3-8B's heads (4
    query heads per KV head of 128) in bf16, with prompt-chunk tiles and decode tiles, and
    SmolLM2's (3 per KV head of 64) with a float32 cache."""
    specs: list[tuple[Any, dict[str, str], dict[str, Any]]] = []
    variants = [
        (torch.bfloat16, 4, 128, 16),
        (torch.bfloat16, 4, 128, 4),
        (torch.float32, 3, 64, 16),
    ]
    for dtype, group, head_dim, block_q in variants:
        element = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        constexprs = {
            "GROUP": group,
            "GROUP_PAD": next_power_of_2(group),
            "BLOCK_Q": block_q,
            "BLOCK_SIZE": 16,
            "HEAD_DIM": head_dim,
            "HEAD_PAD": next_power_of_2(head_dim),
            "UPCAST": False,
            "PRECISION": dot_precision(dtype),
        }
        signature = {}
        for name in paged_attention_kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr"):
                signature[name] = f"*{element}"
            elif name.endswith("_ptr"):
                signature[name] = "*i32"
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        specs.append((paged_attention_kernel, signature, constexprs))
    # rope_and_cache: Llama-3-8B's 32 query and 8 KV heads of 128 in bf16, SmolLM2's 9 and 3
    # of 64 in float32
    for dtype, heads, kv_heads, head_dim in (
        (torch.bfloat16, 32, 8, 128),
        (torch.float32, 9, 3, 64),
    ):
        element = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        constexprs = {
            "HEADS": heads,
            "KV_HEADS": kv_heads,
            "HEADS_PAD": next_power_of_2(heads),
            "HEAD_DIM": head_dim,
            "HALF_PAD": next_power_of_2(head_dim // 2),
        }
        signature = {}
        for name in rope_cache_kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("positions_ptr", "slots_ptr"):
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = f"*{element}"
            else:
                signature[name] = "i32"
        specs.append((rope_cache_kernel, signature, constexprs))
    return specs
