"""llama2.c checkpoints: legacy (version 0), V1 and V2 (int8), as laid out in shared/FORMATS.md.

Every size is computed from the header in Python integers and checked against the file before
any view is taken; the tensors are views into one read-only np.memmap of the file.
"""
import struct

import numpy as np

from .common import (F32, Q8_G, ModelFile, Tensor, check_config, fail)

MAGIC_V1V2 = 0x616B3432            # "ak42", bytes on disk b"24ka"
LEGACY_HEADER = struct.Struct("<7i")
V1_HEADER_BYTES = 256
HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
RMS_EPS, ROPE_THETA = 1e-5, 10000.0  # fixed for llama2.c files

# Per-layer matrices in llama2.c order: (canonical name, rows, cols) as functions of the config.
MATRICES = (
    ("attn_q", lambda c: (c["dim"], c["dim"])),
    ("attn_k", lambda c: (c["kv_dim"], c["dim"])),
    ("attn_v", lambda c: (c["kv_dim"], c["dim"])),
    ("attn_output", lambda c: (c["dim"], c["dim"])),
    ("ffn_gate", lambda c: (c["hidden_dim"], c["dim"])),
    ("ffn_down", lambda c: (c["dim"], c["hidden_dim"])),
    ("ffn_up", lambda c: (c["hidden_dim"], c["dim"])),
)


def _config(path, values):
    cfg = dict(zip(HEADER_FIELDS, values))
    cfg.update(rms_eps=RMS_EPS, rope_theta=ROPE_THETA)
    check_config(path, cfg)
    cfg["kv_dim"] = cfg["dim"] // cfg["n_heads"] * cfg["n_kv_heads"]
    return cfg


class _Cursor:
    """Hands out consecutive views of the map, checking each against the file's end."""

    def __init__(self, path, mm, offset):
        self.path, self.mm, self.offset = path, mm, offset

    def take(self, nbytes, dtype, shape, what):
        end = self.offset + nbytes
        if end > len(self.mm):
            fail(self.path, f"truncated: {what} needs bytes {self.offset}..{end}, "
                            f"the file has {len(self.mm)}")
        view = self.mm[self.offset:end].view(dtype).reshape(shape)
        off, self.offset = self.offset, end
        return view, off

    def f32(self, name, shape):
        n = int(np.prod(shape))
        view, off = self.take(4 * n, np.float32, shape, name)
        return Tensor(name, F32, tuple(shape), view, offset=off)

    def skip(self, nbytes):
        self.offset += nbytes


def _expect_size(path, mm, expected, what):
    if len(mm) != expected:
        kind = "truncated" if len(mm) < expected else "longer than its header implies"
        fail(path, f"{what} file is {kind}: the header implies {expected} bytes, "
                   f"the file has {len(mm)}")


def _float_size(cfg, shared, rope_tables):
    """Bytes of an all-float32 checkpoint body (legacy or V1)."""
    c, L = cfg, cfg["n_layers"]
    n = c["vocab_size"] * c["dim"] + 2 * L * c["dim"] + c["dim"]
    n += L * sum(r * k for r, k in (f(c) for _, f in MATRICES))
    if rope_tables:
        n += c["seq_len"] * (c["dim"] // c["n_heads"])
    if not shared:
        n += c["vocab_size"] * c["dim"]
    return 4 * n


def _float_matrices(cur, cfg, tensors, specs=MATRICES):
    for name, shape_of in specs:
        rows, cols = shape_of(cfg)
        stacked = cur.f32(name, (cfg["n_layers"], rows, cols))
        for l in range(cfg["n_layers"]):
            tensors[f"blk.{l}.{name}.weight"] = Tensor(
                f"blk.{l}.{name}.weight", F32, (rows, cols), stacked.data[l],
                offset=stacked.offset + l * rows * cols * 4)


def _norms(cur, cfg, tensors, names):
    for name in names:
        if name == "output_norm":
            tensors["output_norm.weight"] = cur.f32("output_norm.weight", (cfg["dim"],))
            continue
        stacked = cur.f32(name, (cfg["n_layers"], cfg["dim"]))
        for l in range(cfg["n_layers"]):
            tensors[f"blk.{l}.{name}.weight"] = Tensor(
                f"blk.{l}.{name}.weight", F32, (cfg["dim"],), stacked.data[l],
                offset=stacked.offset + l * cfg["dim"] * 4)


def read_legacy(path, mm):
    if len(mm) < LEGACY_HEADER.size:
        fail(path, f"unsupported format: {len(mm)} bytes is too short for any model file")
    values = list(LEGACY_HEADER.unpack_from(mm, 0))
    shared = values[5] > 0
    values[5] = abs(values[5])
    try:
        cfg = _config(path, values)
    except Exception as e:
        head = bytes(mm[:8]).hex(" ")
        fail(path, f"unsupported format: the file starts with bytes {head}, which is neither GGUF "
                   f"(b'GGUF') nor llama2.c V1/V2 (b'24ka'); read as a legacy llama2.c header "
                   f"it is invalid: {str(e).split(': ', 1)[-1]}")
    _expect_size(path, mm, LEGACY_HEADER.size + _float_size(cfg, shared, True), "legacy llama2.c")
    cur, t = _Cursor(path, mm, LEGACY_HEADER.size), {}
    t["token_embd.weight"] = cur.f32("token_embd.weight", (cfg["vocab_size"], cfg["dim"]))
    _norms(cur, cfg, t, ["attn_norm"])
    # legacy order: wq wk wv wo, rms_ffn, w1 w2 w3, rms_final, rope tables, [wcls]
    _float_matrices(cur, cfg, t, MATRICES[:4])
    _norms(cur, cfg, t, ["ffn_norm"])
    _float_matrices(cur, cfg, t, MATRICES[4:])
    _norms(cur, cfg, t, ["output_norm"])
    cur.skip(4 * cfg["seq_len"] * (cfg["dim"] // cfg["n_heads"]))
    if not shared:
        t["output.weight"] = cur.f32("output.weight", (cfg["vocab_size"], cfg["dim"]))
    return ModelFile(path, "llama2c-legacy", 0, _public(cfg), t, mm, file_size=len(mm))


def _public(cfg):
    return {k: v for k, v in cfg.items() if k != "kv_dim"}


def _v1v2_header(path, mm):
    if len(mm) < V1_HEADER_BYTES:
        fail(path, f"truncated: a llama2.c V1/V2 header is {V1_HEADER_BYTES} bytes, "
                   f"the file has {len(mm)}")
    magic, version = struct.unpack_from("<Ii", mm, 0)
    values = list(struct.unpack_from("<7i", mm, 8))
    shared = mm[36]
    if shared not in (0, 1):
        fail(path, f"shared_classifier flag at offset 36: expected 0 or 1, found {shared}")
    return version, _config(path, values), bool(shared)


def read_v1(path, mm):
    version, cfg, shared = _v1v2_header(path, mm)
    _expect_size(path, mm, V1_HEADER_BYTES + _float_size(cfg, shared, False), "llama2.c V1")
    cur, t = _Cursor(path, mm, V1_HEADER_BYTES), {}
    _norms(cur, cfg, t, ["attn_norm", "ffn_norm", "output_norm"])
    t["token_embd.weight"] = cur.f32("token_embd.weight", (cfg["vocab_size"], cfg["dim"]))
    _float_matrices(cur, cfg, t)
    if not shared:
        t["output.weight"] = cur.f32("output.weight", (cfg["vocab_size"], cfg["dim"]))
    return ModelFile(path, "llama2c-v1", 1, _public(cfg), t, mm, file_size=len(mm))


def read_v2(path, mm):
    version, cfg, shared = _v1v2_header(path, mm)
    (gs,) = struct.unpack_from("<i", mm, 37)
    if gs <= 0 or gs > cfg["dim"]:
        fail(path, f"group_size at offset 37: expected 1..dim ({cfg['dim']}), found {gs}")
    # every matrix row must hold whole groups (runq.c's matmul assumes it)
    for what, cols in (("dim", cfg["dim"]), ("hidden_dim", cfg["hidden_dim"])):
        if cols % gs:
            fail(path, f"{what} {cols} is not a multiple of group_size {gs}")
    mats = [("token_embd", None, (cfg["vocab_size"], cfg["dim"]))]
    mats += [(name, l, f(cfg)) for name, f in MATRICES for l in range(cfg["n_layers"])]
    if not shared:
        mats.append(("output", None, (cfg["vocab_size"], cfg["dim"])))
    L, dim = cfg["n_layers"], cfg["dim"]
    expected = V1_HEADER_BYTES + 4 * (2 * L * dim + dim)
    expected += sum(r * c + 4 * (r * c // gs) for _, _, (r, c) in mats)
    _expect_size(path, mm, expected, "llama2.c V2")
    cur, t = _Cursor(path, mm, V1_HEADER_BYTES), {}
    _norms(cur, cfg, t, ["attn_norm", "ffn_norm", "output_norm"])
    for name, layer, (rows, cols) in mats:
        full = f"{name}.weight" if layer is None else f"blk.{layer}.{name}.weight"
        q, off = cur.take(rows * cols, np.int8, (rows, cols), full)
        s, _ = cur.take(4 * (rows * cols // gs), np.float32, (rows * cols // gs,), full + " scales")
        t[full] = Tensor(full, Q8_G, (rows, cols), q, scales=s, group_size=gs, offset=off)
    cfg["group_size"] = gs
    return ModelFile(path, "llama2c-v2", 2, _public(cfg), t, mm, file_size=len(mm))


def read_llama2c(path, mm):
    """Dispatch on the first bytes: V1/V2 magic, else the legacy header."""
    if len(mm) >= 8 and struct.unpack_from("<I", mm, 0)[0] == MAGIC_V1V2:
        (version,) = struct.unpack_from("<i", mm, 4)
        if version == 1:
            return read_v1(path, mm)
        if version == 2:
            return read_v2(path, mm)
        fail(path, f"unsupported format: llama2.c checkpoint version {version} "
                   f"(pyllama reads legacy, 1 and 2)")
    return read_legacy(path, mm)
