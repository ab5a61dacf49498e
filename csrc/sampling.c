/* The llama.cpp-order sampler chain (pyllama/sampling.py) and the KV-cache position shift.
 *
 * Candidates are pl_probindex entries whose `prob` field holds a logit. Every stage after top-k
 * takes candidates sorted by logit descending (ties: lower token id first) and returns how many
 * it keeps, still sorted, so a stage is a prefix cut (typical re-sorts what it keeps). The
 * probabilities a stage looks at are the softmax of the current candidates at temperature 1;
 * temperature scales only the final draw. Sums run in double so a 128k vocabulary loses nothing. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

/* ------------------------------------------------------------------------------------------------
 * ordering */

static int before(const pl_probindex *a, const pl_probindex *b) /* a sorts before b */
{
    return a->prob > b->prob || (a->prob == b->prob && a->index < b->index);
}

static int cmp_desc(const void *a, const void *b)
{
    const pl_probindex *x = (const pl_probindex *)a, *y = (const pl_probindex *)b;
    return before(x, y) ? -1 : before(y, x) ? 1 : 0;
}

static void swap(pl_probindex *a, pl_probindex *b)
{
    pl_probindex t = *a;
    *a = *b;
    *b = t;
}

/* Quickselect: afterwards c[0..k) are the k first in sort order (unsorted among themselves). */
static void select_first(pl_probindex *c, int n, int k)
{
    int lo = 0, hi = n - 1;
    unsigned int r = 2463534242u;
    while (lo < hi) {
        r ^= r << 13; r ^= r >> 17; r ^= r << 5;
        swap(&c[lo + (int)(r % (unsigned int)(hi - lo + 1))], &c[hi]);
        pl_probindex pivot = c[hi];
        int store = lo;
        for (int i = lo; i < hi; i++)
            if (before(&c[i], &pivot)) swap(&c[i], &c[store++]);
        swap(&c[store], &c[hi]);
        if (store == k - 1 || store == k) return;
        if (store < k) lo = store + 1; else hi = store - 1;
    }
}

/* ------------------------------------------------------------------------------------------------
 * stages */

int pl_cand_init(const float *logits, int n, pl_probindex *cand)
{
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i])) return -1;
    for (int i = 0; i < n; i++) {
        cand[i].prob = logits[i];
        cand[i].index = i;
    }
    return n;
}

void pl_penalize(pl_probindex *cand, const int *window, int n_window, int *counts,
                 float repeat_penalty, float frequency_penalty, float presence_penalty)
{
    for (int i = 0; i < n_window; i++) counts[window[i]]++;
    for (int i = 0; i < n_window; i++) {
        int t = window[i], c = counts[t];
        if (c == 0) continue; /* already done for an earlier copy of t */
        float l = cand[t].prob;
        l = l <= 0.0f ? l * repeat_penalty : l / repeat_penalty;
        l -= (float)c * frequency_penalty + presence_penalty;
        cand[t].prob = l;
        counts[t] = 0; /* counts is all zero again afterwards */
    }
}

void pl_logit_bias(pl_probindex *cand, const int *ids, const float *bias, int n_bias)
{
    for (int i = 0; i < n_bias; i++) cand[ids[i]].prob += bias[i];
}

int pl_top_k(pl_probindex *cand, int n, int k)
{
    if (k <= 0 || k > n) k = n;
    if (k < n) select_first(cand, n, k);
    qsort(cand, (size_t)k, sizeof(pl_probindex), cmp_desc);
    return k;
}

/* Softmax of the candidates' logits (sorted: cand[0] is the largest) into p[0..n). */
static void softmax_cand(const pl_probindex *cand, int n, double *p)
{
    double sum = 0.0, m = cand[0].prob;
    for (int i = 0; i < n; i++) sum += (p[i] = exp(cand[i].prob - m));
    for (int i = 0; i < n; i++) p[i] /= sum;
}

int pl_top_p(pl_probindex *cand, int n, float top_p, double *p)
{
    if (top_p >= 1.0f || n <= 1) return n;
    softmax_cand(cand, n, p);
    double cum = 0.0;
    for (int i = 0; i < n; i++) {
        cum += p[i];
        if (cum >= top_p) return i + 1;
    }
    return n;
}

static float max_logit(const pl_probindex *cand, int n)
{
    float m = cand[0].prob;
    for (int i = 1; i < n; i++) m = cand[i].prob > m ? cand[i].prob : m;
    return m;
}

/* Keeps (in their order, sorted or not) the candidates with p >= min_p * p_max. */
int pl_min_p(pl_probindex *cand, int n, float min_p)
{
    if (min_p <= 0.0f || n <= 1) return n;
    /* p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p) */
    double cut = (double)max_logit(cand, n) + log((double)min_p);
    int keep = 0;
    for (int i = 0; i < n; i++)
        if (cand[i].prob >= cut) cand[keep++] = cand[i];
    return keep;
}

/* Before sorting a whole vocabulary for top-p: a token below (1 - top_p) / (n - 1) cannot be in
 * the nucleus (all such tokens together weigh less than 1 - top_p), so only the others are kept
 * (unsorted). llama2.c's trick. */
static int top_p_candidates(pl_probindex *cand, int n, float top_p)
{
    double m = max_logit(cand, n), sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp(cand[i].prob - m);
    double cut = m + log((1.0 - top_p) / (n - 1) * sum); /* p >= c  <=>  logit >= m + log(c * sum) */
    int keep = 0;
    for (int i = 0; i < n; i++)
        if (cand[i].prob >= cut) cand[keep++] = cand[i];
    return keep;
}

/* Locally typical sampling: keep the tokens whose surprise -log p is closest to the entropy,
 * fewest first, until their mass reaches typical_p. tmp holds n entries. */
int pl_typical(pl_probindex *cand, int n, float typical_p, double *p, pl_probindex *tmp)
{
    if (typical_p >= 1.0f || n <= 1) return n;
    softmax_cand(cand, n, p);
    double entropy = 0.0;
    for (int i = 0; i < n; i++)
        if (p[i] > 0.0) entropy -= p[i] * log(p[i]);
    for (int i = 0; i < n; i++) {
        /* sorted ascending by |surprise - entropy|: stored negated for the descending order;
         * index = position in cand, so ties keep the logit order */
        tmp[i].prob = p[i] > 0.0 ? -(float)fabs(-log(p[i]) - entropy) : -INFINITY;
        tmp[i].index = i;
    }
    qsort(tmp, (size_t)n, sizeof(pl_probindex), cmp_desc);
    double cum = 0.0;
    int keep = n;
    for (int i = 0; i < n; i++) {
        cum += p[tmp[i].index];
        if (cum >= typical_p) { keep = i + 1; break; }
    }
    /* the kept candidates, back in logit order */
    for (int i = 0; i < keep; i++) tmp[i] = cand[tmp[i].index];
    qsort(tmp, (size_t)keep, sizeof(pl_probindex), cmp_desc);
    memcpy(cand, tmp, (size_t)keep * sizeof(pl_probindex));
    return keep;
}

static unsigned long long next_u64(unsigned long long *s)
{
    /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

double pl_uniform(unsigned long long *rng)
{
    return (double)(next_u64(rng) >> 11) * (1.0 / 9007199254740992.0); /* [0, 1) */
}

/* One draw from softmax(logit / temperature) over the candidates (any order); temperature <= 0:
 * the largest. */
int pl_draw(const pl_probindex *cand, int n, float temperature, double *p, unsigned long long *rng)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (before(&cand[i], &cand[best])) best = i;
    if (temperature <= 0.0f || n == 1) return cand[best].index;
    double sum = 0.0, m = cand[best].prob, t = temperature;
    for (int i = 0; i < n; i++) sum += (p[i] = exp((cand[i].prob - m) / t));
    /* the largest term is exp(0) = 1, so sum >= 1 and finite for any temperature > 0 */
    double r = pl_uniform(rng) * sum, cdf = 0.0;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (r < cdf) return cand[i].index;
    }
    return cand[n - 1].index;
}

/* The largest of x[0..n) (n >= 1); *bad set when one is NaN or infinite. On the floats' bits
 * as ordered integers (sign-magnitude flipped to two's complement), so the loop is an integer
 * max and or, which the compiler vectorizes (a float max it may not: NaN rules). -0 sorts below
 * +0 here; the caller compares values with ==, where they are equal, as in the full path. */
static float max_and_check(const float *x, int n, int *bad)
{
    int32_t best = INT32_MIN;
    uint32_t special = 0;
    for (int i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, x + i, sizeof b);
        special |= (b & 0x7f800000u) == 0x7f800000u; /* exponent all ones: NaN or infinite */
        int32_t key = (int32_t)(b ^ ((uint32_t)((int32_t)b >> 31) & 0x7fffffffu));
        best = key > best ? key : best;
    }
    *bad = special != 0;
    uint32_t b = (uint32_t)best ^ ((uint32_t)(best >> 31) & 0x7fffffffu);
    float m;
    memcpy(&m, &b, sizeof m);
    return m;
}

/* The first i with x[i] == m (there is one; m finite): blocks of 64 compared at once (on the
 * bits, vectorized like the max; a zero m matches both zeros), then the one holding it. */
static int first_equal(const float *x, int n, float m)
{
    uint32_t mb;
    memcpy(&mb, &m, sizeof mb);
    const uint32_t mask = (mb << 1) == 0 ? 0x7fffffffu : 0xffffffffu;
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        uint32_t hit = 0;
        for (int j = 0; j < 64; j++) {
            uint32_t b;
            memcpy(&b, x + i + j, sizeof b);
            hit |= ((b ^ mb) & mask) == 0;
        }
        if (hit) break;
    }
    while (x[i] != m) i++;
    return i;
}

/* Greedy without building every candidate: the argmax after penalties and bias, as the full
 * path finds it (largest logit, lower id on ties). Only the penalized and biased tokens change,
 * so they get candidate entries (the same stage functions adjust them) and compete with the
 * first token holding the raw maximum. Returns -2 when a changed token holds the raw maximum
 * (the best unchanged token is then unknown: the caller takes the full path), -1 for
 * non-finite logits. */
static int greedy_fast(const float *logits, int n, int penalties, const pl_sampling *sp,
                       const int *window, int n_window, const int *bias_ids, const float *bias,
                       int n_bias, pl_probindex *cand, int *counts)
{
    int bad;
    float m = max_and_check(logits, n, &bad);
    if (bad) return -1;
    if (!penalties) n_window = 0;
    for (int k = 0; k < n_window + n_bias; k++) {
        int t = k < n_window ? window[k] : bias_ids[k - n_window];
        if (logits[t] == m) return -2;
        cand[t].prob = logits[t];
        cand[t].index = t;
    }
    if (n_window)
        pl_penalize(cand, window, n_window, counts, sp->repeat_penalty, sp->frequency_penalty,
                    sp->presence_penalty);
    pl_logit_bias(cand, bias_ids, bias, n_bias);
    pl_probindex best = { m, first_equal(logits, n, m) };
    for (int k = 0; k < n_window + n_bias; k++) {
        int t = k < n_window ? window[k] : bias_ids[k - n_window];
        if (before(&cand[t], &best)) best = cand[t];
    }
    return best.index;
}

int pl_sample_chain(const float *logits, int n, const pl_sampling *sp, const int *window, int n_window,
                    const int *bias_ids, const float *bias, int n_bias, pl_probindex *cand,
                    pl_probindex *tmp, double *p, int *counts, unsigned long long *rng)
{
    int penalties = sp->repeat_penalty != 1.0f || sp->frequency_penalty != 0.0f ||
                    sp->presence_penalty != 0.0f;
    if (sp->temperature <= 0.0f || sp->top_k == 1) {
        int t = greedy_fast(logits, n, penalties, sp, window, n_window, bias_ids, bias, n_bias,
                            cand, counts);
        if (t != -2) return t;
    }
    if (pl_cand_init(logits, n, cand) < 0) return -1;
    if (penalties)
        pl_penalize(cand, window, n_window, counts, sp->repeat_penalty, sp->frequency_penalty,
                    sp->presence_penalty);
    pl_logit_bias(cand, bias_ids, bias, n_bias);
    if (sp->temperature <= 0.0f || sp->top_k == 1) return pl_draw(cand, n, 0.0f, p, rng);
    /* the stages that look at the order get sorted candidates; min-p and the draw need none */
    int sorted = 0;
    if (sp->top_k > 0 && sp->top_k < n) {
        n = pl_top_k(cand, n, sp->top_k);
        sorted = 1;
    }
    if (sp->typical_p < 1.0f && n > 1) {
        if (!sorted) n = pl_top_k(cand, n, 0);
        sorted = 1;
        n = pl_typical(cand, n, sp->typical_p, p, tmp);
    }
    if (sp->top_p < 1.0f && n > 1) {
        if (!sorted) {
            int kept = top_p_candidates(cand, n, sp->top_p);
            n = pl_top_k(cand, kept > 0 ? kept : n, 0);
        }
        n = pl_top_p(cand, n, sp->top_p, p);
    }
    n = pl_min_p(cand, n, sp->min_p);
    return pl_draw(cand, n, sp->temperature, p, rng);
}

double pl_logsumexp(const float *x, int n)
{
    float m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double)x[i] - m);
    return m + log(sum);
}

/* ------------------------------------------------------------------------------------------------
 * KV cache: move positions and re-rotate their keys */

void pl_kv_shift(const pl_weights *w, pl_state *s, int src, int dst, int n)
{
    const pl_config *c = &w->cfg;
    const int rope_style = c->rope_style;
    const float *freq_factors = w->rope_freqs;
    const int head_size = c->head_dim, half = head_size / 2;
    const double delta = (double)dst - (double)src;
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_kv_heads; h++) {
            /* kv head h's positions lie together (slot 0: Python points the state at the slot) */
            long long off = pl__kv_offset(s, 0, l, c->n_layers, c->n_kv_heads * head_size)
                            + pl__kv_head_row(s, h, 0, head_size);
            float *k = s->key_cache + off, *v = s->value_cache + off;
            memmove(k + (long long)dst * head_size, k + (long long)src * head_size,
                    (size_t)n * head_size * sizeof(float));
            memmove(v + (long long)dst * head_size, v + (long long)src * head_size,
                    (size_t)n * head_size * sizeof(float));
            for (int j = 0; j < half; j++) {
                /* pair j of the head: (2j, 2j+1) interleaved, (j, j+half) NeoX */
                double freq = 1.0 / pow((double)c->rope_theta, (2.0 * j) / head_size);
                if (freq_factors) freq /= freq_factors[j];
                float cs = (float)cos(delta * freq), sn = (float)sin(delta * freq);
                int a = rope_style == PL_ROPE_NEOX ? j : 2 * j;
                int b = rope_style == PL_ROPE_NEOX ? j + half : 2 * j + 1;
                for (int t = dst; t < dst + n; t++) {
                    float *kh = k + (long long)t * head_size;
                    float x0 = kh[a], x1 = kh[b];
                    kh[a] = x0 * cs - x1 * sn;
                    kh[b] = x0 * sn + x1 * cs;
                }
            }
        }
}
