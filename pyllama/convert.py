"""Convert any model pyllama reads into a GGUF v3 file, optionally quantized.

    convert(src_path, dst_path, type="f32", tokenizer=None, pure=False) -> dict

Sources: every model `pyllama run` reads — llama2.c legacy / V1 / V2 (int8) .bin, and GGUF of any
type the C core computes with (dequantized by the core's pl_dequantize_row; a tensor already stored
in its target type is copied unchanged). `type` is one of OUTPUT_TYPES:

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

The quantizers are pyllama.quantize's: ggml's reference ones bit for bit for Q8_0 / Q4_0 / Q5_0,
a least-squares search of each block's scales for Q4_K / Q6_K.

The file is written to a new DST.<pid>.tmp tensor by tensor, a chunk of rows (CHUNK_VALUES values)
at a time, so memory stays bounded whatever the model's size (the source is read through its
mmap), and is renamed to DST at the end: an existing regular file DST is replaced; a DST that is a
directory, symbolic link, FIFO, device or socket is refused.
"""
import contextlib
import os
import stat
import struct
import time

import numpy as np

from . import arch as archs
from .errors import FormatError, ParameterError, PyllamaError
from .formats.common import (BF16, CORE_TYPES, F16, F32, GGML_TYPES, Q4_0, Q4_K,
                             Q5_0, Q6_K, Q8_0, Q8_G, type_name)
from .quantize import dequantize, quantize

__all__ = ["OUTPUT_TYPES", "convert", "add_arguments", "run", "quantize", "dequantize",
           "tensor_type"]

# --type -> (llama_ftype for general.file_type, base ggml type of the matrices)
OUTPUT_TYPES = {
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
    if key not in OUTPUT_TYPES:
        raise ParameterError(f"unknown output type {type!r}: expected one of "
                             f"{', '.join(OUTPUT_TYPES)}")
    return OUTPUT_TYPES[key]


# ====================================================================== reading the source
def _source_rows(tensor, r0, r1):
    """Rows [r0, r1) of a source tensor as float32 (rows, cols), dequantized by the C core."""
    cols = tensor.shape[-1]
    data = tensor.data if tensor.data.ndim == 2 else tensor.data.reshape(1, -1)
    if data.dtype == np.float32:
        return data[r0:r1]
    if tensor.type == Q8_G:
        per_row = cols // tensor.group_size
        return dequantize(data[r0:r1], Q8_G, cols, tensor.scales[r0 * per_row:r1 * per_row],
                          tensor.group_size)
    return dequantize(data[r0:r1], tensor.type, cols)


def _raw_rows(tensor, r0, r1):
    data = tensor.data if tensor.data.ndim == 2 else tensor.data.reshape(1, -1)
    return data[r0:r1].view(np.uint8)


def _canonical_order(model):
    """Every tensor name the model's architecture uses (biases, rope_freqs too), in file order."""
    return list(archs.tensor_shapes(archs.get(model.arch, model.path), model.config))


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


def _metadata(model, name, ftype, quantized):
    """general.* and the architecture's keys: the config's, then any other key of the source
    under the architecture's prefix (rope scaling, vocab_size ...), kept as they were."""
    arch = archs.get(model.arch, model.path)
    kv = [
        ("general.architecture", _STR, arch.name),
        ("general.name", _STR, name),
        ("general.alignment", _U32, ALIGNMENT),
        ("general.file_type", _U32, ftype),
    ]
    if quantized:
        kv.append(("general.quantization_version", _U32, QUANTIZATION_VERSION))
    kv += [(k, _U32 if kind is int else _F32, v) for k, kind, v in archs.metadata(arch, model.config)]
    done = {k for k, _, _ in kv}
    kv += [(k, _vtype_of(v, k), v) for k, v in model.metadata.items()
           if k.startswith(arch.prefix + ".") and k not in done]
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
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    if isinstance(type, str) and type.lower() == "v2":
        return _convert_v2(src_path, dst_path, t0)
    ftype, base = _check_type(type)
    type = type.lower()
    _check_output(dst_path)
    model = load(src_path)  # the vocabulary is copied as metadata
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
    for tname in _canonical_order(model):
        t = model.tensors.get(tname)
        if t is None:
            continue
        cols = t.shape[-1]
        gtype = tensor_type(tname, cols if len(t.shape) == 2 else 0, type, cfg["n_layers"],
                            tied, pure)
        rows = t.shape[0] if len(t.shape) == 2 else 1
        if t.type not in CORE_TYPES:   # readers refuse these already; never guess
            raise FormatError(f"{src_path}: tensor '{tname}' is {type_name(t.type)}, which "
                              f"pyllama cannot read")
        _, block, size = GGML_TYPES[gtype]
        nbytes = rows * (cols // block) * size
        plan.append((tname, t, gtype, rows, cols, offset, nbytes))
        offset += nbytes + (-nbytes % ALIGNMENT)

    header = _Header()
    for key, vtype, value in _metadata(model, name, ftype, base not in (F32, F16, BF16)) + tok_kv:
        header.add(key, vtype, value)
    for tname, t, gtype, rows, cols, off, _ in plan:
        header.add_tensor(tname, [cols] if len(t.shape) == 1 else [cols, rows], gtype, off)
    head = header.bytes()

    try:
        with _replacing(dst_path) as tmp, open(tmp, "wb") as f:
            f.write(head)
            for i, (tname, t, gtype, rows, cols, off, nbytes) in enumerate(plan):
                if progress is not None:
                    progress(i, len(plan), tname, type_name(gtype))
                assert f.tell() == len(head) + off
                _write_tensor(f, src_path, tname, t, gtype, rows, cols)
                assert f.tell() == len(head) + off + nbytes
                f.write(b"\0" * (-nbytes % ALIGNMENT))
    finally:
        model.close()

    return _summary(dst_path, type, t0)


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
                              f"{type_name(gtype)}")
        f.write(memoryview(np.ascontiguousarray(quantize(x, gtype))))


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_output(dst_path):
    """The output path must be a regular file or nothing: convert replaces it by renaming a new
    file over it, which must not silently swap out a link, a FIFO, a device or a directory."""
    try:
        mode = os.lstat(dst_path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ParameterError(f"{dst_path}: cannot write: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _FILE_KINDS if test(mode)), "not a regular file")
        raise ParameterError(f"{dst_path}: is {kind}; convert writes a new regular file, give "
                             f"its path")


@contextlib.contextmanager
def _replacing(dst_path):
    """A new file beside dst_path (created exclusively: never through a link planted there) that
    replaces dst_path when the block succeeds and is removed when it fails."""
    _check_output(dst_path)
    tmp = f"{dst_path}.{os.getpid()}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as e:
        raise ParameterError(f"{dst_path}: cannot write: {e.strerror or e}") from None
    try:
        yield tmp
        _check_output(dst_path)
        os.replace(tmp, dst_path)
    except OSError as e:
        _remove(tmp)
        raise ParameterError(f"{dst_path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


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
    _check_output(dst_path)
    model = load(src_path)
    if not model.has_weights:
        raise FormatError(f"{src_path}: has no tensors (a vocab-only GGUF); nothing to convert")
    try:
        with _replacing(dst_path) as tmp:
            gs = write_v2(model, tmp, _source_rows)
    finally:
        model.close()
    return _summary(dst_path, f"v2 (int8, group {gs})", t0)


def _summary(dst_path, type, t0):
    """What convert wrote, as the file reads back (so the summary cannot disagree with `info`)."""
    from .formats import GGUF_MAGIC, load, open_map
    if bytes(open_map(dst_path)[:4]) == GGUF_MAGIC:
        from .formats.gguf import read_metadata
        names = {t.name: type_name(t.type) for t in read_metadata(dst_path)[2]}
    else:
        written = load(dst_path)
        names = {name: t.type_name for name, t in written.tensors.items()}
        written.close()
    counts = {}
    for v in names.values():
        counts[v] = counts.get(v, 0) + 1
    return {"path": dst_path, "type": type, "bytes": os.path.getsize(dst_path),
            "seconds": time.perf_counter() - t0, "tensors": names, "counts": counts}


def add_arguments(parser):
    """`pyllama convert IN OUT [--type T] [-z tokenizer.bin] [--pure]`."""
    parser.add_argument("input", help="model to convert: llama2.c .bin (legacy, V1, V2) or GGUF "
                                      "of any type `pyllama run` reads")
    parser.add_argument("output", help="GGUF file to write (a regular file there is replaced; "
                                       "a link, FIFO, device or directory is refused)")
    parser.add_argument("--type", dest="type", default="f32", metavar="TYPE",
                        help="output type: " + ", ".join(OUTPUT_TYPES) + " (default f32); "
                             "q4_k_m is llama.cpp's Q4_K_M mix; v2 writes a llama2.c V2 int8 "
                             ".bin (runq.c's format) instead of GGUF")
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
