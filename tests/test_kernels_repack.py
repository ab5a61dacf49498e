"""Q4_0, Q5_0, Q8_0, Q4_K and Q6_K repacked at load time (pl_repack: 16 rows interleaved, csrc/quants.c
"Repacked").

Expected values come from:
- the plain-layout kernels of the same core (pl_matmul on the file's bytes, themselves checked
  against gguf-py in tests/test_quants.py): the repacked kernels sum the same exact integers per
  block and differ only in the order of the f32 adds, so the two agree to f32 rounding;
- the repacked single-token kernel itself: every batch size (1-8 token tiles, the decode path's
  4-group tiles and their leftovers, 2 threads splitting rows at group boundaries) must give each
  token exactly its single-token result, bit for bit (issue 12/13: batched == alone);
- for Q4_K/Q6_K, the file layout's kernels exactly: the repacked layout holds the same dwords
  and the same kernels read it, so logits must be equal bit for bit, not just close;
- /proc/cpuinfo and the core's build flags: a build for AVX-512 VNNI makes the layout for all five
  types, an AVX2 + F16C build without VNNI for Q4_0, Q5_0 and Q8_0 (its own kernels, the same
  bits), others for none.
"""
import numpy as np
import pytest

from conftest import shared_path
from pyllama import _core
from pyllama.formats import load
from pyllama.model import Transformer

from test_build import _cpu_flags
from test_quants import TYPES, Tensor, _activations, _rng, _weights

ffi, lib = _core.ffi, _core.lib
BUILD = set(ffi.string(lib.pl_build_info()).decode().split())
VNNI = "avx512vnni" in BUILD
REPACKED = {"Q4_0": lib.PL_Q4_0_R16, "Q5_0": lib.PL_Q5_0_R16, "Q8_0": lib.PL_Q8_0_R16}
K_REPACKED = {"Q4_K": lib.PL_Q4_K_R16, "Q6_K": lib.PL_Q6_K_R16}
# the 32-value types this build repacks (quants.c PL_R16)
REPACKS = set(REPACKED) if {"avx2", "f16c"} <= BUILD else set()


def _needs_repack(name):
    if name not in REPACKS:
        pytest.skip(f"this build does not repack {name} (test_build_repacks_what_its_kernels_read "
                    "checks why)")


def _repacked(t, n_threads=2):
    """A Tensor holding t's repacked layout (64-byte aligned, as pyllama/model.py makes it; float
    matrices: their copy, interleaved where the rows are wide)."""
    n = lib.pl_repack_bytes(t.t)
    per_block = {lib.PL_Q4_0: 18, lib.PL_Q5_0: 22, lib.PL_Q8_0: 34, lib.PL_Q4_K: 144 / 8, lib.PL_Q6_K: 210 / 8,
                 lib.PL_F32: 128, lib.PL_F16: 64, lib.PL_BF16: 64}  # bytes per 32 values
    assert n == t.t.rows * t.t.cols // 32 * per_block[t.t.type]
    buf = np.zeros(n + 64, np.uint8)
    off = -buf.ctypes.data % 64
    packed = buf[off:off + n]
    ptype = lib.pl_repack(t.t, ffi.cast("void *", ffi.from_buffer(packed)), n_threads)
    r = Tensor(ptype, packed, t.t.rows, t.t.cols)
    r.keep.append(buf)
    return r


def test_build_repacks_what_its_kernels_read():
    """Q4_0, Q5_0 and Q8_0 are repacked by every build with AVX2 and F16C (AVX-512 VNNI or AVX2
    kernels), Q4_K and Q6_K only with VNNI, and nothing whose rows are not a multiple of 16."""
    flags = set(_cpu_flags())
    native = "avx512f" in ffi.string(lib.pl_build_info()).decode()
    if native:  # -march=native on an AVX-512 CPU: VNNI kernels exactly when the CPU has VNNI
        assert VNNI == ({"avx512_vnni", "avx512bw"} <= flags)
    for name in [*REPACKED, *K_REPACKED]:
        ptype, _, block, nbytes, _ = TYPES[name]
        t = Tensor(ptype, _weights(name, 32, 2 * block, "random", _rng(name, "bytes")), 32, 2 * block)
        assert (lib.pl_repack_bytes(t.t) > 0) == (name in REPACKS or VNNI and name in K_REPACKED), name
        odd = Tensor(ptype, _weights(name, 33, 2 * block, "random", _rng(name, "odd")), 33, 2 * block)
        assert lib.pl_repack_bytes(odd.t) == 0  # rows not a multiple of 16: left as they are


needs_vnni = pytest.mark.skipif(not VNNI, reason="this build has no AVX-512 VNNI kernels "
                                "(test_build_repacks_what_its_kernels_read checks why)")


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("cols", (32, 96, 768))
@pytest.mark.parametrize("rows", (16, 80, 96, 112))  # sets of 4 groups and 1, 2 or 3 left over
@pytest.mark.parametrize("name", sorted(REPACKED))
def test_repacked_matches_plain_layout(name, rows, cols, n_threads):
    _needs_repack(name)
    ptype, _, block, _, _ = TYPES[name]
    rng = _rng(name, rows, cols, "repack")
    plain = Tensor(ptype, _weights(name, rows, cols, "gguf", rng), rows, cols)
    packed = _repacked(plain, n_threads)
    assert packed.t.type == REPACKED[name]
    x = np.stack([_activations(rng, cols, block) for _ in range(3)])
    want = plain.matmul(x, n_threads).astype(np.float64)
    got = packed.matmul(x, n_threads).astype(np.float64)
    assert np.all(np.isfinite(got))
    if name == "Q5_0":  # every Q5_0 kernel does the repacked kernels' arithmetic (quants.c)
        np.testing.assert_array_equal(got, want)
    # the same integer sums per block; f32 adds in another order: a few ulps of Σ|terms|
    w = plain.dequantize_rows().astype(np.float64)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w).T + 1e-30
    np.testing.assert_array_less(np.abs(got - want), 2e-6 * scale)


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("name", sorted(REPACKED))
@pytest.mark.parametrize("rows", (80, 96, 112))
def test_repacked_batches_are_bit_identical_to_single(name, n_threads, rows):
    """Token tiles of 1-8 (every leftover width; AVX2: tiles of 1-4), more than 8 tokens, the
    one-token path's sets of 4 groups and the groups left over (80, 96, 112 rows: 1, 2, 3 of them,
    whose set keeps its scales after or before its values), split over 2 threads at group edges."""
    _needs_repack(name)
    ptype, _, block, _, _ = TYPES[name]
    cols = 96
    rng = _rng(name, "batch-r16")
    packed = _repacked(Tensor(ptype, _weights(name, rows, cols, "random", rng), rows, cols))
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17):
        x = np.stack([_activations(rng, cols, block) for _ in range(n)])
        single = np.stack([packed.matmul(x[i], n_threads) for i in range(n)])
        assert np.all(np.isfinite(single))
        np.testing.assert_array_equal(packed.matmul(x, n_threads), single)


@pytest.mark.parametrize("name", ("quant-base-q4_0.gguf", "quant-base-q8_0.gguf"))
def test_models_run_repacked(shared, name):
    """The files tests/test_prefill.py runs take the repacked kernels (so its batched == stepwise
    check covers them), while the embedding keeps the file's layout."""
    _needs_repack(name.split("-")[-1].split(".")[0].upper())
    tr = Transformer(load(shared / "models" / name), n_ctx=32)
    w = tr._weights
    mats = [getattr(w.layers[l], f) for l in range(tr.config["n_layers"])
            for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    assert {m.type for m in mats} <= set(REPACKED.values())
    assert w.token_embedding.type in (lib.PL_Q4_0, lib.PL_Q8_0, lib.PL_Q6_K, lib.PL_F32, lib.PL_F16)


@pytest.mark.parametrize("budget", (0, 700_000))
def test_memory_budget_leaves_the_rest_in_the_file_layout(shared, monkeypatch, budget):
    """Repacked copies stop at half the memory available at load (here: none, or a few matrices
    of quant-base-q8_0, whose wcls comes first): the rest runs in the file's layout, and a batch
    still equals the same tokens one by one, bit for bit, across the mix."""
    _needs_repack("Q8_0")
    from pyllama import model as model_mod
    monkeypatch.setattr(model_mod, "repack_budget", lambda: budget)
    tr = Transformer(load(shared / "models" / "quant-base-q8_0.gguf"), n_ctx=64)
    w = tr._weights
    types = [w.wcls.type] + [getattr(w.layers[l], f).type for l in range(tr.config["n_layers"])
                             for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    n_packed = sum(t == lib.PL_Q8_0_R16 for t in types)
    assert (n_packed == 0) if budget == 0 else (0 < n_packed < len(types))
    assert set(types) <= {lib.PL_Q8_0, lib.PL_Q8_0_R16}
    ids = [1] + np.random.default_rng(budget).integers(3, tr.vocab_size, size=20).tolist()
    batched = tr.prefill(ids, 0, all_logits=True).copy()
    stepwise = np.array([tr.forward(tok, pos).copy() for pos, tok in enumerate(ids)])
    np.testing.assert_array_equal(batched, stepwise)


def test_transformers_over_one_file_share_the_repacked_copy(shared):
    """A server builds a Llama (text) and an engine over one loaded file: the repacked matrices
    are made once, not once per Transformer (1.3 GB each for a 1B Q8_0 file), and both run."""
    _needs_repack("Q8_0")
    mf = load(shared / "models" / "quant-base-q8_0.gguf")
    a, b = Transformer(mf, n_ctx=16), Transformer(mf, n_ctx=16, n_slots=2)
    wa, wb = a._weights, b._weights
    assert wa.wcls.type == lib.PL_Q8_0_R16 and len(mf.repacked) == 1 + 7 * a.config["n_layers"]
    assert wa.wcls.data == wb.wcls.data and wa.layers[0].w2.data == wb.layers[0].w2.data
    np.testing.assert_array_equal(a.forward(1, 0).copy(), b.forward(1, 0).copy())



@pytest.fixture(scope="module")
def q5_model(tmp_path_factory):
    """../shared's qwen2-tiny (dim 128, FFN 384) as q4_k_m: its rows are not a multiple of 256,
    so pyllama convert (as llama.cpp's quantizer) writes Q5_0 for the layer matrices (Q8_0 for a
    few), every one of them quantized: no float matmul in the batch-vs-single comparison."""
    from pyllama.convert import convert
    path = tmp_path_factory.mktemp("q5") / "qwen2-tiny-q4_k_m.gguf"
    convert(shared_path("models/bpe/qwen2-tiny-f16.gguf"), path, "q4_k_m")
    return path


def _q5_logits(path, threads):
    """(Transformer, batched logits, the same tokens one by one on a 1-thread Transformer)."""
    tr = Transformer(load(path), n_ctx=64, threads=threads)
    ids = [1] + np.random.default_rng(5).integers(3, tr.vocab_size, size=40).tolist()
    batched = tr.prefill(ids, 0, all_logits=True).copy()
    one = Transformer(load(path), n_ctx=64, threads=1)
    return tr, batched, np.array([one.forward(tok, pos).copy() for pos, tok in enumerate(ids)])


@pytest.mark.parametrize("threads", (1, 2))
def test_q5_0_model_runs_repacked_and_batches_bit_identically(q5_model, threads):
    _needs_repack("Q5_0")
    tr, batched, stepwise = _q5_logits(q5_model, threads)
    w = tr._weights
    types = [getattr(w.layers[i], f).type for i in range(tr.config["n_layers"])
             for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    assert set(types) <= {lib.PL_Q5_0_R16, lib.PL_Q8_0_R16} and types.count(lib.PL_Q5_0_R16) >= 10
    np.testing.assert_array_equal(batched, stepwise)


class _NoQ5Repack:
    """The core's lib, except that pl_repack_bytes declines Q5_0 (as it does on a build without
    AVX2 and F16C or when the memory budget runs out): the file's layout runs for Q5_0 matrices
    only."""

    def __getattr__(self, name):
        return getattr(lib, name)

    @staticmethod
    def pl_repack_bytes(t):
        return 0 if t.type == lib.PL_Q5_0 else lib.pl_repack_bytes(t)


def test_q5_0_model_repacked_agrees_with_the_file_layout(q5_model, monkeypatch):
    """With the file's Q5_0 layout (the AVX2 kernels and tiles) batches are bit-identical too, and
    since every Q5_0 kernel does the same arithmetic per block (the exact integer sum, then one f32
    fma in block order) the logits are the same bits as with the repacked layout."""
    _needs_repack("Q5_0")
    from pyllama import model as model_mod
    _, packed, _ = _q5_logits(q5_model, 2)
    monkeypatch.setattr(model_mod, "lib", _NoQ5Repack())
    tr, plain, stepwise = _q5_logits(q5_model, 2)
    types = {getattr(tr._weights.layers[i], f).type for i in range(tr.config["n_layers"])
             for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    assert lib.PL_Q5_0 in types and lib.PL_Q5_0_R16 not in types
    np.testing.assert_array_equal(plain, stepwise)
    np.testing.assert_array_equal(packed, plain)


@needs_vnni
@pytest.mark.parametrize("name", sorted(K_REPACKED))
def test_k_repacked_equals_file_layout_bit_for_bit(name):
    """Q4_K/Q6_K: the same dwords read by the same kernels (plain loads instead of gathers), so
    every batch size and thread split gives exactly the file layout's results; and a batch gives
    each token exactly its one-token result (80 rows: 5 groups, split over 2 threads at a group
    edge; 1-9 tokens: every leftover width of the 4-token tiles)."""
    ptype, _, block, _, _ = TYPES[name]
    rows, cols = 80, 3 * block
    rng = _rng(name, "k-r16")
    plain = Tensor(ptype, _weights(name, rows, cols, "random", rng), rows, cols)
    packed = _repacked(plain)
    assert packed.t.type == K_REPACKED[name]
    for n in (1, 2, 3, 4, 5, 9):
        x = np.stack([_activations(rng, cols, block) for _ in range(n)])
        for n_threads in (1, 2):
            single = np.stack([packed.matmul(x[i], n_threads) for i in range(n)])
            assert np.all(np.isfinite(single))
            np.testing.assert_array_equal(packed.matmul(x, n_threads), single)
            np.testing.assert_array_equal(plain.matmul(x, n_threads), single)
            np.testing.assert_array_equal(np.stack([plain.matmul(x[i], n_threads) for i in range(n)]),
                                          single)


@needs_vnni
def test_k_quant_model_runs_repacked_with_the_files_logits(shared, monkeypatch):
    """quant-base-q4_k_m.gguf (Q4_K and Q6_K matrices): repacked or not (budget 0), the same
    logits bit for bit, one token at a time and as a batch."""
    from pyllama import model as model_mod
    path = shared / "models" / "quant-base-q4_k_m.gguf"
    ids = [1] + np.random.default_rng(7).integers(3, 200, size=12).tolist()
    runs = []
    for budget in (None, 0):
        monkeypatch.setattr(model_mod, "repack_budget", lambda: budget)
        tr = Transformer(load(path), n_ctx=32)
        w = tr._weights
        types = {getattr(w.layers[l], f).type for l in range(tr.config["n_layers"])
                 for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
        assert types <= (set(K_REPACKED.values()) if budget is None else {lib.PL_Q4_K, lib.PL_Q6_K})
        batched = tr.prefill(ids, 0, all_logits=True).copy()
        stepwise = np.array([tr.forward(tok, pos).copy() for pos, tok in enumerate(ids)])
        np.testing.assert_array_equal(batched, stepwise)
        runs.append(stepwise)
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("n", (1000, 5 << 20))
def test_repack_buffers_are_aligned_and_writable(n):
    """pyllama/model.py aligned_buffer: repacked copies start on 64 bytes (the kernels' aligned
    loads), from 2 MiB up on a 2 MiB boundary (one transparent huge page per 2 MiB where the
    kernel allows it), hold exactly n writable bytes and outlive the call."""
    from pyllama.model import HUGE, aligned_buffer
    a = aligned_buffer(n)
    assert a.nbytes == n and a.flags.writeable
    assert a.ctypes.data % (HUGE if n >= HUGE else 64) == 0
    a[:] = 7
    assert int(a[-1]) == 7 and int(a.sum()) == 7 * n


@needs_vnni
def test_repacked_tensors_file_pages_still_read_the_file(shared):
    """After a repack the file's pages under the tensor leave the process (release_file_pages);
    the views still read the file's bytes (the embedding of a tied classifier reads rows from
    them), and they stay read-only."""
    path = shared / "models" / "quant-base-q4_k_m.gguf"
    mf = load(path)
    tr = Transformer(mf, n_ctx=16)
    assert mf.repacked
    raw = path.read_bytes()
    base = mf.mmap.ctypes.data
    for name in mf.repacked:
        v = mf.tensors[name].data
        off = v.ctypes.data - base
        assert bytes(v.reshape(-1)) == raw[off:off + v.nbytes]
    assert not mf.mmap.flags.writeable
    assert np.all(np.isfinite(tr.forward(1, 0)))


@pytest.mark.parametrize("name", ("quant-base-q4_k_m.gguf", "quant-base-q6_k.gguf", "quant-base-f32.gguf"))
def test_repack_false_runs_every_matrix_from_the_file(shared, name):
    """Llama(repack=False): no copies (not even ones another Llama over the same loaded file
    made), every matrix bound to the file's own bytes with the file's type, and the same logits
    bit for bit as the repacked run (the K-quant and float copies compute exactly the file
    layout's sums; Q4_0/Q8_0/Q5_0 are compared at kernel level above)."""
    import pyllama
    mf = load(shared / "models" / name)
    fast = pyllama.Llama(mf, n_ctx=32)
    plain = pyllama.Llama(mf, n_ctx=32, repack=False)
    w = plain._model._weights
    base, size = mf.mmap.ctypes.data, mf.mmap.nbytes
    for l in range(plain.n_layers):
        for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            m = getattr(w.layers[l], f)
            assert m.type < 1000 and base <= int(ffi.cast("uintptr_t", m.data)) < base + size
    ids = [1] + np.random.default_rng(3).integers(3, 200, size=9).tolist()
    np.testing.assert_array_equal(fast._model.prefill(ids, 0, all_logits=True),
                                  plain._model.prefill(ids, 0, all_logits=True))
    if VNNI or name.endswith("f32.gguf"):
        assert mf.repacked  # the default run did copy
    from pyllama.engine import Engine
    engine = Engine(plain, slots=2, n_ctx=16)  # the server's engine follows its Llama
    try:
        assert all(getattr(engine.model._weights.layers[0], f).type < 1000 for f in ("wq", "w2"))
    finally:
        engine.close()
    with pytest.raises(pyllama.ParameterError, match="repack"):
        pyllama.Llama(mf, n_ctx=32, repack="no")
