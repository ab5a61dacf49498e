"""The llama.cpp-order sampler chain of create_completion / create_chat_completion.

    penalties (repeat, frequency, presence over the last repeat_last_n tokens) -> logit bias ->
    top-k -> typical -> top-p -> min-p -> temperature -> draw

The vocabulary-wide work (copy, selection, sorting, softmax, the draw) runs in C
(csrc/sampling.c) on the model's logits buffer, which it only reads. temperature 0 or top_k 1 is
argmax (after penalties and bias), and so is a positive temperature too small for float32
(1e-50: the limit of the distribution). Values are checked by pyllama/validate.py. Typical, top-p and min-p look at the probabilities at
temperature 1; temperature shapes only the final draw (llama.cpp's order).

Log-probabilities (logprobs=N) are the log-softmax of the model's raw logits, before any penalty,
bias or sampler — the model's own distribution, as llama-cpp-python and OpenAI report it.

The llama2.c-exact sampler of generate() and `pyllama run` is pyllama/sampler.py; it is not this.
"""
import secrets

import numpy as np

from . import validate as V
from ._core import ffi, lib
from .errors import ParameterError

U64 = 1 << 64
DEFAULTS = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0,
                repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0,
                logit_bias=None, seed=None)
MAX_PENALTY = 1e6


def mix_seed(seed):
    """A nonzero xorshift state from any 64-bit seed (splitmix64's finalizer)."""
    z = (seed + 0x9E3779B97F4A7C15) % U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % U64
    z ^= z >> 31
    return z or 0x9E3779B97F4A7C15


class ChainSampler:
    """One generation's sampler: validated parameters, the rng and the C scratch buffers.

    seed None: a fresh random 64-bit seed (self.seed tells which); an int reproduces the draws.
    """

    def __init__(self, vocab_size, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0,
                 repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0,
                 logit_bias=None, seed=None):
        n = self.vocab_size = vocab_size
        sp = self._params = ffi.new("pl_sampling *")
        sp.temperature = V.number(temperature, "temperature", lo=0)
        sp.top_p = V.number(top_p, "top_p", lo=0, hi=1, lo_open=True)
        sp.top_k = V.integer(top_k, "top_k", lo=0)  # 0: off
        sp.min_p = V.number(min_p, "min_p", lo=0, hi=1)
        sp.typical_p = V.number(typical_p, "typical_p", lo=0, hi=1, lo_open=True)
        sp.repeat_penalty = V.number(repeat_penalty, "repeat_penalty", lo=1 / MAX_PENALTY, hi=MAX_PENALTY)
        sp.frequency_penalty = V.number(frequency_penalty, "frequency_penalty", lo=-MAX_PENALTY, hi=MAX_PENALTY)
        sp.presence_penalty = V.number(presence_penalty, "presence_penalty", lo=-MAX_PENALTY, hi=MAX_PENALTY)
        self.repeat_last_n = V.integer(repeat_last_n, "repeat_last_n", lo=-1)  # -1: the whole context
        if sp.repeat_penalty == 1.0 and sp.frequency_penalty == 0.0 and sp.presence_penalty == 0.0:
            self.repeat_last_n = 0  # no penalty: C looks at no window (then copy none)
        self.n_bias = 0
        self._bias_ids, self._bias = self._check_bias(logit_bias)
        seed = V.optional(V.integer, seed, "seed")
        self.seed = secrets.randbits(64) if seed is None else seed % U64
        self._rng = ffi.new("unsigned long long *", mix_seed(self.seed))
        self._cand = ffi.new("pl_probindex[]", n)
        self._tmp = ffi.new("pl_probindex[]", n)
        self._p = ffi.new("double[]", n)
        self._counts = ffi.new("int[]", n)
        self._window = ffi.new("int[]", 1)

    def _check_bias(self, logit_bias):
        """{token id: bias}; ids may be ints or their decimal strings (OpenAI's JSON keys)."""
        if logit_bias is None:
            return ffi.new("int[]", 1), ffi.new("float[]", 1)
        if not isinstance(logit_bias, dict):
            raise ParameterError(f"logit_bias: expected a dict of token id -> bias, found {logit_bias!r}")
        ids, vals = [], []
        for key, value in logit_bias.items():
            if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                key = int(key)
            ids.append(V.integer(key, "logit_bias key", lo=0, hi=self.vocab_size - 1))
            vals.append(V.number(value, f"logit_bias[{key}]", lo=-MAX_PENALTY, hi=MAX_PENALTY))
        self.n_bias = len(ids)
        return ffi.new("int[]", ids or [0]), ffi.new("float[]", vals or [0.0])

    @property
    def greedy(self):
        return self._params.temperature <= 0 or self._params.top_k == 1

    def sample(self, logits_ptr, history=()):
        """The next token from the logits behind logits_ptr (a float* of vocab_size; not
        modified); history: the token ids so far (the penalties read its tail)."""
        window = history if self.repeat_last_n < 0 else history[len(history) - self.repeat_last_n:] \
            if self.repeat_last_n else ()
        if len(window) > len(self._window):
            self._window = ffi.new("int[]", max(len(window), 2 * len(self._window)))
        self._window[0:len(window)] = list(window)
        token = lib.pl_sample_chain(logits_ptr, self.vocab_size, self._params, self._window, len(window),
                                    self._bias_ids, self._bias, self.n_bias, self._cand,
                                    self._tmp, self._p, self._counts, self._rng)
        if token < 0:
            raise ParameterError("the model produced non-finite logits (NaN or inf): the weights "
                                 "are broken or overflow in float32")
        return token


def logprobs_of(logits_ptr, vocab_size, token, n_top, scratch=None):
    """(log p(token), {id: log p} of the n_top most likely ids) under softmax(raw logits)."""
    lse = lib.pl_logsumexp(logits_ptr, vocab_size)
    buf = ffi.cast("float *", logits_ptr)
    top = {}
    if n_top:
        cand = scratch if scratch is not None else ffi.new("pl_probindex[]", vocab_size)
        lib.pl_cand_init(buf, vocab_size, cand)
        k = lib.pl_top_k(cand, vocab_size, min(n_top, vocab_size))
        top = {cand[i].index: float(cand[i].prob - lse) for i in range(k)}
    return float(buf[token] - lse), top


def as_array(ptr, n):
    """A numpy view of n floats behind a cffi float*."""
    return np.frombuffer(ffi.buffer(ptr, 4 * n), np.float32)
