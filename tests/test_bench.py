"""`pyllama bench`'s logic (not its timings): the bandwidth probe's size, the cache-resident
case, and time to first token measured per --threads row.

Where expected values come from: the rules in pyllama/bench.py's docstrings (probe = 4x the
last-level cache or the bytes a token reads, within 64 MiB..1 GiB; none when the weights fit in
the cache) and a fake sysfs cache tree written here.
"""
import argparse
import io
import json
import types

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
    B.run(_args(json=True, threads=[2]), out, io.StringIO())
    (row,) = json.loads(out.getvalue())
    assert calls["probe"] == [200 * MiB] * 2 and row["cache_resident"] is False  # one per round
    assert abs(row["bandwidth_fraction"] - row["gen_tok_s"]["median"] * 200 * MiB / 10e9) < 1e-9
    assert row["read_bandwidth"]["median"] == 10e9
    assert "% of the read bandwidth measured in the same rounds (10.0 GB/s)" in B.format_row(row)


def test_fraction_pairs_each_round_with_its_own_probe(monkeypatch):
    """The probe moves with the machine's load: each round's generation is divided by the probe
    timed right after it, and the row reports the median of those fractions, not the median
    generation over a probe from another moment."""
    _fake(monkeypatch, 200 * MiB)
    rates = iter([10e9, 40e9, 20e9])
    monkeypatch.setattr(B, "read_bandwidth", lambda threads, nbytes, repeat=5: next(rates))
    speeds = [100.0, 400.0, 150.0]

    class FakeLlama:  # what bench() uses of a Llama
        threads, n_ctx, vocab_size, file = 1, 64, 32, None

        def logits(self, ids, last_only):
            pass

        def generate_tokens(self, ids, n, **kw):
            return iter(range(10))

    m = FakeLlama()
    clock = iter(x for s in speeds for x in (0.0, 1.0, 0.0, 10 / s))  # prompt start/end, gen start/end
    monkeypatch.setattr(B, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    row = B.bench(m, 1, 4, 10, repeat=3, probe=200 * MiB)
    fractions = sorted(s * 200 * MiB / bw for s, bw in ((100, 10e9), (400, 40e9), (150, 20e9)))
    assert row["bandwidth_fraction"] == fractions[1]
    assert row["gen_tok_s"]["median"] * 200 * MiB / row["read_bandwidth"]["median"] != fractions[1]


def test_time_to_first_token_per_threads_row(monkeypatch):
    calls = _fake(monkeypatch, 1 * MiB)
    out = io.BytesIO()
    B.run(_args(json=True, threads=[1, 2]), out, io.StringIO())
    rows = json.loads(out.getvalue())
    assert calls["ttft"] == [1, 1, 2, 2]                     # repeat 2, each row its threads
    assert [r["time_to_first_token_ms"]["median"] for r in rows] == [1.0, 2.0]
