"""Continuous batching: aggregate generated tokens/s with 1, 2, 4, 8 concurrent sequences.

Each stream is a greedy request (a short random prompt, --gen tokens) submitted to one
pyllama.engine.Engine with as many slots as streams, all at once; the figure is the tokens they
generate together per second of wall time (best of --repeat), beside the CPU time per token and
the single-sequence path (generate_tokens, one stream, no engine) as the baseline. Default model:
the stories15M shape with synthetic weights as GGUF Q8_0 (benchmarks/bench.py makes and caches it).

    python benchmarks/serve_scaling.py [--model FILE] [--streams 1,2,4,8] [--gen 128] [--json FILE]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama  # noqa: E402
from pyllama.engine import Engine, GreedyPolicy  # noqa: E402
from pyllama.generate import generate_tokens  # noqa: E402
from pyllama.model import Transformer  # noqa: E402
from pyllama.sampler import Sampler  # noqa: E402


def prompts(vocab, n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=length - 1).tolist() for _ in range(n)]


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens, time.perf_counter() - w0, time.process_time() - c0


def single_path(mf, prompt, gen, n_ctx, threads):
    t = Transformer(mf, n_ctx=n_ctx, threads=threads)
    sampler = Sampler(mf.config["vocab_size"], 0.0, 0.9, 1)

    def run():
        pairs = generate_tokens(t, prompt, len(prompt) + gen - 1, sampler, bos_id=None)
        return sum(1 for _ in pairs) - (len(prompt) - 1)
    return timed(run)


def engine_run(engine, ps, gen):
    def run():
        handles = [engine.submit(p, GreedyPolicy(max_tokens=gen)) for p in ps]
        return sum(len(h.result(timeout=3600)) for h in handles)
    return timed(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file (default: stories15M-shaped Q8_0)")
    ap.add_argument("--streams", default="1,2,4,8", help="concurrent sequences to measure")
    ap.add_argument("--gen", type=int, default=128, help="tokens each stream generates")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens of each stream")
    ap.add_argument("--threads", type=int, default=None, help="OpenMP threads (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    if args.model is None:
        from bench import model_file
        args.model = model_file("stories15M", "q8_0")
    mf = pyllama.load(args.model)
    streams = [int(s) for s in args.streams.split(",")]
    n_ctx = args.prompt + args.gen + 1
    vocab = mf.config["vocab_size"]
    rows = []

    best = None
    for _ in range(args.repeat):
        n, wall, cpu = single_path(mf, prompts(vocab, 1, args.prompt)[0], args.gen, n_ctx, args.threads)
        best = min(best or (wall, cpu, n), (wall, cpu, n))
    wall, cpu, n = best
    rows.append(dict(mode="single-sequence path", streams=1, tokens=n, tok_s=n / wall, cpu_ms_per_tok=1e3 * cpu / n))
    for k in streams:
        with Engine(mf, slots=k, n_ctx=n_ctx, threads=args.threads, max_queue=0) as engine:
            best = None
            for r in range(args.repeat):
                n, wall, cpu = engine_run(engine, prompts(vocab, k, args.prompt, seed=r + 1), args.gen)
                best = min(best or (wall, cpu, n), (wall, cpu, n))
            steps = engine.stats()["steps"]
        wall, cpu, n = best
        rows.append(dict(mode="engine", streams=k, tokens=n, tok_s=n / wall, cpu_ms_per_tok=1e3 * cpu / n,
                         steps=steps))
    one = next((r["tok_s"] for r in rows if r["mode"] == "engine" and r["streams"] == 1), None)
    print(f"{Path(str(args.model)).name}: {args.prompt}-token prompts, {args.gen} generated tokens per "
          f"stream, threads {args.threads or 'all'}, best of {args.repeat}")
    print(f"{'mode':<22} {'streams':>7} {'tok/s':>9} {'vs 1 stream':>11} {'CPU ms/tok':>10}")
    for r in rows:
        ratio = f"{r['tok_s'] / one:.2f}x" if one and r["mode"] == "engine" else ""
        r["ratio"] = r["tok_s"] / one if one else None
        print(f"{r['mode']:<22} {r['streams']:>7} {r['tok_s']:>9.1f} {ratio:>11} {r['cpu_ms_per_tok']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(args.model), rows=rows), indent=1))


if __name__ == "__main__":
    main()
