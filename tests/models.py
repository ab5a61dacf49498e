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


def write_arch_gguf(path, arch="llama", dim=64, n_heads=4, n_kv_heads=2, head_dim=None,
                    hidden_dim=96, n_layers=2, vocab_size=48, seq_len=64, biases=None,
                    rope_freqs=False, tied=True, theta=10000.0, edit=None, seed=0):
    """A small random GGUF of architecture `arch` written by gguf.GGUFWriter (no tokenizer).

    head_dim: written as attention.key_length/value_length (q then has n_heads*head_dim rows);
    biases: q/k/v biases (default: for qwen2 only); rope_freqs: a rope_freqs.weight of divisors.
    edit(tensors, kv) may change the {name: array} and {key: value} dicts before writing (hostile
    files); a float16 array is written as F16. Returns (tensors, kv)."""
    import gguf
    rng = np.random.default_rng(seed)
    hd = head_dim or dim // n_heads
    biases = arch == "qwen2" if biases is None else biases
    kv = {"context_length": seq_len, "embedding_length": dim, "block_count": n_layers,
          "feed_forward_length": hidden_dim, "attention.head_count": n_heads,
          "attention.head_count_kv": n_kv_heads}
    if head_dim:
        kv.update({"attention.key_length": hd, "attention.value_length": hd})

    def mat(rows, cols, sd=0.2):
        return (rng.standard_normal((rows, cols)) * sd).astype(np.float32)

    def vec(n, base=1.0, sd=0.1):
        return (base + sd * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": mat(vocab_size, dim, 1.0)}
    if rope_freqs:
        t["rope_freqs.weight"] = np.linspace(1.0, 8.0, hd // 2, dtype=np.float32)
    q, k = n_heads * hd, n_kv_heads * hd
    for i in range(n_layers):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": vec(dim), b + "attn_q.weight": mat(q, dim),
                  b + "attn_k.weight": mat(k, dim), b + "attn_v.weight": mat(k, dim),
                  b + "attn_output.weight": mat(dim, q)})
        if biases:
            t.update({b + "attn_q.bias": vec(q, 0, 0.5), b + "attn_k.bias": vec(k, 0, 0.5),
                      b + "attn_v.bias": vec(k, 0, 0.5)})
        t.update({b + "ffn_norm.weight": vec(dim), b + "ffn_gate.weight": mat(hidden_dim, dim),
                  b + "ffn_down.weight": mat(dim, hidden_dim), b + "ffn_up.weight": mat(hidden_dim, dim)})
    t["output_norm.weight"] = vec(dim)
    if not tied:
        t["output.weight"] = mat(vocab_size, dim, 0.5)
    if edit:
        edit(t, kv)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6)
    for name, arr in t.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return t, kv
