"""Float models' own paths (csrc/attention.c, pl_repack's float case): a prompt's attention by
blocks of 16 queries, and the load-time copy of float matrices. The reference is this project's
token-at-a-time forward pass (llama2.c's arithmetic, tests/test_parity.py ties it to llama2.c):
batched float results agree with it to f32 rounding (1e-5 of the largest logit)."""
import numpy as np
import pytest

from conftest import shared_path

import pyllama

# head sizes 8 (stories260K: 8 heads over 4 kv heads), 32 (quant-base: 8 over 2), F32/F16/BF16
FLOAT_MODELS = ("stories260K.bin", "stories260K-f16.gguf", "quant-base-f32.gguf",
                "quant-base-bf16.gguf")


def _stepwise(t, ids):
    return np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(ids)])


@pytest.mark.parametrize("model", FLOAT_MODELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_prompt_in_uneven_chunks_matches_token_by_token(model, threads):
    """Chunks of 1, 5, 37, 16, 20 and 3 tokens at running positions: blocks that start mid-cache
    (the causal mask at offsets that are no multiple of 16), partial blocks, one-token calls."""
    m = pyllama.Llama(shared_path("models/" + model), threads=threads, n_ctx=128)
    rng = np.random.default_rng(7)
    sizes = [1, 5, 37, 16, 20, 3]
    ids = [1] + rng.integers(3, m.vocab_size, size=sum(sizes) - 1).tolist()
    t = m._model
    chunks, pos = [], 0
    for n in sizes:
        chunks.append(t.prefill(ids[pos:pos + n], pos, all_logits=True))
        pos += n
    batched = np.concatenate(chunks)
    stepwise = _stepwise(t, ids)
    scale = np.abs(stepwise).max()
    assert np.abs(batched - stepwise).max() <= 1e-5 * scale
    assert (batched.argmax(axis=1) == stepwise.argmax(axis=1)).mean() > 0.95


def test_long_prompt_blocks_match_token_by_token():
    """Beyond one batch (the later batches attend to all earlier positions) at 2 threads."""
    m = pyllama.Llama(shared_path("models/quant-base-f32.gguf"), threads=2, n_ctx=128)
    rng = np.random.default_rng(8)
    ids = [1] + rng.integers(3, m.vocab_size, size=126).tolist()
    m._model.max_batch = 48  # three calls: positions 0, 48, 96
    batched = m.logits(ids)
    stepwise = _stepwise(m._model, ids)
    assert np.abs(batched - stepwise).max() <= 1e-5 * np.abs(stepwise).max()


@pytest.mark.parametrize("model", ["quant-base-f32.gguf", "quant-base-f16.gguf"])
def test_float_matrices_copied_once_unchanged(model):
    """A mapped file's float matrices run from a copy (memory the kernel can back with 2 MiB
    pages), byte for byte the file's, shared by every Transformer over the file; a file read
    into memory (mmap=False) is run as it is, with the same logits."""
    path = shared_path("models/" + model)
    m = pyllama.Llama(path)
    mf = m.file
    assert isinstance(mf.mmap, np.memmap)
    mats = [name for name, t in mf.tensors.items() if len(t.shape) == 2 and name != "token_embd.weight"]
    assert mats and set(mats) <= set(mf.repacked)
    for name in mats:
        arr, typ = mf.repacked[name]
        assert typ == mf.tensors[name].type
        assert arr.ctypes.data % 64 == 0
        np.testing.assert_array_equal(arr, mf.tensors[name].data.reshape(-1).view(np.uint8))
    before = dict(mf.repacked)
    again = pyllama.Llama(mf)
    assert all(mf.repacked[k] is before[k] for k in before)
    ids = [1, 5, 9, 200, 17, 33]
    ref = m.logits(ids)
    np.testing.assert_array_equal(again.logits(ids), ref)
    inmem = pyllama.Llama(path, mmap=False)
    assert not inmem.file.repacked
    np.testing.assert_array_equal(inmem.logits(ids), ref)
