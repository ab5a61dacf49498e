/* Matrix-vector products and row dequantization, dispatched on the tensor type.
 *
 * F32, F16 and BF16 are computed here (AVX2+FMA+F16C paths, scalar fallbacks); block-quantized
 * types go to quants.c through kernels.h. Threading: pl_matmul opens its own OpenMP team;
 * pl__team_matmuls is the orphaned form used inside pl_forward's one parallel region.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h" /* kernels.h: PL_AVX2, immintrin.h */

/* ------------------------------------------------------------------------------------------------
 * scalar conversions */

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

/* Loads 8 weights of row w at element j as f32. */
#define LOAD_F32(w, j) _mm256_loadu_ps((const float *)(w) + (j))
#ifdef __F16C__
#define LOAD_F16(w, j) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(w) + (j))))
#else /* AVX2 without F16C: the same exact values, converted one by one */
static inline __m256 load_f16_scalar(const uint16_t *h)
{
    float f[8];
    for (int k = 0; k < 8; k++) f[k] = pli_fp16(h[k]);
    return _mm256_loadu_ps(f);
}
#define LOAD_F16(w, j) load_f16_scalar((const uint16_t *)(w) + (j))
#endif
#define LOAD_BF16(w, j) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(w) + (j)))), 16))

/* Vectors of the kernels below that have a 16-float form (TV_*): 16 floats where the compiler
 * targets AVX-512, else 8 (AVX2). */
#ifdef __AVX512F__
#define TV __m512
#define TV_N 16
#define TV_ZERO() _mm512_setzero_ps()
#define TV_X(p) _mm512_loadu_ps(p)
#define TV_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define TV_ADD(a, b) _mm512_add_ps(a, b)
#define TV_SUM(v) _mm512_reduce_add_ps(v)
#define TLOAD_F32(w, j) _mm512_loadu_ps((const float *)(w) + (j))
#define TLOAD_F16(w, j) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(w) + (j))))
#define TLOAD_BF16(w, j) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(w) + (j)))), 16))
#else
#define TV __m256
#define TV_N 8
#define TV_ZERO() _mm256_setzero_ps()
#define TV_X(p) _mm256_loadu_ps(p)
#define TV_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define TV_ADD(a, b) _mm256_add_ps(a, b)
#define TV_SUM(v) pli_hsum8(v)
#define TLOAD_F32 LOAD_F32
#define TLOAD_F16 LOAD_F16
#define TLOAD_BF16 LOAD_BF16
#endif

/* Rows of more than PL_WIDE_COLS values: x (4 bytes a value) takes more than half of L1, and the
 * streaming weights evict it before the next row comes back to it (see FLOAT_ROWS). */
#define PL_WIDE_COLS 4096

/* Wide rows, two at a time: each 16 values of x loaded serve both rows, so x is read from L2 half
 * as often. Each row's sum is the same two-accumulator sequence whether it is paired or alone (the
 * last row of an odd range), so a row's result does not depend on how rows were split. Measured
 * on the 1B-shaped F32 file's w2 (2048 x 8192) against a row at a time: one core 0.53 -> 0.67 of
 * its streaming rate, two 0.70 -> 0.88; x kept in L1 (a test reading an 8 KB window of it) reaches
 * 1.0, two passes over column halves 0.46. */
#define FLOAT_WIDE_ROWS(NAME, ELEM, LOAD, SCALAR)                                                 \
static void NAME(const ELEM *base, const float *x, float *out, long long r0, long long r1, long long n) \
{                                                                                               \
    const long long n16 = n & ~15LL;                                                            \
    for (long long r = r0; r < r1; r += 2) {                                                    \
        const int two = r + 1 < r1;                                                             \
        const ELEM *w0 = base + r * n, *w1 = two ? w0 + n : w0;                                 \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;                             \
        for (long long j = 0; j < n16; j += 16) {                                               \
            __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);                \
            pli_prefetch_ahead_nta(w0 + j, 16 * sizeof(ELEM));                                  \
            if (two) pli_prefetch_ahead_nta(w1 + j, 16 * sizeof(ELEM));                         \
            a0 = _mm256_fmadd_ps(LOAD(w0, j), x0, a0);                                          \
            a1 = _mm256_fmadd_ps(LOAD(w0, j + 8), x1, a1);                                      \
            if (two) {                                                                          \
                b0 = _mm256_fmadd_ps(LOAD(w1, j), x0, b0);                                      \
                b1 = _mm256_fmadd_ps(LOAD(w1, j + 8), x1, b1);                                  \
            }                                                                                   \
        }                                                                                       \
        float s0 = pli_hsum8(_mm256_add_ps(a0, a1)), s1 = pli_hsum8(_mm256_add_ps(b0, b1));     \
        for (long long j = n16; j < n; j++) {                                                   \
            s0 += SCALAR(w0[j]) * x[j];                                                         \
            s1 += SCALAR(w1[j]) * x[j];                                                         \
        }                                                                                       \
        out[r] = s0;                                                                            \
        if (two) out[r + 1] = s1;                                                               \
    }                                                                                           \
}

/* One row at a time, 32 values per step in four accumulators: a single sequential stream of
 * weights runs at about twice the read bandwidth of two interleaved row streams here (while x
 * stays in L1; wider rows go two at a time, NAME##_wide). */
#define FLOAT_ROWS(NAME, ELEM, LOAD, TLOAD, SCALAR)                                               \
FLOAT_WIDE_ROWS(NAME##_wide, ELEM, LOAD, SCALAR)                                                 \
static void NAME(const void *data, const float *x, float *out, long long r0, long long r1, long long n) \
{                                                                                               \
    const ELEM *base = (const ELEM *)data;                                                      \
    if (n > PL_WIDE_COLS) {                                                                     \
        NAME##_wide(base, x, out, r0, r1, n);                                                   \
        return;                                                                                 \
    }                                                                                           \
    for (long long r = r0; r < r1; r++) {                                                       \
        const ELEM *w0 = base + r * n;                                                          \
        TV a0 = TV_ZERO(), a1 = a0, a2 = a0, a3 = a0;                                           \
        long long j = 0;                                                                        \
        for (; j + 4 * TV_N <= n; j += 4 * TV_N) {                                              \
            pli_prefetch_ahead_nta(w0 + j, 4 * TV_N * sizeof(ELEM));                            \
            a0 = TV_FMA(TLOAD(w0, j), TV_X(x + j), a0);                                         \
            a1 = TV_FMA(TLOAD(w0, j + TV_N), TV_X(x + j + TV_N), a1);                           \
            a2 = TV_FMA(TLOAD(w0, j + 2 * TV_N), TV_X(x + j + 2 * TV_N), a2);                   \
            a3 = TV_FMA(TLOAD(w0, j + 3 * TV_N), TV_X(x + j + 3 * TV_N), a3);                   \
        }                                                                                       \
        for (; j + TV_N <= n; j += TV_N) a0 = TV_FMA(TLOAD(w0, j), TV_X(x + j), a0);            \
        float s0 = TV_SUM(TV_ADD(TV_ADD(a0, a1), TV_ADD(a2, a3)));                              \
        for (; j < n; j++) s0 += SCALAR(w0[j]) * x[j];                                          \
        out[r] = s0;                                                                            \
    }                                                                                           \
}
#else
#define FLOAT_ROWS(NAME, ELEM, LOAD, TLOAD, SCALAR)                                               \
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
FLOAT_ROWS(rows_f32, float, LOAD_F32, TLOAD_F32, AS_F32)
FLOAT_ROWS(rows_f16, uint16_t, LOAD_F16, TLOAD_F16, pli_fp16)
FLOAT_ROWS(rows_bf16, uint16_t, LOAD_BF16, TLOAD_BF16, bf16_to_f32)

/* ------------------------------------------------------------------------------------------------
 * Wide float rows, interleaved (PL_F32_R4, PL_F16_R4, PL_BF16_R4; made by pl_repack): rows in
 * groups of 4, and in a group the 4 rows' values 16 at a time: value j of row r is element
 *     (r / 4)·4n + (j / 16)·64 + (r % 4)·16 + j % 16        (n = cols, a multiple of 16).
 * A group is one sequential stream in which each 16 values of x, loaded once, serve 4 rows, where
 * the plain layout's two rows at a time (FLOAT_WIDE_ROWS) read x from L2 once per 2 rows and
 * two streams. A bare C loop over a 2048 x 8192 F32 matrix, one core: plain pairs 0.66 of its
 * streaming rate, this layout 0.87-0.9 (8 rows a group: 0.85). Each row's sum is the plain
 * layout's sequence (two accumulators over the halves of each 16 values, then pli_hsum8 of their
 * sum), so results are bit-identical to the file's layout, whatever the split into threads. */
static inline long long r4_row(long long r, long long n) { return (r >> 2) * 4 * n + (r & 3) * 16; }
#ifdef PL_AVX2
#define R4_POS(j) ((((j) >> 4) << 6) + ((j) & 15)) /* value j's offset from its row's start */

#define FLOAT_R4_ROWS(NAME, ELEM, LOAD)                                                           \
static void NAME(const void *data, const float *x, float *out, long long r0, long long r1, long long n) \
{                                                                                               \
    const ELEM *base = (const ELEM *)data;                                                      \
    for (long long r = r0; r < r1;) {                                                           \
        const ELEM *g = base + r4_row(r, n);                                                    \
        if ((r & 3) || r + 4 > r1) { /* a row alone: the range starts or ends inside a group */ \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                           \
            for (long long j = 0; j < n; j += 16, g += 64) {                                    \
                a0 = _mm256_fmadd_ps(LOAD(g, 0), _mm256_loadu_ps(x + j), a0);                   \
                a1 = _mm256_fmadd_ps(LOAD(g, 8), _mm256_loadu_ps(x + j + 8), a1);               \
            }                                                                                   \
            out[r++] = pli_hsum8(_mm256_add_ps(a0, a1));                                        \
            continue;                                                                           \
        }                                                                                       \
        __m256 a[8];                                                                            \
        for (int q = 0; q < 8; q++) a[q] = _mm256_setzero_ps();                                 \
        for (long long j = 0; j < n; j += 16, g += 64) {                                        \
            __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);                \
            PL_IN_REG(x0);                                                                      \
            PL_IN_REG(x1);                                                                      \
            pli_prefetch_ahead_nta(g, 64 * sizeof(ELEM));                                       \
            for (int q = 0; q < 4; q++) {                                                       \
                a[2 * q] = _mm256_fmadd_ps(LOAD(g, 16 * q), x0, a[2 * q]);                      \
                a[2 * q + 1] = _mm256_fmadd_ps(LOAD(g, 16 * q + 8), x1, a[2 * q + 1]);          \
            }                                                                                   \
        }                                                                                       \
        for (int q = 0; q < 4; q++) out[r + q] = pli_hsum8(_mm256_add_ps(a[2 * q], a[2 * q + 1])); \
        r += 4;                                                                                 \
    }                                                                                           \
}
FLOAT_R4_ROWS(rows_f32_r4, float, LOAD_F32)
FLOAT_R4_ROWS(rows_f16_r4, uint16_t, LOAD_F16)
FLOAT_R4_ROWS(rows_bf16_r4, uint16_t, LOAD_BF16)
#endif

/* ------------------------------------------------------------------------------------------------
 * float rows x a batch of tokens: out[t*ldo + r] = dot(W[r, :], x[t, :]) for r in [r0, r1), t < n.
 * A register tile of 3 rows x 4 tokens (12 accumulators): each weight vector loaded serves 4
 * tokens and each activation vector 3 rows. Vectors of 16 floats where the compiler targets
 * AVX-512 (TV_*), else of 8 (AVX2; all 16 registers). With full-width 512-bit FMA units (Zen 5)
 * the 16-wide tile does twice the multiplies per instruction: beside llama.cpp on a Zen 5 EPYC,
 * 128-token prompts of stories110M F32 went from 0.93x to 1.54x its rate, F16 0.84x -> 1.43x. */

#ifdef PL_AVX2
/* IN_REG (PL_IN_REG): without it GCC (with AVX-512 enabled) folds a load into each FMA that uses
 * it (14 loads for 12 FMAs instead of 7), and the tile waits on loads: with it, the F32 tile runs
 * 2.1x faster on one core (23 -> 49 GMAC/s, 2048x768 weights, 64 tokens). */
#define IN_REG(v) PL_IN_REG(v)

/* s[i][k] = the sum of the lanes of row i's accumulator for token k (a, b, c: rows 0, 1, 2). With
 * 16 lanes, the twelve sums share their steps: halves, then quarters, of two tokens' vectors added
 * at once, then the rows side by side; 36 instructions where twelve reductions took 96, which
 * weighed about a tenth of a tile over 768 columns. */
static inline __attribute__((always_inline)) void
tile_sums(float s[3][4], TV a0, TV a1, TV a2, TV a3, TV b0, TV b1, TV b2, TV b3, TV c0, TV c1, TV c2, TV c3)
{
#ifdef __AVX512F__
    /* per row: 128-bit quarter k holds 4 partial sums of token k */
#define QUARTERS(x0, x1, x2, x3)                                                                  \
    _mm512_add_ps(_mm512_shuffle_f32x4(_mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x44),         \
                                                     _mm512_shuffle_f32x4(x0, x1, 0xEE)),        \
                                       _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, 0x44),         \
                                                     _mm512_shuffle_f32x4(x2, x3, 0xEE)), 0x88), \
                  _mm512_shuffle_f32x4(_mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x44),         \
                                                     _mm512_shuffle_f32x4(x0, x1, 0xEE)),        \
                                       _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, 0x44),         \
                                                     _mm512_shuffle_f32x4(x2, x3, 0xEE)), 0xDD))
    const __m512 ra = QUARTERS(a0, a1, a2, a3), rb = QUARTERS(b0, b1, b2, b3), rc = QUARTERS(c0, c1, c2, c3);
#undef QUARTERS
    /* lanes of each quarter: (a, b, a, b) pairs and (c, c, c, c), then the pairs added */
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(ra, rb), _mm512_unpackhi_ps(ra, rb));
    const __m512 cc = _mm512_add_ps(_mm512_unpacklo_ps(rc, rc), _mm512_unpackhi_ps(rc, rc));
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(ab, cc, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(ab, cc, _MM_SHUFFLE(3, 2, 3, 2)));
    float v[16]; /* quarter k: rows 0, 1, 2, 2 of token k */
    _mm512_storeu_ps(v, t);
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 3; i++) s[i][k] = v[4 * k + i];
#else
    const TV r[3][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0, c1, c2, c3}};
    for (int i = 0; i < 3; i++)
        for (int k = 0; k < 4; k++) s[i][k] = TV_SUM(r[i][k]);
#endif
}

#define FMA3(xv) \
    a##xv = TV_FMA(u, x##xv##v, a##xv); b##xv = TV_FMA(v, x##xv##v, b##xv); c##xv = TV_FMA(w, x##xv##v, c##xv);
#define FLOAT_TILE(NAME, ELEM, LOAD, ROWS, ROWP, POS)                                         \
static void NAME(const void *data, const float *x, float *out, long long r0, long long r1,       \
                 long long n, int ntok, long long ldo, const char *pf, long long pf_bytes)       \
{                                                                                                \
    const ELEM *base = (const ELEM *)data;                                                       \
    /* tokens outer (4 activation rows, 4*n floats, stay in L1), rows inner (the chunk of weight
     * rows streams from L2); each group of 4 tokens also prefetches its share of pf_bytes at pf
     * (the next chunk) into L2 */                                                               \
    const long long pf_step = ((pf_bytes / (ntok / 4 > 0 ? ntok / 4 : 1)) + 127) & ~63LL;        \
    int t = 0;                                                                                   \
    for (; t + 4 <= ntok; t += 4) {                                                              \
        for (long long o = 0; o < pf_step && pf_bytes > 0; o += 64, pf_bytes -= 64, pf += 64)    \
            _mm_prefetch(pf, _MM_HINT_T1);                                                       \
        const float *x0 = x + t * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;                   \
        long long r = r0;                                                                        \
        for (; r + 2 < r1; r += 3) {                                                             \
            const ELEM *w0 = base + ROWP(r, n), *w1 = base + ROWP(r + 1, n);                     \
            const ELEM *w2 = base + ROWP(r + 2, n);                                              \
            TV a0 = TV_ZERO(), a1 = a0, a2 = a0, a3 = a0;                                        \
            TV b0 = a0, b1 = a0, b2 = a0, b3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;           \
            long long j = 0;                                                                     \
            for (; j + TV_N <= n; j += TV_N) {                                                   \
                TV u = LOAD(w0, POS(j)), v = LOAD(w1, POS(j)), w = LOAD(w2, POS(j));             \
                IN_REG(u); IN_REG(v); IN_REG(w);                                                 \
                TV x0v = TV_X(x0 + j); IN_REG(x0v); FMA3(0)                                      \
                TV x1v = TV_X(x1 + j); IN_REG(x1v); FMA3(1)                                      \
                TV x2v = TV_X(x2 + j); IN_REG(x2v); FMA3(2)                                      \
                TV x3v = TV_X(x3 + j); IN_REG(x3v); FMA3(3)                                      \
            }                                                                                    \
            float s[3][4];                                                                       \
            tile_sums(s, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3);                        \
            const float *xs[4] = {x0, x1, x2, x3};                                               \
            for (; j < n; j++)                                                                   \
                for (int k = 0; k < 4; k++) {                                                    \
                    s[0][k] += ROWS(w0[POS(j)]) * xs[k][j];                                      \
                    s[1][k] += ROWS(w1[POS(j)]) * xs[k][j];                                      \
                    s[2][k] += ROWS(w2[POS(j)]) * xs[k][j];                                      \
                }                                                                                \
            for (int k = 0; k < 4; k++)                                                          \
                for (int i = 0; i < 3; i++) out[(t + k) * ldo + r + i] = s[i][k];                \
        }                                                                                        \
        for (int k = 0; k < 4; k++) NAME##_one(data, x + (t + k) * n, out + (t + k) * ldo, r, r1, n); \
    }                                                                                            \
    for (; t < ntok; t++) NAME##_one(data, x + t * n, out + t * ldo, r0, r1, n);                 \
}
#define PLAIN_ROW(r, n) ((r) * (n))
#define PLAIN_POS(j) (j)
#define rows_f32_tile_one rows_f32
#define rows_f16_tile_one rows_f16
#define rows_bf16_tile_one rows_bf16
#define rows_f32_r4_tile_one rows_f32_r4
#define rows_f16_r4_tile_one rows_f16_r4
#define rows_bf16_r4_tile_one rows_bf16_r4
FLOAT_TILE(rows_f32_tile, float, TLOAD_F32, AS_F32, PLAIN_ROW, PLAIN_POS)
FLOAT_TILE(rows_f16_tile, uint16_t, TLOAD_F16, pli_fp16, PLAIN_ROW, PLAIN_POS)
FLOAT_TILE(rows_bf16_tile, uint16_t, TLOAD_BF16, bf16_to_f32, PLAIN_ROW, PLAIN_POS)
/* the interleaved layouts: the same tile, each row's values found through r4_row and R4_POS */
FLOAT_TILE(rows_f32_r4_tile, float, TLOAD_F32, AS_F32, r4_row, R4_POS)
FLOAT_TILE(rows_f16_r4_tile, uint16_t, TLOAD_F16, pli_fp16, r4_row, R4_POS)
FLOAT_TILE(rows_bf16_r4_tile, uint16_t, TLOAD_BF16, bf16_to_f32, r4_row, R4_POS)
#endif

/* ------------------------------------------------------------------------------------------------
 * dispatch */

/* The float types' batched kernel, or NULL where the per-token one is used. */
typedef void (*tile_fn)(const void *, const float *, float *, long long, long long, long long, int,
                        long long, const char *, long long);
static tile_fn float_tile(int type)
{
#ifdef PL_AVX2
    switch (type) {
    case PL_F32: return rows_f32_tile;
    case PL_F16: return rows_f16_tile;
    case PL_BF16: return rows_bf16_tile;
    case PL_F32_R4: return rows_f32_r4_tile;
    case PL_F16_R4: return rows_f16_r4_tile;
    case PL_BF16_R4: return rows_bf16_r4_tile;
    }
#endif
    (void)type;
    return NULL;
}

static void matvec_rows(const pl_tensor *w, const void *xin, float *out, long long r0, long long r1)
{
    switch (w->type) {
    case PL_F32: rows_f32(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    case PL_F16: rows_f16(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    case PL_BF16: rows_bf16(w->data, (const float *)xin, out, r0, r1, w->cols); break;
#ifdef PL_AVX2
    case PL_F32_R4: rows_f32_r4(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    case PL_F16_R4: rows_f16_r4(w->data, (const float *)xin, out, r0, r1, w->cols); break;
    case PL_BF16_R4: rows_bf16_r4(w->data, (const float *)xin, out, r0, r1, w->cols); break;
#endif
    default: pli_matvec_rows(w, xin, out, r0, r1); break;
    }
}

static long long float_row_bytes(const pl_tensor *w);

/* Rows a thread's range must start and end on (repacked layouts interleave groups of 16 rows,
 * the wide float rows' groups of 4). */
static long long row_group(const pl_tensor *w)
{
    switch (w->type) {
    case PL_Q4_0_R16: case PL_Q5_0_R16: case PL_Q8_0_R16: case PL_Q4_K_R16: case PL_Q6_K_R16: return 16;
    case PL_F32_R4: case PL_F16_R4: case PL_BF16_R4: return 4;
    default: return 2;
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

/* ------------------------------------------------------------------------------------------------
 * matmuls inside pl_forward's parallel region */

/* Rows per chunk: a chunk of weight rows is read from memory once and then stays in cache while
 * every token of the batch is multiplied with it (weight reuse for prompt processing). */
static long long chunk_rows(const pl_tensor *w, int n)
{
    if (n == 1) return 1LL << 40; /* one token: no reuse, no chunking */
    long long ch = 32768 / (w->cols > 0 ? w->cols : 1);
    ch = ch < 2 ? 2 : ch > 64 ? 64 : ch;
    if (float_tile(w->type)) { /* whole 3-row tiles (and pairs): no rows left to one-token dots */
        const long long unit = row_group(w) == 4 ? 12 : 6; /* interleaved: whole groups too */
        return ch < unit ? unit : (ch + unit / 2) / unit * unit;
    }
    if (row_group(w) > 2) return 1LL << 40; /* repacked: r16 tiles keep a group in cache */
    if (pli_batch_all_rows(w->type)) return 1LL << 40; /* K-quant VNNI tiles: their own blocking */
    return ch & ~1LL;
}

/* Reads rows [r0, r1) of a float tensor once, front to back: one sequential stream pulls them into
 * cache at full read bandwidth, where the tile kernel's several interleaved row streams would
 * fetch them from memory at about half of it. Only a thread's first chunk: the tile prefetches
 * each next one while it works on the one before. */
static void warm_rows(const pl_tensor *w, long long r0, long long r1)
{
    size_t esize = float_row_bytes(w) / w->cols;
    const char *p = (const char *)w->data + (size_t)r0 * w->cols * esize;
    const char *end = (const char *)w->data + (size_t)r1 * w->cols * esize;
    unsigned int acc = 0;
    for (; p < end; p += 64) acc += *(const volatile unsigned char *)p;
    (void)acc;
}

#ifndef PL_TOKEN_CHUNK
#define PL_TOKEN_CHUNK 65536 /* weight bytes of a shared chunk of a one-token matmul */
#endif
#ifndef PL_TOKEN_RUN
#define PL_TOKEN_RUN 16      /* chunks a thread takes of its own part at once, at most */
#endif

/* Rows of one shared chunk of a one-token matmul: about PL_TOKEN_CHUNK bytes, whole row groups.
 * A thread takes its own chunks in runs of up to PL_TOKEN_RUN (pl__chunks): each taking is an
 * atomic exchange, a fence that lets the loads in flight drain, and a clock read. One chunk at a
 * time, 64 KiB, that cost 6-8% of the read rate where each core streams 30+ GB/s of its own (1B
 * F32, two threads: classifier 0.94 -> 0.99 of the probe, layers 0.92 -> 0.96; runs of 4: 0.98,
 * 0.95; of 32 or 64: as 16); where both cores share 36 GB/s it made no difference. */
static long long token_chunk_rows(const pl_tensor *w, long long group)
{
    long long row = float_row_bytes(w) ? float_row_bytes(w) : pli_row_bytes(w);
    long long ch = PL_TOKEN_CHUNK / (row > 0 ? row : 1);
    ch = (ch + group - 1) / group * group;
    return ch < group ? group : ch;
}

/* Rows a one-token chunk is made of: row pairs, or 4 groups of 16 in a repacked layout (its
 * one-token kernel reads 4 groups at a time, and one group alone at about half the rate). */
static long long token_group(const pl_tensor *w)
{
    return row_group(w) > 2 ? 4 * row_group(w) : 2;
}

/* One token: the rows of the group's weights in chunks shared by the team (pl__chunks), each
 * run's epilogue done by the thread that computed it, right after it. */
static void token_matvecs(const char *const *xin, const pl__mm *mm, int nmm, int same_rows,
                          const pl__epilogue *epi)
{
    long long ch[PL_MAX_GROUP], first[PL_MAX_GROUP + 1], group = 2;
    for (int i = 0; i < nmm; i++)
        group = token_group(mm[i].w) > group ? token_group(mm[i].w) : group;
    first[0] = 0;
    for (int i = 0; i < nmm; i++) { /* matmul i's chunks are first[i] .. first[i + 1] - 1 */
        ch[i] = token_chunk_rows(same_rows ? mm[0].w : mm[i].w, same_rows ? group : token_group(mm[i].w));
        first[i + 1] = same_rows ? (mm[0].w->rows + ch[i] - 1) / ch[i]
                                 : first[i] + (mm[i].w->rows + ch[i] - 1) / ch[i];
    }
    pl__chunks c;
    pl__chunks_begin(&c, first[same_rows ? 1 : nmm], PL_TOKEN_RUN);
    for (long long k, e; (k = pl__chunks_next(&c, &e)) >= 0;) {
        if (same_rows) {
            long long c0 = k * ch[0], c1 = e * ch[0] < mm[0].w->rows ? e * ch[0] : mm[0].w->rows;
            for (int i = 0; i < nmm; i++)
                matvec_rows(mm[i].w, xin[i], mm[i].out, c0, c1);
            if (epi) epi->fn(epi->ctx, -1, c0, c1);
            continue;
        }
        for (int i = 0; k < e; i++) { /* the run's part in each matmul it covers */
            if (k >= first[i + 1])
                continue;
            const long long stop = e < first[i + 1] ? e : first[i + 1];
            long long c0 = (k - first[i]) * ch[i], c1 = (stop - first[i]) * ch[i];
            c1 = c1 < mm[i].w->rows ? c1 : mm[i].w->rows;
            matvec_rows(mm[i].w, xin[i], mm[i].out, c0, c1);
            if (epi) epi->fn(epi->ctx, i, c0, c1);
            k = stop;
        }
    }
}

/* For each matmul mm[i] of a group sharing one input: out_i[t*rows_i + r] = W_i[r] . x[t*cols]
 * for the n tokens t of the batch. All threads of the team call it together.
 * x is quantized once per distinct weight type (a pl__team_sync publishes it), then each thread
 * computes its share of the rows:
 *   same_rows = 0: the rows of all the group's weights form one range;
 *   same_rows = 1: all weights have the same rows and a thread gets the same rows of each.
 * One token's rows go in chunks shared by the team as threads come free (token_matvecs); a
 * batch's are split evenly (in row pairs or groups), tiles streaming through each thread's part.
 * The epilogue (NULL: none) runs on every range of rows as soon as the thread that computed them
 * is done with them: epi->fn(ctx, i, r0, r1) for rows [r0, r1) of weight i, or i = -1 for those
 * rows of every weight (same_rows). No barrier at the end; the caller must have ended its
 * previous step with one (nobody may still read scratch). */
void pl__team_matmuls(const float *x, int n, const pl__mm *mm, int nmm, void *scratch,
                      int same_rows, const pl__epilogue *epi)
{
    const char *xin[PL_MAX_GROUP]; /* token t's input for weight i: xin[i] + t * stride[i] */
    long long stride[PL_MAX_GROUP], slot = 0, total = 0;
    const long long cols = mm[0].w->cols;
    int any_quant = 0;
    for (int i = 0; i < nmm; i++) {
        long long b = pl__act_bytes(mm[i].w);
        slot = b > slot ? b : slot;
        any_quant |= b > 0;
        total += mm[i].w->rows;
    }
    slot = (slot + 63) & ~63LL;
    for (int i = 0; i < nmm; i++) {
        xin[i] = (const char *)x;
        stride[i] = cols * (long long)sizeof(float);
        if (!pli_is_quant(mm[i].w->type)) continue;
        xin[i] = (const char *)scratch + (long long)i * n * slot;
        stride[i] = slot;
        for (int j = 0; j < i; j++)
            if (mm[j].w->type == mm[i].w->type) { xin[i] = xin[j]; break; }
    }
    if (any_quant) {
        if (n == 1) {
#pragma omp single nowait
            for (int i = 0; i < nmm; i++)
                if (pli_is_quant(mm[i].w->type) && xin[i] == (const char *)scratch + (long long)i * slot)
                    pli_quantize_act(mm[i].w, x, (char *)xin[i]);
        } else { /* a batch: the tokens' activations are quantized in parallel */
#pragma omp for schedule(static) nowait
            for (int t = 0; t < n; t++)
                for (int i = 0; i < nmm; i++)
                    if (pli_is_quant(mm[i].w->type) && xin[i] == (const char *)scratch + (long long)i * n * slot)
                        pli_quantize_act(mm[i].w, x + t * cols, (char *)xin[i] + t * slot);
        }
        pl__team_sync(); /* publishes the quantized activations */
    }
    if (n == 1) {
        token_matvecs(xin, mm, nmm, same_rows, epi);
        return;
    }
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    long long a, b, base = 0, group = 2, lo = 0, hi = 0;
    for (int i = 0; i < nmm && same_rows; i++) /* every weight's rows split at the same places */
        group = row_group(mm[i].w) > group ? row_group(mm[i].w) : group;
    split_rows(same_rows ? mm[0].w->rows : total, tid, nth, &a, &b);
    for (int i = 0; i < nmm; i++) {
        const pl_tensor *w = mm[i].w;
        const long long g = same_rows ? group : row_group(w);
        lo = a, hi = b;
        if (!same_rows) {
            lo = a - base < 0 ? 0 : a - base > w->rows ? w->rows : a - base;
            hi = b - base < 0 ? 0 : b - base > w->rows ? w->rows : b - base;
            base += w->rows;
        }
        if (g > 2) { /* the same rounding on both sides of a split: every row once */
            lo &= ~(g - 1);
            hi = hi == w->rows ? hi : hi & ~(g - 1);
        }
        long long ch = chunk_rows(w, n);
        tile_fn tile = n > 1 ? float_tile(w->type) : NULL;
        for (long long c0 = lo; c0 < hi; c0 += ch) {
            long long c1 = c0 + ch < hi ? c0 + ch : hi;
            if (tile) {
                long long e = float_row_bytes(w) / w->cols, c2 = c1 + ch < hi ? c1 + ch : hi;
                if (c0 == lo) warm_rows(w, c0, c1);
                tile(w->data, x, mm[i].out, c0, c1, w->cols, n, w->rows,
                     (const char *)w->data + c1 * w->cols * e, (c2 - c1) * w->cols * e);
                continue;
            }
            if (pli_is_quant(w->type) && n > 1)
                pli_matmul_batch(w, xin[i], stride[i], n, mm[i].out, w->rows, c0, c1);
            else
                for (int t = 0; t < n; t++)
                    matvec_rows(w, xin[i] + t * stride[i], mm[i].out + t * w->rows, c0, c1);
        }
        if (epi && !same_rows && lo < hi)
            epi->fn(epi->ctx, i, lo, hi);
    }
    if (epi && same_rows && lo < hi)
        epi->fn(epi->ctx, -1, lo, hi);
}

void pl_matmul(float *xout, const float *x, int n, const pl_tensor *w, void *scratch, int n_threads)
{
    pl__mm mm = {w, xout};
    if (n_threads > 1) { /* one thread: no parallel region (see pl_forward) */
        pl__barrier team;
        pl__team_init(&team);
#pragma omp parallel num_threads(n_threads)
        {
            pl__team_enter(&team);
            pl__team_matmuls(x, n, &mm, 1, scratch, 0, NULL);
            pl__team_enter(NULL);
        }
    } else {
        pl__team_enter(NULL);
        pl__team_matmuls(x, n, &mm, 1, scratch, 0, NULL);
    }
}

long long pl__act_bytes(const pl_tensor *w)
{
    return pli_is_quant(w->type) ? pli_act_bytes(w) : 0;
}

/* Bytes of a row of a float matrix, 0 for other types. */
static long long float_row_bytes(const pl_tensor *w)
{
    switch (w->type) {
    case PL_F32: case PL_F32_R4: return 4 * w->cols;
    case PL_F16: case PL_BF16: case PL_F16_R4: case PL_BF16_R4: return 2 * w->cols;
    default: return 0;
    }
}

/* Float matrices: a plain copy (the same layout) into memory Python allocates where the kernel
 * can back it with 2 MiB pages, which the page cache of a mapped file is not: a stream of reads
 * from 4 KiB pages runs at about 77% of the rate from 2 MiB pages on this machine (one thread,
 * the same bytes: 25.4 vs 33.7 GB/s), and generation reads every weight once per token. */
long long pl_repack_bytes(const pl_tensor *w)
{
    return float_row_bytes(w) ? w->rows * float_row_bytes(w) : pli_repack_bytes(w);
}

/* The interleaved type of a float matrix, where its rows are wide ("Wide float rows"), else 0. */
static int float_r4_type(const pl_tensor *w)
{
#ifdef PL_AVX2
    if (w->cols > PL_WIDE_COLS && w->cols % 16 == 0 && w->rows % 4 == 0)
        switch (w->type) {
        case PL_F32: return PL_F32_R4;
        case PL_F16: return PL_F16_R4;
        case PL_BF16: return PL_BF16_R4;
        }
#endif
    (void)w;
    return 0;
}

int pl_repack(const pl_tensor *w, void *dst, int n_threads)
{
    long long groups = w->rows / 16, row = float_row_bytes(w);
    int type = w->type;
    const int r4 = float_r4_type(w);
    if (r4) { /* each group of 4 rows: its rows' 16 values (one piece) at a time */
        const long long n = w->cols, piece = row / n * 16;
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1) schedule(static)
        for (long long g = 0; g < w->rows / 4; g++)
            for (long long k = 0; k < n / 16; k++)
                for (int q = 0; q < 4; q++)
                    memcpy((char *)dst + (g * 4 * (n / 16) + 4 * k + q) * piece,
                           (const char *)w->data + (4 * g + q) * row + k * piece, (size_t)piece);
        return r4;
    }
    if (row) { /* groups of 16 rows, then the rest */
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1) schedule(static)
        for (long long g = 0; g <= groups; g++) {
            long long r1 = g < groups ? 16 * g + 16 : w->rows;
            memcpy((char *)dst + 16 * g * row, (const char *)w->data + 16 * g * row, (size_t)((r1 - 16 * g) * row));
        }
        return type;
    }
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1) schedule(static)
    for (long long g = 0; g < groups; g++) {
        int t = pli_repack(w, dst, g, g + 1);
        if (g == 0) type = t;
    }
    return groups > 0 ? type : w->type;
}

long long pl_matmul_scratch_bytes(const pl_tensor *w, int n)
{
    return (long long)n * ((pl__act_bytes(w) + 63) & ~63LL);
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
        for (long long j = 0; j < n; j++) out[j] = pli_fp16(src[j]);
        break;
    }
    case PL_BF16: {
        const uint16_t *src = (const uint16_t *)w->data + row * n;
        for (long long j = 0; j < n; j++) out[j] = bf16_to_f32(src[j]);
        break;
    }
    case PL_F32_R4: case PL_F16_R4: case PL_BF16_R4: { /* the row's pieces of 16 values, 64 apart */
        const long long e = float_row_bytes(w) / n;
        pl_tensor piece = *w;
        piece.type = w->type == PL_F32_R4 ? PL_F32 : w->type == PL_F16_R4 ? PL_F16 : PL_BF16;
        piece.rows = 1;
        piece.cols = 16;
        for (long long k = 0; k < n / 16; k++) {
            piece.data = (const char *)w->data + (r4_row(row, n) + 64 * k) * e;
            pl_dequantize_row(&piece, 0, out + 16 * k);
        }
        break;
    }
    default:
        pli_dequantize_row(w, row, out);
        break;
    }
}

double pl_sum_f32(const float *x, long long n, int n_threads)
{
    /* each thread streams one contiguous part with four vector accumulators: the access pattern
     * of a matvec (one sequential stream per thread), without the multiplies */
    double total = 0.0;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1) reduction(+ : total)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        long long per = n / nth / 32 * 32;
        long long i = tid * per, end = tid == nth - 1 ? n : i + per;
#ifdef PL_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 32 <= end; i += 32) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
        }
        total += pli_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
        for (; i < end; i++) total += x[i];
    }
    return total;
}
