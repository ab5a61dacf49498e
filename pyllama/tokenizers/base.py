"""What every pyllama tokenizer shares: the token type table, id checks, special-token splitting,
the incremental decoder, and the optional special ids read from GGUF metadata.

The contract (SentencePiece and byte-level BPE alike):
    encode(text, bos=None, eos=False, special=False) -> list[int]
        bos None = the file's own rule (tokenizer.ggml.add_bos_token); special=True turns the
        texts of control tokens (e.g. "<|eot_id|>") into their ids, as llama.cpp's parse_special
    decode(ids) -> str                 the text; control tokens vanish
    decoder() -> IncrementalDecoder    .feed(id) -> str (complete UTF-8 only), .flush() -> str
    token_bytes(id) -> bytes           the raw bytes a token stands for (b"" for control tokens)
    vocab_size, bos_id, eos_id, stop_ids (frozenset: the ids that end generation)
"""
from __future__ import annotations

import codecs
import operator
from typing import Iterable

import numpy as np

from ..errors import FormatError, TokenizerError

# GGUF token types (llama.cpp's llama_token_type); 0 "undefined" is treated as normal.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 0, 1, 2, 3, 4, 5, 6
TYPE_NAMES = ("undefined", "normal", "unknown", "control", "user-defined", "unused", "byte")

# optional special ids: metadata key -> attribute
OPTIONAL_IDS = {"tokenizer.ggml.eot_token_id": "eot_id", "tokenizer.ggml.eom_token_id": "eom_id"}
# control tokens that end a turn whatever the metadata says (llama.cpp's end-of-generation texts;
# e.g. Llama 3 base files name <|end_of_text|> as EOS, instruct files <|eot_id|>: both stop)
END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>",
                     "<|end|>", "<end_of_turn>", "<EOT>", "_<EOT>")


class BaseTokenizer:
    """Shared behaviour; subclasses set ``source``, ``bos_id``, ``eos_id``, ``add_bos``,
    ``eot_id``, ``eom_id``, ``_types`` (list of token types) and implement ``encode``,
    ``decode`` and ``_piece``."""

    source = "<tokenizer>"
    eot_id = eom_id = None
    _eog_ids = frozenset()

    @property
    def stop_ids(self) -> frozenset:
        """The ids that end generation: EOS, EOT and EOM (tokenizer.ggml.*_token_id), and the
        control tokens spelled as in END_OF_GENERATION."""
        return frozenset(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None) \
            | self._eog_ids

    def _bos(self, bos) -> list:
        if not (self.add_bos if bos is None else bos):
            return []
        if self.bos_id is None:
            raise TokenizerError(f"{self.source} has no BOS token (tokenizer.ggml.bos_token_id)")
        return [self.bos_id]

    def _eos(self, eos) -> list:
        if not eos:
            return []
        if self.eos_id is None:
            raise TokenizerError(f"{self.source} has no EOS token (tokenizer.ggml.eos_token_id)")
        return [self.eos_id]

    # ------------------------------------------------------------------ ids
    def check_ids(self, ids: Iterable) -> list:
        """``ids`` as a list of ints, or TokenizerError naming the first invalid one."""
        n = len(self._types)
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 1:
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                bad = ids[(ids < 0) | (ids >= n)][0]
                raise TokenizerError(f"token id {bad} out of range [0, {n}) of {self.source}")
            return ids.tolist()
        try:
            return [self._check_id(i) for i in ids]
        except TypeError:
            raise TokenizerError(f"token ids must be an iterable of ints, found "
                                 f"{type(ids).__name__}") from None

    def ids_valid(self, ids: Iterable) -> bool:
        """Whether every id in ``ids`` is an int in [0, vocab_size)."""
        try:
            self.check_ids(ids)
        except TokenizerError:
            return False
        return True

    def _check_id(self, tid) -> int:
        try:
            if isinstance(tid, bool):
                raise TypeError
            v = operator.index(tid)
        except TypeError:
            raise TokenizerError(f"token id {tid!r} is not an integer") from None
        if not 0 <= v < len(self._types):
            raise TokenizerError(f"token id {v} out of range [0, {len(self._types)}) "
                                 f"of {self.source}")
        return v

    def token_bytes(self, tid) -> bytes:
        """The raw bytes token ``tid`` stands for in decoded text (b"" for control tokens)."""
        return self._piece(self._check_id(tid), False)

    def safe_piece(self, prev_id, tid) -> bytes:
        """The bytes `pyllama run` writes for ``tid`` (a byte stream: characters split across
        tokens join on the terminal). The SentencePiece tokenizer keeps llama2.c's rules."""
        return self.token_bytes(tid)

    def decoder(self) -> "IncrementalDecoder":
        """A streaming decoder: feed ids one at a time, get text only once it is complete."""
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Joins the bytes of consecutive tokens so that a character split across tokens comes out
    whole: ``"".join(map(d.feed, ids)) + d.flush()`` is ``decode(ids)`` for valid output, and no
    piece ends in half a character. Invalid UTF-8 becomes U+FFFD (at flush for a truncated tail)."""

    def __init__(self, tokenizer: BaseTokenizer):
        self._tok, self._first = tokenizer, True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tid) -> str:
        tok = self._tok
        tid = tok._check_id(tid)
        piece = tok._piece(tid, self._first)
        if tok._types[tid] != CONTROL:
            self._first = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """The held-back tail of the stream (U+FFFD for an incomplete character)."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------- helpers
def split_special(text: str, specials) -> list:
    """llama.cpp's special-token partition: for each (text, id) in ``specials`` (longest first),
    every occurrence in the remaining plain fragments becomes the id. Returns str and int items."""
    frags = [text]
    for s, tid in specials:
        if s not in text:
            continue
        out = []
        for f in frags:
            if f.__class__ is str and s in f:
                parts = f.split(s)
                out.append(parts[0])
                for part in parts[1:]:
                    out.append(tid)
                    out.append(part)
            else:
                out.append(f)
        frags = [f for f in out if f != ""]
    return frags


def end_of_generation(specials) -> frozenset:
    """The ids of the (text, id) control tokens spelled as in END_OF_GENERATION."""
    return frozenset(i for t, i in specials if t in END_OF_GENERATION)


def specials_by_length(texts_ids) -> list:
    """(text, id) pairs sorted longest first (ties: lower id first), empty texts dropped."""
    return sorted(((t, i) for t, i in texts_ids if t), key=lambda p: (-len(p[0].encode()), p[1]))


def optional_ids(meta: dict, n: int, source: str) -> dict:
    """eot_id / eom_id from the metadata (None when absent); FormatError when out of range."""
    return {attr: token_id(meta, key, n, source, None) for key, attr in OPTIONAL_IDS.items()}


def token_id(meta: dict, key: str, n: int, source: str, default):
    """The token id stored under ``key`` (``default`` when absent), checked to be in [0, n)."""
    x = meta.get(key, default)
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < n:
        raise FormatError(f"{source}: {key} must be a token id in [0, {n}), found {x!r}")
    return int(x)


def as_text(text) -> str:
    """``text`` as a str that has a UTF-8 encoding, else TokenizerError."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"text is not valid UTF-8: byte 0x{e.object[e.start]:02x} at "
                                 f"byte offset {e.start} ({e.reason})") from None
    if not isinstance(text, str):
        raise TokenizerError(f"text must be str or bytes, found {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text has a lone surrogate U+{ord(text[e.start]):04X} at character "
                             f"index {e.start}, which has no UTF-8 encoding") from None
    return text


def vector(values, n: int, dtype, name: str, source: str) -> np.ndarray:
    """``values`` as a 1-D array of ``n`` numbers of ``dtype``, else FormatError."""
    try:
        a = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{source}: {name}: expected {n} numbers ({e})") from None
    if a.ndim != 1 or len(a) != n:
        raise FormatError(f"{source}: {name}: expected {n} values (one per token), "
                          f"found shape {a.shape}")
    if a.size and a.dtype.kind not in ("iuf" if dtype == np.float32 else "iu"):
        raise FormatError(f"{source}: {name}: expected {np.dtype(dtype).name} values, "
                          f"found {a.dtype}")
    return a.astype(dtype)


def check_types(types: np.ndarray, source: str) -> None:
    bad = np.flatnonzero((types < 0) | (types > BYTE))
    if bad.size:
        raise FormatError(f"{source}: token {bad[0]}: token type must be 0..6, "
                          f"found {types[bad[0]]}")
