/* y = x @ W.T for a bitsandbytes NF4 weight W (out, in), read in its 4-bit codes: no dense copy.
 *
 * A decode step on a CPU is memory-bound: a bf16 copy of the weights is read whole for every
 * step, 4x the bytes of the codes. This kernel reads the codes (two per byte, high nibble first,
 * bitsandbytes' layout) and the block scales (float32, expanded from the double quantization once
 * at load), looks the 16 NF4 values up in a vector register, and accumulates in float32, one block
 * at a time, for up to TILE rows of x per pass over the weight.
 *
 * x is first rearranged once per call: within each group of G weights the codes of the even
 * positions sit in the high nibbles and the odd ones in the low nibbles, so x's even and odd
 * entries are stored apart and both halves multiply straight from a register.
 *
 * Runtime dispatch: AVX-512 (16 lanes), AVX2 + FMA (8 lanes), else portable C. Output rows are
 * split across the caller's OpenMP threads (the same runtime as torch's, by soname).
 */
#define _GNU_SOURCE /* syscall, for the AMX permission */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_COUNT() omp_get_num_threads()
#define THREAD_INDEX() omp_get_thread_num()
#else
#define THREAD_COUNT() 1
#define THREAD_INDEX() 0
#endif

#define TILE 4

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t nan = (u >> 16) | 0x40;                      /* a quiet NaN stays one */
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded); /* no branch: vectorizes */
}

/* x (rows, in) as bf16 or float32 -> xp (rows, in) float32, split even/odd per group of g. */
static void rearrange(const void *x, int x_bf16, int64_t rows, int64_t in, int64_t g, float *xp) {
    int64_t half = g / 2;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t base = 0; base < in; base += g) {
            float *dst = xp + r * in + base;
            for (int64_t j = 0; j < half; j++) {
                int64_t even = r * in + base + 2 * j, odd = even + 1;
                if (x_bf16) {
                    dst[j] = bf16_to_f32(((const uint16_t *)x)[even]);
                    dst[half + j] = bf16_to_f32(((const uint16_t *)x)[odd]);
                } else {
                    dst[j] = ((const float *)x)[even];
                    dst[half + j] = ((const float *)x)[odd];
                }
            }
        }
    }
}

static inline void store(void *y, int y_bf16, int64_t index, float v) {
    if (y_bf16)
        ((uint16_t *)y)[index] = f32_to_bf16(v);
    else
        ((float *)y)[index] = v;
}

/* ---- AVX-512: groups of 32 weights (16 bytes), 16 lanes ----
 * Each group's block scale multiplies the 16-entry table (one multiply per 32 weights), so the
 * looked-up values come out scaled and the products accumulate straight into float32 sums: four
 * per row of x (two groups in flight, high and low nibbles apart), independent chains. */

#define AVX512_GROUP(NR, k, s, A0, A1)                                                             \
    do {                                                                                        \
        const __m512 lut_s = _mm512_mul_ps(lut, _mm512_set1_ps(s));                           \
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (k) / 2)));    \
        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut_s);                      \
        __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(q, low), lut_s);                     \
        for (int t = 0; t < NR; t++) {                                                          \
            const float *xr = xp + t * in + (k);                                                \
            acc[t][A0] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr), acc[t][A0]);                  \
            acc[t][A1] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr + 16), acc[t][A1]);             \
        }                                                                                       \
    } while (0)

#define DEFINE_AVX512(NR)                                                                       \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) static void               \
        rows_avx512_##NR(const float *xp, int64_t in, int64_t out, int64_t o0, int64_t o1,       \
                         const uint8_t *codes, const float *absmax, int64_t bs,                 \
                         const float *table, void *y, int y_bf16) {                             \
        const __m512 lut = _mm512_loadu_ps(table);                                              \
        const __m512i low = _mm512_set1_epi32(15);                                              \
        for (int64_t o = o0; o < o1; o++) {                                                     \
            const uint8_t *row = codes + o * (in / 2);                                          \
            const float *scales = absmax + o * (in / bs);                                       \
            __m512 acc[NR][4];                                                                  \
            for (int t = 0; t < NR; t++)                                                        \
                for (int a = 0; a < 4; a++) acc[t][a] = _mm512_setzero_ps();                    \
            int64_t k = 0;                                                                      \
            for (; k + 64 <= in; k += 64) {                                                     \
                AVX512_GROUP(NR, k, scales[k / bs], 0, 1);                                          \
                AVX512_GROUP(NR, k + 32, scales[(k + 32) / bs], 2, 3);                              \
            }                                                                                   \
            if (k < in) AVX512_GROUP(NR, k, scales[k / bs], 0, 1);                                  \
            for (int t = 0; t < NR; t++) {                                                      \
                __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),                 \
                                           _mm512_add_ps(acc[t][2], acc[t][3]));                \
                store(y, y_bf16, t * out + o, _mm512_reduce_add_ps(sum));                       \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_AVX512(1)
DEFINE_AVX512(2)
DEFINE_AVX512(3)
DEFINE_AVX512(4)

/* ---- AVX2 + FMA: groups of 16 weights (8 bytes), 8 lanes; the 16-entry lookup is two 8-entry
 * permutes blended on the code's bit 3 ---- */

__attribute__((target("avx2,fma")))
static inline __m256 lookup_avx2(__m256i q, __m256 lut_lo, __m256 lut_hi) {
    __m256 a = _mm256_permutevar8x32_ps(lut_lo, q);
    __m256 b = _mm256_permutevar8x32_ps(lut_hi, q);
    __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));
    return _mm256_blendv_ps(a, b, pick);
}

__attribute__((target("avx2,fma")))
static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define AVX2_GROUP(NR, k, s, A0, A1)                                                              \
    do {                                                                                        \
        const __m256 scale = _mm256_set1_ps(s);                                                 \
        const __m256 lo_s = _mm256_mul_ps(lut_lo, scale), hi_s = _mm256_mul_ps(lut_hi, scale);  \
        __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + (k) / 2)));    \
        __m256 hi = lookup_avx2(_mm256_srli_epi32(q, 4), lo_s, hi_s);                           \
        __m256 lo = lookup_avx2(_mm256_and_si256(q, low), lo_s, hi_s);                          \
        for (int t = 0; t < NR; t++) {                                                          \
            const float *xr = xp + t * in + (k);                                                \
            acc[t][A0] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr), acc[t][A0]);                  \
            acc[t][A1] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr + 8), acc[t][A1]);              \
        }                                                                                       \
    } while (0)

#define DEFINE_AVX2(NR)                                                                         \
    __attribute__((target("avx2,fma"))) static void rows_avx2_##NR(                             \
        const float *xp, int64_t in, int64_t out, int64_t o0, int64_t o1, const uint8_t *codes, \
        const float *absmax, int64_t bs, const float *table, void *y, int y_bf16) {             \
        const __m256 lut_lo = _mm256_loadu_ps(table), lut_hi = _mm256_loadu_ps(table + 8);      \
        const __m256i low = _mm256_set1_epi32(15);                                              \
        for (int64_t o = o0; o < o1; o++) {                                                     \
            const uint8_t *row = codes + o * (in / 2);                                          \
            const float *scales = absmax + o * (in / bs);                                       \
            __m256 acc[NR][4];                                                                  \
            for (int t = 0; t < NR; t++)                                                        \
                for (int a = 0; a < 4; a++) acc[t][a] = _mm256_setzero_ps();                    \
            for (int64_t k = 0; k < in; k += 32) {                                              \
                float s = scales[k / bs];                                                       \
                AVX2_GROUP(NR, k, s, 0, 1);                                                         \
                AVX2_GROUP(NR, k + 16, s, 2, 3);                                                    \
            }                                                                                   \
            for (int t = 0; t < NR; t++) {                                                      \
                __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]),                 \
                                           _mm256_add_ps(acc[t][2], acc[t][3]));                \
                store(y, y_bf16, t * out + o, hsum_avx2(sum));                                  \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_AVX2(1)
DEFINE_AVX2(2)
DEFINE_AVX2(3)
DEFINE_AVX2(4)

/* ---- portable: groups of 2 ---- */

static void rows_portable(const float *xp, int64_t nrows, int64_t in, int64_t out, int64_t o0,
                          int64_t o1, const uint8_t *codes, const float *absmax, int64_t bs,
                          const float *table, void *y, int y_bf16) {
    int64_t blocks = in / bs;
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = codes + o * (in / 2);
        for (int64_t t = 0; t < nrows; t++) {
            const float *xr = xp + t * in;
            float total = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                float acc = 0.0f;
                for (int64_t k = b * bs; k < (b + 1) * bs; k += 2) {
                    uint8_t q = row[k / 2];
                    acc += table[q >> 4] * xr[k] + table[q & 15] * xr[k + 1];
                }
                total += acc * absmax[o * blocks + b];
            }
            store(y, y_bf16, t * out + o, total);
        }
    }
}

typedef void (*rows_fn)(const float *, int64_t, int64_t, int64_t, int64_t, const uint8_t *,
                        const float *, int64_t, const float *, void *, int);

#define DEFINE_PORTABLE(NR)                                                                     \
    static void rows_portable_##NR(const float *xp, int64_t in, int64_t out, int64_t o0,        \
                                   int64_t o1, const uint8_t *codes, const float *absmax,       \
                                   int64_t bs, const float *table, void *y, int y_bf16) {       \
        rows_portable(xp, NR, in, out, o0, o1, codes, absmax, bs, table, y, y_bf16);            \
    }

DEFINE_PORTABLE(1)
DEFINE_PORTABLE(2)
DEFINE_PORTABLE(3)
DEFINE_PORTABLE(4)

static const rows_fn KERNELS[3][TILE] = {
    {rows_portable_1, rows_portable_2, rows_portable_3, rows_portable_4},
    {rows_avx2_1, rows_avx2_2, rows_avx2_3, rows_avx2_4},
    {rows_avx512_1, rows_avx512_2, rows_avx512_3, rows_avx512_4},
};

/* AVX512-BF16 intrinsics need GCC 10 or Clang 9; with an older compiler the BF16 versions are
 * left out (and never chosen), not the whole library. */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif
/* AMX tiles: the compilers' intrinsics, and Linux's permission to use them */
#if HAVE_BF16 && defined(__linux__) && defined(__x86_64__) &&                                   \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
static int amx_usable(void);
#else
#define HAVE_AMX 0
#endif

/* The instruction set this process uses: 4 = 3 with AMX tiles (which the LoRA's prompt runs
 * use), 3 = AVX-512 with BF16 dot products (which the attention and the LoRA use: the other
 * kernels run their AVX-512 versions), 2 = AVX-512, 1 = AVX2 + FMA, 0 = portable. */
int nf4_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
#if HAVE_BF16
        if (__builtin_cpu_supports("avx512bf16")) return HAVE_AMX && amx_usable() ? 4 : 3;
#endif
        return 2;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

/* Plain loops the compiler vectorizes (the attention's fallback, rope, the norms, silu * up) are
 * built three times, for AVX-512, AVX2 and neither (VECTOR_CLONES), and run at the level
 * set_vector_isa gives: the process's instruction set as the other kernels take it in `isa` (the
 * CPU's, or below it where torch was capped, so that an AVX-512 machine stands in for an AVX2
 * one). target_clones would ask the CPU alone. 2 = AVX-512F, 1 = AVX2, 0 = neither; set once
 * the library is loaded, before any kernel runs. */
static int vector_level;

/* isa: nf4_isa()'s scale, at most its answer; returns the loops' level */
int set_vector_isa(int isa) {
    vector_level = isa >= 2 ? 2 : (isa < 0 ? 0 : isa);
    return vector_level;
}

/* name(params) calling name##_any(args), an always_inline body, built for each level */
#define VECTOR_CLONES(name, params, args)                                                      \
    __attribute__((target("avx512f"))) static void name##_avx512 params { name##_any args; }  \
    __attribute__((target("avx2"))) static void name##_avx2 params { name##_any args; }       \
    static void name params {                                                                \
        if (vector_level == 2)                                                               \
            name##_avx512 args;                                                              \
        else if (vector_level == 1)                                                          \
            name##_avx2 args;                                                                \
        else                                                                                 \
            name##_any args;                                                                 \
    }

/* y (rows, out) = x (rows, in) @ W.T. Returns 0, or -1 when the shape is not supported
 * (in a multiple of the block size, the block size a multiple of 32) or memory runs out. */
int nf4_linear(const void *x, int x_bf16, int64_t rows, int64_t in, const uint8_t *codes,
               const float *absmax, int64_t out, int64_t bs, const float *table, void *y,
               int y_bf16, int isa) {
    if (bs <= 0 || bs % 32 || in % bs) return -1;
    if (isa < 0 || isa > 4) return -1;
    isa = isa > 2 ? 2 : isa; /* no BF16 version of its own */
    int64_t g = isa == 2 ? 32 : isa == 1 ? 16 : 2;
    float *xp = malloc((size_t)(rows * in) * sizeof(float));
    if (xp == NULL) return -1;
    rearrange(x, x_bf16, rows, in, g, xp);
    int64_t tiles = (rows + TILE - 1) / TILE;
    int64_t chunk = 16; /* output rows per task: a few cache lines of y per thread */
    int64_t chunks = (out + chunk - 1) / chunk;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        for (int64_t t = 0; t < tiles; t++) {
            int64_t o0 = c * chunk, o1 = o0 + chunk < out ? o0 + chunk : out;
            int64_t r0 = t * TILE, n = rows - r0 < TILE ? rows - r0 : TILE;
            KERNELS[isa][n - 1](xp + r0 * in, in, out, o0, o1, codes, absmax, bs, table,
               y_bf16 ? (void *)((uint16_t *)y + r0 * out) : (void *)((float *)y + r0 * out),
               y_bf16);
        }
    }
    free(xp);
    return 0;
}

/* ---- LoRA: out_j[i] += scale * (x[i] @ A[s_i].T) @ B_j[s_i].T for each row i whose slot s_i is
 * not -1, for the k members j of a group that share one input (one shrink serves them all).
 *
 * The stacks are LoraGroup's, blocked: a slot's A.T (in, k, C) of every member, then each
 * member's B.T (C, out_j) in blocks of LORA_BLOCK columns, slot_stride elements a slot; C is the
 * rank capacity, r <= C the rank the step uses. Weights and
 * activations in bf16 or float32, sums in float32, each output rounded once. A few rows' LoRA
 * is a few hundred thousand multiply-adds: as torch ops it costs more in dispatch than in
 * arithmetic. The loops are plain C, vectorized by the compiler for each instruction set. ---- */

#define LORA_MAX_COLUMNS 8192 /* k * C */
#define LORA_MAX_WIDTH 65536  /* out_j */
/* B.T of a slot and member is stored in blocks of LORA_BLOCK columns, each (C, LORA_BLOCK)
 * whole, after the slot's A.T (lora.py's LoraGroup): a slot's weights are one run of memory,
 * read in order, and a pass over a block's columns reads one run of it. */
#define LORA_BLOCK 64
#define LORA_COLD_ROWS 8 /* what reading an item's weights from memory costs, in rows computed */

/* Column o of B.T's first row, in blocks of LORA_BLOCK columns of `cap` rows each; a pass of up
 * to LORA_BLOCK columns from a multiple of its width stays in one block, rows LORA_BLOCK apart */
static inline const void *block_at(const void *bt, int64_t o, int64_t cap, int64_t esize) {
    return (const char *)bt + ((o / LORA_BLOCK) * LORA_BLOCK * cap + o % LORA_BLOCK) * esize;
}

static inline float load_any(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* A row of n values in bf16 or float32 to float32 and back, in loops the compiler vectorizes
 * (bf16 is the high half of a float32: a shift, and round-to-nearest-even on the way back). */
static inline void load_row(const void *src, int bf16, int64_t n, float *dst) {
    if (!bf16) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = src;
    uint32_t *d = (uint32_t *)dst;
    for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
}

static inline void store_row(void *dst, int bf16, int64_t n, const float *src) {
    if (!bf16) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint32_t *s = (const uint32_t *)src;
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = (uint16_t)((s[i] + 0x7fffu + ((s[i] >> 16) & 1u)) >> 16);
}

/* A few rows' LoRA reads each slot's weights once, from memory, and does little with each
 * vector: the hardware prefetchers alone left it at about half the machine's read bandwidth
 * (their streams stop at each 4 KiB page, twenty-odd pages an item). The passes below also ask
 * for the bytes LORA_PREFETCH ahead of those they read (the weights are one run of memory a
 * slot, the next slot's after it): on an AMX Xeon a decode step's LoRA over 32 adapters took
 * 18 ms against 22 (1 KiB ahead into L1; 512: 20, 2048: 19, 4096: 20). Into L2 (hint T1) they
 * go further: a core has only a dozen or so lines in flight to L1, several dozen to L2, and
 * 4 KiB ahead took the same LoRA (in the kernel alone) from 18.7-19.0 ms to 17.5-18.0 with
 * bf16 rows, 20.2 to 19.1 with float32 rows (AVX2's passes: 22.2 to 21.5). */
#define LORA_PREFETCH 4096
/* A prompt chunk's float32 outputs (512 rows by up to a few thousand columns) are past the
 * caches when its LoRA adds to them, a row at a time: the expand asks for each row's columns
 * LORA_OUT_PREFETCH on (four AVX2 passes) as it goes. A 512-row chunk of the embedded model's
 * LoRA on AVX2 took 67-73 ms against 79-86 (in bf16 it measured slower, and is left alone). */
#define LORA_OUT_PREFETCH 64

/* the n elements at index i of p (bf16 or float32), LORA_PREFETCH bytes on */
static inline void prefetch_ahead(const void *p, int bf16, int64_t i, int64_t n) {
    int64_t esize = bf16 ? 2 : 4;
    const char *start = (const char *)p + i * esize + LORA_PREFETCH;
    for (int64_t b = 0; b < n * esize; b += 64) _mm_prefetch(start + b, _MM_HINT_T1);
}

#define LORA_TOKENS 4 /* rows of one slot that share a pass over its A and B (registers) */

/* The vector paths: NR rows (1-4) at a time, NB vectors of columns per pass, the sums in
 * registers. Weights in bf16 are widened in the register (a bf16 is a float32's high half); a
 * bf16 output is rounded to nearest even. They return the columns done (whole vectors); the
 * portable loops below take the rest. */

/* 16 bf16 values widened to float32, and back rounded to nearest even */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
static inline __m512 widen16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
static inline __m256i narrow16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_cvtepi32_epi16(u);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
static inline __m512 load16(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    return widen16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
static inline void store16(void *p, int bf16, int64_t i, __m512 v) {
    if (!bf16) {
        _mm512_storeu_ps((float *)p + i, v);
        return;
    }
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), narrow16(v));
}

__attribute__((target("avx2,fma")))
static inline __m256 load8(const void *p, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma")))
static inline void store8(void *p, int bf16, int64_t i, __m256 v) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

/* shrunk (NR, kc) = xr (NR, in) @ at (in, kc), columns [c0, c0 + NB * LANES). U rows of A.T
 * at a time into U sets of sums (added at the end): a row or two alone would otherwise wait on
 * the latency of one chain of multiply-adds per vector. */
#define LORA_SHRINK(ISA, VEC, LANES, ZERO, SET1, FMA, ADD, LOAD, STORE, NR, NB, U)                 \
    static void shrink_##ISA##_##NR##_##NB(const float *xr, int64_t in, const void *at, int wb,    \
                                          int64_t kc, int64_t c0, float *shrunk) {              \
        VEC acc[U][NR][NB];                                                                     \
        for (int u = 0; u < U; u++)                                                             \
            for (int t = 0; t < NR; t++)                                                        \
                for (int v = 0; v < NB; v++) acc[u][t][v] = ZERO();                             \
        int64_t i = 0;                                                                          \
        for (; i + U <= in; i += U)                                                             \
            for (int u = 0; u < U; u++) {                                                       \
                VEC a[NB];                                                                      \
                for (int v = 0; v < NB; v++) a[v] = LOAD(at, wb, (i + u) * kc + c0 + v * LANES); \
                prefetch_ahead(at, wb, (i + u) * kc + c0, NB * LANES);                          \
                for (int t = 0; t < NR; t++) {                                                  \
                    VEC xv = SET1(xr[t * in + i + u]);                                          \
                    for (int v = 0; v < NB; v++) acc[u][t][v] = FMA(xv, a[v], acc[u][t][v]);    \
                }                                                                               \
            }                                                                                   \
        for (; i < in; i++) {                                                                   \
            VEC a[NB];                                                                          \
            for (int v = 0; v < NB; v++) a[v] = LOAD(at, wb, i * kc + c0 + v * LANES);          \
            for (int t = 0; t < NR; t++) {                                                      \
                VEC xv = SET1(xr[t * in + i]);                                                  \
                for (int v = 0; v < NB; v++) acc[0][t][v] = FMA(xv, a[v], acc[0][t][v]);        \
            }                                                                                   \
        }                                                                                       \
        for (int u = 1; u < U; u++)                                                             \
            for (int t = 0; t < NR; t++)                                                        \
                for (int v = 0; v < NB; v++) acc[0][t][v] = ADD(acc[0][t][v], acc[u][t][v]);    \
        for (int t = 0; t < NR; t++)                                                            \
            for (int v = 0; v < NB; v++) STORE(shrunk, 0, t * kc + c0 + v * LANES, acc[0][t][v]); \
    }

/* out rows t (NR, `stride` apart) += scale * s[t] (r, kc apart) @ bt (r rows `ld` apart, NB
 * vectors: B.T at column o0), columns [o0, o0 + NB * LANES), each rounded once; U rows of B.T
 * at a time, as in the shrink */
#define LORA_EXPAND(ISA, VEC, LANES, ZERO, SET1, FMA, ADD, LOAD, STORE, NR, NB, U)                 \
    static void expand_##ISA##_##NR##_##NB(const float *s, int64_t kc, int64_t r, const void *bt, \
                                          int wb, int64_t ld, int64_t o0, float scale,          \
                                          char *out, int64_t stride, int yb) {                  \
        VEC acc[U][NR][NB];                                                                     \
        for (int u = 0; u < U; u++)                                                             \
            for (int t = 0; t < NR; t++)                                                        \
                for (int v = 0; v < NB; v++) acc[u][t][v] = ZERO();                             \
        int64_t q = 0;                                                                          \
        for (; q + U <= r; q += U)                                                              \
            for (int u = 0; u < U; u++) {                                                       \
                VEC b[NB];                                                                      \
                for (int v = 0; v < NB; v++)                                                    \
                    b[v] = LOAD(bt, wb, (q + u) * ld + v * LANES);                              \
                prefetch_ahead(bt, wb, (q + u) * ld, NB * LANES);                               \
                for (int t = 0; t < NR; t++) {                                                  \
                    VEC sv = SET1(s[t * kc + q + u]);                                           \
                    for (int v = 0; v < NB; v++) acc[u][t][v] = FMA(sv, b[v], acc[u][t][v]);    \
                }                                                                               \
            }                                                                                   \
        for (; q < r; q++) {                                                                    \
            VEC b[NB];                                                                          \
            for (int v = 0; v < NB; v++) b[v] = LOAD(bt, wb, q * ld + v * LANES);               \
            for (int t = 0; t < NR; t++) {                                                      \
                VEC sv = SET1(s[t * kc + q]);                                                   \
                for (int v = 0; v < NB; v++) acc[0][t][v] = FMA(sv, b[v], acc[0][t][v]);        \
            }                                                                                   \
        }                                                                                       \
        for (int u = 1; u < U; u++)                                                             \
            for (int t = 0; t < NR; t++)                                                        \
                for (int v = 0; v < NB; v++) acc[0][t][v] = ADD(acc[0][t][v], acc[u][t][v]);    \
        VEC sc = SET1(scale);                                                                   \
        for (int t = 0; t < NR; t++) {                                                          \
            char *row = out + t * stride * (yb ? 2 : 4);                                        \
            for (int v = 0; v < NB; v++) {                                                      \
                int64_t o = o0 + v * LANES;                                                     \
                STORE(row, yb, o, FMA(sc, acc[0][t][v], LOAD(row, yb, o)));                    \
            }                                                                                   \
        }                                                                                       \
    }

#define LORA_AVX512(NR, NB, U)                                                                   \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))                           \
    LORA_SHRINK(avx512, __m512, 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps,          \
                _mm512_add_ps, load16, store16, NR, NB, U)                                      \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))                           \
    LORA_EXPAND(avx512, __m512, 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps,          \
                _mm512_add_ps, load16, store16, NR, NB, U)
#define LORA_AVX2(NR, NB, U)                                                                     \
    __attribute__((target("avx2,fma")))                                                         \
    LORA_SHRINK(avx2, __m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_fmadd_ps,             \
                _mm256_add_ps, load8, store8, NR, NB, U)                                        \
    __attribute__((target("avx2,fma")))                                                         \
    LORA_EXPAND(avx2, __m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_fmadd_ps,             \
                _mm256_add_ps, load8, store8, NR, NB, U)

/* U: independent sets of sums for few rows (about 8 chains of multiply-adds in flight), within
 * the registers (32 vectors on AVX-512, 16 on AVX2) */
LORA_AVX512(1, 4, 2) LORA_AVX512(2, 4, 1) LORA_AVX512(3, 4, 1) LORA_AVX512(4, 4, 1)
LORA_AVX512(1, 1, 8) LORA_AVX512(2, 1, 4) LORA_AVX512(3, 1, 2) LORA_AVX512(4, 1, 2)
LORA_AVX2(1, 2, 4) LORA_AVX2(2, 2, 2) LORA_AVX2(3, 2, 1) LORA_AVX2(4, 2, 1)
LORA_AVX2(1, 1, 8) LORA_AVX2(2, 1, 4) LORA_AVX2(3, 1, 2) LORA_AVX2(4, 1, 2)

typedef void (*shrink_fn)(const float *, int64_t, const void *, int, int64_t, int64_t, float *);
typedef void (*expand_fn)(const float *, int64_t, int64_t, const void *, int, int64_t, int64_t,
                          float, char *, int64_t, int);
/* [isa - 1][wide][rows - 1]: wide = NB vectors per pass (4 for AVX-512, 2 for AVX2), else 1 */
static const shrink_fn SHRINK[2][2][LORA_TOKENS] = {
    {{shrink_avx2_1_1, shrink_avx2_2_1, shrink_avx2_3_1, shrink_avx2_4_1},
     {shrink_avx2_1_2, shrink_avx2_2_2, shrink_avx2_3_2, shrink_avx2_4_2}},
    {{shrink_avx512_1_1, shrink_avx512_2_1, shrink_avx512_3_1, shrink_avx512_4_1},
     {shrink_avx512_1_4, shrink_avx512_2_4, shrink_avx512_3_4, shrink_avx512_4_4}}};
static const expand_fn EXPAND[2][2][LORA_TOKENS] = {
    {{expand_avx2_1_1, expand_avx2_2_1, expand_avx2_3_1, expand_avx2_4_1},
     {expand_avx2_1_2, expand_avx2_2_2, expand_avx2_3_2, expand_avx2_4_2}},
    {{expand_avx512_1_1, expand_avx512_2_1, expand_avx512_3_1, expand_avx512_4_1},
     {expand_avx512_1_4, expand_avx512_2_4, expand_avx512_3_4, expand_avx512_4_4}}};
static const int64_t LANES[3] = {1, 8, 16}, WIDE[3] = {1, 2, 4};

#if HAVE_BF16
/* The same two passes for bf16 rows and weights on a CPU with AVX512-BF16: two rows of A.T (of
 * B.T) interleaved in one register (vpermt2w) multiply in place, two values per lane
 * (vdpbf16ps, the products exact as widened, the sums in float32): half the multiply-adds and
 * none of the widening. Five prompt chunks of 102 tokens over the embedded model's 30 layers
 * take 28-32 ms against 41 with the float32 sums (and 56 in torch's matmuls), so runs of one
 * adapter up to 256 tokens come to the kernel (CpuKernels.lora_run_tokens). The shrunk values are
 * rounded to bf16 for the expand, as a bf16 matmul pair rounds them. NR rows, NB vectors of 16
 * columns, U pairs of weight rows into U sets of sums (one pass, pair_sums, for both); A.T's
 * rows prefetched LORA_AHEAD ahead, B.T's next block of columns. An odd last row pairs with
 * zeros. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __m512bh
weight_pairs(const uint16_t *row0, const uint16_t *row1, __m512i order) {
    __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)row0));
    __m512i b = row1 ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)row1))
                     : _mm512_setzero_si512();
    return (__m512bh)_mm512_permutex2var_epi16(a, order, b);
}

#define LORA_AHEAD 16
/* Runs of one adapter longer than this (prompt chunks, which torch's bf16 matmuls took before,
 * rounding the shrunk values just so) take the BF16 passes; shorter ones (decode tokens, short
 * chunks) keep the float32 sums, and so their results: the passes gained them nothing
 * measurable, and their rounding moved the logits further from float32's. */
#define LORA_DOT_RUN 64
#define LORA_AMX_ROWS 32 /* rows of one run an item takes on AMX tiles (below) */
/* Where there are tiles, runs of LORA_AMX_MIN_RUN to LORA_DOT_RUN rows (one adapter's decode
 * rows in a batch of many streams) take them too, their sums kept as the float32 passes' (one
 * adapter's 64 rows over 30 layers: 3.8 ms a step against 5.9); shorter runs keep those passes,
 * which the packing does not pay for (8 runs of 8 rows: 8.4 against 6.9 ms) */
#define LORA_AMX_MIN_RUN 32

/* lanes 2j, 2j + 1: value j of the first row and of the second (32 + j: the second operand) */
#define PAIR_ORDER                                                                              \
    _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, \
                     37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0)

static inline int32_t value_pair(const uint16_t *v, int64_t i, int64_t n) {
    return (int32_t)((uint32_t)v[i] | (i + 1 < n ? (uint32_t)v[i + 1] << 16 : 0u));
}

#define LORA_BF16(NR, NB, U)                                                                      \
    /* sums[t][v] = sum over rows i of w (ld apart, columns [16v, 16v + 16)) of vals[t, i] *    \
     * w[i] (vals' rows vs apart); `ahead` elements past each row read, prefetched */          \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma"), always_inline))         \
    static inline void pair_sums_##NR##_##NB(const uint16_t *w, int64_t ld, int64_t rows,        \
                                             const uint16_t *vals, int64_t vs, int64_t ahead,   \
                                             __m512 sums[NR][NB]) {                             \
        const __m512i order = PAIR_ORDER;                                                       \
        __m512 acc[U][NR][NB];                                                                  \
        for (int u = 0; u < U; u++)                                                             \
            for (int t = 0; t < NR; t++)                                                        \
                for (int v = 0; v < NB; v++) acc[u][t][v] = _mm512_setzero_ps();                \
        int64_t i = 0;                                                                          \
        for (; i + 2 * U <= rows; i += 2 * U)                                                   \
            for (int u = 0; u < U; u++) {                                                       \
                const uint16_t *r0 = w + (i + 2 * u) * ld;                                      \
                _mm_prefetch((const char *)(r0 + ahead), _MM_HINT_T0);                          \
                _mm_prefetch((const char *)(r0 + ld + ahead), _MM_HINT_T0);                     \
                __m512bh a[NB];                                                                 \
                for (int v = 0; v < NB; v++) a[v] = weight_pairs(r0 + 16 * v, r0 + ld + 16 * v, order); \
                for (int t = 0; t < NR; t++) {                                                  \
                    __m512bh x = (__m512bh)_mm512_set1_epi32(value_pair(vals + t * vs, i + 2 * u, rows)); \
                    for (int v = 0; v < NB; v++) acc[u][t][v] = _mm512_dpbf16_ps(acc[u][t][v], x, a[v]); \
                }                                                                               \
            }                                                                                   \
        for (; i < rows; i += 2) {                                                              \
            const uint16_t *r0 = w + i * ld;                                                    \
            __m512bh a[NB];                                                                     \
            for (int v = 0; v < NB; v++)                                                        \
                a[v] = weight_pairs(r0 + 16 * v, i + 1 < rows ? r0 + ld + 16 * v : NULL, order); \
            for (int t = 0; t < NR; t++) {                                                      \
                __m512bh x = (__m512bh)_mm512_set1_epi32(value_pair(vals + t * vs, i, rows));   \
                for (int v = 0; v < NB; v++) acc[0][t][v] = _mm512_dpbf16_ps(acc[0][t][v], x, a[v]); \
            }                                                                                   \
        }                                                                                       \
        for (int t = 0; t < NR; t++)                                                            \
            for (int v = 0; v < NB; v++) {                                                      \
                sums[t][v] = acc[0][t][v];                                                      \
                for (int u = 1; u < U; u++) sums[t][v] = _mm512_add_ps(sums[t][v], acc[u][t][v]); \
            }                                                                                   \
    }                                                                                           \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma"))) static void              \
        shrink_bf16_##NR##_##NB(const uint16_t *xb, int64_t in, const uint16_t *at, int64_t kc, \
                                int64_t c0, float *shrunk) {                                    \
        __m512 sums[NR][NB];                                                                    \
        pair_sums_##NR##_##NB(at + c0, kc, in, xb, in, LORA_AHEAD * kc, sums);                  \
        for (int t = 0; t < NR; t++)                                                            \
            for (int v = 0; v < NB; v++) _mm512_storeu_ps(shrunk + t * kc + c0 + 16 * v, sums[t][v]); \
    }                                                                                           \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) static void     \
        expand_bf16_##NR##_##NB(const uint16_t *sb, int64_t kc, int64_t r, const uint16_t *bt,  \
                                int64_t cap, int64_t o0, float scale, char *out,                \
                                int64_t stride) {                                               \
        __m512 sums[NR][NB];                                                                    \
        pair_sums_##NR##_##NB(bt, LORA_BLOCK, r, sb, kc, LORA_BLOCK * cap, sums);               \
        __m512 sc = _mm512_set1_ps(scale);                                                      \
        for (int t = 0; t < NR; t++) {                                                          \
            char *row = out + t * stride * 2;                                                   \
            for (int v = 0; v < NB; v++) {                                                      \
                int64_t o = o0 + 16 * v;                                                        \
                store16(row, 1, o, _mm512_fmadd_ps(sc, sums[t][v], load16(row, 1, o)));         \
            }                                                                                   \
        }                                                                                       \
    }

/* U: about 8 chains of dot products in flight, within the 32 registers */
LORA_BF16(1, 1, 8) LORA_BF16(2, 1, 4) LORA_BF16(3, 1, 3) LORA_BF16(4, 1, 2)
LORA_BF16(1, 2, 4) LORA_BF16(2, 2, 2) LORA_BF16(3, 2, 2) LORA_BF16(4, 2, 1)
LORA_BF16(1, 3, 3) LORA_BF16(2, 3, 2) LORA_BF16(3, 3, 1) LORA_BF16(4, 3, 1)
LORA_BF16(1, 4, 2) LORA_BF16(2, 4, 1) LORA_BF16(3, 4, 1) LORA_BF16(4, 4, 1)

typedef void (*shrink_bf16_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t,
                               float *);
typedef void (*expand_bf16_fn)(const uint16_t *, int64_t, int64_t, const uint16_t *, int64_t,
                               int64_t, float, char *, int64_t);
/* [vectors - 1][rows - 1] */
static const shrink_bf16_fn SHRINK_BF16[4][LORA_TOKENS] = {
    {shrink_bf16_1_1, shrink_bf16_2_1, shrink_bf16_3_1, shrink_bf16_4_1},
    {shrink_bf16_1_2, shrink_bf16_2_2, shrink_bf16_3_2, shrink_bf16_4_2},
    {shrink_bf16_1_3, shrink_bf16_2_3, shrink_bf16_3_3, shrink_bf16_4_3},
    {shrink_bf16_1_4, shrink_bf16_2_4, shrink_bf16_3_4, shrink_bf16_4_4}};
static const expand_bf16_fn EXPAND_BF16[4][LORA_TOKENS] = {
    {expand_bf16_1_1, expand_bf16_2_1, expand_bf16_3_1, expand_bf16_4_1},
    {expand_bf16_1_2, expand_bf16_2_2, expand_bf16_3_2, expand_bf16_4_2},
    {expand_bf16_1_3, expand_bf16_2_3, expand_bf16_3_3, expand_bf16_4_3},
    {expand_bf16_1_4, expand_bf16_2_4, expand_bf16_3_4, expand_bf16_4_4}};

/* lora_shrink and lora_expand for bf16 rows and weights: whole vectors of columns, four at a
 * time, then the rest of them in one pass; the columns left (under 16) in scalar loops */
/* The last columns of a pass, 1 to 15 of them (a pool of rank capacity 8 has 8 for each
 * member): one masked vector, for the n rows, two sets of sums */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma"))) static void
pair_sums_tail(const uint16_t *w, int64_t ld, int64_t rows, int64_t cols, const uint16_t *vals,
               int64_t vs, int64_t n, __m512 sums[LORA_TOKENS]) {
    const __m512i order = PAIR_ORDER;
    const __mmask16 m = (__mmask16)((1u << cols) - 1);
    __m512 acc[2][LORA_TOKENS];
    for (int u = 0; u < 2; u++)
        for (int64_t t = 0; t < n; t++) acc[u][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; i += 2) {
        __m512i a0 = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, w + i * ld));
        __m512i a1 = i + 1 < rows ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, w + (i + 1) * ld))
                                  : _mm512_setzero_si512();
        __m512bh a = (__m512bh)_mm512_permutex2var_epi16(a0, order, a1);
        int u = (int)((i / 2) & 1);
        for (int64_t t = 0; t < n; t++)
            acc[u][t] = _mm512_dpbf16_ps(acc[u][t], (__m512bh)_mm512_set1_epi32(value_pair(vals + t * vs, i, rows)), a);
    }
    for (int64_t t = 0; t < n; t++) sums[t] = _mm512_add_ps(acc[0][t], acc[1][t]);
}

/* lora_shrink and lora_expand for bf16 rows and weights: whole vectors of columns, four at a
 * time, then the rest of them in one pass, then a masked vector for the last few columns */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
static void lora_shrink_bf16(const uint16_t *xb, int64_t n, int64_t in, const uint16_t *at,
                             int64_t kc, float *shrunk) {
    int64_t c = 0;
    for (; c + 64 <= kc; c += 64) SHRINK_BF16[3][n - 1](xb, in, at, kc, c, shrunk);
    if (kc - c >= 16) {
        int64_t nb = (kc - c) / 16;
        SHRINK_BF16[nb - 1][n - 1](xb, in, at, kc, c, shrunk);
        c += 16 * nb;
    }
    if (c < kc) {
        __m512 sums[LORA_TOKENS];
        pair_sums_tail(at + c, kc, in, kc - c, xb, in, n, sums);
        for (int64_t t = 0; t < n; t++)
            _mm512_mask_storeu_ps(shrunk + t * kc + c, (__mmask16)((1u << (kc - c)) - 1), sums[t]);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
static void lora_expand_bf16(const uint16_t *sb, int64_t n, int64_t kc, int64_t r, int64_t cap,
                             const uint16_t *bt, int64_t width, float scale, char *out,
                             int64_t stride) {
    int64_t o = 0;
#define BLOCK_AT(o) ((const uint16_t *)block_at(bt, (o), cap, 2))
    for (; o + 64 <= width; o += 64)
        EXPAND_BF16[3][n - 1](sb, kc, r, BLOCK_AT(o), cap, o, scale, out, stride);
    if (width - o >= 16) {
        int64_t nb = (width - o) / 16;
        EXPAND_BF16[nb - 1][n - 1](sb, kc, r, BLOCK_AT(o), cap, o, scale, out, stride);
        o += 16 * nb;
    }
    if (o < width) { /* y += scale * sums, rounded once, in a masked vector */
        const __mmask16 m = (__mmask16)((1u << (width - o)) - 1);
        __m512 sums[LORA_TOKENS], sc = _mm512_set1_ps(scale);
        pair_sums_tail(BLOCK_AT(o), LORA_BLOCK, r, width - o, sb, kc, n, sums);
#undef BLOCK_AT
        for (int64_t t = 0; t < n; t++) {
            uint16_t *row = (uint16_t *)out + t * stride + o;
            __m512 y = widen16(_mm256_maskz_loadu_epi16(m, row));
            _mm256_mask_storeu_epi16(row, m, narrow16(_mm512_fmadd_ps(sc, sums[t], y)));
        }
    }
}
#endif

#if HAVE_AMX
/* ---- The BF16 passes on AMX (Xeons since Sapphire Rapids): a prompt run's shrink and expand
 * as tile products, 16 rows x 16 columns x 32 (16 for the expand's rank) pairs of bf16 per
 * instruction, the sums in float32. The vector passes above multiply at about 100 GFLOPS on
 * two cores; a prompt's LoRA is about 10 MFLOP a token on the embedded model, most of a mixed
 * burst's prompt time beside the base's matmuls, which oneDNN already runs on these tiles.
 *
 * A tile's second operand is stored in pairs of rows (row p: column c's values of rows 2p and
 * 2p + 1 side by side), so a thread packs a slot's A.T and each member's B.T that way, zero
 * padded to whole tiles, once for its items of that slot (items of LORA_AMX_ROWS rows of one
 * run, a thread's share of a run taken in order). Rows are taken 16 at a time, a last partial
 * tile of rows (or rows of a width no multiple of 32) copied into a zero-padded one. The shrunk
 * values are rounded to bf16 for the expand, as the passes above round them; only the order of
 * the float32 sums differs from theirs. */
#define AMX_TARGET                                                                              \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define XFEATURE_XTILEDATA 18
#define ARCH_REQ_XCOMP_PERM 0x1023

/* Whether this process may use the tiles: the CPU has AMX-TILE and AMX-BF16, the OS saves their
 * state (XCR0), and Linux grants the process their use (which it asks for once, as oneDNN does) */
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* tiles 0, 1: sums (16 x 16 float32); 2: 16 rows of x, 32 values; 3, 4: 16 pairs of A.T rows,
 * 16 columns; 5: 16 rows of shrunk values, 16 values; 6, 7: 8 pairs of B.T rows, 16 columns */
AMX_TARGET static void amx_configure(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = t >= 6 ? 8 : 16;
        cfg.colsb[t] = t == 5 ? 32 : 64;
    }
    __asm__ volatile("" ::: "memory"); /* the tile instructions' asm names no memory they read */
    _tile_loadconfig(&cfg);
}

AMX_TARGET static void amx_release(void) { _tile_release(); }

/* dst (pad_rows / 2 rows, dst_ld elements apart) = rows 2p and 2p + 1 of w (rows of it, ld
 * apart, `cols` columns) interleaved, zeros past them up to pad_rows rows and pad_cols columns */
AMX_TARGET static void pack_pairs(const uint16_t *w, int64_t ld, int64_t rows, int64_t cols,
                                  int64_t pad_rows, int64_t pad_cols, uint16_t *dst,
                                  int64_t dst_ld) {
    const __m512i order = PAIR_ORDER;
    for (int64_t p = 0; 2 * p < pad_rows; p++) {
        uint16_t *d = dst + p * dst_ld;
        for (int64_t c = 0; c < pad_cols; c += 16) {
            int64_t left = cols - c;
            __mmask16 m = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
            if (2 * p < rows) a = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, w + 2 * p * ld + c));
            if (2 * p + 1 < rows)
                b = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, w + (2 * p + 1) * ld + c));
            _mm512_storeu_si512(d + 2 * c, _mm512_permutex2var_epi16(a, order, b));
        }
    }
}

/* shrunk (16, kcp) = 16 rows of x (xld apart, inp values) @ A.T packed (inp / 2, 2 kcp) */
AMX_TARGET static void amx_shrink(const uint16_t *xs, int64_t xld, int64_t inp, const uint16_t *wv,
                                  int64_t kcp, float *shrunk) {
    __asm__ volatile("" ::: "memory"); /* x's padded copy and the packed weights written first */
    for (int64_t c = 0; c < kcp; c += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t k = 0; k < inp; k += 32) {
            const uint16_t *b = wv + (k / 2) * 2 * kcp + 2 * c;
            _tile_loadd(2, xs + k, xld * 2);
            _tile_loadd(3, b, kcp * 4);
            _tile_loadd(4, b + 32, kcp * 4);
            _tile_dpbf16ps(0, 2, 3);
            _tile_dpbf16ps(1, 2, 4);
        }
        _tile_stored(0, shrunk + c, kcp * 4);
        _tile_stored(1, shrunk + c + 16, kcp * 4);
    }
}

/* out's n rows (stride apart, width columns) += scale * sb (16, kp) @ B.T packed (kp / 2,
 * 2 widthp), each rounded once: the products for all columns first (acc, 16 x widthp), then
 * the rows updated one after another, each read in order */
AMX_TARGET static void amx_expand(const uint16_t *sb, int64_t kp, const uint16_t *wb,
                                  int64_t widthp, int64_t width, int64_t n, float scale,
                                  float *acc, uint16_t *out, int64_t stride) {
    __asm__ volatile("" ::: "memory"); /* the shrunk values and the packed weights written first */
    for (int64_t o = 0; o < widthp; o += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t k = 0; k < kp; k += 16) {
            const uint16_t *b = wb + (k / 2) * 2 * widthp + 2 * o;
            _tile_loadd(5, sb + k, kp * 2);
            _tile_loadd(6, b, widthp * 4);
            _tile_loadd(7, b + 32, widthp * 4);
            _tile_dpbf16ps(0, 5, 6);
            _tile_dpbf16ps(1, 5, 7);
        }
        _tile_stored(0, acc + o, widthp * 4);
        _tile_stored(1, acc + o + 16, widthp * 4);
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < n; t++) {
        uint16_t *row = out + t * stride;
        const float *a = acc + t * widthp;
        int64_t o = 0;
        for (; o + 16 <= width; o += 16) {
            __m512 y = widen16(_mm256_loadu_si256((const __m256i *)(row + o)));
            _mm256_storeu_si256((__m256i *)(row + o), narrow16(_mm512_fmadd_ps(sc, _mm512_loadu_ps(a + o), y)));
        }
        if (o < width) {
            __mmask16 m = (__mmask16)((1u << (width - o)) - 1);
            __m512 y = widen16(_mm256_maskz_loadu_epi16(m, row + o));
            _mm256_mask_storeu_epi16(row + o, m, narrow16(_mm512_fmadd_ps(sc, _mm512_loadu_ps(a + o), y)));
        }
    }
}

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* A thread's buffers for the tile passes: the packed weights of one slot (`slot`: which) */
struct amx_scratch {
    int64_t slot;
    uint16_t *wv, *wb, *xpad, *sb;
    float *shrunk, *acc;
};

static void *aligned_buffer(int64_t bytes) { return aligned_alloc(64, (size_t)round_up(bytes, 64)); }

static int amx_scratch_init(struct amx_scratch *s, int64_t in, int64_t kc, int64_t r, int64_t k,
                            const int64_t *args) {
    int64_t inp = round_up(in, 32), kcp = round_up(kc, 32), kp = round_up(r, 16), wide = 0, widest = 0;
    for (int64_t j = 0; j < k; j++) {
        int64_t widthp = round_up(args[1 + 4 * j + 3], 32);
        wide += widthp;
        widest = widthp > widest ? widthp : widest;
    }
    s->slot = -1;
    s->wv = aligned_buffer(inp * kcp * 2);
    s->wb = aligned_buffer(2 * kp * wide * 2);
    s->xpad = aligned_buffer(16 * inp * 2);
    s->sb = aligned_buffer(16 * 2 * kp * 2);
    s->shrunk = aligned_buffer(16 * kcp * 4);
    s->acc = aligned_buffer(16 * widest * 4);
    return s->wv && s->wb && s->xpad && s->sb && s->shrunk && s->acc;
}

static void amx_scratch_free(struct amx_scratch *s) {
    free(s->wv);
    free(s->wb);
    free(s->xpad);
    free(s->sb);
    free(s->shrunk);
    free(s->acc);
}

/* v's bf16 rounding (to nearest even) and what is left of v after it, rounded too: their sum
 * is v to about 16 bits */
static inline void split_bf16(float v, uint16_t *hi, uint16_t *lo) {
    store_row(hi, 1, 1, &v);
    float rest = v - bf16_to_f32(*hi);
    store_row(lo, 1, 1, &rest);
}

/* lora_add's item: rows i0 .. i0 + n of one slot, whose A.T starts at `at` and whose members'
 * B.T at each member's pointer + slot_off. `split`: the shrunk values go to the expand as two
 * bf16 parts (the rounded value and what rounding left), each against B.T packed a second
 * time, so that the sums match the float32 passes' (decode runs); else rounded once (prompt
 * runs, as a bf16 matmul pair rounds them). */
AMX_TARGET static void lora_amx_item(struct amx_scratch *s, const uint16_t *x, int64_t i0,
                                     int64_t n, int64_t in, int64_t slot, const uint16_t *at,
                                     int64_t slot_off, int64_t kc, int64_t cap, int64_t r,
                                     const int64_t *args, float scale, int split) {
    int64_t k = args[0], inp = round_up(in, 32), kcp = round_up(kc, 32), kp = round_up(r, 16);
    int64_t kk = split ? 2 * kp : kp; /* the expand's K */
    if (s->slot != slot) {
        pack_pairs(at, kc, in, kc, inp, kcp, s->wv, 2 * kcp);
        uint16_t *wb = s->wb;
        for (int64_t j = 0; j < k; j++) {
            const int64_t *m = args + 1 + 4 * j;
            int64_t width = m[3], widthp = round_up(width, 32);
            const uint16_t *bt = (const uint16_t *)m[2] + slot_off;
            for (int64_t o = 0; o < widthp; o += LORA_BLOCK) {
                int64_t cols = width - o < LORA_BLOCK ? width - o : LORA_BLOCK;
                int64_t pad = widthp - o < LORA_BLOCK ? widthp - o : LORA_BLOCK;
                pack_pairs((const uint16_t *)block_at(bt, o, cap, 2), LORA_BLOCK, r, cols, kp, pad,
                           wb + 2 * o, 2 * widthp);
            }
            memcpy(wb + kp * widthp, wb, (size_t)(kp * widthp * 2)); /* K rows kp..2kp: again */
            wb += 2 * kp * widthp;
        }
        s->slot = slot;
    }
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        int64_t m16 = n - t0 < 16 ? n - t0 : 16;
        const uint16_t *xs = x + (i0 + t0) * in;
        int64_t xld = in;
        if (m16 < 16 || in % 32) {
            memset(s->xpad, 0, (size_t)(16 * inp * 2));
            for (int64_t t = 0; t < m16; t++) memcpy(s->xpad + t * inp, xs + t * in, (size_t)(in * 2));
            xs = s->xpad;
            xld = inp;
        }
        amx_shrink(xs, xld, inp, s->wv, kcp, s->shrunk);
        const uint16_t *wb = s->wb;
        for (int64_t j = 0; j < k; j++) {
            const int64_t *m = args + 1 + 4 * j;
            int64_t stride = m[1], width = m[3], widthp = round_up(width, 32);
            memset(s->sb, 0, (size_t)(16 * kk * 2));
            for (int64_t t = 0; t < m16; t++) {
                uint16_t *row = s->sb + t * kk;
                const float *v = s->shrunk + t * kcp + j * cap;
                if (split)
                    for (int64_t q = 0; q < r; q++) split_bf16(v[q], row + q, row + kp + q);
                else
                    store_row(row, 1, r, v);
            }
            amx_expand(s->sb, kk, wb, widthp, width, m16, scale, s->acc,
                       (uint16_t *)m[0] + (i0 + t0) * stride, stride);
            wb += 2 * kp * widthp;
        }
    }
}
#endif

/* shrunk (n, kc) = xr (n, in) @ at (in, kc): each row of A.T read once for the n rows. */
static void lora_shrink(const float *xr, int64_t n, int64_t in, const void *at, int w_bf16,
                        int64_t kc, float *shrunk, int isa) {
    int64_t c = 0;
    if (isa > 0) {
        int64_t lanes = LANES[isa], wide = WIDE[isa] * lanes;
        for (; c + wide <= kc; c += wide) SHRINK[isa - 1][1][n - 1](xr, in, at, w_bf16, kc, c, shrunk);
        for (; c + lanes <= kc; c += lanes) SHRINK[isa - 1][0][n - 1](xr, in, at, w_bf16, kc, c, shrunk);
    }
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = c; j < kc; j++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < in; i++) sum += xr[t * in + i] * load_any(at, w_bf16, i * kc + j);
            shrunk[t * kc + j] = sum;
        }
}

/* out rows t (n of them, `stride` apart) += scale * s[t] (r, kc apart) @ bt (r of its cap rows,
 * width columns, blocked), each rounded once: each row of B.T read once for the n rows. */
static void lora_expand(const float *s, int64_t n, int64_t kc, int64_t r, int64_t cap,
                        const void *bt, int w_bf16, int64_t width, float scale, char *out,
                        int64_t stride, int y_bf16, int isa) {
    int64_t o = 0, esize = w_bf16 ? 2 : 4;
    if (isa > 0) {
        int64_t lanes = LANES[isa], wide = WIDE[isa] * lanes;
        for (; o + wide <= width; o += wide) {
            if (!y_bf16) /* the rows' next columns, a few passes on (float32 outputs) */
                for (int64_t t = 0; t < n; t++)
                    _mm_prefetch(out + (t * stride + o + LORA_OUT_PREFETCH) * 4, _MM_HINT_T0);
            EXPAND[isa - 1][1][n - 1](s, kc, r, block_at(bt, o, cap, esize), w_bf16, LORA_BLOCK, o,
                                      scale, out, stride, y_bf16);
        }
        for (; o + lanes <= width; o += lanes)
            EXPAND[isa - 1][0][n - 1](s, kc, r, block_at(bt, o, cap, esize), w_bf16, LORA_BLOCK, o,
                                      scale, out, stride, y_bf16);
    }
    int64_t ysize = y_bf16 ? 2 : 4;
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = o; j < width; j++) {
            float acc = 0.0f;
            const void *col = block_at(bt, j, cap, esize);
            for (int64_t q = 0; q < r; q++) acc += s[t * kc + q] * load_any(col, w_bf16, q * LORA_BLOCK);
            char *row = out + t * stride * ysize;
            store(row, y_bf16, j, load_any(row, y_bf16, j) + scale * acc);
        }
}

/* The first item of share `share` of `shares`: where the items' cost before it reaches that
 * share's part of the whole (cost: `items` + 1 running sums) */
static int64_t share_start(const int64_t *cost, int64_t items, int64_t share, int64_t shares) {
    if (share >= shares) return items;
    int64_t target = cost[items] * share / shares, lo = 0, hi = items;
    while (lo < hi) { /* the first it with cost[it] >= target */
        int64_t mid = (lo + hi) / 2;
        if (cost[mid] < target) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* A slot's weights start slot_stride elements after the previous slot's, in `at` and in each
 * member's B.T (whose pointer is slot 0's); the stacks hold num_slots slots.
 * args: k, then per member j: out pointer, out row stride (elements), bt pointer, width out_j.
 * Rows with one slot next to each other (the engine orders a step's tokens by adapter) are
 * taken LORA_TOKENS at a time, reading that slot's weights once for them all: the weights of
 * the adapters present are most of the bytes a mixed step's LoRA moves. Returns 0, -1 for
 * sizes past the buffers, -2 for a row's slot past the stacks (nothing is added then: a slot
 * read out of bounds would be another tenant's adapter, or no adapter's memory at all). */
int lora_add(const void *x, int x_bf16, int64_t rows, int64_t in, const int64_t *slots,
             const void *at, int w_bf16, int64_t cap, int64_t r, int64_t slot_stride,
             int64_t num_slots, const int64_t *args, int y_bf16, float scale, int isa) {
    int64_t k = args[0];
    int64_t kc = k * cap, slot_a = in * kc;
    if (kc > LORA_MAX_COLUMNS || r > cap || rows < 0 || isa < 0 || isa > 4 || slot_stride < slot_a)
        return -1;
    for (int64_t i = 0; i < rows; i++)
        if (slots[i] >= num_slots) return -2;
    /* the BF16 passes, and whether on tiles */
    int dot = HAVE_BF16 && isa >= 3 && x_bf16 && w_bf16 && y_bf16;
    int tiles = HAVE_AMX && dot && isa == 4;
    isa = isa > 2 ? 2 : isa;
    for (int64_t j = 0; j < k; j++)
        if (args[1 + 4 * j + 3] > LORA_MAX_WIDTH) return -1;
    /* work items: runs of one slot, at most LORA_TOKENS rows each (LORA_AMX_ROWS on tiles);
     * pass[it]: 0 the float32 sums, 1 the BF16 passes (an item of a run of more than
     * LORA_DOT_RUN rows: a prompt chunk), 2 those on tiles, 3 tiles for a run of
     * LORA_AMX_MIN_RUN to LORA_DOT_RUN rows, the shrunk values split (lora_amx_item) */
    int64_t *item = malloc((size_t)(rows + 2) * (3 * sizeof(int64_t) + 1));
    if (item == NULL) return -1;
    int64_t *count = item + rows + 1, *cost = count + rows + 1; /* cost[it]: the items' before it */
    char *pass = (char *)(cost + rows + 2);
    int64_t items = 0;
    for (int64_t i = 0; i < rows;) {
        int64_t end = i + 1;
        while (end < rows && slots[end] == slots[i]) end++;
        if (slots[i] >= 0) {
            int64_t len = end - i;
            char kind = (char)(dot && len > LORA_DOT_RUN ? 1 + tiles
                               : tiles && len >= LORA_AMX_MIN_RUN ? 3 : 0);
            int64_t size = kind >= 2 ? LORA_AMX_ROWS : LORA_TOKENS;
            for (int64_t s = i; s < end; s += size) {
                item[items] = s;
                count[items] = end - s < size ? end - s : size;
                pass[items++] = kind;
            }
        }
        i = end;
    }
    /* The items go in contiguous shares of about equal cost, one a thread: a thread reads a
     * slot's weights from memory once for all of its items of that slot, and the slots in
     * order. (Handed out one at a time, a run's items went to both threads, each pulling the
     * weights into its own cache: prompt chunks took a third longer.) An item costs its rows
     * (on tiles, a row costs an eighth), the first of its slot's LORA_COLD_ROWS more for the
     * weights' read from memory. */
    cost[0] = 0;
    for (int64_t it = 0; it < items; it++) {
        int cold = it == 0 || slots[item[it - 1]] != slots[item[it]];
        int64_t n = pass[it] >= 2 ? (count[it] + 7) / 8 : count[it];
        cost[it + 1] = cost[it] + n + (cold ? LORA_COLD_ROWS : 0);
    }
    int64_t work = rows * (slot_a + r * kc);
    int64_t esize = w_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel if (work > (1 << 18) && items > 1)
    {
        int64_t shares = THREAD_COUNT(), share = THREAD_INDEX();
        int64_t first = share_start(cost, items, share, shares);
        int64_t last = share_start(cost, items, share + 1, shares);
#if HAVE_AMX
        /* a thread with items on tiles: its buffers, or (where one is refused) no thread adds
         * anything */
        struct amx_scratch scratch = {0};
        int on_tiles = 0;
        for (int64_t it = first; it < last && !on_tiles; it++) on_tiles = pass[it] >= 2;
        if (on_tiles && !amx_scratch_init(&scratch, in, kc, r, k, args)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int refused;
#pragma omp atomic read
        refused = failed;
        if (refused) first = last;
        else if (on_tiles) amx_configure();
#endif
        for (int64_t it = first; it < last; it++) {
            int64_t i0 = item[it], slot = slots[i0], n = count[it];
#if HAVE_AMX
            if (pass[it] >= 2) {
                lora_amx_item(&scratch, (const uint16_t *)x, i0, n, in, slot,
                              (const uint16_t *)at + slot * slot_stride, slot * slot_stride, kc,
                              cap, r, args, scale, pass[it] == 3);
                continue;
            }
#endif
            float shrunk[n * kc];
#if HAVE_BF16
            if (pass[it] == 1) {
                uint16_t sb[n * kc];
                lora_shrink_bf16((const uint16_t *)x + i0 * in, n, in,
                                 (const uint16_t *)at + slot * slot_stride, kc, shrunk);
                store_row(sb, 1, n * kc, shrunk);
                for (int64_t j = 0; j < k; j++) {
                    const int64_t *m = args + 1 + 4 * j;
                    int64_t stride = m[1], width = m[3];
                    const uint16_t *bt = (const uint16_t *)m[2] + slot * slot_stride;
                    lora_expand_bf16(sb + j * cap, n, kc, r, cap, bt, width, scale,
                                     (char *)m[0] + i0 * stride * 2, stride);
                }
                continue;
            }
#endif
            /* float32 rows are read where they are; bf16 rows widened once for all the passes */
            float widened[x_bf16 ? n * in : 1];
            const float *xr = (const float *)x + i0 * in;
            if (x_bf16) {
                for (int64_t t = 0; t < n; t++)
                    load_row((const uint16_t *)x + (i0 + t) * in, 1, in, widened + t * in);
                xr = widened;
            }
            lora_shrink(xr, n, in, (const char *)at + slot * slot_stride * esize, w_bf16, kc,
                        shrunk, isa);
            for (int64_t j = 0; j < k; j++) {
                const int64_t *m = args + 1 + 4 * j;
                int64_t stride = m[1], width = m[3];
                const char *bt = (const char *)m[2] + slot * slot_stride * esize;
                char *out = (char *)m[0] + i0 * stride * (y_bf16 ? 2 : 4);
                lora_expand(shrunk + j * cap, n, kc, r, cap, bt, w_bf16, width, scale, out, stride,
                            y_bf16, isa);
            }
        }
#if HAVE_AMX
        if (on_tiles && !refused) amx_release();
        amx_scratch_free(&scratch);
#endif
    }
    free(item);
    return failed ? -1 : 0;
}

/* One member's A (r, in) and scaled B (out, r), row-major in bf16 or float32, into a blocked
 * LoRA group's slot, in the stacks' dtype (rounded to nearest even; bf16 to bf16 copied as is):
 * A.T as column block `member` of the slot's (in, k, cap), B.T as the member's
 * (ceil(out / LORA_BLOCK), cap, LORA_BLOCK) blocks; ranks past r and columns past out are zero.
 * Every element of the member's part of the slot is written, in the order it lies in memory.
 * (As torch ops, transposed copies that convert the dtype, an adapter's load took 12-17 ms on
 * the embedded model, on the engine thread.) The loops are instantiated per pair of dtypes. */
static inline __attribute__((always_inline)) void
set_member_as(char *at, char *bt, int wb, int64_t in, int64_t k, int64_t member, int64_t cap,
              int64_t out, const char *a, const char *b, int sb, int64_t r) {
    int64_t ws = wb ? 2 : 4, ss = sb ? 2 : 4;
#define SET_ELEMENT(dst, di, src, si)                                                             \
    do {                                                                                        \
        if (wb && sb) ((uint16_t *)(dst))[di] = ((const uint16_t *)(src))[si];                  \
        else if (wb) ((uint16_t *)(dst))[di] = f32_to_bf16(((const float *)(src))[si]);        \
        else if (sb) ((float *)(dst))[di] = bf16_to_f32(((const uint16_t *)(src))[si]);        \
        else ((float *)(dst))[di] = ((const float *)(src))[si];                                \
    } while (0)
    for (int64_t i = 0; i < in; i++) {
        char *row = at + (i * k + member) * cap * ws;
        for (int64_t q = 0; q < r; q++) SET_ELEMENT(row, q, a, q * in + i);
        memset(row + r * ws, 0, (size_t)((cap - r) * ws));
    }
    int64_t blocks = (out + LORA_BLOCK - 1) / LORA_BLOCK;
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t width = out - blk * LORA_BLOCK < LORA_BLOCK ? out - blk * LORA_BLOCK : LORA_BLOCK;
        const char *src = b + blk * LORA_BLOCK * r * ss; /* rows blk * LORA_BLOCK on */
        for (int64_t q = 0; q < r; q++) {
            char *row = bt + (blk * cap + q) * LORA_BLOCK * ws;
            for (int64_t c = 0; c < width; c++) SET_ELEMENT(row, c, src, c * r + q);
            memset(row + width * ws, 0, (size_t)((LORA_BLOCK - width) * ws));
        }
        memset(bt + (blk * cap + r) * LORA_BLOCK * ws, 0, (size_t)((cap - r) * LORA_BLOCK * ws));
    }
#undef SET_ELEMENT
}

#define LORA_SET_WORDS 11 /* int64 words per member written by lora_set_slot */

/* An adapter's members into their groups' slots, one call for the adapter (a member at a time
 * from Python cost more in the calls than in the copies). members: n rows of LORA_SET_WORDS:
 * the slot's A.T and the member's B.T blocks (pointers), in, k, member, cap, out, A, B
 * (pointers), r, A and B in bf16. w_bf16: the stacks' dtype. Returns 0, or -1 (nothing written) for sizes that do not fit. */
int lora_set_slot(const int64_t *members, int64_t n, int w_bf16) {
    for (int64_t m = 0; m < n; m++) {
        const int64_t *e = members + m * LORA_SET_WORDS;
        int64_t in = e[2], k = e[3], member = e[4], cap = e[5], out = e[6], r = e[9];
        if (r < 0 || r > cap || member < 0 || member >= k || in < 0 || out < 0) return -1;
    }
#pragma omp parallel for schedule(dynamic) if (n > 1)
    for (int64_t m = 0; m < n; m++) {
        const int64_t *e = members + m * LORA_SET_WORDS;
        char *at = (char *)e[0], *bt = (char *)e[1];
        const char *a = (const char *)e[7], *b = (const char *)e[8];
        int64_t in = e[2], k = e[3], member = e[4], cap = e[5], out = e[6], r = e[9];
        if (w_bf16 && e[10]) set_member_as(at, bt, 1, in, k, member, cap, out, a, b, 1, r);
        else if (w_bf16) set_member_as(at, bt, 1, in, k, member, cap, out, a, b, 0, r);
        else if (e[10]) set_member_as(at, bt, 0, in, k, member, cap, out, a, b, 1, r);
        else set_member_as(at, bt, 0, in, k, member, cap, out, a, b, 0, r);
    }
    return 0;
}

/* ---- Attention: out[i, h] = softmax(q[i, h] . K[row_i, h / g, :L_i] * scaling)
 * . V[row_i, h / g, :L_i], for tokens i, each in its own cache row with its own length (a
 * decode token: all its sequence's keys; a prompt token: those up to its position, which makes
 * a prompt's attention causal), reading the cache in place (the g query heads of a KV head
 * share its keys), summed in float32 whatever the cache holds. Torch's masked batched matmuls
 * compute the whole square and pay a copy and a conversion or two per call. ---- */

static inline __attribute__((always_inline)) void
attend_head_any(const float *q, int64_t g, int64_t d, const void *k, const void *v, int cache_bf16,
                int64_t length, float scaling, float *scores, float *acc) {
    /* scores (g, length); acc (g, d) */
    for (int64_t t = 0; t < length; t++) {
        float kt[d];
        for (int64_t e = 0; e < d; e++) kt[e] = load_any(k, cache_bf16, t * d + e);
        for (int64_t h = 0; h < g; h++) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t e = 0; e < d; e++) s += q[h * d + e] * kt[e];
            scores[h * length + t] = s * scaling;
        }
    }
    for (int64_t h = 0; h < g; h++) {
        float *row = scores + h * length, top = row[0], sum = 0.0f;
        for (int64_t t = 1; t < length; t++) top = row[t] > top ? row[t] : top;
        for (int64_t t = 0; t < length; t++) {
            row[t] = __builtin_expf(row[t] - top);
            sum += row[t];
        }
        float inv = 1.0f / sum;
        for (int64_t t = 0; t < length; t++) row[t] *= inv;
        for (int64_t e = 0; e < d; e++) acc[h * d + e] = 0.0f;
    }
    for (int64_t t = 0; t < length; t++) {
        float vt[d];
        for (int64_t e = 0; e < d; e++) vt[e] = load_any(v, cache_bf16, t * d + e);
        for (int64_t h = 0; h < g; h++) {
            float p = scores[h * length + t];
            for (int64_t e = 0; e < d; e++) acc[h * d + e] += p * vt[e];
        }
    }
}
VECTOR_CLONES(attend_head,
              (const float *q, int64_t g, int64_t d, const void *k, const void *v, int cache_bf16,
               int64_t length, float scaling, float *scores, float *acc),
              (q, g, d, k, v, cache_bf16, length, scaling, scores, acc))

/* The vector heads (AVX-512 and AVX2, heads of 64 or 128 values), over blocks of as many tokens
 * as a vector has lanes: each block's keys (then values) are widened to float32 once and serve
 * every query head of the group; the block's dot products are summed across lanes together
 * (hsum16: 15 adds, instead of 16 separate reductions), and the softmax's exponentials are
 * vectorized (exp16); keys and values are prefetched ahead. */
#define ATTEND_BLOCK 16

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

/* Ask for the cache lines of tokens [from, to) of a head's keys or values (rows of `row`
 * bytes): a decode step reads every row once, from memory, and the prefetcher alone does not
 * keep two threads fed across the many short runs of a step's rows and heads. */
static inline void prefetch_tokens(const void *base, int64_t row, int64_t from, int64_t to) {
    const char *p = (const char *)base + from * row, *end = (const char *)base + to * row;
    for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
}

/* lane j = the sum of v[j]'s 16 lanes */
TARGET_AVX512 static inline __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* per 128 bits: v2i's and v2i+1's pairs, interleaved */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128 bits: v4i .. v4i+3's sums over those 128 bits */
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* halves of the 128-bit lanes added */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* e^x for x <= 0 (softmax's shifted scores): 2^n e^r, |r| <= ln2 / 2, r's series to degree 7
 * (relative error below 2e-7); very negative x gives 0 */
TARGET_AVX512 static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#define TARGET_AVX2 __attribute__((target("avx2,fma")))

/* lane j = the sum of v[j]'s 8 lanes */
TARGET_AVX2 static inline __m256 hsum8(const __m256 *v) {
    __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3); /* per 128 bits: v0..v3, v4..v7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* exp16's e^x on 8 lanes, 2^n built in the exponent bits (x clamped where 2^n stays normal) */
TARGET_AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* the horizontal sum of one vector */
TARGET_AVX2 static inline float sum8(__m256 v) {
    float lanes[8], sum = 0.0f;
    _mm256_storeu_ps(lanes, v);
    for (int j = 0; j < 8; j++) sum += lanes[j];
    return sum;
}

/* Keys and values are asked for this many tokens ahead of the block being computed. */
#define ATTEND_AHEAD 32

/* The cache lines the block of tokens [t0, t0 + n) leads to: the keys ATTEND_AHEAD tokens on,
 * and this block's values (read once its scores are in). */
static inline void prefetch_block(const void *k, const void *v, int64_t row, int64_t t0,
                                  int64_t n, int64_t length) {
    int64_t from = t0 + ATTEND_AHEAD < length ? t0 + ATTEND_AHEAD : length;
    prefetch_tokens(k, row, from, from + n < length ? from + n : length);
    prefetch_tokens(v, row, t0, t0 + n);
}

/* One instruction set's vector ops, for the blocked head below: ISA names the functions, a
 * block is LANES tokens (HSUM sums LANES vectors across lanes at once), a head NV vectors. */
#define ATTEND_OPS_AVX512 avx512, TARGET_AVX512, __m512, 16, load16, _mm512_loadu_ps, \
    _mm512_storeu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_mul_ps, \
    _mm512_sub_ps, _mm512_add_ps, hsum16, exp16, _mm512_reduce_add_ps
#define ATTEND_OPS_AVX2 avx2, TARGET_AVX2, __m256, 8, load8, _mm256_loadu_ps, _mm256_storeu_ps, \
    _mm256_set1_ps, _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_sub_ps, \
    _mm256_add_ps, hsum8, exp8, sum8

/* scores (g, length) = q (g, NV x LANES) K.T * scaling, one block of keys widened at a time */
#define ATTEND_SCORES(NV, ...) ATTEND_SCORES_(NV, __VA_ARGS__)
#define ATTEND_SCORES_(NV, ISA, TARGET, VEC, LANES, LOADW, LOADU, STOREU, SET1, ZERO, FMA, MUL,  \
                       SUB, ADD, HSUM, EXP, RSUM)                                                \
    TARGET static void attend_scores_##ISA##_##NV(const float *q, int64_t g, const void *k,       \
                                                  const void *v, int bf16, int64_t length,        \
                                                  float scaling, float *scores) {                 \
        const int64_t d = NV * LANES, row = d * (bf16 ? 2 : 4);                                 \
        VEC block[LANES][NV], part[LANES];                                                      \
        prefetch_tokens(k, row, 0, length < ATTEND_AHEAD ? length : ATTEND_AHEAD);              \
        for (int64_t t0 = 0; t0 < length; t0 += LANES) {                                        \
            int64_t n = length - t0 < LANES ? length - t0 : LANES;                              \
            prefetch_block(k, v, row, t0, n, length);                                           \
            for (int64_t t = 0; t < n; t++)                                                     \
                for (int j = 0; j < NV; j++) block[t][j] = LOADW(k, bf16, (t0 + t) * d + LANES * j); \
            for (int64_t t = n; t < LANES; t++) part[t] = ZERO();                               \
            for (int64_t h = 0; h < g; h++) {                                                   \
                const float *qh = q + h * d;                                                    \
                for (int64_t t = 0; t < n; t++) {                                               \
                    VEC s = MUL(LOADU(qh), block[t][0]);                                        \
                    for (int j = 1; j < NV; j++) s = FMA(LOADU(qh + LANES * j), block[t][j], s); \
                    part[t] = s;                                                                \
                }                                                                               \
                float sums[LANES];                                                              \
                STOREU(sums, MUL(HSUM(part), SET1(scaling)));                                   \
                memcpy(scores + h * length + t0, sums, (size_t)n * sizeof(float));              \
            }                                                                                   \
        }                                                                                       \
    }

/* acc (g, NV x LANES) = softmax(scores) V, scores (g, length) exponentiated in place */
#define ATTEND_VALUES(NV, ...) ATTEND_VALUES_(NV, __VA_ARGS__)
#define ATTEND_VALUES_(NV, ISA, TARGET, VEC, LANES, LOADW, LOADU, STOREU, SET1, ZERO, FMA, MUL,  \
                       SUB, ADD, HSUM, EXP, RSUM)                                                \
    TARGET static void attend_values_##ISA##_##NV(int64_t g, const void *v, int bf16,             \
                                                  int64_t length, float *scores, float *acc) {    \
        const int64_t d = NV * LANES;                                                           \
        VEC block[LANES][NV];                                                                   \
        float inv[g];                                                                           \
        for (int64_t h = 0; h < g; h++) {                                                       \
            float *r = scores + h * length, top = r[0];                                         \
            for (int64_t t = 1; t < length; t++) top = r[t] > top ? r[t] : top;                 \
            VEC shift = SET1(top), total = ZERO();                                              \
            int64_t t = 0;                                                                      \
            for (; t + LANES <= length; t += LANES) {                                           \
                VEC e = EXP(SUB(LOADU(r + t), shift));                                          \
                total = ADD(total, e);                                                          \
                STOREU(r + t, e);                                                               \
            }                                                                                   \
            float sum = RSUM(total);                                                            \
            for (; t < length; t++) {                                                           \
                r[t] = __builtin_expf(r[t] - top);                                              \
                sum += r[t];                                                                    \
            }                                                                                   \
            inv[h] = 1.0f / sum;                                                                \
            for (int j = 0; j < NV; j++) STOREU(acc + h * d + LANES * j, ZERO());               \
        }                                                                                       \
        for (int64_t t0 = 0; t0 < length; t0 += LANES) {                                       \
            int64_t n = length - t0 < LANES ? length - t0 : LANES;                              \
            for (int64_t t = 0; t < n; t++)                                                     \
                for (int j = 0; j < NV; j++) block[t][j] = LOADW(v, bf16, (t0 + t) * d + LANES * j); \
            for (int64_t h = 0; h < g; h++) {                                                   \
                const float *p = scores + h * length + t0;                                      \
                VEC a[NV];                                                                      \
                for (int j = 0; j < NV; j++) a[j] = LOADU(acc + h * d + LANES * j);             \
                for (int64_t t = 0; t < n; t++) {                                               \
                    VEC pt = SET1(p[t]);                                                        \
                    for (int j = 0; j < NV; j++) a[j] = FMA(pt, block[t][j], a[j]);             \
                }                                                                               \
                for (int j = 0; j < NV; j++) STOREU(acc + h * d + LANES * j, a[j]);             \
            }                                                                                   \
        }                                                                                       \
        for (int64_t h = 0; h < g; h++)                                                         \
            for (int j = 0; j < NV; j++)                                                        \
                STOREU(acc + h * d + LANES * j, MUL(LOADU(acc + h * d + LANES * j), SET1(inv[h]))); \
    }

ATTEND_SCORES(4, ATTEND_OPS_AVX512)
ATTEND_SCORES(8, ATTEND_OPS_AVX512)
ATTEND_VALUES(4, ATTEND_OPS_AVX512)
ATTEND_VALUES(8, ATTEND_OPS_AVX512)
ATTEND_SCORES(8, ATTEND_OPS_AVX2)
ATTEND_SCORES(16, ATTEND_OPS_AVX2)
ATTEND_VALUES(8, ATTEND_OPS_AVX2)
ATTEND_VALUES(16, ATTEND_OPS_AVX2)

#if HAVE_BF16
/* attend_scores_avx512 for a bf16 cache and bf16 queries on a CPU with AVX512-BF16: the keys
 * multiply in place, two values per lane (vdpbf16ps; the products are exact, as widened) */
#define ATTEND_SCORES_BF16(NV)                                                                    \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) static void      \
        attend_scores_bf16_##NV(const float *q, int64_t g, const void *k, const void *v,          \
                                int64_t length, float scaling, float *scores) {                   \
        const int64_t d = NV * 16;                                                              \
        prefetch_tokens(k, 2 * d, 0, length < ATTEND_AHEAD ? length : ATTEND_AHEAD);            \
        __m512bh qb[g][NV / 2];                                                                 \
        for (int64_t h = 0; h < g; h++)                                                         \
            for (int j = 0; j < NV / 2; j++)                                                    \
                qb[h][j] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + h * d + 32 * j + 16),        \
                                               _mm512_loadu_ps(q + h * d + 32 * j));            \
        const uint16_t *keys = k;                                                               \
        __m512 part[ATTEND_BLOCK];                                                              \
        for (int64_t t0 = 0; t0 < length; t0 += ATTEND_BLOCK) {                                 \
            int64_t n = length - t0 < ATTEND_BLOCK ? length - t0 : ATTEND_BLOCK;                \
            prefetch_block(k, v, 2 * d, t0, n, length);                                         \
            for (int64_t t = n; t < ATTEND_BLOCK; t++) part[t] = _mm512_setzero_ps();           \
            for (int64_t h = 0; h < g; h++) {                                                   \
                for (int64_t t = 0; t < n; t++) {                                               \
                    const uint16_t *row = keys + (t0 + t) * d;                                  \
                    __m512 s = _mm512_setzero_ps();                                             \
                    for (int j = 0; j < NV / 2; j++)                                            \
                        s = _mm512_dpbf16_ps(s, qb[h][j], (__m512bh)_mm512_loadu_si512(row + 32 * j)); \
                    part[t] = s;                                                                \
                }                                                                               \
                __m512 sums = _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scaling));             \
                _mm512_mask_storeu_ps(scores + h * length + t0, (__mmask16)((1u << n) - 1), sums); \
            }                                                                                   \
        }                                                                                       \
    }

ATTEND_SCORES_BF16(4)
ATTEND_SCORES_BF16(8)

/* attend_values_avx512 for a bf16 cache on a CPU with AVX512-BF16: the exponentials are
 * rounded to bf16 (an error of the size a bf16 matmul of softmax and V makes: it rounds the
 * normalized probabilities; here the sum is taken in float32 before rounding and divides at the
 * end) and two tokens' values interleaved in a register multiply in place (vdpbf16ps); the sums
 * stay in float32. */
#define ATTEND_VALUES_BF16(NV)                                                                    \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) static void      \
        attend_values_bf16_##NV(int64_t g, const void *v, int64_t length, float *scores,          \
                                float *acc) {                                                     \
        const int64_t d = NV * 16, pairs = (length + 1) / 2;                                    \
        const uint16_t *values = v;                                                             \
        float inv[g];                                                                           \
        for (int64_t h = 0; h < g; h++) { /* exponentials, rounded to bf16 over the row */      \
            float *row = scores + h * length;                                                   \
            uint16_t *probs = (uint16_t *)row;                                                  \
            __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();                \
            for (int64_t t = 0; t < length; t += 16) {                                          \
                __mmask16 m = length - t >= 16 ? 0xffff : (__mmask16)((1u << (length - t)) - 1); \
                top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, m, row + t));               \
            }                                                                                   \
            __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));                           \
            for (int64_t t = 0; t < length; t += 16) {                                          \
                __mmask16 m = length - t >= 16 ? 0xffff : (__mmask16)((1u << (length - t)) - 1); \
                __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + t), shift));      \
                e = _mm512_maskz_mov_ps(m, e);                                                  \
                total = _mm512_add_ps(total, e);                                                \
                _mm256_mask_storeu_epi16(probs + t, m, (__m256i)_mm512_cvtneps_pbh(e));          \
            }                                                                                   \
            inv[h] = 1.0f / _mm512_reduce_add_ps(total);                                        \
            probs[length] = 0; /* the pair of an odd last token */                              \
        }                                                                                       \
        __m512 sums[g][NV];                                                                     \
        for (int64_t h = 0; h < g; h++)                                                         \
            for (int j = 0; j < NV; j++) sums[h][j] = _mm512_setzero_ps();                      \
        __m512i block[ATTEND_BLOCK / 2][NV];                                                    \
        const __m512i zero = _mm512_setzero_si512();                                            \
        for (int64_t p0 = 0; p0 < pairs; p0 += ATTEND_BLOCK / 2) {                              \
            int64_t n = pairs - p0 < ATTEND_BLOCK / 2 ? pairs - p0 : ATTEND_BLOCK / 2;          \
            for (int64_t i = 0; i < n; i++) {                                                   \
                int64_t t = 2 * (p0 + i);                                                       \
                for (int j = 0; j < NV / 2; j++) {                                              \
                    __m512i r0 = _mm512_loadu_si512(values + t * d + 32 * j);                   \
                    __m512i r1 = t + 1 < length ? _mm512_loadu_si512(values + (t + 1) * d + 32 * j) \
                                                : zero;                                         \
                    block[i][2 * j] = _mm512_unpacklo_epi16(r0, r1);                            \
                    block[i][2 * j + 1] = _mm512_unpackhi_epi16(r0, r1);                        \
                }                                                                               \
            }                                                                                   \
            for (int64_t h = 0; h < g; h++) {                                                   \
                const int32_t *pp = (const int32_t *)(scores + h * length) + p0;                \
                __m512 a[NV];                                                                   \
                for (int j = 0; j < NV; j++) a[j] = sums[h][j];                                 \
                for (int64_t i = 0; i < n; i++) {                                               \
                    __m512bh pt = (__m512bh)_mm512_set1_epi32(pp[i]);                           \
                    for (int j = 0; j < NV; j++) a[j] = _mm512_dpbf16_ps(a[j], pt, (__m512bh)block[i][j]); \
                }                                                                               \
                for (int j = 0; j < NV; j++) sums[h][j] = a[j];                                 \
            }                                                                                   \
        }                                                                                       \
        /* lane 4L + i of the low (high) half of 32 values is value 8L + i (8L + 4 + i) */      \
        const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0); \
        const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8); \
        for (int64_t h = 0; h < g; h++) {                                                       \
            __m512 scale = _mm512_set1_ps(inv[h]);                                              \
            for (int j = 0; j < NV / 2; j++) {                                                  \
                __m512 lo = sums[h][2 * j], hi = sums[h][2 * j + 1];                            \
                _mm512_storeu_ps(acc + h * d + 32 * j,                                          \
                                 _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale));  \
                _mm512_storeu_ps(acc + h * d + 32 * j + 16,                                     \
                                 _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale)); \
            }                                                                                   \
        }                                                                                       \
    }

ATTEND_VALUES_BF16(4)
ATTEND_VALUES_BF16(8)
#endif


/* q (b, heads, d) in the compute dtype, token i's heads at q + i * q_stride (elements); out
 * (b, heads, d) contiguous; keys, values (rows, kv_heads, max_len, d), the layer's cache; token
 * i attends the first lengths[i] (1..max_len) positions of row rows[i]. Returns 0, -1 when
 * memory runs out, -2 for a length or instruction set out of range. */
/* One task of decode_attention: token i's query heads of KV head kvh. Returns 0, or -1 when
 * memory runs out. */
static int attend_task(const void *q, int64_t q_stride, int q_bf16, int64_t i, int64_t kvh,
                       int64_t heads, int64_t kv_heads, int64_t d, const void *keys,
                       const void *values, int cache_bf16, int64_t max_len, int64_t row,
                       int64_t length, float scaling, void *out, int isa, int bf16_dot) {
    int64_t g = heads / kv_heads, esize = cache_bf16 ? 2 : 4;
    float *scores = malloc((size_t)(g * length) * sizeof(float));
    if (scores == NULL) return -1;
    float qh[g * d], acc[g * d];
    int64_t first = (i * heads + kvh * g) * d;
    int64_t from = i * q_stride + kvh * g * d;
    for (int64_t e = 0; e < g * d; e++) qh[e] = load_any(q, q_bf16, from + e);
    int64_t at = ((row * kv_heads + kvh) * max_len) * d * esize;
    const char *k = (const char *)keys + at, *v = (const char *)values + at;
    if (kvh + 1 < kv_heads) { /* the start of the token's next head, soon taken */
        int64_t ahead = length < ATTEND_AHEAD ? length : ATTEND_AHEAD;
        prefetch_tokens(k + max_len * d * esize, d * esize, 0, ahead);
    }
    (void)bf16_dot;
    if (isa >= 2 && (d == 64 || d == 128)) {
#if HAVE_BF16
        if (bf16_dot && d == 64)
            attend_scores_bf16_4(qh, g, k, v, length, scaling, scores);
        else if (bf16_dot)
            attend_scores_bf16_8(qh, g, k, v, length, scaling, scores);
        else
#endif
        if (d == 64)
            attend_scores_avx512_4(qh, g, k, v, cache_bf16, length, scaling, scores);
        else
            attend_scores_avx512_8(qh, g, k, v, cache_bf16, length, scaling, scores);
#if HAVE_BF16
        if (bf16_dot && d == 64)
            attend_values_bf16_4(g, v, length, scores, acc);
        else if (bf16_dot)
            attend_values_bf16_8(g, v, length, scores, acc);
        else
#endif
        if (d == 64)
            attend_values_avx512_4(g, v, cache_bf16, length, scores, acc);
        else
            attend_values_avx512_8(g, v, cache_bf16, length, scores, acc);
    } else if (isa == 1 && d == 64) {
        attend_scores_avx2_8(qh, g, k, v, cache_bf16, length, scaling, scores);
        attend_values_avx2_8(g, v, cache_bf16, length, scores, acc);
    } else if (isa == 1 && d == 128) {
        attend_scores_avx2_16(qh, g, k, v, cache_bf16, length, scaling, scores);
        attend_values_avx2_16(g, v, cache_bf16, length, scores, acc);
    } else
        attend_head(qh, g, d, k, v, cache_bf16, length, scaling, scores, acc);
    for (int64_t e = 0; e < g * d; e++) store(out, q_bf16, first + e, acc[e]);
    free(scores);
    return 0;
}

/* q (b, heads, d) in the compute dtype, token i's heads at q + i * q_stride (elements); out
 * (b, heads, d) contiguous; keys, values (rows, kv_heads, max_len, d), the layer's cache; token
 * i attends the first lengths[i] (1..max_len) positions of row rows[i]. Returns 0, -1 when
 * memory runs out, -2 for a length or instruction set out of range. */
int decode_attention(const void *q, int64_t q_stride, int q_bf16, int64_t b, int64_t heads,
                     int64_t kv_heads, int64_t d, const void *keys, const void *values,
                     int cache_bf16, int64_t max_len, const int64_t *rows, const int64_t *lengths,
                     float scaling, void *out, int isa) {
    if (isa < 0 || isa > 4) return -2;
    int64_t shortest = max_len, longest = 0;
    for (int64_t i = 0; i < b; i++) {
        if (lengths[i] < 1 || lengths[i] > max_len) return -2;
        shortest = lengths[i] < shortest ? lengths[i] : shortest;
        longest = lengths[i] > longest ? lengths[i] : longest;
    }
    /* queries in bf16 are exact as bf16: then the keys multiply in place where the CPU can */
    int bf16_dot = HAVE_BF16 && isa >= 3 && q_bf16 && cache_bf16;
    int failed = 0;
    if (longest > 2 * shortest + ATTEND_BLOCK) {
        /* uneven work (a prompt's later tokens see more keys than its first): heads handed out
         * one at a time as threads free up */
#pragma omp parallel for collapse(2) schedule(dynamic, 1) reduction(| : failed)
        for (int64_t i = 0; i < b; i++)
            for (int64_t kvh = 0; kvh < kv_heads; kvh++)
                failed |= attend_task(q, q_stride, q_bf16, i, kvh, heads, kv_heads, d, keys, values,
                                      cache_bf16, max_len, rows[i], lengths[i], scaling, out, isa,
                                      bf16_dot) != 0;
    } else {
        /* decode tokens of similar lengths: each thread a contiguous run of heads (measured
         * faster than handing them out, 64 rows x 100 tokens: about 10%) */
#pragma omp parallel for collapse(2) schedule(static) reduction(| : failed)
        for (int64_t i = 0; i < b; i++)
            for (int64_t kvh = 0; kvh < kv_heads; kvh++)
                failed |= attend_task(q, q_stride, q_bf16, i, kvh, heads, kv_heads, d, keys, values,
                                      cache_bf16, max_len, rows[i], lengths[i], scaling, out, isa,
                                      bf16_dot) != 0;
    }
    return failed ? -1 : 0;
}

/* ---- Elementwise steps of a decoder layer, one call each instead of several torch ops:
 * rotary embedding of q and k in place, and the residual add with the RMSNorm that follows it.
 * Rounded as HF's Llama computes them in the model's dtype. Each row is widened to float32 once
 * (load_row), computed in plain loops the compiler vectorizes, and rounded back once
 * (store_row); rows are split over the OpenMP threads when there are enough of them. ---- */

/* Below this many elements a call runs on one thread: waking the others costs more. */
#define PARALLEL_ELEMENTS (1 << 15)
#define ROW_MAX 16384 /* the widest row these kernels take (head size, hidden size) */

/* v rounded to bf16 and widened back: the rounding of an op whose result is bf16 */
static inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

/* one head of d values x rotated by c, s (d each): x * c + rotate_half(x) * s, with
 * rotate_half(x) = (-x[d/2:], x[:d/2]); in bf16 each product is rounded, then the sum */
static inline __attribute__((always_inline)) void
rope_head_any(float *restrict y, const float *restrict x, const float *restrict c,
              const float *restrict s, int64_t d, int bf16) {
    int64_t half = d / 2;
    if (bf16) {
        for (int64_t e = 0; e < half; e++) {
            y[e] = bf16_round(x[e] * c[e]) + bf16_round(-x[e + half] * s[e]);
            y[e + half] = bf16_round(x[e + half] * c[e + half]) + bf16_round(x[e] * s[e + half]);
        }
    } else {
        for (int64_t e = 0; e < half; e++) {
            y[e] = x[e] * c[e] - x[e + half] * s[e];
            y[e + half] = x[e + half] * c[e + half] + x[e] * s[e + half];
        }
    }
}
VECTOR_CLONES(rope_head,
              (float *restrict y, const float *restrict x, const float *restrict c,
               const float *restrict s, int64_t d, int bf16),
              (y, x, c, s, d, bf16))

/* q (n, hq, d) and k (n, hk, d) rotated in place by cos, sin (n, d); token t's heads at
 * q + t * q_stride and k + t * k_stride (elements) */
int rope_qk(void *q, int64_t q_stride, void *k, int64_t k_stride, int bf16, int64_t n,
            int64_t hq, int64_t hk, int64_t d, const void *cos, const void *sin) {
    if (d % 2 || d > 1024) return -1;
    int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (n * (hq + hk) * d >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < n; t++) {
        float c[d], s[d], x[d], y[d];
        load_row((const char *)cos + t * d * esize, bf16, d, c);
        load_row((const char *)sin + t * d * esize, bf16, d, s);
        for (int64_t which = 0; which < 2; which++) {
            char *base = which ? k : q;
            int64_t heads = which ? hk : hq, stride = which ? k_stride : q_stride;
            for (int64_t h = 0; h < heads; h++) {
                char *at = base + (t * stride + h * d) * esize;
                load_row(at, bf16, d, x);
                rope_head(y, x, c, s, d, bf16);
                store_row(at, bf16, d, y);
            }
        }
    }
    return 0;
}

/* one row: v += delta (rounded in bf16), and out = weight * round(v * r) for r = rsqrt(mean(v^2)
 * + eps), the mean in float32; returns nothing, v keeps the sum */
static inline __attribute__((always_inline)) void
add_norm_row_any(float *restrict v, const float *restrict delta, const float *restrict w,
                 int64_t width, float eps, int bf16, float *restrict y) {
    if (delta != NULL) {
        if (bf16)
            for (int64_t e = 0; e < width; e++) v[e] = bf16_round(v[e] + delta[e]);
        else
            for (int64_t e = 0; e < width; e++) v[e] += delta[e];
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < width; e++) sum += v[e] * v[e];
    float r = 1.0f / __builtin_sqrtf(sum / (float)width + eps);
    if (bf16)
        for (int64_t e = 0; e < width; e++) y[e] = w[e] * bf16_round(v[e] * r);
    else
        for (int64_t e = 0; e < width; e++) y[e] = w[e] * (v[e] * r);
}
VECTOR_CLONES(add_norm_row,
              (float *restrict v, const float *restrict delta, const float *restrict w,
               int64_t width, float eps, int bf16, float *restrict y),
              (v, delta, w, width, eps, bf16, y))

/* h (n, width) += delta (when not NULL), rounded; then out = HF's RMSNorm of h with weight */
int add_rms_norm(void *h, const void *delta, int bf16, int64_t n, int64_t width,
                 const void *weight, float eps, void *out) {
    if (width > ROW_MAX) return -1;
    int64_t esize = bf16 ? 2 : 4;
    float w[width];
    load_row(weight, bf16, width, w);
#pragma omp parallel for schedule(static) if (n * width >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < n; t++) {
        float v[width], dl[width], y[width];
        char *row = (char *)h + t * width * esize;
        load_row(row, bf16, width, v);
        if (delta != NULL) load_row((const char *)delta + t * width * esize, bf16, width, dl);
        add_norm_row(v, delta != NULL ? dl : NULL, w, width, eps, bf16, y);
        if (delta != NULL) store_row(row, bf16, width, v);
        store_row((char *)out + t * width * esize, bf16, width, y);
    }
    return 0;
}

/* ---- silu(gate) * up, rounded as torch rounds it: the silu to the dtype, then the product ----
 * exp by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf, within
 * about one unit in the last place), in plain float arithmetic the compiler vectorizes; a libm
 * call per element would cost ten times the rest. */

/* exp's input range, read from memory rather than written as constants: with constants GCC folds
 * exp of each limit, which leaves the polynomial on a branch of its own; AVX-512 vectorizes that
 * with masks, but the AVX2 and portable builds stayed scalar (silu * up about 5x slower). Not
 * static, so the compiler cannot take its values as known; hidden, so the library does not
 * export it. */
__attribute__((visibility("hidden"))) float exp_poly_limits[2] = {-87.0f, 88.0f};

static inline float exp_poly(float x) {
    float lo = exp_poly_limits[0], hi = exp_poly_limits[1];
    x = x < lo ? lo : (x > hi ? hi : x);
    /* k = round(x / ln2), by adding 1.5 * 2^23: the sum's low bits are k */
    float shifted = x * 1.44269504088896341f + 12582912.0f;
    float k = shifted - 12582912.0f;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* bf16: widened a block at a time, the float32 loop, then rounded (each loop vectorizes) */
static inline __attribute__((always_inline)) void
silu_mul_bf16_any(const uint16_t *restrict g, const uint16_t *restrict u, int64_t count,
                  uint16_t *restrict y) {
    float a[256], b[256];
    for (int64_t at = 0; at < count; at += 256) {
        int64_t n = count - at < 256 ? count - at : 256;
        load_row(g + at, 1, n, a);
        for (int64_t i = 0; i < n; i++) a[i] = a[i] / (1.0f + exp_poly(-a[i]));
        store_row(y + at, 1, n, a); /* the silu, rounded */
        load_row(y + at, 1, n, a);
        load_row(u + at, 1, n, b);
        for (int64_t i = 0; i < n; i++) a[i] *= b[i];
        store_row(y + at, 1, n, a);
    }
}
VECTOR_CLONES(silu_mul_bf16,
              (const uint16_t *restrict g, const uint16_t *restrict u, int64_t count,
               uint16_t *restrict y),
              (g, u, count, y))

static inline __attribute__((always_inline)) void
silu_mul_f32_any(const float *restrict g, const float *restrict u, int64_t count,
                 float *restrict y) {
    for (int64_t i = 0; i < count; i++) y[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];
}
VECTOR_CLONES(silu_mul_f32,
              (const float *restrict g, const float *restrict u, int64_t count, float *restrict y),
              (g, u, count, y))

/* out (rows, width) = silu(gate) * up for gate and up (rows, width), row r of each at
 * r * stride elements (gate and up may be the two halves of one fused projection's rows) */
int silu_mul(const void *gate, const void *up, int64_t rows, int64_t width, int64_t stride,
             int bf16, void *out) {
    int64_t per = (1 << 14) / width + 1; /* rows per chunk of work */
    int64_t chunks = (rows + per - 1) / per, esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t last = (c + 1) * per < rows ? (c + 1) * per : rows;
        for (int64_t r = c * per; r < last; r++) {
            const char *g = (const char *)gate + r * stride * esize;
            const char *u = (const char *)up + r * stride * esize;
            char *y = (char *)out + r * width * esize;
            if (bf16)
                silu_mul_bf16((const uint16_t *)g, (const uint16_t *)u, width, (uint16_t *)y);
            else
                silu_mul_f32((const float *)g, (const float *)u, width, (float *)y);
        }
    }
    return 0;
}

/* ---- The KV cache write: token t's keys and values (n, heads, d), at t * k_stride and
 * t * v_stride elements, into cache row rows[t] at position pos[t] of keys and values (rows,
 * heads, max_len, d); esize bytes an element. ---- */

int kv_write(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *keys,
             void *values, int64_t heads, int64_t max_len, int64_t d, int64_t esize,
             const int64_t *rows, const int64_t *pos, int64_t n) {
    size_t bytes = (size_t)(d * esize);
#pragma omp parallel for schedule(static) if (n * heads * d >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < heads; h++) {
            int64_t at = ((rows[t] * heads + h) * max_len + pos[t]) * d * esize;
            memcpy((char *)keys + at, (const char *)k + (t * k_stride + h * d) * esize, bytes);
            memcpy((char *)values + at, (const char *)v + (t * v_stride + h * d) * esize, bytes);
        }
    return 0;
}

/* ---- A captured decode step: the kernels above, called in order from one list of records,
 * on buffers fixed when the list was built (step_program.py), with no Python between them.
 * Each record is STEP_WORDS int64 words: an opcode, then its arguments (pointers as integers,
 * floats as their float32 bits). run_step returns 0, or 1 + the index of the record that
 * failed. ---- */

#define STEP_WORDS 16
enum {
    OP_GATHER = 1,   /* src, row bytes, index (int64), n, dst: dst[t] = src[index[t]] */
    OP_ADD_NORM,     /* add_rms_norm's arguments */
    OP_NF4,          /* nf4_linear's arguments */
    OP_LORA,         /* lora_add's, with the rank read from a cell (0: nothing to add), the
                        slot stride and the slot count last */
    OP_ROPE,         /* rope_qk's */
    OP_KV_WRITE,     /* kv_write's */
    OP_ATTEND,       /* decode_attention's */
    OP_SILU_MUL,     /* silu_mul's */
    OP_ADD,          /* h, delta, count, bf16: h += delta, rounded once */
};

static inline float bits_f32(int64_t w) {
    uint32_t u = (uint32_t)w;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define P(i) ((void *)(intptr_t)op[i])

int run_step(const int64_t *ops, int64_t count) {
    for (int64_t n = 0; n < count; n++) {
        const int64_t *op = ops + n * STEP_WORDS;
        int rc = 0;
        switch (op[0]) {
        case OP_GATHER: {
            const int64_t *index = P(3);
            for (int64_t t = 0; t < op[4]; t++)
                memcpy((char *)P(5) + t * op[2], (const char *)P(1) + index[t] * op[2],
                       (size_t)op[2]);
            break;
        }
        case OP_ADD_NORM:
            rc = add_rms_norm(P(1), P(2), (int)op[3], op[4], op[5], P(6), bits_f32(op[7]), P(8));
            break;
        case OP_NF4:
            rc = nf4_linear(P(1), (int)op[2], op[3], op[4], P(5), P(6), op[7], op[8], P(9), P(10),
                            (int)op[2], (int)op[11]);
            break;
        case OP_LORA: {
            int64_t rank = *(const int64_t *)P(9);
            if (rank > 0)
                rc = lora_add(P(1), (int)op[2], op[3], op[4], P(5), P(6), (int)op[7], op[8], rank,
                              op[13], op[14], P(10), (int)op[2], bits_f32(op[11]), (int)op[12]);
            break;
        }
        case OP_ROPE:
            rc = rope_qk(P(1), op[2], P(3), op[4], (int)op[5], op[6], op[7], op[8], op[9], P(10),
                         P(11));
            break;
        case OP_KV_WRITE:
            rc = kv_write(P(1), op[2], P(3), op[4], P(5), P(6), op[7], op[8], op[9], op[10], P(11),
                          P(12), op[13]);
            break;
        case OP_ATTEND:
            rc = decode_attention(P(1), op[2], (int)op[3], op[4], op[5], op[6], op[7], P(8), P(9),
                                  (int)op[3], op[10], P(11), P(12), bits_f32(op[13]), P(14),
                                  (int)op[15]);
            break;
        case OP_SILU_MUL:
            rc = silu_mul(P(1), P(2), op[3], op[4], op[5], (int)op[6], P(7));
            break;
        case OP_ADD: {
            int bf16 = (int)op[4];
            for (int64_t i = 0; i < op[3]; i++)
                store(P(1), bf16, i, load_any(P(1), bf16, i) + load_any(P(2), bf16, i));
            break;
        }
        default:
            rc = -1;
        }
        if (rc != 0) return (int)(n + 1);
    }
    return 0;
}
