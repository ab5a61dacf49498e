"""Where a second thread starts to pay: generation tok/s at 1 and 2 threads on growing shapes.

pyllama's default thread count is 1 below model.MIN_LAYER_WORK multiply-adds per token and layer.
This measures the ratio 2 threads / 1 thread per shape (synthetic weights, make_model.py, cached
in build/bench-models/), the two interleaved in each round so that both see the same machine.

    python benchmarks/threads.py [--rounds 5] [--tokens 200]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYLLAMA_SHARED") or ROOT.parent / "shared")
MODELS = ROOT / "build" / "bench-models"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama  # noqa: E402
from machine import cpu_line  # noqa: E402
from pyllama.model import MIN_LAYER_WORK, layer_work  # noqa: E402

# (dim, hidden, layers, heads, kv heads, vocab): stories260K's shape, three between, stories15M's
SHAPES = [(64, 172, 5, 8, 4, 512), (96, 256, 5, 8, 8, 512), (128, 344, 5, 8, 8, 512),
          (192, 512, 6, 8, 8, 4096), (288, 768, 6, 6, 6, 32000)]


def shape_file(dim, hidden, layers, heads, kv, vocab):
    path = MODELS / f"shape-{dim}-{hidden}-{layers}-{heads}-{kv}-{vocab}.bin"
    if not path.exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_model.py"), "--dim", str(dim),
                        "--hidden", str(hidden), "--layers", str(layers), "--heads", str(heads),
                        "--kv-heads", str(kv), "--vocab", str(vocab), "--seq", "512", "--shared",
                        "--out", str(tmp)], check=True)
        tmp.replace(path)
    return path


def tok_s(m, threads, tokens):
    """Greedy generation speed over `tokens` positions (one forward pass each)."""
    m.threads = threads
    t0 = time.perf_counter()
    n = sum(1 for _ in m.generate_tokens([1], tokens, temperature=0.0, seed=1, stop=False))
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    print(cpu_line())
    print(f"default: 1 thread below {MIN_LAYER_WORK:,} multiply-adds per token and layer")
    print(f"{'dim':>5} {'hidden':>6} {'layer work':>11} {'1 thread':>9} {'2 threads':>9}  2t/1t median [min..max]")
    for shape in SHAPES:
        m = pyllama.Llama(shape_file(*shape), n_ctx=512)
        tok_s(m, 1, 16)  # warm: pages mapped, threads started
        tok_s(m, 2, 16)
        one, two = [], []
        for _ in range(args.rounds):
            one.append(tok_s(m, 1, args.tokens))
            two.append(tok_s(m, 2, args.tokens))
        r = sorted(b / a for a, b in zip(one, two))
        work = layer_work(m.config)
        print(f"{shape[0]:5} {shape[1]:6} {work:11,} {statistics.median(one):9.0f} {statistics.median(two):9.0f}"
              f"  {statistics.median(r):.2f}x [{r[0]:.2f}..{r[-1]:.2f}]", flush=True)
        m.close()


if __name__ == "__main__":
    main()
