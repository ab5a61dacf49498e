"""pyllama.formats.gguf: real files, round trips, hostile files.

Where expected values come from:
- the files in ../shared/models (llama.cpp's converter and quantizer, see shared/golden/README.md)
  are compared with `gguf.GGUFReader` (llama.cpp's gguf-py, used here as an independent oracle);
- round-trip files are written by `gguf.GGUFWriter`, so the expected values are what we wrote;
- hostile files are built byte by byte below (layout from shared/FORMATS.md), so each test knows
  exactly which field is wrong.
"""
import random
import struct
import time

import numpy as np
import pytest
from conftest import SHARED, assert_refused, shared_path
from models import gguf_llama_writer

import gguf  # noqa: E402  (test oracle only: the reader under test is our own; required)

from pyllama.errors import FormatError  # noqa: E402
from pyllama.formats import common  # noqa: E402
from pyllama.formats.gguf import (  # noqa: E402
    CONFIG_KEYS, GGML_TYPES, MAX_ARRAY_DEPTH, _Cursor, read_gguf, read_metadata)

GT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType


# without ../shared: one placeholder case, which fails under CI (skips elsewhere) via `shared`
MODELS = sorted((SHARED / "models").glob("*.gguf")) if (SHARED / "models").is_dir() else [None]


@pytest.fixture
def shared():
    return shared_path()


def _tokenizer_of(mf):
    """The tokenizer pyllama.tokenizers builds from a ModelFile's metadata (the reader does not)."""
    from pyllama.tokenizers import from_gguf_metadata
    return from_gguf_metadata(mf.metadata, mf.path)


def _reaches(arr, base):
    """True when `base` is on arr's .base chain (a view, not a copy)."""
    while arr is not None:
        if arr is base:
            return True
        arr = arr.base
    return False


def _same(ours, theirs):
    if isinstance(ours, np.ndarray):
        return ours.tolist() == list(theirs)
    return ours == theirs and type(ours) is type(theirs)


# ----------------------------------------------------------------------------------------------
# (a) every GGUF in shared/models, against GGUFReader

@pytest.mark.parametrize("path", MODELS, ids=[p.name if p else "shared-missing" for p in MODELS])
def test_shared_file_matches_gguf_reader(shared, path):
    ref = gguf.GGUFReader(path)
    version, meta, infos = read_metadata(path)
    assert version == int(ref.fields["GGUF.version"].parts[-1][0])

    # metadata: same keys in the same order, same values and Python kinds
    ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(meta) == ref_keys
    for key in ref_keys:
        assert _same(meta[key], ref.fields[key].contents()), key

    # tensor infos: every tensor, same type, ne, offset and size
    assert [t.name for t in infos] == [t.name for t in ref.tensors]
    for ours, theirs in zip(infos, ref.tensors):
        assert ours.type == int(theirs.tensor_type)
        assert list(ours.ne) == [int(d) for d in theirs.shape]
        assert ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes

    mf = read_gguf(path)
    assert mf.format == "gguf" and mf.version == version and mf.file_size == path.stat().st_size
    f = ref.fields
    if not ref.tensors:  # the vocab-only file
        assert not mf.has_weights and mf.tensors == {} and mf.mmap is None
    else:
        assert mf.has_weights and isinstance(mf.mmap, np.memmap)
        by_name = {t.name: t for t in ref.tensors}
        assert set(mf.tensors) <= set(by_name)
        for name, t in mf.tensors.items():
            r = by_name[name]
            assert t.type == int(r.tensor_type) and t.offset == r.data_offset
            assert t.shape == tuple(int(d) for d in reversed(r.shape))
            assert t.nbytes == r.n_bytes
            assert np.array_equal(t.data.view(np.uint8).reshape(-1),
                                  np.asarray(r.data).view(np.uint8).reshape(-1)), name
            # no copies: a view into the one map
            assert _reaches(t.data, mf.mmap) and np.shares_memory(t.data, mf.mmap), name
            assert t.data.flags.c_contiguous and not t.data.flags.writeable
            if len(t.shape) == 1:
                assert t.data.dtype == np.float32 and t.type == common.F32
            else:
                assert t.data.dtype == np.uint8 and t.data.shape[0] == t.shape[0]
        assert mf.shared_classifier == ("output.weight" not in by_name)
    cfg = mf.config
    expect = {"dim": "llama.embedding_length", "hidden_dim": "llama.feed_forward_length",
              "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
              "n_kv_heads": "llama.attention.head_count_kv", "seq_len": "llama.context_length",
              "rms_eps": "llama.attention.layer_norm_rms_epsilon"}
    for field, key in expect.items():
        assert cfg[field] == f[key].contents(), field
    assert cfg["rope_theta"] == 10000.0  # no llama.rope.freq_base in these files: the default
    assert cfg["vocab_size"] == len(f["tokenizer.ggml.tokens"].data)
    if ref.tensors:
        assert cfg["vocab_size"] == int(by_name["token_embd.weight"].shape[1])
        common.check_config(str(path), cfg)
    assert _tokenizer_of(mf).vocab_size == cfg["vocab_size"]


def test_vocab_only_file(shared):
    mf = read_gguf(shared / "models" / "llama2-vocab.gguf")
    assert not mf.has_weights and mf.mmap is None
    assert mf.config["vocab_size"] == 32000 and mf.config["dim"] == 4096
    toks = mf.metadata["tokenizer.ggml.tokens"]
    assert len(toks) == 32000 and toks[:3] == ["<unk>", "<s>", "</s>"] and toks[3] == "<0x00>"
    scores = mf.metadata["tokenizer.ggml.scores"]
    assert scores.dtype == np.float32 and scores.shape == (32000,) and scores.flags.owndata
    assert mf.metadata["tokenizer.ggml.token_type"].dtype == np.int32


def test_vocab_parses_fast(shared):
    path = shared / "models" / "llama2-vocab.gguf"
    best = min(_timed(read_metadata, path) for _ in range(5))
    assert best < 0.1, f"read_metadata(llama2-vocab.gguf) took {best * 1e3:.1f} ms"


def test_tokenizer_built_from_metadata(shared):
    """The reader returns metadata only (no tokenizer attribute); the factory builds one."""
    mf = read_gguf(shared / "models" / "stories260K-f32.gguf")
    assert not hasattr(mf, "tokenizer")
    assert _tokenizer_of(mf).vocab_size == 512


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def test_tables_agree_with_ggml():
    for t, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(t)] == (t.name, block, size)
    assert common.CONFIG_KEYS is CONFIG_KEYS  # one table (pyllama/arch.py)


# ----------------------------------------------------------------------------------------------
# (b) round trips through gguf.GGUFWriter

TINY = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=32)


def _tensor_specs(cfg, tied=False):
    d, h, v = cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"]
    kv = d // cfg["n_heads"] * cfg["n_kv_heads"]
    specs = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not tied:
        specs["output.weight"] = (v, d)
    for i in range(cfg["n_layers"]):
        specs.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (d, d),
                      f"blk.{i}.attn_k.weight": (kv, d), f"blk.{i}.attn_v.weight": (kv, d),
                      f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_norm.weight": (d,),
                      f"blk.{i}.ffn_gate.weight": (h, d), f"blk.{i}.ffn_down.weight": (d, h),
                      f"blk.{i}.ffn_up.weight": (h, d)})
    return specs


def write_llama(path, cfg=TINY, wtype=GT.F32, tied=False, alignment=None, extra=None, seed=0,
                tokens=True):
    """A tiny llama GGUF; returns {name: (ggml type, numpy shape, raw bytes written)}."""
    rng = np.random.default_rng(seed)
    w = gguf_llama_writer(path, cfg, rms_eps=1e-6)
    w.add_rope_freq_base(500000.0)
    if alignment:
        w.add_custom_alignment(alignment)
    if tokens:
        w.add_tokenizer_model("llama")
        w.add_token_list([f"tok{i}" for i in range(cfg["vocab_size"])])
        w.add_token_scores([float(-i) for i in range(cfg["vocab_size"])])
        w.add_token_types([1] * cfg["vocab_size"])
    for key, (val, vtype, sub) in (extra or {}).items():
        w.add_key_value(key, val, vtype, sub)
    written = {}
    for name, shape in _tensor_specs(cfg, tied).items():
        t = GT.F32 if len(shape) == 1 else wtype
        block, size = gguf.GGML_QUANT_SIZES[t]
        if t == GT.F32:
            arr = rng.standard_normal(shape).astype(np.float32)
            w.add_tensor(name, arr)
        elif t == GT.F16:
            arr = rng.standard_normal(shape).astype(np.float16)
            w.add_tensor(name, arr)
        else:
            arr = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, arr, raw_dtype=t)
        written[name] = (int(t), shape, arr.tobytes())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.mark.parametrize("wtype", [GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0, GT.Q4_K, GT.Q6_K],
                         ids=lambda t: t.name)
def test_round_trip_weights(tmp_path, wtype):
    cfg = dict(TINY, dim=256, hidden_dim=512) if gguf.GGML_QUANT_SIZES[wtype][0] == 256 else TINY
    path = tmp_path / "m.gguf"
    written = write_llama(path, cfg, wtype)
    mf = read_gguf(path)
    assert mf.config == dict(cfg, rms_eps=float(np.float32(1e-6)), rope_theta=500000.0,
                             head_dim=cfg["dim"] // cfg["n_heads"])
    assert set(mf.tensors) == set(written) and not mf.shared_classifier
    for name, (t, shape, raw) in written.items():
        got = mf.tensors[name]
        assert (got.type, got.shape) == (t, shape)
        assert got.data.tobytes() == raw
        assert np.shares_memory(got.data, mf.mmap)


def test_callers_map_is_used(tmp_path):
    path = tmp_path / "m.gguf"
    write_llama(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    mf = read_gguf(path, mm)
    assert mf.mmap is mm and all(_reaches(t.data, mm) for t in mf.tensors.values())
    assert [t.offset for t in read_metadata(path, mm)[2]] == [t.offset for t in read_metadata(path)[2]]


def test_round_trip_tied_and_alignment(tmp_path):
    path = tmp_path / "m.gguf"
    written = write_llama(path, tied=True, alignment=256)
    mf = read_gguf(path)
    assert mf.shared_classifier and mf.metadata["general.alignment"] == 256
    for name, t in mf.tensors.items():
        assert (t.offset - mf.tensors["token_embd.weight"].offset) % 256 == 0
        assert t.data.tobytes() == written[name][2]


ALL_VALUES = {
    "t.u8": (255, VT.UINT8, None), "t.i8": (-128, VT.INT8, None),
    "t.u16": (65535, VT.UINT16, None), "t.i16": (-32768, VT.INT16, None),
    "t.u32": (2**32 - 1, VT.UINT32, None), "t.i32": (-2**31, VT.INT32, None),
    "t.f32": (0.1, VT.FLOAT32, None), "t.bool": (True, VT.BOOL, None),
    "t.false": (False, VT.BOOL, None), "t.str": ("héllo ▁wörld 🦙", VT.STRING, None),
    "t.empty_str": ("", VT.STRING, None),
    "t.u64": (2**64 - 1, VT.UINT64, None), "t.i64": (-2**63, VT.INT64, None),
    "t.f64": (1e300, VT.FLOAT64, None),
    "t.arr_u8": ([0, 1, 255], VT.ARRAY, VT.UINT8), "t.arr_i8": ([-1, 2], VT.ARRAY, VT.INT8),
    "t.arr_u16": ([7, 65535], VT.ARRAY, VT.UINT16), "t.arr_i16": ([-7], VT.ARRAY, VT.INT16),
    "t.arr_u32": ([1, 2**32 - 1], VT.ARRAY, VT.UINT32), "t.arr_i32": ([-5, 5], VT.ARRAY, VT.INT32),
    "t.arr_f32": ([0.5, -2.25], VT.ARRAY, VT.FLOAT32),
    "t.arr_bool": ([True, False], VT.ARRAY, VT.BOOL),
    "t.arr_str": (["a", "", "▁b"], VT.ARRAY, VT.STRING),
    "t.arr_u64": ([2**64 - 1], VT.ARRAY, VT.UINT64), "t.arr_i64": ([-2**63, 3], VT.ARRAY, VT.INT64),
    "t.arr_f64": ([1e-300, 2.0], VT.ARRAY, VT.FLOAT64),
    "t.nested": ([[1, 2], [3]], VT.ARRAY, None),
    "t.nested_str": ([["x"], ["y", "z"]], VT.ARRAY, None),
    "t.nested3": ([[[1.5]], [[2.5, 3.5], [4.5]]], VT.ARRAY, None),
}


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@pytest.mark.parametrize("version", [3, 2])
def test_round_trip_metadata_all_types(tmp_path, version):
    path = tmp_path / "m.gguf"
    write_llama(path, extra=ALL_VALUES)
    if version == 2:  # GGUFWriter writes v3; v2 differs only in the version field for readers
        raw = bytearray(path.read_bytes())
        raw[4:8] = struct.pack("<I", 2)
        path.write_bytes(bytes(raw))
    mf = read_gguf(path)
    assert mf.version == version
    for key, (val, vtype, sub) in ALL_VALUES.items():
        got = mf.metadata[key]
        if vtype == VT.FLOAT32:
            assert got == float(np.float32(val))
        elif vtype == VT.ARRAY and sub == VT.FLOAT32:
            assert got.dtype == np.float32 and got.tolist() == [float(np.float32(x)) for x in val]
        else:
            assert _plain(got) == val, key
            assert type(got) is (np.ndarray if sub not in (None, VT.STRING) else type(val)), key
    assert mf.metadata["t.arr_bool"].dtype == bool
    assert mf.metadata["t.arr_u64"].dtype == np.uint64


# ----------------------------------------------------------------------------------------------
# (c) hostile files, built byte by byte

def s(x):
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<i", vtype) + payload


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_str(key, v):
    return kv(key, 8, s(v))


def tinfo(name, ne, ttype, offset):
    return (s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne)
            + struct.pack("<iQ", ttype, offset))


SMALL = dict(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, seq_len=16)


class Model:
    """A tiny valid llama GGUF as editable parts: kvs (list of bytes), tensors (list of dicts)."""

    def __init__(self, cfg=SMALL, qtype=8):
        self.cfg, self.version, self.alignment = cfg, 3, 32
        self.n_tensors = self.n_kv = None
        self.kvs = [kv_str("general.architecture", "llama"),
                    kv_u32("llama.context_length", cfg["seq_len"]),
                    kv_u32("llama.embedding_length", cfg["dim"]),
                    kv_u32("llama.block_count", cfg["n_layers"]),
                    kv_u32("llama.feed_forward_length", cfg["hidden_dim"]),
                    kv_u32("llama.attention.head_count", cfg["n_heads"]),
                    kv_u32("llama.attention.head_count_kv", cfg["n_kv_heads"]),
                    kv("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5)),
                    kv_str("tokenizer.ggml.model", "llama"),
                    kv("tokenizer.ggml.tokens", 9, struct.pack("<iQ", 8, cfg["vocab_size"])
                       + b"".join(s(f"t{i}") for i in range(cfg["vocab_size"]))),
                    kv("tokenizer.ggml.scores", 9, struct.pack("<iQ", 6, cfg["vocab_size"])
                       + np.arange(cfg["vocab_size"], dtype="<f4").tobytes()),
                    kv("t.nested", 9, struct.pack("<iQ", 9, 2) + struct.pack("<iQ", 5, 1)
                       + struct.pack("<i", 7) + struct.pack("<iQ", 7, 2) + b"\x01\x00"),
                    kv("t.u64", 10, struct.pack("<Q", 12345)), kv("t.bool", 7, b"\x01")]
        self.tensors = []
        for name, shape in _tensor_specs(cfg, tied=True).items():
            t = 0 if len(shape) == 1 or "attn_q" not in name else qtype
            self.tensors.append(dict(name=name, ne=list(reversed(shape)), type=t, offset=None))

    def layout(self):
        """(header padded to the alignment, length of the data section)."""
        infos, pos = [], 0
        for t in self.tensors:
            try:
                block, size = gguf.GGML_QUANT_SIZES[GT(t["type"])]
            except ValueError:  # a type number ggml does not know: pretend 4 bytes an element
                block, size = 1, 4
            n = 1
            for d in t["ne"]:
                n *= max(d, 0)
            nbytes = n // block * size
            if nbytes > 1 << 40:  # absurd dims (hostile tests): reserve nothing
                nbytes = 0
            infos.append(tinfo(t["name"], t["ne"], t["type"], pos if t["offset"] is None
                               else t["offset"]))
            pos += nbytes
            pos += -pos % self.alignment
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        head = (b"GGUF" + struct.pack("<IQQ", self.version, n_tensors, n_kv)
                + b"".join(self.kvs) + b"".join(infos))
        return head + bytes(-len(head) % self.alignment), pos

    def build(self):
        head, n = self.layout()
        return head + (bytes(range(256)) * (n // 256 + 1))[:n]

    def write(self, path):
        path.write_bytes(self.build())
        return path

    def write_sparse(self, path):
        """The header, then a data section of zeros that is never written (a sparse file)."""
        head, n = self.layout()
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + n)
        return path


def bad(tmp_path, content, *fragments, name="bad.gguf"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.build())
    return assert_refused(path, read_gguf, *fragments)


def test_small_model_is_valid(tmp_path):
    mf = read_gguf(Model().write(tmp_path / "ok.gguf"))
    assert mf.config == dict(SMALL, rms_eps=float(np.float32(1e-5)), rope_theta=10000.0, head_dim=8)
    assert mf.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
    assert _plain(mf.metadata["t.nested"]) == [[7], [True, False]]


def test_empty_and_short_files(tmp_path):
    bad(tmp_path, b"", "empty file")
    bad(tmp_path, b"GG", "magic", "needs 4 bytes")
    bad(tmp_path, b"GGUF\x03\x00\x00\x00\x00", "tensor count", "needs 8 bytes")


def test_bad_magic(tmp_path):
    bad(tmp_path, b"GGML" + Model().build()[4:], "not a GGUF file", "b'GGML'")


@pytest.mark.parametrize("version,frag", [(1, "unsupported GGUF version 1"), (0, "version 0"),
                                          (4, "unsupported GGUF version 4"),
                                          (0x03000000, "big-endian")])
def test_bad_version(tmp_path, version, frag):
    m = Model()
    m.version = version
    bad(tmp_path, m, frag)


def test_absurd_counts(tmp_path):
    m = Model()
    m.n_tensors = 2**64 - 1
    bad(tmp_path, m, "tensor count 18446744073709551615", "impossible")
    m = Model()
    m.n_kv = 2**64 - 1
    bad(tmp_path, m, "metadata count 18446744073709551615", "impossible")
    m = Model()
    m.n_kv = len(m.kvs) + 5  # plausible count, but the key/values run into the tensor infos
    bad(tmp_path, m)


def test_lengths_beyond_the_file(tmp_path):
    m = Model()
    m.kvs.append(struct.pack("<Q", 2**63) + b"key")
    bad(tmp_path, m, "metadata key #14: string at offset", "needs 9223372036854775808 bytes")
    m = Model()
    m.kvs.append(kv("x.s", 8, struct.pack("<Q", 10**12)))
    bad(tmp_path, m, "metadata 'x.s': string at offset", "needs 1000000000000 bytes")
    for etype, frag in [(6, "array of 1152921504606846976 f32"), (8, "strings"), (9, "arrays")]:
        m = Model()
        m.kvs.append(kv("x.a", 9, struct.pack("<iQ", etype, 2**60)))
        bad(tmp_path, m, "metadata 'x.a'", frag)
    m = Model()  # element lengths inside a string array
    m.kvs.append(kv("x.a", 9, struct.pack("<iQ", 8, 2) + s("ok") + struct.pack("<Q", 2**40)))
    bad(tmp_path, m, "metadata 'x.a'[1]", "string of 1099511627776 bytes")


def test_unknown_value_types(tmp_path):
    for vtype in (13, -1, 2**31 - 1):
        m = Model()
        m.kvs.append(kv("x.v", vtype, b"\0" * 8))
        bad(tmp_path, m, "metadata 'x.v'", f"unknown value type {vtype}")
    m = Model()
    m.kvs.append(kv("x.a", 9, struct.pack("<iQ", 13, 1)))
    bad(tmp_path, m, "metadata 'x.a'", "unknown array element type 13")


def test_bool_must_be_0_or_1(tmp_path):
    m = Model()
    m.kvs.append(kv("x.b", 7, b"\x02"))
    bad(tmp_path, m, "metadata 'x.b'", "bool must be 0 or 1")
    m = Model()
    m.kvs.append(kv("x.b", 9, struct.pack("<iQ", 7, 2) + b"\x00\x05"))
    bad(tmp_path, m, "metadata 'x.b'", "bool array")


def test_invalid_utf8(tmp_path):
    m = Model()
    m.kvs.append(kv_str("x.s", b"ok\xff"))
    bad(tmp_path, m, "metadata 'x.s'", "invalid UTF-8")
    m = Model()
    m.kvs.append(kv(b"bad\xc3key", 4, b"\0" * 4))
    bad(tmp_path, m, "metadata key #14", "invalid UTF-8")
    m = Model()
    m.kvs.append(kv("x.a", 9, struct.pack("<iQ", 8, 3) + s("a") + s("b") + s(b"\xed\xa0\x80")))
    bad(tmp_path, m, "metadata 'x.a'[2]", "invalid UTF-8")
    m = Model()
    m.tensors[0]["name"] = b"tok\x80"
    bad(tmp_path, m, "tensor #0 name", "invalid UTF-8")


def test_nested_array_depth(tmp_path):
    def nested(depth):  # `depth` arrays, innermost holds one u8
        payload = struct.pack("<iQ", 0, 1) + b"\x07"
        for _ in range(depth - 1):
            payload = struct.pack("<iQ", 9, 1) + payload
        return payload

    m = Model()
    m.kvs.append(kv("x.deep", 9, nested(MAX_ARRAY_DEPTH)))
    value = read_gguf(m.write(tmp_path / "ok.gguf")).metadata["x.deep"]
    for _ in range(MAX_ARRAY_DEPTH - 1):
        value = value[0]
    assert value.tolist() == [7]
    m = Model()
    m.kvs.append(kv("x.deep", 9, nested(MAX_ARRAY_DEPTH + 1)))
    bad(tmp_path, m, "metadata 'x.deep'", "nested deeper than")
    m = Model()  # a self-similar bomb: 10^6 levels claimed, refused at the limit
    m.kvs.append(kv("x.deep", 9, struct.pack("<iQ", 9, 1) * 10**5))
    bad(tmp_path, m, "nested deeper than")


def test_duplicates(tmp_path):
    m = Model()
    m.kvs.append(kv_u32("llama.block_count", 1))
    bad(tmp_path, m, "duplicate metadata key 'llama.block_count'")
    m = Model()
    m.tensors.append(dict(m.tensors[3]))
    bad(tmp_path, m, f"duplicate tensor name '{m.tensors[3]['name']}'")


@pytest.mark.parametrize("n_dims", [0, 5])
def test_bad_n_dims(tmp_path, n_dims):
    m = Model()
    m.tensors[2]["ne"] = [2] * n_dims
    bad(tmp_path, m, f"tensor '{m.tensors[2]['name']}'", f"n_dims {n_dims} (expected 1 to 4)")


def test_bad_dims(tmp_path):
    m = Model()
    m.tensors[3]["ne"] = [32, 0]  # attn_q with no rows
    bad(tmp_path, m, "tensor 'blk.0.attn_q.weight' has ne [32, 0]", "expected [32, 32]")
    m = Model()
    m.tensors[0]["ne"] = [32, 0]  # token_embd with no rows: the vocab sources disagree
    bad(tmp_path, m, "rows of token_embd.weight = 0")
    m = Model()
    m.tensors[0]["ne"] = [32, -16]
    bad(tmp_path, m, "tensor 'token_embd.weight'", "negative dimension")
    m = Model()  # 2^62 * 2^62 * 2^62 elements: Python ints do not overflow, the file is too short
    m.tensors[0]["ne"] = [2**62, 2**62, 2**62]
    bad(tmp_path, m, "tensor 'token_embd.weight'", "outside the file")
    m = Model()  # an unused tensor may have a zero dim (it is 0 bytes)
    m.tensors.append(dict(name="unused.weight", ne=[0], type=0, offset=None))
    mf = read_gguf(m.write(tmp_path / "ok.gguf"))
    assert "unused.weight" not in mf.tensors
    assert "unused.weight" in [t.name for t in read_metadata(tmp_path / "ok.gguf")[2]]


def test_unsupported_and_unknown_tensor_types(tmp_path):
    wide = dict(SMALL, dim=256, hidden_dim=512)  # 256-element blocks need rows of 256
    for ttype, tname in [(16, "IQ2_XXS"), (34, "TQ1_0"), (23, "IQ4_XS"), (15, "Q8_K")]:
        bad(tmp_path, Model(wide, qtype=ttype), f"tensor 'blk.0.attn_q.weight' has type {tname} "
                                                f"({ttype}), which pyllama does not support")
    bad(tmp_path, Model(qtype=16), "ne[0] = 32 is not a multiple of the IQ2_XXS block size 256")
    for ttype, frag in [(99, "unknown type 99"), (31, "Q4_0_4_4 (31), removed from ggml"),
                        (1000, "unknown type 1000"), (-1, "unknown type -1")]:
        m = Model()
        m.tensors[3]["type"] = ttype
        bad(tmp_path, m, f"tensor '{m.tensors[3]['name']}'", frag)


def test_unused_tensor_of_unsupported_type_is_ignored(tmp_path):
    m = Model()
    m.tensors.append(dict(name="extra.weight", ne=[32, 2], type=28, offset=None))  # F64
    mf = read_gguf(m.write(tmp_path / "ok.gguf"))
    assert "extra.weight" not in mf.tensors


def test_tensor_data_outside_file(tmp_path):
    m = Model()
    m.tensors[-1]["offset"] = 2**40
    bad(tmp_path, m, f"tensor '{m.tensors[-1]['name']}'", "outside the file")
    raw = Model().build()
    bad(tmp_path, raw[:-1], "outside the file")  # truncated by one byte
    m = Model()
    m.tensors[-1]["offset"] = 2**64 - 32
    bad(tmp_path, m, "outside the file")


def test_overlapping_tensors(tmp_path):
    m = Model()
    m.tensors[1]["offset"] = 0  # on top of token_embd
    bad(tmp_path, m, "overlap", "token_embd.weight")


def test_misaligned_offset(tmp_path):
    m = Model()
    m.tensors[1]["offset"] = 16 * 32 * 4 + 4
    bad(tmp_path, m, f"tensor '{m.tensors[1]['name']}'", "not a multiple of the alignment 32")


@pytest.mark.parametrize("payload,frag", [(kv_u32("general.alignment", 24), "found 24"),
                                          (kv_u32("general.alignment", 0), "found 0"),
                                          (kv_str("general.alignment", "32"), "found '32'"),
                                          (kv("general.alignment", 7, b"\x01"), "found True")])
def test_bad_alignment(tmp_path, payload, frag):
    m = Model()
    m.kvs.append(payload)
    bad(tmp_path, m, "general.alignment: expected a power of two", frag)


def test_other_alignment(tmp_path):
    m = Model()
    m.alignment = 64
    m.kvs.append(kv_u32("general.alignment", 64))
    assert read_gguf(m.write(tmp_path / "ok.gguf")).has_weights


def test_row_length_not_multiple_of_block(tmp_path):
    m = Model()
    q = next(t for t in m.tensors if t["type"] == 8)
    q["ne"] = [48, 32]
    bad(tmp_path, m, f"tensor '{q['name']}'",
        "ne[0] = 48 is not a multiple of the Q8_0 block size 32")


def test_tensor_name_too_long(tmp_path):
    m = Model()
    m.tensors.append(dict(name="x" * 64, ne=[4], type=0, offset=None))
    bad(tmp_path, m, "tensor #", "name of 64 bytes")


def test_architecture(tmp_path):
    m = Model()
    m.kvs[0] = kv_str("general.architecture", "gpt2")
    bad(tmp_path, m, "unsupported architecture 'gpt2'")
    m = Model()
    del m.kvs[0]
    bad(tmp_path, m, "missing metadata key 'general.architecture'")


def test_config_keys(tmp_path):
    m = Model()
    del m.kvs[2]
    bad(tmp_path, m, "missing metadata key 'llama.embedding_length' (dim)")
    m = Model()
    m.kvs[2] = kv_str("llama.embedding_length", "32")
    bad(tmp_path, m, "metadata 'llama.embedding_length': expected an integer", "str '32'")
    m = Model()
    m.kvs[7] = kv_str("llama.attention.layer_norm_rms_epsilon", "tiny")
    bad(tmp_path, m, "layer_norm_rms_epsilon': expected a number")
    m = Model()
    m.kvs[5] = kv_u32("llama.attention.head_count", 3)  # from common.check_config
    bad(tmp_path, m, "not divisible by n_heads 3")
    m = Model()  # head_count_kv defaults to head_count: then attn_k has the wrong shape
    del m.kvs[6]
    bad(tmp_path, m, "tensor 'blk.0.attn_k.weight' has ne [32, 16]", "expected [32, 32]")
    m = Model()
    m.kvs.append(kv("llama.rope.freq_base", 6, struct.pack("<f", 1e6)))
    m.kvs.append(kv("llama.vocab_size", 10, struct.pack("<Q", 16)))
    cfg = read_gguf(m.write(tmp_path / "ok.gguf")).config
    assert cfg["rope_theta"] == 1e6 and cfg["vocab_size"] == 16
    assert list(cfg) == list(common.CONFIG_KEYS)


def test_vocab_size_mismatch(tmp_path):
    m = Model()
    m.kvs.append(kv_u32("llama.vocab_size", 17))
    bad(tmp_path, m, "vocab size mismatch", "llama.vocab_size = 17", "token_embd.weight = 16")


def test_rope(tmp_path):
    m = Model()
    m.kvs += [kv_str("llama.rope.scaling.type", "linear"),
              kv("llama.rope.scaling.factor", 6, struct.pack("<f", 4.0))]
    bad(tmp_path, m, "unsupported rope scaling 'linear' with factor 4.0")
    m = Model()
    m.kvs.append(kv_str("llama.rope.scaling.type", "yarn"))
    bad(tmp_path, m, "unsupported rope scaling 'yarn'")
    m = Model()
    m.kvs.append(kv("llama.rope.scale_linear", 6, struct.pack("<f", 2.0)))
    bad(tmp_path, m, "unsupported rope scaling")
    m = Model()
    m.kvs += [kv_str("llama.rope.scaling.type", "none"),
              kv("llama.rope.scaling.factor", 6, struct.pack("<f", 4.0)),
              kv_u32("llama.rope.dimension_count", 8)]
    assert read_gguf(m.write(tmp_path / "ok.gguf")).has_weights
    m = Model()
    m.kvs.append(kv_u32("llama.rope.dimension_count", 4))
    bad(tmp_path, m, "llama.rope.dimension_count = 4", "partial RoPE")


def test_experts_refused(tmp_path):
    m = Model()
    m.kvs.append(kv_u32("llama.expert_count", 8))
    bad(tmp_path, m, "mixture-of-experts")


def test_missing_and_misshapen_tensors(tmp_path):
    m = Model()
    m.tensors = [t for t in m.tensors if t["name"] != "blk.0.ffn_up.weight"]
    bad(tmp_path, m, "missing tensor 'blk.0.ffn_up.weight'")
    m = Model()
    m.tensors = m.tensors[:1]
    bad(tmp_path, m, "missing tensor 'blk.0.attn_norm.weight' (and 9 more)",
        "required by architecture 'llama'")
    m = Model()
    k = next(t for t in m.tensors if t["name"] == "blk.0.attn_k.weight")
    k["ne"] = [32, 32]
    bad(tmp_path, m, "tensor 'blk.0.attn_k.weight' has ne [32, 32]", "expected [32, 16]")
    m = Model()
    k = next(t for t in m.tensors if t["name"] == "blk.0.ffn_down.weight")
    k["ne"] = [32, 64]  # transposed
    bad(tmp_path, m, "tensor 'blk.0.ffn_down.weight'", "expected [64, 32]")


def test_norms_must_be_f32(tmp_path):
    m = Model()
    m.tensors[1]["type"] = 1
    bad(tmp_path, m, "vector tensor 'output_norm.weight' has type F16 (1), expected F32")


def test_trailing_unit_dims_accepted(tmp_path):
    m = Model()
    m.tensors[1]["ne"] = [32, 1, 1]
    mf = read_gguf(m.write(tmp_path / "ok.gguf"))
    assert mf.tensors["output_norm.weight"].shape == (32,)


def test_vocab_only_partial_config(tmp_path):
    m = Model()
    m.tensors = []
    del m.kvs[1:5]  # no context_length, embedding_length, block_count, feed_forward_length
    mf = read_gguf(m.write(tmp_path / "v.gguf"))
    assert not mf.has_weights and mf.mmap is None and mf.tensors == {}
    assert mf.config == dict(n_heads=4, n_kv_heads=2, vocab_size=16,
                             rms_eps=float(np.float32(1e-5)), rope_theta=10000.0)


def test_big_file_is_not_read(tmp_path):
    """A ~470 MB model (a sparse file): the reader maps it and touches only the header."""
    cfg = dict(dim=2048, hidden_dim=5632, n_layers=1, n_heads=16, n_kv_heads=16,
               vocab_size=32000, seq_len=2048)
    path = Model(cfg).write_sparse(tmp_path / "big.gguf")
    assert path.stat().st_size > 400e6
    best = min(_timed(lambda: read_gguf(path)) for _ in range(3))
    assert best < 0.25, f"read_gguf on a {path.stat().st_size >> 20} MB file took {best:.3f} s"
    mf = read_gguf(path)
    assert mf.tensors["token_embd.weight"].data.shape == (32000, 2048 * 4)


# ----------------------------------------------------------------------------------------------
# mutation loop: only FormatError or success, never another exception, never slow

def test_mutations(tmp_path):
    base = Model().build()
    header_end = base.find(b"blk.0.ffn_up.weight") + 60
    rng = random.Random(1234)
    smash = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        raw = bytearray(base)
        kind = i % 4
        if kind == 0:  # bit flips, mostly in the header
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(header_end if rng.random() < 0.9 else len(raw))
                raw[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            del raw[rng.randrange(len(raw)):]
        elif kind == 2:  # smash a u64 (lengths, counts, dims, offsets)
            pos = rng.randrange(header_end - 8)
            raw[pos:pos + 8] = struct.pack("<Q", rng.choice(smash) if rng.random() < 0.7
                                           else rng.getrandbits(64))
        else:  # smash a u32 (types, n_dims, version)
            pos = rng.randrange(header_end - 4)
            raw[pos:pos + 4] = struct.pack("<I", rng.choice([0, 1, 4, 5, 9, 13, 255, 2**32 - 1]))
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(raw))
        t = time.perf_counter()
        try:
            mf = read_gguf(path)  # the tokenizer must also answer with FormatError
            if "tokenizer.ggml.model" in mf.metadata:
                _tokenizer_of(mf)
            read_metadata(path)
            outcomes["ok"] += 1
        except FormatError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
        assert time.perf_counter() - t < 1.0, f"mutation {i} took too long"
    assert outcomes["error"] > 100 and outcomes["ok"] > 0, outcomes


def _string_array(strings, tail=b""):
    return b"".join(struct.pack("<Q", len(s)) + s for s in strings) + tail


@pytest.mark.parametrize("strings", [
    [b"a", b"", "\u2581the".encode(), "\u4e2d\u00e9".encode(), b"<0x0A>"],  # empty, multi-byte
    [b""] * 5,
    [b"x\x00y", b"z"],                      # a NUL inside: the checked loop handles it
    [b"\xf0\x9f\x98\x80", b"\xc3\xa9" * 40],  # 4-byte and repeated 2-byte characters
])
def test_string_array_fast_path_equals_checked_loop(strings):
    data = memoryview(_string_array(strings, tail=b"rest"))
    fast, checked = _Cursor("t.gguf", data), _Cursor("t.gguf", data)
    got = fast._strings("k", len(strings))
    assert got == checked._strings_checked("k", len(strings)) == [s.decode() for s in strings]
    assert fast.pos == checked.pos == len(data) - 4


@pytest.mark.parametrize("data,count,message", [
    (_string_array([b"ok", b"\xff\xfe"]), 2, r"'k'\[1\] at offset 18: invalid UTF-8"),
    (_string_array([b"ok", b"abc"])[:-1], 2, r"'k'\[1\] at offset 10: string of 3 bytes, only 2"),
    (_string_array([b"ok"]) + struct.pack("<Q", 2**63), 2, r"'k'\[1\] at offset 10: string of 92233"),
    (_string_array([b"ok"]) + b"\x01\x00", 2, r"'k'\[1\] at offset 10: string length is past"),
])
def test_string_array_errors_name_the_element(data, count, message):
    with pytest.raises(FormatError, match=message):
        _Cursor("t.gguf", memoryview(data))._strings("k", count)
