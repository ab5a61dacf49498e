"""Batched prefill (the prompt as one matrix) gives the logits of token-by-token decoding: bit for
bit with quantized weights (every quantized kernel's batch tile sums in its single-token order,
README "Speed"), to f32 rounding with float weights (the float GEMM tile sums in another order)."""
import numpy as np
import pytest

from conftest import shared_path

import pyllama


QUANTIZED = ("quant-base-v2.bin", "quant-base-q4_0.gguf", "quant-base-q4_k_m.gguf",
             "quant-base-q6_k.gguf", "quant-base-q8_0.gguf")


@pytest.mark.parametrize("model", ["stories260K.bin", *QUANTIZED, "quant-base-f16.gguf"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_equals_stepwise(model, threads):
    m = pyllama.Llama(shared_path("models/" + model), threads=threads, n_ctx=512)
    rng = np.random.default_rng(len(model))
    ids = [1] + rng.integers(3, m.vocab_size, size=m._model.max_batch * 2 + 5).tolist()  # 3 batches
    batched = m.logits(ids)
    t = m._model
    stepwise = np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(ids)])
    if model in QUANTIZED:
        assert {t.type_name for t in m.file.tensors.values() if len(t.shape) == 2} <= \
            {"Q8_G", "Q4_0", "Q4_K", "Q6_K", "Q8_0"}  # no float matrix in these files
        np.testing.assert_array_equal(batched, stepwise)
    else:
        scale = np.abs(stepwise).max()
        assert np.abs(batched - stepwise).max() <= 1e-5 * scale


@pytest.mark.parametrize("model", ["quant-base-q4_0.gguf", "quant-base-q6_k.gguf"])
def test_prompt_pieces_at_any_position_equal_stepwise(model):
    """A prompt given in pieces that start anywhere (as after a prefix-cache hit) runs through the
    run-of-tokens attention with its blocks of keys and of queries out of step with the pieces:
    still the single-token logits, bit for bit."""
    m = pyllama.Llama(shared_path("models/" + model), threads=2, n_ctx=512)
    ids = [1] + np.random.default_rng(7).integers(3, m.vocab_size, size=299).tolist()
    t = m._model
    cuts = [0, 1, 38, 107, 170, 171, 300]  # pieces of 1, 37, 69, 63, 1 and 129 tokens
    pieces = np.concatenate([t.prefill(ids[a:b], a, all_logits=True) for a, b in zip(cuts, cuts[1:])])
    stepwise = np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(ids)])
    np.testing.assert_array_equal(pieces, stepwise)


def test_prefill_then_decode_continues_the_cache():
    m = pyllama.Llama(shared_path("models/stories260K.bin"))
    ids = [1, 403, 407, 261, 378, 432, 383]
    full = m.logits(ids)
    t = m._model
    t.prefill(ids[:4], 0)
    for pos in range(4, len(ids)):
        got = t.forward(ids[pos], pos)
        assert np.allclose(got, full[pos], atol=1e-5 * np.abs(full).max())
