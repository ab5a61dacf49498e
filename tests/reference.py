"""A plain numpy (float64) Llama forward pass: the independent reference for pyllama's C path.

weights: dict of canonical GGUF names -> float arrays (rows, cols) or vectors; config as pyllama's.
Written from the model definitions (Meta's Llama reference code, HF's Qwen2), not from pyllama:
  - head_dim: cfg["head_dim"] when given (q has n_heads*head_dim rows), else dim / n_heads;
  - q/k/v biases (blk.N.attn_q.bias ...) are added after the matmul when present;
  - rope_freqs.weight (Llama 3.1 rope scaling) divides pair i's frequency theta^(-2i/head_dim);
  - rope="norm" rotates (2i, 2i+1) (Meta), rope="neox" rotates (i, i+head_dim/2) (HF rotate_half).
"""
import numpy as np


def forward_all(weights, cfg, ids, rope="norm", rows=None):
    """Teacher-forced logits [len(ids), vocab] in float64 (only the positions `rows` if given)."""
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs = cfg.get("head_dim") or dim // n_heads
    eps, theta = cfg["rms_eps"], cfg["rope_theta"]
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    wcls = W.get("output.weight", W["token_embd.weight"])
    T = len(ids)
    x = W["token_embd.weight"][ids]                                  # (T, dim)
    pos = np.arange(T)[:, None]
    freqs = 1.0 / theta ** (np.arange(0, hs, 2) / hs)                # (hs/2,)
    if "rope_freqs.weight" in W:
        freqs = freqs / W["rope_freqs.weight"]
    ang = pos * freqs                                                # (T, hs/2)
    cos, sin = np.cos(ang), np.sin(ang)
    mask = np.triu(np.full((T, T), -np.inf), 1)

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rotate(v, heads):                                            # v: (T, heads*hs)
        c, s = cos[:, None, :], sin[:, None, :]
        if rope == "neox":
            v = v.reshape(T, heads, 2, hs // 2)
            a, b = v[:, :, 0], v[:, :, 1]
            return np.stack([a * c - b * s, a * s + b * c], 2).reshape(T, heads * hs)
        v = v.reshape(T, heads, hs // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(T, heads * hs)

    def linear(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    for l in range(cfg["n_layers"]):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rotate(linear(h, p + "attn_q"), n_heads).reshape(T, n_heads, hs)
        k = rotate(linear(h, p + "attn_k"), n_kv).reshape(T, n_kv, hs)
        v = linear(h, p + "attn_v").reshape(T, n_kv, hs)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, n_heads * hs)
        x = x + o @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    x = x if rows is None else x[rows]
    return rms(x, W["output_norm.weight"]) @ wcls.T
