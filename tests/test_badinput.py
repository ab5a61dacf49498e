"""Bad input ends in a clear pyllama exception (CLI: one `pyllama: error:` line, exit 1)."""
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import shared_path
from models import byte_vocab, write_legacy, write_tokenizer_bin

import pyllama
from pyllama import FormatError, ParameterError, TokenizerError


def cli(*args, input=None):
    p = subprocess.run([sys.executable, "-m", "pyllama", *map(str, args)], capture_output=True,
                       input=input, timeout=120)
    return p.returncode, p.stdout, p.stderr.decode()


def assert_cli_error(args, fragment):
    code, out, err = cli(*args)
    assert code == 1, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyllama: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


# -- model files ---------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        pyllama.load(tmp_path / "nope.bin")
    assert_cli_error(["run", tmp_path / "nope.bin"], "no such file")


def test_directory(tmp_path):
    with pytest.raises(FormatError, match="directory"):
        pyllama.load(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        pyllama.load(tmp_path / "e.bin")


def test_tiny_file(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\1\2\3")
    with pytest.raises(FormatError, match="too short"):
        pyllama.load(tmp_path / "t.bin")


def test_valid_small_model_loads(tmp_path):
    mf = pyllama.load(write_legacy(tmp_path / "ok.bin"))
    assert mf.config["dim"] == 8 and mf.shared_classifier


@pytest.mark.parametrize("missing,extra", [(4, 0), (1, 0), (0, 4), (0, 1)])
def test_size_mismatch(tmp_path, missing, extra):
    p = write_legacy(tmp_path / "m.bin", missing_bytes=missing, extra_bytes=extra)
    word = "truncated" if missing else "longer than its header implies"
    with pytest.raises(FormatError, match=word):
        pyllama.load(p)
    assert_cli_error(["run", p, "-z", write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(16))], word)


@pytest.mark.parametrize("header,fragment", [
    ((0, 16, 1, 2, 2, 16, 8), "dim: expected a positive value, found 0"),
    ((8, -16, 1, 2, 2, 16, 8), "hidden_dim: expected a positive value"),
    ((8, 16, 0, 2, 2, 16, 8), "n_layers: expected a positive value"),
    ((8, 16, 1, 0, 2, 16, 8), "n_heads: expected a positive value"),
    ((8, 16, 1, 2, 2, 0, 8), "vocab_size: expected a positive value"),
    ((8, 16, 1, 2, 2, 16, -5), "seq_len: expected a positive value"),
    ((8, 16, 1, 3, 3, 16, 8), "dim 8 is not divisible by n_heads 3"),
    ((8, 16, 1, 4, 3, 16, 8), "n_heads 4 is not divisible by n_kv_heads 3"),
    ((8, 16, 2**31 - 1, 2, 2, 16, 8), "n_layers = 2147483647 is beyond"),
    ((2**30, 16, 1, 2, 2, 16, 8), "dim = 1073741824 is beyond"),
])
def test_bad_legacy_header(tmp_path, header, fragment):
    p = write_legacy(tmp_path / "h.bin", header=header)
    with pytest.raises(FormatError, match="unsupported format") as e:
        pyllama.load(p)
    assert fragment in str(e.value)
    assert str(p) in str(e.value)


def _v1_header(version=1, dims=(8, 16, 1, 2, 2, 16, 8), shared=1, group=0):
    h = struct.pack("<Ii7iB", 0x616B3432, version, *dims, shared)
    if version == 2:
        h += struct.pack("<i", group)
    return h + b"\0" * (256 - len(h))


def test_v1_truncated_and_bad(tmp_path):
    p = tmp_path / "v1.bin"
    p.write_bytes(_v1_header()[:100])
    with pytest.raises(FormatError, match="truncated: a llama2.c V1/V2 header"):
        pyllama.load(p)
    p.write_bytes(_v1_header() + b"\0" * 40)
    with pytest.raises(FormatError, match="llama2.c V1 file is truncated"):
        pyllama.load(p)
    p.write_bytes(_v1_header(version=7))
    with pytest.raises(FormatError, match="unsupported format: llama2.c checkpoint version 7"):
        pyllama.load(p)
    p.write_bytes(_v1_header(shared=5))
    with pytest.raises(FormatError, match="shared_classifier"):
        pyllama.load(p)
    p.write_bytes(_v1_header(dims=(8, 16, 1, 2, 2, 16, 0)))
    with pytest.raises(FormatError, match="seq_len"):
        pyllama.load(p)


def test_v2_bad_group_size(tmp_path):
    p = tmp_path / "v2.bin"
    for group, fragment in ((0, "group_size at offset 37"), (3, "not a multiple of group_size 3"),
                            (9, "group_size at offset 37")):
        p.write_bytes(_v1_header(version=2, group=group) + b"\0" * 64)
        with pytest.raises(FormatError, match=fragment):
            pyllama.load(p)


def test_v2_truncated(tmp_path):
    good = shared_path("models/quant-base-v2.bin").read_bytes()
    p = tmp_path / "v2.bin"
    p.write_bytes(good[:-10])
    with pytest.raises(FormatError, match="V2 file is truncated"):
        pyllama.load(p)


def test_gguf_like_garbage_is_unsupported(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(FormatError, match="unsupported format: the file starts with bytes 89 50 4e 47"):
        pyllama.load(p)


# -- tokenizer files -----------------------------------------------------------------------------

def test_tokenizer_with_fewer_tokens_than_vocab(tmp_path):
    model = write_legacy(tmp_path / "m.bin", vocab=300)
    tok = write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(290))
    with pytest.raises(FormatError):
        pyllama.Llama(model, tokenizer=tok)
    assert_cli_error(["run", model, "-z", tok], str(tok))


def test_truncated_tokenizer(tmp_path):
    model = write_legacy(tmp_path / "m.bin", vocab=300)
    tok = write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(300))
    tok.write_bytes(tok.read_bytes()[:-3])
    with pytest.raises(FormatError):
        pyllama.Llama(model, tokenizer=tok)


def test_model_without_tokenizer_gives_logits_but_not_text(tmp_path):
    model = write_legacy(tmp_path / "m.bin", vocab=300)
    m = pyllama.Llama(model)
    assert m.tokenizer is None
    assert m.logits([1, 5, 7]).shape == (3, 300)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        m.tokenize("hi")
    with pytest.raises(TokenizerError):
        list(m.generate("hi"))
    assert_cli_error(["run", model], "no tokenizer")


# -- arguments -----------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    model = write_legacy(tmp_path / "m.bin", vocab=300, seq=16)
    tok = write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(300))
    return model, tok


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(steps=-1), "steps: expected an integer >= 0"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(topp=1.5), "top-p"),
    (dict(topp=-0.1), "top-p"),
    (dict(topp=math.nan), "top-p"),
])
def test_bad_sampling_arguments(small, kwargs, fragment):
    m = pyllama.Llama(small[0], tokenizer=small[1])
    with pytest.raises(ParameterError, match=fragment):
        list(m.generate("ab", **kwargs))


@pytest.mark.parametrize("args,fragment", [
    (["-n", "-1"], "steps"),
    (["-t", "-1"], "temperature"),
    (["-t", "nan"], "temperature"),
    (["-p", "2"], "top-p"),
    (["-p", "x"], "invalid float value"),
    (["--threads", "0"], "threads"),
    (["-m", "dance"], "invalid choice"),
    (["--bogus"], "unrecognized arguments"),
    (["--context", "0"], "--context: expected an integer >= 1"),
])
def test_bad_cli_arguments(small, args, fragment):
    assert_cli_error(["run", small[0], "-z", small[1], *args], fragment)


def test_prompt_longer_than_context(small):
    m = pyllama.Llama(small[0], tokenizer=small[1])
    with pytest.raises(ParameterError, match="longer than the context of 16"):
        list(m.generate("x" * 40, steps=0))
    assert_cli_error(["run", small[0], "-z", small[1], "-i", "x" * 40], "longer than the context")


def test_invalid_utf8_prompt(small):
    m = pyllama.Llama(small[0], tokenizer=small[1])
    with pytest.raises(TokenizerError):
        m.tokenize(b"ab\xff\xfe")
    with pytest.raises(TokenizerError):
        list(m.generate(b"ab\xc3"))


def test_bad_threads_and_context(small):
    with pytest.raises(ParameterError, match="threads"):
        pyllama.Llama(small[0], threads=0)
    with pytest.raises(ParameterError, match="context"):
        pyllama.Llama(small[0], n_ctx=2**40)
    with pytest.raises(ParameterError, match="context"):
        pyllama.Llama(small[0], n_ctx=-1)
    with pytest.raises(ParameterError, match="context"):
        pyllama.Llama(small[0], n_ctx=16.0)


def test_default_context_is_the_models_up_to_4096(tmp_path):
    """n_ctx None: the model's context, at most 4096 positions (a Llama 3.x file says 131072: a
    cache of 8.6 GB for the 1B shape, 34 GB for the 8B, mapped at load); 0: all of it (as
    llama-cpp-python's n_ctx=0); more than the model's when asked for. The same rule for the
    server's ctx_size (Engine through Transformer) and Ray's n_ctx (pyllama.model.context_size)."""
    from pyllama.model import context_size
    small = write_legacy(tmp_path / "s.bin", seq=16)
    long = write_legacy(tmp_path / "l.bin", seq=1 << 17)  # 131072 positions, a tiny model
    assert pyllama.Llama(small).n_ctx == 16
    assert pyllama.Llama(small, n_ctx=0).n_ctx == 16
    assert pyllama.Llama(small, n_ctx=40).n_ctx == 40
    assert pyllama.Llama(long).n_ctx == 4096
    assert pyllama.Llama(long, n_ctx=0).n_ctx == 1 << 17
    assert pyllama.Llama(long, n_ctx=5000).n_ctx == 5000
    assert (context_size(None, 1 << 17), context_size(0, 1 << 17), context_size(7, 1 << 17)) == (4096, 1 << 17, 7)
    with pytest.raises(ParameterError, match=r"ctx_size \(context positions, 0 = the model's 131072\)"):
        context_size(-2, 1 << 17, "ctx_size")


def test_kv_cache_larger_than_memory_is_refused_before_allocating(tmp_path):
    model = write_legacy(tmp_path / "wide.bin", dim=64, hidden=16, layers=64, heads=2, kv_heads=2)
    with pytest.raises(MemoryError, match=r"need \d+ bytes; only \d+ bytes"):
        pyllama.Llama(model, n_ctx=1 << 22)  # 137 GB of KV cache
    assert_cli_error(["run", model, "--context", str(1 << 22), "-z",
                      write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(16))], "out of memory")


def test_out_of_range_ids(small):
    m = pyllama.Llama(small[0], tokenizer=small[1])
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        m.logits([1, 300])
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        m.logits([-1])
    with pytest.raises(ParameterError, match="do not fit the context"):
        m.logits([1] * 17)


def test_invalid_utf8_on_the_command_line(small):
    # argv bytes that are not UTF-8 reach Python as surrogate escapes
    assert_cli_error(["run", small[0], "-z", small[1], "-i", "ab\udcff"], "--prompt is not valid UTF-8: byte 2 is 0xff")


def test_tokenizer_of_another_model(small, tmp_path):
    bigger = write_tokenizer_bin(tmp_path / "big.bin", byte_vocab(300))
    other = write_legacy(tmp_path / "other.bin", vocab=280)
    with pytest.raises(TokenizerError, match="do not belong together"):
        pyllama.Llama(other, tokenizer=pyllama.load_tokenizer(bigger, 300))
    assert_cli_error(["run", small[0], "-z", shared_path("models/llama2-vocab.gguf")],
                     "the tokenizer has 32000 tokens, the model's vocabulary 300")


def test_bench_bad_thread_list(small):
    assert_cli_error(["bench", small[0], "--threads", "x"], "expected thread counts like 1,2")
    assert_cli_error(["bench", small[0], "--threads", "0"], "threads: expected an integer in 1..")


# -- strict arguments: one validator (pyllama/validate.py), one error family ---------------------

BAD_IDS = [[1, 1.7], [1, True], [[1, 2], [3, 4]], np.array([[1, 2]]), None, "hello", [2**70],
           [float("nan")], np.array([1.0, 2.0]), [1, None], (i for i in range(3)), [1, "2"]]


@pytest.mark.parametrize("ids", BAD_IDS, ids=[repr(b)[:20] for b in BAD_IDS])
def test_bad_ids_are_parameter_errors(small, ids):
    """logits([1, 1.7]) equalled logits([1, 1]); True counted as 1; nested arrays were flattened;
    None/"hello"/[2**70]/[nan] raised numpy's TypeError/ValueError/OverflowError."""
    m = pyllama.Llama(small[0], tokenizer=small[1])
    for method in (m.logits, m.detokenize, m.generate_tokens):
        if isinstance(ids, str) and method == m.generate_tokens:
            continue  # a text prompt
        with pytest.raises(ParameterError):
            method(ids)


def test_good_ids_of_every_integer_kind(small):
    m = pyllama.Llama(small[0], tokenizer=small[1])
    ref = m.logits([1, 5, 7])
    for ids in ((1, 5, 7), np.array([1, 5, 7], np.int32), np.array([1, 5, 7], np.uint16),
                [np.int64(1), 5, np.uint8(7)]):
        np.testing.assert_array_equal(m.logits(ids), ref)
        assert m.detokenize(ids) == m.detokenize([1, 5, 7])
    assert m.logits([]).shape == (0, 300)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(temperature="0.5"), "temperature: expected a number"),
    (dict(topp="0.9"), "top-p: expected a number"),
    (dict(temperature=True), "temperature: expected a number"),
    (dict(echo="no"), "echo: expected True or False"),
    (dict(echo=0), "echo: expected True or False"),
    (dict(steps="5"), "steps: expected an integer"),
    (dict(steps=5.0), "steps: expected an integer"),
    (dict(steps=True), "steps: expected an integer"),
    (dict(seed=1.5), "seed: expected an integer"),
    (dict(seed="7"), "seed: expected an integer"),
    (dict(temperature=1e-45), "temperature: expected 0"),
])
def test_bad_generate_arguments(small, kwargs, fragment):
    m = pyllama.Llama(small[0], tokenizer=small[1])
    with pytest.raises(ParameterError, match=fragment):
        m.generate("ab", **kwargs)  # refused at the call, before iterating


def test_numpy_integers_for_steps_seed_threads(small):
    """steps/seed refused np.int64 while threads accepted it: every integer argument takes both."""
    m = pyllama.Llama(small[0], tokenizer=small[1], threads=np.int64(1), n_ctx=np.int32(16))
    assert m.threads == 1 and m.n_ctx == 16
    a = "".join(m.generate("ab", steps=np.int64(8), temperature=np.float32(0.5), seed=np.int64(3)))
    assert a == "".join(m.generate("ab", steps=8, temperature=0.5, seed=3))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(mmap="no"), "mmap: expected True or False"),
    (dict(mmap=0), "mmap: expected True or False"),
    (dict(threads=1.5), "threads: expected an integer"),
    (dict(threads=True), "threads: expected an integer"),
    (dict(threads="2"), "threads: expected an integer"),
    (dict(n_ctx="8"), "n_ctx"),
    (dict(n_ctx=8.0), "n_ctx"),
    (dict(tokenizer=5), "tokenizer: expected a path"),
])
def test_bad_llama_arguments(small, kwargs, fragment):
    with pytest.raises(ParameterError, match=fragment):
        pyllama.Llama(small[0], **kwargs)


def test_bad_path_and_setters(small):
    with pytest.raises(ParameterError, match="path: expected a file path"):
        pyllama.Llama(None)
    m = pyllama.Llama(small[0], tokenizer=small[1])
    for bad in ("2", 2.0, True, 0):  # (None: the default, all cores)
        with pytest.raises(ParameterError, match="threads"):
            m.threads = bad
    with pytest.raises(ParameterError, match="bos: expected True or False"):
        m.tokenize("ab", bos="yes")
    with pytest.raises(ParameterError, match="last_only"):
        m.logits([1], last_only="yes")
