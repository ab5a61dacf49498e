"""The llama.cpp-order sampler chain (pyllama/sampling.py, csrc/sampling.c).

Expected values: each stage against a numpy reference written here from the sampler's definition
(llama.cpp's src/llama-sampling.cpp describes the same definitions: top-k keeps the k largest
logits; typical keeps the tokens whose surprise is closest to the entropy until their mass reaches
p; top-p the shortest most-likely prefix of mass >= p; min-p the tokens with p >= min_p * p_max;
penalties divide positive / multiply negative logits by repeat_penalty and subtract
count * frequency + presence).
"""
import numpy as np
import pytest

from pyllama import ParameterError
from pyllama._core import ffi, lib
from pyllama.sampling import ChainSampler, logprobs_of, mix_seed


def rand_logits(n, seed):
    return (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)


def order(logits):
    """Sort order of the C candidates: logit descending, lower id first on ties."""
    return np.lexsort((np.arange(len(logits)), -logits.astype(np.float64)))


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


class Cands:
    """C candidate arrays for one logits vector."""

    def __init__(self, logits):
        self.logits = np.ascontiguousarray(logits, np.float32)
        self.n = len(logits)
        self.c = ffi.new("pl_probindex[]", self.n)
        self.tmp = ffi.new("pl_probindex[]", self.n)
        self.p = ffi.new("double[]", self.n)
        assert lib.pl_cand_init(ffi.from_buffer("float[]", self.logits), self.n, self.c) == self.n

    def ids(self, k):
        return [self.c[i].index for i in range(k)]

    def vals(self, k):
        return np.array([self.c[i].prob for i in range(k)], np.float32)


# -- each stage vs its numpy reference -----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 40, 511, 512, 0, 1000])
def test_top_k_is_the_k_largest_in_order(k):
    logits = rand_logits(512, k)
    logits[10] = logits[20] = logits.max() + 1  # a tie: the lower id first
    c = Cands(logits)
    kept = lib.pl_top_k(c.c, c.n, k)
    want = order(logits)[:k if 0 < k <= 512 else 512]
    assert kept == len(want) and c.ids(kept) == want.tolist()
    assert c.ids(2) == [10, 20]


def sorted_cands(logits):
    c = Cands(logits)
    lib.pl_top_k(c.c, c.n, 0)
    return c


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_keeps_the_shortest_prefix_of_mass_p(p):
    logits = rand_logits(300, 7)
    c = sorted_cands(logits)
    kept = lib.pl_top_p(c.c, c.n, p, c.p)
    probs = softmax(logits)[order(logits)]
    want = int(np.searchsorted(np.cumsum(probs), p) + 1)  # first index where the sum reaches p
    assert kept == min(want, 300)
    assert c.ids(kept) == order(logits)[:kept].tolist()


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.05, 0.3, 1.0])
def test_min_p_keeps_tokens_of_at_least_min_p_times_the_max(min_p):
    logits = rand_logits(300, 8)
    c = sorted_cands(logits)
    kept = lib.pl_min_p(c.c, c.n, min_p)
    probs = softmax(logits)
    want = set(np.nonzero(probs >= min_p * probs.max() * (1 - 1e-6))[0]) if min_p > 0 else set(range(300))
    assert set(c.ids(kept)) == want


@pytest.mark.parametrize("typ", [0.2, 0.5, 0.9, 0.99])
def test_typical_keeps_the_most_typical_tokens(typ):
    logits = rand_logits(200, 9)
    c = sorted_cands(logits)
    kept = lib.pl_typical(c.c, c.n, typ, c.p, c.tmp)
    p = softmax(logits)
    entropy = -(p * np.log(p)).sum()
    dist = np.abs(-np.log(p) - entropy)
    by_typ = np.lexsort((np.arange(200), dist))
    want_n = int(np.searchsorted(np.cumsum(p[by_typ]), typ) + 1)
    assert kept == want_n
    want = by_typ[:want_n]
    assert c.ids(kept) == sorted(want, key=lambda i: (-logits[i], i))  # back in logit order


def test_penalties_and_bias():
    logits = rand_logits(100, 10)
    logits[5], logits[6] = 2.0, -2.0
    window = np.array([5, 6, 5, 7, 5], np.int32)
    c = Cands(logits)
    counts = ffi.new("int[]", 100)
    lib.pl_penalize(c.c, ffi.from_buffer("int[]", window), len(window), counts, 1.3, 0.25, 0.5)
    want = logits.astype(np.float32).copy()
    for t, cnt in zip(*np.unique(window, return_counts=True)):
        want[t] = want[t] / np.float32(1.3) if want[t] > 0 else want[t] * np.float32(1.3)
        want[t] -= np.float32(cnt * 0.25 + 0.5)
    np.testing.assert_allclose(c.vals(100), want, rtol=1e-6)
    assert all(counts[i] == 0 for i in range(100))  # left zero for the next token
    ids, bias = ffi.new("int[]", [3, 5]), ffi.new("float[]", [10.0, -100.0])
    lib.pl_logit_bias(c.c, ids, bias, 2)
    want[3] += 10
    want[5] -= 100
    np.testing.assert_allclose(c.vals(100), want, rtol=1e-6)


@pytest.mark.parametrize("temp", [0.3, 1.0, 2.5])
def test_draw_follows_softmax_of_logits_over_temperature(temp):
    logits = rand_logits(50, 11)
    c = sorted_cands(logits)
    rng = ffi.new("unsigned long long *", mix_seed(123))
    mirror = ffi.new("unsigned long long *", mix_seed(123))
    probs = softmax(logits[order(logits)] / temp)
    for _ in range(200):
        tok = lib.pl_draw(c.c, c.n, temp, c.p, rng)
        u = lib.pl_uniform(mirror)
        want = order(logits)[min(int(np.searchsorted(np.cumsum(probs), u, side="right")), 49)]
        assert tok == want


def test_draw_frequencies_match_the_distribution():
    logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    s = ChainSampler(4, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    ptr = ffi.from_buffer("float[]", logits)
    counts = np.bincount([s.sample(ptr) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, softmax(logits), atol=0.015)


# -- the chain -----------------------------------------------------------------------------------
def chain_reference(logits, history, top_k, typical_p, top_p, min_p, repeat_penalty=1.0,
                    repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0, bias=None):
    """The kept candidate set after every stage, in numpy."""
    x = logits.astype(np.float32).copy()
    window = history[-repeat_last_n:] if repeat_last_n else []
    for t, cnt in zip(*np.unique(np.array(window, int), return_counts=True)):
        x[t] = x[t] / np.float32(repeat_penalty) if x[t] > 0 else x[t] * np.float32(repeat_penalty)
        x[t] -= np.float32(cnt * frequency_penalty + presence_penalty)
    for t, b in (bias or {}).items():
        x[t] += np.float32(b)
    ids = order(x)[:top_k if top_k > 0 else len(x)]
    if typical_p < 1:
        p = softmax(x[ids])
        ent = -(p * np.log(p)).sum()
        by = np.lexsort((np.arange(len(ids)), np.abs(-np.log(p) - ent)))
        n = int(np.searchsorted(np.cumsum(p[by]), typical_p) + 1)
        ids = np.array(sorted(ids[by[:n]], key=lambda i: (-x[i], i)))
    if top_p < 1:
        p = softmax(x[ids])
        ids = ids[:int(np.searchsorted(np.cumsum(p), top_p) + 1)]
    if min_p > 0:
        p = softmax(x[ids])
        ids = ids[p >= min_p * p.max() * (1 - 1e-6)]
    return x, ids


@pytest.mark.parametrize("args", [
    dict(top_k=40, typical_p=1.0, top_p=0.95, min_p=0.05),
    dict(top_k=0, typical_p=0.8, top_p=0.9, min_p=0.0, repeat_penalty=1.5, frequency_penalty=0.3,
         presence_penalty=0.2, bias={3: 5.0, 4: -50.0}),
    dict(top_k=10, typical_p=0.5, top_p=1.0, min_p=0.2, repeat_penalty=0.8, repeat_last_n=3),
    dict(top_k=0, typical_p=1.0, top_p=0.7, min_p=0.0),  # top-p over the whole vocabulary
    dict(top_k=0, typical_p=1.0, top_p=1.0, min_p=0.1),  # nothing sorted at all
])
def test_chain_draws_only_what_the_reference_keeps(args):
    logits = rand_logits(256, 12)
    history = [3, 4, 5, 5, 9, 100, 3]
    x, kept = chain_reference(logits, history, **args)
    kw = {k: v for k, v in args.items() if k != "bias"}
    s = ChainSampler(256, temperature=1.0, logit_bias=args.get("bias"), seed=3, **kw)
    ptr = ffi.from_buffer("float[]", logits)
    seen = {s.sample(ptr, history) for _ in range(400)}
    assert seen <= set(kept.tolist()) and len(seen) >= min(len(kept), 3)
    np.testing.assert_array_equal(logits, rand_logits(256, 12))  # the logits are only read


def test_greedy_is_argmax_after_penalties():
    logits = rand_logits(64, 13)
    ptr = ffi.from_buffer("float[]", logits)
    top = int(np.argmax(logits))
    assert ChainSampler(64, temperature=0).sample(ptr) == top
    assert ChainSampler(64, temperature=5.0, top_k=1, seed=1).sample(ptr) == top
    penalized = ChainSampler(64, temperature=0, presence_penalty=100.0).sample(ptr, [top])
    assert penalized == int(np.argsort(-logits)[1])


GREEDY_CASES = [  # (logits, history, sampler keywords): the cases the greedy shortcut of
    # pl_sample_chain must get right (only changed tokens get candidates; a changed token holding
    # the raw maximum sends it down the full path)
    ([1, 5, 3, 5, 2], [], {}),                                   # tie at the max: lower id
    ([1, 5, 3, 5, 2], [], dict(logit_bias={1: -9.0})),           # the max token lowered (full path)
    ([1, 5, 3, 5, 2], [], dict(logit_bias={0: 4.0})),            # raised to a tie, lower id: wins
    ([1, 5, 3, 5, 2], [], dict(logit_bias={4: 3.0})),            # raised to a tie, higher id: loses
    ([1, 5, 3, 5, 2], [], dict(logit_bias={4: 3.5, 2: 2.0})),    # raised past the max
    ([1, 5, 3, 5, 2], [], dict(logit_bias={"4": 1.5, 4: 1.5})),  # one id twice: both add
    ([1, 5, 3, 6, 2], [3, 3], dict(presence_penalty=2.0)),       # the max penalized (full path)
    ([1, 5, 3, 6, 2], [1, 2], dict(frequency_penalty=0.5, logit_bias={2: 3.0})),
    ([4, -2, 3, 1, 2], [1, 1, 4], dict(repeat_penalty=0.25, repeat_last_n=2)),  # -2 * 0.25 ...
    ([-1, -0.0, 0.0, -2], [], {}),                               # -0 == +0: the lower id
    ([-1, 0.0, -0.0, -2], [], {}),
    ([-3, -0.0, -1, -2], [], dict(logit_bias={3: 2.0})),         # raised to -0 + ... = 0
    ([0] * 64 + [1] + [0] * 65, [], {}),                         # the max at a block's start
    ([0] * 129 + [1], [], {}),                                   # in the tail after the blocks
    ([1] + [0] * 129, [], {}),
]


@pytest.mark.parametrize("logits, history, kw", GREEDY_CASES)
def test_greedy_shortcut_matches_the_reference(logits, history, kw):
    logits = np.array(logits, np.float32)
    bias = {int(k): 0.0 for k in kw.get("logit_bias", {})}
    for k, b in kw.get("logit_bias", {}).items():
        bias[int(k)] += b
    ref = {k: kw[k] for k in ("repeat_penalty", "repeat_last_n", "frequency_penalty",
                              "presence_penalty") if k in kw}
    x, _ = chain_reference(logits, history, top_k=0, typical_p=1.0, top_p=1.0, min_p=0.0,
                           bias=bias, **ref)
    want = int(order(x)[0])
    ptr = ffi.from_buffer("float[]", logits)
    assert ChainSampler(len(logits), temperature=0, **kw).sample(ptr, history) == want
    assert ChainSampler(len(logits), temperature=2.0, top_k=1, seed=1, **kw).sample(ptr, history) == want


@pytest.mark.parametrize("seed", range(6))
def test_greedy_shortcut_matches_the_reference_at_random(seed):
    rng = np.random.default_rng(seed)
    logits = np.round(rand_logits(2000, seed), 1)  # rounded: ties happen
    history = rng.integers(0, 2000, size=30).tolist() + [int(np.argmax(logits))] * (seed % 2)
    bias = {int(t): float(b) for t, b in zip(rng.integers(0, 2000, 5), np.round(rng.normal(0, 4, 5), 1))}
    args = dict(repeat_penalty=1.25, frequency_penalty=0.5, presence_penalty=0.25)
    x, _ = chain_reference(logits, history, top_k=0, typical_p=1.0, top_p=1.0, min_p=0.0, bias=bias, **args)
    s = ChainSampler(2000, temperature=0, logit_bias=bias, **args)
    assert s.sample(ffi.from_buffer("float[]", logits), history) == int(order(x)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 17, 39])
def test_greedy_rejects_non_finite_logits_anywhere(bad, where):
    logits = rand_logits(40, 3)
    logits[where] = bad
    with pytest.raises(ParameterError, match="non-finite"):
        ChainSampler(40, temperature=0).sample(ffi.from_buffer("float[]", logits))


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(temperature=1e-60), dict(top_p=1e-9),
                                dict(min_p=1.0)])
def test_degenerate_values_give_argmax(kw):
    logits = rand_logits(512, 14)
    ptr = ffi.from_buffer("float[]", logits)
    s = ChainSampler(512, seed=4, **kw)
    assert {s.sample(ptr) for _ in range(50)} == {int(np.argmax(logits))}


def test_tiny_typical_p_keeps_the_one_most_typical_token():
    logits = rand_logits(512, 14)
    s = ChainSampler(512, seed=4, top_k=0, typical_p=1e-9)
    p = softmax(logits)
    most_typical = int(np.argmin(np.abs(-np.log(p) + (p * np.log(p)).sum())))
    assert {s.sample(ffi.from_buffer("float[]", logits)) for _ in range(50)} == {most_typical}


def test_huge_temperature_is_uniform_over_the_kept_candidates():
    logits = rand_logits(512, 15)
    ptr = ffi.from_buffer("float[]", logits)
    s = ChainSampler(512, temperature=1e30, top_k=5, top_p=1.0, min_p=0.0, seed=5)
    seen = [s.sample(ptr) for _ in range(500)]
    assert set(seen) == set(order(logits)[:5].tolist())
    assert all(0 <= t < 512 for t in seen)


def test_one_token_vocabulary():
    ptr = ffi.new("float[]", [0.5])
    for kw in (dict(), dict(temperature=0), dict(top_p=1e-9, typical_p=0.1, min_p=1.0)):
        assert ChainSampler(1, seed=1, **kw).sample(ptr, [0, 0]) == 0


def test_non_finite_logits_are_an_error():
    ptr = ffi.new("float[]", [0.5, float("nan"), 1.0])
    with pytest.raises(ParameterError, match="non-finite"):
        ChainSampler(3, seed=1).sample(ptr)


def test_seeds():
    logits = rand_logits(512, 16)
    ptr = ffi.from_buffer("float[]", logits)
    draw = lambda seed: [s.sample(ptr) for s in [ChainSampler(512, top_k=0, min_p=0, seed=seed)]
                         for _ in range(30)]
    assert draw(42) == draw(42) and draw(42) != draw(43)
    a, b = ChainSampler(512), ChainSampler(512)
    assert a.seed != b.seed  # seed None: fresh randomness each time
    assert ChainSampler(512, seed=-1).seed == (1 << 64) - 1


@pytest.mark.parametrize("kw, match", [
    (dict(temperature="0.5"), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(top_k=True), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(typical_p=0), "typical_p"),
    (dict(repeat_penalty=0), "repeat_penalty"), (dict(repeat_last_n=-2), "repeat_last_n"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"),
    (dict(presence_penalty=None), "presence_penalty"), (dict(seed=1.5), "seed"), (dict(seed="1"), "seed"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(logit_bias={512: 1.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={1: "x"}), "logit_bias"),
    (dict(logit_bias={"a": 1.0}), "logit_bias"), (dict(logit_bias={1.0: 1.0}), "logit_bias"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ParameterError, match=match):
        ChainSampler(512, **kw)


def test_logit_bias_accepts_string_keys():
    logits = np.zeros(8, np.float32)
    s = ChainSampler(8, temperature=0, logit_bias={"5": 3.0})
    assert s.sample(ffi.from_buffer("float[]", logits)) == 5


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = rand_logits(512, 17)
    ptr = ffi.from_buffer("float[]", logits)
    ref = np.log(softmax(logits))
    lp, top = logprobs_of(ptr, 512, 7, 5)
    assert lp == pytest.approx(ref[7], abs=1e-5)
    assert list(top) == order(logits)[:5].tolist()
    np.testing.assert_allclose(list(top.values()), ref[order(logits)[:5]], atol=1e-5)
