"""Model architectures as data: one table per architecture, consulted by the readers, model.py
and convert. Adding an architecture that the C forward pass can already express (rmsnorm, GQA
attention with optional q/k/v biases, RoPE in one of two pair layouts, SwiGLU) is a table entry.

    ARCHS[name]            the Arch table of a GGUF `general.architecture`
    get(name, path)        the Arch, or FormatError naming it and the supported ones
    CONFIG_KEYS            pyllama config field -> (metadata key suffix, kind, default)
    tensor_shapes(arch, cfg) -> {canonical name: (numpy shape, required)}

Metadata keys are `<arch.prefix>.<suffix>` (GGUF's convention: `llama.embedding_length`,
`qwen2.embedding_length`). Shapes are in numpy order (rows, cols); cols is the row length.
Symbols in the shape specs: d = dim, h = hidden_dim, v = vocab_size, q = n_heads * head_dim,
k = n_kv_heads * head_dim, r = head_dim / 2 (one per rotated pair).
"""
from dataclasses import dataclass

from .errors import FormatError

REQUIRED = object()

# pyllama config field -> (metadata key suffix, kind, default). Default REQUIRED: the key must be
# there (in a file with tensors); a str default names another field; None: derived elsewhere
# (vocab_size from token_embd and the tokenizer; head_dim from dim / n_heads). The dict's order is
# the order of ModelFile.config.
CONFIG_KEYS = {
    "dim": ("embedding_length", int, REQUIRED),
    "hidden_dim": ("feed_forward_length", int, REQUIRED),
    "n_layers": ("block_count", int, REQUIRED),
    "n_heads": ("attention.head_count", int, REQUIRED),
    "n_kv_heads": ("attention.head_count_kv", int, "n_heads"),
    "vocab_size": ("vocab_size", int, None),
    "seq_len": ("context_length", int, REQUIRED),
    "rms_eps": ("attention.layer_norm_rms_epsilon", float, 1e-5),
    "rope_theta": ("rope.freq_base", float, 10000.0),
    "head_dim": ("attention.key_length", int, None),
}
# Keys that, when present, must agree with head_dim (pyllama has no partial RoPE and no value
# heads of another size than the key heads).
HEAD_DIM_ALIASES = ("attention.value_length", "rope.dimension_count")

# RoPE pair layouts (pl_config.rope_style; the C values are lib.PL_ROPE_*):
#   "norm"  rotates (2i, 2i+1) of each head (llama2.c, Meta's Llama)
#   "neox"  rotates (i, i + head_dim/2) (GPT-NeoX, Qwen2; HF's rotate_half)
ROPE_STYLES = ("norm", "neox")

# canonical tensor -> shape spec; "blk.N." is prepended to the per-layer ones
GLOBAL_SHAPES = {"token_embd.weight": "vd", "output_norm.weight": "d", "output.weight": "vd",
                 "rope_freqs.weight": "r"}
LAYER_SHAPES = {"attn_norm.weight": "d", "attn_q.weight": "qd", "attn_k.weight": "kd",
                "attn_v.weight": "kd", "attn_output.weight": "dq", "ffn_norm.weight": "d",
                "ffn_gate.weight": "hd", "ffn_down.weight": "dh", "ffn_up.weight": "hd",
                "attn_q.bias": "q", "attn_k.bias": "k", "attn_v.bias": "k"}
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up")
LAYER_BASE = ("attn_norm.weight",) + tuple(f"{n}.weight" for n in LAYER_MATRICES[:4]) + (
    "ffn_norm.weight",) + tuple(f"{n}.weight" for n in LAYER_MATRICES[4:])
BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")


@dataclass(frozen=True)
class Arch:
    name: str                   # general.architecture
    rope_style: str             # one of ROPE_STYLES
    layer_required: tuple       # per-layer tensors (without "blk.N.")
    layer_optional: tuple = ()
    global_required: tuple = ("token_embd.weight", "output_norm.weight")
    global_optional: tuple = ("output.weight",)  # absent output.weight: tied to token_embd
    defaults: tuple = ()        # (config field, value) overriding CONFIG_KEYS' defaults

    @property
    def prefix(self):
        return self.name

    def key(self, field_or_suffix):
        """The metadata key of a config field (or of a bare suffix)."""
        suffix = CONFIG_KEYS[field_or_suffix][0] if field_or_suffix in CONFIG_KEYS else field_or_suffix
        return f"{self.prefix}.{suffix}"

    def default(self, field):
        return dict(self.defaults).get(field, CONFIG_KEYS[field][2])


ARCHS = {
    # Llama 1/2/3.x, Mistral (no sliding window), TinyLlama, SmolLM: Llama 3.1+ rope scaling comes
    # as rope_freqs.weight (per-frequency divisors); biases are rare but legal (llama.cpp's too).
    "llama": Arch("llama", "norm", LAYER_BASE, layer_optional=BIASES,
                  global_optional=("output.weight", "rope_freqs.weight")),
    # Qwen2 / Qwen2.5: q/k/v biases always, NeoX rope.
    "qwen2": Arch("qwen2", "neox", LAYER_BASE + BIASES, defaults=(("rms_eps", 1e-6),)),
}
LLAMA = ARCHS["llama"]


def get(name, path="model"):
    """The Arch of `general.architecture` = name, or FormatError naming it and the supported."""
    if isinstance(name, str) and name in ARCHS:
        return ARCHS[name]
    supported = ", ".join(f"'{n}'" for n in ARCHS)
    raise FormatError(f"{path}: unsupported architecture {name!r:.60} (general.architecture): "
                      f"pyllama runs {supported}")


def _dims(cfg):
    hd = cfg["head_dim"]
    return {"d": cfg["dim"], "h": cfg["hidden_dim"], "v": cfg["vocab_size"],
            "q": cfg["n_heads"] * hd, "k": cfg["n_kv_heads"] * hd, "r": hd // 2}


def tensor_shapes(arch, cfg):
    """{canonical name: (numpy shape, required)} of every tensor `arch` uses, in file order."""
    dims = _dims(cfg)

    def shape(spec):
        return tuple(dims[c] for c in spec)

    out = {n: (shape(GLOBAL_SHAPES[n]), True) for n in arch.global_required[:1]}
    for i in range(cfg["n_layers"]):
        for n in arch.layer_required + arch.layer_optional:
            out[f"blk.{i}.{n}"] = (shape(LAYER_SHAPES[n]), n in arch.layer_required)
    for n in arch.global_required[1:]:
        out[n] = (shape(GLOBAL_SHAPES[n]), True)
    for n in arch.global_optional:
        out[n] = (shape(GLOBAL_SHAPES[n]), False)
    return out


def metadata(arch, cfg):
    """[(key, kind, value)] of the architecture's hyper-parameters, as a writer stores them."""
    fields = ("seq_len", "dim", "n_layers", "hidden_dim")
    out = [(arch.key(f), int, cfg[f]) for f in fields]
    out.append((arch.key("rope.dimension_count"), int, cfg["head_dim"]))
    out += [(arch.key(f), CONFIG_KEYS[f][1], cfg[f])
            for f in ("n_heads", "n_kv_heads", "rms_eps", "rope_theta")]
    if cfg["dim"] % cfg["n_heads"] or cfg["head_dim"] != cfg["dim"] // cfg["n_heads"]:
        out.append((arch.key("head_dim"), int, cfg["head_dim"]))
        out.append((arch.key("attention.value_length"), int, cfg["head_dim"]))
    return out
