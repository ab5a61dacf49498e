/* Matrix-vector products and row dequantization, dispatched on the tensor type.
 *
 * F32, F16 and BF16 are computed here (AVX2+FMA+F16C paths, scalar fallbacks); block-quantized
 * types go to quants.c through kernels.h. Threading: pl_matmul opens its own OpenMP team;
 * pl__team_matmul is the orphaned form used inside pl_forward's one parallel region.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PL_AVX2 1
#endif
#include "internal.h"

/* ------------------------------------------------------------------------------------------------
 * scalar conversions */

float pli_f16_to_f32(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ------------------------------------------------------------------------------------------------
 * float rows: out[r] = dot(W[r, :], x) for r in [r0, r1) */

#ifdef PL_AVX2
static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Loads 8 weights of row w at element j as f32. */
#define LOAD_F32(w, j) _mm256_loadu_ps((const float *)(w) + (j))
#define LOAD_F16(w, j) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(w) + (j))))
#define LOAD_BF16(w, j) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(w) + (j)))), 16))

/* Two rows at a time (x is loaded once for both), four accumulators per row. */
#define FLOAT_ROWS(NAME, ELEM, LOAD, SCALAR)                                                      \
static void NAME(const void *data, const float *x, float *out, long long r0, long long r1, long long n) \
{                                                                                               \
    const ELEM *base = (const ELEM *)data;                                                      \
    long long r = r0;                                                                           \
    for (; r + 1 < r1; r += 2) {                                                                \
        const ELEM *w0 = base + r * n, *w1 = w0 + n;                                            \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                              \
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();                              \
        long long j = 0;                                                                        \
        for (; j + 16 <= n; j += 16) {                                                          \
            __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);                \
            a0 = _mm256_fmadd_ps(LOAD(w0, j), x0, a0);                                          \
            a1 = _mm256_fmadd_ps(LOAD(w0, j + 8), x1, a1);                                      \
            b0 = _mm256_fmadd_ps(LOAD(w1, j), x0, b0);                                          \
            b1 = _mm256_fmadd_ps(LOAD(w1, j + 8), x1, b1);                                      \
        }                                                                                       \
        for (; j + 8 <= n; j += 8) {                                                            \
            __m256 x0 = _mm256_loadu_ps(x + j);                                                 \
            a0 = _mm256_fmadd_ps(LOAD(w0, j), x0, a0);                                          \
            b0 = _mm256_fmadd_ps(LOAD(w1, j), x0, b0);                                          \
        }                                                                                       \
        float s0 = hsum256(_mm256_add_ps(a0, a1)), s1 = hsum256(_mm256_add_ps(b0, b1));         \
        for (; j < n; j++) { s0 += SCALAR(w0[j]) * x[j]; s1 += SCALAR(w1[j]) * x[j]; }          \
        out[r] = s0;                                                                            \
        out[r + 1] = s1;                                                                        \
    }                                                                                           \
    for (; r < r1; r++) {                                                                       \
        const ELEM *w0 = base + r * n;                                                          \
        __m256 a0 = _mm256_setzero_ps();                                                        \
        long long j = 0;                                                                        \
        for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(LOAD(w0, j), _mm256_loadu_ps(x + j), a0); \
        float s0 = hsum256(a0);                                                                 \
        for (; j < n; j++) s0 += SCALAR(w0[j]) * x[j];                                          \
        out[r] = s0;                                                                            \
    }                                                                                           \
}
#else
#define FLOAT_ROWS(NAME, ELEM, LOAD, SCALAR)                                                      \
static void NAME(const void *data, const float *x, float *out, long long r0, long long r1, long long n) \
{                                                                                               \
    const ELEM *base = (const ELEM *)data;                                                      \
    for (long long r = r0; r < r1; r++) {                                                       \
        const ELEM *w0 = base + r * n;                                                          \
        float s[4] = {0, 0, 0, 0};                                                              \
        long long j = 0;                                                                        \
        for (; j + 4 <= n; j += 4)                                                              \
            for (int k = 0; k < 4; k++) s[k] += SCALAR(w0[j + k]) * x[j + k];                   \
        for (; j < n; j++) s[0] += SCALAR(w0[j]) * x[j];                                        \
        out[r] = (s[0] + s[1]) + (s[2] + s[3]);                                                 \
    }                                                                                           \
}
#endif

#define AS_F32(v) (v)
FLOAT_ROWS(rows_f32, float, LOAD_F32, AS_F32)
FLOAT_ROWS(rows_f16, uint16_t, LOAD_F16, pli_f16_to_f32)
FLOAT_ROWS(rows_bf16, uint16_t, LOAD_BF16, bf16_to_f32)

/* ------------------------------------------------------------------------------------------------
 * dispatch */

static void matvec_rows(const pl_tensor *w, const void *xin, float *out, long long r0, long long r1)
{
    switch (w->type) {
    case PL_F32: rows_f32(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    case PL_F16: rows_f16(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    case PL_BF16: rows_bf16(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    default: pli_matvec_rows(w, xin, out, r0, r1); break;
    }
}

/* Row range of thread `tid` of `nth`: even split, rounded to pairs of rows. */
static void split_rows(long long rows, int tid, int nth, long long *r0, long long *r1)
{
    long long pairs = (rows + 1) / 2;
    long long per = pairs / nth, extra = pairs % nth;
    long long p0 = tid * per + (tid < extra ? tid : extra);
    long long p1 = p0 + per + (tid < extra ? 1 : 0);
    *r0 = p0 * 2 < rows ? p0 * 2 : rows;
    *r1 = p1 * 2 < rows ? p1 * 2 : rows;
}

void pl__team_matmul(float *xout, const float *x, const pl_tensor *w, void *scratch)
{
    const void *xin = x;
    if (pli_is_quant(w->type)) {
        /* the previous matmul ended with a barrier, so no thread still reads the scratch */
#pragma omp single
        pli_quantize_act(w, x, scratch);
        xin = scratch;
    }
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    long long r0, r1;
    split_rows(w->rows, tid, nth, &r0, &r1);
    if (r0 < r1)
        matvec_rows(w, xin, xout, r0, r1);
#pragma omp barrier
}

void pl_matmul(float *xout, const float *x, const pl_tensor *w, void *scratch, int n_threads)
{
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    pl__team_matmul(xout, x, w, scratch);
}

long long pl__act_bytes(const pl_tensor *w)
{
    return pli_is_quant(w->type) ? pli_act_bytes(w) : 0;
}

void pl_dequantize_row(const pl_tensor *w, long long row, float *out)
{
    long long n = w->cols;
    switch (w->type) {
    case PL_F32:
        memcpy(out, (const float *)w->data + row * n, (size_t)n * sizeof(float));
        break;
    case PL_F16: {
        const uint16_t *src = (const uint16_t *)w->data + row * n;
        for (long long j = 0; j < n; j++) out[j] = pli_f16_to_f32(src[j]);
        break;
    }
    case PL_BF16: {
        const uint16_t *src = (const uint16_t *)w->data + row * n;
        for (long long j = 0; j < n; j++) out[j] = bf16_to_f32(src[j]);
        break;
    }
    default:
        pli_dequantize_row(w, row, out);
        break;
    }
}
