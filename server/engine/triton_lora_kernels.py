"""Triton kernels for mixed-adapter LoRA over a flat token batch (punica / S-LoRA style): one
launch shrinks every member of a fused group (q/k/v, gate/up), one launch expands them.

The step's tokens come grouped by slot and cut in tiles of BLOCK_M tokens (triton_lora.py's
LoraTiles: fixed-size buffers, so that a CUDA graph can capture the launches); a program takes
one tile and reads only that tile's slot:

    shrink   Y[p, j*C + c] = X[order[p]] @ AT[slot, :, j, c]        c < rank(slot)
    expand   O_j[order[p], n] += scale * Y[p, j*C:j*C+rank] @ B_j[slot, :rank, n]

p: a token's position in the grouped order; C: the pool's rank capacity. Y (T, k*C) is float32
and indexed by p, so a tile's rows are contiguous. Programs whose tile is empty (rank 0) or
whose rank block lies beyond their slot's rank return at once: the grids are sized by the
buffers' capacity, never by the step, and mixed ranks cost each slot its own rank.

Triton's interpreter (TRITON_INTERPRET=1, read when these kernels are decorated) computes a
bf16 `tl.dot` wrongly: the wrappers pass UPCAST only when INTERPRETED, never on a GPU.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from loraplex.server.engine.triton_lora import BLOCK_K, BLOCK_M, BLOCK_N, BLOCK_R

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)  # how the kernels below were decorated

# The tile table's rows (int32, each of the table's capacity), in the order LoraTiles writes
# them: a tile's slot, its first and last+1 positions in the grouped order, and its slot's rank
# (0: an empty tile). Constexpr: a kernel reads no other globals.
TILE_SLOT, TILE_START, TILE_END, TILE_RANK = (tl.constexpr(row) for row in range(4))


@triton.jit
def lora_shrink_kernel(
    x_ptr,  # (N, in): the step's input rows
    stride_x,
    at_ptr,  # (S, in, k, C): A.T of every slot and member
    stride_as,
    stride_ai,
    stride_aj,
    stride_ac,
    y_ptr,  # (T, k*C) float32, row p = grouped position
    stride_y,
    tiles_ptr,  # (4, tiles) int32: slot, start, end, rank of each tile
    order_ptr,  # (T,) int32: token index of each grouped position
    num_tiles,  # the tile table's capacity (its row stride)
    in_features,
    rank_capacity,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: K is cut in SPLIT_K parts added atomically (Y zeroed)
    UPCAST: tl.constexpr,  # the interpreter's bf16 dot is wrong: fp32 operands there
    PRECISION: tl.constexpr,  # "ieee" for float32 stacks (no TF32), else the default
):
    # grid: (tiles, k * cdiv(C, BLOCK_R), SPLIT_K)
    tile = tl.program_id(0)
    rank = tl.load(tiles_ptr + TILE_RANK * num_tiles + tile)
    rank_blocks = tl.cdiv(rank_capacity, BLOCK_R)
    member = tl.program_id(1) // rank_blocks
    r0 = (tl.program_id(1) % rank_blocks) * BLOCK_R
    if r0 >= rank:  # an empty tile, or a rank block beyond this slot's rank
        return
    slot = tl.load(tiles_ptr + TILE_SLOT * num_tiles + tile).to(tl.int64)
    start = tl.load(tiles_ptr + TILE_START * num_tiles + tile)
    end = tl.load(tiles_ptr + TILE_END * num_tiles + tile)
    rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) grouped positions
    row_ok = rows < end
    tokens = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,) ranks
    col_ok = cols < rank
    k_span = tl.cdiv(in_features, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(2) * k_span
    k_hi = tl.minimum(k_lo + k_span, in_features)
    a_base = at_ptr + slot * stride_as + member * stride_aj + cols[None, :] * stride_ac
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        x = tl.load(
            x_ptr + tokens[:, None] * stride_x + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        a = tl.load(
            a_base + ks[:, None] * stride_ai, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_R)
        x = x.to(a.dtype)  # in the stacks' dtype, as the reference computes
        if UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=PRECISION)
    y = y_ptr + rows[:, None] * stride_y + (member * rank_capacity + cols)[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.atomic_add(y, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_expand_kernel(
    y_ptr,  # (T, k*C) float32, from the shrink
    stride_y,
    b0_ptr,  # (S, C, out_j) B.T of member j, scaled, contiguous
    b1_ptr,
    b2_ptr,
    o0_ptr,  # (N, out_j) member j's output (column views of one fused output are fine)
    o1_ptr,
    o2_ptr,
    stride_o0,
    stride_o1,
    stride_o2,
    n0,  # out_j; 0 for members the group lacks
    n1,
    n2,
    tiles_ptr,  # (4, tiles) int32, as the shrink's
    order_ptr,  # (T,) int32
    num_tiles,
    rank_capacity,
    scale,  # -1.0 takes a merged adapter's delta back out
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # grid: (tiles, sum_j cdiv(out_j, BLOCK_N)): the members' column blocks one after another
    tile = tl.program_id(0)
    rank = tl.load(tiles_ptr + TILE_RANK * num_tiles + tile)
    if rank == 0:
        return
    block = tl.program_id(1)
    blocks0 = tl.cdiv(n0, BLOCK_N)
    blocks1 = tl.cdiv(n1, BLOCK_N)
    member = 0
    b_ptr, o_ptr, stride_o, n_out = b0_ptr, o0_ptr, stride_o0, n0
    if block >= blocks0 + blocks1:
        member, block = 2, block - blocks0 - blocks1
        b_ptr, o_ptr, stride_o, n_out = b2_ptr, o2_ptr, stride_o2, n2
    elif block >= blocks0:
        member, block = 1, block - blocks0
        b_ptr, o_ptr, stride_o, n_out = b1_ptr, o1_ptr, stride_o1, n1
    slot = tl.load(tiles_ptr + TILE_SLOT * num_tiles + tile).to(tl.int64)
    start = tl.load(tiles_ptr + TILE_START * num_tiles + tile)
    end = tl.load(tiles_ptr + TILE_END * num_tiles + tile)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) of member's out_j
    col_ok = cols < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # this slot's own rank, not the capacity
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < rank
        s = tl.load(
            y_ptr + rows[:, None] * stride_y + (member * rank_capacity + rs)[None, :],
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_R)
        b = tl.load(
            b_ptr + slot * rank_capacity * n_out + rs[:, None] * n_out + cols[None, :],
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_N)
        s = s.to(b.dtype)  # the shrink's result rounded to the stacks' dtype, as the reference
        if UPCAST:
            s, b = s.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(s, b, input_precision=PRECISION)
    out = o_ptr + tokens[:, None] * stride_o + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    old = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (old.to(tl.float32) + scale * acc).to(old.dtype), mask=mask)


def aot_specs() -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, signature, constexprs) of every kernel as the wrappers launch it, for the
    ahead-of-time build test: bf16 and float32 stacks (fp16 builds as bf16 does), the shrink
    with one K part and with several."""
    specs: list[tuple[Any, dict[str, str], dict[str, Any]]] = []
    for dtype, precision, splits in (("bf16", "tf32", (1, 4)), ("fp32", "ieee", (1,))):
        dot = {"UPCAST": False, "PRECISION": precision}
        shrink = _signature(lora_shrink_kernel, {"x_ptr": dtype, "at_ptr": dtype, "y_ptr": "fp32"})
        for split_k in splits:
            blocks = {"BLOCK_M": BLOCK_M, "BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K}
            specs.append((lora_shrink_kernel, shrink, blocks | dot | {"SPLIT_K": split_k}))
        pointers = {"y_ptr": "fp32"} | {f"{p}{j}_ptr": dtype for p in "bo" for j in range(3)}
        expand = _signature(lora_expand_kernel, pointers, floats=("scale",))
        blocks = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_R": BLOCK_R}
        specs.append((lora_expand_kernel, expand, blocks | dot))
    return specs


def _signature(
    kernel: Any, pointers: dict[str, str], floats: tuple[str, ...] = ()
) -> dict[str, str]:
    """A full triton.compile signature: the pointers' element types, int32 for the tile and
    order tables and every other scalar, fp32 for `floats`, constexpr for the meta-parameters."""
    pointers = pointers | {"tiles_ptr": "i32", "order_ptr": "i32"}
    signature = {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        elif name.isupper():
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    return signature
