/* pyllama's C API: the whole boundary between Python and C.
 *
 * build_ffi.py reads this file verbatim as the cffi cdef, and every C file of csrc includes it, so
 * the two cannot drift apart. Keep it cdef-clean: no #include, no #ifdef, only integer #defines.
 * Bump PL_ABI_VERSION whenever a struct or signature here changes: pyllama/__init__.py refuses a
 * compiled core whose version differs (a stale build).
 *
 * C does arithmetic only. Python validates every size and offset before it hands C a pointer, and
 * owns every buffer (numpy arrays kept alive by the Python objects that hold these structs).
 */

#define PL_ABI_VERSION 10

/* Tensor types: ggml's type numbers, plus one of our own for llama2.c V2 checkpoints. The types
 * the core computes with are exactly these; Python reads their numbers from the compiled core
 * (pyllama/formats/common.py, whose GGML_TYPES table holds names and block sizes of every ggml
 * type; tests/test_types.py checks that the two agree). */
#define PL_F32 0
#define PL_F16 1
#define PL_Q4_0 2
#define PL_Q4_1 3
#define PL_Q5_0 6
#define PL_Q5_1 7
#define PL_Q8_0 8
#define PL_Q2_K 10
#define PL_Q3_K 11
#define PL_Q4_K 12
#define PL_Q5_K 13
#define PL_Q6_K 14
#define PL_BF16 30
#define PL_Q8_G 1000   /* llama2.c V2: int8 values, f32 scale per group_size values in `scales` */

/* Weight layouts made at load time by pl_repack (never read from or written to a file): Q4_0,
 * Q5_0 or Q8_0 with 16 rows interleaved, so that one 512-bit VNNI register holds 4 values of 16 rows and
 * every kernel (one token or a batch) computes 16 rows per instruction. Only builds with AVX-512
 * VNNI make them (pl_repack_bytes > 0). */
#define PL_Q4_0_R16 1002
#define PL_Q5_0_R16 1006
#define PL_Q8_0_R16 1008
/* Q4_K / Q6_K with 16 rows interleaved the same way (Q4_K: dword p of each row's super-block side
 * by side; Q6_K: its values re-encoded in the same bytes, see csrc/quants.c), read by the same
 * VNNI kernels for one token and batches alike, with the file layout's results bit for bit. */
#define PL_Q4_K_R16 1012
#define PL_Q6_K_R16 1014
/* F32 / F16 / BF16 matrices of wide rows (more than 4096 values, a multiple of 16; rows a multiple
 * of 4) as groups of 4 rows interleaved 16 values at a time: one stream of weights in which each
 * 16 values of x serve 4 rows (csrc/matmul.c, "Wide float rows"). Made by pl_repack in builds with
 * AVX2; every row's sum is the plain layout's, bit for bit. */
#define PL_F32_R4 1100
#define PL_F16_R4 1101
#define PL_BF16_R4 1130

/* A 2-D weight matrix, row-major: `rows` rows of `cols` elements (cols = the input length). */
typedef struct {
    const void *data;    /* rows * (bytes per row of `type`) */
    const float *scales; /* PL_Q8_G only: rows*cols/group_size scales; NULL otherwise */
    int type;            /* a PL_* type above */
    int group_size;      /* PL_Q8_G only */
    long long rows;
    long long cols;
} pl_tensor;

typedef struct {
    int dim;          /* transformer width */
    int hidden_dim;   /* FFN width */
    int n_layers;
    int n_heads;      /* query heads */
    int n_kv_heads;   /* key/value heads (n_heads is a multiple of it) */
    int vocab_size;
    int seq_len;      /* the model's maximum context */
    float rms_eps;    /* rmsnorm epsilon (1e-5 for llama2.c files) */
    float rope_theta; /* RoPE frequency base (10000 for llama2.c files) */
    int head_dim;     /* values per attention head (dim / n_heads unless the file says otherwise) */
    int rope_style;   /* PL_ROPE_NORM or PL_ROPE_NEOX */
} pl_config;

/* RoPE pair layouts within a head of head_dim values (pl_config.rope_style). */
#define PL_ROPE_NORM 0 /* rotates (2i, 2i+1): llama2.c, Meta's Llama */
#define PL_ROPE_NEOX 1 /* rotates (i, i + head_dim/2): GPT-NeoX, Qwen2 */

typedef struct {
    const float *rms_att; /* (dim,) */
    const float *rms_ffn; /* (dim,) */
    pl_tensor wq;         /* (n_heads*head_dim, dim) */
    pl_tensor wk;         /* (n_kv_heads*head_dim, dim) */
    pl_tensor wv;         /* (n_kv_heads*head_dim, dim) */
    pl_tensor wo;         /* (dim, n_heads*head_dim) */
    pl_tensor w1;         /* (hidden_dim, dim)  gate */
    pl_tensor w2;         /* (dim, hidden_dim)  down */
    pl_tensor w3;         /* (hidden_dim, dim)  up */
    const float *bq;      /* (n_heads*head_dim,) added after wq; NULL when absent */
    const float *bk;      /* (n_kv_heads*head_dim,) added after wk; NULL when absent */
    const float *bv;      /* (n_kv_heads*head_dim,) added after wv; NULL when absent */
} pl_layer;

typedef struct {
    pl_config cfg;
    pl_tensor token_embedding; /* (vocab_size, dim) */
    const float *rms_final;    /* (dim,) */
    pl_tensor wcls;            /* (vocab_size, dim); may alias token_embedding */
    pl_layer *layers;          /* [n_layers] */
    const float *rope_freqs;   /* (head_dim/2,) divisors of the pairs' RoPE frequencies (Llama 3.1
                                  rope scaling), or NULL */
} pl_weights;

/* Run state: activations and a KV cache of n_slots sequences (slots). All buffers are allocated
 * by Python. Activations hold up to max_batch tokens (row t belongs to the t-th token of a
 * call); slot i's cache is key_cache[i] (one contiguous block per slot). */
typedef struct {
    float *x;           /* (max_batch, dim) activation */
    float *xb;          /* (max_batch, max(dim, n_heads*head_dim)) */
    float *xb2;         /* (max_batch, dim) */
    float *hb;          /* (max_batch, hidden_dim) */
    float *hb2;         /* (max_batch, hidden_dim) */
    float *q;           /* (max_batch, n_heads*head_dim) */
    float *att;         /* (max_batch, n_heads, n_ctx) attention scores */
    float *logits;      /* (max_batch, vocab_size) */
    float *rope;        /* (max_batch, head_dim) RoPE cos/sin pairs of each token's position */
    float *key_cache;   /* (n_slots, n_layers, n_kv_heads, n_ctx, head_dim) */
    float *value_cache; /* (n_slots, n_layers, n_kv_heads, n_ctx, head_dim) */
    float *k;           /* (max_batch, kv_dim) a batch's keys before they go to their slots */
    float *v;           /* (max_batch, kv_dim) its values */
    void *scratch;      /* pl_scratch_bytes(weights, max_batch) bytes: quantized activations */
    int n_ctx;          /* positions each slot of the KV cache holds */
    int n_slots;        /* sequences the KV cache holds (>= 1) */
    int max_batch;      /* tokens one pl_forward call may take (>= 1) */
    int n_threads;      /* OpenMP threads for this state's calls (>= 1) */
} pl_state;

/* Sampler scratch entry (llama2.c's ProbIndex). */
typedef struct {
    float prob;
    int index;
} pl_probindex;

int pl_abi_version(void);
int pl_has_openmp(void);
int pl_max_threads(void);
const char *pl_build_info(void);

/* Bytes of state->scratch that pl_forward needs for these weights and batch size. */
long long pl_scratch_bytes(const pl_weights *w, int max_batch);

/* Which logits pl_forward computes into s->logits. */
#define PL_LOGITS_LAST 0 /* the last token's (row 0) */
#define PL_LOGITS_ALL 1  /* every token's (row t) */
#define PL_LOGITS_NONE 2 /* none: a batch of a prompt that more batches follow */

/* Runs tokens[0..n) at positions pos..pos+n-1 (1 <= n <= s->max_batch, pos + n <= s->n_ctx,
 * 0 <= token < vocab), appending them to slot 0 of the KV cache, and computes the logits
 * `logits` says (PL_LOGITS_*). The prompt goes through as one batch: each weight row is read once
 * for all n tokens. */
void pl_forward(const pl_weights *w, pl_state *s, const int *tokens, int n, int pos, int logits);

/* Tokens of several sequences for one pl_forward_batch call: token t (0 <= t < n <= max_batch)
 * is tokens[t] at position pos[t] of slot slot[t]. Python checks, per slot, that the positions
 * of its tokens are, in batch order, exactly the next ones after those the slot holds (so every
 * position a token attends to is written by an earlier call or earlier in this one). */
typedef struct {
    const int *tokens;      /* [n] 0 <= token < vocab_size */
    const int *pos;         /* [n] 0 <= pos < n_ctx */
    const int *slot;        /* [n] 0 <= slot < n_slots */
    const int *want_logits; /* [n] nonzero: compute this token's logits */
    int n;
} pl_batch;

/* Runs a batch of tokens from any slots in one pass (each weight row is read once for all of
 * them): token t attends to positions 0..pos[t] of its own slot. The logits of the wanted tokens
 * go to s->logits rows 0, 1, ... in batch order. pl_forward is the case of one slot (0) and
 * consecutive positions; a batch of that shape takes the same path, bit for bit. */
void pl_forward_batch(const pl_weights *w, pl_state *s, const pl_batch *b);

/* xout(n, rows) = x(n, cols) @ W^T for n >= 1 tokens, through the kernels
 * pl_forward uses (prefill tiles for n > 1); scratch of pl_matmul_scratch_bytes(w, n) bytes;
 * W.cols must be a multiple of the block. */
void pl_matmul(float *xout, const float *x, int n, const pl_tensor *w, void *scratch, int n_threads);
long long pl_matmul_scratch_bytes(const pl_tensor *w, int n);

/* Bytes of W in its repacked layout, or 0 when this build has none for W's type and shape. */
long long pl_repack_bytes(const pl_tensor *w);
/* Writes W's repacked layout to dst (pl_repack_bytes(w) bytes, 64-byte aligned) with n_threads
 * threads; returns the type of the repacked tensor (data = dst, same rows and cols). */
int pl_repack(const pl_tensor *w, void *dst, int n_threads);

/* out(cols) = row `row` of W, dequantized to f32. */
void pl_dequantize_row(const pl_tensor *w, long long row, float *out);

/* Sum of x[0..n) read by n_threads threads: the benchmark's memory read-bandwidth probe. */
double pl_sum_f32(const float *x, long long n, int n_threads);

/* llama2.c's sampler: argmax at temperature 0, else softmax(logits/temperature) (logits is
 * overwritten with the probabilities) and one xorshift* draw from *rng_state: multinomial, or
 * top-p when 0 < topp < 1. probindex holds n entries. Returns -1, touching nothing, when a logit
 * is NaN or infinite. Argmax, without a draw, when n == 1 or when the largest logit divided by
 * the temperature overflows; top-p takes the most probable token when none reaches its cutoff. */
int pl_sample(float *logits, int n, float temperature, float topp,
              unsigned long long *rng_state, pl_probindex *probindex);

/* ------------------------------------------------------------------------------------------------
 * The llama.cpp-order sampler chain (csrc/sampling.c, pyllama/sampling.py). Candidates are
 * pl_probindex entries whose `prob` holds a logit; the stages after top-k take them sorted by
 * logit descending (ties: lower id first) and return how many they keep. p: n doubles of scratch.
 */
typedef struct {
    int top_k;               /* <= 0 or >= n: off; 1: argmax */
    float top_p;             /* 1: off */
    float min_p;             /* 0: off */
    float typical_p;         /* 1: off */
    float temperature;       /* <= 0: argmax */
    float repeat_penalty;    /* 1: off */
    float frequency_penalty; /* 0: off */
    float presence_penalty;  /* 0: off */
} pl_sampling;

/* cand[i] = {logits[i], i}; returns n, or -1 (touching nothing) when a logit is NaN or infinite. */
int pl_cand_init(const float *logits, int n, pl_probindex *cand);
/* Penalties of the window's tokens on unsorted candidates (cand[t].index == t); counts: a
 * vocabulary-sized int array of zeros, left zero. */
void pl_penalize(pl_probindex *cand, const int *window, int n_window, int *counts,
                 float repeat_penalty, float frequency_penalty, float presence_penalty);
void pl_logit_bias(pl_probindex *cand, const int *ids, const float *bias, int n_bias);
/* The k largest, sorted (k <= 0: all n, sorted). */
int pl_top_k(pl_probindex *cand, int n, int k);
int pl_typical(pl_probindex *cand, int n, float typical_p, double *p, pl_probindex *tmp);
int pl_top_p(pl_probindex *cand, int n, float top_p, double *p);
/* min-p and the draw take the candidates in any order (min-p keeps their order). */
int pl_min_p(pl_probindex *cand, int n, float min_p);
/* A token drawn from softmax(logit/temperature) of the n candidates (temperature <= 0: the
 * largest logit, the lower id on a tie). */
int pl_draw(const pl_probindex *cand, int n, float temperature, double *p, unsigned long long *rng);
double pl_uniform(unsigned long long *rng);
/* The whole chain on a copy of logits: penalties over window, logit bias, top-k, typical, top-p,
 * min-p, temperature, draw. cand and tmp hold n entries, counts n zeros. -1: non-finite logits. */
int pl_sample_chain(const float *logits, int n, const pl_sampling *sp, const int *window, int n_window,
                    const int *bias_ids, const float *bias, int n_bias, pl_probindex *cand,
                    pl_probindex *tmp, double *p, int *counts, unsigned long long *rng);
/* log(sum(exp(x))) over x[0..n): the normalizer of log-probabilities. */
double pl_logsumexp(const float *x, int n);

/* Moves KV-cache positions [src, src+n) to [dst, dst+n) in every layer and rotates the moved keys
 * by (dst - src) positions of the model's RoPE (w->cfg.rope_style, w->rope_freqs). Python checks
 * the ranges. */
void pl_kv_shift(const pl_weights *w, pl_state *s, int src, int dst, int n);
