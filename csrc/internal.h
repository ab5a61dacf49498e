/* Shared between run.c and matmul.c (not part of the cffi API). */
#ifndef PYLLAMA_INTERNAL_H
#define PYLLAMA_INTERNAL_H
#include <stdint.h>
#include "kernels.h"  /* includes pyllama.h, once */

/* One matmul of a group that shares its input: out(n, w->rows) = x(n, w->cols) @ w^T. */
typedef struct {
    const pl_tensor *w;
    float *out;
} pl__mm;

#define PL_MAX_GROUP 3   /* matmuls sharing one input: q, k, v */

/* What to do with rows [r0, r1) of matmul i of a group (i = -1: of each) once they are computed. */
typedef struct {
    void (*fn)(void *ctx, int i, long long r0, long long r1);
    void *ctx;
} pl__epilogue;

/* Inside an OpenMP parallel region (or outside one, single-threaded): all threads of the team
 * call it together (see matmul.c). scratch holds PL_MAX_GROUP slots of quantized activations. */
void pl__team_matmuls(const float *x, int n, const pl__mm *mm, int nmm, void *scratch,
                      int same_rows, const pl__epilogue *epi);

/* Activation scratch bytes one matmul with w needs. */
long long pl__act_bytes(const pl_tensor *w);

/* The team barrier of a parallel region (threads.c): spins about as long as a wait usually lasts,
 * then sleeps on a futex. One per parallel region, made by pl__team_init before it; every thread
 * of the team calls pl__team_enter first (it reads the team's size: OpenMP may give fewer threads
 * than asked), then pl__team_sync where all must meet: a no-op outside a team
 * (pl__team_enter(NULL)) or in a team of one. The barrier also holds each member's slot of
 * shared chunks (pl__chunks, below). */
#define PL_MAX_TEAM 64 /* members whose chunks can be shared (pl__chunks); larger teams split statically */

/* A member's remaining chunks of the current step: step number (16 bits), front, back (24 bits
 * each), alone on its cache line. */
typedef struct {
    _Alignas(64) _Atomic unsigned long long word;
    _Atomic long long active_ns; /* when its owner last began a step or took a chunk of its own */
} pl__chunk_slot;

typedef struct {
    _Atomic int arrived;          /* threads at the barrier in this phase */
    _Atomic unsigned phase;       /* bumped by the last arrival (the futex word) */
    _Atomic int sleepers;         /* threads asleep on phase */
    _Atomic long long typical_ns; /* running average of a wait that ended while spinning */
    _Atomic int n_threads;        /* the team's size (each member stores it on entry) */
    pl__chunk_slot chunks[PL_MAX_TEAM];
} pl__barrier;

void pl__team_init(pl__barrier *b);
void pl__team_enter(pl__barrier *b);
void pl__team_sync(void);

/* Chunks [0, n) of one step of work, shared by the team: each member starts with an even,
 * contiguous part of them and takes its chunks front to back, in runs of consecutive chunks (a
 * quarter of what its part has left, within [1, max_run]); a member done with its own takes the
 * others' from their back end, one at a time. So a member that gets less of the memory
 * bandwidth (or is descheduled) for a while does not hold the whole team at the next barrier,
 * and the runs keep each taking (an atomic exchange, a fence that drains the loads in flight)
 * rare while the ends of the parts stay fine-grained.
 * Every member calls pl__chunks_begin with the same n and max_run (steps in the same order),
 * then pl__chunks_next until it returns -1; the step must end with a pl__team_sync. Outside a
 * team (or in a team of one) the caller gets every chunk in order, max_run at a time. */
typedef struct {
    long long n, max_run;
    long long next, end; /* own chunks when not shared */
    long long began_ns, own_taken; /* when this member began the step; runs of its own it took */
    unsigned step;
    int shared;
} pl__chunks;

void pl__chunks_begin(pl__chunks *c, long long n, long long max_run);
/* The first chunk of the next run, its end (exclusive) in *end; -1 when none is left. */
long long pl__chunks_next(pl__chunks *c, long long *end);

/* The KV cache (pl_state: key_cache, value_cache). Layer l's part of a slot's cache, n_ctx·kv_dim
 * floats at + pl__kv_offset, holds each kv head's positions together: head g's key (or value) at
 * position p is the head_size floats at + pl__kv_head_row(g, p) from there. A token's attention
 * then reads one sequential stream per head, which the hardware prefetches at full read bandwidth
 * (a position-major layout read a head's 256 bytes of every 3 KB row, at a third of it: 110M at
 * 256 positions). */
static inline long long pl__kv_offset(const pl_state *s, int slot, int l, int n_layers, int kv_dim)
{
    return ((long long)slot * n_layers + l) * s->n_ctx * kv_dim;
}

static inline long long pl__kv_head_row(const pl_state *s, int g, long long pos, int head_size)
{
    return ((long long)g * s->n_ctx + pos) * head_size;
}

/* Causal attention (attention.c). pl__attend_heads: nt consecutive tokens of one sequence (token i
 * at position last + i), each with nq query heads that share one kv head (query head j of token i:
 * q + i·tok_stride + j·head_size, its result at the same offset from out, its scores att +
 * i·att_tok_stride + j·att_stride, last + i + 1 floats), each query in llama2.c's order and with
 * the same bits whatever nt: a block of keys (and of values) is read once for all nt·nq queries.
 * pl__attend_block: one head, nq <= PL_ATT_BLOCK
 * consecutive queries at positions p0.. (query i: q + i·q_stride, its result out + i·out_stride)
 * over keys 0 .. p0 + nq - 1, st holding (p0 + nq)·PL_ATT_BLOCK floats; only where
 * pl__attend_block_ok(head_size). Keys and values of position j: kh, vh + j·head_size (a kv
 * head's positions lie together in the cache: pl__kv_head_row above). */
#define PL_ATT_BLOCK 16
#define PL_ATT_MAX_HEAD 256
void pl__attend_heads(float *out, const float *q, long long tok_stride, int nt, int nq, const float *kh,
                      const float *vh, int last, int head_size, float scale, float *att,
                      long long att_stride, long long att_tok_stride);
int pl__attend_block_ok(int head_size);
void pl__attend_block(float *out, long long out_stride, const float *q, long long q_stride, int nq,
                      int p0, const float *kh, const float *vh, int head_size, float scale,
                      float *st);

/* a[i] = silu(a[i])·b[i] for i < n (attention.c: with its softmax's exp, within 2 ulp of expf, where
 * the build has AVX2; each a[i] the same bits whatever n and where the run starts). */
void pl__swiglu(float *a, const float *b, long long n);

/* In place: x[i] = exp(x[i] - max) / sum (llama2.c's arithmetic; the sampler relies on it). */
void pli_softmax(float *x, int size);

#endif
