"""Parity with llama2.c (run.c) on ../shared/golden: exact CLI stdout, token ids, logits."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import as_list, cases, model_of, shared_path

import pyllama
from pyllama.generate import generate_tokens, make_sampler, resolve_steps


def _is_bin(c):
    return c["model"].endswith(".bin")


def run_cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "pyllama", *map(str, args)], capture_output=True,
                          input=input, timeout=300)


@pytest.mark.parametrize("case", cases("generate", _is_bin))
def test_generate_stdout_matches_llama2c(case):
    """stdout of `pyllama run` is byte-for-byte llama2.c's `run` with the same flags."""
    shared_path()
    proc = run_cli("run", shared_path(case["model"]), "-z", shared_path(case["tokenizer"]),
                   "-t", case["temperature"], "-p", case["topp"], "-s", case["seed"],
                   "-n", case["steps"], "-i", case["prompt"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == case["stdout"].encode("utf-8")
    assert b"achieved tok/s:" in proc.stderr


@pytest.mark.parametrize("case", cases("generate", lambda c: _is_bin(c) and c["seed"] != 0))
@pytest.mark.parametrize("threads", [1, 2])
def test_generate_ids_match_llama2c(case, threads):
    shared_path()
    m = pyllama.Llama(shared_path(case["model"]), tokenizer=shared_path(case["tokenizer"]),
                      threads=threads)
    ids = m.tokenize(case["prompt"])
    sampler = make_sampler(m._model, case["temperature"], case["topp"], case["seed"])
    steps = resolve_steps(case["steps"], m.n_ctx)
    got = [ids[0]] + [t for _, t in generate_tokens(m._model, ids, steps, sampler)]
    assert got == as_list(case["ids"])


def _run_c(c):
    return c["producer"] == "llama2.c run.c"


@pytest.mark.parametrize("case", cases("logits", _run_c))
@pytest.mark.parametrize("threads", [1, 2])
def test_logits_match_llama2c(case, threads):
    """Teacher-forced logits within 1e-4 of the largest |logit| (fp32 reference)."""
    shared_path()
    ref = np.load(shared_path("golden/" + case["logits"]))
    m = pyllama.Llama(model_of(case), threads=threads)
    got = m.logits(as_list(case["ids"]))
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), f"max |Δ| {err} vs max |logit| {np.abs(ref).max()}"


def test_v1_and_legacy_hold_the_same_weights():
    a = pyllama.load(shared_path("models/stories260K.bin"))
    b = pyllama.load(shared_path("models/stories260K_v1.bin"))
    assert a.format == "llama2c-legacy" and b.format == "llama2c-v1"
    assert a.config == b.config and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert np.array_equal(a.tensors[name].data, b.tensors[name].data), name


def test_weights_are_views_of_one_map():
    mf = pyllama.load(shared_path("models/stories260K.bin"))
    for t in mf.tensors.values():
        assert np.shares_memory(t.data, mf.mmap), t.name
        assert not t.data.flags.writeable
