"""`pyllama bench`'s logic (not its timings): the bandwidth probe's size, the cache-resident
case, and time to first token measured per --threads row; and what benchmarks/avx2.py refuses.

Where expected values come from: the rules in pyllama/bench.py's docstrings (probe = 4x the
last-level cache or the bytes a token reads, within 64 MiB..1 GiB; none when the weights fit in
the cache) and a fake sysfs cache tree written here.
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import shared_path

from pyllama import bench as B

MiB = 1 << 20


def _cache(tmp_path, entries):
    for i, (level, kind, size) in enumerate(entries):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return str(tmp_path)


def test_last_level_cache_from_sysfs(tmp_path):
    tree = _cache(tmp_path, [(1, "Data", "32K"), (1, "Instruction", "64K"), (2, "Unified", "1024K"),
                             (3, "Unified", "32768K")])
    assert B.last_level_cache(tree) == 32 * MiB
    assert B.last_level_cache(str(tmp_path / "missing")) == B.DEFAULT_LLC
    only_instr = tmp_path / "i"
    only_instr.mkdir()
    assert B.last_level_cache(_cache(only_instr, [(1, "Instruction", "9999K")])) == B.DEFAULT_LLC


def test_probe_size():
    llc = 32 * MiB
    assert B.probe_bytes(1 * MiB, llc) == 0                       # stories260K: cache-resident
    assert B.probe_bytes(32 * MiB, llc) == 0
    assert B.probe_bytes(60 * MiB, llc) == 128 * MiB              # 4x the cache
    assert B.probe_bytes(700 * MiB, llc) == 700 * MiB             # at least a token's bytes
    assert B.probe_bytes(13 << 30, llc) == 1 << 30                # bounded
    assert B.probe_bytes(2 * MiB, 1 * MiB) == 64 * MiB            # never below MIN_PROBE


def _args(**kw):
    a = dict(model=str(shared_path("models/stories260K-f32.gguf")), tokenizer=None,
             threads=[1, 2], prompt=4, gen=4, repeat=2, json=False)
    a.update(kw)
    return argparse.Namespace(**a)


def _fake(monkeypatch, per_token):
    calls = {"ttft": [], "probe": []}

    def ttft(path, tokenizer=None, threads=None):
        calls["ttft"].append(threads)
        return threads / 1000             # 1 ms per thread: each row must show its own

    def bw(threads, nbytes, repeat=5):
        calls["probe"].append(nbytes)
        return 10e9

    monkeypatch.setattr(B, "time_to_first_token", ttft)
    monkeypatch.setattr(B, "read_bandwidth", bw)
    monkeypatch.setattr(B, "bytes_per_token", lambda mf: per_token)
    monkeypatch.setattr(B, "last_level_cache", lambda: 32 * MiB)
    return calls


def test_cache_resident_model_gets_no_probe_and_says_so(monkeypatch):
    calls = _fake(monkeypatch, 1 * MiB)
    out = io.BytesIO()
    assert B.run(_args(), out, io.StringIO()) == 0
    text = out.getvalue().decode()
    assert calls["probe"] == [] and text.count("cache-resident") == 2 and "% of" not in text
    rows = []
    out = io.BytesIO()
    B.run(_args(json=True), out, io.StringIO())
    rows = json.loads(out.getvalue())
    assert [r["cache_resident"] for r in rows] == [True, True]
    assert [r["bandwidth_fraction"] for r in rows] == [None, None]


def test_large_model_probe_and_fraction(monkeypatch):
    calls = _fake(monkeypatch, 200 * MiB)
    out = io.BytesIO()
    B.run(_args(json=True, threads=[2], gen=2 * B.SEGMENT), out, io.StringIO())
    (row,) = json.loads(out.getvalue())
    # one probe before the generation and one after each segment, each round, of the probe size
    assert calls["probe"] == [200 * MiB] * 6 and row["cache_resident"] is False
    assert row["read_bandwidth"]["median"] == 10e9 and 0 < row["bandwidth_fraction"]
    assert "% of the read bandwidth measured around its segments (weights and KV cache; 10.0 GB/s; " \
        "4 of 4 segments settled)" in B.format_row(row)


def test_too_short_a_generation_says_so_rather_than_guess(monkeypatch):
    calls = _fake(monkeypatch, 200 * MiB)
    out = io.BytesIO()
    B.run(_args(json=True, threads=[2], gen=B.SEGMENT - 1), out, io.StringIO())
    (row,) = json.loads(out.getvalue())
    assert calls["probe"] == [] and row["bandwidth_fraction"] is None and not row["cache_resident"]
    assert "too few tokens for a bandwidth figure" in B.format_row(row)


def test_kv_bytes_read():
    """A token at position p reads the float32 keys and values of positions 0..p of each layer:
    the same bytes as a KV cache of p + 1 positions (Transformer.kv_cache_bytes) for one slot."""
    from pyllama.model import Transformer
    from pyllama.formats import load
    cfg = {"n_layers": 2, "n_kv_heads": 3, "head_dim": 4}
    row = 2 * 4 * 2 * 3 * 4
    assert B.kv_bytes_read(cfg, 0, 1) == row
    assert B.kv_bytes_read(cfg, 0, 3) == row * (1 + 2 + 3)
    assert B.kv_bytes_read(cfg, 5, 7) == row * (6 + 7) == B.kv_bytes_read(cfg, 0, 7) - B.kv_bytes_read(cfg, 0, 5)
    mf = load(str(shared_path("models/bpe/llama3-tiny-f16.gguf")))  # grouped-query attention
    t = Transformer(mf, n_ctx=64, threads=1)
    for p in (0, 9, 63):
        assert B.kv_bytes_read(mf.config, p, p + 1) == t.kv_cache_bytes(n_ctx=p + 1)


class _FakeLlama:  # what bench() uses of a Llama
    threads, n_ctx, vocab_size, file = 1, 256, 32, None
    config = {"n_layers": 4, "n_kv_heads": 2, "head_dim": 64}

    def logits(self, ids, last_only):
        pass

    def generate_tokens(self, ids, n, **kw):
        return iter(range(n))


def _fake_clock(monkeypatch, seconds):
    """perf_counter for bench(): rounds of segments taking `seconds` ([round][segment]), each
    probe 100 s (not generation time)."""
    clock, now = [], 0.0
    for segs in seconds:
        clock += [now, now + 1.0]               # prompt start, end
        now += 1.0
        clock.append(now)                       # generation start (after the first probe)
        for dt in segs:
            now += dt
            clock += [now, now + 100.0]         # segment end; after its probe
            now += 100.0
        clock.append(now)                       # generation end
    ticks = iter(clock)
    monkeypatch.setattr(B, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_fraction_divides_each_settled_segment_by_the_probes_around_it(monkeypatch):
    """The probe moves with the machine's load: each segment of SEGMENT generated tokens is
    divided by the mean of the probes timed right before and right after it; a segment whose
    probes differ by more than SETTLED is left out (no probe says which rate it ran at); the
    probes' time is not generation time, and the row reports the median of the settled
    segments' fractions, with the KV cache's bytes counted."""
    _fake(monkeypatch, 200 * MiB)
    S = B.SEGMENT
    # round 1: 10 -> 11 settled, 11 -> 30 not; round 2: 20 -> 20 -> 22 both settled
    rates = iter([10e9, 11e9, 30e9, 20e9, 20e9, 22e9])
    monkeypatch.setattr(B, "read_bandwidth", lambda threads, nbytes, repeat=5: next(rates))
    cfg = _FakeLlama.config
    _fake_clock(monkeypatch, [[0.5, 0.25], [0.4, 0.2]])
    row = B.bench(_FakeLlama(), 1, 4, 2 * S, repeat=2, probe=200 * MiB)
    fr = [(200 * MiB * S + B.kv_bytes_read(cfg, p0, p0 + S)) / dt / bw
          for (p0, dt, bw) in ((0, 0.5, 10.5e9), (0, 0.4, 20e9), (S, 0.2, 21e9))]
    assert row["bandwidth_fraction"] == pytest.approx(statistics.median(fr), rel=1e-9)
    assert (row["settled_segments"], row["unsettled_segments"]) == (3, 1)
    assert row["gen_tok_s"]["min"] == pytest.approx(2 * S / 0.75, rel=1e-9)
    assert row["gen_tok_s"]["max"] == pytest.approx(2 * S / 0.6, rel=1e-9)
    assert row["read_bandwidth"] == {"min": 10e9, "median": 20e9, "max": 30e9}
    assert row["kv_bytes_per_token"] == B.kv_bytes_read(cfg, 0, 2 * S) / (2 * S)


def test_no_settled_segment_gives_no_fraction(monkeypatch):
    _fake(monkeypatch, 200 * MiB)
    rates = iter([10e9, 20e9, 40e9])
    monkeypatch.setattr(B, "read_bandwidth", lambda threads, nbytes, repeat=5: next(rates))
    _fake_clock(monkeypatch, [[0.5, 0.25]])
    row = B.bench(_FakeLlama(), 1, 4, 2 * B.SEGMENT, repeat=1, probe=200 * MiB)
    assert row["bandwidth_fraction"] is None and row["unsettled_segments"] == 2
    row.update(time_to_first_token_ms={"min": 1, "median": 1, "max": 1}, cache_resident=False,
               last_level_cache=32 * MiB)
    assert "the read bandwidth moved during every segment: no bandwidth figure" in B.format_row(row)


def test_time_to_first_token_per_threads_row(monkeypatch):
    calls = _fake(monkeypatch, 1 * MiB)
    out = io.BytesIO()
    B.run(_args(json=True, threads=[1, 2]), out, io.StringIO())
    rows = json.loads(out.getvalue())
    assert calls["ttft"] == [1, 1, 2, 2]                     # repeat 2, each row its threads
    assert [r["time_to_first_token_ms"]["median"] for r in rows] == [1.0, 2.0]


@pytest.mark.parametrize("args, message", [
    ([], "--llama-bench (or LLAMA_BENCH=) is required"),
    (["--llama-bench", "/nonexistent/llama-bench"], "no llama-bench at /nonexistent/llama-bench"),
    (["--llama-bench", "x", "--rounds", "0"], "--rounds must be at least 1"),
])
def test_bench_avx2_refuses_what_it_cannot_measure(args, message):
    """benchmarks/avx2.py (`make bench-avx2`) ends with one clear line, before it builds anything,
    when it has no llama-bench to compare with or a count below 1."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_BENCH"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "avx2.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _compare_module():
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import compare
    finally:
        sys.path.remove(str(root / "benchmarks"))
    return compare


def _chunk(text, reason=None):
    return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}


def test_bench_compare_counts_tokens_not_chunks():
    """`make bench-compare` divides generated tokens, not streamed chunks, by the time: the two
    projects' streams of one completion differ in chunks (llama-cpp-python sends one per token,
    empty where a character is unfinished; pyllama holds those bytes for the next chunk), and
    both end with a chunk that only gives the reason. Expected counts: usage.completion_tokens of
    the same completion not streamed (pyllama; ", there was" when stopped at " was", whose token
    sends no text: a stopped stream counts its chunks with text, a lower bound), and the chunks
    written here (llama-cpp-python's shape: 3 tokens, the second inside a character, then the
    closing chunk)."""
    from pyllama import Llama

    compare = _compare_module()
    m = Llama(str(shared_path("models/stories260K-f32.gguf")), threads=1, n_ctx=128)
    usage = m.create_completion("Once upon a time", max_tokens=20, temperature=0.0)["usage"]
    stream = m.create_completion("Once upon a time", max_tokens=20, temperature=0.0, stream=True)
    assert compare.count_tokens(stream, 20) == usage["completion_tokens"] == 20
    # stopped by a stop string: the chunks with text (the stop's own token sends none)
    out = m.create_completion("Once upon a time", max_tokens=60, temperature=0.0, stop=[" was"])
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 3
    stream = m.create_completion("Once upon a time", max_tokens=60, temperature=0.0, stop=[" was"], stream=True)
    assert compare.count_tokens(stream, 60) == 2
    lcpp = [_chunk(" a"), _chunk(""), _chunk("é"), _chunk("", "length")]
    assert compare.count_tokens(iter(lcpp), 3) == 3
    stopped = [_chunk(" a"), _chunk(" b"), _chunk("", "stop")]
    assert compare.count_tokens(iter(stopped), 10) == 2


@pytest.mark.parametrize("arg", ["--rounds=0", "--repeat=0", "--threads=-1", "--gen=0", "--prompt=0"])
def test_bench_compare_refuses_counts_below_one(arg):
    """benchmarks/compare.py: a count below 1 is one usage error (exit 2), not a traceback from
    the median of no samples after minutes of llama.cpp runs."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
    proc = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "must be at least 1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
