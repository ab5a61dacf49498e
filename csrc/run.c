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

/* x[t, i] += y[t, i] for the n tokens' rows of dim values, columns [i0, i1) (this thread's). */
static void residual(float *x, const float *y, int n, int dim, long long i0, long long i1)
{
    for (int t = 0; t < n; t++)
        for (long long i = i0; i < i1; i++) x[t * (long long)dim + i] += y[t * (long long)dim + i];
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

/* Stores rows [r0, r1) of the k (or v) rows of tokens t0 .. t1-1 in buf (kv_dim floats a token)
 * in their slots' cache, layer l. */
static void kv_store(float *cache, const float *buf, const pl_state *s, const seqmap *m, int l,
                     int n_layers, int kv_dim, int head_size, int t0, int t1, long long r0, long long r1)
{
    for (int t = t0; t < t1; t++) {
        float *layer = cache + pl__kv_offset(s, tok_slot(m, t), l, n_layers, kv_dim);
        const float *src = buf + (long long)t * kv_dim;
        for (long long r = r0; r < r1;) {
            const int g = (int)(r / head_size);
            const long long end = (long long)(g + 1) * head_size < r1 ? (long long)(g + 1) * head_size : r1;
            memcpy(layer + pl__kv_head_row(s, g, tok_pos(m, t), head_size) + (r - (long long)g * head_size),
                   src + r, (size_t)(end - r) * sizeof(float));
            r = end;
        }
    }
}

/* rmsnorm(x) of the n tokens in rows of s->xb, for a matmul: with own_rows (one token, a row of xb
 * per thread) each thread normalises it into its own row, which it returns, and nobody waits;
 * else the team shares the tokens and meets. */
static const float *norm_input(pl_state *s, const float *x, const float *weight, int n, int dim,
                               float eps, int own_rows)
{
    if (own_rows) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *row = s->xb + (long long)tid * dim;
        rmsnorm(row, x, weight, dim, eps);
        return row;
    }
#pragma omp for schedule(static) nowait
    for (int t = 0; t < n; t++)
        rmsnorm(s->xb + (long long)t * dim, x + (long long)t * dim, weight, dim, eps);
    pl__team_sync();
    return s->xb;
}

/* Whether every matrix of the layers is F32, F16 or BF16. */
static int float_model(const pl_weights *w)
{
    for (int l = 0; l < w->cfg.n_layers; l++) {
        const pl_layer *L = &w->layers[l];
        const pl_tensor *t[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w1, &L->w2, &L->w3};
        for (int i = 0; i < 7; i++)
            switch (t[i]->type) {
            case PL_F32: case PL_F16: case PL_BF16: case PL_F32_R4: case PL_F16_R4: case PL_BF16_R4: break;
            default: return 0;
            }
    }
    return 1;
}

/* The epilogues of a layer's matmuls, on the rows [r0, r1) of each of the n tokens that one
 * thread computed (pl__team_matmuls): biases and (NORM) RoPE of q, k, v; the residuals; SwiGLU. */
typedef struct {
    pl_state *s;
    const pl_layer *L;
    const seqmap *m;
    int l, n_layers, n, q_dim, kv_dim, dim, hidden_dim, head_size, norm_rope;
} layer_epi;

/* q, k, v (s->q, s->k, s->v): biases and NORM RoPE; then k (NORM) and v to the cache (NEOX keys
 * go there after their RoPE, which needs whole heads). */
static void epi_qkv(void *ctx, int i, long long r0, long long r1)
{
    const layer_epi *e = ctx;
    const int ld = i == 0 ? e->q_dim : e->kv_dim;
    float *out = i == 0 ? e->s->q : i == 1 ? e->s->k : e->s->v;
    add_bias(out, i == 0 ? e->L->bq : i == 1 ? e->L->bk : e->L->bv, e->n, ld, r0, r1);
    if (e->norm_rope && i < 2)
        for (int t = 0; t < e->n; t++)
            rope_rows(out + (long long)t * ld, e->s->rope + (long long)t * e->head_size, r0, r1,
                      e->head_size);
    if (i == 2 || (i == 1 && e->norm_rope))
        kv_store(i == 1 ? e->s->key_cache : e->s->value_cache, out, e->s, e->m, e->l, e->n_layers,
                 e->kv_dim, e->head_size, 0, e->n, r0, r1);
}

static void epi_attn_out(void *ctx, int i, long long r0, long long r1)
{
    const layer_epi *e = ctx;
    (void)i;
    residual(e->s->x, e->s->xb2, e->n, e->dim, r0, r1);
}

static void epi_ffn_out(void *ctx, int i, long long r0, long long r1)
{
    const layer_epi *e = ctx;
    (void)i;
    residual(e->s->x, e->s->xb, e->n, e->dim, r0, r1);
}

static void epi_swiglu(void *ctx, int i, long long r0, long long r1)
{
    const layer_epi *e = ctx;
    (void)i;
    for (int t = 0; t < e->n; t++)
        pl__swiglu(e->s->hb + (long long)t * e->hidden_dim + r0, e->s->hb2 + (long long)t * e->hidden_dim + r0, r1 - r0);
}

/* Tokens of a batch run together through attention (one sequence's consecutive tokens): each block
 * of keys is read once for all of them (pl__attend_heads); 16 queries of stories15M's heads of 48
 * reuse 12 KB of keys from L1. */
#define ATT_RUN 16

/* Attention of tokens t0 .. t0 + nt - 1 (one slot, consecutive positions when nt > 1) for unit u:
 * part `part` of the query heads of kv head u / parts. */
static void attend_unit(pl_state *s, const seqmap *m, const layer_epi *e, int u, int parts, int kv_mul,
                        int n_heads, float scale, int t0, int nt)
{
    const int g = u / parts, part = u % parts;
    const int h0 = g * kv_mul + kv_mul * part / parts, h1 = g * kv_mul + kv_mul * (part + 1) / parts;
    const long long kv = pl__kv_offset(s, tok_slot(m, t0), e->l, e->n_layers, e->kv_dim)
                         + pl__kv_head_row(s, g, 0, e->head_size);
    const long long off = (long long)t0 * e->q_dim + (long long)h0 * e->head_size;
    pl__attend_heads(s->xb + off, s->q + off, e->q_dim, nt, h1 - h0, s->key_cache + kv,
                     s->value_cache + kv, tok_pos(m, t0), e->head_size, scale,
                     s->att + ((long long)t0 * n_heads + h0) * s->n_ctx, s->n_ctx,
                     (long long)n_heads * s->n_ctx);
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
    int nth = 1;
#ifdef _OPENMP
    nth = omp_get_num_threads();
#endif
    /* one token's attention in units of query heads that share a kv head (their keys and values
     * read once for all of them): a whole group each, or parts of one where there are too few
     * groups to give every thread two */
    int parts = (2 * nth + n_kv_heads - 1) / n_kv_heads;
    parts = parts < 1 ? 1 : parts > kv_mul ? kv_mul : parts;
    const int n_units = n_kv_heads * parts;
    const int att_chunk = n > 1 ? n_units : (n_units + nth - 1) / nth;
    (void)att_chunk; /* (only read by OpenMP) */
    /* a run of several tokens of a float model: attention by blocks of queries (quantized models
     * keep the token-at-a-time order, their batches being bit for bit their single tokens), each
     * thread's scores in its own PL_ATT_BLOCK rows of s->att */
    const int block_att = n > 1 && m->run && float_model(w) && pl__attend_block_ok(head_size)
                          && (long long)nth * PL_ATT_BLOCK <= (long long)s->max_batch * n_heads;
    const int n_blocks = (n + PL_ATT_BLOCK - 1) / PL_ATT_BLOCK;
    const int own_norm = n == 1 && nth <= s->max_batch; /* norm_input without a barrier */
    for (int l = 0; l < p->n_layers; l++) {
        const pl_layer *L = &w->layers[l];
        /* attention rmsnorm; q, k, v plus biases, with RoPE (NORM pairs lie within a thread's
         * rows, split in pairs; NEOX pairs span a head); k and v to their slots' cache */
        layer_epi ectx = {s, L, m, l, p->n_layers, n, q_dim, kv_dim, dim, hidden_dim, head_size,
                          p->rope_style != PL_ROPE_NEOX};
        pl__mm qkv[3] = {{&L->wq, s->q}, {&L->wk, s->k}, {&L->wv, s->v}};
        pl__epilogue e_qkv = {epi_qkv, &ectx};
        pl__team_matmuls(norm_input(s, x, L->rms_att, n, dim, p->rms_eps, own_norm), n, qkv, 3,
                         s->scratch, 0, &e_qkv);
        if (p->rope_style == PL_ROPE_NEOX) {
            pl__team_sync();
#pragma omp for collapse(2) schedule(static) nowait
            for (int t = 0; t < n; t++)
                for (int h = 0; h < n_heads + n_kv_heads; h++) {
                    const int g = h - n_heads;
                    float *head = g < 0 ? s->q + (long long)t * q_dim + h * head_size
                                        : s->k + (long long)t * kv_dim + g * head_size;
                    rope_head_neox(head, s->rope + (long long)t * head_size, head_size);
                    if (g >= 0)
                        kv_store(s->key_cache, s->k, s, m, l, p->n_layers, kv_dim, head_size, t,
                                 t + 1, (long long)g * head_size, (long long)(g + 1) * head_size);
                }
        }
        pl__team_sync();

        /* causal multi-head attention: token t over positions 0..its own of its slot */
        if (block_att) {
            /* float models' prompts: blocks of PL_ATT_BLOCK queries of a head, two small matrix
             * products each; the largest (last) blocks first, handed out as threads come free */
#pragma omp for collapse(2) schedule(dynamic, 1) nowait
            for (int b = n_blocks - 1; b >= 0; b--)
                for (int h = 0; h < n_heads; h++) {
                    const int t0 = b * PL_ATT_BLOCK;
                    const int nq = n - t0 < PL_ATT_BLOCK ? n - t0 : PL_ATT_BLOCK;
                    const long long kv = pl__kv_offset(s, m->slot0, l, p->n_layers, kv_dim)
                                         + pl__kv_head_row(s, h / kv_mul, 0, head_size);
                    int tid = 0;
#ifdef _OPENMP
                    tid = omp_get_thread_num();
#endif
                    pl__attend_block(s->xb + (long long)t0 * q_dim + h * head_size, q_dim,
                                     s->q + (long long)t0 * q_dim + h * head_size, q_dim, nq,
                                     m->pos0 + t0, s->key_cache + kv, s->value_cache + kv,
                                     head_size, att_scale,
                                     s->att + (long long)tid * PL_ATT_BLOCK * n_ctx);
                }
        } else if (n > 1 && m->run) {
            /* a run's tokens in blocks of ATT_RUN, each block's keys and values read once for all
             * its queries; the last (largest) blocks first, handed out as threads come free */
#pragma omp for collapse(2) schedule(dynamic, 1) nowait
            for (int b = (n - 1) / ATT_RUN; b >= 0; b--)
                for (int u = 0; u < n_units; u++)
                    attend_unit(s, m, &ectx, u, parts, kv_mul, n_heads, att_scale, b * ATT_RUN,
                                n - b * ATT_RUN < ATT_RUN ? n - b * ATT_RUN : ATT_RUN);
        } else {
            /* a batch of several sequences (or one token) is dealt out a token at a time, round
             * robin (token t's work grows with t: contiguous halves would give the last thread
             * most of it); one token's units (query heads of a kv head) are split evenly */
#pragma omp for collapse(2) schedule(static, att_chunk) nowait
            for (int t = 0; t < n; t++)
                for (int u = 0; u < n_units; u++)
                    attend_unit(s, m, &ectx, u, parts, kv_mul, n_heads, att_scale, t, 1);
        }
        pl__team_sync();

        /* output projection, residual */
        pl__mm wo = {&L->wo, s->xb2};
        pl__epilogue e_wo = {epi_attn_out, &ectx};
        pl__team_matmuls(s->xb, n, &wo, 1, s->scratch, 0, &e_wo);
        pl__team_sync();

        /* SwiGLU FFN: w2(silu(w1 x) * w3 x), residual */
        pl__mm up[2] = {{&L->w1, s->hb}, {&L->w3, s->hb2}};
        pl__epilogue e_up = {epi_swiglu, &ectx};
        pl__team_matmuls(norm_input(s, x, L->rms_ffn, n, dim, p->rms_eps, own_norm), n, up, 2,
                         s->scratch, 1, &e_up);
        pl__team_sync();
        pl__mm down = {&L->w2, s->xb};
        pl__epilogue e_down = {epi_ffn_out, &ectx};
        pl__team_matmuls(s->hb, n, &down, 1, s->scratch, 0, &e_down);
        pl__team_sync();
    }

    /* final rmsnorm of the wanted tokens (packed into xb rows 0, 1, ...) and the classifier */
    int n_want = 0;
    for (int t = 0; t < n; t++) n_want += tok_wanted(m, t);
    if (n_want == 0)
        return;
    pl__mm cls = {&w->wcls, s->logits};
    if (n == 1) { /* (wanted) */
        pl__team_matmuls(norm_input(s, x, w->rms_final, 1, dim, p->rms_eps, own_norm), 1, &cls, 1,
                         s->scratch, 0, NULL);
        return;
    }
#pragma omp for schedule(static) nowait
    for (int t = 0; t < n; t++) {
        if (!tok_wanted(m, t)) continue;
        int row = 0;
        for (int u = 0; u < t; u++) row += tok_wanted(m, u);
        rmsnorm(s->xb + (long long)row * dim, x + (long long)t * dim, w->rms_final, dim, p->rms_eps);
    }
    pl__team_sync();
    pl__team_matmuls(s->xb, n_want, &cls, 1, s->scratch, 0, NULL);
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
