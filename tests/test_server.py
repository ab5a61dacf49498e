"""`pyllama serve`: the OpenAI-compatible server, driven by real clients over real sockets.

Expected values come from pyllama's own Python API: every answer the server gives must equal the
same request through Llama.create_completion / create_chat_completion (one Completion object
serves both; the engine's batched logits are bit-identical to a single sequence's for quantized
files, tests/test_engine.py). Model: ../shared/models/quant-base-q8_0.gguf (a synthetic llama,
vocab 512, context 128, /work/shared/golden/README.md). The servers are uvicorn in a thread on a
free port of 127.0.0.1; the `openai` package and httpx are the clients.
"""
import concurrent.futures
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import ROOT, shared_path

import pyllama
from pyllama.completion import Completion
from pyllama.engine import Engine
from pyllama.errors import ParameterError, PyllamaError
from pyllama.server import build_app

KEY = "sk-test-key"
MAX_BODY = 16384
PROMPTS = ["Once upon a time", "The cat sat", "Tom and Lily went to the park", "a", "Hello, world!",
           "She had a big red ball and", "One day", "The sun"]


def model_path():
    return str(shared_path("models/quant-base-q8_0.gguf"))


@pytest.fixture(scope="module")
def ref():
    m = pyllama.Llama(model_path(), threads=1)
    yield m
    m.close()


@contextlib.contextmanager
def running(app):
    """uvicorn serving app on a free port of 127.0.0.1 in a thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"
        sock.close()


@pytest.fixture(scope="module")
def url():
    app = build_app(model_path(), parallel=4, threads=1, api_key=KEY, max_queue=64, max_body=MAX_BODY)
    with running(app) as base:
        yield base
    with pytest.raises(PyllamaError, match="closed"):  # the lifespan's end closed the engine
        app.state.engine.submit([1])


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth(**headers):
    return {"Authorization": f"Bearer {KEY}", **headers}


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, headers=auth(), timeout=60, **kw)


# -- one request object for Python and the engine ------------------------------------------------------
CASES = [dict(prompt="Once upon a time", max_tokens=20, temperature=0),
         dict(prompt="The cat sat", max_tokens=24, temperature=0.9, seed=5, top_k=0, min_p=0.0),
         dict(prompt=[1, 40, 50, 60], max_tokens=16, temperature=0, stop=[" her", "!"]),
         dict(prompt="One day", max_tokens=12, temperature=0, logprobs=3, repeat_penalty=1.3),
         dict(prompt="a", max_tokens=10, temperature=0, echo=True, stop_token_ids=[375]),
         dict(prompt="Tom and Lily went", max_tokens=6, temperature=0, echo=True, logprobs=2),
         dict(prompt="The sun", max_tokens=150, temperature=0.8, seed=3, context_shift=True, n_keep=3)]


def test_the_engine_runs_the_same_completion_as_the_python_api(ref):
    """Completion as the engine's policy (batched with the others) gives create_completion's
    pieces exactly: text split, logprobs (echo: the prompt's too), finish reasons, a context
    shift past the 128 positions."""
    with Engine(ref, slots=3, threads=1) as engine:
        reqs = [Completion(ref, **c) for c in CASES]
        handles = [engine.submit(r.ids, r) for r in reqs]
        for r, h, case in zip(reqs, handles, CASES):
            h.result(timeout=60)
            r.finish(h.finish_reason)
            got = r.take()
            want = [(c["choices"][0]["text"], c["choices"][0]["logprobs"], c["choices"][0]["finish_reason"])
                    for c in ref.create_completion(stream=True, **case)]
            assert [(t, {"tokens": [x[1] for x in recs], "text_offset": [x[0] for x in recs],
                         "token_logprobs": [x[2] for x in recs], "top_logprobs": [x[3] for x in recs]}
                     if "logprobs" in case else None, f) for t, recs, f in got] == want
            assert len(want) > 1 and want[-1][2] in ("stop", "length")


def test_a_request_checks_its_arguments_before_running(ref):
    with pytest.raises(ParameterError, match="max_tokens"):
        Completion(ref, "a", max_tokens=-1)
    with pytest.raises(ParameterError, match=r"prompt \(\d+ tokens\) and max_tokens \(125\).*holds 128"):
        Completion(ref, "Once upon a time, there was", max_tokens=125)
    with pytest.raises(ParameterError, match="holds 8"):
        Completion(ref, "Once upon a time", max_tokens=4, n_ctx=8)


# -- the openai package ---------------------------------------------------------------------------------
def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["quant-base-q8_0.gguf"]


def test_completions_with_and_without_stream(client, ref):
    want = ref.create_completion("Once upon a time", max_tokens=20, temperature=0)
    got = client.completions.create(model="x", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert got.choices[0].text == want["choices"][0]["text"] and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"] and got.usage.completion_tokens == 20
    chunks = list(client.completions.create(model="x", prompt="Once upon a time", max_tokens=20,
                                            temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == want["choices"][0]["text"]
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "length"]
    seeded = dict(prompt="The sun", max_tokens=16, temperature=1.0, seed=7, top_k=0, min_p=0.0)
    got = client.completions.create(model="x", prompt="The sun", max_tokens=16, temperature=1.0, seed=7,
                                    extra_body=dict(top_k=0, min_p=0.0))
    assert got.choices[0].text == ref.create_completion(**seeded)["choices"][0]["text"]


def test_chat_completions_with_and_without_stream(client, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story"}]
    want = ref.create_chat_completion(messages, max_tokens=16, temperature=0)
    got = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].message.role == "assistant" and got.usage.total_tokens == want["usage"]["total_tokens"]
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        want["choices"][0]["message"]["content"]
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16


def test_null_fields_take_their_defaults(url, ref):
    body = dict(prompt="The cat sat", temperature=0, max_tokens=None, stop=None, seed=None, logprobs=None, n=None)
    got = post(url, "/v1/completions", body).json()["choices"][0]
    assert got["text"] == ref.create_completion("The cat sat", temperature=0)["choices"][0]["text"]  # 16 tokens
    r = post(url, "/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                                temperature=0, logprobs=None, top_logprobs=None))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_stream_is_server_sent_events_ending_with_done(url):
    with httpx.stream("POST", url + "/v1/completions", json=dict(prompt="a", max_tokens=4, stream=True),
                      headers=auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


@pytest.mark.parametrize("text", ["", 'say "hi"\\', "line\nfeed\ttab", "\u2028 \x1c", "é 😀 中",
                                  "\x00pyllama-text\x00"])
@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_spliced_text_chunk_is_the_bytes_of_the_whole_chunk(ref, text, logprobs):
    """The streamed chunk of a piece of text is its JSON string spliced into the shape's chunk
    rendered once (server_stream._plain_chunk): the same bytes as json.dumps of the chunk object."""
    from pyllama.chat import ChatShape
    from pyllama.completion import TextShape
    from pyllama.server_stream import _plain_chunk, _sse
    req = Completion(ref, "Once", max_tokens=2, logprobs=logprobs)
    for shape in (TextShape("m\"odel", req, 1), ChatShape("model", req)):
        head, tail = _plain_chunk(shape)
        want = _sse(shape.chunks(text, [], None)[0])
        assert b"data: " + head + json.dumps(text, ensure_ascii=False).encode() + tail == want


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", dict(prompt="Once upon a time", max_tokens=40, temperature=0, stop=["the"])),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "The sun"}], max_tokens=30,
                                  temperature=0)),
    ("/v1/completions", dict(prompt="The cat", max_tokens=12, temperature=0, logprobs=2))])
def test_streamed_events_are_the_python_apis_chunks_byte_for_byte(url, ref, path, body):
    with httpx.stream("POST", url + path, json=dict(body, stream=True), headers=auth(), timeout=60) as r:
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    got = [json.loads(e[6:]) for e in events[:-2]]
    for e, obj in zip(events, got):  # each event is json.dumps of its object
        assert e == "data: " + json.dumps(obj, ensure_ascii=False)
    kw = {k: v for k, v in body.items() if k not in ("prompt", "messages")}
    api = list(ref.create_chat_completion(body["messages"], stream=True, **kw) if "messages" in body
               else ref.create_completion(body["prompt"], stream=True, **kw))
    assert len(got) == len(api) > 3
    assert [g["choices"] for g in got] == [a["choices"] for a in api]


def test_the_readme_client_snippet_runs_as_shown(url, ref):
    """README.md, "Serving": its python block against this server prints the Python API's texts."""
    section = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "http://127.0.0.1:8080/v1" in code and '"sk-anything"' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("http://127.0.0.1:8080/v1", url + "/v1").replace('"sk-anything"', repr(KEY)), {})
    chat = ref.create_chat_completion([{"role": "user", "content": "Tell me a story"}], max_tokens=32, temperature=0)
    text = ref.create_completion("Once upon a time", max_tokens=16, temperature=0)
    assert out.getvalue() == chat["choices"][0]["message"]["content"] + "\n" + text["choices"][0]["text"] + "\n"


def test_uvicorn_serves_with_httptools_and_uvloop():
    """The server extra (pyproject.toml) installs uvicorn's C HTTP parser and event loop, which
    it picks by itself ("auto"): a third less work per streamed token on the event loop."""
    async def app(scope, receive, send):
        pass
    cfg = uvicorn.Config(app, lifespan="off")
    cfg.load()
    assert cfg.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"
    import uvloop  # noqa: F401  (uvicorn's "auto" loop takes it when it imports)
    if hasattr(cfg, "get_loop_factory"):  # (uvicorn >= 0.36)
        assert cfg.get_loop_factory().__module__.startswith("uvloop")


@pytest.mark.parametrize("name", ["bpe/llama3-tiny-f16.gguf", "bpe/qwen2-tiny-f16.gguf"])
def test_byte_level_bpe_models_with_their_own_chat_templates(name):
    """Llama 3 and Qwen2 GGUFs (byte-level BPE, the file's chat template, EOT stop ids): streamed
    chat over HTTP equals the Python API (float weights: greedy on short outputs, no near ties)."""
    path = str(shared_path("models/" + name))
    m = pyllama.Llama(path, threads=1, n_ctx=256)
    try:
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Héllo 👋"}]
        want = m.create_chat_completion(messages, max_tokens=12, temperature=0)["choices"][0]
        assert want["message"]["content"]  # (a synthetic model: some text, not meaning)
        with running(build_app(m, parallel=2, threads=1)) as base:
            c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
            chunks = list(c.chat.completions.create(model="m", messages=messages, max_tokens=12,
                                                    temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["message"]["content"]
        assert chunks[-1].choices[0].finish_reason == want["finish_reason"]
    finally:
        m.close()


# -- errors in OpenAI's shape ---------------------------------------------------------------------------
def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_a_missing_or_wrong_key_is_401(url):
    body = dict(prompt="a", max_tokens=2)
    assert error_of(httpx.post(url + "/v1/completions", json=body), 401)["type"] == "authentication_error"
    error_of(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"}), 401)
    error_of(httpx.get(url + "/metrics", headers={"Authorization": KEY}), 401)  # no "Bearer "
    assert httpx.get(url + "/health").json()["status"] == "ok"  # open to probes


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", dict(prompt="a", bogus=1), "bogus"),
    ("/v1/completions", dict(prompt="a", temperature="hot"), "temperature"),
    ("/v1/completions", dict(prompt="a", max_tokens=-1), "max_tokens"),
    ("/v1/completions", dict(prompt="a", top_p=0), "top_p"),
    ("/v1/completions", dict(prompt="a", stop=5), "stop"),
    ("/v1/completions", dict(prompt="a", logit_bias={"9999": 1}), "logit_bias"),
    ("/v1/completions", dict(prompt="a", n=0), "n"),
    ("/v1/completions", dict(prompt="a", n=17), "n"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], n="2"), "n"),
    ("/v1/completions", dict(prompt="a", context_shift="yes"), "context_shift"),
    ("/v1/completions", dict(prompt="a", context_shift=True, n_keep=-1), "n_keep"),
    ("/v1/completions", dict(prompt="a", context_shift=True, n_keep=128), "n_keep"),
    ("/v1/completions", dict(prompt="a", logprobs=21), "logprobs"),
    ("/v1/completions", dict(prompt="a", echo="yes"), "echo"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], logprobs=3), "logprobs"),
    ("/v1/completions", dict(prompt="a", stream="yes"), "stream"),
    ("/v1/completions", dict(prompt=[1, 99999]), "prompt"),
    ("/v1/completions", dict(prompt=[]), "prompt"),
    ("/v1/completions", dict(prompt={"text": "a"}), "prompt"),
    ("/v1/completions", dict(prompt="a", seed=1.5), "seed"),
    ("/v1/completions", dict(prompt="a", stream_options={"x": 1}), "stream_options"),
    ("/v1/completions", dict(prompt="a", model=3), "model"),
    ("/v1/completions", dict(max_tokens=2), "prompt"),
    ("/v1/chat/completions", dict(messages=[{"content": "hi"}]), "messages"),
    ("/v1/chat/completions", dict(messages=[], max_tokens=2), "messages"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=99), "top_logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], prompt="a"), "prompt"),
])
def test_invalid_fields_are_400_naming_the_field(url, path, body, param):
    err = error_of(post(url, path, body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_a_prompt_too_long_for_the_context_is_400_with_the_sizes(url):
    err = error_of(post(url, "/v1/completions", dict(prompt=[1] + [40] * 119, max_tokens=20)), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert re.search(r"\(120 tokens\).*\(20\).*140 positions.*holds 128", err["message"])


def test_malformed_json_non_object_and_wrong_content_type(url):
    err = error_of(httpx.post(url + "/v1/completions", content=b'{"prompt": "a",',
                              headers=auth(**{"Content-Type": "application/json"})), 400)
    assert "malformed JSON" in err["message"]
    error_of(httpx.post(url + "/v1/completions", content=b'["a"]', headers=auth(**{"Content-Type": "application/json"})), 400)
    error_of(httpx.post(url + "/v1/completions", content=b'{"prompt": "a"}',
                        headers=auth(**{"Content-Type": "text/plain"})), 415)
    error_of(httpx.post(url + "/v1/completions", content=b"\xff\xfe", headers=auth(**{"Content-Type": "application/json"})), 400)
    assert error_of(httpx.get(url + "/v1/nothing", headers=auth()), 404)["code"] == "not_found"


def test_a_body_over_the_limit_is_413(url):
    error_of(post(url, "/v1/completions", dict(prompt="a" * MAX_BODY)), 413)

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000
    error_of(httpx.post(url + "/v1/completions", content=chunks(), headers=auth(**{"Content-Type": "application/json"})), 413)


def wait_idle(base, seconds=30):
    deadline = time.monotonic() + seconds
    while (h := httpx.get(base + "/health").json())["slots_processing"] or h["queue"]:
        assert time.monotonic() < deadline, "a request still runs after its client left"
        time.sleep(0.02)


def test_a_full_queue_is_503_with_retry_after_and_shutdown_closes_the_engine(ref):
    app = build_app(ref, parallel=1, max_queue=0, threads=1, ctx_size=4096)
    with running(app) as base:
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json=dict(prompt="Once", max_tokens=4000, temperature=0, stream=True)) as long:
            lines = long.iter_lines()  # (kept: a dropped iterator closes the connection)
            next(lines)  # the request holds the only slot
            r = httpx.post(base + "/v1/completions", json=dict(prompt="a", max_tokens=2), timeout=60)
            assert error_of(r, 503)["type"] == "server_error" and int(r.headers["Retry-After"]) >= 1
        wait_idle(base)  # the stream's client left: its request is cancelled
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a long non-streamed answer
            httpx.post(base + "/v1/completions", json=dict(prompt="Once", max_tokens=4000, temperature=0), timeout=0.3)
        wait_idle(base)
        metrics = httpx.get(base + "/metrics").text
        assert 'pyllama_requests_total{route="/v1/completions",status="503"} 1' in metrics
        # neither request ran its 4000 tokens (together they did not reach one's 4000: a bound that
        # holds however fast the tokens come, as long as 4000 take longer than the 0.3 s timeout)
        assert metric(base, "generated_tokens_total") < 4000
    with pytest.raises(PyllamaError, match="closed"):
        app.state.engine.submit([1])
    assert ref.create_completion("a", max_tokens=2)["usage"]["completion_tokens"] == 2  # not closed


# -- load ---------------------------------------------------------------------------------------------
def metric(url, name):
    text = httpx.get(url + "/metrics", headers=auth()).text  # (the key is ignored without api_key)
    return float(re.search(rf"^pyllama_{name} (\S+)$", text, re.M).group(1))


def expected(ref, i):
    """Request i of the load test: its body and the text/finish the Python API gives."""
    prompt, n = PROMPTS[i % len(PROMPTS)], 6 + (i * 7) % 19
    if i % 3 == 2:
        messages = [{"role": "user", "content": prompt}]
        out = ref.create_chat_completion(messages, max_tokens=n, temperature=0)["choices"][0]
        return "/v1/chat/completions", dict(messages=messages, max_tokens=n, temperature=0), \
            (out["message"]["content"], out["finish_reason"])
    out = ref.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]
    return "/v1/completions", dict(prompt=prompt, max_tokens=n, temperature=0), (out["text"], out["finish_reason"])


def ask(http, url, path, body, stream):
    if not stream:
        r = http.post(url + path, json=body, headers=auth())
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return (c["message"]["content"] if "message" in c else c["text"]), c["finish_reason"]
    text, finish = [], None
    with http.stream("POST", url + path, json=dict(body, stream=True), headers=auth()) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        c = json.loads(line)["choices"][0]
        text.append(c["delta"].get("content") or "" if "delta" in c else c["text"])
        finish = c["finish_reason"] or finish
    return "".join(text), finish


def test_load_64_requests_from_16_clients_and_clients_killed_mid_stream(url, ref):
    jobs = [expected(ref, i) for i in range(64)]
    t0 = time.monotonic()

    def client_run(k):  # client k sends requests k, k+16, k+32, k+48; odd ones stream
        with httpx.Client(timeout=60) as http:
            return [(i, ask(http, url, jobs[i][0], jobs[i][1], stream=i % 2 == 1)) for i in range(k, 64, 16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client_run, range(16)) for r in rs]
    assert len(results) == 64 and time.monotonic() - t0 < 60
    for i, got in results:
        assert got == jobs[i][2], f"request {i}"
    assert metric(url, "slots_in_use") == 0

    generated = metric(url, "generated_tokens_total")

    def killed(k):  # read two events of a long stream, then drop the connection
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", url + "/v1/completions", headers=auth(),
                             json=dict(prompt=PROMPTS[k], max_tokens=110, temperature=0, stream=True)) as r:
                lines = r.iter_lines()
                next(lines), next(lines)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(killed, range(6)))
    wait_idle(url)
    assert metric(url, "slots_in_use") == metric(url, "queue_length") == 0
    path, body, want = jobs[0]
    assert ask(httpx.Client(timeout=60), url, path, body, stream=True) == want  # still serving
    # the cancelled requests were not run to their 110 tokens each
    assert metric(url, "generated_tokens_total") - generated < 6 * 110 / 2


# -- the command ----------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pyllama_serve_command_answers_and_stops_on_sigint(ref):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyllama", "serve", model_path(), "--port", str(port),
                             "--parallel", "2", "--threads", "1", "--api-key", KEY],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "pyllama serve did not come up"
                time.sleep(0.1)
        got = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0).completions.create(
            model="x", prompt="The cat sat", max_tokens=10, temperature=0)
        assert got.choices[0].text == ref.create_completion("The cat sat", max_tokens=10, temperature=0)["choices"][0]["text"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        log = proc.stderr.read()
        assert "serving quant-base-q8_0.gguf on http://127.0.0.1:" in log
        assert re.search(r"POST /v1/completions 200 .* prompt=\d+ completion=10", log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "--parallel: expected an integer >= 1"),
    (["--max-queue", "-1"], "--max-queue: expected an integer >= 0"),
    (["--port", "70000"], "--port: expected an integer in 0..65535"),
    (["--ctx-size", "1"], "--ctx-size (0 = the model's context): expected an integer in 2..4194304"),
    (["--ctx-size", "-5"], "--ctx-size (0 = the model's context): expected an integer in 2..4194304"),
    (["--ctx-size", str(1 << 40)], "--ctx-size (0 = the model's context): expected an integer in 2..4194304"),
    (["--chat-template", "/nonexistent.jinja"], "--chat-template"),
])
def test_serve_arguments_are_checked(args, message):
    r = subprocess.run([sys.executable, "-m", "pyllama", "serve", model_path(), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith(f"pyllama: error: {message}"), r.stderr


FAKE_LLAMA_SERVER = r"""#!PYTHON
# a stand-in for llama.cpp's llama-server: notes its arguments, streams max_tokens chunks
import http.server, json, sys
open(sys.argv[0] + ".args", "w").write(json.dumps(sys.argv[1:]))
port = int(sys.argv[sys.argv.index("--port") + 1])

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["ignore_eos"] is True and isinstance(body["logit_bias"], list)
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            self.wfile.write(b'data: {"choices": [{"text": "x", "index": 0}]}\n\n')
        usage = {"completion_tokens": n, "prompt_tokens": len(body["prompt"]), "total_tokens": 0}
        self.wfile.write(("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n").encode())
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_bench_serve_runs_and_prints_its_table(tmp_path):
    """`make bench-serve`'s script, tiny: every client count gets a row of tokens it received;
    with --llama-server (here a stand-in that streams what it is asked for) it is started with
    -np/-c/-t as documented and each row gets the ratio pyllama / llama-server."""
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "benchmarks/serve_clients.py", "--model", model_path(), "--clients", "1,2",
           "--gen", "8", "--repeat", "1", "--threads", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("CPU: ") and "llama-server was not measured" in r.stdout
    rows = json.loads(out.read_text())["models"][0]["rows"]
    assert [(row["clients"], row["tokens"]) for row in rows] == [(1, 8), (2, 16)]
    fake = tmp_path / "llama-server"
    fake.write_text(FAKE_LLAMA_SERVER.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    r = subprocess.run(cmd + ["--llama-server", str(fake)], capture_output=True, text=True, timeout=300,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert "pyllama/l-s" in r.stdout and "not measured" not in r.stdout
    args = json.loads((tmp_path / "llama-server.args").read_text())
    ctx = 16 + 8 + 8  # --prompt 16, --gen 8, 8 spare
    assert args[args.index("-np") + 1] == "2" and args[args.index("-c") + 1] == str(2 * ctx)
    assert args[args.index("-t") + 1] == "1" and args[args.index("-m") + 1] == model_path()
    rows = json.loads(out.read_text())["models"][0]["rows"]
    assert [(row["clients"], row["llama_server_tokens"]) for row in rows] == [(1, 8), (2, 16)]
    assert all(row["vs_llama_server"] == row["tok_s"] / row["llama_server_tok_s"] for row in rows)


@pytest.mark.parametrize("given", ("path", "llama"))
def test_invalid_repack_option_is_refused(given):
    """build_app(repack=…) is checked like every option, also when a ready Llama (which keeps its
    own choice) is passed: a clear ParameterError, no server."""
    model = model_path() if given == "path" else pyllama.Llama(model_path(), threads=1)
    with pytest.raises(ParameterError, match="repack"):
        build_app(model, parallel=1, threads=1, repack="no")


def test_ctx_size_default_is_the_models_context_up_to_4096(tmp_path):
    """ctx_size None: each slot gets the model's context, at most 4096 positions; 0: all of it
    (llama.cpp's -c 0); a number: that many. Here a tiny model whose file says 131072."""
    from models import byte_vocab, write_legacy, write_tokenizer_bin
    model = write_legacy(tmp_path / "long.bin", vocab=300, seq=1 << 17)
    tok = write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(300))
    for ctx_size, want in ((None, 4096), (0, 1 << 17), (100, 100)):
        app = build_app(model, tokenizer=tok, parallel=2, threads=1, ctx_size=ctx_size)
        try:
            assert app.state.engine.n_ctx == want and app.state.engine.model.n_ctx == want
        finally:
            app.state.server.close()
    with pytest.raises(ParameterError, match="ctx_size"):
        build_app(model, tokenizer=tok, ctx_size=-1)
