"""`pyllama info` on files pyllama cannot run, strict JSON, and escaped terminal output.

Where expected values come from: the GGUF files are written here with gguf-py's GGUFWriter (or
are ../shared's qwen2 file, architecture qwen2); what info must print is what was written.
"""
import json
import math

import gguf
import numpy as np
import pytest

from conftest import shared_path
from test_badinput import cli

from pyllama.info import describe

GT = gguf.GGMLQuantizationType


def _write(path, arch="llama", strings=(), floats=(), arrays=(), tensors=(), tokenizer=None):
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in strings:
        w.add_string(k, v)
    for k, v in floats:
        w.add_float32(k, v)
    for k, v in arrays:
        w.add_array(k, v)
    if tokenizer:
        w.add_tokenizer_model(tokenizer)
        w.add_token_list(["a", "b", "Ġc"])
        w.add_token_merges(["b Ġc"])
    for name, data, raw in tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _strict(text):
    def refuse(const):
        raise AssertionError(f"invalid JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def _info(path):
    code, out, err = cli("info", path)
    assert code == 0, err
    code, js, err = cli("info", "--json", path)
    assert code == 0, err
    return out.decode(), _strict(js)


def test_other_architecture(tmp_path):
    # the Qwen2 file (runnable since issue 10) renamed to an architecture pyllama does not know
    arch = b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00qwen"
    data = shared_path("models/bpe/qwen2-tiny-f16.gguf").read_bytes()
    assert data.count(arch + b"2") == 1
    path = tmp_path / "qwen9.gguf"
    path.write_bytes(data.replace(arch + b"2", arch + b"9"))
    text, info = _info(path)
    assert info["runnable"] is False and "unsupported architecture 'qwen9'" in info["cannot_run"]
    assert info["architecture"] == "qwen9" and info["metadata"]["qwen2.block_count"] == 2
    assert len(info["tensors"]) == 26 and info["types"] == {"F32": 11, "F16": 15}
    assert "pyllama cannot run this file: unsupported architecture 'qwen9'" in text
    assert "blk.1.ffn_down.weight" in text and "qwen2.embedding_length = 128" in text


def test_iq_tensor_type(tmp_path):
    path = _write(tmp_path / "iq.gguf", tensors=[
        ("blk.0.attn_q.weight", np.zeros((4, 2 * 18), np.uint8), GT.IQ4_NL),
        ("blk.0.attn_norm.weight", np.ones(64, np.float32), None)])
    text, info = _info(path)
    assert info["runnable"] is False
    assert info["tensors"][0] == {"name": "blk.0.attn_q.weight", "type": "IQ4_NL",
                                  "shape": [4, 64], "bytes": 4 * 36,
                                  "offset": info["tensors"][0]["offset"]}
    assert info["types"] == {"IQ4_NL": 1, "F32": 1} and info["parameters"] == 4 * 64 + 64
    assert "IQ4_NL" in text and "4x64" in text


def test_gpt2_tokenizer(tmp_path):
    """A vocab-only file with a byte-level BPE vocabulary: described whether or not pyllama's
    tokenizers read it."""
    text, info = _info(_write(tmp_path / "bpe.gguf", tokenizer="gpt2"))
    assert info["metadata"]["tokenizer.ggml.model"] == "gpt2"
    assert info["metadata"]["tokenizer.ggml.tokens"] == ["a", "b", "Ġc"]
    assert info["tensors"] == [] and "tokenizer.ggml.merges = [b Ġc]" in text


def test_invalid_utf8_in_an_unrelated_key(tmp_path):
    path = _write(tmp_path / "bad.gguf", strings=[("general.description", "AAAA")],
                  tensors=[("x.weight", np.ones(32, np.float32), None)])
    data = path.read_bytes()
    path.write_bytes(data.replace(b"AAAA", b"A\xff\xfeA", 1))
    text, info = _info(path)
    assert info["runnable"] is False and "invalid UTF-8" in info["cannot_run"]
    assert info["metadata"]["general.description"] == "A\\xff\\xfeA"
    assert any("general.description" in p for p in info["problems"])
    assert "general.description = A\\xff\\xfeA" in text and "x.weight" in text


def test_json_never_writes_nan_or_infinity(tmp_path):
    path = _write(tmp_path / "nan.gguf", floats=[("x.nan", math.nan), ("x.inf", math.inf),
                                                 ("x.minus_inf", -math.inf), ("x.one", 1.5)],
                  arrays=[("x.list", [1.0, math.nan, math.inf])])
    _, info = _info(path)
    m = info["metadata"]
    assert (m["x.nan"], m["x.inf"], m["x.minus_inf"], m["x.one"]) == \
        ("NaN", "Infinity", "-Infinity", 1.5)
    assert m["x.list"] == [1.0, "NaN", "Infinity"]


def test_json_conversion_is_shared_and_strict():
    """Runnable files' metadata goes through the same _summarise; to_json refuses what slips."""
    from pyllama.info import _summarise, to_json
    info = describe(shared_path("models/stories260K-f32.gguf"))
    assert info["runnable"] is True and _strict(to_json(info)) == info
    assert _summarise(np.array([np.nan, -np.inf], np.float32)) == ["NaN", "-Infinity"]
    with pytest.raises(ValueError):
        to_json({"x": float("nan")})        # allow_nan=False: a NaN can never slip out


def test_text_escapes_control_characters_and_ansi(tmp_path):
    path = _write(tmp_path / "ansi.gguf",
                  strings=[("general.name", "\x1b[31mred\x1b[0m\x07"),
                           ("general.description", "line1\nfake: line\r\u202eevil")],
                  tensors=[("t\x1b[2J.weight", np.ones(32, np.float32), None)])
    text, info = _info(path)
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "\u202e" not in text
    assert "general.name = \\x1b[31mred\\x1b[0m\\x07" in text
    assert "general.description = line1\\nfake: line\\r\\u202eevil" in text
    assert "t\\x1b[2J.weight" in text
    assert info["metadata"]["general.name"] == "\x1b[31mred\x1b[0m\x07"   # JSON keeps the text
    assert len(text.splitlines()) == len(text.split("\n")) - 1


def test_vocab_only_file_is_not_called_runnable():
    text, info = _info(shared_path("models/llama2-vocab.gguf"))
    assert info["runnable"] is False and "vocab-only" in info["cannot_run"]
    assert info["tokenizer"]["tokens"] == 32000 and info["tensors"] == []
    assert "classifier" not in text
