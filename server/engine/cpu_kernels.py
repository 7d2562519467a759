"""loraplex's native CPU kernels (csrc/cpu_kernels.c), for the small steps of light load, where
torch's fixed cost per op is most of the time:

    nf4_linear        x @ W.T read straight from the NF4 codes (linear.py's nf4 kernel)
    lora_add          a group's LoRA for tokens of any mix of adapters, each adapter's weights
                      read once for its tokens; prompt runs as AMX tile products where the
                      CPU has them (lora_ops.py)
    lora_set_slot     an adapter's A and B written into a slot of those stacks, in their layout
                      and dtype (an adapter's load into a slot, lora.py)
    decode_attention  a step's tokens' attention over their own cache rows, in place, each
                      up to its own length (decode tokens and prompt chunks alike): keys and
                      values in blocks of tokens, prefetched, in intrinsics per instruction
                      set (AVX-512 with BF16 dot products, AVX-512, AVX2) (forward.py)
    rope_qk           the rotary embedding of a few tokens' q and k, in place (forward.py)
    add_rms_norm      a residual add and the RMSNorm after it, for a few tokens (forward.py)
    silu_mul          the MLP's silu(gate) * up, for a few tokens (forward.py)
    kv_write          a layer's keys and values into the cache (forward.py)
    run_step          a captured decode step: the kernels above in order, from one list
                      (step_program.py)

A decode step on a CPU streams every weight once, so at a few rows it is bound by memory, and
a bf16 copy is 4x the bytes of the NF4 codes. nf4_linear looks the codes up in a vector
register and accumulates in float32 (AVX-512, AVX2 + FMA, or portable C, chosen at run time);
lora_add and decode_attention have vector versions of their own too; the others are plain C
loops the compiler vectorizes per instruction set. Work is split over torch's OpenMP threads.

They are compiled from source at first use with the system's C compiler (a second or two) into
the kernel directory beside the tuning files, keyed by the source and the compiler; where there
is no compiler, or the build fails, they are simply not offered (`load` returns None) and the
torch paths serve.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from bitsandbytes.functional import get_4bit_type

if TYPE_CHECKING:
    from loraplex.server.engine.lora import LoraGroup

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fno-strict-aliasing")
ISAS = ("portable", "avx2", "avx512", "avx512bf16", "amx")  # nf4_isa()'s answers, in order
DTYPES = (torch.bfloat16, torch.float32)  # what x and y may be
LORA_RUN_TOKENS = 64  # lora_add's runs of one adapter, at most (float32 sums on bf16 rows)
LORA_DOT_RUN_TOKENS = 256  # the same with BF16 dot products
LORA_AMX_RUN_TOKENS = 512  # with those on AMX tiles (a step's prompt budget)
LORA_FLOAT32_RUN_TOKENS = 512  # on float32 rows, bf16 weights (a step's prompt budget)
NATIVE_ATTENTION_TOKENS = 1024  # decode attention over at most this many row-tokens: native
NATIVE_ROW_MAX = 16384  # the widest row add_rms_norm takes (ROW_MAX in csrc/cpu_kernels.c)


class CpuKernels:
    """The compiled kernels."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.nf4_isa.restype = ctypes.c_int
        lib.nf4_isa.argtypes = []
        lib.nf4_linear.restype = ctypes.c_int
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.nf4_linear.argtypes = [ptr, flag, i64, i64, ptr, ptr, i64, i64, ptr, ptr, flag, flag]
        self._linear = lib.nf4_linear
        lib.lora_add.restype = ctypes.c_int
        lib.lora_add.argtypes = [
            *(ptr, flag, i64, i64, ptr),  # x, bf16, rows, in, slots
            *(ptr, flag, i64, i64, i64, i64),  # at, bf16, C, r, slot stride, slots
            *(ptr, flag, ctypes.c_float),  # args, bf16, scale
            flag,  # instruction set
        ]
        self._lora_add = lib.lora_add
        lib.lora_set_slot.restype = ctypes.c_int
        lib.lora_set_slot.argtypes = [ptr, i64, flag]  # members (LORA_SET_WORDS each), n, bf16
        self._lora_set_slot = lib.lora_set_slot
        lib.decode_attention.restype = ctypes.c_int
        lib.decode_attention.argtypes = [
            *(ptr, i64, flag, i64, i64, i64, i64),  # q, stride, bf16, tokens, heads, kv, dim
            *(ptr, ptr, flag, i64, ptr, ptr, ctypes.c_float, ptr),  # cache, rows, ..., out
            flag,  # instruction set
        ]
        self._decode_attention = lib.decode_attention
        lib.rope_qk.restype = ctypes.c_int
        lib.rope_qk.argtypes = [ptr, i64, ptr, i64, flag, i64, i64, i64, i64, ptr, ptr]
        self._rope_qk = lib.rope_qk
        lib.add_rms_norm.restype = ctypes.c_int
        lib.add_rms_norm.argtypes = [ptr, ptr, flag, i64, i64, ptr, ctypes.c_float, ptr]
        self._add_rms_norm = lib.add_rms_norm
        lib.silu_mul.restype = ctypes.c_int
        lib.silu_mul.argtypes = [ptr, ptr, i64, i64, i64, flag, ptr]
        self._silu_mul = lib.silu_mul
        lib.kv_write.restype = ctypes.c_int
        lib.kv_write.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64]
        self._kv_write = lib.kv_write
        lib.run_step.restype = ctypes.c_int
        lib.run_step.argtypes = [ptr, i64]
        self._run_step = lib.run_step
        # The CPU's, capped at what torch was told to use (ATEN_CPU_CAPABILITY=avx2 makes an
        # AVX-512 machine stand in for an AVX2 one).
        ceiling = {"AVX512": 4, "AVX2": 1}.get(torch.backends.cpu.get_cpu_capability(), 4)
        self._isa = min(lib.nf4_isa(), ceiling)
        self.isa = ISAS[self._isa]
        # the plain vectorized loops (rope, the norms, silu * up) at the same instruction set
        lib.set_vector_isa.restype = ctypes.c_int
        lib.set_vector_isa.argtypes = [ctypes.c_int]
        self._set_vector_isa = lib.set_vector_isa
        self._set_vector_isa(self._isa)
        self.table = get_4bit_type("nf4", device="cpu").float().contiguous()

    @contextlib.contextmanager
    def vector_isa(self, isa: str) -> Iterator[int]:
        """(tests) Inside the block, the plain vectorized loops (rope, the norms, silu * up,
        the attention's portable path) run at `isa`, at most the process's; the kernels that
        take an `isa` argument are unaffected. Yields the loops' level: 2 AVX-512, 1 AVX2, 0
        neither."""
        level = self._set_vector_isa(self._level(isa))
        try:
            yield int(level)
        finally:
            self._set_vector_isa(self._isa)

    def _level(self, isa: str | None) -> int:
        """The instruction set to run: the machine's, or (tests) one below it."""
        level = self._isa if isa is None else ISAS.index(isa)
        if level > self._isa:
            raise ValueError(f"this CPU cannot run the {isa} kernel (it has {self.isa})")
        return level

    def attends_every_token(self, head_dim: int) -> bool:
        """Whether the native attention serves every token of every step (prompt chunks
        too): where it has a vector version of its own (AVX2 or AVX-512, heads of 64 or 128),
        which beats torch's batched matmuls at every size measured."""
        return self._isa >= 1 and head_dim in (64, 128)

    def attention_limit(self, head_dim: int) -> float:
        """The most cached tokens over a step's decode tokens (rows x length) for which the
        native attention beats torch's batched matmuls: any number where it attends every
        token, else (the portable version) about a thousand."""
        return math.inf if self.attends_every_token(head_dim) else NATIVE_ATTENTION_TOKENS

    def lora_run_tokens(self, weights: torch.dtype, rows: torch.dtype) -> int:
        """The longest run of one adapter's tokens in a step that `lora_add` should take; longer
        runs (prompts) go to torch's matmuls, which oneDNN blocks better. With AVX512-BF16 and
        bf16 rows and weights the kernel takes runs of more than LORA_RUN_TOKENS with BF16 dot
        products, two values per lane (the shrunk values rounded to bf16 in between, as those
        matmuls round them), and keeps up with oneDNN up to about 256 tokens of one adapter (at
        512 oneDNN is 1.3x faster); its float32 sums on bf16 rows fall behind sooner. On
        float32 rows with bf16 weights (`--dtype auto` on a CPU without AVX512-BF16, whose
        `--lora-dtype auto` keeps the weights in bf16) torch's float32 matmuls, the weights
        widened at each call, are slower than the kernel up to 512 tokens and beyond (one
        layer's four groups, r16, AVX2: 0.32 against 0.59 ms at 100 tokens, 1.7 against 2.1
        at 512; on AVX-512 1.5 against 1.7 at 512). On AMX the BF16 passes run as tile
        products and beat oneDNN's matmuls at 512 tokens too (8 runs of 512 over the
        embedded model's 30 layers: 167 against 186 ms; of 98: 23 against 65 ms for the
        passes without tiles)."""
        if rows == torch.float32 and weights == torch.bfloat16:  # --lora-dtype auto's
            return LORA_FLOAT32_RUN_TOKENS
        if weights == rows == torch.bfloat16 and self._isa >= 3:
            return LORA_AMX_RUN_TOKENS if self.isa == "amx" else LORA_DOT_RUN_TOKENS
        return LORA_RUN_TOKENS

    def supports(self, shape: tuple[int, int], blocksize: int) -> bool:
        """Whether the kernel takes an (out, in) weight with this block size: blocks that do
        not straddle rows, in groups of 32 weights."""
        return blocksize > 0 and blocksize % 32 == 0 and shape[1] % blocksize == 0

    def linear(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int],
        blocksize: int,
        isa: str | None = None,
    ) -> torch.Tensor:
        """x (..., in) @ W.T for the NF4 weight W (out, in) given by its packed `codes` and
        float32 block scales `absmax` (bitsandbytes' layout); in x's dtype (bf16 or float32).
        `isa` forces an instruction set below the machine's (for tests)."""
        return self.nf4_layer(codes, absmax, shape, blocksize, isa)(x)

    def nf4_layer(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int],
        blocksize: int,
        isa: str | None = None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """`linear` bound to one weight, its pointers and sizes read once: the hot path's
        (a few microseconds less per call than binding them at every call)."""
        out_features, in_features = shape
        level = self._level(isa)
        kernel, table = self._linear, self.table.data_ptr()
        codes_at, absmax_at = codes.data_ptr(), absmax.data_ptr()

        def run(x: torch.Tensor) -> torch.Tensor:
            dtype = x.dtype
            if x.shape[-1] != in_features or dtype not in DTYPES or x.device.type != "cpu":
                raise ValueError(
                    f"the NF4 kernel takes CPU bf16/float32 (..., {in_features}) input"
                )
            if x.dim() != 2 or not x.is_contiguous():
                flat = x.reshape(-1, in_features).contiguous()
                return run(flat).view(*x.shape[:-1], out_features)
            rows = x.shape[0]
            y = torch.empty((rows, out_features), dtype=dtype)
            bf16 = dtype == torch.bfloat16
            # fmt: off
            if kernel(x.data_ptr(), bf16, rows, in_features, codes_at, absmax_at, out_features,
                      blocksize, table, y.data_ptr(), bf16, level):
                raise RuntimeError(f"the NF4 kernel refused a {shape} weight (block {blocksize})")
            # fmt: on
            return y

        return run

    def lora_add(
        self,
        outputs: list[torch.Tensor],
        x: torch.Tensor,
        group: LoraGroup,
        rank: int,
        slots: torch.Tensor,
        scale: float = 1.0,
        isa: str | None = None,
    ) -> None:
        """outputs[j][i] += scale * (x[i] @ A[slots[i]].T) @ B_j[slots[i]].T in place, for the
        rows i whose slot is not -1, from a blocked LoraGroup's stacks (the first `rank` ranks
        used). x (N, in) and the outputs (N, out_j) rows of unit stride, all in one dtype; the
        stacks in bf16 or float32; slots int64 (N,). Rows of one slot next to each other share
        each read of its weights. `isa` forces an instruction set below the machine's (for
        tests)."""
        level = self._level(isa)
        at = group.at
        dtype, w_dtype = x.dtype, at.dtype
        ok = group.blocked and x.is_contiguous() and slots.dtype == torch.int64
        ok = ok and dtype in DTYPES and w_dtype in DTYPES
        args: list[int] = [len(outputs)]
        for out, blocks, width in zip(outputs, group.blocks, group.out_features, strict=True):
            ok = ok and out.dtype == dtype and out.stride(1) == 1
            args += (out.data_ptr(), out.stride(0), blocks.data_ptr(), width)
        if not ok:
            raise ValueError("lora_add takes contiguous rows in bf16 or float32, blocked stacks")
        rc = self._lora_add(
            x.data_ptr(),
            int(dtype == torch.bfloat16),
            x.shape[0],
            x.shape[1],
            slots.data_ptr(),
            at.data_ptr(),
            int(at.dtype == torch.bfloat16),
            at.shape[3],
            rank,
            group.slot_stride,
            at.shape[0],
            (ctypes.c_int64 * len(args))(*args),
            int(dtype == torch.bfloat16),
            scale,
            level,
        )
        if rc == -2:
            raise IndexError(f"a LoRA slot index is past the stacks' {at.shape[0]} slots")
        if rc != 0:
            raise RuntimeError("the native LoRA kernel refused these sizes")

    def lora_set_slot(
        self, members: Sequence[tuple[LoraGroup, int, int, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Write an adapter's members, each (group, slot, member, A (r, in), scaled B (out, r)),
        A and B in bf16 or float32 on the CPU, into slots of blocked LoraGroups of one dtype,
        in it: what LoraGroup.set_slot writes (ranks past r zeroed), in one call for them
        all, spread over the threads."""
        if not members:
            return
        dtype = members[0][0].at.dtype
        if dtype not in DTYPES:
            raise ValueError("lora_set_slot takes stacks in bf16 or float32")
        words: list[int] = []
        kept: list[torch.Tensor] = []  # contiguous A and B, alive through the call
        for group, slot, member, a, b in members:
            at, r, out = group.at, a.shape[0], group.out_features[member]
            ok = group.blocked and at.dtype == dtype and a.dtype in DTYPES and b.dtype == a.dtype
            ok = ok and a.device.type == b.device.type == at.device.type == "cpu"
            ok = ok and a.shape == (r, group.in_features) and b.shape == (out, r)
            if not (ok and 0 <= slot < at.shape[0] and 0 <= member < at.shape[2]):
                raise ValueError("lora_set_slot takes blocked groups' slots and CPU A, B")
            a, b = a.contiguous(), b.contiguous()
            kept += (a, b)
            offset = slot * group.slot_stride * at.element_size()  # the slot's, in every stack
            words += (
                at.data_ptr() + offset,
                group.blocks[member].data_ptr() + offset,
                group.in_features,
                at.shape[2],
                member,
                at.shape[3],
                out,
                a.data_ptr(),
                b.data_ptr(),
                r,
                int(a.dtype == torch.bfloat16),
            )
        rc = self._lora_set_slot(
            (ctypes.c_int64 * len(words))(*words), len(members), int(dtype == torch.bfloat16)
        )
        if rc != 0:
            raise ValueError("an adapter's rank is past its stacks' rank capacity")

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        lengths: torch.Tensor,
        scaling: float,
        isa: str | None = None,
    ) -> torch.Tensor:
        """softmax(q K.T * scaling) V for queries q (B, H, D), token i against the first
        lengths[i] (1..max_len) positions of cache row rows[i] of keys and values (R, H_kv,
        max_len, D), read in place: a decode token's whole sequence, or a prompt token's
        positions up to its own (causal); float32 inside, returned in q's dtype, contiguous.
        q's tokens may be rows of a wider tensor (a fused projection's output). `isa` forces
        an instruction set below the machine's (for tests)."""
        level = self._level(isa)
        b, heads, d = q.shape
        _, kv_heads, max_len, _ = keys.shape
        if not (
            token_rows(q)
            and keys.is_contiguous()
            and values.is_contiguous()
            and q.dtype in DTYPES
            and keys.dtype in DTYPES
            and values.dtype == keys.dtype
            and rows.dtype == lengths.dtype == torch.int64
            and rows.shape == lengths.shape == (b,)
            and rows.is_contiguous()
            and lengths.is_contiguous()
            and heads % kv_heads == 0
        ):
            raise ValueError("decode_attention takes contiguous bf16 or float32 tensors")
        out = torch.empty((b, heads, d), dtype=q.dtype)
        rc = self._decode_attention(
            q.data_ptr(),
            q.stride(0),
            int(q.dtype == torch.bfloat16),
            b,
            heads,
            kv_heads,
            d,
            keys.data_ptr(),
            values.data_ptr(),
            int(keys.dtype == torch.bfloat16),
            max_len,
            rows.data_ptr(),
            lengths.data_ptr(),
            scaling,
            out.data_ptr(),
            level,
        )
        if rc == -2:
            raise ValueError(f"decode attention: lengths must be within 1..{max_len}")
        if rc != 0:
            raise MemoryError("decode attention: out of memory")
        return out

    def rope_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """Rotate q (N, H, D) and k (N, H_kv, D) in place by cos, sin (N, 1, D), as HF's
        apply_rotary_pos_emb (each product rounded to the dtype, then the sum). q's and k's
        tokens may be rows of a wider tensor (a fused projection's output)."""
        n, hq, d = q.shape
        if not (
            token_rows(q)
            and token_rows(k)
            and cos.is_contiguous()
            and sin.is_contiguous()
            and q.dtype in DTYPES
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and cos.shape[0] == n
        ):
            raise ValueError("rope_qk takes token rows of one dtype, bf16 or float32")
        bf16 = int(q.dtype == torch.bfloat16)
        rc = self._rope_qk(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), bf16, n, hq, k.shape[1], d,
            cos.data_ptr(), sin.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"rope_qk takes an even head size up to 1024, not {d}")

    def add_rms_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """h (N, W) += delta in place (when given), then HF's RMSNorm of h with `weight`."""
        n, width = h.shape
        if not (
            h.is_contiguous()
            and weight.is_contiguous()
            and h.dtype in DTYPES
            and h.dtype == weight.dtype
            and (delta is None or (delta.is_contiguous() and delta.dtype == h.dtype))
        ):
            raise ValueError("add_rms_norm takes contiguous tensors of one dtype")
        out = torch.empty_like(h)
        rc = self._add_rms_norm(
            h.data_ptr(),
            None if delta is None else delta.data_ptr(),
            int(h.dtype == torch.bfloat16),
            n,
            width,
            weight.data_ptr(),
            eps,
            out.data_ptr(),
        )
        if rc != 0:
            raise ValueError(
                f"add_rms_norm takes rows of up to {NATIVE_ROW_MAX} values, not {width}"
            )
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate and up (N, W), rounded as torch rounds the two ops (the
        silu, then the product); returned contiguous. Their rows may be rows of a wider tensor,
        one stride for both (the halves of a fused gate/up projection's output)."""
        rows, width = gate.shape
        if not (
            gate.dim() == 2
            and gate.stride(1) == up.stride(1) == 1
            and gate.stride(0) == up.stride(0) >= width
            and gate.dtype in DTYPES
            and gate.dtype == up.dtype
            and gate.shape == up.shape
        ):
            raise ValueError("silu_mul takes two (N, W) tensors of one shape, stride and dtype")
        out = torch.empty((rows, width), dtype=gate.dtype)
        bf16 = int(gate.dtype == torch.bfloat16)
        self._silu_mul(
            gate.data_ptr(), up.data_ptr(), rows, width, gate.stride(0), bf16, out.data_ptr()
        )
        return out

    def kv_write(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Token t's k and v (N, H_kv, D) into cache row rows[t] at positions[t] of keys and
        values (R, H_kv, max_len, D): KVCache.write's layer write, without index tensors. k's
        and v's tokens may be rows of a wider tensor (a fused projection's output)."""
        n, heads, d = k.shape
        if not (
            keys.is_contiguous()
            and values.is_contiguous()
            and token_rows(k)
            and token_rows(v)
            and k.dtype == v.dtype == keys.dtype == values.dtype
            and v.shape == k.shape
            and keys.shape[1] == heads
            and keys.shape[3] == d
            and rows.dtype == positions.dtype == torch.int64
            and rows.shape[0] == positions.shape[0] == n
        ):
            raise ValueError("kv_write takes token rows of one dtype and int64 indices")
        self._kv_write(
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), keys.data_ptr(),
            values.data_ptr(), heads, keys.shape[2], d, keys.element_size(), rows.data_ptr(),
            positions.data_ptr(), n,
        )  # fmt: skip

    def run_step(self, records: torch.Tensor) -> None:
        """Run a captured step: `records` (n, STEP_WORDS) int64, built by step_program.py."""
        failed = self._run_step(records.data_ptr(), records.shape[0])
        if failed:
            raise RuntimeError(f"a captured step failed at record {failed - 1}")

    @property
    def isa_level(self) -> int:
        """The instruction set the kernels run (an index in ISAS), for captured records."""
        return self._isa


def token_rows(x: torch.Tensor) -> bool:
    """Whether x (N, heads, D) holds each token's heads contiguously, tokens at any stride
    (whole tensors, or a fused projection's q, k or v columns)."""
    n, heads, d = x.shape
    heads_contiguous = x.stride(2) == 1 and (x.stride(1) == d or heads == 1)
    return heads_contiguous and (n <= 1 or x.stride(0) >= heads * d)


def load(directory: Path | None) -> CpuKernels | None:
    """The kernel, built into `directory` (a temporary one when None) if not there yet; None
    where it cannot be built here."""
    return _load(str(directory) if directory is not None else None)


@functools.cache
def _load(directory: str | None) -> CpuKernels | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no native kernels: no C compiler (cc) on this machine")
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        log.info("no native kernels: %s does not run (%s)", compiler, exc)
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + version.encode() + " ".join(FLAGS).encode()).hexdigest()
    where = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / "loraplex"
    path = where / f"cpu-kernels-{digest[:16]}.so"
    if not path.exists():
        try:
            _build(compiler, path)
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("no native kernels: the build failed (%s)", exc)
            return None
    try:
        library = CpuKernels(path)
    except OSError as exc:
        log.info("no native kernels: %s does not load (%s)", path, exc)
        return None
    log.info("native CPU kernels: %s (%s)", library.isa, path)
    return library


def _build(compiler: str, path: Path) -> None:
    """Compile into a temporary file and move it into place: processes building at the same
    time each finish with a whole library. OpenMP where the compiler has it, else one thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        for openmp in (("-fopenmp",), ()):
            command = [compiler, *FLAGS, *openmp, str(SOURCE), "-o", partial]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            raise subprocess.SubprocessError(result.stderr.strip()[-500:])
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
