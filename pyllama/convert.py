"""Convert any model pyllama reads into a GGUF v3 file, optionally quantized.

    convert(src_path, dst_path, type="f32", tokenizer=None, pure=False) -> dict

Sources: llama2.c legacy / V1 / V2 (int8) .bin, and GGUF (f32, f16, bf16, and the quantized types
pyllama can dequantize: Q8_0, Q4_0, Q5_0, Q4_K, Q6_K; a tensor already stored in its target type
is copied unchanged). `type` is one of TYPES:

    f32 f16 bf16   every matrix in that float type
    q8_0 q4_0 q6_k llama.cpp's `llama-quantize` mix for that type: the classifier (output.weight,
                   or token_embd.weight when the classifier is tied to it) is Q6_K for q4_0 and
                   q6_k, Q8_0 for q8_0; everything else is the named type
    q4_k_m         llama.cpp's Q4_K_M mix: Q4_K everywhere except the classifier (Q6_K) and
                   attn_v / ffn_down of the layers where llama.cpp's `use_more_bits(i, n)` holds
                   (i < n/8, or i >= 7n/8, or (i - n/8) % 3 == 2, integer division): Q6_K

`pure=True` (llama-quantize --pure) gives every matrix the named type. Rows whose length does not
fit the block size fall back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0 (rows not a multiple
of 256), and F16 for rows not a multiple of 32. Norms are always F32.

The tokenizer: a GGUF source's `tokenizer.*` metadata is copied; a llama2.c .bin needs the
llama2.c tokenizer.bin (`tokenizer=`; the CLI's -z) and is written as SentencePiece metadata
("llama" model, spaces as U+2581, llama2.c's "\\n<s>\\n" / "\\n</s>\\n" restored to "<s>" / "</s>",
token types inferred: 2 unknown, 3 control, 6 byte, 1 normal) — the same vocabulary llama.cpp's
converter writes.

Quantizers (numpy, vectorized over all blocks of a chunk of rows):
  Q8_0, Q4_0, Q5_0   ggml's reference quantizers, bit for bit (d = amax/127 with round-half-away;
                     d = signed max / -8 or / -16 with trunc(x/d + 8.5 or 16.5)).
  Q4_K               per 32-value sub-block, min/max: the offset m (= -min(0, min x)) and the step
                     are quantized to 6 bits relative to the super-block's f16 dmin / d, both
                     rounded UP (f16 scales rounded up, 6-bit codes by ceil), so the grid
                     [-dmin*m, -dmin*m + 15*d*sc] always covers the sub-block: every value is
                     within half a step of its reconstruction (no clipping).
  Q6_K               per 16-value sub-block, a signed step s with q = round(x/s) in [-32, 31]: the
                     sign puts the larger side on -32, |s| = min over the two orientations of
                     max(side_to_-32/32, other_side/31.5); int8 scale codes relative to the f16 d,
                     rounded up likewise, so again |x - x^| <= |step|/2.
(llama.cpp's iterative make_qkx2_quants / make_qx_quants searches are not used.)

The file is written to DST.tmp tensor by tensor, a chunk of rows (CHUNK_VALUES values) at a time,
so memory stays bounded whatever the model's size (the source is read through its mmap), and is
renamed to DST at the end; an existing DST is replaced.
"""
import os
import struct
import time

import numpy as np

from .errors import FormatError, ParameterError, PyllamaError
from .formats.common import BF16, F16, F32, LAYER_TENSORS, Q8_G, TYPES as GGML_TYPES

__all__ = ["TYPES", "convert", "add_arguments", "run", "quantize", "dequantize", "tensor_type"]

# ggml type numbers
Q4_0, Q5_0, Q8_0, Q4_K, Q6_K = 2, 6, 8, 12, 14
QK_K = 256

# --type -> (llama_ftype for general.file_type, base ggml type of the matrices)
TYPES = {
    "f32": (0, F32),
    "f16": (1, F16),
    "bf16": (32, BF16),
    "q8_0": (7, Q8_0),
    "q4_0": (2, Q4_0),
    "q4_k_m": (15, Q4_K),
    "q6_k": (18, Q6_K),
}

ALIGNMENT = 32
QUANTIZATION_VERSION = 2          # ggml's GGML_QNT_VERSION, written by llama-quantize
CHUNK_VALUES = 1 << 20            # values converted per step (a few MB of temporaries)
SPM_SPACE = "\u2581"

# GGUF metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_DTYPE_VTYPE = {"u1": _U8, "i1": _I8, "u2": _U16, "i2": _I16, "u4": _U32, "i4": _I32,
                "f4": _F32, "b1": _BOOL, "u8": _U64, "i8": _I64, "f8": _F64}
_SCALAR_FMT = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i",
               _F32: "<f", _BOOL: "<B", _U64: "<Q", _I64: "<q", _F64: "<d"}
_VT_DTYPE = {_U8: "<u1", _I8: "<i1", _U16: "<u2", _I16: "<i2", _U32: "<u4", _I32: "<i4",
             _F32: "<f4", _BOOL: "<u1", _U64: "<u8", _I64: "<i8", _F64: "<f8"}


# ====================================================================== quantizers
def _round_half_away(v):
    """C's roundf on float32 values (exact: the fraction a - floor(a) is computed exactly)."""
    a = np.abs(v)
    r = np.floor(a)
    r += (a - r) >= np.float32(0.5)
    return np.copysign(r, v)


def _f16_bytes(v):
    return np.asarray(v, dtype="<f2").view(np.uint8).reshape(-1, 2)


def _f16_up(v):
    """float64 values >= 0 -> the smallest float16 >= each (so a scale never shrinks)."""
    h = v.astype(np.float16)
    low = h.astype(np.float64) < v
    if low.any():
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.isfinite(h).all():
        raise ParameterError("weights too large for an f16 block scale (|w| beyond ~1e6)")
    return h


def _signed_max(x):
    """Per block, the value of largest magnitude (the first one on ties), as ggml picks it."""
    i = np.abs(x).argmax(axis=1)[:, None]
    return np.take_along_axis(x, i, axis=1)


def _q8_0(x):
    n = x.shape[0]
    x = x.reshape(n, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((n, 34), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = _round_half_away(x * inv).astype(np.int8).view(np.uint8)
    return out


def _signed_levels(x, half):
    """Q4_0/Q5_0's shared step: blocks of 32 scaled by d = signed max / -half and rounded to the
    unsigned levels 0..2*half-1 as ggml's reference does. Returns (d, q uint8 (n, 32))."""
    x = x.reshape(x.shape[0], 32)
    d = _signed_max(x) / np.float32(-half)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
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


def _q4_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    hi = xs.max(axis=2).astype(np.float64)
    offs = -np.minimum(xs.min(axis=2), 0).astype(np.float64)        # -min(0, min x) >= 0
    dmin = _f16_up(offs.max(axis=1) / 63)
    dm = dmin.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(dm > 0, np.ceil(offs / dm), 0)
    m = np.clip(m, 0, 63)
    need = (hi + dm * m) / 15                                        # step covering the sub-block
    d = _f16_up(need.max(axis=1) / 63)
    dd = d.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(dd > 0, np.ceil(need / dd), 0)
    sc = np.clip(sc, 0, 63)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32))   # as the dequantizer has it
    low = (dmin.astype(np.float32)[:, None] * m.astype(np.float32))
    with np.errstate(divide="ignore"):
        inv = np.where(step > 0, np.float32(1) / step, np.float32(0))
    q = np.clip(np.rint((xs + low[:, :, None]) * inv[:, :, None]), 0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((n, 144), np.uint8)
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(dmin)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    out[:, 16:] = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
    return out


def _q6_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    pos = np.maximum(xs.max(axis=2), 0).astype(np.float64)
    neg = np.maximum(-xs.min(axis=2), 0).astype(np.float64)
    s_up = np.maximum(neg / 32, pos / 31.5)     # step > 0: the negative side reaches q = -32
    s_down = np.maximum(pos / 32, neg / 31.5)   # step < 0: the positive side reaches q = -32
    flip = s_down < s_up
    s = np.minimum(s_up, s_down)
    d = _f16_up(s.max(axis=1) / 127)
    dd = d.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(dd > 0, np.ceil(s / dd), 0)
    sc = np.where(flip, -1, 1) * np.clip(sc, 0, 127)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(step != 0, np.float32(1) / step, np.float32(0))
    q = (np.clip(np.rint(xs * inv[:, :, None]), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    ql = q.reshape(n, 2, 2, 64)
    qh = (q.reshape(n, 2, 4, 32) >> 4) << np.array([0, 2, 4, 6], np.uint8)[:, None]
    out = np.empty((n, 210), np.uint8)
    out[:, :128] = ((ql[:, :, 0] & 15) | (ql[:, :, 1] << 4)).reshape(n, 128)
    out[:, 128:192] = np.bitwise_or.reduce(qh, axis=2).reshape(n, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:] = _f16_bytes(d)
    return out


def _bf16(x):
    """ggml's fp32 -> bf16: round to nearest even, NaNs kept quiet."""
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return r.view(np.uint8).reshape(x.shape[0], -1)


def _f16(x):
    with np.errstate(over="ignore"):
        h = x.astype("<f2")
    if np.isinf(h).any() and not np.isinf(x[np.isinf(h)]).all():
        big = float(np.abs(x[np.isfinite(x)]).max())
        raise ParameterError(f"a weight of magnitude {big:g} does not fit in f16 (max 65504); "
                             f"use --type bf16 or f32")
    return h.view(np.uint8).reshape(x.shape[0], -1)


_QUANTIZE = {Q8_0: _q8_0, Q4_0: _q4_0, Q5_0: _q5_0, Q4_K: _q4_k, Q6_K: _q6_k}
_ENCODE = {F32: lambda x: x.astype("<f4", copy=False).view(np.uint8).reshape(x.shape[0], -1),
           F16: _f16, BF16: _bf16}


def quantize(x, ggml_type):
    """float32 rows (rows, cols) -> uint8 (rows, row bytes) of `ggml_type` (a number)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    rows, cols = x.shape
    if ggml_type in _ENCODE:
        return _ENCODE[ggml_type](x)
    if ggml_type not in _QUANTIZE:
        raise ParameterError(f"cannot quantize to {_type_name(ggml_type)}")
    _, block, size = GGML_TYPES[ggml_type]
    if cols % block:
        raise ParameterError(f"row length {cols} is not a multiple of the {_type_name(ggml_type)} "
                             f"block size {block}")
    return _QUANTIZE[ggml_type](x.reshape(-1, block)).reshape(rows, cols // block * size)


# ====================================================================== dequantizers
def _deq_q8_0(b):
    return b[:, :2].copy().view("<f2").astype(np.float32) * b[:, 2:].view(np.int8)


def _deq_q4_0(b):
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int8) - 8
    return d * q


def _deq_q5_0(b):
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    hbits = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")
    qs = b[:, 6:]
    q = (np.concatenate([qs & 15, qs >> 4], axis=1) | (hbits << 4)).astype(np.int8) - 16
    return d * q


def _deq_q4_k(b):
    n = b.shape[0]
    d = b[:, 0:2].copy().view("<f2").astype(np.float32)
    dmin = b[:, 2:4].copy().view("<f2").astype(np.float32)
    s = b[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    step = (d * sc.astype(np.float32))[:, :, None]
    low = (dmin * m.astype(np.float32))[:, :, None]
    return (step * q - low).reshape(n, 256)


def _deq_q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16).astype(np.float32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view("<f2").astype(np.float32)
    return ((d * sc)[:, :, None] * q).reshape(n, 256)


_DEQUANTIZE = {Q8_0: _deq_q8_0, Q4_0: _deq_q4_0, Q5_0: _deq_q5_0, Q4_K: _deq_q4_k,
               Q6_K: _deq_q6_k}


def dequantize(data, ggml_type, cols):
    """uint8 rows of `ggml_type` -> float32 (rows, cols)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    _, block, size = GGML_TYPES[ggml_type]
    rows = data.size * block // (size * cols)
    if ggml_type == F32:
        return data.view("<f4").reshape(rows, cols)
    if ggml_type == F16:
        return data.view("<f2").astype(np.float32).reshape(rows, cols)
    if ggml_type == BF16:
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    if ggml_type not in _DEQUANTIZE:
        raise FormatError(f"cannot dequantize {_type_name(ggml_type)}")
    return _DEQUANTIZE[ggml_type](data.reshape(-1, size)).reshape(rows, cols)


# ====================================================================== the type mix
def use_more_bits(i_layer, n_layers):
    """llama.cpp's choice of layers that get more bits in the *_K_M mixes."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _fits(ggml_type, cols):
    return cols % GGML_TYPES[ggml_type][1] == 0


def tensor_type(name, cols, type="f32", n_layers=1, tied=False, pure=False):
    """The ggml type `convert` gives tensor `name` (rows of `cols` values); 1-D -> pass cols=0."""
    ftype, base = _check_type(type)
    if cols == 0 or name.endswith("_norm.weight"):
        return F32
    want = base
    if not pure and base in (Q4_0, Q4_K, Q6_K, Q8_0):
        classifier = name == "output.weight" or (tied and name == "token_embd.weight")
        if classifier:
            want = Q8_0 if base == Q8_0 else Q6_K
        elif base == Q4_K and name.startswith("blk.") and (
                name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")):
            if use_more_bits(int(name.split(".")[1]), n_layers):
                want = Q6_K
    if not _fits(want, cols):  # llama.cpp's fallbacks for rows that do not fill a block
        want = {Q4_K: Q5_0, Q6_K: Q8_0}.get(want, want)
        if not _fits(want, cols):
            want = F16
    return want


def _check_type(type):
    key = type.lower() if isinstance(type, str) else type
    if key not in TYPES:
        raise ParameterError(f"unknown output type {type!r}: expected one of "
                             f"{', '.join(TYPES)}")
    return TYPES[key]


def _type_name(t):
    return GGML_TYPES[t][0] if t in GGML_TYPES else f"type {t}"


# ====================================================================== reading the source
def _source_rows(tensor, r0, r1):
    """Rows [r0, r1) of a source tensor as float32 (rows, cols)."""
    cols = tensor.shape[-1]
    data = tensor.data if tensor.data.ndim == 2 else tensor.data.reshape(1, -1)
    block = data[r0:r1]
    if tensor.type == Q8_G:
        gs = tensor.group_size
        per_row = cols // gs
        scales = tensor.scales[r0 * per_row:r1 * per_row].reshape(-1, per_row, 1)
        return (block.reshape(-1, per_row, gs) * scales).reshape(-1, cols)
    if block.dtype == np.float32:
        return block
    return dequantize(block, tensor.type, cols)


def _raw_rows(tensor, r0, r1):
    data = tensor.data if tensor.data.ndim == 2 else tensor.data.reshape(1, -1)
    return data[r0:r1].view(np.uint8)


def _canonical_order(n_layers):
    names = ["token_embd.weight"]
    for i in range(n_layers):
        names += [f"blk.{i}.{t}.weight" for t in LAYER_TENSORS]
    return names + ["output_norm.weight", "output.weight"]


# ====================================================================== tokenizer metadata
def _tokenizer_from_bin(path, vocab_size):
    from .tokenizers.spm import CONTROL, Tokenizer
    tok = Tokenizer.from_llama2c(path, vocab_size)
    tokens = []
    for i, (piece, t) in enumerate(zip(tok.pieces, tok.token_types.tolist())):
        if t == CONTROL and piece.strip():
            piece = piece.strip()        # llama2.c's "\n<s>\n" is SentencePiece's "<s>"
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: token {i} is not valid UTF-8 ({e.reason}); GGUF "
                              f"stores tokens as UTF-8 strings") from None
        tokens.append(text.replace(" ", SPM_SPACE))
    return [
        ("tokenizer.ggml.model", _STR, "llama"),
        ("tokenizer.ggml.tokens", (_ARR, _STR), tokens),
        ("tokenizer.ggml.scores", (_ARR, _F32), tok.scores),
        ("tokenizer.ggml.token_type", (_ARR, _I32), tok.token_types),
        ("tokenizer.ggml.bos_token_id", _U32, tok.bos_id),
        ("tokenizer.ggml.eos_token_id", _U32, tok.eos_id),
        ("tokenizer.ggml.unknown_token_id", _U32, tok.unk_id),
    ]


def _vtype_of(value, key):
    """GGUF value type for a metadata value as pyllama's GGUF reader returned it."""
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return _U32
        if -(1 << 31) <= value < 0:
            return _I32
        return _I64 if value < 0 else _U64
    if isinstance(value, float):
        return _F32
    if isinstance(value, str):
        return _STR
    if isinstance(value, np.ndarray):
        code = value.dtype.kind + str(value.dtype.itemsize) if value.dtype != bool else "b1"
        if code not in _DTYPE_VTYPE:
            raise FormatError(f"metadata '{key}': cannot write an array of {value.dtype}")
        return (_ARR, _DTYPE_VTYPE[code])
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return (_ARR, _STR)
        inner = {_vtype_of(v, key) for v in value}
        if len(inner) == 1:
            return (_ARR, inner.pop())
    raise FormatError(f"metadata '{key}': cannot write a value of type {type(value).__name__}")


def _tokenizer_from_gguf(meta):
    keys = [k for k in meta if k.startswith("tokenizer.")]
    keys.sort(key=lambda k: k != "tokenizer.ggml.model")   # the model first
    return [(k, _vtype_of(meta[k], k), meta[k]) for k in keys]


# ====================================================================== GGUF writing
class _Header:
    """The GGUF header: metadata and tensor infos, built in memory (it is small)."""

    def __init__(self):
        self.kv = bytearray()
        self.n_kv = 0
        self.infos = bytearray()
        self.n_tensors = 0

    @staticmethod
    def _string(buf, s):
        raw = s.encode("utf-8")
        buf += struct.pack("<Q", len(raw))
        buf += raw

    def _value(self, buf, vtype, value):
        if isinstance(vtype, tuple):          # (ARR, element type)
            etype = vtype[1]
            buf += struct.pack("<iQ", _ARR if isinstance(etype, tuple) else etype, len(value))
            if etype == _STR:
                for s in value:
                    self._string(buf, s)
            elif isinstance(etype, tuple):
                for v in value:
                    self._value(buf, etype, v)
            else:
                buf += np.asarray(value).astype(_VT_DTYPE[etype]).tobytes()
        elif vtype == _STR:
            self._string(buf, value)
        else:
            buf += struct.pack(_SCALAR_FMT[vtype], value)

    def add(self, key, vtype, value):
        self._string(self.kv, key)
        self.kv += struct.pack("<i", _ARR if isinstance(vtype, tuple) else vtype)
        self._value(self.kv, vtype, value)
        self.n_kv += 1

    def add_tensor(self, name, ne, ggml_type, offset):
        self._string(self.infos, name)
        self.infos += struct.pack("<I", len(ne))
        self.infos += struct.pack(f"<{len(ne)}q", *ne)
        self.infos += struct.pack("<iQ", ggml_type, offset)
        self.n_tensors += 1

    def bytes(self):
        head = b"GGUF" + struct.pack("<IQQ", 3, self.n_tensors, self.n_kv)
        out = head + bytes(self.kv) + bytes(self.infos)
        return out + b"\0" * (-len(out) % ALIGNMENT)


def _metadata(cfg, name, ftype, quantized):
    head = cfg["dim"] // cfg["n_heads"]
    kv = [
        ("general.architecture", _STR, "llama"),
        ("general.name", _STR, name),
        ("general.alignment", _U32, ALIGNMENT),
        ("general.file_type", _U32, ftype),
    ]
    if quantized:
        kv.append(("general.quantization_version", _U32, QUANTIZATION_VERSION))
    kv += [
        ("llama.context_length", _U32, cfg["seq_len"]),
        ("llama.embedding_length", _U32, cfg["dim"]),
        ("llama.block_count", _U32, cfg["n_layers"]),
        ("llama.feed_forward_length", _U32, cfg["hidden_dim"]),
        ("llama.rope.dimension_count", _U32, head),
        ("llama.attention.head_count", _U32, cfg["n_heads"]),
        ("llama.attention.head_count_kv", _U32, cfg["n_kv_heads"]),
        ("llama.attention.layer_norm_rms_epsilon", _F32, cfg["rms_eps"]),
        ("llama.rope.freq_base", _F32, cfg["rope_theta"]),
    ]
    return kv


# ====================================================================== convert
def convert(src_path, dst_path, type="f32", tokenizer=None, pure=False, progress=None):
    """Write `src_path` (any model pyllama reads) as a GGUF v3 file `dst_path` of `type`.

    tokenizer  llama2.c tokenizer.bin; required for .bin sources, optional for GGUF ones (it then
               replaces the file's own vocabulary)
    pure       every matrix in the base type of `type` (no llama.cpp mix), fallbacks aside
    progress   optional callable(index, count, name, ggml_type_name) called before each tensor

    Returns a summary dict: path, type, bytes, seconds, tensors {name: type name},
    counts {type name: n}. Raises ParameterError (arguments) or FormatError (the source).
    """
    from .formats import load

    t0 = time.perf_counter()
    if isinstance(type, str) and type.lower() == "v2":
        return _convert_v2(src_path, dst_path, t0)
    ftype, base = _check_type(type)
    type = type.lower()
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    if os.path.isdir(dst_path):
        raise ParameterError(f"{dst_path}: is a directory; give the output file's path")
    model = load(src_path)
    if not model.has_weights:
        raise FormatError(f"{src_path}: has no tensors (a vocab-only GGUF); nothing to convert")
    cfg = model.config
    if tokenizer is not None:
        tok_kv = _tokenizer_from_bin(os.fspath(tokenizer), cfg["vocab_size"])
    elif model.format == "gguf":
        tok_kv = _tokenizer_from_gguf(model.metadata) if "tokenizer.ggml.model" in model.metadata \
            else []
    else:
        raise ParameterError(f"{src_path}: a llama2.c checkpoint does not contain its vocabulary: "
                             f"give its tokenizer.bin (convert(..., tokenizer=PATH); on the "
                             f"command line -z PATH) so that the GGUF file carries it")

    name = model.metadata.get("general.name") if model.format == "gguf" else None
    if not isinstance(name, str) or not name:
        name = os.path.splitext(os.path.basename(src_path))[0]

    tied = "output.weight" not in model.tensors
    plan, offset = [], 0
    for tname in _canonical_order(cfg["n_layers"]):
        t = model.tensors.get(tname)
        if t is None:
            continue
        cols = t.shape[-1]
        gtype = tensor_type(tname, cols if len(t.shape) == 2 else 0, type, cfg["n_layers"],
                            tied, pure)
        rows = t.shape[0] if len(t.shape) == 2 else 1
        if t.type not in (F32, F16, BF16, Q8_G, gtype) and t.type not in _DEQUANTIZE:
            raise FormatError(f"{src_path}: tensor '{tname}' is {_type_name(t.type)}, which "
                              f"convert cannot dequantize (it reads F32, F16, BF16, Q8_0, Q4_0, "
                              f"Q5_0, Q4_K, Q6_K and llama2.c int8)")
        _, block, size = GGML_TYPES[gtype]
        nbytes = rows * (cols // block) * size
        plan.append((tname, t, gtype, rows, cols, offset, nbytes))
        offset += nbytes + (-nbytes % ALIGNMENT)

    header = _Header()
    for key, vtype, value in _metadata(cfg, name, ftype, base not in (F32, F16, BF16)) + tok_kv:
        header.add(key, vtype, value)
    for tname, t, gtype, rows, cols, off, _ in plan:
        header.add_tensor(tname, [cols] if len(t.shape) == 1 else [cols, rows], gtype, off)
    head = header.bytes()

    tmp = dst_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for i, (tname, t, gtype, rows, cols, off, nbytes) in enumerate(plan):
                if progress is not None:
                    progress(i, len(plan), tname, _type_name(gtype))
                assert f.tell() == len(head) + off
                _write_tensor(f, src_path, tname, t, gtype, rows, cols)
                assert f.tell() == len(head) + off + nbytes
                f.write(b"\0" * (-nbytes % ALIGNMENT))
        os.replace(tmp, dst_path)
    except OSError as e:
        _remove(tmp)
        raise ParameterError(f"{dst_path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        model.close()

    names = {p[0]: _type_name(p[2]) for p in plan}
    counts = {}
    for v in names.values():
        counts[v] = counts.get(v, 0) + 1
    return {"path": dst_path, "type": type, "bytes": os.path.getsize(dst_path),
            "seconds": time.perf_counter() - t0, "tensors": names, "counts": counts}


def _write_tensor(f, src_path, name, t, gtype, rows, cols):
    step = max(1, CHUNK_VALUES // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if t.type == gtype:           # already in the target type: copy the bytes
            f.write(memoryview(np.ascontiguousarray(_raw_rows(t, r0, r1))))
            continue
        x = _source_rows(t, r0, r1)
        if gtype != F32 and not np.isfinite(x).all():
            raise FormatError(f"{src_path}: tensor '{name}' holds NaN or infinite values "
                              f"(rows {r0}..{r1 - 1}); they cannot be converted to "
                              f"{_type_name(gtype)}")
        f.write(memoryview(np.ascontiguousarray(quantize(x, gtype))))


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# ====================================================================== command line
def _convert_v2(src_path, dst_path, t0):
    """llama2.c's V2 int8 checkpoint (runq.c's format) instead of a GGUF file."""
    from .formats import load
    from .formats.llama2c import write_v2
    model = load(src_path)
    if not model.has_weights:
        raise FormatError(f"{src_path}: has no tensors (a vocab-only GGUF); nothing to convert")
    tmp = os.fspath(dst_path) + ".tmp"
    try:
        gs = write_v2(model, tmp, _source_rows)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n = len(model.tensors)
    return {"path": os.fspath(dst_path), "type": f"v2 (int8, group {gs})", "bytes": os.path.getsize(dst_path),
            "seconds": time.perf_counter() - t0, "tensors": {}, "counts": {"Q8_G": n}}


def add_arguments(parser):
    """`pyllama convert IN OUT [--type T] [-z tokenizer.bin] [--pure]`."""
    parser.add_argument("input", help="model to convert: llama2.c .bin (legacy, V1, V2) or GGUF")
    parser.add_argument("output", help="GGUF file to write (replaced if it exists)")
    parser.add_argument("--type", dest="type", default="f32", metavar="TYPE",
                        help="output type: " + ", ".join(TYPES) + " (default f32); q4_k_m is "
                             "llama.cpp's Q4_K_M mix; v2 writes a llama2.c V2 int8 .bin "
                             "(runq.c's format) instead of GGUF")
    parser.add_argument("-z", "--tokenizer", default=None, metavar="PATH",
                        help="llama2.c tokenizer.bin (required for a .bin model: GGUF files "
                             "carry their vocabulary)")
    parser.add_argument("--pure", action="store_true",
                        help="every matrix in TYPE (no llama.cpp mix for the classifier and "
                             "K-quant layers)")
    return parser


def run(args, out, err):
    """Run `pyllama convert`: a summary line on `out`, progress on `err` when it is a terminal.

    `out`/`err` may be text or binary streams. Errors raise PyllamaError (the CLI prints them)."""
    def progress(i, n, name, tname):
        _emit(err, f"\r[{i + 1}/{n}] {name} -> {tname}\x1b[K")
        err.flush()

    tty = hasattr(err, "isatty") and err.isatty()
    try:
        info = convert(args.input, args.output, args.type, args.tokenizer,
                       pure=getattr(args, "pure", False), progress=progress if tty else None)
    finally:
        if tty:
            _emit(err, "\r\x1b[K")
    mix = ", ".join(f"{n} {k}" for k, n in sorted(info["counts"].items()))
    _emit(out, f"wrote {info['path']}: {info['type']}, {len(info['tensors'])} tensors ({mix}), "
               f"{info['bytes']:,} bytes in {info['seconds']:.1f} s\n")
    return 0


def _emit(stream, text):
    """Write to a text or a binary stream (pyllama's CLI passes stdout.buffer and stderr)."""
    try:
        stream.write(text)
    except TypeError:
        stream.write(text.encode())


if __name__ == "__main__":  # python -m pyllama.convert IN OUT --type T
    import argparse
    import sys
    p = add_arguments(argparse.ArgumentParser(prog="python -m pyllama.convert"))
    try:
        sys.exit(run(p.parse_args(), sys.stdout.buffer, sys.stderr))
    except PyllamaError as e:
        sys.stderr.write(f"pyllama: error: {e}\n")
        sys.exit(1)
