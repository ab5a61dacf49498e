"""create_completion: shapes, streaming, stop rules, logprobs, prefix cache, state, context.

Expected values: greedy text from pyllama's own llama2.c-exact generate() (itself checked against
llama2.c in test_parity.py); log-probabilities from numpy's log-softmax of pyllama's own logits
(Llama.logits, checked against llama2.c/llama.cpp in test_parity/test_gguf_parity); the response
shapes from OpenAI's completions API as llama-cpp-python returns it.
"""
import numpy as np
import pytest

from conftest import shared_path

import pyllama
from pyllama import ParameterError, PyllamaError

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def m(stories260k):
    return stories260k


def text_of(r):
    return r["choices"][0]["text"]


def greedy(m, prompt=PROMPT, n=40, **kw):
    return m.create_completion(prompt, max_tokens=n, temperature=0, **kw)


def test_shape_and_usage(m):
    r = greedy(m, n=12)
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert isinstance(r["created"], int) and r["model"].endswith("stories260K.bin")
    (c,) = r["choices"]
    assert set(c) == {"text", "index", "logprobs", "finish_reason"}
    assert c["index"] == 0 and c["logprobs"] is None and c["finish_reason"] == "length"
    n_prompt = len(m.tokenize(PROMPT))
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
    assert m(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"] == c["text"]  # __call__


def test_greedy_equals_llama2c_generate(m):
    ref = "".join(m.generate(PROMPT, steps=80, temperature=0))
    text = text_of(greedy(m, n=40))
    assert len(text) > 60 and ref.startswith(text)


def test_prompt_as_token_ids(m):
    ids = m.tokenize(PROMPT)
    assert text_of(greedy(m, ids)) == text_of(greedy(m))
    assert text_of(greedy(m, np.array(ids, np.int32))) == text_of(greedy(m))


def test_echo(m):
    assert text_of(greedy(m, echo=True)) == PROMPT + text_of(greedy(m))


def test_seed_reproduces_and_none_varies(m):
    a = text_of(m(PROMPT, max_tokens=40, seed=7, temperature=1.2))
    assert a == text_of(m(PROMPT, max_tokens=40, seed=7, temperature=1.2))
    texts = {text_of(m(PROMPT, max_tokens=40, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)) for _ in range(4)}
    assert len(texts) > 1


def test_stream_reassembles_the_same_text(m):
    for kw in (dict(seed=3), dict(seed=4, stop=[" the", "Lily."]), dict(temperature=0, logprobs=2)):
        whole = m(PROMPT, max_tokens=50, **kw)
        chunks = list(m(PROMPT, max_tokens=50, stream=True, **kw))
        assert len({c["id"] for c in chunks}) == 1 and len(chunks) > (1 if "stop" in kw else 5)
        assert all(c["object"] == "text_completion" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert "".join(text_of(c) for c in chunks) == text_of(whole)
        if "logprobs" in kw:
            lp = [c["choices"][0]["logprobs"] for c in chunks]
            assert sum((x["tokens"] for x in lp), []) == whole["choices"][0]["logprobs"]["tokens"]


def test_stop_string_spanning_tokens(m):
    full = text_of(greedy(m, n=40))
    assert "little girl" in full  # " little", " g", "ir", "l": the stop spans four tokens
    r = greedy(m, n=40, stop=["ttle gi", "nothing like this"])
    assert text_of(r) == full[:full.index("ttle gi")]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert text_of(greedy(m, n=40, stop="ttle gi")) == text_of(r)  # a single string too
    chunks = [text_of(c) for c in greedy(m, n=40, stop=["ttle gi"], stream=True)]
    assert "".join(chunks) == text_of(r) and not any("ttle" in c for c in chunks)


def test_stream_holds_back_only_a_possible_stop(m):
    full = text_of(greedy(m, n=40))
    assert " Lily." in full
    chunks = [text_of(c) for c in greedy(m, n=40, stop=["Lily!"], stream=True)]
    assert "".join(chunks) == full  # the stop never came: everything is released
    lily = next(c for c in chunks if "Lily" in c)
    assert lily.endswith(".")  # " Lily" waited for the next token, "." ruled the stop out
    assert chunks[0] == ","  # nothing else is held back


def test_stop_token_ids_and_eos(m):
    ids = m.tokenize(PROMPT)
    r = greedy(m, ids, n=10, logprobs=0)
    toks = r["choices"][0]["logprobs"]["tokens"]
    gen = m.tokenize(text_of(r), bos=False)
    stop_id = m.tokenize(toks[3], bos=False)[-1]
    s = greedy(m, ids, n=10, stop_token_ids=[stop_id])
    assert text_of(s) == "".join(toks[:3]) and s["choices"][0]["finish_reason"] == "stop"
    assert s["usage"]["completion_tokens"] == 3
    eos = m(PROMPT, max_tokens=10, logit_bias={2: 100.0}, seed=1)  # EOS (id 2) is forced at once
    assert text_of(eos) == "" and eos["choices"][0]["finish_reason"] == "stop"
    assert eos["usage"]["completion_tokens"] == 0
    assert gen


def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_logprobs_match_numpy_log_softmax_of_the_logits(m):
    ids = m.tokenize(PROMPT)
    r = greedy(m, ids, n=8, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == text_of(r) and len(lp["tokens"]) == 8
    offsets = np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()
    assert lp["text_offset"] == offsets
    cached = list(m._model.tokens)  # the prompt and every generated token but the last
    assert cached[:len(ids)] == ids and len(cached) == len(ids) + 7
    rows = m.logits(cached)[len(ids) - 1:]
    chosen = cached[len(ids):] + [int(np.argmax(rows[-1]))]
    for row, tok, got, top in zip(rows, chosen, lp["token_logprobs"], lp["top_logprobs"]):
        ref = log_softmax(row)
        assert got == pytest.approx(ref[tok], abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(np.sort(ref)[::-1][:3], abs=1e-4)


def test_echo_with_logprobs_scores_the_prompt(m):
    ids = m.tokenize(PROMPT)
    r = greedy(m, ids, n=2, logprobs=1, echo=True)
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 2
    rows = m.logits(ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(log_softmax(rows[i - 1])[ids[i]], abs=1e-4)


def test_prefix_cache_evaluates_only_the_new_tokens(m):
    tf = m._model
    ids = m.tokenize(PROMPT)
    m.reset()
    n0 = tf.n_evaluated
    first = greedy(m, ids, n=20, logprobs=0)
    assert tf.n_evaluated - n0 == len(ids) + 19  # the last sampled token is never evaluated
    assert len(text_of(first)) > 20
    extra = m.tokenize(" The end", bos=False)
    more = tf.tokens[:len(ids) + 10] + extra  # the prompt, 10 generated tokens, something new
    n1 = tf.n_evaluated
    warm = greedy(m, more, n=20)
    assert tf.n_evaluated - n1 == len(extra) + 19
    m.reset()
    n2 = tf.n_evaluated
    cold = greedy(m, more, n=20)
    assert tf.n_evaluated - n2 == len(more) + 19
    assert text_of(warm) == text_of(cold)
    n3 = tf.n_evaluated
    again = greedy(m, more, n=20)  # the same prompt: only its last token runs again
    assert tf.n_evaluated - n3 == 1 + 19 and text_of(again) == text_of(cold)


def test_save_and_load_state(m):
    ids = m.tokenize("One day, a little bird")
    m.reset()
    greedy(m, ids, n=5)
    state = m.save_state()
    assert isinstance(state, bytes)
    # the state keeps the cache by position, (layers, n, kv_dim), whatever the cache's own layout:
    # (layers, kv heads, n_ctx, head_size)
    from pyllama import kvcache
    tf = m._model
    hlen = kvcache.HEAD.unpack_from(state)[2]
    n, kc = len(tf.tokens), tf._bufs["key_cache"][0]
    L, H, _, hs = kc.shape
    keys = np.frombuffer(state, np.float32, L * n * H * hs, kvcache.HEAD.size + hlen + 4 * n)
    keys = keys.reshape(L, n, H * hs)
    for layer, pos, head in ((0, 0, 0), (L - 1, n - 1, H - 1), (1, 2, 1)):
        np.testing.assert_array_equal(keys[layer, pos, head * hs:(head + 1) * hs], kc[layer, head, pos])
    want = text_of(greedy(m, ids, n=30))
    with pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"),
                       n_ctx=256) as other:
        other.load_state(state)
        n = other._model.n_evaluated
        assert text_of(greedy(other, ids, n=30)) == want
        assert other._model.n_evaluated - n == 1 + 29  # the loaded cache was used
    with pyllama.Llama(shared_path("models/stories260K-f32.gguf")) as gg:  # same numbers? no: other file
        with pytest.raises(PyllamaError, match="another model"):
            gg.load_state(state)
    with pyllama.Llama(shared_path("models/quant-base-f32.gguf")) as qb:
        with pytest.raises(PyllamaError, match="another model"):
            qb.load_state(state)
    for bad, match in ((state[:-4], "bytes, expected"), (b"garbage", "not a pyllama state"),
                       (state[:12] + b"\x09" + state[13:], "version"), ("text", "expected bytes")):
        with pytest.raises(PyllamaError, match=match):
            m.load_state(bad)
    with pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"),
                       n_ctx=8) as small:
        with pytest.raises(PyllamaError, match="context has 8"):
            small.load_state(m.save_state())


def test_context_limit_and_shift(shared):
    with pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin",
                       n_ctx=32) as s:
        ids = s.tokenize(PROMPT)
        with pytest.raises(ParameterError, match=r"prompt \(5 tokens\) and max_tokens \(30\) need 35 "
                                                 r"positions, the context holds 32"):
            s(ids, max_tokens=30)
        r = s(ids, max_tokens=100, temperature=0, context_shift=True)
        assert r["usage"]["completion_tokens"] == 100 and r["choices"][0]["finish_reason"] == "length"
        assert len(s._model.tokens) <= 32
        assert s._model.tokens[:1] == ids[:1]  # n_keep=1: BOS stays


@pytest.fixture
def shifted(shared):
    """stories260K after a prompt and a context shift dropping positions 2..6: (model, kept ids)."""
    from pyllama import kvcache
    with pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin",
                       n_ctx=64) as s:
        ids = s.tokenize("Once upon a time there was a big red dog who liked to run")
        s._model.prefill(ids, 0)
        kvcache.shift(s._model, 2, 5)
        kept = ids[:2] + ids[7:]
        assert s._model.tokens == ids[:2] + [-1] * (len(kept) - 2)  # moved positions: never reused
        yield s._model, kept


def test_kv_shift_rerotates_keys(shifted):
    """After dropping positions, the first layer's keys/values equal a fresh run of the kept tokens
    at their new positions (layer 0 sees only its own token)."""
    tf, kept = shifted
    k = tf._bufs["key_cache"][0, 0, :, :len(kept)].copy()
    v = tf._bufs["value_cache"][0, 0, :, :len(kept)].copy()
    tf.prefill(kept, 0)
    np.testing.assert_allclose(k, tf._bufs["key_cache"][0, 0, :, :len(kept)], atol=2e-4)
    np.testing.assert_allclose(v, tf._bufs["value_cache"][0, 0, :, :len(kept)], atol=1e-6)


def test_shifted_positions_are_not_a_reusable_prefix(shifted):
    """After a context shift the moved positions' values saw the dropped tokens: a later prompt
    equal to the shifted sequence must be evaluated again, giving a fresh run's logits (reusing
    the shifted cache would give other logits from layer 1 on)."""
    from pyllama import kvcache
    tf, kept = shifted
    kvcache.evaluate(tf, kept)
    after_shift = tf.logits_buffer[0].copy()
    assert tf.tokens == kept  # evaluated again: reusable from now on
    tf.prefill(kept, 0)
    np.testing.assert_allclose(after_shift, tf.logits_buffer[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(prompt=None), "prompt"), (dict(prompt=[1.5, 2]), r"prompt\[0\]"), (dict(prompt=[1, 512]), "prompt"),
    (dict(prompt=[]), "at least one"), (dict(prompt=[[1, 2]]), "prompt"), (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"), (dict(max_tokens="3"), "max_tokens"),
    (dict(temperature="0.5"), "temperature"), (dict(top_p=2), "top_p"), (dict(top_k=None), "top_k"),
    (dict(stop=[""]), "empty stop"), (dict(stop=5), "stop"), (dict(stop=[b"x"]), "stop"),
    (dict(stop=["a"] * 17), "stop"), (dict(stop_token_ids=[512]), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"), (dict(stop_token_ids=3), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(echo="yes"), "echo"), (dict(stream=1), "stream"), (dict(seed=2.5), "seed"),
    (dict(logit_bias={600: 1}), "logit_bias"), (dict(repeat_last_n=1.5), "repeat_last_n"),
    (dict(context_shift="no"), "context_shift"), (dict(n_keep=-1), "n_keep"),
    (dict(max_tokens=600), "the context holds 512"),
])
def test_bad_arguments(m, kw, match):
    kw = {"prompt": PROMPT, **kw}
    with pytest.raises(ParameterError, match=match):
        m.create_completion(**kw)
    if kw.get("stream") != 1:
        with pytest.raises(ParameterError, match=match):
            m.create_completion(stream=True, **kw)  # checked before the first chunk is asked for


def test_unknown_keyword_is_a_type_error(m):
    with pytest.raises(TypeError, match="temprature"):
        m.create_completion(PROMPT, temprature=0.5)


def test_closed_model(shared):
    s = pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin")
    s.close()
    for call in (lambda: s.create_completion(PROMPT), lambda: s.save_state(), lambda: s.reset(),
                 lambda: s.load_state(b"")):
        with pytest.raises(PyllamaError, match="closed"):
            call()


def test_gguf_model_completes(shared):
    with pyllama.Llama(shared / "models/stories260K-f32.gguf") as g:
        r = g(PROMPT, max_tokens=20, temperature=0)
        assert r["choices"][0]["finish_reason"] == "length" and len(text_of(r)) > 20


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("factors", [None, "ramp"])
def test_kv_shift_against_numpy_rotation(shared, style, factors):
    """pl_kv_shift vs its definition: positions move down by d, each key pair (2j, 2j+1) — NeoX:
    (j, j + head_size/2) — rotated by -d * theta^(-2j/head_size) / factor_j, values only moved."""
    from pyllama._core import ffi, lib
    with pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin",
                       n_ctx=16) as s:
        tf = s._model
        kc, vc = tf._bufs["key_cache"][0], tf._bufs["value_cache"][0]  # slot 0
        rng = np.random.default_rng(1)
        kc[:] = rng.standard_normal(kc.shape)
        vc[:] = rng.standard_normal(vc.shape)
        k0, v0 = kc.copy(), vc.copy()
        hs = s.dim // s.n_heads
        f = np.linspace(1, 8, hs // 2).astype(np.float32) if factors else np.ones(hs // 2, np.float32)
        src, dst, n = 9, 4, 6
        w = tf._weights  # the style and the divisors are the model's: set them for this case
        saved = w.cfg.rope_style, w.rope_freqs
        fbuf = ffi.from_buffer("float[]", f)
        w.cfg.rope_style = lib.PL_ROPE_NEOX if style == "neox" else lib.PL_ROPE_NORM
        w.rope_freqs = fbuf if factors else ffi.NULL
        try:
            lib.pl_kv_shift(w, tf._state, src, dst, n)
        finally:
            w.cfg.rope_style, w.rope_freqs = saved
        # the cache of a slot: (layers, kv heads, positions, head_size)
        want = k0[:, :, src:src + n].astype(np.float64)
        ang = (dst - src) * 10000.0 ** (-2 * np.arange(hs // 2) / hs) / f
        a = np.arange(hs // 2) if style == "neox" else 2 * np.arange(hs // 2)
        b = a + hs // 2 if style == "neox" else a + 1
        x0, x1 = want[..., a].copy(), want[..., b].copy()
        want[..., a] = x0 * np.cos(ang) - x1 * np.sin(ang)
        want[..., b] = x0 * np.sin(ang) + x1 * np.cos(ang)
        np.testing.assert_allclose(kc[:, :, dst:dst + n], want, atol=1e-5)
        np.testing.assert_array_equal(vc[:, :, dst:dst + n], v0[:, :, src:src + n])
        np.testing.assert_array_equal(kc[:, :, :dst], k0[:, :, :dst])  # what stays is untouched


def test_stream_never_splits_a_character(m):
    """Bias and a frequency penalty make the model alternate the byte tokens <0xC3> <0xA9> ("é"
    in UTF-8, tok512's ids 3 + byte): no chunk holds half of it."""
    c3, a9 = 3 + 0xC3, 3 + 0xA9
    assert m.tokenizer.pieces[c3] == b"<0xC3>" and m.tokenizer.pieces[a9] == b"<0xA9>"
    kw = dict(max_tokens=4, logit_bias={c3: 1000.0, a9: 999.0}, frequency_penalty=500.0, seed=1)
    chunks = [text_of(c) for c in m(PROMPT, stream=True, **kw)]
    assert "".join(chunks) == "éé" == text_of(m(PROMPT, **kw))
    assert all(c in ("", "é") for c in chunks)
    echoed = [text_of(c) for c in m(m.tokenize(PROMPT) + [c3], max_tokens=1, echo=True, stream=True,
                                     logit_bias={a9: 100.0}, seed=1)]
    assert "".join(echoed) == PROMPT + "é" and "\ufffd" not in "".join(echoed)
