"""How many threads a step runs on, chosen by timing the steps: an engine's steps
(pyllama/engine.py), and the one-token steps of a model left at the default thread count
(pyllama/model.py, Transformer.threads).

A team of threads meets at a barrier several times per layer; when another thread on the machine
takes one member's core (a server's event loop, its clients, other processes), every other member
waits at the next barrier. A step of a few tokens on a small model is then often faster on fewer
threads, while a large step or a quiet machine wants them all, and which case holds changes with
the load. So the engine times its steps: for each size of step (tokens, in powers of two) it keeps
the median of the last few step times with each choice of threads (max_threads, halved down to
1: a median, because other processes only ever add time, in spikes), runs the fastest, and now
and then tries another choice, so the figures follow the load. A try is a few steps in a row
(one, if that step is far slower than the best choice); the slower the choice was, the rarer
its tries, so that about 1% of the time goes to trying.

Step times alone do not settle it when other processes keep the cores busy: the scheduler shares
a core between threads, not processes, so a process that runs two threads gets more of the
machine than one that runs one, and each tuner would keep two while all of them together would
do more with one each (stories15M, four processes on 2 cores: 0.72x of one process alone with
each tuner's pick, 0.86x with one thread each). So when the CPU time of the one-thread steps
(the one thread's own, time.thread_time) falls below BUSY of their time, the cores are contended,
and the tuner runs one thread, without tries, until those steps hold their core again.

Results do not depend on the choice for quantized weights (each output row is one thread's);
float weights differ in the last bits, within what batching already allows (1e-5 relative).
"""

import collections

BUSY = 0.8          # a one-thread step that held its core for less of its time: cores contended
TRY = 4             # steps in a row of one try
KEEP = 8            # a choice's figure: the median of its last KEEP step times
MIN_EVERY = 16      # steps of one size between two tries, at the least
MAX_EVERY = 400     # and at the most
COST = 0.01         # target share of the time lost to tries
ABORT = 1.5         # a try ends after one step this many times slower than the best known


class _Size:
    def __init__(self, n):
        self.times = [collections.deque(maxlen=KEEP) for _ in range(n)]  # per choice
        self.median = [None] * n  # the medians of those
        self.since = 0          # steps since the last try
        self.turn = 0           # which other choice to try next
        self.trying = None      # the choice being tried, with the steps it has left
        self.left = 0
        self.held = collections.deque(maxlen=KEEP)  # CPU time / time of the one-thread steps


class ThreadTuner:
    """pick(n_tokens) -> (key, threads) before a step; done(key, seconds, cpu_seconds) after it."""

    def __init__(self, max_threads):
        self.choices = sorted({max(1, max_threads >> k) for k in range(max(1, max_threads).bit_length())})
        self._sizes = {}
        self.last = self.choices[-1]

    def _best(self, st):
        return min(range(len(st.median)), key=st.median.__getitem__)

    @staticmethod
    def _contended(st):
        """The one-thread steps lately held their core for less than BUSY of their time: other
        threads want these cores too (the upper median of the last KEEP, at least 3)."""
        return len(st.held) >= 3 and sorted(st.held)[len(st.held) // 2] < BUSY

    def pick(self, n_tokens):
        size = int(n_tokens).bit_length()
        st = self._sizes.get(size)
        if st is None:
            st = self._sizes[size] = _Size(len(self.choices))
        if st.trying is None:
            untried = [j for j in range(len(st.median)) if st.median[j] is None]
            if untried:  # each choice first gets a try (all threads first)
                st.trying, st.left = untried[-1], TRY
            elif self._contended(st):
                pass  # one thread, no tries, until its steps hold their core again
            else:
                best = self._best(st)
                others = [j for j in range(len(st.median)) if j != best]
                st.since += 1
                if others:
                    j = others[st.turn % len(others)]
                    # a try costs TRY * (ratio - 1) steps' worth: keep it to COST of the time
                    every = min(MAX_EVERY, max(MIN_EVERY, TRY * (st.median[j] / st.median[best] - 1) / COST))
                    if st.since >= every:
                        st.trying, st.left = j, TRY
                        st.since, st.turn = 0, st.turn + 1
        i = st.trying if st.trying is not None else 0 if self._contended(st) else self._best(st)
        self.last = self.choices[i]
        return (size, i), self.last

    def done(self, key, seconds, cpu_seconds=None):
        """After the step of `key`: its time, and (if known) the CPU time of the thread that ran
        it, which with one thread tells whether the step had its core all along."""
        size, i = key
        st = self._sizes[size]
        if cpu_seconds is not None and self.choices[i] == 1 and seconds > 0:
            st.held.append(cpu_seconds / seconds)
        st.times[i].append(seconds)
        st.median[i] = sorted(st.times[i])[len(st.times[i]) // 2]  # (the upper median)
        if st.trying == i:
            st.left -= 1
            known = [m for j, m in enumerate(st.median) if m is not None and j != i]
            if st.left == 0 or known and seconds > ABORT * min(known):  # (clearly slower: enough)
                st.trying = None
