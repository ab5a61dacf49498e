#!/usr/bin/env python3
"""Seeded mutation fuzzer for pyllama's file readers (llama2.c .bin, GGUF, tokenizer.bin).

    python tests/fuzz/fuzz_models.py --count 2000 --seed 1 --out build/fuzz
    python tests/fuzz/fuzz_models.py --seed 1 --case 1234        # replay one case, in-process
    python tests/fuzz/fuzz_models.py --replay FILE [--tokenizer]  # replay a saved file

Seeds are small VALID files written here (shared/FORMATS.md): legacy .bin (shared and unshared
classifier), V1, V2 (int8, group 16), GGUF v3/v2 in F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K and a
mix (with `tokenizer.ggml.*` metadata, model "llama"), a vocab-only GGUF, the architectures of
issue 10 (a Llama 3 file with rope_freqs and head_dim != dim/heads, Qwen2 files with q/k/v biases
and NeoX rope, Q8_0 and Q4_K) and a tokenizer.bin.
Case i of seed S is fully determined by (S, i): it picks a seed file and applies 1-4 mutations
(bit flips, byte sets, truncation, appended junk, known header/length/count fields and random
aligned words set to 0, -1, 0xFFFFFFFF, 2^63, huge or small values, chunk swaps, duplications,
deletions, insertions, splices from another seed). Structure-aware cases rebuild a GGUF with one
key/value or tensor info set, retyped, dropped, duplicated, resized or reordered (counts kept
consistent), or write a VALID .bin of a random odd shape (hidden_dim 1, vocab 1, group_size 1).

Each mutated model is opened with `pyllama.Llama(path, tokenizer=..., threads=1)` (odd cases with
mmap=False: the file in a malloc'd buffer, so ASan sees reads past its end); when it loads,
5 tokens of `logits` (one batch) and 2 tokens of `generate(temperature=0.8)` run. A mutated
tokenizer.bin goes through `Tokenizer.from_llama2c(path, vocab)`, encode/decode, and generation with a valid model.
Accepted outcomes: success, a pyllama.PyllamaError, or a MemoryError whose message names bytes
(pyllama's documented refusal of an absurd KV cache). Failures:
  unexpected  any other exception (file + traceback saved under --out)
  hang        a case running longer than 10 s (SIGALRM; or killed by the supervisor at 30 s
              when the alarm cannot break it, e.g. a loop in C)
  crash       the worker process dying (signal, ASan/UBSan abort, os._exit)
The cases run in-process in a worker child; this script supervises it, saves the file a crash
happened on, and restarts the worker after it. Exit status 0 iff there was no failure. The last
line is the summary:
  fuzz: 2000 inputs, 0 crashes, 0 hangs, 0 unexpected exceptions (1234 rejected with FormatError, ...)
"""
import argparse
import faulthandler
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

HANG_SECONDS = 10          # per case, raised in the worker by SIGALRM
GRACE_SECONDS = 20         # supervisor: no word from the worker for hang + grace s -> kill
MAX_CRASHES = 200          # the supervisor gives up after this many worker deaths
MAX_SAVED_PER_ERROR = 20   # failing inputs kept per distinct error message
VOCAB = 300
TOKENIZER_SHARE = 0.12     # fraction of cases that mutate tokenizer.bin

# ---------------------------------------------------------------------------------------------
# Seed files
# ---------------------------------------------------------------------------------------------
# A seed: name, kind ("model" or "tokenizer"), bytes, known integer fields
# [(offset, width, signed, label)], and header_end (where the bulk weight data starts; most
# mutations land before it).


class Seed:
    def __init__(self, name, kind, data, fields, header_end, layout=None, hot=None):
        self.name, self.kind, self.data = name, kind, bytes(data)
        self.fields, self.header_end = fields, min(header_end, len(data))
        self.primary = [f for f in fields if "[" not in f[3]] or fields  # not array elements
        self.ext = ".gguf" if self.data[:4] == b"GGUF" else ".bin"
        self.layout = layout  # GGUFLayout of a GGUF seed
        # byte ranges most point mutations go to: weighted by length
        self.hot = hot or [(0, self.header_end)]
        self.hot_weights = [max(1, b - a) for a, b in self.hot]


WORDS = ["Once", "upon", "a", "time", "there", "was", "little", "girl", "hi", "the", "cat",
         "sat", "on", "mat", "and", "she", "said"]


def vocab_pieces():
    """<unk>, BOS, EOS, 256 byte tokens, then characters, merges and words up to VOCAB pieces."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    extra = []
    for w in WORDS:
        for piece in [c for c in w] + [w[:2], w, " " + w]:
            if piece.encode() not in extra:
                extra.append(piece.encode())
    extra = [b" "] + extra
    pieces += extra[:VOCAB - len(pieces)]
    i = 0
    while len(pieces) < VOCAB:
        pieces.append(b"x%d" % i)
        i += 1
    return pieces


def scores_of(pieces):
    return [0.0 if i < 259 else -float(i - 259) for i in range(len(pieces))]


def tokenizer_seed():
    pieces = vocab_pieces()
    out = [struct.pack("<I", max(len(p) for p in pieces))]
    fields = [(0, 4, False, "max_token_length")]
    off = 4
    for i, (p, s) in enumerate(zip(pieces, scores_of(pieces))):
        out.append(struct.pack("<fI", s, len(p)) + p)
        fields.append((off + 4, 4, False, f"token {i} length"))
        if i % 25 == 0:
            fields.append((off, 4, False, f"token {i} score"))
        off += 8 + len(p)
    data = b"".join(out)
    return Seed("tokenizer.bin", "tokenizer", data, fields, len(data))


BIN_CFG = dict(dim=16, hidden=32, layers=2, heads=2, kv_heads=1, vocab=VOCAB, seq=16)


def _floats(rng, n, scale=0.3):
    return (rng.standard_normal(n) * scale).astype("<f4")


def legacy_seed(shared, rng, c=BIN_CFG):
    d, h, L, v = c["dim"], c["hidden"], c["layers"], c["vocab"]
    hs = d // c["heads"]
    kv = hs * c["kv_heads"]
    parts = [_floats(rng, v * d), np.ones(L * d, "<f4"),
             _floats(rng, L * d * d), _floats(rng, L * kv * d), _floats(rng, L * kv * d),
             _floats(rng, L * d * d), np.ones(L * d, "<f4"),
             _floats(rng, L * h * d), _floats(rng, L * d * h), _floats(rng, L * h * d),
             np.ones(d, "<f4"), _floats(rng, c["seq"] * hs)]  # + two half RoPE tables
    if not shared:
        parts.append(_floats(rng, v * d))
    hdr = struct.pack("<7i", d, h, L, c["heads"], c["kv_heads"], v if shared else -v, c["seq"])
    fields = [(4 * k, 4, True, name) for k, name in enumerate(
        ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"))]
    name = "legacy-shared.bin" if shared else "legacy-unshared.bin"
    return Seed(name, "model", hdr + b"".join(p.tobytes() for p in parts), fields, 28 + 64)


def _v1v2_header(version, shared, group=None, c=BIN_CFG):
    hdr = struct.pack("<Ii7iB", 0x616B3432, version, c["dim"], c["hidden"], c["layers"],
                      c["heads"], c["kv_heads"], c["vocab"], c["seq"], int(shared))
    if group is not None:
        hdr += struct.pack("<i", group)
    fields = [(0, 4, False, "magic"), (4, 4, True, "version")]
    fields += [(8 + 4 * k, 4, True, name) for k, name in enumerate(
        ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"))]
    fields.append((36, 1, False, "shared_classifier"))
    if group is not None:
        fields.append((37, 4, True, "group_size"))
    return hdr + b"\0" * (256 - len(hdr)), fields


def _bin_matrices(c=BIN_CFG):
    d, h, v = c["dim"], c["hidden"], c["vocab"]
    kv = d // c["heads"] * c["kv_heads"]
    return [(d, d), (kv, d), (kv, d), (d, d), (h, d), (d, h), (h, d)], v


def v1_seed(shared, rng, c=BIN_CFG):
    d, L = c["dim"], c["layers"]
    mats, v = _bin_matrices(c)
    hdr, fields = _v1v2_header(1, shared, c=c)
    parts = [np.ones(2 * L * d + d, "<f4"), _floats(rng, v * d)]
    parts += [_floats(rng, L * r * k) for r, k in mats]
    if not shared:
        parts.append(_floats(rng, v * d))
    return Seed("v1-shared.bin" if shared else "v1-unshared.bin", "model",
                hdr + b"".join(p.tobytes() for p in parts), fields, 256 + 64)


def _q8_group(w, gs):
    g = w.reshape(-1, gs)
    scale = np.abs(g).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q.tobytes() + scale.astype("<f4").tobytes()


def v2_seed(shared, rng, gs=16, c=BIN_CFG):
    d, L = c["dim"], c["layers"]
    mats, v = _bin_matrices(c)
    hdr, fields = _v1v2_header(2, shared, gs, c=c)
    out = [hdr, np.ones(2 * L * d + d, "<f4").tobytes(), _q8_group(_floats(rng, v * d), gs)]
    for r, k in mats:
        out += [_q8_group(_floats(rng, r * k), gs) for _ in range(L)]
    if not shared:
        out.append(_q8_group(_floats(rng, v * d), gs))
    return Seed("v2-shared.bin" if shared else "v2-unshared.bin", "model", b"".join(out),
                fields, 256 + 64)


# -- GGUF ------------------------------------------------------------------------------------

def _f16(x):
    return np.array([x], "<f2").tobytes()


def _kquant_blocks(rng, rows, cols, qtype):
    """Random K-quant blocks with small finite f16 scales (gguf-py cannot quantize them)."""
    from gguf import GGMLQuantizationType as GT
    n = rows * cols // 256
    size = 144 if qtype == GT.Q4_K else 210
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if qtype == GT.Q4_K:  # d, dmin at 0 and 2
        raw[:, 0:2] = np.frombuffer(_f16(0.01), np.uint8)
        raw[:, 2:4] = np.frombuffer(_f16(0.005), np.uint8)
    else:                 # int8 scales at 192..207, d at 208
        raw[:, 192:208] = rng.integers(-8, 8, (n, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = np.frombuffer(_f16(0.01), np.uint8)
    return raw.reshape(rows, cols // 256 * size)


def _add_bpe_vocab(w, v):
    """A byte-level BPE (gpt2, llama-bpe) vocabulary of v tokens: the 256 byte tokens, merged
    letter pairs, then BOS and EOT control tokens."""
    from pyllama.tokenizers.bpe import BYTE_TO_CHAR
    letters = "etaoinshrdlucmfw"
    pairs = [a + b for a in letters for b in letters][:v - 258]
    w.add_tokenizer_model("gpt2")
    w.add_string("tokenizer.ggml.pre", "llama-bpe")
    w.add_token_list(list(BYTE_TO_CHAR) + pairs + ["<|begin_of_text|>", "<|eot_id|>"])
    w.add_token_types([1] * (v - 2) + [3, 3])
    w.add_token_merges([f"{p[0]} {p[1]}" for p in pairs])
    w.add_bos_token_id(v - 2)
    w.add_eos_token_id(v - 1)
    w.add_add_bos_token(True)


def write_gguf(path, rng, cfg, wtype, tied=False, per_tensor=None, tokens=True, tensors=True,
               alignment=None, arch="llama", head_dim=None, rope_freqs=False, biases=False):
    """head_dim: written as attention.key_length/value_length (q: heads*head_dim rows);
    rope_freqs: a rope_freqs.weight (Llama 3.1); biases: q/k/v biases (Qwen2)."""
    import gguf
    from gguf import GGMLQuantizationType as GT
    d, h, L, v = cfg["dim"], cfg["hidden"], cfg["layers"], cfg["vocab"]
    hd = head_dim or d // cfg["heads"]
    kv, qd = hd * cfg["kv_heads"], hd * cfg["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["seq"])
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(h)
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(int(wtype))
    if alignment:
        w.add_custom_alignment(alignment)
    if tokens == "bpe":
        _add_bpe_vocab(w, v)
    elif tokens:
        pieces = vocab_pieces()[:v]
        text = []
        types = []
        for i, p in enumerate(pieces):
            if i == 1:
                p, t = b"<s>", 3
            elif i == 2:
                p, t = b"</s>", 3
            elif i == 0:
                t = 2
            elif 3 <= i < 259:
                t = 6
            else:
                t = 1
            text.append(p.decode().replace(" ", "\u2581"))
            types.append(t)
        w.add_tokenizer_model("llama")
        w.add_token_list(text)
        w.add_token_scores(scores_of(pieces))
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)
    if tensors:
        specs = [("token_embd.weight", (v, d)), ("output_norm.weight", (d,))]
        if not tied:
            specs.append(("output.weight", (v, d)))
        if rope_freqs:
            specs.append(("rope_freqs.weight", (hd // 2,)))
        for i in range(L):
            specs += [(f"blk.{i}.attn_norm.weight", (d,)), (f"blk.{i}.attn_q.weight", (qd, d)),
                      (f"blk.{i}.attn_k.weight", (kv, d)), (f"blk.{i}.attn_v.weight", (kv, d)),
                      (f"blk.{i}.attn_output.weight", (d, qd)), (f"blk.{i}.ffn_norm.weight", (d,)),
                      (f"blk.{i}.ffn_gate.weight", (h, d)), (f"blk.{i}.ffn_down.weight", (d, h)),
                      (f"blk.{i}.ffn_up.weight", (h, d))]
            if biases:
                specs += [(f"blk.{i}.attn_q.bias", (qd,)), (f"blk.{i}.attn_k.bias", (kv,)),
                          (f"blk.{i}.attn_v.bias", (kv,))]
        for name, shape in specs:
            if len(shape) == 1:  # norms 1; biases, rope_freqs (new seeds only) random
                w.add_tensor(name, np.ones(shape, np.float32) if name.endswith("norm.weight")
                             else (1 + rng.random(shape)).astype(np.float32))
                continue
            t = (per_tensor or {}).get(name.split(".")[-2], wtype)
            x = (rng.standard_normal(shape) * 0.3).astype(np.float32)
            if t == GT.F32:
                w.add_tensor(name, x)
            elif t == GT.F16:
                w.add_tensor(name, x.astype(np.float16))
            elif t in (GT.Q4_K, GT.Q6_K):
                w.add_tensor(name, _kquant_blocks(rng, *shape, t), raw_dtype=t)
            else:  # BF16, Q8_0, Q4_0: gguf-py quantizes them
                w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class GGUFLayout:
    """Where things are in a valid GGUF seed (for the structure-aware mutations)."""

    def __init__(self):
        self.kvs = []      # (key, start, end, vtype, value): value decoded for scalars/strings,
        #                    for arrays (etype, [(elem start, elem end)])
        self.tensors = []  # (name, start, end)
        self.info_end = 0
        self.data_start = 0
        self.alignment = 32


GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
            11: "<q", 12: "<d"}


def gguf_fields(data):
    """Walk a valid GGUF: the offsets of its counts, lengths, types, dims, offsets and scalar
    values ([(offset, width, signed, label)]), and its GGUFLayout."""
    fields = [(4, 4, False, "version"), (8, 8, False, "tensor count"), (16, 8, False, "kv count")]
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    lay = GGUFLayout()
    p = 24
    signed = {1, 3, 5, 11}

    def string(label, record=True):
        nonlocal p
        n = struct.unpack_from("<Q", data, p)[0]
        if record:
            fields.append((p, 8, False, label + " length"))
        s = data[p + 8:p + 8 + n]
        p += 8 + n
        return s

    def value(vt, label):
        nonlocal p
        if vt == 8:
            return string(label).decode()
        if vt == 9:
            et, count = struct.unpack_from("<iQ", data, p)
            fields.extend([(p, 4, True, label + " element type"),
                           (p + 4, 8, False, label + " count")])
            p += 12
            elems = []
            for k in range(count):
                e0 = p
                if et == 8:
                    string(f"{label}[{k}]", record=k % 20 == 0)
                elif et == 9:
                    value(et, f"{label}[{k}]")
                else:
                    if k % 50 == 0:
                        fields.append((p, GGUF_SIZES[et], et in signed, f"{label}[{k}]"))
                    p += GGUF_SIZES[et]
                elems.append((e0, p))
            return et, elems
        fields.append((p, GGUF_SIZES[vt], vt in signed, label))
        v = struct.unpack_from(GGUF_FMT[vt], data, p)[0]
        p += GGUF_SIZES[vt]
        return v

    for _ in range(n_kv):
        k0 = p
        key = string("key").decode()
        fields.append((p, 4, True, f"'{key}' value type"))
        vt = struct.unpack_from("<i", data, p)[0]
        p += 4
        v = value(vt, f"'{key}'")
        lay.kvs.append((key, k0, p, vt, v))
        if key == "general.alignment":
            lay.alignment = v
    for _ in range(n_t):
        t0 = p
        name = string("tensor name").decode()
        nd = struct.unpack_from("<I", data, p)[0]
        fields.append((p, 4, False, f"{name} n_dims"))
        p += 4
        for k in range(nd):
            fields.append((p, 8, True, f"{name} ne[{k}]"))
            p += 8
        fields += [(p, 4, True, f"{name} type"), (p + 4, 8, False, f"{name} offset")]
        p += 12
        lay.tensors.append((name, t0, p))
    lay.info_end = p
    lay.data_start = -(-p // lay.alignment) * lay.alignment
    return fields, lay


def gguf_hot_ranges(lay):
    """The header, every key/value but the big tokenizer arrays, and the tensor infos."""
    ranges = [(0, 24)]
    for key, a, b, vt, v in lay.kvs:
        if vt == 9 and len(v[1]) > 16:
            ranges.append((a, min(b, a + 64)))  # the key, type, count and first elements
        else:
            ranges.append((a, b))
    if lay.tensors:
        ranges.append((lay.tensors[0][1], lay.info_end))
    return ranges


def gguf_seeds(rng, tmp):
    from gguf import GGMLQuantizationType as GT
    small = dict(dim=32, hidden=64, layers=2, heads=4, kv_heads=2, vocab=VOCAB, seq=16)
    kq = dict(dim=256, hidden=256, layers=1, heads=4, kv_heads=2, vocab=VOCAB, seq=16)
    specs = [
        ("gguf-f32.gguf", small, GT.F32, dict(tied=True)),
        ("gguf-f16.gguf", small, GT.F16, {}),
        ("gguf-bf16.gguf", small, GT.BF16, dict(tied=True)),
        ("gguf-q8_0.gguf", small, GT.Q8_0, {}),
        ("gguf-q4_0.gguf", small, GT.Q4_0, dict(tied=True, alignment=64)),
        ("gguf-q4_k.gguf", kq, GT.Q4_K, dict(tied=True)),
        ("gguf-q6_k.gguf", kq, GT.Q6_K, {}),
        ("gguf-q4_k_m.gguf", kq, GT.Q4_K, dict(per_tensor={"ffn_down": GT.Q6_K, "attn_v": GT.Q6_K,
                                                           "output": GT.Q6_K})),
        ("gguf-vocab-only.gguf", small, GT.F32, dict(tensors=False)),
        ("gguf-bpe-f16.gguf", small, GT.F16, dict(tokens="bpe")),
        # issue 10's architectures: Llama 3 (rope_freqs, head_dim != dim/heads), Qwen2 (biases)
        ("gguf-llama3-f16.gguf", small, GT.F16, dict(tied=True, head_dim=16, rope_freqs=True)),
        ("gguf-qwen2-q8_0.gguf", small, GT.Q8_0, dict(arch="qwen2", biases=True)),
        ("gguf-qwen2-q4_k.gguf", kq, GT.Q4_K, dict(arch="qwen2", biases=True, head_dim=128)),
    ]
    out = []
    for name, cfg, wtype, kw in specs:
        path = Path(tmp) / name
        write_gguf(path, rng, cfg, wtype, **kw)
        data = path.read_bytes()
        fields, lay = gguf_fields(data)
        out.append(Seed(name, "model", data, fields, lay.data_start, layout=lay,
                        hot=gguf_hot_ranges(lay)))
    # GGUFWriter writes v3; v2 differs only in the version field for this layout
    v3 = out[0].data
    out.append(Seed("gguf-v2-f32.gguf", "model", v3[:4] + struct.pack("<I", 2) + v3[8:],
                    out[0].fields, out[0].header_end, layout=out[0].layout, hot=out[0].hot))
    return out


def make_seeds():
    rng = np.random.default_rng(20240601)
    seeds = [legacy_seed(True, rng), legacy_seed(False, rng), v1_seed(True, rng),
             v1_seed(False, rng), v2_seed(True, rng), v2_seed(False, rng)]
    with tempfile.TemporaryDirectory(prefix="pyllama-fuzz-seeds-") as tmp:
        seeds += gguf_seeds(rng, tmp)
    seeds.append(tokenizer_seed())
    return seeds


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------
SMALL = (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 63, 64, 255, 256, 257, 1000, 4096, 65535, 65536)
INTERESTING = {
    1: SMALL[:15] + (0x7F, 0x80, 0xFF),
    2: SMALL + (0x7FFF, 0x8000, 0xFFFF),
    4: SMALL + (0x7FFF, 0x8000, 0xFFFF, 1 << 20, 1 << 22, (1 << 22) + 1, 0x7FFFFFFF, 0x80000000,
                0xFFFFFFFF, 0xFFFFFFFE, 0x40000000, 0x10000000),
    8: SMALL + (0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 48,
                1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 2, 0x7FFFFFFFFFFFFFFF),
}


def _pick_offset(rng, n, seed, bias=0.8):
    """An offset in [0, n): mostly in one of the seed's hot ranges (headers, lengths, tensor
    infos), otherwise anywhere."""
    if n <= 0:
        return 0
    if rng.random() < bias:
        a, b = rng.choices(seed.hot, seed.hot_weights)[0]
        if a < n:
            return rng.randrange(a, min(max(b, a + 1), n))
    return rng.randrange(n)


def _new_value(rng, old, width):
    mask = (1 << (8 * width)) - 1
    r = rng.random()
    if r < 0.55:
        v = rng.choice(INTERESTING[width])
    elif r < 0.75:
        v = old + rng.choice((-2, -1, 1, 2, 8, -8, 256, -256))
    elif r < 0.85:
        v = rng.choice((old * 2, old // 2, old * 16, old << 16, -old, old ^ (1 << 31)))
    else:
        v = rng.getrandbits(8 * width)
    return v & mask


def _set_int(buf, off, width, value):
    if off + width <= len(buf):
        buf[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _get_int(buf, off, width):
    return int.from_bytes(buf[off:off + width], "little") if off + width <= len(buf) else 0


def m_bitflip(rng, buf, seed, seeds):
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        off = _pick_offset(rng, len(buf), seed)
        if buf:
            buf[off] ^= 1 << rng.randrange(8)
    return "bitflip"


def m_byteset(rng, buf, seed, seeds):
    for _ in range(rng.randint(1, 4)):
        off = _pick_offset(rng, len(buf), seed)
        if buf:
            buf[off] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
    return "byteset"


def m_truncate(rng, buf, seed, seeds):
    n = len(buf)
    r = rng.random()
    if r < 0.4:
        cut = rng.randrange(min(seed.header_end, n) + 1)
    elif r < 0.6:
        cut = max(0, n - rng.randint(1, 64))
    else:
        cut = rng.randrange(n + 1)
    del buf[cut:]
    return f"truncate@{cut}"


def m_append(rng, buf, seed, seeds):
    k = rng.choice((1, 3, 4, 32, 255, 4096))
    junk = bytes(k) if rng.random() < 0.3 else rng.randbytes(k)
    buf.extend(junk)
    return f"append{k}"


def m_field(rng, buf, seed, seeds):
    if not seed.fields:
        return m_aligned(rng, buf, seed, seeds)
    off, width, _, label = rng.choice(seed.primary if rng.random() < 0.8 else seed.fields)
    value = _new_value(rng, _get_int(buf, off, width), width)
    _set_int(buf, off, width, value)
    return f"field[{label}]={value:#x}"


def m_aligned(rng, buf, seed, seeds):
    width = rng.choice((4, 8))
    limit = seed.header_end if rng.random() < 0.8 else len(buf)
    if limit < width:
        return "aligned-noop"
    off = rng.randrange(0, limit - width + 1) // 4 * 4
    value = _new_value(rng, _get_int(buf, off, width), width)
    _set_int(buf, off, width, value)
    return f"word@{off}={value:#x}"


def _chunk(rng, buf, seed):
    n = rng.choice((1, 2, 4, 8, 12, 16, 24, 64, 256))
    off = _pick_offset(rng, max(0, len(buf) - n), seed)
    return off, min(n, len(buf) - off)


def m_swap(rng, buf, seed, seeds):
    a, n = _chunk(rng, buf, seed)
    b, m = _chunk(rng, buf, seed)
    n = min(n, m)
    if n <= 0 or a == b:
        return "swap-noop"
    if a > b:
        a, b = b, a
    if a + n > b:
        n = b - a
    x, y = bytes(buf[a:a + n]), bytes(buf[b:b + n])
    buf[a:a + n], buf[b:b + n] = y, x
    return f"swap{n}@{a},{b}"


def m_duplicate(rng, buf, seed, seeds):
    a, n = _chunk(rng, buf, seed)
    chunk = bytes(buf[a:a + n])
    b = _pick_offset(rng, len(buf), seed)
    if rng.random() < 0.5:
        buf[b:b] = chunk            # insert (shifts the rest)
        return f"dup-insert{n}@{a}->{b}"
    buf[b:b + n] = chunk            # overwrite
    return f"dup-over{n}@{a}->{b}"


def m_delete(rng, buf, seed, seeds):
    a, n = _chunk(rng, buf, seed)
    del buf[a:a + n]
    return f"delete{n}@{a}"


def m_insert(rng, buf, seed, seeds):
    a = _pick_offset(rng, len(buf), seed)
    k = rng.choice((1, 4, 8, 13))
    buf[a:a] = rng.randbytes(k)
    return f"insert{k}@{a}"


def m_splice(rng, buf, seed, seeds):
    other = rng.choice(seeds)
    n = rng.choice((4, 16, 64, 256))
    src = _pick_offset(rng, max(0, len(other.data) - n), other)
    dst = _pick_offset(rng, len(buf), seed)
    buf[dst:dst + n] = other.data[src:src + n]
    return f"splice[{other.name}]{n}@{src}->{dst}"



# -- structure-aware GGUF mutations: rebuild the header with one key/value or tensor info changed

def _gguf_scalar(vtype, value):
    fmt = GGUF_FMT[vtype]
    if fmt in ("<f", "<d"):
        try:
            return struct.pack(fmt, float(value))
        except (OverflowError, ValueError, TypeError):
            return struct.pack(fmt, float("inf"))
    try:
        v = int(value)
    except (OverflowError, ValueError, TypeError):
        v = 1
    width = GGUF_SIZES[vtype]
    return (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _gguf_value(vtype, value):
    if vtype == 8:
        b = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(b)) + b
    if vtype == 9:
        etype, items = value
        return struct.pack("<iQ", etype, len(items)) + b"".join(_gguf_value(etype, x)
                                                                for x in items)
    return _gguf_scalar(vtype, value)


def _gguf_kv(key, vtype, value):
    return _gguf_value(8, key) + struct.pack("<i", vtype) + _gguf_value(vtype, value)


NAN, INF = float("nan"), float("inf")
U32_VALUES = (0, 1, 2, 3, 4, 8, 15, 16, 17, 32, 64, 256, 299, 300, 301, 1 << 16, 1 << 22,
              (1 << 22) + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
FLOAT_VALUES = (0.0, -1.0, 1e-30, 1e-5, 1.0, 1e30, NAN, INF, -INF, 10000.0)
# key -> (usual type, candidate values)
INTERESTING_KVS = {
    "general.alignment": (4, (0, 1, 2, 3, 4, 8, 16, 24, 64, 4096, 1 << 31, 0xFFFFFFFF)),
    "general.architecture": (8, ("llama", "gpt2", "", "LLAMA", "llama\0")),
    "llama.context_length": (4, U32_VALUES),
    "llama.embedding_length": (4, U32_VALUES),
    "llama.block_count": (4, U32_VALUES),
    "llama.feed_forward_length": (4, U32_VALUES),
    "llama.attention.head_count": (4, U32_VALUES),
    "llama.attention.head_count_kv": (4, U32_VALUES),
    "llama.rope.dimension_count": (4, U32_VALUES),
    "llama.vocab_size": (4, U32_VALUES),
    "llama.expert_count": (4, (0, 1, 8)),
    "llama.attention.layer_norm_rms_epsilon": (6, FLOAT_VALUES),
    "llama.rope.freq_base": (6, FLOAT_VALUES),
    "llama.rope.scaling.type": (8, ("none", "linear", "yarn", "")),
    "llama.rope.scaling.factor": (6, FLOAT_VALUES),
    "llama.rope.scale_linear": (6, FLOAT_VALUES),
    "tokenizer.ggml.model": (8, ("llama", "gpt2", "", "bert", "no_vocab")),
    "tokenizer.ggml.bos_token_id": (4, (0, 1, 2, 258, 299, 300, 0xFFFFFFFF)),
    "tokenizer.ggml.eos_token_id": (4, (0, 1, 2, 258, 299, 300, 0xFFFFFFFF)),
    "tokenizer.ggml.unknown_token_id": (4, (0, 1, 2, 258, 299, 300, 0xFFFFFFFF)),
    "tokenizer.ggml.padding_token_id": (4, (0, 300, 0xFFFFFFFF)),
    "tokenizer.ggml.add_bos_token": (7, (0, 1)),
    "tokenizer.ggml.add_eos_token": (7, (0, 1)),
    "tokenizer.ggml.add_space_prefix": (7, (0, 1)),
    "tokenizer.ggml.merges": (9, ((8, ["a b", "\u2581 t"]), (8, []))),
    "tokenizer.chat_template": (8, ("{{ messages }}", "")),
    "general.file_type": (4, (0, 1, 2, 7, 15, 0xFFFFFFFF)),
}
GGML_TYPE_CHOICES = (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 4, 5, 16, 20, 23, 24, 26, 28,
                     30, 31, 39, 41, 42, 1000, -1)


def _retype(rng, vtype, value):
    """A (type, value) of another metadata type carrying (roughly) the same value."""
    new = rng.choice([t for t in range(13) if t != vtype])
    if vtype == 9:
        etype, elems = value if isinstance(value, tuple) else (4, [])
        value = len(elems) if isinstance(elems, list) else 0
    if new == 8:
        return new, rng.choice((str(value), "", "\udcff" if rng.random() < 0.1 else "7"))
    if new == 9:
        et = rng.choice((0, 4, 5, 6, 7, 8, 9, 10))
        item = (4, [1]) if et == 9 else ("x" if et == 8 else 1)
        return new, (et, [item] * rng.choice((0, 1, 2, 300)))
    if isinstance(value, str):
        value = len(value)
    if new == 7:
        return new, rng.choice((0, 1))
    return new, value


def _tensor_info(data, start):
    n = struct.unpack_from("<Q", data, start)[0]
    name = data[start + 8:start + 8 + n]
    p = start + 8 + n
    nd = struct.unpack_from("<I", data, p)[0]
    ne = list(struct.unpack_from(f"<{nd}q", data, p + 4))
    ttype, offset = struct.unpack_from("<iQ", data, p + 4 + 8 * nd)
    return name, ne, ttype, offset


def _encode_info(name, ne, ttype, offset):
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(ne))
            + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<iQ", ttype, offset & (2**64 - 1)))


def m_gguf(rng, seed):
    """Rebuild the seed's GGUF with one structural change; the counts (and the padding before the
    data section) are kept consistent so the change itself is what the reader sees."""
    lay, data = seed.layout, seed.data
    kvs = [(k, data[a:b], vt, v) for k, a, b, vt, v in lay.kvs]
    infos = [data[a:b] for _, a, b in lay.tensors]
    op = rng.choice(("set", "set", "set", "retype", "retype", "drop-kv", "dup-kv", "resize-array",
                     "resize-array", "reorder-kv", "tensor-type", "tensor-type", "tensor-shape",
                     "tensor-shape", "tensor-offset", "drop-tensor", "dup-tensor", "rename-tensor",
                     "reorder-tensors"))
    what = op
    if op == "set":
        key = rng.choice(list(INTERESTING_KVS))
        vtype, values = INTERESTING_KVS[key]
        value = rng.choice(values)
        if rng.random() < 0.2:
            vtype, value = _retype(rng, vtype, value)
        raw = _gguf_kv(key, vtype, value)
        at = next((i for i, kv in enumerate(kvs) if kv[0] == key), None)
        if at is None:
            kvs.append((key, raw, vtype, value))
        else:
            kvs[at] = (key, raw, vtype, value)
        what = f"set {key}:{vtype}={value!r:.40}"
    elif op == "retype":
        i = rng.randrange(len(kvs))
        key, _, vtype, value = kvs[i]
        nt, nv = _retype(rng, vtype, value)
        kvs[i] = (key, _gguf_kv(key, nt, nv), nt, nv)
        what = f"retype {key}:{vtype}->{nt}={nv!r:.40}"
    elif op == "drop-kv":
        i = rng.randrange(len(kvs))
        what = f"drop-kv {kvs[i][0]}"
        del kvs[i]
    elif op == "dup-kv":
        i = rng.randrange(len(kvs))
        kvs.insert(rng.randrange(len(kvs) + 1), kvs[i])
        what = f"dup-kv {kvs[i][0]}"
    elif op == "resize-array":
        arrays = [i for i, kv in enumerate(kvs) if kv[2] == 9]
        i = rng.choice(arrays)
        key, raw, _, (etype, elems) = kvs[i]
        k0 = lay.kvs[i][1] if lay.kvs[i][0] == key else None
        if k0 is not None and elems:
            body = [data[a:b] for a, b in elems]
            n = rng.choice((len(body) - 1, len(body) + 1, 0, 1, 3, 259))
            new = (body * (n // len(body) + 1))[:n] if n > len(body) else body[:n]
            head = _gguf_value(8, key) + struct.pack("<iiQ", 9, etype, len(new))
            kvs[i] = (key, head + b"".join(new), 9, (etype, []))
            what = f"resize-array {key} {len(body)}->{n}"
    elif op == "reorder-kv":
        rng.shuffle(kvs)
    elif infos:
        i = rng.randrange(len(infos))
        name, ne, ttype, offset = _tensor_info(infos[i], 0)
        if op == "tensor-type":
            ttype = rng.choice(GGML_TYPE_CHOICES)
            infos[i] = _encode_info(name, ne, ttype, offset)
        elif op == "tensor-shape":
            choice = rng.randrange(5)
            if choice == 0 and len(ne) > 1:
                ne = [ne[1], ne[0]] + ne[2:]
            elif choice == 1:
                ne = ne + [1] * rng.randint(1, 2)
            elif choice == 2:
                ne = ne + [rng.choice((0, 2, 1 << 32, 1 << 62))]
            elif choice == 3:
                ne = ne[:1]
            else:
                k = rng.randrange(len(ne))
                ne[k] = rng.choice((0, 1, ne[k] * 2, ne[k] // 2, ne[k] + 32, ne[k] + 256,
                                    -ne[k], 1 << 40, (1 << 63) - 1))
            infos[i] = _encode_info(name, ne[:5], ttype, offset)
        elif op == "tensor-offset":
            offset = rng.choice((0, offset + lay.alignment, offset - lay.alignment, offset + 1,
                                 2**63, 2**64 - lay.alignment, len(data)))
            infos[i] = _encode_info(name, ne, ttype, offset)
        elif op == "drop-tensor":
            del infos[i]
        elif op == "dup-tensor":
            infos.insert(rng.randrange(len(infos) + 1), infos[i])
        elif op == "rename-tensor":
            j = rng.randrange(len(infos))
            other = _tensor_info(infos[j], 0)[0]
            new = rng.choice((other, name + b"x", b"", b"\xff" + name, name.replace(b"0", b"9"),
                              b"blk.7." + name.split(b".", 2)[-1]))
            infos[i] = _encode_info(new, ne, ttype, offset)
        elif op == "reorder-tensors":
            rng.shuffle(infos)
        what = f"{op} {name.decode(errors='replace')}: ne={ne} type={ttype} offset={offset}"
    head = data[:8] + struct.pack("<QQ", len(infos), len(kvs))
    body = head + b"".join(kv[1] for kv in kvs) + b"".join(infos)
    body += bytes(-len(body) % lay.alignment)
    return bytearray(body + data[lay.data_start:]), what


MUTATIONS = [(m_bitflip, 14), (m_byteset, 10), (m_truncate, 8), (m_append, 4), (m_field, 30),
             (m_aligned, 12), (m_swap, 5), (m_duplicate, 5), (m_delete, 4), (m_insert, 4),
             (m_splice, 4)]
_MUT_FUNCS, _MUT_WEIGHTS = zip(*MUTATIONS)


def random_bin(rng):
    """A VALID llama2.c file of a random small and odd shape (hidden_dim 1, vocab 1, one head,
    seq_len 1, group_size 1 ...): reaches the C core with shapes the seeds do not have."""
    heads = rng.choice((1, 1, 2, 3, 4))
    kv = rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
    dim = heads * rng.choice((2, 2, 4, 6, 8, 16))
    c = dict(dim=dim, hidden=rng.choice((1, 2, 3, 5, 8, 16, 33, 64)), layers=rng.choice((1, 2, 3)),
             heads=heads, kv_heads=kv, vocab=rng.choice((1, 2, 3, 7, 259, 299, 300, 301)),
             seq=rng.choice((1, 2, 3, 4, 16)))
    shared = rng.random() < 0.5
    nrng = np.random.default_rng(rng.getrandbits(64))
    version = rng.choice((0, 1, 2))
    name = f"random-v{version}-" + "-".join(f"{k}{v}" for k, v in c.items())
    if version == 0:
        s = legacy_seed(shared, nrng, c)
    elif version == 1:
        s = v1_seed(shared, nrng, c)
    else:
        gs = rng.choice([g for g in range(1, dim + 1) if dim % g == 0 and c["hidden"] % g == 0])
        s = v2_seed(shared, nrng, gs, c)
        name += f"-gs{gs}"
    s.name = name + ".bin"
    return s


def make_case(seeds, seed, i):
    """(Seed, mutated bytes, description) of case i: a pure function of (seed, i)."""
    rng = random.Random(f"pyllama-fuzz:{seed}:{i}")
    tokenizers = [s for s in seeds if s.kind == "tokenizer"]
    models = [s for s in seeds if s.kind == "model"]
    base = rng.choice(tokenizers if rng.random() < TOKENIZER_SHARE else models)
    buf = bytearray(base.data)
    steps = []
    n = rng.choice((1, 1, 1, 2, 2, 3, 4))
    if base.kind == "model" and base.ext == ".bin" and rng.random() < 0.2:
        base = random_bin(rng)
        buf = bytearray(base.data)
        steps.append(f"random[{base.name}]")
        n = rng.choice((0, 0, 0, 1))
    elif base.layout is not None and rng.random() < 0.35:
        buf, what = m_gguf(rng, base)
        steps.append(f"gguf[{what}]")
        n = rng.choice((0, 0, 0, 1, 2))
    for _ in range(n):
        f = rng.choices(_MUT_FUNCS, _MUT_WEIGHTS)[0]
        steps.append(f(rng, buf, base, seeds))
    return base, bytes(buf), rng, " ".join(steps)


# ---------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by SIGALRM; a BaseException so that no `except Exception` in pyllama eats it."""


def _inject(what):
    """--selftest: make this case fail the way `what` says (to test the harness itself)."""
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "exit":
        os._exit(3)
    elif what == "hang":
        while True:
            time.sleep(0.01)
    elif what == "stuck":  # a hang SIGALRM cannot break (like a loop in C holding the thread)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            time.sleep(0.01)
    elif what == "unexpected":
        raise KeyError("self-test")
    elif what == "memory":
        raise MemoryError("Unable to allocate 8.00 GiB for an array")


def _on_alarm(signum, frame):
    raise Hang("case ran longer than the hang limit (SIGALRM)")


def exercise_model(pyllama, path, tok_path, gen_seed, **load_kwargs):
    """Load, 5 teacher-forced logits (one batch: the prefill tiles), 2 generated tokens. Returns
    'loaded' or raises."""
    tok = tok_path if not path.endswith(".gguf") else None
    m = pyllama.Llama(path, tokenizer=tok, threads=1, **load_kwargs)
    try:
        v = m.vocab_size
        ids = [(1 + 2 * i) % v for i in range(5)][:max(1, min(5, m.n_ctx))]
        out = m.logits(ids)
        assert out.shape == (len(ids), v), out.shape
        n_prompt = len(m.tokenize("Once"))
        text = "".join(m.generate("Once", steps=n_prompt + 2, temperature=0.8, seed=gen_seed))
        assert isinstance(text, str)
    finally:
        m.close()
    return "loaded"


def exercise_tokenizer(pyllama, path, model_path, vocab, gen_seed):
    tok = pyllama.Tokenizer.from_llama2c(path, vocab)
    ids = tok.encode("Once upon a time, hi! \u00e9\u4e2d", bos=True, eos=True)
    tok.decode(ids)
    for prev, t in zip(ids, ids[1:]):
        tok.safe_piece(prev, t)
    m = pyllama.Llama(model_path, tokenizer=tok, threads=1)
    try:
        n_prompt = len(m.tokenize("Once"))
        "".join(m.generate("Once", steps=n_prompt + 2, temperature=0.8, seed=gen_seed))
    finally:
        m.close()
    return "loaded"


def classify(pyllama, exc):
    """('accepted', label) or ('unexpected', label)."""
    if isinstance(exc, pyllama.PyllamaError):
        return "accepted", type(exc).__name__
    if type(exc) is MemoryError and "bytes" in str(exc):
        return "accepted", "MemoryError"
    return "unexpected", f"{type(exc).__name__}: {exc}"[:300]


class Runner:
    """Runs cases in this process (the worker, or a replay)."""

    def __init__(self, out, seed, hang_seconds=HANG_SECONDS):
        import pyllama  # retried by the caller if a concurrent rebuild makes it fail
        self.pyllama, self.seed, self.hang_seconds = pyllama, seed, hang_seconds
        self.inject = None  # self-test: a failure to inject into the next case
        self.out = Path(out)
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.seeds = make_seeds()
        base = self.work / "base"
        base.mkdir(exist_ok=True)
        self.tok_path = str(base / "vocab.bin")       # not "tokenizer.bin": no auto-discovery
        Path(self.tok_path).write_bytes(next(s for s in self.seeds if s.kind == "tokenizer").data)
        self.model_path = str(base / "legacy-shared.bin")
        Path(self.model_path).write_bytes(self.seeds[0].data)
        self._old_alarm = signal.signal(signal.SIGALRM, _on_alarm)
        self.heap = False
        self._install_heap_map()

    def close(self):
        """Undo what __init__ changed in this process (for in-process use, e.g. by pytest)."""
        if self._original_open_map is not None:
            import pyllama.formats as formats
            formats.open_map = self._original_open_map
        signal.signal(signal.SIGALRM, self._old_alarm)

    def _install_heap_map(self):
        """When self.heap is set (odd cases), the file is read into a malloc'd read-only numpy
        array instead of being mapped, so that under AddressSanitizer a read past the file's end
        is a report, not a silent read of the mapping's zero-filled last page. Llama(mmap=False)
        does exactly that; a pyllama without that option gets the same from a patched open_map.
        """
        import inspect

        import pyllama.formats as formats
        self._original_open_map = None
        self.load_kwargs = lambda: {"mmap": False} if self.heap else {}
        if "mmap" in inspect.signature(self.pyllama.Llama).parameters:
            return
        self.load_kwargs = lambda: {}
        original = self._original_open_map = formats.open_map

        def open_map(path, *args, **kwargs):
            mm = original(path, *args, **kwargs)
            if not self.heap or not isinstance(mm, np.memmap):
                return mm
            heap = np.array(mm)  # a plain ndarray: its buffer comes from malloc
            heap.flags.writeable = False
            return heap

        formats.open_map = open_map

    def run_bytes(self, seed_obj, data, rng_or_seed, path):
        """Outcome (status, label) of one input already written to `path`."""
        gen_seed = rng_or_seed.randrange(1, 1 << 31) if hasattr(rng_or_seed, "randrange") \
            else int(rng_or_seed)
        vocab = VOCAB
        if seed_obj.kind == "tokenizer" and hasattr(rng_or_seed, "random") \
                and rng_or_seed.random() < 0.1:
            vocab = rng_or_seed.choice((1, 3, 259, VOCAB - 1, VOCAB + 1))
        signal.setitimer(signal.ITIMER_REAL, self.hang_seconds)
        try:
            if self.inject:
                _inject(self.inject)
            if seed_obj.kind == "tokenizer":
                label = exercise_tokenizer(self.pyllama, path, self.model_path, vocab, gen_seed)
            else:
                label = exercise_model(self.pyllama, path, self.tok_path, gen_seed,
                                       **self.load_kwargs())
            status = "ok"
        except Hang:
            status, label = "hang", f"case ran longer than {self.hang_seconds:g} s"
        except Exception as e:  # noqa: BLE001 - classifying is the point
            status, label = classify(self.pyllama, e)
            if status == "unexpected":
                self.last_traceback = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return status, label

    def case_path(self, i, seed_obj):
        return str(self.work / f"case-{i}{seed_obj.ext}")

    def save(self, kind, i, seed_obj, data, desc, detail):
        stem = f"{kind}-seed{self.seed}-case{i}-{seed_obj.name.rsplit('.', 1)[0]}"
        (self.out / (stem + seed_obj.ext)).write_bytes(data)
        (self.out / (stem + ".txt")).write_text(
            f"seed {self.seed} case {i}: {seed_obj.name} mutated by {desc}\n"
            f"replay: python {sys.argv[0]} --seed {self.seed} --case {i} --out {self.out}\n\n"
            f"{detail}\n")
        return stem


def worker(args):
    faulthandler.enable()
    warnings.simplefilter("ignore")
    for attempt in range(30):  # another engineer may be rebuilding the extension right now
        try:
            runner = Runner(args.out, args.seed, args.hang_seconds)
            break
        except ImportError:
            if attempt == 29:
                raise
            time.sleep(2)
    os.chdir(runner.work)  # no stray tokenizer.bin in the working directory
    saved = Counter()
    inject = {int(n): kind for kind, n in (x.split("@") for x in (args.selftest or "").split(",")
                                           if x)}
    out = sys.stdout
    for i in range(args.start, args.start + args.count):
        seed_obj, data, rng, desc = make_case(runner.seeds, args.seed, i)
        path = runner.case_path(i, seed_obj)
        with open(path, "wb") as f:
            f.write(data)
        out.write(f"B {i} {seed_obj.name} {desc}\n")
        out.flush()
        runner.heap = i % 2 == 1
        runner.inject = inject.get(i)
        status, label = runner.run_bytes(seed_obj, data, rng, path)
        runner.inject = None
        if status in ("hang", "unexpected"):
            detail = getattr(runner, "last_traceback", "") if status == "unexpected" else label
            runner.last_traceback = ""
            kind = re.sub(r"\d+", "N", label)  # one error, whatever the numbers in it
            saved[kind] += 1
            if saved[kind] <= MAX_SAVED_PER_ERROR:
                stem = runner.save(status, i, seed_obj, data, desc, detail)
                label = f"{label} [saved {stem}]".replace("\n", " ")
            else:
                label = f"{label} [not saved: {MAX_SAVED_PER_ERROR} of this error already]"
        os.unlink(path)
        out.write(f"E {i} {status} {label}\n".replace("\n", " ") + "\n")
        out.flush()
    out.write("DONE\n")
    out.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# Supervisor
# ---------------------------------------------------------------------------------------------
def supervise(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fuzz: seed {args.seed}, {args.count} inputs, output in {out}", flush=True)
    counts = Counter()
    failures = []
    t0 = time.monotonic()
    start, end = args.start, args.start + args.count
    restarts = 0
    while start < end:
        log = out / f"worker-{start}.log"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(args.seed),
               "--start", str(start), "--count", str(end - start), "--out", str(out),
               "--hang-seconds", str(args.hang_seconds)]
        if args.selftest:
            cmd += ["--selftest", args.selftest]
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0)
            current, done = None, False
            reader = _LineReader(proc.stdout)
            while True:
                line = reader.readline(args.hang_seconds + args.grace)
                if line is None:  # silent too long: a hang the alarm could not break
                    proc.send_signal(signal.SIGABRT)  # faulthandler prints where it is stuck
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    break
                if not line:
                    break
                line = line.decode("utf-8", "replace").rstrip("\n")
                if line.startswith("B "):
                    _, i, name, desc = (line.split(" ", 3) + [""])[:4]
                    current = (int(i), name, desc)
                elif line.startswith("E "):
                    _, i, status, label = (line.split(" ", 3) + [""])[:4]
                    label = label.strip()
                    counts["inputs"] += 1
                    if status == "ok":
                        counts["loaded"] += 1
                    elif status == "accepted":
                        counts["rejected " + label] += 1
                    else:
                        counts[status] += 1
                        failures.append(f"{status}: seed {args.seed} case {i}: {label}")
                        print(f"fuzz: FAILURE {failures[-1]}", flush=True)
                    current = None
                    if args.progress and counts["inputs"] % args.progress == 0:
                        print(f"fuzz: {counts['inputs']} inputs, {time.monotonic() - t0:.0f} s",
                              file=sys.stderr, flush=True)
                elif line == "DONE":
                    done = True
            rc = proc.wait()
        if done and rc == 0:
            log.unlink()
            break
        if current is None:  # died between cases (e.g. while importing): nothing to blame
            detail = log.read_text(errors="replace")[-3000:]
            print(f"fuzz: worker exited with status {rc} outside any case:\n{detail}", flush=True)
            counts["crash"] += 1
            failures.append(f"crash: worker status {rc} outside a case")
            break
        i, name, desc = current
        kind = "hang" if line is None else "crash"
        counts["inputs"] += 1
        counts[kind] += 1
        stem = f"{kind}-seed{args.seed}-case{i}-{name.rsplit('.', 1)[0]}"
        src = out / "work" / f"case-{i}{Path(name).suffix}"
        if src.exists():
            shutil.copyfile(src, out / (stem + Path(name).suffix))
            src.unlink()
        stderr_tail = log.read_text(errors="replace")[-20000:]
        how = (f"no output for {args.hang_seconds + args.grace:g} s (killed)"
               if kind == "hang"
               else f"worker died: {_status(rc)}")
        (out / (stem + ".txt")).write_text(
            f"seed {args.seed} case {i}: {name} mutated by {desc}\n{how}\n"
            f"replay: python {__file__} --seed {args.seed} --case {i} --out {out}\n\n"
            f"worker stderr (tail):\n{stderr_tail}\n")
        log.unlink()
        failures.append(f"{kind}: seed {args.seed} case {i}: {name} mutated by {desc}: {how} "
                        f"[saved {stem}]")
        print(f"fuzz: FAILURE {failures[-1]}", flush=True)
        restarts += 1
        if restarts >= MAX_CRASHES:
            print(f"fuzz: giving up after {restarts} worker deaths", flush=True)
            break
        start = i + 1
    elapsed = time.monotonic() - t0
    shutil.rmtree(out / "work", ignore_errors=True)  # failing inputs were copied out of it
    rejected = sorted((k[len("rejected "):], v) for k, v in counts.items()
                      if k.startswith("rejected "))
    detail = ", ".join([f"{v} rejected with {k}" for k, v in rejected]
                       + [f"{counts['loaded']} loaded"])
    print(f"fuzz: {counts['inputs']} inputs, {counts['crash']} crashes, {counts['hang']} hangs, "
          f"{counts['unexpected']} unexpected exceptions ({detail}) in {elapsed:.1f} s, "
          f"seed {args.seed}", flush=True)
    bad = counts["crash"] + counts["hang"] + counts["unexpected"]
    if bad or counts["inputs"] != args.count:
        if counts["inputs"] != args.count:
            print(f"fuzz: only {counts['inputs']} of {args.count} inputs ran", flush=True)
        return 1
    return 0


def _status(rc):
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc} (a sanitizer report or os._exit; see the stderr tail)"


class _LineReader:
    """readline with a timeout on a pipe (select + a buffer)."""

    def __init__(self, f):
        self.fd, self.buf = f.fileno(), b""

    def readline(self, timeout):
        import select
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"


# ---------------------------------------------------------------------------------------------
# Replays
# ---------------------------------------------------------------------------------------------
def replay_case(args):
    faulthandler.enable()
    runner = Runner(args.out, args.seed)
    seed_obj, data, rng, desc = make_case(runner.seeds, args.seed, args.case)
    path = runner.case_path(args.case, seed_obj)
    Path(path).write_bytes(data)
    print(f"case {args.case} of seed {args.seed}: {seed_obj.name} mutated by {desc}\n"
          f"file: {path}", flush=True)
    return _report(runner, seed_obj, data, rng, path)


def replay_file(args):
    faulthandler.enable()
    runner = Runner(args.out, args.seed)
    data = Path(args.replay).read_bytes()
    kind = "tokenizer" if args.tokenizer else "model"
    ext = Path(args.replay).suffix if kind == "model" else ".bin"
    seed_obj = Seed(Path(args.replay).name, kind, data, [], 0)
    seed_obj.ext = ".gguf" if data[:4] == b"GGUF" else ext
    path = str(runner.work / ("replay" + seed_obj.ext))
    Path(path).write_bytes(data)
    return _report(runner, seed_obj, data, random.Random(args.seed), path)


def _report(runner, seed_obj, data, rng, path):
    status, label = runner.run_bytes(seed_obj, data, rng, path)
    print(f"outcome: {status}: {label}")
    if status == "unexpected":
        print(runner.last_traceback)
    return 0 if status in ("ok", "accepted") else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="inputs to try (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    p.add_argument("--start", type=int, default=0, help="first case number")
    p.add_argument("--out", default="build/fuzz", help="where failing inputs are saved")
    p.add_argument("--progress", type=int, default=0, help="print progress every N inputs")
    p.add_argument("--case", type=int, help="replay case N of --seed in this process")
    p.add_argument("--replay", help="replay a saved file in this process")
    p.add_argument("--tokenizer", action="store_true", help="--replay: the file is tokenizer.bin")
    p.add_argument("--hang-seconds", type=float, default=HANG_SECONDS,
                   help=f"a case running longer is a hang (default {HANG_SECONDS})")
    p.add_argument("--grace", type=float, default=GRACE_SECONDS,
                   help=f"kill a worker silent for hang + grace seconds (default {GRACE_SECONDS})")
    p.add_argument("--selftest", help="KIND@N[,KIND@N...]: inject failures (crash, exit, hang, "
                                      "stuck, unexpected, memory) into case N, to test the harness")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)  # the worker changes directory
    if args.seed is None:
        if args.case is not None:
            p.error("--case needs --seed")
        args.seed = int.from_bytes(os.urandom(4), "little")
    if args.worker:
        return worker(args)
    if args.case is not None:
        return replay_case(args)
    if args.replay:
        return replay_file(args)
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
