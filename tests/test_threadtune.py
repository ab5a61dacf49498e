"""Threads per engine step (pyllama/threadtune.py), driven with made-up step times.

Expected values follow from the tuner's definition in its module doc: every choice of threads
(max, halved down to 1) is tried first, the fastest runs, the others are tried again TRY steps at
a time (one step when it is ABORT times slower than the best), about every
TRY * (ratio - 1) / COST steps (between MIN_EVERY and MAX_EVERY).
"""
import collections

import pytest

from pyllama.threadtune import ABORT, BUSY, COST, KEEP, MAX_EVERY, MIN_EVERY, TRY, ThreadTuner


def run(tuner, steps, seconds_of, n_tokens=1):
    """Drive `steps` steps; seconds_of(threads, step) is a step's time. Counts per choice."""
    used = collections.Counter()
    for k in range(steps):
        key, threads = tuner.pick(n_tokens)
        used[threads] += 1
        tuner.done(key, seconds_of(threads, k))
    return used


@pytest.mark.parametrize("max_threads, choices", [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]),
                                                   (6, [1, 3, 6]), (8, [1, 2, 4, 8])])
def test_choices_are_the_maximum_halved_down_to_one(max_threads, choices):
    assert ThreadTuner(max_threads).choices == choices


def test_all_threads_first_then_each_choice_then_the_fastest():
    t = ThreadTuner(2)
    seq = []
    for _ in range(2 * TRY + 5):
        key, threads = t.pick(1)
        seq.append(threads)
        t.done(key, {1: 1.0, 2: 3.0}[threads])
    assert seq == [2] * TRY + [1] * TRY + [1] * 5
    assert t.last == 1


@pytest.mark.parametrize("ratio", [1.01, 1.2, 2.0, 50.0])
def test_the_slower_choice_is_tried_about_as_rarely_as_the_cost_allows(ratio):
    t = ThreadTuner(2)
    steps = 20_000
    used = run(t, steps, lambda threads, k: ratio if threads == 2 else 1.0)
    every = min(MAX_EVERY, max(MIN_EVERY, TRY * (ratio - 1) / COST))
    length = 1 if ratio > ABORT else TRY  # a try far slower than the best ends after one step
    tries = (used[2] - TRY) / length  # after the first try (nothing known yet: TRY steps)
    assert tries == pytest.approx(steps / (every + length), rel=0.1)
    assert used[1] > used[2]


def test_a_change_of_load_moves_the_choice():
    t = ThreadTuner(2)
    # first 2 threads are twice as fast, then (another process takes a core) three times slower
    used = run(t, 2000, lambda threads, k: (1.0 if threads == 2 else 2.0) if k < 1000
               else (3.0 if threads == 2 else 1.0))
    assert t.last == 1
    late = run(t, 500, lambda threads, k: 3.0 if threads == 2 else 1.0)
    assert late[1] > 0.9 * 500 and used[2] > 900


def test_each_step_size_has_its_own_figures():
    t = ThreadTuner(2)
    # one token: 1 thread is faster; 64 tokens: 2 threads are
    for _ in range(50):
        for n, fast in ((1, 1), (64, 2)):
            key, threads = t.pick(n)
            t.done(key, 1.0 if threads == fast else 2.0)
    assert t.pick(1)[1] == 1 and t.pick(64)[1] == 2
    assert t.pick(5)[0] != t.pick(9)[0] and t.pick(9)[0] == t.pick(15)[0]  # powers of two


def test_contended_cores_mean_one_thread_until_they_are_free():
    """One-thread steps that held their core for less than BUSY of their time: other threads want
    the cores, and the tuner stays on one thread (no tries) even where two look faster by the
    clock; once those steps hold their core again, the fastest choice is back."""
    t = ThreadTuner(2)
    used = collections.Counter()
    for held in (0.5, 1.0):
        used.clear()
        for _ in range(300):
            key, threads = t.pick(1)
            used[threads] += 1
            seconds = 1.0 if threads == 2 else 1.5
            t.done(key, seconds, seconds * (held if threads == 1 else 2.0))
        if held < BUSY:
            assert used[2] == TRY and t.last == 1  # only the first try of all threads
        else:
            assert t.last == 2 and used[2] > used[1]
    for _ in range(3 * KEEP):  # without CPU times (an engine that gives none): by the clock
        key, threads = t.pick(1)
        t.done(key, 1.0 if threads == 2 else 1.5)
    assert t.last == 2
