"""The embedding API: pyllama.Llama."""
import threading

import numpy as np
import pytest

from conftest import shared_path

import pyllama


@pytest.fixture
def m():
    with pyllama.Llama(shared_path("models/stories260K.bin"),
                       tokenizer=shared_path("models/tok512.bin")) as model:
        yield model


def test_config_attributes(m):
    assert (m.dim, m.hidden_dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert m.config["rope_theta"] == 10000.0 and m.n_ctx == 512


def test_generate_streams_the_continuation(m):
    pieces = list(m.generate("Once upon a time", steps=30, temperature=0))
    assert len(pieces) > 5
    text = "".join(pieces)
    assert text.startswith(", there was a little girl")
    echoed = "".join(m.generate("Once upon a time", steps=30, temperature=0, echo=True))
    assert echoed == "Once upon a time" + text


def test_generate_is_repeatable_with_a_seed(m):
    a = "".join(m.generate("One day", steps=60, temperature=1.0, topp=0.9, seed=5))
    b = "".join(m.generate("One day", steps=60, temperature=1.0, topp=0.9, seed=5))
    assert a == b


def test_tokenize_detokenize(m):
    ids = m.tokenize("Once upon a time")
    assert ids[0] == 1
    assert m.detokenize(ids) == "Once upon a time"
    assert m.tokenize("Once", bos=False, eos=True)[-1] == 2


def test_logits_equal_stepwise_forward(m):
    ids = m.tokenize("Lily and Ben")
    lg = m.logits(ids)
    assert lg.shape == (len(ids), 512) and lg.dtype == np.float32
    assert int(lg[-1].argmax()) == m.tokenize("Lily and Ben were", bos=True)[len(ids)]


def test_threads_setting(m):
    m.threads = 1
    a = m.logits([1, 403, 407])
    m.threads = 2
    b = m.logits([1, 403, 407])
    assert np.allclose(a, b, atol=1e-5)
    with pytest.raises(pyllama.ParameterError):
        m.threads = -3


def test_context_manager_and_close():
    m = pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"))
    with m:
        assert m.tokenize("a")
    assert m.file.mmap is None


def test_separate_instances_in_threads_match_serial():
    path, tok = shared_path("models/stories260K.bin"), shared_path("models/tok512.bin")
    models = [pyllama.Llama(path, tokenizer=tok, threads=1) for _ in range(3)]
    serial = ["".join(x.generate("Tom", steps=50, temperature=0.9, seed=i + 1)) for i, x in enumerate(models)]
    results = [None] * 3

    def work(i):
        results[i] = "".join(models[i].generate("Tom", steps=50, temperature=0.9, seed=i + 1))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


# -- seeds -----------------------------------------------------------------------------------------

def test_seed_none_is_fresh_entropy_for_every_call(m, monkeypatch):
    """seed=None (or 0) used int(time.time()): two calls in one second repeated the text. With
    the clock frozen, 20 calls of 120 positions at temperature 1 must all differ (two equal
    texts from 64 fresh random bits: probability far below 1e-9 on stories260K)."""
    import time
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    texts = ["".join(m.generate("Once", steps=120, temperature=1.0, seed=seed))
             for seed in [None] * 10 + [0] * 10]
    assert len(set(texts)) == len(texts)


def test_integer_seeds_are_unsigned_64_bit(m):
    """The xorshift state is the seed as unsigned 64-bit, as llama2.c's unsigned long long."""
    def run(seed):
        return "".join(m.generate("One day", steps=60, temperature=1.0, seed=seed))
    assert run(-1) == run(2**64 - 1) != run(2**63)
    assert run(np.int64(5)) == run(5) == run(np.uint8(5))
    for bad in (2**64, -(2**63) - 1, 1.5, "5", True):
        with pytest.raises(pyllama.ParameterError, match="seed"):
            m.generate("x", seed=bad)


# -- closed models and pickling --------------------------------------------------------------------

def test_every_method_of_a_closed_model_raises():
    m = pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"))
    m.close()
    m.close()  # twice is fine
    calls = [lambda: m.tokenize("a"), lambda: m.detokenize([1, 2]), lambda: m.logits([1]),
             lambda: m.generate("a"), lambda: m.generate_tokens([1]), lambda: m.threads,
             lambda: setattr(m, "threads", 1), lambda: m.n_ctx, lambda: m.config,
             lambda: m.__enter__(), lambda: m.logits([1], last_only=True)]
    for call in calls:
        with pytest.raises(pyllama.PyllamaError, match="the model is closed"):
            call()
    assert "closed" in repr(m)


def test_closing_during_a_generation_lets_it_finish():
    """close() drops the model's references; an unfinished generator keeps its buffers alive."""
    m = pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"))
    expected = "".join(m.generate("Tom", steps=40, temperature=0))
    gen = m.generate("Tom", steps=40, temperature=0)
    first = next(gen)
    m.close()
    assert first + "".join(gen) == expected


def test_pickling_is_a_clear_error(m):
    import copy
    import pickle
    with pytest.raises(pyllama.PyllamaError, match="cannot be pickled"):
        pickle.dumps(m)
    with pytest.raises(pyllama.PyllamaError, match="cannot be pickled"):
        copy.deepcopy(m)


# -- the public API the CLI and bench use --------------------------------------------------------

def test_generate_tokens_and_last_logits(m):
    ids = m.tokenize("Once upon a time")
    pairs = list(m.generate_tokens(ids, steps=30, temperature=0))
    assert [p for p, _ in pairs][:len(ids)] == ids and [t for _, t in pairs][:len(ids) - 1] == ids[1:]
    assert m.tokenizer.decode([t for _, t in pairs][len(ids) - 1:]) == \
        "".join(m.generate("Once upon a time", steps=30, temperature=0))
    assert list(m.generate_tokens("Once upon a time", steps=30, temperature=0)) == pairs
    np.testing.assert_array_equal(m.logits(ids, last_only=True), m.logits(ids)[-1])
    # stop=False runs every position even through BOS (bench's fixed-length runs)
    assert len(list(m.generate_tokens([1], steps=300, temperature=1.0, seed=2, stop=False))) == 300
