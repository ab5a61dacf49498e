"""Sampling parameters and llama2.c's sampler (the arithmetic lives in C: csrc/sampler.c)."""
import secrets

import numpy as np

from . import validate
from ._core import ffi, lib
from .errors import ParameterError

U64 = 1 << 64
# C divides the logits by the temperature in float32: a temperature must be a finite float32 whose
# reciprocal is finite too (below 2.9e-39, 1/t overflows: a denormal temperature is no temperature)
T_MAX = float(np.finfo(np.float32).max)
T_MIN = float(np.nextafter(np.float32(1) / np.float32(T_MAX), np.float32(1)))


def check_sampling(temperature, topp):
    """(temperature, topp) as floats: temperature 0 (greedy) or in [T_MIN, T_MAX], top-p in [0, 1].
    A temperature so small that the largest logit divided by it overflows is greedy (in C)."""
    temperature = validate.number(temperature, "temperature", lo=0)
    topp = validate.number(topp, "top-p", lo=0, hi=1)
    if temperature:
        with np.errstate(over="ignore", divide="ignore"):
            t32 = np.float32(temperature)
            inv = np.float32(1) / t32
        if not (np.isfinite(t32) and t32 > 0 and np.isfinite(inv)):
            raise ParameterError(f"temperature: expected 0 (greedy) or a number in "
                                 f"[{T_MIN:.3g}, {T_MAX:.4g}] (1/temperature must be a finite "
                                 f"float32), found {temperature}")
    return temperature, topp


def seed_state(seed):
    """The xorshift* state for `seed`: an integer taken as unsigned 64-bit (a negative one wraps,
    as llama2.c's unsigned long long does with atoi's result). None or 0: 64 fresh random bits
    from the OS, new for every call (the state must not be 0: xorshift would stay at 0)."""
    seed = validate.optional(validate.integer, seed, "seed", lo=-(U64 >> 1), hi=U64 - 1)
    seed = (seed or 0) % U64
    while seed == 0:
        seed = secrets.randbits(64)
    return seed


class Sampler:
    """Temperature, top-p and the xorshift* state of one generation."""

    def __init__(self, vocab_size, temperature=1.0, topp=0.9, seed=None):
        self.temperature, self.topp = check_sampling(temperature, topp)
        self.vocab_size = vocab_size
        self.seed = seed_state(seed)
        self._rng = ffi.new("unsigned long long *", self.seed)
        self._probindex = ffi.new("pl_probindex[]", vocab_size)

    def sample(self, logits_ptr):
        """Next token from the logits behind logits_ptr (overwritten with probabilities)."""
        token = lib.pl_sample(logits_ptr, self.vocab_size, self.temperature, self.topp,
                              self._rng, self._probindex)
        if token < 0:
            raise ParameterError("the model produced non-finite logits (NaN or inf): the weights "
                                 "are broken or overflow in float32")
        return token
