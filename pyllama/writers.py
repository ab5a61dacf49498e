"""File writers: GGUF v3 (the header with metadata and tensor infos; convert streams the tensor
data after it) and llama2.c's V2 int8 checkpoint. The readers in pyllama.formats own the formats'
constants and value-type table; the writers use them, so a writer and its reader cannot disagree.
"""
import struct

import numpy as np

from .errors import FormatError
from .formats.common import fail
from .formats.gguf import MAGIC, VALUE_TYPES
from .formats.llama2c import HEADER_FIELDS, MAGIC_V1V2, MATRICES, V1_HEADER_BYTES

# GGUF metadata value types by name, from the reader's table (number -> name, struct, dtype)
_BY_NAME = {name: num for num, (name, _, _) in VALUE_TYPES.items()}
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = (
    _BY_NAME[n] for n in ("u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                          "u64", "i64", "f64"))
SCALAR_FMT = {num: fmt for num, (_, fmt, _) in VALUE_TYPES.items() if fmt}
VT_DTYPE = {num: dt for num, (_, _, dt) in VALUE_TYPES.items() if dt}
# numpy dtype kind+size -> value type (bool arrays are "b1")
DTYPE_VTYPE = {np.dtype(dt).kind + str(np.dtype(dt).itemsize): num
               for num, dt in VT_DTYPE.items() if num != BOOL}
DTYPE_VTYPE["b1"] = BOOL


def vtype_of(value, key):
    """GGUF value type for a metadata value as pyllama's GGUF reader returned it."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return U32
        if -(1 << 31) <= value < 0:
            return I32
        return I64 if value < 0 else U64
    if isinstance(value, float):
        return F32
    if isinstance(value, str):
        return STR
    if isinstance(value, np.ndarray):
        code = value.dtype.kind + str(value.dtype.itemsize) if value.dtype != bool else "b1"
        if code not in DTYPE_VTYPE:
            raise FormatError(f"metadata '{key}': cannot write an array of {value.dtype}")
        return (ARR, DTYPE_VTYPE[code])
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return (ARR, STR)
        inner = {vtype_of(v, key) for v in value}
        if len(inner) == 1:
            return (ARR, inner.pop())
    raise FormatError(f"metadata '{key}': cannot write a value of type {type(value).__name__}")


class GGUFHeader:
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
            buf += struct.pack("<iQ", ARR if isinstance(etype, tuple) else etype, len(value))
            if etype == STR:
                for s in value:
                    self._string(buf, s)
            elif isinstance(etype, tuple):
                for v in value:
                    self._value(buf, etype, v)
            else:
                buf += np.asarray(value).astype(VT_DTYPE[etype]).tobytes()
        elif vtype == STR:
            self._string(buf, value)
        else:
            buf += struct.pack(SCALAR_FMT[vtype], value)

    def add(self, key, vtype, value):
        self._string(self.kv, key)
        self.kv += struct.pack("<i", ARR if isinstance(vtype, tuple) else vtype)
        self._value(self.kv, vtype, value)
        self.n_kv += 1

    def add_tensor(self, name, ne, ggml_type, offset):
        self._string(self.infos, name)
        self.infos += struct.pack("<I", len(ne))
        self.infos += struct.pack(f"<{len(ne)}q", *ne)
        self.infos += struct.pack("<iQ", ggml_type, offset)
        self.n_tensors += 1

    def bytes(self, alignment):
        head = MAGIC + struct.pack("<IQQ", 3, self.n_tensors, self.n_kv)
        out = head + bytes(self.kv) + bytes(self.infos)
        return out + b"\0" * (-len(out) % alignment)


def write_v2(model, path, rows_of, group_size=64):
    """Write `model` (a ModelFile) as a llama2.c V2 checkpoint (export.py --version 2, runq.c):
    f32 norms, then each matrix as int8 values and f32 scales, one scale per `group_size` values
    (halved until it divides dim, as export.py does; round half to even as torch.round).
    rows_of(tensor, r0, r1) gives a tensor's rows as float32."""
    cfg = model.config
    while cfg["dim"] % group_size:
        group_size //= 2
    if cfg["hidden_dim"] % group_size:
        fail(model.path, f"hidden_dim {cfg['hidden_dim']} is not a multiple of the V2 group "
                         f"size {group_size}")
    T, L = model.tensors, cfg["n_layers"]
    shared = "output.weight" not in T
    header = struct.pack("<Ii7iBi", MAGIC_V1V2, 2, *(cfg[k] for k in HEADER_FIELDS), int(shared),
                         group_size)
    with open(path, "wb") as f:
        f.write(header + b"\0" * (V1_HEADER_BYTES - len(header)))
        for norm in ("attn_norm", "ffn_norm"):
            for l in range(L):
                f.write(np.asarray(T[f"blk.{l}.{norm}.weight"].data, np.float32).tobytes())
        f.write(np.asarray(T["output_norm.weight"].data, np.float32).tobytes())
        names = ["token_embd.weight"]
        names += [f"blk.{l}.{n}.weight" for n, _ in MATRICES for l in range(L)]
        names += [] if shared else ["output.weight"]
        for name in names:
            t = T[name]
            w = rows_of(t, 0, t.shape[0]).reshape(-1, group_size).astype(np.float32)
            scale = np.abs(w).max(axis=1) / np.float32(127.0)
            safe = np.where(scale > 0, scale, np.float32(1.0))
            q = np.round(w / safe[:, None]).astype(np.int8)
            f.write(q.tobytes())
            f.write(scale.astype(np.float32).tobytes())
    return group_size
