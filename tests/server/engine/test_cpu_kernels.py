"""The native NF4 kernel: on every instruction set this CPU has (the emulated AVX2 run covers
AVX2 alone), at every row count a tile can hold and past it, in float32 and bf16, it computes
x @ W.T for W given by its 4-bit codes and block scales, and it is built once per machine."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import cpu_kernels
from loraplex.server.engine.cpu_kernels import ISAS


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    built = cpu_kernels.load(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the NF4 kernel did not build with this machine's C compiler"
    return built


def random_weight(out_features: int, in_features: int, blocksize: int, seed: int):
    """Packed codes (two per byte, high nibble first), float32 block scales, and the dense
    float32 weight they stand for."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features * in_features,), generator=generator)
    packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)
    absmax = torch.rand(out_features * in_features // blocksize, 1, generator=generator) + 0.1
    values = _nf4_table()[codes].view(-1, blocksize) * absmax
    return packed, absmax, values.view(out_features, in_features)


def _nf4_table() -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").float()


@pytest.mark.cpu_isa
def test_the_kernel_uses_the_instruction_set_torch_sees(library):
    """torch's "AVX512" needs AVX-512 F/BW/DQ/VL, more than the kernel asks (BF16 dot products
    and AMX tiles are the CPU's own answer); "AVX2" has FMA."""
    want = {"AVX512": ("avx512", "avx512bf16", "amx"), "AVX2": ("avx2",)}
    assert library.isa in want.get(torch.backends.cpu.get_cpu_capability(), ISAS)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "blocksize"), [((37, 96), 32), ((64, 128), 64), ((3, 256), 128)])
def test_every_instruction_set_computes_the_layer(library, dtype, shape, blocksize):
    packed, absmax, weight = random_weight(*shape, blocksize, seed=shape[0])
    assert library.supports(shape, blocksize)
    generator = torch.Generator().manual_seed(1)
    for isa in ISAS[: ISAS.index(library.isa) + 1]:
        for rows in (1, 2, 3, 4, 5, 9):
            x = torch.randn(rows, shape[1], generator=generator).to(dtype)
            want = x.float() @ weight.T
            got = library.linear(x, packed, absmax, shape, blocksize, isa=isa)
            assert got.dtype == dtype and got.shape == (rows, shape[0])
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            assert (got.float() - want).abs().max() <= tolerance * want.abs().max(), (isa, rows)


def test_leading_dimensions_are_kept_and_bad_input_is_refused(library):
    packed, absmax, weight = random_weight(32, 64, 64, seed=0)
    x = torch.randn(2, 3, 64)
    got = library.linear(x, packed, absmax, (32, 64), 64)
    assert got.shape == (2, 3, 32)
    assert torch.allclose(got, x @ weight.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes CPU"):
        library.linear(torch.randn(2, 63), packed, absmax, (32, 64), 64)
    with pytest.raises(ValueError, match="takes CPU"):
        library.linear(x.half(), packed, absmax, (32, 64), 64)
    assert not library.supports((32, 96), 64)  # a block would straddle two rows
    assert not library.supports((32, 64), 16)


def test_built_once_per_machine_and_source(tmp_path):
    first = cpu_kernels.load(tmp_path)
    assert first is not None and first is cpu_kernels.load(tmp_path)
    built = list(tmp_path.glob("cpu-kernels-*.so"))
    assert len(built) == 1 and list(tmp_path.iterdir()) == built  # no partial files left


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 64, 128])  # 64 and 128 have AVX-512 versions of their own
def test_decode_attention_reads_each_tokens_row_and_length(library, dtype, d):
    """Tokens in any rows (not in order, rows left out), of different lengths, grouped-query
    heads: each equals softmax(q K.T * scaling) V over its own row's first `length` keys, on
    every instruction set the machine has."""
    generator = torch.Generator().manual_seed(0)
    num_rows, kv_heads, group, max_len = 6, 2, 3, 40
    keys = torch.randn(num_rows, kv_heads, max_len, d, generator=generator).to(dtype)
    values = torch.randn(num_rows, kv_heads, max_len, d, generator=generator).to(dtype)
    rows = torch.tensor([4, 0, 5, 2])
    lengths = torch.tensor([1, 17, 40, 9])
    q = torch.randn(len(rows), kv_heads * group, d, generator=generator).to(dtype)
    scaling = d**-0.5
    for isa in cpu_kernels.ISAS[: cpu_kernels.ISAS.index(library.isa) + 1]:
        got = library.decode_attention(q, keys, values, rows, lengths, scaling, isa=isa)
        assert got.dtype == dtype and got.shape == q.shape
        for i, (row, length) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
            for h in range(kv_heads * group):
                k = keys[row, h // group, :length].double()
                v = values[row, h // group, :length].double()
                p = torch.softmax(k @ q[i, h].double() * scaling, dim=0)
                want = p @ v
                tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                error = (got[i, h].double() - want).abs().max()
                assert error <= tolerance * max(1.0, want.abs().max()), (isa, i, h)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 700])  # 700 tokens: the rows split over the threads
def test_rotary_and_add_norm_round_as_hf_does(library, dtype, n):
    """Rotary in place equals HF's apply_rotary_pos_emb (bit for bit in bf16, where each
    product and the sum are rounded as torch rounds them); the residual add and RMSNorm equal
    HF's LlamaRMSNorm of the rounded sum, to one rounding of the output; with their loops built
    for each instruction set this CPU has."""
    for isa in ISAS[: ISAS.index(library.isa) + 1]:
        with library.vector_isa(isa):
            _rotary_and_add_norm_round_as_hf_does(library, dtype, n)


def _rotary_and_add_norm_round_as_hf_does(library, dtype, n):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, d, width = 6, 2, 16, 48
    q = torch.randn(n, heads, d, generator=generator).to(dtype)
    k = torch.randn(n, kv_heads, d, generator=generator).to(dtype)
    angles = torch.rand(n, 1, d // 2, generator=generator) * 6
    cos, sin = (
        torch.cat([angles.cos()] * 2, -1).to(dtype),
        torch.cat([angles.sin()] * 2, -1).to(dtype),
    )
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0], unsqueeze_dim=1)
    got_q, got_k = q.clone(), k.clone()
    library.rope_qk(got_q, got_k, cos, sin)
    exact = {"rtol": 0, "atol": 0} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(got_q, want_q, **exact)
    torch.testing.assert_close(got_k, want_k, **exact)

    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.rand(width, generator=generator) + 0.5
    norm = norm.to(dtype)
    h = torch.randn(n, width, generator=generator).to(dtype)
    delta = torch.randn(n, width, generator=generator).to(dtype)
    summed = h + delta
    got_h = h.clone()
    got = library.add_rms_norm(got_h, delta, norm.weight.data, 1e-5)
    torch.testing.assert_close(got_h, summed, rtol=0, atol=0)
    with torch.no_grad():
        want = norm(summed)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    alone = library.add_rms_norm(summed.clone(), None, norm.weight.data, 1e-5)
    torch.testing.assert_close(alone, got, rtol=0, atol=0)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_rounds_as_torch_does(library, dtype):
    """silu(gate) * up as the MLP computes it in torch (the silu rounded to the dtype, then the
    product), within one rounding of the exp: over a range that covers the saturated tails,
    and a length that leaves a partial vector and spans blocks; built for each instruction set
    this CPU has."""
    generator = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 700, generator=generator) * 6).to(dtype)
    gate[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)
    up = torch.randn(3, 700, generator=generator).to(dtype)
    want = torch.nn.functional.silu(gate) * up
    for isa in ISAS[: ISAS.index(library.isa) + 1]:
        with library.vector_isa(isa) as level:
            got = library.silu_mul(gate, up)
        assert level == min(ISAS.index(isa), 2)  # the loops' build for that instruction set
        assert got.dtype == dtype and got.shape == gate.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=isa)
        else:  # a one-unit difference in the silu's float32 value can move one bf16 rounding
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3, msg=isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [4, 2048])  # 2048 tokens: split over the threads
def test_kv_write_puts_each_token_where_the_cache_index_does(library, dtype, n):
    from loraplex.server.engine.kv_cache import write_layer

    generator = torch.Generator().manual_seed(0)
    shape = (5, 2, 2048, 8)  # rows, kv heads, max_len, head dim
    keys, values = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    want_keys, want_values = keys.clone(), values.clone()
    if n == 4:
        rows, positions = torch.tensor([3, 0, 0, 4]), torch.tensor([7, 0, 1, 11])
    else:  # a whole prompt in one row
        rows, positions = torch.full((n,), 2), torch.arange(n)
    k = torch.randn(n, 2, 8, generator=generator).to(dtype)
    v = torch.randn(n, 2, 8, generator=generator).to(dtype)
    index = ((rows[:, None] * 2 + torch.arange(2)) * 2048 + positions[:, None]).reshape(-1)
    write_layer(want_keys, want_values, index, k, v)
    library.kv_write(keys, values, k, v, rows, positions)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    assert keys.count_nonzero() == k.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_columns_are_read_in_place(library, dtype):
    """q, k and v as column ranges of one fused output (N, q + k + v), and gate and up as the
    halves of another: rotary, the cache write, attention and silu * up give what they give
    on contiguous copies; a tensor whose heads are not contiguous is refused."""
    generator = torch.Generator().manual_seed(0)
    n, heads, kv_heads, d, width = 5, 6, 2, 16, 24
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=generator).to(dtype)
    q, k, v = (t.view(n, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
    assert not q.is_contiguous()
    cq, ck, cv = q.contiguous(), k.contiguous(), v.contiguous()
    cos = torch.rand(n, 1, d, generator=generator).to(dtype)
    sin = torch.rand(n, 1, d, generator=generator).to(dtype)
    library.rope_qk(q, k, cos, sin)
    library.rope_qk(cq, ck, cos, sin)
    assert torch.equal(q, cq) and torch.equal(k, ck)
    shape = (n, kv_heads, 8, d)  # rows, kv heads, max_len, head dim
    keys, values = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    want_keys, want_values = keys.clone(), values.clone()
    rows, positions = torch.arange(n), torch.tensor([0, 3, 7, 1, 2])
    library.kv_write(keys, values, k, v, rows, positions)
    library.kv_write(want_keys, want_values, ck, cv, rows, positions)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    lengths = positions + 1
    got = library.decode_attention(q, keys, values, rows, lengths, d**-0.5)
    want = library.decode_attention(cq, keys, values, rows, lengths, d**-0.5)
    assert got.is_contiguous() and torch.equal(got, want)
    gate_up = torch.randn(n, 2 * width, generator=generator).to(dtype)
    gate, up = gate_up.split([width, width], dim=1)
    assert torch.equal(
        library.silu_mul(gate, up), library.silu_mul(gate.contiguous(), up.contiguous())
    )
    with pytest.raises(ValueError):
        library.rope_qk(cq.transpose(1, 2).contiguous().transpose(1, 2), ck, cos, sin)
