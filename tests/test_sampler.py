"""The sampler's corners (csrc/sampler.c pl_sample, pyllama/sampler.py): temperatures at the ends
of float32, top-p that keeps nothing, a one-token vocabulary.

pl_sample is driven directly with buffers from the C library's malloc (not cffi's allocator), so
under `make asan ASAN_TESTS=tests/test_sampler.py` a read outside them is reported. Expected
values: the behaviour csrc/sampler.c defines (the argmax of the logits wherever llama2.c's
arithmetic has no answer: llama2.c itself reads probindex[-1] or samples NaNs there), and
greedy generation (temperature 0) for the whole-model cases, which is what that definition means.
"""
import ctypes
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import shared_path

import pyllama
from pyllama import ParameterError
from pyllama._core import ffi, lib
from pyllama.sampler import T_MAX, T_MIN, check_sampling

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


@contextmanager
def c_array(ctype, n):
    """n elements of ctype from libc's malloc (exactly n: ASan's redzones sit right after)."""
    addr = _libc.malloc(n * ffi.sizeof(ctype))
    assert addr
    try:
        yield ffi.cast(ctype + " *", addr)
    finally:
        _libc.free(addr)


def sample(logits, temperature, topp, seed=7):
    """(token, rng state after, logits buffer after) of one pl_sample call."""
    n = len(logits)
    with c_array("float", n) as lp, c_array("pl_probindex", n) as probindex:
        for i, v in enumerate(np.asarray(logits, np.float32).tolist()):
            lp[i] = v
        rng = ffi.new("unsigned long long *", seed)
        token = lib.pl_sample(lp, n, temperature, topp, rng, probindex)
        return token, rng[0], np.array([lp[i] for i in range(n)], np.float32)


@pytest.mark.parametrize("temperature,topp", [(1.0, 0.9), (0.5, 0.5), (1.0, 1.0), (1.0, 0.0),
                                              (0.0, 0.9), (1e30, 1e-5), (1e-40, 0.9)])
def test_one_token_vocabulary(temperature, topp):
    """n = 1: top-p's cutoff (1-topp)/(n-1) would divide by zero and keep nothing."""
    token, rng, _ = sample([3.5], temperature, topp)
    assert token == 0 and rng == 7  # no random draw is needed to pick the only token


def test_huge_temperature_with_tiny_topp_takes_the_top_logit():
    """Uniform probabilities below the cutoff (1-topp)/(n-1): llama2.c reads probindex[-1].
    The nucleus of a tiny top-p is the most probable token: the largest logit (float32
    probabilities of temperature 1e30 are all equal and cannot tell it)."""
    logits = np.zeros(512, np.float32)
    logits[37] = 1e-3
    logits[400] = 5e-4
    token, _, probs = sample(logits, 1e30, 1e-5)
    assert token == 37
    assert np.all(probs == probs[0])  # the softmax ran and lost the order, as it must
    assert sample(-logits, 1e30, 1e-5)[0] == 0  # the first of the largest (510 tie at 0)


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 2.9e-39, 1e-30])
def test_tiny_temperature_overflowing_the_logits_is_greedy(temperature):
    """logit/temperature overflows float32 (1e-40 and 1e-45 are denormals: 1/t is inf; 1e-30
    overflows with a logit of 1e10): the limit of a vanishing temperature, the argmax, without a
    random draw and without touching the logits (llama2.c samples from inf - inf = NaN)."""
    logits = np.array([0.5, 2.0, -1.0, 1.5, 2.0], np.float32) * (1e10 if temperature == 1e-30 else 1)
    token, rng, after = sample(logits, temperature, 0.9)
    assert token == 1 and rng == 7
    np.testing.assert_array_equal(after, logits)
    assert sample(-np.abs(logits) - 1, temperature, 0.9)[0] == 0  # all negative: -inf, same rule


def test_ordinary_values_keep_llama2c_arithmetic():
    """Away from the corners the new checks change nothing: softmax(logits/T) in place, one draw
    (the full proof is test_parity.py, byte-identical runs against llama2.c)."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(300).astype(np.float32) * 4
    for temperature, topp in ((1.0, 0.9), (0.7, 0.0), (2.0, 0.5)):
        token, state, probs = sample(logits, temperature, topp)
        scaled = logits / np.float32(temperature)
        e = np.exp(scaled - scaled.max())
        np.testing.assert_allclose(probs, e / e.sum(), rtol=1e-5, atol=1e-9)
        assert state != 7 and 0 <= token < 300 and probs[token] > 0


# -- Python's bounds ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 5e-324, 2.9e-39, 1e39, 3.5e38])
def test_temperature_without_a_float32_reciprocal_is_refused(temperature):
    with pytest.raises(ParameterError, match="temperature: expected 0 .greedy. or a number in"):
        check_sampling(temperature, 0.9)


def test_temperature_bounds_are_the_float32_ones():
    assert check_sampling(T_MIN, 0.9) == (T_MIN, 0.9)
    assert check_sampling(T_MAX, 0.9) == (T_MAX, 0.9)
    assert np.isfinite(np.float32(1) / np.float32(T_MIN))
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(1) / np.nextafter(np.float32(T_MIN), np.float32(0)))


@pytest.fixture(scope="module")
def m():
    return pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"))


def test_whole_model_corners(m):
    greedy = "".join(m.generate("Once", steps=40, temperature=0))
    # T_MIN is accepted; the model's logits divided by it overflow: greedy
    assert "".join(m.generate("Once", steps=40, temperature=T_MIN, seed=1)) == greedy
    # a huge temperature and a tiny top-p: the nucleus is the most probable token
    assert "".join(m.generate("Once", steps=40, temperature=1e30, topp=1e-5, seed=1)) == greedy
    for t in (1e-40, 1e-45):
        with pytest.raises(ParameterError, match="temperature"):
            m.generate("Once", temperature=t)


def test_cli_denormal_temperature_is_one_error_line():
    """`run … -t 1e-45` printed <unk><unk>… and exited 0."""
    p = subprocess.run([sys.executable, "-m", "pyllama", "run", shared_path("models/stories260K.bin"),
                        "-z", shared_path("models/tok512.bin"), "-t", "1e-45", "-n", "20"],
                       capture_output=True, timeout=120)
    assert p.returncode == 1 and p.stdout == b""
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyllama: error: temperature: expected 0"), lines
