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
}

void pl__team_enter(pl__barrier *b)
{
#ifdef _OPENMP
    if (b) /* every member stores the same value before it can reach a barrier */
        atomic_store_explicit(&b->n_threads, omp_get_num_threads(), memory_order_relaxed);
#endif
    team = b;
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
