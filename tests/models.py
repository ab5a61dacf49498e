"""Small model files written by the tests themselves (valid ones and deliberately broken ones)."""
import struct

import numpy as np


def legacy_floats(dim, hidden, layers, heads, kv_heads, vocab, seq, shared=True):
    hs = dim // heads
    kv_dim = kv_heads * hs
    n = vocab * dim + layers * dim  # embedding, rms_att
    n += layers * (dim * dim + 2 * kv_dim * dim + dim * dim)  # wq wk wv wo
    n += layers * dim + layers * 3 * hidden * dim + dim  # rms_ffn, w1 w2 w3, rms_final
    n += seq * hs  # two legacy RoPE tables
    if not shared:
        n += vocab * dim
    return n


def write_legacy(path, dim=8, hidden=16, layers=1, heads=2, kv_heads=2, vocab=16, seq=8,
                 shared=True, header=None, extra_bytes=0, missing_bytes=0, seed=0):
    """A random legacy llama2.c checkpoint; `header` replaces the 7 header ints as written."""
    rng = np.random.default_rng(seed)
    n = legacy_floats(dim, hidden, layers, heads, kv_heads, vocab, seq, shared)
    body = (rng.standard_normal(n).astype(np.float32) * 0.3).tobytes()
    hdr = header or (dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq)
    data = struct.pack("<7i", *hdr) + body + b"\0" * extra_bytes
    if missing_bytes:
        data = data[:-missing_bytes]
    path.write_bytes(data)
    return path


def write_tokenizer_bin(path, pieces, scores=None, max_len=None):
    scores = scores if scores is not None else [0.0] * len(pieces)
    out = [struct.pack("<I", max_len or max(len(p) for p in pieces))]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("<fI", s, len(p)) + p)
    path.write_bytes(b"".join(out))
    return path


def byte_vocab(vocab):
    """llama2.c-style pieces: <unk>, BOS, EOS, 256 byte tokens, then filler words."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [b"w%d" % i for i in range(max(0, vocab - len(pieces)))]
    return pieces[:vocab] if vocab >= 3 else pieces[:3]


def gguf_llama_writer(path, cfg, rms_eps=1e-5):
    """A gguf.GGUFWriter for a llama GGUF with the hyper-parameters of cfg (pyllama's config keys)
    already added; the caller adds its tokenizer, tensors and extra keys, then writes."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["seq_len"])
    w.add_embedding_length(cfg["dim"])
    w.add_block_count(cfg["n_layers"])
    w.add_feed_forward_length(cfg["hidden_dim"])
    w.add_head_count(cfg["n_heads"])
    w.add_head_count_kv(cfg["n_kv_heads"])
    w.add_layer_norm_rms_eps(rms_eps)
    return w
