"""Rows/s of pyllama.ray.generate with 1 and 2 actors (and 1 actor of 2 threads) on a local Ray,
next to the plain Python API (one row at a time, 1 thread). The README's Ray table comes from it.

    python benchmarks/ray_scale.py MODEL TOKENIZER ROWS MAX_TOKENS [--cpus 2]

Each Ray run includes starting its actors and mapping the model (about 3 s here); run it with
ROWS large enough that generation dominates.
"""
import argparse
import logging
import time

import ray

import pyllama
import pyllama.ray


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("rows", type=int)
    ap.add_argument("max_tokens", type=int)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    prompts = [f"Once upon a time {i}" for i in range(a.rows)]
    with pyllama.Llama(a.model, tokenizer=a.tokenizer, threads=1) as llama:
        n = min(32, a.rows)
        t = time.perf_counter()
        for p in prompts[:n]:
            llama.create_completion(p, max_tokens=a.max_tokens, temperature=0)
        print(f"plain Llama.create_completion, 1 thread: {n / (time.perf_counter() - t):.1f} rows/s")
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    for actors, threads in [(1, 1), (2, 1), (1, 2)] * 2:
        ds = ray.data.from_items([{"prompt": p} for p in prompts], override_num_blocks=16)
        t = time.perf_counter()
        out = pyllama.ray.generate(ds, a.model, tokenizer=a.tokenizer, concurrency=actors,
                                   threads_per_actor=threads, batch_size=a.batch_size,
                                   max_tokens=a.max_tokens, temperature=0).take_all()
        dt = time.perf_counter() - t
        assert len(out) == a.rows and not any(r["error"] for r in out)
        print(f"{actors} actor(s) x {threads} thread(s): {a.rows} rows in {dt:.1f} s = "
              f"{a.rows / dt:.1f} rows/s")
    ray.shutdown()


if __name__ == "__main__":
    main()
