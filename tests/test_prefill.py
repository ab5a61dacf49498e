"""Batched prefill (the prompt as one matrix) gives the logits of token-by-token decoding."""
import numpy as np
import pytest

from conftest import shared_path

import pyllama


@pytest.mark.parametrize("model", ["stories260K.bin", "quant-base-v2.bin", "quant-base-q4_0.gguf",
                                   "quant-base-q4_k_m.gguf", "quant-base-q6_k.gguf",
                                   "quant-base-q8_0.gguf", "quant-base-f16.gguf"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_equals_stepwise(model, threads):
    m = pyllama.Llama(shared_path("models/" + model), threads=threads, n_ctx=512)
    rng = np.random.default_rng(len(model))
    ids = [1] + rng.integers(3, m.vocab_size, size=m._model.max_batch * 2 + 5).tolist()  # 3 batches
    batched = m.logits(ids)
    t = m._model
    stepwise = np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(ids)])
    scale = np.abs(stepwise).max()
    assert np.abs(batched - stepwise).max() <= 1e-5 * scale


def test_prefill_then_decode_continues_the_cache():
    m = pyllama.Llama(shared_path("models/stories260K.bin"))
    ids = [1, 403, 407, 261, 378, 432, 383]
    full = m.logits(ids)
    t = m._model
    t.prefill(ids[:4], 0)
    for pos in range(4, len(ids)):
        got = t.forward(ids[pos], pos)
        assert np.allclose(got, full[pos], atol=1e-5 * np.abs(full).max())
