"""Threads: the default count, the OpenMP spin budget, processes that share the cores.

Expected texts are llama2.c's (../shared/golden/manifest.json, "generate" cases). Speed is never
asserted here: `make bench` measures it (its contention rows)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import manifest, shared_path

import pyllama
from pyllama import model as model_mod


def _spin_setting(env):
    """GOMP_SPINCOUNT as libgomp reports it after `import pyllama` (OMP_DISPLAY_ENV=verbose),
    and the value os.environ holds afterwards (what a child process would inherit)."""
    env = dict(env, OMP_DISPLAY_ENV="verbose")
    code = "import os, pyllama; print(os.environ.get('GOMP_SPINCOUNT'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "GOMP_SPINCOUNT" in ln or "OMP_WAIT_POLICY" in ln]
    return "\n".join(lines), proc.stdout.strip()


@pytest.fixture
def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def test_spin_budget_reaches_libgomp(clean_env):
    """pyllama sets GOMP_SPINCOUNT before the core (and libgomp) loads, and libgomp uses it."""
    if not pyllama._core.lib.pl_has_openmp():
        pytest.fail("this test needs the OpenMP build (the default)")
    shown, inherited = _spin_setting(clean_env)
    assert "GOMP_SPINCOUNT = '2000'" in shown
    assert inherited == "None"  # removed again: child processes start with the user's environment


@pytest.mark.parametrize("var, value, expect", [
    ("GOMP_SPINCOUNT", "123", "GOMP_SPINCOUNT = '123'"),
    ("OMP_WAIT_POLICY", "active", "OMP_WAIT_POLICY = 'ACTIVE'"),
])
def test_users_wait_setting_wins(clean_env, var, value, expect):
    clean_env[var] = value
    shown, inherited = _spin_setting(clean_env)
    assert expect in shown
    assert inherited == (value if var == "GOMP_SPINCOUNT" else "None")
    if var == "OMP_WAIT_POLICY":
        assert "GOMP_SPINCOUNT = '2000'" not in shown


def test_default_threads_by_model_size():
    """stories260K (45,312 multiply-adds per layer and token) defaults to one thread; the
    stories15M shape (dim 288, hidden 768: 995,328) to every available core."""
    s260k = dict(dim=64, hidden_dim=172, n_heads=8, n_kv_heads=4)
    s15m = dict(dim=288, hidden_dim=768, n_heads=6, n_kv_heads=6)
    assert model_mod.layer_work(s260k) == 2 * 64 * (64 + 32) + 3 * 64 * 172 == 45312
    assert model_mod.layer_work(s15m) == 2 * 288 * 576 + 3 * 288 * 768 == 995328
    assert model_mod.default_threads(s260k) == 1
    assert model_mod.default_threads(s15m) == model_mod.default_threads() >= 1
    m = pyllama.Llama(shared_path("models/stories260K.bin"), tokenizer=shared_path("models/tok512.bin"))
    assert m.threads == 1
    m.threads = 2       # an explicit count is kept
    assert m.threads == 2
    m.threads = None    # and None means the default again
    assert m.threads == 1
    m.close()


def test_two_processes_at_once_both_correct():
    """Two `pyllama run` processes of 2 threads each on the same cores, started together: both
    finish (bounded time, not a speed test) with llama2.c's exact text."""
    case = next(c for c in manifest()["generate"] if c["model"] == "models/stories260K.bin"
                and c["temperature"] > 0 and c["seed"] == 42)
    cmd = [sys.executable, "-m", "pyllama", "run", str(shared_path(case["model"])),
           "-z", str(shared_path(case["tokenizer"])), "-t", str(case["temperature"]),
           "-p", str(case["topp"]), "-s", str(case["seed"]), "-n", str(case["steps"]),
           "-i", case["prompt"], "--threads", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()
        assert out == case["stdout"].encode("utf-8")


def test_fewer_threads_than_asked_do_not_hang():
    """OpenMP may give a team fewer threads than asked (here OMP_THREAD_LIMIT=1): the barrier
    counts the team it got, so the pass finishes, with the one-thread logits."""
    code = ("import numpy as np, pyllama, sys\n"
            "p, ids = sys.argv[1], [1, 5, 9, 13, 17]\n"
            "a = pyllama.Llama(p, threads=2).logits(ids)\n"
            "b = pyllama.Llama(p, threads=1).logits(ids)\n"
            "assert np.array_equal(a, b)\n"
            "print('ok')\n")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    proc = subprocess.run([sys.executable, "-c", code, str(shared_path("models/quant-base-q8_0.gguf"))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# -- one token's matmul rows in chunks shared by the team (csrc/threads.c pl__chunks) -------------
# A thread done with its own chunks takes those of a partner that is at work, from the back; a
# partner that began nothing lately keeps its own. Which thread computes a row never changes its
# arithmetic, so every team size must give the one-thread result bit for bit, every row written
# (the output starts as NaN) and every epilogue (bias, RoPE, residual, SwiGLU) applied exactly
# once. 8 threads on this machine's 2 cores: members are descheduled mid-step, so steps begin
# late, chunks are taken from late members' parts and left to descheduled ones. 70 threads: more
# than PL_MAX_TEAM (64), where each member takes an even part of the chunks and shares nothing.

def _float_tensor(ptype, rows, cols, seed):
    from test_quants import Tensor
    lib = pyllama._core.lib
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    if ptype == lib.PL_F16:
        w = w.astype(np.float16)
    elif ptype == lib.PL_BF16:  # the top half of each float's bits (truncated: exact values below)
        w = (w.view(np.uint32) >> 16).astype(np.uint16)
    return Tensor(ptype, w, rows, cols)


def _float_values(t):
    lib = pyllama._core.lib
    w = t.keep[0]
    if t.t.type == lib.PL_BF16:
        return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return w.astype(np.float64)


@pytest.mark.parametrize("kind", ("F32", "F16", "BF16"))
@pytest.mark.parametrize("cols", (4100, 8192 + 24))
def test_wide_float_rows_any_split(kind, cols):
    """Rows wider than PL_WIDE_COLS go two at a time (matmul.c FLOAT_WIDE_ROWS): each row's sum
    is right (float64 reference), and the same bits whether the row was paired or alone, at any
    team size (7 rows: one left alone at the end, or in the middle of an odd split)."""
    lib = pyllama._core.lib
    t = _float_tensor(getattr(lib, "PL_" + kind), 7, cols, 11)
    x = np.random.default_rng(5).standard_normal(cols).astype(np.float32)
    one = t.matmul(x, 1)
    w = _float_values(t)
    want = w @ x.astype(np.float64)
    np.testing.assert_array_less(np.abs(one - want), 1e-5 * (np.abs(w) @ np.abs(x.astype(np.float64))))
    for n_threads in (2, 3, 4, 8):
        assert np.array_equal(t.matmul(x, n_threads), one), n_threads
    for r in range(7):  # a one-row tensor (the row alone) gives the same bits as in the pairs
        row = _float_tensor(getattr(lib, "PL_" + kind), 1, cols, 11)
        row.keep[0][0] = t.keep[0][r]
        assert t.matmul(x, 1)[r] == row.matmul(x, 1)[0]


@pytest.mark.parametrize("kind", ("F32", "F16", "BF16"))
def test_wide_float_rows_interleaved(kind):
    """Wide rows (more than PL_WIDE_COLS values, a multiple of 16; rows a multiple of 4) are
    copied with groups of 4 rows interleaved (PL_*_R4, matmul.c "Wide float rows"): one token and
    batches give the file layout's bits at every team size (rows split inside groups too), the
    copy's rows read back as the file's, and other shapes are copied as they are. (A batch's
    rows are split in pairs or in groups of 4, and a row a 3-row tile leaves over is summed by the
    one-token kernel: batched results then match the file layout's bit for bit only where the
    two splits agree, as on one thread, and to f32 rounding elsewhere.)"""
    from test_kernels_repack import _repacked
    lib = pyllama._core.lib
    ptype = getattr(lib, "PL_" + kind)
    rows, cols = 28, 8192 + 32
    t = _float_tensor(ptype, rows, cols, 21)
    r4 = _repacked(t)
    if not {"avx2", "fma"} <= set(pyllama._core.ffi.string(lib.pl_build_info()).decode().split()):
        assert r4.t.type == ptype  # the interleaved kernels are AVX2+FMA code (PL_AVX2)
        return
    assert r4.t.type == getattr(lib, "PL_" + kind + "_R4")
    np.testing.assert_array_equal(r4.dequantize_rows(), t.dequantize_rows())
    x = np.random.default_rng(8).standard_normal((9, cols)).astype(np.float32)
    bound = 1e-5 * (np.abs(_float_values(t)) @ np.abs(x.T.astype(np.float64))).T
    for n_threads in (1, 2, 3, 4, 8):
        assert np.array_equal(r4.matmul(x[0], n_threads), t.matmul(x[0], 1)), n_threads
        for n in (4, 9):  # whole tiles of 4 tokens, and a token left over
            got, plain = r4.matmul(x[:n], n_threads), t.matmul(x[:n], n_threads)
            if n_threads == 1:
                assert np.array_equal(got, plain), n
            np.testing.assert_array_less(np.abs(got - plain), bound[:n])
    for shape in ((rows - 1, cols), (rows, cols - 8), (rows, 4096)):
        assert _repacked(_float_tensor(ptype, *shape, 21)).t.type == ptype, shape


@pytest.mark.parametrize("kind", ("F32", "F16", "Q8_0", "Q4_K"))
def test_shared_chunks_give_every_row_once_at_any_team_size(kind):
    from test_quants import TYPES, Tensor, _rng, _weights
    lib = pyllama._core.lib
    # many chunks of 64 KiB (F32: 125) and a short last one, in pairs of rows: each member takes
    # its own in runs of up to PL_TOKEN_RUN (16) chunks, shorter as its part runs out
    rows = 4002
    if kind in ("F32", "F16"):
        t = _float_tensor(getattr(lib, "PL_" + kind), rows, 512, 7)
    else:
        ptype, _, block, _, _ = TYPES[kind]
        t = Tensor(ptype, _weights(kind, rows, 4 * block, "random", _rng(kind, "chunks")), rows, 4 * block)
    x = np.random.default_rng(3).standard_normal(t.t.cols).astype(np.float32)
    one = t.matmul(x, 1)
    assert not np.isnan(one).any()
    for n_threads in (2, 3, 8, 70):  # 70: more than PL_MAX_TEAM, an even split without sharing
        for _ in range(10 if n_threads == 8 else 3):
            assert np.array_equal(t.matmul(x, n_threads), one), n_threads


@pytest.mark.parametrize("path", ("models/bpe/qwen2-tiny-f16.gguf",       # q, k, v biases, NEOX RoPE
                                  "models/bpe/llama3-tiny-f16.gguf",      # grouped-query attention
                                  "models/quant-base-q8_0.gguf"))
def test_shared_chunks_token_by_token_logits_at_any_team_size(path):
    ids = [1] + [(37 * i) % 200 + 3 for i in range(90)]  # past a block of 64 attention positions
    logits = {}
    for n_threads in (1, 2, 3, 8, 70):  # (and the query heads of a kv head in 1, 2 or 4 parts)
        m = pyllama.Llama(str(shared_path(path)), threads=n_threads, n_ctx=128)
        t = m._model
        logits[n_threads] = np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(ids)])
        m.close()
    assert np.isfinite(logits[1]).all()
    for n_threads in (2, 3, 8, 70):
        assert np.array_equal(logits[n_threads], logits[1]), n_threads
    if "q8_0" in path:  # and a quantized model's batch (rows split evenly, its epilogues once per
        # thread) gives each token the same bits as the one-token path
        with pyllama.Llama(str(shared_path(path)), threads=2, n_ctx=128) as m:
            assert np.array_equal(m.logits(ids), logits[1])


def test_default_threads_adapt_one_token_steps(monkeypatch):
    """With the default count (threads=None) each one-token step runs on the ThreadTuner's choice
    (model.py, Transformer.threads); an explicit count turns that off. The logits are the same
    bits on either choice, and prompts run on the full count."""
    monkeypatch.setattr(model_mod, "default_threads", lambda config=None: 2)
    path = str(shared_path("models/quant-base-q8_0.gguf"))
    ids = [1] + [(37 * i) % 200 + 3 for i in range(30)]
    with pyllama.Llama(path, threads=2, n_ctx=64) as fixed:
        assert fixed._model._tuner is None
        want = np.array([fixed._model.forward(t, p).copy() for p, t in enumerate(ids)])
    with pyllama.Llama(path, n_ctx=64) as m:
        tr = m._model
        assert m.threads == 2 and tr._tuner is not None
        used, pick, done = [], tr._tuner.pick, tr._tuner.done

        def spy(n):
            key, threads = pick(n)
            used.append(threads)
            return key, threads
        monkeypatch.setattr(tr._tuner, "pick", spy)
        # 1 thread made to look fast, so that both choices run
        monkeypatch.setattr(tr._tuner, "done", lambda key, s, cpu: done(key, 1.0 if tr._state.n_threads == 1 else 2.0))
        got = np.array([tr.forward(t, p).copy() for p, t in enumerate(ids)])
        assert set(used) == {1, 2} and used[-1] == 1
        assert tr._state.n_threads == 2  # between steps (and for prompts): the full count
        assert np.array_equal(got, want)
        m.threads = 2
        assert tr._tuner is None and m.threads == 2
        m.threads = None
        assert tr._tuner is not None and m.threads == 2


def _pages_present(arr):
    """Whether each page under arr is in memory (bit 63 of its /proc/self/pagemap entry)."""
    import mmap
    page = mmap.PAGESIZE
    first, last = arr.ctypes.data // page, (arr.ctypes.data + arr.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * first)
        entries = np.frombuffer(f.read(8 * (last - first + 1)), np.uint64)
    return (entries >> np.uint64(63)) == 1


def test_kv_cache_and_buffers_are_mapped_when_made():
    """The state's pages are touched when the Transformer is made, not by its first forward pass
    (model.touch_pages: the first prompt after a load was 30% slower while it faulted them in)."""
    from pyllama.formats import load
    t = model_mod.Transformer(load(str(shared_path("models/stories260K.bin"))), threads=1, n_slots=64)
    assert t.kv_cache_bytes() >= 32 << 20  # beyond malloc's heap: fresh pages from the kernel
    for name in ("key_cache", "value_cache", "att", "hb"):
        assert _pages_present(t._bufs[name]).all(), name
    assert _pages_present(t._scratch).all()
    assert not _pages_present(np.zeros(t.kv_cache_bytes(), np.uint8)).all()  # what it would be