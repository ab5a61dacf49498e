"""create_completion: OpenAI/llama-cpp-python-shaped completions, streaming, stop rules, logprobs.

The one generation path of the embedding API, of chat completions, the CLI's chat mode and the
server: a request is a Completion (its per-token logic), driven here by run() on a Llama's single
sequence, or by pyllama.engine as a request's policy (pyllama/server.py):

    prompt ids -> kvcache.evaluate (prefix reuse) -> [sample (sampling.ChainSampler) -> stop id?
    -> incremental UTF-8 text -> stop string? -> forward] ...

Text is released as soon as it can no longer turn into a stop string; a stop string ends the
completion before its text, which is never returned (also when it spans tokens). Stop ids (the
tokenizer's EOS/EOT, and stop_token_ids) end it too; neither is counted nor shown.
"""
import codecs
import collections
import time
import uuid

from . import kvcache
from ._core import ffi
from . import validate as V
from .errors import ParameterError
from .sampling import DEFAULTS, ChainSampler, logprobs_of

MAX_STOPS = 16
MAX_LOGPROBS = 20


# -- tokenizer adapters (the contract of PLAN.md; the SentencePiece tokenizer predates it) ---------
def stop_ids_of(tok):
    ids = getattr(tok, "stop_ids", None)
    return frozenset(ids) if ids is not None else frozenset({tok.eos_id})


class _PieceDecoder:
    """decoder() for a tokenizer with llama2.c's decode_piece(prev, id): only whole characters."""

    def __init__(self, tok, prev=None):
        self.tok, self.prev = tok, prev
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tid):
        piece = self.tok.decode_piece(self.prev, tid)
        self.prev = tid
        return self.utf8.decode(piece)

    def flush(self):
        return self.utf8.decode(b"", final=True)


def decoder_of(tok, prev=None):
    return _PieceDecoder(tok, prev) if hasattr(tok, "decode_piece") else tok.decoder()


def token_text(tok, tid):
    if hasattr(tok, "token_bytes"):
        return tok.token_bytes(tid).decode("utf-8", errors="replace")
    return tok.decode_piece(None, tid).decode("utf-8", errors="replace")


def encode(tok, text, special=False):
    """Token ids of text with the file's BOS default; special=True parses control-token text
    (a tokenizer without that notion, SentencePiece here, encodes text as text)."""
    try:
        return tok.encode(text, bos=None, special=special)
    except TypeError:
        return tok.encode(text, bos=None)


# -- arguments -------------------------------------------------------------------------------------
def check_stop(stop):
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS:
        raise ParameterError(f"stop: expected a string or a list of at most {MAX_STOPS} strings, "
                             f"found {stop!r}")
    for s in stops:
        if not V.text(s, "stop"):
            raise ParameterError("stop: an empty stop string would end every completion at once")
    return list(stops)


def prompt_ids(llama, prompt, special=False, n_ctx=None):
    tok = llama._tok()
    n_ctx = llama.n_ctx if n_ctx is None else n_ctx
    if isinstance(prompt, str):
        if len(prompt) > n_ctx * getattr(tok, "max_piece_chars", 1 << 30):
            raise ParameterError(f"the prompt ({len(prompt)} characters) is longer than the "
                                 f"context of {n_ctx} positions can hold")
        ids = encode(tok, prompt, special)
    else:
        ids = V.token_ids(prompt, llama.vocab_size, "prompt")
    if not ids:
        raise ParameterError("the prompt must hold at least one token (this tokenizer adds no BOS "
                             "to an empty text)")
    return ids


def choice_seed(seed, index):
    """The seed of choice `index` of a request for n choices with `seed`: seed + index (mod 2**64),
    so choice 0 is the request with n=1 and choice i is the request with seed + i alone. None
    stays None: each choice draws a fresh seed."""
    return None if seed is None else (V.integer(seed, "seed") + index) % (1 << 64)


def _transformer(llama):
    return llama._live()  # PyllamaError once the model is closed


# -- one request ---------------------------------------------------------------------------------------
class Completion:
    """One completion request's per-token logic, whoever runs the model: the embedding API (run()
    below, on a Llama's single sequence) and the server (pyllama.engine, as the request's policy).

        choose(logits) -> token      the sampler chain (its seed and history) on this request's
                                     logits row (a numpy float32 row or a cffi float*; read only),
                                     and the logprob record when asked for
        accept(token) -> reason|None stop ids, incremental UTF-8 text, stop strings (text held back
                                     while it may still become one), max_tokens
        finish(reason)               the end for another reason (the context is full, the request
                                     was cancelled); flushes the decoder; returns the final reason
        take()                       the pieces (text, logprob records, finish_reason) ready so far

    The arguments are create_completion's, all checked here; n_ctx: the context the request runs
    in (default the Llama's). accept/choose run in one thread, take() may run in another.
    """

    def __init__(self, llama, prompt, max_tokens=16, stop=None, stop_token_ids=None, logprobs=None,
                 echo=False, context_shift=False, n_keep=1, special=False, sampler=None, n_ctx=None,
                 **sampling):
        _transformer(llama)
        tok = self.tok = llama._tok()
        n_ctx = llama.n_ctx if n_ctx is None else n_ctx
        unknown = set(sampling) - set(DEFAULTS)
        if unknown:
            raise ParameterError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        if sampler is None:
            sampler = ChainSampler(llama.vocab_size, **{**DEFAULTS, **sampling})
        self.sampler = sampler
        self.ids = ids = prompt_ids(llama, prompt, V.boolean(special, "special"), n_ctx)
        max_tokens = V.optional(V.integer, max_tokens, "max_tokens", lo=0)
        self.context_shift = V.boolean(context_shift, "context_shift")
        self.max_tokens = max(0, n_ctx - len(ids)) if max_tokens is None else max_tokens
        self.n_keep = V.integer(n_keep, "n_keep", lo=0, hi=n_ctx - 1)
        self.stops = check_stop(stop)
        self.stop_ids = stop_ids_of(tok) | frozenset(
            V.token_ids(stop_token_ids, llama.vocab_size, "stop_token_ids") if stop_token_ids is not None else ())
        self.n_top = V.optional(V.integer, logprobs, "logprobs", lo=0, hi=MAX_LOGPROBS)
        self.echo = V.boolean(echo, "echo")
        n, m = len(ids), self.max_tokens
        if n + (0 if self.context_shift else m) > n_ctx:
            raise ParameterError(f"the prompt ({n} tokens) and max_tokens ({m}) need {n + m} positions, "
                                 f"the context holds {n_ctx} (lower max_tokens, or pass "
                                 f"context_shift=True)")
        self.vocab_size = llama.vocab_size
        self.history = list(ids)   # what the penalties look back on
        self.tokens = []           # generated ids (stop ids excluded)
        self.finish_reason = None
        self._entry = self._scratch = None
        self._out = collections.deque()
        self._dec = decoder_of(tok)
        pieces = [self._dec.feed(t) for t in ids] if self.echo else []
        self._text = "".join(pieces)
        if not self.echo:
            self._dec = decoder_of(tok, ids[-1])
        self.records = []          # (offset, token text, logprob, top): prompt_row() adds the prompt's
        self.prompt_rows = self.echo and self.n_top is not None  # echo with logprobs
        if self.prompt_rows:       # the first prompt token has no logprob (nothing precedes it)
            offsets = [0]
            for p in pieces[:-1]:
                offsets.append(offsets[-1] + len(p))
            self._prompt_pieces = list(zip(offsets, pieces))
            self.records = [self._prompt_pieces[0] + (None, None)]
        self._sent, self._start = 0, len(self._text)  # echo: the prompt goes out with the first piece

    @property
    def usage(self):
        n_in, n_out = len(self.ids), len(self.tokens)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def _logprobs(self, ptr, token):
        if self._scratch is None:
            self._scratch = ffi.new("pl_probindex[]", self.vocab_size)
        lp, top = logprobs_of(ptr, self.vocab_size, token, self.n_top, self._scratch)
        return lp, {token_text(self.tok, t): v for t, v in top.items()}

    def choose(self, logits):
        ptr = _float_ptr(logits)
        token = self.sampler.sample(ptr, self.history)
        if self.n_top is not None:
            self._entry = self._logprobs(ptr, token)
        return token

    def prompt_row(self, i, logits):
        """Echo with logprobs: logits is the row after prompt token i (0 <= i < len(ids) - 1),
        the distribution of token i + 1, whose record it makes. Rows come in order, all of them
        before the first choose()."""
        offset, piece = self._prompt_pieces[i + 1]
        self.records.append((offset, piece) + self._logprobs(_float_ptr(logits), self.ids[i + 1]))

    def make_room(self, pos):
        """The context is full at pos positions: (n_keep, n_discard) of the context shift that
        makes room for the next token (llama.cpp's: keep the first n_keep, drop half of the
        rest), or None without context_shift (then the request ends with "length")."""
        if not self.context_shift:
            return None
        keep = min(self.n_keep, pos - 1)
        return keep, max(1, (pos - keep) // 2)

    def accept(self, token):
        if self.finish_reason is not None:
            return self.finish_reason
        if len(self.tokens) >= self.max_tokens:  # max_tokens 0 (run for the prompt's logprobs)
            return self.finish("length")
        if token in self.stop_ids:
            return self.finish("stop")
        self.tokens.append(token)
        self.history.append(token)
        piece = self._dec.feed(token)
        if self._entry is not None:
            self.records.append((len(self._text), piece) + self._entry)
            self._entry = None
        reason = self._emit(piece, None)
        if reason is None and len(self.tokens) >= self.max_tokens:
            reason = self.finish("length")
        return reason

    def finish(self, reason):
        if self.finish_reason is None:
            self._emit(self._dec.flush(), reason)
        return self.finish_reason

    def take(self):
        out = []
        while self._out:
            out.append(self._out.popleft())
        return out

    def _emit(self, piece, finish):
        """Add text; queue what can no longer become a stop string (all of it at the end)."""
        text = self._text = self._text + piece
        cut = _find_stop(text, self.stops, max(self._start, self._sent))
        if cut is not None:
            text = self._text = text[:cut]
            finish = "stop"
        end = len(text) if finish else len(text) - _held_back(text[self._start:], self.stops)
        if end > self._sent or finish:
            done = [r for r in self.records if r[0] < end]
            self.records = [] if finish else self.records[len(done):]
            self._out.append((text[self._sent:end], done, finish))
            self._sent = end
        self.finish_reason = finish
        return finish


def run(llama, req):
    """Drive a Completion on the Llama's own sequence (prefix reuse, context shift); yields its
    pieces. Holds the model's lock while running."""
    tf = _transformer(llama)
    with tf._lock:
        if req.prompt_rows:
            for i, row in enumerate(kvcache.evaluate(tf, req.ids, all_logits=True)[:-1]):
                req.prompt_row(i, row)
        kvcache.evaluate(tf, req.ids)
        reason = None if req.max_tokens else req.finish("length")
        while reason is None:
            reason = req.accept(req.choose(tf.logits_ptr))
            yield from req.take()
            if reason is None:
                pos = len(tf.tokens)
                if pos >= tf.n_ctx:  # context_shift (else the checks keep pos < n_ctx)
                    pos = kvcache.shift(tf, *req.make_room(pos))
                tf.forward(req.tokens[-1], pos)
    yield from req.take()


def _held_back(text, stops):
    """Length of text's longest tail that is the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def completion_stream(llama, prompt, stats=None, **kw):
    """Yield (text, logprob records, finish_reason) pieces; finish_reason is None until the last.
    Arguments are checked here, before the first piece is asked for. stats (a dict) receives
    prompt_tokens, completion_tokens and the generated ids (tokens) as they come. sampler: an
    object with sample(logits_ptr, history) used instead of the chain (the CLI's llama2.c sampler)."""
    req = Completion(llama, prompt, **kw)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(req.ids), completion_tokens=0, tokens=req.tokens)

    def pieces():
        for piece in run(llama, req):
            stats["completion_tokens"] = len(req.tokens)
            yield piece
    return pieces()


def _find_stop(text, stops, start):
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _float_ptr(logits):
    return logits if isinstance(logits, ffi.CData) else ffi.from_buffer("float[]", logits)


# -- OpenAI shapes -----------------------------------------------------------------------------------
def _logprobs_obj(records):
    return {"tokens": [r[1] for r in records], "text_offset": [r[0] for r in records],
            "token_logprobs": [r[2] for r in records], "top_logprobs": [r[3] for r in records]}


class TextShape:
    """A Completion's pieces as OpenAI "text_completion" objects: stream chunks (start() first,
    then chunks() of each piece) or the whole response (whole(): all pieces, then the usage).
    index: the choice it is (n > 1: one shape per choice, all with first's id and time)."""
    prefix = "cmpl"

    def __init__(self, model, req, index=0, first=None):
        self.id, self.created = (first.id, first.created) if first is not None else \
            (f"{self.prefix}-{uuid.uuid4()}", int(time.time()))
        self.model, self.req, self.want_lp, self.index = model, req, req.n_top is not None, index

    def start(self):
        return []

    def chunks(self, text, records, finish):
        return [{"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [{"text": text, "index": self.index,
                              "logprobs": _logprobs_obj(records) if self.want_lp else None,
                              "finish_reason": finish}]}]

    def whole(self, pieces):
        texts, records, finish = [], [], None
        for text, recs, finish in pieces:
            texts.append(text)
            records += recs
        out = self.chunks("".join(texts), records, finish)[0]
        out["usage"] = self.req.usage
        return out

    def stream(self, pieces):
        yield from self.start()
        for piece in pieces:
            yield from self.chunks(*piece)


def create_completion(llama, prompt, stream=False, **kw):
    """Llama.create_completion (see there)."""
    stream = V.boolean(stream, "stream")
    req = Completion(llama, prompt, **kw)
    shape = TextShape(llama.path, req)
    pieces = run(llama, req)
    return shape.stream(pieces) if stream else shape.whole(pieces)
