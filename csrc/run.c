/* The Llama-2 forward pass (llama2.c's run.c, generalised to typed weight tensors).
 *
 * One OpenMP parallel region per token: every step below is either a work-shared loop, a matmul
 * split over the team (pl__team_matmul), or a short `single` section, so the team is not forked
 * and joined once per matmul.
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

/* RoPE on adjacent pairs of q (all heads) and k (kv heads), llama2.c's arithmetic. */
static void rope(float *q, float *k, int pos, int dim, int kv_dim, int head_size, float theta)
{
    for (int i = 0; i < dim; i += 2) {
        int head_dim = i % head_size;
        float freq = 1.0f / powf(theta, head_dim / (float)head_size);
        float val = pos * freq;
        float fcr = cosf(val), fci = sinf(val);
        int rotn = i < kv_dim ? 2 : 1;
        for (int v = 0; v < rotn; v++) {
            float *vec = v == 0 ? q : k;
            float v0 = vec[i], v1 = vec[i + 1];
            vec[i] = v0 * fcr - v1 * fci;
            vec[i + 1] = v0 * fci + v1 * fcr;
        }
    }
}

long long pl_scratch_bytes(const pl_weights *w)
{
    long long m = pl__act_bytes(&w->token_embedding);
    long long b = pl__act_bytes(&w->wcls);
    if (b > m) m = b;
    for (int l = 0; l < w->cfg.n_layers; l++) {
        const pl_tensor *t[7] = {&w->layers[l].wq, &w->layers[l].wk, &w->layers[l].wv,
                                 &w->layers[l].wo, &w->layers[l].w1, &w->layers[l].w2,
                                 &w->layers[l].w3};
        for (int i = 0; i < 7; i++) {
            b = pl__act_bytes(t[i]);
            if (b > m) m = b;
        }
    }
    return m;
}

/* ------------------------------------------------------------------------------------------------
 * the forward pass */

void pl_forward(const pl_weights *w, pl_state *s, int token, int pos)
{
    const pl_config *p = &w->cfg;
    const int dim = p->dim, hidden_dim = p->hidden_dim, n_heads = p->n_heads;
    const int head_size = dim / n_heads;
    const int kv_dim = head_size * p->n_kv_heads;
    const int kv_mul = n_heads / p->n_kv_heads; /* query heads per kv head */
    const int n_ctx = s->n_ctx;
    const float att_scale = 1.0f / sqrtf((float)head_size);
    float *x = s->x;

    pl_dequantize_row(&w->token_embedding, token, x);

#pragma omp parallel num_threads(s->n_threads) if (s->n_threads > 1)
    {
        for (int l = 0; l < p->n_layers; l++) {
            const pl_layer *L = &w->layers[l];
            long long loff = (long long)l * n_ctx * kv_dim; /* layer offset into the KV cache */
            float *kc = s->key_cache + loff + (long long)pos * kv_dim;
            float *vc = s->value_cache + loff + (long long)pos * kv_dim;

            /* attention rmsnorm, then q, k, v (k and v straight into the cache) */
#pragma omp single
            rmsnorm(s->xb, x, L->rms_att, dim, p->rms_eps);
            pl__team_matmul(s->q, s->xb, &L->wq, s->scratch);
            pl__team_matmul(kc, s->xb, &L->wk, s->scratch);
            pl__team_matmul(vc, s->xb, &L->wv, s->scratch);
#pragma omp single
            rope(s->q, kc, pos, dim, kv_dim, head_size, p->rope_theta);

            /* multi-head attention over positions 0..pos, one head per iteration */
#pragma omp for schedule(static)
            for (int h = 0; h < n_heads; h++) {
                const float *q = s->q + h * head_size;
                float *att = s->att + (long long)h * n_ctx;
                const float *kh = s->key_cache + loff + (h / kv_mul) * head_size;
                const float *vh = s->value_cache + loff + (h / kv_mul) * head_size;
                for (int t = 0; t <= pos; t++) {
                    const float *k = kh + (long long)t * kv_dim;
                    float score = 0.0f;
                    for (int i = 0; i < head_size; i++) score += q[i] * k[i];
                    att[t] = score * att_scale;
                }
                pli_softmax(att, pos + 1);
                float *xb = s->xb + h * head_size;
                memset(xb, 0, head_size * sizeof(float));
                for (int t = 0; t <= pos; t++) {
                    const float *v = vh + (long long)t * kv_dim;
                    float a = att[t];
                    for (int i = 0; i < head_size; i++) xb[i] += a * v[i];
                }
            }

            /* output projection and residual, then the FFN rmsnorm */
            pl__team_matmul(s->xb2, s->xb, &L->wo, s->scratch);
#pragma omp single
            {
                for (int i = 0; i < dim; i++) x[i] += s->xb2[i];
                rmsnorm(s->xb, x, L->rms_ffn, dim, p->rms_eps);
            }

            /* SwiGLU FFN: w2(silu(w1 x) * w3 x) */
            pl__team_matmul(s->hb, s->xb, &L->w1, s->scratch);
            pl__team_matmul(s->hb2, s->xb, &L->w3, s->scratch);
#pragma omp for schedule(static)
            for (int i = 0; i < hidden_dim; i++) {
                float val = s->hb[i];
                val *= 1.0f / (1.0f + expf(-val));
                s->hb[i] = val * s->hb2[i];
            }
            pl__team_matmul(s->xb, s->hb, &L->w2, s->scratch);
#pragma omp single
            for (int i = 0; i < dim; i++) x[i] += s->xb[i];
        }

#pragma omp single
        rmsnorm(x, x, w->rms_final, dim, p->rms_eps);
        pl__team_matmul(s->logits, x, &w->wcls, s->scratch);
    }
}
