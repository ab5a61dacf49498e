"""Hostile and odd files for the architecture table (pyllama/arch.py): each a FormatError naming
the tensor or key, expected versus found; through the API and the CLI.

The files are written by tests/models.write_arch_gguf (gguf.GGUFWriter) with one thing changed, so
each test knows exactly what is wrong; legal oddities are checked against tests/reference.py.
"""
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_refused
from models import write_arch_gguf
from reference import forward_all

import pyllama
from pyllama.errors import FormatError
from pyllama.formats.gguf import read_gguf
from pyllama.model import Transformer



def refused(tmp_path, arch, *fragments, **kw):
    path = tmp_path / "bad.gguf"
    write_arch_gguf(path, arch, **kw)
    assert_refused(path, read_gguf, *fragments)
    return path


def setter(name, value):
    def edit(t, kv):
        if value is None:
            del t[name]
        else:
            t[name] = value
    return edit


def kv_setter(**changes):
    def edit(t, kv):
        for k, v in changes.items():
            kv[k.replace("__", ".")] = v
    return edit


@pytest.mark.parametrize("value, fragments", [
    (np.ones(9, np.float32), ("tensor 'rope_freqs.weight' has ne [9]", "expected [8]")),
    (np.ones((2, 8), np.float32), ("tensor 'rope_freqs.weight' has ne [8, 2]", "expected [8]")),
    (np.ones(8, np.float16), ("vector tensor 'rope_freqs.weight' has type F16 (1), expected F32",)),
    (np.array([1, 2, 0, 4, 1, 1, 1, 1], np.float32), ("rope_freqs.weight", "positive finite")),
    (np.array([1, 2, -3, 4, 1, 1, 1, 1], np.float32), ("positive finite",)),
    (np.array([1, np.nan, 3, 4, 1, 1, 1, 1], np.float32), ("positive finite",)),
    (np.array([1, np.inf, 3, 4, 1, 1, 1, 1], np.float32), ("positive finite",)),
], ids=["long", "2d", "f16", "zero", "negative", "nan", "inf"])
def test_bad_rope_freqs(tmp_path, value, fragments):
    refused(tmp_path, "llama", *fragments, edit=setter("rope_freqs.weight", value))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name, value, fragments", [
    ("blk.1.attn_k.bias", np.zeros(64, np.float32), ("'blk.1.attn_k.bias' has ne [64]", "expected [32]")),
    ("blk.0.attn_q.bias", np.zeros(32, np.float32), ("'blk.0.attn_q.bias' has ne [32]", "expected [64]")),
    ("blk.0.attn_v.bias", np.zeros((2, 32), np.float32), ("'blk.0.attn_v.bias' has ne [32, 2]",)),
    ("blk.0.attn_q.bias", np.zeros(64, np.float16), ("vector tensor 'blk.0.attn_q.bias' has type F16",)),
], ids=["k-too-long", "q-too-short", "v-2d", "q-f16"])
def test_bad_biases(tmp_path, arch, name, value, fragments):
    refused(tmp_path, arch, *fragments, biases=True, edit=setter(name, value))


@pytest.mark.parametrize("name", ["blk.0.attn_q.bias", "blk.1.attn_v.bias", "blk.0.attn_norm.weight",
                                  "blk.1.ffn_down.weight", "output_norm.weight", "token_embd.weight"])
def test_missing_required_tensors(tmp_path, name):
    def edit(t, kv):
        del t[name]
        kv["vocab_size"] = 48  # else a missing token_embd leaves no vocab size at all
    refused(tmp_path, "qwen2", f"missing tensor '{name}'", "required by architecture 'qwen2'",
            edit=edit)


@pytest.mark.parametrize("changes, fragments", [
    (dict(attention__key_length=32, attention__value_length=32),
     ("tensor 'blk.0.attn_q.weight' has ne [64, 64]", "expected [64, 128]")),
    (dict(attention__key_length=24), ("value_length = 16", "expected the head size 24")),
    (dict(attention__value_length=8), ("qwen2.attention.value_length = 8", "expected the head size 16",
                                       "value heads")),
    (dict(rope__dimension_count=8), ("qwen2.rope.dimension_count = 8", "partial RoPE")),
    (dict(attention__key_length=0), ("head_dim: expected a positive value, found 0",)),
    (dict(attention__key_length=15, attention__value_length=15), ("head size 15 is odd",)),
    (dict(attention__key_length=1 << 15, attention__value_length=1 << 15), ("beyond what pyllama supports",)),
    (dict(attention__key_length=16.5), ("qwen2.attention.key_length': expected an integer",)),
    (dict(expert_count=4), ("qwen2.expert_count = 4", "mixture-of-experts")),
], ids=["key-vs-shapes", "value-vs-key", "value-alone", "partial-rope", "zero", "odd", "huge",
        "float", "experts"])
def test_bad_head_dim_keys(tmp_path, changes, fragments):
    refused(tmp_path, "qwen2", *fragments, head_dim=16, edit=kv_setter(**changes))


def test_unknown_architecture(tmp_path):
    path = refused(tmp_path, "mamba", "unsupported architecture 'mamba'", "'llama', 'qwen2'")
    with pytest.raises(FormatError, match="unsupported architecture 'mamba'"):
        pyllama.Llama(path)
    run = subprocess.run([sys.executable, "-m", "pyllama", "run", str(path), "-n", "4"],
                         capture_output=True, timeout=60)
    err = run.stderr.decode()
    assert run.returncode != 0 and err.count("\n") == 1, err
    assert err.startswith("pyllama: error: ") and "'mamba'" in err
    info = subprocess.run([sys.executable, "-m", "pyllama", "info", str(path)], capture_output=True,
                          timeout=60)
    out = info.stdout.decode()
    assert info.returncode == 0, info.stderr.decode()
    assert "architecture: mamba" in out and "pyllama cannot run this file: " in out
    assert "mamba.embedding_length = 64" in out and "blk.1.ffn_up.weight" in out


@pytest.mark.parametrize("name", [5, None, ["llama"], "LLAMA", "llama "])
def test_architecture_must_be_a_known_string(name):
    from pyllama import arch
    with pytest.raises(FormatError, match=r"f.gguf: unsupported architecture .*pyllama runs 'llama'"):
        arch.get(name, "f.gguf")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_legal_oddities(tmp_path, arch):
    """Biases on a llama file (llama.cpp allows them), an untied qwen2 classifier, n_kv_heads 1,
    unused extra tensors (ignored): all run and match the reference."""
    path = tmp_path / "ok.gguf"

    def extra(t, kv):
        t["rope_factors_long.weight"] = np.ones(4, np.float32)
    write_arch_gguf(path, arch, biases=True, tied=arch == "llama", n_kv_heads=1, edit=extra)
    mf = read_gguf(path)
    assert "blk.1.attn_v.bias" in mf.tensors and "rope_factors_long.weight" not in mf.tensors
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = forward_all({k: t.data.view("<f4").reshape(t.shape) for k, t in mf.tensors.items()}, mf.config, ids,
                      {"llama": "norm", "qwen2": "neox"}[arch])
    got = Transformer(mf, threads=2).prefill(ids, 0, all_logits=True)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
