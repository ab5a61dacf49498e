/* llama2.c's sampler, to the bit: same float operations in the same order, same xorshift*
 * generator, same qsort comparator — so the same seed gives the same tokens. */
#include <math.h>
#include <stdlib.h>
#include "internal.h"

static unsigned int random_u32(unsigned long long *state)
{
    /* xorshift rng: https://en.wikipedia.org/wiki/Xorshift#xorshift.2A */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(unsigned long long *state)
{
    return (random_u32(state) >> 8) / 16777216.0f; /* in [0, 1) */
}

static int sample_argmax(const float *p, int n)
{
    int max_i = 0;
    float max_p = p[0];
    for (int i = 1; i < n; i++)
        if (p[i] > max_p) {
            max_i = i;
            max_p = p[i];
        }
    return max_i;
}

static int sample_mult(const float *p, int n, float coin)
{
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1; /* rounding errors */
}

static int compare_desc(const void *a, const void *b)
{
    const pl_probindex *a_ = (const pl_probindex *)a, *b_ = (const pl_probindex *)b;
    if (a_->prob > b_->prob) return -1;
    if (a_->prob < b_->prob) return 1;
    return 0;
}

/* top-p (nucleus): drop tokens below (1-topp)/(n-1), sort the rest descending, keep the shortest
 * prefix whose mass exceeds topp, sample in it. */
static int sample_topp(const float *p, int n, float topp, pl_probindex *probindex, float coin)
{
    int n0 = 0;
    const float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) {
        if (p[i] >= cutoff) {
            probindex[n0].index = i;
            probindex[n0].prob = p[i];
            n0++;
        }
    }
    qsort(probindex, n0, sizeof(pl_probindex), compare_desc);

    float cumulative_prob = 0.0f;
    int last_idx = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cumulative_prob += probindex[i].prob;
        if (cumulative_prob > topp) {
            last_idx = i;
            break;
        }
    }
    float r = coin * cumulative_prob;
    float cdf = 0.0f;
    for (int i = 0; i <= last_idx; i++) {
        cdf += probindex[i].prob;
        if (r < cdf) return probindex[i].index;
    }
    return probindex[last_idx].index;
}

void pli_softmax(float *x, int size)
{
    float max_val = x[0];
    for (int i = 1; i < size; i++)
        if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < size; i++) x[i] /= sum;
}

int pl_sample(float *logits, int n, float temperature, float topp,
              unsigned long long *rng_state, pl_probindex *probindex)
{
    /* NaN or inf would leave top-p with no candidate (and argmax with garbage): refuse */
    int finite = 1;
    for (int i = 0; i < n; i++) finite &= isfinite(logits[i]) != 0;
    if (!finite) return -1;
    if (temperature == 0.0f) return sample_argmax(logits, n);
    for (int q = 0; q < n; q++) logits[q] /= temperature;
    pli_softmax(logits, n);
    float coin = random_f32(rng_state);
    if (topp <= 0 || topp >= 1) return sample_mult(logits, n, coin);
    return sample_topp(logits, n, topp, probindex, coin);
}
