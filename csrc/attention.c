/* Causal attention of one head: a token at a time (llama2.c's order, every model), and a block of
 * up to PL_ATT_BLOCK consecutive queries at a time as two small matrix products (prompts of float
 * models: results within f32 rounding of the token-at-a-time order, not bit for bit); and the
 * SwiGLU gate with the same exp.
 */
#include <math.h>
#include "internal.h"

/* ------------------------------------------------------------------------------------------------
 * exp on 8 lanes: a polynomial within 2 ulp of expf, inputs below -87 taken as -87 */

/* The polynomial's constants, one list for exp8, exp16 and exp1 (which must agree bit for bit) */
#define EXP_MIN (-87.0f)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2HI 0.693359375f
#define EXP_LN2LO (-2.12194440e-4f)
#define EXP_C1 1.9875691500e-4f
#define EXP_C2 1.3981999507e-3f
#define EXP_C3 8.3334519073e-3f
#define EXP_C4 4.1665795894e-2f
#define EXP_C5 1.6666665459e-1f
#define EXP_C6 5.0000001201e-1f

#ifdef PL_AVX2
static inline __m256 exp8(__m256 v)
{
    const __m256 log2e = _mm256_set1_ps(EXP_LOG2E);
    const __m256 ln2hi = _mm256_set1_ps(EXP_LN2HI), ln2lo = _mm256_set1_ps(EXP_LN2LO);
    const __m256 c1 = _mm256_set1_ps(EXP_C1), c2 = _mm256_set1_ps(EXP_C2);
    const __m256 c3 = _mm256_set1_ps(EXP_C3), c4 = _mm256_set1_ps(EXP_C4);
    const __m256 c5 = _mm256_set1_ps(EXP_C5), c6 = _mm256_set1_ps(EXP_C6);
    const __m256 one = _mm256_set1_ps(1.0f);
    v = _mm256_max_ps(v, _mm256_set1_ps(EXP_MIN));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2hi, v);
    r = _mm256_fnmadd_ps(k, ln2lo, r);
    __m256 p = _mm256_fmadd_ps(c1, r, c2);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c5);
    p = _mm256_fmadd_ps(p, r, c6);
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#ifdef __AVX512F__
/* exp8 on 16 lanes: the same steps, so each lane gets exp8's bits */
static inline __m512 exp16(__m512 v)
{
    v = _mm512_max_ps(v, _mm512_set1_ps(EXP_MIN));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(EXP_LN2HI), v);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(EXP_LN2LO), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP_C1), r, _mm512_set1_ps(EXP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C6));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

static inline float hmax8(__m256 m8)
{
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

/* exp8 on one lane, the same operations in the same order (every one rounded once, as the vector
 * instructions round each lane), so a value gets the same bits whichever of the two computes it. */
static inline float exp1(float v)
{
    v = v > EXP_MIN ? v : EXP_MIN;
    const float k = rintf(v * EXP_LOG2E);
    float r = fmaf(-k, EXP_LN2HI, v);
    r = fmaf(-k, EXP_LN2LO, r);
    float p = fmaf(EXP_C1, r, EXP_C2);
    p = fmaf(p, r, EXP_C3);
    p = fmaf(p, r, EXP_C4);
    p = fmaf(p, r, EXP_C5);
    p = fmaf(p, r, EXP_C6);
    p = fmaf(p, r * r, r + 1.0f);
    union { unsigned u; float f; } e = {(unsigned)((int)k + 127) << 23};
    return p * e.f;
}
#endif

/* The SwiGLU gate, a[i] = silu(a[i])·b[i] for i < n: with exp8/exp1 where the build has AVX2
 * (both paths, the same bits for every i, however a run of rows is split), else with expf. */
void pl__swiglu(float *a, const float *b, long long n)
{
    long long i = 0;
#ifdef PL_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(a + i);
        __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), v), _mm256_set1_ps(88.0f)));
        __m256 silu = _mm256_mul_ps(v, _mm256_div_ps(one, _mm256_add_ps(one, e)));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(silu, _mm256_loadu_ps(b + i)));
    }
    for (; i < n; i++) {
        const float v = a[i], nv = 0.0f - v;
        const float e = exp1(nv < 88.0f ? nv : 88.0f);
        a[i] = v * (1.0f / (1.0f + e)) * b[i];
    }
#else
    for (; i < n; i++) a[i] = a[i] * (1.0f / (1.0f + expf(-a[i]))) * b[i];
#endif
}

/* ------------------------------------------------------------------------------------------------
 * a token at a time */

/* Attention softmax in place: exp(x - max) / sum. The AVX2 path uses exp8; the sampler keeps
 * llama2.c's exact softmax (pli_softmax). */
static void softmax_att(float *x, int n)
{
#ifdef PL_AVX2
    if (n >= 8) {
        __m256 m8 = _mm256_loadu_ps(x);
        int i = 8;
        for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
        float max_val = hmax8(m8);
        for (; i < n; i++) max_val = x[i] > max_val ? x[i] : max_val;
        const __m256 mx = _mm256_set1_ps(max_val);
        __m256 vsum = _mm256_setzero_ps();
        for (i = 0; i + 8 <= n; i += 8) {
            __m256 y = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mx));
            _mm256_storeu_ps(x + i, y);
            vsum = _mm256_add_ps(vsum, y);
        }
        float sum = pli_hsum8(vsum);
        for (; i < n; i++) {
            x[i] = expf(x[i] - max_val);
            sum += x[i];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
        for (; i < n; i++) x[i] /= sum;
        return;
    }
#endif
    pli_softmax(x, n);
}

/* xb[j..j+W·NV) += Σ_i att[i]·v_i[j..] over positions i0 <= i < i1 (from 0 when !acc), NV vectors
 * of W floats in registers (W = 8: AVX2, 16: AVX-512). Each output value takes the same rounded
 * product and rounded add per position whatever the width, so both give the same bits. */
#ifdef PL_AVX2
#define ATT_VALUES_RUN(NAME, V, W, LOAD, SET1, ZERO, ADD, MUL, STORE)                               \
static inline __attribute__((always_inline)) void                                                   \
NAME(float *xb, const float *att, const float *vh, int i0, int i1, int stride, int NV, int acc_in)  \
{                                                                                                   \
    V acc[8];                                                                                       \
    for (int k = 0; k < NV; k++) acc[k] = acc_in ? LOAD(xb + W * k) : ZERO();                       \
    for (int i = i0; i < i1; i++) {                                                                 \
        const float *v = vh + (long long)i * stride;                                                \
        V a = SET1(att[i]);                                                                         \
        for (int k = 0; k < NV; k++) acc[k] = ADD(acc[k], MUL(a, LOAD(v + W * k)));                 \
    }                                                                                               \
    for (int k = 0; k < NV; k++) STORE(xb + W * k, acc[k]);                                         \
}
ATT_VALUES_RUN(att_values_run, __m256, 8, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_add_ps,
               _mm256_mul_ps, _mm256_storeu_ps)
#ifdef __AVX512F__
ATT_VALUES_RUN(att_values_run16, __m512, 16, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_add_ps,
               _mm512_mul_ps, _mm512_storeu_ps)
#define AV_RUN att_values_run16
#define AV_W 16
#else
#define AV_RUN att_values_run
#define AV_W 8
#endif
#endif

/* xb[j] (+)= Σ_i att[i]·v_i[j] over positions i0 <= i < i1 (v_i = vh + i·stride; acc_in: on top of
 * what xb holds, else from 0), summed in position order with a rounded product and a rounded add
 * per term, as llama2.c does; so consecutive ranges give the sum over their union, bit for bit.
 * A head's values go in one run of up to 8 vectors held in registers across the positions (8
 * independent add chains): a head of 48 (stories15M) was a run of 4 vectors of 8 and two of one,
 * whose single chain of adds set the pace: 512-token prompts of stories15M Q4_0 spent 19% of
 * their time here, now 14%, and ran at 15.7-16.7k tok/s against 17.0-18.0k now (Zen 5, 2 threads,
 * the two builds in turn). */
static void att_values(float *xb, const float *att, const float *vh, int i0, int i1, int stride,
                       int head_size, int acc_in)
{
    int j = 0;
#ifdef PL_AVX2
    for (; j + 8 * AV_W <= head_size; j += 8 * AV_W) AV_RUN(xb + j, att, vh + j, i0, i1, stride, 8, acc_in);
    switch ((head_size - j) / AV_W) { /* the rest of the head's whole vectors in one run */
    case 7: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 7, acc_in); j += 7 * AV_W; break;
    case 6: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 6, acc_in); j += 6 * AV_W; break;
    case 5: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 5, acc_in); j += 5 * AV_W; break;
    case 4: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 4, acc_in); j += 4 * AV_W; break;
    case 3: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 3, acc_in); j += 3 * AV_W; break;
    case 2: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 2, acc_in); j += 2 * AV_W; break;
    case 1: AV_RUN(xb + j, att, vh + j, i0, i1, stride, 1, acc_in); j += AV_W; break;
    default: break;
    }
#if AV_W == 16
    if (j + 8 <= head_size) { att_values_run(xb + j, att, vh + j, i0, i1, stride, 1, acc_in); j += 8; }
#endif
#endif
    for (; j < head_size; j++) {
        float sum = acc_in ? xb[j] : 0.0f;
        for (int i = i0; i < i1; i++) sum += att[i] * vh[(long long)i * stride + j];
        xb[j] = sum;
    }
}

static inline float dot(const float *a, const float *b, int n)
{
    int i = 0;
    float s = 0.0f;
#ifdef PL_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = pli_hsum8(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* att[i] = scale·(q · k_i) for positions i0 <= i < i1 (k_i = kh + i·stride): each score exactly as
 * dot() computes it, P positions at a time so that their FMA chains overlap (a head of 64 values
 * is 8 steps of one chain: 8 chains keep both FMA units busy, 4 left half of them idle). */
#ifdef PL_AVX2
static inline __attribute__((always_inline)) void
scores_run(float *att, const float *q, const float *k0, int stride, int head_size, float scale, int P)
{
    __m256 a[8];
    for (int r = 0; r < P; r++) a[r] = _mm256_setzero_ps();
    for (int j = 0; j < head_size; j += 8) {
        __m256 qv = _mm256_loadu_ps(q + j);
        for (int r = 0; r < P; r++)
            a[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + (long long)r * stride + j), a[r]);
    }
    if (P < 8) {
        for (int r = 0; r < P; r++) att[r] = pli_hsum8(a[r]) * scale;
        return;
    }
    /* the 8 sums at once, each in pli_hsum8's order: (lane j) + (lane j + 4), then (0 + 2) and
     * (1 + 3) of those, then the two */
    __m256 c[4], d[2];
    for (int r = 0; r < 4; r++)
        c[r] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * r], a[2 * r + 1], 0x20),
                             _mm256_permute2f128_ps(a[2 * r], a[2 * r + 1], 0x31));
    for (int r = 0; r < 2; r++)
        d[r] = _mm256_add_ps(_mm256_shuffle_ps(c[2 * r], c[2 * r + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(c[2 * r], c[2 * r + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lanes: sums 0, 2, 4, 6 | 1, 3, 5, 7 */
    __m256 e = _mm256_add_ps(_mm256_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
    e = _mm256_permutevar8x32_ps(e, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_ps(att, _mm256_mul_ps(e, _mm256_set1_ps(scale)));
}
#endif

static inline __attribute__((always_inline)) void
att_scores_hs(float *att, const float *q, const float *kh, int i0, int i1, int stride, int head_size,
              float scale)
{
    int i = i0;
#ifdef PL_AVX2
    if (head_size % 8 == 0) {
        for (; i + 8 <= i1; i += 8) scores_run(att + i, q, kh + (long long)i * stride, stride, head_size, scale, 8);
        for (; i + 4 <= i1; i += 4) scores_run(att + i, q, kh + (long long)i * stride, stride, head_size, scale, 4);
    }
#endif
    for (; i < i1; i++) att[i] = dot(q, kh + (long long)i * stride, head_size) * scale;
}

/* The common head sizes as constants (the keys' offsets become displacements of one address) */
static void att_scores(float *att, const float *q, const float *kh, int i0, int i1, int stride,
                       int head_size, float scale)
{
    if (stride == head_size)
        switch (head_size) {
        case 48: att_scores_hs(att, q, kh, i0, i1, 48, 48, scale); return;
        case 64: att_scores_hs(att, q, kh, i0, i1, 64, 64, scale); return;
        case 128: att_scores_hs(att, q, kh, i0, i1, 128, 128, scale); return;
        default: break;
        }
    att_scores_hs(att, q, kh, i0, i1, stride, head_size, scale);
}

/* Positions per block of the token-at-a-time attention: a block's keys (or values) of one kv
 * head, 64 rows of up to 64 floats, stay in L1 while each query of the run uses them. The blocks
 * start at the same positions whatever the run, and a query's sums run in position order across
 * them (att_values carries them over in its output), so its bits do not depend on the run. */
#define ATT_POS_BLOCK 64

void pl__attend_heads(float *out, const float *q, long long tok_stride, int nt, int nq, const float *kh,
                      const float *vh, int last, int head_size, float scale, float *att,
                      long long att_stride, long long att_tok_stride)
{
    const int stride = head_size; /* a kv head's positions lie together */
    for (int i0 = 0; i0 <= last + nt - 1; i0 += ATT_POS_BLOCK)
        for (int t = i0 > last ? i0 - last : 0; t < nt; t++) { /* the tokens that see position i0 */
            const int i1 = i0 + ATT_POS_BLOCK < last + t + 1 ? i0 + ATT_POS_BLOCK : last + t + 1;
            for (int h = 0; h < nq; h++)
                att_scores(att + t * att_tok_stride + h * att_stride, q + t * tok_stride + (long long)h * head_size,
                           kh, i0, i1, stride, head_size, scale);
        }
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < nq; h++) softmax_att(att + t * att_tok_stride + h * att_stride, last + t + 1);
    for (int i0 = 0; i0 <= last + nt - 1; i0 += ATT_POS_BLOCK)
        for (int t = i0 > last ? i0 - last : 0; t < nt; t++) {
            const int i1 = i0 + ATT_POS_BLOCK < last + t + 1 ? i0 + ATT_POS_BLOCK : last + t + 1;
            for (int h = 0; h < nq; h++)
                att_values(out + t * tok_stride + (long long)h * head_size, att + t * att_tok_stride + h * att_stride,
                           vh, i0, i1, stride, head_size, i0 > 0);
        }
}

/* ------------------------------------------------------------------------------------------------
 * a block of queries: S = scale·Q·Kᵀ, P = softmax(S) under the causal mask, O = P·V, with the 16
 * query lanes of a block in one 512-bit vector (AVX-512) or two 256-bit ones (S and P are kept
 * transposed: one row of 16 per key). 16 lanes in one register took 110M F16 pp512's attention
 * from 0.13 to 0.09 of its matmuls' time, stories15M F32 pp512 18.6-19.0k -> 21.9-22.2k tok/s
 * (Zen 5, 2 threads, the two builds in turn). */

int pl__attend_block_ok(int head_size)
{
#ifdef PL_AVX2
    return head_size <= PL_ATT_MAX_HEAD;
#else
    (void)head_size;
    return 0;
#endif
}

#ifdef PL_AVX2
/* st[r·16 + i] = scale·Σ_d k_{j+r}[d]·qt[d·16 + i] for R keys j.. (k = kh + j·stride). */
static inline __attribute__((always_inline)) void
scores_tile(float *st, const float *k, int stride, const float *qt, int head_size, __m256 scale, int R)
{
    __m256 lo[6], hi[6];
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int d = 0; d < head_size; d++) {
        __m256 q0 = _mm256_loadu_ps(qt + d * PL_ATT_BLOCK), q1 = _mm256_loadu_ps(qt + d * PL_ATT_BLOCK + 8);
        for (int r = 0; r < R; r++) {
            __m256 kv = _mm256_broadcast_ss(k + (long long)r * stride + d);
            lo[r] = _mm256_fmadd_ps(kv, q0, lo[r]);
            hi[r] = _mm256_fmadd_ps(kv, q1, hi[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(st + r * PL_ATT_BLOCK, _mm256_mul_ps(lo[r], scale));
        _mm256_storeu_ps(st + r * PL_ATT_BLOCK + 8, _mm256_mul_ps(hi[r], scale));
    }
}

/* ot[r·16 + i] = Σ_j v_j[d + r]·st[j·16 + i] over keys j < nk, R values d.. . */
static inline __attribute__((always_inline)) void
values_tile(float *ot, const float *v, int stride, const float *st, int nk, int R)
{
    __m256 lo[6], hi[6];
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int j = 0; j < nk; j++) {
        __m256 p0 = _mm256_loadu_ps(st + j * PL_ATT_BLOCK), p1 = _mm256_loadu_ps(st + j * PL_ATT_BLOCK + 8);
        const float *vj = v + (long long)j * stride;
        for (int r = 0; r < R; r++) {
            __m256 vv = _mm256_broadcast_ss(vj + r);
            lo[r] = _mm256_fmadd_ps(vv, p0, lo[r]);
            hi[r] = _mm256_fmadd_ps(vv, p1, hi[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(ot + r * PL_ATT_BLOCK, lo[r]);
        _mm256_storeu_ps(ot + r * PL_ATT_BLOCK + 8, hi[r]);
    }
}

/* Lanes of key j that are masked (query i sees keys <= p0 + i): all-ones where i < j - p0. */
static inline void key_mask(int j, int p0, __m256 *m0, __m256 *m1)
{
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_ps(8.0f);
    const __m256 lim = _mm256_set1_ps((float)(j - p0));
    *m0 = _mm256_cmp_ps(lane, lim, _CMP_LT_OQ);
    *m1 = _mm256_cmp_ps(_mm256_add_ps(lane, eight), lim, _CMP_LT_OQ);
}
#endif

#ifdef PL_AVX2
/* out_i[d + r] = O[i][d + r] / sum_i for the R values of ot (row r: the 16 query lanes) */
static inline void block_out(float *out, long long out_stride, int nq, int d, int R, const float *ot,
                             const float *inv)
{
    for (int r = 0; r < R; r++)
        for (int i = 0; i < nq; i++) out[i * out_stride + d + r] = ot[r * PL_ATT_BLOCK + i] * inv[i];
}
#endif

#ifdef __AVX512F__
/* The same tiles with the 16 query lanes of a block in one 512-bit register: half the
 * instructions of two 256-bit ones, and up to 12 keys (or values) a tile. */
static inline __attribute__((always_inline)) void
scores_tile16(float *st, const float *k, int stride, const float *qt, int head_size, __m512 scale, int R)
{
    __m512 acc[12];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int d = 0; d < head_size; d++) {
        __m512 qv = _mm512_loadu_ps(qt + d * PL_ATT_BLOCK);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(k[(long long)r * stride + d]), qv, acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(st + r * PL_ATT_BLOCK, _mm512_mul_ps(acc[r], scale));
}

static inline __attribute__((always_inline)) void
values_tile16(float *ot, const float *v, int stride, const float *st, int nk, int R)
{
    __m512 acc[12];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int j = 0; j < nk; j++) {
        __m512 pv = _mm512_loadu_ps(st + j * PL_ATT_BLOCK);
        const float *vj = v + (long long)j * stride;
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(vj[r]), pv, acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(ot + r * PL_ATT_BLOCK, acc[r]);
}

static void attend_block16(float *out, long long out_stride, int nq, int p0, const float *kh,
                           const float *vh, int head_size, float scale, float *st, const float *qt)
{
    enum { B = PL_ATT_BLOCK };
    const int stride = head_size, nk = p0 + nq;
    float ot[12 * B];
    const __m512 vscale = _mm512_set1_ps(scale);
    int j = 0;
    for (; j + 12 <= nk; j += 12) scores_tile16(st + j * B, kh + (long long)j * stride, stride, qt, head_size, vscale, 12);
    for (; j + 4 <= nk; j += 4) scores_tile16(st + j * B, kh + (long long)j * stride, stride, qt, head_size, vscale, 4);
    for (; j < nk; j++) scores_tile16(st + j * B, kh + (long long)j * stride, stride, qt, head_size, vscale, 1);
    /* softmax down each lane over its keys: query i sees key j where i >= j - p0 */
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf, sum = _mm512_setzero_ps();
    for (j = 0; j < nk; j++) {
        const __mmask16 seen = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(j - p0));
        mx = _mm512_max_ps(mx, _mm512_mask_mov_ps(ninf, seen, _mm512_loadu_ps(st + j * B)));
    }
    for (j = 0; j < nk; j++) {
        const __mmask16 seen = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(j - p0));
        __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j * B), mx)));
        sum = _mm512_add_ps(sum, e);
        _mm512_storeu_ps(st + j * B, e);
    }
    float inv[B];
    _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
    for (int d = 0; d < head_size;) {
        int R = head_size - d >= 12 ? 12 : head_size - d >= 4 ? 4 : 1;
        switch (R) { /* constant R: the accumulators stay in registers */
        case 12: values_tile16(ot, vh + d, stride, st, nk, 12); break;
        case 4: values_tile16(ot, vh + d, stride, st, nk, 4); break;
        default: values_tile16(ot, vh + d, stride, st, nk, 1); break;
        }
        block_out(out, out_stride, nq, d, R, ot, inv);
        d += R;
    }
}
#endif

#if defined(PL_AVX2) && !defined(__AVX512F__)
/* S = scale·Q·Kᵀ, P = softmax(S), O = P·V for nq <= 16 queries at positions p0.. (qt: their
 * values transposed, 16 lanes a row), each 16 lanes in two 256-bit registers. */
static void attend_block8(float *out, long long out_stride, int nq, int p0, const float *kh,
                          const float *vh, int head_size, float scale, float *st, const float *qt)
{
    enum { B = PL_ATT_BLOCK };
    const int stride = head_size; /* a kv head's positions lie together */
    const int nk = p0 + nq; /* keys 0 .. p0 + nq - 1 */
    float ot[6 * B];
    const __m256 vscale = _mm256_set1_ps(scale);
    int j = 0;
    for (; j + 6 <= nk; j += 6) scores_tile(st + j * B, kh + (long long)j * stride, stride, qt, head_size, vscale, 6);
    for (; j + 2 <= nk; j += 2) scores_tile(st + j * B, kh + (long long)j * stride, stride, qt, head_size, vscale, 2);
    for (; j < nk; j++) scores_tile(st + j * B, kh + (long long)j * stride, stride, qt, head_size, vscale, 1);
    /* softmax down each lane over its keys; masked entries become 0 */
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx0 = ninf, mx1 = ninf;
    for (j = 0; j < nk; j++) {
        __m256 s0 = _mm256_loadu_ps(st + j * B), s1 = _mm256_loadu_ps(st + j * B + 8);
        if (j > p0) {
            __m256 m0, m1;
            key_mask(j, p0, &m0, &m1);
            s0 = _mm256_blendv_ps(s0, ninf, m0);
            s1 = _mm256_blendv_ps(s1, ninf, m1);
        }
        mx0 = _mm256_max_ps(mx0, s0);
        mx1 = _mm256_max_ps(mx1, s1);
    }
    __m256 sum0 = _mm256_setzero_ps(), sum1 = sum0;
    for (j = 0; j < nk; j++) {
        __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j * B), mx0));
        __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j * B + 8), mx1));
        if (j > p0) {
            __m256 m0, m1;
            key_mask(j, p0, &m0, &m1);
            e0 = _mm256_andnot_ps(m0, e0);
            e1 = _mm256_andnot_ps(m1, e1);
        }
        sum0 = _mm256_add_ps(sum0, e0);
        sum1 = _mm256_add_ps(sum1, e1);
        _mm256_storeu_ps(st + j * B, e0);
        _mm256_storeu_ps(st + j * B + 8, e1);
    }
    float inv[B];
    _mm256_storeu_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.0f), sum0));
    _mm256_storeu_ps(inv + 8, _mm256_div_ps(_mm256_set1_ps(1.0f), sum1));
    /* O = P·V, 6 values of the head at a time, then out_i[d] = O[i][d] / sum_i */
    for (int d = 0; d < head_size;) {
        int R = head_size - d >= 6 ? 6 : head_size - d >= 4 ? 4 : head_size - d >= 2 ? 2 : 1;
        switch (R) { /* constant R: the accumulators stay in registers */
        case 6: values_tile(ot, vh + d, stride, st, nk, 6); break;
        case 4: values_tile(ot, vh + d, stride, st, nk, 4); break;
        case 2: values_tile(ot, vh + d, stride, st, nk, 2); break;
        default: values_tile(ot, vh + d, stride, st, nk, 1); break;
        }
        block_out(out, out_stride, nq, d, R, ot, inv);
        d += R;
    }
}
#endif

void pl__attend_block(float *out, long long out_stride, const float *q, long long q_stride, int nq,
                      int p0, const float *kh, const float *vh, int head_size, float scale,
                      float *st)
{
#ifdef PL_AVX2
    enum { B = PL_ATT_BLOCK };
    float qt[PL_ATT_MAX_HEAD * B];
    /* qt[d·16 + i] = q_i[d]; lanes past nq repeat the last query (any finite value would do) */
    for (int i = 0; i < B; i++) {
        const float *qi = q + (i < nq ? i : nq - 1) * q_stride;
        for (int d = 0; d < head_size; d++) qt[d * B + i] = qi[d];
    }
#ifdef __AVX512F__
    attend_block16(out, out_stride, nq, p0, kh, vh, head_size, scale, st, qt);
#else
    attend_block8(out, out_stride, nq, p0, kh, vh, head_size, scale, st, qt);
#endif
#else
    (void)out, (void)out_stride, (void)q, (void)q_stride, (void)nq, (void)p0, (void)kh, (void)vh;
    (void)head_size, (void)scale, (void)st;
#endif
}
