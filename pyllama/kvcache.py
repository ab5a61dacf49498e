"""What a Transformer's KV cache holds: prefix reuse, context shift, saved states.

The Transformer records the token id at every cached position (Transformer.tokens, kept up to
date by forward() and prefill() whoever calls them) and counts evaluated tokens (n_evaluated).

- evaluate(): runs a prompt, reusing the longest cached prefix; the last prompt token is always
  evaluated again, so its logits are fresh in the logits buffer.
- shift(): llama.cpp's context shift: positions [n_keep, n_keep + n_discard) are dropped and the
  ones after move down, their keys re-rotated by -n_discard positions of RoPE (C: pl_kv_shift).
  The moved positions are then no longer offered for prefix reuse (their values saw the dropped
  tokens), nor are the tokens generated after them.
- save()/load(): a state as bytes: a header naming the model (its config and a hash of its tensor
  layout and first weight bytes), the context size, the cached token ids, then the used positions
  of the key and value caches. load() refuses a state of another model, format or size.
"""
import hashlib
import json
import struct

import numpy as np

from . import validate
from ._core import lib
from .errors import ParameterError, PyllamaError

MAGIC = b"PYLLAMA-KV\0\0"
VERSION = 1
HEAD = struct.Struct("<12sII")  # magic, version, length of the JSON header


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def evaluate(tf, ids, all_logits=False):
    """Run `ids` from position 0, reusing what the cache already holds; returns the logits of
    every newly evaluated token when all_logits (then nothing is reused)."""
    if not ids:
        raise ParameterError("the prompt must hold at least one token")
    if len(ids) > tf.n_ctx:
        raise ParameterError(f"the prompt is {len(ids)} tokens, longer than the context of "
                             f"{tf.n_ctx} positions")
    keep = 0 if all_logits else min(common_prefix(tf.tokens, ids), len(ids) - 1)
    return tf.prefill(ids[keep:], keep, all_logits=all_logits)


def shift(tf, n_keep, n_discard, slot=None):
    """Drop cached positions [n_keep, n_keep + n_discard); the rest moves down. Returns the new
    number of cached positions. slot None: the API's sequence (slot 0, Transformer.tokens); a
    number: that slot of an engine's Transformer (its length is slot_len[slot])."""
    if slot is not None:
        slot = validate.integer(slot, "slot", 0, tf.n_slots - 1)
    n = len(tf.tokens) if slot is None else tf.slot_len[slot]
    if not (0 <= n_keep and 1 <= n_discard and n_keep + n_discard <= n):
        raise ParameterError(f"context shift: cannot drop {n_discard} positions after {n_keep} "
                             f"of {n}")
    src = n_keep + n_discard
    s = tf._state
    if slot is None:
        lib.pl_kv_shift(tf._weights, s, src, n_keep, n - src)
        # the moved positions were computed with the dropped tokens in view: not a prefix a new
        # prompt may reuse (-1: unknown), so the next evaluate() recomputes them
        del tf.tokens[n_keep:src]
        tf.tokens[n_keep:] = [-1] * (len(tf.tokens) - n_keep)
        return len(tf.tokens)
    # the C function works on the cache its state points at: point it at this slot's block
    kc, vc = s.key_cache, s.value_cache
    block = tf._bufs["key_cache"][0].size
    try:
        s.key_cache, s.value_cache = kc + slot * block, vc + slot * block
        lib.pl_kv_shift(tf._weights, s, src, n_keep, n - src)
    finally:
        s.key_cache, s.value_cache = kc, vc
    tf.slot_len[slot] = n - n_discard
    return n - n_discard


def model_identity(tf):
    """A hash of what makes two models the same: config, tensor names/types/shapes and the first
    bytes of every tensor."""
    cached = getattr(tf, "_identity", None)
    if cached is None:
        h = hashlib.sha256(json.dumps(tf.config, sort_keys=True, default=str).encode())
        for name in sorted(tf.file.tensors):
            t = tf.file.tensors[name]
            h.update(f"{name}:{t.type}:{tuple(t.shape)}".encode())
            h.update(np.asarray(t.data).reshape(-1).view(np.uint8)[:256].tobytes())
        cached = tf._identity = h.hexdigest()
    return cached


def _kv_dim(tf):
    c = tf.config
    return c["head_dim"] * c["n_kv_heads"]


def save(tf):
    n = len(tf.tokens)
    head = json.dumps(dict(model=model_identity(tf), n_layers=tf.config["n_layers"], kv_dim=_kv_dim(tf),
                           vocab_size=tf.vocab_size, n_ctx=tf.n_ctx, n_tokens=n)).encode()
    kc, vc = tf._bufs["key_cache"][0], tf._bufs["value_cache"][0]  # slot 0: the API's sequence
    return b"".join([HEAD.pack(MAGIC, VERSION, len(head)), head,
                     np.asarray(tf.tokens, "<i4").tobytes(),
                     _by_position(kc, n).tobytes(), _by_position(vc, n).tobytes()])


def _by_position(cache, n):
    """The first n positions of a slot's cache (layers, kv heads, n_ctx, head_dim) as the saved
    state holds them: (layers, n, kv_dim)."""
    L, H, _, hd = cache.shape
    return np.ascontiguousarray(cache[:, :, :n].transpose(0, 2, 1, 3)).reshape(L, n, H * hd)


def load(tf, data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParameterError(f"state: expected bytes from save_state(), found {type(data).__name__}")
    data = memoryview(data).cast("B")
    if len(data) < HEAD.size or bytes(data[:12]) != MAGIC:
        raise PyllamaError("state: not a pyllama state (save_state() makes one)")
    _, version, hlen = HEAD.unpack_from(data)
    if version != VERSION:
        raise PyllamaError(f"state: version {version}, this pyllama reads version {VERSION}")
    try:
        head = json.loads(bytes(data[HEAD.size:HEAD.size + hlen]))
        n = int(head["n_tokens"])
    except (ValueError, KeyError, TypeError):
        raise PyllamaError("state: the header is damaged") from None
    if head.get("model") != model_identity(tf):
        raise PyllamaError("state: it was saved from another model (its config or weights differ)")
    if not 0 <= n <= tf.n_ctx:
        raise PyllamaError(f"state: it holds {n} positions, this model's context has {tf.n_ctx}")
    L, kv = tf.config["n_layers"], _kv_dim(tf)
    off = HEAD.size + hlen
    size = n * 4 + 2 * L * n * kv * 4
    if len(data) != off + size:
        raise PyllamaError(f"state: {len(data)} bytes, expected {off + size} for {n} positions")
    tokens = np.frombuffer(data, "<i4", n, off).tolist()
    if any(not -1 <= t < tf.vocab_size for t in tokens):
        raise PyllamaError("state: a token id is outside the vocabulary")
    off += 4 * n
    kc, vc = tf._bufs["key_cache"][0], tf._bufs["value_cache"][0]  # slot 0: the API's sequence
    H, hd = kc.shape[1], kc.shape[3]
    for cache, start in ((kc, off), (vc, off + L * n * kv * 4)):
        saved = np.frombuffer(data, np.float32, L * n * kv, start).reshape(L, n, H, hd)
        cache[:, :, :n] = saved.transpose(0, 2, 1, 3)
    tf.tokens[:] = tokens
