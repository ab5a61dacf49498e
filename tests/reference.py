"""A plain numpy (float64) Llama-2 forward pass: the independent reference for pyllama's C path.

weights: dict of canonical GGUF names -> float arrays (rows, cols); config as pyllama's.
"""
import numpy as np


def forward_all(weights, cfg, ids):
    """Teacher-forced logits [len(ids), vocab] in float64."""
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs = dim // n_heads
    eps, theta = cfg["rms_eps"], cfg["rope_theta"]
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    wcls = W.get("output.weight", W["token_embd.weight"])
    T = len(ids)
    x = W["token_embd.weight"][ids]                                  # (T, dim)
    pos = np.arange(T)[:, None]
    freqs = 1.0 / theta ** (np.arange(0, hs, 2) / hs)                # (hs/2,)
    ang = pos * freqs                                                # (T, hs/2)
    cos, sin = np.cos(ang), np.sin(ang)
    mask = np.triu(np.full((T, T), -np.inf), 1)

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v, heads):                                              # v: (T, heads*hs)
        v = v.reshape(T, heads, hs // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(T, heads * hs)

    for l in range(cfg["n_layers"]):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope(h @ W[p + "attn_q.weight"].T, n_heads).reshape(T, n_heads, hs)
        k = rope(h @ W[p + "attn_k.weight"].T, n_kv).reshape(T, n_kv, hs)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, n_kv, hs)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, dim)
        x = x + o @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    return rms(x, W["output_norm.weight"]) @ wcls.T
