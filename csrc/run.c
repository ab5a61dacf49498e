/* The Llama forward pass (llama2.c's run.c, generalised to typed weight tensors and, by data, to
 * Llama 3 / Qwen2: head_dim, q/k/v biases, RoPE frequency divisors, NeoX pair layout).
 *
 * One OpenMP parallel region per call (none with one thread): every step below is either a
 * work-shared loop or a matmul split over the team (pl__team_matmuls), so the team is not forked
 * and joined once per matmul. A call takes a batch of tokens (the prompt), so each weight row is
 * read once per batch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

int pl_abi_version(void) { return PL_ABI_VERSION; }

int pl_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int pl_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

const char *pl_build_info(void)
{
    return "pyllama core"
#ifdef _OPENMP
           " openmp"
#endif
#if defined(__AVX2__) && defined(__FMA__)
           " avx2 fma"
#endif
#ifdef __F16C__
           " f16c"
#endif
#ifdef __AVX512F__
           " avx512f"
#endif
#if defined(__AVX2__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) /* quants.c's PL_VNNI512 */
           " avx512vnni"
#endif
        ;
}

/* ------------------------------------------------------------------------------------------------
 * building blocks */

static void rmsnorm(float *o, const float *x, const float *weight, int size, float eps)
{
    float ss = 0.0f;
    for (int j = 0; j < size; j++) ss += x[j] * x[j];
    ss /= size;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

/* Position pos's RoPE rotation for each pair of a head: rope[i] = cos, rope[i+1] = sin of
 * pos * theta^(-i/head_size) / freqs[i/2] (i even; freqs = NULL: no divisors). llama2.c's
 * arithmetic, computed once per token, not per layer. */
static void rope_table(float *rope, int pos, int head_size, float theta, const float *freqs)
{
    for (int i = 0; i < head_size; i += 2) {
        float freq = 1.0f / powf(theta, i / (float)head_size);
        if (freqs) freq /= freqs[i / 2];
        float val = pos * freq;
        rope[i] = cosf(val);
        rope[i + 1] = sinf(val);
    }
}

/* Rotate the pairs (i, i+1) in rows [r0, r1) (r0 even) of vec, heads of head_size values laid end
 * to end (PL_ROPE_NORM). */
static void rope_rows(float *vec, const float *rope, long long r0, long long r1, int head_size)
{
    for (long long i = r0; i + 1 < r1; i += 2) {
        int h = (int)(i % head_size);
        float fcr = rope[h], fci = rope[h + 1];
        float v0 = vec[i], v1 = vec[i + 1];
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
    }
}

/* Rotate the pairs (j, j + head_size/2) of one head (PL_ROPE_NEOX); pair j turns by rope[2j]. */
static void rope_head_neox(float *head, const float *rope, int head_size)
{
    const int half = head_size / 2;
    for (int j = 0; j < half; j++) {
        float fcr = rope[2 * j], fci = rope[2 * j + 1];
        float v0 = head[j], v1 = head[j + half];
        head[j] = v0 * fcr - v1 * fci;
        head[j + half] = v0 * fci + v1 * fcr;
    }
}

/* out[t*ld + i] += bias[i] for the n tokens, rows [r0, r1) (this thread's); bias NULL: nothing. */
static void add_bias(float *out, const float *bias, int n, long long ld, long long r0, long long r1)
{
    if (!bias) return;
    for (int t = 0; t < n; t++)
        for (long long i = r0; i < r1; i++) out[t * ld + i] += bias[i];
}

/* Attention softmax in place: exp(x - max) / sum. The AVX2 path uses a polynomial exp (within
 * 2 ulp of expf); the sampler keeps llama2.c's exact softmax (pli_softmax). */
static void softmax_att(float *x, int n)
{
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 8) {
        __m256 m8 = _mm256_loadu_ps(x);
        int i = 8;
        for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float max_val = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        for (; i < n; i++) max_val = x[i] > max_val ? x[i] : max_val;
        const __m256 mx = _mm256_set1_ps(max_val), lo = _mm256_set1_ps(-87.0f);
        const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
        const __m256 ln2hi = _mm256_set1_ps(0.693359375f), ln2lo = _mm256_set1_ps(-2.12194440e-4f);
        const __m256 c1 = _mm256_set1_ps(1.9875691500e-4f), c2 = _mm256_set1_ps(1.3981999507e-3f);
        const __m256 c3 = _mm256_set1_ps(8.3334519073e-3f), c4 = _mm256_set1_ps(4.1665795894e-2f);
        const __m256 c5 = _mm256_set1_ps(1.6666665459e-1f), c6 = _mm256_set1_ps(5.0000001201e-1f);
        const __m256 one = _mm256_set1_ps(1.0f);
        __m256 vsum = _mm256_setzero_ps();
        for (i = 0; i + 8 <= n; i += 8) {
            __m256 v = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mx), lo);
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
            __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
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

/* x[t, i] += y[t, i] for the n tokens' rows of dim values, columns [i0, i1) (this thread's). */
static void residual(float *x, const float *y, int n, int dim, long long i0, long long i1)
{
    for (int t = 0; t < n; t++)
        for (long long i = i0; i < i1; i++) x[t * (long long)dim + i] += y[t * (long long)dim + i];
}

/* xb[j..j+8·NV) = Σ_i att[i]·v_i[j..] over positions i <= last, NV vectors of 8 in registers. */
#if defined(__AVX2__)
static inline __attribute__((always_inline)) void
att_values_run(float *xb, const float *att, const float *vh, int last, int kv_dim, int NV)
{
    __m256 acc[8];
    for (int k = 0; k < NV; k++) acc[k] = _mm256_setzero_ps();
    for (int i = 0; i <= last; i++) {
        const float *v = vh + (long long)i * kv_dim;
        __m256 a = _mm256_broadcast_ss(att + i);
        for (int k = 0; k < NV; k++) acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(a, _mm256_loadu_ps(v + 8 * k)));
    }
    for (int k = 0; k < NV; k++) _mm256_storeu_ps(xb + 8 * k, acc[k]);
}
#endif

/* xb[j] = Σ_i att[i]·v_i[j] over positions i <= last (v_i = vh + i·kv_dim), summed in position
 * order with a rounded product and a rounded add per term, as llama2.c does; runs of up to 64
 * output values stay in registers across all positions (8 independent add chains). */
static void att_values(float *xb, const float *att, const float *vh, int last, int kv_dim, int head_size)
{
    int j = 0;
#if defined(__AVX2__)
    for (; j + 64 <= head_size; j += 64) att_values_run(xb + j, att, vh + j, last, kv_dim, 8);
    for (; j + 32 <= head_size; j += 32) att_values_run(xb + j, att, vh + j, last, kv_dim, 4);
    for (; j + 8 <= head_size; j += 8) att_values_run(xb + j, att, vh + j, last, kv_dim, 1);
#endif
    for (; j < head_size; j++) {
        float sum = 0.0f;
        for (int i = 0; i <= last; i++) sum += att[i] * vh[(long long)i * kv_dim + j];
        xb[j] = sum;
    }
}

static inline float dot(const float *a, const float *b, int n)
{
    int i = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = pli_hsum8(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* att[i] = scale·(q · k_i) for positions i <= last (k_i = kh + i·kv_dim): each score exactly as
 * dot() computes it, four positions at a time so that their FMA chains overlap. */
static void att_scores(float *att, const float *q, const float *kh, int last, int kv_dim,
                       int head_size, float scale)
{
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (head_size % 8 == 0)
        for (; i + 4 <= last + 1; i += 4) {
            const float *k0 = kh + (long long)i * kv_dim;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < head_size; j += 8) {
                __m256 qv = _mm256_loadu_ps(q + j);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + kv_dim + j), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * kv_dim + j), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * kv_dim + j), a3);
            }
            att[i] = pli_hsum8(a0) * scale;
            att[i + 1] = pli_hsum8(a1) * scale;
            att[i + 2] = pli_hsum8(a2) * scale;
            att[i + 3] = pli_hsum8(a3) * scale;
        }
#endif
    for (; i <= last; i++) att[i] = dot(q, kh + (long long)i * kv_dim, head_size) * scale;
}

long long pl_scratch_bytes(const pl_weights *w, int max_batch)
{
    long long m = pl__act_bytes(&w->wcls);
    for (int l = 0; l < w->cfg.n_layers; l++) {
        const pl_layer *L = &w->layers[l];
        const pl_tensor *t[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w1, &L->w2, &L->w3};
        for (int i = 0; i < 7; i++) {
            long long b = pl__act_bytes(t[i]);
            m = b > m ? b : m;
        }
    }
    return (long long)PL_MAX_GROUP * max_batch * ((m + 63) & ~63LL);
}

/* ------------------------------------------------------------------------------------------------
 * the forward pass */

/* Where a call's tokens go: token t at position tok_pos(m, t) of slot tok_slot(m, t). A run (one
 * slot, consecutive positions pos0..: every pl_forward call) has no arrays and computes k and v
 * straight into the cache; otherwise they go through s->k, s->v and are scattered to their slots.
 * Token t's logits are computed when wanted (want[t]; want NULL: t >= first) into s->logits row
 * "number of wanted tokens before t". */
typedef struct {
    int n, run, pos0, slot0, first;
    const int *pos, *slot, *want;
} seqmap;

static inline int tok_pos(const seqmap *m, int t) { return m->pos ? m->pos[t] : m->pos0 + t; }
static inline int tok_slot(const seqmap *m, int t) { return m->slot ? m->slot[t] : m->slot0; }
static inline int tok_wanted(const seqmap *m, int t) { return m->want ? m->want[t] != 0 : t >= m->first; }

/* Layer l's part of a slot's cache: (n_ctx, kv_dim) at key_cache or value_cache + this offset. */
static inline long long kv_offset(const pl_state *s, int slot, int l, int n_layers, int kv_dim)
{
    return ((long long)slot * n_layers + l) * s->n_ctx * kv_dim;
}

/* Copies this thread's rows [r0, r1) of each token's k (or v) row in buf to its slot's cache. */
static void kv_scatter(float *cache, const float *buf, const pl_state *s, const seqmap *m, int l,
                       int n_layers, int kv_dim, long long r0, long long r1)
{
    for (int t = 0; t < m->n; t++) {
        float *dst = cache + kv_offset(s, tok_slot(m, t), l, n_layers, kv_dim)
                     + (long long)tok_pos(m, t) * kv_dim;
        memcpy(dst + r0, buf + (long long)t * kv_dim + r0, (size_t)(r1 - r0) * sizeof(float));
    }
}

/* The layers and the classifier for the batch already embedded in s->x: run by every thread of
 * the team, or by the caller alone. Each step ends with a barrier (pl__team_sync: the worksharing
 * constructs are `nowait`) before the next one reads what it wrote. */
static void forward_team(const pl_weights *w, pl_state *s, const seqmap *m)
{
    const int n = m->n;
    const pl_config *p = &w->cfg;
    const int dim = p->dim, hidden_dim = p->hidden_dim, n_heads = p->n_heads;
    const int head_size = p->head_dim;
    const int q_dim = head_size * n_heads; /* = dim unless the file says otherwise */
    const int kv_dim = head_size * p->n_kv_heads;
    const int n_kv_heads = p->n_kv_heads;
    const int kv_mul = n_heads / p->n_kv_heads; /* query heads per kv head */
    const int n_ctx = s->n_ctx;
    const float att_scale = 1.0f / sqrtf((float)head_size);
    float *x = s->x;
    long long r0[PL_MAX_GROUP], r1[PL_MAX_GROUP];
    int nth = 1;
#ifdef _OPENMP
    nth = omp_get_num_threads();
#endif
    const int att_chunk = n > 1 ? n_heads : (n_heads + nth - 1) / nth;
    (void)att_chunk; /* (only read by OpenMP) */
    for (int l = 0; l < p->n_layers; l++) {
        const pl_layer *L = &w->layers[l];
        /* this batch's keys and values (n, kv_dim): a run's go straight into its cache rows */
        long long roff = m->run ? kv_offset(s, m->slot0, l, p->n_layers, kv_dim)
                                      + (long long)m->pos0 * kv_dim : 0;
        float *kc = m->run ? s->key_cache + roff : s->k;
        float *vc = m->run ? s->value_cache + roff : s->v;

        /* attention rmsnorm; q, k, v plus biases, with RoPE (NORM pairs lie within a thread's
         * rows, split in pairs; NEOX pairs span a head); then k, v to their slots' cache rows
         * unless the batch is one run, whose k, v went straight into the cache */
#pragma omp for schedule(static) nowait
        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (long long)t * dim, x + (long long)t * dim, L->rms_att, dim, p->rms_eps);
        pl__team_sync();
        pl__mm qkv[3] = {{&L->wq, s->q}, {&L->wk, kc}, {&L->wv, vc}};
        pl__team_matmuls(s->xb, n, qkv, 3, s->scratch, 0, r0, r1);
        add_bias(s->q, L->bq, n, q_dim, r0[0], r1[0]);
        add_bias(kc, L->bk, n, kv_dim, r0[1], r1[1]);
        add_bias(vc, L->bv, n, kv_dim, r0[2], r1[2]);
        if (p->rope_style == PL_ROPE_NEOX) {
            pl__team_sync();
#pragma omp for collapse(2) schedule(static) nowait
            for (int t = 0; t < n; t++)
                for (int h = 0; h < n_heads + n_kv_heads; h++) {
                    float *head = h < n_heads ? s->q + (long long)t * q_dim + h * head_size
                                              : kc + (long long)t * kv_dim + (h - n_heads) * head_size;
                    rope_head_neox(head, s->rope + (long long)t * head_size, head_size);
                }
        } else {
            for (int t = 0; t < n; t++) {
                const float *rope = s->rope + (long long)t * head_size;
                rope_rows(s->q + (long long)t * q_dim, rope, r0[0], r1[0], head_size);
                rope_rows(kc + (long long)t * kv_dim, rope, r0[1], r1[1], head_size);
            }
        }
        pl__team_sync();
        if (!m->run) { /* k, v (RoPE done) from s->k, s->v to their slots: this thread's rows */
            kv_scatter(s->key_cache, kc, s, m, l, p->n_layers, kv_dim, r0[1], r1[1]);
            kv_scatter(s->value_cache, vc, s, m, l, p->n_layers, kv_dim, r0[2], r1[2]);
            pl__team_sync();
        }

        /* causal multi-head attention: token t over positions 0..its own of its slot. A batch is
         * dealt out a token at a time, round robin (token t's work grows with t: contiguous
         * halves would give the last thread most of it); one token's heads are split evenly. */
#pragma omp for collapse(2) schedule(static, att_chunk) nowait
        for (int t = 0; t < n; t++) {
            for (int h = 0; h < n_heads; h++) {
                const int last = tok_pos(m, t);
                const long long loff = kv_offset(s, tok_slot(m, t), l, p->n_layers, kv_dim);
                const float *q = s->q + (long long)t * q_dim + h * head_size;
                float *att = s->att + ((long long)t * n_heads + h) * n_ctx;
                const float *kh = s->key_cache + loff + (h / kv_mul) * head_size;
                const float *vh = s->value_cache + loff + (h / kv_mul) * head_size;
                att_scores(att, q, kh, last, kv_dim, head_size, att_scale);
                softmax_att(att, last + 1);
                att_values(s->xb + (long long)t * q_dim + h * head_size, att, vh, last, kv_dim, head_size);
            }
        }
        pl__team_sync();

        /* output projection, residual */
        pl__mm wo = {&L->wo, s->xb2};
        pl__team_matmuls(s->xb, n, &wo, 1, s->scratch, 0, r0, r1);
        residual(x, s->xb2, n, dim, r0[0], r1[0]);
        pl__team_sync();

        /* SwiGLU FFN: w2(silu(w1 x) * w3 x), residual */
#pragma omp for schedule(static) nowait
        for (int t = 0; t < n; t++)
            rmsnorm(s->xb + (long long)t * dim, x + (long long)t * dim, L->rms_ffn, dim, p->rms_eps);
        pl__team_sync();
        pl__mm up[2] = {{&L->w1, s->hb}, {&L->w3, s->hb2}};
        pl__team_matmuls(s->xb, n, up, 2, s->scratch, 1, r0, r1);
        for (int t = 0; t < n; t++) {
            float *hb = s->hb + (long long)t * hidden_dim, *hb2 = s->hb2 + (long long)t * hidden_dim;
            for (long long i = r0[0]; i < r1[0]; i++) {
                float val = hb[i];
                val *= 1.0f / (1.0f + expf(-val));
                hb[i] = val * hb2[i];
            }
        }
        pl__team_sync();
        pl__mm down = {&L->w2, s->xb};
        pl__team_matmuls(s->hb, n, &down, 1, s->scratch, 0, r0, r1);
        residual(x, s->xb, n, dim, r0[0], r1[0]);
        pl__team_sync();
    }

    /* final rmsnorm of the wanted tokens (packed into xb rows 0, 1, ...) and the classifier */
    int n_want = 0;
    for (int t = 0; t < n; t++) n_want += tok_wanted(m, t);
    if (n_want == 0)
        return;
#pragma omp for schedule(static) nowait
    for (int t = 0; t < n; t++) {
        if (!tok_wanted(m, t)) continue;
        int row = 0;
        for (int u = 0; u < t; u++) row += tok_wanted(m, u);
        rmsnorm(s->xb + (long long)row * dim, x + (long long)t * dim, w->rms_final, dim, p->rms_eps);
    }
    pl__team_sync();
    pl__mm cls = {&w->wcls, s->logits};
    pl__team_matmuls(s->xb, n_want, &cls, 1, s->scratch, 0, r0, r1);
}

static void forward_seqs(const pl_weights *w, pl_state *s, const int *tokens, const seqmap *m)
{
    const pl_config *p = &w->cfg;
    const int dim = p->dim, head_size = p->head_dim;
    float *x = s->x;

    for (int t = 0; t < m->n; t++) {
        pl_dequantize_row(&w->token_embedding, tokens[t], x + (long long)t * dim);
        rope_table(s->rope + (long long)t * head_size, tok_pos(m, t), head_size, p->rope_theta,
                   w->rope_freqs);
    }

    /* One team for the whole call, its barriers our own (threads.c: spin briefly, then sleep).
     * With one thread, no parallel region at all: the worksharing constructs then bind to the
     * caller alone (in a team of one, libgomp's fork and join still make a futex system call:
     * without them stories260K runs 1.22x). */
    if (s->n_threads > 1) {
        pl__barrier team;
        pl__team_init(&team);
#pragma omp parallel num_threads(s->n_threads)
        {
            pl__team_enter(&team);
            forward_team(w, s, m);
            pl__team_enter(NULL);
        }
    } else {
        pl__team_enter(NULL);
        forward_team(w, s, m);
    }
}

void pl_forward(const pl_weights *w, pl_state *s, const int *tokens, int n, int pos, int logits)
{
    seqmap m = {n, 1, pos, 0, logits == PL_LOGITS_ALL ? 0 : logits == PL_LOGITS_LAST ? n - 1 : n,
                NULL, NULL, NULL};
    forward_seqs(w, s, tokens, &m);
}

void pl_forward_batch(const pl_weights *w, pl_state *s, const pl_batch *b)
{
    int run = 1;
    for (int t = 1; t < b->n; t++)
        run &= b->slot[t] == b->slot[0] && b->pos[t] == b->pos[0] + t;
    seqmap m = {b->n, run, b->pos[0], b->slot[0], 0, b->pos, b->slot, b->want_logits};
    forward_seqs(w, s, b->tokens, &m);
}
