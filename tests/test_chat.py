"""Chat templates (pyllama/chat.py) and create_chat_completion.

Expected values: tests/data/chat_reference.json, made by tests/make_chat_reference.py with Hugging
Face transformers' own renderer (render_jinja_template, transformers 5.24.0) from the real
templates in ../shared/templates; the Llama 2 fallback against llama2.c's chat() format strings
(run.c: "[INST] <<SYS>>\\n%s\\n<</SYS>>\\n\\n%s [/INST]" and "[INST] %s [/INST]", each turn encoded
with BOS).
"""
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from chat_cases import CASES, SPECIAL, TOOLS
from conftest import shared_path

import pyllama
from pyllama import ParameterError, PyllamaError
from pyllama.chat import LLAMA2, encode_chat, render

REFERENCE = json.loads((Path(__file__).parent / "data" / "chat_reference.json").read_text())


@pytest.fixture(scope="module")
def m(stories260k):
    return stories260k


def template(stem):
    return (shared_path("templates") / f"{stem}.jinja").read_text()


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_templates_render_as_hugging_face_does(key):
    stem, case = key.split("/")
    messages, add_gen, with_tools = CASES[case]
    bos, eos = SPECIAL[stem]
    want = REFERENCE[key]
    kw = dict(tools=TOOLS if with_tools else None, date_string="26 Jul 2024")
    if "error" in want:
        with pytest.raises(PyllamaError, match=f"chat template: {want['error']}"):
            render(template(stem), messages, add_gen, bos, eos, **kw)
    else:
        assert render(template(stem), messages, add_gen, bos, eos, **kw) == want["text"]


def test_every_shared_template_is_covered():
    stems = {p.stem for p in shared_path("templates").glob("*.jinja")}
    assert stems == {k.split("/")[0] for k in REFERENCE} and len(stems) == 6


def test_strftime_now_gives_today():
    text = render(template("meta-llama-Llama-3.2-3B-Instruct"), CASES["user"][0], True,
                  "<|begin_of_text|>", "<|eot_id|>")
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in text


def test_llama2_fallback_is_llama2c_chat(m):
    sys_msg, u1, a1, u2 = "be brief", "Hello there", " Hi, how are you?", "And again"
    first = [{"role": "system", "content": sys_msg}, {"role": "user", "content": u1}]
    text = m.apply_chat_template(first)
    assert text == f"<s>[INST] <<SYS>>\n{sys_msg}\n<</SYS>>\n\n{u1} [/INST]"
    assert encode_chat(m, text) == m.tokenize(f"[INST] <<SYS>>\n{sys_msg}\n<</SYS>>\n\n{u1} [/INST]")
    conv = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    text2 = m.apply_chat_template(conv)
    assert text2 == text + a1 + "</s>" + f"<s>[INST] {u2} [/INST]"
    ids = encode_chat(m, text2)
    turn2 = m.tokenize(f"[INST] {u2} [/INST]")  # BOS + the turn, as llama2.c encodes it
    assert ids[-len(turn2) - 1:] == [2] + turn2
    assert m.apply_chat_template([{"role": "user", "content": u1}]) == f"<s>[INST] {u1} [/INST]"


def test_overrides(m, shared):
    phi = template("microsoft-Phi-3.5-mini-instruct")
    msgs = CASES["user"][0]
    assert m.apply_chat_template(msgs, chat_template=phi) == REFERENCE["microsoft-Phi-3.5-mini-instruct/user"]["text"]
    with pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin",
                       chat_format="chatml") as c:
        assert c.apply_chat_template(msgs) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        assert c.apply_chat_template(msgs, chat_template=LLAMA2).startswith("<s>[INST]")
    with pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin",
                       chat_template="{{ messages[0]['content'] }}!") as c:
        assert c.apply_chat_template(msgs) == "What is 2+2?!"


def test_the_files_template_is_used(shared):
    with pyllama.Llama(shared / "models/stories260K-f32.gguf") as g:
        assert "tokenizer.chat_template" not in g.file.metadata
        assert g.apply_chat_template(CASES["user"][0]).startswith("<s>[INST] What")
        g.file.metadata["tokenizer.chat_template"] = "{{ bos_token }}|{{ messages[-1].content }}|{{ eos_token }}"
        assert g.apply_chat_template(CASES["user"][0]) == "<s>|What is 2+2?|</s>"


def test_jinja_features_as_hugging_face():
    assert render("{{ x | tojson }}", [{"role": "user", "content": ""}], x={"a": "<é&>"}) == '{"a": "<é&>"}'
    assert render("{{ x | tojson(indent=2) }}", [{"role": "user", "content": ""}], x=[1]) == "[\n  1\n]"
    assert render("{% for i in [1,2,3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
                  [{"role": "user", "content": ""}]) == "1"
    assert render("  {% if true %}\nA{% endif %}", [{"role": "user", "content": ""}]) == "A"  # trim/lstrip


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    # CVE-2024-34359 (llama-cpp-python's unsandboxed chat templates)
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
    "{{ x()._module.__builtins__['__import__']('os').system('touch /tmp/pyllama-pwned') }}{% endif %}{% endfor %}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch /tmp/pyllama-pwned') }}",
    "{{ messages.append({'role': 'x'}) }}",
])
def test_sandbox_stops_escapes(payload):
    with pytest.raises(PyllamaError, match="chat template"):
        render(payload, [{"role": "user", "content": "hi"}])
    assert not os.path.exists("/tmp/pyllama-pwned")


def test_template_errors_are_pyllama_errors():
    with pytest.raises(PyllamaError, match="chat template: .*TemplateSyntaxError"):
        render("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(PyllamaError, match="chat template: roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(PyllamaError, match="llama-2 chat: roles"):
        render(LLAMA2, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("messages, match", [
    (None, "messages"), ([], "messages"), ("hi", "messages"), ([["user", "hi"]], r"messages\[0\]"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\]"), ([{"role": 1, "content": "x"}], "role"),
    ([{"role": "user", "content": 5}], "content"),
])
def test_bad_messages(m, messages, match):
    with pytest.raises(ParameterError, match=match):
        m.apply_chat_template(messages)
    with pytest.raises(ParameterError, match=match):
        m.create_chat_completion(messages)


def test_bad_template_arguments(m, shared):
    msgs = CASES["user"][0]
    with pytest.raises(ParameterError, match="chat_template"):
        m.apply_chat_template(msgs, chat_template=3)
    with pytest.raises(ParameterError, match="add_generation_prompt"):
        m.apply_chat_template(msgs, add_generation_prompt="yes")
    for kw, match in ((dict(chat_format="vicuna"), "chat_format"), (dict(chat_template=b"x"), "chat_template"),
                      (dict(chat_format="chatml", chat_template="x"), "not both")):
        with pytest.raises(ParameterError, match=match):
            pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin", **kw)


def test_chat_completion_shape_and_stream(m):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
    r = m.create_chat_completion(msgs, max_tokens=20, temperature=0)
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    (c,) = r["choices"]
    assert c["message"]["role"] == "assistant" and c["finish_reason"] == "length"
    same = m.create_completion(encode_chat(m, m.apply_chat_template(msgs)), max_tokens=20, temperature=0)
    assert c["message"]["content"] == same["choices"][0]["text"]
    assert r["usage"] == same["usage"]
    chunks = list(m.create_chat_completion(msgs, max_tokens=20, temperature=0, stream=True))
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(d["content"] for d in deltas[1:-1]) == c["message"]["content"]
    lp = m.create_chat_completion(msgs, max_tokens=5, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["content"]) == 5 and len(lp["content"][0]["top_logprobs"]) == 2


def test_second_turn_reuses_the_cache(m):
    msgs = [{"role": "user", "content": "Tell me a story about a dog and a cat who are friends"}]
    r = m.create_chat_completion(msgs, max_tokens=30, temperature=0)
    msgs2 = msgs + [r["choices"][0]["message"], {"role": "user", "content": "More"}]
    before = m._model.n_evaluated
    r2 = m.create_chat_completion(msgs2, max_tokens=5, temperature=0)
    evaluated = m._model.n_evaluated - before
    assert evaluated < r2["usage"]["prompt_tokens"] // 2


def test_closed_model(shared):
    c = pyllama.Llama(shared / "models/stories260K.bin", tokenizer=shared / "models/tok512.bin")
    c.close()
    with pytest.raises(PyllamaError, match="closed"):
        c.apply_chat_template(CASES["user"][0])
    with pytest.raises(PyllamaError, match="closed"):
        c.create_chat_completion(CASES["user"][0])


# The CLI's chat mode runs through chat.Conversation. Expected bytes: what pyllama's port of
# llama2.c's chat() (run.c, token by token, the sampler after every position) printed before
# chat mode moved onto chat.py — two turns, the first ended by a sampled EOS.
CLI_CHAT = {
    9: b'Enter system prompt (optional): User: Assistant: ppu<\xea\xaf\xae\x11B99\xef\xbf\xbd happy'
       b'\xef\xbf\xbdO B\xef\xbf\xbd\x04\xef\xbf\xbd8t\x1fs acec2\xef\xbf\xbdy\xef\xbf\xbd mom\x1ai"'
       b'\xef\xbf\xbdig\xc3\xa2k\xef\xbf\xbdangsR2 If\xef\xbf\xbd g-k day\xef\xbf\xbdingp\nUser: '
       b'Assistant: reqVce\xef\xbf\xbd3?\x1cveryet\n',
    10: b'Enter system prompt (optional): User: Assistant:  of r1\x1aZ yer\x08se>\xef\xbf\xbdig ne '
        b'theld saw&P friend for ynt k to\xef\xbf\xbdJg\xef\xbf\xbdun fri shez said\x0c[9d\xef\xbf'
        b'\xbdowd\\ lie\xef\xbf\xbdilyK LilydJ\xef\xbf\xbd7on\nUser: Assistant: q\xef\xbf\xbd\x12'
        b'\xc3\xa2X\xe2\x80\x9d his aE\xef\xbf\xbd Lily\n',
}


@pytest.mark.parametrize("seed", sorted(CLI_CHAT))
def test_cli_chat_keeps_llama2c_turns_and_sampling(seed):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "pyllama", "run", str(shared_path("models/quant-base-f32.gguf")),
                        "-m", "chat", "-t", "1.0", "-s", str(seed), "-n", "128"], capture_output=True,
                       input=b"x\nHello there\nAnd again\nOne more time\n", timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == CLI_CHAT[seed]


def test_prefix_cache_benchmark_evaluates_only_the_new_turn():
    """benchmarks/prefix_cache.py (the `make bench` row): the second turn after the history
    evaluates only its new tokens (the timing itself is the benchmark's business)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from prefix_cache import prefix_cache_speedup
    r = prefix_cache_speedup(shared_path("models/stories260K.bin"), shared_path("models/tok512.bin"),
                             history_tokens=300, repeat=1, threads=1)
    assert r["history_tokens"] >= 300 and 5 < r["new_tokens"] < 50
    assert r["cold_s"] > 0 and r["warm_s"] > 0
