"""Block-quantized matmul and dequantization in the C core (csrc/quants.c).

Expected values come from:
- the `gguf` package (llama.cpp's gguf-py): its numpy `quantize` builds Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
  rows, its `dequantize` is the reference for every type's dequantization;
- for the K-quants, which gguf-py can only dequantize, rows of random bytes with sane fp16 scales
  (every bit pattern of the quant and scale bytes is a valid block);
- a numpy transcription of llama2.c runq.c's quantize() and matmul() for PL_Q8_G.

The matmul quantizes x to 8 bits per block (scale d = amax/127), so it differs from the float64
product W @ x by at most Σ_j |W_ij| · d_b(j) / 2 (half a quantization step per value) plus f32
rounding; that bound is tested, and so is the much tighter agreement with W @ x̂ where x̂ is x
quantized and dequantized in numpy the way the C code does it (rounding half to even).
"""
import zlib

import numpy as np
import pytest

from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from pyllama import _core  # noqa: E402

ffi, lib = _core.ffi, _core.lib

# name: (pyllama type, gguf type, values per block, bytes per block, byte offsets of fp16 scales)
TYPES = {
    "Q4_0": (lib.PL_Q4_0, GT.Q4_0, 32, 18, (0,)),
    "Q4_1": (lib.PL_Q4_1, GT.Q4_1, 32, 20, (0, 2)),
    "Q5_0": (lib.PL_Q5_0, GT.Q5_0, 32, 22, (0,)),
    "Q5_1": (lib.PL_Q5_1, GT.Q5_1, 32, 24, (0, 2)),
    "Q8_0": (lib.PL_Q8_0, GT.Q8_0, 32, 34, (0,)),
    "Q2_K": (lib.PL_Q2_K, GT.Q2_K, 256, 84, (80, 82)),
    "Q3_K": (lib.PL_Q3_K, GT.Q3_K, 256, 110, (108,)),
    "Q4_K": (lib.PL_Q4_K, GT.Q4_K, 256, 144, (0, 2)),
    "Q5_K": (lib.PL_Q5_K, GT.Q5_K, 256, 176, (0, 2)),
    "Q6_K": (lib.PL_Q6_K, GT.Q6_K, 256, 210, (208,)),
}
GGUF_QUANTIZES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}

COLS_32 = (32, 64, 96, 512, 768)
COLS_K = (256, 512, 768)
ROWS = (7, 33)
THREADS = (1, 2)


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _activations(rng, cols, block):
    """Random x with outliers and one all-zero block (the amax == 0 guard)."""
    x = rng.standard_normal(cols).astype(np.float32)
    x[rng.integers(0, cols, size=max(1, cols // 64))] *= 8.0
    if cols > block:
        x[block:2 * block] = 0.0
    return x


def _weights(name, rows, cols, source, rng):
    """(rows, bytes per row) uint8 rows of type `name`."""
    _, gt, block, nbytes, f16_at = TYPES[name]
    if source == "gguf":
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        return np.ascontiguousarray(quantize(w, gt))
    blocks = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for off in f16_at:  # finite, small scales of either sign
        scale = rng.uniform(-0.02, 0.02, size=len(blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


class Tensor:
    """A pl_tensor over numpy buffers, kept alive with it."""

    def __init__(self, ptype, data, rows, cols, scales=None, group_size=0):
        self.keep = [data]
        self.t = ffi.new("pl_tensor *")
        self.t.data = self._ptr("void *", data)
        self.t.scales = self._ptr("float *", scales) if scales is not None else ffi.NULL
        self.t.type = ptype
        self.t.group_size = group_size
        self.t.rows = rows
        self.t.cols = cols

    def _ptr(self, ctype, arr):
        buf = ffi.from_buffer(arr)
        self.keep += [arr, buf]
        return ffi.cast(ctype, buf)

    def matmul(self, x, n_threads):
        """x (cols,) or (n, cols) → (rows,) or (n, rows), through pl_matmul."""
        rows = self.t.rows
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = 1 if x.ndim == 1 else x.shape[0]
        out = np.full((n, rows), np.nan, dtype=np.float32)
        scratch = np.zeros(lib.pl_matmul_scratch_bytes(self.t, n) + 64, dtype=np.uint8)
        lib.pl_matmul(ffi.cast("float *", ffi.from_buffer(out)), ffi.cast("float *", ffi.from_buffer(x)),
                      n, self.t, ffi.from_buffer(scratch), n_threads)
        return out[0] if x.ndim == 1 else out

    def dequantize_rows(self):
        out = np.full((self.t.rows, self.t.cols), np.nan, dtype=np.float32)
        for r in range(self.t.rows):
            lib.pl_dequantize_row(self.t, r, ffi.cast("float *", ffi.from_buffer(out[r])))
        return out


def _quantize_like_c(x, block):
    """x → x̂ as pli_quantize_act does it: per block d = amax/127, q = rint(x · (127/amax))."""
    xb = x.reshape(-1, block)
    amax = np.abs(xb).max(axis=1, keepdims=True).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv)
    assert np.abs(q).max() <= 127
    d = amax / np.float32(127.0)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(-1), np.repeat(d.reshape(-1), block)


def _cases():
    for name, (_, _, block, _, _) in TYPES.items():
        for cols in (COLS_32 if block == 32 else COLS_K):
            for rows in ROWS:
                sources = ("gguf", "random") if name in GGUF_QUANTIZES else ("random",)
                for source in sources:
                    yield name, cols, rows, source


CASES = list(_cases())


def _ids(case):
    return "-".join(str(v) for v in case)


@pytest.mark.parametrize("name,cols,rows,source", CASES, ids=[_ids(c) for c in CASES])
def test_dequantize_row_matches_gguf(name, cols, rows, source):
    ptype, gt, _, _, _ = TYPES[name]
    data = _weights(name, rows, cols, source, _rng(name, cols, rows, source))
    expected = dequantize(data, gt)
    assert expected.shape == (rows, cols)
    got = Tensor(ptype, data, rows, cols).dequantize_rows()
    assert np.all(np.isfinite(expected))
    np.testing.assert_array_equal(got, expected)  # same f32 operations in the same order


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("name,cols,rows,source", CASES, ids=[_ids(c) for c in CASES])
def test_matmul_matches_dequantized_product(name, cols, rows, source, n_threads):
    ptype, gt, block, _, _ = TYPES[name]
    rng = _rng(name, cols, rows, source, "mm")
    data = _weights(name, rows, cols, source, rng)
    w = dequantize(data, gt).astype(np.float64)
    x = _activations(rng, cols, block)
    got = Tensor(ptype, data, rows, cols).matmul(x, n_threads).astype(np.float64)
    assert np.all(np.isfinite(got))

    # 1) against the exact product: activation rounding is at most half a step d/2 per value
    exact = w @ x.astype(np.float64)
    x_hat, step = _quantize_like_c(x, block)
    rounding_bound = np.abs(w) @ (step.astype(np.float64) / 2)
    f32_slack = 1e-5 * (np.abs(w) @ np.abs(x.astype(np.float64))) + 1e-30
    assert np.all(np.abs(got - exact) <= 1.001 * rounding_bound + f32_slack), \
        np.max(np.abs(got - exact) - rounding_bound)

    # 2) against the product with x quantized as the C code does: only f32 rounding differs, about
    #    (blocks + 8)·2^-24 of Σ|w||x̂| at most here (≤ 2e-6; observed ≤ 3e-7)
    emulated = w @ x_hat
    scale = np.abs(w) @ np.abs(x_hat) + 1e-30
    np.testing.assert_array_less(np.abs(got - emulated), 5e-6 * scale)


BATCH_CASES = [(name, cols, 33) for name, (_, _, block, _, _) in TYPES.items()
               for cols in ((32, 96, 768) if block == 32 else (256, 768))]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("name,cols,rows", BATCH_CASES, ids=[_ids(c) for c in BATCH_CASES])
def test_batched_matmul_is_bit_identical_to_single(name, cols, rows, n_threads):
    """n tokens at once (the prefill tiles: 4 tokens x 1 or 2 rows, remainders token by token)
    give each token exactly its single-token result: same integer sums, same f32 order. Odd
    row and block counts exercise the tiles' edges."""
    ptype, _, block, _, _ = TYPES[name]
    rng = _rng(name, cols, rows, "batch")
    t = Tensor(ptype, _weights(name, rows, cols, "random", rng), rows, cols)
    for n in (2, 4, 5, 11):
        x = np.stack([_activations(rng, cols, block) for _ in range(n)])
        single = np.stack([t.matmul(x[i], n_threads) for i in range(n)])
        assert np.all(np.isfinite(single))
        np.testing.assert_array_equal(t.matmul(x, n_threads), single)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quant_prompt_tiles_are_bit_identical(name, n_threads):
    """The AVX-512 VNNI prompt tiles of Q4_K/Q6_K hold 16 rows in the lanes of a register and run
    4 tokens at a time over each unpacked super-block: 70 rows (4 full row groups per thread and
    partial ones) x 37 tokens (9 groups of 4 and a single one) against token-by-token results,
    which the decode kernels compute 4 rows at a time (the last rows one by one)."""
    ptype, _, block, _, _ = TYPES[name]
    rng = _rng(name, "tiles")
    rows, cols, n = 70, 1024, 37
    t = Tensor(ptype, _weights(name, rows, cols, "random", rng), rows, cols)
    x = np.stack([_activations(rng, cols, block) for _ in range(n)])
    single = np.stack([t.matmul(x[i], n_threads) for i in range(n)])
    assert np.all(np.isfinite(single))
    np.testing.assert_array_equal(t.matmul(x, n_threads), single)


# ---------------------------------------------------------------------------------------------
# PL_Q8_G: llama2.c V2 checkpoints, runq.c arithmetic


def _roundf(v):
    """C roundf: half away from zero (np.round rounds half to even). Truncate, then step away
    from zero when the fraction is >= 0.5 (floor(|v| + 0.5) would be wrong at 0.49999997)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0).astype(v.dtype)


def _runq_quantize(x, gs):
    """runq.c quantize(): scale = max|x|/127 per group, q = (int8) round(x / scale)."""
    xg = x.reshape(-1, gs).astype(np.float32)
    scale = (np.abs(xg).max(axis=1) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _roundf(xg / scale[:, None])
    q = np.where(scale[:, None] == 0, 0, q)  # pyllama's guard (runq.c would divide 0 by 0)
    return q.astype(np.int8).reshape(-1), scale


def _runq_matmul(wq, ws, xq, xs, gs):
    """runq.c matmul(): int32 dot per group; val += (float) ival * ws * xs in f32, in order."""
    rows, cols = wq.shape
    ival = (wq.reshape(rows, -1, gs).astype(np.int32) * xq.reshape(1, -1, gs).astype(np.int32)).sum(-1)
    terms = (ival.astype(np.float32) * ws.reshape(rows, -1)).astype(np.float32) * xs[None, :]
    out = np.zeros(rows, dtype=np.float32)
    for g in range(terms.shape[1]):
        out = (out + terms[:, g]).astype(np.float32)
    return out, np.abs(terms.astype(np.float64)).sum(axis=1)


def test_roundf_emulation():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, -3.2], np.float32)
    assert _roundf(v).tolist() == [1, 2, 3, -1, -3, 0, 0, 127, -3]


Q8G_CASES = [(32, 32), (32, 96), (32, 768), (64, 64), (64, 768), (48, 48), (48, 96), (48, 768),
             (8, 288), (24, 72)]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("gs,cols", Q8G_CASES)
def test_q8_g_matches_runq(gs, cols, rows, n_threads):
    rng = _rng("Q8_G", gs, cols, rows)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    wq, ws = _runq_quantize(w.reshape(-1), gs)  # groups over the flattened tensor, as export.py
    wq = wq.reshape(rows, cols)
    wq[0, :3] = (-128, 127, -127)  # int8 extremes, even -128 which export.py never writes
    x = _activations(rng, cols, gs)
    xq, xs = _runq_quantize(x, gs)
    expected, _ = _runq_matmul(wq, ws, xq, xs, gs)

    t = Tensor(lib.PL_Q8_G, wq, rows, cols, scales=ws, group_size=gs)
    got = t.matmul(x, n_threads)
    np.testing.assert_array_equal(got, expected)  # runq.c's f32 operations, in runq.c's order

    deq = t.dequantize_rows()
    np.testing.assert_array_equal(deq, wq.astype(np.float32) * np.repeat(ws, gs).reshape(rows, cols))


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("gs,cols", [(32, 96), (48, 768), (64, 768), (8, 288)])
def test_q8_g_batched_is_bit_identical_to_single(gs, cols, n_threads):
    rng = _rng("Q8_G batch", gs, cols)
    rows = 33
    wq, ws = _runq_quantize(rng.standard_normal(rows * cols).astype(np.float32), gs)
    t = Tensor(lib.PL_Q8_G, wq.reshape(rows, cols), rows, cols, scales=ws, group_size=gs)
    for n in (4, 6):
        x = np.stack([_activations(rng, cols, gs) for _ in range(n)])
        single = np.stack([t.matmul(x[i], n_threads) for i in range(n)])
        np.testing.assert_array_equal(t.matmul(x, n_threads), single)


def test_zero_input():
    """x = 0 quantizes to all-zero blocks (scale 0, no division by zero): output exactly 0."""
    for name, (ptype, gt, block, _, _) in TYPES.items():
        cols = 2 * block
        data = _weights(name, 3, cols, "random", _rng(name, "zero"))
        out = Tensor(ptype, data, 3, cols).matmul(np.zeros(cols, np.float32), 1)
        assert np.all(out == 0), name
    wq = np.ones((3, 64), np.int8)
    ws = np.ones(3 * 64 // 32, np.float32)
    out = Tensor(lib.PL_Q8_G, wq, 3, 64, scales=ws, group_size=32).matmul(np.zeros(64, np.float32), 1)
    assert np.all(out == 0)
