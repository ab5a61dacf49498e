"""GGUF files and quantized weights against llama.cpp, llama2.c and a numpy reference.

Expected values: ../shared/golden (llama.cpp at c392e50 for the GGUF logits and greedy runs,
llama2.c runq.c for quant-base-v2.bin); the `gguf` package's dequantize for the numpy reference
(tests/reference.py); tolerances from golden/README.md and the issue (s = std of the reference).
"""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from conftest import as_list, cases, manifest, shared_path
from models import gguf_llama_writer
from reference import forward_all

import pyllama
from pyllama import _core
from pyllama.formats.common import F32, Tensor
from pyllama.model import Transformer

import gguf  # noqa: E402  (a test dependency: missing, the tests fail rather than skip)

FLOAT_TYPES = ("f32", "f16", "bf16")
TOL_FLOAT = (0.006, 0.025)   # rms|Δ|/s, max|Δ|/s
TOL_QUANT = (0.03, 0.15)


def rel_err(got, ref):
    s = ref.std()
    d = got.astype(np.float64) - ref
    return np.sqrt((d * d).mean()) / s, np.abs(d).max() / s


def teacher_forced(model_file, ids, threads=1):
    t = Transformer(model_file, threads=threads)
    return np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(ids)])


def _llamacpp(c):
    return c["producer"] == "llama.cpp"


@pytest.mark.parametrize("case", cases("logits", _llamacpp))
@pytest.mark.parametrize("threads", [1, 2])
def test_logits_match_llamacpp(case, threads):
    shared_path()
    ref = np.load(shared_path("golden/" + case["logits"]))
    m = pyllama.Llama(shared_path(case["model"]), threads=threads)
    rms, mx = rel_err(m.logits(as_list(case["ids"])), ref)
    kind = case["model"].rsplit("-", 1)[-1].removesuffix(".gguf")
    tol = TOL_FLOAT if kind in FLOAT_TYPES else TOL_QUANT
    assert rms <= tol[0] and mx <= tol[1], f"{case['name']}: rms {rms:.4f}·s, max {mx:.4f}·s"


@pytest.mark.parametrize("case", cases("logits", lambda c: c["producer"] == "llama2.c runq.c"))
def test_v2_logits_match_runq(case):
    shared_path()
    ref = np.load(shared_path("golden/" + case["logits"]))
    m = pyllama.Llama(shared_path(case["model"]))
    assert m.file.format == "llama2c-v2"
    rms, mx = rel_err(m.logits(as_list(case["ids"])), ref)
    assert rms <= TOL_QUANT[0] and mx <= TOL_QUANT[1], (rms, mx)


@pytest.mark.parametrize("case", cases("generate", lambda c: c["model"].endswith(".gguf")))
def test_gguf_greedy_text_matches_llamacpp_and_llama2c(case):
    """llama-simple's greedy text (after its `<s> ` rendering of BOS) is a prefix of ours, and
    ours equals llama2.c's greedy run of stories260K.bin with the same prompt and steps. The GGUF
    says context_length 128 (llama.cpp's converter), so ask for 512 positions as llama-simple did."""
    shared_path()
    proc = subprocess.run([sys.executable, "-m", "pyllama", "run", shared_path(case["model"]),
                           "-t", "0", "-n", "256", "--context", "512", "-i", case["prompt"]],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    theirs = case["stdout"].removeprefix("<s> ").rstrip("\n")
    assert proc.stdout.decode().startswith(theirs)
    llama2c = [c for c in manifest()["generate"] if c["model"] == "models/stories260K.bin"
               and c["temperature"] == 0 and c["prompt"] == case["prompt"] and c["steps"] == 256]
    assert proc.stdout.decode() == llama2c[0]["stdout"]


def test_same_weights_in_three_formats_give_the_same_greedy_ids():
    paths = [shared_path("models/" + f) for f in
             ("stories260K.bin", "stories260K_v1.bin", "stories260K-f32.gguf")]
    seqs = []
    for p in paths:
        m = pyllama.Llama(p, tokenizer=shared_path("models/tok512.bin"), n_ctx=256)
        seqs.append(list(m.generate("Lily", steps=200, temperature=0)))
    assert seqs[0] == seqs[1] == seqs[2]


# -- the numpy reference ---------------------------------------------------------------------------

def dequantized_by_gguf(path):
    """{name: float32 (rows, cols)} from the gguf package's reader and dequantize."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(arr, np.float32).reshape([int(d) for d in reversed(t.shape)])
    return out


def dequantized_by_pyllama(mf):
    """The same model with every tensor dequantized to F32 by pyllama's own C kernels."""
    ffi, lib = _core.ffi, _core.lib
    tensors, keep = {}, []
    for name, t in mf.tensors.items():
        if t.type == F32:
            tensors[name] = t
            continue
        rows, cols = t.shape
        out = np.empty((rows, cols), np.float32)
        pt = ffi.new("pl_tensor *", {"type": t.type, "rows": rows, "cols": cols,
                                     "group_size": t.group_size})
        buf = ffi.from_buffer(t.data)
        pt.data = buf
        if t.scales is not None:
            sbuf = ffi.from_buffer(t.scales)
            keep.append(sbuf)
            pt.scales = ffi.cast("float *", sbuf)
        for r in range(rows):
            lib.pl_dequantize_row(pt, r, ffi.cast("float *", ffi.from_buffer(out[r])))
        tensors[name] = Tensor(name, F32, (rows, cols), out)
    return dataclasses.replace(mf, tensors=tensors, format=mf.format + "-dequantized")


QUANT_FILES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k")


@pytest.mark.parametrize("kind", QUANT_FILES)
def test_quantized_files_against_numpy_reference(kind):
    """Our dequantization + f32 forward equals a numpy forward over gguf's dequantized weights to
    ~1e-4 relative; the quantized path (8-bit activations) stays close to it."""
    path = shared_path(f"models/quant-base-{kind}.gguf")
    ids = as_list([c for c in manifest()["logits"] if c["name"] == f"quant-base-{kind}-gguf"][0]["ids"])[:24]
    mf = pyllama.load(path)
    ref = forward_all(dequantized_by_gguf(path), mf.config, ids)
    f32_path = teacher_forced(dequantized_by_pyllama(mf), ids)
    assert np.abs(f32_path - ref).max() <= 1e-4 * np.abs(ref).max()
    # 8-bit activations (as llama.cpp): the same tolerance as against llama.cpp's own logits
    rms, mx = rel_err(teacher_forced(mf, ids), ref)
    assert rms <= TOL_QUANT[0] and mx <= TOL_QUANT[1], (rms, mx)


def test_v2_against_numpy_reference():
    path = shared_path("models/quant-base-v2.bin")
    mf = pyllama.load(path)
    ids = list(range(1, 25))
    weights = {}
    for name, t in mf.tensors.items():
        if t.type == F32:
            weights[name] = t.data
        else:
            q = t.data.astype(np.float32).reshape(-1, t.group_size)
            weights[name] = (q * t.scales[:, None]).reshape(t.shape)
    ref = forward_all(weights, mf.config, ids)
    assert np.abs(teacher_forced(dequantized_by_pyllama(mf), ids) - ref).max() <= 1e-4 * np.abs(ref).max()


# -- types without a shared golden file: GGUF files written here ------------------------------------

# K-quant layouts: (scales offset, d offset, dmin offset or None)
K_LAYOUT = {"Q2_K": (0, 80, 82), "Q3_K": (96, 108, None), "Q4_K": (4, 0, 2),
            "Q5_K": (4, 0, 2), "Q6_K": (192, 208, None)}


def zero_mean_k_blocks(qname, rows, cols, rng, std):
    """Random K-quant rows (gguf-py cannot quantize K types) whose weights look like a trained
    layer's: random quants, sub-block scales and mins fixed so that each sub-block is centred on
    zero, then d (and dmin) scaled so the dequantized weights have the given std."""
    from test_quants import TYPES
    _, gt, block, nbytes, _ = TYPES[qname]
    sc_at, d_at, dmin_at = K_LAYOUT[qname]
    b = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    one = np.array([1.0], np.float16).view(np.uint8)
    if qname in ("Q4_K", "Q5_K"):   # 6-bit (scale, min) = (2, 15): 2·q − 15·(dmin/d)·… centred
        b[:, sc_at:sc_at + 4] = 2
        b[:, sc_at + 4:sc_at + 8] = 15
        b[:, sc_at + 8:sc_at + 12] = 2 | (15 << 4)
        ratio = 1.0 if qname == "Q4_K" else 31 / 15   # mean q is 7.5 (Q4) or 15.5 (Q5)
    elif qname == "Q2_K":             # 4-bit scale 2, min 3: mean q is 1.5
        b[:, sc_at:sc_at + 16] = 2 | (3 << 4)
        ratio = 1.0
    else:                             # Q3_K, Q6_K: signed quants and scales, already centred
        ratio = None
    b[:, d_at:d_at + 2] = one
    if dmin_at is not None:
        b[:, dmin_at:dmin_at + 2] = np.array([ratio], np.float16).view(np.uint8)
    w = gguf.quants.dequantize(b, gt)
    k = std / float(np.std(w))
    b[:, d_at:d_at + 2] = np.array([k], np.float16).view(np.uint8)
    if dmin_at is not None:
        b[:, dmin_at:dmin_at + 2] = np.array([k * ratio], np.float16).view(np.uint8)
    return np.ascontiguousarray(b.reshape(rows, -1))


def write_model_gguf(path, src, qname):
    """src (a float ModelFile with a tokenizer) as a GGUF whose matrices are of type qname:
    quantized by gguf's quantizer where it has one, else random valid blocks (K-quants)."""
    from test_quants import TYPES
    cfg, meta = src.config, src.metadata
    w = gguf_llama_writer(path, cfg, rms_eps=cfg["rms_eps"])
    w.add_rope_dimension_count(cfg["dim"] // cfg["n_heads"])
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores([float(s) for s in meta["tokenizer.ggml.scores"]])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    gt = TYPES[qname][1]
    rng = np.random.default_rng(7)
    for name, t in src.tensors.items():
        data = np.asarray(t.data.view(np.float32)).reshape(t.shape)
        if len(t.shape) == 2:
            rows, cols = t.shape
            try:
                q = np.ascontiguousarray(gguf.quants.quantize(data, gt))
            except NotImplementedError:
                q = zero_mean_k_blocks(qname, rows, cols, rng, float(np.std(data)))
            w.add_tensor(name, q, raw_dtype=gt)
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qname", ["Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_written_gguf_of_each_type(tmp_path, qname):
    """A whole model in each type: the quantized path against our own f32 path over the same
    weights dequantized by gguf-py (and that f32 path against the numpy reference)."""
    src = pyllama.load(shared_path("models/quant-base-f32.gguf"))
    path = write_model_gguf(tmp_path / f"m-{qname}.gguf", src, qname)
    mf = pyllama.load(path)
    assert {t.type_name for t in mf.tensors.values() if len(t.shape) == 2} == {qname}
    ids = list(range(1, 21))
    weights = dequantized_by_gguf(path)
    ref = forward_all(weights, mf.config, ids)
    f32 = dataclasses.replace(mf, tensors={n: Tensor(n, F32, w.shape, w) for n, w in weights.items()})
    ours_f32 = teacher_forced(f32, ids)
    assert np.abs(ours_f32 - ref).max() <= 1e-4 * np.abs(ref).max()
    rms, mx = rel_err(teacher_forced(mf, ids, threads=2), ours_f32.astype(np.float64))
    assert rms <= TOL_QUANT[0] and mx <= TOL_QUANT[1], (rms, mx)
    # and it runs end to end with its embedded tokenizer: greedy generation is the argmax chain
    # of the file's own logits, a sampled run decodes to the text generate() streams
    m = pyllama.Llama(path)
    ids = m.tokenize("ab")
    gen = [t for _, t in m.generate_tokens(ids, steps=12, temperature=0, stop=False)][len(ids) - 1:]
    assert len(gen) == 12 - len(ids) + 1
    for k, tok in enumerate(gen):
        assert tok == int(np.argmax(m.logits(ids + gen[:k], last_only=True)))
    sampled = [t for _, t in m.generate_tokens(ids, steps=12, temperature=0.7, seed=3)][len(ids) - 1:]
    assert sampled and all(0 <= t < m.vocab_size for t in sampled)
    text = "".join(m.generate("ab", steps=12, temperature=0.7, seed=3, echo=True))
    assert text == m.detokenize(ids + sampled)
