"""Quantizers (numpy, vectorized over every block of a chunk of rows) and the dequantizer (C).

    quantize(x, ggml_type) -> uint8 (rows, row bytes)     F32 F16 BF16 Q8_0 Q4_0 Q5_0 Q4_K Q6_K
    dequantize(data, ggml_type, cols) -> float32 (rows, cols)    every type the C core reads

Q8_0, Q4_0, Q5_0 and BF16 are ggml's reference quantizers bit for bit (Q8_0: d = amax/127 with
round-half-away; Q4_0/Q5_0: d = signed max / -8 or / -16 with trunc(x/d + 8.5 or 16.5)).

The K-quants search their scales, minimising the squared error of the reconstruction:
  Q4_K  x ~ d*sc_j*q - dmin*m_j per 32-value sub-block j (q 0..15, sc_j and m_j 6-bit codes, d and
        dmin f16). Each sub-block first gets its best continuous step a and offset b (b <= 0):
        for a range of candidate steps around (max - min)/15 the values are rounded to the grid,
        then (a, b) is the least-squares fit to those levels; the candidate whose fit leaves the
        least error wins. The 8 steps and offsets are then coded relative to d = max a / 63 and
        dmin = max(-b) / 63, and a few alternating rounds refit (d, dmin) over the whole
        super-block by least squares, re-round the levels and re-fit each sub-block's (a, b).
  Q6_K  x ~ d*sc_j*q per 16-value sub-block (q -32..31, sc_j a signed int8): the same search for a
        one-parameter step (candidates put the largest magnitude near level -32 or +31), int8 codes
        relative to d = signed max step / -128, then alternating refits of d and the steps.
Measured on ../shared quant-base-f32 (llama.cpp's own q4_k_m / q6_k files as the reference):
RMS error 0.997-1.001x llama.cpp's for Q4_K, 0.95-0.96x for Q6_K (tests/test_convert.py checks
<= 1.02x; the min/max quantizer this replaced: 1.14x / 1.10x). Speed, in convert's chunks of
1M values: 75 ns per value for Q4_K, 45 for Q6_K (about 3x and 1.5x the min/max quantizer's;
numpy over every block of the chunk at once, a few passes per candidate).
"""
import numpy as np

from ._core import ffi, lib
from .errors import FormatError, ParameterError
from .formats.common import (BF16, CORE_TYPES, F16, F32, GGML_TYPES, Q4_0, Q4_K, Q5_0, Q6_K,
                             Q8_0, Q8_G, type_name)

# Candidate steps (more buy little: 21 and 19 candidates measured 0.9999x / 0.957x llama.cpp's
# error at twice the time of these 11 and 7 — 1.0007x / 0.957x)
Q4_K_CANDIDATES = np.linspace(-1, 1, 11, dtype=np.float32)      # added to the 15 levels' span
Q6_K_CANDIDATES = np.linspace(-0.9, 0.9, 7, dtype=np.float32)   # added to 32 (or 31) levels
REFITS = 3                                                       # super-block refit rounds


# ====================================================================== helpers
def _round_half_away(v):
    """C's roundf on float32 values (exact: the fraction a - floor(a) is computed exactly)."""
    a = np.abs(v)
    r = np.floor(a)
    r += (a - r) >= np.float32(0.5)
    return np.copysign(r, v)


def _f16_bytes(v):
    return np.asarray(v, dtype="<f2").view(np.uint8).reshape(-1, 2)


def _f16(v, need=None):
    """float32 scales -> float16 values (as float32): the nearest, but never smaller in magnitude
    than `need` (the scale the largest code needs: rounding below it would saturate the codes,
    which matters for tiny weights, where float16 scales are subnormal and coarse)."""
    v = np.asarray(v, np.float32)
    if need is not None:
        v = np.copysign(np.maximum(np.abs(v), np.abs(need)), v)
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    if need is not None:
        low = np.abs(h.astype(np.float32)) < np.abs(need)
        h = np.where(low, np.nextafter(h, np.copysign(np.float16(np.inf), h)), h)
    if not np.isfinite(h).all():
        raise ParameterError("weights too large for an f16 block scale (|w| beyond ~1e6)")
    return h.astype(np.float32)


def _div(a, b):
    """a / b, 0 where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


def _signed_max(x):
    """Per block, the value of largest magnitude (the first one on ties), as ggml picks it."""
    i = np.abs(x).argmax(axis=-1)[..., None]
    return np.take_along_axis(x, i, axis=-1)


# ====================================================================== reference quantizers
def _q8_0(x):
    n = x.shape[0]
    x = x.reshape(n, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    out = np.empty((n, 34), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = _round_half_away(x * _div(np.float32(1), d)).astype(np.int8).view(np.uint8)
    return out


def _signed_levels(x, half):
    """Q4_0/Q5_0's shared step: blocks of 32 scaled by d = signed max / -half and rounded to the
    unsigned levels 0..2*half-1 as ggml's reference does. Returns (d, q uint8 (n, 32))."""
    x = x.reshape(x.shape[0], 32)
    d = _signed_max(x) / np.float32(-half)
    inv = _div(np.float32(1), d)
    q = np.minimum(np.trunc(x * inv + np.float32(half + 0.5)), 2 * half - 1).astype(np.uint8)
    return d, q


def _q4_0(x):
    d, q = _signed_levels(x, 8)
    out = np.empty((q.shape[0], 18), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def _q5_0(x):
    d, q = _signed_levels(x, 16)
    out = np.empty((q.shape[0], 22), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:6] = np.packbits(q >> 4, axis=1, bitorder="little")   # bit j = 5th bit of q[j]
    out[:, 6:] = (q[:, :16] & 15) | (q[:, 16:] << 4)
    return out


# ====================================================================== K-quants: the searches
def _dot(a, b):
    """Per sub-block (last axis) sums of a*b, without a temporary of the whole array."""
    return np.einsum("...i,...i->...", a, b)


def _fit_step_offset(x, q, sx, sxx):
    """Least squares x ~ a*q + b per sub-block (last axis; sx, sxx: the sums of x and x*x), with
    b <= 0 (Q4_K's lowest level is -dmin*m <= 0): when the free fit has b > 0, b = 0 and
    a = <x,q>/<q,q>. When q is constant (c) only a*c + b matters: b = min(mean x, 0), a*c the
    rest. Returns (a, b, squared error)."""
    n = np.float32(x.shape[-1])
    sq, sqq, sxq = q.sum(-1), _dot(q, q), _dot(x, q)
    det = n * sqq - sq * sq
    a, b = _div(n * sxq - sq * sx, det), _div(sqq * sx - sq * sxq, det)
    origin = (b > 0) & (det > 0)
    a, b = np.where(origin, _div(sxq, sqq), a), np.where(origin, 0, b)
    flat = det <= 0
    mean_b = np.minimum(sx / n, 0)
    a = np.where(flat, _div(sx / n - mean_b, sq / n), a)
    b = np.where(flat, mean_b, b)
    err = sxx - 2 * a * sxq - 2 * b * sx + a * a * sqq + 2 * a * b * sq + n * b * b
    return a, b, err


def _levels(v, lo, hi):
    """rint(v) clipped to [lo, hi], in place (v is a temporary)."""
    return np.clip(np.rint(v, out=v), lo, hi, out=v)


def _q4_k_search(xs, sx, sxx):
    """Each sub-block's best (step a, offset b) over the candidate steps."""
    lo = np.minimum(xs.min(-1), 0)
    span = xs.max(-1) - lo
    shifted = xs - lo[..., None]
    best = np.full(lo.shape, np.inf, np.float32)
    best_a, best_b = np.zeros_like(lo), np.zeros_like(lo)
    for t in Q4_K_CANDIDATES:
        q = _levels(shifted * _div(np.float32(15) + t, span)[..., None], 0, 15)
        a, b, err = _fit_step_offset(xs, q, sx, sxx)
        better = err < best
        best = np.where(better, err, best)
        best_a, best_b = np.where(better, a, best_a), np.where(better, b, best_b)
    return best_a, -best_b


def _q4_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    sx, sxx = xs.sum(-1), _dot(xs, xs)
    step, offs = _q4_k_search(xs, sx, sxx)
    step_max, offs_max = step.max(-1) / 63, offs.max(-1) / 63
    d, dmin = _f16(step_max, step_max), _f16(offs_max, offs_max)
    for rnd in range(REFITS + 1):
        sc = np.clip(np.rint(_div(step, d[:, None])), 0, 63)
        m = np.clip(np.rint(_div(offs, dmin[:, None])), 0, 63)
        low = (dmin[:, None] * m)[..., None]
        q = _levels((xs + low) * _div(np.float32(1), d[:, None] * sc)[..., None], 0, 15)
        if rnd == REFITS:
            break
        # (d, dmin) by least squares over the super-block: x ~ d*(sc*q) - dmin*m
        u = (sc[..., None] * q).reshape(n, -1)
        v = np.broadcast_to(m[..., None], q.shape).reshape(n, -1)
        X = xs.reshape(n, -1)
        suu, svv, suv, sux, svx = _dot(u, u), _dot(v, v), _dot(u, v), _dot(u, X), _dot(v, X)
        det = suu * svv - suv * suv
        d_new, dmin_new = _div(sux * svv - suv * svx, det), _div(suv * sux - suu * svx, det)
        ok = (det > 0) & (d_new > 0) & (dmin_new >= 0)
        a, b, _ = _fit_step_offset(xs, q, sx, sxx)   # each sub-block's (step, offset) for its q
        step, offs = np.where(a > 0, a, step), -b
        step_max, offs_max = step.max(-1) / 63, offs.max(-1) / 63
        d = _f16(np.where(ok, d_new, d), step_max)
        dmin = _f16(np.where(ok, dmin_new, dmin), offs_max)
    sc, m, q = sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)
    out = np.empty((n, 144), np.uint8)
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(dmin)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    out[:, 16:] = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # sub-blocks 2k | 2k+1 << 4
    return out


def _q6_k_search(xs):
    """Each sub-block's best signed step over the candidates (largest magnitude near -32 or 31)."""
    amax = _signed_max(xs)[..., 0]
    best = np.full(amax.shape, -1, np.float32)
    best_a = np.zeros_like(amax)
    for levels in np.concatenate([-(np.float32(32) + Q6_K_CANDIDATES),
                                  np.float32(31) + Q6_K_CANDIDATES]):
        q = _levels(xs * _div(levels, amax)[..., None], -32, 31)
        sxq, sqq = _dot(xs, q), _dot(q, q)
        gain = _div(sxq * sxq, sqq)                 # the error is <x,x> - gain
        better = gain > best
        best, best_a = np.where(better, gain, best), np.where(better, _div(sxq, sqq), best_a)
    return best_a


def _q6_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    step = _q6_k_search(xs)
    need = _signed_max(step)[:, 0] / np.float32(-128)
    d = _f16(need, need)
    for rnd in range(REFITS + 1):
        sc = np.clip(np.rint(_div(step, d[:, None])), -128, 127)
        q = _levels(xs * _div(np.float32(1), d[:, None] * sc)[..., None], -32, 31)
        if rnd == REFITS:
            break
        u = (sc[..., None] * q).reshape(n, -1)
        d_new = _div(_dot(u, xs.reshape(n, -1)), _dot(u, u))
        sqq = _dot(q, q)
        step = np.where(sqq > 0, _div(_dot(xs, q), sqq), step)
        need = np.abs(step).max(-1) / 127
        d = _f16(np.where(d_new != 0, d_new, d), need)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 128)
    ql = q.reshape(n, 2, 2, 64)
    qh = (q.reshape(n, 2, 4, 32) >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None]
    out = np.empty((n, 210), np.uint8)
    out[:, :128] = ((ql[:, :, 0] & 15) | (ql[:, :, 1] << 4)).reshape(n, 128)
    out[:, 128:192] = np.bitwise_or.reduce(qh, axis=2).reshape(n, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:] = _f16_bytes(d)
    return out


# ====================================================================== float types
def _bf16(x):
    """ggml's fp32 -> bf16: round to nearest even, NaNs kept quiet."""
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return r.view(np.uint8).reshape(x.shape[0], -1)


def _f16_rows(x):
    with np.errstate(over="ignore"):
        h = x.astype("<f2")
    if np.isinf(h).any() and not np.isinf(x[np.isinf(h)]).all():
        big = float(np.abs(x[np.isfinite(x)]).max())
        raise ParameterError(f"a weight of magnitude {big:g} does not fit in f16 (max 65504); "
                             f"use --type bf16 or f32")
    return h.view(np.uint8).reshape(x.shape[0], -1)


_QUANTIZE = {Q8_0: _q8_0, Q4_0: _q4_0, Q5_0: _q5_0, Q4_K: _q4_k, Q6_K: _q6_k}
_ENCODE = {F32: lambda x: x.astype("<f4", copy=False).view(np.uint8).reshape(x.shape[0], -1),
           F16: _f16_rows, BF16: _bf16}


def quantize(x, ggml_type):
    """float32 rows (rows, cols) -> uint8 (rows, row bytes) of `ggml_type` (a number)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    rows, cols = x.shape
    if ggml_type in _ENCODE:
        return _ENCODE[ggml_type](x)
    if ggml_type not in _QUANTIZE:
        raise ParameterError(f"cannot quantize to {type_name(ggml_type)}")
    _, block, size = GGML_TYPES[ggml_type]
    if cols % block:
        raise ParameterError(f"row length {cols} is not a multiple of the {type_name(ggml_type)} "
                             f"block size {block}")
    return _QUANTIZE[ggml_type](x.reshape(-1, block)).reshape(rows, cols // block * size)


# ====================================================================== dequantizing (the C core)
def dequantize(data, ggml_type, cols, scales=None, group_size=0):
    """Rows of `ggml_type` (uint8, rows * row bytes) -> float32 (rows, cols), through the C core's
    pl_dequantize_row (the arithmetic `run` uses). Q8_G (llama2.c V2) also needs the rows' f32
    `scales`, one per `group_size` values."""
    if ggml_type not in CORE_TYPES:
        raise FormatError(f"cannot dequantize {type_name(ggml_type)}: pyllama reads "
                          + ", ".join(type_name(t) for t in sorted(CORE_TYPES)))
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if ggml_type == Q8_G:
        block, size = group_size, group_size
    else:
        _, block, size = GGML_TYPES[ggml_type]
    if cols <= 0 or cols % block or data.size % (cols // block * size):
        raise ParameterError(f"{data.size} bytes are not whole rows of {cols} "
                             f"{type_name(ggml_type)} values")
    rows = data.size // (cols // block * size)
    if ggml_type == F32:
        return data.view("<f4").reshape(rows, cols)
    if data.ctypes.data % 4:          # C reads f16 scales and floats: give it an aligned copy
        data = data.copy()
    out = np.empty((rows, cols), np.float32)
    t = ffi.new("pl_tensor *")
    keep = [ffi.from_buffer(data)]
    t.data, t.type, t.rows, t.cols = keep[0], ggml_type, rows, cols
    if ggml_type == Q8_G:
        scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
        if scales.size != rows * (cols // group_size):
            raise ParameterError(f"{scales.size} scales for {rows} rows of {cols // group_size} "
                                 f"groups")
        keep.append(ffi.from_buffer(scales))
        t.scales, t.group_size = ffi.cast("float *", keep[1]), group_size
    dst = ffi.cast("float *", ffi.from_buffer(out))
    row = lib.pl_dequantize_row
    for r in range(rows):
        row(t, r, dst + r * cols)
    return out
