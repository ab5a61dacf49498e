/* Block-quantized weight types: ggml's Q4_0 … Q6_K and llama2.c V2's PL_Q8_G.
 *
 * For each type: dequantize a row; quantize the activation x to 8 bits once per matmul
 * (pli_quantize_act, before the row loop); dot every weight row with it in integers, one f32
 * multiply-add per block (pli_matvec_rows, called by each OpenMP thread for its rows).
 *
 * Activation formats (our own, in the scratch buffer; all blocks of one x laid out as planes):
 *   q8 blocks of 32   for Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (llama.cpp's q8_0 / q8_1):
 *                     int8 q[cols] | f32 (d, s)[cols/32],  x ≈ d·q, s = d·Σq
 *   q8 blocks of 256  for the K-quants (llama.cpp's q8_K):
 *                     int8 q[cols] | f32 d[cols/256] | int16 bsums[cols/16] (Σq per 16 values)
 *                     | int16 bs32[cols/32] (Σq per 32 values)
 *   q8 groups         for PL_Q8_G (llama2.c's runq.c, mirrored exactly):
 *                     int8 q[cols] | f32 d[cols/group_size]
 * 32- and 256-blocks round x·(127/amax) to nearest-even (identical in the scalar and AVX2 code);
 * Q8_G rounds x/scale half away from zero like runq.c's round().
 *
 * Every weight block is read through the byte layout documented beside its struct (ggml's,
 * little-endian, fp16 scales). Scalar code is the reference and the portable build; when the
 * compiler targets AVX2+FMA (PL_AVX2; x86-64-v3, e.g. -march=native on Haswell/Zen and later) every
 * type's dot product and the activation quantizers have an AVX2 path instead (AVX-512 VNNI's
 * vpdpbusd for the byte dot where the compiler targets it: the same integer sums). Dequantization
 * is scalar only (one row per call: embeddings, tests) and bit-identical to gguf-py's numpy code.
 * The AVX2 products cannot saturate int16: the weight operand of maddubs is unsigned (≤ 128:
 * offsets are subtracted afterwards through Σq8) and the activations stay in [-127, 127].
 *
 * Prompts (pli_matmul_batch): every type's AVX2 kernel also runs as a tile of rows x 4 tokens
 * that unpacks each weight block once for the 4 tokens and keeps each token's arithmetic exactly
 * that of the single-token kernel (the K-quants and Q8_G: the same function with NT = 4; the
 * other 32-value types: the same step with the same even/odd accumulators; Q5_0: one f32 fma
 * per block in block order, as its repacked kernels, see "Q5_0"), so batched and
 * token-by-token results are bit-identical. With AVX-512 VNNI, Q4_K/Q6_K have
 * wider tiles (kq_batch: 16 rows in the lanes of a register), bit-identical as well.
 *
 * With AVX-512 VNNI, Q4_0, Q5_0, Q8_0, Q4_K and Q6_K matrices are repacked at load time
 * (pl_repack, 16 rows interleaved, see "Repacked" below), and with AVX2 and F16C alone Q4_0, Q5_0
 * and Q8_0: one kernel family then serves one token and batches alike; the repacked K-quant
 * layouts give exactly the file layout's results, the others the same bits with or without VNNI.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>
#include "kernels.h" /* PL_AVX2, immintrin.h */

#define QK 32     /* values per block of the 32-value types */
#define QK_K 256  /* values per super-block of the K-quants */

/* ------------------------------------------------------------------------------------------------
 * block layouts (ggml). Blocks are read in place from the mmap: every field is 1 or 2 bytes, so
 * the 2-byte alignment GGUF guarantees (32) is enough. */

typedef struct { /* 18 bytes: x[j] = d·((qs[j] & 15) − 8), x[j+16] = d·((qs[j] >> 4) − 8) */
    uint16_t d;
    uint8_t qs[QK / 2];
} blk_q4_0;

typedef struct { /* 20 bytes: as Q4_0 without the −8, plus the block minimum: x = d·q + m */
    uint16_t d, m;
    uint8_t qs[QK / 2];
} blk_q4_1;

typedef struct { /* 22 bytes: 5th bit of value j is bit j of qh (u32 LE); x = d·(q − 16) */
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} blk_q5_0;

typedef struct { /* 24 bytes: Q5_0's bits, x = d·q + m */
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} blk_q5_1;

typedef struct { /* 34 bytes: x = d·qs[j] */
    uint16_t d;
    int8_t qs[QK];
} blk_q8_0;

/* Q2_K, 84 bytes, 16 sub-blocks of 16. Value i = 128h + 32j + l (h < 2, j < 4, l < 32):
 * q = (qs[32h + l] >> 2j) & 3, sub-block k = i/16, x = d·(scales[k] & 15)·q − dmin·(scales[k] >> 4) */
typedef struct {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    uint16_t d, dmin;
} blk_q2_K;

/* Q3_K, 110 bytes, 16 sub-blocks of 16. Value i = 128h + 32j + l: low bits (qs[32h + l] >> 2j) & 3,
 * q = low − 4 when bit (4h + j) of hmask[l] is CLEAR, else low. 6-bit scales (see k3_scales),
 * stored +32: x = d·(sc[i/16] − 32)·q */
typedef struct {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
} blk_q3_K;

/* Q4_K, 144 bytes, 8 sub-blocks of 32. Sub-block s: q = nibble (s & 1) of qs[32(s/2) + l];
 * 6-bit scale and min (see k4_scales): x = d·sc[s]·q − dmin·m[s] */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
} blk_q4_K;

/* Q5_K, 176 bytes: Q4_K plus a 5th bit, bit s of qh[l] for value l of sub-block s */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} blk_q5_K;

/* Q6_K, 210 bytes, 16 sub-blocks of 16. Value i = 128h + 32j + l: low 4 bits = nibble (j >= 2) of
 * ql[64h + 32(j & 1) + l], high 2 bits = (qh[32h + l] >> 2j) & 3, x = d·scales[i/16]·(q − 32) */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} blk_q6_K;

_Static_assert(sizeof(blk_q4_0) == 18 && sizeof(blk_q4_1) == 20 && sizeof(blk_q5_0) == 22 &&
               sizeof(blk_q5_1) == 24 && sizeof(blk_q8_0) == 34, "32-value block sizes");
_Static_assert(sizeof(blk_q2_K) == 84 && sizeof(blk_q3_K) == 110 && sizeof(blk_q4_K) == 144 &&
               sizeof(blk_q5_K) == 176 && sizeof(blk_q6_K) == 210, "K block sizes");

/* Q4_K/Q5_K: 12 bytes → 8 scales then 8 mins (6 bits each). Bytes 0-3 hold scales 0-3 in their
 * low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the low 4 bits of scale 4+j (low nibble) and
 * min 4+j (high nibble), whose top 2 bits are the top 2 bits of bytes j and 4+j. */
static inline void k4_scales(const uint8_t *q, uint8_t out[16])
{
    uint32_t a[3], u[4];
    memcpy(a, q, 12);
    u[0] = a[0] & 0x3f3f3f3f;                                          /* sc 0-3 */
    u[1] = (a[2] & 0x0f0f0f0f) | ((a[0] >> 6) & 0x03030303) << 4;      /* sc 4-7 */
    u[2] = a[1] & 0x3f3f3f3f;                                          /* m 0-3 */
    u[3] = ((a[2] >> 4) & 0x0f0f0f0f) | ((a[1] >> 6) & 0x03030303) << 4; /* m 4-7 */
    memcpy(out, u, 16);
}

/* Q3_K: 12 bytes → 16 signed scales. Scale k: low 4 bits = nibble (k >= 8) of byte k % 8,
 * high 2 bits = bits 2(k/4)..+1 of byte 8 + k % 4; stored with +32. */
static inline void k3_scales(const uint8_t *q, int8_t out[16])
{
    uint32_t a[3], u[4];
    memcpy(a, q, 12);
    u[0] = (a[0] & 0x0f0f0f0f) | ((a[2] >> 0) & 0x03030303) << 4;
    u[1] = (a[1] & 0x0f0f0f0f) | ((a[2] >> 2) & 0x03030303) << 4;
    u[2] = ((a[0] >> 4) & 0x0f0f0f0f) | ((a[2] >> 4) & 0x03030303) << 4;
    u[3] = ((a[1] >> 4) & 0x0f0f0f0f) | ((a[2] >> 6) & 0x03030303) << 4;
    uint8_t b[16];
    memcpy(b, u, 16);
    for (int k = 0; k < 16; k++) out[k] = (int8_t)(b[k] - 32);
}

/* ------------------------------------------------------------------------------------------------
 * type table (as switches) */

int pli_is_quant(int type)
{
    switch (type) {
    case PL_Q4_0: case PL_Q4_1: case PL_Q5_0: case PL_Q5_1: case PL_Q8_0:
    case PL_Q2_K: case PL_Q3_K: case PL_Q4_K: case PL_Q5_K: case PL_Q6_K:
    case PL_Q8_G: case PL_Q4_0_R16: case PL_Q5_0_R16: case PL_Q8_0_R16: case PL_Q4_K_R16:
    case PL_Q6_K_R16:
        return 1;
    default:
        return 0;
    }
}

/* Values per block (Q8_G: per scale group) and bytes per block (Q8_G: none, it is not blocked). */
static int block_values(const pl_tensor *w)
{
    switch (w->type) {
    case PL_Q2_K: case PL_Q3_K: case PL_Q4_K: case PL_Q5_K: case PL_Q6_K:
    case PL_Q4_K_R16: case PL_Q6_K_R16: return QK_K;
    case PL_Q8_G: return w->group_size;
    default: return QK;
    }
}

static size_t block_bytes(int type)
{
    switch (type) {
    case PL_Q4_0: case PL_Q4_0_R16: return sizeof(blk_q4_0);
    case PL_Q4_1: return sizeof(blk_q4_1);
    case PL_Q5_0: case PL_Q5_0_R16: return sizeof(blk_q5_0);
    case PL_Q5_1: return sizeof(blk_q5_1);
    case PL_Q8_0: case PL_Q8_0_R16: return sizeof(blk_q8_0);
    case PL_Q2_K: return sizeof(blk_q2_K);
    case PL_Q3_K: return sizeof(blk_q3_K);
    case PL_Q4_K: case PL_Q4_K_R16: return sizeof(blk_q4_K);
    case PL_Q5_K: return sizeof(blk_q5_K);
    case PL_Q6_K: case PL_Q6_K_R16: return sizeof(blk_q6_K);
    default: return 0;
    }
}

static int is_kr16(int type) { return type == PL_Q4_K_R16 || type == PL_Q6_K_R16; }
static int is_k(int type) { return (type >= PL_Q2_K && type <= PL_Q6_K) || is_kr16(type); }
static int is_r16(int type) { return type == PL_Q4_0_R16 || type == PL_Q5_0_R16 || type == PL_Q8_0_R16; }
/* A repacked layout's unsigned offset k: its bytes hold w + k (Q8_0: w xor 0x80; Q4_0, Q5_0: as stored). */
static int r16_offset(int type) { return type == PL_Q8_0_R16 ? 128 : type == PL_Q5_0_R16 ? 16 : 8; }

/* ------------------------------------------------------------------------------------------------
 * activations */

typedef struct {
    int8_t *q;      /* (cols,) */
    float *d;       /* K blocks, Q8_G groups: (cols/block,) x ≈ d·q */
    float *ds;      /* 32-blocks: (cols/32, 2) pairs d, d·Σq (llama.cpp's q8_1 d and s) */
    int16_t *bsums; /* K blocks: (cols/16,) Σq per 16 values */
    int32_t *corr;  /* repacked Q4_0/Q5_0/Q8_0: (cols/32,) −k·Σq, k the weights' unsigned offset */
    int16_t *bs32;  /* K blocks: (cols/32,) Σq per 32 values (after bsums) */
} act_view;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static act_view act_layout(const pl_tensor *w, const void *xq)
{
    size_t cols = (size_t)w->cols, nb = cols / (size_t)block_values(w);
    char *p = (char *)xq;
    act_view a;
    a.q = (int8_t *)p;
    a.d = (float *)(p + align64(cols));
    a.ds = a.d;
    a.bsums = (int16_t *)(a.d + nb);
    a.corr = (int32_t *)(a.ds + 2 * nb);
    a.bs32 = a.bsums + cols / 16;
    return a;
}

long long pli_act_bytes(const pl_tensor *w)
{
    if (!pli_is_quant(w->type)) return 0;
    long long cols = w->cols, nb = cols / block_values(w);
    long long extra = w->type == PL_Q8_G ? 0 : is_k(w->type) ? cols / 16 * 3 : nb * 4; /* s or bsums, bs32 */
    if (is_r16(w->type)) extra += nb * 4; /* corr */
    return (long long)align64((size_t)cols) + nb * 4 + extra;
}

static float absmax(const float *x, int n)
{
    int j = 0;
    float amax = 0.0f;
#ifdef PL_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    amax = _mm_cvtss_f32(h);
#endif
    for (; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

/* q[j] = round-to-nearest-even(x[j]·id), n a multiple of 32. */
static void round_i8(const float *x, int n, float id, int8_t *q)
{
    int j = 0;
#ifdef PL_AVX2
    const __m256 vid = _mm256_set1_ps(id);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; j + 32 <= n; j += 32) {
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vid));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 16), vid));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 24), vid));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(p, order));
    }
#endif
    for (; j < n; j++) q[j] = (int8_t)lrintf(x[j] * id);
}

/* Blocks of `bs` values (32 or 256) with scale amax/127, stored at d[b·stride]. */
static void quantize_blocks(const float *x, int n, int bs, int8_t *q, float *d, int stride)
{
    for (int b = 0; b < n / bs; b++) {
        const float *xb = x + (size_t)b * bs;
        float amax = absmax(xb, bs);
        d[b * stride] = amax / 127.0f;
        round_i8(xb, bs, amax != 0.0f ? 127.0f / amax : 0.0f, q + (size_t)b * bs);
    }
}

/* runq.c's quantize(): per group scale = max|x|/127, q = (int8) round(x/scale). */
static void quantize_groups(const float *x, int n, int gs, act_view *a)
{
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        int8_t *qg = a->q + (size_t)g * gs;
        float scale = absmax(xg, gs) / 127.0f;
        a->d[g] = scale;
        int j = 0;
        if (scale == 0.0f) { /* runq.c divides 0 by 0 here; all values are 0 */
            memset(qg, 0, (size_t)gs);
            continue;
        }
#ifdef PL_AVX2
        const __m256 vs = _mm256_set1_ps(scale), half = _mm256_set1_ps(0.5f);
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
        for (; j + 8 <= gs; j += 8) { /* roundf: truncate, then step away from 0 if |frac| >= .5 */
            __m256 v = _mm256_div_ps(_mm256_loadu_ps(xg + j), vs);
            __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(v, t)), half, _CMP_GE_OQ);
            __m256 step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(sign, v)));
            __m256i i = _mm256_cvttps_epi32(_mm256_add_ps(t, step));
            __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
            _mm_storel_epi64((__m128i *)(qg + j), _mm_packs_epi16(p, p));
        }
#endif
        for (; j < gs; j++) qg[j] = (int8_t)roundf(xg[j] / scale);
    }
}

void pli_quantize_act(const pl_tensor *w, const float *x, void *xq)
{
    act_view a = act_layout(w, xq);
    int n = (int)w->cols;
    if (w->type == PL_Q8_G) {
        quantize_groups(x, n, w->group_size, &a);
    } else if (is_k(w->type)) {
        quantize_blocks(x, n, QK_K, a.q, a.d, 1);
        for (int k = 0; k < n / 16; k++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += a.q[16 * k + l];
            a.bsums[k] = (int16_t)s;
        }
        for (int k = 0; k < n / 32; k++) a.bs32[k] = (int16_t)(a.bsums[2 * k] + a.bsums[2 * k + 1]);
    } else {
        quantize_blocks(x, n, QK, a.q, a.ds, 2);
        for (int b = 0; b < n / QK; b++) {
            int s = 0;
            for (int l = 0; l < QK; l++) s += a.q[QK * b + l];
            a.ds[2 * b + 1] = a.ds[2 * b] * (float)s;
            if (is_r16(w->type)) a.corr[b] = -r16_offset(w->type) * s;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * AVX2 helpers */

#ifdef PL_AVX2

static inline int hsum_epi32_128(__m128i s)
{
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* 16 bytes of nibbles → 32 bytes: low nibbles (values 0-15), then high nibbles (16-31). */
static inline __m256i nibbles(const uint8_t *p)
{
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
}

/* Byte j = 0x10 when bit j of the 32 bits qh is set, else 0 (Q5_0/Q5_1 5th bits). */
static inline __m256i bit4_of(const uint8_t *qh4)
{
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    const __m256i spread = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                              0x0202020202020202, 0x0303030303030303);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* (d, s) of activation block i: [d, s, 0, 0] */
static inline __m128 act_ds(const act_view *a, int i)
{
    return _mm_castpd_ps(_mm_load_sd((const double *)(a->ds + 2 * i)));
}

static inline float lane1(__m128 v) { return _mm_cvtss_f32(_mm_movehdup_ps(v)); }

/* Σ over pairs: 8 int32 of u[4i..4i+3]·s[4i..4i+3], u unsigned bytes, s signed bytes. */
static inline __m256i dot_u8(__m256i u, __m256i s)
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) /* one instruction, the same exact sums */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* The same for signed w (any int8) and x in [-127, 127]: |w| as the unsigned side. */
static inline __m256i dot_i8(__m256i w, __m256i x)
{
    return dot_u8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* The 32-value types share one loop: a step per block adds (d·xd)·Σ w·q8 to 8 f32 lanes (acc)
 * and a side term to lane 1 of `side` (d·xs or m·xs); two accumulator sets, alternating blocks,
 * keep the loop from waiting on the FMA latency. Result: Σ acc + side_k · Σ side. */
typedef void (*step32_fn)(const void *row, const act_view *a, int i, __m256 *acc, __m128 *side);

static inline __attribute__((always_inline)) float
dot32(const void *row, const act_view *a, int nb, step32_fn step, float side_k)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m128 side0 = _mm_setzero_ps(), side1 = _mm_setzero_ps();
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        step(row, a, i, &acc0, &side0);
        step(row, a, i + 1, &acc1, &side1);
    }
    if (i < nb) step(row, a, i, &acc0, &side0);
    return pli_hsum8(_mm256_add_ps(acc0, acc1)) + side_k * lane1(_mm_add_ps(side0, side1));
}

/* (d·xd, d·xs) for a block with one fp16 scale d; (d·xd, m·xs) for adjacent fp16 d, m. */
static inline __m128 scale_d(const uint16_t *d, const act_view *a, int i)
{
#ifdef __F16C__
    return _mm_mul_ps(_mm_cvtph_ps(_mm_set1_epi16((short)*d)), act_ds(a, i));
#else
    return _mm_mul_ps(_mm_set1_ps(pli_fp16(*d)), act_ds(a, i));
#endif
}

static inline __m128 scale_dm(const uint16_t *dm, const act_view *a, int i)
{
#ifdef __F16C__
    uint32_t v;
    memcpy(&v, dm, 4);
    return _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)v)), act_ds(a, i));
#else
    return _mm_mul_ps(_mm_setr_ps(pli_fp16(dm[0]), pli_fp16(dm[1]), 0.0f, 0.0f), act_ds(a, i));
#endif
}

static inline void accumulate32(__m128 f, __m256i p, __m256 *acc, __m128 *side)
{
    *acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(f), _mm256_cvtepi32_ps(p), *acc);
    *side = _mm_add_ps(*side, f);
}

static inline __m256i load_q8(const act_view *a, int i)
{
    return _mm256_loadu_si256((const __m256i *)(a->q + QK * i));
}

/* k4_scales in registers (no store/reload): bytes 0-7 scales, 8-15 mins. Reads 16 bytes at q
 * (the 12 scale bytes and 4 bytes of the quants that follow them in the block). */
static inline __m128i k4_scales_avx2(const uint8_t *q)
{
    __m128i a = _mm_loadu_si128((const __m128i *)q);                  /* a0 a1 a2 . */
    __m128i lo = _mm_shuffle_epi32(a, _MM_SHUFFLE(2, 1, 2, 0));        /* a0 a2 a1 a2 */
    __m128i top = _mm_shuffle_epi32(a, _MM_SHUFFLE(1, 1, 0, 0));       /* a0 a0 a1 a1 */
    lo = _mm_and_si128(_mm_srlv_epi32(lo, _mm_setr_epi32(0, 0, 0, 4)),
                       _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    top = _mm_and_si128(_mm_srli_epi32(top, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(lo, top);
}

/* k3_scales in registers: 16 signed scales. */
static inline __m128i k3_scales_avx2(const uint8_t *q)
{
    uint32_t a[3];
    memcpy(a, q, 12);
    __m128i lo = _mm_setr_epi32((int)a[0], (int)a[1], (int)a[0], (int)a[1]);
    lo = _mm_and_si128(_mm_srlv_epi32(lo, _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(0x0f));
    __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)a[2]), _mm_setr_epi32(0, 2, 4, 6)),
                               _mm_set1_epi8(0x03));
    return _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi32(hi, 4)), _mm_set1_epi8(32));
}

/* For the 16-value sub-blocks of Q2_K/Q3_K/Q6_K: 16 int16 = 8 × scale 2g, then 8 × scale 2g+1. */
static inline __m256i scale_pair(__m128i sc8, int g)
{
    __m128i idx = _mm_add_epi8(_mm_set1_epi8((char)(2 * g)), _mm_set_epi64x(0x0101010101010101, 0));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, idx));
}
#endif

/* ------------------------------------------------------------------------------------------------
 * Q4_0 */

static void deq_q4_0(const void *row, int nb, float *y)
{
    const blk_q4_0 *b = (const blk_q4_0 *)row;
    for (int i = 0; i < nb; i++, y += QK) {
        float d = pli_fp16(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[j] = d * (float)((b[i].qs[j] & 15) - 8);
            y[j + QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
        }
    }
}

#ifdef PL_AVX2 /* (nibbles − 8) · q8 summed exactly in integers, as the scalar code and the VNNI tile */
static inline void step_q4_0(const void *row, const act_view *a, int i, __m256 *acc, __m128 *side)
{
    (void)side;
    const blk_q4_0 *b = (const blk_q4_0 *)row + i;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) /* nibbles · x with −8·Σx per lane to start */
    __m256i x = load_q8(a, i);
    __m256i c = _mm256_sub_epi32(_mm256_setzero_si256(),
                                 _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(8), x));
    __m256i p = _mm256_dpbusd_epi32(c, nibbles(b->qs), x);
#else
    __m256i p = dot_i8(_mm256_sub_epi8(nibbles(b->qs), _mm256_set1_epi8(8)), load_q8(a, i));
#endif
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(pli_fp16(b->d) * a->ds[2 * i]), _mm256_cvtepi32_ps(p), *acc);
}
#endif

static float dot_q4_0(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    return dot32(row, a, nb, step_q4_0, 0.0f);
#else
    const blk_q4_0 *b = (const blk_q4_0 *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK * i;
        int s = 0;
        for (int j = 0; j < QK / 2; j++)
            s += ((b[i].qs[j] & 15) - 8) * q8[j] + ((b[i].qs[j] >> 4) - 8) * q8[j + QK / 2];
        sum += pli_fp16(b[i].d) * a->ds[2 * i] * (float)s;
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q4_1 */

static void deq_q4_1(const void *row, int nb, float *y)
{
    const blk_q4_1 *b = (const blk_q4_1 *)row;
    for (int i = 0; i < nb; i++, y += QK) {
        float d = pli_fp16(b[i].d), m = pli_fp16(b[i].m);
        for (int j = 0; j < QK / 2; j++) {
            y[j] = d * (float)(b[i].qs[j] & 15) + m;
            y[j + QK / 2] = d * (float)(b[i].qs[j] >> 4) + m;
        }
    }
}

#ifdef PL_AVX2 /* nibbles · q8, plus m·xs per block */
static inline void step_q4_1(const void *row, const act_view *a, int i, __m256 *acc, __m128 *side)
{
    const blk_q4_1 *b = (const blk_q4_1 *)row + i;
    accumulate32(scale_dm(&b->d, a, i), dot_u8(nibbles(b->qs), load_q8(a, i)), acc, side);
}
#endif

static float dot_q4_1(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    return dot32(row, a, nb, step_q4_1, 1.0f);
#else
    const blk_q4_1 *b = (const blk_q4_1 *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK * i;
        int s = 0;
        for (int j = 0; j < QK / 2; j++) s += (b[i].qs[j] & 15) * q8[j] + (b[i].qs[j] >> 4) * q8[j + QK / 2];
        sum += pli_fp16(b[i].d) * a->ds[2 * i] * (float)s + pli_fp16(b[i].m) * a->ds[2 * i + 1];
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q5_0 */

static void deq_q5_0(const void *row, int nb, float *y)
{
    const blk_q5_0 *b = (const blk_q5_0 *)row;
    for (int i = 0; i < nb; i++, y += QK) {
        float d = pli_fp16(b[i].d);
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        for (int j = 0; j < QK / 2; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)(((b[i].qs[j] & 15) | h0 << 4) - 16);
            y[j + QK / 2] = d * (float)(((b[i].qs[j] >> 4) | h1 << 4) - 16);
        }
    }
}

/* Every Q5_0 kernel (scalar, AVX2, the AVX2 tile, the repacked PL_Q5_0_R16 ones) computes the
 * same thing per row and token: the exact integer sum s = Σ (q − 16)·q8 of each block, then
 * acc = fma(fp16(d)·xd, (float)s, acc) block after block from 0. So a file's Q5_0 matrix gives
 * the same bits in either layout and in batches or alone. */
#ifdef PL_AVX2
static inline __m256i q5_0_unsigned(const blk_q5_0 *b) /* the 32 values q (0..31) in q8 order */
{
    return _mm256_or_si256(nibbles(b->qs), bit4_of(b->qh));
}

static inline __m256i q5_0_prod(__m256i u, __m256i x) /* 8 lanes summing to Σ (u − 16)·x, exact */
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) /* u · x with −16·Σx per lane to start */
    __m256i c = _mm256_sub_epi32(_mm256_setzero_si256(),
                                 _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(16), x));
    return _mm256_dpbusd_epi32(c, u, x);
#else
    return dot_i8(_mm256_sub_epi8(u, _mm256_set1_epi8(16)), x);
#endif
}

static inline __m128i hsum4_epi32(const __m256i s[4]);

/* 4 (row, token) pairs side by side: lane k adds block i of row b[k] times token a[k], fp16(d)·xd
 * then one fma, as dot_q5_0 does for each alone (decoding: 4 rows, 1 token; the tile: the reverse) */
static inline __attribute__((always_inline)) __m128
q5_0_step4(const blk_q5_0 *const b[4], const act_view *const a[4], int i, int one_row, int one_tok, __m128 acc)
{
    __m256i p[4], u = q5_0_unsigned(b[0] + i), x = load_q8(a[0], i);
    for (int k = 0; k < 4; k++)
        p[k] = q5_0_prod(one_row ? u : q5_0_unsigned(b[k] + i), one_tok ? x : load_q8(a[k], i));
    __m128 d = one_row ? _mm_set1_ps(pli_fp16(b[0][i].d))
                       : _mm_setr_ps(pli_fp16(b[0][i].d), pli_fp16(b[1][i].d), pli_fp16(b[2][i].d), pli_fp16(b[3][i].d));
    __m128 xd = one_tok ? _mm_set1_ps(a[0]->ds[2 * i])
                        : _mm_setr_ps(a[0]->ds[2 * i], a[1]->ds[2 * i], a[2]->ds[2 * i], a[3]->ds[2 * i]);
    return _mm_fmadd_ps(_mm_mul_ps(d, xd), _mm_cvtepi32_ps(hsum4_epi32(p)), acc);
}

static void q5_0_rows4(const char *row0, size_t rb, const act_view *a, int nb, float *out)
{
    const blk_q5_0 *b[4];
    const act_view *av[4] = {a, a, a, a};
    for (int k = 0; k < 4; k++) b[k] = (const blk_q5_0 *)(row0 + k * rb);
    __m128 acc = _mm_setzero_ps();
    for (int i = 0; i < nb; i++) acc = q5_0_step4(b, av, i, 0, 1, acc);
    _mm_storeu_ps(out, acc);
}
#endif

static float dot_q5_0(const void *row, const act_view *a, int nb)
{
    const blk_q5_0 *b = (const blk_q5_0 *)row;
    float sum = 0.0f;
#ifdef PL_AVX2
    for (int i = 0; i < nb; i++) {
        __m256i p = q5_0_prod(q5_0_unsigned(b + i), load_q8(a, i));
        int s = hsum_epi32_128(_mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
        sum = fmaf(pli_fp16(b[i].d) * a->ds[2 * i], (float)s, sum);
    }
    return sum;
#else
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK * i;
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        int s = 0;
        for (int j = 0; j < QK / 2; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            s += (((b[i].qs[j] & 15) | h0 << 4) - 16) * q8[j] + (((b[i].qs[j] >> 4) | h1 << 4) - 16) * q8[j + QK / 2];
        }
        sum = fmaf(pli_fp16(b[i].d) * a->ds[2 * i], (float)s, sum);
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q5_1 */

static void deq_q5_1(const void *row, int nb, float *y)
{
    const blk_q5_1 *b = (const blk_q5_1 *)row;
    for (int i = 0; i < nb; i++, y += QK) {
        float d = pli_fp16(b[i].d), m = pli_fp16(b[i].m);
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        for (int j = 0; j < QK / 2; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            y[j] = d * (float)((b[i].qs[j] & 15) | h0 << 4) + m;
            y[j + QK / 2] = d * (float)((b[i].qs[j] >> 4) | h1 << 4) + m;
        }
    }
}

#ifdef PL_AVX2
static inline void step_q5_1(const void *row, const act_view *a, int i, __m256 *acc, __m128 *side)
{
    const blk_q5_1 *b = (const blk_q5_1 *)row + i;
    __m256i w = _mm256_or_si256(nibbles(b->qs), bit4_of(b->qh));
    accumulate32(scale_dm(&b->d, a, i), dot_u8(w, load_q8(a, i)), acc, side);
}
#endif

static float dot_q5_1(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    return dot32(row, a, nb, step_q5_1, 1.0f);
#else
    const blk_q5_1 *b = (const blk_q5_1 *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK * i;
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        int s = 0;
        for (int j = 0; j < QK / 2; j++) {
            int h0 = (qh >> j) & 1, h1 = (qh >> (j + 16)) & 1;
            s += ((b[i].qs[j] & 15) | h0 << 4) * q8[j] + ((b[i].qs[j] >> 4) | h1 << 4) * q8[j + QK / 2];
        }
        sum += pli_fp16(b[i].d) * a->ds[2 * i] * (float)s + pli_fp16(b[i].m) * a->ds[2 * i + 1];
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q8_0 */

static void deq_q8_0(const void *row, int nb, float *y)
{
    const blk_q8_0 *b = (const blk_q8_0 *)row;
    for (int i = 0; i < nb; i++, y += QK) {
        float d = pli_fp16(b[i].d);
        for (int j = 0; j < QK; j++) y[j] = (float)b[i].qs[j] * d;
    }
}

#ifdef PL_AVX2
static inline void step_q8_0(const void *row, const act_view *a, int i, __m256 *acc, __m128 *side)
{
    (void)side; /* no side term: a scalar scale is cheaper than scale_d here */
    const blk_q8_0 *b = (const blk_q8_0 *)row + i;
    __m256i p = dot_i8(_mm256_loadu_si256((const __m256i *)b->qs), load_q8(a, i));
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(pli_fp16(b->d) * a->ds[2 * i]), _mm256_cvtepi32_ps(p), *acc);
}
#endif

static float dot_q8_0(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    return dot32(row, a, nb, step_q8_0, 0.0f);
#else
    const blk_q8_0 *b = (const blk_q8_0 *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK * i;
        int s = 0;
        for (int j = 0; j < QK; j++) s += b[i].qs[j] * q8[j];
        sum += pli_fp16(b[i].d) * a->ds[2 * i] * (float)s;
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q2_K */

static void deq_q2_K(const void *row, int nb, float *y)
{
    const blk_q2_K *b = (const blk_q2_K *)row;
    for (int i = 0; i < nb; i++, y += QK_K) {
        float d = pli_fp16(b[i].d), dmin = pli_fp16(b[i].dmin);
        for (int k = 0; k < 16; k++) { /* sub-block k: h = k/8, j = (k/2)%4, l = 16(k%2) + t */
            float dl = d * (float)(b[i].scales[k] & 15), ml = dmin * (float)(b[i].scales[k] >> 4);
            const uint8_t *qs = b[i].qs + 32 * (k / 8) + 16 * (k % 2);
            int shift = 2 * ((k / 2) % 4);
            for (int t = 0; t < 16; t++) y[16 * k + t] = dl * (float)((qs[t] >> shift) & 3) - ml;
        }
    }
}

#ifdef PL_AVX2
/* Q2_K rows · NT token activations (see k45_dots): 2-bit q · q8 scaled per 16 values, minus
 * dmin·Σ min·bsums. */
static inline __attribute__((always_inline)) void
q2_dots(const void *row, const act_view *a, int nb, int NT, float *out, long long ldo)
{
    const blk_q2_K *b = (const blk_q2_K *)row;
    __m256 acc[4], accm[4];
    for (int t = 0; t < NT; t++) acc[t] = accm[t] = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int i = 0; i < nb; i++) {
        __m128i sc = _mm_loadu_si128((const __m128i *)b[i].scales);
        __m128i lo = _mm_and_si128(sc, _mm_set1_epi8(15));
        __m256i hi16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15)));
        __m256i m[4], sumi[4];
        for (int t = 0; t < NT; t++) { /* Σ min·bsum, 8 lanes */
            m[t] = _mm256_madd_epi16(hi16, _mm256_loadu_si256((const __m256i *)(a[t].bsums + 16 * i)));
            sumi[t] = _mm256_setzero_si256();
        }
        for (int h = 0; h < 2; h++) {
            __m256i qs = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), m3);
                __m256i s16 = scale_pair(lo, 4 * h + j);
                for (int t = 0; t < NT; t++) {
                    const int8_t *q8 = a[t].q + QK_K * i + 128 * h + 32 * j;
                    __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)q8));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(s16, p));
                }
            }
        }
        float d = pli_fp16(b[i].d), dmin = pli_fp16(b[i].dmin);
        for (int t = 0; t < NT; t++) {
            float d8 = a[t].d[i];
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d8 * d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(d8 * dmin), _mm256_cvtepi32_ps(m[t]), accm[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * ldo] = pli_hsum8(_mm256_sub_ps(acc[t], accm[t]));
}
#endif

static float dot_q2_K(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    float r;
    q2_dots(row, a, nb, 1, &r, 0);
    return r;
#else
    const blk_q2_K *b = (const blk_q2_K *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK_K * i;
        const int16_t *bs = a->bsums + 16 * i;
        int isum = 0, msum = 0;
        for (int k = 0; k < 16; k++) {
            const uint8_t *qs = b[i].qs + 32 * (k / 8) + 16 * (k % 2);
            int shift = 2 * ((k / 2) % 4), s = 0;
            for (int t = 0; t < 16; t++) s += ((qs[t] >> shift) & 3) * q8[16 * k + t];
            isum += (b[i].scales[k] & 15) * s;
            msum += (b[i].scales[k] >> 4) * bs[k];
        }
        sum += a->d[i] * (pli_fp16(b[i].d) * (float)isum - pli_fp16(b[i].dmin) * (float)msum);
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q3_K */

static void deq_q3_K(const void *row, int nb, float *y)
{
    const blk_q3_K *b = (const blk_q3_K *)row;
    for (int i = 0; i < nb; i++, y += QK_K) {
        float d = pli_fp16(b[i].d);
        int8_t sc[16];
        k3_scales(b[i].scales, sc);
        for (int k = 0; k < 16; k++) { /* value v = 16k + t = 128h + 32j + l */
            float dl = d * (float)sc[k];
            for (int t = 0; t < 16; t++) {
                int v = 16 * k + t, h = v / 128, j = (v / 32) % 4, l = v % 32;
                int q = ((b[i].qs[32 * h + l] >> (2 * j)) & 3) - ((b[i].hmask[l] >> (4 * h + j)) & 1 ? 0 : 4);
                y[v] = dl * (float)q;
            }
        }
    }
}

#ifdef PL_AVX2
/* Q3_K rows · NT token activations (see k45_dots): unsigned q + 4 in [0, 7] · q8 scaled per 16
 * values, minus 4·Σ scale·bsums. */
static inline __attribute__((always_inline)) void
q3_dots(const void *row, const act_view *a, int nb, int NT, float *out, long long ldo)
{
    const blk_q3_K *b = (const blk_q3_K *)row;
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    for (int i = 0; i < nb; i++) {
        __m128i sc = k3_scales_avx2(b[i].scales);
        __m256i sc16 = _mm256_cvtepi8_epi16(sc);
        __m256i hm = _mm256_loadu_si256((const __m256i *)b[i].hmask);
        __m256i sumi[4];
        for (int t = 0; t < NT; t++) sumi[t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i qs = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * h));
            for (int j = 0; j < 4; j++) { /* hm's bit (4h + j) sits at bit 0 of every byte */
                __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), m3),
                                            _mm256_and_si256(_mm256_slli_epi16(hm, 2), m4));
                hm = _mm256_srli_epi16(hm, 1);
                __m256i s16 = scale_pair(sc, 4 * h + j);
                for (int t = 0; t < NT; t++) {
                    const int8_t *q8 = a[t].q + QK_K * i + 128 * h + 32 * j;
                    __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)q8));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(s16, p));
                }
            }
        }
        float d = pli_fp16(b[i].d);
        for (int t = 0; t < NT; t++) {
            __m256i bs = _mm256_loadu_si256((const __m256i *)(a[t].bsums + 16 * i));
            __m256i s = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 2));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(a[t].d[i] * d), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * ldo] = pli_hsum8(acc[t]);
}
#endif

static float dot_q3_K(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    float r;
    q3_dots(row, a, nb, 1, &r, 0);
    return r;
#else
    const blk_q3_K *b = (const blk_q3_K *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK_K * i;
        int8_t sc[16];
        k3_scales(b[i].scales, sc);
        int isum = 0;
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int t = 0; t < 16; t++) {
                int v = 16 * k + t, h = v / 128, j = (v / 32) % 4, l = v % 32;
                int q = ((b[i].qs[32 * h + l] >> (2 * j)) & 3) - ((b[i].hmask[l] >> (4 * h + j)) & 1 ? 0 : 4);
                s += q * q8[v];
            }
            isum += sc[k] * s;
        }
        sum += a->d[i] * pli_fp16(b[i].d) * (float)isum;
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q4_K */

static void deq_q4_K(const void *row, int nb, float *y)
{
    const blk_q4_K *b = (const blk_q4_K *)row;
    for (int i = 0; i < nb; i++, y += QK_K) {
        float d = pli_fp16(b[i].d), dmin = pli_fp16(b[i].dmin);
        uint8_t sm[16];
        k4_scales(b[i].scales, sm);
        for (int s = 0; s < 8; s++) {
            float dl = d * (float)sm[s], ml = dmin * (float)sm[8 + s];
            const uint8_t *qs = b[i].qs + 32 * (s / 2);
            int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) y[32 * s + l] = dl * (float)((qs[l] >> shift) & 15) - ml;
        }
    }
}

#ifdef PL_AVX2
/* The K-quants' float arithmetic, one formula per super-block that every SIMD kernel follows bit
 * for bit (the row-at-a-time kernels here, the 16-rows-in-lanes VNNI tiles below): the super-
 * block's integer sums I = Σ sc·q·q8 and M = Σ m·bsums are exact however they are formed, then
 * Q4_K/Q5_K: acc = fma(fma(d, I, −dmin·M), xd, acc);  Q6_K: acc = fma(I, d·xd, acc). */
static inline float k4_step(float acc, int32_t I, int32_t M, float d, float dmin, float xd)
{
    __m128 y = _mm_fmsub_ss(_mm_set_ss(d), _mm_set_ss((float)I), _mm_set_ss(dmin * (float)M));
    return _mm_cvtss_f32(_mm_fmadd_ss(y, _mm_set_ss(xd), _mm_set_ss(acc)));
}

static inline float k6_step(float acc, int32_t I, float d, float xd)
{
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss((float)I), _mm_set_ss(d * xd), _mm_set_ss(acc)));
}

static inline int32_t hsum_epi32_256(__m256i v)
{
    return hsum_epi32_128(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* Q4_K (five = 0) and Q5_K (five = 1, the 5th bits shifted down 2 per 64 values) rows · NT token
 * activations, out[t·ldo] for token t. Decoding calls it with NT = 1 and the AVX2 prefill tile
 * with NT = 4, each weight block unpacked once for all NT tokens. Per token: unsigned q · q8
 * scaled by sc[s] in integers, Σ m[s]·bsums, then k4_step per super-block. */
static inline __attribute__((always_inline)) void
k45_dots(const void *row, const act_view *a, int nb, int NT, int five, float *out, long long ldo)
{
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __m256i m4 = _mm256_set1_epi8(15), b4 = _mm256_set1_epi8(16);
    const size_t bb = five ? sizeof(blk_q5_K) : sizeof(blk_q4_K);
    for (int i = 0; i < nb; i++) {
        const blk_q4_K *b = (const blk_q4_K *)((const char *)row + i * bb); /* d, dmin, scales */
        const uint8_t *qs = five ? ((const blk_q5_K *)b)->qs : b->qs;
        __m256i sm16 = _mm256_cvtepu8_epi16(k4_scales_avx2(b->scales)); /* sc 0-7, m 0-7 */
        __m128i mins = _mm256_extracti128_si256(sm16, 1);
        __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm16));
        float d = pli_fp16(b->d), dmin = pli_fp16(b->dmin);
        __m256i sumi[4];
        int32_t msum[4];
        for (int t = 0; t < NT; t++) { /* mins: Σ_s m[s]·(bsum[2s] + bsum[2s+1]) */
            __m256i bs = _mm256_loadu_si256((const __m256i *)(a[t].bsums + 16 * i));
            __m128i bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            msum[t] = hsum_epi32_128(_mm_madd_epi16(mins, bs32));
            sumi[t] = _mm256_setzero_si256();
        }
        __m256i hb = five ? _mm256_loadu_si256((const __m256i *)((const blk_q5_K *)b)->qh) : m4;
        for (int k = 0; k < 4; k++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * k));
            __m256i ql = _mm256_and_si256(q, m4), qh = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (five) {
                ql = _mm256_or_si256(ql, _mm256_and_si256(_mm256_slli_epi16(hb, 4), b4));
                qh = _mm256_or_si256(qh, _mm256_and_si256(_mm256_slli_epi16(hb, 3), b4));
                hb = _mm256_srli_epi16(hb, 2);
            }
            __m256i sl = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * k + 1) << 8 | 4 * k)));
            __m256i sh = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short)((4 * k + 3) << 8 | (4 * k + 2))));
            for (int t = 0; t < NT; t++) {
                const int8_t *q8 = a[t].q + QK_K * i + 64 * k;
                __m256i pl = _mm256_maddubs_epi16(ql, _mm256_loadu_si256((const __m256i *)q8));
                __m256i ph = _mm256_maddubs_epi16(qh, _mm256_loadu_si256((const __m256i *)(q8 + 32)));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_madd_epi16(sl, pl), _mm256_madd_epi16(sh, ph)));
            }
        }
        for (int t = 0; t < NT; t++) acc[t] = k4_step(acc[t], hsum_epi32_256(sumi[t]), msum[t], d, dmin, a[t].d[i]);
    }
    for (int t = 0; t < NT; t++) out[t * ldo] = acc[t];
}
#endif

static float dot_q4_K(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    float r;
    k45_dots(row, a, nb, 1, 0, &r, 0);
    return r;
#else
    const blk_q4_K *b = (const blk_q4_K *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK_K * i;
        const int16_t *bs = a->bsums + 16 * i;
        uint8_t sm[16];
        k4_scales(b[i].scales, sm);
        int isum = 0, msum = 0;
        for (int s = 0; s < 8; s++) {
            const uint8_t *qs = b[i].qs + 32 * (s / 2);
            int shift = 4 * (s & 1), t = 0;
            for (int l = 0; l < 32; l++) t += ((qs[l] >> shift) & 15) * q8[32 * s + l];
            isum += sm[s] * t;
            msum += sm[8 + s] * (bs[2 * s] + bs[2 * s + 1]);
        }
        sum += a->d[i] * (pli_fp16(b[i].d) * (float)isum - pli_fp16(b[i].dmin) * (float)msum);
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q5_K */

static void deq_q5_K(const void *row, int nb, float *y)
{
    const blk_q5_K *b = (const blk_q5_K *)row;
    for (int i = 0; i < nb; i++, y += QK_K) {
        float d = pli_fp16(b[i].d), dmin = pli_fp16(b[i].dmin);
        uint8_t sm[16];
        k4_scales(b[i].scales, sm);
        for (int s = 0; s < 8; s++) {
            float dl = d * (float)sm[s], ml = dmin * (float)sm[8 + s];
            const uint8_t *qs = b[i].qs + 32 * (s / 2);
            int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) {
                int q = ((qs[l] >> shift) & 15) | ((b[i].qh[l] >> s) & 1) << 4;
                y[32 * s + l] = dl * (float)q - ml;
            }
        }
    }
}

static float dot_q5_K(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    float r;
    k45_dots(row, a, nb, 1, 1, &r, 0);
    return r;
#else
    const blk_q5_K *b = (const blk_q5_K *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK_K * i;
        const int16_t *bs = a->bsums + 16 * i;
        uint8_t sm[16];
        k4_scales(b[i].scales, sm);
        int isum = 0, msum = 0;
        for (int s = 0; s < 8; s++) {
            const uint8_t *qs = b[i].qs + 32 * (s / 2);
            int shift = 4 * (s & 1), t = 0;
            for (int l = 0; l < 32; l++)
                t += (((qs[l] >> shift) & 15) | ((b[i].qh[l] >> s) & 1) << 4) * q8[32 * s + l];
            isum += sm[s] * t;
            msum += sm[8 + s] * (bs[2 * s] + bs[2 * s + 1]);
        }
        sum += a->d[i] * (pli_fp16(b[i].d) * (float)isum - pli_fp16(b[i].dmin) * (float)msum);
    }
    return sum;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Q6_K */

static inline int q6_value(const blk_q6_K *b, int v) /* unsigned, 0..63 (stored + 32) */
{
    int h = v / 128, j = (v / 32) % 4, l = v % 32;
    int lo = (b->ql[64 * h + 32 * (j & 1) + l] >> (4 * (j >= 2))) & 15;
    return lo | ((b->qh[32 * h + l] >> (2 * j)) & 3) << 4;
}

static void deq_q6_K(const void *row, int nb, float *y)
{
    const blk_q6_K *b = (const blk_q6_K *)row;
    for (int i = 0; i < nb; i++, y += QK_K) {
        float d = pli_fp16(b[i].d);
        for (int k = 0; k < 16; k++) {
            float dl = d * (float)b[i].scales[k];
            for (int t = 0; t < 16; t++) y[16 * k + t] = dl * (float)(q6_value(&b[i], 16 * k + t) - 32);
        }
    }
}

#ifdef PL_AVX2
/* Q6_K rows · NT token activations, as k45_dots: unsigned q in [0, 63] · q8 scaled per 16 values,
 * minus 32·Σ scale·bsums, then k6_step per super-block. */
static inline __attribute__((always_inline)) void
q6_dots(const void *row, const act_view *a, int nb, int NT, float *out, long long ldo)
{
    const blk_q6_K *b = (const blk_q6_K *)row;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    for (int i = 0; i < nb; i++) {
        __m128i sc = _mm_loadu_si128((const __m128i *)b[i].scales);
        __m256i sc16 = _mm256_cvtepi8_epi16(sc);
        __m256i sumi[4];
        for (int t = 0; t < NT; t++) {
            __m256i bs = _mm256_loadu_si256((const __m256i *)(a[t].bsums + 16 * i));
            sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
        }
        for (int h = 0; h < 2; h++) {
            __m256i la = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h));
            __m256i lb = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h + 32));
            __m256i hq = _mm256_loadu_si256((const __m256i *)(b[i].qh + 32 * h));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_and_si256(_mm256_slli_epi16(hq, 4), m30));
            q[1] = _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_and_si256(_mm256_slli_epi16(hq, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(hq, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(hq, 2), m30));
            for (int j = 0; j < 4; j++) {
                __m256i s16 = scale_pair(sc, 4 * h + j);
                for (int t = 0; t < NT; t++) {
                    const int8_t *q8 = a[t].q + QK_K * i + 128 * h + 32 * j;
                    __m256i p = _mm256_maddubs_epi16(q[j], _mm256_loadu_si256((const __m256i *)q8));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(s16, p));
                }
            }
        }
        float d = pli_fp16(b[i].d);
        for (int t = 0; t < NT; t++) acc[t] = k6_step(acc[t], hsum_epi32_256(sumi[t]), d, a[t].d[i]);
    }
    for (int t = 0; t < NT; t++) out[t * ldo] = acc[t];
}
#endif

static float dot_q6_K(const void *row, const act_view *a, int nb)
{
#ifdef PL_AVX2
    float r;
    q6_dots(row, a, nb, 1, &r, 0);
    return r;
#else
    const blk_q6_K *b = (const blk_q6_K *)row;
    float sum = 0.0f;
    for (int i = 0; i < nb; i++) {
        const int8_t *q8 = a->q + QK_K * i;
        int isum = 0;
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int t = 0; t < 16; t++) s += (q6_value(&b[i], 16 * k + t) - 32) * q8[16 * k + t];
            isum += b[i].scales[k] * s;
        }
        sum += a->d[i] * pli_fp16(b[i].d) * (float)isum;
    }
    return sum;
#endif
}

#ifdef PL_AVX2
/* Decoding Q4_K and Q6_K, 4 rows at a time: each row's integer sums as in k45_dots / q6_dots
 * (scales as broadcast int16 pairs, vpdpwssd where the compiler targets VNNI), the 4 rows'
 * super-block sums side by side in one register, then k4_step / k6_step in its 4 lanes. */
static inline __m256i madd_acc(__m256i acc, __m256i p, __m256i s)
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && !defined(KQ_NO_DPW)
    return _mm256_dpwssd_epi32(acc, p, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
#endif
}

static inline __m128i hsum4_epi32(const __m256i s[4]) /* lane r = Σ lanes of s[r] */
{
    __m128i h[4];
    for (int r = 0; r < 4; r++) h[r] = _mm_add_epi32(_mm256_castsi256_si128(s[r]), _mm256_extracti128_si256(s[r], 1));
    return _mm_hadd_epi32(_mm_hadd_epi32(h[0], h[1]), _mm_hadd_epi32(h[2], h[3]));
}

static inline __m128 fp16x4(const uint16_t h[4])
{
#ifdef __F16C__
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)h));
#else
    return _mm_setr_ps(pli_fp16(h[0]), pli_fp16(h[1]), pli_fp16(h[2]), pli_fp16(h[3]));
#endif
}

/* One row's super-block i for k_rows4: the 8 lanes of Σ sc·q·q8 (Q4_K: and the 4 of Σ m·bs32). */
static inline __attribute__((always_inline)) void
k4_sums(const blk_q4_K *b, const act_view *a, int i, __m256i *sum, __m128i *msum)
{
    const __m256i m4 = _mm256_set1_epi8(15);
    const int8_t *q8 = a->q + QK_K * i;
    __m256i sm16 = _mm256_cvtepu8_epi16(k4_scales_avx2(b->scales));
    __m128i s16 = _mm256_castsi256_si128(sm16);
    *msum = _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), _mm_loadu_si128((const __m128i *)(a->bs32 + 8 * i)));
    int32_t sc2[8] __attribute__((aligned(32))); /* (sc[s], sc[s]) int16 pairs */
    _mm256_store_si256((__m256i *)sc2, _mm256_set_m128i(_mm_unpackhi_epi16(s16, s16), _mm_unpacklo_epi16(s16, s16)));
    __m256i s[4]; /* four sums: the multiply-adds' latency overlaps */
    for (int k = 0; k < 4; k++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)(b->qs + 32 * k));
        __m256i pl = _mm256_maddubs_epi16(_mm256_and_si256(q, m4), _mm256_loadu_si256((const __m256i *)(q8 + 64 * k)));
        __m256i ph = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                          _mm256_loadu_si256((const __m256i *)(q8 + 64 * k + 32)));
        s[k] = madd_acc(_mm256_madd_epi16(pl, _mm256_set1_epi32(sc2[2 * k])), ph, _mm256_set1_epi32(sc2[2 * k + 1]));
    }
    *sum = _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
}

static inline __attribute__((always_inline)) void q6_sums(const blk_q6_K *b, const act_view *a, int i, __m256i *sum)
{
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    __m256i bs = _mm256_loadu_si256((const __m256i *)(a->bsums + 16 * i));
    __m256i s[4] = {_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5)),
                    _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int h = 0; h < 2; h++) {
        const int8_t *q8 = a->q + QK_K * i + 128 * h;
        __m256i la = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
        __m256i lb = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
        __m256i hq = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
        /* sc[8h..8h+7] twice (two calls: the selector must be a constant whether or not h's loop
         * is unrolled, e.g. at -O1 or for AVX2-only targets) */
        __m256i sh = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_and_si256(_mm256_slli_epi16(hq, 4), m30));
        q[1] = _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_and_si256(_mm256_slli_epi16(hq, 2), m30));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(hq, m30));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4), _mm256_and_si256(_mm256_srli_epi16(hq, 2), m30));
        for (int j = 0; j < 4; j++) { /* words: sc[8h + 2j] x 8, then sc[8h + 2j + 1] x 8 */
            const char lo = (char)(4 * j), hi = (char)(4 * j + 2);
            __m256i idx = _mm256_setr_epi8(lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1,
                                           lo, lo + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1,
                                           hi, hi + 1, hi, hi + 1);
            __m256i p = _mm256_maddubs_epi16(q[j], _mm256_loadu_si256((const __m256i *)(q8 + 32 * j)));
            s[j] = madd_acc(s[j], p, _mm256_shuffle_epi8(sh, idx));
        }
    }
    *sum = _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
}

/* Software prefetch this many bytes ahead of the super-block being read (0: none; the T0 hint, 4 KiB,
 * beat T1 and 1, 2, 3, 6, 8 KiB on a Zen 4 EPYC; on a Zen 5, 4 and 8 KiB (PL_AHEAD) measured
 * alike). A thread's 4-row groups lie end to end in memory, so the point ahead is where it reads
 * next. At 2 threads the hardware prefetcher alone left generation 4-7%
 * slower (1B Q4_K_M, 110M Q4_K_M; builds alternated in the same runs), behind the old kernel. */
#ifndef KQ_PF
#define KQ_PF 4096
#endif
#define KSB 32 /* super-blocks per pass over a row: each row is read front to back, as one stream */

static inline __attribute__((always_inline)) void
k_rows4(int six, const char *row0, size_t rb, const act_view *a, int nb, float *out)
{
    const size_t bb = six ? sizeof(blk_q6_K) : sizeof(blk_q4_K);
    __m128 acc = _mm_setzero_ps();
    __m256i sv[KSB][4];
    __m128i mv[KSB][4];
    uint16_t d[KSB][4], dmin[KSB][4]; /* kept from the pass: the rows are not read again */
    for (int i0 = 0; i0 < nb; i0 += KSB) {
        int n = nb - i0 < KSB ? nb - i0 : KSB;
        for (int r = 0; r < 4; r++)
            for (int e = 0; e < n; e++) {
                const int i = i0 + e;
                const char *b = row0 + r * rb + i * bb;
                if (KQ_PF) pli_prefetch_lines(b + KQ_PF, bb);
                if (six) {
                    q6_sums((const blk_q6_K *)b, a, i, &sv[e][r]);
                    d[e][r] = ((const blk_q6_K *)b)->d;
                } else {
                    k4_sums((const blk_q4_K *)b, a, i, &sv[e][r], &mv[e][r]);
                    d[e][r] = ((const blk_q4_K *)b)->d, dmin[e][r] = ((const blk_q4_K *)b)->dmin;
                }
                if (r < 3) continue;
                /* the 4 rows' super-block e is complete: its float step here, between the loads */
                __m128 fi = _mm_cvtepi32_ps(hsum4_epi32(sv[e])), xd = _mm_set1_ps(a->d[i]);
                if (six) { /* k6_step */
                    acc = _mm_fmadd_ps(fi, _mm_mul_ps(fp16x4(d[e]), xd), acc);
                } else { /* k4_step */
                    __m128 fm = _mm_cvtepi32_ps(_mm_hadd_epi32(_mm_hadd_epi32(mv[e][0], mv[e][1]), _mm_hadd_epi32(mv[e][2], mv[e][3])));
                    acc = _mm_fmadd_ps(_mm_fmsub_ps(fp16x4(d[e]), fi, _mm_mul_ps(fp16x4(dmin[e]), fm)), xd, acc);
                }
            }
    }
    _mm_storeu_ps(out, acc);
}

static void k4_rows4(const char *row0, size_t rb, const act_view *a, int nb, float *out)
{
    k_rows4(0, row0, rb, a, nb, out);
}

static void q6_rows4(const char *row0, size_t rb, const act_view *a, int nb, float *out)
{
    k_rows4(1, row0, rb, a, nb, out);
}
#endif

/* ------------------------------------------------------------------------------------------------
 * Q4_K and Q6_K prompts with AVX-512 VNNI: 16 rows in the 16 lanes of a register. For each group
 * of 16 rows and each super-block, the weights are unpacked once (kq_unpack: gathers lane r from
 * row r, 4 values per lane as unsigned bytes, the scales as int32 lanes) and then every token of
 * the batch runs over them: vpdpbusd with the token's 4 activation bytes broadcast adds the 4
 * products of each row to its lane, one sub-block at a time, scaled by vpmulld. The super-block's
 * integer sums are exactly those of the row-at-a-time kernels, and each lane then takes k4_step /
 * k6_step's operations, so every token's result is bit for bit its single-token one. The output
 * rows of a token (16 contiguous floats) hold the running sums between super-blocks. */
#if defined(PL_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    defined(__F16C__)
#define PL_KQ512 1
static inline size_t kr16_sbytes(int six) { return six ? 52 * 64 : 36 * 64; } /* a repacked super-block */
#define KT 4 /* tokens at a time over an unpacked super-block */

typedef struct {
    __m512i u[64];  /* values 4j..4j+3 of each row, unsigned bytes */
    __m512i sc[16]; /* per-sub-block scale of each row (Q4_K: 8 sub-blocks of 32, Q6_K: 16 of 16) */
    __m512i sp[8];  /* int16 pairs: Q4_K (m[2p], m[2p+1]) for p < 4, Q6_K (sc[2p], sc[2p+1]) */
    __m512 d, dmin;
} kq_unpacked;

/* 16 x 16 dwords transposed in place: afterwards r[p] holds dword p of every former r[lane]. */
static inline __attribute__((always_inline)) void kq_transpose(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) { /* lane L of t[2i]: a_4L b_4L a_4L+1 b_4L+1; of t[2i+1]: dwords 2, 3 */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++) { /* u[4q + d], lane L: dword 4L + d of rows 4q..4q+3 */
        u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int d = 0; d < 4; d++) { /* r[4L + d] = lane L of u[d], u[4 + d], u[8 + d], u[12 + d] */
        __m512i v0 = _mm512_shuffle_i32x4(u[d], u[4 + d], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i v1 = _mm512_shuffle_i32x4(u[d], u[4 + d], _MM_SHUFFLE(3, 2, 3, 2));
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i v3 = _mm512_shuffle_i32x4(u[8 + d], u[12 + d], _MM_SHUFFLE(3, 2, 3, 2));
        r[d] = _mm512_shuffle_i32x4(v0, v2, _MM_SHUFFLE(2, 0, 2, 0));
        r[4 + d] = _mm512_shuffle_i32x4(v0, v2, _MM_SHUFFLE(3, 1, 3, 1));
        r[8 + d] = _mm512_shuffle_i32x4(v1, v3, _MM_SHUFFLE(2, 0, 2, 0));
        r[12 + d] = _mm512_shuffle_i32x4(v1, v3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* Dwords [16c, 16c + 16) of the 16 rows' super-blocks (row r at base + r·rb, bytes < `bytes`
 * only), transposed: r[p] lane q = dword 16c + p of row q; rows outside the mask read as 0. */
static inline __attribute__((always_inline)) void
kq_columns(const char *base, size_t rb, int nr, int c, int bytes, __m512i r[16])
{
    int n = bytes - 64 * c;
    __mmask64 lm = n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1;
    for (int q = 0; q < 16; q++)
        r[q] = q < nr ? _mm512_maskz_loadu_epi8(lm, base + q * rb + 64 * c) : _mm512_setzero_si512();
    kq_transpose(r);
}

/* The same 16 chunks, where `packed`: from a repacked group's super-block (PL_Q4_K_R16 /
 * PL_Q6_K_R16, below), which holds them side by side already: chunk p at base + 64p. */
static inline __attribute__((always_inline)) void
kq_chunks(int packed, const char *base, size_t rb, int nr, int c, int bytes, __m512i r[16])
{
    if (!packed) {
        kq_columns(base, rb, nr, c, bytes, r);
        return;
    }
    for (int q = 0; q < 16; q++)
        r[q] = 16 * c + q < bytes / 4 ? _mm512_loadu_si512((const void *)(base + 64 * (16 * c + q))) : _mm512_setzero_si512();
}

static inline __m512i kq_byte(__m512i v, int k) /* byte k of each lane, zero-extended */
{
    return _mm512_and_si512(_mm512_srli_epi32(v, 8 * k), _mm512_set1_epi32(0xff));
}

static inline __m512i kq_pair(__m512i lo, __m512i hi) /* int16 lo | hi << 16 */
{
    return _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(0xffff)), _mm512_slli_epi32(hi, 16));
}

/* Super-block `base` (row 0's) of nr <= 16 rows `rb` bytes apart, or (packed) of a repacked group. */
static inline __attribute__((always_inline)) void
kq_unpack_q4(int packed, const char *base, size_t rb, int nr, kq_unpacked *k)
{
    const __m512i lo4 = _mm512_set1_epi8(15), lo6 = _mm512_set1_epi8(0x3f), lo2 = _mm512_set1_epi8(3);
    __m512i c[16];
    kq_chunks(packed, base, rb, nr, 0, 144, c); /* d|dmin, scales (3 dwords), qs dwords 0-11 */
    k->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(c[0]));
    k->dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(c[0], 16)));
    __m512i a0 = c[1], a1 = c[2], a2 = c[3];
    __m512i sc03 = _mm512_and_si512(a0, lo6), m03 = _mm512_and_si512(a1, lo6);
    __m512i sc47 = _mm512_or_si512(_mm512_and_si512(a2, lo4),
                                   _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a0, 6), lo2), 4));
    __m512i m47 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(a2, 4), lo4),
                                  _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a1, 6), lo2), 4));
    for (int s = 0; s < 4; s++) k->sc[s] = kq_byte(sc03, s), k->sc[4 + s] = kq_byte(sc47, s);
    k->sp[0] = kq_pair(kq_byte(m03, 0), kq_byte(m03, 1));
    k->sp[1] = kq_pair(kq_byte(m03, 2), kq_byte(m03, 3));
    k->sp[2] = kq_pair(kq_byte(m47, 0), kq_byte(m47, 1));
    k->sp[3] = kq_pair(kq_byte(m47, 2), kq_byte(m47, 3));
    for (int b = 0; b < 3; b++) {
        if (b) kq_chunks(packed, base, rb, nr, b, 144, c);
        for (int e = b ? 0 : 4; e < (b == 2 ? 4 : 16); e++) {
            /* qs dword p = bytes 32c + 4l of chunk c = p/8: values 64c + 4l.. (low nibbles), +32 (high) */
            int p = 16 * b + e - 4, ch = p / 8, l = p % 8;
            k->u[16 * ch + l] = _mm512_and_si512(c[e], lo4);
            k->u[16 * ch + 8 + l] = _mm512_and_si512(_mm512_srli_epi32(c[e], 4), lo4);
        }
    }
}

static void kq_unpack_q6(const char *base, size_t rb, int nr, kq_unpacked *k)
{
    const __m512i lo4 = _mm512_set1_epi8(15), hi2 = _mm512_set1_epi8(0x30);
    __m512i qh[16], c[16];
    kq_columns(base, rb, nr, 3, 210, c); /* scales (dwords 48-51), d (low half of dword 52) */
    k->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(c[4]));
    for (int q = 0; q < 4; q++)
        for (int b = 0; b < 4; b++) k->sc[4 * q + b] = _mm512_srai_epi32(_mm512_slli_epi32(c[q], 24 - 8 * b), 24);
    for (int p = 0; p < 8; p++) k->sp[p] = kq_pair(k->sc[2 * p], k->sc[2 * p + 1]);
    kq_columns(base, rb, nr, 2, 210, qh); /* qh dwords 0-15 */
    for (int b = 0; b < 2; b++) {
        kq_columns(base, rb, nr, b, 210, c);
        for (int e = 0; e < 16; e++) { /* ql dword p: bytes 64h + 32c + 4l, h = p/16, c = (p/8)%2 */
            int p = 16 * b + e, h = p / 16, cc = (p / 8) % 2, l = p % 8;
            __m512i hb = qh[8 * h + l];
            for (int j = cc; j < 4; j += 2) { /* values 128h + 32j + 4l.. : nibble j >= 2, bits 2j of qh */
                __m512i lo = _mm512_and_si512(j >= 2 ? _mm512_srli_epi32(c[e], 4) : c[e], lo4);
                __m512i hi = _mm512_and_si512(2 * j <= 4 ? _mm512_slli_epi32(hb, 4 - 2 * j) : _mm512_srli_epi32(hb, 2 * j - 4), hi2);
                k->u[32 * h + 8 * j + l] = _mm512_or_si512(lo, hi);
            }
        }
    }
}

/* A repacked Q6_K super-block (see "Repacked Q4_K / Q6_K"): sub-block s's 4 value chunks from
 * chunks 3s..3s+2 (kr_q6_values), its scales from the scales chunks, the rows' d from dp. */
static inline __attribute__((always_inline)) void
kr_q6_values(const char *sb, int s, __m512i v[4])
{
    const __m512i lo6 = _mm512_set1_epi8(0x3f), m3 = _mm512_set1_epi8(3), m15 = _mm512_set1_epi8(15);
    __m512i A = _mm512_loadu_si512((const void *)(sb + 64 * (3 * s))), B = _mm512_loadu_si512((const void *)(sb + 64 * (3 * s + 1))),
            C = _mm512_loadu_si512((const void *)(sb + 64 * (3 * s + 2)));
    v[0] = _mm512_and_si512(A, lo6), v[1] = _mm512_and_si512(B, lo6), v[2] = _mm512_and_si512(C, lo6);
    /* value 3: bits 6-7 of A, B, C as its bits 0-1, 2-3, 4-5 (0xca: bit select, mask first) */
    __m512i t = _mm512_ternarylogic_epi32(m3, _mm512_srli_epi32(A, 6), _mm512_srli_epi32(B, 4), 0xca);
    v[3] = _mm512_and_si512(_mm512_ternarylogic_epi32(m15, t, _mm512_srli_epi32(C, 2), 0xca), lo6);
}

static inline __m512i kr_q6_scale(const char *sb, int s) /* sub-block s's int8 scale of each row */
{
    return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sb + 64 * 48 + 16 * s)));
}

static void kr_unpack_q6(const char *sb, const uint16_t *dp, kq_unpacked *k)
{
    for (int s = 0; s < 16; s++) {
        kr_q6_values(sb, s, k->u + 4 * s);
        k->sc[s] = kr_q6_scale(sb, s);
    }
    for (int p = 0; p < 8; p++) k->sp[p] = kq_pair(k->sc[2 * p], k->sc[2 * p + 1]);
    k->d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dp));
}

static inline __m512i kq_x4(const int8_t *p) /* 4 activation bytes in every lane */
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* T <= KT tokens over unpacked super-block i of a row group, out[t·ldo + lane]. Q4_K (six = 0):
 * 8 sub-blocks of 32, M = Σ m·bs32; Q6_K (six = 1): 16 sub-blocks of 16, M = Σ sc·bsums, the
 * −32 offset of its values. */
static inline __attribute__((always_inline)) void
kq_tokens(int six, const kq_unpacked *k, const act_view *a, int i, int T, float *out, long long ldo, __mmask16 m,
          int first)
{
    const int nsub = six ? 16 : 8, len = QK_K / nsub; /* sub-blocks, values per sub-block */
    __m512i I[KT], M[KT];
    for (int t = 0; t < T; t++) I[t] = M[t] = _mm512_setzero_si512();
    for (int s = 0; s < nsub; s++) {
        __m512i p[KT];
        for (int t = 0; t < T; t++) p[t] = _mm512_setzero_si512();
        for (int j = 0; j < len / 4; j++) {
            __m512i u = k->u[len / 4 * s + j];
            for (int t = 0; t < T; t++) p[t] = _mm512_dpbusd_epi32(p[t], u, kq_x4(a[t].q + QK_K * i + len * s + 4 * j));
        }
        for (int t = 0; t < T; t++) I[t] = _mm512_add_epi32(I[t], _mm512_mullo_epi32(p[t], k->sc[s]));
    }
    for (int p = 0; p < nsub / 2; p++)
        for (int t = 0; t < T; t++) {
            const int16_t *bs = six ? a[t].bsums + 16 * i : a[t].bs32 + 8 * i;
            M[t] = _mm512_dpwssd_epi32(M[t], k->sp[p], kq_x4((const int8_t *)(bs + 2 * p)));
        }
    for (int t = 0; t < T; t++) {
        __m512 acc = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, out + t * ldo), xd = _mm512_set1_ps(a[t].d[i]);
        if (six) /* k6_step */
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(I[t], _mm512_slli_epi32(M[t], 5))),
                                  _mm512_mul_ps(k->d, xd), acc);
        else /* k4_step */
            acc = _mm512_fmadd_ps(_mm512_fmsub_ps(k->d, _mm512_cvtepi32_ps(I[t]), _mm512_mul_ps(k->dmin, _mm512_cvtepi32_ps(M[t]))),
                                  xd, acc);
        _mm512_mask_storeu_ps(out + t * ldo, m, acc);
    }
}

/* Rows [r0, r1) of w (type: its file layout or, packed, its repacked one: then r0 and r1 are
 * multiples of 16) for ntok tokens; ntok = 1 is the decode path of the repacked layouts. */
static inline __attribute__((always_inline)) void
kq_batch(int type, const pl_tensor *w, const void *xq, long long stride, int ntok, float *out, long long ldo,
         long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K), packed = is_kr16(type), six = type == PL_Q6_K || type == PL_Q6_K_R16;
    const size_t bb = block_bytes(type), rb = (size_t)nb * bb, sb = kr16_sbytes(six);
    const char *base = (const char *)w->data;
    kq_unpacked k __attribute__((aligned(64)));
    act_view a[ntok];
    for (int t = 0; t < ntok; t++) a[t] = act_layout(w, (const char *)xq + t * stride);
    for (long long r = r0; r < r1; r += 16) {
        int nr = r1 - r >= 16 ? 16 : (int)(r1 - r);
        __mmask16 m = (__mmask16)((1u << nr) - 1);
        const char *g = base + r * rb; /* row r, or (packed) its group */
        for (int i = 0; i < nb; i++) {
            const char *src = packed ? g + i * sb : g + i * bb;
            if (six && packed) kr_unpack_q6(src, (const uint16_t *)(g + nb * sb) + 16 * i, &k);
            else if (six) kq_unpack_q6(src, rb, nr, &k);
            else kq_unpack_q4(packed, src, rb, nr, &k);
            for (int t = 0; t < ntok; t += KT) {
                int T = ntok - t < KT ? ntok - t : KT;
                float *o = out + t * ldo + r;
                if (T == KT) kq_tokens(six, &k, a + t, i, KT, o, ldo, m, i == 0);
                else for (int e = 0; e < T; e++) kq_tokens(six, &k, a + t + e, i, 1, o + e * ldo, ldo, m, i == 0);
            }
        }
    }
}

static void kq_batch_q4_K(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out, long long ldo,
                          long long r0, long long r1)
{
    kq_batch(PL_Q4_K, w, xq, stride, ntok, out, ldo, r0, r1);
}

static void kq_batch_q6_K(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out, long long ldo,
                          long long r0, long long r1)
{
    kq_batch(PL_Q6_K, w, xq, stride, ntok, out, ldo, r0, r1);
}

static void kq_batch_q4_K_R16(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out,
                              long long ldo, long long r0, long long r1)
{
    kq_batch(PL_Q4_K_R16, w, xq, stride, ntok, out, ldo, r0, r1);
}

static void kq_batch_q6_K_R16(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out,
                              long long ldo, long long r0, long long r1)
{
    kq_batch(PL_Q6_K_R16, w, xq, stride, ntok, out, ldo, r0, r1);
}

/* One token over a repacked group: the integer sums of kq_tokens (T = 1) formed straight from
 * the loaded chunks, without the kq_unpacked copy (decode reads each byte once: the unpacking is
 * its arithmetic). Exact integers, then k4_step / k6_step per lane: bit for bit kq_tokens. */
static inline __m512i kr_x4(const int8_t *q8, int off) { return kq_x4(q8 + off); }

/* Q4_K super-block at sb (36 chunks): acc of its 16 rows. */
static inline __attribute__((always_inline)) __m512
kr_q4_step(const char *sb, const act_view *a, int i, __m512 acc)
{
    const __m512i lo4 = _mm512_set1_epi8(15), hi4 = _mm512_set1_epi8((char)0xf0), lo6 = _mm512_set1_epi8(0x3f),
                  lo2 = _mm512_set1_epi8(3);
    const int8_t *q8 = a->q + QK_K * i;
    __m512i P[8];
    _Pragma("GCC unroll 16")
    for (int ch = 0; ch < 4; ch++) { /* qs dwords 8ch..8ch+7: sub-blocks 2ch (low nibbles), 2ch+1 (high) */
        __m512i pl = _mm512_setzero_si512(), ph = _mm512_setzero_si512();
        _Pragma("GCC unroll 16")
        for (int l = 0; l < 8; l++) {
            __m512i c = _mm512_loadu_si512((const void *)(sb + 64 * (4 + 8 * ch + l)));
            PL_IN_REG(c); /* one load for both nibbles: one core streamed 1B Q4_K layers at 0.83 ->
                           * 0.88 of its rate (the same for Q6_K's values or Q4_0's measured slower) */
            pl = _mm512_dpbusd_epi32(pl, _mm512_and_si512(c, lo4), kr_x4(q8, 64 * ch + 4 * l));
            ph = _mm512_dpbusd_epi32(ph, _mm512_and_si512(c, hi4), kr_x4(q8, 64 * ch + 32 + 4 * l));
        }
        P[2 * ch] = pl, P[2 * ch + 1] = _mm512_srai_epi32(ph, 4); /* the high nibbles were read x16 */
    }
    __m512i c0 = _mm512_loadu_si512((const void *)sb), a0 = _mm512_loadu_si512((const void *)(sb + 64)),
            a1 = _mm512_loadu_si512((const void *)(sb + 128)), a2 = _mm512_loadu_si512((const void *)(sb + 192));
    __m512i sc03 = _mm512_and_si512(a0, lo6), m03 = _mm512_and_si512(a1, lo6);
    __m512i sc47 = _mm512_or_si512(_mm512_and_si512(a2, lo4),
                                   _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a0, 6), lo2), 4));
    __m512i m47 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(a2, 4), lo4),
                                  _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a1, 6), lo2), 4));
    __m512i I0 = _mm512_setzero_si512(), I1 = _mm512_setzero_si512();
    _Pragma("GCC unroll 16")
    for (int q = 0; q < 4; q += 2) {
        I0 = _mm512_add_epi32(I0, _mm512_mullo_epi32(P[q], kq_byte(sc03, q)));
        I1 = _mm512_add_epi32(I1, _mm512_mullo_epi32(P[q + 1], kq_byte(sc03, q + 1)));
        I0 = _mm512_add_epi32(I0, _mm512_mullo_epi32(P[4 + q], kq_byte(sc47, q)));
        I1 = _mm512_add_epi32(I1, _mm512_mullo_epi32(P[5 + q], kq_byte(sc47, q + 1)));
    }
    const int8_t *bs = (const int8_t *)(a->bs32 + 8 * i);
    __m512i M = _mm512_dpwssd_epi32(_mm512_setzero_si512(), kq_pair(kq_byte(m03, 0), kq_byte(m03, 1)), kq_x4(bs));
    M = _mm512_dpwssd_epi32(M, kq_pair(kq_byte(m03, 2), kq_byte(m03, 3)), kq_x4(bs + 4));
    M = _mm512_dpwssd_epi32(M, kq_pair(kq_byte(m47, 0), kq_byte(m47, 1)), kq_x4(bs + 8));
    M = _mm512_dpwssd_epi32(M, kq_pair(kq_byte(m47, 2), kq_byte(m47, 3)), kq_x4(bs + 12));
    __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(c0)), dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(c0, 16)));
    __m512 y = _mm512_fmsub_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(I0, I1)), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(M)));
    return _mm512_fmadd_ps(y, _mm512_set1_ps(a->d[i]), acc); /* k4_step */
}

/* Q6_K super-block at sb (52 chunks): the integer sum of its 16 rows. Each sub-block's sum starts
 * at −32·bsum (the values' offset), so I − 32·M of kq_tokens comes out as one sum. */
static inline __attribute__((always_inline)) __m512i kr_q6_sums(const char *sb, const act_view *a, int i)
{
    const int8_t *q8 = a->q + QK_K * i;
    const int16_t *bs = a->bsums + 16 * i;
    __m512i I0 = _mm512_setzero_si512(), I1 = _mm512_setzero_si512();
    _Pragma("GCC unroll 16")
    for (int s = 0; s < 16; s++) {
        __m512i v[4];
        kr_q6_values(sb, s, v);
        __m512i p = _mm512_set1_epi32(-32 * (int32_t)bs[s]);
        _Pragma("GCC unroll 4")
        for (int k = 0; k < 4; k++) p = _mm512_dpbusd_epi32(p, v[k], kr_x4(q8, 16 * s + 4 * k));
        if (s & 1) I1 = _mm512_add_epi32(I1, _mm512_mullo_epi32(p, kr_q6_scale(sb, s)));
        else I0 = _mm512_add_epi32(I0, _mm512_mullo_epi32(p, kr_q6_scale(sb, s)));
    }
    return _mm512_add_epi32(I0, I1);
}

/* Super-blocks of a Q6_K group whose float steps wait for the sums of them all: their rows' d
 * (the plane after the group's super-blocks) are then read as the stream reaches them. Read
 * with each super-block, those lines lay ahead of the stream, a miss each, and one core read the
 * 1B-shaped Q6_K classifier at 0.63 of its plain streaming rate; deferred, at 0.86. */
#define KR_DEFER 64

/* The activation bytes of super-block i (when i < nb) into L1, one super-block ahead of their
 * use. With rows of 8192 values (x: 8 KB), a group's 73-106 KB of streaming weights evict x from
 * L1 before the next group reads it again, and the broadcasts then wait on L2: one core read the
 * 1B-shaped Q4_K_M file's ffn_down (Q4_K, Q6_K) at 0.75 / 0.74 of its streaming rate, 0.87 / 0.83
 * with this (the other layers 0.88 -> 0.89, the Q6_K classifier 0.84 -> 0.86; prefetching the
 * block sums as well added nothing). */
static inline __attribute__((always_inline)) void kr_prefetch_x(const act_view *a, int i, int nb)
{
    if (i < nb) pli_prefetch_lines(a->q + QK_K * i, QK_K);
}

/* Rows [r0, r1) (multiples of 16) of a repacked matrix for one token. */
static inline __attribute__((always_inline)) void
kr_decode(int six, const pl_tensor *w, const void *xq, float *out, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K);
    const size_t sbytes = kr16_sbytes(six), gbytes = (size_t)nb * 16 * block_bytes(w->type);
    const act_view a = act_layout(w, xq);
    for (long long r = r0; r < r1; r += 16) {
        const char *g = (const char *)w->data + (size_t)(r / 16) * gbytes;
        __m512 acc = _mm512_setzero_ps();
        if (!six) {
            for (int i = 0; i < nb; i++) {
                kr_prefetch_x(&a, i + 1, nb);
                pli_prefetch_ahead(g + i * sbytes, sbytes);
                acc = kr_q4_step(g + i * sbytes, &a, i, acc);
            }
        } else {
            const uint16_t *dp = (const uint16_t *)(g + nb * sbytes);
            for (int i0 = 0; i0 < nb; i0 += KR_DEFER) {
                const int n = nb - i0 < KR_DEFER ? nb - i0 : KR_DEFER;
                __m512i I[KR_DEFER];
                for (int i = 0; i < n; i++) {
                    kr_prefetch_x(&a, i0 + i + 1, nb);
                    pli_prefetch_ahead(g + (i0 + i) * sbytes, sbytes);
                    I[i] = kr_q6_sums(g + (i0 + i) * sbytes, &a, i0 + i);
                }
                for (int i = 0; i < n; i++) { /* k6_step */
                    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dp + 16 * (i0 + i))));
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I[i]), _mm512_mul_ps(d, _mm512_set1_ps(a.d[i0 + i])), acc);
                }
            }
        }
        _mm512_storeu_ps(out + r, acc);
    }
}

static void kr_decode_q4(const pl_tensor *w, const void *xq, float *out, long long r0, long long r1)
{
    kr_decode(0, w, xq, out, r0, r1);
}

static void kr_decode_q6(const pl_tensor *w, const void *xq, float *out, long long r0, long long r1)
{
    kr_decode(1, w, xq, out, r0, r1);
}

/* All four layouts' kernels: one token or a batch. */
static void kq_matmul(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out, long long ldo,
                      long long r0, long long r1)
{
    switch (w->type) {
    case PL_Q4_K: kq_batch_q4_K(w, xq, stride, ntok, out, ldo, r0, r1); break;
    case PL_Q6_K: kq_batch_q6_K(w, xq, stride, ntok, out, ldo, r0, r1); break;
    case PL_Q4_K_R16: kq_batch_q4_K_R16(w, xq, stride, ntok, out, ldo, r0, r1); break;
    default: kq_batch_q6_K_R16(w, xq, stride, ntok, out, ldo, r0, r1); break;
    }
}

/* Repacked Q4_K / Q6_K (PL_Q4_K_R16, PL_Q6_K_R16), made at load time by pl_repack. Rows go in
 * groups of 16, a group as large as its 16 rows, super-block after super-block (one contiguous
 * stream per group for the decode kernels); in each, chunk p (64 bytes) holds row r's part at 4r:
 * Q4_K: 36 chunks (2304 bytes), chunk p = dword p of each row's block: d|dmin, the 3 packed
 *   scale dwords, qs. Exactly what kq_columns gathers from the file's layout: plain loads instead.
 * Q6_K: 52 chunks (3328 bytes), then after the group's nb super-blocks a plane of the 16 rows' fp16
 *   d per super-block. Sub-block s (values 16s..16s+15) is chunks 3s..3s+2: for e < 3, byte j of
 *   row r's dword = value 16s + 4e + j (unsigned, 0..63) in bits 0-5, and bits 2e, 2e+1 of value
 *   16s + 12 + j in bits 6-7 (kr_q6_values undoes it in 6 operations per 4 value chunks, where
 *   the file's split ql/qh bits take ~18); chunks 48-51: byte 16s + r = row r's int8 scale s.
 * The kernels form the same exact integer sums from them and take the same float steps, so every
 * result equals the file layout's, bit for bit. */
static void kr16_repack_groups(const pl_tensor *w, char *dst, long long g0, long long g1)
{
    const int six = w->type == PL_Q6_K, nb = (int)(w->cols / QK_K);
    const size_t bb = block_bytes(w->type), rb = (size_t)nb * bb, gbytes = 16 * rb, sb = kr16_sbytes(six);
    const __m512i hi2 = _mm512_set1_epi8((char)0xc0);
    kq_unpacked k __attribute__((aligned(64)));
    for (long long g = g0; g < g1; g++) {
        const char *rows = (const char *)w->data + (size_t)g * gbytes;
        char *q = dst + (size_t)g * gbytes;
        for (int b = 0; b < nb; b++) {
            char *o = q + b * sb;
            if (!six) { /* the file's dwords, transposed */
                for (int c = 0; c < 3; c++) {
                    __m512i r[16];
                    kq_columns(rows + b * bb, rb, 16, c, 144, r);
                    for (int p = 0; p < 16 && 16 * c + p < 36; p++) _mm512_storeu_si512((void *)(o + 64 * (16 * c + p)), r[p]);
                }
                continue;
            }
            kq_unpack_q6(rows + b * bb, rb, 16, &k);
            for (int s = 0; s < 16; s++) { /* values 0-2 of the sub-block, value 3's bit pairs on top */
                const __m512i *v = k.u + 4 * s;
                for (int e = 0; e < 3; e++)
                    _mm512_storeu_si512((void *)(o + 64 * (3 * s + e)),
                                        _mm512_or_si512(v[e], _mm512_and_si512(_mm512_slli_epi32(v[3], 6 - 2 * e), hi2)));
                _mm_storeu_si128((__m128i *)(o + 64 * 48 + 16 * s), _mm512_cvtepi32_epi8(k.sc[s]));
            }
            for (int r = 0; r < 16; r++) memcpy(q + nb * sb + 32 * b + 2 * r, rows + r * rb + b * bb + 208, 2);
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------------
 * PL_Q8_G (llama2.c V2): row r = int8 data[r·cols …], its scales from scales[r·cols/gs]. The dot
 * is runq.c's matmul: an int32 sum per group, then val += (float)ival · ws · xs in group order. */

/* Rows · NT token activations, out[t·ldo] for token t (NT = 1 when decoding, 4 in the prefill
 * tile): each weight group is loaded once for the NT tokens, and each token's sums run in the
 * single-token order, so the results are bit-identical. */
static inline __attribute__((always_inline)) void
q8g_dots(const int8_t *w, const float *ws, const act_view *a, int NT, int cols, int gs, float *out,
         long long ldo)
{
    float val[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int g = 0, j = 0;
#ifdef PL_AVX2
    if (gs % 16 == 0) {
        __m128 vals = _mm_setzero_ps();
        for (; j < cols; j += gs, g++) {
            __m256i acc[4];
            __m128i s[4];
            for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_si256();
            int k = 0;
            for (; k + 32 <= gs; k += 32) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j + k));
                for (int t = 0; t < NT; t++)
                    acc[t] = _mm256_add_epi32(acc[t], dot_i8(wv, _mm256_loadu_si256((const __m256i *)(a[t].q + j + k))));
            }
            for (int t = 0; t < NT; t++)
                s[t] = _mm_add_epi32(_mm256_castsi256_si128(acc[t]), _mm256_extracti128_si256(acc[t], 1));
            if (k < gs) { /* a last 16 */
                __m128i wv = _mm_loadu_si128((const __m128i *)(w + j + k));
                for (int t = 0; t < NT; t++) {
                    __m128i xv = _mm_loadu_si128((const __m128i *)(a[t].q + j + k));
                    __m128i p = _mm_maddubs_epi16(_mm_sign_epi8(wv, wv), _mm_sign_epi8(xv, wv));
                    s[t] = _mm_add_epi32(s[t], _mm_madd_epi16(p, _mm_set1_epi16(1)));
                }
            }
            if (NT == 4) { /* the 4 groups' sums side by side, then the same f32 ops per lane */
                __m128i h = _mm_hadd_epi32(_mm_hadd_epi32(s[0], s[1]), _mm_hadd_epi32(s[2], s[3]));
                __m128 xd = _mm_setr_ps(a[0].d[g], a[1].d[g], a[2].d[g], a[3].d[g]);
                vals = _mm_add_ps(vals, _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(h), _mm_set1_ps(ws[g])), xd));
            } else {
                for (int t = 0; t < NT; t++) val[t] += (float)hsum_epi32_128(s[t]) * ws[g] * a[t].d[g];
            }
        }
        if (NT == 4) _mm_storeu_ps(val, vals);
    }
#endif
    for (; j < cols; j += gs, g++)
        for (int t = 0; t < NT; t++) {
            int32_t ival = 0;
            for (int k = 0; k < gs; k++) ival += (int32_t)a[t].q[j + k] * (int32_t)w[j + k];
            val[t] += (float)ival * ws[g] * a[t].d[g];
        }
    for (int t = 0; t < NT; t++) out[t * ldo] = val[t];
}

/* ------------------------------------------------------------------------------------------------
 * dispatch */

typedef float (*dot_fn)(const void *row, const act_view *a, int nb);
typedef void (*deq_fn)(const void *row, int nb, float *y);

static dot_fn dot_of(int type)
{
    switch (type) {
    case PL_Q4_0: return dot_q4_0;
    case PL_Q4_1: return dot_q4_1;
    case PL_Q5_0: return dot_q5_0;
    case PL_Q5_1: return dot_q5_1;
    case PL_Q8_0: return dot_q8_0;
    case PL_Q2_K: return dot_q2_K;
    case PL_Q3_K: return dot_q3_K;
    case PL_Q4_K: return dot_q4_K;
    case PL_Q5_K: return dot_q5_K;
    case PL_Q6_K: return dot_q6_K;
    default: return 0;
    }
}

static deq_fn deq_of(int type)
{
    switch (type) {
    case PL_Q4_0: return deq_q4_0;
    case PL_Q4_1: return deq_q4_1;
    case PL_Q5_0: return deq_q5_0;
    case PL_Q5_1: return deq_q5_1;
    case PL_Q8_0: return deq_q8_0;
    case PL_Q2_K: return deq_q2_K;
    case PL_Q3_K: return deq_q3_K;
    case PL_Q4_K: return deq_q4_K;
    case PL_Q5_K: return deq_q5_K;
    case PL_Q6_K: return deq_q6_K;
    default: return 0;
    }
}

#ifdef PL_AVX2
/* The 32-value types in tiles of TR rows x 4 tokens: the same step per block as dot32, with the
 * same even/odd accumulators, so each token's sum is bit for bit the single-token one (after
 * inlining, the compiler unpacks each weight block once for the 4 tokens). */
#define TR 2
static inline __attribute__((always_inline)) void
tile32(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1,
       step32_fn step, float side_k, dot_fn dot)
{
    const int nb = (int)(w->cols / QK);
    const size_t rb = (size_t)nb * block_bytes(w->type);
    const char *base = (const char *)w->data;
    long long r = r0;
    for (; r + TR <= r1; r += TR) {
        __m256 acc[2][TR][4];
        __m128 side[2][TR][4];
        for (int e = 0; e < 2; e++)
            for (int q = 0; q < TR; q++)
                for (int k = 0; k < 4; k++) acc[e][q][k] = _mm256_setzero_ps(), side[e][q][k] = _mm_setzero_ps();
        int i = 0;
        for (; i + 1 < nb; i += 2)
            for (int e = 0; e < 2; e++)
                for (int q = 0; q < TR; q++)
                    for (int k = 0; k < 4; k++)
                        step(base + (r + q) * rb, &a[k], i + e, &acc[e][q][k], &side[e][q][k]);
        if (i < nb)
            for (int q = 0; q < TR; q++)
                for (int k = 0; k < 4; k++) step(base + (r + q) * rb, &a[k], i, &acc[0][q][k], &side[0][q][k]);
        for (int q = 0; q < TR; q++)
            for (int k = 0; k < 4; k++)
                out[k * ldo + r + q] = pli_hsum8(_mm256_add_ps(acc[0][q][k], acc[1][q][k])) +
                                       side_k * lane1(_mm_add_ps(side[0][q][k], side[1][q][k]));
    }
    for (; r < r1; r++)
        for (int k = 0; k < 4; k++) out[k * ldo + r] = dot(base + r * rb, &a[k], nb);
}

static void tile_q4_0(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    tile32(w, a, out, ldo, r0, r1, step_q4_0, 0.0f, dot_q4_0);
}
static void tile_q8_0(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    tile32(w, a, out, ldo, r0, r1, step_q8_0, 0.0f, dot_q8_0);
}
static void tile_q4_1(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    tile32(w, a, out, ldo, r0, r1, step_q4_1, 1.0f, dot_q4_1);
}
/* Q5_0: a row x 4 tokens, dot_q5_0's arithmetic in the 4 lanes of one accumulator (the 4 exact
 * block sums side by side, then the same f32 multiply and fma per lane). */
static void tile_q5_0(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK);
    const act_view *av[4] = {&a[0], &a[1], &a[2], &a[3]};
    for (long long r = r0; r < r1; r++) {
        const blk_q5_0 *b = (const blk_q5_0 *)w->data + r * nb, *bv[4] = {b, b, b, b};
        __m128 acc = _mm_setzero_ps();
        for (int i = 0; i < nb; i++) acc = q5_0_step4(bv, av, i, 1, 0, acc);
        float v[4];
        _mm_storeu_ps(v, acc);
        for (int k = 0; k < 4; k++) out[k * ldo + r] = v[k];
    }
}
static void tile_q5_1(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    tile32(w, a, out, ldo, r0, r1, step_q5_1, 1.0f, dot_q5_1);
}

/* The K-quants and Q8_G in tiles of 1 row x 4 tokens: the single-token kernels with NT = 4. */
static void tile_q4_K(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K);
    for (long long r = r0; r < r1; r++)
        k45_dots((const blk_q4_K *)w->data + r * nb, a, nb, 4, 0, out + r, ldo);
}
static void tile_q5_K(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K);
    for (long long r = r0; r < r1; r++)
        k45_dots((const blk_q5_K *)w->data + r * nb, a, nb, 4, 1, out + r, ldo);
}
static void tile_q2_K(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K);
    for (long long r = r0; r < r1; r++) q2_dots((const blk_q2_K *)w->data + r * nb, a, nb, 4, out + r, ldo);
}
static void tile_q3_K(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K);
    for (long long r = r0; r < r1; r++) q3_dots((const blk_q3_K *)w->data + r * nb, a, nb, 4, out + r, ldo);
}
static void tile_q6_K(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK_K);
    for (long long r = r0; r < r1; r++) q6_dots((const blk_q6_K *)w->data + r * nb, a, nb, 4, out + r, ldo);
}
static void tile_q8_g(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0, long long r1)
{
    const int8_t *q = (const int8_t *)w->data;
    long long gpr = w->cols / w->group_size; /* groups per row */
    for (long long r = r0; r < r1; r++)
        q8g_dots(q + r * w->cols, w->scales + r * gpr, a, 4, (int)w->cols, w->group_size, out + r, ldo);
}

typedef void (*tile_fn)(const pl_tensor *w, const act_view *a, float *out, long long ldo, long long r0,
                        long long r1);

static tile_fn tile_of(int type)
{
    switch (type) {
    case PL_Q4_0: return tile_q4_0;
    case PL_Q4_1: return tile_q4_1;
    case PL_Q5_0: return tile_q5_0;
    case PL_Q5_1: return tile_q5_1;
    case PL_Q8_0: return tile_q8_0;
    case PL_Q2_K: return tile_q2_K;
    case PL_Q3_K: return tile_q3_K;
    case PL_Q4_K: return tile_q4_K;
    case PL_Q5_K: return tile_q5_K;
    case PL_Q6_K: return tile_q6_K;
    case PL_Q8_G: return tile_q8_g;
    default: return 0;
    }
}
#endif

#if defined(PL_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PL_VNNI512 1
/* Q8_0 and Q4_0 prompts with AVX-512 VNNI: tiles of VR rows x VT tokens, two blocks per 512-bit
 * register. Bit for bit dot32: the low 8 lanes carry the even blocks (dot32's acc0), the high 8
 * the odd ones (acc1); a lane's integer sum is exact however it is formed, and each lane takes
 * the same f32 multiply-add (scale fp16(d)·xd, then fma) in the same block order. vpdpbusd wants
 * unsigned × signed bytes: Q4_0 nibbles are unsigned, with −8·Σx per lane as the start value;
 * Q8_0 weights become w+128 (xor 0x80), with −128·Σx per lane as the start value. Decoding keeps
 * dot32 (one row at a time streams from memory best); the tile's sums equal its sums bit for bit. */
#define VR 4
#define VT 4
#define VROWS 64 /* rows per pass over all token tiles: their weights stay in L2 */

typedef struct {
    __m512i u;   /* the weights of a block pair as unsigned bytes, in q8 order */
    __m512 d;    /* fp16(d) of block i in lanes 0-7, of block i+1 in lanes 8-15 */
} vpair;

static inline __m512 v_d2(uint16_t d0, uint16_t d1)
{
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16((short)d1), _mm_set1_epi16((short)d0)));
}

static inline __attribute__((always_inline)) vpair
v_weights(int type, const char *row, int i, int two)
{
    vpair v;
    if (type == PL_Q8_0) {
        const blk_q8_0 *b = (const blk_q8_0 *)row + i;
        __m256i lo = _mm256_loadu_si256((const __m256i *)b[0].qs);
        __m256i hi = two ? _mm256_loadu_si256((const __m256i *)b[1].qs) : _mm256_setzero_si256();
        v.u = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8((char)0x80));
        v.d = v_d2(b[0].d, two ? b[1].d : 0);
    } else {
        const blk_q4_0 *b = (const blk_q4_0 *)row + i;
        __m128i lo = _mm_loadu_si128((const __m128i *)b[0].qs);
        __m128i hi = two ? _mm_loadu_si128((const __m128i *)b[1].qs) : _mm_setzero_si128();
        __m256i q = _mm256_set_m128i(hi, lo);
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
        z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)); /* lo_i hi_i lo_i+1 hi_i+1 */
        v.u = _mm512_and_si512(z, _mm512_set1_epi8(15));
        v.d = v_d2(b[0].d, two ? b[1].d : 0);
    }
    return v;
}

static inline __attribute__((always_inline)) void
v_tile(int type, const char *base, size_t rb, int nr, int nt, const act_view *a, int nb, float *out,
       long long ldo)
{
    __m512 acc[VR][VT];
    for (int r = 0; r < VR; r++)
        for (int t = 0; t < VT; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512i kx = _mm512_set1_epi8(type == PL_Q8_0 ? 1 : 8);
    const int shift = type == PL_Q8_0 ? 7 : 0;
    const __m512i xidx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    for (int i = 0; i < nb; i += 2) {
        const int two = i + 1 < nb;
        vpair w[VR];
        for (int r = 0; r < nr; r++) w[r] = v_weights(type, base + r * rb, i, two);
        for (int t = 0; t < nt; t++) {
            __m512i x;
            __m512 xd;
            if (two) {
                x = _mm512_loadu_si512((const void *)(a[t].q + QK * i));
                xd = _mm512_permutexvar_ps(xidx, _mm512_castps128_ps512(_mm_loadu_ps(a[t].ds + 2 * i)));
            } else {
                x = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(a[t].q + QK * i)));
                xd = _mm512_permutexvar_ps(xidx, _mm512_castps128_ps512(_mm_set_ss(a[t].ds[2 * i])));
            }
            __m512i c = _mm512_sub_epi32(_mm512_setzero_si512(),
                                         _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), kx, x), shift));
            for (int r = 0; r < nr; r++) {
                __m512i p = _mm512_dpbusd_epi32(c, w[r].u, x);
                acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(w[r].d, xd), _mm512_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            out[t * ldo + r] = pli_hsum8(_mm256_add_ps(_mm512_castps512_ps256(acc[r][t]),
                                                       _mm512_extractf32x8_ps(acc[r][t], 1)));
}

static inline __attribute__((always_inline)) void
v_batch(int type, const pl_tensor *w, const void *xq, long long stride, int ntok, float *out,
        long long ldo, long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK);
    const size_t rb = (size_t)nb * block_bytes(type);
    const char *base = (const char *)w->data;
    for (long long rc = r0; rc < r1; rc += VROWS) {
        long long rend = rc + VROWS < r1 ? rc + VROWS : r1;
        for (int t = 0; t + VT <= ntok; t += VT) {
            act_view a[VT];
            for (int k = 0; k < VT; k++) a[k] = act_layout(w, (const char *)xq + (t + k) * stride);
            long long r = rc;
            for (; r + VR <= rend; r += VR) v_tile(type, base + r * rb, rb, VR, VT, a, nb, out + t * ldo + r, ldo);
            if (r < rend) v_tile(type, base + r * rb, rb, (int)(rend - r), VT, a, nb, out + t * ldo + r, ldo);
        }
    }
}

#endif /* PL_VNNI512 */

#if defined(PL_VNNI512) || (defined(PL_AVX2) && defined(__F16C__))
#define PL_R16 1 /* the repacked Q4_0, Q5_0 and Q8_0 layout */
/* ------------------------------------------------------------------------------------------------
 * Repacked Q4_0 / Q5_0 / Q8_0 (PL_Q4_0_R16, PL_Q5_0_R16, PL_Q8_0_R16), made at load time by
 * pl_repack.
 *
 * Rows go in groups of 16, and groups in sets of 4 (the last set: the groups left over, 1-4). A
 * set holds the same bytes as its rows, rearranged block by block: for each block b, each group's
 * 16 fp16 scales d (32 bytes), then each group's quants in turn (a set of 1 or 3 groups, whose
 * scales would not fill whole lines: the quants first, then the scales). A group's quants of a
 * block are chunks k of 64 bytes, row r's 4 bytes at 4r:
 *     Q8_0: 8 chunks, chunk k = values 4k..4k+3 as unsigned bytes (w xor 0x80 = w + 128);
 *     Q4_0: 4 chunks, chunk k = qs[4k..4k+3] (low nibbles: values 4k.., high: values 16+4k..);
 *     Q5_0: Q4_0's 4 chunks, then 64 bytes of 5th bits: bit k of byte 4r+j = the 5th bit of
 *           value 4k+j of row r (bit 4k+j of its qh), i.e. byte 4r+j of the unpacked chunk k.
 * The one-token kernel reads a set's 4 groups together, so it reads the set front to back: one
 * sequential stream per thread. One core read the 1B-shaped Q4_0 file's layers from memory at
 * 0.65 of its plain streaming rate when each group was a plane of quants and a plane of scales
 * (8 streams), 0.87 as sets with the scales last (lines read ahead of the stream, a miss each),
 * 0.94 as now; stories110M Q4_0 0.46, 0.77, 0.91; Q8_0 0.58, 0.66, 0.75-0.8 (0.83 with the two
 * chains of r16_tile), all on a Zen 4 EPYC, where software prefetch of the weights on top
 * measured slower (a block or two ahead). On a Zen 5 EPYC one core read the 1B Q8_0 and Q4_0
 * layers in this layout at 0.90 of its streaming rate without it, and at 0.93-0.98 with each
 * block's lines prefetched PL_AHEAD bytes ahead (kernels.h).
 * One vpdpbusd of a chunk with 4 activation bytes broadcast adds 4 products to each of 16 rows,
 * so a block's integer sum s (exact) lands in the lane of its row, with no horizontal sums, and
 * every (row, token) computes  acc = fma(fp16(d)·xd, (float)s, acc)  block after block from 0.
 * Every kernel below (one token, or a tile of 1-8 tokens) does exactly that per row and token,
 * so batched results equal single-token ones bit for bit. The unsigned offset (128, 16 or 8)
 * comes back through corr = −offset·Σq, the start value of each block's integer sum. Builds
 * without AVX-512 VNNI read the same layout with AVX2 kernels of their own (after the VNNI ones)
 * that reach the same exact s for 8 rows at a time, so every build gives the same bits. */
#define RG 16
#define R16_SET 4 /* groups of a set */

/* Quants bytes of a group's block (type: a repacked type or the file type it comes from) */
static inline size_t r16_qbytes(int type)
{
    return type == PL_Q8_0_R16 || type == PL_Q8_0 ? 512 : type == PL_Q5_0_R16 || type == PL_Q5_0 ? 320 : 256;
}

/* Where a group's blocks are: block b's quants at q + b·qs, its scales at d + b·ds. In a set of
 * ng groups, group j + 1's quants follow group j's (q + qb), and its scales too (d + 32). */
typedef struct {
    const char *q, *d;
    size_t qs, ds;
} r16_view;

/* Group g of a repacked tensor of `groups` groups (base: its first byte) */
static inline r16_view r16_group_view(int type, const char *base, long long groups, int nb, long long g)
{
    const size_t qb = r16_qbytes(type), gbytes = (size_t)nb * (qb + 32);
    const long long set = g / R16_SET;
    const int ng = groups - set * R16_SET < R16_SET ? (int)(groups - set * R16_SET) : R16_SET;
    const int j = (int)(g - set * R16_SET);
    const char *s = base + (size_t)set * R16_SET * gbytes;
    const size_t stride = (size_t)ng * (qb + 32);
    if (ng % 2 == 0) /* the scales first, in whole lines */
        return (r16_view){s + ng * 32 + j * qb, s + 32 * j, stride, stride};
    return (r16_view){s + j * qb, s + ng * qb + 32 * j, stride, stride};
}

#endif /* PL_R16 */

#ifdef PL_VNNI512
/* A Q4_0 or Q5_0 block of a group (its quants at q) as 8 chunks of unsigned bytes, chunk k =
 * values 4k..4k+3 of the 16 rows. Q5_0: + 16 where the 5th bit is set (bit k of each byte of its
 * bits plane; a byte test per chunk was measured 4% faster than 8 stored 64-bit masks). */
static inline __attribute__((always_inline)) void r16_small_values(int type, const char *q, __m512i w[8])
{
    const __m512i m4 = _mm512_set1_epi8(15);
    for (int k = 0; k < 4; k++) {
        __m512i z = _mm512_loadu_si512((const void *)(q + 64 * k));
        w[k] = _mm512_and_si512(z, m4);
        w[k + 4] = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
    }
    if (type == PL_Q5_0_R16) {
        __m512i h = _mm512_loadu_si512((const void *)(q + 256));
        for (int k = 0; k < 8; k++)
            w[k] = _mm512_mask_add_epi8(w[k], _mm512_test_epi8_mask(h, _mm512_set1_epi8((char)(1 << k))), w[k],
                                        _mm512_set1_epi8(16));
    }
}

/* One token, NG (1-4) groups that follow each other in a set (v: the first; NG = 1: any group) */
static inline __attribute__((always_inline)) void
r16_tile(int type, r16_view v, int NG, const act_view *a, int nb, float *out)
{
    const size_t qb = r16_qbytes(type);
    __m512 acc[R16_SET];
    for (int g = 0; g < NG; g++) acc[g] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *x = a->q + QK * b;
        /* x's next lines into L1 ahead of use (see kr_prefetch_x): one core read the 1B Q8_0
         * ffn_down (8192 values a row) at 0.85 -> 0.87 of its rate, Q4_0 unchanged */
        if ((b & 1) == 0 && b + 4 < nb) _mm_prefetch((const char *)(x + 4 * QK), _MM_HINT_T0);
        pli_prefetch_ahead(v.q + b * v.qs, v.qs);
        for (int g = 0; g < NG; g++) {
            const char *q = v.q + b * v.qs + g * qb;
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v.d + b * v.ds + 32 * g)));
            __m512i s0 = _mm512_set1_epi32(a->corr[b]);
            __m512i s1 = _mm512_setzero_si512();
            /* two chains of 4 (the sum is exact in any order): one core streamed the 1B Q8_0
             * layers at 0.78 of its rate with one chain of 8 per group, 0.87-0.89 with two (Q4_0
             * 0.91 -> 0.92) */
            if (type == PL_Q8_0_R16) {
                /* Q8_0: a loop of 4 (its weights loaded as used, the activation bytes broadcast
                 * per group), not unrolled. Unrolled, GCC loads a block's 8 broadcasts once for
                 * the 4 groups and each group's 8 chunks back to back, and one core read the 1B
                 * Q8_0 matrices at 0.81-0.87 of a plain sum over the same bytes; as this loop,
                 * at 0.97-0.99. (Q4_0's unpacking, rolled the same way, measured no change.) */
#pragma GCC unroll 1
                for (int k = 0; k < 8; k += 2) {
                    s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512((const void *)(q + 64 * k)),
                                             _mm512_broadcastd_epi32(_mm_loadu_si32(x + 4 * k)));
                    s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512((const void *)(q + 64 * k + 64)),
                                             _mm512_broadcastd_epi32(_mm_loadu_si32(x + 4 * k + 4)));
                }
            } else {
                __m512i w[8];
                r16_small_values(type, q, w);
                for (int k = 0; k < 8; k++) { /* 4 activation bytes in every lane, from memory */
                    __m512i xk = _mm512_broadcastd_epi32(_mm_loadu_si32(x + 4 * k));
                    if (k & 1) s1 = _mm512_dpbusd_epi32(s1, w[k], xk);
                    else s0 = _mm512_dpbusd_epi32(s0, w[k], xk);
                }
            }
            s0 = _mm512_add_epi32(s0, s1);
            __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(a->ds[2 * b]));
            acc[g] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(s0), acc[g]);
        }
    }
    for (int g = 0; g < NG; g++) _mm512_storeu_ps(out + RG * g, acc[g]);
}

/* One group, NT (2-8) tokens: r16_tile's arithmetic per (row, token) with the token loop unrolled
 * inside the chunk loop, so the NT integer sums and NT float accumulators stay in registers (the
 * generic tile kept them on the stack and ran one token's 8-deep vpdpbusd chain at a time). */
/* Blocks ahead to prefetch a Q8_0 group's quants in token tiles (the hardware prefetcher alone
 * lagged: 8 streams of stories110M Q8_0 measured +3-5% on top of the register tile below, both
 * together +15-20%) */
#define R16_PF 8
static inline __attribute__((always_inline)) void
r16_tile_nt(int type, r16_view v, int NT, const act_view *a, int nb, float *out, long long ldo)
{
    __m512 acc[8];
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const char *q = v.q + b * v.qs;
        __m512i w[8];
        if (type == PL_Q8_0_R16) {
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                _mm_prefetch(q + R16_PF * v.qs + 64 * k, _MM_HINT_T0);
                w[k] = _mm512_loadu_si512((const void *)(q + 64 * k));
            }
        } else {
            r16_small_values(type, q, w);
        }
        __m512i s[8];
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) s[t] = _mm512_set1_epi32(a[t].corr[b]);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++) {
                int32_t xv;
                memcpy(&xv, a[t].q + QK * b + 4 * k, 4);
                s[t] = _mm512_dpbusd_epi32(s[t], w[k], _mm512_set1_epi32(xv));
            }
        }
        __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v.d + b * v.ds)));
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(a[t].ds[2 * b]));
            acc[t] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(s[t]), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

/* One group of 16 rows for ntok tokens, in tiles of up to 8 tokens. */
static inline __attribute__((always_inline)) void
r16_group(int type, r16_view v, const act_view *acts, int ntok, int nb, float *out, long long ldo)
{
    for (int t = 0; t < ntok; t += 8) {
        float *o = out + t * ldo;
        switch (ntok - t) {
        case 1: r16_tile(type, v, 1, acts + t, nb, o); break;
        case 2: r16_tile_nt(type, v, 2, acts + t, nb, o, ldo); break;
        case 3: r16_tile_nt(type, v, 3, acts + t, nb, o, ldo); break;
        case 4: r16_tile_nt(type, v, 4, acts + t, nb, o, ldo); break;
        case 5: r16_tile_nt(type, v, 5, acts + t, nb, o, ldo); break;
        case 6: r16_tile_nt(type, v, 6, acts + t, nb, o, ldo); break;
        case 7: r16_tile_nt(type, v, 7, acts + t, nb, o, ldo); break;
        default: r16_tile_nt(type, v, 8, acts + t, nb, o, ldo); break;
        }
    }
}

/* A Q4_0 or Q5_0 group as the Q8_0 kernels read it, in planes: each block's values as bytes 0..15
 * or 0..31 (chunk k: values 4k..4k+3; 512 bytes a block), then each block's scales (32 bytes).
 * The start value of each block's sum (corr = −8·Σq or −16·Σq) is unchanged. */
#define R16_UNPACK_NB 256 /* up to 8192 columns: 139 KB per thread (thread-local, not stack) */
static _Thread_local _Alignas(64) char unpacked[R16_UNPACK_NB * 544];

static inline __attribute__((always_inline)) r16_view unpack_r16(int type, r16_view v, int nb, char *dst)
{
    for (int b = 0; b < nb; b++) {
        __m512i w[8];
        r16_small_values(type, v.q + v.qs * b, w);
        for (int k = 0; k < 8; k++) _mm512_store_si512((void *)(dst + 512 * b + 64 * k), w[k]);
        memcpy(dst + 512 * (size_t)nb + 32 * b, v.d + v.ds * b, 32);
    }
    return (r16_view){dst, dst + 512 * (size_t)nb, 512, 32};
}

#elif defined(PL_R16)
/* Without AVX-512 VNNI (AVX2 and F16C). A 64-byte chunk is two halves of 8 rows x 4 bytes, and
 * for a half each row's block sum becomes one int32 lane:
 *   Q4_0: vpmaddubsw of the nibbles with 4 activation bytes broadcast gives each row's two pair
 *         sums; a block's 8 of them (4 chunks' low and high nibbles) add up exactly in int16 (at
 *         most 8·2·15·127 = 30480 in size), one vpmaddwd makes them int32, and corr (−8·Σx) is
 *         added;
 *   Q5_0: the same with the 5th bits added to the nibbles (values up to 31), in two int16 sums of
 *         4 (at most 31496), and corr = −16·Σx;
 *   Q8_0: the weights back to signed (xor 0x80), then per chunk dot_i8's |w| · sign(x, w) pairs
 *         (at most 2·128·127 = 32512) and a vpmaddwd to int32: Σ w·x, which is corr + Σ(w+128)·x.
 * That is r16_tile's exact integer sum s, and the same f32 steps follow it, so the results are
 * the AVX-512 build's bit for bit, where tile32's dots left each block's float work to one row at
 * a time (8 lanes of 4 products). */
static inline __attribute__((always_inline)) __m256i
r16_half_sum(int type, const __m256i w[8], const char *q, int h, const int8_t *x, int32_t corr)
{
    if (type == PL_Q8_0_R16) { /* w unused: the quants at q, half h */
        __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            int32_t xv;
            memcpy(&xv, x + 4 * k, 4);
            __m256i wk = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + 64 * k + 32 * h)),
                                          _mm256_set1_epi8((char)0x80));
            __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wk), _mm256_sign_epi8(_mm256_set1_epi32(xv), wk));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        }
        return s;
    }
    __m256i s16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) { /* w[k]: values 4k..4k+3 (k < 4) or 16+4(k-4).. of each row */
        int32_t xv;
        memcpy(&xv, x + (k < 4 ? 4 * k : 16 + 4 * (k - 4)), 4);
        /* Q5_0 (values up to 31): 4 pair sums at most 4·2·31·127 = 31496 in one int16 sum */
        const int part = type == PL_Q5_0_R16 && k >= 4;
        s16[part] = _mm256_add_epi16(s16[part], _mm256_maddubs_epi16(w[k], _mm256_set1_epi32(xv)));
    }
    __m256i s = _mm256_madd_epi16(s16[0], _mm256_set1_epi16(1));
    if (type == PL_Q5_0_R16) s = _mm256_add_epi32(s, _mm256_madd_epi16(s16[1], _mm256_set1_epi16(1)));
    return _mm256_add_epi32(s, _mm256_set1_epi32(corr));
}

/* Half h of a Q4_0 or Q5_0 group's block (its quants at q) as r16_half_sum's 8 vectors of
 * unsigned values: the nibbles, and for Q5_0 + 16 where bit k of the byte in its bits plane is
 * set (moved to bit 4 by a 16-bit shift; what the shift carries in from the next byte lies
 * outside bit 4) */
static inline __attribute__((always_inline)) void r16_half_values(int type, const char *q, int h, __m256i w[8])
{
    if (type == PL_Q8_0_R16)
        return; /* read by r16_half_sum itself */
    const __m256i m4 = _mm256_set1_epi8(15);
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        __m256i z = _mm256_loadu_si256((const __m256i *)(q + 64 * k + 32 * h));
        w[k] = _mm256_and_si256(z, m4);
        w[k + 4] = _mm256_and_si256(_mm256_srli_epi16(z, 4), m4);
    }
    if (type == PL_Q5_0_R16) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(q + 256 + 32 * h)), b4 = _mm256_set1_epi8(16);
        w[0] = _mm256_add_epi8(w[0], _mm256_and_si256(_mm256_slli_epi16(bits, 4), b4));
        w[1] = _mm256_add_epi8(w[1], _mm256_and_si256(_mm256_slli_epi16(bits, 3), b4));
        w[2] = _mm256_add_epi8(w[2], _mm256_and_si256(_mm256_slli_epi16(bits, 2), b4));
        w[3] = _mm256_add_epi8(w[3], _mm256_and_si256(_mm256_slli_epi16(bits, 1), b4));
        w[4] = _mm256_add_epi8(w[4], _mm256_and_si256(bits, b4));
        w[5] = _mm256_add_epi8(w[5], _mm256_and_si256(_mm256_srli_epi16(bits, 1), b4));
        w[6] = _mm256_add_epi8(w[6], _mm256_and_si256(_mm256_srli_epi16(bits, 2), b4));
        w[7] = _mm256_add_epi8(w[7], _mm256_and_si256(_mm256_srli_epi16(bits, 3), b4));
    }
}

/* One token, NG (1-4) groups that follow each other in a set (v: the first; NG = 1: any group) */
static inline __attribute__((always_inline)) void
r16_tile(int type, r16_view v, int NG, const act_view *a, int nb, float *out)
{
    const size_t qb = r16_qbytes(type);
    __m256 acc[2 * R16_SET];
#pragma GCC unroll 8
    for (int i = 0; i < 2 * NG; i++) acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *x = a->q + QK * b;
        if ((b & 1) == 0 && b + 4 < nb) _mm_prefetch((const char *)(x + 4 * QK), _MM_HINT_T0);
        pli_prefetch_ahead(v.q + b * v.qs, v.qs);
        const __m256 xd = _mm256_set1_ps(a->ds[2 * b]);
#pragma GCC unroll 4
        for (int g = 0; g < NG; g++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const char *q = v.q + b * v.qs + g * qb;
                __m256i w[8];
                r16_half_values(type, q, h, w);
                __m256i s = r16_half_sum(type, w, q, h, x, a->corr[b]);
                __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v.d + b * v.ds + 32 * g + 16 * h)));
                acc[2 * g + h] = _mm256_fmadd_ps(_mm256_mul_ps(dw, xd), _mm256_cvtepi32_ps(s), acc[2 * g + h]);
            }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 2 * NG; i++) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

/* One half of a group, NT (1-4) tokens: each block's Q4_0 nibbles unpacked once for all of them
 * (Q8_0 weights are read per token from L1; unpacking them once, chunk by chunk with the tokens'
 * sums in registers, measured no faster: 1B Q8_0 prompts 97-100 against 98 tok/s) */
static inline __attribute__((always_inline)) void
r16_half_nt(int type, r16_view v, int h, int NT, const act_view *a, int nb, float *out, long long ldo)
{
    __m256 acc[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const char *q = v.q + b * v.qs;
        __m256i w[8];
        r16_half_values(type, q, h, w);
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v.d + b * v.ds + 16 * h)));
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            __m256i s = r16_half_sum(type, w, q, h, a[t].q + QK * b, a[t].corr[b]);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(a[t].ds[2 * b])), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + t * ldo + 8 * h, acc[t]);
}

/* One group of 16 rows for ntok tokens, in tiles of up to 4 tokens, half by half. */
static inline __attribute__((always_inline)) void
r16_group(int type, r16_view v, const act_view *acts, int ntok, int nb, float *out, long long ldo)
{
    for (int t = 0; t < ntok; t += 4) {
        float *o = out + t * ldo;
        for (int h = 0; h < 2; h++)
            switch (ntok - t) {
            case 1: r16_half_nt(type, v, h, 1, acts + t, nb, o, ldo); break;
            case 2: r16_half_nt(type, v, h, 2, acts + t, nb, o, ldo); break;
            case 3: r16_half_nt(type, v, h, 3, acts + t, nb, o, ldo); break;
            default: r16_half_nt(type, v, h, 4, acts + t, nb, o, ldo); break;
            }
    }
}
#endif

#ifdef PL_R16
static inline __attribute__((always_inline)) void
r16_rows(int type, const pl_tensor *w, const act_view *acts, int ntok, float *out, long long ldo,
         long long r0, long long r1)
{
    const int nb = (int)(w->cols / QK);
    const long long groups = w->rows / RG;
    const char *base = (const char *)w->data;
    long long g = r0 / RG, g1 = r1 / RG;
    if (ntok == 1) { /* whole sets as one stream, any groups of a set outside [g0, g1) one by one */
        while (g < g1) {
            const long long first = g / R16_SET * R16_SET;
            const int ng = groups - first < R16_SET ? (int)(groups - first) : R16_SET;
            const r16_view v = r16_group_view(type, base, groups, nb, g);
            float *o = out + g * RG;
            if (g == first && g + ng <= g1) {
                switch (ng) {
                case 4: r16_tile(type, v, 4, acts, nb, o); break;
                case 3: r16_tile(type, v, 3, acts, nb, o); break;
                case 2: r16_tile(type, v, 2, acts, nb, o); break;
                default: r16_tile(type, v, 1, acts, nb, o); break;
                }
                g += ng;
            } else {
                r16_tile(type, v, 1, acts, nb, o);
                g++;
            }
        }
        return;
    }
    for (; g < g1; g++) {
        const r16_view v = r16_group_view(type, base, groups, nb, g);
#ifdef PL_VNNI512
        if (type != PL_Q8_0_R16 && ntok > 8 && nb <= R16_UNPACK_NB) {
            /* many token tiles: unpack the group's values once, then read them as Q8_0 does */
            r16_group(PL_Q8_0_R16, unpack_r16(type, v, nb, unpacked), acts, ntok, nb, out + g * RG, ldo);
            continue;
        }
#endif
        r16_group(type, v, acts, ntok, nb, out + g * RG, ldo);
    }
}

static void r16_batch(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out,
                      long long ldo, long long r0, long long r1)
{
    for (int t0 = 0; t0 < ntok; t0 += 256) { /* act views on the stack, 256 tokens at a time */
        act_view acts[256];
        int n = ntok - t0 < 256 ? ntok - t0 : 256;
        for (int t = 0; t < n; t++) acts[t] = act_layout(w, (const char *)xq + (t0 + t) * stride);
        if (w->type == PL_Q8_0_R16) r16_rows(PL_Q8_0_R16, w, acts, n, out + t0 * ldo, ldo, r0, r1);
        else if (w->type == PL_Q5_0_R16) r16_rows(PL_Q5_0_R16, w, acts, n, out + t0 * ldo, ldo, r0, r1);
        else r16_rows(PL_Q4_0_R16, w, acts, n, out + t0 * ldo, ldo, r0, r1);
    }
}

static void r16_repack_groups(const pl_tensor *w, char *dst, long long g0, long long g1)
{
    const int nb = (int)(w->cols / QK), nk = w->type == PL_Q8_0 ? 8 : 4; /* 4-byte chunks per block */
    const int q5 = w->type == PL_Q5_0, qs = q5 ? 6 : 2; /* the quants' offset in a block */
    const uint32_t flip = w->type == PL_Q8_0 ? 0x80808080u : 0; /* Q8_0: w + 128, unsigned */
    const size_t bb = block_bytes(w->type), gbytes = (size_t)nb * RG * bb;
    for (long long g = g0; g < g1; g++) {
        const char *rows = (const char *)w->data + (size_t)g * gbytes; /* 16 rows in a row */
        const r16_view v = r16_group_view(w->type, dst, w->rows / RG, nb, g);
        for (int b = 0; b < nb; b++) {
            char *q = (char *)v.q + v.qs * b, *d = (char *)v.d + v.ds * b;
            uint8_t hb[64] = {0};
            for (int r = 0; r < RG; r++) {
                const char *blk = rows + ((size_t)r * nb + b) * bb;
                memcpy(d + 2 * r, blk, 2);
                for (int k = 0; k < nk; k++) {
                    uint32_t v32;
                    memcpy(&v32, blk + qs + 4 * k, 4);
                    v32 ^= flip;
                    memcpy(q + 64 * k + 4 * r, &v32, 4);
                }
                if (q5) {
                    uint32_t qh;
                    memcpy(&qh, blk + 2, 4);
                    for (int k = 0; k < 8; k++)
                        for (int j = 0; j < 4; j++) hb[4 * r + j] |= (uint8_t)(((qh >> (4 * k + j)) & 1) << k);
                }
            }
            if (q5) memcpy(q + 256, hb, 64);
        }
    }
}
#endif

long long pli_row_bytes(const pl_tensor *w)
{
    if (w->type == PL_Q8_G) /* int8 values and a float scale per group */
        return w->cols + w->cols / (w->group_size > 0 ? w->group_size : w->cols) * 4;
    return w->cols / block_values(w) * (long long)block_bytes(w->type);
}

long long pli_repack_bytes(const pl_tensor *w)
{
#ifdef PL_KQ512
    if ((w->type == PL_Q4_K || w->type == PL_Q6_K) && w->rows % 16 == 0 && w->cols % QK_K == 0)
        return w->rows * (w->cols / QK_K) * (long long)block_bytes(w->type);
#endif
#ifdef PL_R16
    if ((w->type == PL_Q4_0 || w->type == PL_Q5_0 || w->type == PL_Q8_0) && w->rows % RG == 0 &&
        w->cols % QK == 0)
        return w->rows * (w->cols / QK) * (long long)block_bytes(w->type);
#endif
    (void)w;
    return 0;
}

int pli_repack(const pl_tensor *w, void *dst, long long g0, long long g1)
{
#ifdef PL_KQ512
    if ((w->type == PL_Q4_K || w->type == PL_Q6_K) && pli_repack_bytes(w) > 0) {
        kr16_repack_groups(w, (char *)dst, g0, g1);
        return w->type == PL_Q4_K ? PL_Q4_K_R16 : PL_Q6_K_R16;
    }
#endif
#ifdef PL_R16
    if (pli_repack_bytes(w) > 0) {
        r16_repack_groups(w, (char *)dst, g0, g1);
        return w->type == PL_Q8_0 ? PL_Q8_0_R16 : w->type == PL_Q5_0 ? PL_Q5_0_R16 : PL_Q4_0_R16;
    }
#endif
    (void)dst, (void)g0, (void)g1;
    return w->type;
}

int pli_batch_all_rows(int type)
{
#ifdef PL_KQ512
    return type == PL_Q4_K || type == PL_Q6_K || is_kr16(type);
#else
    (void)type;
    return 0;
#endif
}

void pli_matmul_batch(const pl_tensor *w, const void *xq, long long stride, int ntok, float *out,
                      long long ldo, long long r0, long long r1)
{
    int t = 0;
#ifdef PL_KQ512
    if (w->type == PL_Q4_K || w->type == PL_Q6_K || is_kr16(w->type)) {
        kq_matmul(w, xq, stride, ntok, out, ldo, r0, r1);
        return;
    }
#endif
#ifdef PL_R16
    if (is_r16(w->type)) {
        r16_batch(w, xq, stride, ntok, out, ldo, r0, r1);
        return;
    }
#endif
#ifdef PL_VNNI512
    if (w->type == PL_Q8_0 || w->type == PL_Q4_0) {
        if (w->type == PL_Q8_0) v_batch(PL_Q8_0, w, xq, stride, ntok, out, ldo, r0, r1);
        else v_batch(PL_Q4_0, w, xq, stride, ntok, out, ldo, r0, r1);
        t = ntok / VT * VT;
    }
#endif
#ifdef PL_AVX2
    tile_fn tile = tile_of(w->type);
    if (tile && t == 0) {
        for (; t + 4 <= ntok; t += 4) {
            act_view a[4];
            for (int k = 0; k < 4; k++) a[k] = act_layout(w, (const char *)xq + (t + k) * stride);
            tile(w, a, out + t * ldo, ldo, r0, r1);
        }
    }
#endif
    for (; t < ntok; t++)
        pli_matvec_rows(w, (const char *)xq + t * stride, out + t * ldo, r0, r1);
}

void pli_matvec_rows(const pl_tensor *w, const void *xq, float *out, long long r0, long long r1)
{
#ifdef PL_KQ512
    if (is_kr16(w->type)) {
        (w->type == PL_Q4_K_R16 ? kr_decode_q4 : kr_decode_q6)(w, xq, out, r0, r1);
        return;
    }
#endif
    act_view a = act_layout(w, xq);
#ifdef PL_R16
    if (is_r16(w->type)) {
        r16_batch(w, xq, 0, 1, out, 0, r0, r1);
        return;
    }
#endif
    if (w->type == PL_Q8_G) {
        const int8_t *q = (const int8_t *)w->data;
        long long gpr = w->cols / w->group_size; /* groups per row */
        for (long long r = r0; r < r1; r++)
            q8g_dots(q + r * w->cols, w->scales + r * gpr, &a, 1, (int)w->cols, w->group_size, out + r, 0);
        return;
    }
    dot_fn dot = dot_of(w->type);
    if (!dot) {
        for (long long r = r0; r < r1; r++) out[r] = NAN;
        return;
    }
    int nb = (int)(w->cols / block_values(w));
    size_t row_bytes = (size_t)nb * block_bytes(w->type);
    const char *base = (const char *)w->data;
#ifdef PL_AVX2
    if (w->type == PL_Q5_0) /* 4 rows at a time, the rest one by one */
        for (; r0 + 4 <= r1; r0 += 4) q5_0_rows4(base + (size_t)r0 * row_bytes, row_bytes, &a, nb, out + r0);
#endif
#if defined(PL_AVX2) && !defined(KQ_NO_ROWS4)
    if (w->type == PL_Q4_K || w->type == PL_Q6_K) /* 4 rows at a time, the rest one by one */
        for (; r0 + 4 <= r1; r0 += 4)
            (w->type == PL_Q4_K ? k4_rows4 : q6_rows4)(base + (size_t)r0 * row_bytes, row_bytes, &a, nb, out + r0);
#endif
    for (long long r = r0; r < r1; r++) out[r] = dot(base + (size_t)r * row_bytes, &a, nb);
}

void pli_dequantize_row(const pl_tensor *w, long long row, float *out)
{
    if (w->type == PL_Q8_G) {
        const int8_t *q = (const int8_t *)w->data + row * w->cols;
        const float *s = w->scales + row * (w->cols / w->group_size);
        for (long long j = 0; j < w->cols; j++) out[j] = (float)q[j] * s[j / w->group_size];
        return;
    }
    deq_fn deq = deq_of(w->type);
    if (!deq) {
        for (long long j = 0; j < w->cols; j++) out[j] = NAN;
        return;
    }
    int nb = (int)(w->cols / block_values(w));
    deq((const char *)w->data + (size_t)row * nb * block_bytes(w->type), nb, out);
}
