"""Contention: N processes generating at once on one machine, aggregate tokens/s against one alone.

Each process loads the model at the default thread count (or --threads), signals that it is
ready, waits for the common start, then generates greedily for a fixed time (restarting at the end
of each `steps` positions) and reports how many tokens it made. All N start together and run for
the same time, so their tokens/s add up to the machine's aggregate.

    python benchmarks/contention.py MODEL TOKENIZER [--procs 1,2,4] [--seconds 3] [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(model, tokenizer, threads, seconds, steps):
    """Child process: load, warm up, wait for "go" on stdin, generate for `seconds`, report."""
    import pyllama
    m = pyllama.Llama(model, tokenizer=tokenizer, threads=threads)
    prompt = "Once upon a time"  # (greedy on random weights may sample BOS, ending a run early)
    for _ in m.generate(prompt, steps=8, temperature=0):
        pass
    print(json.dumps({"ready": True, "threads": m.threads}), flush=True)
    sys.stdin.readline()
    n, t0 = 0, time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        for _ in m.generate(prompt, steps=steps, temperature=0):
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        elapsed = time.perf_counter() - t0
    print(json.dumps({"tokens": n, "seconds": elapsed}), flush=True)
    m.close()


def run_at_once(model, tokenizer, n_procs, threads=None, seconds=3.0, steps=256, env=None):
    """Start n_procs workers together; returns (aggregate tok/s, [tok/s of each], threads each)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(model), str(tokenizer),
           "--seconds", str(seconds), "--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(n_procs)]
    try:
        ready = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        done = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            if p.wait(timeout=60 + 4 * seconds):
                raise RuntimeError(f"a contention worker failed with exit code {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    each = [d["tokens"] / d["seconds"] for d in done]
    return sum(each), each, ready[0]["threads"]


def contention(model, tokenizer, procs=(1, 2, 4), rounds=3, seconds=3.0, threads=None, steps=256,
               variants=None):
    """Interleaved rounds: in each round every variant runs 1, 2, 4... processes, in turn.

    variants: {name: environment} (default: one variant, this environment). Returns
    {name: {n: [aggregate tok/s per round]}} and {name: the thread count the workers chose}."""
    variants = variants or {"": None}
    res = {v: {n: [] for n in procs} for v in variants}
    chosen = {}
    for _ in range(rounds):
        for v, env in variants.items():
            for n in procs:
                agg, _, chosen[v] = run_at_once(model, tokenizer, n, threads, seconds, steps, env)
                res[v][n].append(agg)
    return res, chosen


def ratios(res, procs):
    """Per round: aggregate at n processes / one alone in the same round; (min, median, max)."""
    out = {}
    for n in procs:
        r = [a / b for a, b in zip(res[n], res[procs[0]])]
        out[n] = (min(r), statistics.median(r), max(r))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--threads", type=int, default=None, help="default: pyllama's default")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VAR=VALUE,...",
                    help="A/B: an environment variant (e.g. spin=GOMP_SPINCOUNT=1000), interleaved")
    args = ap.parse_args()
    if args.worker:
        return worker(args.model, args.tokenizer, args.threads, args.seconds, args.steps)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import cpu_line
    print(cpu_line())
    procs = [int(x) for x in args.procs.split(",")]
    variants = {}
    for spec in args.variant or ["default="]:
        name, _, assigns = spec.partition("=")
        env = dict(os.environ)
        for a in filter(None, assigns.split(",")):
            k, _, v = a.partition("=")
            env[k] = v
        variants[name] = env
    res, chosen = contention(args.model, args.tokenizer, procs, args.rounds, args.seconds,
                             args.threads, args.steps, variants)
    print(f"{os.path.basename(args.model)}, {args.rounds} interleaved rounds of {args.seconds:g} s; "
          f"aggregate tok/s (ratio to one process alone in the same round: median [min..max])")
    for v, r in res.items():
        rat = ratios(r, procs)
        cells = "  ".join(f"{n}p {statistics.median(r[n]):9.1f} tok/s ({rat[n][1]:.2f}x "
                          f"[{rat[n][0]:.2f}..{rat[n][2]:.2f}])" for n in procs)
        print(f"{v:12} {chosen[v]} thread(s)  {cells}", flush=True)


if __name__ == "__main__":
    main()
