"""`make bench`: generation speed of pyllama on llama2.c's published shapes (synthetic weights).

For each model: tokens/s generating 256 positions at temperature 0 (min/median/max of --repeat
runs), at 1 and 2 threads; the share of the time spent in Python (the token loop, sampling call,
decoding) versus inside the C forward pass; and time to first token (load + first forward).

    python benchmarks/bench.py [--models stories15M,stories110M,stories260K] [--repeat 3] [--json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYLLAMA_SHARED") or ROOT.parent / "shared")
MODELS = ROOT / "build" / "bench-models"

import pyllama  # noqa: E402
from pyllama.generate import generate_tokens, make_sampler  # noqa: E402


def model_path(name):
    if name == "stories260K":
        return SHARED / "models" / "stories260K.bin"
    MODELS.mkdir(parents=True, exist_ok=True)
    out = MODELS / f"{name}.bin"
    if not out.exists():
        print(f"making {out} with make_model.py --shape {name} --shared …", file=sys.stderr)
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_model.py"), "--shape", name,
                        "--shared", "--out", str(tmp)], check=True)
        tmp.replace(out)
    return out


def bench_generate(m, steps, threads):
    """tokens/s of the whole loop, and the fraction of it spent inside pl_forward."""
    m.threads = threads
    t_forward = 0.0
    fwd = m._model.forward

    def timed_forward(tok, pos):
        nonlocal t_forward
        t0 = time.perf_counter()
        r = fwd(tok, pos)
        t_forward += time.perf_counter() - t0
        return r

    sampler = make_sampler(m._model, 0.0, 0.9, 1)
    m._model.forward = timed_forward
    try:
        t0 = time.perf_counter()
        # bos_id=None: random weights may sample BOS, which must not end a speed run
        n = sum(1 for _ in generate_tokens(m._model, [1], steps, sampler, bos_id=None))
        total = time.perf_counter() - t0
    finally:
        del m._model.forward
    return n / total, 1 - t_forward / total


def bench_api_stream(m, steps, threads):
    """tokens/s through the public streaming API (decoding included)."""
    m.threads = threads
    if m.tokenizer is None:
        return None
    t0 = time.perf_counter()
    n = sum(1 for _ in m.generate("", steps=steps, temperature=0))
    return steps / (time.perf_counter() - t0) if n else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260K,stories15M,stories110M")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    print(f"pyllama {pyllama.__version__} ({pyllama.build_info()}), {os.cpu_count()} CPUs", file=sys.stderr)
    for name in args.models.split(","):
        path = model_path(name)
        tok = SHARED / "models" / ("tok512.bin" if name == "stories260K" else "tokenizer.bin")
        t0 = time.perf_counter()
        m = pyllama.Llama(path, tokenizer=tok)
        m.logits([1])
        ttft = time.perf_counter() - t0
        for threads in map(int, args.threads.split(",")):
            runs = [bench_generate(m, args.steps, threads) for _ in range(args.repeat)]
            tps = sorted(r[0] for r in runs)
            py_share = statistics.median(r[1] for r in runs)
            row = dict(model=name, threads=threads, steps=args.steps, tok_s_min=tps[0],
                       tok_s_median=statistics.median(tps), tok_s_max=tps[-1],
                       python_share=py_share, load_and_first_token_ms=ttft * 1000,
                       weight_bytes=sum(t.nbytes for t in m.file.tensors.values()))
            rows.append(row)
            if not args.json:
                print(f"{name:12s} threads={threads}  tok/s min {tps[0]:9.1f}  median "
                      f"{row['tok_s_median']:9.1f}  max {tps[-1]:9.1f}   python share "
                      f"{py_share * 100:4.1f}%   load+first token {ttft * 1000:6.1f} ms", flush=True)
        m.close()
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
