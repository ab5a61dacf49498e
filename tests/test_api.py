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
