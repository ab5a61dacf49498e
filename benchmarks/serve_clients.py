"""`make bench-serve`: aggregate generated tokens/s of 1, 2, 4, 8 streaming HTTP clients.

Starts `pyllama serve MODEL --parallel 8` (a subprocess on a free port of 127.0.0.1), then for each
client count k runs k threads, each streaming one greedy /v1/completions request after another
(a fixed random token-id prompt, --gen tokens, EOS biased away so every stream runs its length),
and reports the completion tokens all clients received per second of wall time (best of
--repeat), time to first token and the ratio to one client. benchmarks/serve_scaling.py measures
the engine alone, without HTTP. Default model: the stories15M shape with synthetic weights as
GGUF Q8_0 (benchmarks/bench.py makes and caches it).

    python benchmarks/serve_clients.py [--model FILE] [--clients 1,2,4,8] [--gen 128] [--json FILE]

Not measured here: llama.cpp's llama-server on the same file and clients (not built on this
machine).
"""
import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama  # noqa: E402
from machine import cpu_line  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(http, url, prompt, gen, eos):
    """One streamed completion: (completion tokens, seconds to the first text, seconds)."""
    t0 = time.perf_counter()
    first, n = None, 0
    body = dict(prompt=prompt, max_tokens=gen, temperature=0, stream=True, logit_bias={str(eos): -1e4},
                stream_options={"include_usage": True})
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and first is None:
                first = time.perf_counter() - t0
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
    return n, first, time.perf_counter() - t0


def run_clients(url, k, prompts, gen, eos):
    def client(i):
        with httpx.Client(timeout=600) as http:
            return stream_one(http, url, prompts[i], gen, eos)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(k) as pool:
        res = list(pool.map(client, range(k)))
    wall = time.perf_counter() - t0
    return sum(r[0] for r in res), wall, statistics.median(r[1] for r in res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file (default: stories15M-shaped Q8_0)")
    ap.add_argument("--clients", default="1,2,4,8", help="concurrent streaming clients to measure")
    ap.add_argument("--gen", type=int, default=128, help="tokens each client's request generates")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens of each request")
    ap.add_argument("--threads", type=int, default=None, help="server threads (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    if args.model is None:
        from bench import model_file
        args.model = model_file("stories15M", "q8_0")
    clients = [int(c) for c in args.clients.split(",")]
    mf = pyllama.load(args.model)
    vocab, eos = mf.config["vocab_size"], (mf.tokenizer.eos_id if mf.tokenizer is not None else 2)
    port = free_port()
    cmd = [sys.executable, "-m", "pyllama", "serve", str(args.model), "--port", str(port),
           "--parallel", str(max(clients)), "--ctx-size", str(args.prompt + args.gen + 8)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"pyllama serve did not start (exit status {server.poll()})")
            time.sleep(0.2)
        rng = np.random.default_rng(0)
        prompts = [[1] + rng.integers(3, vocab, size=args.prompt - 1).tolist() for _ in range(max(clients))]
        run_clients(url, 1, prompts, 8, eos)  # warm up
        rows = []
        for k in clients:
            best = None
            for _ in range(args.repeat):
                n, wall, ttft = run_clients(url, k, prompts, args.gen, eos)
                if best is None or n / wall > best[0] / best[1]:
                    best = (n, wall, ttft)
            n, wall, ttft = best
            rows.append(dict(clients=k, tokens=n, tok_s=n / wall, ttft_ms=1e3 * ttft))
    finally:
        server.terminate()
        server.wait(60)
    one = rows[0]["tok_s"] if rows and rows[0]["clients"] == 1 else None
    print(cpu_line())
    print(f"{Path(str(args.model)).name} over HTTP (`pyllama serve --parallel {max(clients)}`): "
          f"{args.prompt}-token prompts, {args.gen} tokens per streamed request, best of {args.repeat}")
    print(f"{'clients':>7} {'tok/s':>9} {'vs 1 client':>11} {'TTFT ms':>8}")
    for r in rows:
        r["ratio"] = r["tok_s"] / one if one else None
        ratio = f"{r['ratio']:.2f}x" if one else ""
        print(f"{r['clients']:>7} {r['tok_s']:>9.1f} {ratio:>11} {r['ttft_ms']:>8.1f}")
    print("llama.cpp's llama-server was not measured side by side (not built here).")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(args.model), cpu=cpu_line(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
