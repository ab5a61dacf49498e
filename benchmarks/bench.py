"""`make bench`: pyllama's speed on llama2.c's published shapes, as the issue's table.

Models: stories260K (real, ../shared), stories15M and stories110M shapes with synthetic weights
(../shared/tools/make_model.py --shared), as llama2.c .bin, as llama2.c V2 int8 and as GGUF F32, F16,
Q8_0, Q4_0 and Q4_K_M, the last six made by `pyllama convert` (all cached in build/bench-models/). For each: generation tok/s
(256 tokens, temperature 0) at 1 and 2 threads, prompt tok/s (128 tokens, batched), min/median/max
over --repeat runs, bytes read per token, the fraction of the read bandwidth measured in the
same run, and the time to first token (a fresh Llama each time, median of 5). Then the contention
rows: 1, 2 and 4 processes generating at once at the default thread count (stories260K and the
stories15M f32 shape), aggregate tok/s against one process alone in the same round
(benchmarks/contention.py). Every figure is measured in this run on this machine; the first line
names the CPU. `make bench-compare` runs llama-cpp-python side by side.

    python benchmarks/bench.py [--quick] [--repeat 3] [--json FILE] [--contention]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYLLAMA_SHARED") or ROOT.parent / "shared")
MODELS = ROOT / "build" / "bench-models"

import pyllama  # noqa: E402
from pyllama.bench import (bench, bytes_per_token, last_level_cache, probe_bytes,  # noqa: E402
                           read_bandwidth, time_to_first_token)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contention import contention, ratios  # noqa: E402
from machine import cpu_line  # noqa: E402


def model_file(name, fmt):
    if name == "stories260K":
        return SHARED / "models" / "stories260K.bin"
    MODELS.mkdir(parents=True, exist_ok=True)
    src = MODELS / f"{name}.bin"
    if not src.exists():
        print(f"making {src} (make_model.py --shape {name} --shared)", file=sys.stderr)
        tmp = src.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_model.py"), "--shape", name,
                        "--shared", "--out", str(tmp)], check=True)
        tmp.replace(src)
    if fmt == "bin":
        return src
    out = MODELS / (f"{name}-v2.bin" if fmt == "v2" else f"{name}-{fmt}.gguf")
    if not out.exists():
        print(f"converting {src.name} to {out.name}", file=sys.stderr)
        from pyllama.convert import convert
        convert(src, out, type=fmt, tokenizer=SHARED / "models" / "tokenizer.bin")
    return out


LLAMA3_1B = ["--dim", "2048", "--layers", "16", "--heads", "32", "--kv", "8", "--ffn", "8192"]


def llama3_1b(fmt):
    """The Llama-3.2-1B-shaped file (random weights, Meta's vocabulary, tied classifier) as `fmt`,
    made on demand in build/bench-models: make_llama3.py writes F32, `pyllama convert` quantizes."""
    MODELS.mkdir(parents=True, exist_ok=True)
    src = MODELS / "llama3-1b-f32.gguf"
    if not src.exists():
        import llama_models  # pip install llama-models: Meta's tokenizer.model
        tok = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
        print(f"making {src.name} (make_llama3.py {' '.join(LLAMA3_1B)}; ~5 GB)", file=sys.stderr)
        tmp = src.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_llama3.py"), *LLAMA3_1B, str(tok),
                        str(tmp)], check=True)
        tmp.replace(src)
    out = MODELS / f"llama3-1b-{fmt}.gguf"
    if not out.exists():
        print(f"converting {src.name} to {out.name}", file=sys.stderr)
        from pyllama.convert import convert
        convert(src, out, type=fmt)
    return out


def tensor_rates(path, names, threads, repeat=5):
    """(type, GB/s, seconds, bytes) of one-token pl_matmul over each named tensor (best of
    `repeat`): the classifier's share of a token's time should not pass its share of the bytes."""
    import time
    import numpy as np
    from pyllama._core import ffi, lib
    from pyllama.formats.gguf import read_gguf
    mf = read_gguf(path)
    rates = {}
    for name in names:
        t = mf.tensors[name]
        pt = ffi.new("pl_tensor *")
        buf = ffi.from_buffer(t.data)
        pt.data, pt.scales, pt.type, pt.group_size = ffi.cast("void *", buf), ffi.NULL, t.type, 0
        pt.rows, pt.cols = t.shape
        x = np.random.default_rng(0).standard_normal(t.shape[1]).astype(np.float32)
        out = np.empty(t.shape[0], np.float32)
        scratch = np.zeros(lib.pl_matmul_scratch_bytes(pt, 1) + 64, np.uint8)
        args = (ffi.cast("float *", ffi.from_buffer(out)), ffi.cast("float *", ffi.from_buffer(x)), 1, pt,
                ffi.from_buffer(scratch), threads)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            lib.pl_matmul(*args)
            best = min(best, time.perf_counter() - t0)
        rates[name] = (t.type_name, t.data.nbytes / best / 1e9, best, t.data.nbytes)
    mf.close()
    return rates


def big_rows(repeat):
    """The Llama-3.2-1B-shaped rows (issue 10 item 5): generation at 1 and 2 threads, prompt 128
    and 512 at 2 threads, the bandwidth fraction, and the classifier's read rate against a layer's."""
    print(f"\nLlama-3.2-1B shape ({' '.join(LLAMA3_1B)}, vocab 128256, tied), 2 threads unless said")
    head = (f"{'format':7} {'MB/tok':>7} {'gen 1t':>7} {'gen 2t':>7} {'[min..max 2t]':>15} {'%bw':>4} "
            f"{'pp128':>7} {'pp512':>7}  classifier: type, share of bytes / of a token's time")
    print(head)
    print("-" * len(head))
    rows = []
    for fmt in ("q8_0", "q4_0", "q4_k_m"):
        path = llama3_1b(fmt)
        m = pyllama.Llama(path, n_ctx=640)
        r1 = bench(m, 1, 16, 32, repeat)
        r2 = bench(m, 2, 128, 64, repeat, probe_bytes(bytes_per_token(m.file), last_level_cache()))
        r5 = bench(m, 2, 512, 1, repeat)
        m.close()
        ct, cr, cs, cb = tensor_rates(path, ["token_embd.weight"], 2)["token_embd.weight"]
        g2 = r2["gen_tok_s"]["median"]
        frac = r2["bandwidth_fraction"]
        print(f"{fmt:7} {r2['bytes_per_token'] / 1e6:7.1f} {r1['gen_tok_s']['median']:7.1f} {g2:7.1f} "
              f"{'[%.1f..%.1f]' % (r2['gen_tok_s']['min'], r2['gen_tok_s']['max']):>15} "
              f"{'-' if frac is None else format(frac * 100, '.0f'):>4} "
              f"{r2['prompt_tok_s']['median']:7.1f} {r5['prompt_tok_s']['median']:7.1f}  "
              f"{ct} {cb / r2['bytes_per_token'] * 100:.0f}% / {cs * g2 * 100:.0f}%", flush=True)
        rows.append(dict(model="llama3-1b", format=fmt, one_thread=r1, two_threads=r2, prompt512=r5,
                         bandwidth_fraction=frac, classifier_gb_s=cr, classifier_bytes=cb,
                         classifier_time_share=cs * g2))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="stories260K and stories15M only")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--contention", action="store_true", help="the contention rows only")
    ap.add_argument("--big", action="store_true", help="the Llama-3.2-1B-shaped rows only")
    args = ap.parse_args()
    if args.contention:
        print(cpu_line())
        return contention_rows(args.repeat)
    shapes = [] if args.big else ["stories260K", "stories15M"] + ([] if args.quick else ["stories110M"])
    formats = ["bin", "v2", "f32", "f16", "q8_0", "q4_0", "q4_k_m"]
    print(cpu_line())
    print(f"pyllama {pyllama.__version__} ({pyllama.build_info()})")
    bw = {t: read_bandwidth(t, 1 << 30) for t in (1, 2)}
    print(f"read bandwidth (1 GiB sum): 1 thread {bw[1] / 1e9:.1f} GB/s, 2 threads {bw[2] / 1e9:.1f} GB/s "
          f"(%bw: bytes read, weights and KV cache, against the mean of the probes around each 32 "
          f"generated tokens; segments whose probes differ by over 15% left out)\n")
    head = (f"{'model':12} {'format':7} {'MB/tok':>7} {'gen 1t':>8} {'gen 2t':>8} {'[min..max 2t]':>17} "
            f"{'%bw':>4} {'prompt 2t':>9} {'ttft ms':>7}")
    print(head)
    print("-" * len(head))
    rows = []
    for name in shapes:
        for fmt in (["bin"] if name == "stories260K" else formats):
            path = model_file(name, fmt)
            m = pyllama.Llama(path)
            r1 = bench(m, 1, 128, 256, args.repeat)
            r2 = bench(m, 2, 128, 256, args.repeat, probe_bytes(bytes_per_token(m.file), last_level_cache()))
            ttft = statistics.median(time_to_first_token(path) for _ in range(5))
            g1, g2 = r1["gen_tok_s"]["median"], r2["gen_tok_s"]["median"]
            frac = r2["bandwidth_fraction"]  # None: the weights fit in the last-level cache, or
            # the bandwidth moved during every segment
            print(f"{name:12} {fmt:7} {r2['bytes_per_token'] / 1e6:7.1f} {g1:8.1f} {g2:8.1f} "
                  f"{'[%.1f..%.1f]' % (r2['gen_tok_s']['min'], r2['gen_tok_s']['max']):>17} "
                  f"{'-' if frac is None else format(frac * 100, '.0f'):>4} "
                  f"{r2['prompt_tok_s']['median']:9.1f} {ttft * 1000:7.1f}",
                  flush=True)
            rows.append(dict(model=name, format=fmt, one_thread=r1, two_threads=r2,
                             time_to_first_token_ms=ttft * 1000, bandwidth_fraction=frac))
            m.close()
    if args.big:
        return big_rows(args.repeat)
    rows += [] if args.quick else big_rows(args.repeat)
    crows = contention_rows(args.repeat)
    tokenizer_speed()
    prefix = prefix_cache_row(args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_line(), read_bandwidth=bw, rows=rows,
                                                   contention=crows, prefix_cache=prefix), indent=2))


def prefix_cache_row(repeat):
    """Time to first token of a chat's second turn after ~1,000 tokens of history: with the
    prefix cache (only the new message is evaluated) vs cold (goal: >= 10x)."""
    from prefix_cache import prefix_cache_speedup
    r = prefix_cache_speedup(model_file("stories15M", "bin"), SHARED / "models" / "tokenizer.bin",
                             history_tokens=1000, repeat=repeat)
    print(f"\nprefix cache: stories15M shape, second chat turn after {r['history_tokens']} tokens: "
          f"time to first token cold {r['cold_s'] * 1e3:.1f} ms, cached {r['warm_s'] * 1e3:.1f} ms "
          f"({r['new_tokens']} tokens evaluated): {r['speedup']:.1f}x (goal >= 10x)")
    return r


def contention_rows(rounds, procs=(1, 2, 4), seconds=3.0):
    """N processes at once, default threads: aggregate tok/s vs one alone (goal: >= 0.8x)."""
    print(f"\ncontention: N processes generating at once for {seconds:g} s, default threads, "
          f"{rounds} interleaved rounds; ratio = aggregate / one alone in the same round "
          f"(median [min..max]), goal >= 0.8x")
    head = f"{'model':22} {'threads':>7} " + " ".join(f"{f'{n} proc tok/s':>14} {'ratio':>17}" for n in procs)
    print(head)
    print("-" * len(head))
    out = []
    for name, path, tok in [("stories260K", model_file("stories260K", "bin"), SHARED / "models" / "tok512.bin"),
                            ("stories15M f32 .bin", model_file("stories15M", "bin"), SHARED / "models" / "tokenizer.bin")]:
        res, threads = contention(path, tok, procs, rounds, seconds)
        agg, rat, threads = res[""], ratios(res[""], procs), threads[""]
        cells = " ".join(f"{statistics.median(agg[n]):14.1f} {'%.2fx [%.2f..%.2f]' % (rat[n][1], rat[n][0], rat[n][2]):>17}"
                         for n in procs)
        print(f"{name:22} {threads:7} {cells}", flush=True)
        out.append(dict(model=name, threads=threads, aggregate_tok_s={n: agg[n] for n in procs},
                        ratio={n: rat[n] for n in procs}))
    return out


# -- tokenizer: 1 MB of mixed text through pyllama's byte-level BPE and tiktoken, same run ---------
CJK = ("天气很好，我们去公园散步吧。今天的会议推迟到下午三点。这个程序的速度比以前快了很多。"
       "東京は日本の首都です。私は毎朝コーヒーを飲みます。新しいモデルを試してみましょう。"
       "한국어 문장도 조금 넣어 봅시다. 오늘은 날씨가 맑습니다.")
EMOJI = "😀😂🥲🤖🚀🌍🎉👍🏽❤️🔥✨🙈👨‍👩‍👧‍👦🇫🇷"


def mixed_text(n_bytes=1 << 20, seed=0):
    """Deterministic mixed text of n_bytes UTF-8 bytes: English prose (docstrings of the standard
    library) and Python code, numbers and dates, shuffled CJK sentences, emoji."""
    import ast
    import random
    rng = random.Random(seed)
    lib = Path(os.__file__).parent
    code, prose = [], []
    for mod in ("argparse", "collections/__init__", "json/decoder", "textwrap", "difflib",
                "inspect", "typing", "pathlib", "email/message"):
        src = (lib / f"{mod}.py").read_text(encoding="utf-8")
        code.append(src)
        prose += [d for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                  for d in [ast.get_docstring(n)] if d]
    parts, size = [], 0
    while size < n_bytes:
        k = rng.random()
        if k < 0.35:
            s = rng.choice(prose)
        elif k < 0.6:
            s = rng.choice(code)[rng.randrange(20000):][:rng.randrange(200, 3000)]
        elif k < 0.75:
            s = " ".join(rng.choice([str(rng.randrange(10 ** rng.randrange(1, 12))),
                                     f"{rng.uniform(-1e4, 1e4):.{rng.randrange(6)}f}",
                                     f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-"
                                     f"{rng.randrange(1, 29):02d}"]) for _ in range(rng.randrange(5, 60)))
        elif k < 0.9:
            s = "".join(rng.sample(CJK, len(CJK) // 2))
        else:
            s = " ".join(rng.choice(EMOJI) + rng.choice(["ok", "yes!", "lol", "", "wow"])
                         for _ in range(rng.randrange(3, 20)))
        s += rng.choice(["\n", "\n\n", " ", "\t"])
        parts.append(s)
        size += len(s.encode())
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def tokenizer_speed(repeat=3):
    """Encode 1 MB of mixed text with the Llama 3 vocabulary (cold cache each time; best of
    `repeat`) next to tiktoken with Meta's tokenizer.model; ids must agree."""
    import time
    import tiktoken
    import llama_models
    from tiktoken.load import load_tiktoken_bpe
    from pyllama.tokenizers.bpe import PRE_TOKENIZERS
    tok = pyllama.load_tokenizer(SHARED / "models" / "bpe" / "llama3-tiny-f16.gguf")
    ranks = load_tiktoken_bpe(str(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"))
    enc = tiktoken.Encoding("llama3", pat_str=PRE_TOKENIZERS["llama-bpe"][0][0],
                            mergeable_ranks=ranks, special_tokens={})
    text = mixed_text()
    ours, theirs = [], []
    for _ in range(repeat):
        tok._cache.clear()
        t = time.perf_counter()
        ids = tok.encode(text, bos=False)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = enc.encode_ordinary(text)
        theirs.append(time.perf_counter() - t)
    t = time.perf_counter()
    tok.encode(text, bos=False)
    warm = time.perf_counter() - t
    print(f"\ntokenizer: 1 MB mixed text, Llama 3 vocabulary: pyllama {min(ours):.3f} s (cold cache; "
          f"{warm:.3f} s warm), tiktoken {min(theirs):.3f} s ({min(ours) / min(theirs):.1f}x), "
          f"{len(ids)} tokens, ids {'identical' if ids == ref else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
