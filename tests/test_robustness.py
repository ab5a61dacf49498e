"""Faults and concurrency: interrupts, fork, threads, hostile text and ids, broken weights."""
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import shared_path
from models import byte_vocab, write_legacy, write_tokenizer_bin

import pyllama
from pyllama import ParameterError, PyllamaError, TokenizerError


@pytest.fixture
def paths():
    return shared_path("models/stories260K.bin"), shared_path("models/tok512.bin")


@pytest.fixture
def m(paths):
    return pyllama.Llama(*paths)


# -- text and ids --------------------------------------------------------------------------------

def test_empty_and_special_looking_prompts(m):
    assert "".join(m.generate("", steps=20, temperature=0)).startswith("Once upon a time")
    ids = m.tokenize("<s></s>")
    assert 1 not in ids[1:] and 2 not in ids  # text, not control tokens
    assert len("".join(m.generate("<s> </s>", steps=30, temperature=0.5, seed=1))) > 0


def test_lone_surrogates_and_invalid_utf8(m):
    with pytest.raises(TokenizerError):
        m.tokenize("abc\ud800def")
    with pytest.raises(TokenizerError):
        m.tokenize(b"\xed\xa0\x80")  # an encoded surrogate is invalid UTF-8
    with pytest.raises(TokenizerError):
        list(m.generate("x\udfff"))


def test_megabyte_prompt_fails_fast(m):
    t0 = time.perf_counter()
    with pytest.raises(ParameterError, match="longer than the context"):
        list(m.generate("word " * 200_000))
    assert time.perf_counter() - t0 < 1.0


def test_ids_outside_the_vocabulary(m):
    """The API checks ids with validate.token_ids: ParameterError for logits and detokenize alike
    (the Tokenizer's own decode keeps TokenizerError, tests/test_tokenizer.py)."""
    for bad in ([512], [-1], [1, 10**12]):
        with pytest.raises(ParameterError, match="outside the vocabulary"):
            m.logits(bad)
        with pytest.raises(ParameterError, match="outside the vocabulary"):
            m.detokenize(bad)
    with pytest.raises(ParameterError, match="expected an integer token id"):
        m.detokenize(["a"])


def test_positions_past_the_context(paths):
    m = pyllama.Llama(*paths, n_ctx=8)
    with pytest.raises(ParameterError, match="do not fit the context of 8"):
        m.logits(list(range(9)))
    assert len(list(m.generate("", steps=100, temperature=0))) > 0  # steps clamp to 8


@pytest.mark.parametrize("temperature,topp", [(0, 0.5), (0, 0), (0, 1), (1, 0), (1, 1), (0.7, 1e-9)])
def test_sampling_corners(m, temperature, topp):
    a = "".join(m.generate("Lily", steps=40, temperature=temperature, topp=topp, seed=9))
    b = "".join(m.generate("Lily", steps=40, temperature=temperature, topp=topp, seed=9))
    assert a == b and len(a) > 0
    if temperature == 0:
        assert a == "".join(m.generate("Lily", steps=40, temperature=0))


def test_non_finite_logits_are_a_clear_error(tmp_path):
    p = write_legacy(tmp_path / "nan.bin", vocab=300)
    data = bytearray(p.read_bytes())
    data[28 + 4 * 300 * 8:28 + 4 * 300 * 8 + 4] = np.float32(np.nan).tobytes()  # rms_att[0]
    p.write_bytes(bytes(data))
    tok = write_tokenizer_bin(tmp_path / "t.bin", byte_vocab(300))
    m = pyllama.Llama(p, tokenizer=tok)
    for temperature, topp in ((0, 0.9), (1.0, 0.9), (1.0, 1.0)):
        with pytest.raises(ParameterError, match="non-finite logits"):
            list(m.generate("ab", steps=5, temperature=temperature, topp=topp))


# -- faults --------------------------------------------------------------------------------------

def test_mmap_false_reads_into_memory_and_survives_the_file_changing(tmp_path, paths):
    import shutil
    copy = tmp_path / "m.bin"
    shutil.copy(paths[0], copy)
    m = pyllama.Llama(copy, tokenizer=paths[1], mmap=False)
    before = m.logits([1, 403, 407])
    copy.write_bytes(b"\0" * 100)  # truncated and rewritten on disk
    assert np.array_equal(m.logits([1, 403, 407]), before)
    assert np.array_equal(before, pyllama.Llama(paths[0]).logits([1, 403, 407]))


def test_ctrl_c_in_the_cli(paths):
    p = subprocess.Popen([sys.executable, "-m", "pyllama", "run", paths[0], "-z", paths[1], "-n", "0",
                          "-t", "1", "-s", "1", "--context", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(20)  # it is generating
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert b"Traceback" not in err and b"pyllama: interrupted" in err


def test_ctrl_c_in_the_api_leaves_the_model_usable(m):
    expected = "".join(m.generate("Tom", steps=60, temperature=0))
    gen = m.generate("Once", steps=400, temperature=0.9, seed=3)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(gen):
            if i == 5:
                signal.raise_signal(signal.SIGINT)
    gen.close()
    assert "".join(m.generate("Tom", steps=60, temperature=0)) == expected


def _child(q, path, tok):
    m = pyllama.Llama(path, tokenizer=tok, threads=2)
    q.put("".join(m.generate("Tom", steps=30, temperature=0)))


def test_fork_after_generation_does_not_hang(m, paths):
    m.threads = 2
    parent = "".join(m.generate("Tom", steps=30, temperature=0))
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()

    def in_child():  # uses the parent's model, whose OpenMP pool did not survive the fork
        q.put("".join(m.generate("Tom", steps=30, temperature=0)))
    for target, args in ((in_child, ()), (_child, (q, *paths))):
        p = ctx.Process(target=target, args=args)
        p.start()
        p.join(60)
        alive = p.is_alive()
        if alive:
            p.kill()
        assert not alive and p.exitcode == 0
        assert q.get(timeout=5) == parent


# -- concurrency ---------------------------------------------------------------------------------

def test_four_instances_in_four_threads_match_serial_and_overlap(paths):
    """Separate models run at the same time: the C calls release the GIL. Proven without timing
    (the machine may be busy): with the interpreter's forced thread switch made 1000 s long, a
    thread only gives up the GIL by entering C, so the four generations' time spans overlap
    only if every C call lets the others run."""
    models = [pyllama.Llama(*paths, threads=1) for _ in range(4)]
    kw = [dict(steps=200, temperature=0.8, seed=s + 1) for s in range(4)]
    t0 = time.perf_counter()
    serial = ["".join(x.generate("One day", **k)) for x, k in zip(models, kw)]
    t_serial = time.perf_counter() - t0
    out, spans = [None] * 4, [None] * 4

    def work(i):
        pieces, first = [], None
        for piece in models[i].generate("One day", **kw[i]):
            first = first or time.perf_counter()
            pieces.append(piece)
        spans[i] = (first, time.perf_counter())
        out[i] = "".join(pieces)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_par = time.perf_counter() - t0
    finally:
        sys.setswitchinterval(interval)
    assert out == serial
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # all four ran at once
    print(f"4 generations: serial {t_serial:.3f}s, 4 threads {t_par:.3f}s "
          f"(speed-up {t_serial / t_par:.2f}x on {os.cpu_count()} CPUs)")


def test_one_instance_from_two_threads_is_serialized(m):
    expected = {s: "".join(m.generate("Tim", steps=120, temperature=1.0, seed=s)) for s in (11, 12)}
    got = {}

    def work(seed):
        got[seed] = "".join(m.generate("Tim", steps=120, temperature=1.0, seed=seed))
    threads = [threading.Thread(target=work, args=(s,)) for s in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_reentry_from_the_same_thread_is_a_clear_error(m):
    gen = m.generate("Tom", steps=50, temperature=0)
    next(gen)
    with pytest.raises(PyllamaError, match="already in use by an unfinished generation"):
        m.logits([1, 2])
    with pytest.raises(PyllamaError, match="already in use"):
        next(m.generate("Tom", steps=50))
    gen.close()
    assert m.logits([1, 2]).shape == (2, 512)
