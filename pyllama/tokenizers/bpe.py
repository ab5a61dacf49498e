"""Byte-level BPE (GGUF ``tokenizer.ggml.model = "gpt2"``): Llama 3, Qwen2, SmolLM, GPT-2.

Encoding, as llama.cpp's BPE tokenizer does it:
  1. special tokens: user-defined token texts always, control-token texts with ``special=True``,
     split the text first (longest first); each becomes its id;
  2. the pre-tokenizer of ``tokenizer.ggml.pre`` (PRE_TOKENIZERS below) cuts each plain fragment
     into pre-tokens with one or more regexes (the ``regex`` package: \\p{L}, \\p{N} ...);
  3. each pre-token's UTF-8 bytes become GPT-2's printable byte alphabet (byte b -> one char);
     with ``ignore_merges`` (llama-bpe) a pre-token that is a vocabulary entry is one token;
     otherwise the adjacent pair with the lowest merge rank (its line in tokenizer.ggml.merges,
     leftmost on ties) merges until no pair has a rank; each symbol is then its token.
Results per pre-token are cached (real text repeats its words). Decoding maps the alphabet back
to bytes; user-defined tokens are their own text, control tokens are empty.
"""
from __future__ import annotations

import heapq
import operator
from itertools import chain, compress, repeat
from typing import Iterable, Optional

import numpy as np
import regex

from ..errors import FormatError, TokenizerError
from ..formats.common import MAX_VOCAB
from .base import (CONTROL, NORMAL, TYPE_NAMES, UNDEFINED, UNKNOWN, USER_DEFINED,
                   BaseTokenizer, as_text, check_types, end_of_generation, optional_ids, specials_by_length,
                   split_special, token_id, vector)

# ---------------------------------------------------------------------- pre-tokenizers
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _llama3_like(digits: str) -> str:
    return (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# name -> (regexes applied in turn, each splitting the pieces of the previous one; ignore_merges;
#          add_bos when the file does not say). As llama.cpp's llama-vocab.cpp defines them.
PRE_TOKENIZERS = {
    "llama-bpe": ((_llama3_like(r"\p{N}{1,3}"),), True, True),
    "qwen2": ((_llama3_like(r"\p{N}"),), False, False),
    "smollm": ((r"\p{N}", _GPT2), False, False),
    "gpt-2": ((_GPT2,), False, False),
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
}
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "gpt2": "gpt-2"}
_COMPILED: dict = {}

# ---------------------------------------------------------------------- GPT-2 byte alphabet
# bytes that are printable in Latin-1 stand for themselves; the other 68 map to U+0100 onwards
_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
BYTE_TO_CHAR = [""] * 256
for _b in _PRINTABLE:
    BYTE_TO_CHAR[_b] = chr(_b)
for _k, _b in enumerate(b for b in range(256) if not BYTE_TO_CHAR[b]):
    BYTE_TO_CHAR[_b] = chr(0x100 + _k)
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
_ENCODE = {b: c for b, c in enumerate(BYTE_TO_CHAR)}          # for str.translate of latin-1 text
_DECODE = {ord(c): chr(b) for b, c in enumerate(BYTE_TO_CHAR)}
_DECODE.update({c: "\uffff" for c in range(256) if chr(c) not in CHAR_TO_BYTE})  # not alphabet

_NORMAL = (UNDEFINED, NORMAL)  # types whose text is in the byte alphabet
_CACHE_MAX, _CACHED_MAX_CHARS, _SCAN_MAX = 1 << 16, 256, 4096
# a merge is keyed by its pair of ids (left << _SHIFT | right), valued rank << _SHIFT | result id:
# min() of values is the lowest rank, and the value's low bits are the merged token
_SHIFT = MAX_VOCAB.bit_length()
_MASK = (1 << _SHIFT) - 1
_NO_RANK = 1 << 80


class BPETokenizer(BaseTokenizer):
    """A byte-level BPE vocabulary: ``tokens`` (GGUF strings), ``merges`` ("A B" lines, rank =
    position), ``token_types``, the pre-tokenizer name and the special ids."""

    kind = "bpe"

    def __init__(self, tokens: list, merges: list, token_types=None, pre: str = "default",
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 add_bos: Optional[bool] = None, eot_id=None, eom_id=None,
                 source: str = "<tokenizer>"):
        self.source = source
        n = _check_tokens(tokens, source)
        types = np.full(n, NORMAL, np.int32) if token_types is None else \
            vector(token_types, n, np.int32, "tokenizer.ggml.token_type", source)
        check_types(types, source)
        self.token_types, self._types = types, types.tolist()
        self.pre = PRE_ALIASES.get(pre, pre)
        if self.pre not in PRE_TOKENIZERS:
            raise FormatError(f"{source}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre): "
                              f"supported are {', '.join(sorted(PRE_TOKENIZERS))}")
        patterns, self.ignore_merges, default_bos = PRE_TOKENIZERS[self.pre]
        self._regexes = [_compiled(p) for p in patterns]
        self._findall = self._regexes[0].findall if self.pre in ("llama-bpe", "qwen2") else None
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.add_bos = default_bos if add_bos is None else bool(add_bos)
        if self.add_bos and bos_id is None:
            raise FormatError(f"{source}: tokenizer.ggml.add_bos_token is true but there is no "
                              f"tokenizer.ggml.bos_token_id")
        normal = np.flatnonzero(np.isin(types, _NORMAL)).tolist()
        _check_alphabet(tokens, normal, types, source)
        self._bytes: list = [None] * n   # each token's bytes, made when first needed
        self._texts = tokens
        self._ids = {tokens[i]: i for i in normal}    # byte-level text -> id
        self._byte_ids = [self._ids.get(c) for c in BYTE_TO_CHAR]
        self._merges = _merge_table(merges, self._ids, source)
        user = np.flatnonzero(types == USER_DEFINED).tolist()
        special = np.flatnonzero(np.isin(types, (CONTROL, UNKNOWN, USER_DEFINED))).tolist()
        self._user = specials_by_length((tokens[i], i) for i in user)
        self._special = specials_by_length((tokens[i], i) for i in special)
        self._eog_ids = end_of_generation((tokens[i], i) for i in special if types[i] == CONTROL)
        self.max_piece_chars = max(map(len, tokens))  # bytes (= alphabet chars) of the longest
        self._cache: dict = {}

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "<gguf>") -> "BPETokenizer":
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        for key, v in (("tokens", tokens), ("merges", merges)):
            if v is None:
                raise FormatError(f"{source}: missing metadata key tokenizer.ggml.{key}")
            if not isinstance(v, list):
                raise FormatError(f"{source}: tokenizer.ggml.{key}: expected an array of "
                                  f"strings, found {type(v).__name__}")
        n = _check_tokens(tokens, source, duplicates=False)  # (__init__ checks those)
        pre = meta.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str):
            raise FormatError(f"{source}: tokenizer.ggml.pre: expected a string, found {pre!r:.40}")
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is not None and not isinstance(add_bos, (bool, np.bool_)):
            raise FormatError(f"{source}: tokenizer.ggml.add_bos_token: expected a bool, found "
                              f"{type(add_bos).__name__}")
        ids = {attr: token_id(meta, f"tokenizer.ggml.{attr[:3]}_token_id", n, source, None)
               for attr in ("bos_id", "eos_id")}
        return cls(tokens, merges, meta.get("tokenizer.ggml.token_type"), pre, add_bos=add_bos,
                   source=source, **ids, **optional_ids(meta, n, source))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self._types)

    def __repr__(self) -> str:
        return f"BPETokenizer({self.source!r}, vocab_size={self.vocab_size}, pre={self.pre!r})"

    # ------------------------------------------------------------------ encoding
    def encode(self, text, bos: Optional[bool] = None, eos: bool = False,
               special: bool = False) -> list:
        """Token ids of ``text`` (str, or UTF-8 bytes). ``bos=None``: the file's add_bos rule;
        ``special``: control-token texts become their ids (user-defined ones always do)."""
        text = as_text(text)
        ids = self._bos(bos)
        specials = self._special if special else self._user
        for frag in (split_special(text, specials) if specials else (text,)):
            if frag.__class__ is str:
                ids += self._encode_plain(frag)
            else:
                ids.append(frag)
        return ids + self._eos(eos)

    def _pretokens(self, text: str) -> list:
        if self._findall is not None:  # one regex that matches every character
            return self._findall(text)
        pieces = [text]
        for rx in self._regexes:  # llama.cpp: each regex splits the pieces left by the last
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    s, e = m.span()
                    if s == e:
                        continue
                    if s > pos:
                        out.append(p[pos:s])
                    out.append(p[s:e])
                    pos = e
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def _encode_plain(self, text: str) -> list:
        pieces = self._pretokens(text)
        cache = self._cache
        found = list(map(cache.get, pieces))
        if None in found:  # BPE once per new distinct pre-token
            fresh = {p: self._bpe(p) for p in set(compress(pieces, map(operator.not_, found)))}
            found = list(map(fresh.get, pieces, found))
            if len(cache) + len(fresh) > _CACHE_MAX:  # drop the older half (dicts keep order)
                for key in list(cache)[:len(cache) // 2]:
                    cache.pop(key, None)  # (another thread may have dropped it already)
            cache.update((p, ids) for p, ids in fresh.items() if len(p) <= _CACHED_MAX_CHARS)
        return list(chain.from_iterable(found))

    def _bpe(self, piece: str) -> list:
        """Token ids of one pre-token."""
        raw = piece.encode()
        if self.ignore_merges:
            tid = self._ids.get(raw.decode("latin-1").translate(_ENCODE))
            if tid is not None:
                return [tid]
        ids = list(map(self._byte_ids.__getitem__, raw))
        if None in ids:
            b = raw[ids.index(None)]
            raise TokenizerError(f"{self.source} has no token for the byte 0x{b:02x}")
        if len(ids) < 2:
            return ids
        return (_merge_scan if len(ids) <= _SCAN_MAX else _merge_heap)(ids, self._merges)

    # ------------------------------------------------------------------ decoding
    def _piece(self, tid: int, first: bool = False) -> bytes:
        b = self._bytes[tid]
        if b is None:
            t = self._types[tid]
            text = self._texts[tid]
            b = self._bytes[tid] = (text.translate(_DECODE).encode("latin-1") if t in _NORMAL
                                    else text.encode() if t == USER_DEFINED else b"")
        return b

    def decode(self, ids: Iterable) -> str:
        """Text of ``ids``: the tokens' bytes as UTF-8 (U+FFFD for invalid sequences)."""
        piece = self._piece
        return b"".join([piece(i) for i in self.check_ids(ids)]).decode("utf-8", "replace")

    def token_text(self, tid) -> str:
        """The token as the vocabulary spells it (e.g. "Ġthe", "<|eot_id|>")."""
        return self._texts[self._check_id(tid)]


# ---------------------------------------------------------------------- merging
def _merge_scan(ids: list, merges: dict) -> list:
    """Lowest-rank adjacent pair first (leftmost on ties): a list of the pairs' merge values,
    min() finds the pair, only its two neighbours are looked up again. O(n) per merge in C."""
    get = merges.get
    r = [get(a << _SHIFT | b, _NO_RANK) for a, b in zip(ids, ids[1:])]
    while r:
        best = min(r)
        if best == _NO_RANK:
            break
        i = r.index(best)
        ids[i] = best & _MASK
        del ids[i + 1], r[i]
        if i:
            r[i - 1] = get(ids[i - 1] << _SHIFT | ids[i], _NO_RANK)
        if i < len(r):
            r[i] = get(ids[i] << _SHIFT | ids[i + 1], _NO_RANK)
    return ids


def _merge_heap(ids: list, merges: dict) -> list:
    """The same merges with a heap over a linked list: O(n log n), for very long pre-tokens."""
    n = len(ids)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    get = merges.get
    heap: list = []

    def push(i, j):
        v = get(ids[i] << _SHIFT | ids[j])
        if v is not None:  # (a symbol's id at a position never comes back once it merged)
            heapq.heappush(heap, (v, i, ids[i], j, ids[j]))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        v, i, a, j, b = heapq.heappop(heap)
        if ids[i] != a or ids[j] != b or nxt[i] != j:
            continue  # stale: a side has merged since
        ids[i], ids[j] = v & _MASK, None
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        if prv[i] >= 0:
            push(prv[i], i)
        if nxt[i] < n:
            push(i, nxt[i])
    return [t for t in ids if t is not None]


# ---------------------------------------------------------------------- loading
def _compiled(pattern: str):
    rx = _COMPILED.get(pattern)
    if rx is None:
        rx = _COMPILED[pattern] = regex.compile(pattern)
    return rx


def _check_tokens(tokens, source: str, duplicates: bool = True) -> int:
    n = len(tokens) if isinstance(tokens, list) else 0
    if not isinstance(tokens, list) or not 0 < n <= MAX_VOCAB:
        what = f"{n} tokens" if isinstance(tokens, list) else type(tokens).__name__
        raise FormatError(f"{source}: tokenizer.ggml.tokens: expected a list of 1 to {MAX_VOCAB} "
                          f"strings, found {what}")
    if set(map(type, tokens)) != {str}:
        i = next(i for i, t in enumerate(tokens) if type(t) is not str)
        raise FormatError(f"{source}: tokenizer.ggml.tokens[{i}]: expected a string, found "
                          f"{type(tokens[i]).__name__}")
    if duplicates and len(set(tokens)) != n:
        seen: dict = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise FormatError(f"{source}: duplicate token {t!r:.60}: ids {seen[t]} and {i}")
            seen[t] = i
    return n


def _check_alphabet(tokens: list, normal: list, types: np.ndarray, source: str) -> None:
    """FormatError for a normal token holding a character outside the byte alphabet."""
    joined = "".join([tokens[i] for i in normal]).translate(_DECODE)
    if joined and max(joined) > "\xff":
        for i in normal:
            bad = [c for c in tokens[i] if c not in CHAR_TO_BYTE]
            if bad:
                raise FormatError(
                    f"{source}: token {i} {tokens[i]!r:.60} ({TYPE_NAMES[types[i]]}) holds "
                    f"{bad[0]!r} (U+{ord(bad[0]):04X}), which is not in the byte-level BPE "
                    f"alphabet: not a gpt2 vocabulary")


def _merge_table(merges: list, ids: dict, source: str) -> dict:
    """(left id, right id) key -> rank and result id (see _SHIFT), from the "A B" lines (rank =
    position, the first of repeated lines wins). Each line must be two normal tokens separated by
    one space whose concatenation is a token too (as Hugging Face's BPE requires). The checks
    run on all lines at once; the line-by-line loop only names the first bad one."""
    if set(map(type, merges)) - {str}:
        i = next(i for i, m in enumerate(merges) if type(m) is not str)
        raise FormatError(f"{source}: tokenizer.ggml.merges[{i}]: expected a string, found "
                          f"{type(merges[i]).__name__}")
    if not merges:
        return {}
    space, joined = " ", "\n".join(merges)
    ok = (set(map(str.count, merges, repeat(space))) == {1} and joined.count("\n") == len(merges) - 1
          and not any(map(str.startswith, merges, repeat(space)))
          and not any(map(str.endswith, merges, repeat(space))))
    parts = list(map(ids.get, joined.replace("\n", space).split(space))) if ok else [None]
    results = list(map(ids.get, joined.replace(space, "").split("\n"))) if ok else [None]
    if None in parts or None in results:
        _name_bad_merge(merges, ids, source)
    n = len(merges)
    keys = np.array(parts[0::2], np.int64) << _SHIFT | np.array(parts[1::2], np.int64)
    values = np.arange(n, dtype=np.int64) << _SHIFT | np.array(results, np.int64)
    return dict(zip(keys[::-1].tolist(), values[::-1].tolist()))


def _name_bad_merge(merges: list, ids: dict, source: str):
    for i, line in enumerate(merges):
        a, sep, b = line.partition(" ")
        if not a or not b or " " in b or "\n" in line:
            raise FormatError(f"{source}: tokenizer.ggml.merges[{i}] = {line!r:.60}: expected "
                              f"two tokens separated by one space")
        if a not in ids or b not in ids or a + b not in ids:
            what = a if a not in ids else b if b not in ids else a + b
            raise FormatError(f"{source}: tokenizer.ggml.merges[{i}] = {line!r:.60} names "
                              f"{what!r:.40}, which is not a token of the vocabulary")
    raise AssertionError("unreachable: the bulk check found a bad merge line")
