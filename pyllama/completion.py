"""create_completion: OpenAI/llama-cpp-python-shaped completions, streaming, stop rules, logprobs.

The one generation path of the embedding API (and of chat completions and the CLI's chat mode):

    prompt ids -> kvcache.evaluate (prefix reuse) -> [sample (sampling.ChainSampler) -> stop id?
    -> incremental UTF-8 text -> stop string? -> forward] ...

Text is released as soon as it can no longer turn into a stop string; a stop string ends the
completion before its text, which is never returned (also when it spans tokens). Stop ids (the
tokenizer's EOS/EOT, and stop_token_ids) end it too; neither is counted nor shown.
"""
import codecs
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


def prompt_ids(llama, prompt, special=False):
    tok = llama._tok()
    if isinstance(prompt, str):
        if len(prompt) > llama.n_ctx * getattr(tok, "max_piece_chars", 1 << 30):
            raise ParameterError(f"the prompt ({len(prompt)} characters) is longer than the "
                                 f"context of {llama.n_ctx} positions can hold")
        ids = encode(tok, prompt, special)
    else:
        ids = V.token_ids(prompt, llama.vocab_size, "prompt")
    if not ids:
        raise ParameterError("the prompt must hold at least one token (this tokenizer adds no BOS "
                             "to an empty text)")
    return ids


def _transformer(llama):
    return llama._live()  # PyllamaError once the model is closed


# -- the token loop ----------------------------------------------------------------------------------
def _tokens(llama, ids, max_tokens, sampler, stop_ids, n_logprobs, context_shift, n_keep):
    """Yield (token, logprob entry or None) per generated token; returns (via StopIteration.value)
    'stop' or 'length'. Holds the model's lock while running."""
    tf = _transformer(llama)
    n_ctx = tf.n_ctx
    history = list(ids)
    with tf._lock:
        kvcache.evaluate(tf, ids)
        scratch = None
        for i in range(max_tokens):
            token = sampler.sample(tf.logits_ptr, history)
            entry = None
            if n_logprobs is not None:
                if scratch is None:
                    scratch = ffi.new("pl_probindex[]", tf.vocab_size)
                entry = logprobs_of(tf.logits_ptr, tf.vocab_size, token, n_logprobs, scratch)
            if token in stop_ids:
                return "stop"
            yield token, entry
            if i == max_tokens - 1:
                break  # the last token's logits are never needed
            history.append(token)
            pos = len(tf.tokens)
            if pos >= n_ctx:  # context_shift (else the check above keeps pos < n_ctx)
                keep = min(n_keep, pos - 1)
                kvcache.shift(tf, keep, max(1, (pos - keep) // 2))
                pos = len(tf.tokens)
            tf.forward(token, pos)
    return "length"


def _held_back(text, stops):
    """Length of text's longest tail that is the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def completion_stream(llama, prompt, max_tokens=16, stop=None, stop_token_ids=None, logprobs=None,
                      echo=False, context_shift=False, n_keep=1, special=False, stats=None, sampler=None,
                      **sampling):
    """Yield (text, logprob records, finish_reason) pieces; finish_reason is None until the last.
    Arguments are checked here, before the first piece is asked for. stats (a dict) receives
    prompt_tokens, completion_tokens and the generated ids (tokens). sampler: an object with
    sample(logits_ptr, history) used instead of the chain (the CLI's llama2.c sampler)."""
    _transformer(llama)
    tok = llama._tok()
    unknown = set(sampling) - set(DEFAULTS)
    if unknown:
        raise ParameterError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    if sampler is None:
        sampler = ChainSampler(llama.vocab_size, **{**DEFAULTS, **sampling})
    ids = prompt_ids(llama, prompt, V.boolean(special, "special"))
    max_tokens = V.optional(V.integer, max_tokens, "max_tokens", lo=0)
    context_shift = V.boolean(context_shift, "context_shift")
    if max_tokens is None:
        max_tokens = max(0, llama.n_ctx - len(ids))
    n_keep = V.integer(n_keep, "n_keep", lo=0, hi=llama.n_ctx - 1)
    stops = check_stop(stop)
    stop_ids = stop_ids_of(tok) | frozenset(
        V.token_ids(stop_token_ids, llama.vocab_size, "stop_token_ids") if stop_token_ids is not None else ())
    n_top = V.optional(V.integer, logprobs, "logprobs", lo=0, hi=MAX_LOGPROBS)
    echo = V.boolean(echo, "echo")
    n = len(ids)
    if n + (0 if context_shift else max_tokens) > llama.n_ctx:
        raise ParameterError(f"the prompt ({n} tokens) and max_tokens ({max_tokens}) need {n + max_tokens} "
                             f"positions, the context holds {llama.n_ctx} (lower max_tokens, or pass "
                             f"context_shift=True)")
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(ids), completion_tokens=0, tokens=[])
    gen = _tokens(llama, ids, max_tokens, sampler, stop_ids, n_top, context_shift, n_keep)
    return _pieces(llama, tok, ids, gen, stops, n_top, echo, stats)


def _pieces(llama, tok, ids, gen, stops, n_top, echo, stats):
    dec = decoder_of(tok)
    text = "".join(dec.feed(t) for t in ids) if echo else ""
    if not echo:
        dec = decoder_of(tok, ids[-1])
    records = _prompt_records(llama, tok, ids, n_top) if echo and n_top is not None else []
    sent, start = 0, len(text)  # records: (offset, token text, logprob, top)
    finish = None
    while finish is None:
        try:
            token, entry = next(gen)
        except StopIteration as e:
            finish, piece = e.value, dec.flush()
        else:
            stats["completion_tokens"] += 1
            stats["tokens"].append(token)
            piece = dec.feed(token)
            if entry is not None:
                lp, top = entry
                records.append((len(text), piece, lp, {token_text(tok, t): v for t, v in top.items()}))
        text += piece
        cut = _find_stop(text, stops, max(start, sent))
        if cut is not None:
            text, finish = text[:cut], "stop"
            gen.close()
        end = len(text) if finish else len(text) - _held_back(text[start:], stops)
        if end > sent or finish:
            done = [r for r in records if r[0] < end]
            records = [] if finish else records[len(done):]
            yield text[sent:end], done, finish
            sent = end


def _find_stop(text, stops, start):
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _prompt_records(llama, tok, ids, n_top):
    """Logprob records of the prompt's tokens (echo with logprobs): the first has none."""
    tf = _transformer(llama)
    with tf._lock:
        rows = kvcache.evaluate(tf, ids, all_logits=True)
    dec, out, offset = decoder_of(tok), [], 0
    for i, t in enumerate(ids):
        piece = dec.feed(t)
        if i == 0:
            out.append((offset, piece, None, None))
        else:
            row = ffi.from_buffer("float[]", rows[i - 1])
            lp, top = logprobs_of(row, llama.vocab_size, t, n_top)
            out.append((offset, piece, lp, {token_text(tok, k): v for k, v in top.items()}))
        offset += len(piece)
    return out


# -- OpenAI shapes -----------------------------------------------------------------------------------
def _logprobs_obj(records):
    return {"tokens": [r[1] for r in records], "text_offset": [r[0] for r in records],
            "token_logprobs": [r[2] for r in records], "top_logprobs": [r[3] for r in records]}


def create_completion(llama, prompt, stream=False, **kw):
    """Llama.create_completion (see there)."""
    stream = V.boolean(stream, "stream")
    stats = {}
    pieces = completion_stream(llama, prompt, stats=stats, **kw)
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    want_lp = kw.get("logprobs") is not None

    def chunk(text, records, finish):
        return {"id": cid, "object": "text_completion", "created": created, "model": llama.path,
                "choices": [{"text": text, "index": 0,
                             "logprobs": _logprobs_obj(records) if want_lp else None,
                             "finish_reason": finish}]}
    if stream:
        return (chunk(*p) for p in pieces)
    texts, records, finish = [], [], None
    for text, recs, finish in pieces:
        texts.append(text)
        records += recs
    out = chunk("".join(texts), records, finish)
    n_in, n_out = stats["prompt_tokens"], stats["completion_tokens"]
    out["usage"] = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
    return out
