"""The model description every format reader returns, and the checks they share.

A reader maps the file ONCE (read-only np.memmap) and describes each tensor as a numpy view into
that map: nothing is copied. Tensor names are GGUF's canonical names for every format:

    token_embd.weight, output_norm.weight, output.weight (absent = tied to token_embd),
    blk.N.attn_norm.weight, blk.N.attn_q/attn_k/attn_v/attn_output.weight,
    blk.N.ffn_norm.weight, blk.N.ffn_gate.weight (w1), blk.N.ffn_down.weight (w2),
    blk.N.ffn_up.weight (w3)
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .._core import lib
from ..arch import CONFIG_KEYS
from ..errors import FormatError

# THE type table: ggml's type number -> (name, elements per block, bytes per block), every type
# a GGUF file may hold (so that any tensor can be sized and named; None sizes: removed from
# ggml), plus Q8_G, pyllama's own number for llama2.c V2 int8 (values + f32 scales per group).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    4: ("Q4_2", None, None), 5: ("Q4_3", None, None), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    31: ("Q4_0_4_4", None, None), 32: ("Q4_0_4_8", None, None), 33: ("Q4_0_8_8", None, None),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 36: ("IQ4_NL_4_4", None, None),
    37: ("IQ4_NL_4_8", None, None), 38: ("IQ4_NL_8_8", None, None), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
    1000: ("Q8_G", 1, 1),
}
TYPE_BY_NAME = {name: num for num, (name, _, _) in GGML_TYPES.items()}

# The types the C core computes with are the ones csrc/pyllama.h defines as PL_<name>; their
# numbers are read from the compiled core (tests/test_types.py checks they are the table's).
CORE_TYPES = frozenset(getattr(lib, "PL_" + name) for name in TYPE_BY_NAME
                       if hasattr(lib, "PL_" + name))
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (
    lib.PL_F32, lib.PL_F16, lib.PL_BF16, lib.PL_Q4_0, lib.PL_Q4_1, lib.PL_Q5_0, lib.PL_Q5_1,
    lib.PL_Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_G = (
    lib.PL_Q2_K, lib.PL_Q3_K, lib.PL_Q4_K, lib.PL_Q5_K, lib.PL_Q6_K, lib.PL_Q8_G)

# Anything above these is refused before any allocation (checked before sizes are multiplied).
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 22
MAX_SEQ = 1 << 22


def type_name(t):
    return GGML_TYPES[t][0] if t in GGML_TYPES else f"unknown type {t}"


def row_bytes(ggml_type, cols):
    """Bytes of one row of `cols` elements; the caller checked cols % block == 0."""
    _, block, size = GGML_TYPES[ggml_type]
    return cols // block * size


@dataclass
class Tensor:
    """One weight tensor: `data` is a uint8 (or f32 for norms) numpy view into the file's mmap.

    shape is numpy order (rows, cols) — or (n,) for vectors; cols is the row length (GGUF ne[0]).
    """
    name: str
    type: int
    shape: tuple
    data: np.ndarray
    scales: Optional[np.ndarray] = None  # Q8_G only: float32 view, one per group
    group_size: int = 0                 # Q8_G only
    offset: int = 0                     # absolute byte offset in the file

    @property
    def nbytes(self):
        return int(self.data.nbytes) + (int(self.scales.nbytes) if self.scales is not None else 0)

    @property
    def type_name(self):
        return type_name(self.type)


@dataclass
class ModelFile:
    """What a format reader returns: config, tensors by canonical name, metadata (the tokenizer
    is built from the metadata by pyllama.tokenizers, not by the reader)."""
    path: str
    format: str                 # "llama2c-legacy", "llama2c-v1", "llama2c-v2", "gguf"
    version: int
    config: dict                # the fields of arch.CONFIG_KEYS, in its order
    tensors: dict               # name -> Tensor
    mmap: Optional[np.ndarray]  # the one read-only map every view points into (None if no tensors)
    metadata: dict = field(default_factory=dict)  # GGUF key -> value (empty for .bin)
    file_size: int = 0
    arch: str = "llama"                          # an arch.ARCHS key (llama2.c files: llama)
    # tensor name -> (array, type) of its load-time repacked copy (pyllama/model.py): every
    # Transformer over this file (a Llama and a server's engine, say) shares the one copy
    repacked: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_weights(self):
        """False for a vocab-only file (GGUF with no tensors): metadata + partial config only."""
        return bool(self.tensors)

    @property
    def shared_classifier(self):
        return "output.weight" not in self.tensors

    def close(self):
        """Drop this object's references to the map and its views. The memory stays mapped while
        any other view of it lives (a Transformer's weights, an array a caller kept), so pointers C
        holds through a live Transformer stay valid; it is unmapped when the last view goes."""
        self.tensors = {}
        self.repacked = {}
        self.mmap = None


def fail(path, what):
    raise FormatError(f"{path}: {what}")


def check_config(path, cfg):
    """Validate the hyper-parameters shared by every format; raises FormatError naming the field.
    Sets cfg["head_dim"] to dim / n_heads when the file did not give it (and puts the fields in
    arch.CONFIG_KEYS' order)."""
    ints = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for key in ints + (("head_dim",) if "head_dim" in cfg else ()):
        v = cfg.get(key)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            fail(path, f"{key}: expected an integer, found {v!r}")
        if v <= 0:
            fail(path, f"{key}: expected a positive value, found {v}")
    limits = {"dim": MAX_DIM, "hidden_dim": MAX_DIM * 4, "n_layers": MAX_LAYERS, "n_heads": MAX_DIM,
              "n_kv_heads": MAX_DIM, "vocab_size": MAX_VOCAB, "seq_len": MAX_SEQ, "head_dim": MAX_DIM}
    for key, lim in limits.items():
        if cfg.get(key, 0) > lim:
            fail(path, f"{key} = {cfg[key]} is beyond what pyllama supports (at most {lim})")
    if "head_dim" not in cfg:
        if cfg["dim"] % cfg["n_heads"]:
            fail(path, f"dim {cfg['dim']} is not divisible by n_heads {cfg['n_heads']} (and the "
                       f"file gives no head size)")
        cfg["head_dim"] = cfg["dim"] // cfg["n_heads"]
    if cfg["n_heads"] * cfg["head_dim"] > MAX_DIM:
        fail(path, f"n_heads {cfg['n_heads']} x head_dim {cfg['head_dim']} is beyond what pyllama "
                   f"supports (at most {MAX_DIM})")
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        fail(path, f"n_heads {cfg['n_heads']} is not divisible by n_kv_heads {cfg['n_kv_heads']}")
    if cfg["head_dim"] % 2:
        fail(path, f"head size {cfg['head_dim']} is odd (RoPE rotates pairs)")
    for key in ("rms_eps", "rope_theta"):
        v = cfg.get(key)
        if not isinstance(v, float) or not np.isfinite(v) or v <= 0:
            fail(path, f"{key}: expected a positive finite number, found {v!r}")
    ordered = {k: cfg[k] for k in CONFIG_KEYS if k in cfg}
    cfg.clear()
    cfg.update(ordered)
