/* The team barrier of pl_forward's parallel region: spin a little, then sleep.
 *
 * libgomp's own barrier either spins for a long fixed count (its default, or without end when
 * OMP_WAIT_POLICY=active) or sleeps at once (passive). Spinning is what one process alone wants
 * (a step is over in microseconds, a sleep and wake-up costs tens of them), sleeping is what two
 * processes sharing the cores want (a spinning thread holds the core its descheduled partner
 * needs to reach the barrier). This barrier spins about as long as a wait at it usually lasts
 * when all partners run (a running average, within [PL_SPIN_MIN_NS, PL_SPIN_MAX_NS]), then
 * sleeps on a futex until the last thread arrives: alone it almost never sleeps; under
 * contention a waiting thread gives its core away after a few microseconds.
 */
#define _GNU_SOURCE /* syscall() */
#include <limits.h>
#include <stdatomic.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h"

#ifndef PL_SPIN_MIN_NS
#define PL_SPIN_MIN_NS 2000LL    /* never give up sooner than this */
#endif
#ifndef PL_SPIN_MAX_NS
#define PL_SPIN_MAX_NS 50000LL   /* nor later */
#endif

static _Thread_local pl__barrier *team; /* the barrier of the calling thread's team, or NULL */
static _Thread_local unsigned team_steps; /* pl__chunks_begin calls since pl__team_enter */
static _Thread_local int team_tid;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void futex_wait(atomic_uint *word, unsigned expected)
{
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
#else
    (void)word, (void)expected;
    cpu_relax();
#endif
}

static void futex_wake_all(atomic_uint *word)
{
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

void pl__team_init(pl__barrier *b)
{
    atomic_init(&b->arrived, 0);
    atomic_init(&b->phase, 0u);
    atomic_init(&b->sleepers, 0);
    atomic_init(&b->typical_ns, PL_SPIN_MIN_NS);
    atomic_init(&b->n_threads, 1);
    for (int i = 0; i < PL_MAX_TEAM; i++) {
        atomic_init(&b->chunks[i].word, 0ull);
        atomic_init(&b->chunks[i].active_ns, 0LL);
    }
}

void pl__team_enter(pl__barrier *b)
{
#ifdef _OPENMP
    if (b) /* every member stores the same value before it can reach a barrier */
        atomic_store_explicit(&b->n_threads, omp_get_num_threads(), memory_order_relaxed);
#endif
    team = b;
    team_steps = 0;
    team_tid = 0;
#ifdef _OPENMP
    team_tid = omp_get_thread_num();
#endif
}

void pl__team_sync(void)
{
    pl__barrier *b = team;
    if (!b)
        return;
    const int n_threads = atomic_load_explicit(&b->n_threads, memory_order_relaxed);
    if (n_threads < 2)
        return;
    unsigned phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == n_threads - 1) {
        /* the last one: reset the count for the next phase, then release everybody */
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->phase, 1u, memory_order_seq_cst);
        if (atomic_load_explicit(&b->sleepers, memory_order_seq_cst))
            futex_wake_all(&b->phase);
        return;
    }
    long long typical = atomic_load_explicit(&b->typical_ns, memory_order_relaxed);
    long long budget = 4 * typical;
    budget = budget < PL_SPIN_MIN_NS ? PL_SPIN_MIN_NS : budget > PL_SPIN_MAX_NS ? PL_SPIN_MAX_NS : budget;
    long long t0 = now_ns(), waited = 0;
    for (int i = 1;; i++) {
        if (atomic_load_explicit(&b->phase, memory_order_acquire) != phase) {
            /* released while spinning: fold this wait into the running average (1/8 weight) */
            waited = now_ns() - t0;
            atomic_store_explicit(&b->typical_ns, typical + (waited - typical) / 8, memory_order_relaxed);
            return;
        }
        cpu_relax();
        if ((i & 15) == 0 && now_ns() - t0 > budget)
            break;
    }
    /* the partners are late (descheduled, most likely): sleep until the last one arrives */
    atomic_fetch_add_explicit(&b->sleepers, 1, memory_order_seq_cst);
    while (atomic_load_explicit(&b->phase, memory_order_seq_cst) == phase)
        futex_wait(&b->phase, phase);
    atomic_fetch_sub_explicit(&b->sleepers, 1, memory_order_relaxed);
}

/* ------------------------------------------------------------------------------------------------
 * shared chunks of a step: a member's slot word is step << 48 | front << 24 | back */

#define CHUNK_MAX (1LL << 24)
#ifndef PL_ALIVE_MIN_NS
#define PL_ALIVE_MIN_NS 5000LL   /* a member counts as at work if it took a run this recently */
#endif
#ifndef PL_ALIVE_MAX_NS
#define PL_ALIVE_MAX_NS 200000LL /* (4 of the taker's own runs' time, within these bounds) */
#endif

static unsigned long long chunk_word(unsigned step, long long front, long long back)
{
    return (unsigned long long)(step & 0xffffu) << 48 | (unsigned long long)front << 24
           | (unsigned long long)back;
}

/* Member v's slot, set to its part of step c->step unless that is done already: by v itself, or
 * by a member that came to take from it before v began the step (the step before ended with a
 * barrier, so v is done with that one). */
static _Atomic unsigned long long *chunk_slot(pl__barrier *b, const pl__chunks *c, int v, int nth)
{
    _Atomic unsigned long long *slot = &b->chunks[v].word;
    unsigned long long w = atomic_load_explicit(slot, memory_order_acquire);
    const unsigned long long fresh = chunk_word(c->step, c->n * v / nth, c->n * (v + 1) / nth);
    while ((unsigned)(w >> 48) != c->step)
        if (atomic_compare_exchange_weak_explicit(slot, &w, fresh, memory_order_acq_rel,
                                                  memory_order_acquire))
            break;
    return slot;
}

void pl__chunks_begin(pl__chunks *c, long long n, long long max_run)
{
    pl__barrier *b = team;
    const int nth = b ? atomic_load_explicit(&b->n_threads, memory_order_relaxed) : 1;
    c->n = n;
    c->max_run = max_run > 1 ? max_run : 1;
    c->step = ++team_steps & 0xffffu;
    c->shared = nth > 1 && nth <= PL_MAX_TEAM && n < CHUNK_MAX;
    if (!c->shared) { /* all of it, or (a huge team or step) an even part of it */
        c->next = nth > 1 ? n * team_tid / nth : 0;
        c->end = nth > 1 ? n * (team_tid + 1) / nth : n;
        return;
    }
    c->began_ns = now_ns();
    c->own_taken = 0;
    atomic_store_explicit(&b->chunks[team_tid].active_ns, c->began_ns, memory_order_relaxed);
    chunk_slot(b, c, team_tid, nth);
}

/* The next chunks from member v's slot: for v itself (own) a run from its front, a quarter of
 * what is left within [1, max_run]; for the others one chunk from its back. The first one's
 * index, the end in *end; -1 when it has none left. */
static long long take_chunks(_Atomic unsigned long long *slot, unsigned step, int own,
                             long long max_run, long long *end)
{
    const unsigned long long mask = (unsigned long long)(CHUNK_MAX - 1);
    unsigned long long w = atomic_load_explicit(slot, memory_order_acquire);
    for (;;) {
        long long front = (long long)(w >> 24 & mask), back = (long long)(w & mask);
        if (front >= back)
            return -1;
        long long run = own ? (back - front) / 4 : 1;
        run = run < 1 ? 1 : run > max_run ? max_run : run;
        const long long first = own ? front : back - run;
        unsigned long long next = own ? chunk_word(step, front + run, back)
                                      : chunk_word(step, front, back - run);
        if (atomic_compare_exchange_weak_explicit(slot, &w, next, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            *end = first + run;
            return first;
        }
    }
}

long long pl__chunks_next(pl__chunks *c, long long *end)
{
    if (!c->shared) {
        if (c->next >= c->end)
            return -1;
        const long long k = c->next;
        c->next = c->end - k > c->max_run ? k + c->max_run : c->end;
        *end = c->next;
        return k;
    }
    pl__barrier *b = team;
    const int nth = atomic_load_explicit(&b->n_threads, memory_order_relaxed);
    long long i = take_chunks(&b->chunks[team_tid].word, c->step, 1, c->max_run, end);
    if (i >= 0) {
        c->own_taken++;
        atomic_store_explicit(&b->chunks[team_tid].active_ns, now_ns(), memory_order_relaxed);
        return i;
    }
    /* Own chunks done: take from members that are at work, those that began this step or took
     * a run within the last few runs' time. A member that did neither is most likely
     * descheduled (other processes share the cores): its chunks are left to it, and this thread
     * goes to the barrier, where it gives its core away. (Taking them as well brought two
     * processes on two cores down to 0.6-0.8x of one alone, from 0.8-0.9x: the late member came
     * back only to find nothing left to do, and each process ran its steps a thread at a time,
     * with a sleep and a wake-up between each two.) */
    const long long now = now_ns();
    long long per = (now - c->began_ns) / (c->own_taken > 0 ? c->own_taken : 1);
    long long window = 4 * per;
    window = window < PL_ALIVE_MIN_NS ? PL_ALIVE_MIN_NS : window > PL_ALIVE_MAX_NS ? PL_ALIVE_MAX_NS : window;
    for (int k = 1; i < 0 && k < nth; k++) {
        const int v = (team_tid + k) % nth;
        if (now - atomic_load_explicit(&b->chunks[v].active_ns, memory_order_relaxed) > window)
            continue;
        i = take_chunks(chunk_slot(b, c, v, nth), c->step, 0, 1, end);
    }
    return i;
}
