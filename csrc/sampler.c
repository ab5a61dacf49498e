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
 * prefix whose mass exceeds topp, sample in it. n >= 2 (pl_sample answers n == 1 itself).
 * When no token reaches the cutoff (e.g. near-uniform probabilities and a tiny topp; llama2.c
 * then reads probindex[-1]) the largest probability p_max is below (1-topp)/(n-1), so
 * topp < 1 - (n-1)·p_max <= p_max: the nucleus is the most probable token alone, `best` (the
 * argmax of the logits, which float32 probabilities of a huge temperature may no longer tell). */
static int sample_topp(const float *p, int n, float topp, pl_probindex *probindex, float coin,
                       int best)
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
    if (n0 == 0) return best;
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
    if (temperature == 0.0f || n == 1) return sample_argmax(logits, n);
    /* the largest logit divided by the temperature must stay finite, or softmax computes inf-inf:
     * a temperature that small (a denormal one, or a logit near FLT_MAX) is greedy, as its limit.
     * Only this one extra division: the arithmetic on the logits is llama2.c's. */
    int best = sample_argmax(logits, n);
    if (!isfinite(logits[best] / temperature)) return best;
    for (int q = 0; q < n; q++) logits[q] /= temperature;
    pli_softmax(logits, n);
    float coin = random_f32(rng_state);
    if (topp <= 0 || topp >= 1) return sample_mult(logits, n, coin);
    return sample_topp(logits, n, topp, probindex, coin, best);
}
