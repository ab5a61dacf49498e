"""Sampling parameters and llama2.c's sampler (the arithmetic lives in C: csrc/sampler.c)."""
import math
import time

from ._core import ffi, lib
from .errors import ParameterError

U64 = 1 << 64


def check_sampling(temperature, topp):
    try:
        temperature = float(temperature)
        topp = float(topp)
    except (TypeError, ValueError):
        raise ParameterError(f"temperature and top-p must be numbers, found {temperature!r}, {topp!r}") from None
    if math.isnan(temperature) or temperature < 0 or math.isinf(temperature):
        raise ParameterError(f"temperature: expected a finite number >= 0, found {temperature}")
    if math.isnan(topp) or not 0.0 <= topp <= 1.0:
        raise ParameterError(f"top-p: expected a number in [0, 1], found {topp}")
    return temperature, topp


def seed_state(seed):
    """llama2.c's rng seeding: the seed as an unsigned 64-bit value; 0 or None means time(NULL)."""
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParameterError(f"seed: expected an integer, found {seed!r}")
    seed %= U64  # atoi's negative values wrap as in llama2.c's unsigned long long
    if seed == 0:
        seed = int(time.time()) & 0xFFFFFFFF
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
