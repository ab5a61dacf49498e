"""Tests of pyllama.tokenizers.bpe (byte-level BPE: Llama 3, Qwen2 ...) and of the factory.

Expected values come from (see ../shared/golden/README.md):
  * golden/llama3-vocab.gguf.inp/.out: llama.cpp's own tokenizer test vectors for the Llama 3
    vocabulary (no BOS), which models/bpe/llama3-tiny-f16.gguf carries;
  * tiktoken with Meta's tokenizer.model (shipped in the llama-models package) and the Llama 3
    pattern, and, for models/bpe/qwen2-tiny-f16.gguf (the 3000 best-ranked Llama 3 tokens + 256
    specials), tiktoken with the qwen2 pattern over the same 3000 ranks: the README's oracle;
  * small synthetic vocabularies built here, whose expected ids follow from the BPE rules by hand.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

import llama_models
import pyllama
from conftest import ROOT, shared_path
from pyllama.errors import FormatError, TokenizerError
from pyllama.generate import generate_tokens
from pyllama.tokenizers import BPETokenizer, Tokenizer, from_gguf_metadata
from pyllama.tokenizers.bpe import BYTE_TO_CHAR, PRE_TOKENIZERS

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
META_MODEL = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
N_SPECIAL = 256


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama3():
    return pyllama.load_tokenizer(shared_path("models/bpe/llama3-tiny-f16.gguf"))


@pytest.fixture(scope="module")
def qwen2():
    return pyllama.load_tokenizer(shared_path("models/bpe/qwen2-tiny-f16.gguf"))


@pytest.fixture(scope="module")
def meta_ranks():
    return load_tiktoken_bpe(str(META_MODEL))


def _tiktoken(tok, ranks, pre):
    specials = {tok.token_text(i): i for i in range(tok.vocab_size - N_SPECIAL, tok.vocab_size)}
    return tiktoken.Encoding(f"oracle-{pre}", pat_str=PRE_TOKENIZERS[pre][0][0],
                             mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def llama3_oracle(llama3, meta_ranks):
    return _tiktoken(llama3, meta_ranks, "llama-bpe")


@pytest.fixture(scope="module")
def qwen2_oracle(qwen2, meta_ranks):
    ranks = {b: r for b, r in meta_ranks.items() if r < qwen2.vocab_size - N_SPECIAL}
    return _tiktoken(qwen2, ranks, "qwen2")


def _golden():
    inp = shared_path("golden/llama3-vocab.gguf.inp").read_text(encoding="utf-8")
    out = shared_path("golden/llama3-vocab.gguf.out").read_text(encoding="utf-8").split("\n")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]  # the file ends with a separator
    assert len(texts) == 46 and len(out) >= len(texts)
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, out)]


# ---------------------------------------------------------------------- exactness
def test_llama3_golden_vectors(llama3):
    """llama.cpp's ids for its 46 test texts, and decode gives each text back."""
    for text, ids in _golden():
        assert llama3.encode(text, bos=False) == ids, text
        assert llama3.decode(ids) == text
        assert llama3.encode(text) == [128000] + ids  # add_bos_token true


def test_golden_texts_against_tiktoken(llama3, llama3_oracle, qwen2, qwen2_oracle):
    for text, _ in _golden():
        assert llama3.encode(text, bos=False) == llama3_oracle.encode_ordinary(text)
        assert qwen2.encode(text, bos=False) == qwen2_oracle.encode_ordinary(text), text


def test_the_files_say_how_to_add_bos(llama3, qwen2):
    assert llama3.add_bos and llama3.bos_id == 128000 and llama3.pre == "llama-bpe"
    assert not qwen2.add_bos and qwen2.encode("hi") == qwen2.encode("hi", bos=False)
    assert qwen2.encode("hi", bos=True)[0] == qwen2.bos_id == 3000
    assert qwen2.encode("12345", bos=False) == [16, 17, 18, 19, 20]  # qwen2: one digit each
    assert llama3.encode("12345", bos=False) == [4513, 1774]        # llama-bpe: up to three


_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn", "Co")), max_size=80)
_EDGY = st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u2028\u3000 0123456789٣'sSlLdD!?.,:;"
                                     "-_()[]{}<|>aZéßΩЖ中文日本語한😀🦙\u0301")), max_size=60)


@FUZZ
@given(st.one_of(_TEXT, _EDGY))
def test_random_text_matches_tiktoken(llama3, llama3_oracle, qwen2, qwen2_oracle, text):
    ids = llama3.encode(text, bos=False)
    assert ids == llama3_oracle.encode_ordinary(text)
    assert llama3.decode(ids) == text
    assert qwen2.encode(text, bos=False) == qwen2_oracle.encode_ordinary(text)


@FUZZ
@given(st.lists(st.one_of(_EDGY, st.sampled_from(["<|eot_id|>", "<|begin_of_text|>",
                                                   "<|start_header_id|>", "<|eot_id", "|>"])),
                max_size=8))
def test_special_texts_match_tiktoken(llama3, llama3_oracle, parts):
    text = "".join(parts)
    assert llama3.encode(text, bos=False, special=True) == \
        llama3_oracle.encode(text, allowed_special="all")
    assert llama3.encode(text, bos=False) == llama3_oracle.encode_ordinary(text)


def test_special_tokens_parse_only_when_asked(llama3):
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = llama3.encode(text, special=True)
    assert ids == [128000, 128006, 882, 128007, 271, 13347, 128009]
    plain = llama3.encode(text, bos=False)
    assert 128009 not in plain and llama3.decode(plain) == text
    assert llama3.decode(ids) == "user\n\nHi"            # control tokens vanish in text
    assert llama3.token_bytes(128009) == b"" and llama3.token_bytes(13347) == b"Hi"


def _bench_module():
    spec = importlib.util.spec_from_file_location("pyllama_bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_megabyte_of_mixed_text(llama3, llama3_oracle):
    """benchmarks/bench.py's 1 MB (prose, code, numbers, CJK, emoji): the same ids as tiktoken;
    the speed target (0.5 s) is measured by `make bench`, here only a loose bound."""
    text = _bench_module().mixed_text()
    llama3._cache.clear()
    t = time.perf_counter()
    ids = llama3.encode(text, bos=False)
    took = time.perf_counter() - t
    assert ids == llama3_oracle.encode_ordinary(text)
    assert llama3.decode(ids) == text
    assert took < 3.0, f"1 MB took {took:.2f} s"


# ---------------------------------------------------------------------- streaming
@pytest.mark.parametrize("text", ["🦙🦙 a🦙", "世界龘靐齉齾", "naïve café 👨‍👩‍👧‍👦 🇫🇷"])
def test_decoder_never_splits_a_character(llama3, text):
    ids = llama3.encode(text, bos=False)
    d = llama3.decoder()
    pieces = [d.feed(i) for i in ids]
    assert "" in pieces  # something was held back until its character was complete
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == text


@FUZZ
@given(_TEXT)
def test_decoder_joins_to_decode(llama3, qwen2, text):
    for tok in (llama3, qwen2):
        ids = tok.encode(text, special=False)
        d = tok.decoder()
        pieces = [d.feed(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + d.flush() == tok.decode(ids) == text


def test_decoder_flushes_an_incomplete_character(llama3):
    ids = llama3.encode("🦙", bos=False)
    d = llama3.decoder()
    assert d.feed(ids[0]) == "" and d.flush() == "\ufffd"
    assert llama3.decode(ids[:1]) == "\ufffd"


# ---------------------------------------------------------------------- synthetic vocabularies
def _meta(tokens=None, merges=None, **changes):
    """A tiny gpt2 vocabulary: the 256 byte tokens, then merged tokens and two control tokens."""
    base = list(BYTE_TO_CHAR)
    extra = ["ab", "bc", "abc", "Ġa", "12", "123"]
    tokens = base + extra + ["<|end|>", "<|user|>"] if tokens is None else tokens
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array([1] * (len(tokens) - 2) + [3, 3], np.int32),
            "tokenizer.ggml.merges": ["b c", "a b", "Ġ a", "1 2", "12 3"] if merges is None else merges,
            "tokenizer.ggml.bos_token_id": 263, "tokenizer.ggml.eos_token_id": 262,
            "tokenizer.ggml.add_bos_token": False}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def _id(text):
    return {"ab": 256, "bc": 257, "abc": 258, "Ġa": 259, "12": 260, "123": 261}[text]


def test_merges_follow_rank_and_ignore_merges():
    """"abc": by rank "b c" merges first and "a bc" is no merge -> [a, bc]; llama-bpe's
    ignore_merges takes the whole pre-token "abc", a vocabulary entry, as one token."""
    plain = from_gguf_metadata(_meta(**{"tokenizer.ggml.pre": "gpt-2"}), "t.gguf")
    assert plain.encode("abc") == [ord("a"), _id("bc")]  # (byte b is token b in this vocabulary)
    assert plain.encode(" a") == [_id("Ġa")]
    assert plain.encode("1234") == [_id("123"), ord("4")]
    llama = from_gguf_metadata(_meta(), "t.gguf")
    assert llama.encode("abc") == [_id("abc")]
    # " abc" is no token, so merges run: "b c" (rank 0), then "Ġ a" (rank 2); "Ġa bc" is none
    assert llama.encode(" abc") == [_id("Ġa"), _id("bc")]
    assert llama.decode(llama.encode("1234 ab\n")) == "1234 ab\n"


@pytest.mark.parametrize("pre, text, pieces", [
    # llama.cpp's regexes (src/llama-vocab.cpp), applied by hand to the text
    ("llama-bpe", "abc 12345 x", ["abc", " ", "123", "45", " x"]),
    ("qwen2", "abc 12345", ["abc", " ", "1", "2", "3", "4", "5"]),
    ("smollm", "ab 123x", ["ab", " ", "1", "2", "3", "x"]),
    ("gpt-2", "ab 123x", ["ab", " 123", "x"]),
    ("default", "ab, 1234!", ["ab", ",", " ", "123", "4", "!"]),
])
def test_pre_tokenizers(pre, text, pieces):
    tok = from_gguf_metadata(_meta(**{"tokenizer.ggml.pre": pre}), "t.gguf")
    assert tok._pretokens(text) == pieces
    assert tok.decode(tok.encode(text)) == text


def test_stop_ids_and_special_ids():
    tok = from_gguf_metadata(_meta(**{"tokenizer.ggml.eot_token_id": 263}), "t.gguf")
    assert tok.stop_ids == {262, 263}
    tok = from_gguf_metadata(_meta(), "t.gguf")
    assert tok.stop_ids == {262}  # "<|end|>" is EOS; "<|user|>" does not end a turn
    assert tok.encode("a<|end|>b", special=True) == [ord("a"), 262, ord("b")]


def test_user_defined_tokens_always_split():
    meta = _meta()
    meta["tokenizer.ggml.token_type"] = np.array([1] * 262 + [4, 3], np.int32)  # <|end|> user-def.
    tok = from_gguf_metadata(meta, "t.gguf")
    assert tok.encode("a<|end|>") == [ord("a"), 262]
    assert tok.decode([262]) == "<|end|>" and tok.token_bytes(262) == b"<|end|>"


@pytest.mark.parametrize("changes, match", [
    ({"tokenizer.ggml.merges": ["a b", "x zz"]}, r"merges\[1\] = 'x zz' names 'zz'.*not a token"),
    ({"tokenizer.ggml.merges": ["a b", "bc Ġa"]}, r"merges\[1\] = 'bc Ġa' names 'bcĠa', which is "
                                                  r"not a token"),
    ({"tokenizer.ggml.merges": ["a b", "ab"]}, r"merges\[1\] = 'ab': expected two tokens"),
    ({"tokenizer.ggml.merges": ["a b c"]}, r"merges\[0\] = 'a b c': expected two tokens"),
    ({"tokenizer.ggml.merges": [" a"]}, r"merges\[0\] = ' a': expected two tokens"),
    ({"tokenizer.ggml.merges": ["a b", 5]}, r"merges\[1\]: expected a string, found int"),
    ({"tokenizer.ggml.merges": None}, "missing metadata key tokenizer.ggml.merges"),
    ({"tokenizer.ggml.pre": "tekken"}, r"unknown pre-tokenizer 'tekken' .*supported are default, "
                                      r"gpt-2, llama-bpe, qwen2, smollm"),
    ({"tokenizer.ggml.pre": 3}, r"tokenizer.ggml.pre: expected a string"),
    ({"tokenizer.ggml.token_type": np.ones(5, np.int32)}, r"token_type: expected 264 values"),
    ({"tokenizer.ggml.token_type": np.full(264, 9, np.int32)}, r"token 0: token type must be 0..6"),
    ({"tokenizer.ggml.eos_token_id": 264}, r"eos_token_id must be a token id in \[0, 264\)"),
    ({"tokenizer.ggml.bos_token_id": -1}, r"bos_token_id must be a token id .* -1"),
    ({"tokenizer.ggml.eot_token_id": 10**9}, r"eot_token_id must be a token id"),
    ({"tokenizer.ggml.eom_token_id": "1"}, r"eom_token_id must be a token id"),
    ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None},
     "add_bos_token is true but there is no tokenizer.ggml.bos_token_id"),
    ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token: expected a bool"),
    ({"tokenizer.ggml.tokens": []}, r"expected a list of 1 to \d+ strings, found 0 tokens"),
    ({"tokenizer.ggml.tokens": "abc"}, r"tokenizer.ggml.tokens: expected an array of strings"),
    ({"tokenizer.ggml.model": "bert"}, r"unsupported tokenizer model 'bert'.*'llama', 'gpt2'"),
])
def test_hostile_vocabularies(changes, match):
    with pytest.raises(FormatError, match=match) as info:
        from_gguf_metadata(_meta(**changes), "bad.gguf")
    assert "bad.gguf" in str(info.value)


def test_hostile_tokens():
    tokens = list(BYTE_TO_CHAR) + ["ab", "bc", "abc", "Ġa", "12", "a b", "<|end|>", "<|user|>"]
    with pytest.raises(FormatError, match=r"token 261 'a b' \(normal\) holds ' ' \(U\+0020\), "
                                          r"which is not in the byte-level BPE alphabet"):
        from_gguf_metadata(_meta(tokens, ["a b"]), "bad.gguf")
    tokens[261] = "éé"  # U+00E9 is the byte 0xE9 in the alphabet, fine; U+4E2D is not
    from_gguf_metadata(_meta(tokens, ["a b"]), "ok.gguf")
    tokens[261] = "中"
    with pytest.raises(FormatError, match=r"'中' \(U\+4E2D\)"):
        from_gguf_metadata(_meta(tokens, ["a b"]), "bad.gguf")
    tokens[261] = "ab"
    with pytest.raises(FormatError, match=r"duplicate token 'ab': ids 256 and 261"):
        from_gguf_metadata(_meta(tokens, ["a b"]), "bad.gguf")
    tokens[261] = 7
    with pytest.raises(FormatError, match=r"tokens\[261\]: expected a string, found int"):
        from_gguf_metadata(_meta(tokens, ["a b"]), "bad.gguf")


def test_absurd_vocabulary_size():
    from pyllama.formats.common import MAX_VOCAB
    with pytest.raises(FormatError, match=f"expected a list of 1 to {MAX_VOCAB} strings, "
                                          f"found {MAX_VOCAB + 1} tokens"):
        BPETokenizer([""] * (MAX_VOCAB + 1), [], source="big.gguf")


def test_bad_input_text_and_ids():
    tok = from_gguf_metadata(_meta(), "t.gguf")
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        tok.encode(b"\xff")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok.encode("\ud800")
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([264])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decoder().feed(-1)


def test_long_words_merge_as_short_ones(llama3):
    """Pre-tokens longer than the scan limit go through the heap merge; same ids as tiktoken."""
    from pyllama.tokenizers.bpe import _merge_heap, _merge_scan
    ids = [llama3._byte_ids[b] for b in ("abracadabra" * 50 + "中文" * 30 + "x").encode()]
    assert _merge_heap(list(ids), llama3._merges) == _merge_scan(list(ids), llama3._merges)
    text = "x" * 20000  # one pre-token of 20000 letters: neither slow nor different
    t = time.perf_counter()
    assert llama3.decode(llama3.encode(text)) == text
    assert time.perf_counter() - t < 5


# ---------------------------------------------------------------------- loading and stopping
def test_factory_and_load_tokenizer(llama3, qwen2):
    assert isinstance(llama3, BPETokenizer) and isinstance(qwen2, BPETokenizer)
    spm = pyllama.load_tokenizer(shared_path("models/llama2-vocab.gguf"))
    assert isinstance(spm, Tokenizer) and spm is not None and pyllama.Tokenizer is Tokenizer
    assert llama3.stop_ids == {128001, 128008, 128009}  # EOS <|eot_id|>, <|end_of_text|>, <|eom_id|>
    assert qwen2.stop_ids == {3001, 3008, 3009}


def test_llama_tokenize_follows_the_file(llama3):
    m = pyllama.Llama(shared_path("models/bpe/llama3-tiny-f16.gguf"))
    assert isinstance(m.tokenizer, BPETokenizer)
    assert m.tokenize("Hello") == [128000, 9906] and m.tokenize("Hello", bos=False) == [9906]
    assert m.tokenize("<|eot_id|>", bos=False, special=True) == [128009]
    assert m.stop_ids == llama3.stop_ids


class _Script:
    """A sampler that plays back fixed ids (to drive generate_tokens to a chosen token)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def sample(self, logits_ptr):
        return self.ids.pop(0)


def test_generation_stops_at_stop_ids():
    m = pyllama.Llama(shared_path("models/stories260K-f32.gguf"), n_ctx=64)
    assert m.stop_ids == {2} and m.tokenizer.eos_id == 2
    out = [t for _, t in generate_tokens(m._model, [1, 300], 64, _Script([400, 2, 401]),
                                         stop_ids=m.stop_ids)]
    assert out == [300, 400]
    # the llama2.c rule (stop_ids None): EOS goes on, BOS stops
    out = [t for _, t in generate_tokens(m._model, [1, 300], 64, _Script([400, 2, 401, 1, 5]))]
    assert out == [300, 400, 2, 401]
    # a stop id inside the prompt does not stop (a chat history holds EOS/EOT tokens)
    out = [t for _, t in generate_tokens(m._model, [1, 2, 300], 64, _Script([7, 2]),
                                         stop_ids={2})]
    assert out == [2, 300, 7]


def test_bin_files_keep_llama2c_stopping():
    m = pyllama.Llama(shared_path("models/stories260K.bin"),
                      tokenizer=shared_path("models/tok512.bin"))
    assert m.stop_ids is None


def test_cli_runs_a_bpe_model():
    """`pyllama run` on a Llama 3 GGUF: the prompt is printed back, then generated bytes."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pyllama", "run",
                           shared_path("models/bpe/llama3-tiny-f16.gguf"), "-n", "12", "-t", "0",
                           "-i", "Hello 世界"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8").startswith("Hello 世界")


def test_info_shows_the_tokenizer():
    """`pyllama info`: kind, pre-tokenizer, special ids, add_bos, chat template (the values are
    the files' metadata, see golden/README.md)."""
    from pyllama.info import describe, render_text
    info = describe(shared_path("models/bpe/llama3-tiny-f16.gguf"))
    assert info["tokenizer"] == {
        "source": "embedded", "kind": "bpe", "pre": "llama-bpe", "tokens": 128256,
        "bos_id": 128000, "eos_id": 128009, "eot_id": None, "eom_id": None,
        "stop_ids": [128001, 128008, 128009], "add_bos": True, "chat_template": True}
    assert "byte-level BPE, pre-tokenizer llama-bpe" in render_text(info)
    tok = describe(shared_path("models/bpe/qwen2-tiny-f16.gguf"))["tokenizer"]  # runnable or not
    assert (tok["pre"], tok["add_bos"], tok["chat_template"]) == ("qwen2", False, False)
    spm = describe(shared_path("models/stories260K-f32.gguf"))["tokenizer"]
    assert (spm["kind"], spm["pre"], spm["stop_ids"]) == ("spm", None, [2])


def test_threads_share_the_cache(llama3, llama3_oracle, monkeypatch):
    """Encoding from several threads at once, with a cache small enough to be evicted all the
    time, gives every thread tiktoken's ids."""
    import threading
    import pyllama.tokenizers.bpe as bpe
    monkeypatch.setattr(bpe, "_CACHE_MAX", 64)
    texts = [f"thread {k}: " + " ".join(f"word{k * 7 + i} 数字{i} 🦙" for i in range(300))
             for k in range(4)]
    expect = [llama3_oracle.encode_ordinary(t) for t in texts]
    errors = []

    def work(k):
        for _ in range(5):
            if llama3.encode(texts[k], bos=False) != expect[k]:
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    llama3._cache.clear()


def test_a_prompt_without_bos_is_printed_whole():
    """Qwen2 adds no BOS: the prompt's first token is text, and `run` and generate(echo=True)
    print it (llama2.c's loop starts at the second token, after BOS)."""
    import subprocess
    import sys
    path = shared_path("models/bpe/qwen2-tiny-f16.gguf")
    proc = subprocess.run([sys.executable, "-m", "pyllama", "run", path, "-n", "8", "-t", "0",
                           "-i", "Hi 世界"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith("Hi 世界".encode())
    m = pyllama.Llama(path)
    assert m.tokenize("Hi")[0] != m.tokenizer.bos_id
    assert "".join(m.generate("Hi 世界", steps=8, temperature=0, echo=True)).startswith("Hi 世界")
    assert not "".join(m.generate("Hi 世界", steps=8, temperature=0)).startswith("Hi")
