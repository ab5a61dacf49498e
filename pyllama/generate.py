"""The token loop (llama2.c's generate() and chat()), streaming and stop rules."""
from . import validate
from .errors import ParameterError
from .sampler import Sampler

BOS = 1  # llama2.c's fixed id (tokenizer.bin); GGUF tokenizers carry their own


def resolve_steps(steps, seq_len):
    """llama2.c: steps counts positions including the prompt; 0 means seq_len; more is clamped."""
    steps = validate.integer(steps, "steps", lo=0)
    return seq_len if steps == 0 or steps > seq_len else steps


def encode_prompt(tokenizer, prompt, n_ctx, bos=True):
    """BOS + the prompt's ids (bos None: BOS where the file says so, e.g. not for Qwen2); a prompt
    that cannot fit the context is refused before encoding (every token covers at most
    max_piece_chars characters), so a huge prompt fails fast."""
    if isinstance(prompt, str) and len(prompt) > n_ctx * tokenizer.max_piece_chars:
        raise ParameterError(f"the prompt ({len(prompt)} characters) is longer than the context "
                             f"of {n_ctx} positions can hold")
    ids = tokenizer.encode(prompt, bos=bos, eos=False)
    check_prompt_length(len(ids), n_ctx)
    return ids


def check_prompt_length(n_tokens, n_ctx):
    if n_tokens > n_ctx:
        raise ParameterError(f"the prompt is {n_tokens} tokens, longer than the context of "
                             f"{n_ctx} positions")


def stop_rule(model_file, tokenizer):
    """What ends generation: llama2.c .bin files keep llama2.c's rule (BOS, None here); GGUF files
    stop at the tokenizer's stop_ids (EOS, EOT, EOM), as llama.cpp does."""
    if model_file.format == "gguf" and tokenizer is not None:
        return tokenizer.stop_ids
    return None


def generate_tokens(transformer, prompt_ids, steps, sampler, bos_id=BOS, stop_ids=None):
    """Yield (prev, token) pairs in llama2.c's order: the prompt's pairs, then sampled tokens,
    until `steps` positions are done or generation stops: with stop_ids None, llama2.c's rule
    (BOS, sampled or in the prompt, ends it; bos_id None: never stop early); otherwise a sampled
    token in stop_ids ends it (it is not yielded) and the prompt never does.

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
        stops = frozenset(() if bos_id is None else (bos_id,)) if stop_ids is None else \
            frozenset(stop_ids)
        for pos in range(min(k, n_prompt - 1)):
            if stop_ids is None and prompt_ids[pos + 1] == bos_id:
                return
            yield prompt_ids[pos], prompt_ids[pos + 1]
        if k < n_prompt:
            return
        token, pos = prompt_ids[-1], n_prompt  # logits of the last prompt token are ready
        while True:
            nxt = sample(logits_ptr)
            if nxt in stops:
                return
            yield token, nxt
            token = nxt
            if pos >= steps:
                return
            forward(token, pos)
            pos += 1


def stream_text(tokenizer, pairs, skip=0):
    """Decode (prev, token) pairs into text pieces with the tokenizer's incremental decoder
    (a character split across tokens comes out whole). The first `skip` pairs (the prompt) are
    decoded but not yielded."""
    decoder = tokenizer.decoder()
    for i, (prev, tok) in enumerate(pairs):
        # the first pair's prev is the prompt's first token: BOS (no text), or text (Qwen2)
        text = decoder.feed(prev) + decoder.feed(tok) if i == 0 else decoder.feed(tok)
        if i >= skip and text:
            yield text
    tail = decoder.flush()
    if tail:
        yield tail


def make_sampler(transformer, temperature, topp, seed):
    return Sampler(transformer.vocab_size, temperature, topp, seed)
