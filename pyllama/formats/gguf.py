"""GGUF reader (versions 2 and 3): one read-only np.memmap, header parsed from bounded slices.

    read_gguf(path, mm=None) -> ModelFile   a llama model (or vocab-only, below)
    read_metadata(path, mm=None) -> (version, metadata, [TensorInfo])   structure only

`mm` is the file's map when the caller already made one (formats.load does); otherwise it is made
here. The reader returns the metadata; pyllama.tokenizers builds the tokenizer from it.

Every length and count is checked against the bytes that remain BEFORE anything is sliced or
allocated, so a hostile file ends in FormatError (naming file, field/offset, expected vs found) —
never a MemoryError, a hang or a short read. Tensors are numpy views into the one map (no copy):
matrices are uint8 of shape (rows, row_bytes), norms float32 of shape (dim,).

Metadata values: integers -> int, f32/f64 -> float, bool -> bool, string -> str; arrays of numbers
or bools -> 1-D numpy arrays (copied out of the map, so they outlive it), arrays of strings ->
list[str], arrays of arrays -> list. v2 and v3 are the same layout for us (v1 had u32 counts).

Vocab-only files (tensor count 0, e.g. llama.cpp's ggml-vocab-*.gguf): read_gguf returns a
ModelFile with `tensors == {}` (`has_weights` False), `mmap None`, the metadata, and a PARTIAL
config — the keys present in the metadata plus defaults, type-checked but not check_config'ed.
Callers that need weights must test `model_file.has_weights`. A file that has tensors is always
checked in full: config, every used tensor's type and shape, missing tensors.

The architecture (`general.architecture`) picks the table of pyllama/arch.py: its metadata
prefix, the tensors it requires and allows (with their shapes from the config), its rope style.
Tensors an architecture does not use are validated structurally (type, bounds, alignment,
overlap) but left out of ModelFile.tensors; read_metadata lists them all.
"""
import os
import struct
from collections import namedtuple

import numpy as np

from .. import arch as archs
from ..arch import CONFIG_KEYS, REQUIRED
from .common import (CORE_TYPES, F32, GGML_TYPES, Q8_G, ModelFile, Tensor, check_config, fail,
                     type_name)

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4              # GGML_MAX_DIMS
MAX_NAME_BYTES = 63       # GGML_MAX_NAME is 64 including the NUL
MAX_ARRAY_DEPTH = 8       # arrays of arrays of ...: deeper than this is refused
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# GGUF metadata value type -> (name, struct format, numpy dtype); None = not a fixed-size scalar.
VALUE_TYPES = {
    0: ("u8", "<B", "<u1"), 1: ("i8", "<b", "<i1"), 2: ("u16", "<H", "<u2"),
    3: ("i16", "<h", "<i2"), 4: ("u32", "<I", "<u4"), 5: ("i32", "<i", "<i4"),
    6: ("f32", "<f", "<f4"), 7: ("bool", "<B", "<u1"), 8: ("string", None, None),
    9: ("array", None, None), 10: ("u64", "<Q", "<u8"), 11: ("i64", "<q", "<i8"),
    12: ("f64", "<d", "<f8"),
}
BOOL, STRING, ARRAY = 7, 8, 9

# The tensor types a GGUF file may hold: the one type table, without pyllama's own Q8_G; the
# C core computes with CORE_TYPES (a tensor of another type is sized and named, not run).
GGUF_TYPES = {t: v for t, v in GGML_TYPES.items() if t != Q8_G}
SUPPORTED_TYPES = CORE_TYPES - {Q8_G}

TensorInfo = namedtuple("TensorInfo", "name type ne offset nbytes")
TensorInfo.__doc__ = "One tensor info: ne in GGUF order (ne[0] = row length), absolute offset."

_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounded reads from the map: every read checks the remaining bytes first."""

    def __init__(self, path, mv, problems=None):
        self.path, self.mv, self.size, self.pos = path, mv, len(mv), 0
        self.problems = problems  # a list: invalid UTF-8 is escaped and described there

    def _invalid(self, raw, what, e):
        if self.problems is None:
            fail(self.path, f"{what}: invalid UTF-8 ({e.reason} at byte {e.start})")
        self.problems.append(f"{what}: invalid UTF-8 ({e.reason} at byte {e.start})")
        return str(raw, "utf-8", "backslashreplace")

    def need(self, n, what):
        if n > self.size - self.pos:
            fail(self.path, f"{what} at offset {self.pos}: needs {n} bytes, only "
                            f"{self.size - self.pos} remain (truncated or corrupt file)")

    def scalar(self, fmt, n, what):
        self.need(n, what)
        v = struct.unpack_from(fmt, self.mv, self.pos)[0]
        self.pos += n
        return v

    def string(self, what):
        start = self.pos
        n = self.scalar("<Q", 8, f"{what}: string length")
        self.need(n, f"{what}: string")
        raw = self.mv[self.pos:self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            return self._invalid(raw, f"{what} at offset {start}", e)

    def value(self, vtype, key, depth=0):
        if vtype not in VALUE_TYPES:
            fail(self.path, f"metadata '{key}' at offset {self.pos - 4}: unknown value type "
                            f"{vtype} (expected 0 to 12)")
        name, fmt, _ = VALUE_TYPES[vtype]
        if vtype == STRING:
            return self.string(f"metadata '{key}'")
        if vtype == ARRAY:
            return self.array(key, depth + 1)
        v = self.scalar(fmt, struct.calcsize(fmt), f"metadata '{key}' ({name})")
        if vtype == BOOL:
            if v > 1:
                fail(self.path, f"metadata '{key}' at offset {self.pos - 1}: bool must be 0 or 1, "
                                f"found {v}")
            return bool(v)
        return v

    def array(self, key, depth):
        what = f"metadata '{key}'"
        if depth > MAX_ARRAY_DEPTH:
            fail(self.path, f"{what} at offset {self.pos}: arrays nested deeper than "
                            f"{MAX_ARRAY_DEPTH} levels")
        etype = self.scalar("<i", 4, f"{what}: array element type")
        count = self.scalar("<Q", 8, f"{what}: array length")
        if etype not in VALUE_TYPES:
            fail(self.path, f"{what} at offset {self.pos - 12}: unknown array element type {etype} "
                            f"(expected 0 to 12)")
        name, fmt, dtype = VALUE_TYPES[etype]
        if dtype is not None:
            itemsize = np.dtype(dtype).itemsize
            self.need(count * itemsize, f"{what}: array of {count} {name}")
            a = (np.frombuffer(self.mv, dtype=dtype, count=count, offset=self.pos).copy() if count
                 else np.empty(0, dtype))
            if etype == BOOL:
                if count and a.max() > 1:
                    fail(self.path, f"{what} at offset {self.pos}: bool array holds "
                                    f"{int(a.max())} (expected 0 or 1)")
                a = a.astype(bool)
            self.pos += count * itemsize
            return a
        if etype == ARRAY:  # each element is at least an element type and a length
            self.need(count * 12, f"{what}: array of {count} arrays")
            return [self.array(key, depth + 1) for _ in range(count)]
        self.need(count * 8, f"{what}: array of {count} strings")
        return self._strings(key, count)

    def _strings(self, key, count):
        """An array of strings (the tokenizer's 32000 pieces): the Python loop only follows the
        u64 lengths; numpy then turns each length field into one NUL separator, and one UTF-8
        decode and split give every string. Anything unusual (a string past the end, invalid
        UTF-8, a NUL inside a string) is left to the checked loop, which names it."""
        mv, p, unpack = self.mv, self.pos, _U64.unpack_from
        starts = [0] * count
        try:
            for i in range(count):
                starts[i] = p
                p += 8 + unpack(mv, p)[0]
        except (struct.error, OverflowError):  # a length field or string past the end
            return self._strings_checked(key, count)
        if not count or p > self.size:
            return self._strings_checked(key, count)
        region = np.frombuffer(mv, np.uint8, count=p - self.pos, offset=self.pos).copy()
        at = np.asarray(starts, np.int64) - self.pos
        keep = np.ones(len(region), bool)
        for k in range(7):  # 7 of each length field's 8 bytes go, the 8th becomes the separator
            keep[at + k] = False
        region[at + 7] = 0
        joined = region[keep]
        if np.count_nonzero(joined == 0) != count:  # a string holds a NUL
            return self._strings_checked(key, count)
        try:
            out = joined.tobytes().decode("utf-8").split("\0")[1:]
        except UnicodeDecodeError:
            return self._strings_checked(key, count)
        self.pos = p
        return out

    def _strings_checked(self, key, count):
        mv, size, unpack = self.mv, self.size, _U64.unpack_from
        out = [None] * count
        p = self.pos
        for i in range(count):
            if size - p < 8:
                fail(self.path, f"metadata '{key}'[{i}] at offset {p}: string length is past "
                                f"the end of the file ({size} bytes)")
            n = unpack(mv, p)[0]
            p += 8
            if n > size - p:
                fail(self.path, f"metadata '{key}'[{i}] at offset {p - 8}: string of {n} "
                                f"bytes, only {size - p} remain")
            try:
                out[i] = str(mv[p:p + n], "utf-8")
            except UnicodeDecodeError as e:
                out[i] = self._invalid(mv[p:p + n], f"metadata '{key}'[{i}] at offset {p}", e)
            p += n
        self.pos = p
        return out


def _map(path):
    from . import open_map  # the one place files are opened (regular files only)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        fail(path, "empty file (0 bytes), expected a GGUF header")
    return open_map(path)


def _parse(path, mm, problems=None):
    """Header, metadata and tensor infos; returns (version, metadata, infos), each info's offset
    already absolute in the file (data section start + the tensor's offset)."""
    c = _Cursor(path, memoryview(mm), problems)
    c.need(4, "magic")
    magic = bytes(c.mv[0:4])
    if magic != MAGIC:
        fail(path, f"not a GGUF file: expected magic {MAGIC!r} at offset 0, found {magic!r}")
    c.pos = 4
    version = c.scalar("<I", 4, "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian GGUF, which pyllama does not read)" if swapped in VERSIONS else ""
        fail(path, f"unsupported GGUF version {version}{hint}: pyllama reads versions 2 and 3")
    n_tensors = c.scalar("<Q", 8, "tensor count")
    n_kv = c.scalar("<Q", 8, "metadata count")
    left = c.size - c.pos
    if n_tensors * MIN_TENSOR_INFO_BYTES > left:
        fail(path, f"tensor count {n_tensors} at offset 8 is impossible: {left} bytes remain, "
                   f"each tensor info takes at least {MIN_TENSOR_INFO_BYTES}")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > left:
        fail(path, f"metadata count {n_kv} at offset 16 is impossible: {left} bytes remain, each "
                   f"key/value takes at least {MIN_KV_BYTES}")

    meta = {}
    for i in range(n_kv):
        at = c.pos
        key = c.string(f"metadata key #{i}")
        if key in meta:
            fail(path, f"duplicate metadata key '{key}' at offset {at}")
        meta[key] = c.value(c.scalar("<i", 4, f"metadata '{key}': value type"), key)

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1)):
        fail(path, f"general.alignment: expected a power of two, found {alignment!r}")

    infos, names = [], set()
    for i in range(n_tensors):
        at = c.pos
        name = c.string(f"tensor #{i} name")
        if len(name.encode()) > MAX_NAME_BYTES:
            fail(path, f"tensor #{i} at offset {at}: name of {len(name.encode())} bytes "
                       f"(at most {MAX_NAME_BYTES})")
        if name in names:
            fail(path, f"duplicate tensor name '{name}' at offset {at}")
        names.add(name)
        n_dims = c.scalar("<I", 4, f"tensor '{name}': n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            fail(path, f"tensor '{name}' at offset {c.pos - 4}: n_dims {n_dims} "
                       f"(expected 1 to {MAX_DIMS})")
        c.need(8 * n_dims, f"tensor '{name}': dims")
        ne = struct.unpack_from(f"<{n_dims}q", c.mv, c.pos)
        if min(ne) < 0:
            fail(path, f"tensor '{name}' at offset {c.pos}: negative dimension in {list(ne)}")
        c.pos += 8 * n_dims
        ttype = c.scalar("<i", 4, f"tensor '{name}': type")
        offset = c.scalar("<Q", 8, f"tensor '{name}': data offset")
        infos.append((name, ttype, ne, offset, at))

    data_start = -(-c.pos // alignment) * alignment
    out, spans = [], []
    for name, ttype, ne, offset, at in infos:
        tname, block, bsize = GGUF_TYPES.get(ttype, (None, None, None))
        if bsize is None:
            what = (f"type {tname} ({ttype}), removed from ggml" if tname
                    else f"unknown type {ttype}")
            fail(path, f"tensor '{name}' (info at offset {at}) has {what}, "
                       f"which pyllama does not support")
        if ne[0] % block:
            fail(path, f"tensor '{name}': row length ne[0] = {ne[0]} is not a multiple of the "
                       f"{tname} block size {block}")
        nelem = 1
        for d in ne:
            nelem *= d
        nbytes = nelem // block * bsize
        if offset % alignment:
            fail(path, f"tensor '{name}': data offset {offset} is not a multiple of the alignment "
                       f"{alignment}")
        start = data_start + offset
        if start + nbytes > c.size:
            fail(path, f"tensor '{name}': data [{start}, {start + nbytes}) ({list(ne)} {tname}) "
                       f"is outside the file ({c.size} bytes)")
        out.append(TensorInfo(name, ttype, tuple(ne), start, nbytes))
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            fail(path, f"tensors '{n0}' [{s0}, {e0}) and '{n1}' [{s1}, {e1}) overlap")
    return version, meta, out


def read_metadata(path, mm=None, problems=None):
    """(version, metadata dict, list of TensorInfo) — the structural checks, no llama semantics.
    With a list as `problems`, strings that are not UTF-8 are read with backslash escapes and
    described in it instead of failing (what `pyllama info` shows of any file)."""
    path = os.fspath(path)
    return _parse(path, _map(path) if mm is None else mm, problems)


def _number(path, key, v, kind):
    if (isinstance(v, bool) or not isinstance(v, (int, float))
            or (kind is int and isinstance(v, float))):
        found = type(v).__name__ if not isinstance(v, np.ndarray) else "array"
        fail(path, f"metadata '{key}': expected {'an integer' if kind is int else 'a number'}, "
                   f"found {found} {v!r:.60}")
    return kind(v)


def _config(path, meta, infos, arch):
    has_weights = bool(infos)
    cfg = {}
    for field, (_, kind, _) in CONFIG_KEYS.items():
        key, default = arch.key(field), arch.default(field)
        if key in meta:
            cfg[field] = _number(path, key, meta[key], kind)
        elif default is REQUIRED:
            if has_weights:
                fail(path, f"missing metadata key '{key}' ({field})")
        elif isinstance(default, str):
            if default in cfg:
                cfg[field] = cfg[default]
        elif default is not None:
            cfg[field] = default
    # vocab_size: every source present must agree.
    sources = []
    if "vocab_size" in cfg:
        sources.append((arch.key("vocab_size"), cfg["vocab_size"]))
    embd = next((t for t in infos if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.ne) >= 2:
        sources.append(("rows of token_embd.weight", embd.ne[1]))
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        sources.append(("entries of tokenizer.ggml.tokens", len(tokens)))
    if len({v for _, v in sources}) > 1:
        fail(path, "vocab size mismatch: " + ", ".join(f"{k} = {v}" for k, v in sources))
    if sources:
        cfg["vocab_size"] = sources[0][1]
    elif has_weights:
        fail(path, f"no vocab size: none of {arch.key('vocab_size')}, token_embd.weight, "
                   f"tokenizer.ggml.tokens is present")
    cfg = {k: cfg[k] for k in CONFIG_KEYS if k in cfg}
    if has_weights:
        check_config(path, cfg)
        for suffix in archs.HEAD_DIM_ALIASES:
            key = arch.key(suffix)
            if key in meta and _number(path, key, meta[key], int) != cfg["head_dim"]:
                what = ("partial RoPE is not supported" if suffix.startswith("rope")
                        else "value heads of another size than key heads are not supported")
                fail(path, f"{key} = {meta[key]}, expected the head size {cfg['head_dim']} "
                           f"({what})")
    return cfg


def _check_arch(path, meta):
    """The Arch table of the file, after refusing what its forward pass does not compute."""
    name = meta.get("general.architecture")
    if name is None:
        fail(path, "missing metadata key 'general.architecture'")
    arch = archs.get(name, path)
    experts = meta.get(arch.key("expert_count"), 0)
    if _number(path, arch.key("expert_count"), experts, int) > 0:
        fail(path, f"{arch.key('expert_count')} = {experts}: mixture-of-experts models are not "
                   f"supported")
    tkey = arch.key("rope.scaling.type")
    stype = meta.get(tkey, "linear")
    if not isinstance(stype, str):
        fail(path, f"metadata '{tkey}': expected a string, found {stype!r:.60}")
    factor = 0.0
    for key in (arch.key("rope.scaling.factor"), arch.key("rope.scale_linear")):
        if key in meta and factor == 0.0:
            factor = _number(path, key, meta[key], float)
    if tkey in meta and stype not in ("none", "linear"):
        fail(path, f"unsupported rope scaling '{stype}' ({tkey})")
    if stype != "none" and factor not in (0.0, 1.0):
        fail(path, f"unsupported rope scaling '{stype}' with factor {factor}")
    return arch


def _bind(path, mm, cfg, infos, arch):
    shapes = archs.tensor_shapes(arch, cfg)
    tensors = {}
    for t in infos:
        if t.name not in shapes:
            continue  # not a tensor this architecture uses (listed by read_metadata)
        shape = shapes[t.name][0]
        want = tuple(reversed(shape))
        if t.ne + (1,) * (MAX_DIMS - len(t.ne)) != want + (1,) * (MAX_DIMS - len(want)):
            fail(path, f"tensor '{t.name}' has ne {list(t.ne)} (numpy shape "
                       f"{tuple(reversed(t.ne))}), expected {list(want)} (numpy shape {shape}) "
                       f"from the config")
        view = mm[t.offset:t.offset + t.nbytes]
        if len(shape) == 1:  # norms, biases, rope_freqs: C reads them as float arrays
            if t.type != F32:
                fail(path, f"vector tensor '{t.name}' has type {type_name(t.type)} "
                           f"({t.type}), expected F32")
            data = view.view("<f4")
        else:
            if t.type not in SUPPORTED_TYPES:
                names = ", ".join(type_name(k) for k in sorted(SUPPORTED_TYPES))
                fail(path, f"tensor '{t.name}' has type {type_name(t.type)} ({t.type}), which "
                           f"pyllama does not support (supported: {names})")
            data = view.reshape(shape[0], t.nbytes // shape[0])
        tensors[t.name] = Tensor(name=t.name, type=t.type, shape=shape, data=data, offset=t.offset)
    missing = [n for n, (_, required) in shapes.items() if required and n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        fail(path, f"missing tensor '{missing[0]}'{more} (required by architecture "
                   f"'{arch.name}')")
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None and not (np.isfinite(freqs.data).all() and (freqs.data > 0).all()):
        fail(path, "tensor 'rope_freqs.weight': the RoPE frequency divisors must be positive "
                   "finite numbers")
    return tensors


def read_gguf(path, mm=None):
    """Read a GGUF model of a supported architecture: config, tensors (views into the map) and
    metadata (pyllama.tokenizers builds the tokenizer from it)."""
    path = os.fspath(path)
    if mm is None:
        mm = _map(path)
    version, meta, infos = _parse(path, mm)
    arch = _check_arch(path, meta)
    cfg = _config(path, meta, infos, arch)
    tensors = _bind(path, mm, cfg, infos, arch) if infos else {}
    return ModelFile(path=path, format="gguf", version=version, config=cfg, tensors=tensors,
                     mmap=mm if infos else None, metadata=meta,
                     file_size=int(mm.size), arch=arch.name)
