"""The token loop (llama2.c's generate() and chat()), streaming and stop rules."""
import codecs

from . import validate
from .errors import ParameterError
from .sampler import Sampler

BOS = 1  # llama2.c's fixed id (tokenizer.bin); GGUF tokenizers carry their own


def resolve_steps(steps, seq_len):
    """llama2.c: steps counts positions including the prompt; 0 means seq_len; more is clamped."""
    steps = validate.integer(steps, "steps", lo=0)
    return seq_len if steps == 0 or steps > seq_len else steps


def encode_prompt(tokenizer, prompt, n_ctx):
    """BOS + the prompt's ids; a prompt that cannot fit the context is refused before encoding
    (every token covers at most max_piece_chars characters), so a huge prompt fails fast."""
    if isinstance(prompt, str) and len(prompt) > n_ctx * tokenizer.max_piece_chars:
        raise ParameterError(f"the prompt ({len(prompt)} characters) is longer than the context "
                             f"of {n_ctx} positions can hold")
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    check_prompt_length(len(ids), n_ctx)
    return ids


def check_prompt_length(n_tokens, n_ctx):
    if n_tokens > n_ctx:
        raise ParameterError(f"the prompt is {n_tokens} tokens, longer than the context of "
                             f"{n_ctx} positions")


def generate_tokens(transformer, prompt_ids, steps, sampler, bos_id=BOS):
    """Yield (prev, token) pairs in llama2.c's order: the prompt's pairs, then sampled tokens,
    until `steps` positions are done or BOS is sampled (bos_id None: never stop early).

    The same positions are computed as in llama2.c's generate(), but the prompt goes through the
    model as one batch (prefill) instead of one token at a time."""
    if not prompt_ids:
        raise ParameterError("the prompt must hold at least one token (BOS)")
    n_prompt = len(prompt_ids)
    k = min(n_prompt, steps)  # prompt positions that run
    check_prompt_length(k, transformer.n_ctx)
    forward, sample, logits_ptr = transformer.forward, sampler.sample, transformer.logits_ptr
    with transformer._lock:
        if k == 0:
            return
        transformer.prefill(prompt_ids[:k], 0)
        for pos in range(min(k, n_prompt - 1)):
            if prompt_ids[pos + 1] == bos_id:
                return
            yield prompt_ids[pos], prompt_ids[pos + 1]
        if k < n_prompt:
            return
        token, pos = prompt_ids[-1], n_prompt  # logits of the last prompt token are ready
        while True:
            nxt = sample(logits_ptr)
            if nxt == bos_id:
                return
            yield token, nxt
            token = nxt
            if pos >= steps:
                return
            forward(token, pos)
            pos += 1


def stream_text(tokenizer, pairs, skip=0):
    """Decode (prev, token) pairs into text pieces, joining UTF-8 split across byte tokens.
    The first `skip` pairs (the prompt) are decoded but not yielded."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i, (prev, tok) in enumerate(pairs):
        text = decoder.decode(tokenizer.decode_piece(prev, tok))
        if i >= skip and text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def make_sampler(transformer, temperature, topp, seed):
    return Sampler(transformer.vocab_size, temperature, topp, seed)
