"""The Python API's parameters over HTTP: echo with logprobs, chat logprobs, n > 1 choices and
context shift, each compared to the same request through Llama.create_completion /
create_chat_completion (the expected values: pyllama's own Python API, one Completion object
serving both). Model: ../shared/models/quant-base-q8_0.gguf (synthetic llama, vocab 512,
context 128; /work/shared/golden/README.md). Servers and clients as in test_server.py.
"""
import concurrent.futures
import json
import re

import httpx
import numpy as np
import openai
import pytest

import pyllama
from pyllama import kvcache
from pyllama.completion import choice_seed
from pyllama.engine import Engine
from pyllama.model import Transformer
from pyllama.server import build_app

from test_server import model_path, running, wait_idle

MESSAGES = [{"role": "user", "content": "Tell a story"}]


@pytest.fixture(scope="module")
def ref():
    m = pyllama.Llama(model_path(), threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def url():
    with running(build_app(model_path(), parallel=4, threads=1)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def sse(url, path, body):
    """The JSON events of a streamed request (after checking it ends with [DONE])."""
    with httpx.stream("POST", url + path, json=dict(body, stream=True), timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def joined_logprobs(chunks):
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for c in chunks:
        for k in out:
            out[k] += c["choices"][0]["logprobs"][k]
    return out


# -- echo with logprobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [8, 0])
def test_echo_with_logprobs_equals_the_python_api(client, url, ref, max_tokens):
    """OpenAI's logprobs object (tokens, token_logprobs, top_logprobs, text_offset) with the
    prompt's tokens first (the first without a logprob), then the completion's."""
    kw = dict(prompt="Tom and Lily went to the park", max_tokens=max_tokens, temperature=0, echo=True, logprobs=3)
    want = ref.create_completion(**kw)["choices"][0]
    got = client.completions.create(model="x", **kw).choices[0]
    assert got.text == want["text"] and got.text.startswith("Tom and Lily went to the park")
    assert got.logprobs.model_dump() == want["logprobs"]
    assert want["logprobs"]["token_logprobs"][0] is None and len(want["logprobs"]["tokens"]) > 8 + max_tokens
    chunks = sse(url, "/v1/completions", kw)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["text"]
    assert joined_logprobs(chunks) == want["logprobs"]


def test_logprobs_without_echo_and_in_chat(client, ref):
    kw = dict(prompt="One day", max_tokens=6, temperature=0, logprobs=2)
    want = ref.create_completion(**kw)["choices"][0]["logprobs"]
    assert client.completions.create(model="x", **kw).choices[0].logprobs.model_dump() == want
    want = ref.create_chat_completion(MESSAGES, max_tokens=6, temperature=0, logprobs=2)["choices"][0]
    got = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2).choices[0]
    content = got.logprobs.model_dump(exclude_none=True)["content"]
    assert content == want["logprobs"]["content"] and len(content) == 6
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    plain = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=3, temperature=0,
                                           logprobs=True).choices[0].logprobs.content
    assert [c.top_logprobs for c in plain] == [[]] * 3


# -- n choices -------------------------------------------------------------------------------------------
def test_choice_seeds():
    assert [choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert choice_seed(2 ** 64 - 1, 1) == 0 and choice_seed(None, 2) is None


def test_n_choices_are_the_requests_with_derived_seeds(client, url, ref):
    """Choice i of a request with seed S equals the request alone with seed S + i
    (completion.choice_seed); streamed chunks carry their choice's index."""
    kw = dict(prompt="The sun", max_tokens=12, temperature=1.0, top_k=0, min_p=0.0)
    wants = [ref.create_completion(seed=11 + i, **kw)["choices"][0]["text"] for i in range(3)]
    assert len(set(wants)) == 3  # the seeds differ, so do the texts
    got = client.completions.create(model="x", n=3, seed=11, prompt=kw["prompt"], max_tokens=12,
                                    temperature=1.0, extra_body=dict(top_k=0, min_p=0.0))
    assert [c.index for c in got.choices] == [0, 1, 2] and [c.text for c in got.choices] == wants
    n_prompt = len(ref.tokenize("The sun"))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (n_prompt, 36)  # the prompt once; 3 x 12
    texts = ["", "", ""]
    chunks = sse(url, "/v1/completions", dict(kw, n=3, seed=11))
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == wants and len({c["id"] for c in chunks}) == 1
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1, 2]


def test_n_chat_choices_streamed(client, ref):
    wants = [ref.create_chat_completion(MESSAGES, max_tokens=10, temperature=0.9, seed=5 + i)["choices"][0]
             ["message"]["content"] for i in range(2)]
    texts, roles = ["", ""], []
    for chunk in client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=10, temperature=0.9,
                                                seed=5, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles += [c.index] if c.delta.role else []
    assert texts == wants and sorted(roles) == [0, 1]
    got = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=10, temperature=0, n=2)
    greedy = ref.create_chat_completion(MESSAGES, max_tokens=10, temperature=0)["choices"][0]["message"]["content"]
    assert [c.message.content for c in got.choices] == [greedy, greedy]


def test_more_choices_than_the_queue_holds_is_503_and_leaves_nothing_running(ref):
    with running(build_app(ref, parallel=1, max_queue=1, threads=1)) as base:
        r = httpx.post(base + "/v1/completions", json=dict(prompt="a", n=3, max_tokens=4), timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        assert httpx.post(base + "/v1/completions", json=dict(prompt="a", n=2, max_tokens=4),
                          timeout=60).status_code == 200
        health = httpx.get(base + "/health").json()
        assert health["slots_processing"] == health["queue"] == 0


def test_a_client_leaving_an_n_choice_stream_frees_every_slot(url):
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json=dict(prompt="Once", n=3, max_tokens=10 ** 6, context_shift=True, temperature=0,
                                stream=True)) as r:  # (endless unless cancelled)
        lines = r.iter_lines()
        next(lines), next(lines)
    wait_idle(url)
    empty = httpx.post(url + "/v1/completions", json=dict(prompt="Once", n=2, max_tokens=0), timeout=60).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in empty["choices"]] == [(0, "", "length"), (1, "", "length")]


# -- context shift -------------------------------------------------------------------------------------
def test_context_shift_over_http_equals_the_python_api(client, url, ref):
    """Past the 128 positions, several requests at once (so shifts happen in slots other than 0)
    give the API's text; without context_shift the same request is refused."""
    cases = [dict(prompt=p, max_tokens=m, temperature=0, context_shift=True, n_keep=k)
             for p, m, k in (("Once upon a time", 200, 1), ("The cat sat", 180, 4), ("Hello, world!", 160, 0))]
    wants = [ref.create_completion(**c)["choices"][0] for c in cases]
    assert [w["finish_reason"] for w in wants] == ["length"] * 3

    def one(c):
        body = dict(c)
        prompt = body.pop("prompt")
        return client.completions.create(model="x", prompt=prompt, max_tokens=body.pop("max_tokens"),
                                         temperature=0, extra_body=body).choices[0]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(one, cases))
    assert [(g.text, g.finish_reason) for g in got] == [(w["text"], w["finish_reason"]) for w in wants]
    chunks = sse(url, "/v1/completions", cases[0])
    assert "".join(c["choices"][0]["text"] for c in chunks) == wants[0]["text"]
    want = ref.create_chat_completion(MESSAGES, max_tokens=150, temperature=0, context_shift=True)["choices"][0]
    got = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=150, temperature=0,
                                         extra_body=dict(context_shift=True)).choices[0]
    assert got.message.content == want["message"]["content"]
    shifts = re.search(r"^pyllama_context_shifts_total (\d+)$", httpx.get(url + "/metrics").text, re.M)
    assert int(shifts.group(1)) >= 5  # (5 requests of 150..200 tokens in 128 positions: one or more each)
    r = httpx.post(url + "/v1/completions", json=dict(cases[0], context_shift=False), timeout=60)
    assert r.status_code == 400 and "context_shift: true" in r.json()["error"]["message"]


def test_a_shift_in_any_slot_equals_the_shift_of_slot_0():
    """kvcache.shift on slot 1 of an engine's cache moves exactly what it moves on slot 0."""
    mf = pyllama.load(model_path())
    tf = Transformer(mf, n_ctx=32, threads=1, n_slots=2)
    ids = [1] + list(range(40, 60))
    tf.forward_batch(ids + ids, [0] * len(ids) + [1] * len(ids), [False] * (2 * len(ids)))
    kvcache.shift(tf, 3, 7, slot=1)
    assert tf.slot_len == [21, 14]
    kc, vc = tf._bufs["key_cache"], tf._bufs["value_cache"]
    untouched = kc[0, :, :21].copy()
    kvcache.shift(tf, 3, 7, slot=0)
    np.testing.assert_array_equal(kc[1, :, :14], kc[0, :, :14])
    np.testing.assert_array_equal(vc[1, :, :14], vc[0, :, :14])
    assert not np.array_equal(untouched[:, :14], kc[0, :, :14])  # (it did move something)
    with pytest.raises(pyllama.ParameterError, match="slot"):
        kvcache.shift(tf, 1, 2, slot=2)


def test_an_engine_without_context_shift_ends_a_full_slot_with_length(ref):
    from pyllama.completion import Completion
    with Engine(ref, slots=2, n_ctx=16, threads=1) as engine:
        plain = Completion(ref, "Once upon a time", max_tokens=None, temperature=0, n_ctx=16)
        shifting = Completion(ref, "Once upon a time", max_tokens=30, temperature=0, n_ctx=16, context_shift=True)
        a, b = engine.submit(plain.ids, plain), engine.submit(shifting.ids, shifting)
        assert len(a.result(60)) == 16 - len(plain.ids) and a.finish_reason == "length"
        assert len(b.result(60)) == 30 and engine.stats()["shifts"] >= 2


def test_prompt_rows_come_in_order_across_chunks(ref):
    """A prompt fed in chunks of a few tokens per step, beside another request, still gives the
    echo records of the prompt evaluated at once (the Python API's)."""
    from pyllama.completion import Completion
    kw = dict(prompt="Tom and Lily went to the park and saw a big red ball", max_tokens=5, temperature=0,
              echo=True, logprobs=2)
    want = ref.create_completion(**kw)["choices"][0]
    with Engine(ref, slots=2, threads=1, step_tokens=4) as engine:
        other = Completion(ref, "Once upon a time", max_tokens=20, temperature=0)
        req = Completion(ref, **kw)
        assert len(req.ids) > 3 * 4
        engine.submit(other.ids, other)
        h = engine.submit(req.ids, req)
        h.result(60)
        req.finish(h.finish_reason)
        pieces = req.take()
    records = [r for _, recs, _ in pieces for r in recs]
    assert "".join(p[0] for p in pieces) == want["text"]
    assert [r[2] for r in records] == want["logprobs"]["token_logprobs"]
    assert [r[3] for r in records] == want["logprobs"]["top_logprobs"]
