"""SentencePiece BPE for Llama-2 vocabularies, read from llama2.c's tokenizer.bin or GGUF metadata.

Encoding is SentencePiece's BPE (what llama2.c's run.c ``encode()`` and llama.cpp's SPM tokenizer
also do): optional dummy-prefix space, one symbol per code point, then repeatedly merge the
adjacent pair whose concatenation is a vocabulary piece with the HIGHEST score (leftmost on ties);
symbols that are not pieces become byte tokens ``<0xXX>`` (or ``<unk>`` without byte tokens).

Where the references differ, this module follows ``sentencepiece`` (tests/test_tokenizer.py checks
it against the real library on generated strings):
  * U+2581 ``▁`` in the input is a space (SentencePiece escapes spaces to it; llama2.c would emit
    its three bytes as byte tokens instead).
  * Merging works on text, so two characters that are not pieces themselves can still merge into
    a piece (llama2.c turns them into bytes first). No Llama-2 piece contains such a character,
    so for Llama-2 both agree.
  * ``decode()`` is SentencePiece's DecodeIds: control tokens vanish, the leading space of the
    first visible piece is dropped, ``<unk>`` reads " ⁇ ", and each byte of an invalid UTF-8
    sequence becomes U+FFFD. ``decode_piece()``/``safe_piece()`` are llama2.c's streaming
    ``decode()``/``safe_printf()`` instead (for byte-exact parity of ``run`` output): control
    tokens are empty in decode_piece; safe_piece prints them as llama2.c does ("\\n</s>\\n") for a
    tokenizer.bin and not at all for a GGUF vocabulary (as llama.cpp).

Speed: a priority queue of candidate pairs over a linked list of symbols with lazy invalidation
(O(n log n)); the text is also cut into words where no piece can span the cut (checked on the
vocabulary, e.g. before " x" after a non-space) and words are cached.
"""
from __future__ import annotations

import heapq
import os
import re
import struct
from typing import Iterable, Optional

import numpy as np

from ..errors import FormatError, ParameterError
from ..formats import read_file
from .base import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, BaseTokenizer,
                   as_text as _as_text, check_types, end_of_generation, optional_ids,
                   specials_by_length, split_special, vector as _vector)

_MERGEABLE = (0, NORMAL, USER_DEFINED, UNUSED)  # pieces BPE may produce (SentencePiece's pieces_)

GGUF_KEYS = {  # metadata key -> default (None = required)
    "tokenizer.ggml.model": None,
    "tokenizer.ggml.tokens": None,
    "tokenizer.ggml.scores": None,
    "tokenizer.ggml.token_type": (),
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.ggml.add_space_prefix": True,
}

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>\Z")
_SPM_SPACE = "\u2581"                  # SentencePiece's visible space "▁"
_UNK_SURFACE = " \u2047 "              # what SentencePiece's decode prints for <unk>
_WORD = re.compile(r"[^ ]+| +[^ ]*")   # words: cut before a space that follows a non-space
_CROSSES_WORD = re.compile(r"[^ ] ")   # a piece containing this could span a cut
_CROSSES_WORD_JOINED = re.compile(r"[^ \0] ")
_PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\v\f\r")  # C isprint || isspace
_ESCAPED_TO_FFFD = {c: 0xFFFD for c in range(0xDC80, 0xDD00)}  # surrogateescape'd bytes
_CACHE_MAX, _CACHED_WORD_MAX = 1 << 16, 64
_HEADER, _RECORD = struct.Struct("<I"), struct.Struct("<fI")


class Tokenizer(BaseTokenizer):
    """A SentencePiece BPE vocabulary: ``pieces[i]`` (bytes, real spaces) with ``scores[i]``."""

    kind = "spm"
    pre = None

    def __init__(self, pieces: list, scores, token_types=None, bos_id: int = 1, eos_id: int = 2,
                 unk_id: int = 0, add_bos: bool = True, add_space_prefix: bool = True,
                 source: str = "<tokenizer>", eot_id=None, eom_id=None):
        n = len(pieces)
        self.source = source
        if n == 0:
            raise FormatError(f"{source}: empty vocabulary")
        self._pieces = list(pieces)
        if set(map(type, self._pieces)) != {bytes}:
            i = next(i for i, p in enumerate(self._pieces) if type(p) is not bytes)
            raise FormatError(f"{source}: token {i}: piece must be bytes, "
                              f"found {type(self._pieces[i]).__name__}")
        self.scores = _vector(scores, n, np.float32, "scores", source)
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < n:
                raise FormatError(f"{source}: {name} must be a token id in [0, {n}), found {v!r}")
        self.bos_id, self.eos_id, self.unk_id = int(bos_id), int(eos_id), int(unk_id)
        self.eot_id, self.eom_id = eot_id, eom_id
        self.add_bos, self.add_space_prefix = bool(add_bos), bool(add_space_prefix)
        # llama2.c prints control pieces as text ("\n</s>\n"); GGUF runners print nothing
        self.prints_control = token_types is None
        if token_types is None:  # llama2.c's tokenizer.bin: infer what SentencePiece stored
            types = np.full(n, NORMAL, np.int32)
            six = np.flatnonzero(np.fromiter(map(len, self._pieces), np.int64, n) == 6)  # <0xXX>
            types[[i for i in six.tolist() if _BYTE_PIECE.match(self._pieces[i])]] = BYTE
            types[self.unk_id] = UNKNOWN
            types[self.bos_id] = types[self.eos_id] = CONTROL
            token_types = types
        self.token_types = _vector(token_types, n, np.int32, "token_type", source)
        check_types(self.token_types, source)
        self._types = self.token_types.tolist()
        self._merge_scores = (-self.scores).tolist()  # heap order: max score first
        self._byte_value: dict = {}     # byte token id -> its byte
        self._byte_ids = [None] * 256   # byte -> its byte token id
        for i in np.flatnonzero(self.token_types == BYTE).tolist():
            m = _BYTE_PIECE.match(self._pieces[i])
            if not m:
                raise FormatError(f"{source}: token {i} is a byte token but its piece is "
                                  f"{self._pieces[i]!r}, expected <0xXX>")
            b = int(m.group(1), 16)
            self._byte_value[i] = b
            if self._byte_ids[b] is None:
                self._byte_ids[b] = i
        # piece text -> id for every piece BPE may produce (non-empty valid UTF-8 of a mergeable
        # type; the first id wins for a repeated text)
        cand = np.flatnonzero(np.isin(self.token_types, _MERGEABLE)).tolist()
        texts = _decode_each([self._pieces[i] for i in cand])
        self._ids: dict = dict(zip(reversed(texts), reversed(cand)))  # (no tuples: no GC runs)
        self._ids.pop(None, None)  # invalid UTF-8: can never match text
        self._ids.pop("", None)
        winners = np.fromiter(self._ids.values(), np.int64, len(self._ids))
        winner_types = self.token_types[winners]
        self._unused = set(winners[winner_types == UNUSED].tolist())
        self._user_defined: dict = {}   # first char -> user-defined pieces, longest first
        for i in np.sort(winners[winner_types == USER_DEFINED]).tolist():
            text = self._pieces[i].decode("utf-8")
            self._user_defined.setdefault(text[0], []).append(text)
        for group in self._user_defined.values():
            group.sort(key=len, reverse=True)
        self._split_words = not _any_crosses_word(self._ids)
        self.max_piece_chars = max(map(len, self._ids), default=1)
        self._cache: dict = {}
        # what encode(special=True) recognises in text: GGUF control/unknown pieces ("<s>");
        # none for a tokenizer.bin, whose control pieces read "\n<s>\n" (llama2.c parses none)
        specials = [] if self.prints_control else \
            np.flatnonzero(np.isin(self.token_types, (CONTROL, UNKNOWN))).tolist()
        self._specials = specials_by_length(
            (t, i) for t, i in zip(_decode_each([self._pieces[i] for i in specials]), specials)
            if t is not None)
        self._eog_ids = end_of_generation((t, i) for t, i in self._specials
                                          if self._types[i] == CONTROL)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_llama2c(cls, path, vocab_size: int) -> "Tokenizer":
        """Read llama2.c's tokenizer.bin; ``vocab_size`` (from the model) is the token count."""
        path = os.fspath(path)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
                or vocab_size < 1:
            raise ParameterError(f"{path}: vocab_size must be a positive integer, "
                                 f"found {vocab_size!r}")
        data = read_file(path, "tokenizer file")
        size = len(data)
        if size < _HEADER.size:
            raise FormatError(f"{path}: truncated header: expected 4 bytes (u32 max_token_length), "
                              f"found {size}")
        (max_len,) = _HEADER.unpack_from(data, 0)
        # each record takes at least 8 bytes: more tokens than that cannot be in the file
        fits = vocab_size <= (size - _HEADER.size) // _RECORD.size
        pieces, scores = _records(data, vocab_size) if fits else (None, None)
        if pieces is None or max(map(len, pieces), default=0) > max_len:
            _check_records(path, data, vocab_size, max_len)  # raises, naming the bad token
        end = _HEADER.size + vocab_size * _RECORD.size + sum(map(len, pieces))
        if end != size:  # the file does not store its size: it must end after the last token
            raise FormatError(f"{path}: holds {_count_records(data)} tokens (its records continue "
                              f"after token {vocab_size - 1}, at offset {end} of {size} bytes), "
                              f"but the model's vocab_size is {vocab_size}: this tokenizer does "
                              f"not belong to the model")
        return cls(pieces, np.array(scores, np.float32), source=path)


    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "<gguf>") -> "Tokenizer":
        """Build from GGUF metadata (``tokenizer.ggml.*`` keys, see GGUF_KEYS)."""
        v = {}
        for key, default in GGUF_KEYS.items():
            if meta.get(key) is None and default is None:
                raise FormatError(f"{source}: missing metadata key {key}")
            v[key] = meta.get(key, default)
        model = v["tokenizer.ggml.model"]
        if not isinstance(model, str) or model != "llama":
            raise FormatError(f"{source}: unsupported tokenizer model {model!r} (tokenizer.ggml."
                              f"model): only 'llama' (SentencePiece BPE) is supported")
        for key in ("tokens", "scores", "token_type"):
            if not isinstance(v["tokenizer.ggml." + key], (list, tuple, np.ndarray)):
                raise FormatError(f"{source}: tokenizer.ggml.{key}: expected an array, found "
                                  f"{type(v['tokenizer.ggml.' + key]).__name__}")
        for key in ("add_bos_token", "add_space_prefix"):
            if not isinstance(v["tokenizer.ggml." + key], (bool, np.bool_)):
                raise FormatError(f"{source}: tokenizer.ggml.{key}: expected a bool, found "
                                  f"{type(v['tokenizer.ggml.' + key]).__name__}")
        tokens = list(v["tokenizer.ggml.tokens"])
        joined = "\0".join(tokens) if tokens and set(map(type, tokens)) == {str} else None
        if joined is not None and joined.count("\0") == len(tokens) - 1:  # no piece holds a NUL
            pieces = joined.replace(_SPM_SPACE, " ").encode("utf-8", "surrogatepass").split(b"\0")
        else:
            pieces = []
            for i, t in enumerate(tokens):
                if isinstance(t, str):
                    t = t.encode("utf-8", "surrogatepass")
                elif not isinstance(t, (bytes, bytearray)):
                    raise FormatError(f"{source}: tokenizer.ggml.tokens[{i}]: expected a string, "
                                      f"found {type(t).__name__}")
                pieces.append(bytes(t).replace(_SPM_SPACE.encode(), b" "))
        types = v["tokenizer.ggml.token_type"]
        ids = []
        for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
            x = v["tokenizer.ggml." + key]
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) \
                    or not 0 <= x < len(pieces):
                raise FormatError(f"{source}: tokenizer.ggml.{key} must be a token id in "
                                  f"[0, {len(pieces)}), found {x!r}")
            ids.append(int(x))
        return cls(pieces, v["tokenizer.ggml.scores"], types if len(types) else None,
                   *ids, add_bos=bool(v["tokenizer.ggml.add_bos_token"]),
                   add_space_prefix=bool(v["tokenizer.ggml.add_space_prefix"]), source=source,
                   **optional_ids(meta, len(pieces), source))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def pieces(self) -> list:
        """Token pieces as bytes, with real spaces (a copy)."""
        return list(self._pieces)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encoding
    def encode(self, text, bos: Optional[bool] = None, eos: bool = False,
               special: bool = False) -> list:
        """Token ids of ``text`` (str, or UTF-8 bytes); ``bos=None`` means ``self.add_bos``.
        ``special=True``: control-token texts ("<s>", "</s>") become their ids, and each plain
        fragment gets the dummy-prefix space (as llama.cpp's parse_special)."""
        text = _as_text(text)
        ids = self._bos(bos)
        for frag in (split_special(text, self._specials) if special else (text,)):
            if frag.__class__ is str:
                self._encode_plain(frag, ids)
            else:
                ids.append(frag)
        return ids + self._eos(eos)

    def _encode_plain(self, text: str, ids: list) -> None:
        if text:
            text = text.replace(_SPM_SPACE, " ")
            if self.add_space_prefix:
                text = " " + text
            cache = self._cache
            for word in (_WORD.findall(text) if self._split_words else (text,)):
                word_ids = cache.get(word)
                if word_ids is None:
                    word_ids = self._bpe(word)
                    if len(word) <= _CACHED_WORD_MAX:
                        if len(cache) >= _CACHE_MAX:
                            cache.clear()
                        cache[word] = word_ids
                ids.extend(word_ids)

    def _bpe(self, text: str) -> list:
        """SentencePiece BPE of one word. A symbol is the span [start, end[start]) of ``text``."""
        n, vocab, neg_scores = len(text), self._ids, self._merge_scores
        starts, frozen = self._initial_symbols(text)
        end, prev = [-1] * (n + 1), [-1] * (n + 1)
        for a, b in zip(starts, starts[1:] + [n]):
            end[a], prev[b] = b, a
        frozen = frozen or ()

        def pair(i, j, k):  # the merge of [i, j) and [j, k) if it is a piece, else None
            tid = vocab.get(text[i:k])
            if tid is None or i in frozen or j in frozen or neg_scores[tid] != neg_scores[tid]:
                return None  # (NaN scores never merge, as in llama2.c)
            return neg_scores[tid], i, j, k, tid

        heap = [p for p in map(pair, starts, starts[1:], starts[2:] + [n]) if p]
        heapq.heapify(heap)
        split = {}
        while heap:
            _, i, j, k, tid = heapq.heappop(heap)
            if end[i] != j or end[j] != k:
                continue  # stale: one side has merged since
            end[i], end[j], prev[k] = k, -1, i
            if tid in self._unused:
                split[i, k] = j  # SentencePiece re-splits unused pieces at the end
            left = pair(prev[i], i, k) if prev[i] >= 0 else None
            right = pair(i, k, end[k]) if k < n else None
            if left:
                heapq.heappush(heap, left)
            if right:
                heapq.heappush(heap, right)
        out, i = [], 0
        while i < n:
            self._emit(text, i, end[i], split, out)
            i = end[i]
        return out

    def _initial_symbols(self, text: str):
        """Symbol starts: one per code point or user-defined piece (frozen: never merged)."""
        if not self._user_defined:
            return list(range(len(text))), None
        starts, frozen, i = [], set(), 0
        while i < len(text):
            starts.append(i)
            for u in self._user_defined.get(text[i], ()):
                if text.startswith(u, i):
                    frozen.add(i)
                    i += len(u)
                    break
            else:
                i += 1
        return starts, frozen

    def _emit(self, text: str, i: int, k: int, split: dict, out: list) -> None:
        tid = self._ids.get(text[i:k])
        if tid is None:  # not a piece: byte fallback, else <unk>
            raw = text[i:k].encode("utf-8")
            byte_ids = [self._byte_ids[b] for b in raw]
            out.extend(byte_ids if None not in byte_ids else (self.unk_id,))
        elif (i, k) in split:
            self._emit(text, i, split[i, k], split, out)
            self._emit(text, split[i, k], k, split, out)
        else:
            out.append(tid)

    # ------------------------------------------------------------------ decoding
    def decode_piece(self, prev_id, tid) -> bytes:
        """llama2.c's decode(): the bytes of ``tid`` following ``prev_id``.

        After BOS a leading space is dropped; ``<0xXX>`` gives its raw byte; control tokens (BOS,
        EOS) give b"".
        """
        tid = self._check_id(tid)
        t = self._types[tid]
        if t == CONTROL:
            return b""
        if t == BYTE:
            return bytes((self._byte_value[tid],))
        piece = self._pieces[tid]
        if prev_id == self.bos_id and piece[:1] == b" ":
            return piece[1:]
        return piece

    def safe_piece(self, prev_id, tid) -> bytes:
        """What llama2.c's safe_printf(decode(...)) prints: cut at a NUL; b"" for a single byte
        that is neither printable ASCII nor whitespace; for a tokenizer.bin, control tokens print
        their piece (EOS is "\n</s>\n"), as in llama2.c."""
        if self.prints_control and self._types[self._check_id(tid)] == CONTROL:
            piece = self._pieces[tid]  # llama2.c's decode() has no notion of control tokens
        else:
            piece = self.decode_piece(prev_id, tid)
        piece = piece.split(b"\0", 1)[0]
        if len(piece) == 1 and piece[0] not in _PRINTABLE:
            return b""
        return piece

    def _piece(self, tid: int, first: bool) -> bytes:
        """The bytes of ``tid`` in decode()'s text; ``first``: nothing visible before it."""
        t = self._types[tid]
        if t == CONTROL:
            return b""
        if t == BYTE:
            return bytes((self._byte_value[tid],))
        if t == UNKNOWN:
            return _UNK_SURFACE.encode()
        piece = self._pieces[tid]
        return piece[1:] if first and piece[:1] == b" " else piece

    def decode(self, ids: Iterable) -> str:
        """Text of ``ids``, as SentencePiece's DecodeIds gives it (see the module docstring)."""
        parts, run, strip = [], bytearray(), True
        for tid in self.check_ids(ids):
            t = self._types[tid]
            if t == BYTE:
                run.append(self._byte_value[tid])
                strip = False
                continue
            if run:  # SentencePiece decodes each run of byte tokens on its own
                parts.append(_utf8(run))
                run.clear()
            if t == CONTROL:
                continue
            if t == UNKNOWN:
                parts.append(_UNK_SURFACE)
            else:
                piece = self._pieces[tid]
                parts.append(_utf8(piece[1:] if strip and piece[:1] == b" " else piece))
            strip = False
        if run:
            parts.append(_utf8(run))
        return "".join(parts)


# ---------------------------------------------------------------------- helpers
def _records(data, vocab_size):
    """tokenizer.bin's (f32 score, u32 length, piece) records: the tight loop, without checks;
    (None, None) if the file ends early."""
    pieces, scores, off = [None] * vocab_size, [None] * vocab_size, _HEADER.size
    unpack, rec = _RECORD.unpack_from, _RECORD.size
    try:
        for i in range(vocab_size):
            scores[i], n = unpack(data, off)
            off += rec + n
            pieces[i] = data[off - n:off]
    except struct.error:
        return None, None
    return (pieces, scores) if off <= len(data) else (None, None)


def _count_records(data):
    """How many whole records tokenizer.bin holds (reading until one would pass the end)."""
    off, n, size = _HEADER.size, 0, len(data)
    while off + _RECORD.size <= size:
        off += _RECORD.size + _RECORD.unpack_from(data, off)[1]
        if off > size:
            break
        n += 1
    return n


def _check_records(path, data, vocab_size, max_len):
    """The checked reading of tokenizer.bin's records: raises FormatError at the first bad one."""
    size, off = len(data), _HEADER.size
    unpack, rec = _RECORD.unpack_from, _RECORD.size
    for i in range(vocab_size):
        if off + rec > size:
            what = (f"the file ends after {i} tokens" if off == size else
                    f"token {i} is truncated at offset {off}: expected 8 bytes of score and "
                    f"length, found {size - off}")
            raise FormatError(f"{path}: {what}, but the model's vocab_size is {vocab_size}")
        _, n = unpack(data, off)
        off += rec
        if n > size - off:
            raise FormatError(f"{path}: token {i}: length field {n} (at offset {off - 4}) "
                              f"exceeds the {size - off} bytes left in the file")
        if n > max_len:
            raise FormatError(f"{path}: token {i} (offset {off}) is {n} bytes long, expected "
                              f"at most the header's max_token_length {max_len}")
        off += n
    raise AssertionError("unreachable: the fast reading found a bad record")


def _any_crosses_word(pieces) -> bool:
    """True if some piece has a non-space character followed by a space (one regex scan over
    all pieces joined by NUL, which the pattern excludes; pieces holding a NUL are checked alone)."""
    joined = "\0".join(pieces)
    if _CROSSES_WORD_JOINED.search(joined):
        return True
    if joined.count("\0") == max(len(pieces) - 1, 0):
        return False
    return any(_CROSSES_WORD.search(p) for p in pieces if "\0" in p)


def _decode_each(pieces) -> list:
    """Each piece decoded as UTF-8, or None where it is not valid UTF-8: one decode of all the
    pieces joined by NUL when that is exact (no piece holds a NUL, all are valid), else one each."""
    joined = b"\0".join(pieces)
    if pieces and joined.count(b"\0") == len(pieces) - 1:
        try:
            return joined.decode("utf-8").split("\0")
        except UnicodeDecodeError:
            pass
    out = []
    for p in pieces:
        try:
            out.append(p.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def _utf8(data) -> str:
    """Decode UTF-8 as SentencePiece does: each byte that does not start a valid sequence becomes
    one U+FFFD (Python's errors="replace" would turn some multi-byte runs into a single one)."""
    return bytes(data).decode("utf-8", "surrogateescape").translate(_ESCAPED_TO_FFFD)
