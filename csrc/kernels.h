/* Internal interface between the C files (not part of the cffi API; never read by cffi).
 *
 * matmul.c  — dispatch on the tensor type, OpenMP row split, F32/F16/BF16 kernels
 * quants.c  — block-quantized types (ggml Q4_0 … Q6_K, llama2.c V2 PL_Q8_G): activation
 *             quantization, row dot products, dequantization; scalar code plus AVX2 paths
 */
#ifndef PYLLAMA_KERNELS_H
#define PYLLAMA_KERNELS_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "pyllama.h"

/* PL_AVX2: the compiler targets AVX2 and FMA, so matmul.c and quants.c take their AVX2 kernels.
 * F16C (fp16 -> f32 in hardware) is a separate extension: every use of it is guarded by
 * __F16C__ on its own, with an exact scalar conversion otherwise (e.g. -mavx2 -mfma alone). */
#if defined(__AVX2__) && defined(__FMA__)
#define PL_AVX2 1
#endif
#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* Keeps a loaded vector in a register: GCC otherwise folds the load into every instruction that
 * uses the vector, reading the same bytes once per use (matmul.c's float tile, quants.c's Q4_K
 * decode, where each chunk of weights feeds two operations). */
#if defined(__GNUC__)
#define PL_IN_REG(v) __asm__("" : "+v"(v))
#else
#define PL_IN_REG(v) (void)0
#endif

/* PL_AHEAD: how far ahead of its weight stream a one-token kernel prefetches (prefetcht0, line
 * by line as it reads; 0: the hardware prefetcher alone, e.g. PYLLAMA_CFLAGS=-DPL_AHEAD=0). A
 * one-token matmul does little arithmetic per byte, so how many lines are in flight sets its pace:
 * on a Zen 5 EPYC one core read the 1B-shaped files' matrices at 0.48-0.80 (Q6_K, Q4_K), 0.90-0.94
 * (Q8_0, Q4_0) and stories110M F16 at 0.70-0.80 of a plain sum over the same bytes without it,
 * at 0.88-0.96, 0.91-0.98 and 0.82-0.91 with it (README, Speed; on a Zen 4 EPYC, earlier variants
 * of it measured 1-5% slower). */
#ifndef PL_AHEAD
#define PL_AHEAD 8192
#endif

/* The lines of [p, p + n) into L1 (prefetcht0), the kernels' line-by-line prefetches (the float
 * one-token kernels' weights: pli_prefetch_ahead_nta below). always_inline: as
 * a plain static inline, GCC 12 judged such a function free of side effects (a prefetch stores
 * nothing) and deleted its calls before inlining them; the K-quant decode loops then ran without
 * their prefetch of x (one core read the 1B Q4_K_M file's ffn_down at Q4_K 0.69-0.73, Q6_K
 * 0.74-0.75 of a plain sum over the same bytes, 0.86-0.90 with it). */
#if defined(__GNUC__)
static inline __attribute__((always_inline)) void pli_prefetch_lines(const void *p, size_t n)
{
    for (size_t k = 0; k < n; k += 64) __builtin_prefetch((const char *)p + k, 0, 3);
}
#else
static inline void pli_prefetch_lines(const void *p, size_t n) { (void)p, (void)n; }
#endif

/* A one-token kernel's weights [p, p + n), read now: their lines PL_AHEAD bytes on. */
static inline __attribute__((always_inline)) void pli_prefetch_ahead(const void *p, size_t n)
{
    if (PL_AHEAD > 0) pli_prefetch_lines((const char *)p + PL_AHEAD, n);
}

/* The same for the float kernels, non-temporal (prefetchnta): their weights pass through once a
 * token without taking L3 from the KV cache, which the next token's attention reads again.
 * stories110M, 2 threads (Zen 5): attention 4.6-4.8% -> 3.6-3.8% of an F16 token's time; whole
 * tokens against the probe, the two builds in turn, F16 0.910 and 0.927 -> 0.942 and 0.967, F32
 * 0.952 and 0.956 -> 0.981 and 0.972; each float matrix alone on one core unchanged. The
 * quantized kernels read 1-3% slower with it (lines that wait longer for their use) and keep
 * prefetcht0. */
static inline __attribute__((always_inline)) void pli_prefetch_ahead_nta(const void *p, size_t n)
{
#if defined(__GNUC__)
    if (PL_AHEAD > 0)
        for (size_t k = 0; k < n; k += 64) __builtin_prefetch((const char *)p + PL_AHEAD + k, 0, 0);
#else
    (void)p, (void)n;
#endif
}

#if defined(__AVX__)
/* Sum of the 8 lanes, in the one order every kernel uses: lanes j + j+4, then pairs, then the two
 * halves (results that must agree bit for bit, e.g. batched and single-token, rely on it). */
static inline float pli_hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* IEEE half -> float (F16C when the compiler targets it, else exact bit manipulation). */
static inline float pli_fp16(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: shift the mantissa up to the implicit bit */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) { /* inf / nan */
        bits = sign | 0x7f800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* 1 for the types quants.c handles, else 0. */
int pli_is_quant(int type);

/* Bytes of activation scratch that pli_quantize_act needs for an input of w->cols elements. */
long long pli_act_bytes(const pl_tensor *w);

/* Quantize x[w->cols] into the activation format pli_matvec_rows reads for w's type. */
void pli_quantize_act(const pl_tensor *w, const float *x, void *xq);

/* out[r] = dot(row r of w, x) for r in [r0, r1), x given as quantized by pli_quantize_act.
 * Called from inside an OpenMP region (one call per thread chunk): no OpenMP inside. */
void pli_matvec_rows(const pl_tensor *w, const void *xq, float *out, long long r0, long long r1);

/* The same for a batch: out[t*ldo + r] for tokens t < ntok, token t's quantized activations at
 * xq + t*stride (tiles of rows x tokens where a type has one). No OpenMP inside. */
void pli_matmul_batch(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out,
                      long long ldo, long long r0, long long r1);

/* Bytes of a row of w (a quantized type; repacked layouts have the same size). */
long long pli_row_bytes(const pl_tensor *w);

/* Bytes of w's repacked layout (0: none for its type/shape in this build), and the repack of
 * groups [g0, g1) of 16 rows into dst (the whole layout's base); returns the repacked type. */
long long pli_repack_bytes(const pl_tensor *w);
int pli_repack(const pl_tensor *w, void *dst, long long g0, long long g1);
/* 1 when pli_matmul_batch blocks w's rows itself and wants a thread's whole row range at once. */
int pli_batch_all_rows(int type);

/* out[w->cols] = row `row` of w, dequantized. */
void pli_dequantize_row(const pl_tensor *w, long long row, float *out);

/* pli_matvec_rows and pli_dequantize_row on a type they do not know (Python never passes one)
 * fill their output with NaN rather than leave it as it was: loud, and C prints nothing. */

#endif
